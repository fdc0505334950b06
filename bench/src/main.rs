//! `cleave-bench`: Cleave's latency and byte harness.
//!
//! `cleave-bench demo` is the project's front door: it starts a tail on loopback, runs the
//! head over the sample images through a real gRPC stream, runs the full model locally for
//! reference, and prints what the split costs and how well it agrees.
//!
//! `cleave-bench rate-fidelity` makes the rate–fidelity table (`docs/rate-fidelity.md`):
//! bytes and agreement with the full model for every calibrated bit depth and codec, the
//! learned prior, and JPEG/WebP offloading baselines.
//!
//! `cleave-bench tail-load` puts the tail server under load (`docs/tail-load.md`): N
//! simulated heads sending the bundled model's real frames, frames per second and latency for
//! several batching settings, beside the floor of the tail model run directly.

mod demo;
mod load;
mod machine;
mod rate_fidelity;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Cleave's benchmark harness.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the split model end to end on sample images and compare with the full model.
    Demo(demo::DemoArgs),
    /// Measure bytes and fidelity of every coding and of JPEG/WebP offloading.
    RateFidelity(rate_fidelity::RateFidelityArgs),
    /// Load the tail server with simulated heads: throughput and latency per batching
    /// setting, beside the tail model run directly.
    TailLoad(load::TailLoadArgs),
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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::RateFidelity(args) => rate_fidelity::run(args),
        Command::TailLoad(args) => load::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cleave-bench: {error:#}");
            ExitCode::from(2)
        }
    }
}
