//! Integer dot products of q8_0 activations with q8_0 or q4_0 weights.
//!
//! After `quantize-activations`, a block of 32 values of x is an f16 scale `dx` and 32
//! signed bytes, and so is a q8_0 weight block (`dw`, 32 signed bytes) or a q4_0 one
//! (`dw`, 32 nibbles `n`, value `n - 8`). The block's dot product is
//! `dx * dw * Σ qx·qw`, where the sum is an exact integer: no product needs a float until
//! the block is done, and each block costs one conversion and one multiply-add.
//!
//! Two implementations, one per target:
//! - [`by_q8_0_rows`] and [`by_q8_0_panels`], AVX2 microkernels that generated
//!   contractions call for a run of weight rows (row major, or four at a time in block
//!   panels) against a row of x when the CPU has AVX2 ([`super::ukernel::available`]).
//!   q4_0 nibbles meet x in `vpmaddubsw` (unsigned by signed bytes into 16-bit pair sums)
//!   and the recentring is taken off as `8 * Σ qx` (one more `vpmaddubsw`): exact for every
//!   byte x may hold, -128 included (the sign trick, `|w|` by `sign(w) * x`, is not).
//!   q8_0 weights are widened to 16 bits and meet x in `vpmaddwd`. Where the CPU has
//!   AVX-512 VNNI ([`vnni`]), the same loops run with `vpdpbusd`, four byte products per
//!   32-bit lane in one instruction: q4_0's nibbles as they are, q8_0's codes with their
//!   sign bit flipped (`q + 128`, unsigned), each recentring taken off per lane
//!   (`8 * Σ qx`, `128 * Σ qx`).
//! - [`dot_row`], the same sums in generated code (`pmaddwd` on 128-bit vectors), for CPUs
//!   without AVX2 and for the tests that compare both with the interpreter.
//!
//! Integer block sums are exact in either, so the two differ only in how the scaled block
//! sums are added up.

#![allow(
    unsafe_code,
    reason = "AVX2 intrinsics on pointers checked by the caller"
)]

use cranelift_codegen::ir::{InstBuilder, Value, types};
use cranelift_frontend::FunctionBuilder;

use super::{
    dequant::{load_f16, splat_i8, split_nibbles},
    emit::{address, for_range, horizontal_sum, mem, zeroed_accumulators},
};
#[cfg(target_arch = "x86_64")]
use crate::kernel::PANEL_ROWS;
use crate::kernel::WeightFormat;

/// The symbol generated code imports `by_q8_0_rows::<false>` (q8_0 weights) under.
pub const Q8_0_BY_Q8_0_ROWS: &str = "llmc_q8_0_by_q8_0_rows";
/// The symbol generated code imports `by_q8_0_rows::<true>` (q4_0 weights) under.
pub const Q4_0_BY_Q8_0_ROWS: &str = "llmc_q4_0_by_q8_0_rows";
/// The symbol generated code imports `by_q8_0_panels::<false>` (q8_0 weights) under.
pub const Q8_0_BY_Q8_0_PANELS: &str = "llmc_q8_0_by_q8_0_panels";
/// The symbol generated code imports `by_q8_0_panels::<true>` (q4_0 weights) under.
pub const Q4_0_BY_Q8_0_PANELS: &str = "llmc_q4_0_by_q8_0_panels";

/// Bytes of a q8_0 block: an f16 scale and 32 codes.
pub(super) const Q8_0_BLOCK_BYTES: usize = 34;

/// Bytes of a q4_0 block: an f16 scale and 32 nibbles.
#[cfg(target_arch = "x86_64")]
const Q4_0_BLOCK_BYTES: usize = 18;

/// Bytes of a weight block: q4_0 (`four_bit`) or q8_0.
#[cfg(target_arch = "x86_64")]
const fn weight_block_bytes(four_bit: bool) -> usize {
    if four_bit {
        Q4_0_BLOCK_BYTES
    } else {
        Q8_0_BLOCK_BYTES
    }
}

/// Whether the CPU has AVX-512 VNNI (with F and VL, which the VNNI forms' target
/// features imply): [`by_q8_0_rows`] and [`by_q8_0_panels`] then take `VNNI = true`, whose
/// `vpdpbusd` multiplies and sums four byte pairs per 32-bit lane in one instruction (the
/// AVX2 forms take two, through 16-bit pair sums).
#[cfg(target_arch = "x86_64")]
pub fn vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vl")
}

/// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` (`x_stride`
/// bytes apart) and the `rows` consecutive weight rows `w_r` at `w`, q4_0 (`FOUR_BIT`) or
/// q8_0, with AVX-512 VNNI's byte dot products (`VNNI`) or AVX2's; row `i` of `y` starts
/// `y_stride` bytes after row `i - 1`. Each instance is one symbol
/// ([`Q8_0_BY_Q8_0_ROWS`], [`Q4_0_BY_Q8_0_ROWS`]).
///
/// # Safety
///
/// `x` points to `m` rows of `k / 32 * 34` bytes (`k` a multiple of 32) `x_stride` apart,
/// `w` to `rows * k / 32` weight blocks (34 or 18 bytes), `y` to `m` rows of `rows`
/// writable floats `y_stride` apart, and the CPU has AVX2, FMA and F16C
/// ([`super::ukernel::available`]), and AVX-512 VNNI and VL for `VNNI` ([`vnni`]).
#[cfg(target_arch = "x86_64")]
#[allow(
    clippy::too_many_arguments,
    reason = "a C entry point for generated code: the operands and their strides"
)]
pub unsafe extern "C" fn by_q8_0_rows<const FOUR_BIT: bool, const VNNI: bool>(
    k: i64,
    x: *const u8,
    w: *const u8,
    y: *mut u8,
    rows: i64,
    m: i64,
    x_stride: i64,
    y_stride: i64,
) {
    let x_rows = XRows::new((x, x_stride), (y, y_stride), m);
    let (k, rows) = (k as usize, rows.max(0) as usize);
    for i in 0..x_rows.m {
        // SAFETY: forwarded from this function's contract.
        unsafe {
            if VNNI {
                rows_vnni::<FOUR_BIT>(k, x_rows.x(i), w, x_rows.y(i), rows);
            } else {
                rows_avx2::<FOUR_BIT>(k, x_rows.x(i), w, x_rows.y(i), rows);
            }
        }
    }
}

/// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` (`x_stride`
/// bytes apart) and the `4 * panels` weight rows of the block panels at `w`
/// ([`crate::kernel::pack_block_panels`]), q4_0 (`FOUR_BIT`) or q8_0, with VNNI's byte dot
/// products (`VNNI`) or AVX2's; row `i` of `y` starts `y_stride` bytes after row `i - 1`.
/// Each instance is one symbol ([`Q8_0_BY_Q8_0_PANELS`], [`Q4_0_BY_Q8_0_PANELS`]).
///
/// # Safety
///
/// `x` points to `m` rows of `k / 32 * 34` bytes (`k` a multiple of 32) `x_stride` apart,
/// `w` to `panels` panels of four rows of `k / 32` weight blocks (34 or 18 bytes), `y` to
/// `m` rows of `4 * panels` writable floats `y_stride` apart, and the CPU has AVX2, FMA
/// and F16C ([`super::ukernel::available`]), and AVX-512 VNNI and VL for `VNNI`
/// ([`vnni`]).
#[cfg(target_arch = "x86_64")]
#[allow(
    clippy::too_many_arguments,
    reason = "a C entry point for generated code: the operands and their strides"
)]
pub unsafe extern "C" fn by_q8_0_panels<const FOUR_BIT: bool, const VNNI: bool>(
    k: i64,
    x: *const u8,
    w: *const u8,
    y: *mut u8,
    panels: i64,
    m: i64,
    x_stride: i64,
    y_stride: i64,
) {
    let tiles = XRows::new((x, x_stride), (y, y_stride), m);
    let (k, panels) = (k as usize, panels.max(0) as usize);
    // SAFETY: forwarded from this function's contract.
    unsafe {
        if VNNI {
            panels_vnni::<FOUR_BIT>(k, tiles, w, panels);
        } else {
            panels_avx2::<FOUR_BIT>(k, tiles, w, panels);
        }
    }
}

/// The rows of x a q8_0-activation kernel call takes, and the rows of y it writes: the
/// generated code passes all of a chunk's rows of x in one call.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(super) struct XRows {
    x: *const u8,
    x_stride: usize,
    y: *mut u8,
    y_stride: usize,
    /// Rows.
    pub m: usize,
}

#[cfg(target_arch = "x86_64")]
impl XRows {
    /// `m` rows of x and of y, each `stride` bytes after the one before.
    pub fn new((x, x_stride): (*const u8, i64), (y, y_stride): (*mut u8, i64), m: i64) -> XRows {
        XRows {
            x,
            x_stride: x_stride as usize,
            y,
            y_stride: y_stride as usize,
            m: m.max(0) as usize,
        }
    }

    /// Row `i` of x.
    pub fn x(&self, i: usize) -> *const u8 {
        self.x.wrapping_add(i * self.x_stride)
    }

    /// Row `i` of y.
    pub fn y(&self, i: usize) -> *mut f32 {
        self.y.wrapping_add(i * self.y_stride).cast()
    }
}

/// [`panel_tiles`] and [`rows`] compiled for AVX2 with [`XBlock`] (x in tiles of two
/// rows: sixteen vector registers), and for AVX-512 VNNI with [`XBlockVnni`] (tiles of
/// four: thirty-two): one body each, inlined into a function of each feature set.
macro_rules! instances {
    ($features:literal, $block:ty, $tile:literal, $panels:ident, $rows:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $panels<const FOUR_BIT: bool>(
            k: usize,
            tiles: XRows,
            w: *const u8,
            panels: usize,
        ) {
            // SAFETY: forwarded from the entry point's contract.
            unsafe { panel_tiles::<$block, FOUR_BIT, $tile>(k, tiles, w, panels) }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $rows<const FOUR_BIT: bool>(
            k: usize,
            x: *const u8,
            w: *const u8,
            y: *mut f32,
            rows: usize,
        ) {
            // SAFETY: forwarded from the entry point's contract.
            unsafe { self::rows::<$block, FOUR_BIT>(k, x, w, y, rows) }
        }
    };
}

instances!("avx2,fma,f16c", XBlock, 2, panels_avx2, rows_avx2);
instances!(
    "avx2,fma,f16c,avx512vnni,avx512vl",
    XBlockVnni,
    4,
    panels_vnni,
    rows_vnni
);

/// The rows of x in tiles of `TILE` (then one at a time), each tile through every panel.
///
/// # Safety
///
/// As [`by_q8_0_panels`], inlined into a function with the features `B` needs.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn panel_tiles<B: BlockDot, const FOUR_BIT: bool, const TILE: usize>(
    k: usize,
    tiles: XRows,
    w: *const u8,
    panels: usize,
) {
    let mut i = 0;
    // SAFETY: rows i.. of x and y are inside the buffers of the contract.
    unsafe {
        while i + TILE <= tiles.m {
            let xs = std::array::from_fn(|t| tiles.x(i + t));
            let ys = std::array::from_fn(|t| tiles.y(i + t));
            self::panels::<B, FOUR_BIT, TILE>(k, xs, w, ys, panels);
            i += TILE;
        }
        while i < tiles.m {
            self::panels::<B, FOUR_BIT, 1>(k, [tiles.x(i)], w, [tiles.y(i)], panels);
            i += 1;
        }
    }
}

/// Four rows at a time from one stream of weight bytes, against `TILE` rows of x: per
/// block, each x row's codes are loaded once for the four weight rows, the four weight
/// scales converted by one `vcvtph2ps`, each weight row's codes decoded once for the
/// `TILE` x rows, and every pair of rows has its own accumulator. (Streaming at 16.0-16.5
/// GB/s from DRAM in a scratch harness where rows one after another reached 12.3-13.0:
/// the panel is one sequential stream, and four independent chains keep more of it in
/// flight.)
///
/// # Safety
///
/// As [`by_q8_0_panels`] for the rows `x` and `y`, inlined into a function with the
/// features `B` needs.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn panels<B: BlockDot, const FOUR_BIT: bool, const TILE: usize>(
    k: usize,
    x: [*const u8; TILE],
    w: *const u8,
    y: [*mut f32; TILE],
    panels: usize,
) {
    use std::arch::x86_64::*;
    let blocks = k / 32;
    let w_block = weight_block_bytes(FOUR_BIT);
    // Per block, the scale of each row of x.
    // SAFETY: each row of x holds k / 32 blocks (the contract).
    let rows: [Vec<f32>; TILE] = std::array::from_fn(|t| unsafe { x_scales(x[t], blocks) });
    let dx: Vec<[f32; TILE]> = (0..blocks)
        .map(|b| std::array::from_fn(|t| rows[t][b]))
        .collect();
    for p in 0..panels {
        // SAFETY: block b of each x row, and block b of panel p's four rows, are inside
        // the buffers of the contract; the CPU has the features (the contract).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); PANEL_ROWS]; TILE];
            for (b, dxb) in dx.iter().enumerate() {
                let xb: [B; TILE] =
                    std::array::from_fn(|t| B::load::<FOUR_BIT>(x[t].add(b * Q8_0_BLOCK_BYTES)));
                let group = w.add((p * blocks + b) * PANEL_ROWS * w_block);
                let scale =
                    |r: usize| u64::from(group.add(r * w_block).cast::<u16>().read_unaligned());
                let bits = scale(0) | scale(1) << 16 | scale(2) << 32 | scale(3) << 48;
                let dw = _mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64));
                // Per x row, `dx * dw` of the four weight rows, each in every lane.
                let scales: [[__m256; PANEL_ROWS]; TILE] = std::array::from_fn(|t| {
                    let products = _mm_mul_ps(dw, _mm_set1_ps(dxb[t]));
                    [
                        _mm256_broadcastss_ps(products),
                        _mm256_broadcastss_ps(_mm_movehdup_ps(products)),
                        _mm256_broadcastss_ps(_mm_movehl_ps(products, products)),
                        _mm256_broadcastss_ps(_mm_shuffle_ps(products, products, 0xff)),
                    ]
                });
                for r in 0..PANEL_ROWS {
                    let codes = B::weight::<FOUR_BIT>(group.add(r * w_block));
                    for t in 0..TILE {
                        let sums = xb[t].dot::<FOUR_BIT>(codes);
                        acc[t][r] = _mm256_fmadd_ps(sums, scales[t][r], acc[t][r]);
                    }
                }
            }
            for (t, rows) in acc.into_iter().enumerate() {
                for (r, a) in rows.into_iter().enumerate() {
                    // Each row of y holds 4 * panels floats (the contract).
                    *y[t].add(PANEL_ROWS * p + r) = super::ukernel::lane_sum(a);
                }
            }
        }
    }
}

/// One row after another. (Interleaving two or four rows to share the loads of x ran
/// 1.2x to 2.7x slower on the 110M shape: the rows' streams defeat the prefetcher.)
///
/// # Safety
///
/// As [`by_q8_0_rows`], inlined into a function with the features `B` needs.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows<B: BlockDot, const FOUR_BIT: bool>(
    k: usize,
    x: *const u8,
    w: *const u8,
    y: *mut f32,
    rows: usize,
) {
    let row_bytes = k / 32 * weight_block_bytes(FOUR_BIT);
    // SAFETY: x holds k / 32 blocks (the contract).
    let dx = unsafe { x_scales(x, k / 32) };
    for r in 0..rows {
        // SAFETY: row r is inside the `rows` rows of the contract, y[r] too.
        unsafe { *y.add(r) = row::<B, FOUR_BIT>(x, &dx, w.add(r * row_bytes)) };
    }
}

/// The scales of the `blocks` q8_0 blocks of x as f32, once for every row (F16C:
/// activation scales are often subnormal in f16, and widening one by a float multiply
/// stalls on it). On the heap: a 2 KiB stack buffer instead ran 5% slower on the 110M
/// shape.
///
/// # Safety
///
/// `x` points to `blocks` q8_0 blocks, and the CPU has F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn x_scales(x: *const u8, blocks: usize) -> Vec<f32> {
    use std::arch::x86_64::*;
    (0..blocks)
        .map(|b| {
            // SAFETY: block b of x is inside the row (the contract).
            let bits = unsafe { x.add(b * Q8_0_BLOCK_BYTES).cast::<u32>().read_unaligned() };
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        })
        .collect()
}

/// The codes of one block of x, loaded once for every weight row it meets, a weight
/// block's codes, decoded once for every x row they meet, and their exact integer sums,
/// in eight 32-bit lanes.
#[cfg(target_arch = "x86_64")]
trait BlockDot: Copy {
    /// The codes of the q8_0 block at `xb`.
    ///
    /// # Safety
    ///
    /// `xb` points to a whole q8_0 block, and the CPU has the implementation's features.
    unsafe fn load<const FOUR_BIT: bool>(xb: *const u8) -> Self;

    /// The codes of the weight block at `wb` (q4_0 nibbles, or q8_0 codes), as
    /// [`BlockDot::dot`] takes them.
    ///
    /// # Safety
    ///
    /// `wb` points to a whole weight block of the format, and the CPU has the
    /// implementation's features.
    unsafe fn weight<const FOUR_BIT: bool>(wb: *const u8) -> [std::arch::x86_64::__m256i; 2];

    /// The block's exact integer sums against the weight codes `w`, as floats.
    ///
    /// # Safety
    ///
    /// The CPU has the implementation's features.
    unsafe fn dot<const FOUR_BIT: bool>(
        self,
        w: [std::arch::x86_64::__m256i; 2],
    ) -> std::arch::x86_64::__m256;
}

/// AVX2: x's codes as signed bytes with q4_0's recentring term `8 * Σ qx` in pair sums
/// (`FOUR_BIT`), or widened to 16 bits for q8_0's `vpmaddwd`.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct XBlock([std::arch::x86_64::__m256i; 2]);

#[cfg(target_arch = "x86_64")]
impl BlockDot for XBlock {
    #[inline(always)]
    unsafe fn load<const FOUR_BIT: bool>(xb: *const u8) -> XBlock {
        use std::arch::x86_64::*;
        // SAFETY: the block's 32 codes follow its 2-byte scale (the contract); AVX2 is
        // the caller's.
        unsafe {
            if FOUR_BIT {
                let xq = _mm256_loadu_si256(xb.add(2).cast());
                XBlock([xq, _mm256_maddubs_epi16(_mm256_set1_epi8(8), xq)])
            } else {
                XBlock([
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(xb.add(2).cast())),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(xb.add(18).cast())),
                ])
            }
        }
    }

    #[inline(always)]
    unsafe fn weight<const FOUR_BIT: bool>(wb: *const u8) -> [std::arch::x86_64::__m256i; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the block's codes follow its 2-byte scale (the contract); AVX2 is the
        // caller's.
        unsafe {
            if FOUR_BIT {
                [nibbles(wb), _mm256_setzero_si256()]
            } else {
                [
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(2).cast())),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(18).cast())),
                ]
            }
        }
    }

    #[inline(always)]
    unsafe fn dot<const FOUR_BIT: bool>(
        self,
        w: [std::arch::x86_64::__m256i; 2],
    ) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 is the caller's.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let sums = if FOUR_BIT {
                let pairs = _mm256_sub_epi16(_mm256_maddubs_epi16(w[0], self.0[0]), self.0[1]);
                _mm256_madd_epi16(pairs, ones)
            } else {
                _mm256_add_epi32(
                    _mm256_madd_epi16(self.0[0], w[0]),
                    _mm256_madd_epi16(self.0[1], w[1]),
                )
            };
            _mm256_cvtepi32_ps(sums)
        }
    }
}

/// AVX-512 VNNI: x's codes as signed bytes, with the recentring term of the unsigned
/// weight bytes in 32-bit lanes: `8 * Σ qx` for q4_0's nibbles, `128 * Σ qx` for q8_0's
/// codes, which meet x with their sign bit flipped (`q + 128`, unsigned). Each lane sums
/// four products in `vpdpbusd`, exactly (and the same lanes as AVX2's q4_0 sums).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct XBlockVnni([std::arch::x86_64::__m256i; 2]);

#[cfg(target_arch = "x86_64")]
impl BlockDot for XBlockVnni {
    #[inline(always)]
    unsafe fn load<const FOUR_BIT: bool>(xb: *const u8) -> XBlockVnni {
        use std::arch::x86_64::*;
        // SAFETY: the block's 32 codes follow its 2-byte scale (the contract); VNNI is
        // the caller's.
        unsafe {
            let xq = _mm256_loadu_si256(xb.add(2).cast());
            let offset = _mm256_set1_epi8(if FOUR_BIT { 8 } else { i8::MIN });
            XBlockVnni([xq, _mm256_dpbusd_epi32(_mm256_setzero_si256(), offset, xq)])
        }
    }

    #[inline(always)]
    unsafe fn weight<const FOUR_BIT: bool>(wb: *const u8) -> [std::arch::x86_64::__m256i; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the block's codes follow its 2-byte scale (the contract); AVX2 is the
        // caller's.
        unsafe {
            let codes = if FOUR_BIT {
                nibbles(wb)
            } else {
                let signed = _mm256_loadu_si256(wb.add(2).cast());
                _mm256_xor_si256(signed, _mm256_set1_epi8(i8::MIN))
            };
            [codes, _mm256_setzero_si256()]
        }
    }

    #[inline(always)]
    unsafe fn dot<const FOUR_BIT: bool>(
        self,
        w: [std::arch::x86_64::__m256i; 2],
    ) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: VNNI is the caller's.
        unsafe {
            let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[0], self.0[0]);
            _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, self.0[1]))
        }
    }
}

/// The 32 nibbles of the q4_0 block at `wb` as bytes in value order: low nibbles (values
/// 0..16) in the low half, high nibbles in the high.
///
/// # Safety
///
/// `wb` points to a whole q4_0 block, and the caller has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn nibbles(wb: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the 16 code bytes follow the 2-byte scale (the contract).
    unsafe {
        let packed = _mm_loadu_si128(wb.add(2).cast());
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }
}

/// The dot product of x with a q8_0 (`FOUR_BIT = false`) or q4_0 (`FOUR_BIT = true`) row:
/// per block, the integer sums in eight 32-bit lanes, converted and scaled by `dx * dw`
/// into one of two eight-lane accumulators (even and odd blocks: two multiply-add chains).
///
/// # Safety
///
/// As [`rows`], for one row.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row<B: BlockDot, const FOUR_BIT: bool>(x: *const u8, dx: &[f32], w: *const u8) -> f32 {
    use std::arch::x86_64::*;
    let w_block = weight_block_bytes(FOUR_BIT);
    // Block `b`'s sums as floats.
    let block = |b: usize| {
        // SAFETY: block `b` of x is at `34 * b`, of w at `w_block * b`, both inside the
        // rows the callers' contracts describe.
        unsafe {
            let codes = B::weight::<FOUR_BIT>(w.add(b * w_block));
            B::load::<FOUR_BIT>(x.add(b * Q8_0_BLOCK_BYTES)).dot::<FOUR_BIT>(codes)
        }
    };
    // The f16 scale of w at block `b`.
    let w_scale = |b: usize| {
        // SAFETY: as in `block`.
        unsafe { u32::from(w.add(b * w_block).cast::<u16>().read_unaligned()) }
    };
    let blocks = dx.len();
    // SAFETY: the caller has AVX2, FMA and F16C.
    unsafe {
        let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for pair in 0..blocks / 2 {
            // `dx * dw` of both blocks: both weight scales converted at once by F16C, from
            // one 32-bit move (a 16-bit lane insert would depend on the register's old
            // value, and could chain the blocks), times the two scales of x.
            let bits = w_scale(2 * pair) | w_scale(2 * pair + 1) << 16;
            let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
            // `dx` holds a value for every block, these two included (an unaligned 64-bit
            // load: `dx` is only 4-byte aligned).
            let dxs = _mm_castsi128_ps(_mm_loadl_epi64(dx.as_ptr().add(2 * pair).cast()));
            let products = _mm_mul_ps(dw, dxs);
            let s0 = block(2 * pair);
            let s1 = block(2 * pair + 1);
            even = _mm256_fmadd_ps(s0, _mm256_broadcastss_ps(products), even);
            odd = _mm256_fmadd_ps(s1, _mm256_broadcastss_ps(_mm_movehdup_ps(products)), odd);
        }
        if blocks % 2 == 1 {
            let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(w_scale(blocks - 1) as i32));
            let product = _mm_mul_ss(dw, _mm_set_ss(dx[blocks - 1]));
            even = _mm256_fmadd_ps(block(blocks - 1), _mm256_broadcastss_ps(product), even);
        }
        super::ukernel::lane_sum(_mm256_add_ps(even, odd))
    }
}

/// The dot product of the q8_0 row at `x` with the `weight` row (q8_0 or q4_0) at `row`,
/// whose blocks lie `block_stride` bytes apart (their size, or four times it in a block
/// panel), `k` values each, in generated code: per block, the codes widened to 16 bits meet in
/// `pmaddwd`, the 32-bit lanes are converted and scaled by `dx * dw` into the sums.
pub fn dot_row(
    b: &mut FunctionBuilder,
    weight: WeightFormat,
    x: Value,
    row: Value,
    block_stride: Value,
    k: usize,
) -> Value {
    let acc = zeroed_accumulators(b, 1)[0];
    let zero = b.ins().iconst(types::I64, 0);
    let blocks = b.ins().iconst(types::I64, (k / 32) as i64);
    for_range(b, zero, blocks, 1, |b, blk| {
        let xb = address(b, x, blk, Q8_0_BLOCK_BYTES as i64);
        let offset = b.ins().imul(blk, block_stride);
        let wb = b.ins().iadd(row, offset);
        let x_codes = [
            b.ins().load(types::I8X16, mem(), xb, 2),
            b.ins().load(types::I8X16, mem(), xb, 18),
        ];
        let w_codes = match weight {
            WeightFormat::Q4_0 => {
                let packed = b.ins().load(types::I8X16, mem(), wb, 2);
                let eight = splat_i8(b, 8);
                split_nibbles(b, packed).map(|n| b.ins().isub(n, eight))
            }
            _ => [
                b.ins().load(types::I8X16, mem(), wb, 2),
                b.ins().load(types::I8X16, mem(), wb, 18),
            ],
        };
        let mut sum = None;
        for (xv, wv) in x_codes.into_iter().zip(w_codes) {
            for (xh, wh) in [
                (b.ins().swiden_low(xv), b.ins().swiden_low(wv)),
                (b.ins().swiden_high(xv), b.ins().swiden_high(wv)),
            ] {
                let pairs = pairwise_dot(b, xh, wh);
                sum = Some(match sum {
                    Some(s) => b.ins().iadd(s, pairs),
                    None => pairs,
                });
            }
        }
        let sum = sum.expect("a block has codes");
        let sum = b.ins().fcvt_from_sint(types::F32X4, sum);
        let dx = load_f16(b, xb, 0);
        let dw = load_f16(b, wb, 0);
        let scale = b.ins().fmul(dx, dw);
        let scale = b.ins().splat(types::F32X4, scale);
        let old = b.use_var(acc);
        let new = b.ins().fma(sum, scale, old);
        b.def_var(acc, new);
    });
    let a = b.use_var(acc);
    horizontal_sum(b, a)
}

/// `[x0·y0 + x1·y1, x2·y2 + x3·y3, ...]` of two `i16x8` as an `i32x4` (x86's `pmaddwd`:
/// Cranelift matches this exact tree).
fn pairwise_dot(b: &mut FunctionBuilder, x: Value, y: Value) -> Value {
    let (xl, yl) = (b.ins().swiden_low(x), b.ins().swiden_low(y));
    let (xh, yh) = (b.ins().swiden_high(x), b.ins().swiden_high(y));
    let low = b.ins().imul(xl, yl);
    let high = b.ins().imul(xh, yh);
    b.ins().iadd_pairwise(low, high)
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// `blocks` blocks: every code byte drawn from the whole byte range (-128
    /// included, which no quantizer writes but a q8_0 value may hold), and f16 scales.
    fn row(blocks: usize, block_bytes: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        };
        let mut bytes = Vec::new();
        for b in 0..blocks {
            let scale = half::f16::from_f32(0.01 * (b as f32 + 1.0)).to_bits();
            bytes.extend(scale.to_le_bytes());
            bytes.extend((0..block_bytes - 2).map(|_| next()));
        }
        bytes
    }

    /// The sum over blocks of `dx * dw * Σ qx·qw` (exact integer sums), and of the
    /// blocks' magnitudes (the scale of the rounding error).
    fn expected(x: &[u8], w: &[u8], four_bit: bool) -> (f32, f32) {
        let w_block = if four_bit { 18 } else { 34 };
        let scale = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        x.chunks(34)
            .zip(w.chunks(w_block))
            .map(|(xb, wb)| {
                let codes: Vec<i32> = if four_bit {
                    let low = wb[2..].iter().map(|&q| i32::from(q & 15) - 8);
                    let high = wb[2..].iter().map(|&q| i32::from(q >> 4) - 8);
                    low.chain(high).collect()
                } else {
                    wb[2..].iter().map(|&q| i32::from(q as i8)).collect()
                };
                let sum: i32 = xb[2..]
                    .iter()
                    .zip(codes)
                    .map(|(&q, c)| i32::from(q as i8) * c)
                    .sum();
                scale(xb) * scale(wb) * sum as f32
            })
            .fold((0.0, 0.0), |(s, m), v| (s + v, m + v.abs()))
    }

    /// An instance of [`by_q8_0_rows`] or [`by_q8_0_panels`].
    type Kernel = unsafe extern "C" fn(i64, *const u8, *const u8, *mut u8, i64, i64, i64, i64);

    /// Block panels against 1 to 9 rows of x (whole tiles of both instruction sets and
    /// their remainders), the AVX2 form and, where the CPU has it, the VNNI form: every
    /// output is the exact block sums' (as the row kernel's test checks).
    #[test]
    fn panels_take_x_in_tiles_of_rows() {
        if !super::super::ukernel::available() {
            return;
        }
        let (blocks, n) = (5, 8);
        for m in 1..10 {
            // Rows of x with scales of their own.
            let mut x: Vec<u8> = (0..m).flat_map(|i| row(blocks, 34, 7 + i as u64)).collect();
            for (j, block) in x.chunks_mut(34).enumerate() {
                let scale = half::f16::from_f32(0.003 * (j + 1) as f32).to_bits();
                block[..2].copy_from_slice(&scale.to_le_bytes());
            }
            let kernels: [(bool, bool, Kernel); 4] = [
                (false, false, by_q8_0_panels::<false, false>),
                (true, false, by_q8_0_panels::<true, false>),
                (false, true, by_q8_0_panels::<false, true>),
                (true, true, by_q8_0_panels::<true, true>),
            ];
            for (four_bit, with_vnni, kernel) in kernels {
                if with_vnni && !vnni() {
                    continue;
                }
                let block_bytes = if four_bit { 18 } else { 34 };
                let w = row(n * blocks, block_bytes, 300 + m as u64);
                let row_bytes = blocks * block_bytes;
                let panels = crate::kernel::pack_block_panels(&w, n, row_bytes, block_bytes);
                // y rows wider than the panels' outputs, to check the stride.
                let width = n + 3;
                let mut y = vec![f32::NAN; m * width];
                // SAFETY: x holds m rows of `blocks` blocks, the panels n / 4 panels of
                // as many, y m rows of `width` floats; AVX2, FMA and F16C are checked,
                // and VNNI where it is used.
                unsafe {
                    kernel(
                        (32 * blocks) as i64,
                        x.as_ptr(),
                        panels.as_ptr(),
                        y.as_mut_ptr().cast(),
                        (n / 4) as i64,
                        m as i64,
                        (blocks * 34) as i64,
                        (4 * width) as i64,
                    )
                };
                for i in 0..m {
                    let xi = &x[i * blocks * 34..(i + 1) * blocks * 34];
                    for r in 0..n {
                        let (want, magnitude) =
                            expected(xi, &w[r * row_bytes..(r + 1) * row_bytes], four_bit);
                        let got = y[i * width + r];
                        assert!(
                            (got - want).abs() <= 1e-6 * magnitude.max(1.0),
                            "{m} rows of x, row {i}, weight row {r}, four_bit {four_bit}, vnni {with_vnni}: {got} != {want}"
                        );
                    }
                    assert!(y[i * width + n..(i + 1) * width].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    #[test]
    fn block_sums_are_exact_for_every_byte_and_row() {
        if !super::super::ukernel::available() {
            return;
        }
        for (seed, blocks, rows) in [(1u64, 1usize, 1usize), (2, 3, 4), (3, 8, 7), (4, 24, 9)] {
            let x = row(blocks, 34, seed);
            // Both instruction sets where the CPU has VNNI.
            let kernels: [(bool, bool, Kernel); 4] = [
                (false, false, by_q8_0_rows::<false, false>),
                (true, false, by_q8_0_rows::<true, false>),
                (false, true, by_q8_0_rows::<false, true>),
                (true, true, by_q8_0_rows::<true, true>),
            ];
            for (four_bit, with_vnni, kernel) in kernels {
                if with_vnni && !vnni() {
                    continue;
                }
                let w = row(rows * blocks, if four_bit { 18 } else { 34 }, seed + 100);
                let mut y = vec![0f32; rows];
                let k = (32 * blocks) as i64;
                // SAFETY: x holds `blocks` blocks, w `rows` rows of as many blocks of its
                // format, y `rows` floats; AVX2, FMA and F16C are checked, and VNNI where
                // it is used.
                unsafe {
                    let y = y.as_mut_ptr().cast();
                    kernel(k, x.as_ptr(), w.as_ptr(), y, rows as i64, 1, 0, 0)
                };
                let row_bytes = w.len() / rows;
                for (r, got) in y.iter().enumerate() {
                    let row = &w[r * row_bytes..(r + 1) * row_bytes];
                    let (want, magnitude) = expected(&x, row, four_bit);
                    assert!(
                        (got - want).abs() <= 1e-6 * magnitude.max(1.0),
                        "{blocks} blocks, row {r} of {rows}, four_bit {four_bit}, vnni {with_vnni}: {got} != {want}"
                    );
                }
            }
        }
    }
}
