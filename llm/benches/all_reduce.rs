//! Star against all-to-all: one all-reduce of a SmolLM2-sized vector (576 values), among 2 to
//! 4 nodes, over loopback and through emulated links, for each payload encoding.
//!
//! Every node is a thread with its own sockets; with a link, every connection (each worker's
//! to the master in the star, each pair's in the all-to-all) runs through its own
//! `cleave-link` emulator, so the links are point-to-point: a shared medium (one Wi-Fi
//! channel) would slow the all-to-all's N(N−1) vectors more than the star's 2(N−1). Prints,
//! per configuration, the median and 90th percentile of the master's (rank 0's) time per
//! all-reduce and the bytes it and every node sent, with the machine.
//!
//! `cargo bench -p cleave-llm --bench all_reduce` (`-- --quick` for fewer rounds).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use cleave_link::{LinkEmulator, LinkProfile, Shaping};
use cleave_llm::cluster::encoding_name;
use cleave_llm::collective::{Link, MeshNode, StarMaster, StarWorker, Traffic};
use cleave_llm::wire::Encoding;

/// SmolLM2-135M's hidden width: what each of its 60 all-reduces per token carries.
const VALUES: usize = 576;

/// A link's shaping, both directions alike; `None` is plain loopback.
struct Net {
    name: &'static str,
    shaping: Option<Shaping>,
}

fn nets() -> Vec<Net> {
    let shaped = |delay_ms: u64, mbit: u64| {
        Some(Shaping {
            rate_bits_per_s: Some(mbit * 1_000_000),
            delay: Duration::from_millis(delay_ms),
            ..Shaping::default()
        })
    };
    vec![
        Net {
            name: "loopback",
            shaping: None,
        },
        Net {
            name: "1 ms, 100 Mbit/s",
            shaping: shaped(1, 100),
        },
        Net {
            name: "5 ms, 20 Mbit/s",
            shaping: shaped(5, 20),
        },
    ]
}

/// One all-reduce side: a node of either algorithm.
enum Node {
    Master(StarMaster),
    Worker(StarWorker),
    Mesh(MeshNode),
}

impl Node {
    fn all_reduce(&mut self, part: &mut [f64]) {
        match self {
            Node::Master(n) => n.all_reduce(part),
            Node::Worker(n) => n.all_reduce(part),
            Node::Mesh(n) => n.all_reduce(part),
        }
        .expect("all-reduce");
    }

    fn traffic(&self) -> Traffic {
        match self {
            Node::Master(n) => n.traffic(),
            Node::Worker(n) => n.traffic(),
            Node::Mesh(n) => n.traffic(),
        }
    }
}

/// Connections between ranks `a` and `b` (a's end, b's end), through an emulator when the
/// net shapes; the emulators are kept alive in `keep`.
struct Wiring<'a> {
    runtime: &'a tokio::runtime::Runtime,
    shaping: Option<Shaping>,
    keep: Vec<LinkEmulator>,
}

impl Wiring<'_> {
    fn pair(&mut self, a: usize, b: usize) -> (Link, Link) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut target: SocketAddr = listener.local_addr().unwrap();
        if let Some(shaping) = self.shaping {
            let profile = LinkProfile {
                up: shaping,
                down: shaping,
                ..LinkProfile::default()
            };
            let emulator = self
                .runtime
                .block_on(LinkEmulator::start(
                    "127.0.0.1:0".parse().unwrap(),
                    target,
                    profile,
                ))
                .unwrap();
            target = emulator.local_addr();
            self.keep.push(emulator);
        }
        let timeout = Duration::from_secs(30);
        let dialed = TcpStream::connect(target).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        (
            Link::new(b, dialed, timeout).unwrap(),
            Link::new(a, accepted, timeout).unwrap(),
        )
    }

    fn star(&mut self, nodes: usize, encoding: Encoding) -> Vec<Node> {
        let mut master_ends = Vec::new();
        let mut workers = Vec::new();
        for rank in 1..nodes {
            let (to_worker, to_master) = self.pair(0, rank);
            master_ends.push(to_worker);
            workers.push(Node::Worker(StarWorker::new(to_master, encoding)));
        }
        let mut all = vec![Node::Master(StarMaster::new(master_ends, encoding))];
        all.extend(workers);
        all
    }

    fn mesh(&mut self, nodes: usize, encoding: Encoding) -> Vec<Node> {
        let mut links: Vec<Vec<Link>> = (0..nodes).map(|_| Vec::new()).collect();
        for a in 0..nodes {
            for b in a + 1..nodes {
                let (a_end, b_end) = self.pair(a, b);
                links[a].push(a_end);
                links[b].push(b_end);
            }
        }
        links
            .into_iter()
            .enumerate()
            .map(|(rank, peers)| Node::Mesh(MeshNode::new(rank, peers, encoding)))
            .collect()
    }
}

/// Runs `rounds` all-reduces on every node; returns rank 0's times and every node's bytes.
fn measure(nodes: Vec<Node>, rounds: usize) -> (Vec<Duration>, Vec<Traffic>) {
    let warm_up = 5;
    let results: Vec<(Vec<Duration>, Traffic)> = std::thread::scope(|scope| {
        let handles: Vec<_> = nodes
            .into_iter()
            .enumerate()
            .map(|(rank, mut node)| {
                scope.spawn(move || {
                    let mut part: Vec<f64> = (0..VALUES)
                        .map(|i| ((i * 7 + rank * 13) % 101) as f64 / 50.0 - 1.0)
                        .collect();
                    let mut times = Vec::with_capacity(rounds);
                    let mut before = Traffic::default();
                    for round in 0..warm_up + rounds {
                        if round == warm_up {
                            before = node.traffic();
                        }
                        let started = Instant::now();
                        node.all_reduce(&mut part);
                        if round >= warm_up {
                            times.push(started.elapsed());
                        }
                        // Keep the values bounded and moving.
                        part.iter_mut().for_each(|v| *v = (*v * 0.25).sin());
                    }
                    let after = node.traffic();
                    let sent = Traffic {
                        sent: after.sent - before.sent,
                        received: after.received - before.received,
                        reductions: after.reductions - before.reductions,
                        waiting_s: after.waiting_s - before.waiting_s,
                    };
                    (times, sent)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut results = results.into_iter();
    let (times, first) = results.next().unwrap();
    let mut traffic = vec![first];
    traffic.extend(results.map(|(_, t)| t));
    (times, traffic)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "machine: {}, {} cores; one all-reduce of {VALUES} values, rank 0's time",
        cpu(),
        std::thread::available_parallelism().map_or(1, usize::from)
    );
    println!(
        "| link | nodes | algorithm | payload | median ms | p90 ms | bytes sent by rank 0 | \
         bytes sent by all |"
    );
    println!("|---|---:|---|---|---:|---:|---:|---:|");
    for net in nets() {
        let rounds = match (quick, net.shaping.is_some()) {
            (true, _) => 20,
            (false, false) => 2000,
            (false, true) => 100,
        };
        for nodes in 2..=4 {
            for encoding in [Encoding::F64, Encoding::F32, Encoding::Q8_0] {
                for algorithm in ["star", "all-to-all"] {
                    let mut wiring = Wiring {
                        runtime: &runtime,
                        shaping: net.shaping,
                        keep: Vec::new(),
                    };
                    let graph = if algorithm == "star" {
                        wiring.star(nodes, encoding)
                    } else {
                        wiring.mesh(nodes, encoding)
                    };
                    let (mut times, traffic) = measure(graph, rounds);
                    times.sort();
                    let per = |t: &Traffic| t.sent / t.reductions.max(1);
                    let all: u64 = traffic.iter().map(per).sum();
                    println!(
                        "| {} | {nodes} | {algorithm} | {} | {:.3} | {:.3} | {} | {all} |",
                        net.name,
                        encoding_name(encoding),
                        percentile(&times, 0.5),
                        percentile(&times, 0.9),
                        per(&traffic[0]),
                    );
                }
            }
        }
    }
}
