//! ggml's tensor types: block layout, dequantization and the reference quantizers.
//!
//! A quantized ggml tensor is a sequence of blocks along its innermost dimension; each block
//! holds a few f16 scales and 32 packed values. The layouts below are ggml's
//! (`ggml-common.h`), which every GGUF file uses:
//!
//! | type | values per block | bytes per block | value |
//! |---|---:|---:|---|
//! | F32 | 1 | 4 | itself |
//! | F16 | 1 | 2 | itself |
//! | Q4_0 | 32 | 18 | `d · (q − 8)`, q a nibble |
//! | Q4_1 | 32 | 20 | `d · q + m`, q a nibble |
//! | Q8_0 | 32 | 34 | `d · q`, q an i8 |
//!
//! In Q4_0 and Q4_1, byte `j` of the 16 packed bytes holds value `j` in its low nibble and
//! value `j + 16` in its high nibble (not neighbours). The quantizers are ggml's reference
//! ones (`quantize_row_*_ref`): the tests write synthetic models with them, and 8-bit blocks
//! carry all-reduce payloads.

use half::f16;

/// Values per block of the block-quantized types.
pub const BLOCK: usize = 32;

/// A ggml tensor type that cleave-llm reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// 4-bit, one scale per 32 values.
    Q4_0,
    /// 4-bit, a scale and a minimum per 32 values.
    Q4_1,
    /// 8-bit, one scale per 32 values.
    Q8_0,
}

impl GgmlType {
    /// Every type this crate reads.
    pub const ALL: [Self; 5] = [Self::F32, Self::F16, Self::Q4_0, Self::Q4_1, Self::Q8_0];

    /// The type with ggml's id `id`.
    ///
    /// # Errors
    ///
    /// The id's ggml name, if it has one, for a type this crate does not read.
    pub fn from_id(id: u32) -> Result<Self, UnsupportedType> {
        match id {
            0 => Ok(Self::F32),
            1 => Ok(Self::F16),
            2 => Ok(Self::Q4_0),
            3 => Ok(Self::Q4_1),
            8 => Ok(Self::Q8_0),
            _ => Err(UnsupportedType(id)),
        }
    }

    /// ggml's id of the type.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
        }
    }

    /// ggml's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
        }
    }

    /// Values per block (1 for the float types).
    pub fn block_values(self) -> usize {
        match self {
            Self::F32 | Self::F16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => BLOCK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }

    /// Bytes of a row of `values` values, or `None` if `values` is not whole blocks (or the
    /// size overflows).
    pub fn row_bytes(self, values: u64) -> Option<u64> {
        let per_block = self.block_values() as u64;
        if !values.is_multiple_of(per_block) {
            return None;
        }
        (values / per_block).checked_mul(self.block_bytes() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A ggml type id this crate does not read; displays its ggml name where known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "tensor type {name} (ggml id {id}) is not supported; cleave-llm reads {supported}",
    name = ggml_name(self.0),
    id = self.0,
    supported = supported()
)]
pub struct UnsupportedType(pub u32);

fn supported() -> String {
    GgmlType::ALL.map(GgmlType::name).join(", ")
}

/// ggml's name for a type id, for messages about types this crate does not read.
fn ggml_name(id: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    usize::try_from(id)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("unknown")
}

/// Why bytes could not be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ty}: {bytes} bytes are not whole blocks of {block} bytes")]
pub struct PartialBlock {
    /// The type.
    pub ty: GgmlType,
    /// The bytes given.
    pub bytes: usize,
    /// Its block size in bytes.
    pub block: usize,
}

/// Dequantizes `bytes` of type `ty` and appends the values to `out`.
///
/// # Errors
///
/// [`PartialBlock`] if `bytes` is not a whole number of blocks.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut Vec<f32>) -> Result<(), PartialBlock> {
    let block = ty.block_bytes();
    if !bytes.len().is_multiple_of(block) {
        return Err(PartialBlock {
            ty,
            bytes: bytes.len(),
            block,
        });
    }
    out.reserve(bytes.len() / block * ty.block_values());
    let blocks = bytes.chunks_exact(block);
    match ty {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|b| scale(b, 0))),
        GgmlType::Q4_0 => {
            for b in blocks {
                let d = scale(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|q| d * (f32::from(q & 0x0F) - 8.0)));
                out.extend(qs.iter().map(|q| d * (f32::from(q >> 4) - 8.0)));
            }
        }
        GgmlType::Q4_1 => {
            for b in blocks {
                let (d, m) = (scale(b, 0), scale(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|q| d * f32::from(q & 0x0F) + m));
                out.extend(qs.iter().map(|q| d * f32::from(q >> 4) + m));
            }
        }
        GgmlType::Q8_0 => {
            for b in blocks {
                let d = scale(b, 0);
                out.extend(b[2..34].iter().map(|&q| d * f32::from(q.cast_signed())));
            }
        }
    }
    Ok(())
}

/// The little-endian f16 at `at` as f32.
fn scale(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// Why values could not be quantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{ty}: {values} values are not whole blocks of {block}")]
pub struct PartialRow {
    /// The type.
    pub ty: GgmlType,
    /// Values given.
    pub values: usize,
    /// Values per block.
    pub block: usize,
}

/// Quantizes `values` to type `ty` as ggml's reference quantizers do, appending to `out`.
///
/// # Errors
///
/// [`PartialRow`] if `values` is not a whole number of blocks.
pub fn quantize(ty: GgmlType, values: &[f32], out: &mut Vec<u8>) -> Result<(), PartialRow> {
    let per_block = ty.block_values();
    if !values.len().is_multiple_of(per_block) {
        return Err(PartialRow {
            ty,
            values: values.len(),
            block: per_block,
        });
    }
    out.reserve(values.len() / per_block * ty.block_bytes());
    let blocks = values.chunks_exact(per_block);
    match ty {
        GgmlType::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => out.extend(values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes())),
        GgmlType::Q4_0 => {
            for x in blocks {
                // The value of largest magnitude, sign kept, maps to −8.
                let max = x
                    .iter()
                    .copied()
                    .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend(f16::from_f32(d).to_le_bytes());
                let q = |v: f32| (v * id + 8.5).clamp(0.0, 15.0) as u8;
                out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
            }
        }
        GgmlType::Q4_1 => {
            for x in blocks {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                let q = |v: f32| ((v - min) * id + 0.5).clamp(0.0, 15.0) as u8;
                out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
            }
        }
        GgmlType::Q8_0 => {
            for x in blocks {
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(x.iter().map(|v| ((v * id).round() as i8).cast_unsigned()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect()
    }

    #[test]
    fn every_type_round_trips_within_its_step() {
        let values = ramp(4 * BLOCK);
        // The worst error of each type on values in [-1, 1]: half a step of its grid (f16
        // rounding of the scales included).
        for (ty, tolerance) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::Q8_0, 1.0 / 127.0),
            (GgmlType::Q4_1, 1.0 / 15.0 + 1e-3),
            (GgmlType::Q4_0, 1.0 / 8.0 + 1e-3),
        ] {
            let mut bytes = Vec::new();
            quantize(ty, &values, &mut bytes).unwrap();
            assert_eq!(
                bytes.len() as u64,
                ty.row_bytes(values.len() as u64).unwrap()
            );
            let mut back = Vec::new();
            dequantize(ty, &bytes, &mut back).unwrap();
            assert_eq!(back.len(), values.len());
            let worst = values
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst <= tolerance,
                "{ty}: worst error {worst} > {tolerance}"
            );
        }
    }

    #[test]
    fn nibbles_hold_values_j_and_j_plus_16() {
        // One Q4_1 block by hand: d = 1, m = 0, byte j = low nibble j, high nibble 15 − j;
        // values 0..16 come from the low nibbles, 16..32 from the high ones.
        let mut block = Vec::new();
        block.extend(f16::from_f32(1.0).to_le_bytes());
        block.extend(f16::from_f32(0.0).to_le_bytes());
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = Vec::new();
        dequantize(GgmlType::Q4_1, &block, &mut out).unwrap();
        let expected: Vec<f32> = (0..16)
            .map(|j| j as f32)
            .chain((0..16).map(|j| (15 - j) as f32))
            .collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn partial_blocks_are_errors() {
        let mut out = Vec::new();
        let err = dequantize(GgmlType::Q8_0, &[0; 35], &mut out).unwrap_err();
        assert_eq!(err.block, 34);
        assert!(quantize(GgmlType::Q4_0, &[0.0; 31], &mut Vec::new()).is_err());
        assert_eq!(GgmlType::Q4_1.row_bytes(33), None);
        assert_eq!(GgmlType::Q4_1.row_bytes(64), Some(40));
    }

    #[test]
    fn unsupported_types_are_named() {
        let message = GgmlType::from_id(12).unwrap_err().to_string();
        assert!(
            message.contains("Q4_K") && message.contains("Q4_1"),
            "{message}"
        );
        assert!(
            GgmlType::from_id(9999)
                .unwrap_err()
                .to_string()
                .contains("unknown")
        );
        for ty in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(ty.id()), Ok(ty));
        }
    }
}
