//! The master: node 0 of the cluster, and a [`Decoder`] like the single node.
//!
//! It holds the embedding, the final norm and the output head (so the prompt and the answer
//! never leave it) and its own shard; it forms the cluster (asks every worker its
//! capability, plans the shards, sends each worker its shard file unless the worker has it
//! cached), then for every token embeds it, sends the residual stream to the workers, runs
//! its part of each layer with the star all-reduce, and computes the logits.
//!
//! A failure mid-sequence fails that step with an error naming the node, and breaks the
//! cluster: every connection is closed (so the workers go back to waiting for a master).
//! The next sequence ([`Decoder::reset`]) re-forms it with the workers that answer — re-
//! planned if some are gone — and tries again to bring back missing ones at most every
//! [`MasterOptions::rejoin_every`].

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CHUNK_BYTES, Control, PROTOCOL, WorkerStats, encoding_name, receive, send};
use crate::collective::{CollectiveError, Link, StarMaster, Traffic};
use crate::engine::Decoder;
use crate::gguf::Gguf;
use crate::model::{Config, KvCache, Model, ModelError};
use crate::shard::{NodeShard, ShardPlan};
use crate::wire::{Encoding, Frame, Vector};

/// How the master forms and drives its cluster.
#[derive(Debug, Clone)]
pub struct MasterOptions {
    /// The workers' addresses (`host:port`), in the order they get ranks 1, 2, ….
    pub workers: Vec<String>,
    /// The master's own relative speed (the workers declare theirs).
    pub capability: f64,
    /// How vectors travel in the all-reduce (f32 keeps every node's sum exact).
    pub encoding: Encoding,
    /// Bound on connecting and on each read and write.
    pub timeout: Duration,
    /// Bound on a worker's answer after its shard is sent (it reads and prepares it).
    pub load_timeout: Duration,
    /// Most tokens of one sequence.
    pub capacity: usize,
    /// Layers each node keeps in memory (0: all).
    pub window: usize,
    /// Where the shard files are cut to before they are sent.
    pub cache_dir: PathBuf,
    /// How often, at most, a sequence start tries to bring back workers that are gone.
    pub rejoin_every: Duration,
}

/// What the cluster did, for the benchmarks.
#[derive(Debug, Clone, Default)]
pub struct ClusterStats {
    /// Positions run.
    pub steps: u64,
    /// Seconds the master spent computing (its layers, the embedding and the logits).
    pub compute_s: f64,
    /// Seconds the master spent inside all-reduces: receiving the workers' partials
    /// (waiting for the slowest), summing and sending the sums.
    pub all_reduce_s: f64,
    /// Seconds sending steps to the workers.
    pub step_send_s: f64,
    /// The master's all-reduce traffic.
    pub traffic: Traffic,
    /// Bytes of step frames sent.
    pub step_bytes: u64,
    /// Each worker's address and what it reported at its last `Ready`.
    pub workers: Vec<(String, WorkerStats)>,
    /// Times the cluster was formed (1 + re-formations).
    pub formations: u64,
}

/// One worker in the cluster.
#[derive(Debug, Clone)]
struct Member {
    address: String,
    capability: f64,
}

/// The master of a cluster (with no workers: a single node that plans like one).
pub struct Master {
    gguf: Arc<Gguf>,
    options: MasterOptions,
    config: Config,
    /// `None` only after a re-formation failed (it is loaded again at the next).
    model: Option<Model>,
    cache: KvCache,
    star: StarMaster,
    members: Vec<Member>,
    /// Why the cluster is unusable until re-formed.
    broken: Option<String>,
    last_rejoin: Instant,
    stats: ClusterStats,
    log: Box<dyn FnMut(&str) + Send>,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master")
            .field("workers", &self.members)
            .field("shard", &self.model.as_ref().map(Model::shard))
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// A cluster just formed.
struct Formed {
    model: Model,
    star: StarMaster,
    members: Vec<Member>,
    workers: Vec<(String, WorkerStats)>,
    plan: ShardPlan,
}

/// Why a cluster could not be formed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormError {
    /// A worker did not answer, or answered wrongly.
    #[error("worker {address}: {why}")]
    Worker {
        /// Its address.
        address: String,
        /// What happened.
        why: String,
    },
    /// The model cannot be loaded, planned or cut for these nodes.
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl Master {
    /// Forms the cluster: every worker in `options` must answer.
    ///
    /// # Errors
    ///
    /// [`FormError`] naming the first worker that did not answer or failed to take its
    /// shard; a model that cannot be split among these nodes.
    pub fn form(
        gguf: Arc<Gguf>,
        options: MasterOptions,
        mut log: Box<dyn FnMut(&str) + Send>,
    ) -> Result<Self, FormError> {
        let config = Config::from_gguf(&gguf)?;
        let (links, members) = greet(&options, false)?;
        let formed = assemble(&gguf, &options, &config, links, members, None)?;
        log(&describe(&formed));
        let mut stats = ClusterStats {
            formations: 1,
            ..ClusterStats::default()
        };
        stats.workers = formed.workers;
        Ok(Self {
            cache: formed.model.new_cache(options.capacity),
            model: Some(formed.model),
            star: formed.star,
            members: formed.members,
            config,
            gguf,
            options,
            broken: None,
            last_rejoin: Instant::now(),
            stats,
            log,
        })
    }

    /// The workers in the cluster now, rank order.
    pub fn workers(&self) -> Vec<String> {
        self.members.iter().map(|m| m.address.clone()).collect()
    }

    /// What this node computes (`None` while the cluster is broken).
    pub fn shard(&self) -> Option<&NodeShard> {
        self.model.as_ref().map(Model::shard)
    }

    /// What the cluster did so far.
    pub fn stats(&self) -> ClusterStats {
        let mut stats = self.stats.clone();
        stats.traffic = self.star.traffic();
        stats
    }

    /// Why the cluster is unusable until the next sequence re-forms it.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Closes every connection and marks the cluster broken for `why`.
    fn break_up(&mut self, why: String) {
        for link in self.star.links() {
            link.close();
        }
        self.star = StarMaster::new(Vec::new(), self.options.encoding);
        (self.log)(&format!("cluster broken: {why}"));
        self.broken = Some(why);
    }

    /// Forms the cluster again with the workers that answer.
    fn reform(&mut self) -> Result<(), ModelError> {
        for link in self.star.links() {
            link.close();
        }
        self.last_rejoin = Instant::now();
        let (links, members) =
            greet(&self.options, true).map_err(|e| ModelError::Collective(e.to_string()))?;
        let missing: Vec<&String> = self
            .options
            .workers
            .iter()
            .filter(|w| !members.iter().any(|m| &&m.address == w))
            .collect();
        if !missing.is_empty() {
            (self.log)(&format!(
                "re-forming without {} (not answering)",
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let old = self.model.take();
        match assemble(&self.gguf, &self.options, &self.config, links, members, old) {
            Ok(formed) => {
                (self.log)(&describe(&formed));
                self.cache = formed.model.new_cache(self.options.capacity);
                self.model = Some(formed.model);
                self.star = formed.star;
                self.members = formed.members;
                self.stats.workers = formed.workers;
                self.stats.formations += 1;
                self.broken = None;
                Ok(())
            }
            Err(e) => {
                let why = format!("re-forming the cluster failed: {e}");
                self.broken = Some(why.clone());
                Err(ModelError::Collective(why))
            }
        }
    }

    fn fail(&mut self, error: ModelError) -> ModelError {
        let why = error.to_string();
        self.break_up(why.clone());
        ModelError::Collective(format!("{why}; the cluster re-forms at the next request"))
    }
}

impl Decoder for Master {
    fn config(&self) -> &Config {
        &self.config
    }

    fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    fn position(&self) -> usize {
        self.cache.len()
    }

    fn reset(&mut self) -> Result<(), ModelError> {
        self.cache.clear();
        let incomplete = self.members.len() < self.options.workers.len();
        if self.broken.is_some()
            || (incomplete && self.last_rejoin.elapsed() >= self.options.rejoin_every)
        {
            return self.reform();
        }
        let mut failed = None;
        for (link, (_, stats)) in self.star.links().iter_mut().zip(&mut self.stats.workers) {
            let answer = send(link, &Control::Reset).and_then(|()| receive(link));
            match answer {
                Ok(Control::Ready { stats: s, .. }) => *stats = s,
                Ok(other) => {
                    failed = Some(link.protocol(format!("{other:?} where Ready was expected")));
                    break;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            None => Ok(()),
            Some(e) => {
                (self.log)(&format!("a worker did not answer the reset: {e}"));
                self.reform()
            }
        }
    }

    fn step(&mut self, token: u32) -> Result<Vec<f32>, ModelError> {
        if let Some(why) = &self.broken {
            return Err(ModelError::Collective(format!(
                "the cluster is broken ({why}); it re-forms at the next request"
            )));
        }
        let Some(model) = &self.model else {
            return Err(ModelError::Collective(
                "the cluster has no model loaded".into(),
            ));
        };
        let started = Instant::now();
        let mut sending = Duration::ZERO;
        let mut x = model.embed(token)?;
        if !self.star.links().is_empty() {
            let frame = Frame::Step {
                position: self.cache.len() as u32,
                x: Vector::F32(x.clone()),
            };
            let t = Instant::now();
            let mut sent = Ok(());
            for link in self.star.links() {
                sent = link.send(&frame);
                if sent.is_err() {
                    break;
                }
            }
            sending = t.elapsed();
            self.stats.step_send_s += sending.as_secs_f64();
            if let Err(e) = sent {
                return Err(self.fail(ModelError::Collective(e.to_string())));
            }
            self.stats.step_bytes += (frame.wire_bytes() * self.star.links().len()) as u64;
        }
        let mut reducing = Duration::ZERO;
        let (star, cache) = (&mut self.star, &mut self.cache);
        // The layers and the head on one of rayon's threads, as `LocalDecoder::step` does:
        // the products split from inside the pool. The all-reduces block that thread.
        let done = rayon::scope(|_| {
            model.layers_forward(&mut x, cache, &mut |part| {
                let t = Instant::now();
                let result = star.all_reduce(part);
                reducing += t.elapsed();
                result.map_err(|e: CollectiveError| ModelError::Collective(e.to_string()))
            })?;
            // Not a collective error: the head is the master's alone.
            model.logits(&x)
        });
        let logits = match done {
            Ok(logits) => logits,
            Err(error) => {
                return Err(match error {
                    ModelError::Collective(_) => self.fail(error),
                    other => other,
                });
            }
        };
        self.stats.steps += 1;
        self.stats.all_reduce_s += reducing.as_secs_f64();
        self.stats.compute_s += (started.elapsed() - reducing - sending).as_secs_f64();
        Ok(logits)
    }
}

/// Plans the shards for the master and `members` (greeted on `links`), sends each worker
/// its shard, waits until all are ready, and loads the master's own part (reusing `old`
/// if it is that part).
fn assemble(
    gguf: &Arc<Gguf>,
    options: &MasterOptions,
    config: &Config,
    links: Vec<Link>,
    members: Vec<Member>,
    old: Option<Model>,
) -> Result<Formed, FormError> {
    let mut capabilities = vec![options.capability];
    capabilities.extend(members.iter().map(|m| m.capability));
    let plan = ShardPlan::new(config, &capabilities)
        .map_err(|e| ModelError::Unsupported(format!("{} nodes: {e}", capabilities.len())))?;
    std::fs::create_dir_all(&options.cache_dir)
        .map_err(|e| ModelError::Unsupported(format!("{}: {e}", options.cache_dir.display())))?;
    let nodes = plan.nodes.len() as u32;
    // Every worker at once: its shard cut, sent if needed, and loaded on its side.
    let results: Vec<Result<(Link, WorkerStats), FormError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = links
            .into_iter()
            .zip(&members)
            .zip(&plan.nodes[1..])
            .enumerate()
            .map(|(i, ((link, member), shard))| {
                scope.spawn(move || {
                    let rank = i as u32 + 1;
                    give_shard(gguf, options, link.with_rank(i + 1), rank, nodes, shard).map_err(
                        |e| match e {
                            FormError::Worker { why, .. } => FormError::Worker {
                                address: member.address.clone(),
                                why,
                            },
                            other => other,
                        },
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ModelError::Unsupported("a shard transfer panicked".into()).into())
                })
            })
            .collect()
    });
    let mut ready = Vec::new();
    let mut first_error = None;
    for result in results {
        match result {
            Ok(pair) => ready.push(pair),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(error) = first_error {
        ready.iter().for_each(|(link, _)| link.close());
        return Err(error);
    }
    let own = &plan.nodes[0];
    let model = match old {
        Some(model) if model.shard() == own => model,
        old => {
            drop(old); // its memory goes before the new part's comes
            if options.window > 0 {
                Model::load_windowed(gguf.clone(), options.window, Some(own.clone()))?
            } else {
                Model::load_part(gguf, Some(own))?
            }
        }
    };
    let workers = members
        .iter()
        .zip(&ready)
        .map(|(m, (_, stats))| (m.address.clone(), *stats))
        .collect();
    Ok(Formed {
        model,
        star: StarMaster::new(
            ready.into_iter().map(|(link, _)| link).collect(),
            options.encoding,
        ),
        members,
        workers,
        plan,
    })
}

/// A line saying who computes what.
fn describe(formed: &Formed) -> String {
    let own = &formed.plan.nodes[0];
    let workers: Vec<String> = formed
        .members
        .iter()
        .zip(&formed.plan.nodes[1..])
        .map(|(m, s)| format!("{} heads {:?} FFN {:?}", m.address, s.heads, s.ffn))
        .collect();
    format!(
        "cluster of {} node(s): master heads {:?} FFN {:?}; workers: {}",
        formed.plan.nodes.len(),
        own.heads,
        own.ffn,
        if workers.is_empty() {
            "none".to_string()
        } else {
            workers.join(", ")
        }
    )
}

/// Connects to every worker in `options` and exchanges hellos. With `skip_missing`, a
/// worker that does not answer is left out; without, it is an error.
fn greet(
    options: &MasterOptions,
    skip_missing: bool,
) -> Result<(Vec<Link>, Vec<Member>), FormError> {
    let mut links = Vec::new();
    let mut members = Vec::new();
    for address in &options.workers {
        match hello(address, options.timeout) {
            Ok((link, capability)) => {
                links.push(link);
                members.push(Member {
                    address: address.clone(),
                    capability,
                });
            }
            Err(why) if skip_missing => {
                let _ = why;
            }
            Err(why) => {
                links.iter().for_each(Link::close);
                return Err(FormError::Worker {
                    address: address.clone(),
                    why,
                });
            }
        }
    }
    Ok((links, members))
}

/// Connects to `address`, says hello, and returns the link and the worker's capability.
fn hello(address: &str, timeout: Duration) -> Result<(Link, f64), String> {
    let addrs: Vec<_> = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .collect();
    let mut last = "no address".to_string();
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                let mut link = Link::new(0, stream, timeout).map_err(|e| e.to_string())?;
                send(&mut link, &Control::Hello { protocol: PROTOCOL })
                    .map_err(|e| e.to_string())?;
                return match receive(&mut link).map_err(|e| e.to_string())? {
                    Control::Welcome {
                        protocol,
                        capability,
                    } if protocol == PROTOCOL && capability.is_finite() && capability > 0.0 => {
                        Ok((link, capability))
                    }
                    Control::Welcome { protocol, .. } if protocol != PROTOCOL => Err(format!(
                        "it speaks protocol {protocol}, this master {PROTOCOL}"
                    )),
                    other => Err(format!("answered {other:?} to Hello")),
                };
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

/// Cuts, offers and (if asked) sends `shard` to the worker on `link`; returns the link once
/// the worker is ready.
fn give_shard(
    gguf: &Gguf,
    options: &MasterOptions,
    mut link: Link,
    rank: u32,
    nodes: u32,
    shard: &NodeShard,
) -> Result<(Link, WorkerStats), FormError> {
    let address = link.peer().to_string();
    let worker = |why: String| FormError::Worker {
        address: address.clone(),
        why,
    };
    let file = crate::shard_file::write(gguf, shard, &options.cache_dir)
        .map_err(|e| ModelError::Unsupported(e.to_string()))?;
    send(
        &mut link,
        &Control::Assign {
            rank,
            nodes,
            encoding: encoding_name(options.encoding).into(),
            capacity: u32::try_from(options.capacity).unwrap_or(u32::MAX),
            window: u32::try_from(options.window).unwrap_or(u32::MAX),
            shard_sha256: file.sha256.clone(),
            shard_bytes: file.bytes,
        },
    )
    .map_err(|e| worker(e.to_string()))?;
    let send_it = match receive(&mut link).map_err(|e| worker(e.to_string()))? {
        Control::Want { send } => send,
        other => return Err(worker(format!("answered {other:?} to Assign"))),
    };
    if send_it {
        let bytes = std::fs::read(&file.path)
            .map_err(|e| ModelError::Unsupported(format!("{}: {e}", file.path.display())))?;
        for chunk in bytes.chunks(CHUNK_BYTES) {
            link.send(&Frame::Chunk(chunk.to_vec()))
                .map_err(|e| worker(e.to_string()))?;
        }
    }
    link.set_read_timeout(Some(options.load_timeout))
        .map_err(|e| worker(e.to_string()))?;
    let answer = receive(&mut link).map_err(|e| worker(e.to_string()))?;
    link.set_read_timeout(Some(options.timeout))
        .map_err(|e| worker(e.to_string()))?;
    match answer {
        Control::Ready { stats, .. } => Ok((link, stats)),
        other => Err(worker(format!("answered {other:?} after its shard"))),
    }
}
