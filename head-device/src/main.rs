//! `cleave-head`: runs a bundle's head on images and streams the features to a tail.
//!
//! Prints one JSON line per input on stdout (frame id, status, top-5 classes or the reason
//! there are none, bytes sent, and the head / uplink / tail / total milliseconds) and a
//! summary on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use cleave_codec::Codec;
use cleave_engine::{Backend, Bundle};
use cleave_head::{
    CodingPolicy, ConnectOptions, HeadEncoder, LinkDownPolicy, LocalModel, RunOptions, Session,
    SessionConfig, run_split, sources, write_json_line,
};

/// Run the head of a Cleave split model on images and get results from a tail server.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
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
    /// bundle's full model on this device; `drop` reports them dropped.
    #[arg(long, default_value = "wait", value_parser = ["wait", "local", "drop"])]
    on_link_down: String,
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
    /// Image files (.jpg, .jpeg, .png) or folders of them, processed in order.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("cleave-head: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let files = sources::expand_inputs(&args.inputs)?;
    let bundle = Arc::new(Bundle::open(&args.bundle).context("opening the bundle")?);
    let encoder = HeadEncoder::new(bundle.clone(), &args.backend)?;
    let encoder = Arc::new(match policy(&args, encoder.policy()) {
        Some(policy) => encoder.with_policy(policy)?,
        None => encoder,
    });
    let on_link_down = match args.on_link_down.as_str() {
        "local" => LinkDownPolicy::Local(Arc::new(
            LocalModel::new(bundle.clone(), &args.backend)
                .context("loading the full model for --on-link-down local")?,
        )),
        "drop" => LinkDownPolicy::Drop,
        _ => LinkDownPolicy::Wait,
    };
    let window = args.window as usize;
    let session = Session::start(
        bundle.id(),
        SessionConfig {
            window,
            connect: ConnectOptions {
                connect_timeout: Duration::from_millis(args.connect_timeout_ms),
                keepalive: Duration::from_millis(args.keepalive_ms),
            },
            backoff_max: Duration::from_millis(args.reconnect_max_ms),
            fail_fast_when_down: on_link_down.fails_fast(),
            ..SessionConfig::new(args.servers.clone())
        },
    );
    let options = RunOptions {
        max_pending: (args.max_pending as usize).max(window),
        deadline: Duration::from_millis(args.deadline_ms),
        on_link_down,
    };
    let stdout = std::io::stdout();
    let summary = run_split(encoder, &session, files, &options, |report| {
        write_json_line(&mut stdout.lock(), report)
    })
    .await?;
    eprintln!(
        "cleave-head: {} answered ({} locally), {} failed, {} expired, {} dropped, {} bytes sent",
        summary.answered,
        summary.local,
        summary.failed,
        summary.expired,
        summary.dropped,
        summary.bytes_sent
    );
    Ok(if summary.failed + summary.expired == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
