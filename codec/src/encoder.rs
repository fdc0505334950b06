//! Making frames: quantize with the chosen table, code with the chosen codec, lay out.
//!
//! [`FrameEncoder::encode_within`] is the rate control: given a byte budget per frame it
//! codes at the highest calibrated bit depth whose frame fits, stepping down one bit at a
//! time. Coding a bottleneck frame takes well under a millisecond (see the codec benchmark),
//! so it measures real sizes rather than predicting them.

use std::borrow::Cow;

use crate::ans;
use crate::frame::{
    Codec, Coding, FrameError, FrameParts, MAX_RANK, check_combination, table, write_frame,
};
use crate::pack;
use crate::quantize::{Granularity, Quantizer};
use crate::tables::CodingTables;
use crate::{BundleTag, Prior};

/// How to code one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Fit ranges to this frame and carry them (no tables needed); `raw` or `zstd`.
    Inline {
        /// Bit depth, 2 to 8.
        bits: u8,
        /// Ranges per tensor or per channel.
        granularity: Granularity,
        /// `raw` or `zstd`.
        codec: Codec,
    },
    /// The bundle's calibrated level at `bits`, with any codec.
    Calibrated {
        /// Bit depth, 2 to 8.
        bits: u8,
        /// Any codec; `ans` uses the level's static prior.
        codec: Codec,
    },
    /// The bundle's learned factorized prior, coded with ANS.
    Learned,
}

/// A frame and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedFrame {
    /// The frame's bytes.
    pub bytes: Vec<u8>,
    /// Coding used.
    pub coding: Coding,
    /// Codec used.
    pub codec: Codec,
    /// Bytes of the coded payload alone.
    pub payload_bytes: usize,
    /// The information bound of the symbols under the prior, in bits, where the coding has a
    /// prior.
    pub information_bits: Option<f64>,
}

/// Makes frames for one bundle.
#[derive(Debug, Clone, Copy)]
pub struct FrameEncoder<'t> {
    tag: BundleTag,
    tables: Option<&'t CodingTables>,
}

impl<'t> FrameEncoder<'t> {
    /// An encoder for the bundle with this tag and (if it was calibrated) these tables.
    pub fn new(tag: BundleTag, tables: Option<&'t CodingTables>) -> Self {
        Self { tag, tables }
    }

    /// Codes `tensor` (row-major, of `shape`) as `choice` says.
    ///
    /// # Errors
    ///
    /// [`FrameError::UnencodableShape`] for a shape the format cannot carry,
    /// [`FrameError::Inconsistent`] for `ans` without a prior or a bit depth outside 2..=8,
    /// [`FrameError::MissingTable`] / [`FrameError::TableShape`] if the choice needs a table
    /// the bundle lacks or the tensor's channels differ from the tables',
    /// [`FrameError::Quantize`] for a tensor that cannot be quantized, and
    /// [`FrameError::Encode`] if the coder refuses the symbols.
    pub fn encode(
        &self,
        tensor: &[f32],
        shape: &[usize],
        choice: Choice,
    ) -> Result<EncodedFrame, FrameError> {
        check_shape(shape)?;
        let (coding, codec) = match choice {
            Choice::Inline { bits, codec, .. } => (Coding::Inline { bits }, codec),
            Choice::Calibrated { bits, codec } => (Coding::Calibrated { bits }, codec),
            Choice::Learned => (Coding::Learned, Codec::Ans),
        };
        check_combination(coding, codec)?;
        let (quantizer, prior) = match choice {
            Choice::Inline {
                bits, granularity, ..
            } => {
                let fitted = Quantizer::fit(tensor, shape, granularity, bits)?;
                (Cow::Owned(fitted), None)
            }
            _ => {
                let (quantizer, prior) = table(self.tables, coding, shape)?;
                (Cow::Borrowed(quantizer), Some(prior))
            }
        };
        let quantizer: &Quantizer = &quantizer;
        let symbols = quantizer.quantize(tensor, shape)?;
        let payload = code(codec, coding, prior, &symbols)?;
        let inline = match (&choice, quantizer) {
            (Choice::Inline { granularity, .. }, Quantizer::Affine { ranges, .. }) => {
                Some((*granularity, ranges.as_slice()))
            }
            _ => None,
        };
        let bytes = write_frame(&FrameParts {
            codec,
            coding,
            tag: self.tag,
            shape,
            inline,
            payload: &payload,
        })?;
        Ok(EncodedFrame {
            bytes,
            coding,
            codec,
            payload_bytes: payload.len(),
            information_bits: prior.map(|p| p.information_bits(&symbols)),
        })
    }

    /// Rate control: codes at the highest calibrated bit depth whose frame (header included)
    /// fits in `budget` bytes.
    ///
    /// # Errors
    ///
    /// [`FrameError::OverBudget`] with the smallest frame possible if none fits,
    /// [`FrameError::Uncalibrated`] if the bundle has no calibrated levels, and the errors of
    /// [`encode`](Self::encode).
    pub fn encode_within(
        &self,
        tensor: &[f32],
        shape: &[usize],
        budget: usize,
        codec: Codec,
    ) -> Result<EncodedFrame, FrameError> {
        let levels = self.tables.map(|t| t.levels()).unwrap_or_default();
        let mut smallest = usize::MAX;
        for level in levels.iter().rev() {
            let choice = Choice::Calibrated {
                bits: level.bits,
                codec,
            };
            let frame = self.encode(tensor, shape, choice)?;
            if frame.bytes.len() <= budget {
                return Ok(frame);
            }
            smallest = smallest.min(frame.bytes.len());
        }
        if levels.is_empty() {
            return Err(FrameError::Uncalibrated);
        }
        Err(FrameError::OverBudget { budget, smallest })
    }
}

/// Refuses, before any work, a shape the frame format cannot carry: 1 to 4 axes, each at
/// most `u32::MAX` (what a decoder reads).
fn check_shape(shape: &[usize]) -> Result<(), FrameError> {
    let too_long = shape.iter().any(|&d| u32::try_from(d).is_err());
    if shape.is_empty() || shape.len() > MAX_RANK || too_long {
        return Err(FrameError::UnencodableShape(shape.to_vec()));
    }
    Ok(())
}

fn code(
    codec: Codec,
    coding: Coding,
    prior: Option<&Prior>,
    symbols: &[i32],
) -> Result<Vec<u8>, FrameError> {
    let payload_error = |reason: String| FrameError::Encode(reason);
    // check_combination ruled out the learned prior with anything but ans.
    match (codec, coding) {
        (Codec::Ans, _) | (_, Coding::Learned) => {
            let prior = prior.ok_or(FrameError::MissingTable(coding))?;
            ans::encode(prior, symbols).map_err(|e| payload_error(e.to_string()))
        }
        (Codec::Raw, Coding::Inline { bits } | Coding::Calibrated { bits }) => {
            Ok(pack::pack(symbols, bits))
        }
        (Codec::Zstd, _) => {
            let bytes: Vec<u8> = symbols.iter().map(|&s| s as u8).collect();
            zstd::bulk::compress(&bytes, ZSTD_LEVEL).map_err(|e| payload_error(e.to_string()))
        }
    }
}

/// zstd level: fast on a weak CPU; higher levels gain little on quantized symbols.
const ZSTD_LEVEL: i32 = 3;
