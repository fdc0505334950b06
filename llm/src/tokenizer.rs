//! Text to token ids and back, from the vocabulary a GGUF file carries.
//!
//! GPT-2-style byte-level BPE (`tokenizer.ggml.model = "gpt2"`), as llama.cpp does it:
//!
//! 1. Control tokens (`<|im_start|>`, …) are cut out of the text first, where the caller
//!    asks for it (chat markup), so that user text can never forge them otherwise.
//! 2. The rest is split into words by the pre-tokenizer that `tokenizer.ggml.pre` names
//!    (GPT-2's regex; SmolLM2 and StarCoder first isolate every digit).
//! 3. Each word's UTF-8 bytes become GPT-2's printable stand-ins (`Ġ` for a space), and
//!    the merges apply, lowest rank first, leftmost first among equals.
//!
//! A byte the vocabulary has no token for is dropped, as llama.cpp and Hugging Face's
//! tokenizers drop it. Decoding maps the stand-ins back to bytes. A token may end inside a UTF-8 character, so
//! [`Tokenizer::piece`] gives bytes and [`Utf8Stream`] turns a stream of them into text
//! without ever cutting a character.
//!
//! SentencePiece-style vocabularies (`"llama"`) are not read yet: opening one is an error
//! that says so.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use fancy_regex::Regex;

use crate::gguf::{Gguf, GgufError, Value};

/// GPT-2's word split (as Hugging Face's byte-level pre-tokenizer has it).
const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Every digit alone, before GPT-2's split (`smollm`, `starcoder` and kin in llama.cpp).
const DIGITS_ALONE: &str = r"\p{N}";

/// GGUF's token types (`tokenizer.ggml.token_type`).
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// Why a tokenizer could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The file's metadata lacks or mistypes a key.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A vocabulary or pre-tokenizer this crate does not implement.
    #[error("{0}")]
    Unsupported(String),
    /// The vocabulary contradicts itself.
    #[error("malformed vocabulary: {0}")]
    Malformed(String),
}

/// A byte-level BPE tokenizer.
#[derive(Debug)]
pub struct Tokenizer {
    /// Token texts, by id, as the vocabulary spells them (byte stand-ins for normal tokens).
    tokens: Vec<String>,
    /// Control or user-defined: matched in raw text, decoded as their raw text.
    special: Vec<bool>,
    ids: HashMap<String, u32>,
    /// (left, right) → (rank, merged).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens to cut out of text, longest first.
    specials: Vec<(String, u32)>,
    splits: Vec<Regex>,
    /// The token of each byte's stand-in, where the vocabulary has one.
    byte_token: [Option<u32>; 256],
    char_byte: HashMap<char, u8>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
}

impl Tokenizer {
    /// The tokenizer a GGUF file describes.
    ///
    /// # Errors
    ///
    /// [`TokenizerError::Unsupported`] for a vocabulary type or pre-tokenizer not
    /// implemented here (named); [`TokenizerError::Gguf`] for missing keys;
    /// [`TokenizerError::Malformed`] for a vocabulary that contradicts itself.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, TokenizerError> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::Unsupported(format!(
                "tokenizer.ggml.model = {model:?}: cleave-llm reads \"gpt2\" (byte-level BPE) \
                 vocabularies; SentencePiece-style \"llama\" ones are not implemented yet"
            )));
        }
        let pre = match gguf.get_str("tokenizer.ggml.pre") {
            Ok(pre) => pre,
            Err(GgufError::MissingKey { .. }) => "default",
            Err(other) => return Err(other.into()),
        };
        let tokens = strings(gguf.get_array("tokenizer.ggml.tokens")?, "tokens")?;
        let merges = strings(gguf.get_array("tokenizer.ggml.merges")?, "merges")?;
        let types = match gguf.get_array("tokenizer.ggml.token_type") {
            Ok(types) => types.iter().map(Value::as_i64).collect(),
            Err(GgufError::MissingKey { .. }) => vec![Some(1); tokens.len()],
            Err(other) => return Err(other.into()),
        };
        let optional_id = |key: &str| match gguf.get_u64(key) {
            Ok(id) => Ok(u32::try_from(id).ok()),
            Err(GgufError::MissingKey { .. }) => Ok(None),
            Err(other) => Err(other),
        };
        let add_bos = match gguf.get("tokenizer.ggml.add_bos_token") {
            Ok(Value::Bool(b)) => *b,
            _ => false,
        };
        Self::new(Vocabulary {
            tokens,
            types,
            merges,
            pre: pre.to_string(),
            bos: optional_id("tokenizer.ggml.bos_token_id")?,
            eos: optional_id("tokenizer.ggml.eos_token_id")?,
            add_bos,
        })
    }

    /// A tokenizer from its parts.
    ///
    /// # Errors
    ///
    /// As [`Tokenizer::from_gguf`].
    pub fn new(vocabulary: Vocabulary) -> Result<Self, TokenizerError> {
        let Vocabulary {
            tokens,
            types,
            merges,
            pre,
            bos,
            eos,
            add_bos,
        } = vocabulary;
        let count = u32::try_from(tokens.len())
            .map_err(|_| TokenizerError::Malformed("more than 2^32 tokens".into()))?;
        if types.len() != tokens.len() {
            return Err(TokenizerError::Malformed(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        for (what, id) in [("bos", bos), ("eos", eos)] {
            if id.is_some_and(|id| id >= count) {
                return Err(TokenizerError::Malformed(format!(
                    "the {what} token {id:?} is not in the vocabulary of {count}"
                )));
            }
        }
        let splits = match pre.as_str() {
            "default" | "gpt2" | "gpt-2" | "mpt" | "olmo" => vec![GPT2_SPLIT],
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => vec![DIGITS_ALONE, GPT2_SPLIT],
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer.ggml.pre = {other:?}: cleave-llm knows the \"gpt2\" and \
                     \"smollm\" (digits apart) pre-tokenizers"
                )));
            }
        };
        let splits = splits
            .into_iter()
            .map(Regex::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TokenizerError::Malformed(e.to_string()))?;
        let special: Vec<bool> = types
            .iter()
            .map(|t| matches!(t, Some(TYPE_CONTROL | TYPE_USER_DEFINED)))
            .collect();
        let mut ids = HashMap::with_capacity(tokens.len());
        for (id, text) in (0..count).zip(&tokens) {
            // A repeated text keeps its first id, as llama.cpp's map does.
            ids.entry(text.clone()).or_insert(id);
        }
        let (byte_char, char_byte) = byte_stand_ins();
        // A vocabulary may lack a few bytes (SmolLM2's has no token for most ASCII
        // control characters); such bytes are dropped, as llama.cpp and Hugging Face's
        // tokenizers drop them. One without most of them is not byte-level at all.
        let byte_token = byte_char.map(|c| ids.get(&c.to_string()).copied());
        let present = byte_token.iter().flatten().count();
        if present < 192 {
            return Err(TokenizerError::Malformed(format!(
                "only {present} of the 256 byte stand-ins are tokens: not a byte-level \
                 vocabulary"
            )));
        }
        let mut merge_ids = HashMap::with_capacity(merges.len());
        for (rank, merge) in (0u32..).zip(&merges) {
            let Some((left, right)) = merge.split_once(' ') else {
                return Err(TokenizerError::Malformed(format!(
                    "merge {rank} ({merge:?}) is not two tokens"
                )));
            };
            let found = (
                ids.get(left),
                ids.get(right),
                ids.get(&format!("{left}{right}")),
            );
            if let (Some(&l), Some(&r), Some(&merged)) = found {
                merge_ids.entry((l, r)).or_insert((rank, merged));
            }
        }
        let mut specials: Vec<(String, u32)> = (0..count)
            .zip(&tokens)
            .filter(|&(id, text)| special[id as usize] && !text.is_empty())
            .map(|(id, text)| (text.clone(), id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(Self {
            tokens,
            special,
            ids,
            merges: merge_ids,
            specials,
            splits,
            byte_token,
            char_byte,
            bos,
            eos,
            add_bos,
        })
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The beginning-of-sequence token, if the vocabulary has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the vocabulary has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether prompts start with the BOS token (`tokenizer.ggml.add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// How the vocabulary spells token `id` (a control token's name, say).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a token spelled exactly `text` (a control token's name, say).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Token ids of `text`. With `parse_special`, control tokens written in the text
    /// (`<|im_start|>`) become their ids; without, they are tokenized as plain text, which
    /// is what untrusted user text wants.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut rest = text;
        while !rest.is_empty() {
            let found = if parse_special {
                self.next_special(rest)
            } else {
                None
            };
            let (plain, special) = match found {
                Some((at, len, id)) => (&rest[..at], Some((len, id))),
                None => (rest, None),
            };
            self.encode_plain(plain, &mut out);
            match special {
                Some((len, id)) => {
                    out.push(id);
                    rest = &rest[plain.len() + len..];
                }
                None => rest = "",
            }
        }
        out
    }

    /// The leftmost special token in `text` (longest there), as (byte offset, length, id).
    fn next_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        let mut best: Option<(usize, usize, u32)> = None;
        for (special, id) in &self.specials {
            if let Some(at) = text.find(special.as_str()) {
                // Longest first in `specials`, so a tie in position keeps the longest.
                if best.is_none_or(|(b, _, _)| at < b) {
                    best = Some((at, special.len(), *id));
                }
            }
        }
        best
    }

    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        let mut pieces = vec![text];
        for split in &self.splits {
            pieces = pieces
                .into_iter()
                .flat_map(|piece| split_isolated(split, piece))
                .collect();
        }
        for piece in pieces {
            self.encode_word(piece.as_bytes(), out);
        }
    }

    /// BPE over one word's bytes: the merges apply lowest rank first, leftmost first among
    /// equals. Candidate pairs wait in a heap and the symbols form a linked list, so a word
    /// of n bytes takes O(n log n), not the O(n²) of rescanning after every merge: one
    /// "word" can be a whole pasted blob with no spaces in it.
    fn encode_word(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = bytes
            .iter()
            .filter_map(|&b| self.byte_token[b as usize])
            .collect();
        let n = ids.len();
        // Symbol i's neighbours; `n` (next) and `usize::MAX` (previous) mark the ends.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        // (rank, left symbol's index, left id, right id, merged id), smallest first.
        let mut heap = BinaryHeap::new();
        let candidate = |ids: &[u32], next: &[usize], left: usize| {
            let right = *next.get(left)?;
            let pair = (ids[left], *ids.get(right)?);
            let &(rank, merged) = self.merges.get(&pair)?;
            Some(Reverse((rank, left, pair.0, pair.1, merged)))
        };
        heap.extend((0..n).filter_map(|i| candidate(&ids, &next, i)));
        while let Some(Reverse((_, left, l, r, merged))) = heap.pop() {
            let right = next[left];
            // Stale: a neighbour merged since this pair was seen.
            if !alive[left] || right >= n || ids[left] != l || ids[right] != r {
                continue;
            }
            ids[left] = merged;
            alive[right] = false;
            next[left] = next[right];
            if next[right] < n {
                prev[next[right]] = left;
            }
            if prev[left] != usize::MAX {
                heap.extend(candidate(&ids, &next, prev[left]));
            }
            heap.extend(candidate(&ids, &next, left));
        }
        out.extend((0..n).filter(|&i| alive[i]).map(|i| ids[i]));
    }

    /// The bytes `id` stands for, appended to `out`; nothing for an unknown id. A special
    /// token gives its raw text unless `skip_special`, then nothing.
    pub fn piece(&self, id: u32, skip_special: bool, out: &mut Vec<u8>) {
        let Some(text) = self.tokens.get(id as usize) else {
            return;
        };
        if self.special[id as usize] {
            if !skip_special {
                out.extend(text.as_bytes());
            }
            return;
        }
        for c in text.chars() {
            match self.char_byte.get(&c) {
                Some(&b) => out.push(b),
                // Not a byte stand-in: the vocabulary spelled it raw.
                None => out.extend(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
    }

    /// The text of `ids` (invalid UTF-8 replaced by U+FFFD).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            self.piece(id, skip_special, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// What a tokenizer is made of (what GGUF's `tokenizer.ggml.*` keys hold).
#[derive(Debug, Clone)]
pub struct Vocabulary {
    /// Token texts by id.
    pub tokens: Vec<String>,
    /// GGUF token types by id (1 normal, 3 control, 4 user-defined, …).
    pub types: Vec<Option<i64>>,
    /// Merges, `"left right"`, highest priority first.
    pub merges: Vec<String>,
    /// The pre-tokenizer's name (`tokenizer.ggml.pre`).
    pub pre: String,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// Whether prompts start with BOS.
    pub add_bos: bool,
}

fn strings(values: &[Value], what: &str) -> Result<Vec<String>, TokenizerError> {
    values
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(TokenizerError::Malformed(format!(
                "tokenizer {what}: {} in an array of strings",
                other.type_name()
            ))),
        })
        .collect()
}

/// `text` cut at every match of `regex`, matches and the text between them alike (the
/// "isolated" split of Hugging Face's tokenizers and llama.cpp's regex split).
fn split_isolated<'t>(regex: &Regex, text: &'t str) -> Vec<&'t str> {
    let mut pieces = Vec::new();
    let mut last = 0;
    for found in regex.find_iter(text) {
        // A regex that fails to run (backtracking limit) leaves the rest as one piece.
        let Ok(found) = found else {
            break;
        };
        if found.start() > last {
            pieces.push(&text[last..found.start()]);
        }
        if found.end() > found.start() {
            pieces.push(found.as_str());
        }
        last = found.end();
    }
    if last < text.len() {
        pieces.push(&text[last..]);
    }
    pieces
}

/// GPT-2's printable stand-ins for bytes: printable Latin-1 stands for itself, the other
/// bytes take the code points from U+0100 up, in byte order.
fn byte_stand_ins() -> ([char; 256], HashMap<char, u8>) {
    let mut byte_char = ['\0'; 256];
    let mut next = 0x100u32;
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        byte_char[byte as usize] = if printable {
            char::from(byte)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    let char_byte = (0..=255u8).map(|b| (byte_char[b as usize], b)).collect();
    (byte_char, char_byte)
}

/// Turns token bytes into text as they come, holding back an incomplete UTF-8 character
/// until its last byte arrives (for streaming answers token by token).
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Takes `bytes`; returns the text now complete. Invalid sequences become U+FFFD.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(valid) => {
                    text.push_str(valid);
                    self.pending.clear();
                    return text;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    text.push_str(&String::from_utf8_lossy(&self.pending[..good]));
                    match e.error_len() {
                        // Incomplete at the end: wait for more.
                        None => {
                            self.pending.drain(..good);
                            return text;
                        }
                        Some(bad) => {
                            text.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
    }

    /// What is left at the end of the stream (U+FFFD if a character was cut off).
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests;
