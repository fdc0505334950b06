//! Quantized weight matrices times activation vectors: the work of a token.
//!
//! A [`QMatrix`] keeps a weight matrix quantized and multiplies it by an f32 vector without
//! dequantizing it, row by row, the rows spread over rayon's pool.
//!
//! The block types are repacked at load: each block's f16 scale (and Q4_1's minimum) becomes
//! an f32 in an array of its own, and the packed values go to one contiguous array, so that
//! the inner loop is integer arithmetic over plain bytes, with no f16 conversion in it. That costs Q4_1 4 bytes per 32 weights (20 → 24) and Q8_0 and
//! Q4_0 2 (34 → 36, 18 → 20). The activation vector is quantized once per product to 8-bit
//! blocks of 32 with one f32 scale each (what llama.cpp calls Q8_0/Q8_1), and each block's
//! dot product is an i32 sum of byte products, scaled once.
//!
//! **Kernels** ([`Kernel`]). The inner loops come twice: portable Rust, which the compiler
//! vectorizes for the baseline target (SSE2 `pmaddwd` on x86_64), and AVX2 (`avx2.rs`,
//! x86-64-v3), llama.cpp's block dot product, `vpmaddubsw` (unsigned × signed bytes, pairs
//! summed to i16) then `vpmaddwd` by ones (to i32), with FMA accumulation of the scaled
//! blocks, 2–4× faster. `unsafe` is forbidden in this workspace, so the intrinsics come from
//! `pulp`, whose `V3` token proves at run time that the CPU has them. [`Kernel::best`] picks
//! once per process (AVX2 where the CPU has it; `CLEAVE_LLM_KERNEL=portable` forces the
//! portable loops), and every product can be asked for a given kernel (`*_with`), which
//! the tests and the `matmul` bench use to compare them. The integer sums are the same in
//! both; the ordinary product adds the scaled blocks in another order, so its last bits
//! differ between kernels (every node of a cluster runs the same one).
//!
//! **Exact sums** ([`QMatrix::matvec_exact`]). The matrices whose columns a cluster splits
//! (Wo and Wdown) give partial sums that the nodes add up. Float addition is not
//! associative, so a cluster adding partials would not compute what one node computes in
//! one pass, and the next layer's 8-bit quantization turns a last-bit difference into a
//! whole step now and then. Instead each 32-value block's contribution is computed in f32
//! (the same on every node: it depends on that block alone), put on a grid of 2⁻³² in f64,
//! and added in f64: sums of grid values below 2²¹ are exact, so any split, in any order,
//! gives the same bits. The AVX2 kernel computes only the integer block sums with SIMD
//! (exact) and each term with the portable f32 operations in the portable order (multiply,
//! multiply, then add the minimum's term, never fused), so both kernels give the same bits
//! (`simd_kernels_equal_the_portable_ones` checks it).

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx2;

use crate::quant::{BLOCK, GgmlType};

/// A row-major weight matrix of `rows` × `cols`.
#[derive(Debug, Clone)]
pub struct QMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    weights: Weights,
}

/// The weights, as the products want them.
#[derive(Debug, Clone)]
enum Weights {
    /// F32 and F16, as f32.
    Dense(Vec<f32>),
    /// Q4_0, Q4_1, Q8_0: per block a scale (and for Q4_1 a minimum), and the values,
    /// `quant_bytes` per block (16 packed nibbles, or 32 i8).
    Blocks {
        scales: Vec<f32>,
        mins: Vec<f32>,
        quants: Vec<u8>,
    },
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
    /// A matrix over `bytes` in `ty`'s ggml layout (rows of `cols` values, each row whole
    /// blocks), repacked for the products.
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
        if expected != Some(bytes.len()) {
            return Err(ShapeMismatch {
                ty,
                rows,
                cols,
                expected,
                actual: bytes.len(),
            });
        }
        let weights = match ty {
            GgmlType::F32 | GgmlType::F16 => {
                let mut dense = Vec::with_capacity(rows * cols);
                // Whole values by the check above.
                let _ = crate::quant::dequantize(ty, &bytes, &mut dense);
                Weights::Dense(dense)
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => repack(ty, &bytes),
        };
        Ok(Self {
            ty,
            rows,
            cols,
            weights,
        })
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The file's type of the weights.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Bytes held.
    pub fn size_bytes(&self) -> usize {
        match &self.weights {
            Weights::Dense(values) => 4 * values.len(),
            Weights::Blocks {
                scales,
                mins,
                quants,
            } => 4 * (scales.len() + mins.len()) + quants.len(),
        }
    }

    /// The rows `rows` (a node's output slice: its heads of Wq, its FFN rows of Wup).
    ///
    /// # Panics
    ///
    /// If the range is outside the matrix.
    pub fn select_rows(&self, rows: std::ops::Range<usize>) -> Self {
        assert!(rows.end <= self.rows, "rows {rows:?} of {}", self.rows);
        let weights = match &self.weights {
            Weights::Dense(values) => {
                Weights::Dense(values[rows.start * self.cols..rows.end * self.cols].to_vec())
            }
            Weights::Blocks {
                scales,
                mins,
                quants,
            } => {
                let per_row = self.cols / BLOCK;
                let blocks = rows.start * per_row..rows.end * per_row;
                let qb = quant_bytes(self.ty);
                Weights::Blocks {
                    scales: scales[blocks.clone()].to_vec(),
                    mins: mins
                        .get(blocks.clone())
                        .map_or_else(Vec::new, <[f32]>::to_vec),
                    quants: quants[blocks.start * qb..blocks.end * qb].to_vec(),
                }
            }
        };
        Self {
            rows: rows.len(),
            weights,
            ..*self
        }
    }

    /// The columns `cols` of every row (a node's input slice: its heads of Wo, its FFN
    /// columns of Wdown); for block types the range must be whole blocks.
    ///
    /// # Panics
    ///
    /// If the range is outside the matrix or, for a block type, not whole blocks.
    pub fn select_cols(&self, cols: std::ops::Range<usize>) -> Self {
        assert!(cols.end <= self.cols, "columns {cols:?} of {}", self.cols);
        let weights = match &self.weights {
            Weights::Dense(values) => Weights::Dense(
                values
                    .chunks_exact(self.cols)
                    .flat_map(|row| &row[cols.clone()])
                    .copied()
                    .collect(),
            ),
            Weights::Blocks {
                scales,
                mins,
                quants,
            } => {
                assert!(
                    cols.start.is_multiple_of(BLOCK) && cols.end.is_multiple_of(BLOCK),
                    "columns {cols:?} are not whole blocks"
                );
                let per_row = self.cols / BLOCK;
                let (first, last) = (cols.start / BLOCK, cols.end / BLOCK);
                let qb = quant_bytes(self.ty);
                let pick = |values: &[f32]| -> Vec<f32> {
                    values
                        .chunks_exact(per_row)
                        .flat_map(|row| &row[first..last])
                        .copied()
                        .collect()
                };
                Weights::Blocks {
                    scales: pick(scales),
                    mins: if mins.is_empty() {
                        Vec::new()
                    } else {
                        pick(mins)
                    },
                    quants: quants
                        .chunks_exact(per_row * qb)
                        .flat_map(|row| &row[first * qb..last * qb])
                        .copied()
                        .collect(),
                }
            }
        };
        Self {
            cols: cols.len(),
            weights,
            ..*self
        }
    }

    /// Row `r` as f32 values in `out` (an embedding lookup).
    ///
    /// # Panics
    ///
    /// If `r` is not a row.
    pub fn row_into(&self, r: usize, out: &mut Vec<f32>) {
        out.clear();
        match &self.weights {
            Weights::Dense(values) => {
                out.extend_from_slice(&values[r * self.cols..(r + 1) * self.cols]);
            }
            Weights::Blocks {
                scales,
                mins,
                quants,
            } => {
                let per_row = self.cols / BLOCK;
                let qb = quant_bytes(self.ty);
                for b in r * per_row..(r + 1) * per_row {
                    let q = &quants[b * qb..(b + 1) * qb];
                    let d = scales[b];
                    match self.ty {
                        GgmlType::Q8_0 => {
                            out.extend(q.iter().map(|&v| d * f32::from(v.cast_signed())))
                        }
                        GgmlType::Q4_0 => {
                            out.extend(q.iter().map(|v| d * (f32::from(v & 0x0F) - 8.0)));
                            out.extend(q.iter().map(|v| d * (f32::from(v >> 4) - 8.0)));
                        }
                        _ => {
                            let m = mins[b];
                            out.extend(q.iter().map(|v| d * f32::from(v & 0x0F) + m));
                            out.extend(q.iter().map(|v| d * f32::from(v >> 4) + m));
                        }
                    }
                }
            }
        }
    }

    /// `out = self · x`, with the fastest kernel this CPU runs ([`Kernel::best`]).
    ///
    /// # Panics
    ///
    /// If `x` is not `cols` long or `out` not `rows` long.
    pub fn matvec(&self, x: &[f32], out: &mut [f32]) {
        self.matvec_with(Kernel::best(), x, out);
    }

    /// `out = self · x` with `kernel` (the portable one where `kernel` is not available).
    ///
    /// # Panics
    ///
    /// If `x` is not `cols` long or `out` not `rows` long.
    pub fn matvec_with(&self, kernel: Kernel, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len(), self.cols, "input length");
        assert_eq!(out.len(), self.rows, "output length");
        let chunk = rows_per_task(self.rows);
        match &self.weights {
            Weights::Dense(values) => out
                .par_iter_mut()
                .with_min_len(chunk)
                .zip(values.par_chunks_exact(self.cols))
                .for_each(|(o, row)| *o = row.iter().zip(x).map(|(w, v)| w * v).sum()),
            Weights::Blocks {
                scales,
                mins,
                quants,
            } => {
                let simd = kernel.token();
                let a = Q8Vector::new(simd, x);
                let m = self.block_rows(scales, mins, quants);
                out.par_chunks_mut(chunk)
                    .enumerate()
                    .for_each(|(c, out)| match simd {
                        #[cfg(target_arch = "x86_64")]
                        Some(simd) => avx2::rows(simd, &m, &a, c * chunk, out),
                        _ => {
                            for (i, o) in out.iter_mut().enumerate() {
                                *o = m.row_dot(&a, c * chunk + i);
                            }
                        }
                    });
            }
        }
    }

    fn block_rows<'a>(
        &self,
        scales: &'a [f32],
        mins: &'a [f32],
        quants: &'a [u8],
    ) -> BlockRows<'a> {
        BlockRows {
            ty: self.ty,
            per_row: self.cols / BLOCK,
            scales,
            mins,
            quants,
        }
    }
}

/// Rows of a product per rayon task: a few tasks per thread, so that an idle thread can
/// take over, but not so many that the splitting costs more than the rows (the products
/// of a small model's token are tens of microseconds).
fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(4 * rayon::current_num_threads()).max(32)
}

/// The inner loops of the products.
///
/// Both compute the same integer dot products per block; [`Kernel::Avx2`] accumulates the
/// scaled block sums in another order (with FMA), so [`QMatrix::matvec`]'s results differ
/// in the last bits between kernels, while [`QMatrix::matvec_exact`]'s are the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Plain Rust for the baseline target, which the compiler vectorizes (SSE2 on x86_64).
    Portable,
    /// AVX2 and FMA (x86-64-v3) through `pulp`'s safe intrinsics: llama.cpp's
    /// `vpmaddubsw`/`vpmaddwd` block dot products. Only on x86_64 CPUs that have them.
    Avx2,
}

impl Kernel {
    /// Every kernel.
    pub const ALL: [Self; 2] = [Self::Portable, Self::Avx2];

    /// The fastest kernel this CPU runs, chosen once per process: AVX2 where the CPU has
    /// it, else the portable one. `CLEAVE_LLM_KERNEL=portable` in the environment asks for
    /// the portable one (to compare them).
    pub fn best() -> Self {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| {
            let portable = std::env::var("CLEAVE_LLM_KERNEL").is_ok_and(|v| v == "portable");
            if !portable && Self::Avx2.is_available() {
                Self::Avx2
            } else {
                Self::Portable
            }
        })
    }

    /// Whether this CPU runs this kernel.
    pub fn is_available(self) -> bool {
        match self {
            Self::Portable => true,
            Self::Avx2 => self.token().is_some(),
        }
    }

    /// The kernels this CPU runs.
    pub fn available() -> Vec<Self> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// The kernel's name (`portable`, `avx2`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
        }
    }

    /// The AVX2 token, or `None`: the portable loops.
    #[cfg(target_arch = "x86_64")]
    fn token(self) -> Option<pulp::x86::V3> {
        match self {
            Self::Avx2 => avx2::token(),
            Self::Portable => None,
        }
    }

    /// No SIMD kernel here: the portable loops.
    #[cfg(not(target_arch = "x86_64"))]
    fn token(self) -> Option<NoSimd> {
        None
    }
}

/// What [`Kernel::token`] gives where there is no SIMD kernel.
#[cfg(not(target_arch = "x86_64"))]
#[derive(Debug, Clone, Copy)]
enum NoSimd {}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `Σ a_i b_i` over the shorter of the two, with [`Kernel::best`] (the attention scores).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    match Kernel::best().token() {
        #[cfg(target_arch = "x86_64")]
        Some(simd) => avx2::dot(simd, a, b),
        _ => a.iter().zip(b).map(|(x, y)| x * y).sum(),
    }
}

/// A block matrix's arrays, as the kernels read them.
struct BlockRows<'a> {
    ty: GgmlType,
    /// Blocks per row.
    per_row: usize,
    scales: &'a [f32],
    /// Q4_1's minimums (empty for the other types).
    mins: &'a [f32],
    quants: &'a [u8],
}

impl<'a> BlockRows<'a> {
    /// Row `r`'s blocks (indices into `scales` and `mins`) and values.
    #[inline(always)]
    fn row(&self, r: usize) -> (std::ops::Range<usize>, &'a [u8]) {
        let blocks = r * self.per_row..(r + 1) * self.per_row;
        let qb = quant_bytes(self.ty);
        let q = &self.quants[blocks.start * qb..blocks.end * qb];
        (blocks, q)
    }

    /// Row `r` times `a`, portable.
    fn row_dot(&self, a: &Q8Vector, r: usize) -> f32 {
        let (blocks, q) = self.row(r);
        let d = &self.scales[blocks.clone()];
        match self.ty {
            GgmlType::Q8_0 => dot_q8_0(d, q, a),
            GgmlType::Q4_0 => dot_q4_0(d, q, a),
            _ => dot_q4_1(d, &self.mins[blocks], q, a),
        }
    }

    /// Row `r` times `a` with exact sums, portable.
    fn row_exact(&self, a: &Q8Vector, r: usize) -> f64 {
        let (blocks, q) = self.row(r);
        let d = &self.scales[blocks.clone()];
        let mins = (self.ty == GgmlType::Q4_1).then(|| &self.mins[blocks]);
        exact_blocks(d, mins, a, |b| block_int(self.ty, q, a, b))
    }
}

/// Every term of an exact sum is rounded to a multiple of 2^-`EXACT_GRID_BITS`.
pub const EXACT_GRID_BITS: u32 = 32;

/// Adding then subtracting this rounds an f64 below 2^19 in magnitude to the grid (half
/// to even): at 1.5·2^20 the spacing of f64 values is 2^-32.
const GRID_ROUNDER: f64 = 1_572_864.0; // 1.5 · 2^20

const _: () = assert!(GRID_ROUNDER == 1.5 * (1u64 << (52 - EXACT_GRID_BITS)) as f64);

/// `term` on the grid of exact sums.
fn on_grid(term: f32) -> f64 {
    (f64::from(term) + GRID_ROUNDER) - GRID_ROUNDER
}

impl QMatrix {
    /// `out = self · x` with exact sums (see the module's notes): `out[r]` is the sum, on
    /// the grid of 2⁻³², of each block's f32 contribution (of each product, for F32 and F16
    /// weights), so that the sums of a column split add up to the whole product bit for bit.
    ///
    /// # Panics
    ///
    /// If `x` is not `cols` long or `out` not `rows` long.
    pub fn matvec_exact(&self, x: &[f32], out: &mut [f64]) {
        self.matvec_exact_with(Kernel::best(), x, out);
    }

    /// [`QMatrix::matvec_exact`] with `kernel` (the portable one where `kernel` is not
    /// available): every kernel gives the same bits.
    ///
    /// # Panics
    ///
    /// If `x` is not `cols` long or `out` not `rows` long.
    pub fn matvec_exact_with(&self, kernel: Kernel, x: &[f32], out: &mut [f64]) {
        assert_eq!(x.len(), self.cols, "input length");
        assert_eq!(out.len(), self.rows, "output length");
        let chunk = rows_per_task(self.rows);
        match &self.weights {
            Weights::Dense(values) => out
                .par_iter_mut()
                .with_min_len(chunk)
                .zip(values.par_chunks_exact(self.cols))
                // Unquantized columns may be split anywhere: each product is a term.
                .for_each(|(o, row)| *o = row.iter().zip(x).map(|(w, v)| on_grid(w * v)).sum()),
            Weights::Blocks {
                scales,
                mins,
                quants,
            } => {
                let simd = kernel.token();
                let a = Q8Vector::new(simd, x);
                let m = self.block_rows(scales, mins, quants);
                out.par_chunks_mut(chunk)
                    .enumerate()
                    .for_each(|(c, out)| match simd {
                        #[cfg(target_arch = "x86_64")]
                        Some(simd) => avx2::rows_exact(simd, &m, &a, c * chunk, out),
                        _ => {
                            for (i, o) in out.iter_mut().enumerate() {
                                *o = m.row_exact(&a, c * chunk + i);
                            }
                        }
                    });
            }
        }
    }
}

/// The integer dot product of block `b` of a row's values `q` with the activations.
fn block_int(ty: GgmlType, q: &[u8], a: &Q8Vector, b: usize) -> i32 {
    let x = &a.quants[b * 32..b * 32 + 32];
    match ty {
        GgmlType::Q8_0 => q[b * 32..b * 32 + 32]
            .iter()
            .zip(x)
            .map(|(&w, &x)| i32::from(w.cast_signed()) * i32::from(x))
            .sum(),
        GgmlType::Q4_0 => {
            let xsum: i32 = x.iter().map(|&v| i32::from(v)).sum();
            nibble_dot(&q[b * 16..b * 16 + 16], x) - 8 * xsum
        }
        _ => nibble_dot(&q[b * 16..b * 16 + 16], x),
    }
}

/// `Σ_b grid(d_w[b] · d_x[b] · int(b) (+ m_w[b] · d_x[b] Σ q_x))`, in f64.
fn exact_blocks(d: &[f32], mins: Option<&[f32]>, a: &Q8Vector, int: impl Fn(usize) -> i32) -> f64 {
    let mut total = 0.0;
    let mut lanes = [0.0f64; GROUP];
    for (g, dw) in d.chunks(GROUP).enumerate() {
        let first = g * GROUP;
        for (i, (lane, &w)) in lanes.iter_mut().zip(dw).enumerate() {
            let b = first + i;
            let mut term = w * a.scales[b] * int(b) as f32;
            if let Some(m) = mins {
                term += m[b] * a.sums[b];
            }
            *lane = on_grid(term);
        }
        // Grid values: the order of these additions does not matter.
        total += lanes[..dw.len()].iter().sum::<f64>();
    }
    total
}

/// Bytes of values per block in the repacked layout.
fn quant_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q8_0 => 32,
        _ => 16,
    }
}

/// ggml blocks → separate scales, minimums and values.
fn repack(ty: GgmlType, bytes: &[u8]) -> Weights {
    let block = ty.block_bytes();
    let n = bytes.len() / block;
    let mut scales = Vec::with_capacity(n);
    let mut mins = Vec::new();
    let mut quants = Vec::with_capacity(n * quant_bytes(ty));
    for b in bytes.chunks_exact(block) {
        scales.push(f16_at(b, 0));
        match ty {
            GgmlType::Q4_1 => {
                mins.push(f16_at(b, 2));
                quants.extend_from_slice(&b[4..20]);
            }
            _ => quants.extend_from_slice(&b[2..]),
        }
    }
    Weights::Blocks {
        scales,
        mins,
        quants,
    }
}

fn f16_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// An activation vector in 8-bit blocks of 32: `x ≈ scale · q`, and each block's `scale ·
/// Σ q` (what a Q4_1 minimum multiplies).
struct Q8Vector {
    scales: Vec<f32>,
    sums: Vec<f32>,
    quants: Vec<i8>,
}

impl Q8Vector {
    /// `x` quantized; the same values whatever the kernel (the AVX2 one compiles the same
    /// loop for AVX2, where `round` is an instruction sequence rather than a libm call).
    #[cfg(target_arch = "x86_64")]
    fn new(simd: Option<pulp::x86::V3>, x: &[f32]) -> Self {
        match simd {
            Some(simd) => avx2::quantize(simd, x),
            None => Self::quantize(x),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn new(_: Option<NoSimd>, x: &[f32]) -> Self {
        Self::quantize(x)
    }

    #[inline(always)]
    fn quantize(x: &[f32]) -> Self {
        let n = x.len() / BLOCK;
        let mut scales = Vec::with_capacity(n);
        let mut sums = Vec::with_capacity(n);
        let mut quants = vec![0i8; n * BLOCK];
        for (block, q) in x.chunks_exact(BLOCK).zip(quants.chunks_exact_mut(BLOCK)) {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            for (q, v) in q.iter_mut().zip(block) {
                *q = (v * id).round() as i8;
            }
            let total: i32 = q.iter().map(|&q| i32::from(q)).sum();
            scales.push(d);
            sums.push(d * total as f32);
        }
        Self {
            scales,
            sums,
            quants,
        }
    }
}

/// Blocks whose integer sums are gathered before their scales are applied: the float work
/// then runs as a vector loop over blocks instead of a chain through one accumulator.
const GROUP: usize = 16;

/// `Σ_b (d_w[b] · d_x[b] · ints[b] + offsets[b])` over a group of blocks, vectorizable.
fn scaled_sum(dw: &[f32], dx: &[f32], ints: &[f32], offsets: Option<(&[f32], &[f32])>) -> f32 {
    let mut lanes = [0.0f32; GROUP];
    for (((lane, &w), &x), &i) in lanes.iter_mut().zip(dw).zip(dx).zip(ints) {
        *lane = w * x * i;
    }
    if let Some((mw, sx)) = offsets {
        for ((lane, &m), &s) in lanes.iter_mut().zip(mw).zip(sx) {
            *lane += m * s;
        }
    }
    lanes.iter().sum()
}

/// `Σ_b d_w[b] · d_x[b] · int(b) (+ m_w[b] · d_x[b] Σ q_x)` over a row's blocks, with
/// `int(b)` the block's integer dot product.
fn dot_blocks(d: &[f32], mins: Option<&[f32]>, a: &Q8Vector, int: impl Fn(usize) -> i32) -> f32 {
    let mut total = 0.0;
    let mut ints = [0.0f32; GROUP];
    for (g, dw) in d.chunks(GROUP).enumerate() {
        let first = g * GROUP;
        for (i, slot) in ints.iter_mut().enumerate().take(dw.len()) {
            *slot = int(first + i) as f32;
        }
        let offsets = mins.map(|m| (&m[first..first + dw.len()], &a.sums[first..]));
        total += scaled_sum(dw, &a.scales[first..], &ints, offsets);
    }
    total
}

/// Σ over blocks of `d_w · d_x · Σ q_w q_x`.
fn dot_q8_0(d: &[f32], q: &[u8], a: &Q8Vector) -> f32 {
    dot_blocks(d, None, a, |b| {
        let (w, x) = (&q[b * 32..b * 32 + 32], &a.quants[b * 32..b * 32 + 32]);
        w.iter()
            .zip(x)
            .map(|(&w, &x)| i32::from(w.cast_signed()) * i32::from(x))
            .sum()
    })
}

/// Σ over blocks of `d_w · d_x · Σ (q_w − 8) q_x`.
fn dot_q4_0(d: &[f32], q: &[u8], a: &Q8Vector) -> f32 {
    dot_blocks(d, None, a, |b| {
        let x = &a.quants[b * 32..b * 32 + 32];
        let xsum: i32 = x.iter().map(|&v| i32::from(v)).sum();
        nibble_dot(&q[b * 16..b * 16 + 16], x) - 8 * xsum
    })
}

/// Σ over blocks of `d_w · d_x · Σ q_w q_x + m_w · d_x Σ q_x`.
fn dot_q4_1(d: &[f32], m: &[f32], q: &[u8], a: &Q8Vector) -> f32 {
    dot_blocks(d, Some(m), a, |b| {
        nibble_dot(&q[b * 16..b * 16 + 16], &a.quants[b * 32..b * 32 + 32])
    })
}

/// Σ q_j x_j for one block: 16 packed bytes (values 0..16 in the low nibbles, 16..32 in the
/// high ones) against 32 i8.
fn nibble_dot(w: &[u8], x: &[i8]) -> i32 {
    let (lo, hi) = x.split_at(16);
    let mut acc = 0i32;
    for ((&w, &a), &b) in w.iter().zip(lo).zip(hi) {
        acc += i32::from(w & 0x0F) * i32::from(a) + i32::from(w >> 4) * i32::from(b);
    }
    acc
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
            // The block types quantize x to 8 bits per block of 32: each value is off by
            // at most half a step, amax / 254, which bounds the error of each row.
            let step: Vec<f32> = x
                .chunks(BLOCK)
                .flat_map(|b| {
                    let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    vec![amax / 254.0; b.len()]
                })
                .collect();
            for r in 0..rows {
                let row = &dense[r * cols..(r + 1) * cols];
                let expected: f32 = row.iter().zip(&x).map(|(w, v)| w * v).sum();
                let bound: f32 = match ty {
                    GgmlType::F32 | GgmlType::F16 => 0.0,
                    _ => row.iter().zip(&step).map(|(w, s)| w.abs() * s).sum(),
                };
                assert!(
                    (out[r] - expected).abs() <= bound + 1e-4 * (1.0 + expected.abs()),
                    "{ty} row {r}: {} vs {expected} (bound {bound})",
                    out[r]
                );
            }
            let mut row = Vec::new();
            matrix.row_into(3, &mut row);
            assert_eq!(row, dense[3 * cols..4 * cols]);
        }
    }

    #[test]
    fn row_and_column_slices_are_the_dense_slices() {
        let (rows, cols) = (5, 128);
        let weights: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 13) % 31) as f32 / 15.0 - 1.0)
            .collect();
        for ty in GgmlType::ALL {
            let mut bytes = Vec::new();
            quantize(ty, &weights, &mut bytes).unwrap();
            let matrix = QMatrix::new(ty, rows, cols, bytes).unwrap();
            let dense = |m: &QMatrix| -> Vec<f32> {
                let mut all = Vec::new();
                let mut row = Vec::new();
                for r in 0..m.rows() {
                    m.row_into(r, &mut row);
                    all.extend_from_slice(&row);
                }
                all
            };
            let full = dense(&matrix);
            let rows_1_4 = matrix.select_rows(1..4);
            assert_eq!((rows_1_4.rows(), rows_1_4.cols()), (3, cols));
            assert_eq!(dense(&rows_1_4), full[cols..4 * cols]);
            let cols_32_96 = matrix.select_cols(32..96);
            assert_eq!((cols_32_96.rows(), cols_32_96.cols()), (rows, 64));
            let expected: Vec<f32> = full
                .chunks_exact(cols)
                .flat_map(|r| r[32..96].to_vec())
                .collect();
            assert_eq!(dense(&cols_32_96), expected, "{ty}");
        }
    }

    /// The exact product of a column split adds up, in any order, to the whole product
    /// bit for bit; and it is the ordinary product up to f32 rounding.
    #[test]
    fn exact_sums_of_column_slices_equal_the_whole_bit_for_bit() {
        let (rows, cols) = (9, 320);
        let weights: Vec<f32> = (0..rows * cols)
            .map(|i| {
                (((i * 7919) % 1013) as f32 / 506.0 - 1.0) * if i % 5 == 0 { 40.0 } else { 0.3 }
            })
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| {
                (((i * 104_729) % 977) as f32 / 488.0 - 1.0) * if i % 7 == 0 { 9.0 } else { 0.01 }
            })
            .collect();
        for ty in GgmlType::ALL {
            let mut bytes = Vec::new();
            quantize(ty, &weights, &mut bytes).unwrap();
            let matrix = QMatrix::new(ty, rows, cols, bytes).unwrap();
            let mut whole = vec![0.0f64; rows];
            matrix.matvec_exact(&x, &mut whole);
            let mut plain = vec![0.0f32; rows];
            matrix.matvec(&x, &mut plain);
            for (e, p) in whole.iter().zip(&plain) {
                assert!(
                    (*e as f32 - p).abs() <= 1e-4 * (1.0 + p.abs()),
                    "{ty}: {e} vs {p}"
                );
            }
            for cuts in [
                vec![0, 32, 320],
                vec![0, 96, 160, 288, 320],
                vec![0, 64, 128, 192, 256, 320],
            ] {
                let parts: Vec<Vec<f64>> = cuts
                    .windows(2)
                    .map(|w| {
                        let mut part = vec![0.0f64; rows];
                        matrix
                            .select_cols(w[0]..w[1])
                            .matvec_exact(&x[w[0]..w[1]], &mut part);
                        part
                    })
                    .collect();
                for order in [false, true] {
                    let mut sum = vec![0.0f64; rows];
                    let mut list: Vec<&Vec<f64>> = parts.iter().collect();
                    if order {
                        list.reverse();
                    }
                    for part in list {
                        sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
                    }
                    assert_eq!(sum, whole, "{ty} {cuts:?} reversed: {order}");
                }
            }
        }
    }

    /// A small deterministic generator (xorshift64*), so that the tests need no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        /// Uniform in [−1, 1).
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// Random blocks of `ty` in ggml's layout: random value bytes (every nibble and byte,
    /// −128 included), f16 scales of mixed magnitudes and signs; every 7th block at the
    /// extremes (all values 0, or all at the top: 15, 127 or −128).
    fn random_blocks(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        let blocks = rows * cols / BLOCK;
        let mut bytes = Vec::with_capacity(blocks * ty.block_bytes());
        for b in 0..blocks {
            let scale = |rng: &mut Rng| {
                let magnitude = [1e-3f32, 0.02, 0.5, 7.0][(rng.next() % 4) as usize];
                half::f16::from_f32(rng.unit() * magnitude).to_le_bytes()
            };
            bytes.extend_from_slice(&scale(rng));
            if ty == GgmlType::Q4_1 {
                bytes.extend_from_slice(&scale(rng));
            }
            let n = if ty == GgmlType::Q8_0 { 32 } else { 16 };
            for _ in 0..n {
                bytes.push(match (b % 7, b % 3) {
                    (0, 0) => 0x00,
                    (0, 1) => 0xFF,
                    (0, _) => 0x80,
                    _ => rng.next() as u8,
                });
            }
        }
        bytes
    }

    /// Activations of mixed magnitudes; some blocks all zero, some with one huge value.
    fn random_activations(cols: usize, rng: &mut Rng) -> Vec<f32> {
        let mut x: Vec<f32> = (0..cols).map(|_| rng.unit() * 3.0).collect();
        for (b, block) in x.chunks_mut(BLOCK).enumerate() {
            match b % 5 {
                1 => block.fill(0.0),
                2 => block[(b * 7) % BLOCK] = -60.0,
                3 => block.iter_mut().for_each(|v| *v *= 1e-6),
                _ => {}
            }
        }
        x
    }

    /// The SIMD kernels against the portable ones on random matrices of every block type
    /// and sizes that are not powers of two: the ordinary product within float rounding of
    /// the sums, the exact one bit for bit.
    #[test]
    fn simd_kernels_equal_the_portable_ones() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let simd: Vec<Kernel> = Kernel::available()
            .into_iter()
            .filter(|&k| k != Kernel::Portable)
            .collect();
        if simd.is_empty() {
            eprintln!("no SIMD kernel on this CPU: nothing to compare");
        }
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            for (rows, cols) in [(1, 32), (37, 352), (129, 96), (300, 1504), (5, 224)] {
                let bytes = random_blocks(ty, rows, cols, &mut rng);
                let matrix = QMatrix::new(ty, rows, cols, bytes).unwrap();
                let x = random_activations(cols, &mut rng);
                let mut portable = vec![0.0f32; rows];
                matrix.matvec_with(Kernel::Portable, &x, &mut portable);
                let mut portable_exact = vec![0.0f64; rows];
                matrix.matvec_exact_with(Kernel::Portable, &x, &mut portable_exact);
                // The bound of a row's rounding: its dense terms' magnitudes.
                let mut dense = Vec::new();
                let magnitude: Vec<f32> = (0..rows)
                    .map(|r| {
                        matrix.row_into(r, &mut dense);
                        dense.iter().zip(&x).map(|(w, v)| (w * v).abs()).sum()
                    })
                    .collect();
                // Exact sums are exact (in any order) while a row's terms add up to less
                // than 2²¹: the matrices here stay within that.
                for (r, m) in magnitude.iter().enumerate() {
                    assert!(*m < (1 << 20) as f32, "{ty} row {r}: magnitude {m}");
                }
                for &kernel in &simd {
                    let mut out = vec![0.0f32; rows];
                    matrix.matvec_with(kernel, &x, &mut out);
                    for r in 0..rows {
                        assert!(
                            (out[r] - portable[r]).abs() <= 1e-5 * magnitude[r] + 1e-30,
                            "{kernel} {ty} {rows}×{cols} row {r}: {} vs {} (magnitude {})",
                            out[r],
                            portable[r],
                            magnitude[r]
                        );
                    }
                    let mut exact = vec![0.0f64; rows];
                    matrix.matvec_exact_with(kernel, &x, &mut exact);
                    let bits = |v: &[f64]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&exact),
                        bits(&portable_exact),
                        "{kernel} {ty} {rows}×{cols}: exact sums differ"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_dot_equals_the_portable_one() {
        let mut rng = Rng(7);
        for n in [0, 1, 7, 8, 15, 16, 17, 64, 100] {
            let a: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.unit() * 10.0).collect();
            let expected: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let magnitude: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
            let got = dot(&a, &b);
            assert!(
                (got - expected).abs() <= 1e-5 * magnitude,
                "{n}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn sizes_must_agree() {
        assert!(QMatrix::new(GgmlType::Q4_1, 2, 64, vec![0; 80]).is_ok());
        assert!(QMatrix::new(GgmlType::Q4_1, 2, 64, vec![0; 79]).is_err());
        assert!(QMatrix::new(GgmlType::Q8_0, 1, 48, vec![0; 51]).is_err());
    }
}
