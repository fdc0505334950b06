//! The floor: the tail model run directly — no server, no codec, no gRPC — at the batch
//! sizes the batcher forms, by one or more threads with a model each.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use cleave_engine::{Backend, Bundle, LoadOptions, Model, Role, Tensor};

use super::{CpuSample, quantile};

/// The model run directly at one batch size, by `instances` threads at once.
pub(super) struct FloorRow {
    pub(super) backend: Backend,
    pub(super) instances: usize,
    pub(super) batch: usize,
    pub(super) median_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) samples_per_s: f64,
    /// Cores other processes kept busy meanwhile.
    pub(super) others_cores: Option<f64>,
}

/// The floor of one backend, or why it could not be measured.
pub(super) type Floor = Result<Vec<FloorRow>, String>;

/// Runs the tail model directly: for each instance count `k` and batch size, `k` threads
/// with a model each run batches for `seconds`.
pub(super) fn floor(
    bundle: &Bundle,
    backend: Backend,
    options: &impl Fn(usize) -> LoadOptions,
    instances: &[usize],
    batches: &[usize],
    tensors: &[Tensor],
    seconds: f64,
) -> Floor {
    let mut rows = Vec::new();
    for &k in instances {
        // Loaded per instance count: the threads each may use depend on how many there are.
        let models: Vec<Model> = (0..k)
            .map(|_| bundle.load_with(Role::Tail, &backend, &options(k)))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        for &batch in batches {
            let samples: Vec<&Tensor> = tensors.iter().cycle().take(batch).collect();
            let input = Tensor::stack(&samples);
            let ready = Barrier::new(k);
            let before = CpuSample::now();
            let per_thread: Vec<Result<Timed, String>> = std::thread::scope(|scope| {
                let handles: Vec<_> = models[..k]
                    .iter()
                    .map(|model| scope.spawn(|| time_runs(model, &input, &ready, seconds)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("floor thread panicked".into()))
                    })
                    .collect()
            });
            let others_cores = CpuSample::now()
                .zip(before)
                .map(|(after, before)| after.others_cores_since(&before));
            let mut times = Vec::new();
            let (mut first, mut last) = (None::<Instant>, None::<Instant>);
            for timed in per_thread {
                let timed = timed?;
                times.extend(timed.ms);
                first = Some(first.map_or(timed.start, |f| f.min(timed.start)));
                last = Some(last.map_or(timed.end, |l| l.max(timed.end)));
            }
            let wall = match (first, last) {
                (Some(first), Some(last)) => (last - first).as_secs_f64(),
                _ => return Err("no floor thread ran".into()),
            };
            let samples_per_s = (times.len() * batch) as f64 / wall.max(f64::MIN_POSITIVE);
            let median_ms = quantile(&times, 0.5);
            eprintln!(
                "floor {backend}, {k} instance(s), batch {batch}: {median_ms:.2} ms, \
                 {samples_per_s:.1} samples/s"
            );
            rows.push(FloorRow {
                backend,
                instances: k,
                batch,
                median_ms,
                p99_ms: quantile(&times, 0.99),
                samples_per_s,
                others_cores,
            });
        }
    }
    Ok(rows)
}

/// One thread's timed runs.
struct Timed {
    ms: Vec<f64>,
    start: Instant,
    end: Instant,
}

/// Warms up, waits for the other threads, then runs `input` back to back for `seconds` (at
/// least 5 runs).
fn time_runs(
    model: &Model,
    input: &Tensor,
    ready: &Barrier,
    seconds: f64,
) -> Result<Timed, String> {
    let warm = (0..2).try_for_each(|_| model.run(input).map(drop).map_err(|e| e.to_string()));
    // Wait even after a failure, or the others would wait forever.
    ready.wait();
    warm?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut ms = Vec::new();
    while ms.len() < 5 || Instant::now() < end {
        let t = Instant::now();
        model.run(input).map_err(|e| e.to_string())?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(Timed {
        ms,
        start,
        end: Instant::now(),
    })
}
