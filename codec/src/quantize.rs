//! Quantizers: how a feature tensor becomes integer symbols, and back.
//!
//! Two families, both per channel along the first axis (a `C×H×W` bottleneck):
//!
//! - **Affine** at 2 to 8 bits: `symbol = clamp(round((x - min) / step), 0, 2^bits - 1)` and
//!   `x̂ = min + symbol · step`. The ranges come either from the bundle's calibration
//!   (percentile clipping, see `docs/coding-tables.md`) or from the frame itself
//!   ([`Quantizer::fit`], per-frame min/max, for bundles that were never calibrated).
//! - **Integer**, as CompressAI's `EntropyBottleneck` does it:
//!   `symbol = round(x · gain - median)` and `x̂ = (symbol + median) / gain`. The symbols are
//!   unbounded; the entropy coder escapes the rare ones outside its table.
//!
//! Rounding is half-to-even in both, like `torch.round` and `numpy.rint`, so the symbols agree
//! bit for bit with the Python tools that fit the tables.

/// How many affine maps a tensor gets when its ranges are fitted per frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// One range for the whole tensor.
    PerTensor,
    /// One range per slice along the first axis (the channel axis of a `C×H×W` tensor).
    PerChannel,
}

/// The range of one affine group: `x̂ = min + symbol · step`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AffineRange {
    /// The value symbol 0 stands for.
    pub min: f32,
    /// The distance between neighbouring symbols; finite and positive.
    pub step: f32,
}

impl AffineRange {
    /// The range that maps `[low, high]` onto `2^bits` symbols. A collapsed or inverted
    /// range gets a unit step, so a constant channel restores exactly.
    pub fn spanning(low: f32, high: f32, bits: u8) -> Self {
        let top = max_symbol(bits) as f32;
        let step = if high > low { (high - low) / top } else { 1.0 };
        Self { min: low, step }
    }
}

/// A rule for turning a tensor into symbols; see the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub enum Quantizer {
    /// Affine at `bits` bits; `ranges` holds one range for the whole tensor or one per channel.
    Affine {
        /// Bit depth, 2 to 8.
        bits: u8,
        /// One range, or one per channel.
        ranges: Vec<AffineRange>,
    },
    /// Integer symbols around per-channel medians after a per-channel gain.
    Integer {
        /// Multiplies `x` before rounding; one per channel.
        gain: Vec<f32>,
        /// Subtracted after the gain; one per channel.
        median: Vec<f32>,
    },
}

/// Lowest bit depth an affine quantizer supports.
pub const MIN_BITS: u8 = 2;
/// Highest bit depth an affine quantizer supports.
pub const MAX_BITS: u8 = 8;
/// Integer symbols are clamped to `±INTEGER_SYMBOL_LIMIT` so that their escape code stays
/// within 32 bits; a feature that far out is an outlier by a factor of a million.
pub const INTEGER_SYMBOL_LIMIT: i32 = 1 << 30;

/// The largest symbol at `bits` bits.
pub fn max_symbol(bits: u8) -> i32 {
    (1i32 << bits) - 1
}

/// Why a tensor cannot be quantized.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// The shape's element count differs from the data's length.
    #[error("shape {shape:?} holds {expected} elements but the tensor has {actual}")]
    ShapeMismatch {
        /// The shape given.
        shape: Vec<usize>,
        /// Elements the shape implies.
        expected: usize,
        /// Elements in the data.
        actual: usize,
    },
    /// The tensor has no elements or no axes.
    #[error("cannot quantize an empty tensor (shape {0:?})")]
    Empty(Vec<usize>),
    /// A value is NaN or infinite.
    #[error("element {index} is not finite ({value})")]
    NotFinite {
        /// Row-major index of the value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A bit depth outside 2..=8.
    #[error("unsupported bit depth {0} (2 to 8)")]
    Bits(u8),
    /// The quantizer has a different number of channels than the tensor.
    #[error("quantizer has {quantizer} channel ranges, tensor has {tensor} channels")]
    Channels {
        /// Ranges in the quantizer.
        quantizer: usize,
        /// Channels in the tensor.
        tensor: usize,
    },
}

impl Quantizer {
    /// Fits an affine quantizer to this frame's own min/max, per tensor or per channel.
    ///
    /// # Errors
    ///
    /// [`QuantError`] if the tensor is empty, its shape does not match, a value is not finite,
    /// or `bits` is outside 2..=8.
    pub fn fit(
        tensor: &[f32],
        shape: &[usize],
        granularity: Granularity,
        bits: u8,
    ) -> Result<Self, QuantError> {
        check_bits(bits)?;
        check_tensor(tensor, shape)?;
        let group_len = match granularity {
            Granularity::PerTensor => tensor.len(),
            Granularity::PerChannel => tensor.len() / shape[0],
        };
        let ranges = tensor
            .chunks_exact(group_len)
            .map(|group| {
                let (low, high) = group
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                        (lo.min(v), hi.max(v))
                    });
                AffineRange::spanning(low, high, bits)
            })
            .collect();
        Ok(Self::Affine { bits, ranges })
    }

    /// The bit depth of an affine quantizer; `None` for integer symbols.
    pub fn bits(&self) -> Option<u8> {
        match self {
            Self::Affine { bits, .. } => Some(*bits),
            Self::Integer { .. } => None,
        }
    }

    /// Channels (or groups) this quantizer has parameters for.
    pub fn groups(&self) -> usize {
        match self {
            Self::Affine { ranges, .. } => ranges.len(),
            Self::Integer { median, .. } => median.len(),
        }
    }

    /// Elements per group for a tensor of `len` elements, or an error if the groups do not
    /// divide the tensor's first axis.
    fn group_len(&self, shape: &[usize], len: usize) -> Result<usize, QuantError> {
        let groups = self.groups();
        let channels = shape.first().copied().unwrap_or(0);
        if groups == 1 && matches!(self, Self::Affine { .. }) {
            return Ok(len.max(1));
        }
        if groups != channels || groups == 0 {
            return Err(QuantError::Channels {
                quantizer: groups,
                tensor: channels,
            });
        }
        Ok(len / groups)
    }

    /// Quantizes `tensor` (row-major, of `shape`) to symbols.
    ///
    /// # Errors
    ///
    /// [`QuantError`] if the tensor is empty, its shape does not match, a value is not finite,
    /// or the quantizer's channel count differs from the tensor's.
    pub fn quantize(&self, tensor: &[f32], shape: &[usize]) -> Result<Vec<i32>, QuantError> {
        check_tensor(tensor, shape)?;
        let group_len = self.group_len(shape, tensor.len())?;
        let mut symbols = Vec::with_capacity(tensor.len());
        match self {
            Self::Affine { bits, ranges } => {
                check_bits(*bits)?;
                let top = max_symbol(*bits) as f32;
                for (group, range) in tensor.chunks_exact(group_len).zip(ranges) {
                    // Divide (not multiply by 1/step) so the symbols match the tools' numpy.
                    symbols.extend(group.iter().map(|&x| {
                        ((x - range.min) / range.step)
                            .round_ties_even()
                            .clamp(0.0, top) as i32
                    }));
                }
            }
            Self::Integer { gain, median } => {
                let limit = INTEGER_SYMBOL_LIMIT as f32;
                for ((group, &g), &m) in tensor.chunks_exact(group_len).zip(gain).zip(median) {
                    symbols.extend(
                        group
                            .iter()
                            .map(|&x| (x * g - m).round_ties_even().clamp(-limit, limit) as i32),
                    );
                }
            }
        }
        Ok(symbols)
    }

    /// Restores a tensor from its symbols, appending to `out`.
    ///
    /// # Errors
    ///
    /// [`QuantError::Channels`] if the quantizer's channel count differs from the shape's.
    pub fn dequantize_into(
        &self,
        symbols: &[i32],
        shape: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<(), QuantError> {
        let group_len = self.group_len(shape, symbols.len())?;
        out.reserve(symbols.len());
        match self {
            Self::Affine { ranges, .. } => {
                for (group, range) in symbols.chunks(group_len).zip(ranges) {
                    out.extend(group.iter().map(|&s| range.min + s as f32 * range.step));
                }
            }
            Self::Integer { gain, median } => {
                for ((group, &g), &m) in symbols.chunks(group_len).zip(gain).zip(median) {
                    out.extend(group.iter().map(|&s| (s as f32 + m) / g));
                }
            }
        }
        Ok(())
    }

    /// Restores a tensor from its symbols.
    ///
    /// # Errors
    ///
    /// As [`dequantize_into`](Self::dequantize_into).
    pub fn dequantize(&self, symbols: &[i32], shape: &[usize]) -> Result<Vec<f32>, QuantError> {
        let mut out = Vec::new();
        self.dequantize_into(symbols, shape, &mut out)?;
        Ok(out)
    }
}

fn check_bits(bits: u8) -> Result<(), QuantError> {
    if (MIN_BITS..=MAX_BITS).contains(&bits) {
        Ok(())
    } else {
        Err(QuantError::Bits(bits))
    }
}

fn check_tensor(tensor: &[f32], shape: &[usize]) -> Result<(), QuantError> {
    let expected = shape.iter().product::<usize>();
    if shape.is_empty() || expected == 0 {
        return Err(QuantError::Empty(shape.to_vec()));
    }
    if expected != tensor.len() {
        return Err(QuantError::ShapeMismatch {
            shape: shape.to_vec(),
            expected,
            actual: tensor.len(),
        });
    }
    if let Some(index) = tensor.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NotFinite {
            index,
            value: tensor[index],
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constant_channel_is_exact() {
        let q = Quantizer::fit(&[3.5; 8], &[2, 4], Granularity::PerChannel, 8).unwrap();
        let symbols = q.quantize(&[3.5; 8], &[2, 4]).unwrap();
        assert_eq!(q.dequantize(&symbols, &[2, 4]).unwrap(), vec![3.5; 8]);
    }

    #[test]
    fn rejects_bad_input() {
        let fit = |data: &[f32], shape: &[usize], bits| {
            Quantizer::fit(data, shape, Granularity::PerTensor, bits)
        };
        assert!(matches!(
            fit(&[1.0, 2.0], &[3], 8),
            Err(QuantError::ShapeMismatch {
                expected: 3,
                actual: 2,
                ..
            })
        ));
        assert!(matches!(fit(&[], &[0], 8), Err(QuantError::Empty(_))));
        assert!(matches!(
            fit(&[1.0, f32::NAN], &[2], 8),
            Err(QuantError::NotFinite { index: 1, .. })
        ));
        assert_eq!(fit(&[1.0], &[1], 1), Err(QuantError::Bits(1)));
        assert_eq!(fit(&[1.0], &[1], 9), Err(QuantError::Bits(9)));
        let per_channel = Quantizer::fit(&[1.0; 6], &[3, 2], Granularity::PerChannel, 4).unwrap();
        assert_eq!(
            per_channel.quantize(&[1.0; 8], &[4, 2]),
            Err(QuantError::Channels {
                quantizer: 3,
                tensor: 4
            })
        );
    }

    #[test]
    fn calibrated_range_clips_outliers() {
        let q = Quantizer::Affine {
            bits: 2,
            ranges: vec![AffineRange::spanning(0.0, 3.0, 2)],
        };
        let symbols = q.quantize(&[-5.0, 0.4, 1.5, 2.5, 99.0], &[5]).unwrap();
        // 1.5 and 2.5 are ties: half to even.
        assert_eq!(symbols, vec![0, 0, 2, 2, 3]);
    }

    #[test]
    fn integer_symbols_round_half_to_even_like_torch() {
        let q = Quantizer::Integer {
            gain: vec![2.0],
            median: vec![0.5],
        };
        // 0.5·2 − 0.5 = 0.5 → 0; 0.75·2 − 0.5 = 1.0; 1.0·2 − 0.5 = 1.5 → 2; −1·2 − 0.5 → −2.
        let symbols = q.quantize(&[0.5, 0.75, 1.0, -1.0], &[1, 4]).unwrap();
        assert_eq!(symbols, vec![0, 1, 2, -2]);
        assert_eq!(
            q.dequantize(&symbols, &[1, 4]).unwrap(),
            vec![0.25, 0.75, 1.25, -0.75]
        );
    }

    proptest! {
        #[test]
        fn dequantized_within_half_a_step(
            channels in 1usize..6,
            per_channel in 1usize..40,
            seed in proptest::collection::vec(-1000.0f32..1000.0, 240),
            per_tensor in any::<bool>(),
            bits in MIN_BITS..=MAX_BITS,
        ) {
            let n = channels * per_channel;
            let shape = [channels, per_channel];
            let data: Vec<f32> = seed.iter().cycle().take(n).copied().collect();
            let granularity = if per_tensor { Granularity::PerTensor } else { Granularity::PerChannel };
            let q = Quantizer::fit(&data, &shape, granularity, bits).unwrap();
            let symbols = q.quantize(&data, &shape).unwrap();
            prop_assert!(symbols.iter().all(|&s| (0..=max_symbol(bits)).contains(&s)));
            let restored = q.dequantize(&symbols, &shape).unwrap();
            let Quantizer::Affine { ranges, .. } = &q else { unreachable!() };
            let tolerance = ranges.iter().map(|r| r.step).fold(0.0, f32::max) * 0.5001 + 1e-3;
            for (a, b) in restored.iter().zip(&data) {
                prop_assert!((a - b).abs() <= tolerance, "{a} vs {b} (tolerance {tolerance})");
            }
            // Requantizing the restored tensor gives the same symbols.
            prop_assert_eq!(q.quantize(&restored, &shape).unwrap(), symbols);
        }
    }
}
