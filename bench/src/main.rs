//! `cleave-bench`: Cleave's latency and byte harness.
//!
//! `cleave-bench demo` is the project's front door: it starts a tail on loopback, runs the
//! head over the sample images through a real gRPC stream, runs the full model locally for
//! reference, and prints what the split costs and how well it agrees.

mod demo;
mod machine;

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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cleave-bench: {error:#}");
            ExitCode::from(2)
        }
    }
}
