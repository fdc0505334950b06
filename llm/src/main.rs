//! `cleave-llm`: the command line of the tensor-parallel LLM runtime.
//!
//! `inspect` shows what a GGUF file holds; `run` generates on this node alone (greedy), the
//! reference the tensor-parallel cluster must match token for token; `worker`, `master` and
//! `chat` ([`serve`]) run a cluster.

mod serve;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use cleave_llm::chat::{ChatTemplate, Message, text_prompt_ids};
use cleave_llm::engine::{Limits, LocalDecoder};
use cleave_llm::gguf::{Gguf, Value};
use cleave_llm::model::Model;
use cleave_llm::tokenizer::Tokenizer;

/// Tensor-parallel LLM inference across edge nodes, from GGUF files.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints a GGUF file's metadata and tensor directory, and whether every tensor has a
    /// type cleave-llm reads.
    Inspect {
        /// The GGUF file.
        file: PathBuf,
        /// Also list every tensor (name, type, dimensions innermost first, bytes).
        #[arg(long)]
        tensors: bool,
    },
    /// Generates text on this node alone, greedily (the most likely token each step), and
    /// prints it as it comes; timings go to stderr.
    Run(RunArgs),
    /// Serves as a worker of a cluster: waits for a master, takes the shard it sends (or
    /// finds it cached by hash), and computes its part of every layer on command.
    Worker(serve::WorkerArgs),
    /// Forms a cluster with the workers (or runs alone) and answers: the prompts given
    /// with --prompt, or the OpenAI-compatible HTTP API on --listen.
    #[command(after_help = MASTER_HELP)]
    Master(serve::MasterArgs),
    /// Forms a cluster with the workers (or runs alone) and chats on this terminal.
    Chat(serve::ChatArgs),
}

const MASTER_HELP: &str = "\
The HTTP API (without --prompt), one sequence generated at a time:
  POST /v1/chat/completions   messages, in the model's chat template
  POST /v1/completions        a prompt (text or token ids), completed as it is
  GET  /v1/models             the model served
  GET  /health                200, or 503 while the cluster is broken
Both POST routes take max_tokens (or max_completion_tokens), temperature (0: greedy),
top_p, top_k, seed, stop and stream (Server-Sent Events). Errors are OpenAI's JSON: 400 for a
bad request, 503 when the queue is full, 502 when a node fails (the next request re-forms
the cluster).

Example:
  cleave-llm worker --listen 0.0.0.0:7000                          # on each other node
  cleave-llm master --model M.gguf --workers nodeB:7000 --listen 0.0.0.0:8080
  curl http://localhost:8080/v1/chat/completions -H 'content-type: application/json' \\
    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'";

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The GGUF model (a llama-architecture model with a gpt2-style vocabulary).
    #[arg(long)]
    model: PathBuf,
    /// The prompt. With --chat it is the user's message, put into the model's chat
    /// template; without, it is completed as it is.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (for instruct models).
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate (generation also stops at the end-of-sequence token).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Compute threads; 0: one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Keep at most this many layers' weights in memory, reading the next ones from the file
    /// on a background thread while one computes (TPI-LLM's sliding window); 0 keeps them
    /// all. Saves memory, costs reading every layer once per token.
    #[arg(long, default_value_t = 0)]
    memory_window: usize,
    /// Print the token ids generated, one line, after the text.
    #[arg(long)]
    print_ids: bool,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("cleave-llm: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Inspect { file, tensors } => inspect(&file, tensors),
        Command::Run(args) => run_alone(&args),
        Command::Worker(args) => serve::worker(&args).map(|()| ExitCode::SUCCESS),
        Command::Master(args) => serve::master(&args).map(|()| ExitCode::SUCCESS),
        Command::Chat(args) => serve::chat(&args).map(|()| ExitCode::SUCCESS),
    }
}

fn inspect(file: &PathBuf, list_tensors: bool) -> anyhow::Result<ExitCode> {
    // The error names the file and the byte at fault.
    let gguf = Gguf::open(file)?;
    println!(
        "{}: GGUF v{}, {} metadata keys, {} tensors, data at byte {} (alignment {})",
        file.display(),
        gguf.version(),
        gguf.metadata().len(),
        gguf.tensors().len(),
        gguf.data_start(),
        gguf.alignment()
    );
    for (key, value) in gguf.metadata() {
        println!("  {key} = {}", show(value));
    }
    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    let mut unreadable = Vec::new();
    for tensor in gguf.tensors() {
        let name = match tensor.ggml_type() {
            Ok(ty) => ty.name().to_string(),
            Err(error) => {
                unreadable.push(error.to_string());
                format!("type {}", tensor.type_id)
            }
        };
        let entry = by_type.entry(name.clone()).or_default();
        entry.0 += 1;
        entry.1 += tensor.bytes.unwrap_or(0);
        if list_tensors {
            let bytes = tensor.bytes.map_or("?".into(), |b| b.to_string());
            println!("  {} {name} {:?} {bytes} B", tensor.name, tensor.dims);
        }
    }
    for (name, (count, bytes)) in &by_type {
        println!("  {count} tensors of {name}, {bytes} bytes");
    }
    if unreadable.is_empty() {
        println!("every tensor has a type cleave-llm reads");
        return Ok(ExitCode::SUCCESS);
    }
    for why in &unreadable {
        println!("not readable: {why}");
    }
    Ok(ExitCode::from(1))
}

/// A metadata value in a line: long arrays shortened.
fn show(value: &Value) -> String {
    const SHOWN: usize = 8;
    match value {
        Value::String(s) if s.chars().count() > 80 => {
            format!(
                "{:?}… ({} bytes)",
                s.chars().take(80).collect::<String>(),
                s.len()
            )
        }
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => {
            let shown: Vec<String> = items.iter().take(SHOWN).map(show).collect();
            let more = items.len().saturating_sub(SHOWN);
            if more > 0 {
                format!(
                    "[{}, … {more} more] ({} items)",
                    shown.join(", "),
                    items.len()
                )
            } else {
                format!("[{}]", shown.join(", "))
            }
        }
        Value::Bool(v) => v.to_string(),
        // f32's own shortest form (1e-5, not 0.000009999999747378752).
        Value::F32(v) => v.to_string(),
        other => other
            .as_i64()
            .map(|v| v.to_string())
            .or_else(|| other.as_u64().map(|v| v.to_string()))
            .or_else(|| other.as_f64().map(|v| v.to_string()))
            .unwrap_or_default(),
    }
}

fn run_alone(args: &RunArgs) -> anyhow::Result<ExitCode> {
    if args.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(args.threads)
            .build_global()
            .context("starting the compute threads")?;
    }
    let loading = Instant::now();
    let gguf = Gguf::open(&args.model)?;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let gguf = std::sync::Arc::new(gguf);
    let model = if args.memory_window > 0 {
        Model::load_windowed(gguf.clone(), args.memory_window, None)?
    } else {
        Model::load(&gguf)?
    };
    let load_s = loading.elapsed().as_secs_f64();
    let prompt = if args.chat {
        ChatTemplate::from_gguf(&gguf)?
            .prompt_ids(&tokenizer, &[Message::new("user", &args.prompt)])?
    } else {
        text_prompt_ids(&tokenizer, &args.prompt)
    };
    let weight_bytes = model.weight_bytes();
    let mut decoder = LocalDecoder::new(model, prompt.len() + args.max_tokens + 1);
    let limits = Limits {
        max_tokens: args.max_tokens,
        stop: Vec::new(),
    };
    let mut out = std::io::stdout().lock();
    let outcome = serve::answer_greedily(&mut decoder, &tokenizer, &prompt, &limits, &mut out)?;
    writeln!(out)?;
    if args.print_ids {
        writeln!(out, "{:?}", outcome.tokens)?;
    }
    let decode_s = outcome.decoding.as_secs_f64();
    eprintln!(
        "{} weights ({:.1} MB) loaded in {load_s:.2} s; prompt {} tokens, first token after \
         {:.1} ms; {} tokens in {decode_s:.2} s ({:.1} tokens/s) on {} threads",
        args.model.display(),
        weight_bytes as f64 / 1e6,
        prompt.len(),
        outcome.first_token.as_secs_f64() * 1e3,
        outcome.tokens.len(),
        outcome.tokens.len() as f64 / decode_s.max(1e-9),
        rayon::current_num_threads()
    );
    Ok(ExitCode::SUCCESS)
}
