//! Hand-written Rust microkernels that generated loop nests call for compute-bound tiles.
//!
//! Cranelift's widest vector is 128 bits (cranelift.md section 4), which caps generated code
//! at half of an AVX2 core's multiply-add rate. The contraction kernel calls [`panel_rows`]
//! (or, for 16-bit weights, [`f16_panel_rows`] and [`bf16_panel_rows`], which widen each
//! weight once for a tile of up to three rows of x, or the whole panel once for four rows
//! or more) for each weight panel of 4 rows with every row of x: three rows of x at a time (12 256-bit accumulators, 4 weight and 3 x loads per
//! 12 fused multiply-adds), then a pair or a row alone (decode).
//!
//! Every tile adds in exactly the order the generated single-row code does (lanes 0..4 and
//! 4..8 of each 8-column chunk in two partial sums, the 4-wide tail step into the first, the
//! halves added, then `(l0 + l1) + (l2 + l3)`, then the scalar tail), so a row's result
//! does not depend on the rows computed with it: batching and prefill change no bit of
//! any output. The 16-bit row kernels ([`f16_row`], [`bf16_row`]) add a row-major row in
//! that order too, so neither does it depend on whether the row lies in a panel.

#![allow(
    unsafe_code,
    reason = "AVX2 intrinsics on pointers checked by the caller"
)]

use crate::kernel::{PANEL_COLS, PANEL_ROWS};

/// Whether this machine runs [`panel_rows`] and the other microkernels (x86-64 with AVX2,
/// FMA and F16C, which every AVX2 CPU has).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The symbol generated code imports [`panel_rows`] under.
pub const PANEL_ROWS_FN: &str = "llmc_panel_rows";

/// The symbol generated code imports [`f16_panel_rows`] under.
pub const F16_PANEL_ROWS: &str = "llmc_f16_panel_rows";

/// The symbol generated code imports [`bf16_panel_rows`] under.
pub const BF16_PANEL_ROWS: &str = "llmc_bf16_panel_rows";

/// How a microkernel's weights are stored ([`F32`], [`F16`], [`BF16`]): a const parameter
/// that picks how [`load8`], [`load4`] and [`load1`] widen them.
type Elem = u8;

/// `f32` weights.
const F32: Elem = 0;

/// IEEE half-precision weights, widened by F16C's `vcvtph2ps` (exact for every f16).
const F16: Elem = 1;

/// bf16 weights, each the top half of its f32.
const BF16: Elem = 2;

/// `y[i * n + r] = dot(x_i, w_r)` for the `m` rows `x_i` of x (`k` floats each, one
/// after another) and the [`PANEL_ROWS`] rows `w_r` of the weight panel at `w` (row length
/// `k`, layout of [`pack_panels`](crate::kernel::pack_panels)): three rows of x at a time
/// (12 accumulators and the loads of 3 x and 4 weight vectors fill AVX2's 16 registers;
/// four rows spill and ran at half the speed), then two, then one (prefill and batched
/// decode take the first, decode the last), every row with the same additions in the
/// same order.
///
/// # Safety
///
/// `x` points to `m * k` floats, `w` to a panel of `4 * k` floats, `y` (for `m` above 0)
/// to `(m - 1) * n + 4` writable floats, and the CPU has AVX2, FMA and F16C
/// ([`available`]); nothing is read or written when `m` is 0.
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn panel_rows(
    k: i64,
    x: *const f32,
    m: i64,
    w: *const f32,
    y: *mut f32,
    n: i64,
) {
    // SAFETY: forwarded from this function's contract.
    unsafe { panels_of::<F32>(k, x, m, w.cast(), y, n) }
}

/// [`panel_rows`] for a panel of f16 weights (`PackedF16` in the layout of
/// [`pack_weight_panels`](crate::kernel::pack_weight_panels)), widened as they load: each
/// weight once for a tile of up to three rows of x, or the whole panel once, into f32s,
/// when four or more rows of x meet it.
///
/// # Safety
///
/// As [`panel_rows`], with `w` pointing to a panel of `4 * k` f16s.
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn f16_panel_rows(
    k: i64,
    x: *const f32,
    m: i64,
    w: *const u8,
    y: *mut f32,
    n: i64,
) {
    // SAFETY: forwarded from this function's contract.
    unsafe { panels_of::<F16>(k, x, m, w, y, n) }
}

/// [`f16_panel_rows`] for a panel of bf16 weights (`PackedBF16`).
///
/// # Safety
///
/// As [`f16_panel_rows`].
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn bf16_panel_rows(
    k: i64,
    x: *const f32,
    m: i64,
    w: *const u8,
    y: *mut f32,
    n: i64,
) {
    // SAFETY: forwarded from this function's contract.
    unsafe { panels_of::<BF16>(k, x, m, w, y, n) }
}

/// Rows of x from which a 16-bit panel is widened into f32s once, before the tiles run
/// (fewer widen it chunk by chunk in the tiles, which is cheaper for one tile).
const WIDEN_FIRST_ROWS: i64 = 4;

thread_local! {
    /// The f32s of the 16-bit panel a thread's [`panels_of`] widened last.
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The panel microkernels over weights stored as `ELEM`: tiles of three rows of x, then
/// two or one. A 16-bit panel that [`WIDEN_FIRST_ROWS`] or more rows of x meet is widened
/// into f32s first (exactly, as the tiles widen it), so each weight is widened once
/// whatever the rows: the same additions on the same values, the same bits.
///
/// # Safety
///
/// As [`panel_rows`], with `w` pointing to a panel of `4 * k` weights stored as `ELEM`.
#[cfg(target_arch = "x86_64")]
unsafe fn panels_of<const ELEM: Elem>(
    k: i64,
    x: *const f32,
    m: i64,
    w: *const u8,
    y: *mut f32,
    n: i64,
) {
    if ELEM != F32 && m >= WIDEN_FIRST_ROWS {
        WIDENED.with_borrow_mut(|panel| {
            let len = PANEL_ROWS * k as usize;
            panel.resize(len, 0.0);
            // SAFETY: the panel holds `len` weights (the contract), `panel` as many floats.
            unsafe {
                widen::<ELEM>(w, panel);
                panels_of::<F32>(k, x, m, panel.as_ptr().cast(), y, n);
            }
        });
        return;
    }
    let (k, m, n) = (k as usize, m as usize, n as usize);
    // SAFETY: rows below `m` lie inside x and y (the contract).
    let rows = |i: usize| unsafe { (x.add(i * k), y.add(i * n)) };
    let mut i = 0;
    // SAFETY: forwarded from this function's contract.
    unsafe {
        while i + 3 <= m {
            let [r0, r1, r2] = [rows(i), rows(i + 1), rows(i + 2)];
            panel_avx2::<3, ELEM>(k, [r0.0, r1.0, r2.0], w, [r0.1, r1.1, r2.1]);
            i += 3;
        }
        match m - i {
            2 => {
                let [r0, r1] = [rows(i), rows(i + 1)];
                panel_avx2::<2, ELEM>(k, [r0.0, r1.0], w, [r0.1, r1.1]);
            }
            1 => {
                let r0 = rows(i);
                panel_avx2::<1, ELEM>(k, [r0.0], w, [r0.1]);
            }
            _ => {}
        }
    }
}

/// The f32s of the `out.len()` weights stored as `ELEM` at `w`.
///
/// # Safety
///
/// `w` holds `out.len()` weights, and the CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen<const ELEM: Elem>(w: *const u8, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (chunks, rest) = out.as_chunks_mut::<8>();
    // SAFETY: every element read is below `out.len()` (the contract).
    unsafe {
        for (c, chunk) in chunks.iter_mut().enumerate() {
            _mm256_storeu_ps(chunk.as_mut_ptr(), load8::<ELEM>(w, 8 * c));
        }
        let done = 8 * chunks.len();
        for (i, v) in rest.iter_mut().enumerate() {
            *v = load1::<ELEM>(w, done + i);
        }
    }
}

/// Eight weights stored as `ELEM` from element `i` of `w`, as f32s.
///
/// # Safety
///
/// `w` holds elements `i..i + 8`, and the CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const ELEM: Elem>(w: *const u8, i: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: the contract.
    unsafe {
        match ELEM {
            F32 => _mm256_loadu_ps(w.cast::<f32>().add(i)),
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(w.add(2 * i).cast())),
            _ => {
                let h = _mm_loadu_si128(w.add(2 * i).cast());
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
        }
    }
}

/// [`load8`] of four weights.
///
/// # Safety
///
/// `w` holds elements `i..i + 4`, and the CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load4<const ELEM: Elem>(w: *const u8, i: usize) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    // SAFETY: the contract.
    unsafe {
        match ELEM {
            F32 => _mm_loadu_ps(w.cast::<f32>().add(i)),
            F16 => _mm_cvtph_ps(_mm_loadl_epi64(w.add(2 * i).cast())),
            _ => {
                let h = _mm_loadl_epi64(w.add(2 * i).cast());
                _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16))
            }
        }
    }
}

/// [`load8`] of one weight.
///
/// # Safety
///
/// `w` holds element `i`.
#[cfg(target_arch = "x86_64")]
unsafe fn load1<const ELEM: Elem>(w: *const u8, i: usize) -> f32 {
    // SAFETY: the contract.
    unsafe {
        match ELEM {
            F32 => w.cast::<f32>().add(i).read_unaligned(),
            F16 => half::f16::from_bits(w.add(2 * i).cast::<u16>().read_unaligned()).to_f32(),
            _ => f32::from_bits(u32::from(w.add(2 * i).cast::<u16>().read_unaligned()) << 16),
        }
    }
}

/// `ROWS` rows of x against a panel of weights stored as `ELEM`: `acc[r][i]` collects
/// weight row `r` against x row `i` over the 8-column chunks, then the tail and the
/// reduction follow the generated code's order: per row the two 4-lane halves with the
/// 4-wide tail step in the first, their sum, `(l0 + l1) + (l2 + l3)` (two horizontal
/// adds, which make those very sums for the 4 rows at once), then the scalar tail.
///
/// # Safety
///
/// Each `xs[i]` points to `k` floats, `w` to a panel of `4 * k` weights stored as `ELEM`,
/// each `ys[i]` to 4 writable floats, and the CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_avx2<const ROWS: usize, const ELEM: Elem>(
    k: usize,
    xs: [*const f32; ROWS],
    w: *const u8,
    ys: [*mut f32; ROWS],
) {
    use std::arch::x86_64::*;
    let k8 = k - k % PANEL_COLS;
    let mut acc = [[_mm256_setzero_ps(); ROWS]; PANEL_ROWS];
    // SAFETY: every offset below is inside the buffers the contract describes.
    unsafe {
        for c in (0..k8).step_by(PANEL_COLS) {
            let a: [__m256; ROWS] = std::array::from_fn(|i| _mm256_loadu_ps(xs[i].add(c)));
            let chunk = c * PANEL_ROWS;
            for (r, row) in acc.iter_mut().enumerate() {
                let wr = load8::<ELEM>(w, chunk + PANEL_COLS * r);
                for (sum, &xa) in row.iter_mut().zip(&a) {
                    *sum = _mm256_fmadd_ps(wr, xa, *sum);
                }
            }
        }
        let tail = k - k8;
        // Tail values past the 4-wide step, added one by one.
        let first = if tail >= 4 { 4 } else { 0 };
        let tail_at = |r: usize| PANEL_ROWS * k8 + r * tail;
        for (i, (x, y)) in xs.into_iter().zip(ys).enumerate() {
            let halves: [__m128; PANEL_ROWS] = std::array::from_fn(|r| {
                let mut lo = _mm256_castps256_ps128(acc[r][i]);
                if tail >= 4 {
                    lo = _mm_fmadd_ps(load4::<ELEM>(w, tail_at(r)), _mm_loadu_ps(x.add(k8)), lo);
                }
                _mm_add_ps(lo, _mm256_extractf128_ps(acc[r][i], 1))
            });
            let [h0, h1, h2, h3] = halves;
            // Lane r: (l0 + l1) + (l2 + l3) of row r.
            let sums = _mm_hadd_ps(_mm_hadd_ps(h0, h1), _mm_hadd_ps(h2, h3));
            if first == tail {
                _mm_storeu_ps(y, sums);
                continue;
            }
            let mut lanes = [0f32; PANEL_ROWS];
            _mm_storeu_ps(lanes.as_mut_ptr(), sums);
            for (r, mut s) in lanes.into_iter().enumerate() {
                for q in first..tail {
                    s = load1::<ELEM>(w, tail_at(r) + q).mul_add(*x.add(k8 + q), s);
                }
                *y.add(r) = s;
            }
        }
    }
}

/// The symbol generated code imports [`q8_0_row`] under.
pub const Q8_0_ROW: &str = "llmc_q8_0_row";

/// The symbol generated code imports [`q4_0_row`] under.
pub const Q4_0_ROW: &str = "llmc_q4_0_row";

/// `*y = dot(x, w)` for one q8_0 row `w` of `k` weights (`k / 32` blocks of an f16 scale
/// and 32 signed bytes), dequantized in registers: bytes widened to 8 lanes, multiplied
/// with x in a per-block sum that is then scaled.
///
/// # Safety
///
/// `x` points to `k` floats (`k` a multiple of 32), `w` to `k / 32 * 34` bytes, `y` to a
/// writable float, and the CPU has AVX2 and FMA ([`available`]).
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn q8_0_row(k: i64, x: *const f32, w: *const u8, y: *mut f32) {
    // SAFETY: forwarded from this function's contract.
    unsafe { quant_row_avx2::<false>(k as usize, x, w, y) }
}

/// `*y = dot(x, w)` for one q4_0 row `w` of `k` weights (`k / 32` blocks of an f16 scale
/// and 16 bytes of nibbles: low nibbles are weights 0..16, high nibbles 16..32, value =
/// nibble - 8), unpacked in registers.
///
/// # Safety
///
/// As [`q8_0_row`], with `w` pointing to `k / 32 * 18` bytes.
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn q4_0_row(k: i64, x: *const f32, w: *const u8, y: *mut f32) {
    // SAFETY: forwarded from this function's contract.
    unsafe { quant_row_avx2::<true>(k as usize, x, w, y) }
}

/// The dot product of x with a row of q8_0 (`FOUR_BIT = false`, 34-byte blocks) or q4_0
/// (`FOUR_BIT = true`, 18-byte blocks) weights: per block, the f16 scale, then the 32
/// weights as four vectors of 8 `i32`, converted, multiplied with x into a block sum, which
/// is scaled into the accumulator.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quant_row_avx2<const FOUR_BIT: bool>(k: usize, x: *const f32, w: *const u8, y: *mut f32) {
    use std::arch::x86_64::*;
    let block_bytes = if FOUR_BIT { 18 } else { 34 };
    let mask = _mm_set1_epi8(0x0f);
    let eight = _mm_set1_epi8(8);
    let mut acc = _mm256_setzero_ps();
    // SAFETY: every offset below is inside the buffers the contract describes.
    unsafe {
        for b in 0..k / 32 {
            let block = w.add(b * block_bytes);
            let scale = f16_to_f32(u16::from_le_bytes([*block, *block.add(1)]));
            let q = block.add(2);
            let lanes: [__m256i; 4] = if FOUR_BIT {
                let packed = _mm_loadu_si128(q.cast());
                let low = _mm_sub_epi8(_mm_and_si128(packed, mask), eight);
                let high = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), eight);
                [
                    _mm256_cvtepi8_epi32(low),
                    _mm256_cvtepi8_epi32(_mm_srli_si128(low, 8)),
                    _mm256_cvtepi8_epi32(high),
                    _mm256_cvtepi8_epi32(_mm_srli_si128(high, 8)),
                ]
            } else {
                [
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.cast())),
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(8).cast())),
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(16).cast())),
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(24).cast())),
                ]
            };
            let xb = x.add(32 * b);
            let mut sum = _mm256_mul_ps(_mm256_cvtepi32_ps(lanes[0]), _mm256_loadu_ps(xb));
            for (i, v) in lanes.iter().enumerate().skip(1) {
                sum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*v), _mm256_loadu_ps(xb.add(8 * i)), sum);
            }
            acc = _mm256_fmadd_ps(sum, _mm256_set1_ps(scale), acc);
        }
        *y = lane_sum(acc);
    }
}

/// The sum of the 8 lanes of `v`: the two halves added, then `(l0 + l1) + (l2 + l3)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn lane_sum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    lanes_sum(_mm_add_ps(
        _mm256_castps256_ps128(v),
        _mm256_extractf128_ps(v, 1),
    ))
}

/// The symbol generated code imports [`f16_row`] under.
pub const F16_ROW: &str = "llmc_f16_row";

/// The symbol generated code imports [`bf16_row`] under.
pub const BF16_ROW: &str = "llmc_bf16_row";

/// `*y = dot(x, w)` for one row-major row `w` of `k` f16 weights (`PackedF16`), widened
/// as they load, with the additions of a panel's row (a row-major row is a panel of one):
/// 8 lanes over the chunks of 8, the 4-wide tail step into the low half, the halves
/// added, `(l0 + l1) + (l2 + l3)`, then the scalar tail. Generated code calls it for the
/// rows after a matrix's last whole panel and for the rows of a weight computed at run
/// time, for every row of x on its own: a row's result depends neither on the rows of x
/// computed with it nor on where it lies in the matrix (merged siblings keep their bits),
/// nor on whether the microkernels run.
///
/// # Safety
///
/// `x` points to `k` floats, `w` to `2 * k` bytes, `y` to a writable float, and the CPU
/// has AVX2, FMA and F16C ([`available`]).
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn f16_row(k: i64, x: *const f32, w: *const u8, y: *mut f32) {
    // SAFETY: forwarded from this function's contract.
    unsafe { row_avx2::<F16>(k as usize, x, w, y) }
}

/// [`f16_row`] for a row of bf16 weights (`PackedBF16`).
///
/// # Safety
///
/// As [`f16_row`].
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn bf16_row(k: i64, x: *const f32, w: *const u8, y: *mut f32) {
    // SAFETY: forwarded from this function's contract.
    unsafe { row_avx2::<BF16>(k as usize, x, w, y) }
}

/// [`f16_row`] over a row of weights stored as `ELEM`: [`panel_avx2`]'s additions for one
/// row.
///
/// # Safety
///
/// As [`f16_row`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_avx2<const ELEM: Elem>(k: usize, x: *const f32, w: *const u8, y: *mut f32) {
    use std::arch::x86_64::*;
    let k8 = k - k % PANEL_COLS;
    // SAFETY: the contract: x holds k floats, w k weights, y one float.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        for c in (0..k8).step_by(PANEL_COLS) {
            acc = _mm256_fmadd_ps(load8::<ELEM>(w, c), _mm256_loadu_ps(x.add(c)), acc);
        }
        let mut lo = _mm256_castps256_ps128(acc);
        let tail = k - k8;
        let first = if tail >= 4 { 4 } else { 0 };
        if tail >= 4 {
            lo = _mm_fmadd_ps(load4::<ELEM>(w, k8), _mm_loadu_ps(x.add(k8)), lo);
        }
        let mut total = lanes_sum(_mm_add_ps(lo, _mm256_extractf128_ps(acc, 1)));
        for q in first..tail {
            total = load1::<ELEM>(w, k8 + q).mul_add(*x.add(k8 + q), total);
        }
        *y = total;
    }
}

/// `(l0 + l1) + (l2 + l3)` of the 4 lanes of `v`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn lanes_sum(v: std::arch::x86_64::__m128) -> f32 {
    use std::arch::x86_64::*;
    let mut l = [0f32; 4];
    // SAFETY: `l` holds 4 floats.
    unsafe { _mm_storeu_ps(l.as_mut_ptr(), v) };
    (l[0] + l[1]) + (l[2] + l[3])
}

/// The value of IEEE half-precision bits (normal, subnormal, zero; block scales are never
/// infinite or NaN).
pub(super) fn f16_to_f32(h: u16) -> f32 {
    let magnitude = f32::from_bits(u32::from(h & 0x7fff) << 13) * f32::from_bits((127 + 112) << 23);
    // The sign is or-ed in, not branched on: q4_0 scales take either sign at random, and a
    // mispredicted branch per block cost 2.5x in throughput.
    f32::from_bits(magnitude.to_bits() | (u32::from(h & 0x8000) << 16))
}
