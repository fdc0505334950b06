//! What every front end (`run`, the CLI chat, the HTTP API) generates through: a
//! [`Decoder`] that turns one token into the next token's logits, on this node alone
//! ([`LocalDecoder`]) or as the master of a cluster, and [`generate`], the loop that feeds
//! it a prompt, picks tokens, stops, and streams text without cutting a UTF-8 character.
//!
//! Keeping the loop here, apart from the model and the transport, is what lets the cluster
//! be checked against one node: both run the same loop, only the decoder differs.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::model::{Config, KvCache, Model, ModelError};
use crate::tokenizer::{Tokenizer, Utf8Stream};

/// Runs a sequence one token at a time: the single node, or a cluster's master.
pub trait Decoder: Send {
    /// The model's hyperparameters.
    fn config(&self) -> &Config;

    /// Most tokens one sequence may hold (prompt and generated).
    fn capacity(&self) -> usize;

    /// Tokens the current sequence holds.
    fn position(&self) -> usize;

    /// Starts a new, empty sequence.
    ///
    /// # Errors
    ///
    /// A cluster whose nodes cannot be told.
    fn reset(&mut self) -> Result<(), ModelError>;

    /// Runs `token` at the next position; returns the logits of the token after it.
    ///
    /// # Errors
    ///
    /// A token outside the vocabulary, a full sequence, a failed node.
    fn step(&mut self, token: u32) -> Result<Vec<f32>, ModelError>;

    /// Runs every token of `tokens` in order; returns the logits after the last one.
    ///
    /// # Errors
    ///
    /// As [`Decoder::step`]; an empty `tokens`.
    fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let mut logits = None;
        for &token in tokens {
            logits = Some(self.step(token)?);
        }
        logits.ok_or_else(|| ModelError::Unsupported("the prompt is empty".into()))
    }
}

/// The model on this node alone, with its own KV cache.
#[derive(Debug)]
pub struct LocalDecoder {
    model: Model,
    cache: KvCache,
}

impl LocalDecoder {
    /// `model` with room for `capacity` tokens per sequence (at most its context length).
    pub fn new(model: Model, capacity: usize) -> Self {
        let capacity = capacity.min(model.config().context).max(1);
        let cache = model.new_cache(capacity);
        Self { model, cache }
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }
}

impl Decoder for LocalDecoder {
    fn config(&self) -> &Config {
        self.model.config()
    }

    fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    fn position(&self) -> usize {
        self.cache.len()
    }

    fn reset(&mut self) -> Result<(), ModelError> {
        self.cache.clear();
        Ok(())
    }

    fn step(&mut self, token: u32) -> Result<Vec<f32>, ModelError> {
        // The whole token on one of rayon's threads: its products (a few hundred, each tens
        // of microseconds for a small model) then split from inside the pool, where the
        // other threads are still spinning from the last one, instead of each being handed
        // in from outside and waited for (a wake-up and a sleep per product).
        let (model, cache) = (&self.model, &mut self.cache);
        rayon::scope(|_| model.forward(token, cache))
    }
}

/// When a generation stops.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Texts that end the generation when they appear in the output (not included in it).
    pub stop: Vec<String>,
}

/// Why a generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The end-of-sequence token, or a stop text.
    Stop,
    /// `max_tokens`, or the sequence is full.
    Length,
    /// The caller's callback asked to stop (a client that went away).
    Cancelled,
}

impl Finish {
    /// OpenAI's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "cancelled",
        }
    }
}

/// What a generation did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The tokens generated (the end-of-sequence token not included).
    pub tokens: Vec<u32>,
    /// The text, as streamed (without a stop text and what followed it).
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// From the start to the first generated token's logits (the prompt's processing).
    pub first_token: Duration,
    /// From the first generated token's logits to the end.
    pub decoding: Duration,
}

/// Runs `prompt` through `decoder` from an empty sequence, then generates: `pick` chooses
/// each token from the logits, the end-of-sequence token or a stop text ends it, and
/// `on_text` receives the text as it comes (never a stop text, never half a character),
/// returning [`ControlFlow::Break`] to cancel.
///
/// # Errors
///
/// The decoder's errors; a prompt that is empty or longer than the decoder's capacity.
pub fn generate(
    decoder: &mut dyn Decoder,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    limits: &Limits,
    pick: &mut dyn FnMut(&[f32]) -> u32,
    on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
) -> Result<Outcome, ModelError> {
    if prompt.is_empty() {
        return Err(ModelError::Unsupported("the prompt is empty".into()));
    }
    if prompt.len() >= decoder.capacity() {
        return Err(ModelError::Unsupported(format!(
            "the prompt has {} tokens; this server takes at most {} per sequence, prompt and \
             answer together",
            prompt.len(),
            decoder.capacity()
        )));
    }
    decoder.reset()?;
    let started = Instant::now();
    let mut logits = decoder.prefill(prompt)?;
    let first_token = started.elapsed();
    let decoding = Instant::now();
    let mut tokens = Vec::new();
    let mut utf8 = Utf8Stream::default();
    let mut stops = StopFilter::new(&limits.stop);
    let mut finish = Finish::Length;
    let mut bytes = Vec::new();
    while tokens.len() < limits.max_tokens {
        let next = pick(&logits);
        if Some(next) == tokenizer.eos() {
            finish = Finish::Stop;
            break;
        }
        tokens.push(next);
        bytes.clear();
        tokenizer.piece(next, true, &mut bytes);
        let (ready, stopped) = stops.push(&utf8.push(&bytes));
        if !ready.is_empty() && on_text(&ready).is_break() {
            finish = Finish::Cancelled;
            break;
        }
        if stopped {
            finish = Finish::Stop;
            break;
        }
        if tokens.len() == limits.max_tokens || decoder.position() >= decoder.capacity() {
            break;
        }
        logits = decoder.step(next)?;
    }
    if finish != Finish::Stop || !stops.stopped() {
        let rest = stops.finish(&utf8.finish());
        if !rest.is_empty() && finish != Finish::Cancelled {
            let _ = on_text(&rest);
        }
    }
    Ok(Outcome {
        text: stops.emitted,
        tokens,
        finish,
        prompt_tokens: prompt.len(),
        first_token,
        decoding: decoding.elapsed(),
    })
}

/// Holds back the end of the text that could still become a stop text, so that a stop text
/// split across tokens never reaches the caller.
#[derive(Debug)]
struct StopFilter {
    stops: Vec<String>,
    held: String,
    emitted: String,
    stopped: bool,
}

impl StopFilter {
    fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            emitted: String::new(),
            stopped: false,
        }
    }

    fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds `text`; returns what may be shown now, and whether a stop text appeared.
    fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let ready = self.held[..at].to_string();
            self.held.clear();
            self.emitted.push_str(&ready);
            self.stopped = true;
            return (ready, true);
        }
        // Keep the longest tail of `held` that is a prefix of some stop text.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let ready: String = self.held.drain(..cut).collect();
        self.emitted.push_str(&ready);
        (ready, false)
    }

    /// Adds `text` and lets out everything held: the generation is over.
    fn finish(&mut self, text: &str) -> String {
        let (mut ready, stopped) = self.push(text);
        if !stopped {
            ready.push_str(&self.held);
            self.emitted.push_str(&self.held);
            self.held.clear();
        }
        ready
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`, cut at a
/// character boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let most = text.len().min(stop.len().saturating_sub(1));
    (1..=most)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && stop.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn filtered(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut filter = StopFilter::new(&stops);
        let mut out = Vec::new();
        let mut stopped = false;
        for piece in pieces {
            let (ready, s) = filter.push(piece);
            out.push(ready);
            if s {
                stopped = true;
                break;
            }
        }
        if !stopped {
            out.push(filter.finish(""));
        }
        (out, stopped, filter.emitted)
    }

    #[test]
    fn a_stop_text_split_across_pieces_is_never_shown() {
        let (out, stopped, all) = filtered(&["\nUser:"], &["Hello", "\nUs", "er:", " more"]);
        assert!(stopped);
        assert_eq!(all, "Hello");
        assert_eq!(out, ["Hello", "", ""]);
    }

    #[test]
    fn a_false_start_is_let_out_once_it_cannot_be_a_stop() {
        let (out, stopped, all) = filtered(&["STOP"], &["a S", "T", "x", "b"]);
        assert!(!stopped);
        assert_eq!(all, "a STxb");
        assert_eq!(out.concat(), "a STxb");
        assert_eq!(out[0], "a ");
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_not_cut() {
        let (_, stopped, all) = filtered(&["é!", "b"], &["ééé", "!b"]);
        assert!(stopped);
        assert_eq!(all, "éé");
        assert_eq!(longest_suffix_prefix("xé", "éz"), 2);
        assert_eq!(longest_suffix_prefix("x", ""), 0);
    }

    #[test]
    fn without_stops_everything_passes_at_once() {
        let (out, stopped, all) = filtered(&[], &["a", "b"]);
        assert!(!stopped);
        assert_eq!(out, ["a", "b", ""]);
        assert_eq!(all, "ab");
    }
}
