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
//!
//! `cleave-bench link` runs the link emulator of the library (`cleave_link`,
//! `docs/link-emulator.md`) as a proxy: a slow, delayed link with outages between a head and
//! a tail, until Ctrl-C or SIGTERM.

mod demo;
mod load;
mod machine;
mod rate_fidelity;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use cleave_link::{LinkEmulator, LinkProfile, Outage, OutageMode, Shaping};

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
    /// Emulate a slow, delayed, sometimes broken link: a TCP proxy from --listen to --to.
    Link(LinkArgs),
}

/// Options of `cleave-bench link`. Rates are per direction; "up" is client → upstream.
#[derive(Debug, clap::Args)]
struct LinkArgs {
    /// Address clients connect to, HOST:PORT (port 0 picks a free one; the line on stdout
    /// says which).
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// Upstream every connection is forwarded to, HOST:PORT (e.g. the tail's gRPC port).
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// Rate client → upstream in kilobits per second (1 kbit = 1000 bits); unlimited when
    /// absent.
    #[arg(long, value_name = "KBIT_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
    up_kbit: Option<u64>,
    /// Rate upstream → client in kilobits per second (1 kbit = 1000 bits); unlimited when
    /// absent.
    #[arg(long, value_name = "KBIT_PER_S", value_parser = clap::value_parser!(u64).range(1..))]
    down_kbit: Option<u64>,
    /// One-way propagation delay in milliseconds, in both directions (a round trip takes
    /// twice this).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    delay_ms: u64,
    /// One-way delay client → upstream in milliseconds; overrides --delay-ms.
    #[arg(long, value_name = "MS")]
    up_delay_ms: Option<u64>,
    /// One-way delay upstream → client in milliseconds; overrides --delay-ms.
    #[arg(long, value_name = "MS")]
    down_delay_ms: Option<u64>,
    /// Bytes each direction queues, in KiB (1024 bytes), before the sender is held back
    /// through TCP, like a router's buffer.
    #[arg(long, value_name = "KIB", default_value_t = 64)]
    queue_kib: usize,
    /// A scheduled outage: START+DURATION in seconds after the link starts, fractions
    /// allowed (`30+10` is down from 30 s to 40 s, `0.5+1.5` from 0.5 s to 2 s). Repeat
    /// for more.
    #[arg(long = "outage", value_name = "START+DURATION")]
    outages: Vec<Outage>,
    /// What an outage does: `stall` (nothing is delivered either way, bytes wait and all
    /// resumes after it; new connections wait too) or `reset` (every connection is reset,
    /// new ones are reset right after accept, until it ends).
    #[arg(long, value_name = "stall|reset", default_value = "stall")]
    outage_mode: OutageMode,
}

impl LinkArgs {
    fn profile(&self) -> LinkProfile {
        let shaping = |kbit: Option<u64>, delay_ms: Option<u64>| Shaping {
            rate_bits_per_s: kbit.map(|kbit| kbit.saturating_mul(1000)),
            delay: Duration::from_millis(delay_ms.unwrap_or(self.delay_ms)),
            queue_bytes: self.queue_kib.saturating_mul(1024),
        };
        LinkProfile {
            up: shaping(self.up_kbit, self.up_delay_ms),
            down: shaping(self.down_kbit, self.down_delay_ms),
            outages: self.outages.clone(),
            outage_mode: self.outage_mode,
        }
    }
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
        Command::Link(args) => run_link(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cleave-bench: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// `cleave-bench link`: the emulator until Ctrl-C or SIGTERM, announcing each outage.
async fn run_link(args: LinkArgs) -> anyhow::Result<()> {
    let listen = resolve(&args.listen, "--listen").await?;
    let upstream = resolve(&args.to, "--to").await?;
    let profile = args.profile();
    let mode = profile.outage_mode;
    let emulator = LinkEmulator::start(listen, upstream, profile).await?;
    let started = Instant::now();
    println!("link on {} -> {upstream}", emulator.local_addr());
    let mut down = emulator.subscribe_down();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            changed = down.changed() => {
                if changed.is_err() {
                    break;
                }
                let what = if *down.borrow_and_update() { "begins" } else { "ends" };
                eprintln!(
                    "link: outage ({mode}) {what} at {:.3} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let stats = emulator.stats();
    emulator.shutdown().await;
    println!(
        "link closed: {} bytes up, {} bytes down, {} connections",
        stats.bytes_up, stats.bytes_down, stats.connections
    );
    Ok(())
}

/// The first address `text` (HOST:PORT) resolves to.
async fn resolve(text: &str, option: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(text)
        .await
        .with_context(|| format!("{option} {text}: cannot resolve HOST:PORT"))?
        .next()
        .with_context(|| format!("{option} {text}: resolves to no address"))
}

/// Ctrl-C, or SIGTERM on Unix.
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
