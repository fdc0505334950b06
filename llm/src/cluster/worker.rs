//! A worker: accepts a master, takes (or finds in its cache) the shard it is given, and runs
//! its part of every layer on the master's command until the master goes away; then waits
//! for the next master.
//!
//! A worker needs no model file and trusts no frame: a shard is written only under a name
//! made of its hash, checked against that hash before it is used, and never larger than
//! [`WorkerOptions::max_shard_bytes`]. It serves one master at a time; a master that stays
//! silent longer than the idle timeout loses its session (it re-forms the cluster at its
//! next request).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{Control, PROTOCOL, WorkerStats, encoding_from_name, receive, send};
use crate::collective::{CollectiveError, Link, StarWorker};
use crate::gguf::Gguf;
use crate::model::{KvCache, Model, ModelError};
use crate::shard_file::{hex, is_sha256, sha256_of};
use crate::wire::Frame;

/// How a worker behaves.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Where shard files are kept, by hash.
    pub cache_dir: PathBuf,
    /// This node's relative speed, told to the master (which plans work in proportion).
    pub capability: f64,
    /// Bound on each read and write during a step, the handshake and the transfer.
    pub timeout: Duration,
    /// How long to wait for the master's next command before ending the session (`None`:
    /// for ever).
    pub idle_timeout: Option<Duration>,
    /// The largest shard file accepted.
    pub max_shard_bytes: u64,
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionEnd {
    /// The master closed the connection, or stayed silent past the idle timeout.
    #[error("the master left ({0})")]
    Left(String),
    /// The connection failed or the master broke the protocol.
    #[error(transparent)]
    Link(#[from] CollectiveError),
    /// The shard could not be stored or run.
    #[error("{0}")]
    Shard(String),
}

/// A model kept loaded between sessions, with the hash of its shard file.
struct Loaded {
    sha256: String,
    window: u32,
    model: Model,
}

/// Accepts masters on `listener` one after another, for ever; `log` receives a line per
/// event (joined, left, why).
///
/// # Errors
///
/// Only if `listener` itself fails (a session's failure ends that session).
pub fn serve(
    listener: &TcpListener,
    options: &WorkerOptions,
    log: &mut dyn FnMut(&str),
) -> std::io::Result<()> {
    std::fs::create_dir_all(&options.cache_dir)?;
    let mut loaded = None;
    loop {
        let (stream, peer) = listener.accept()?;
        log(&format!("master {peer} connected"));
        match session(stream, options, &mut loaded, log) {
            Ok(()) => log(&format!("master {peer} closed the session")),
            Err(end) => log(&format!("session with {peer} ended: {end}")),
        }
    }
}

/// One master, from its hello to its departure.
fn session(
    stream: TcpStream,
    options: &WorkerOptions,
    loaded: &mut Option<Loaded>,
    log: &mut dyn FnMut(&str),
) -> Result<(), SessionEnd> {
    let mut link = Link::new(0, stream, options.timeout)
        .map_err(|e| SessionEnd::Left(format!("socket options: {e}")))?;
    match receive(&mut link)? {
        Control::Hello { protocol } if protocol == PROTOCOL => {}
        Control::Hello { protocol } => {
            let why = format!("this worker speaks protocol {PROTOCOL}, the master {protocol}");
            let _ = link.send(&Frame::Error(why.clone()));
            return Err(SessionEnd::Shard(why));
        }
        other => return Err(link.protocol(format!("{other:?} before Hello")).into()),
    }
    send(
        &mut link,
        &Control::Welcome {
            protocol: PROTOCOL,
            capability: options.capability,
        },
    )?;
    let Control::Assign {
        rank,
        nodes,
        encoding,
        capacity,
        window,
        shard_sha256,
        shard_bytes,
    } = receive(&mut link)?
    else {
        return Err(link.protocol("expected Assign".into()).into());
    };
    let refuse = |link: &mut Link, why: String| {
        let _ = link.send(&Frame::Error(why.clone()));
        SessionEnd::Shard(why)
    };
    let Some(encoding) = encoding_from_name(&encoding) else {
        return Err(refuse(&mut link, format!("unknown encoding {encoding:?}")));
    };
    if !is_sha256(&shard_sha256) {
        return Err(refuse(
            &mut link,
            "a shard hash that is not SHA-256 hex".into(),
        ));
    }
    if shard_bytes > options.max_shard_bytes {
        return Err(refuse(
            &mut link,
            format!(
                "a shard of {shard_bytes} bytes is over this worker's limit of {}",
                options.max_shard_bytes
            ),
        ));
    }
    let path = options.cache_dir.join(format!("{shard_sha256}.gguf"));
    let in_memory = loaded
        .as_ref()
        .is_some_and(|l| l.sha256 == shard_sha256 && l.window == window);
    let cached = in_memory || sha256_of(&path).is_ok_and(|sha| sha == shard_sha256);
    send(&mut link, &Control::Want { send: !cached })?;
    if !cached {
        receive_shard(&mut link, &path, &shard_sha256, shard_bytes)?;
    }
    if !in_memory {
        *loaded = None; // the old model's memory goes before the new one's comes
        let model = load(&path, window).map_err(|e| refuse(&mut link, e.to_string()))?;
        *loaded = Some(Loaded {
            sha256: shard_sha256.clone(),
            window,
            model,
        });
    }
    let Some(Loaded { model, .. }) = loaded.as_ref() else {
        return Err(SessionEnd::Shard("no model".into()));
    };
    log(&format!(
        "rank {rank} of {nodes}: heads {:?}, FFN {:?}, shard {}… ({}), {:.1} MB of weights",
        model.shard().heads,
        model.shard().ffn,
        &shard_sha256[..12],
        if cached { "cached" } else { "received" },
        model.weight_bytes() as f64 / 1e6
    ));
    let mut cache = model.new_cache(capacity as usize);
    let mut star = StarWorker::new(link.with_rank(0), encoding);
    let mut stats = WorkerStats::default();
    let ready = |star: &mut StarWorker, stats: &WorkerStats| {
        send(
            star.link(),
            &Control::Ready {
                weight_bytes: model.weight_bytes() as u64,
                stats: *stats,
            },
        )
    };
    ready(&mut star, &stats)?;
    loop {
        star.link()
            .set_read_timeout(options.idle_timeout)
            .map_err(|e| SessionEnd::Left(e.to_string()))?;
        let frame = match star.link().receive() {
            Ok(frame) => frame,
            Err(e) => return Err(SessionEnd::Left(e.to_string())),
        };
        star.link()
            .set_read_timeout(Some(options.timeout))
            .map_err(|e| SessionEnd::Left(e.to_string()))?;
        match frame {
            Frame::Step { position, x } => {
                if let Err(why) = step(model, &mut cache, &mut star, &mut stats, position, x) {
                    star.report(&why.to_string());
                    return Err(why);
                }
            }
            Frame::Control(json) => match serde_json::from_str(&json) {
                Ok(Control::Reset) => {
                    cache.clear();
                    ready(&mut star, &stats)?;
                }
                _ => {
                    let why = format!("unexpected control message {json:?}");
                    star.report(&why);
                    return Err(SessionEnd::Shard(why));
                }
            },
            Frame::Error(why) => return Err(SessionEnd::Left(format!("it gave up: {why}"))),
            other => {
                let why = format!("unexpected {} frame between steps", other.name());
                star.report(&why);
                return Err(SessionEnd::Shard(why));
            }
        }
    }
}

/// Runs one position: this node's part of every layer, all-reducing with the master.
fn step(
    model: &Model,
    cache: &mut KvCache,
    star: &mut StarWorker,
    stats: &mut WorkerStats,
    position: u32,
    x: crate::wire::Vector,
) -> Result<(), SessionEnd> {
    if position as usize != cache.len() {
        return Err(SessionEnd::Shard(format!(
            "the master asked for position {position}; this worker is at {}",
            cache.len()
        )));
    }
    let mut values = match x {
        crate::wire::Vector::F32(values) if values.len() == model.config().hidden => values,
        other => {
            return Err(SessionEnd::Shard(format!(
                "a step's vector must be {} f32 values, not {other:?}",
                model.config().hidden
            )));
        }
    };
    let started = Instant::now();
    let mut reducing = Duration::ZERO;
    let mut failed = None;
    // On one of rayon's threads, as `LocalDecoder::step` does: the products split from
    // inside the pool. The all-reduces block that thread.
    let result = rayon::scope(|_| {
        model.layers_forward(&mut values, cache, &mut |part| {
            let t = Instant::now();
            let done = star.all_reduce(part);
            reducing += t.elapsed();
            done.map_err(|e| {
                let message = e.to_string();
                failed = Some(e);
                ModelError::Collective(message)
            })
        })
    });
    stats.steps += 1;
    stats.all_reduce_s += reducing.as_secs_f64();
    stats.compute_s += (started.elapsed() - reducing).as_secs_f64();
    let traffic = star.traffic();
    (stats.sent, stats.received) = (traffic.sent, traffic.received);
    stats.waiting_s = traffic.waiting_s;
    match (result, failed) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(link)) => Err(link.into()),
        (Err(e), None) => Err(SessionEnd::Shard(e.to_string())),
    }
}

/// Receives `bytes` bytes of shard file into `path`, checked against `sha256` before it is
/// renamed into place.
fn receive_shard(link: &mut Link, path: &Path, sha256: &str, bytes: u64) -> Result<(), SessionEnd> {
    let partial = path.with_extension("partial");
    let io = |e: std::io::Error| SessionEnd::Shard(format!("{}: {e}", partial.display()));
    let mut file = std::fs::File::create(&partial).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    while got < bytes {
        match link.receive()? {
            Frame::Chunk(chunk) => {
                got += chunk.len() as u64;
                if got > bytes || chunk.is_empty() {
                    let _ = std::fs::remove_file(&partial);
                    return Err(link
                        .protocol(format!("shard chunks past the announced {bytes} bytes"))
                        .into());
                }
                hasher.update(&chunk);
                file.write_all(&chunk).map_err(io)?;
            }
            other => {
                let _ = std::fs::remove_file(&partial);
                return Err(link
                    .protocol(format!(
                        "a {} frame inside the shard transfer",
                        other.name()
                    ))
                    .into());
            }
        }
    }
    file.sync_all().map_err(io)?;
    drop(file);
    let actual = hex(&hasher.finalize());
    if actual != sha256 {
        let _ = std::fs::remove_file(&partial);
        let why = format!("the shard received hashes to {actual}, not {sha256}");
        let _ = link.send(&Frame::Error(why.clone()));
        return Err(SessionEnd::Shard(why));
    }
    std::fs::rename(&partial, path).map_err(io)
}

fn load(path: &Path, window: u32) -> Result<Model, ModelError> {
    let gguf = Gguf::open(path)?;
    if window > 0 {
        Model::load_windowed(Arc::new(gguf), window as usize, None)
    } else {
        Model::load(&gguf)
    }
}
