//! `cleave-head`: runs a bundle's head on images and streams the features to a tail.
//!
//! Prints one JSON line per input on stdout (frame id, status, top-5 classes or the reason
//! there are none, bytes sent, and the head / uplink / tail / total milliseconds) and a
//! summary on stderr.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser};
use cleave_codec::Codec;
use cleave_engine::{Backend, Bundle};
use cleave_head::energy::{EnergyMeter, PowerProfile, SensorOptions};
use cleave_head::mode::{AutoConfig, Modes, Objective, PowerDraw};
use cleave_head::sources::{SourceFrame, SourceSpec};
use cleave_head::spool::SpoolLimits;
use cleave_head::{
    CodingPolicy, ConnectOptions, HeadEncoder, LinkDownPolicy, LocalModel, Mode, ModeSetting,
    Prefilter, RunOptions, Session, SessionConfig, SpoolConfig, Spooler, config_file, sources,
    telemetry, write_json_line,
};
use tokio::sync::mpsc;

/// Run the head of a Cleave split model on images and get results from a tail server.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// TOML file of options: each key a long flag without its dashes (`deadline_ms = 500`,
    /// `server = ["http://a:50051", "http://b:50051"]`, `learned_prior = true`); flags given
    /// here override the file's. Unknown keys are errors.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Bundle folder (manifest.toml, head.onnx, ...); the tail must serve the same bundle.
    #[arg(long)]
    bundle: PathBuf,
    /// Tail server URL. Repeat for failover: servers are tried in the order given, and a
    /// lost stream moves to the next one, its unanswered frames resent there.
    #[arg(long = "server", default_value = "http://127.0.0.1:50051")]
    servers: Vec<String>,
    /// Inference backend for the head model: tract, ort, ort-cuda or ort-tensorrt.
    #[arg(long, default_value = "tract")]
    backend: Backend,
    /// Bit depth of the features, 2 to 8 (default: the bundle's `bottleneck.quantization.bits`).
    #[arg(long, value_parser = clap::value_parser!(u8).range(2..=8))]
    bits: Option<u8>,
    /// Payload codec: ans (entropy coding under the bundle's prior), zstd or raw (bit-packed).
    /// Default: the bundle's `bottleneck.quantization.codec`.
    #[arg(long, value_parser = parse_codec)]
    codec: Option<Codec>,
    /// Code with the bundle's learned factorized prior (CompressAI EntropyBottleneck) instead
    /// of a calibrated bit depth.
    #[arg(long, conflicts_with_all = ["bits", "codec", "byte_budget"])]
    learned_prior: bool,
    /// Bytes per frame (header included): each frame gets the highest calibrated bit depth
    /// that fits, coded with --codec (rate control steps through bit depths only, not codecs
    /// or the learned prior). A frame that fits at no depth fails with the smallest size.
    #[arg(long, conflicts_with = "bits", value_parser = clap::value_parser!(u64).range(1..))]
    byte_budget: Option<u64>,
    /// Where frames are computed: `split` (head here, tail on the server), `local` (the full
    /// model here; no server needed), `offload` (a JPEG of the model input to a server that
    /// runs the full model: `full_model = true` in its config), or `auto`: per frame, the
    /// mode predicted fastest from the measured link (round trip, bandwidth) and compute
    /// times, with hysteresis (--hysteresis, --min-dwell) and a frame now and then in the
    /// others (--probe-every); `local` whenever the link is down.
    #[arg(long, default_value = "split", value_parser = ["split", "local", "offload", "auto"])]
    mode: String,
    /// `auto`: the modes it may choose, comma-separated. Without `local` the full model is
    /// not loaded (a board too small for it) and --on-link-down applies when the link is
    /// down; with it, `auto` runs frames here then.
    #[arg(long, value_delimiter = ',', default_value = "split,local,offload", value_parser = ["split", "local", "offload"])]
    auto_modes: Vec<String>,
    /// JPEG quality (1–100) of offloaded frames.
    #[arg(long, default_value_t = 85, value_parser = clap::value_parser!(u8).range(1..=100))]
    jpeg_quality: u8,
    /// `auto`: another mode must be predicted cheaper by more than this fraction (0 to 1)
    /// to take over from the current one.
    #[arg(long, default_value_t = 0.2, value_parser = parse_fraction)]
    hysteresis: f32,
    /// `auto`: frames in a mode before it may be left for a cheaper one.
    #[arg(long, default_value_t = 4)]
    min_dwell: u32,
    /// `auto`: every this many frames, one frame goes to a mode not in use, to keep its
    /// prediction fresh (0: never).
    #[arg(long, default_value_t = 20)]
    probe_every: u32,
    /// `auto`: milliseconds between round-trip probes (a tiny request beside the stream).
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    probe_interval_ms: u64,
    /// Drop frames the bundle's neural prefilter finds of no interest (for the bundled model:
    /// no animal, vehicle or person); they are reported `dropped` with the prefilter's score.
    /// In `offload` and `local` this costs a head run per frame.
    #[arg(long)]
    prefilter: bool,
    /// The prefilter's threshold (0 to 1) instead of the bundle's: higher drops more.
    #[arg(long, requires = "prefilter", value_parser = parse_fraction)]
    prefilter_threshold: Option<f32>,
    /// The board's power profile (`deploy/profiles/raspberry-pi-4.toml`): each frame's
    /// energy is modelled from it, unless a board sensor (Jetson INA3221, RAPL) is readable,
    /// in which case it is measured. Each line says which.
    #[arg(long, value_name = "FILE")]
    power_profile: Option<PathBuf>,
    /// What `auto` minimizes: `latency`, or `energy` (needs --power-profile with the
    /// radio's power, `[radio_tx]`).
    #[arg(long, default_value = "latency", value_parser = ["latency", "energy"])]
    objective: String,
    /// Rate control against a latency target: each `split` frame gets the highest
    /// calibrated bit depth predicted to be answered within this many milliseconds (head +
    /// round trip + bytes ÷ bandwidth + tail, all measured as the daemon runs); the bundle's
    /// default depth until the link has been measured, the smallest when none fits.
    #[arg(long, value_name = "MS", conflicts_with_all = ["bits", "byte_budget", "learned_prior"], value_parser = clap::value_parser!(u64).range(1..))]
    latency_target_ms: Option<u64>,
    /// Frames in flight on the uplink at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    window: u32,
    /// Frames between being read and being reported, at most (encoded, queued, in flight).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=65536))]
    max_pending: u32,
    /// Milliseconds from reading a frame to its answer; a frame still unanswered then is
    /// reported `expired` (the tail, told the time left, drops it unrun when late).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    deadline_ms: u64,
    /// What to do with frames while no tail is reachable (every server failed in a row):
    /// `wait` holds them until a tail is back or their deadline passes; `local` runs the
    /// bundle's full model on this device; `drop` reports them dropped; `spool` writes them,
    /// coded, to --spool-dir and sends them when a tail is back (in this run or the next),
    /// each frame's line coming when it is answered.
    #[arg(long, default_value = "wait", value_parser = ["wait", "local", "drop", "spool"])]
    on_link_down: String,
    /// Folder of the on-disk spool (`--on-link-down spool`); one daemon per folder.
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,
    /// Most megabytes the spool holds; when full, the oldest frames are evicted (each gets a
    /// `dropped` line).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    spool_max_mb: u64,
    /// Most frames the spool holds.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    spool_max_frames: u64,
    /// Milliseconds a dial (TCP connect plus bundle negotiation) may take.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    connect_timeout_ms: u64,
    /// Milliseconds between HTTP/2 keepalive pings; an unanswered ping within the same time
    /// closes the connection, so a silent link is noticed.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    keepalive_ms: u64,
    /// Longest wait, in milliseconds, between rounds of reconnect attempts once every server
    /// failed (waits start at 100 ms, double, and are jittered).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    reconnect_max_ms: u64,
    /// Skip frames that changed less than this (0 to 1: mean absolute difference of a 32×32
    /// grey thumbnail) from the last frame sent; they are reported `unchanged`. Off unless
    /// given; 0.02 suits a fixed camera.
    #[arg(long, value_parser = parse_fraction)]
    scene_threshold: Option<f32>,
    /// Watch this folder: its images in name order, then each new image once it is
    /// completely written; runs until stopped (SIGTERM or Ctrl-C).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["inputs", "replay", "stdin_raw"])]
    watch: Option<PathBuf>,
    /// Milliseconds between looks at the watched folder.
    #[arg(long, default_value_t = 200, requires = "watch", value_parser = clap::value_parser!(u64).range(1..))]
    watch_poll_ms: u64,
    /// Replay this folder's images at --fps frames per second, as a camera would deliver
    /// them (for benchmarks): a frame the pipeline cannot take in time is late, and expires.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["inputs", "stdin_raw"])]
    replay: Option<PathBuf>,
    /// Frames per second of --replay.
    #[arg(long, default_value_t = 10.0, requires = "replay")]
    fps: f64,
    /// Passes of --replay over its folder; 0 repeats until stopped.
    #[arg(long, default_value_t = 1, requires = "replay")]
    loops: u32,
    /// Read raw RGB frames of WIDTHxHEIGHT from stdin (3 bytes a pixel, row by row, as
    /// `ffmpeg -f rawvideo -pix_fmt rgb24 -` writes them) until it ends.
    #[arg(long, value_name = "WIDTHxHEIGHT", value_parser = parse_size, conflicts_with = "inputs")]
    stdin_raw: Option<(u32, u32)>,
    /// Capture from this V4L2 camera, e.g. /dev/video0, until stopped (Linux; needs a build
    /// with `--features v4l2`). A frame that finds the pipeline busy is dropped, not queued,
    /// and counted in cleave_head_camera_dropped_frames_total. See docs/camera.md.
    #[arg(long, value_name = "DEVICE", conflicts_with_all = ["inputs", "watch", "replay", "stdin_raw"])]
    camera: Option<PathBuf>,
    /// Frame size asked of --camera; the driver picks its nearest, which is logged.
    #[arg(long, value_name = "WIDTHxHEIGHT", default_value = "640x480", value_parser = parse_size, requires = "camera")]
    camera_size: (u32, u32),
    /// Frames per second asked of --camera's driver (0.01 to 1000); without it, the device's.
    #[arg(long, value_name = "FPS", requires = "camera")]
    camera_fps: Option<f64>,
    /// Pixel format for --camera; without it, the first of rgb24, yuyv, mjpeg it offers.
    #[arg(long, value_parser = ["rgb24", "yuyv", "mjpeg"], requires = "camera")]
    camera_format: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (frames by status and mode, bytes,
    /// resends, latencies, link state); the bound address is printed on stderr.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Append the JSON lines to this file instead of stdout (created if missing; each line
    /// is flushed as it is written, so a crash loses none that was reported).
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Image files (.jpg, .jpeg, .png) or folders of them, processed once, in order. One
    /// source is needed: these, --watch, --replay, --stdin-raw or --camera.
    #[arg(required_unless_present_any = ["watch", "replay", "stdin_raw", "camera"])]
    inputs: Vec<PathBuf>,
}

fn main() -> ExitCode {
    // One async worker is plenty for one uplink; the models run on blocking threads, and a
    // small cap on those keeps threads (and their malloc arenas) from piling up on a board
    // with 1 GB. Four: a source that blocks (stdin), the encoder, and local runs.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(4)
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(daemon()),
        Err(error) => {
            eprintln!("cleave-head: cannot start the async runtime: {error}");
            ExitCode::from(2)
        }
    }
}

async fn daemon() -> ExitCode {
    // RUST_LOG as `level` or `target=level,...` (no regexes: they would cost the edge
    // binary a megabyte); warnings by default.
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::WARN)
        });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("cleave-head: {error:#}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("cleave-head: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let spec = if let Some(dir) = &args.watch {
        SourceSpec::Watch {
            dir: dir.clone(),
            poll: Duration::from_millis(args.watch_poll_ms),
        }
    } else if let Some(dir) = &args.replay {
        SourceSpec::Replay {
            dir: dir.clone(),
            fps: args.fps,
            loops: args.loops,
        }
    } else if let Some(device) = &args.camera {
        camera_source(&args, device)?
    } else if let Some((width, height)) = args.stdin_raw {
        SourceSpec::StdinRaw { width, height }
    } else {
        SourceSpec::Files(args.inputs.clone())
    };
    let bundle = Arc::new(Bundle::open(&args.bundle).context("opening the bundle")?);
    let encoder = HeadEncoder::new(bundle.clone(), &args.backend)?;
    let encoder = Arc::new(match policy(&args, encoder.policy()) {
        Some(policy) => encoder.with_policy(policy)?,
        None => encoder,
    });
    let on_link_down = match args.on_link_down.as_str() {
        "local" => LinkDownPolicy::Local,
        "drop" => LinkDownPolicy::Drop,
        "spool" => LinkDownPolicy::Spool,
        _ => LinkDownPolicy::Wait,
    };
    let mut energy = EnergyMeter::new(
        &SensorOptions::default(),
        match &args.power_profile {
            Some(path) => Some(PowerProfile::load(path)?),
            None => None,
        },
    );
    if energy.is_measured() {
        // The baseline that makes a measured frame's energy "above idle"; before any frame.
        if let Err(error) = energy.calibrate_idle(Duration::from_secs(1)) {
            eprintln!("cleave-head: energy: idle baseline not measured ({error})");
        }
    }
    eprintln!("cleave-head: energy: {}", energy.describe());
    let objective = match args.objective.as_str() {
        "energy" => {
            let profile = energy
                .profile()
                .context("--objective energy needs --power-profile")?;
            let radio = profile.radio_tx.as_ref().with_context(|| {
                format!(
                    "--objective energy needs the radio's transmit power ([radio_tx]) in the \
                     profile {}; without it offloading would look free",
                    profile.name
                )
            })?;
            Objective::Energy(PowerDraw {
                idle_w: profile.idle.watts,
                compute_w: profile.compute.watts,
                radio_w: radio.watts,
            })
        }
        _ => Objective::Latency,
    };
    let prefilter = if args.prefilter {
        let prefilter = Prefilter::new(&bundle, &args.backend, args.prefilter_threshold)?;
        eprintln!(
            "cleave-head: prefilter: threshold {:.3}, keeps frames where {}",
            prefilter.threshold(),
            prefilter.positive()
        );
        Some(Arc::new(prefilter))
    } else {
        None
    };
    let energy = (energy.is_measured() || energy.profile().is_some()).then(|| Arc::new(energy));
    let mode = match args.mode.as_str() {
        "auto" => ModeSetting::Auto(AutoConfig {
            modes: Modes::of(
                &args
                    .auto_modes
                    .iter()
                    .map(|m| mode_named(m))
                    .collect::<Vec<_>>(),
            ),
            objective,
            hysteresis: f64::from(args.hysteresis),
            min_dwell: args.min_dwell,
            probe_every: args.probe_every,
        }),
        name => ModeSetting::Fixed(mode_named(name)),
    };
    let needs_local = match mode {
        ModeSetting::Fixed(Mode::Local) => true,
        ModeSetting::Auto(config) if config.modes.contains(Mode::Local) => true,
        _ => on_link_down == LinkDownPolicy::Local,
    };
    let local = if needs_local {
        Some(Arc::new(
            LocalModel::new(bundle.clone(), &args.backend).context(
                "loading the full model (for --mode local or auto, or --on-link-down local)",
            )?,
        ))
    } else {
        None
    };
    let (spool, spool_lost) = match (on_link_down, &args.spool_dir) {
        (LinkDownPolicy::Spool, Some(dir)) => {
            let config = SpoolConfig {
                dir: dir.clone(),
                limits: SpoolLimits {
                    max_bytes: args.spool_max_mb << 20,
                    max_frames: usize::try_from(args.spool_max_frames).unwrap_or(usize::MAX),
                },
            };
            let (spooler, lost) = Spooler::open(&config, bundle.id().to_string())?;
            eprintln!(
                "cleave-head: spool {}: {} frame(s) waiting from before",
                dir.display(),
                spooler.len()
            );
            (Some(Arc::new(spooler)), lost)
        }
        (LinkDownPolicy::Spool, None) => anyhow::bail!("--on-link-down spool needs --spool-dir"),
        _ => (None, Vec::new()),
    };
    let window = args.window as usize;
    let options = RunOptions {
        max_pending: (args.max_pending as usize).max(window),
        deadline: Duration::from_millis(args.deadline_ms),
        mode,
        local,
        on_link_down,
        scene_threshold: args.scene_threshold,
        jpeg_quality: args.jpeg_quality,
        prefilter,
        energy,
        spool: spool.clone(),
        latency_target: args.latency_target_ms.map(Duration::from_millis),
    };
    if options.latency_target.is_some()
        && bundle.manifest().bottleneck.quantization.levels.is_empty()
    {
        anyhow::bail!("--latency-target-ms needs a bundle with calibrated bit depths");
    }
    let session = (mode != ModeSetting::Fixed(Mode::Local)).then(|| {
        Session::start(
            bundle.id(),
            SessionConfig {
                window,
                connect: ConnectOptions {
                    connect_timeout: Duration::from_millis(args.connect_timeout_ms),
                    keepalive: Duration::from_millis(args.keepalive_ms),
                },
                backoff_max: Duration::from_millis(args.reconnect_max_ms),
                fail_fast_when_down: options.fails_fast(),
                probe_interval: matches!(mode, ModeSetting::Auto(_))
                    .then(|| Duration::from_millis(args.probe_interval_ms)),
                ..SessionConfig::new(args.servers.clone())
            },
        )
    });
    options
        .check(session.is_some())
        .map_err(anyhow::Error::msg)?;
    let mut out: Box<dyn std::io::Write + Send> = match &args.output {
        Some(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening --output {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    for line in &spool_lost {
        write_json_line(&mut out, line)?;
    }
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let bound = telemetry::serve(addr)
                .await
                .with_context(|| format!("serving metrics on {addr}"))?;
            eprintln!("cleave-head: metrics on http://{bound}/metrics");
            if let Some(watched) = session.clone() {
                tokio::spawn(async move {
                    loop {
                        telemetry::link(watched.is_up(), watched.is_down(), &watched.estimate());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                });
            }
            true
        }
        None => false,
    };
    let frames = until_stopped(sources::start(spec, 2)?);
    let summary = cleave_head::run(encoder, session.as_ref(), frames, &options, |report| {
        if metrics {
            telemetry::record(report);
        }
        write_json_line(&mut out, report)
    })
    .await?;
    eprintln!(
        "cleave-head: {} answered ({} locally, {} offloaded), {} failed, {} expired, {} \
         dropped, {} unchanged, {} bytes sent",
        summary.answered,
        summary.local,
        summary.offloaded,
        summary.failed,
        summary.expired,
        summary.dropped,
        summary.unchanged,
        summary.bytes_sent
    );
    if let Some(spool) = &spool {
        eprintln!(
            "cleave-head: {} frame(s) went to the spool; {} wait there for the next run",
            summary.spooled,
            spool.len()
        );
    }
    Ok(if summary.failed + summary.expired == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The flags, over the `--config` file's options if one is named.
fn parse_args() -> anyhow::Result<Args> {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let given: Vec<String> = argv
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect();
    let config = argv.iter().enumerate().find_map(|(i, a)| {
        let a = a.to_str()?;
        match a.strip_prefix("--config=") {
            Some(path) => Some(PathBuf::from(path)),
            None if a == "--config" => argv.get(i + 1).map(PathBuf::from),
            None => None,
        }
    });
    let Some(path) = config else {
        return Ok(Args::parse_from(argv));
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading --config {}", path.display()))?;
    let command = Args::command();
    let (mut known, mut switches) = (Vec::new(), Vec::new());
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "config" | "help" | "version") {
            continue;
        }
        if arg.get_action().takes_values() {
            known.push(long.to_string());
        } else {
            switches.push(long.to_string());
        }
    }
    let from_file = config_file::to_args(&path.display().to_string(), &text, &known, &switches)
        .map_err(anyhow::Error::msg)?;
    let mut merged: Vec<OsString> = argv.iter().take(1).cloned().collect();
    // A flag on the command line replaces the file's key entirely (a repeated --server too).
    for (flag, value) in from_file.into_iter().filter(|(f, _)| !given.contains(f)) {
        merged.push(flag.into());
        merged.extend(value.map(OsString::from));
    }
    merged.extend(argv.iter().skip(1).cloned());
    Ok(Args::parse_from(merged))
}

/// Passes the source's frames on until SIGTERM or Ctrl-C; then no more are taken, and the
/// run ends once the frames already taken are reported.
fn until_stopped(mut frames: mpsc::Receiver<SourceFrame>) -> mpsc::Receiver<SourceFrame> {
    let (tx, out) = mpsc::channel(1);
    tokio::spawn(async move {
        let stop = stop_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => {
                    eprintln!("cleave-head: stopping: reading no more frames, finishing the ones taken");
                    return;
                }
                frame = frames.recv() => match frame {
                    Some(frame) => if tx.send(frame).await.is_err() { return },
                    None => return,
                },
            }
        }
    });
    out
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("expected WIDTHxHEIGHT, like 640x480, not {text:?}"))?;
    let side = |s: &str| {
        s.trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=16384).contains(n))
            .ok_or_else(|| format!("{s:?} is not a side of 1 to 16384 pixels"))
    };
    Ok((side(w)?, side(h)?))
}

/// The camera source the flags ask for.
#[cfg(feature = "v4l2")]
fn camera_source(args: &Args, device: &std::path::Path) -> anyhow::Result<SourceSpec> {
    let format = args
        .camera_format
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    Ok(SourceSpec::Camera(cleave_head::camera::CameraSpec {
        device: device.to_path_buf(),
        width: args.camera_size.0,
        height: args.camera_size.1,
        fps: args.camera_fps,
        format,
    }))
}

/// Without the `v4l2` feature there is no camera source: say so, and how to get one.
#[cfg(not(feature = "v4l2"))]
fn camera_source(_: &Args, device: &std::path::Path) -> anyhow::Result<SourceSpec> {
    anyhow::bail!(
        "--camera {}: this cleave-head was built without camera support; rebuild it with \
         `cargo build --release -p cleave-head --features v4l2` (Linux)",
        device.display()
    )
}

/// A mode by the name clap already checked.
fn mode_named(name: &str) -> Mode {
    match name {
        "local" => Mode::Local,
        "offload" => Mode::Offload,
        _ => Mode::Split,
    }
}

fn parse_fraction(text: &str) -> Result<f32, String> {
    text.parse::<f32>()
        .ok()
        .filter(|f| (0.0..=1.0).contains(f))
        .ok_or_else(|| format!("expected a number from 0 to 1, not {text:?}"))
}

fn parse_codec(name: &str) -> Result<Codec, String> {
    Codec::from_name(name).ok_or_else(|| format!("unknown codec {name:?} (ans, zstd, raw)"))
}

/// The coding policy the flags ask for, if they change the bundle's default.
fn policy(args: &Args, default: CodingPolicy) -> Option<CodingPolicy> {
    let CodingPolicy::Fixed {
        bits: default_bits,
        codec: default_codec,
    } = default
    else {
        return None;
    };
    let codec = args.codec.unwrap_or(default_codec);
    if args.learned_prior {
        Some(CodingPolicy::Learned)
    } else if let Some(bytes) = args.byte_budget {
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
        Some(CodingPolicy::Budget { bytes, codec })
    } else if args.bits.is_some() || args.codec.is_some() {
        let bits = args.bits.unwrap_or(default_bits);
        Some(CodingPolicy::Fixed { bits, codec })
    } else {
        None
    }
}
