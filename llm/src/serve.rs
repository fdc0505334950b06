//! The serving commands of `cleave-llm` (the binary): `worker`, `master` and `chat`.
//!
//! `master` and `chat` both form a cluster from `--workers` (none: this node alone) through
//! [`cleave_llm::cluster::master::Master`]; `master` then answers prompts given on the
//! command line or serves the HTTP API, `chat` talks with the user on this terminal.

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cleave_llm::chat::{ChatTemplate, Message, text_prompt_ids};
use cleave_llm::cluster::master::{Master, MasterOptions};
use cleave_llm::cluster::worker::{self, WorkerOptions};
use cleave_llm::engine::{Decoder, Limits, generate};
use cleave_llm::gguf::Gguf;
use cleave_llm::model::argmax;
use cleave_llm::tokenizer::Tokenizer;
use cleave_llm::wire::Encoding;

/// How partial sums travel in the all-reduce.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum AllReduce {
    /// 8 bytes a value, exact: the cluster computes what one node alone would, bit for bit.
    F64,
    /// 4 bytes a value, rounded: tokens can differ from one node's after a near tie.
    F32,
    /// ggml Q8_0 blocks, 7.5× fewer bytes than f64; rounded more coarsely.
    Q8_0,
}

/// `cleave-llm worker`.
#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    /// Where to listen for a master (`host:port`; port 0 picks one, printed on stderr).
    #[arg(long)]
    listen: String,
    /// Where shard files are kept (by hash) between restarts [default: the user's cache
    /// directory, `cleave-llm/shards`].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// This node's relative speed; the master gives each node work in proportion.
    #[arg(long, default_value_t = 1.0)]
    capability: f64,
    /// Compute threads; 0: one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Bound on each network read and write during a step, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// End a session when the master sends nothing for this many seconds (0: never); the
    /// master re-forms the cluster at its next request.
    #[arg(long, default_value_t = 600)]
    idle_timeout_s: u64,
    /// The largest shard file accepted, in MiB.
    #[arg(long, default_value_t = 16 * 1024)]
    max_shard_mib: u64,
}

/// The model and the cluster, for `master` and `chat`.
#[derive(Debug, clap::Args)]
pub(crate) struct ClusterArgs {
    /// The GGUF model (a llama-architecture model with a gpt2-style vocabulary).
    #[arg(long)]
    model: PathBuf,
    /// Workers to share the model with (`host:port`, comma-separated); none: this node
    /// alone.
    #[arg(long, value_delimiter = ',')]
    workers: Vec<String>,
    /// This node's relative speed (each worker declares its own).
    #[arg(long, default_value_t = 1.0)]
    capability: f64,
    /// How the partial sums travel between nodes.
    #[arg(long, value_enum, default_value = "f64")]
    all_reduce: AllReduce,
    /// Keep at most this many layers' weights in memory on every node (0: all).
    #[arg(long, default_value_t = 0)]
    memory_window: usize,
    /// Most tokens of one sequence, prompt and answer together (at most the model's
    /// context length).
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Where the workers' shard files are cut to before they are sent [default: the
    /// user's cache directory, `cleave-llm/shards`].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Bound on connecting to a worker and on each network read and write, in
    /// milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Compute threads; 0: one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// `cleave-llm master`.
#[derive(Debug, clap::Args)]
pub(crate) struct MasterArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Complete this prompt greedily, print the answer and exit (repeat for several, one
    /// answer per line); without it, serve the HTTP API.
    #[arg(long)]
    prompt: Vec<String>,
    /// With --prompt: put each prompt into the model's chat template as a user message.
    #[arg(long)]
    chat_template: bool,
    /// With --prompt: most tokens to generate for each.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// With --prompt: print each answer's token ids after it, on a line of their own.
    #[arg(long)]
    print_ids: bool,
    /// With --prompt: print the cluster's statistics (per-token time split, bytes) as one
    /// JSON line on stderr at the end.
    #[arg(long)]
    stats: bool,
}

/// `cleave-llm chat`.
#[derive(Debug, clap::Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// A system message to start the conversation with.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens of each answer.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
}

fn threads(n: usize) -> anyhow::Result<()> {
    if n > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("starting the compute threads")?;
    }
    Ok(())
}

/// The per-user cache directory for shard files.
fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("cleave-llm").join("shards")
}

/// Runs a worker until it is killed.
pub(crate) fn worker(args: &WorkerArgs) -> anyhow::Result<()> {
    threads(args.threads)?;
    anyhow::ensure!(
        args.capability.is_finite() && args.capability > 0.0,
        "--capability must be a positive number"
    );
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let options = WorkerOptions {
        cache_dir: args.cache_dir.clone().unwrap_or_else(default_cache_dir),
        capability: args.capability,
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        idle_timeout: (args.idle_timeout_s > 0).then(|| Duration::from_secs(args.idle_timeout_s)),
        max_shard_bytes: args.max_shard_mib.saturating_mul(1 << 20),
    };
    eprintln!(
        "cleave-llm worker listening on {} (shards in {}, {} threads)",
        listener.local_addr()?,
        options.cache_dir.display(),
        rayon::current_num_threads()
    );
    worker::serve(&listener, &options, &mut |line| {
        eprintln!("cleave-llm worker: {line}")
    })
    .context("accepting masters")
}

/// Loads the tokenizer and forms the cluster.
fn form(args: &ClusterArgs) -> anyhow::Result<(Master, Tokenizer, Arc<Gguf>)> {
    threads(args.threads)?;
    let gguf = Arc::new(Gguf::open(&args.model)?);
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let options = MasterOptions {
        workers: args.workers.clone(),
        capability: args.capability,
        encoding: match args.all_reduce {
            AllReduce::F64 => Encoding::F64,
            AllReduce::F32 => Encoding::F32,
            AllReduce::Q8_0 => Encoding::Q8_0,
        },
        timeout: Duration::from_millis(args.timeout_ms.max(1)),
        load_timeout: Duration::from_secs(600),
        capacity: args.context,
        window: args.memory_window,
        cache_dir: args.cache_dir.clone().unwrap_or_else(default_cache_dir),
        rejoin_every: Duration::from_secs(30),
    };
    let master = Master::form(
        gguf.clone(),
        options,
        Box::new(|line| eprintln!("cleave-llm master: {line}")),
    )?;
    Ok((master, tokenizer, gguf))
}

/// Runs `master`.
pub(crate) fn master(args: &MasterArgs) -> anyhow::Result<()> {
    let (mut master, tokenizer, gguf) = form(&args.cluster)?;
    if args.prompt.is_empty() {
        anyhow::bail!("the HTTP API is not wired yet: give --prompt");
    }
    let template = if args.chat_template {
        Some(ChatTemplate::from_gguf(&gguf)?)
    } else {
        None
    };
    let limits = Limits {
        max_tokens: args.max_tokens,
        stop: Vec::new(),
    };
    let mut out = std::io::stdout().lock();
    for prompt in &args.prompt {
        let ids = match &template {
            Some(t) => t.prompt_ids(&tokenizer, &[Message::new("user", prompt)])?,
            None => text_prompt_ids(&tokenizer, prompt),
        };
        let outcome = generate(
            &mut master,
            &tokenizer,
            &ids,
            &limits,
            &mut |logits| argmax(logits),
            &mut |text| {
                let _ = write!(out, "{text}").and_then(|()| out.flush());
                ControlFlow::Continue(())
            },
        )?;
        writeln!(out)?;
        if args.print_ids {
            writeln!(out, "{:?}", outcome.tokens)?;
        }
        eprintln!(
            "prompt {} tokens, first token after {:.1} ms; {} tokens at {:.1} tokens/s",
            outcome.prompt_tokens,
            outcome.first_token.as_secs_f64() * 1e3,
            outcome.tokens.len(),
            outcome.tokens.len() as f64 / outcome.decoding.as_secs_f64().max(1e-9)
        );
    }
    if args.stats {
        // A reset brings the workers' latest figures.
        master.reset()?;
        eprintln!("{}", stats_json(&master));
    }
    Ok(())
}

/// The cluster's statistics as one JSON object.
fn stats_json(master: &Master) -> serde_json::Value {
    let s = master.stats();
    let per = |seconds: f64| seconds * 1e3 / s.steps.max(1) as f64;
    serde_json::json!({
        "steps": s.steps,
        "formations": s.formations,
        "master": {
            "compute_ms_per_token": per(s.compute_s),
            "all_reduce_ms_per_token": per(s.all_reduce_s),
            "waiting_ms_per_token": per(s.traffic.waiting_s),
            "step_send_ms_per_token": per(s.step_send_s),
            "all_reduce_bytes_sent": s.traffic.sent,
            "all_reduce_bytes_received": s.traffic.received,
            "step_bytes_sent": s.step_bytes,
            "bytes_per_token": (s.traffic.sent + s.traffic.received + s.step_bytes) as f64
                / s.steps.max(1) as f64,
        },
        "workers": s.workers.iter().map(|(address, w)| serde_json::json!({
            "address": address,
            "steps": w.steps,
            "compute_ms_per_token": w.compute_s * 1e3 / w.steps.max(1) as f64,
            "all_reduce_ms_per_token": w.all_reduce_s * 1e3 / w.steps.max(1) as f64,
            "waiting_ms_per_token": w.waiting_s * 1e3 / w.steps.max(1) as f64,
            "bytes_sent": w.sent,
            "bytes_received": w.received,
        })).collect::<Vec<_>>(),
    })
}

/// Runs `chat`: a conversation on this terminal.
pub(crate) fn chat(args: &ChatArgs) -> anyhow::Result<()> {
    let (mut master, tokenizer, gguf) = form(&args.cluster)?;
    let template = ChatTemplate::from_gguf(&gguf)?;
    let mut messages: Vec<Message> = args
        .system
        .iter()
        .map(|s| Message::new("system", s))
        .collect();
    let limits = Limits {
        max_tokens: args.max_tokens,
        stop: Vec::new(),
    };
    eprintln!("Type a message and Enter; /reset forgets the conversation; /quit or Ctrl-D ends.");
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            writeln!(out)?;
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                messages.retain(|m| m.role == "system");
                eprintln!("(conversation forgotten)");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", line));
        let ids = template.prompt_ids(&tokenizer, &messages)?;
        let answer = generate(
            &mut master,
            &tokenizer,
            &ids,
            &limits,
            &mut |logits| argmax(logits),
            &mut |text| {
                let _ = write!(out, "{text}").and_then(|()| out.flush());
                ControlFlow::Continue(())
            },
        );
        writeln!(out)?;
        match answer {
            Ok(outcome) => {
                eprintln!(
                    "({} tokens at {:.1} tokens/s)",
                    outcome.tokens.len(),
                    outcome.tokens.len() as f64 / outcome.decoding.as_secs_f64().max(1e-9)
                );
                messages.push(Message::new("assistant", outcome.text));
            }
            Err(error) => {
                // The cluster re-forms at the next message; the question stays unanswered.
                messages.pop();
                eprintln!("cleave-llm: {error}");
            }
        }
    }
}
