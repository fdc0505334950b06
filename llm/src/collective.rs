//! The all-reduce between nodes over TCP: star (as in TPI-LLM) and all-to-all (as in
//! distributed-llama).
//!
//! - **Star** ([`StarMaster`], [`StarWorker`]): every worker sends its partial vector to the
//!   master; the master adds them to its own and sends the sum back to every worker. Two
//!   link latencies per all-reduce whatever the number of nodes (TPI-LLM §3: a star costs 2τ
//!   where a ring costs 2(N−1)τ), and the master's link carries 2(N−1) vectors.
//! - **All-to-all** ([`MeshNode`]): every node sends its partial to every other node and sums
//!   what it receives. One link latency, N−1 vectors out of each node; N(N−1)/2
//!   connections.
//!
//! Every node must end with the same sum, bit for bit, or the replicated residual streams
//! drift apart. The star's master keeps the sum as the workers receive it (with Q8_0:
//! quantized, then decoded); the mesh sums every node's partial, its own as the others
//! receive it, in rank order on every node.
//!
//! Every read and write has a timeout; a peer that is gone or silent is an error naming it,
//! which the caller turns into an answer (and, later, a re-formed cluster).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::wire::{DEFAULT_MAX_FRAME, Encoding, Frame, Vector, WireError, read_frame, write_frame};

/// Why an all-reduce failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CollectiveError {
    /// A peer's connection failed, timed out, or sent a bad frame.
    #[error("node {rank} ({peer}): {source}")]
    Peer {
        /// The peer's rank.
        rank: usize,
        /// Its address.
        peer: String,
        /// What happened.
        source: WireError,
    },
    /// A peer sent a frame of the wrong kind or size, or reported its own failure.
    #[error("node {rank} ({peer}): {reason}")]
    Protocol {
        /// The peer's rank.
        rank: usize,
        /// Its address.
        peer: String,
        /// What was wrong.
        reason: String,
    },
}

/// A connection to one peer, with its rank and timeouts set.
#[derive(Debug)]
pub struct Link {
    rank: usize,
    peer: String,
    stream: TcpStream,
}

impl Link {
    /// Wraps `stream` to the node of `rank`: Nagle off, reads and writes bounded by
    /// `timeout`.
    ///
    /// # Errors
    ///
    /// Setting the socket options failed.
    pub fn new(rank: usize, stream: TcpStream, timeout: Duration) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        Ok(Self { rank, peer, stream })
    }

    /// The peer's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends `frame`.
    ///
    /// # Errors
    ///
    /// [`CollectiveError::Peer`] naming the peer.
    pub fn send(&mut self, frame: &Frame) -> Result<(), CollectiveError> {
        write_frame(&mut self.stream, frame).map_err(|e| self.failed(e.into()))
    }

    /// Receives a frame.
    ///
    /// # Errors
    ///
    /// [`CollectiveError::Peer`] naming the peer.
    pub fn receive(&mut self) -> Result<Frame, CollectiveError> {
        read_frame(&mut self.stream, DEFAULT_MAX_FRAME).map_err(|e| self.failed(e))
    }

    /// The same connection, known as the node of `rank` (ranks are given once a cluster
    /// knows which nodes answered).
    pub fn with_rank(mut self, rank: usize) -> Self {
        self.rank = rank;
        self
    }

    /// Closes the connection both ways, so that the peer's reads end now (best effort).
    pub fn close(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Bounds each read by `timeout` from now on (`None`: wait for ever).
    ///
    /// # Errors
    ///
    /// Setting the socket option failed.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    /// An error naming this peer for a protocol violation.
    pub fn protocol(&self, reason: String) -> CollectiveError {
        CollectiveError::Protocol {
            rank: self.rank,
            peer: self.peer.clone(),
            reason,
        }
    }

    fn failed(&self, source: WireError) -> CollectiveError {
        CollectiveError::Peer {
            rank: self.rank,
            peer: self.peer.clone(),
            source,
        }
    }

    /// The vector of a frame of the expected kind, decoded into `out`.
    fn expect(&self, frame: Frame, sum: bool, out: &mut [f64]) -> Result<(), CollectiveError> {
        let vector = match (frame, sum) {
            (Frame::Sum(v), true) | (Frame::Partial(v), false) => v,
            (Frame::Error(why), _) => return Err(self.protocol(format!("failed: {why}"))),
            (other, _) => {
                return Err(self.protocol(format!("unexpected frame {}", other.name())));
            }
        };
        vector
            .decode_into(out)
            .map_err(|e| self.protocol(e.to_string()))
    }
}

/// Bytes moved by all-reduces so far, and the time spent blocked on peers, for the
/// benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Traffic {
    /// All-reduces done.
    pub reductions: u64,
    /// Bytes this node sent.
    pub sent: u64,
    /// Bytes this node received.
    pub received: u64,
    /// Seconds spent blocked reading peers' vectors: the peers' compute still running plus
    /// the link's delay and transfer time. The rest of an all-reduce is this node's own
    /// encoding, summing and sending.
    pub waiting_s: f64,
}

/// The master's side of the star: one link per worker.
#[derive(Debug)]
pub struct StarMaster {
    workers: Vec<Link>,
    encoding: Encoding,
    scratch: Vec<f64>,
    traffic: Traffic,
}

impl StarMaster {
    /// The master over `workers` (ranks 1..).
    pub fn new(workers: Vec<Link>, encoding: Encoding) -> Self {
        Self {
            workers,
            encoding,
            scratch: Vec::new(),
            traffic: Traffic::default(),
        }
    }

    /// Replaces `part` by the sum of it and every worker's partial.
    ///
    /// # Errors
    ///
    /// [`CollectiveError`] naming the first worker that failed.
    pub fn all_reduce(&mut self, part: &mut [f64]) -> Result<(), CollectiveError> {
        self.scratch.resize(part.len(), 0.0);
        for link in &mut self.workers {
            let waiting = Instant::now();
            let frame = link.receive()?;
            self.traffic.waiting_s += waiting.elapsed().as_secs_f64();
            self.traffic.received += frame.wire_bytes() as u64;
            link.expect(frame, false, &mut self.scratch)?;
            part.iter_mut()
                .zip(&self.scratch)
                .for_each(|(p, s)| *p += s);
        }
        let sum = Vector::encode(part, self.encoding);
        // What the workers will hold, this node holds too.
        sum.decode_into(part)
            .map_err(|e| self.workers[0].protocol(e.to_string()))?;
        let frame = Frame::Sum(sum);
        for link in &mut self.workers {
            link.send(&frame)?;
            self.traffic.sent += frame.wire_bytes() as u64;
        }
        self.traffic.reductions += 1;
        Ok(())
    }

    /// Bytes moved so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// The links to the workers, rank order.
    pub fn links(&mut self) -> &mut [Link] {
        &mut self.workers
    }
}

/// A worker's side of the star: its link to the master.
#[derive(Debug)]
pub struct StarWorker {
    master: Link,
    encoding: Encoding,
    traffic: Traffic,
}

impl StarWorker {
    /// The worker whose master is at the end of `master`.
    pub fn new(master: Link, encoding: Encoding) -> Self {
        Self {
            master,
            encoding,
            traffic: Traffic::default(),
        }
    }

    /// Sends `part` to the master and replaces it by the sum the master sends back.
    ///
    /// # Errors
    ///
    /// [`CollectiveError`].
    pub fn all_reduce(&mut self, part: &mut [f64]) -> Result<(), CollectiveError> {
        let frame = Frame::Partial(Vector::encode(part, self.encoding));
        self.master.send(&frame)?;
        self.traffic.sent += frame.wire_bytes() as u64;
        let waiting = Instant::now();
        let answer = self.master.receive()?;
        self.traffic.waiting_s += waiting.elapsed().as_secs_f64();
        self.traffic.received += answer.wire_bytes() as u64;
        self.master.expect(answer, true, part)?;
        self.traffic.reductions += 1;
        Ok(())
    }

    /// The link to the master.
    pub fn link(&mut self) -> &mut Link {
        &mut self.master
    }

    /// Tells the master this worker failed (best effort).
    pub fn report(&mut self, why: &str) {
        let _ = self.master.send(&Frame::Error(why.to_string()));
    }

    /// Bytes moved so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }
}

/// Most bytes of one vector frame the all-to-all sends to every peer before it reads any:
/// what the peers' socket buffers take without the sender blocking (Linux accepts at least
/// 64 KiB into a fresh connection's receive buffer). Larger vectors would need a sending
/// thread; the models here send 2–32 KiB.
pub const MESH_MAX_FRAME: usize = 64 << 10;

/// One node of the all-to-all: a link to every other node.
#[derive(Debug)]
pub struct MeshNode {
    rank: usize,
    /// One per other node, in rank order.
    peers: Vec<Link>,
    encoding: Encoding,
    received: Vec<Vec<f64>>,
    traffic: Traffic,
}

impl MeshNode {
    /// Node `rank` of `peers.len() + 1`, with `peers` the links to the others (any order).
    pub fn new(rank: usize, mut peers: Vec<Link>, encoding: Encoding) -> Self {
        peers.sort_by_key(|l| l.rank);
        Self {
            rank,
            peers,
            encoding,
            received: Vec::new(),
            traffic: Traffic::default(),
        }
    }

    /// Replaces `part` by the sum of every node's partial.
    ///
    /// # Errors
    ///
    /// [`CollectiveError`] naming the first peer that failed, or a vector too large to
    /// send before reading ([`MESH_MAX_FRAME`]).
    pub fn all_reduce(&mut self, part: &mut [f64]) -> Result<(), CollectiveError> {
        let mine = Vector::encode(part, self.encoding);
        if mine.wire_bytes() > MESH_MAX_FRAME {
            let first = self.peers.first().map_or(self.rank, |p| p.rank);
            return Err(CollectiveError::Protocol {
                rank: first,
                peer: "-".into(),
                reason: format!(
                    "a vector of {} bytes is over the all-to-all's {MESH_MAX_FRAME}; use the star",
                    mine.wire_bytes()
                ),
            });
        }
        // Own partial as the others will decode it.
        let mut own = vec![0.0; part.len()];
        mine.decode_into(&mut own)
            .map_err(|e| CollectiveError::Protocol {
                rank: self.rank,
                peer: "self".into(),
                reason: e.to_string(),
            })?;
        let frame = Frame::Partial(mine);
        for link in &mut self.peers {
            link.send(&frame)?;
            self.traffic.sent += frame.wire_bytes() as u64;
        }
        self.received.resize_with(self.peers.len(), Vec::new);
        for (link, into) in self.peers.iter_mut().zip(&mut self.received) {
            let waiting = Instant::now();
            let frame = link.receive()?;
            self.traffic.waiting_s += waiting.elapsed().as_secs_f64();
            self.traffic.received += frame.wire_bytes() as u64;
            into.resize(part.len(), 0.0);
            link.expect(frame, false, into)?;
        }
        // Everything in rank order, on every node the same.
        part.fill(0.0);
        let mut others = self.received.iter();
        let mut own_added = false;
        for link in &self.peers {
            if !own_added && link.rank > self.rank {
                add_into(part, &own);
                own_added = true;
            }
            if let Some(values) = others.next() {
                add_into(part, values);
            }
        }
        if !own_added {
            add_into(part, &own);
        }
        self.traffic.reductions += 1;
        Ok(())
    }

    /// Bytes moved so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }
}

fn add_into(sum: &mut [f64], values: &[f64]) {
    sum.iter_mut().zip(values).for_each(|(s, v)| *s += v);
}

/// A master and `workers` workers connected on loopback (for tests of the cluster).
///
/// # Panics
///
/// If loopback sockets cannot be made.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn loopback_star(workers: usize, encoding: Encoding) -> (StarMaster, Vec<StarWorker>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let timeout = Duration::from_secs(10);
    let mut worker_ends = Vec::new();
    let mut master_ends = Vec::new();
    for rank in 1..=workers {
        let stream = TcpStream::connect(addr).unwrap();
        worker_ends.push(StarWorker::new(
            Link::new(0, stream, timeout).unwrap(),
            encoding,
        ));
        let (accepted, _) = listener.accept().unwrap();
        master_ends.push(Link::new(rank, accepted, timeout).unwrap());
    }
    (StarMaster::new(master_ends, encoding), worker_ends)
}

/// `nodes` mesh nodes connected pairwise on loopback (for tests of the cluster).
///
/// # Panics
///
/// If loopback sockets cannot be made.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn loopback_mesh(nodes: usize, encoding: Encoding) -> Vec<MeshNode> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let timeout = Duration::from_secs(10);
    let mut links: Vec<Vec<Link>> = (0..nodes).map(|_| Vec::new()).collect();
    for i in 0..nodes {
        for j in i + 1..nodes {
            let stream = TcpStream::connect(addr).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            links[i].push(Link::new(j, stream, timeout).unwrap());
            links[j].push(Link::new(i, accepted, timeout).unwrap());
        }
    }
    links
        .into_iter()
        .enumerate()
        .map(|(rank, peers)| MeshNode::new(rank, peers, encoding))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::TcpListener;

    use super::*;

    #[test]
    fn every_node_ends_with_the_same_sum() {
        for encoding in [Encoding::F64, Encoding::F32, Encoding::Q8_0] {
            let (mut master, workers) = loopback_star(3, encoding);
            let parts: Vec<Vec<f64>> = (0..4)
                .map(|r| (0..64).map(|i| f64::from(i * (r + 1)) / 50.0).collect())
                .collect();
            let exact: Vec<f64> = (0..64).map(|i| parts.iter().map(|p| p[i]).sum()).collect();
            let results: Vec<Vec<f64>> = std::thread::scope(|scope| {
                let handles: Vec<_> = workers
                    .into_iter()
                    .zip(&parts[1..])
                    .map(|(mut w, part)| {
                        let mut part = part.clone();
                        scope.spawn(move || {
                            w.all_reduce(&mut part).unwrap();
                            assert_eq!(w.traffic().reductions, 1);
                            part
                        })
                    })
                    .collect();
                let mut mine = parts[0].clone();
                master.all_reduce(&mut mine).unwrap();
                let mut all = vec![mine];
                all.extend(handles.into_iter().map(|h| h.join().unwrap()));
                all
            });
            for r in &results {
                assert_eq!(r, &results[0], "{encoding:?}: nodes disagree");
            }
            let tolerance = match encoding {
                Encoding::F64 => 1e-12,
                Encoding::F32 => 1e-5,
                Encoding::Q8_0 => 0.1,
            };
            for (a, b) in results[0].iter().zip(&exact) {
                assert!((a - b).abs() <= tolerance, "{encoding:?}: {a} vs {b}");
            }
            let traffic = master.traffic();
            let per = match encoding {
                Encoding::F64 => 4 + 1 + 5 + 512,
                Encoding::F32 => 4 + 1 + 5 + 256,
                Encoding::Q8_0 => 4 + 1 + 5 + 68,
            };
            assert_eq!((traffic.sent, traffic.received), (3 * per, 3 * per));
        }
    }

    #[test]
    fn every_mesh_node_ends_with_the_same_sum() {
        for encoding in [Encoding::F64, Encoding::F32, Encoding::Q8_0] {
            let nodes = loopback_mesh(4, encoding);
            let parts: Vec<Vec<f64>> = (0..4)
                .map(|r| {
                    (0..64)
                        .map(|i| f64::from((i * (r + 3)) % 17) / 9.0 - 0.8)
                        .collect()
                })
                .collect();
            let exact: Vec<f64> = (0..64).map(|i| parts.iter().map(|p| p[i]).sum()).collect();
            let results: Vec<(Vec<f64>, Traffic)> = std::thread::scope(|scope| {
                let handles: Vec<_> = nodes
                    .into_iter()
                    .zip(&parts)
                    .map(|(mut node, part)| {
                        let mut part = part.clone();
                        scope.spawn(move || {
                            node.all_reduce(&mut part).unwrap();
                            (part, node.traffic())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (r, _) in &results {
                assert_eq!(r, &results[0].0, "{encoding:?}: nodes disagree");
            }
            let tolerance = match encoding {
                Encoding::F64 => 1e-12,
                Encoding::F32 => 1e-5,
                Encoding::Q8_0 => 0.05,
            };
            for (a, b) in results[0].0.iter().zip(&exact) {
                assert!((a - b).abs() <= tolerance, "{encoding:?}: {a} vs {b}");
            }
            let per = match encoding {
                Encoding::F64 => 4 + 1 + 5 + 512,
                Encoding::F32 => 4 + 1 + 5 + 256,
                Encoding::Q8_0 => 4 + 1 + 5 + 68,
            };
            assert_eq!(results[0].1.sent, 3 * per);
        }
    }

    #[test]
    fn a_silent_or_vanished_worker_is_an_error_naming_it() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let mut master = StarMaster::new(
            vec![Link::new(2, accepted, Duration::from_millis(200)).unwrap()],
            Encoding::F32,
        );
        // Connected but silent: the read times out.
        let err = master.all_reduce(&mut [0.0; 4]).unwrap_err().to_string();
        assert!(err.starts_with("node 2"), "{err}");
        // Gone.
        drop(stream);
        let err = master.all_reduce(&mut [0.0; 4]).unwrap_err().to_string();
        assert!(err.starts_with("node 2"), "{err}");
    }
}
