//! Asymmetric numeral systems: symbols in, bytes out, at the prior's information bound.
//!
//! The coder is constriction's `DefaultAnsCoder` (64-bit state, 32-bit words) with the
//! 16-bit tables of a [`Prior`]. ANS is a stack, so the encoder pushes in reverse and the
//! decoder pops in order. It was chosen over constriction's range coder by measurement
//! (`codec/benches/codec.rs`, figures in `docs/codec-performance.md`): on the bundled model's
//! full frames both land within 0.1 % of the bound; the range coder encodes a frame faster
//! (50 vs 71 µs) and ANS decodes it faster (206 vs 252 µs), so ANS is cheaper in total and
//! cheaper for the tail, which decodes every device's frames. Against a head model of about
//! 100 ms either is noise on the device.
//!
//! Escaped values (learned priors only) follow CompressAI's scheme exactly: the escape index,
//! then the number of 4-bit digits as a run of 15s plus a remainder, then the zigzag value's
//! digits, least significant first. The bytes differ from CompressAI's own (ryg's rANS keeps
//! its state in `[2^31, 2^63)`, constriction in `[2^32, 2^64)`, and they flush differently),
//! but the symbols and their order are the same.
//!
//! The payload is the coder's `u32` words, little-endian; the coder starts from the state 2^32
//! (which costs 4 bytes a frame) so that every symbol costs bits. Decoding hostile bytes is
//! bounded: a payload too short to hold the declared symbols at the prior's cheapest cost is
//! refused before decoding, exactly the expected number of symbols is decoded, an escape may
//! carry at most eight digits, and the words must be used up and the state back at 2^32.

use constriction::CoderError;
use constriction::stream::model::UniformModel;
use constriction::stream::stack::DefaultAnsCoder;
use constriction::stream::{Decode, Encode};

use crate::prior::{BYPASS_BITS, Lookup, PRECISION, Prior, bypass_digits};

/// Largest bypass value; a run of these continues the digit count (CompressAI's
/// `max_bypass_val`).
const MAX_BYPASS: u32 = (1 << BYPASS_BITS) - 1;
/// Most digits an escaped value may have: 32 bits of zigzag value.
const MAX_DIGITS: u32 = 32 / BYPASS_BITS;
/// The coder's state before the first symbol and after the last one decoded. Starting at
/// 2^32 (the least state a non-empty coder may hold) makes every symbol pay for itself:
/// from a zero state, symbols at the bottom of a table would code into nothing, so an empty
/// payload would stand for any number of them. Decoding must end exactly here.
const INITIAL_STATE: u64 = 1 << 32;

/// Why symbols could not be coded, or bytes decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AnsError {
    /// A symbol the prior gives no probability (outside a table without escape).
    #[error("symbol {symbol} at element {index} is outside channel {channel}'s table")]
    ImpossibleSymbol {
        /// Row-major element index.
        index: usize,
        /// Channel of the element.
        channel: usize,
        /// The symbol.
        symbol: i32,
    },
    /// The tensor's element count is not a multiple of the prior's channel count.
    #[error("{elements} elements do not split into {channels} channels")]
    Channels {
        /// Elements in the tensor.
        elements: usize,
        /// Channels in the prior.
        channels: usize,
    },
    /// The payload is not a whole number of 32-bit words, or ends in a zero word.
    #[error("payload of {0} bytes is not a sequence of ANS words")]
    BadWords(usize),
    /// The payload is too short to hold the declared symbols under the prior.
    #[error("{elements} symbols need at least {needed_bits:.0} bits, the payload has {bits}")]
    TooShort {
        /// Symbols declared.
        elements: usize,
        /// Bits the cheapest such symbols would need.
        needed_bits: f64,
        /// Bits in the payload (with the coder's state).
        bits: usize,
    },
    /// An escape needs (or, when decoding, claims) more digits than a 32-bit value has.
    #[error("element {index}: escape with {digits} digits (at most {MAX_DIGITS})")]
    BadEscape {
        /// Row-major element index.
        index: usize,
        /// Digits claimed.
        digits: u32,
    },
    /// Words are left after the last symbol, or the coder does not end in its initial state:
    /// the payload is not what the header says.
    #[error("payload does not end after {0} symbols")]
    TrailingData(usize),
}

/// The bypass model: a uniform 4-bit digit.
fn bypass_model() -> UniformModel<u32, PRECISION> {
    UniformModel::new(1 << BYPASS_BITS)
}

fn group_len(prior: &Prior, elements: usize) -> Result<usize, AnsError> {
    let channels = prior.channels();
    if elements == 0 || !elements.is_multiple_of(channels) {
        return Err(AnsError::Channels { elements, channels });
    }
    Ok(elements / channels)
}

/// Codes `symbols` (row-major, channel-major) under `prior`.
///
/// # Errors
///
/// [`AnsError::ImpossibleSymbol`] for a symbol outside a table without escape, and
/// [`AnsError::Channels`] if the symbols do not split into the prior's channels.
pub fn encode(prior: &Prior, symbols: &[i32]) -> Result<Vec<u8>, AnsError> {
    let group_len = group_len(prior, symbols.len())?;
    let bypass = bypass_model();
    // One pass collects what to code in decoding order, escapes expanded, so that it can be
    // pushed onto the stack in reverse. `u16::MAX` marks a bypass digit.
    const BYPASS: u16 = u16::MAX;
    let mut items: Vec<(u32, u16)> = Vec::with_capacity(symbols.len());
    for (c, (group, channel)) in symbols.chunks(group_len).zip(&prior.channels).enumerate() {
        for (i, &symbol) in group.iter().enumerate() {
            match channel.table_index(symbol) {
                Lookup::Direct(index) => items.push((index, c as u16)),
                Lookup::Escaped(raw) => {
                    let digits = bypass_digits(raw);
                    if digits > MAX_DIGITS {
                        return Err(AnsError::BadEscape {
                            index: c * group_len + i,
                            digits,
                        });
                    }
                    items.push((channel.escape_index(), c as u16));
                    let mut count = digits;
                    while count >= MAX_BYPASS {
                        items.push((MAX_BYPASS, BYPASS));
                        count -= MAX_BYPASS;
                    }
                    items.push((count, BYPASS));
                    for d in 0..digits {
                        let digit = (raw >> (d * BYPASS_BITS)) & u64::from(MAX_BYPASS);
                        items.push((digit as u32, BYPASS));
                    }
                }
                Lookup::Impossible => {
                    return Err(AnsError::ImpossibleSymbol {
                        index: c * group_len + i,
                        channel: c,
                        symbol,
                    });
                }
            }
        }
    }
    let mut coder = DefaultAnsCoder::from_raw_parts(Vec::new(), INITIAL_STATE);
    for &(value, model) in items.iter().rev() {
        let coded = if model == BYPASS {
            coder.encode_symbol(value as usize, bypass)
        } else {
            coder.encode_symbol(value as usize, &prior.channels[usize::from(model)].model)
        };
        // Every value was checked against its table above, so the coder cannot refuse it.
        coded.map_err(|_| AnsError::ImpossibleSymbol {
            index: 0,
            channel: usize::from(model),
            symbol: value as i32,
        })?;
    }
    let words = coder
        .into_compressed()
        .unwrap_or_else(|never| match never {});
    Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
}

/// Decodes exactly `elements` symbols from `payload` under `prior`.
///
/// The caller bounds `elements` (the frame's limits) before calling; nothing here allocates
/// more than `elements` symbols and the payload's words.
///
/// # Errors
///
/// [`AnsError`] if the payload is not ANS words, an escape is malformed, or words are left
/// over.
pub fn decode(prior: &Prior, payload: &[u8], elements: usize) -> Result<Vec<i32>, AnsError> {
    let group_len = group_len(prior, elements)?;
    if payload.is_empty() || !payload.len().is_multiple_of(4) {
        return Err(AnsError::BadWords(payload.len()));
    }
    // The state holds up to 64 bits beyond the payload's words; the rest must be paid for.
    let needed_bits: f64 = prior
        .channels
        .iter()
        .map(|c| c.min_cost * group_len as f64)
        .sum();
    let bits = 8 * payload.len();
    if needed_bits > (bits + 64) as f64 {
        return Err(AnsError::TooShort {
            elements,
            needed_bits,
            bits,
        });
    }
    let words: Vec<u32> = payload
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect();
    let mut coder =
        DefaultAnsCoder::from_compressed(words).map_err(|_| AnsError::BadWords(payload.len()))?;
    let bypass = bypass_model();
    let mut symbols = Vec::with_capacity(elements);
    for channel in &prior.channels {
        let lookup = channel.lookup();
        for _ in 0..group_len {
            let index = symbols.len();
            let value = match coder.decode_symbol(lookup) {
                Ok(symbol) => symbol as u32,
                Err(CoderError::Frontend(never)) => match never {},
                Err(CoderError::Backend(never)) => match never {},
            };
            if !channel.escape || value != channel.escape_index() {
                symbols.push(channel.offset + value as i32);
                continue;
            }
            let mut digits = 0;
            loop {
                let run = decode_one(&mut coder, bypass)?;
                digits += run;
                if digits > MAX_DIGITS {
                    return Err(AnsError::BadEscape { index, digits });
                }
                if run != MAX_BYPASS {
                    break;
                }
            }
            let mut raw: u64 = 0;
            for d in 0..digits {
                raw |= u64::from(decode_one(&mut coder, bypass)?) << (d * BYPASS_BITS);
            }
            let max_value = i64::from(channel.escape_index());
            let value = if raw & 1 == 1 {
                -((raw >> 1) as i64) - 1
            } else {
                (raw >> 1) as i64 + max_value
            };
            let symbol = value + i64::from(channel.offset);
            let symbol =
                i32::try_from(symbol).map_err(|_| AnsError::BadEscape { index, digits })?;
            symbols.push(symbol);
        }
    }
    let (rest, state) = coder.into_raw_parts();
    if !rest.is_empty() || state != INITIAL_STATE {
        return Err(AnsError::TrailingData(elements));
    }
    Ok(symbols)
}

/// Pops one table index; the coder's word source is a `Vec`, which cannot fail.
fn decode_one<M>(coder: &mut DefaultAnsCoder, model: M) -> Result<u32, AnsError>
where
    M: constriction::stream::model::DecoderModel<PRECISION, Symbol = usize, Probability = u32>,
{
    match coder.decode_symbol(model) {
        Ok(symbol) => Ok(symbol as u32),
        Err(CoderError::Frontend(never)) => match never {},
        Err(CoderError::Backend(never)) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn skewed(len: usize) -> Vec<u32> {
        // Geometric-ish, every entry positive, summing to 2^16.
        let mut pmf: Vec<u32> = (0..len).map(|i| (1u32 << 15) >> i.min(14)).collect();
        let rest = (1u32 << PRECISION) - pmf.iter().sum::<u32>();
        pmf[0] += rest;
        pmf
    }

    fn learned() -> Prior {
        let cdf = |len: usize| -> Vec<u32> {
            let mut cdf = vec![0];
            for p in skewed(len) {
                cdf.push(cdf.last().unwrap() + p);
            }
            cdf
        };
        Prior::from_compressai_cdfs(&[cdf(6), cdf(9)], &[-2, -4]).unwrap()
    }

    #[test]
    fn payload_reaches_the_information_bound() {
        let prior = Prior::from_pmfs(&[skewed(16), skewed(16)]).unwrap();
        let symbols: Vec<i32> = (0..20_000).map(|i| (i * 7919) % 97 % 5).collect();
        let bytes = encode(&prior, &symbols).unwrap();
        let bound = prior.information_bits(&symbols) / 8.0;
        assert!(
            (bytes.len() as f64) < bound * 1.01 + 8.0,
            "{} bytes vs bound {bound}",
            bytes.len()
        );
        assert_eq!(decode(&prior, &bytes, symbols.len()).unwrap(), symbols);
    }

    #[test]
    fn symbols_at_the_bottom_of_a_table_still_cost_bits() {
        // Index 0 has probability 1/2: 1 000 of them are 1 000 bits, not an empty payload.
        let prior = Prior::from_pmfs(&[skewed(16)]).unwrap();
        let symbols = vec![0; 1000];
        let bytes = encode(&prior, &symbols).unwrap();
        let bound = prior.information_bits(&symbols) / 8.0;
        assert!(
            bytes.len() as f64 >= bound,
            "{} bytes, bound {bound}",
            bytes.len()
        );
        assert_eq!(decode(&prior, &bytes, 1000).unwrap(), symbols);
        // ... and the same payload does not also stand for 1 001 of them.
        assert!(decode(&prior, &bytes, 1001).is_err());
    }

    #[test]
    fn escapes_round_trip_at_the_extremes() {
        let prior = learned();
        let symbols = vec![
            0,
            -2,
            2,
            3,
            4,
            -3,
            1 << 30,
            -(1 << 30),
            i32::MAX >> 1,
            7,
            -4,
            4,
            5,
            -5,
            100,
            -100,
        ];
        let bytes = encode(&prior, &symbols).unwrap();
        assert_eq!(decode(&prior, &bytes, symbols.len()).unwrap(), symbols);
    }

    #[test]
    fn hostile_payloads_are_errors() {
        let prior = learned();
        let bytes = encode(&prior, &[0, 1, 2, 3]).unwrap();
        assert_eq!(
            decode(&prior, &bytes[1..], 4),
            Err(AnsError::BadWords(bytes.len() - 1))
        );
        assert!(decode(&prior, &[0, 0, 0, 0], 4).is_err());
        // An empty payload would decode to any number of symbols; it is refused.
        assert_eq!(decode(&prior, &[], 2), Err(AnsError::BadWords(0)));
        // So is one too short for what it claims (at least 1 bit per symbol here).
        assert!(matches!(
            decode(&prior, &bytes, 2_000_000),
            Err(AnsError::TooShort { .. })
        ));
        let mut longer = bytes.clone();
        longer.splice(0..0, [1, 2, 3, 4]);
        assert!(decode(&prior, &longer, 4).is_err());
        assert!(matches!(
            decode(&prior, &bytes, 3),
            Err(AnsError::Channels { .. })
        ));
        // A table without escape refuses what it cannot code.
        let fixed = Prior::from_pmfs(&[skewed(4)]).unwrap();
        assert!(matches!(
            encode(&fixed, &[1, 4]),
            Err(AnsError::ImpossibleSymbol {
                index: 1,
                symbol: 4,
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn any_payload_decodes_or_fails_without_panic(
            words in proptest::collection::vec(any::<u8>(), 0..256),
            elements in 1usize..64,
        ) {
            let prior = learned();
            let _ = decode(&prior, &words, elements * 2);
        }

        #[test]
        fn round_trip_is_exact(symbols in proptest::collection::vec(-40i32..40, 1..100)) {
            let prior = learned();
            let mut symbols = symbols;
            if symbols.len() % 2 == 1 {
                symbols.push(0);
            }
            let bytes = encode(&prior, &symbols).unwrap();
            prop_assert_eq!(decode(&prior, &bytes, symbols.len()).unwrap(), symbols);
        }
    }
}
