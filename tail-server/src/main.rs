//! `cleave-tail`: serves the tails (and optionally full models) of a repository of bundles
//! over gRPC — `cleave.v1.Split`, KServe v2 `inference.GRPCInferenceService`,
//! `grpc.health.v1.Health` — with HTTP probes and Prometheus metrics beside it.
//!
//! Order of business: read the config file and the flags over it and check them (exit 64 on
//! a bad one), load and warm up every model and bind, print the addresses, serve, and on
//! SIGTERM or Ctrl-C turn unready, stop taking streams and let in-flight work finish within
//! the grace period.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cleave_engine::Backend;
use cleave_tail::{ConfigFile, ModelSettings, TailConfig, TailServer, bundles_in};

/// Serve the tails of Cleave split models to many heads, behind a load balancer.
///
/// Models come from `--bundle` folders and/or a `--repository` folder of bundle folders
/// (or the config file). A head's bundle id picks its tail; KServe clients name a model by
/// its bundle name. Flags override the config file; model flags set the defaults of every
/// model (per-model settings go in the file, `[models.<name>]`).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// TOML config file (see the `cleave_tail::config` docs for every key).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A bundle folder to serve (manifest.toml, tail.onnx, ...); repeat for several.
    #[arg(long, value_name = "DIR")]
    bundle: Vec<PathBuf>,
    /// A model repository: every subfolder holding a manifest.toml is served.
    #[arg(long, value_name = "DIR")]
    repository: Option<PathBuf>,
    /// gRPC address; port 0 picks a free port (printed at start). [default: 127.0.0.1:50051]
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP address for /healthz, /readyz and Prometheus /metrics; off unless given.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Inference backend: tract (pure Rust), ort, ort-cuda or ort-tensorrt (these need a
    /// build with `--features ort` and libonnxruntime; GPU providers fail loudly if
    /// unavailable). [default: tract]
    #[arg(long)]
    backend: Option<Backend>,
    /// Model threads per model, each with its own copy of the model. [default: 1]
    #[arg(long)]
    instances: Option<usize>,
    /// Threads one model run may use (ONNX Runtime's intra-op pool; tract runs one); 0: the
    /// cores divided among the instances (at least 1 each), so instances never fight over
    /// cores. [default: 0]
    #[arg(long)]
    threads: Option<usize>,
    /// Most samples per model run; 1 turns dynamic batching off. [default: 8]
    #[arg(long)]
    max_batch_size: Option<usize>,
    /// Longest the oldest queued request waits for its batch to grow, in microseconds; 0
    /// runs whatever is queued at once. [default: 1000]
    #[arg(long, value_name = "US")]
    max_queue_delay_us: Option<u64>,
    /// Batch sizes run as soon as they can be formed, ascending, comma-separated (e.g. 4,8).
    #[arg(long, value_delimiter = ',', value_name = "SIZES")]
    preferred_batch_sizes: Option<Vec<usize>>,
    /// Most requests queued per model; more are refused with RESOURCE_EXHAUSTED. [default: 256]
    #[arg(long)]
    max_queue_size: Option<usize>,
    /// Deadline for requests that bring none, in ms; 0: none. Requests still queued at their
    /// deadline are dropped before compute. [default: 0]
    #[arg(long, value_name = "MS")]
    timeout_ms: Option<u64>,
    /// Also serve each bundle's full model: over KServe as `<name>-full` (image tensor in),
    /// and to heads in `offload` mode (a JPEG of the model input on their cleave.v1 stream).
    #[arg(long)]
    full_model: bool,
    /// Largest coded feature frame (and KServe message) accepted, in bytes. [default: 4194304]
    #[arg(long)]
    max_frame_bytes: Option<usize>,
    /// Concurrent HTTP/2 streams per client connection. [default: 128]
    #[arg(long)]
    max_concurrent_streams: Option<u32>,
    /// Frames of one cleave.v1 stream in flight at once (results stay in order). [default: 8]
    #[arg(long)]
    stream_window: Option<usize>,
    /// Seconds in-flight work gets to finish after SIGTERM. [default: 10]
    #[arg(long)]
    grace_seconds: Option<u64>,
}

/// The config: built-in defaults, then the file, then the flags.
fn config(args: Args) -> Result<TailConfig, String> {
    let file = match &args.config {
        Some(path) => ConfigFile::read(path)?,
        None => ConfigFile::default(),
    };
    let mut bundles = file.bundles.clone();
    if let Some(repository) = &file.repository {
        bundles.extend(bundles_in(repository)?);
    }
    bundles.extend(args.bundle);
    if let Some(repository) = &args.repository {
        bundles.extend(bundles_in(repository)?);
    }
    let mut config = TailConfig::new(PathBuf::new());
    config.bundles = bundles;
    config.listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051)));
    config.http_listen = args.http_listen.or(file.http_listen);
    if let Some(v) = args.max_frame_bytes.or(file.max_frame_bytes) {
        config.max_frame_bytes = v;
    }
    if let Some(v) = args.max_concurrent_streams.or(file.max_concurrent_streams) {
        config.max_concurrent_streams = v;
    }
    if let Some(v) = args.stream_window.or(file.stream_window) {
        config.stream_window = v;
    }
    if let Some(v) = args.grace_seconds.or(file.grace_seconds) {
        config.grace = Duration::from_secs(v);
    }
    let mut defaults = file.model_defaults.over(&ModelSettings::default())?;
    if let Some(v) = args.backend {
        defaults.backend = v;
    }
    if let Some(v) = args.instances {
        defaults.instances = v;
    }
    if let Some(v) = args.threads {
        defaults.threads = (v > 0).then_some(v);
    }
    if args.full_model {
        defaults.full_model = true;
    }
    let batching = &mut defaults.batching;
    if let Some(v) = args.max_batch_size {
        batching.max_batch_size = v;
    }
    if let Some(v) = args.max_queue_delay_us {
        batching.max_queue_delay = Duration::from_micros(v);
    }
    if let Some(v) = args.preferred_batch_sizes {
        batching.preferred_batch_sizes = v;
    }
    if let Some(v) = args.max_queue_size {
        batching.max_queue_size = v;
    }
    if let Some(v) = args.timeout_ms {
        batching.default_timeout = (v > 0).then(|| Duration::from_millis(v));
    }
    for (name, settings) in &file.models {
        config
            .models
            .insert(name.clone(), settings.over(&defaults)?);
    }
    config.model_defaults = defaults;
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match config(Args::parse()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("cleave-tail: {error}");
            return ExitCode::from(64);
        }
    };
    let server = match TailServer::build(&config).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("cleave-tail: {error}");
            return ExitCode::from(64);
        }
    };
    // The first line on stdout is the gRPC address (the second the HTTP one, if any), so
    // scripts and tests can find the ports.
    println!("listening on {}", server.local_addr());
    if let Some(http) = server.http_addr() {
        println!("http on {http}");
    }
    for model in server.repository().models() {
        tracing::info!(
            model = model.name(),
            bundle = %model.bundle().describe(),
            backend = %model.settings().backend,
            "serving"
        );
    }
    let serving = server.spawn();
    shutdown_signal().await;
    match serving.shutdown(config.grace).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cleave-tail: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
