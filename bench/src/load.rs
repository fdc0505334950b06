//! `cleave-bench tail-load`: the tail server under load from many simulated heads, beside
//! the floor of its model run directly.
//!
//! Real frames are encoded once up front (the bundle's head over the images, the bundle's
//! default coding), so the load generator spends no head compute while it runs. Then, for
//! every backend, instance count and batching setting, an in-process [`TailServer`] starts on
//! loopback and N simulated heads each open their own gRPC connection and
//! `cleave.v1.Split/Stream`. A head is a camera that sends its next frame when the answer to
//! the last one comes (closed loop, one frame in flight) or, with `--rate`, one that sends at
//! a fixed rate whatever happens (open loop; latency then counts from the frame's scheduled
//! time, so a client held back by the server's flow control is not flattered). Latency is
//! measured at the client, send → result; each `FrameResult` adds its batch size and the
//! server's queue and tail times. The load generator runs on its own single-threaded runtime,
//! the server on the process's; both share the machine's cores.
//!
//! The floor is the same tail model run directly — no server, no codec — on the same
//! frames' dequantized tensors at the batch sizes the batcher forms, by ONNX Runtime and by
//! every backend the server used. `docs/tail-load.md` is this command's output.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use cleave_codec::{FrameDecoder, Limits};
use cleave_engine::{Backend, Bundle, LoadOptions, OrtDevice, Tensor};
use cleave_head::HeadEncoder;
use cleave_tail::{BatchingConfig, TailConfig, TailError, TailServer};

use floor::{Floor, floor};
use heads::{Plan, count, on_own_runtime};

mod floor;
mod heads;
mod overhead;
mod report;

/// Options of `cleave-bench tail-load`.
#[derive(Debug, Args)]
pub(crate) struct TailLoadArgs {
    /// Bundle folder.
    #[arg(long, default_value = "models/efficientnet-lite0-split")]
    bundle: PathBuf,
    /// Images or folders of images whose frames the heads send (in turn).
    #[arg(long, num_args = 1.., default_value = "models/samples")]
    images: Vec<PathBuf>,
    /// Tail backends, comma-separated: tract, ort (ort needs a build with `--features ort`).
    #[arg(long, value_delimiter = ',', default_value = "tract")]
    backend: Vec<Backend>,
    /// Model instances (threads) of the tail, comma-separated; every setting runs with each.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    instances: Vec<usize>,
    /// Threads one model run may use (ONNX Runtime's intra-op pool), for the server and
    /// the floor alike; 0: one per core (ONNX Runtime's default). tract runs one thread.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// A batching setting, repeatable: `max=N[,delay_us=D][,preferred=A/B]`. `max=1` is
    /// the unbatched server that the others are compared with.
    #[arg(long = "setting", default_values = [
        "max=1",
        "max=8,delay_us=0",
        "max=8,delay_us=2000",
        "max=8,delay_us=2000,preferred=4/8",
    ])]
    settings: Vec<Setting>,
    /// Concurrent simulated heads, comma-separated; each has its own connection and stream.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    heads: Vec<usize>,
    /// Seconds measured per run (one setting, one number of heads).
    #[arg(long, default_value_t = 5.0)]
    duration_s: f64,
    /// Seconds of load before measuring, per run.
    #[arg(long, default_value_t = 1.0)]
    warmup_s: f64,
    /// Open loop: each head sends this many frames per second whether or not its answers
    /// came. Without it, closed loop: one frame in flight per head.
    #[arg(long)]
    rate: Option<f64>,
    /// Batch sizes of the floor (the model run directly), comma-separated; the settings'
    /// batch sizes are added.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    floor_batches: Vec<usize>,
    /// Seconds of direct runs per floor batch size.
    #[arg(long, default_value_t = 2.0)]
    floor_s: f64,
    /// Paired rounds of the overhead measurement (direct model runs and frames through an
    /// unbatched server, alternating, per backend); 0 skips it.
    #[arg(long, default_value_t = 10)]
    overhead_rounds: usize,
    /// Seconds of each block of a paired round.
    #[arg(long, default_value_t = 0.5)]
    overhead_block_s: f64,
    /// Seconds a head waits for an answer (and the server for its drain) before it counts
    /// the frame unanswered and gives up.
    #[arg(long, default_value_t = 30.0)]
    answer_timeout_s: f64,
    /// Also write the report, with a preamble, as a markdown document to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One batching setting of the server.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Setting {
    max_batch: usize,
    delay_us: u64,
    preferred: Vec<usize>,
}

impl FromStr for Setting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        fn number<T: FromStr>(key: &str, value: &str) -> Result<T, String> {
            value
                .trim()
                .parse()
                .map_err(|_| format!("{key}: {value:?} is not a whole number"))
        }
        let mut setting = Setting::unbatched();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("{part:?}: expected key=value (max, delay_us, preferred)")
            })?;
            match key.trim() {
                "max" => setting.max_batch = number(key, value)?,
                "delay_us" => setting.delay_us = number(key, value)?,
                "preferred" => {
                    setting.preferred = value
                        .split('/')
                        .map(|v| number(key, v))
                        .collect::<Result<_, _>>()?;
                }
                other => return Err(format!("unknown key {other:?} (max, delay_us, preferred)")),
            }
        }
        setting.batching().validate()?;
        Ok(setting)
    }
}

impl Setting {
    fn unbatched() -> Self {
        Self {
            max_batch: 1,
            delay_us: 0,
            preferred: Vec::new(),
        }
    }

    fn batching(&self) -> BatchingConfig {
        BatchingConfig {
            max_batch_size: self.max_batch,
            max_queue_delay: Duration::from_micros(self.delay_us),
            preferred_batch_sizes: self.preferred.clone(),
            ..BatchingConfig::default()
        }
    }

    fn is_unbatched(&self) -> bool {
        self.max_batch == 1
    }

    fn label(&self) -> String {
        if self.is_unbatched() {
            return "unbatched".into();
        }
        let mut label = format!("max {}, delay {} µs", self.max_batch, self.delay_us);
        if !self.preferred.is_empty() {
            let sizes: Vec<String> = self.preferred.iter().map(usize::to_string).collect();
            let _ = write!(label, ", preferred {}", sizes.join("/"));
        }
        label
    }
}

/// The frames the heads send and, for the floor, the tensors the tail decodes them to.
struct Frames {
    coded: Arc<Vec<Vec<u8>>>,
    tensors: Vec<Tensor>,
    /// Median time to decode and dequantize one frame as the tail does, ms.
    decode_ms: f64,
}

/// What one run (one server, one number of heads) measured.
#[derive(Debug, Default)]
struct RunStats {
    sent: usize,
    answered: usize,
    /// Answers received inside the measured window.
    completed: usize,
    window_s: f64,
    latency_ms: Vec<f64>,
    tail_ms: Vec<f64>,
    queue_ms: Vec<f64>,
    batch_sum: u64,
    /// Failed frames and broken streams, by kind.
    errors: BTreeMap<String, usize>,
    /// Cores other processes kept busy during the run, on average.
    others_cores: Option<f64>,
}

impl RunStats {
    fn merge(&mut self, other: RunStats) {
        self.sent += other.sent;
        self.answered += other.answered;
        self.completed += other.completed;
        self.latency_ms.extend(other.latency_ms);
        self.tail_ms.extend(other.tail_ms);
        self.queue_ms.extend(other.queue_ms);
        self.batch_sum += other.batch_sum;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
    }

    fn fps(&self) -> f64 {
        self.completed as f64 / self.window_s.max(f64::MIN_POSITIVE)
    }

    fn error_count(&self) -> usize {
        self.errors.values().sum()
    }

    fn mean_batch(&self) -> f64 {
        self.batch_sum as f64 / self.tail_ms.len().max(1) as f64
    }
}

/// One measured run and where it belongs.
struct Run {
    backend: Backend,
    instances: usize,
    setting: usize,
    heads: usize,
    stats: RunStats,
}

pub(crate) async fn run(args: TailLoadArgs) -> anyhow::Result<()> {
    ensure!(
        args.duration_s > 0.0
            && args.warmup_s >= 0.0
            && args.floor_s > 0.0
            && args.answer_timeout_s > 0.0
            && args.overhead_block_s > 0.0,
        "--duration-s, --floor-s, --overhead-block-s and --answer-timeout-s must be positive, \
         --warmup-s not negative"
    );
    ensure!(
        args.heads.iter().chain(&args.instances).all(|&n| n > 0),
        "--heads and --instances must be at least 1"
    );
    ensure!(
        args.rate.is_none_or(|r| r > 0.0 && r.is_finite()),
        "--rate must be a positive number of frames per second"
    );
    let load_before = load_average();
    let started = Instant::now();
    let bundle = Arc::new(
        Bundle::open(&args.bundle)
            .with_context(|| format!("opening bundle {}", args.bundle.display()))?,
    );
    let files = cleave_head::sources::expand_inputs(&args.images)?;
    eprintln!("bundle {}", bundle.describe());
    eprintln!(
        "machine: {}; load average {load_before}",
        crate::machine::describe()
    );
    let frames = {
        let (bundle, files) = (bundle.clone(), files.clone());
        tokio::task::spawn_blocking(move || encode_frames(&bundle, &files))
            .await
            .context("encoding task")??
    };
    let mean_bytes = frames.coded.iter().map(Vec::len).sum::<usize>() / frames.coded.len();
    eprintln!(
        "encoded {} frames, {mean_bytes} B each on average; decoding one takes {:.3} ms",
        frames.coded.len(),
        frames.decode_ms
    );

    // The floor first, while nothing else of ours runs.
    let mut batches = args.floor_batches.clone();
    for s in &args.settings {
        batches.push(s.max_batch);
        batches.extend(&s.preferred);
    }
    batches.retain(|&b| b > 0);
    batches.sort_unstable();
    batches.dedup();
    let mut floor_backends = vec![Backend::Ort(OrtDevice::Cpu)];
    for b in &args.backend {
        if !floor_backends.contains(b) {
            floor_backends.push(*b);
        }
    }
    let mut floors: Vec<(Backend, Floor)> = Vec::new();
    for backend in floor_backends {
        let (bundle, instances, batches) =
            (bundle.clone(), args.instances.clone(), batches.clone());
        let threads = args.threads;
        let options = move |k: usize| load_options(threads, k);
        let tensors = frames.tensors.clone();
        let seconds = args.floor_s;
        let floor = tokio::task::spawn_blocking(move || {
            floor(
                &bundle, backend, &options, &instances, &batches, &tensors, seconds,
            )
        })
        .await
        .context("floor task")?;
        if let Err(why) = &floor {
            eprintln!("floor {backend}: not measured: {why}");
        }
        floors.push((backend, floor));
    }

    let mut overheads = Vec::new();
    for &backend in args.backend.iter().filter(|_| args.overhead_rounds > 0) {
        let measured = overhead::measure(&args, &bundle, &frames, backend)
            .await
            .with_context(|| format!("{backend}: paired overhead rounds"))?;
        eprintln!(
            "overhead {backend}: compute {:.3} ms, latency {:.3} ms, median round {:.3} ms over \
             {} rounds, {} frames, {} errors",
            measured.compute_ms,
            measured.latency_ms,
            measured.overhead_ms(),
            measured.rounds,
            measured.frames,
            measured.errors
        );
        overheads.push((backend, measured));
    }

    let mut runs: Vec<Run> = Vec::new();
    for &backend in &args.backend {
        for &instances in &args.instances {
            for (index, setting) in args.settings.iter().enumerate() {
                let measured = serve_and_load(&args, &frames, &bundle, backend, instances, setting)
                    .await
                    .with_context(|| {
                        format!("{backend}, {instances} instance(s), {}", setting.label())
                    })?;
                runs.extend(measured.into_iter().map(|(heads, stats)| Run {
                    backend,
                    instances,
                    setting: index,
                    heads,
                    stats,
                }));
            }
        }
    }

    let report = report::report(&args, &runs, &floors, &overheads, frames.decode_ms);
    print!("{report}");
    if let Some(out) = &args.out {
        let preamble =
            report::preamble(&args, &bundle, mean_bytes, frames.coded.len(), &load_before);
        std::fs::write(out, format!("{preamble}{report}"))
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    let failed: usize = runs
        .iter()
        .map(|r| r.stats.error_count() + (r.stats.sent - r.stats.answered))
        .sum::<usize>()
        + overheads.iter().map(|(_, o)| o.errors).sum::<usize>();
    ensure!(
        failed == 0,
        "{failed} frames failed or went unanswered (see the tables)"
    );
    Ok(())
}

/// The bundle's head over every image, coded as the manifest says; and what the tail makes
/// of each frame.
fn encode_frames(bundle: &Arc<Bundle>, files: &[PathBuf]) -> anyhow::Result<Frames> {
    let encoder = HeadEncoder::new(bundle.clone(), &Backend::Tract)?;
    let decoder = FrameDecoder::new(bundle.coding_tables().cloned(), Limits::default())
        .expecting(bundle.id().tag());
    let shape = bundle.manifest().bottleneck.shape.clone();
    let (mut coded, mut tensors) = (Vec::new(), Vec::new());
    for path in files {
        let frame = encoder
            .encode_path(path)
            .with_context(|| format!("encoding {}", path.display()))?;
        let restored = decoder.decode(&frame.bytes)?.dequantize()?;
        tensors.push(Tensor::new(shape.clone(), restored));
        coded.push(frame.bytes);
    }
    ensure!(!coded.is_empty(), "no images to make frames of");
    // What the server spends on each frame before the model: decode and dequantize.
    let mut decode_ms = Vec::new();
    for bytes in coded.iter().cycle().take(50 * coded.len()) {
        let started = Instant::now();
        let restored = decoder.decode(bytes)?.dequantize()?;
        decode_ms.push(started.elapsed().as_secs_f64() * 1e3);
        ensure!(
            restored.len() == tensors[0].data.len(),
            "frame decodes to the wrong size"
        );
    }
    Ok(Frames {
        coded: Arc::new(coded),
        tensors,
        decode_ms: quantile(&decode_ms, 0.5),
    })
}

impl TailLoadArgs {
    /// How the server and the floor load each of `instances` models: `--threads`, or (0)
    /// the cores shared out among them, as `cleave-tail` does.
    fn load_options(&self, instances: usize) -> LoadOptions {
        load_options(self.threads, instances)
    }
}

/// `--threads` (0: the cores shared out among `instances`) as load options.
fn load_options(threads: usize, instances: usize) -> LoadOptions {
    if threads > 0 {
        LoadOptions {
            threads: Some(threads),
        }
    } else {
        LoadOptions::sharing_cores(instances)
    }
}

/// Starts a tail with one setting and runs every number of heads against it.
async fn serve_and_load(
    args: &TailLoadArgs,
    frames: &Frames,
    bundle: &Bundle,
    backend: Backend,
    instances: usize,
    setting: &Setting,
) -> anyhow::Result<Vec<(usize, RunStats)>> {
    let mut config = TailConfig::new(&args.bundle);
    config.model_defaults.backend = backend;
    config.model_defaults.instances = instances;
    config.model_defaults.threads = args.load_options(instances).threads;
    config.model_defaults.batching = setting.batching();
    let tail = TailServer::build(&config)
        .await
        .context("starting the tail")?;
    let address = format!("http://{}", tail.local_addr());
    let serving = tail.spawn();
    let mut measured = Vec::new();
    for &heads in &args.heads {
        let plan = Plan {
            address: address.clone(),
            bundle_id: bundle.id().to_string(),
            frames: frames.coded.clone(),
            heads,
            warmup: Duration::from_secs_f64(args.warmup_s),
            duration: Duration::from_secs_f64(args.duration_s),
            rate: args.rate,
            answer_timeout: Duration::from_secs_f64(args.answer_timeout_s),
        };
        let before = CpuSample::now();
        let mut stats = on_own_runtime(move || heads::drive(plan)).await?;
        stats.others_cores = CpuSample::now()
            .zip(before)
            .map(|(after, before)| after.others_cores_since(&before));
        eprintln!(
            "{backend}, {instances} instance(s), {}, {heads} heads: {:.1} frames/s, p50 {:.2} ms, \
             p99 {:.2} ms, mean batch {:.2}, {}/{} answered, {} errors",
            setting.label(),
            stats.fps(),
            quantile(&stats.latency_ms, 0.5),
            quantile(&stats.latency_ms, 0.99),
            stats.mean_batch(),
            stats.answered,
            stats.sent,
            stats.error_count()
        );
        measured.push((heads, stats));
    }
    let grace = Duration::from_secs_f64(args.answer_timeout_s);
    match serving.shutdown(grace).await {
        Ok(()) => {}
        Err(TailError::ShuttingDown(why)) => {
            eprintln!("the tail did not shut down: {why}; left behind");
            if let Some((_, last)) = measured.last_mut() {
                count(last, format!("server not drained within {grace:?}"));
            }
        }
        Err(other) => return Err(other).context("tail server"),
    }
    Ok(measured)
}

/// The `q` quantile (nearest rank) of sorted or unsorted values; 0 for none.
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// CPU time of the whole machine and of this process, from `/proc` (Linux only).
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    cpus: u64,
    total: u64,
    busy: u64,
    own: u64,
}

impl CpuSample {
    /// Now, or `None` where `/proc` does not tell.
    fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let jiffies: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let total: u64 = jiffies.iter().sum();
        let idle = jiffies.get(3)? + jiffies.get(4)?;
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count();
        // After the command name (which may hold spaces): state is field 0, utime 11, stime 12.
        let own = std::fs::read_to_string("/proc/self/stat").ok()?;
        let fields: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
        let own = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some(Self {
            cpus: u64::try_from(cpus).ok()?.max(1),
            total,
            busy: total - idle,
            own,
        })
    }

    /// Cores kept busy by everything but this process (hypervisor steal included) since
    /// `earlier`, on average.
    fn others_cores_since(&self, earlier: &Self) -> f64 {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        let busy = self.busy.saturating_sub(earlier.busy) as f64;
        let own = self.own.saturating_sub(earlier.own) as f64;
        ((busy - own).max(0.0) / total) * self.cpus as f64
    }
}

/// `/proc/loadavg`'s three load averages, or a note that there are none.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_and_name_themselves() {
        let s: Setting = "max=8, delay_us=2000, preferred=4/8".parse().unwrap();
        assert_eq!(
            (s.max_batch, s.delay_us, s.preferred.as_slice()),
            (8, 2000, &[4, 8][..])
        );
        assert_eq!(s.label(), "max 8, delay 2000 µs, preferred 4/8");
        assert_eq!(s.batching().max_queue_delay, Duration::from_millis(2));
        let one: Setting = "max=1".parse().unwrap();
        assert!(one.is_unbatched() && one.label() == "unbatched");
        assert!(
            "max=0"
                .parse::<Setting>()
                .unwrap_err()
                .contains("max_batch_size")
        );
        assert!("max=4,preferred=8".parse::<Setting>().is_err());
        assert!(
            "batch=4"
                .parse::<Setting>()
                .unwrap_err()
                .contains("unknown key")
        );
        assert!(
            "max=four"
                .parse::<Setting>()
                .unwrap_err()
                .contains("whole number")
        );
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), 50.0);
        assert_eq!(quantile(&values, 0.99), 99.0);
        assert_eq!(quantile(&values, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
