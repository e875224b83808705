//! An AVX2 microkernel for the attention of one query row whose head size is a multiple of
//! 8, called by the generated attention function in place of its 4-lane body where the CPU
//! has AVX2 and FMA (decode over long contexts spends most of its time here).
//!
//! Same algorithm as the generated kernel (`codegen::emit_attention`): per KV head, the
//! query heads that share it go through the positions together, in blocks of
//! 32 positions with an online softmax; the scores of 8 positions are summed across
//! lanes together (three rounds of horizontal adds, one 256-bit vector of 8 scores),
//! exponentials are computed 8 lanes at a time with the generated code's polynomial, and
//! each head's outputs collect a block's values in registers (four partial sums). The
//! additions are not in the generated code's order, so results agree with it (and with the
//! reference) to rounding, not bit for bit.

#![allow(
    unsafe_code,
    reason = "AVX2 intrinsics on pointers checked by the caller"
)]

use super::emit::{EXP_LN2, EXP_POLY, EXP_RANGE};

/// The symbol generated code imports [`attention_row`] under.
pub const ATTENTION_ROW: &str = "llmc_attention_row";

/// Positions per block of the online softmax (4 vectors of 8 scores).
const BLOCK: usize = 32;

/// The largest query-head group (`heads / kv_heads`) the microkernel keeps scores for on
/// the stack; beyond, the generated kernel runs.
pub const MAX_GROUP: usize = 8;

/// The largest head size the microkernel takes.
pub const MAX_HEAD: usize = 256;

/// Whether [`attention_row`] takes `heads` query heads of `d` over `kv_heads` KV heads:
/// whole groups of at most [`MAX_GROUP`], heads of a multiple of 8 up to [`MAX_HEAD`], and
/// head counts that fit the 16 bits each has in the packed shape.
pub fn fits(heads: usize, kv_heads: usize, d: usize) -> bool {
    kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && heads < 1 << 16
        && (1..=MAX_GROUP).contains(&(heads / kv_heads))
        && d.is_multiple_of(8)
        && (8..=MAX_HEAD).contains(&d)
}

/// Attention of the query row at `q` (`heads` heads of `d`) over `count` key/value rows:
/// row `j` starts `offsets[j]` bytes into `k` and `v`, KV head `h` at `+ 4 * h * d`; scores
/// are scaled by the f32 whose bits are `factor`; the `heads * d` outputs go to `out`.
/// `shape` is `heads | kv_heads << 16 | d << 32`.
///
/// # Safety
///
/// `q` points to `heads * d` floats and `out` to as many writable ones; every offset is
/// one whose row (`kv_heads * d` floats) lies inside `k` and `v`; `offsets` holds `count`
/// (at least 1) entries; `heads`, `kv_heads` and `d` [`fit`](fits); the CPU has AVX2 and
/// FMA ([`super::ukernel::available`]).
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn attention_row(
    q: *const f32,
    k: *const u8,
    v: *const u8,
    offsets: *const i64,
    count: i64,
    out: *mut f32,
    shape: i64,
    factor: i64,
) {
    let heads = (shape & 0xffff) as usize;
    let kv_heads = ((shape >> 16) & 0xffff) as usize;
    let d = (shape >> 32) as usize;
    let factor = f32::from_bits(factor as u32);
    // SAFETY: forwarded from this function's contract.
    unsafe {
        let offsets = std::slice::from_raw_parts(offsets, count as usize);
        for kv in 0..kv_heads {
            attend_group(
                (heads / kv_heads, d, factor),
                q.add(kv * (heads / kv_heads) * d),
                (k.add(4 * kv * d), v.add(4 * kv * d)),
                offsets,
                out.add(kv * (heads / kv_heads) * d),
            );
        }
    }
}

/// The query heads `q` (`group` rows of `d`) that share the KV head at `k`/`v`, over the
/// rows at `offsets`, into `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_group(
    (group, d, factor): (usize, usize, f32),
    q: *const f32,
    (k, v): (*const u8, *const u8),
    offsets: &[i64],
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let chunks = d / 8;
    let mut max = [f32::MIN; MAX_GROUP];
    let mut sum = [0f32; MAX_GROUP];
    let mut scores = [[0f32; BLOCK]; MAX_GROUP];
    // SAFETY: every pointer below is inside the rows the caller's contract describes.
    unsafe {
        for h in 0..group {
            for c in 0..chunks {
                _mm256_storeu_ps(out.add(h * d + 8 * c), _mm256_setzero_ps());
            }
        }
        let factors = _mm256_set1_ps(factor);
        for block in offsets.chunks(BLOCK) {
            let row = |base: *const u8, j: usize| base.add(block[j] as usize).cast::<f32>();
            // Vectors of 8 scores the block fills (a short last block leaves the rest).
            let used = block.len().div_ceil(8);
            for (h, head_scores) in scores.iter_mut().enumerate().take(group) {
                let qh = q.add(h * d);
                for (e, eight) in head_scores.chunks_exact_mut(8).take(used).enumerate() {
                    let first = 8 * e;
                    let products: [__m256; 8] = std::array::from_fn(|p| {
                        let j = first + p;
                        if j >= block.len() {
                            return _mm256_setzero_ps();
                        }
                        let kj = row(k, j);
                        let mut acc = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(kj));
                        for c in 1..chunks {
                            acc = _mm256_fmadd_ps(
                                _mm256_loadu_ps(qh.add(8 * c)),
                                _mm256_loadu_ps(kj.add(8 * c)),
                                acc,
                            );
                        }
                        acc
                    });
                    let sums = lane_sums(products);
                    let mut s = _mm256_mul_ps(sums, factors);
                    // Positions past the block's end score the lowest float.
                    let valid = block.len().saturating_sub(first).min(8);
                    if valid < 8 {
                        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                        let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), lanes);
                        s = _mm256_blendv_ps(
                            _mm256_set1_ps(f32::MIN),
                            s,
                            _mm256_castsi256_ps(keep),
                        );
                    }
                    _mm256_storeu_ps(eight.as_mut_ptr(), s);
                }
                // The block's maximum, the rescale of what came before, the exponentials.
                let mut most = _mm256_loadu_ps(head_scores.as_ptr());
                for eight in head_scores.chunks_exact(8).take(used).skip(1) {
                    most = _mm256_max_ps(most, _mm256_loadu_ps(eight.as_ptr()));
                }
                let m_new = max[h].max(horizontal_max(most));
                let shrink = exp8(_mm256_set1_ps(max[h] - m_new));
                let centre = _mm256_set1_ps(m_new);
                let mut total = _mm256_setzero_ps();
                for eight in head_scores.chunks_exact_mut(8).take(used) {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(eight.as_ptr()), centre));
                    _mm256_storeu_ps(eight.as_mut_ptr(), e);
                    total = _mm256_add_ps(total, e);
                }
                let c = _mm256_cvtss_f32(shrink);
                sum[h] = sum[h].mul_add(c, horizontal_sum(total));
                max[h] = m_new;
                let oh = out.add(h * d);
                for ch in 0..chunks {
                    let o = oh.add(8 * ch);
                    _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), shrink));
                }
            }
            // The values: each 8 outputs of a head collect the block in registers, in four
            // independent sums (a chain through memory would wait on every store).
            for (h, head_scores) in scores.iter().enumerate().take(group) {
                for ch in 0..chunks {
                    let term = |j: usize, acc: __m256| {
                        let vj = _mm256_loadu_ps(row(v, j).add(8 * ch));
                        _mm256_fmadd_ps(_mm256_set1_ps(head_scores[j]), vj, acc)
                    };
                    let mut acc = [_mm256_setzero_ps(); 4];
                    let quads = block.len() / 4 * 4;
                    for j in (0..quads).step_by(4) {
                        for (u, a) in acc.iter_mut().enumerate() {
                            *a = term(j + u, *a);
                        }
                    }
                    for j in quads..block.len() {
                        acc[0] = term(j, acc[0]);
                    }
                    let block_sum =
                        _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                    let o = out.add(h * d + 8 * ch);
                    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), block_sum));
                }
            }
        }
        for (h, total) in sum.iter().enumerate().take(group) {
            let inv = _mm256_set1_ps(1.0 / total);
            let oh = out.add(h * d);
            for c in 0..chunks {
                let o = oh.add(8 * c);
                _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), inv));
            }
        }
    }
}

/// Lane `p` of the result: the sum of the 8 lanes of `v[p]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn lane_sums(v: [std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // Within each 128-bit half: [v0 v1 v2 v3] sums of that half's 4 lanes, then the same
    // for v4..v8; the halves added last.
    let h01 = _mm256_hadd_ps(v[0], v[1]);
    let h23 = _mm256_hadd_ps(v[2], v[3]);
    let h45 = _mm256_hadd_ps(v[4], v[5]);
    let h67 = _mm256_hadd_ps(v[6], v[7]);
    let lo = _mm256_hadd_ps(h01, h23);
    let hi = _mm256_hadd_ps(h45, h67);
    // lo = [v0..v3 low halves | v0..v3 high halves], hi the same for v4..v7.
    let low = _mm256_permute2f128_ps(lo, hi, 0x20);
    let high = _mm256_permute2f128_ps(lo, hi, 0x31);
    _mm256_add_ps(low, high)
}

/// The largest of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn horizontal_max(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    _mm_cvtss_f32(m)
}

/// The sum of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn horizontal_sum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// `exp` of 8 lanes: the generated kernels' range reduction and polynomial
/// ([`emit::exp`](super::emit::exp)), 8 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let [lo, hi] = EXP_RANGE;
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(EXP_LN2[0]), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(EXP_LN2[1]), r);
    let mut y = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let y = _mm256_fmadd_ps(y, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    // 2^n from the exponent bits.
    let bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row kernel takes whole groups of up to 8 heads of a multiple of 8, with head
    /// counts its 16-bit shape fields hold.
    #[test]
    fn shapes_the_row_kernel_takes() {
        assert!(fits(8, 4, 8));
        assert!(fits(16, 2, 256));
        assert!(!fits(9, 4, 8), "a partial group");
        assert!(!fits(8, 4, 12), "heads of 12");
        assert!(!fits(8, 4, 264), "heads over 256");
        assert!(!fits(36, 4, 8), "groups of 9");
        assert!(!fits(1 << 16, 1 << 16, 8), "more heads than 16 bits hold");
        assert!(!fits(8, 0, 8));
    }
}
