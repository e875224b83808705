//! AVX2 microkernels for rows of the GGUF k-quants (q4_k, q6_k), the formats most GGUF
//! models ship their matrices in: the generated 4-lane decoding ([`super::dequant`]) is
//! compute-bound at about 40% of these kernels' speed.
//!
//! Each kernel computes `*y = dot(x, w)` for one weight row of `k / 256` super-blocks,
//! decoding codes to 8 lanes of `i32` in registers, converting, multiplying with x per
//! run of values sharing a scale, and scaling each run's sum once, as the generated code
//! does (the additions are grouped differently, so results agree within rounding, not bit
//! for bit). Like [`super::ukernel`]'s, they run only where the CPU has AVX2 and FMA.

#![allow(
    unsafe_code,
    reason = "AVX2 intrinsics on pointers checked by the caller"
)]

#[cfg(target_arch = "x86_64")]
use super::ukernel::{f16_to_f32, lane_sum};

/// The symbol generated code imports [`q4_k_row`] under.
pub const Q4_K_ROW: &str = "llmc_q4_k_row";

/// The symbol generated code imports [`q6_k_row`] under.
pub const Q6_K_ROW: &str = "llmc_q6_k_row";

/// `*y = dot(x, w)` for one q4_k row: per super-block of 256 (144 bytes) an f16 scale `d`
/// and minimum `dmin`, twelve bytes of 6-bit sub-block scales and minimums, then 128 bytes
/// whose low nibbles are sub-block `2p` and high nibbles sub-block `2p + 1` for bytes
/// `32p..32p + 32`; value = `d * sc * q - dmin * m`.
///
/// # Safety
///
/// `x` points to `k` floats (`k` a multiple of 256), `w` to `k / 256 * 144` bytes, `y` to a
/// writable float, and the CPU has AVX2 and FMA ([`super::ukernel::available`]).
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn q4_k_row(k: i64, x: *const f32, w: *const u8, y: *mut f32) {
    // SAFETY: forwarded from this function's contract.
    unsafe { q4_k_avx2(k as usize, x, w, y) }
}

/// `*y = dot(x, w)` for one q6_k row: per super-block of 256 (210 bytes) 128 bytes of low
/// nibbles, 64 of high bit pairs, 16 signed sub-block scales and an f16 scale `d`; value =
/// `d * sc * (q - 32)`.
///
/// # Safety
///
/// As [`q4_k_row`], with `w` pointing to `k / 256 * 210` bytes.
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn q6_k_row(k: i64, x: *const f32, w: *const u8, y: *mut f32) {
    // SAFETY: forwarded from this function's contract.
    unsafe { q6_k_avx2(k as usize, x, w, y) }
}

/// The 6-bit scales and minimums of a q4_k super-block's eight sub-blocks, one byte each,
/// from its 12 scale bytes: sub-blocks 0..4 keep the low 6 bits of bytes `j` and `j + 4`;
/// sub-blocks 4..8 take a nibble of byte `j + 4` and the top bits of bytes `j - 4` and `j`.
#[cfg(target_arch = "x86_64")]
pub(super) fn scales_mins(q: &[u8; 12]) -> (u64, u64) {
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (w0, w1, w2) = (word(0), word(1), word(2));
    let (low6, nibble, top2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let scales = (w0 & low6, (w2 & nibble) | ((w0 >> 6) & top2) << 4);
    let mins = (w1 & low6, ((w2 >> 4) & nibble) | ((w1 >> 6) & top2) << 4);
    let join = |(lo, hi): (u32, u32)| u64::from(lo) | u64::from(hi) << 32;
    (join(scales), join(mins))
}

/// Eight bytes as eight `f32` lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) fn byte_lanes(bytes: u64) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes as i64)))
}

/// Bytes `8 * i..8 * i + 8` of a 32-byte vector as eight `f32` lanes, sign-extended
/// (`SIGNED`) or zero-extended.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn widen<const SIGNED: bool>(v: std::arch::x86_64::__m256i, i: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let half = if i < 2 {
        _mm256_castsi256_si128(v)
    } else {
        _mm256_extracti128_si256(v, 1)
    };
    let bytes = if i.is_multiple_of(2) {
        half
    } else {
        _mm_srli_si128(half, 8)
    };
    let ints = if SIGNED {
        _mm256_cvtepi8_epi32(bytes)
    } else {
        _mm256_cvtepu8_epi32(bytes)
    };
    _mm256_cvtepi32_ps(ints)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q4_k_avx2(k: usize, x: *const f32, w: *const u8, y: *mut f32) {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    // SAFETY: every offset below is inside the buffers the contract describes.
    unsafe {
        for sb in 0..k / 256 {
            let block = w.add(sb * 144);
            let d = f16_to_f32(u16::from_le_bytes([*block, *block.add(1)]));
            let dmin = f16_to_f32(u16::from_le_bytes([*block.add(2), *block.add(3)]));
            // The eight sub-blocks' `d * sc` and `-dmin * m`, 8 lanes at a time (a scalar
            // decoding per sub-block cost a fifth of the kernel).
            let (sc, m) = scales_mins(&std::ptr::read_unaligned(block.add(4).cast()));
            let (mut scales, mut offsets) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(
                scales.as_mut_ptr(),
                _mm256_mul_ps(_mm256_set1_ps(d), byte_lanes(sc)),
            );
            _mm256_storeu_ps(
                offsets.as_mut_ptr(),
                _mm256_mul_ps(_mm256_set1_ps(-dmin), byte_lanes(m)),
            );
            let xs = x.add(256 * sb);
            for pair in 0..4 {
                let packed = _mm256_loadu_si256(block.add(16 + 32 * pair).cast());
                let low = _mm256_and_si256(packed, mask);
                let high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
                for (h, codes) in [low, high].into_iter().enumerate() {
                    let sub = 2 * pair + h;
                    let xb = xs.add(32 * sub);
                    let (mut products, mut sum_x) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    for i in 0..4 {
                        let xv = _mm256_loadu_ps(xb.add(8 * i));
                        products = _mm256_fmadd_ps(widen::<false>(codes, i), xv, products);
                        sum_x = _mm256_add_ps(sum_x, xv);
                    }
                    acc = _mm256_fmadd_ps(products, _mm256_broadcast_ss(&scales[sub]), acc);
                    acc = _mm256_fmadd_ps(sum_x, _mm256_broadcast_ss(&offsets[sub]), acc);
                }
            }
        }
        *y = lane_sum(acc);
    }
}

/// The 6-bit codes (0..64, before the recentring by 32) of the four quarters of 32 values
/// of half `n` of the q6_k super-block at `block`: value `l` of quarter `g` takes nibble
/// `g / 2` of low byte `l + 32 * (g % 2)` and bit pair `g` of high byte `l`.
///
/// # Safety
///
/// `block` points to a whole q6_k super-block (210 bytes), `n < 2`, and the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn q6_k_codes(block: *const u8, n: usize) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    let nibble = _mm256_set1_epi8(0x0f);
    let pair = _mm256_set1_epi8(3);
    // SAFETY: the three 32-byte loads end at byte 192 of the block (the contract).
    let (ql0, ql1, qh) = unsafe {
        (
            _mm256_loadu_si256(block.add(64 * n).cast()),
            _mm256_loadu_si256(block.add(64 * n + 32).cast()),
            _mm256_loadu_si256(block.add(128 + 32 * n).cast()),
        )
    };
    let quarters = [
        (_mm256_and_si256(ql0, nibble), qh),
        (_mm256_and_si256(ql1, nibble), _mm256_srli_epi16(qh, 2)),
        (
            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), nibble),
            _mm256_srli_epi16(qh, 4),
        ),
        (
            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), nibble),
            _mm256_srli_epi16(qh, 6),
        ),
    ];
    quarters
        .map(|(low, high)| _mm256_or_si256(low, _mm256_slli_epi16(_mm256_and_si256(high, pair), 4)))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q6_k_avx2(k: usize, x: *const f32, w: *const u8, y: *mut f32) {
    use std::arch::x86_64::*;
    let bias = _mm256_set1_epi8(32);
    let mut acc = _mm256_setzero_ps();
    // SAFETY: every offset below is inside the buffers the contract describes.
    unsafe {
        for sb in 0..k / 256 {
            let block = w.add(sb * 210);
            let d = _mm256_set1_ps(f16_to_f32(u16::from_le_bytes([
                *block.add(208),
                *block.add(209),
            ])));
            for n in 0..2 {
                // The half's eight run scales `d * sc`, 8 lanes at a time.
                let sc = _mm_loadl_epi64(block.add(192 + 8 * n).cast());
                let mut scales = [0f32; 8];
                _mm256_storeu_ps(
                    scales.as_mut_ptr(),
                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))),
                );
                for (g, codes) in q6_k_codes(block, n).into_iter().enumerate() {
                    let codes = _mm256_sub_epi8(codes, bias);
                    let xb = x.add(256 * sb + 128 * n + 32 * g);
                    // Two runs of 16 values, each with its own scale.
                    for run in 0..2 {
                        let mut products = _mm256_setzero_ps();
                        for i in 2 * run..2 * run + 2 {
                            let xv = _mm256_loadu_ps(xb.add(8 * i));
                            products = _mm256_fmadd_ps(widen::<true>(codes, i), xv, products);
                        }
                        let scale = _mm256_broadcast_ss(&scales[2 * g + run]);
                        acc = _mm256_fmadd_ps(products, scale, acc);
                    }
                }
            }
        }
        *y = lane_sum(acc);
    }
}
