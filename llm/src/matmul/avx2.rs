//! The AVX2 kernels (x86-64-v3: AVX2 and FMA), through `pulp`'s safe intrinsics.
//!
//! A block's integer dot product is llama.cpp's: 32 unsigned bytes times 32 signed ones
//! with `vpmaddubsw` (pairs summed into 16 i16, which cannot saturate here: the unsigned
//! side is at most 15 for the 4-bit types and the signed side, activations quantized to
//! ±127, at most 127 in magnitude, so a pair is at most 2 · 128 · 127 < 2¹⁵), then
//! `vpmaddwd` by ones into 8 i32. Signed weights (Q8_0, Q4_0 less 8) go through the
//! `vpsignb` trick: |w| times x with w's sign. The integer sums are exact, so they are the
//! portable kernel's to the bit.
//!
//! - [`rows`] (the ordinary product) keeps the 8 lanes and accumulates
//!   `lanes · (d_w · d_x)` with FMA, one horizontal sum per row: float rounding differs
//!   from the portable kernel's.
//! - [`rows_exact`] reduces 8 blocks' lanes to their 8 integer sums and then computes each
//!   block's term with the portable kernel's f32 operations in its order (multiplies and an
//!   add, never fused), puts it on the grid in f64 and adds: the portable result to the bit.

use core::arch::x86_64::{__m128i, __m256, __m256d, __m256i};

use pulp::x86::V3;

use super::{BlockRows, GRID_ROUNDER, Q8Vector, on_grid};
use crate::quant::GgmlType;

/// The AVX2 token, if this CPU runs AVX2 and FMA.
pub(super) fn token() -> Option<V3> {
    V3::try_new()
}

// The kernels are run as `NullaryFnOnce` structs with an `#[inline(always)]` `call`, not
// as closures: a closure is not reliably inlined into pulp's target-feature function, and
// whatever is not inlined there compiles without AVX2, its intrinsics as calls.

/// `out[i]` = row `first + i` of `m` times `a`.
pub(super) fn rows(simd: V3, m: &BlockRows<'_>, a: &Q8Vector, first: usize, out: &mut [f32]) {
    simd.vectorize(Rows {
        simd,
        m,
        a,
        first,
        out,
    });
}

struct Rows<'a, 'm, O> {
    simd: V3,
    m: &'a BlockRows<'m>,
    a: &'a Q8Vector,
    first: usize,
    out: &'a mut [O],
}

impl pulp::NullaryFnOnce for Rows<'_, '_, f32> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        for (i, o) in self.out.iter_mut().enumerate() {
            *o = row(self.simd, self.m, self.a, self.first + i);
        }
    }
}

impl pulp::NullaryFnOnce for Rows<'_, '_, f64> {
    type Output = ();

    #[inline(always)]
    fn call(self) {
        for (i, o) in self.out.iter_mut().enumerate() {
            *o = row_exact(self.simd, self.m, self.a, self.first + i);
        }
    }
}

/// `out[i]` = the exact sum of row `first + i` of `m` times `a` (see the module's notes).
pub(super) fn rows_exact(simd: V3, m: &BlockRows<'_>, a: &Q8Vector, first: usize, out: &mut [f64]) {
    simd.vectorize(Rows {
        simd,
        m,
        a,
        first,
        out,
    });
}

/// Σ a_i b_i over the shorter of the two.
pub(super) fn dot(simd: V3, a: &[f32], b: &[f32]) -> f32 {
    simd.vectorize(Dot { simd, a, b })
}

struct Dot<'a> {
    simd: V3,
    a: &'a [f32],
    b: &'a [f32],
}

impl pulp::NullaryFnOnce for Dot<'_> {
    type Output = f32;

    #[inline(always)]
    fn call(self) -> f32 {
        let Self { simd, a, b } = self;
        let n = a.len().min(b.len());
        let (a8, a_tail) = pulp::as_arrays::<8, f32>(&a[..n]);
        let (b8, b_tail) = pulp::as_arrays::<8, f32>(&b[..n]);
        let mut acc = [simd.avx._mm256_setzero_ps(); 2];
        for (x, y) in a8.chunks_exact(2).zip(b8.chunks_exact(2)) {
            for k in 0..2 {
                acc[k] = simd.fma._mm256_fmadd_ps(
                    pulp::cast::<[f32; 8], __m256>(x[k]),
                    pulp::cast(y[k]),
                    acc[k],
                );
            }
        }
        if a8.len() % 2 == 1 {
            let (x, y) = (a8[a8.len() - 1], b8[b8.len() - 1]);
            acc[0] = simd
                .fma
                ._mm256_fmadd_ps(pulp::cast(x), pulp::cast(y), acc[0]);
        }
        let mut total = hsum_f32(simd.avx._mm256_add_ps(acc[0], acc[1]));
        for (x, y) in a_tail.iter().zip(b_tail) {
            total += x * y;
        }
        total
    }
}

/// `x` quantized to 8-bit blocks: `Q8Vector::quantize` compiled for AVX2 (the same
/// operations, so the same values; `round` becomes instructions instead of a libm call).
pub(super) fn quantize(simd: V3, x: &[f32]) -> Q8Vector {
    simd.vectorize(Quantize(x))
}

struct Quantize<'a>(&'a [f32]);

impl pulp::NullaryFnOnce for Quantize<'_> {
    type Output = Q8Vector;

    #[inline(always)]
    fn call(self) -> Q8Vector {
        Q8Vector::quantize(self.0)
    }
}

/// Sum of 8 f32 lanes.
#[inline(always)]
fn hsum_f32(v: __m256) -> f32 {
    let lanes: [f32; 8] = pulp::cast(v);
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// Sum of 8 i32 lanes.
#[inline(always)]
fn hsum_i32(v: __m256i) -> i32 {
    let lanes: [i32; 8] = pulp::cast(v);
    lanes.iter().sum()
}

/// 16 packed bytes → 32 unsigned bytes: the low nibbles (values 0..16), then the high ones.
#[inline(always)]
fn nibbles(simd: V3, w: &[u8; 16]) -> __m256i {
    let raw: __m128i = pulp::cast(*w);
    let high = simd.sse2._mm_srli_epi16::<4>(raw);
    let both = simd.avx._mm256_set_m128i(high, raw);
    simd.avx2
        ._mm256_and_si256(both, simd.avx._mm256_set1_epi8(0x0F))
}

/// 8 i32 lanes that add up to Σ u_j s_j (u unsigned, s signed, both bytes).
#[inline(always)]
fn dot_u8_i8(simd: V3, u: __m256i, s: __m256i) -> __m256i {
    let pairs = simd.avx2._mm256_maddubs_epi16(u, s);
    simd.avx2
        ._mm256_madd_epi16(pairs, simd.avx._mm256_set1_epi16(1))
}

/// 8 i32 lanes that add up to Σ w_j x_j (both signed bytes, x never −128).
#[inline(always)]
fn dot_i8_i8(simd: V3, w: __m256i, x: __m256i) -> __m256i {
    let abs_w = simd.avx2._mm256_sign_epi8(w, w);
    let signed_x = simd.avx2._mm256_sign_epi8(x, w);
    dot_u8_i8(simd, abs_w, signed_x)
}

/// Block `b` of a row's values `q` (`ty`'s repacked bytes) against the activations' block
/// `x`: 8 i32 lanes that add up to the block's integer dot product.
#[inline(always)]
fn block_lanes(simd: V3, ty: GgmlType, q: &[u8], b: usize, x: &[i8; 32]) -> __m256i {
    let x: __m256i = pulp::cast(*x);
    match ty {
        GgmlType::Q8_0 => {
            let w: &[u8; 32] = &pulp::as_arrays::<32, u8>(q).0[b];
            dot_i8_i8(simd, pulp::cast(*w), x)
        }
        GgmlType::Q4_0 => {
            let w = nibbles(simd, &pulp::as_arrays::<16, u8>(q).0[b]);
            let w = simd.avx2._mm256_sub_epi8(w, simd.avx._mm256_set1_epi8(8));
            dot_i8_i8(simd, w, x)
        }
        _ => dot_u8_i8(simd, nibbles(simd, &pulp::as_arrays::<16, u8>(q).0[b]), x),
    }
}

/// A row's blocks as f32 lanes and their scales.
struct ScaledBlocks<'a> {
    simd: V3,
    ty: GgmlType,
    q: &'a [u8],
    x: &'a [[i8; 32]],
    d: &'a [f32],
    dx: &'a [f32],
}

impl ScaledBlocks<'_> {
    /// Block `b`'s 8 lanes as f32, and `d_w · d_x` in every lane.
    #[inline(always)]
    fn get(&self, b: usize) -> (__m256, __m256) {
        let simd = self.simd;
        let lanes = block_lanes(simd, self.ty, self.q, b, &self.x[b]);
        let ints = simd.avx._mm256_cvtepi32_ps(lanes);
        (ints, simd.avx._mm256_set1_ps(self.d[b] * self.dx[b]))
    }
}

/// Blocks `first..first + 8` of a row: each one's 8 lanes.
#[inline(always)]
fn lanes8(simd: V3, ty: GgmlType, q: &[u8], x: &[[i8; 32]], first: usize) -> [__m256i; 8] {
    let mut lanes = [simd.avx._mm256_setzero_si256(); 8];
    for (k, lane) in lanes.iter_mut().enumerate() {
        *lane = block_lanes(simd, ty, q, first + k, &x[first + k]);
    }
    lanes
}

/// Row `r` of `m` times `a`, FMA-accumulated.
#[inline(always)]
fn row(simd: V3, m: &BlockRows<'_>, a: &Q8Vector, r: usize) -> f32 {
    let (blocks, q) = m.row(r);
    let d = &m.scales[blocks.clone()];
    let x = pulp::as_arrays::<32, i8>(&a.quants).0;
    let n = d.len();
    // No closures in the kernels: they would not inherit the target features, and the
    // intrinsics in them would become calls.
    let scaled = ScaledBlocks {
        simd,
        ty: m.ty,
        q,
        x,
        d,
        dx: &a.scales,
    };
    // Two accumulators: one FMA chain would wait on its own latency every block.
    let mut acc = [simd.avx._mm256_setzero_ps(); 2];
    let mut b = 0;
    while b + 2 <= n {
        for (k, slot) in acc.iter_mut().enumerate() {
            let (ints, scale) = scaled.get(b + k);
            *slot = simd.fma._mm256_fmadd_ps(ints, scale, *slot);
        }
        b += 2;
    }
    if b < n {
        let (ints, scale) = scaled.get(b);
        acc[0] = simd.fma._mm256_fmadd_ps(ints, scale, acc[0]);
    }
    let mut total = hsum_f32(simd.avx._mm256_add_ps(acc[0], acc[1]));
    if m.ty == GgmlType::Q4_1 {
        let mins = &m.mins[blocks];
        let (mut even, mut odd) = (0.0f32, 0.0f32);
        for (pair_m, pair_s) in mins.chunks(2).zip(a.sums.chunks(2)) {
            even += pair_m[0] * pair_s[0];
            if let (Some(m1), Some(s1)) = (pair_m.get(1), pair_s.get(1)) {
                odd += m1 * s1;
            }
        }
        total += even + odd;
    }
    total
}

/// The 8 sums of 8 vectors' lanes, in order.
#[inline(always)]
fn reduce8(simd: V3, v: [__m256i; 8]) -> __m256i {
    let avx2 = simd.avx2;
    let t0 = avx2._mm256_hadd_epi32(v[0], v[1]);
    let t1 = avx2._mm256_hadd_epi32(v[2], v[3]);
    let t2 = avx2._mm256_hadd_epi32(v[4], v[5]);
    let t3 = avx2._mm256_hadd_epi32(v[6], v[7]);
    // Per 128-bit half: [v0, v1, v2, v3] and [v4, v5, v6, v7], each a half's partial sum.
    let u0 = avx2._mm256_hadd_epi32(t0, t1);
    let u1 = avx2._mm256_hadd_epi32(t2, t3);
    let low = avx2._mm256_permute2x128_si256::<0x20>(u0, u1);
    let high = avx2._mm256_permute2x128_si256::<0x31>(u0, u1);
    avx2._mm256_add_epi32(low, high)
}

/// 4 f32 on the grid of exact sums, as f64 (see `on_grid`).
#[inline(always)]
fn grid4(simd: V3, v: core::arch::x86_64::__m128) -> __m256d {
    let rounder = simd.avx._mm256_set1_pd(GRID_ROUNDER);
    let wide = simd.avx._mm256_cvtps_pd(v);
    simd.avx
        ._mm256_sub_pd(simd.avx._mm256_add_pd(wide, rounder), rounder)
}

/// The exact sum of row `r` of `m` times `a`: the portable kernel's, to the bit.
#[inline(always)]
fn row_exact(simd: V3, m: &BlockRows<'_>, a: &Q8Vector, r: usize) -> f64 {
    let (blocks, q) = m.row(r);
    let d = &m.scales[blocks.clone()];
    let mins = (m.ty == GgmlType::Q4_1).then(|| &m.mins[blocks]);
    let x = pulp::as_arrays::<32, i8>(&a.quants).0;
    let avx = simd.avx;
    let mut total = avx._mm256_setzero_pd();
    let (d8, _) = pulp::as_arrays::<8, f32>(d);
    let (dx8, _) = pulp::as_arrays::<8, f32>(&a.scales);
    let (sx8, _) = pulp::as_arrays::<8, f32>(&a.sums);
    let m8 = mins.map(|m| pulp::as_arrays::<8, f32>(m).0);
    for g in 0..d8.len() {
        let first = 8 * g;
        let ints = avx._mm256_cvtepi32_ps(reduce8(simd, lanes8(simd, m.ty, q, x, first)));
        let w: __m256 = pulp::cast(d8[g]);
        let dx: __m256 = pulp::cast(dx8[g]);
        // (d_w · d_x) · int, then + m_w · s_x: the portable order, unfused.
        let mut term = avx._mm256_mul_ps(avx._mm256_mul_ps(w, dx), ints);
        if let Some(m8) = m8 {
            let mw: __m256 = pulp::cast(m8[g]);
            let sx: __m256 = pulp::cast(sx8[g]);
            term = avx._mm256_add_ps(term, avx._mm256_mul_ps(mw, sx));
        }
        total = avx._mm256_add_pd(total, grid4(simd, avx._mm256_castps256_ps128(term)));
        total = avx._mm256_add_pd(total, grid4(simd, avx._mm256_extractf128_ps::<1>(term)));
    }
    // Grid values: the order of these additions does not matter.
    let lanes: [f64; 4] = pulp::cast(total);
    let mut sum: f64 = lanes.iter().sum();
    for b in 8 * d8.len()..d.len() {
        let int = hsum_i32(block_lanes(simd, m.ty, q, b, &x[b]));
        let mut term = d[b] * a.scales[b] * int as f32;
        if let Some(mins) = mins {
            term += mins[b] * a.sums[b];
        }
        sum += on_grid(term);
    }
    sum
}
