//! `cleave-tail`: serves a bundle's tail model over gRPC (`cleave.v1.Split` and
//! `grpc.health.v1.Health`).
//!
//! Order of business: parse and check the config (exit 64 on a bad one), load the model and
//! bind, log the address, serve, and on SIGTERM or Ctrl-C stop taking calls and let in-flight
//! frames finish within the grace period.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cleave_engine::Backend;
use cleave_tail::{TailConfig, TailServer};

/// Serve the tail of a Cleave split model over gRPC.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Bundle folder (manifest.toml, tail.onnx, ...).
    #[arg(long)]
    bundle: PathBuf,
    /// Address to listen on; port 0 picks a free port (printed at start).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Inference backend: tract (pure Rust), ort, ort-cuda or ort-tensorrt (need a build
    /// with `--features ort` and libonnxruntime; GPU providers fail loudly if unavailable).
    #[arg(long, default_value = "tract")]
    backend: Backend,
    /// Largest coded feature frame accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_frame_bytes: usize,
    /// Frames that may wait for the model before streams are slowed down.
    #[arg(long, default_value_t = 64)]
    queue_depth: usize,
    /// Seconds in-flight frames get to finish after SIGTERM.
    #[arg(long, default_value_t = 10)]
    grace_seconds: u64,
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
    let args = Args::parse();
    let config = TailConfig {
        bundle: args.bundle,
        listen: args.listen,
        backend: args.backend,
        max_frame_bytes: args.max_frame_bytes,
        queue_depth: args.queue_depth,
    };
    let server = match TailServer::build(&config).await {
        Ok(server) => server,
        Err(error) => {
            eprintln!("cleave-tail: {error}");
            return ExitCode::from(64);
        }
    };
    // The first line on stdout is the address, so scripts and tests can find the port.
    println!("listening on {}", server.local_addr());
    tracing::info!(bundle = %server.bundle().describe(), backend = %config.backend, "serving");
    let grace = Duration::from_secs(args.grace_seconds);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stop_rx.await;
    }));
    shutdown_signal().await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(grace, serving).await {
        Ok(Ok(Ok(()))) => ExitCode::SUCCESS,
        Ok(Ok(Err(error))) => {
            eprintln!("cleave-tail: {error}");
            ExitCode::FAILURE
        }
        Ok(Err(join)) => {
            eprintln!("cleave-tail: server task failed: {join}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("cleave-tail: in-flight calls did not finish within {grace:?}");
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
