//! The serving commands of `cleave-llm` (the binary): `worker`, `master` and `chat`.
//!
//! `master` and `chat` both form a cluster from `--workers` (none: this node alone) through
//! [`cleave_llm::cluster::master::Master`]; `master` then answers prompts given on the
//! command line or serves the OpenAI-compatible HTTP API ([`cleave_llm::api`]), `chat`
//! talks with the user on this terminal.

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use cleave_llm::api::{self, ApiOptions, Engine, EngineOptions};
use cleave_llm::chat::{ChatError, ChatTemplate, Message, text_prompt_ids};
use cleave_llm::cluster::master::{Master, MasterOptions};
use cleave_llm::cluster::worker::{self, WorkerOptions};
use cleave_llm::engine::{Decoder, Limits, Outcome, generate};
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
    /// ggml Q8_0 blocks, 7.4× fewer bytes than f64; rounded more coarsely.
    #[value(name = "q8_0")]
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
    /// Where to serve the OpenAI-compatible HTTP API (`host:port`; port 0 picks one). The
    /// first line on stderr says where: `cleave-llm master listening on http://ADDR (...)`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Most requests waiting while one is generated; more are answered 503 at once.
    #[arg(long, default_value_t = 8)]
    queue: usize,
    /// The largest request body accepted, in KiB (larger ones are answered 413).
    #[arg(long, default_value_t = 1024)]
    max_request_kib: usize,
    /// The model's name in the API [default: the file's `general.name`, else its stem].
    #[arg(long)]
    name: Option<String>,
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

/// Loads the tokenizer and forms the cluster; `log` receives the master's lines.
fn form(
    args: &ClusterArgs,
    log: Box<dyn FnMut(&str) + Send>,
) -> anyhow::Result<(Master, Tokenizer, Arc<Gguf>)> {
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
    let master = Master::form(gguf.clone(), options, log)
        .with_context(|| format!("forming the cluster for {}", args.model.display()))?;
    Ok((master, tokenizer, gguf))
}

/// The master's log on stderr.
fn log_now() -> Box<dyn FnMut(&str) + Send> {
    Box::new(|line| eprintln!("cleave-llm master: {line}"))
}

/// The master's log, held back until the server has said where it listens (so that its
/// line is the first on stderr), then written as it comes.
#[derive(Debug, Clone, Default)]
struct HeldLog(Arc<Mutex<Option<Vec<String>>>>);

impl HeldLog {
    fn held() -> Self {
        Self(Arc::new(Mutex::new(Some(Vec::new()))))
    }

    fn sink(&self) -> Box<dyn FnMut(&str) + Send> {
        let held = self.0.clone();
        Box::new(move |line| {
            let mut held = held.lock().unwrap_or_else(PoisonError::into_inner);
            match held.as_mut() {
                Some(lines) => lines.push(line.to_string()),
                None => eprintln!("cleave-llm master: {line}"),
            }
        })
    }

    /// Writes what was held; from now on lines go straight out.
    fn release(&self) {
        let held = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        for line in held.into_iter().flatten() {
            eprintln!("cleave-llm master: {line}");
        }
    }
}

/// Runs `master`.
pub(crate) fn master(args: &MasterArgs) -> anyhow::Result<()> {
    if args.prompt.is_empty() {
        return serve_api(args);
    }
    let (mut master, tokenizer, gguf) = form(&args.cluster, log_now())?;
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
        let outcome = answer_greedily(&mut master, &tokenizer, &ids, &limits, &mut out)?;
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

/// The model's name in the API: `general.name`, else the file's stem.
fn model_name(gguf: &Gguf, path: &std::path::Path) -> String {
    gguf.get_str("general.name")
        .ok()
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .or_else(|| {
            path.file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "model".into())
}

/// Serves the OpenAI-compatible API until Ctrl-C or SIGTERM.
fn serve_api(args: &MasterArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.queue > 0, "--queue must be at least 1");
    anyhow::ensure!(
        args.max_request_kib > 0,
        "--max-request-kib must be at least 1"
    );
    // Bound first, so that a taken port fails before the cluster is formed.
    let listener =
        TcpListener::bind(&args.listen).with_context(|| format!("listening on {}", args.listen))?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let log = HeldLog::held();
    let (master, tokenizer, gguf) = form(&args.cluster, log.sink())?;
    let template = match ChatTemplate::from_gguf(&gguf) {
        Ok(template) => Some(template),
        Err(ChatError::NoTemplate) => None,
        Err(error) => return Err(error).context("reading the model's chat template"),
    };
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| model_name(&gguf, &args.cluster.model));
    let nodes = master.workers().len() + 1;
    let chat = if template.is_some() {
        ""
    } else {
        "; no chat template, so completions only"
    };
    let engine = Engine::start(
        Box::new(master),
        tokenizer,
        template,
        EngineOptions {
            name: name.clone(),
            queue: args.queue,
            retry_every: Duration::from_secs(10),
        },
        log.sink(),
    )
    .context("starting the engine thread")?;
    let options = ApiOptions {
        max_body_bytes: args.max_request_kib.saturating_mul(1024),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("cleave-llm-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        eprintln!(
            "cleave-llm master listening on http://{address} (model {name}, {nodes} node{}{chat})",
            if nodes == 1 { "" } else { "s" }
        );
        log.release();
        api::serve(listener, Arc::new(engine), &options, shutdown()).await?;
        eprintln!("cleave-llm master: stopped");
        anyhow::Ok(())
    })
}

/// Completes at Ctrl-C or SIGTERM.
async fn shutdown() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}

/// Runs `chat`: a conversation on this terminal.
pub(crate) fn chat(args: &ChatArgs) -> anyhow::Result<()> {
    let (mut master, tokenizer, gguf) = form(&args.cluster, log_now())?;
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
        let answer = answer_greedily(&mut master, &tokenizer, &ids, &limits, &mut out);
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

/// Greedy generation after `prompt`, the text written to `out` as it comes; a failed write
/// stops it.
pub(crate) fn answer_greedily(
    decoder: &mut dyn Decoder,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    limits: &Limits,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let mut failed_write = None;
    let outcome = generate(
        decoder,
        tokenizer,
        prompt,
        limits,
        &mut |logits| argmax(logits),
        &mut |text| match write!(out, "{text}").and_then(|()| out.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            Err(error) => {
                failed_write = Some(error);
                ControlFlow::Break(())
            }
        },
    )?;
    match failed_write {
        Some(error) => Err(error).context("writing the answer"),
        None => Ok(outcome),
    }
}
