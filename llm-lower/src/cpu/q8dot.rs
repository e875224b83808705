//! Integer dot products of q8_0 activations with the GGUF formats of 32-value blocks:
//! q8_0, q4_0, q4_1, q5_0, q5_1 and iq4_nl.
//!
//! After `quantize-activations`, a block of 32 values of x is an f16 scale `dx` and 32
//! signed bytes `qx`. A weight block of these formats starts with its f16 scale `dw`;
//! its 32 codes `c` are signed bytes (q8_0, and iq4_nl's nibbles looked up in its 16
//! signed levels by `vpshufb`), nibbles (q4_0, q4_1) or nibbles with a fifth bit each from
//! a 32-bit word (q5_0, q5_1), worth `dw * c`, `dw * (c - centre)` (q4_0's centre is 8,
//! q5_0's 16) or `dw * c + mw` (q4_1 and q5_1 keep an f16 minimum `mw` after the scale). The block's dot product is `dx * dw * (Σ qx·c - centre * Σ qx) + mw * dx * Σ qx`,
//! where the sums are exact integers: no product needs a float until the block is done,
//! and each block costs one conversion and one multiply-add (two with a minimum, whose
//! `dx * Σ qx` is the same for every weight row and formed once per row of x).
//!
//! Two implementations, one per target:
//! - [`by_q8_0_rows`] and [`by_q8_0_panels`], AVX2 microkernels that generated
//!   contractions call for a run of weight rows (row major, or four at a time in block
//!   panels) against the rows of x when the CPU has AVX2 ([`super::ukernel::available`]),
//!   one instance per format ([`Blocks`], [`entry_points`]).
//!   Codes meet x in `vpmaddubsw` (unsigned by signed bytes into 16-bit pair sums: at
//!   most `2 * 31 * 128` for five-bit codes) and the recentring is taken off as
//!   `centre * Σ qx` (one more `vpmaddubsw`): exact for every byte x may hold, -128
//!   included (the sign trick, `|w|` by `sign(w) * x`, is not).
//!   Signed codes are widened to 16 bits and meet x in `vpmaddwd`, or, where they lie
//!   within ±127 (iq4_nl's levels), meet `|qx|` carrying `qx`'s sign in `vpmaddubsw`
//!   (exact: the sign goes to the weight code, never -128). Where the CPU has
//!   AVX-512 VNNI ([`vnni`]), the same loops run with `vpdpbusd`, four byte products per
//!   32-bit lane in one instruction: the unsigned codes as they are, signed codes with
//!   their sign bit flipped (`c + 128`, centre 128), each recentring taken off per lane.
//! - [`dot_row`] (q8_0 and q4_0) and [`super::dequant::dot_row_q8_0_x`] (every format),
//!   the same sums in generated code, for CPUs without AVX2 and for the tests that compare
//!   both with the interpreter.
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
#[cfg(target_arch = "x86_64")]
use llm_ir::types::IQ4_NL_LEVELS;

/// The weight formats these kernels read, each with the symbols generated code imports
/// its [`by_q8_0_rows`] and [`by_q8_0_panels`] instances ([`entry_points`]) under.
pub const SYMBOLS: [(WeightFormat, &str, &str); 6] = [
    (
        WeightFormat::Q8_0,
        "llmc_q8_0_by_q8_0_rows",
        "llmc_q8_0_by_q8_0_panels",
    ),
    (
        WeightFormat::Q4_0,
        "llmc_q4_0_by_q8_0_rows",
        "llmc_q4_0_by_q8_0_panels",
    ),
    (
        WeightFormat::Q4_1,
        "llmc_q4_1_by_q8_0_rows",
        "llmc_q4_1_by_q8_0_panels",
    ),
    (
        WeightFormat::Q5_0,
        "llmc_q5_0_by_q8_0_rows",
        "llmc_q5_0_by_q8_0_panels",
    ),
    (
        WeightFormat::Q5_1,
        "llmc_q5_1_by_q8_0_rows",
        "llmc_q5_1_by_q8_0_panels",
    ),
    (
        WeightFormat::Iq4Nl,
        "llmc_iq4_nl_by_q8_0_rows",
        "llmc_iq4_nl_by_q8_0_panels",
    ),
];

/// The [`by_q8_0_rows`] and [`by_q8_0_panels`] instances for `format` (each format of
/// [`SYMBOLS`]), with VNNI's byte dot products where the CPU has them ([`vnni`]), else
/// AVX2's; `None` for the formats these kernels do not read.
#[cfg(target_arch = "x86_64")]
pub fn entry_points(format: WeightFormat) -> Option<(*const u8, *const u8)> {
    fn of<W: Blocks>() -> (*const u8, *const u8) {
        if vnni() {
            (
                by_q8_0_rows::<W, true> as *const u8,
                by_q8_0_panels::<W, true> as *const u8,
            )
        } else {
            (
                by_q8_0_rows::<W, false> as *const u8,
                by_q8_0_panels::<W, false> as *const u8,
            )
        }
    }
    Some(match format {
        WeightFormat::Q8_0 => of::<Q8_0>(),
        WeightFormat::Q4_0 => of::<Q4_0>(),
        WeightFormat::Q4_1 => of::<Q4_1>(),
        WeightFormat::Q5_0 => of::<Q5_0>(),
        WeightFormat::Q5_1 => of::<Q5_1>(),
        WeightFormat::Iq4Nl => of::<Iq4Nl>(),
        _ => return None,
    })
}

/// Bytes of a q8_0 block: an f16 scale and 32 codes.
pub(super) const Q8_0_BLOCK_BYTES: usize = 34;

/// A weight format of 32-value blocks that start with their f16 scale `dw`, as these
/// kernels read it: 32 codes as unsigned bytes `c`, worth `dw * (c - CENTRE)`, plus the
/// block's f16 minimum after the scale where it has one; or 32 signed codes `c` worth
/// `dw * c` (q8_0, iq4_nl).
///
/// # Safety
///
/// The kernels read `BYTES` bytes a block and take the constants as the layout's truth:
/// an implementation's constants and [`Blocks::codes`] must describe its format's blocks
/// exactly (`codes` reading only inside the block).
#[cfg(target_arch = "x86_64")]
pub unsafe trait Blocks {
    /// Bytes of a block.
    const BYTES: usize;
    /// What the codes are recentred by: 8 (q4_0), 16 (q5_0), 128 (signed codes, which
    /// VNNI meets with their sign bit flipped), 0 (the formats with a minimum).
    const CENTRE: u8;
    /// Whether an f16 minimum `mw` follows the scale (q4_1, q5_1: values `dw * c + mw`).
    const MINIMUM: bool;
    /// Whether the codes are signed bytes (q8_0, iq4_nl), which AVX2 widens to 16 bits for
    /// `vpmaddwd` (`vpmaddubsw`'s 16-bit pair sums would saturate on flipped codes up to
    /// 255), unless they lie within ±127 ([`Blocks::WITHIN_127`]).
    const SIGNED: bool = false;
    /// Whether the signed codes lie within ±127 (iq4_nl's levels; a q8_0 weight may hold
    /// -128): AVX2 then multiplies them by x's codes in `vpmaddubsw`, as `|qx|` times the
    /// code carrying `qx`'s sign (exact: pair sums within `2 * 128 * 127`), not widened.
    const WITHIN_127: bool = false;

    /// The 32 codes of the block at `wb` in value order: unsigned bytes, or signed ones
    /// where the format is [`Blocks::SIGNED`].
    ///
    /// # Safety
    ///
    /// `wb` points to a whole block of the format, and the caller has AVX2.
    unsafe fn codes(wb: *const u8) -> std::arch::x86_64::__m256i;
}

/// GGUF q8_0: an f16 scale and 32 signed codes (34 bytes).
#[cfg(target_arch = "x86_64")]
struct Q8_0;

/// GGUF q4_0: an f16 scale and 16 bytes of nibbles (18 bytes), values `dw * (c - 8)`.
#[cfg(target_arch = "x86_64")]
struct Q4_0;

/// GGUF q4_1: an f16 scale and minimum and 16 bytes of nibbles (20 bytes).
#[cfg(target_arch = "x86_64")]
struct Q4_1;

/// GGUF q5_0: an f16 scale, a word of fifth bits and 16 bytes of nibbles (22 bytes),
/// values `dw * (c - 16)`.
#[cfg(target_arch = "x86_64")]
struct Q5_0;

/// GGUF q5_1: an f16 scale and minimum, a word of fifth bits and 16 bytes of nibbles (24
/// bytes).
#[cfg(target_arch = "x86_64")]
struct Q5_1;

/// GGUF iq4_nl: an f16 scale and 16 bytes of nibbles (18 bytes), each nibble an index into
/// 16 signed levels (`IQ4_NL_LEVELS`), values `dw * level`.
#[cfg(target_arch = "x86_64")]
struct Iq4Nl;

#[cfg(target_arch = "x86_64")]
// SAFETY: the constants and `codes` are ggml's q8_0 layout.
unsafe impl Blocks for Q8_0 {
    const BYTES: usize = Q8_0_BLOCK_BYTES;
    const CENTRE: u8 = 128;
    const MINIMUM: bool = false;
    const SIGNED: bool = true;

    #[inline(always)]
    unsafe fn codes(wb: *const u8) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: the 32 codes follow the 2-byte scale (the contract); AVX2 is the caller's.
        unsafe { _mm256_loadu_si256(wb.add(2).cast()) }
    }
}

#[cfg(target_arch = "x86_64")]
// SAFETY: the constants and `codes` are ggml's q4_0 layout.
unsafe impl Blocks for Q4_0 {
    const BYTES: usize = 18;
    const CENTRE: u8 = 8;
    const MINIMUM: bool = false;

    #[inline(always)]
    unsafe fn codes(wb: *const u8) -> std::arch::x86_64::__m256i {
        // SAFETY: the 16 nibble bytes follow the scale (the contract).
        unsafe { nibbles(wb.add(2)) }
    }
}

#[cfg(target_arch = "x86_64")]
// SAFETY: the constants and `codes` are ggml's q4_1 layout.
unsafe impl Blocks for Q4_1 {
    const BYTES: usize = 20;
    const CENTRE: u8 = 0;
    const MINIMUM: bool = true;

    #[inline(always)]
    unsafe fn codes(wb: *const u8) -> std::arch::x86_64::__m256i {
        // SAFETY: the 16 nibble bytes follow the scale and minimum (the contract).
        unsafe { nibbles(wb.add(4)) }
    }
}

#[cfg(target_arch = "x86_64")]
// SAFETY: the constants and `codes` are ggml's q5_0 layout.
unsafe impl Blocks for Q5_0 {
    const BYTES: usize = 22;
    const CENTRE: u8 = 16;
    const MINIMUM: bool = false;

    #[inline(always)]
    unsafe fn codes(wb: *const u8) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: the fifth bits follow the scale, the 16 nibble bytes them (the contract).
        unsafe { _mm256_or_si256(nibbles(wb.add(6)), fifth_bits(wb.add(2))) }
    }
}

#[cfg(target_arch = "x86_64")]
// SAFETY: the constants and `codes` are ggml's q5_1 layout.
unsafe impl Blocks for Q5_1 {
    const BYTES: usize = 24;
    const CENTRE: u8 = 0;
    const MINIMUM: bool = true;

    #[inline(always)]
    unsafe fn codes(wb: *const u8) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: the fifth bits follow the scale and minimum, the 16 nibble bytes them
        // (the contract).
        unsafe { _mm256_or_si256(nibbles(wb.add(8)), fifth_bits(wb.add(4))) }
    }
}

#[cfg(target_arch = "x86_64")]
// SAFETY: the constants and `codes` are ggml's iq4nl layout.
unsafe impl Blocks for Iq4Nl {
    const BYTES: usize = 18;
    const CENTRE: u8 = 128;
    const MINIMUM: bool = false;
    const SIGNED: bool = true;
    const WITHIN_127: bool = true;

    #[inline(always)]
    unsafe fn codes(wb: *const u8) -> std::arch::x86_64::__m256i {
        // SAFETY: the 16 nibble bytes follow the scale (the contract).
        unsafe { iq4_nl_levels(wb.add(2)) }
    }
}

/// The 32 signed IQ4_NL levels the 16 nibble bytes at `packed` index, in value order (low
/// nibbles are values 0..16, high nibbles 16..32), looked up by `vpshufb`.
///
/// # Safety
///
/// `packed` points to 16 readable bytes, and the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn iq4_nl_levels(packed: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: forwarded from this function's contract.
    unsafe { _mm256_shuffle_epi8(level_table(&IQ4_NL_LEVELS), nibbles(packed)) }
}

/// 16 signed levels (IQ4_NL's, or the 4-bit floats') as bytes in both 128-bit lanes, for
/// `vpshufb`'s lookup within each lane.
///
/// # Safety
///
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn level_table(levels: &[i8; 16]) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: 16 bytes; AVX2 is the caller's.
    unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(levels.as_ptr().cast())) }
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
/// bytes apart) and the `rows` consecutive weight rows `w_r` of format `W` at `w`, with
/// AVX-512 VNNI's byte dot products (`VNNI`) or AVX2's; row `i` of `y` starts `y_stride`
/// bytes after row `i - 1`. Each format's instance is one symbol ([`SYMBOLS`]).
///
/// # Safety
///
/// `x` points to `m` rows of `k / 32 * 34` bytes (`k` a multiple of 32) `x_stride` apart,
/// `w` to `rows * k / 32` weight blocks of `W`, `y` to `m` rows of `rows` writable floats
/// `y_stride` apart, and the CPU has AVX2, FMA and F16C ([`super::ukernel::available`]),
/// and AVX-512 VNNI and VL for `VNNI` ([`vnni`]).
#[cfg(target_arch = "x86_64")]
#[allow(
    clippy::too_many_arguments,
    reason = "a C entry point for generated code: the operands and their strides"
)]
pub unsafe extern "C" fn by_q8_0_rows<W: Blocks, const VNNI: bool>(
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
                rows_vnni::<W>(k, x_rows.x(i), w, x_rows.y(i), rows);
            } else {
                rows_avx2::<W>(k, x_rows.x(i), w, x_rows.y(i), rows);
            }
        }
    }
}

/// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` (`x_stride`
/// bytes apart) and the `4 * panels` weight rows of format `W` in the block panels at `w`
/// ([`crate::kernel::pack_block_panels`]), with VNNI's byte dot products (`VNNI`) or
/// AVX2's; row `i` of `y` starts `y_stride` bytes after row `i - 1`. Each format's
/// instance is one symbol ([`SYMBOLS`]).
///
/// # Safety
///
/// `x` points to `m` rows of `k / 32 * 34` bytes (`k` a multiple of 32) `x_stride` apart,
/// `w` to `panels` panels of four rows of `k / 32` blocks of `W`, `y` to `m` rows of
/// `4 * panels` writable floats `y_stride` apart, and the CPU has AVX2, FMA and F16C
/// ([`super::ukernel::available`]), and AVX-512 VNNI and VL for `VNNI` ([`vnni`]).
#[cfg(target_arch = "x86_64")]
#[allow(
    clippy::too_many_arguments,
    reason = "a C entry point for generated code: the operands and their strides"
)]
pub unsafe extern "C" fn by_q8_0_panels<W: Blocks, const VNNI: bool>(
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
            panels_vnni::<W>(k, tiles, w, panels);
        } else {
            panels_avx2::<W>(k, tiles, w, panels);
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
        unsafe fn $panels<W: Blocks>(k: usize, tiles: XRows, w: *const u8, panels: usize) {
            // SAFETY: forwarded from the entry point's contract.
            unsafe { panel_tiles::<$block, W, $tile>(k, tiles, w, panels) }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $rows<W: Blocks>(k: usize, x: *const u8, w: *const u8, y: *mut f32, rows: usize) {
            // SAFETY: forwarded from the entry point's contract.
            unsafe { self::rows::<$block, W>(k, x, w, y, rows) }
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
unsafe fn panel_tiles<B: BlockDot, W: Blocks, const TILE: usize>(
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
            self::panels::<B, W, TILE>(k, xs, w, ys, panels);
            i += TILE;
        }
        while i < tiles.m {
            self::panels::<B, W, 1>(k, [tiles.x(i)], w, [tiles.y(i)], panels);
            i += 1;
        }
    }
}

/// Four rows at a time from one stream of weight bytes, against `TILE` rows of x: per
/// block, each x row's codes are loaded once for the four weight rows, the four weight
/// scales (and minimums) converted by one `vcvtph2ps`, each weight row's codes decoded
/// once for the `TILE` x rows, and every pair of rows has its own accumulator. (Streaming
/// at 16.0-16.5 GB/s from DRAM in a scratch harness where rows one after another reached
/// 12.3-13.0: the panel is one sequential stream, and four independent chains keep more
/// of it in flight.)
///
/// # Safety
///
/// As [`by_q8_0_panels`] for the rows `x` and `y`, inlined into a function with the
/// features `B` needs.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn panels<B: BlockDot, W: Blocks, const TILE: usize>(
    k: usize,
    x: [*const u8; TILE],
    w: *const u8,
    y: [*mut f32; TILE],
    panels: usize,
) {
    use std::arch::x86_64::*;
    let blocks = k / 32;
    // Per block, the scale (and `dx * Σ qx`) of each row of x.
    // SAFETY: each row of x holds k / 32 blocks (the contract).
    let rows: [XScales; TILE] =
        std::array::from_fn(|t| unsafe { XScales::of(x[t], blocks, W::MINIMUM) });
    let dx: Vec<[f32; TILE]> = (0..blocks)
        .map(|b| std::array::from_fn(|t| rows[t].dx[b]))
        .collect();
    let sums: Vec<[f32; TILE]> = if W::MINIMUM {
        (0..blocks)
            .map(|b| std::array::from_fn(|t| rows[t].sums[b]))
            .collect()
    } else {
        Vec::new()
    };
    for p in 0..panels {
        // SAFETY: block b of each x row, and block b of panel p's four rows, are inside
        // the buffers of the contract; the CPU has the features (the contract).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); PANEL_ROWS]; TILE];
            // Per x row, the minimums' terms of the four weight rows.
            let mut minimums = [_mm_setzero_ps(); TILE];
            for (b, dxb) in dx.iter().enumerate() {
                let xb: [B; TILE] =
                    std::array::from_fn(|t| B::load::<W>(x[t].add(b * Q8_0_BLOCK_BYTES)));
                let group = w.add((p * blocks + b) * PANEL_ROWS * W::BYTES);
                let dw = if W::MINIMUM {
                    let (dw, mw) = scales_and_minimums::<W>(group);
                    for t in 0..TILE {
                        minimums[t] = _mm_fmadd_ps(mw, _mm_set1_ps(sums[b][t]), minimums[t]);
                    }
                    dw
                } else {
                    four_scales::<W>(group)
                };
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
                    let codes = B::weight::<W>(group.add(r * W::BYTES));
                    for t in 0..TILE {
                        let sums = xb[t].dot::<W>(codes);
                        acc[t][r] = _mm256_fmadd_ps(sums, scales[t][r], acc[t][r]);
                    }
                }
            }
            for (t, rows) in acc.into_iter().enumerate() {
                let mut minimum = [0f32; PANEL_ROWS];
                _mm_storeu_ps(minimum.as_mut_ptr(), minimums[t]);
                for (r, a) in rows.into_iter().enumerate() {
                    // Each row of y holds 4 * panels floats (the contract).
                    *y[t].add(PANEL_ROWS * p + r) = super::ukernel::lane_sum(a) + minimum[r];
                }
            }
        }
    }
}

/// The f16 scales of the four blocks of a panel's group at `group` (one per row), as
/// floats converted by one `vcvtph2ps`.
///
/// # Safety
///
/// `group` points to four whole blocks of `W`, and the caller has AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn four_scales<W: Blocks>(group: *const u8) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    // SAFETY: each of the four blocks starts with its f16 scale (the contract).
    unsafe {
        let half = |r: usize| u64::from(group.add(r * W::BYTES).cast::<u16>().read_unaligned());
        let bits = half(0) | half(1) << 16 | half(2) << 32 | half(3) << 48;
        _mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64))
    }
}

/// The f16 scales and minimums of the four blocks of a panel's group at `group` (one per
/// row; each block's minimum follows its scale), as two vectors of floats: the four
/// 32-bit pairs converted by one `vcvtph2ps` and taken apart by two shuffles.
///
/// # Safety
///
/// `group` points to four whole blocks of `W`, which has a minimum, and the caller has
/// AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scales_and_minimums<W: Blocks>(
    group: *const u8,
) -> (std::arch::x86_64::__m128, std::arch::x86_64::__m128) {
    use std::arch::x86_64::*;
    // SAFETY: each of the four blocks starts with its f16 scale and minimum (the contract).
    unsafe {
        let pair = |r: usize| group.add(r * W::BYTES).cast::<i32>().read_unaligned();
        let both = _mm256_cvtph_ps(_mm_setr_epi32(pair(0), pair(1), pair(2), pair(3)));
        let (low, high) = (_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
        (
            _mm_shuffle_ps(low, high, 0b10_00_10_00),
            _mm_shuffle_ps(low, high, 0b11_01_11_01),
        )
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
unsafe fn rows<B: BlockDot, W: Blocks>(
    k: usize,
    x: *const u8,
    w: *const u8,
    y: *mut f32,
    rows: usize,
) {
    let row_bytes = k / 32 * W::BYTES;
    // SAFETY: x holds k / 32 blocks (the contract).
    let scales = unsafe { XScales::of(x, k / 32, W::MINIMUM) };
    for r in 0..rows {
        // SAFETY: row r is inside the `rows` rows of the contract, y[r] too.
        unsafe { *y.add(r) = row::<B, W>(x, &scales, w.add(r * row_bytes)) };
    }
}

/// What every weight row needs of a row of x, per block: its scale `dx` as f32, and for
/// formats with a minimum `dx * Σ qx` (what the minimum multiplies), once for every row.
#[cfg(target_arch = "x86_64")]
struct XScales {
    /// The blocks' scales.
    dx: Vec<f32>,
    /// The blocks' `dx * Σ qx`, or nothing where the weight has no minimum.
    sums: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
impl XScales {
    /// The scales of the `blocks` q8_0 blocks at `x`, and their `dx * Σ qx` with
    /// `minimum`. (F16C: activation scales are often subnormal in f16, and widening one
    /// by a float multiply stalls on it. On the heap: a 2 KiB stack buffer instead ran 5%
    /// slower on the 110M shape.)
    ///
    /// # Safety
    ///
    /// `x` points to `blocks` q8_0 blocks, and the CPU has AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn of(x: *const u8, blocks: usize, minimum: bool) -> XScales {
        // SAFETY: block b of x is inside the row (the contract).
        let block = |b: usize| unsafe { x.add(b * Q8_0_BLOCK_BYTES) };
        // SAFETY: as in `block`, for every block.
        let dx: Vec<f32> = (0..blocks).map(|b| unsafe { x_scale(block(b)) }).collect();
        let sums = if minimum {
            dx.iter()
                .enumerate()
                .map(|(b, &d)| {
                    // SAFETY: as in `block`. The lanes' sums are exact as floats (at most
                    // 32 * 128 in magnitude).
                    let lanes = unsafe { x_quad_sums(block(b)) };
                    d * super::ukernel::lane_sum(std::arch::x86_64::_mm256_cvtepi32_ps(lanes))
                })
                .collect()
        } else {
            Vec::new()
        };
        XScales { dx, sums }
    }
}

/// The scale of the q8_0 block at `xb` as an f32, widened by F16C (activation scales are
/// often subnormal in f16, and widening one by a float multiply stalls on it).
///
/// # Safety
///
/// `xb` points to a q8_0 block, and the CPU has F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn x_scale(xb: *const u8) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: the scale's two bytes and the two codes after them are the block's (the
    // contract); F16C is the caller's.
    unsafe {
        let bits = xb.cast::<u32>().read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }
}

/// The sums of the q8_0 block at `xb`'s codes over each 32-bit lane's four bytes, exact
/// (`vpmaddubsw` pairs of ones and codes, then `vpmaddwd` with ones).
///
/// # Safety
///
/// `xb` points to a q8_0 block, and the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn x_quad_sums(xb: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the 32 codes follow the scale (the contract); AVX2 is the caller's.
    unsafe {
        let codes = _mm256_loadu_si256(xb.add(2).cast());
        let pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), codes);
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }
}

/// The codes of one block of x, loaded once for every weight row it meets, a weight
/// block's codes, decoded once for every x row they meet, and their exact integer sums
/// (recentred), in eight 32-bit lanes.
#[cfg(target_arch = "x86_64")]
trait BlockDot: Copy {
    /// The codes of the q8_0 block at `xb`, as they meet blocks of `W`.
    ///
    /// # Safety
    ///
    /// `xb` points to a whole q8_0 block, and the CPU has the implementation's features.
    unsafe fn load<W: Blocks>(xb: *const u8) -> Self;

    /// The codes of the weight block at `wb`, as [`BlockDot::dot`] takes them.
    ///
    /// # Safety
    ///
    /// `wb` points to a whole weight block of `W`, and the CPU has the implementation's
    /// features.
    unsafe fn weight<W: Blocks>(wb: *const u8) -> [std::arch::x86_64::__m256i; 2];

    /// The block's exact integer sums against the weight codes `w`, as floats.
    ///
    /// # Safety
    ///
    /// The CPU has the implementation's features.
    unsafe fn dot<W: Blocks>(self, w: [std::arch::x86_64::__m256i; 2])
    -> std::arch::x86_64::__m256;
}

/// AVX2: x's codes as signed bytes with the recentring term `centre * Σ qx` in pair sums,
/// or widened to 16 bits for signed codes' `vpmaddwd`, or beside their magnitudes for
/// signed codes within ±127 ([`Blocks::WITHIN_127`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct XBlock([std::arch::x86_64::__m256i; 2]);

#[cfg(target_arch = "x86_64")]
impl BlockDot for XBlock {
    #[inline(always)]
    unsafe fn load<W: Blocks>(xb: *const u8) -> XBlock {
        use std::arch::x86_64::*;
        // SAFETY: the block's 32 codes follow its 2-byte scale (the contract); AVX2 is
        // the caller's.
        unsafe {
            if W::WITHIN_127 {
                let xq = _mm256_loadu_si256(xb.add(2).cast());
                XBlock([_mm256_abs_epi8(xq), xq])
            } else if W::SIGNED {
                XBlock([
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(xb.add(2).cast())),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(xb.add(18).cast())),
                ])
            } else {
                let xq = _mm256_loadu_si256(xb.add(2).cast());
                let centre = if W::CENTRE != 0 {
                    _mm256_maddubs_epi16(_mm256_set1_epi8(W::CENTRE as i8), xq)
                } else {
                    _mm256_setzero_si256()
                };
                XBlock([xq, centre])
            }
        }
    }

    #[inline(always)]
    unsafe fn weight<W: Blocks>(wb: *const u8) -> [std::arch::x86_64::__m256i; 2] {
        use std::arch::x86_64::*;
        // SAFETY: the block's codes follow its 2-byte scale (the contract); AVX2 is the
        // caller's.
        unsafe {
            let codes = W::codes(wb);
            if W::SIGNED && !W::WITHIN_127 {
                [
                    _mm256_cvtepi8_epi16(_mm256_castsi256_si128(codes)),
                    _mm256_cvtepi8_epi16(_mm256_extracti128_si256(codes, 1)),
                ]
            } else {
                [codes, _mm256_setzero_si256()]
            }
        }
    }

    #[inline(always)]
    unsafe fn dot<W: Blocks>(
        self,
        w: [std::arch::x86_64::__m256i; 2],
    ) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 is the caller's.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let sums = if W::WITHIN_127 {
                // |qx| (128 for -128, as an unsigned byte) by the code with qx's sign.
                let signed = _mm256_sign_epi8(w[0], self.0[1]);
                _mm256_madd_epi16(_mm256_maddubs_epi16(self.0[0], signed), ones)
            } else if W::SIGNED {
                _mm256_add_epi32(
                    _mm256_madd_epi16(self.0[0], w[0]),
                    _mm256_madd_epi16(self.0[1], w[1]),
                )
            } else {
                let mut pairs = _mm256_maddubs_epi16(w[0], self.0[0]);
                if W::CENTRE != 0 {
                    pairs = _mm256_sub_epi16(pairs, self.0[1]);
                }
                _mm256_madd_epi16(pairs, ones)
            };
            _mm256_cvtepi32_ps(sums)
        }
    }
}

/// AVX-512 VNNI: x's codes as signed bytes, with the recentring term of the unsigned
/// weight codes in 32-bit lanes (`centre * Σ qx`: signed codes meet x with their sign bit
/// flipped, `c + 128`). Each lane sums four products in `vpdpbusd`, exactly (and the same
/// lanes as AVX2's sums of unsigned codes).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct XBlockVnni([std::arch::x86_64::__m256i; 2]);

#[cfg(target_arch = "x86_64")]
impl BlockDot for XBlockVnni {
    #[inline(always)]
    unsafe fn load<W: Blocks>(xb: *const u8) -> XBlockVnni {
        use std::arch::x86_64::*;
        // SAFETY: the block's 32 codes follow its 2-byte scale (the contract); VNNI is
        // the caller's.
        unsafe {
            let xq = _mm256_loadu_si256(xb.add(2).cast());
            let centre = if W::CENTRE != 0 {
                let codes = _mm256_set1_epi8(W::CENTRE as i8);
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes, xq)
            } else {
                _mm256_setzero_si256()
            };
            XBlockVnni([xq, centre])
        }
    }

    #[inline(always)]
    unsafe fn weight<W: Blocks>(wb: *const u8) -> [std::arch::x86_64::__m256i; 2] {
        use std::arch::x86_64::*;
        // SAFETY: a whole block (the contract); AVX2 is the caller's.
        unsafe {
            let codes = W::codes(wb);
            if W::SIGNED {
                // Unsigned for `vpdpbusd`: the sign bit flipped, `c + 128` (`CENTRE`).
                [
                    _mm256_xor_si256(codes, _mm256_set1_epi8(i8::MIN)),
                    _mm256_setzero_si256(),
                ]
            } else {
                [codes, _mm256_setzero_si256()]
            }
        }
    }

    #[inline(always)]
    unsafe fn dot<W: Blocks>(
        self,
        w: [std::arch::x86_64::__m256i; 2],
    ) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: VNNI is the caller's.
        unsafe {
            let mut sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w[0], self.0[0]);
            if W::CENTRE != 0 {
                sums = _mm256_sub_epi32(sums, self.0[1]);
            }
            _mm256_cvtepi32_ps(sums)
        }
    }
}

/// The 32 nibbles of the 16 bytes at `packed` as bytes in value order: low nibbles
/// (values 0..16) in the low half, high nibbles in the high.
///
/// # Safety
///
/// `packed` points to 16 readable bytes, and the caller has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn nibbles(packed: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: 16 bytes (the contract).
    unsafe {
        let packed = _mm_loadu_si128(packed.cast());
        let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }
}

/// The fifth bits of a q5 block's 32 values, from the little-endian word at `qh`, as
/// bytes in value order holding 16 where the bit is set and 0 elsewhere: byte `l` takes
/// bit `l % 8` of the word's byte `l / 8` (the word is broadcast, each byte picks its
/// word byte by a shuffle, and a compare with its bit's mask makes the byte all ones).
///
/// # Safety
///
/// `qh` points to 4 readable bytes, and the caller has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn fifth_bits(qh: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: 4 bytes (the contract).
    unsafe {
        let word = _mm256_set1_epi32(qh.cast::<i32>().read_unaligned());
        // Each 128-bit lane holds the word four times; bytes 0..8 of the low lane pick its
        // byte 0, 8..16 byte 1, and the high lane's bytes bytes 2 and 3.
        let spread = _mm256_shuffle_epi8(
            word,
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            ),
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(16))
    }
}

/// The dot product of x with a row of `W`: per block, the integer sums in eight 32-bit
/// lanes, converted and scaled by `dx * dw` into one of two eight-lane accumulators (even
/// and odd blocks: two multiply-add chains), and with a minimum `mw * dx * Σ qx` into a
/// third.
///
/// # Safety
///
/// As [`rows`], for one row, with the `scales` of its row of x.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn row<B: BlockDot, W: Blocks>(x: *const u8, scales: &XScales, w: *const u8) -> f32 {
    use std::arch::x86_64::*;
    // Block `b`'s sums as floats.
    let block = |b: usize| {
        // SAFETY: block `b` of x is at `34 * b`, of w at `W::BYTES * b`, both inside the
        // rows the callers' contracts describe.
        unsafe {
            let codes = B::weight::<W>(w.add(b * W::BYTES));
            B::load::<W>(x.add(b * Q8_0_BLOCK_BYTES)).dot::<W>(codes)
        }
    };
    // The f16 at byte `at` of w's block `b` (its scale at 0, its minimum at 2).
    let half = |b: usize, at: usize| {
        // SAFETY: as in `block`.
        unsafe { u32::from(w.add(b * W::BYTES + at).cast::<u16>().read_unaligned()) }
    };
    let (dx, sums) = (&scales.dx, &scales.sums);
    let blocks = dx.len();
    // SAFETY: the caller has AVX2, FMA and F16C.
    unsafe {
        // Two blocks' f16 values at `at`, converted at once by F16C from one 32-bit move (a
        // 16-bit lane insert would depend on the register's old value, and could chain the
        // blocks), and the two values of x they multiply (an unaligned 64-bit load: the
        // vectors are only 4-byte aligned).
        let pair = |b: usize, at: usize, of: &[f32]| {
            let bits = half(b, at) | half(b + 1, at) << 16;
            let w = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
            (
                w,
                _mm_castsi128_ps(_mm_loadl_epi64(of.as_ptr().add(b).cast())),
            )
        };
        let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut minimums = _mm_setzero_ps();
        for pair_at in (0..blocks / 2).map(|p| 2 * p) {
            // `dx * dw` of both blocks.
            let (dw, dxs) = pair(pair_at, 0, dx);
            let products = _mm_mul_ps(dw, dxs);
            let s0 = block(pair_at);
            let s1 = block(pair_at + 1);
            even = _mm256_fmadd_ps(s0, _mm256_broadcastss_ps(products), even);
            odd = _mm256_fmadd_ps(s1, _mm256_broadcastss_ps(_mm_movehdup_ps(products)), odd);
            if W::MINIMUM {
                let (mw, sxs) = pair(pair_at, 2, sums);
                minimums = _mm_fmadd_ps(mw, sxs, minimums);
            }
        }
        if blocks % 2 == 1 {
            let last = blocks - 1;
            let dw = _mm_cvtph_ps(_mm_cvtsi32_si128(half(last, 0) as i32));
            let product = _mm_mul_ss(dw, _mm_set_ss(dx[last]));
            even = _mm256_fmadd_ps(block(last), _mm256_broadcastss_ps(product), even);
            if W::MINIMUM {
                let mw = _mm_cvtph_ps(_mm_cvtsi32_si128(half(last, 2) as i32));
                minimums = _mm_fmadd_ps(mw, _mm_set_ss(sums[last]), minimums);
            }
        }
        // Lanes 2 and 3 of `minimums` stay zero.
        let minimum = _mm_cvtss_f32(_mm_hadd_ps(minimums, minimums));
        super::ukernel::lane_sum(_mm256_add_ps(even, odd)) + minimum
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

    /// `blocks` blocks of `format`: every code byte (and every fifth bit) drawn from the
    /// whole byte range (-128 included, which no quantizer writes but a q8_0 value may
    /// hold), f16 scales, and f16 minimums where the format has them.
    fn row(blocks: usize, format: WeightFormat, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        };
        let block_bytes = format.row_bytes(32);
        let minimum = matches!(format, WeightFormat::Q4_1 | WeightFormat::Q5_1);
        let mut bytes = Vec::new();
        for b in 0..blocks {
            let scale = half::f16::from_f32(0.01 * (b as f32 + 1.0)).to_bits();
            bytes.extend(scale.to_le_bytes());
            let mut rest: Vec<u8> = (0..block_bytes - 2).map(|_| next()).collect();
            if minimum {
                let m = half::f16::from_f32(-0.07 * (b as f32 + 1.5)).to_bits();
                rest[..2].copy_from_slice(&m.to_le_bytes());
            }
            bytes.extend(rest);
        }
        bytes
    }

    /// A weight block's scale, minimum (0 without one) and codes (recentred), value
    /// `scale * code + minimum`, as ggml defines the formats.
    fn decode(format: WeightFormat, wb: &[u8]) -> (f32, f32, Vec<i32>) {
        let half = |at: usize| half::f16::from_le_bytes([wb[at], wb[at + 1]]).to_f32();
        let nibbles = |packed: &[u8]| -> Vec<i32> {
            let low = packed.iter().map(|&q| i32::from(q & 15));
            low.chain(packed.iter().map(|&q| i32::from(q >> 4)))
                .collect()
        };
        let fifth = |at: usize, codes: Vec<i32>| -> Vec<i32> {
            let word = u32::from_le_bytes(wb[at..at + 4].try_into().unwrap());
            let bits = (0..32).map(move |l| ((word >> l) & 1) as i32 * 16);
            codes.into_iter().zip(bits).map(|(c, h)| c + h).collect()
        };
        let centred = |codes: Vec<i32>, by: i32| codes.into_iter().map(|c| c - by).collect();
        match format {
            WeightFormat::Q8_0 => (
                half(0),
                0.0,
                wb[2..].iter().map(|&q| i32::from(q as i8)).collect(),
            ),
            WeightFormat::Q4_0 => (half(0), 0.0, centred(nibbles(&wb[2..]), 8)),
            WeightFormat::Q4_1 => (half(0), half(2), nibbles(&wb[4..])),
            WeightFormat::Q5_0 => (half(0), 0.0, centred(fifth(2, nibbles(&wb[6..])), 16)),
            WeightFormat::Q5_1 => (half(0), half(2), fifth(4, nibbles(&wb[8..]))),
            WeightFormat::Iq4Nl => {
                let levels = nibbles(&wb[2..]).into_iter();
                (
                    half(0),
                    0.0,
                    levels
                        .map(|n| i32::from(IQ4_NL_LEVELS[n as usize]))
                        .collect(),
                )
            }
            other => unreachable!("{other:?}"),
        }
    }

    /// The sum over blocks of `dx * (dw * Σ qx·c + mw * Σ qx)` (exact integer sums), and
    /// of the terms' magnitudes (the scale of the rounding error).
    fn expected(x: &[u8], w: &[u8], format: WeightFormat) -> (f32, f32) {
        let scale = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        x.chunks(34)
            .zip(w.chunks(format.row_bytes(32)))
            .flat_map(|(xb, wb)| {
                let (dw, mw, codes) = decode(format, wb);
                let qx = xb[2..].iter().map(|&q| i32::from(q as i8));
                let dot: i32 = qx.clone().zip(codes).map(|(q, c)| q * c).sum();
                let sum: i32 = qx.sum();
                [scale(xb) * dw * dot as f32, scale(xb) * mw * sum as f32]
            })
            .fold((0.0, 0.0), |(s, m), v| (s + v, m + v.abs()))
    }

    /// An instance of [`by_q8_0_rows`] or [`by_q8_0_panels`].
    type Kernel = unsafe extern "C" fn(i64, *const u8, *const u8, *mut u8, i64, i64, i64, i64);

    /// Every format's (format, VNNI, rows kernel, panels kernel), both instruction sets:
    /// the VNNI ones only where the CPU has VNNI.
    fn kernels() -> Vec<(WeightFormat, bool, Kernel, Kernel)> {
        fn of<W: Blocks>(format: WeightFormat) -> [(WeightFormat, bool, Kernel, Kernel); 2] {
            [
                (
                    format,
                    false,
                    by_q8_0_rows::<W, false>,
                    by_q8_0_panels::<W, false>,
                ),
                (
                    format,
                    true,
                    by_q8_0_rows::<W, true>,
                    by_q8_0_panels::<W, true>,
                ),
            ]
        }
        [
            of::<Q8_0>(WeightFormat::Q8_0),
            of::<Q4_0>(WeightFormat::Q4_0),
            of::<Q4_1>(WeightFormat::Q4_1),
            of::<Q5_0>(WeightFormat::Q5_0),
            of::<Q5_1>(WeightFormat::Q5_1),
            of::<Iq4Nl>(WeightFormat::Iq4Nl),
        ]
        .into_iter()
        .flatten()
        .filter(|&(_, with_vnni, ..)| !with_vnni || vnni())
        .collect()
    }

    #[test]
    fn symbols_name_the_formats_of_their_kernels() {
        let formats: Vec<WeightFormat> = kernels().iter().map(|k| k.0).collect();
        for (format, rows, panels) in SYMBOLS {
            assert!(formats.contains(&format));
            assert!(entry_points(format).is_some(), "{format:?}");
            assert_eq!(rows, format!("llmc_{}_by_q8_0_rows", format.name()));
            assert_eq!(panels, format!("llmc_{}_by_q8_0_panels", format.name()));
        }
    }

    /// The formats whose constant weights take block panels are exactly those these
    /// kernels read in panels: of every block format with q8_0-activation kernels (mxfp4,
    /// of 32-value blocks too, is not one), and the float ones.
    #[test]
    fn block_panels_are_for_these_formats() {
        let ours: Vec<WeightFormat> = SYMBOLS.iter().map(|s| s.0).collect();
        let others = super::super::kq8dot::SYMBOLS.map(|s| s.0);
        let floats = [
            WeightFormat::F32,
            WeightFormat::PackedF16,
            WeightFormat::PackedBF16,
        ];
        for format in ours.iter().chain(&others).chain(&floats) {
            assert_eq!(
                format.has_block_panels(),
                ours.contains(format),
                "{format:?}"
            );
        }
    }

    /// Block panels against 1 to 9 rows of x (whole tiles of both instruction sets and
    /// their remainders), every format, the AVX2 form and, where the CPU has it, the VNNI
    /// form: every output is the exact block sums' (as the row kernel's test checks).
    #[test]
    fn panels_take_x_in_tiles_of_rows() {
        if !super::super::ukernel::available() {
            return;
        }
        let (blocks, n) = (5, 8);
        for m in 1..10 {
            // Rows of x with scales of their own.
            let mut x: Vec<u8> = (0..m)
                .flat_map(|i| row(blocks, WeightFormat::Q8_0, 7 + i as u64))
                .collect();
            for (j, block) in x.chunks_mut(34).enumerate() {
                let scale = half::f16::from_f32(0.003 * (j + 1) as f32).to_bits();
                block[..2].copy_from_slice(&scale.to_le_bytes());
            }
            for (format, with_vnni, _, kernel) in kernels() {
                let block_bytes = format.row_bytes(32);
                let w = row(n * blocks, format, 300 + m as u64);
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
                            expected(xi, &w[r * row_bytes..(r + 1) * row_bytes], format);
                        let got = y[i * width + r];
                        assert!(
                            (got - want).abs() <= 1e-6 * magnitude.max(1.0),
                            "{m} rows of x, row {i}, weight row {r}, {format:?}, vnni {with_vnni}: {got} != {want}"
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
            let x = row(blocks, WeightFormat::Q8_0, seed);
            for (format, with_vnni, kernel, _) in kernels() {
                let w = row(rows * blocks, format, seed + 100);
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
                    let (want, magnitude) = expected(&x, row, format);
                    assert!(
                        (got - want).abs() <= 1e-6 * magnitude.max(1.0),
                        "{blocks} blocks, row {r} of {rows}, {format:?}, vnni {with_vnni}: {got} != {want}"
                    );
                }
            }
        }
    }
}
