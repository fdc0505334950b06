//! One direction of one connection, modelled as a real link: a queue, a transmitter that puts
//! segments on the wire at the link's rate, and a wire that delivers them after the
//! propagation delay.
//!
//! Three stages run concurrently, joined by channels:
//!
//! - the **reader** reads segments of at most [`SEGMENT_BYTES`] from the source socket, but
//!   only while the [`Gate`] has room: when the link's buffer is full it stops reading, the
//!   kernel's buffers fill, and TCP holds the sender back, as a router's full queue would;
//! - the **transmitter** takes segments in order and finishes each at
//!   `tx_done = max(arrival, previous tx_done) + len·8/rate`, using the shaping in force
//!   when the segment reaches the head of the queue (so [`super::LinkEmulator::set_shaping`]
//!   applies to queued bytes too); "previous" is the link's, over all connections, so they
//!   share its rate; it transmits nothing while the link is down;
//! - the **writer** writes each segment at `tx_done + delay`, in order, and not while the
//!   link is down.
//!
//! The gate counts bytes from the moment they are read until they are written: the queue
//! (`queue_bytes`) plus what the wire holds in flight (rate × delay, capped). When the source
//! ends, the writer delivers what is buffered and then shuts down the destination's write
//! half (a half-close). Times are absolute instants, so a late wake-up never slows the link.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use super::control;
use super::profile::Shaping;

/// Largest segment read from the source at once (an Ethernet TCP payload).
pub(crate) const SEGMENT_BYTES: usize = 1460;

/// Most bytes the wire holds in flight beyond the queue, whatever rate × delay says (and for
/// an unlimited rate with a delay). Past it a slow destination holds the link back.
const MAX_IN_FLIGHT_BYTES: usize = 8 * 1024 * 1024;

/// Longest propagation delay carried out; a longer one is taken as this (a day).
const MAX_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// What one direction needs from its emulator.
pub(crate) struct DirectionLink<'a> {
    /// The direction's shaping, which may change at any time.
    pub(crate) shaping: watch::Receiver<Shaping>,
    /// The link's combined up/down state.
    pub(crate) down: watch::Receiver<bool>,
    /// When the direction's link is free, shared by all connections.
    pub(crate) free_at: &'a Mutex<Instant>,
    /// Bytes delivered in this direction, over all connections.
    pub(crate) delivered: &'a AtomicU64,
    /// `up` or `down`, for the logs.
    pub(crate) name: &'static str,
}

/// Bytes the link holds for one direction, with a wake-up when some leave.
struct Gate {
    held: AtomicUsize,
    room: Notify,
}

impl Gate {
    fn new() -> Self {
        Self {
            held: AtomicUsize::new(0),
            room: Notify::new(),
        }
    }

    /// Admits `len` bytes once they fit under the capacity of the shaping in force; an empty
    /// link always admits one segment.
    async fn admit(&self, len: usize, shaping: &mut watch::Receiver<Shaping>) {
        loop {
            let room = self.room.notified();
            let capacity = capacity(&shaping.borrow_and_update());
            let admitted = self
                .held
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                    (held == 0 || held.saturating_add(len) <= capacity).then_some(held + len)
                })
                .is_ok();
            if admitted {
                return;
            }
            tokio::select! {
                () = room => {}
                changed = shaping.changed() => {
                    if changed.is_err() {
                        // The emulator is gone; only the room can still change.
                        self.room.notified().await;
                    }
                }
            }
        }
    }

    fn release(&self, len: usize) {
        self.held.fetch_sub(len, Ordering::AcqRel);
        self.room.notify_one();
    }
}

/// Bytes a direction may hold: its queue plus what the wire carries in flight.
fn capacity(shaping: &Shaping) -> usize {
    let in_flight = if shaping.delay.is_zero() {
        0
    } else {
        match shaping.rate_bits_per_s {
            None => MAX_IN_FLIGHT_BYTES,
            Some(rate) => {
                let bytes = u128::from(rate) * shaping.delay.as_nanos() / 8 / 1_000_000_000;
                usize::try_from(bytes)
                    .unwrap_or(usize::MAX)
                    .saturating_add(SEGMENT_BYTES)
                    .min(MAX_IN_FLIGHT_BYTES)
            }
        }
    };
    shaping.queue_bytes.saturating_add(in_flight)
}

/// A segment read from the source, and when.
struct Queued {
    arrival: Instant,
    bytes: Vec<u8>,
}

/// A segment on the wire, and when it reaches the destination.
struct InFlight {
    deliver_at: Instant,
    bytes: Vec<u8>,
}

/// Carries `from` to `to` through the link until `from` ends (then half-closes `to`) or `to`
/// fails. Never panics; errors end the direction and are logged at debug.
pub(crate) async fn run<R, W>(from: R, to: W, link: DirectionLink<'_>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let gate = Gate::new();
    let (queue_tx, queue_rx) = mpsc::unbounded_channel();
    let (wire_tx, wire_rx) = mpsc::unbounded_channel();
    let read = read(from, queue_tx, &gate, link.shaping.clone(), link.name);
    let transmit = transmit(
        queue_rx,
        wire_tx,
        link.free_at,
        link.shaping.clone(),
        link.down.clone(),
    );
    let write = write(
        wire_rx,
        to,
        &gate,
        link.down.clone(),
        link.delivered,
        link.name,
    );
    // The writer decides when the direction is over: after the last segment when the source
    // ended, or at once when the destination failed (then reading stops too).
    let feed = async {
        tokio::join!(read, transmit);
        std::future::pending::<()>().await;
    };
    tokio::select! {
        () = write => {}
        () = feed => {}
    }
}

async fn read<R: AsyncRead + Unpin>(
    mut from: R,
    queue: mpsc::UnboundedSender<Queued>,
    gate: &Gate,
    mut shaping: watch::Receiver<Shaping>,
    name: &'static str,
) {
    loop {
        gate.admit(SEGMENT_BYTES, &mut shaping).await;
        let mut bytes = vec![0; SEGMENT_BYTES];
        let len = match from.read(&mut bytes).await {
            Ok(0) => 0,
            Ok(len) => len,
            Err(error) => {
                tracing::debug!(direction = name, %error, "link read failed; ending direction");
                0
            }
        };
        gate.release(SEGMENT_BYTES - len);
        if len == 0 {
            return;
        }
        bytes.truncate(len);
        let arrival = Instant::now();
        if queue.send(Queued { arrival, bytes }).is_err() {
            return;
        }
    }
}

async fn transmit(
    mut queue: mpsc::UnboundedReceiver<Queued>,
    wire: mpsc::UnboundedSender<InFlight>,
    free_at: &Mutex<Instant>,
    mut shaping: watch::Receiver<Shaping>,
    mut down: watch::Receiver<bool>,
) {
    while let Some(segment) = queue.recv().await {
        let mut not_before = segment.arrival;
        let (tx_time, delay) = loop {
            if *down.borrow() {
                control::wait_up(&mut down).await;
                not_before = not_before.max(Instant::now());
            }
            let current = *shaping.borrow_and_update();
            match current.transmission_time(segment.bytes.len()) {
                Some(tx_time) => break (tx_time, current.delay),
                // A zero rate carries nothing until the shaping changes.
                None => {
                    if shaping.changed().await.is_err() {
                        return;
                    }
                    not_before = not_before.max(Instant::now());
                }
            }
        };
        let tx_done = control::book(free_at, not_before, tx_time);
        sleep_until(tx_done).await;
        let deliver_at = tx_done + delay.min(MAX_DELAY);
        if wire
            .send(InFlight {
                deliver_at,
                bytes: segment.bytes,
            })
            .is_err()
        {
            return;
        }
    }
}

async fn write<W: AsyncWrite + Unpin>(
    mut wire: mpsc::UnboundedReceiver<InFlight>,
    mut to: W,
    gate: &Gate,
    mut down: watch::Receiver<bool>,
    delivered: &AtomicU64,
    name: &'static str,
) {
    while let Some(segment) = wire.recv().await {
        sleep_until(segment.deliver_at).await;
        control::wait_up(&mut down).await;
        if let Err(error) = to.write_all(&segment.bytes).await {
            tracing::debug!(direction = name, %error, "link write failed; ending direction");
            return;
        }
        let len = segment.bytes.len();
        gate.release(len);
        delivered.fetch_add(len as u64, Ordering::Relaxed);
    }
    if let Err(error) = to.shutdown().await {
        tracing::debug!(direction = name, %error, "link half-close failed");
    }
}

/// Sleeps until `at`, without a trip through the timer when `at` has passed.
async fn sleep_until(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity_of(rate: Option<u64>, delay: Duration, queue_bytes: usize) -> usize {
        capacity(&Shaping {
            rate_bits_per_s: rate,
            delay,
            queue_bytes,
        })
    }

    #[test]
    fn capacity_is_the_queue_plus_what_is_in_flight() {
        assert_eq!(capacity_of(None, Duration::ZERO, 1000), 1000);
        assert_eq!(
            capacity_of(Some(8_000_000), Duration::from_millis(10), 1000),
            1000 + 10_000 + SEGMENT_BYTES
        );
        assert_eq!(
            capacity_of(None, Duration::from_millis(1), 0),
            MAX_IN_FLIGHT_BYTES
        );
        assert_eq!(
            capacity_of(Some(u64::MAX), Duration::from_secs(1000), 7),
            7 + MAX_IN_FLIGHT_BYTES
        );
    }

    #[tokio::test]
    async fn gate_admits_one_segment_when_empty_and_waits_when_full() {
        let gate = Gate::new();
        let (_tx, mut shaping) = watch::channel(Shaping {
            queue_bytes: 0,
            ..Shaping::default()
        });
        gate.admit(SEGMENT_BYTES, &mut shaping).await;
        let blocked =
            tokio::time::timeout(Duration::from_millis(50), gate.admit(1, &mut shaping)).await;
        assert!(blocked.is_err(), "a full gate admitted more");
        gate.release(SEGMENT_BYTES);
        tokio::time::timeout(Duration::from_secs(5), gate.admit(1, &mut shaping))
            .await
            .unwrap();
    }
}
