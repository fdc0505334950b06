//! Text to token ids and back, from the vocabulary a GGUF file carries.
//!
//! Two kinds of vocabulary, as llama.cpp reads them. In both, control tokens (`<|im_start|>`,
//! `</s>`, …) are cut out of the text first where the caller asks for it (chat markup), so
//! that user text can never forge them otherwise.
//!
//! GPT-2-style byte-level BPE (`tokenizer.ggml.model = "gpt2"`, SmolLM2):
//!
//! 1. The text is split into words by the pre-tokenizer that `tokenizer.ggml.pre` names
//!    (GPT-2's regex; SmolLM2 and StarCoder first isolate every digit).
//! 2. Each word's UTF-8 bytes become GPT-2's printable stand-ins (`Ġ` for a space), and
//!    the merges apply, lowest rank first, leftmost first among equals.
//!
//! A byte the vocabulary has no token for is dropped, as llama.cpp and Hugging Face's
//! tokenizers drop it. Decoding maps the stand-ins back to bytes.
//!
//! SentencePiece-style BPE (`"llama"`: Llama 2, TinyLlama, Mistral), as llama.cpp's
//! `llm_tokenizer_spm` and sentencepiece's BPE models do it:
//!
//! 1. Spaces become `▁` (U+2581), and with `tokenizer.ggml.add_space_prefix` (the default)
//!    a `▁` goes before each piece of text: at the start, and after each control token
//!    cut out (llama.cpp's rule; sentencepiece's `add_dummy_prefix` is the start alone).
//!    No other normalization: Llama's sentencepiece models have the "identity" rule.
//! 2. The text, as characters, merges pairwise: each time the neighbouring pair whose
//!    concatenation is a token with the highest score (`tokenizer.ggml.scores`), leftmost
//!    first among equals.
//! 3. A symbol left that is no token becomes its UTF-8 bytes as byte tokens (`<0xE2>`,
//!    the byte fallback), or the unknown token where the vocabulary has no byte tokens.
//!
//! Decoding turns `▁` back into a space and byte tokens into their bytes, and drops the
//! prefix's space from the first token decoded (llama.cpp's rule: only from `ids[0]`, so
//! not after a leading BOS). A token may end inside a UTF-8 character, so
//! [`Tokenizer::piece`] gives bytes and [`Utf8Stream`] turns a stream of them into text
//! without ever cutting a character.
//!
//! Any other `tokenizer.ggml.model` is an error that names it.

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
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_UNUSED: i64 = 5;
const TYPE_BYTE: i64 = 6;

/// SentencePiece's stand-in for a space.
const SPACE: char = '\u{2581}';

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

/// A BPE tokenizer: byte-level (GPT-2-style) or SentencePiece-style.
#[derive(Debug)]
pub struct Tokenizer {
    /// Token texts, by id, as the vocabulary spells them (byte stand-ins for normal tokens).
    tokens: Vec<String>,
    /// Control or user-defined (and, SentencePiece-style, unknown): matched in raw text,
    /// decoded as their raw text.
    special: Vec<bool>,
    ids: HashMap<String, u32>,
    /// (left, right) → (rank, merged).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens to cut out of text, longest first.
    specials: Vec<(String, u32)>,
    splits: Vec<Regex>,
    /// The token of each byte: its stand-in (byte-level), or its byte token `<0xAB>`
    /// (SentencePiece-style), where the vocabulary has one.
    byte_token: [Option<u32>; 256],
    char_byte: HashMap<char, u8>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    /// A SentencePiece-style vocabulary's own parts; `None` for byte-level BPE (whose
    /// `merges`, `splits` and `char_byte` are empty here).
    spm: Option<Spm>,
}

/// What SentencePiece-style BPE adds to [`Tokenizer`]'s parts.
#[derive(Debug)]
struct Spm {
    /// Each token's merge priority: higher first.
    scores: Vec<f32>,
    /// Whether a merge may make the token: normal, user-defined or unused, as in
    /// sentencepiece (never a control, unknown or byte token spelled out in the text).
    mergeable: Vec<bool>,
    /// The byte a byte token (`<0xAB>`) stands for.
    byte_of: Vec<Option<u8>>,
    unk: Option<u32>,
    add_space_prefix: bool,
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
        match gguf.get_str("tokenizer.ggml.model")? {
            "gpt2" => {}
            "llama" => return Self::new_sentencepiece(SentencePieceVocabulary::from_gguf(gguf)?),
            model => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer.ggml.model = {model:?}: cleave-llm reads \"gpt2\" (byte-level \
                     BPE) and \"llama\" (SentencePiece-style BPE) vocabularies"
                )));
            }
        }
        let pre = match gguf.get_str("tokenizer.ggml.pre") {
            Ok(pre) => pre,
            Err(GgufError::MissingKey { .. }) => "default",
            Err(other) => return Err(other.into()),
        };
        let tokens = strings(gguf.get_array("tokenizer.ggml.tokens")?, "tokens")?;
        let merges = strings(gguf.get_array("tokenizer.ggml.merges")?, "merges")?;
        let types = token_types(gguf, tokens.len())?;
        Self::new(Vocabulary {
            tokens,
            types,
            merges,
            pre: pre.to_string(),
            bos: optional_id(gguf, "tokenizer.ggml.bos_token_id")?,
            eos: optional_id(gguf, "tokenizer.ggml.eos_token_id")?,
            add_bos: flag(gguf, "tokenizer.ggml.add_bos_token", false),
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
        check_sizes(&tokens, &types, [("bos", bos), ("eos", eos)])?;
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
        let ids = token_ids(&tokens);
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
        let specials = specials(&tokens, &special);
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
            spm: None,
        })
    }

    /// A SentencePiece-style tokenizer from its parts.
    ///
    /// # Errors
    ///
    /// As [`Tokenizer::from_gguf`].
    pub fn new_sentencepiece(vocabulary: SentencePieceVocabulary) -> Result<Self, TokenizerError> {
        let SentencePieceVocabulary {
            tokens,
            scores,
            types,
            bos,
            eos,
            unk,
            add_bos,
            add_space_prefix,
        } = vocabulary;
        check_sizes(
            &tokens,
            &types,
            [("bos", bos), ("eos", eos), ("unknown", unk)],
        )?;
        if scores.len() != tokens.len() {
            return Err(TokenizerError::Malformed(format!(
                "{} token scores for {} tokens",
                scores.len(),
                tokens.len()
            )));
        }
        let special: Vec<bool> = types
            .iter()
            .map(|t| matches!(t, Some(TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED)))
            .collect();
        let mergeable = types
            .iter()
            .map(|t| matches!(t, Some(TYPE_NORMAL | TYPE_USER_DEFINED | TYPE_UNUSED)))
            .collect();
        let byte_of = tokens
            .iter()
            .zip(&types)
            .map(|(text, ty)| match ty {
                Some(TYPE_BYTE) => byte_token_value(text).map(Some).ok_or_else(|| {
                    TokenizerError::Malformed(format!("byte token {text:?} is not <0xAB>"))
                }),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ids = token_ids(&tokens);
        let mut byte_token = [None; 256];
        for (id, byte) in (0u32..).zip(&byte_of) {
            if let &Some(b) = byte {
                byte_token[b as usize].get_or_insert(id);
            }
        }
        let specials = specials(&tokens, &special);
        Ok(Self {
            tokens,
            special,
            ids,
            merges: HashMap::new(),
            specials,
            splits: Vec::new(),
            byte_token,
            char_byte: HashMap::new(),
            bos,
            eos,
            add_bos,
            spm: Some(Spm {
                scores,
                mergeable,
                byte_of,
                unk,
                add_space_prefix,
            }),
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
        if let Some(spm) = &self.spm {
            self.encode_sentencepiece(spm, text, out);
            return;
        }
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
    /// equals.
    fn encode_word(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let ids: Vec<u32> = bytes
            .iter()
            .filter_map(|&b| self.byte_token[b as usize])
            .collect();
        out.extend(merge_pairs(ids, |l, r| self.merges.get(&(l, r)).copied()));
    }

    /// SentencePiece-style BPE over a piece of text between control tokens (llama.cpp's
    /// `llm_tokenizer_spm`): the highest-scoring pair merges first, leftmost first among
    /// equals; what is left that is no token falls back to bytes.
    fn encode_sentencepiece(&self, spm: &Spm, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut escaped = String::with_capacity(text.len() + 3 * (1 + text.len() / 4));
        if spm.add_space_prefix {
            escaped.push(SPACE);
        }
        escaped.extend(text.chars().map(|c| if c == ' ' { SPACE } else { c }));
        let piece_id = |piece: &str| {
            self.ids
                .get(piece)
                .copied()
                .filter(|&id| spm.mergeable[id as usize])
        };
        // Symbols are byte ranges of `escaped`; a merge joins two neighbouring ones.
        let chars: Vec<(usize, usize)> = escaped
            .char_indices()
            .map(|(at, c)| (at, at + c.len_utf8()))
            .collect();
        let symbols = merge_pairs(chars, |l, r| {
            let id = piece_id(&escaped[l.0..r.1])?;
            Some((Reverse(score_key(spm.scores[id as usize])), (l.0, r.1)))
        });
        for (start, end) in symbols {
            let piece = &escaped[start..end];
            if let Some(id) = piece_id(piece) {
                out.push(id);
                continue;
            }
            // Only a single character can be no token (a merge always makes one).
            let bytes: Option<Vec<u32>> =
                piece.bytes().map(|b| self.byte_token[b as usize]).collect();
            match bytes {
                Some(bytes) => out.extend(bytes),
                None => out.extend(spm.unk),
            }
        }
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
        if let Some(spm) = &self.spm {
            match spm.byte_of[id as usize] {
                Some(b) => out.push(b),
                None => {
                    for (i, part) in text.split(SPACE).enumerate() {
                        if i > 0 {
                            out.push(b' ');
                        }
                        out.extend(part.as_bytes());
                    }
                }
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

    /// The text of `ids` (invalid UTF-8 replaced by U+FFFD). SentencePiece-style with a
    /// space prefix, the first token loses its leading space (the prefix's), as in
    /// llama.cpp; [`Tokenizer::piece`], for tokens in the middle of a text, never drops it.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        let mut ids = ids.iter();
        if let Some(&first) = ids.next() {
            self.piece(first, skip_special, &mut bytes);
            if self.spm.as_ref().is_some_and(|spm| spm.add_space_prefix)
                && bytes.first() == Some(&b' ')
            {
                bytes.remove(0);
            }
        }
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

/// What a SentencePiece-style tokenizer is made of (what GGUF's `tokenizer.ggml.*` keys
/// hold for `tokenizer.ggml.model = "llama"`).
#[derive(Debug, Clone)]
pub struct SentencePieceVocabulary {
    /// Token texts by id, `▁` (U+2581) for a space, `<0xAB>` for byte tokens.
    pub tokens: Vec<String>,
    /// Merge priority by id: higher first.
    pub scores: Vec<f32>,
    /// GGUF token types by id (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte).
    pub types: Vec<Option<i64>>,
    /// Beginning-of-sequence token.
    pub bos: Option<u32>,
    /// End-of-sequence token.
    pub eos: Option<u32>,
    /// The unknown token: for characters without a token where there are no byte tokens.
    pub unk: Option<u32>,
    /// Whether prompts start with BOS.
    pub add_bos: bool,
    /// Whether a `▁` goes before the text (and after each control token cut out of it).
    pub add_space_prefix: bool,
}

impl SentencePieceVocabulary {
    /// The vocabulary a GGUF file holds, with llama.cpp's defaults for what it leaves out:
    /// scores 0, normal tokens, BOS 1, EOS 2, unknown 0, BOS and space prefix added.
    ///
    /// # Errors
    ///
    /// [`TokenizerError::Gguf`] for missing or mistyped keys; [`TokenizerError::Malformed`]
    /// for scores that are not numbers.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, TokenizerError> {
        let tokens = strings(gguf.get_array("tokenizer.ggml.tokens")?, "tokens")?;
        let scores = match gguf.get_array("tokenizer.ggml.scores") {
            Ok(scores) => scores
                .iter()
                .map(|v| {
                    v.as_f64().map(|s| s as f32).ok_or_else(|| {
                        TokenizerError::Malformed(format!(
                            "tokenizer scores: {} in an array of numbers",
                            v.type_name()
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
            Err(GgufError::MissingKey { .. }) => vec![0.0; tokens.len()],
            Err(other) => return Err(other.into()),
        };
        let types = token_types(gguf, tokens.len())?;
        let id_or = |key: &str, default: u32| -> Result<Option<u32>, GgufError> {
            match gguf.get(key) {
                Ok(_) => optional_id(gguf, key),
                Err(GgufError::MissingKey { .. }) => {
                    Ok(Some(default).filter(|&id| (id as usize) < tokens.len()))
                }
                Err(other) => Err(other),
            }
        };
        Ok(Self {
            bos: id_or("tokenizer.ggml.bos_token_id", 1)?,
            eos: id_or("tokenizer.ggml.eos_token_id", 2)?,
            unk: id_or("tokenizer.ggml.unknown_token_id", 0)?,
            add_bos: flag(gguf, "tokenizer.ggml.add_bos_token", true),
            add_space_prefix: flag(gguf, "tokenizer.ggml.add_space_prefix", true),
            tokens,
            scores,
            types,
        })
    }
}

/// `tokenizer.ggml.token_type`, or every token normal where the file has none.
fn token_types(gguf: &Gguf, count: usize) -> Result<Vec<Option<i64>>, TokenizerError> {
    match gguf.get_array("tokenizer.ggml.token_type") {
        Ok(types) => Ok(types.iter().map(Value::as_i64).collect()),
        Err(GgufError::MissingKey { .. }) => Ok(vec![Some(TYPE_NORMAL); count]),
        Err(other) => Err(other.into()),
    }
}

/// A token id key, `None` where the file lacks it (or it does not fit 32 bits).
fn optional_id(gguf: &Gguf, key: &str) -> Result<Option<u32>, GgufError> {
    match gguf.get_u64(key) {
        Ok(id) => Ok(u32::try_from(id).ok()),
        Err(GgufError::MissingKey { .. }) => Ok(None),
        Err(other) => Err(other),
    }
}

/// A boolean key, `default` where the file lacks it (or has something else there).
fn flag(gguf: &Gguf, key: &str, default: bool) -> bool {
    match gguf.get(key) {
        Ok(Value::Bool(b)) => *b,
        _ => default,
    }
}

/// The number of tokens, once the types match them and each named id is one of them.
fn check_sizes<const N: usize>(
    tokens: &[String],
    types: &[Option<i64>],
    named: [(&str, Option<u32>); N],
) -> Result<u32, TokenizerError> {
    let count = u32::try_from(tokens.len())
        .map_err(|_| TokenizerError::Malformed("more than 2^32 tokens".into()))?;
    if types.len() != tokens.len() {
        return Err(TokenizerError::Malformed(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    for (what, id) in named {
        if id.is_some_and(|id| id >= count) {
            return Err(TokenizerError::Malformed(format!(
                "the {what} token {id:?} is not in the vocabulary of {count}"
            )));
        }
    }
    Ok(count)
}

/// Token ids by text. A repeated text keeps its first id, as llama.cpp's map does.
fn token_ids(tokens: &[String]) -> HashMap<String, u32> {
    let mut ids = HashMap::with_capacity(tokens.len());
    for (id, text) in (0u32..).zip(tokens) {
        ids.entry(text.clone()).or_insert(id);
    }
    ids
}

/// The special tokens to cut out of text, longest first (then by id).
fn specials(tokens: &[String], special: &[bool]) -> Vec<(String, u32)> {
    let mut specials: Vec<(String, u32)> = (0u32..)
        .zip(tokens)
        .filter(|&(id, text)| special[id as usize] && !text.is_empty())
        .map(|(id, text)| (text.clone(), id))
        .collect();
    specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
    specials
}

/// The byte a SentencePiece byte token (`<0xAB>`) stands for.
fn byte_token_value(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A token score as an integer in the same order (IEEE 754 total order, with -0 as 0), so
/// that the merge heap can hold it.
fn score_key(score: f32) -> i32 {
    let bits = (score + 0.0).to_bits().cast_signed();
    // Negative floats order backwards: flip all but the sign bit.
    bits ^ ((bits >> 31) & i32::MAX)
}

/// BPE's merge loop, for both kinds of vocabulary. `pair(left, right)` says what two
/// neighbouring symbols merge into and how urgent that is (smallest first); among equally
/// urgent pairs the leftmost merges first. Candidate pairs wait in a heap and the symbols
/// form a linked list, so n symbols take O(n log n), not the O(n²) of rescanning after
/// every merge: one "word" can be a whole pasted blob with no spaces in it.
fn merge_pairs<S: Copy + Ord, P: Ord>(
    mut symbols: Vec<S>,
    pair: impl Fn(S, S) -> Option<(P, S)>,
) -> impl Iterator<Item = S> {
    let n = symbols.len();
    // Symbol i's neighbours; `n` (next) and `usize::MAX` (previous) mark the ends.
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let mut alive = vec![true; n];
    // (urgency, left symbol's index, left, right, merged), smallest first.
    let mut heap = BinaryHeap::new();
    let candidate = |symbols: &[S], next: &[usize], left: usize| {
        let right = *next.get(left)?;
        let (l, r) = (symbols[left], *symbols.get(right)?);
        let (urgency, merged) = pair(l, r)?;
        Some(Reverse((urgency, left, l, r, merged)))
    };
    heap.extend((0..n).filter_map(|i| candidate(&symbols, &next, i)));
    while let Some(Reverse((_, left, l, r, merged))) = heap.pop() {
        let right = next[left];
        // Stale: a neighbour merged since this pair was seen.
        if !alive[left] || right >= n || symbols[left] != l || symbols[right] != r {
            continue;
        }
        symbols[left] = merged;
        alive[right] = false;
        next[left] = next[right];
        if next[right] < n {
            prev[next[right]] = left;
        }
        if prev[left] != usize::MAX {
            heap.extend(candidate(&symbols, &next, prev[left]));
        }
        heap.extend(candidate(&symbols, &next, left));
    }
    (0..n).filter(move |&i| alive[i]).map(move |i| symbols[i])
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
