//! Affine 8-bit quantization of a feature tensor, per tensor or per channel.
//!
//! Each group (the whole tensor, or one channel: a slice along the first axis) maps its own
//! `[min, max]` onto the symbols `0..=255`: `symbol = round((x - min) / scale)` with
//! `scale = (max - min) / 255`. The ranges come from the frame itself, so frames are
//! self-describing and need no calibration to decode.

/// How many affine maps a tensor gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// One `(min, scale)` pair for the whole tensor.
    PerTensor,
    /// One pair per slice along the first axis (the channel axis of a `C×H×W` tensor).
    PerChannel,
}

/// A tensor quantized to 8-bit symbols, with what it takes to restore it.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// Tensor shape, outermost first; the first axis is the channel axis.
    pub shape: Vec<usize>,
    /// Whether `params` holds one pair or one per channel.
    pub granularity: Granularity,
    /// `(min, scale)` per group.
    pub params: Vec<(f32, f32)>,
    /// One symbol per element, in row-major order.
    pub symbols: Vec<u8>,
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
}

/// Largest symbol of 8-bit quantization.
const LEVELS: f32 = 255.0;

/// Quantizes `tensor` (row-major, of `shape`) to 8-bit symbols.
///
/// # Errors
///
/// [`QuantError`] if the shape does not match the data, the tensor is empty, or a value is not
/// finite.
pub fn quantize(
    tensor: &[f32],
    shape: &[usize],
    granularity: Granularity,
) -> Result<Quantized, QuantError> {
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
    let group_len = match granularity {
        Granularity::PerTensor => tensor.len(),
        Granularity::PerChannel => tensor.len() / shape[0],
    };
    let mut params = Vec::with_capacity(tensor.len() / group_len);
    let mut symbols = Vec::with_capacity(tensor.len());
    for group in tensor.chunks_exact(group_len) {
        let (min, max) = group
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let scale = if max > min { (max - min) / LEVELS } else { 1.0 };
        let inverse = 1.0 / scale;
        symbols.extend(
            group
                .iter()
                .map(|&v| ((v - min) * inverse).round().clamp(0.0, LEVELS) as u8),
        );
        params.push((min, scale));
    }
    Ok(Quantized {
        shape: shape.to_vec(),
        granularity,
        params,
        symbols,
    })
}

impl Quantized {
    /// Elements per group of `params`.
    fn group_len(&self) -> usize {
        self.symbols.len() / self.params.len().max(1)
    }

    /// Restores the tensor: `min + symbol * scale` per element.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.symbols.len());
        self.dequantize_into(&mut out);
        out
    }

    /// Like [`dequantize`](Self::dequantize), appending to `out` to reuse its allocation.
    pub fn dequantize_into(&self, out: &mut Vec<f32>) {
        let group_len = self.group_len();
        for (group, &(min, scale)) in self.symbols.chunks(group_len).zip(&self.params) {
            out.extend(group.iter().map(|&s| min + f32::from(s) * scale));
        }
    }

    /// The largest error dequantization can make for each group: half a step.
    pub fn max_error(&self) -> f32 {
        self.params
            .iter()
            .map(|&(_, scale)| scale * 0.5)
            .fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constant_channel_is_exact() {
        let q = quantize(&[3.5; 8], &[2, 4], Granularity::PerChannel).unwrap();
        assert_eq!(q.dequantize(), vec![3.5; 8]);
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            quantize(&[1.0, 2.0], &[3], Granularity::PerTensor),
            Err(QuantError::ShapeMismatch {
                expected: 3,
                actual: 2,
                ..
            })
        ));
        assert!(matches!(
            quantize(&[], &[0], Granularity::PerTensor),
            Err(QuantError::Empty(_))
        ));
        assert!(matches!(
            quantize(&[1.0, f32::NAN], &[2], Granularity::PerTensor),
            Err(QuantError::NotFinite { index: 1, .. })
        ));
    }

    proptest! {
        #[test]
        fn dequantized_within_half_a_step(
            channels in 1usize..6,
            per_channel in 1usize..40,
            seed in proptest::collection::vec(-1000.0f32..1000.0, 240),
            per_tensor in any::<bool>(),
        ) {
            let n = channels * per_channel;
            let data: Vec<f32> = seed.iter().cycle().take(n).copied().collect();
            let granularity = if per_tensor { Granularity::PerTensor } else { Granularity::PerChannel };
            let q = quantize(&data, &[channels, per_channel], granularity).unwrap();
            let restored = q.dequantize();
            let tolerance = q.max_error() * 1.001 + 1e-3;
            for (a, b) in restored.iter().zip(&data) {
                prop_assert!((a - b).abs() <= tolerance, "{a} vs {b} (tolerance {tolerance})");
            }
            // Requantizing the restored tensor gives the same symbols.
            let again = quantize(&restored, &[channels, per_channel], granularity).unwrap();
            prop_assert_eq!(again.symbols, q.symbols);
        }
    }
}
