//! `cleave-llm`: the command line of the tensor-parallel LLM runtime.
//!
//! For now it inspects GGUF files: what a node would load, and whether cleave-llm can.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cleave_llm::gguf::{Gguf, Value};

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
