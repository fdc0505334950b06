//! Quantized weight matrices times activation vectors: the work of a token.
//!
//! A [`QMatrix`] keeps a weight matrix in its file's ggml type (rows of blocks) and
//! multiplies it by an f32 vector without dequantizing it first, row by row, the rows spread
//! over rayon's pool. These are portable scalar loops written so the compiler can vectorize
//! them; faster kernels (8-bit activations, SIMD) are to be measured against them.

use rayon::prelude::*;

use crate::quant::{BLOCK, GgmlType};

/// A row-major weight matrix of `rows` × `cols` in a ggml type.
#[derive(Debug, Clone)]
pub struct QMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    bytes: Vec<u8>,
}

/// Why bytes are not a matrix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rows} × {cols} of {ty} takes {expected:?} bytes, not {actual}")]
pub struct ShapeMismatch {
    /// Type.
    pub ty: GgmlType,
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// What the shape takes (`None`: columns are not whole blocks).
    pub expected: Option<usize>,
    /// What was given.
    pub actual: usize,
}

impl QMatrix {
    /// A matrix over `bytes` (rows of `cols` values, each row whole blocks of `ty`).
    ///
    /// # Errors
    ///
    /// [`ShapeMismatch`] when the sizes disagree.
    pub fn new(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<Self, ShapeMismatch> {
        let row_bytes = ty
            .row_bytes(cols as u64)
            .and_then(|b| usize::try_from(b).ok());
        let expected = row_bytes.and_then(|b| b.checked_mul(rows));
        match (row_bytes, expected) {
            (Some(row_bytes), Some(total)) if total == bytes.len() => Ok(Self {
                ty,
                rows,
                cols,
                row_bytes,
                bytes,
            }),
            _ => Err(ShapeMismatch {
                ty,
                rows,
                cols,
                expected,
                actual: bytes.len(),
            }),
        }
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Its type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Row `r` dequantized into `out` (an embedding lookup).
    ///
    /// # Panics
    ///
    /// If `r` is not a row.
    pub fn row_into(&self, r: usize, out: &mut Vec<f32>) {
        let row = &self.bytes[r * self.row_bytes..(r + 1) * self.row_bytes];
        out.clear();
        // Whole blocks by construction.
        let _ = crate::quant::dequantize(self.ty, row, out);
    }

    /// `out = self · x`.
    ///
    /// # Panics
    ///
    /// If `x` is not `cols` long or `out` not `rows` long.
    pub fn matvec(&self, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), self.cols, "input length");
        assert_eq!(out.len(), self.rows, "output length");
        let sums = block_sums(x);
        out.par_iter_mut()
            .with_min_len(16)
            .zip(self.bytes.par_chunks_exact(self.row_bytes))
            .for_each(|(o, row)| *o = dot(self.ty, row, x, &sums));
    }
}

/// Σ x over each block of 32 (the Q4_1 minimum's share), zero-padded for short vectors.
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks(BLOCK).map(|b| b.iter().sum()).collect()
}

/// One row (in `ty`'s layout) dotted with `x`.
fn dot(ty: GgmlType, row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    match ty {
        GgmlType::F32 => row
            .chunks_exact(4)
            .zip(x)
            .map(|(w, v)| f32::from_le_bytes([w[0], w[1], w[2], w[3]]) * v)
            .sum(),
        GgmlType::F16 => row
            .chunks_exact(2)
            .zip(x)
            .map(|(w, v)| half::f16::from_le_bytes([w[0], w[1]]).to_f32() * v)
            .sum(),
        GgmlType::Q4_0 => row
            .chunks_exact(18)
            .zip(x.chunks_exact(BLOCK))
            .zip(sums)
            .map(|((b, xs), &sum)| {
                // d · Σ (q − 8) x = d · (Σ q x − 8 Σ x)
                scale(b, 0) * (nibble_dot(&b[2..18], xs) - 8.0 * sum)
            })
            .sum(),
        GgmlType::Q4_1 => row
            .chunks_exact(20)
            .zip(x.chunks_exact(BLOCK))
            .zip(sums)
            .map(|((b, xs), &sum)| scale(b, 0) * nibble_dot(&b[4..20], xs) + scale(b, 2) * sum)
            .sum(),
        GgmlType::Q8_0 => row
            .chunks_exact(34)
            .zip(x.chunks_exact(BLOCK))
            .map(|(b, xs)| {
                let q = &b[2..34];
                let s: f32 = q
                    .iter()
                    .zip(xs)
                    .map(|(&q, v)| f32::from(q.cast_signed()) * v)
                    .sum();
                scale(b, 0) * s
            })
            .sum(),
    }
}

/// Σ q_j x_j over one block's 16 packed bytes: low nibbles are values 0..16, high 16..32.
fn nibble_dot(qs: &[u8], xs: &[f32]) -> f32 {
    let (lo, hi) = xs.split_at(16);
    qs.iter()
        .zip(lo.iter().zip(hi))
        .map(|(&q, (a, b))| f32::from(q & 0x0F) * a + f32::from(q >> 4) * b)
        .sum()
}

fn scale(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::quant::{dequantize, quantize};

    #[test]
    fn matvec_equals_dequantize_then_multiply() {
        let (rows, cols) = (7, 96);
        let weights: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 29) % 53) as f32 / 26.0 - 1.0)
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 17) % 23) as f32 / 11.0 - 1.0)
            .collect();
        for ty in GgmlType::ALL {
            let mut bytes = Vec::new();
            quantize(ty, &weights, &mut bytes).unwrap();
            let mut dense = Vec::new();
            dequantize(ty, &bytes, &mut dense).unwrap();
            let matrix = QMatrix::new(ty, rows, cols, bytes).unwrap();
            let mut out = vec![0.0; rows];
            matrix.matvec(&x, &mut out);
            for r in 0..rows {
                let expected: f32 = dense[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(&x)
                    .map(|(w, v)| w * v)
                    .sum();
                assert!(
                    (out[r] - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                    "{ty} row {r}: {} vs {expected}",
                    out[r]
                );
            }
            let mut row = Vec::new();
            matrix.row_into(3, &mut row);
            assert_eq!(row, dense[3 * cols..4 * cols]);
        }
    }

    #[test]
    fn sizes_must_agree() {
        assert!(QMatrix::new(GgmlType::Q4_1, 2, 64, vec![0; 80]).is_ok());
        assert!(QMatrix::new(GgmlType::Q4_1, 2, 64, vec![0; 79]).is_err());
        assert!(QMatrix::new(GgmlType::Q8_0, 1, 48, vec![0; 51]).is_err());
    }
}
