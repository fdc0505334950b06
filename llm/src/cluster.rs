//! The processes of a cluster: workers that hold a shard and compute on command
//! ([`worker`]), and the master's decoder that drives them ([`master`]).
//!
//! One TCP connection joins the master to each worker and carries everything, in order:
//!
//! ```text
//! master                                   worker
//!   Hello {protocol}                 ──▶
//!                                    ◀──   Welcome {protocol, capability}
//!   (plans the shards from every node's capability)
//!   Assign {rank, shard hash, size…} ──▶
//!                                    ◀──   Want {send}       (false: cached under that hash)
//!   Chunk, Chunk, …                  ──▶   (only if asked; checked against the hash)
//!                                    ◀──   Ready {weight bytes, stats}
//!   per token:
//!   Step {position, x}               ──▶
//!   Partial/Sum (two all-reduces per layer, the star of [`crate::collective`])
//!   per request:
//!   Reset                            ──▶
//!                                    ◀──   Ready {…}
//! ```
//!
//! Control messages are JSON ([`Control`]); steps, sums and chunks are binary frames
//! ([`crate::wire`]). Any failure on a connection — a timeout, a closed socket, a malformed
//! frame, a worker's error — ends it: frames carry no round number, so a connection that
//! lost one would pair the wrong partials; instead the master closes every connection and
//! re-forms the cluster at the next request, with the workers that answer.

pub mod master;
pub mod worker;

use serde::{Deserialize, Serialize};

use crate::collective::{CollectiveError, Link};
use crate::wire::{Encoding, Frame};

/// The version of this protocol; master and worker must agree.
pub const PROTOCOL: u32 = 1;

/// The largest piece of a shard file in one frame.
pub const CHUNK_BYTES: usize = 4 << 20;

/// A control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// The master's first message.
    Hello {
        /// [`PROTOCOL`].
        protocol: u32,
    },
    /// The worker's answer to `Hello`.
    Welcome {
        /// [`PROTOCOL`].
        protocol: u32,
        /// Its declared relative speed (the plan gives it work in proportion).
        capability: f64,
    },
    /// What the worker is to compute.
    Assign {
        /// Its rank (1 ..; the master is 0).
        rank: u32,
        /// Nodes in the cluster, the master included.
        nodes: u32,
        /// How partial sums travel in the all-reduce: "f64", "f32" or "q8_0".
        encoding: String,
        /// Most tokens of one sequence (the KV cache's size).
        capacity: u32,
        /// Layers to keep in memory at once (0: all).
        window: u32,
        /// SHA-256 of the shard file, lowercase hex.
        shard_sha256: String,
        /// Its size in bytes.
        shard_bytes: u64,
    },
    /// Whether the worker needs the shard file sent.
    Want {
        /// `false`: it has a file of that hash.
        send: bool,
    },
    /// The worker is ready for steps (after `Assign`, and after each `Reset`).
    Ready {
        /// Bytes of weights it holds in memory.
        weight_bytes: u64,
        /// What it did so far in this session.
        stats: WorkerStats,
    },
    /// Start a new sequence.
    Reset,
}

/// What a worker did in a session, for the benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Positions run.
    pub steps: u64,
    /// Seconds computing its part of the layers.
    pub compute_s: f64,
    /// Seconds inside all-reduces (sending its partial, waiting for the sum).
    pub all_reduce_s: f64,
    /// Of those, seconds blocked waiting for the sum: the other nodes' compute still
    /// running, the links' delay and transfer.
    #[serde(default)]
    pub waiting_s: f64,
    /// Bytes it sent in all-reduces.
    pub sent: u64,
    /// Bytes it received in all-reduces.
    pub received: u64,
}

impl Control {
    /// The message as a frame.
    pub fn frame(&self) -> Frame {
        // A plain enum of numbers and strings always serializes.
        Frame::Control(serde_json::to_string(self).unwrap_or_default())
    }
}

/// Sends `message` on `link`.
fn send(link: &mut Link, message: &Control) -> Result<(), CollectiveError> {
    link.send(&message.frame())
}

/// Receives a control message on `link`; a peer's error frame, another kind of frame or
/// malformed JSON is a protocol error naming the peer.
fn receive(link: &mut Link) -> Result<Control, CollectiveError> {
    match link.receive()? {
        Frame::Control(json) => serde_json::from_str(&json)
            .map_err(|e| link.protocol(format!("a malformed control message: {e}"))),
        Frame::Error(why) => Err(link.protocol(format!("failed: {why}"))),
        other => Err(link.protocol(format!(
            "a {} frame where a control message was expected",
            other.name()
        ))),
    }
}

/// The wire name of an encoding.
pub fn encoding_name(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::F64 => "f64",
        Encoding::F32 => "f32",
        Encoding::Q8_0 => "q8_0",
    }
}

/// The encoding of a wire name.
pub fn encoding_from_name(name: &str) -> Option<Encoding> {
    match name {
        "f64" => Some(Encoding::F64),
        "f32" => Some(Encoding::F32),
        "q8_0" => Some(Encoding::Q8_0),
        _ => None,
    }
}
