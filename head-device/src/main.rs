//! `cleave-head`: runs a bundle's head on images and streams the features to a tail.
//!
//! Prints one JSON line per input on stdout (frame id, top-5 classes, bytes sent, and the
//! head / uplink / tail / total milliseconds) and a summary on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cleave_codec::Codec;
use cleave_engine::{Backend, Bundle};
use cleave_head::{CodingPolicy, HeadEncoder, Uplink, run_split, sources, write_json_line};

/// Run the head of a Cleave split model on images and get results from a tail server.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Bundle folder (manifest.toml, head.onnx, ...); the tail must serve the same bundle.
    #[arg(long)]
    bundle: PathBuf,
    /// Tail server URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    server: String,
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
    #[arg(long, default_value_t = 4)]
    window: usize,
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
    let mut uplink = Uplink::connect(&args.server, bundle.id()).await?;
    let stdout = std::io::stdout();
    let summary = run_split(encoder, &mut uplink, files, args.window, |report| {
        write_json_line(&mut stdout.lock(), report)
    })
    .await?;
    eprintln!(
        "cleave-head: {} answered, {} failed, {} bytes sent",
        summary.answered, summary.failed, summary.bytes_sent
    );
    Ok(if summary.failed == 0 {
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
