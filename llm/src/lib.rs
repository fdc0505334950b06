//! cleave-llm: a language model served tensor-parallel across weak edge nodes (TPI-LLM
//! style), read straight from GGUF.
//!
//! # Brief overview
//!
//! - [`gguf`] opens a GGUF file (versions 2 and 3): its metadata, its tensor directory, and
//!   the bytes of any tensor or row slice of one, read on demand so that a node can load
//!   only its shard, and a window of layers at a time. [`gguf::writer`] writes GGUF: the
//!   tests' synthetic models, and shard files.
//! - [`quant`] knows ggml's tensor types (F32, F16, Q4_0, Q4_1, Q8_0): their block layout,
//!   dequantization, and ggml's reference quantizers.
//! - [`tokenizer`] turns text into token ids and back with the vocabulary the file carries
//!   (byte-level BPE or SentencePiece-style merges, as llama.cpp does them), and streams
//!   decoded text without cutting a UTF-8 character.
//!
//! - [`chat`] renders a conversation with the Jinja chat template the file carries.
//! - [`matmul`] multiplies quantized weights by activation vectors; [`model`] is the llama
//!   decoder, its KV cache kept apart, with all layers in memory or a sliding window of
//!   them ([`model::Model::load_windowed`]).
//! - [`shard`] plans which heads and FFN slice each node of a cluster computes;
//!   [`wire`] is the frame format between nodes and [`collective`] the star and
//!   all-to-all all-reduces over TCP; [`shard_file`] cuts a worker's part of the model into
//!   a GGUF of its own, and [`cluster`] is the worker and master processes' protocol.
//!
//! - [`engine`] is the generation loop every front end shares, over a [`engine::Decoder`]:
//!   this node alone, or the master of a [`cluster`]; [`sampling`] chooses each token
//!   (greedy, or seeded temperature / top-p / top-k draws).
//! - [`api`] is the OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/completions`,
//!   `/v1/models`, `/health`) that `cleave-llm master` serves, with the decoder on a
//!   thread of its own behind a bounded queue.
//!
//! This crate knows nothing of the vision path, and shares only `proto` with the rest of
//! the workspace.
//!
//! ```no_run
//! use cleave_llm::gguf::Gguf;
//!
//! let model = Gguf::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let layers = model.get_u64("llama.block_count")?;
//! let norm = model.read_f32("output_norm.weight")?;
//! println!("{layers} layers; the final norm has {} weights", norm.len());
//! # Ok::<(), cleave_llm::gguf::GgufError>(())
//! ```

pub mod api;
pub mod chat;
pub mod cluster;
pub mod collective;
pub mod engine;
pub mod gguf;
pub mod matmul;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod shard;
pub mod shard_file;
pub mod tokenizer;
mod window;
pub mod wire;

#[cfg(test)]
mod test_model;
