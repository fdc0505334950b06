//! `cleave-head`: runs a bundle's head on images and streams the features to a tail.
//!
//! Prints one JSON line per input on stdout (frame id, top-5 classes, bytes sent, and the
//! head / uplink / tail / total milliseconds) and a summary on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cleave_engine::{Backend, Bundle};
use cleave_head::{HeadEncoder, Uplink, run_split, sources, write_json_line};

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
    let encoder = Arc::new(HeadEncoder::new(bundle.clone(), &args.backend)?);
    let mut uplink = Uplink::connect(&args.server, bundle.id()).await?;
    let stdout = std::io::stdout();
    let summary = run_split(encoder, &mut uplink, files, args.window, |report| {
        write_json_line(&mut stdout.lock(), report)
    })
    .await?;
    eprintln!(
        "cleave-head: {} classified, {} failed, {} bytes sent",
        summary.classified, summary.failed, summary.bytes_sent
    );
    Ok(if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
