//! The simulated heads: each its own gRPC connection and `cleave.v1.Split/Stream`, closed
//! loop (one frame in flight) or open loop (a fixed rate), all on one single-threaded
//! runtime of their own so that they do not queue behind the server's tasks.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cleave_proto::BUNDLE_ID_METADATA;
use cleave_proto::v1::split_client::SplitClient;
use cleave_proto::v1::{FeatureFrame, FrameResult, frame_error, frame_result::Outcome};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::RunStats;

/// One run of the load generator.
pub(super) struct Plan {
    pub(super) address: String,
    pub(super) bundle_id: String,
    pub(super) frames: Arc<Vec<Vec<u8>>>,
    pub(super) heads: usize,
    pub(super) warmup: Duration,
    pub(super) duration: Duration,
    pub(super) rate: Option<f64>,
    pub(super) answer_timeout: Duration,
}

/// Runs the heads on a single-threaded runtime of their own thread.
pub(super) async fn on_own_runtime<T, F>(
    job: impl FnOnce() -> F + Send + 'static,
) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: Future<Output = anyhow::Result<T>>,
{
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cleave-load".into())
        .spawn(move || {
            let outcome = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("load generator runtime")
                .and_then(|runtime| runtime.block_on(job()));
            let _ = done.send(outcome);
        })
        .context("starting the load generator thread")?;
    result.await.context("the load generator thread died")?
}

/// Connects every head, then runs them all for warm-up plus duration.
pub(super) async fn drive(plan: Plan) -> anyhow::Result<RunStats> {
    let mut clients = Vec::with_capacity(plan.heads);
    for _ in 0..plan.heads {
        clients.push(connect(&plan.address).await?);
    }
    let start = Instant::now();
    let window = Window {
        start,
        from: start + plan.warmup,
        end: start + plan.warmup + plan.duration,
    };
    let plan = Arc::new(plan);
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(index, client)| tokio::spawn(head(client, plan.clone(), index, window)))
        .collect();
    let mut stats = RunStats {
        window_s: plan.duration.as_secs_f64(),
        ..RunStats::default()
    };
    for task in tasks {
        stats.merge(task.await.context("head task")?);
    }
    Ok(stats)
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    /// Measuring starts (after warm-up).
    from: Instant,
    /// Heads stop sending.
    end: Instant,
}

/// A connection of its own to the tail at `address`.
pub(super) async fn connect(address: &str) -> anyhow::Result<SplitClient<Channel>> {
    let channel = Endpoint::from_shared(address.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {address}"))?;
    Ok(SplitClient::new(channel))
}

/// Opens a `Stream` for `bundle_id`: the sender of its frames and the stream of results.
pub(super) async fn open_stream(
    client: &mut SplitClient<Channel>,
    bundle_id: &str,
    limit: Duration,
) -> Result<(mpsc::Sender<FeatureFrame>, tonic::Streaming<FrameResult>), String> {
    let (tx, rx) = mpsc::channel::<FeatureFrame>(64);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let id = bundle_id
        .parse()
        .map_err(|_| "bundle id is not valid metadata".to_string())?;
    request.metadata_mut().insert(BUNDLE_ID_METADATA, id);
    match tokio::time::timeout(limit, client.stream(request)).await {
        Ok(Ok(response)) => Ok((tx, response.into_inner())),
        Ok(Err(status)) => Err(format!("stream refused: {:?}", status.code())),
        Err(_) => Err("stream not opened in time".into()),
    }
}

/// Frame `id` of head `index`: the frames in turn, each head starting at its own.
fn frame_for(plan: &Plan, index: usize, id: u64) -> FeatureFrame {
    let at = (index + usize::try_from(id).unwrap_or(0)) % plan.frames.len();
    FeatureFrame {
        frame_id: id,
        frame: plan.frames[at].clone(),
        deadline_ms: 0,
        image: Vec::new(),
    }
}

pub(super) fn count(stats: &mut RunStats, kind: String) {
    *stats.errors.entry(kind).or_default() += 1;
}

/// One simulated head; a refused or broken stream is counted, not raised.
async fn head(
    mut client: SplitClient<Channel>,
    plan: Arc<Plan>,
    index: usize,
    window: Window,
) -> RunStats {
    let mut stats = RunStats::default();
    let (tx, results) = match open_stream(&mut client, &plan.bundle_id, plan.answer_timeout).await {
        Ok(stream) => stream,
        Err(error) => {
            count(&mut stats, error);
            return stats;
        }
    };
    match plan.rate {
        None => closed_loop(&plan, index, window, tx, results, &mut stats).await,
        Some(rate) => open_loop(plan, index, window, rate, tx, results, &mut stats).await,
    }
    stats
}

/// A camera that sends its next frame when the answer to the last one is in.
async fn closed_loop(
    plan: &Plan,
    index: usize,
    window: Window,
    tx: mpsc::Sender<FeatureFrame>,
    mut results: tonic::Streaming<FrameResult>,
    stats: &mut RunStats,
) {
    let mut id = 0;
    while Instant::now() < window.end {
        let sent = Instant::now();
        if tx.send(frame_for(plan, index, id)).await.is_err() {
            count(stats, "request stream closed".into());
            return;
        }
        stats.sent += 1;
        match next(&mut results, plan.answer_timeout).await {
            Ok(Some(result)) => record(stats, &result, id, sent, window),
            Ok(None) => return count(stats, "stream ended early".into()),
            Err(error) => return count(stats, error),
        }
        id += 1;
    }
    drop(tx);
    // The stream must then end cleanly, with no answer left over.
    match next(&mut results, plan.answer_timeout).await {
        Ok(None) => {}
        Ok(Some(_)) => count(stats, "answer to no frame".into()),
        Err(error) => count(stats, format!("at the end: {error}")),
    }
}

/// A camera that sends on a fixed schedule (phase-shifted per head) whatever the answers.
async fn open_loop(
    plan: Arc<Plan>,
    index: usize,
    window: Window,
    rate: f64,
    tx: mpsc::Sender<FeatureFrame>,
    mut results: tonic::Streaming<FrameResult>,
    stats: &mut RunStats,
) {
    let answer_timeout = plan.answer_timeout;
    let period = Duration::from_secs_f64(1.0 / rate);
    let first = window.start + period.mul_f64(index as f64 / plan.heads as f64);
    let (times_tx, mut times) = mpsc::unbounded_channel::<(u64, Instant)>();
    let sender = tokio::spawn(async move {
        for id in 0u64.. {
            let at = first + period.mul_f64(id as f64);
            if at >= window.end {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
            // The schedule goes first, so the receiver knows the frame before its answer.
            if times_tx.send((id, at)).is_err()
                || tx.send(frame_for(&plan, index, id)).await.is_err()
            {
                break;
            }
        }
    });
    loop {
        match next(&mut results, answer_timeout).await {
            Ok(Some(result)) => {
                let Some((id, at)) = times.recv().await else {
                    count(stats, "answer to no frame".into());
                    break;
                };
                stats.sent += 1;
                record(stats, &result, id, at, window);
            }
            Ok(None) => break,
            Err(error) => {
                count(stats, error);
                break;
            }
        }
    }
    sender.abort();
    let _ = sender.await;
    times.close();
    // Frames sent and never answered.
    while times.recv().await.is_some() {
        stats.sent += 1;
    }
}

/// The next answer on a stream, `None` at its end; a broken stream or a silence longer than
/// `limit` is an error of that kind.
pub(super) async fn next(
    results: &mut tonic::Streaming<FrameResult>,
    limit: Duration,
) -> Result<Option<FrameResult>, String> {
    match tokio::time::timeout(limit, results.message()).await {
        Ok(Ok(message)) => Ok(message),
        Ok(Err(status)) => Err(format!("stream broke: {:?}", status.code())),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// Why a result is not a good answer to frame `id`, if it is not.
pub(super) fn failure(result: &FrameResult, id: u64) -> Option<String> {
    if result.frame_id != id {
        return Some(format!("answer {} for frame {id}", result.frame_id));
    }
    match &result.outcome {
        Some(Outcome::Classification(c)) if !c.top.is_empty() => None,
        Some(Outcome::Detections(_)) => None,
        Some(Outcome::Error(e)) => Some(frame_error::Kind::try_from(e.kind).map_or_else(
            |_| format!("error kind {}", e.kind),
            |k| k.as_str_name().to_string(),
        )),
        _ => Some("answer without outcome".into()),
    }
}

/// Counts one answer; its latency and server times count if it was sent after warm-up,
/// its frame towards throughput if it succeeded inside the measured window.
fn record(stats: &mut RunStats, result: &FrameResult, id: u64, sent: Instant, window: Window) {
    let done = Instant::now();
    stats.answered += 1;
    if let Some(failure) = failure(result, id) {
        return count(stats, failure);
    }
    if done >= window.from && done <= window.end {
        stats.completed += 1;
    }
    if sent >= window.from && sent < window.end {
        stats
            .latency_ms
            .push(done.duration_since(sent).as_secs_f64() * 1e3);
        stats.tail_ms.push(result.tail_ms);
        stats.queue_ms.push(result.queue_ms);
        stats.batch_sum += u64::from(result.batch_size);
    }
}
