//! Hand-written Rust microkernels that generated loop nests call for compute-bound tiles.
//!
//! Cranelift's widest vector is 128 bits (cranelift.md section 4), which caps generated code
//! at half of an AVX2 core's multiply-add rate. When several rows of x meet the same weight
//! panel (prefill, batched decode), the contraction kernel calls [`panel_2x4`] for each pair
//! of rows: 8 256-bit accumulators, 4 weight and 2 x loads per 8 fused multiply-adds.
//!
//! The tile adds in exactly the order the generated single-row code does (lanes 0..4 and
//! 4..8 of each 8-column chunk in two partial sums, the 4-wide tail step into the first, the
//! halves added, then `(l0 + l1) + (l2 + l3)`, then the scalar tail), so a row's result
//! does not depend on whether it was computed alone or in a pair: batching and prefill
//! change no bit of any output.

#![allow(
    unsafe_code,
    reason = "AVX2 intrinsics on pointers checked by the caller"
)]

use crate::kernel::{PANEL_COLS, PANEL_ROWS};

/// The symbol generated code imports [`panel_2x4`] under.
pub const PANEL_2X4: &str = "llmc_panel_2x4";

/// Whether this machine runs [`panel_2x4`] (x86-64 with AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `y0[r] = dot(x0, w_r)` and `y1[r] = dot(x1, w_r)` for the [`PANEL_ROWS`] rows `w_r` of
/// the weight panel at `w` (row length `k`, layout of
/// [`pack_panels`](crate::kernel::pack_panels)).
///
/// # Safety
///
/// `x0` and `x1` point to `k` floats, `w` to a panel of `4 * k` floats, `y0` and `y1` to 4
/// writable floats each, and the CPU has AVX2 and FMA ([`available`]).
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn panel_2x4(
    k: i64,
    x0: *const f32,
    x1: *const f32,
    w: *const f32,
    y0: *mut f32,
    y1: *mut f32,
) {
    // SAFETY: forwarded from this function's contract.
    unsafe { panel_2x4_avx2(k as usize, x0, x1, w, y0, y1) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_2x4_avx2(
    k: usize,
    x0: *const f32,
    x1: *const f32,
    w: *const f32,
    y0: *mut f32,
    y1: *mut f32,
) {
    use std::arch::x86_64::*;
    let k8 = k - k % PANEL_COLS;
    let mut acc = [[_mm256_setzero_ps(); PANEL_ROWS]; 2];
    // SAFETY: every offset below is inside the buffers the contract describes.
    unsafe {
        for c in (0..k8).step_by(PANEL_COLS) {
            let a = [_mm256_loadu_ps(x0.add(c)), _mm256_loadu_ps(x1.add(c))];
            let chunk = w.add(c * PANEL_ROWS);
            for r in 0..PANEL_ROWS {
                let wr = _mm256_loadu_ps(chunk.add(PANEL_COLS * r));
                acc[0][r] = _mm256_fmadd_ps(wr, a[0], acc[0][r]);
                acc[1][r] = _mm256_fmadd_ps(wr, a[1], acc[1][r]);
            }
        }
        let tail = k - k8;
        let tail_at = |r: usize| w.add(PANEL_ROWS * k8 + r * tail);
        for (row, (x, y)) in [(x0, y0), (x1, y1)].into_iter().enumerate() {
            for r in 0..PANEL_ROWS {
                let mut lo = _mm256_castps256_ps128(acc[row][r]);
                let hi = _mm256_extractf128_ps(acc[row][r], 1);
                if tail >= 4 {
                    lo = _mm_fmadd_ps(_mm_loadu_ps(tail_at(r)), _mm_loadu_ps(x.add(k8)), lo);
                }
                let v = _mm_add_ps(lo, hi);
                let mut lanes = [0f32; 4];
                _mm_storeu_ps(lanes.as_mut_ptr(), v);
                let mut s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
                let first = if tail >= 4 { 4 } else { 0 };
                for q in first..tail {
                    s = (*tail_at(r).add(q)).mul_add(*x.add(k8 + q), s);
                }
                *y.add(r) = s;
            }
        }
    }
}
