//! The server's overhead per frame at batch 1, measured paired.
//!
//! Two measurements taken minutes apart (the floor, then a server run) differ on a shared or
//! virtual machine by more than the overhead they are meant to show. Here one thread
//! alternates short blocks: the tail model run directly (its own copy, batch 1), then frames
//! sent one at a time on one stream to an unbatched server (one instance, same backend),
//! the order swapped every round. Each round's overhead is its server block's median latency
//! minus its direct block's median compute, so slow drifts in the machine's speed cancel; the
//! result is the median over rounds. Nothing else of ours runs during either block.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cleave_engine::{Backend, Bundle, Model, Role, Tensor};
use cleave_proto::v1::FeatureFrame;
use cleave_tail::{TailConfig, TailServer};

use super::heads::{connect, failure, next, on_own_runtime, open_stream};
use super::{CpuSample, Frames, Setting, TailLoadArgs, quantile};

/// What the paired rounds measured.
pub(super) struct Overhead {
    /// Rounds measured (after one unrecorded warm-up round).
    pub(super) rounds: usize,
    /// Median of every direct run, ms.
    pub(super) compute_ms: f64,
    /// Median of every round trip through the server, ms.
    pub(super) latency_ms: f64,
    /// Median of the server's `tail_ms` over the same frames.
    pub(super) tail_ms: f64,
    /// Median of the server's `compute_ms` (its model run) over the same frames.
    pub(super) server_compute_ms: f64,
    /// Each round's overhead (server median − direct median), ms, sorted.
    pub(super) per_round_ms: Vec<f64>,
    /// Frames sent through the server.
    pub(super) frames: usize,
    /// Frames that failed, and why the first did.
    pub(super) errors: usize,
    pub(super) first_error: Option<String>,
    /// Cores other processes kept busy meanwhile.
    pub(super) others_cores: Option<f64>,
}

impl Overhead {
    /// The median round's overhead, ms.
    pub(super) fn overhead_ms(&self) -> f64 {
        quantile(&self.per_round_ms, 0.5)
    }
}

/// Starts an unbatched tail with `backend` and measures `args.overhead_rounds` paired rounds.
pub(super) async fn measure(
    args: &TailLoadArgs,
    bundle: &Arc<Bundle>,
    frames: &Frames,
    backend: Backend,
) -> anyhow::Result<Overhead> {
    let mut config = TailConfig::new(&args.bundle);
    config.model_defaults.backend = backend;
    config.model_defaults.instances = 1;
    config.model_defaults.threads = args.load_options(1).threads;
    config.model_defaults.batching = Setting::unbatched().batching();
    let tail = TailServer::build(&config)
        .await
        .context("starting the tail")?;
    let address = format!("http://{}", tail.local_addr());
    let serving = tail.spawn();
    let model = {
        let bundle = bundle.clone();
        let options = args.load_options(1);
        tokio::task::spawn_blocking(move || bundle.load_with(Role::Tail, &backend, &options))
            .await
            .context("loading task")??
    };
    let paired = Paired {
        address,
        bundle_id: bundle.id().to_string(),
        coded: frames.coded.clone(),
        inputs: frames.tensors.iter().map(|t| Tensor::stack(&[t])).collect(),
        model,
        rounds: args.overhead_rounds,
        block: Duration::from_secs_f64(args.overhead_block_s),
        answer_timeout: Duration::from_secs_f64(args.answer_timeout_s),
    };
    let before = CpuSample::now();
    let measured = on_own_runtime(move || rounds(paired)).await;
    let others_cores = CpuSample::now()
        .zip(before)
        .map(|(after, before)| after.others_cores_since(&before));
    let grace = Duration::from_secs_f64(args.answer_timeout_s);
    serving.shutdown(grace).await.context("tail server")?;
    Ok(Overhead {
        others_cores,
        ..measured?
    })
}

/// Everything the measuring thread needs.
struct Paired {
    address: String,
    bundle_id: String,
    coded: Arc<Vec<Vec<u8>>>,
    inputs: Vec<Tensor>,
    model: Model,
    rounds: usize,
    block: Duration,
    answer_timeout: Duration,
}

/// Warm-up round, then `rounds` rounds of a direct block and a server block, the order
/// swapped every round.
async fn rounds(p: Paired) -> anyhow::Result<Overhead> {
    let mut client = connect(&p.address).await?;
    let (tx, mut results) = open_stream(&mut client, &p.bundle_id, p.answer_timeout)
        .await
        .map_err(anyhow::Error::msg)?;
    let (mut compute, mut latency, mut tail) = (Vec::new(), Vec::new(), Vec::new());
    let mut per_round_ms = Vec::new();
    let mut server_compute = Vec::new();
    let (mut id, mut errors, mut first_error) = (0u64, 0usize, None);
    for round in 0..=p.rounds {
        let mut direct = Vec::new();
        let mut served = Vec::new();
        let mut tails = Vec::new();
        let mut server_computes = Vec::new();
        for server_block in [round % 2 == 1, round % 2 == 0] {
            let end = Instant::now() + p.block;
            if server_block {
                while served.len() < 5 || Instant::now() < end {
                    let frame = FeatureFrame {
                        frame_id: id,
                        frame: p.coded[usize::try_from(id).unwrap_or(0) % p.coded.len()].clone(),
                        deadline_ms: 0,
                        image: Vec::new(),
                    };
                    let sent = Instant::now();
                    tx.send(frame).await.context("the stream closed")?;
                    let result = next(&mut results, p.answer_timeout)
                        .await
                        .map_err(anyhow::Error::msg)?
                        .context("the stream ended early")?;
                    let ms = sent.elapsed().as_secs_f64() * 1e3;
                    if let Some(why) = failure(&result, id) {
                        errors += 1;
                        first_error.get_or_insert(why);
                    } else {
                        served.push(ms);
                        tails.push(result.tail_ms);
                        server_computes.push(result.compute_ms);
                    }
                    id += 1;
                }
            } else {
                // Blocking this thread is fine: the heads' runtime has nothing else to do.
                while direct.len() < 5 || Instant::now() < end {
                    let input = &p.inputs[direct.len() % p.inputs.len()];
                    let started = Instant::now();
                    p.model.run(input)?;
                    direct.push(started.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        if round == 0 {
            continue;
        }
        if served.is_empty() {
            bail!("round {round}: every frame failed");
        }
        per_round_ms.push(quantile(&served, 0.5) - quantile(&direct, 0.5));
        compute.extend(direct);
        latency.extend(served);
        tail.extend(tails);
        server_compute.extend(server_computes);
    }
    drop(tx);
    per_round_ms.sort_by(f64::total_cmp);
    Ok(Overhead {
        rounds: p.rounds,
        compute_ms: quantile(&compute, 0.5),
        latency_ms: quantile(&latency, 0.5),
        tail_ms: quantile(&tail, 0.5),
        server_compute_ms: quantile(&server_compute, 0.5),
        per_round_ms,
        frames: usize::try_from(id).unwrap_or(usize::MAX),
        errors,
        first_error,
        others_cores: None,
    })
}
