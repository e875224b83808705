//! How the attention microkernel ([`super::attention`]) loads the values of a KV cache
//! held in a GGUF block format, 8 at a time, as the `f32`s `llm.dequantize` decodes: each
//! format's [`BlockValues`] reads a block's codes and scales in place with the reference's
//! rounding (the same products and sums, no fused multiply-adds), so attention over the
//! blocks computes what it computes over f32 rows of the decoded values.
//!
//! Blocks are as a KV pool holds them ([`KvBlocks::bytes`]: GGUF's bytes, padded to whole
//! 4-byte words): q8_0, q4_0 and q4_1 of 32 values, the K-quants q4_k, q6_k and q2_k of 256
//! in sub-blocks of 16 or 32 sharing a scale, so 8 consecutive values from a multiple of 8
//! always share their scales.

#![allow(
    unsafe_code,
    reason = "AVX2 intrinsics on pointers checked by the caller"
)]

use llm_ir::interp::{KvBlocks, quant::scale_min_k4};

use super::ukernel::f16_to_f32;

/// How a block format's values load, 8 at a time as `f32`.
pub(super) trait BlockValues {
    /// The format.
    const FORMAT: KvBlocks;

    /// Values `j..j + 8` of the block at `block` (`j` a multiple of 8 below the format's
    /// [`KvBlocks::values`]), as `llm.dequantize` decodes them.
    ///
    /// # Safety
    ///
    /// `block` points to a whole block; the CPU has AVX2, FMA and F16C.
    unsafe fn values8(block: *const u8, j: usize) -> std::arch::x86_64::__m256;
}

/// q8_0: an f16 scale, then 32 signed codes.
pub(super) struct Q8_0;

/// q4_0: an f16 scale, then 16 bytes of codes (value `j` in the low half of byte `j`,
/// value `j + 16` in its high half), each less 8.
pub(super) struct Q4_0;

/// q4_1: an f16 scale, an f16 minimum, then 16 bytes of codes as q4_0's (unsigned).
pub(super) struct Q4_1;

/// q4_k: f16 `d` and `dmin`, 12 bytes of 6-bit sub-block scales and minimums, then 128
/// bytes of codes: sub-block `2p` in the low halves of bytes `32p..32p + 32`, sub-block
/// `2p + 1` in their high halves; a value is `d * scale * code - dmin * min`.
pub(super) struct Q4K;

/// q6_k: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed scales (one per 16
/// values), then an f16 `d`; a value is `d * scale * (code - 32)`.
pub(super) struct Q6K;

/// q2_k: 16 bytes of 4-bit scales and minimums (one per 16 values), 64 bytes of 2-bit
/// codes, then f16 `d` and `dmin`; a value is `d * scale * code - dmin * min`.
pub(super) struct Q2K;

/// The f16 at byte `at` of `block`, as `f32`.
///
/// # Safety
///
/// `block + at` points to 2 readable bytes.
#[inline]
unsafe fn half_at(block: *const u8, at: usize) -> f32 {
    // SAFETY: the caller's contract.
    f16_to_f32(unsafe { block.add(at).cast::<u16>().read_unaligned() })
}

/// 8 bytes at `bytes`, each shifted right by `shift` and masked to `mask`, as 32-bit
/// integers.
///
/// # Safety
///
/// `bytes` points to 8 readable bytes; the CPU has AVX2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bits8(bytes: *const u8, shift: i32, mask: i32) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        let wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.cast()));
        let shifted = _mm256_srl_epi32(wide, _mm_cvtsi32_si128(shift));
        _mm256_and_si256(shifted, _mm256_set1_epi32(mask))
    }
}

/// q4_0's and q4_1's codes `j..j + 8` of the 16 code bytes at `codes` (the low halves of
/// 8 bytes below 16, the high halves from 16).
///
/// # Safety
///
/// As [`bits8`], for the 16 bytes at `codes`; `j` is a multiple of 8 below 32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles8(codes: *const u8, j: usize) -> std::arch::x86_64::__m256i {
    // SAFETY: the caller's contract: bytes `j % 16..j % 16 + 8` of the 16.
    unsafe { bits8(codes.add(j % 16), if j < 16 { 0 } else { 4 }, 15) }
}

/// `codes` times `scale` (each product rounded), less `minimum` where there is one:
/// `llm.dequantize`'s arithmetic.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled(
    codes: std::arch::x86_64::__m256i,
    scale: f32,
    minimum: Option<f32>,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let products = _mm256_mul_ps(_mm256_cvtepi32_ps(codes), _mm256_set1_ps(scale));
    match minimum {
        Some(m) => _mm256_sub_ps(products, _mm256_set1_ps(m)),
        None => products,
    }
}

impl BlockValues for Q8_0 {
    const FORMAT: KvBlocks = KvBlocks::Q8_0;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values8(block: *const u8, j: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract: the codes follow the scale.
        unsafe {
            let codes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(block.add(2 + j).cast()));
            scaled(codes, half_at(block, 0), None)
        }
    }
}

impl BlockValues for Q4_0 {
    const FORMAT: KvBlocks = KvBlocks::Q4_0;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values8(block: *const u8, j: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract: the codes follow the scale.
        unsafe {
            let codes = _mm256_sub_epi32(nibbles8(block.add(2), j), _mm256_set1_epi32(8));
            scaled(codes, half_at(block, 0), None)
        }
    }
}

impl BlockValues for Q4_1 {
    const FORMAT: KvBlocks = KvBlocks::Q4_1;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values8(block: *const u8, j: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract: the codes follow the scale and the minimum. The
        // code times the scale, then plus the minimum.
        unsafe {
            let products = scaled(nibbles8(block.add(4), j), half_at(block, 0), None);
            _mm256_add_ps(products, _mm256_set1_ps(half_at(block, 2)))
        }
    }
}

impl BlockValues for Q4K {
    const FORMAT: KvBlocks = KvBlocks::Q4K;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values8(block: *const u8, j: usize) -> std::arch::x86_64::__m256 {
        let sub = j / 32;
        // SAFETY: the caller's contract: 12 scale bytes at 4, the codes at 16.
        unsafe {
            let (sc, m) = scale_min_k4(sub, std::slice::from_raw_parts(block.add(4), 12));
            let scale = half_at(block, 0) * f32::from(sc);
            let minimum = half_at(block, 2) * f32::from(m);
            let codes = bits8(
                block.add(16 + 32 * (sub / 2) + j % 32),
                4 * (sub % 2) as i32,
                15,
            );
            scaled(codes, scale, Some(minimum))
        }
    }
}

impl BlockValues for Q6K {
    const FORMAT: KvBlocks = KvBlocks::Q6K;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values8(block: *const u8, j: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // Half `n` of 128 values, quarter `g` of 32, value `l` of the quarter.
        let (n, g, l) = (j / 128, j % 128 / 32, j % 32);
        // SAFETY: the caller's contract: low nibbles at 0, high bit pairs at 128, scales
        // at 192, `d` at 208.
        unsafe {
            let low = bits8(block.add(64 * n + l + 32 * (g % 2)), 4 * (g / 2) as i32, 15);
            let high = bits8(block.add(128 + 32 * n + l), 2 * g as i32, 3);
            let codes = _mm256_sub_epi32(
                _mm256_or_si256(low, _mm256_slli_epi32(high, 4)),
                _mm256_set1_epi32(32),
            );
            let sc = *block.add(192 + 8 * n + l / 16 + 2 * g) as i8;
            scaled(codes, half_at(block, 208) * f32::from(sc), None)
        }
    }
}

impl BlockValues for Q2K {
    const FORMAT: KvBlocks = KvBlocks::Q2K;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values8(block: *const u8, j: usize) -> std::arch::x86_64::__m256 {
        // Half `n` of 128 values, shift `s` (each 32 values), half `h` of 16, value `i`.
        let (n, s, h, i) = (j / 128, j % 128 / 32, j % 32 / 16, j % 16);
        // SAFETY: the caller's contract: scales at 0, codes at 16, `d` and `dmin` at 80.
        unsafe {
            let sc = *block.add(8 * n + 2 * s + h);
            let scale = half_at(block, 80) * f32::from(sc & 15);
            let minimum = half_at(block, 82) * f32::from(sc >> 4);
            let codes = bits8(block.add(16 + 32 * n + 16 * h + i), 2 * s as i32, 3);
            scaled(codes, scale, Some(minimum))
        }
    }
}
