//! The link emulator over real loopback sockets, with an echo server and a sink written here.
//!
//! Time is asserted only from below (a capped or delayed link cannot be faster than its
//! shaping allows); upper bounds would be flaky on a loaded machine, so timeouts here are
//! failure guards only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cleave_link::{LinkEmulator, LinkProfile, LinkStats, Outage, OutageMode, Shaping};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Fails the test rather than hang it.
const GUARD: Duration = Duration::from_secs(30);

async fn guarded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {GUARD:?}"))
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A server that writes back whatever it reads, and half-closes when its client does.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

/// A server that reads until its client half-closes, then answers the byte count (8 bytes,
/// little-endian) and closes.
async fn counting_sink() -> SocketAddr {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                if stream.read_to_end(&mut sink).await.is_ok() {
                    let _ = stream.write_all(&(sink.len() as u64).to_le_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    addr
}

/// `len` pseudo-random bytes (xorshift), different for each `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

async fn start(upstream: SocketAddr, profile: LinkProfile) -> LinkEmulator {
    LinkEmulator::start(loopback(), upstream, profile)
        .await
        .unwrap()
}

/// Sends `data` to the echo server through `stream` and returns what came back, read while
/// sending. Half-closes after sending and reads to the end when `close` is set.
async fn echo_through(stream: &mut TcpStream, data: &[u8], close: bool) -> Vec<u8> {
    let (mut read, mut write) = stream.split();
    let send = async {
        write.write_all(data).await.unwrap();
        if close {
            write.shutdown().await.unwrap();
        }
    };
    let receive = async {
        let mut back = Vec::with_capacity(data.len());
        if close {
            read.read_to_end(&mut back).await.unwrap();
        } else {
            back.resize(data.len(), 0);
            read.read_exact(&mut back).await.unwrap();
        }
        back
    };
    tokio::join!(send, receive).1
}

/// Sends `len` bytes to the counting sink through `link` and returns the count it answered.
async fn send_to_sink(link: SocketAddr, len: usize) -> u64 {
    let mut stream = TcpStream::connect(link).await.unwrap();
    stream.write_all(&noise(len, 7)).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    u64::from_le_bytes(answer.try_into().expect("an 8-byte count"))
}

fn capped(rate_bits_per_s: u64, queue_bytes: usize) -> Shaping {
    Shaping {
        rate_bits_per_s: Some(rate_bits_per_s),
        queue_bytes,
        ..Shaping::default()
    }
}

/// Whether the peer ended `stream` (end of stream or a reset) within the guard time.
async fn is_closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_intact_and_in_order_both_ways_through_a_shaped_link() {
    let shaping = Shaping {
        rate_bits_per_s: Some(40_000_000),
        delay: Duration::from_millis(5),
        queue_bytes: 16 * 1024,
    };
    let profile = LinkProfile {
        up: shaping,
        down: shaping,
        ..LinkProfile::default()
    };
    let link = start(echo_server().await, profile).await;
    let data = noise(300_000, 1);
    let mut stream = TcpStream::connect(link.local_addr()).await.unwrap();
    let back = guarded("echo", echo_through(&mut stream, &data, true)).await;
    assert_eq!(back.len(), data.len(), "the echo ends after every byte");
    assert!(back == data, "bytes changed or reordered on the way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_cap_holds_the_sender_back() {
    let (rate, queue, len) = (4_000_000, 16 * 1024, 300_000);
    let profile = LinkProfile {
        up: capped(rate, queue),
        ..LinkProfile::default()
    };
    let link = start(counting_sink().await, profile).await;
    let began = Instant::now();
    let count = guarded("capped send", send_to_sink(link.local_addr(), len)).await;
    let took = began.elapsed();
    assert_eq!(count, len as u64);
    let floor = Duration::from_secs_f64((len - queue) as f64 * 8.0 / rate as f64);
    assert!(
        took >= floor,
        "{len} B at {rate} bit/s took {took:?} < {floor:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_share_the_rate_of_the_link() {
    let (rate, queue, len) = (4_000_000, 16 * 1024, 150_000);
    let profile = LinkProfile {
        up: capped(rate, queue),
        ..LinkProfile::default()
    };
    let link = start(counting_sink().await, profile).await;
    let began = Instant::now();
    let (a, b) = guarded("two capped sends", async {
        tokio::join!(
            send_to_sink(link.local_addr(), len),
            send_to_sink(link.local_addr(), len)
        )
    })
    .await;
    let took = began.elapsed();
    assert_eq!((a, b), (len as u64, len as u64));
    let floor = Duration::from_secs_f64(2.0 * (len - queue) as f64 * 8.0 / rate as f64);
    assert!(
        took >= floor,
        "2 × {len} B at {rate} bit/s took {took:?} < {floor:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_pays_the_delay_both_ways() {
    let delayed = Shaping {
        delay: Duration::from_millis(50),
        ..Shaping::default()
    };
    let profile = LinkProfile {
        up: delayed,
        down: delayed,
        ..LinkProfile::default()
    };
    let link = start(echo_server().await, profile).await;
    let mut stream = TcpStream::connect(link.local_addr()).await.unwrap();
    let began = Instant::now();
    let back = guarded("round trip", echo_through(&mut stream, b"x", false)).await;
    let took = began.elapsed();
    assert_eq!(back, b"x");
    assert!(
        took >= Duration::from_millis(100),
        "round trip took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_outage_closes_connections_until_it_ends() {
    let profile = LinkProfile {
        outage_mode: OutageMode::Reset,
        ..LinkProfile::default()
    };
    let link = start(echo_server().await, profile).await;
    let mut open = TcpStream::connect(link.local_addr()).await.unwrap();
    assert_eq!(
        guarded("before", echo_through(&mut open, b"hi", false)).await,
        b"hi"
    );

    link.set_down(true);
    assert!(
        is_closed(&mut open).await,
        "an open connection outlived the outage"
    );
    // The reset may come so soon that the connect itself reports it.
    let during = match TcpStream::connect(link.local_addr()).await {
        Ok(mut during) => is_closed(&mut during).await,
        Err(_) => true,
    };
    assert!(during, "a new connection was carried during the outage");

    link.set_down(false);
    let mut after = TcpStream::connect(link.local_addr()).await.unwrap();
    let data = noise(20_000, 2);
    assert!(guarded("after", echo_through(&mut after, &data, true)).await == data);
    assert_eq!(link.stats().connections, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_outage_holds_bytes_until_it_ends() {
    let link = start(echo_server().await, LinkProfile::default()).await;
    let mut open = TcpStream::connect(link.local_addr()).await.unwrap();
    assert_eq!(
        guarded("before", echo_through(&mut open, b"hi", false)).await,
        b"hi"
    );
    let before = link.stats();

    link.set_down(true);
    let data = noise(10_000, 3);
    open.write_all(&data).await.unwrap();
    let mut late = TcpStream::connect(link.local_addr()).await.unwrap();
    late.write_all(b"late").await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), open.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "bytes came back during the outage: {early:?}"
    );
    let during = link.stats();
    assert!(
        during.bytes_up <= before.bytes_up + 2 && during.bytes_down <= before.bytes_down + 2,
        "the link delivered bytes during the outage: {before:?} then {during:?}"
    );

    link.set_down(false);
    let mut back = vec![0u8; data.len()];
    guarded("after", open.read_exact(&mut back)).await.unwrap();
    assert!(back == data, "bytes held in the outage came back changed");
    let mut back = [0u8; 4];
    guarded("new connection", late.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_outage_happens_on_its_own() {
    let profile = LinkProfile {
        outages: vec![Outage {
            start: Duration::from_millis(200),
            duration: Duration::from_millis(300),
        }],
        ..LinkProfile::default()
    };
    let began = Instant::now();
    let link = start(echo_server().await, profile).await;
    let mut stream = TcpStream::connect(link.local_addr()).await.unwrap();
    let mut down = link.subscribe_down();

    guarded("outage begins", down.wait_for(|down| *down))
        .await
        .unwrap();
    let down_at = began.elapsed();
    assert!(down_at >= Duration::from_millis(200), "down at {down_at:?}");
    let back = guarded(
        "echo across the outage",
        echo_through(&mut stream, b"x", false),
    )
    .await;
    let back_at = began.elapsed();
    assert_eq!(back, b"x");
    assert!(
        !link.is_down(),
        "the echo came back while the link was down"
    );
    assert!(back_at >= Duration::from_millis(500), "echo at {back_at:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_shaping_applies_to_later_bytes() {
    let link = start(echo_server().await, LinkProfile::default()).await;
    let mut stream = TcpStream::connect(link.local_addr()).await.unwrap();
    let data = noise(50_000, 4);
    assert!(guarded("fast", echo_through(&mut stream, &data, false)).await == data);

    let (rate, queue) = (1_000_000, 4 * 1024);
    link.set_shaping(capped(rate, queue), capped(rate, queue));
    let began = Instant::now();
    assert!(guarded("slow", echo_through(&mut stream, &data, false)).await == data);
    let took = began.elapsed();
    let floor = Duration::from_secs_f64((data.len() - queue) as f64 * 8.0 / rate as f64);
    assert!(took >= floor, "after set_shaping took {took:?} < {floor:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_the_bytes_each_way() {
    let link = start(counting_sink().await, LinkProfile::default()).await;
    assert_eq!(link.stats(), LinkStats::default());
    let count = guarded("send", send_to_sink(link.local_addr(), 12_345)).await;
    assert_eq!(count, 12_345);
    let stats = link.stats();
    assert_eq!(
        stats,
        LinkStats {
            bytes_up: 12_345,
            bytes_down: 8,
            connections: 1
        }
    );
    guarded("shutdown", link.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_open_connections() {
    let link = start(echo_server().await, LinkProfile::default()).await;
    let addr = link.local_addr();
    let mut open = TcpStream::connect(addr).await.unwrap();
    assert_eq!(
        guarded("before", echo_through(&mut open, b"hi", false)).await,
        b"hi"
    );
    guarded("shutdown", link.shutdown()).await;
    assert!(
        is_closed(&mut open).await,
        "a connection outlived the emulator"
    );
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}
