//! Integer dot products of q8_0 activations with the GGUF formats of 256-value
//! super-blocks: the k-quants (q2_k to q6_k), the formats most GGUF models ship their
//! matrices in, iq4_xs, the lattice formats iq3_xxs, iq3_s, iq2_xxs, iq2_xs, iq2_s,
//! iq1_s and iq1_m, and the ternary tq1_0 and tq2_0; and, their blocks grouped into
//! 256-value units where K is a multiple of 256, the binary q1_0 (two blocks of 128) and
//! the 4-bit floats mxfp4 (eight blocks of 32) and nvfp4 (four blocks of 64).
//!
//! After `quantize-activations`, x is q8_0: per block of 32 values an f16 scale `dx` and
//! 32 signed bytes `qx`. A k-quant super-block of 256 values splits into runs that share
//! a scale, and every run lies inside one block of x, so a run's dot product is
//! `dx * (scale * Σ q·qx + offset * Σ qx)` with exact integer sums:
//! - q4_k: eight runs of 32, value `d * sc * q - dmin * m` (`q` a nibble, `sc` and `m`
//!   6-bit): the nibbles meet `qx` in `vpmaddubsw` (unsigned by signed bytes), and the
//!   minimums take `Σ qx`, which is the same for every weight row, so it is formed once
//!   per call (`Activations`); q5_k is q4_k with a fifth bit per code (codes up to 31,
//!   still unsigned bytes for `vpmaddubsw`) from a 32-byte plane before the nibbles;
//! - q6_k: sixteen runs of 16, value `d * sc * (q - 32)` (`q` 6-bit, `sc` a signed byte):
//!   `q` meets `qx` in `vpmaddubsw` and the recentring is taken off as `32 * Σ qx` by a
//!   second one (exact for every byte, as in [`super::q8dot`]);
//! - q2_k: sixteen runs of 16, value `d * sc * q - dmin * m` (`q` 2-bit, `sc` and `m`
//!   4-bit): the minimums take `dx * Σ qx` over each half block of x (`Activations`);
//! - q3_k: sixteen runs of 16, value `d * (sc - 32) * (q - 4)` (`q` a 2-bit code with a
//!   high bit above it, `sc` 6-bit): as q6_k, the recentring taken off as `4 * Σ qx`;
//! - iq4_xs: eight runs of 32, value `d * (ls - 32) * level` (`level` one of IQ4_NL's 16
//!   signed levels, looked up by `vpshufb`, `ls` 6-bit): with VNNI the levels plus 128
//!   meet `qx` as unsigned bytes and the recentring is taken off as `128 * Σ qx`; AVX2,
//!   whose pair sums would saturate on such bytes, takes `|qx|` (unsigned, 128 included)
//!   times the level carrying `qx`'s sign, exact since no level is -128;
//! - the lattice formats: eight sub-blocks of 32, value `scale * magnitude * sign` (a
//!   sub-block's 32 magnitudes gathered from the format's grid, eight 32-bit entries of
//!   four by `vpgatherdd` for IQ3, four 64-bit entries of eight by `vpgatherdq` for IQ2 and
//!   IQ1; the 32 sign bits, where stored as 7-bit codes given their parity bits in
//!   registers, made a byte mask that negates; IQ1's signed values -1, 0, 1 shifted by
//!   ±1/8 a group taken as the codes `8 q ± 1` under an eighth of the scale): the signed
//!   codes (at most 62) meet `qx` as iq4_xs's AVX2 levels do, and each 16 values' sums take
//!   their run's scale (iq2_xs, iq2_s and iq1_m scale every 16, the others every 32);
//! - the ternary formats: eight sub-blocks of 32 under the super-block's one scale, the
//!   codes the trits -1, 0 and 1 as bytes (tq2_0's bit pairs shifted and masked; tq1_0's
//!   trit `n` of a byte the high half of `((byte * 3^n) mod 256) << 8` times 3, in 16-bit
//!   lanes, `trits`), meeting `qx` as the lattice formats' codes do (`signed_rows`);
//! - q1_0: sub-blocks of 32 codes 1 or -1 by their sign bits, under their block's scale;
//! - the 4-bit floats: sub-blocks of 32 (mxfp4) or halves of 16 (nvfp4) under scales
//!   widened from their bytes (`ue4m3_halves`), the codes the doubled E2M1 levels their
//!   nibbles index (`vpshufb`), at most 12 in magnitude.
//!
//! The `*_by_q8_0_rows` entry points ([`SYMBOLS`], [`entry_point`]) run where the CPU has
//! AVX2, FMA and F16C ([`super::ukernel::available`]), with AVX-512 VNNI's `vpdpbusd`
//! where it has that too ([`super::q8dot::vnni`]), taking the rows of x in tiles (each
//! weight super-block decoded once per tile); elsewhere the generated kernel decodes the
//! same runs ([`super::dequant::dot_row_q8_0_x`]). The sums are grouped differently, so
//! the two agree within rounding.

#![allow(
    unsafe_code,
    reason = "AVX2 intrinsics on pointers checked by the caller"
)]

use crate::kernel::WeightFormat;

/// Per format of these kernels, the symbol generated code imports its entry point under
/// ([`entry_point`]).
pub const SYMBOLS: [(WeightFormat, &str); 18] = [
    (WeightFormat::Q2K, "llmc_q2_k_by_q8_0_rows"),
    (WeightFormat::Q3K, "llmc_q3_k_by_q8_0_rows"),
    (WeightFormat::Q4K, "llmc_q4_k_by_q8_0_rows"),
    (WeightFormat::Q5K, "llmc_q5_k_by_q8_0_rows"),
    (WeightFormat::Q6K, "llmc_q6_k_by_q8_0_rows"),
    (WeightFormat::Iq4Xs, "llmc_iq4_xs_by_q8_0_rows"),
    (WeightFormat::Iq3Xxs, "llmc_iq3_xxs_by_q8_0_rows"),
    (WeightFormat::Iq3S, "llmc_iq3_s_by_q8_0_rows"),
    (WeightFormat::Iq2Xxs, "llmc_iq2_xxs_by_q8_0_rows"),
    (WeightFormat::Iq2Xs, "llmc_iq2_xs_by_q8_0_rows"),
    (WeightFormat::Iq2S, "llmc_iq2_s_by_q8_0_rows"),
    (WeightFormat::Iq1S, "llmc_iq1_s_by_q8_0_rows"),
    (WeightFormat::Iq1M, "llmc_iq1_m_by_q8_0_rows"),
    (WeightFormat::Tq1_0, "llmc_tq1_0_by_q8_0_rows"),
    (WeightFormat::Tq2_0, "llmc_tq2_0_by_q8_0_rows"),
    (WeightFormat::Q1_0, "llmc_q1_0_by_q8_0_rows"),
    (WeightFormat::Mxfp4, "llmc_mxfp4_by_q8_0_rows"),
    (WeightFormat::Nvfp4, "llmc_nvfp4_by_q8_0_rows"),
];

/// The entry point of `format` (each format of [`SYMBOLS`]), with VNNI's byte dot
/// products where the CPU has them ([`super::q8dot::vnni`]), else AVX2's; `None` for the
/// formats these kernels do not read.
#[cfg(target_arch = "x86_64")]
pub fn entry_point(format: WeightFormat) -> Option<*const u8> {
    let [avx2, vnni] = instances(format)?;
    Some(if super::q8dot::vnni() { vnni } else { avx2 } as *const u8)
}

/// The C signature of the entry points (their operands as [`q4_k_by_q8_0_rows`] takes them).
#[cfg(target_arch = "x86_64")]
type EntryPoint = unsafe extern "C" fn(i64, *const u8, *const u8, *mut u8, i64, i64, i64, i64);

/// The AVX2 and the VNNI instance of `format`'s entry point.
#[cfg(target_arch = "x86_64")]
fn instances(format: WeightFormat) -> Option<[EntryPoint; 2]> {
    Some(match format {
        WeightFormat::Q2K => [q2_k_by_q8_0_rows::<false>, q2_k_by_q8_0_rows::<true>],
        WeightFormat::Q3K => [q3_k_by_q8_0_rows::<false>, q3_k_by_q8_0_rows::<true>],
        WeightFormat::Q4K => [q4_k_by_q8_0_rows::<false>, q4_k_by_q8_0_rows::<true>],
        WeightFormat::Q5K => [q5_k_by_q8_0_rows::<false>, q5_k_by_q8_0_rows::<true>],
        WeightFormat::Q6K => [q6_k_by_q8_0_rows::<false>, q6_k_by_q8_0_rows::<true>],
        WeightFormat::Iq4Xs => [iq4_xs_by_q8_0_rows::<false>, iq4_xs_by_q8_0_rows::<true>],
        WeightFormat::Iq3Xxs => [iq3_xxs_by_q8_0_rows::<false>, iq3_xxs_by_q8_0_rows::<true>],
        WeightFormat::Iq3S => [iq3_s_by_q8_0_rows::<false>, iq3_s_by_q8_0_rows::<true>],
        WeightFormat::Iq2Xxs => [iq2_xxs_by_q8_0_rows::<false>, iq2_xxs_by_q8_0_rows::<true>],
        WeightFormat::Iq2Xs => [iq2_xs_by_q8_0_rows::<false>, iq2_xs_by_q8_0_rows::<true>],
        WeightFormat::Iq2S => [iq2_s_by_q8_0_rows::<false>, iq2_s_by_q8_0_rows::<true>],
        WeightFormat::Iq1S => [iq1_s_by_q8_0_rows::<false>, iq1_s_by_q8_0_rows::<true>],
        WeightFormat::Iq1M => [iq1_m_by_q8_0_rows::<false>, iq1_m_by_q8_0_rows::<true>],
        WeightFormat::Tq1_0 => [tq1_0_by_q8_0_rows::<false>, tq1_0_by_q8_0_rows::<true>],
        WeightFormat::Tq2_0 => [tq2_0_by_q8_0_rows::<false>, tq2_0_by_q8_0_rows::<true>],
        WeightFormat::Q1_0 => [q1_0_by_q8_0_rows::<false>, q1_0_by_q8_0_rows::<true>],
        WeightFormat::Mxfp4 => [mxfp4_by_q8_0_rows::<false>, mxfp4_by_q8_0_rows::<true>],
        WeightFormat::Nvfp4 => [nvfp4_by_q8_0_rows::<false>, nvfp4_by_q8_0_rows::<true>],
        _ => return None,
    })
}

#[cfg(target_arch = "x86_64")]
use llm_ir::interp::quant::q3_k_scale;

#[cfg(target_arch = "x86_64")]
use super::{
    kquant::{byte_lanes, scales_mins},
    q8dot::{Q8_0_BLOCK_BYTES as X_BLOCK, XRows, level_table, nibbles, x_quad_sums, x_scale},
};

/// A format's C entry point: `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k`
/// values at `x` and the `rows` consecutive weight rows `w_r` of `block` bytes per
/// super-block at `w`, through the format's [`Kernels`] (`vnni`, `avx2`), preceded by its
/// documentation.
macro_rules! entry_point {
    ($(#[$doc:meta])* $name:ident, $block:literal, $vnni:ident, $avx2:ident) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[allow(
            clippy::too_many_arguments,
            reason = "a C entry point for generated code: the operands and their strides"
        )]
        pub unsafe extern "C" fn $name<const VNNI: bool>(
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
            let kernels = Kernels {
                vnni: ($vnni::<4>, $vnni::<1>),
                avx2: ($avx2::<2>, $avx2::<1>),
            };
            // SAFETY: forwarded from this function's contract.
            unsafe { kernels.run::<VNNI>((k as usize, x_rows), (w, $block, rows.max(0) as usize)) }
        }
    };
}

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive q4_k rows `w_r` at `w`, as [`super::q8dot::by_q8_0_rows`] lays its
    /// operands out, with AVX-512 VNNI's byte dot products (`VNNI`) or AVX2's.
    ///
    /// # Safety
    ///
    /// As [`super::q8dot::by_q8_0_rows`], with `k` a multiple of 256 and `w` pointing to
    /// `rows * k / 256 * 144` bytes.
    q4_k_by_q8_0_rows, 144, q4_k_vnni, q4_k_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive q2_k rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 84` bytes.
    q2_k_by_q8_0_rows, 84, q2_k_vnni, q2_k_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive q3_k rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 110` bytes.
    q3_k_by_q8_0_rows, 110, q3_k_vnni, q3_k_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive q5_k rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 176` bytes.
    q5_k_by_q8_0_rows, 176, q5_k_vnni, q5_k_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive q6_k rows `w_r` at `w`, as [`super::q8dot::by_q8_0_rows`] lays its
    /// operands out, with AVX-512 VNNI's byte dot products (`VNNI`) or AVX2's.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 210` bytes.
    q6_k_by_q8_0_rows, 210, q6_k_vnni, q6_k_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive iq4_xs rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 136` bytes.
    iq4_xs_by_q8_0_rows, 136, iq4_xs_vnni, iq4_xs_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive iq3_xxs rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 98` bytes.
    iq3_xxs_by_q8_0_rows, 98, iq3_xxs_vnni, iq3_xxs_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive iq3_s rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 110` bytes.
    iq3_s_by_q8_0_rows, 110, iq3_s_vnni, iq3_s_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive iq2_xxs rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 66` bytes.
    iq2_xxs_by_q8_0_rows, 66, iq2_xxs_vnni, iq2_xxs_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive iq2_xs rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 74` bytes.
    iq2_xs_by_q8_0_rows, 74, iq2_xs_vnni, iq2_xs_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive iq2_s rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 82` bytes.
    iq2_s_by_q8_0_rows, 82, iq2_s_vnni, iq2_s_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive iq1_s rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 50` bytes.
    iq1_s_by_q8_0_rows, 50, iq1_s_vnni, iq1_s_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive iq1_m rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 56` bytes.
    iq1_m_by_q8_0_rows, 56, iq1_m_vnni, iq1_m_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive tq1_0 rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 54` bytes.
    tq1_0_by_q8_0_rows, 54, tq1_0_vnni, tq1_0_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive tq2_0 rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 66` bytes.
    tq2_0_by_q8_0_rows, 66, tq2_0_vnni, tq2_0_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive q1_0 rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k,
    /// two blocks of 128 (36 bytes) taken as a super-block of 256.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 36` bytes.
    q1_0_by_q8_0_rows, 36, q1_0_vnni, q1_0_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive mxfp4 rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k,
    /// eight blocks of 32 (136 bytes) taken as a super-block of 256.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 136` bytes.
    mxfp4_by_q8_0_rows, 136, mxfp4_vnni, mxfp4_avx2
);

entry_point!(
    /// `y[i][r] = dot(x_i, w_r)` for the `m` q8_0 rows `x_i` of `k` values at `x` and the
    /// `rows` consecutive nvfp4 rows `w_r` at `w`, as [`q4_k_by_q8_0_rows`] does for q4_k,
    /// four blocks of 64 (144 bytes) taken as a super-block of 256.
    ///
    /// # Safety
    ///
    /// As [`q4_k_by_q8_0_rows`], with `w` pointing to `rows * k / 256 * 144` bytes.
    nvfp4_by_q8_0_rows, 144, nvfp4_vnni, nvfp4_avx2
);

/// The kernel of one format for a tile of `TILE` rows of x: the dot products of
/// the q8_0 rows (with their [`Activations`]) and the weight row at `w`.
#[cfg(target_arch = "x86_64")]
type TileKernel<const TILE: usize> =
    unsafe fn([*const u8; TILE], [&Activations; TILE], *const u8) -> [f32; TILE];

/// A format's tile kernels: with VNNI (tiles of four rows of x, then one) and
/// with AVX2 (two, then one).
#[cfg(target_arch = "x86_64")]
struct Kernels {
    vnni: (TileKernel<4>, TileKernel<1>),
    avx2: (TileKernel<2>, TileKernel<1>),
}

#[cfg(target_arch = "x86_64")]
impl Kernels {
    /// [`each_tile`] with the VNNI kernels (`VNNI`) or the AVX2 ones.
    ///
    /// # Safety
    ///
    /// As [`each_tile`].
    unsafe fn run<const VNNI: bool>(&self, x: (usize, XRows), weights: (*const u8, usize, usize)) {
        // SAFETY: forwarded from this function's contract.
        unsafe {
            if VNNI {
                each_tile(x, weights, self.vnni);
            } else {
                each_tile(x, weights, self.avx2);
            }
        }
    }
}

/// `y[i][r] = dot(x_i, w_r)` for the rows of x, `TILE` at a time (`tile`, each weight
/// row's codes decoded once for them) and then one by one (`single`), and the `rows`
/// weight rows of `block` bytes per super-block at `w`; each row of x's activations formed
/// once.
///
/// # Safety
///
/// As [`q4_k_by_q8_0_rows`], for weight rows of `k / 256 * block` bytes and kernels the
/// CPU can run.
#[cfg(target_arch = "x86_64")]
unsafe fn each_tile<const TILE: usize>(
    (k, x): (usize, XRows),
    (w, block, rows): (*const u8, usize, usize),
    (tile, single): (TileKernel<TILE>, TileKernel<1>),
) {
    let row_bytes = k / 256 * block;
    let mut i = 0;
    // SAFETY: forwarded from this function's contract (AVX2 and F16C included).
    unsafe {
        while i + TILE <= x.m {
            let a: [Activations; TILE] = std::array::from_fn(|t| Activations::of(x.x(i + t), k));
            let (xs, refs) = (std::array::from_fn(|t| x.x(i + t)), a.each_ref());
            for r in 0..rows {
                for (t, v) in tile(xs, refs, w.add(r * row_bytes)).into_iter().enumerate() {
                    *x.y(i + t).add(r) = v;
                }
            }
            i += TILE;
        }
        while i < x.m {
            let a = Activations::of(x.x(i), k);
            for r in 0..rows {
                *x.y(i).add(r) = single([x.x(i)], [&a], w.add(r * row_bytes))[0];
            }
            i += 1;
        }
    }
}

/// Four byte products summed per 32-bit lane: unsigned bytes (weight codes) by signed
/// ones (x's codes), exactly, by AVX2 (`vpmaddubsw` pairs, then `vpmaddwd`) or AVX-512
/// VNNI (`vpdpbusd`); both group the same four bytes, so the sums are the same integers.
#[cfg(target_arch = "x86_64")]
trait QuadSums {
    /// Whether `u` may be any byte: no 16-bit pair sums that could saturate (VNNI).
    const ANY_UNSIGNED: bool;

    /// `Σ u·s` over each lane's four bytes.
    ///
    /// # Safety
    ///
    /// The CPU has the implementation's features.
    unsafe fn quads(
        u: std::arch::x86_64::__m256i,
        s: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i;

    /// `Σ w·s` over each lane's four bytes of signed bytes `w` (none -128) and `s`, as
    /// `|s|` (an unsigned byte, 128 for -128) times `w` with `s`'s sign (`vpsignb`, which
    /// also zeroes `w` where `s` is 0): exact, the pair sums of AVX2's at most
    /// `2 * 128 * 127`.
    ///
    /// # Safety
    ///
    /// The CPU has the implementation's features.
    #[inline(always)]
    unsafe fn signed_quads(
        w: std::arch::x86_64::__m256i,
        s: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: the features are the caller's (AVX2 is in both implementations').
        unsafe { Self::quads(_mm256_abs_epi8(s), _mm256_sign_epi8(w, s)) }
    }
}

/// AVX2's [`QuadSums`].
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl QuadSums for Avx2 {
    // `vpmaddubsw`'s pair sums saturate beyond 16 bits.
    const ANY_UNSIGNED: bool = false;

    #[inline(always)]
    unsafe fn quads(
        u: std::arch::x86_64::__m256i,
        s: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 is the caller's.
        unsafe { _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)) }
    }
}

/// AVX-512 VNNI's [`QuadSums`].
#[cfg(target_arch = "x86_64")]
struct Vnni;

#[cfg(target_arch = "x86_64")]
impl QuadSums for Vnni {
    const ANY_UNSIGNED: bool = true;

    #[inline(always)]
    unsafe fn quads(
        u: std::arch::x86_64::__m256i,
        s: std::arch::x86_64::__m256i,
    ) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: VNNI is the caller's.
        unsafe { _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s) }
    }
}

/// The kernels compiled for AVX2 (tiles of two rows of x) and for AVX-512 VNNI
/// (tiles of four, in thirty-two vector registers): one body each, inlined into a
/// function of each feature set.
macro_rules! instances {
    ($features:literal, $sums:ty, $($kernel:ident: $rows:ident $(, $param:tt)?);* $(;)?) => {
        $(
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = $features)]
            unsafe fn $kernel<const TILE: usize>(
                x: [*const u8; TILE],
                a: [&Activations; TILE],
                w: *const u8,
            ) -> [f32; TILE] {
                // SAFETY: forwarded from the entry point's contract.
                unsafe { $rows::<$sums, TILE $(, $param)?>(x, a, w) }
            }
        )*
    };
}

instances!(
    "avx2,fma,f16c",
    Avx2,
    q2_k_avx2: sixteens_rows, Q2kRuns;
    q3_k_avx2: sixteens_rows, Q3kRuns;
    q4_k_avx2: q4_k_rows, false;
    q5_k_avx2: q4_k_rows, true;
    q6_k_avx2: sixteens_rows, Q6kRuns;
    iq4_xs_avx2: iq4_xs_rows;
    iq3_xxs_avx2: signed_rows, Iq3XxsBlocks;
    iq3_s_avx2: signed_rows, Iq3SBlocks;
    iq2_xxs_avx2: signed_rows, Iq2XxsBlocks;
    iq2_xs_avx2: signed_rows, Iq2XsBlocks;
    iq2_s_avx2: signed_rows, Iq2SBlocks;
    iq1_s_avx2: signed_rows, Iq1SBlocks;
    iq1_m_avx2: signed_rows, Iq1MBlocks;
    tq1_0_avx2: signed_rows, Tq1_0Blocks;
    tq2_0_avx2: signed_rows, Tq2_0Blocks;
    q1_0_avx2: signed_rows, Q1_0Blocks;
    mxfp4_avx2: signed_rows, Mxfp4Blocks;
    nvfp4_avx2: signed_rows, Nvfp4Blocks;
);
instances!(
    "avx2,fma,f16c,avx512vnni,avx512vl",
    Vnni,
    q2_k_vnni: sixteens_rows, Q2kRuns;
    q3_k_vnni: sixteens_rows, Q3kRuns;
    q4_k_vnni: q4_k_rows, false;
    q5_k_vnni: q4_k_rows, true;
    q6_k_vnni: sixteens_rows, Q6kRuns;
    iq4_xs_vnni: iq4_xs_rows;
    iq3_xxs_vnni: signed_rows, Iq3XxsBlocks;
    iq3_s_vnni: signed_rows, Iq3SBlocks;
    iq2_xxs_vnni: signed_rows, Iq2XxsBlocks;
    iq2_xs_vnni: signed_rows, Iq2XsBlocks;
    iq2_s_vnni: signed_rows, Iq2SBlocks;
    iq1_s_vnni: signed_rows, Iq1SBlocks;
    iq1_m_vnni: signed_rows, Iq1MBlocks;
    tq1_0_vnni: signed_rows, Tq1_0Blocks;
    tq2_0_vnni: signed_rows, Tq2_0Blocks;
    q1_0_vnni: signed_rows, Q1_0Blocks;
    mxfp4_vnni: signed_rows, Mxfp4Blocks;
    nvfp4_vnni: signed_rows, Nvfp4Blocks;
);

/// What every weight row needs of x, formed once per call: per block its scale `dx`,
/// `dx * Σ qx` (for q4_k's and q5_k's minimums, and iq4_xs's recentring with VNNI), per
/// half block `dx * Σ qx` (q2_k's), and `32 * Σ qx` over each lane's four codes (q6_k's
/// recentring, and q3_k's over 8; the same for every weight row).
#[cfg(target_arch = "x86_64")]
struct Activations {
    dx: Vec<f32>,
    dx_sum: Vec<f32>,
    dx_half_sum: Vec<f32>,
    centre: Vec<std::arch::x86_64::__m256i>,
}

#[cfg(target_arch = "x86_64")]
impl Activations {
    /// The activations of the q8_0 row at `x` of `k` values.
    ///
    /// # Safety
    ///
    /// `x` points to `k / 32` q8_0 blocks, and the CPU has AVX2 and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn of(x: *const u8, k: usize) -> Activations {
        use std::arch::x86_64::*;
        let blocks = k / 32;
        let (mut dx, mut dx_sum) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
        let mut centre = Vec::with_capacity(blocks);
        let mut dx_half_sum = Vec::with_capacity(2 * blocks);
        for b in 0..blocks {
            // SAFETY: block b is inside the row (the contract).
            let (scale, sum) = unsafe {
                let xb = x.add(b * X_BLOCK);
                (x_scale(xb), x_quad_sums(xb))
            };
            let mut lanes = [0i32; 8];
            // SAFETY: `lanes` holds 8 integers.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sum) };
            dx.push(scale);
            dx_sum.push(scale * lanes.iter().sum::<i32>() as f32);
            for half in lanes.chunks(4) {
                dx_half_sum.push(scale * half.iter().sum::<i32>() as f32);
            }
            centre.push(_mm256_slli_epi32(sum, 5));
        }
        Activations {
            dx,
            dx_sum,
            dx_half_sum,
            centre,
        }
    }
}

/// q4_k against `TILE` rows of x: per super-block (144 bytes) an f16 `d` and `dmin`,
/// twelve bytes of 6-bit scales and minimums, then 128 bytes whose low nibbles are
/// sub-block `2p` and high nibbles sub-block `2p + 1` for bytes `32p..32p + 32`. The
/// weight's codes and scales are decoded once for the tile; per row of x, the eight
/// sub-blocks' factors `d * sc * dx` and minimum terms `dmin * m * dx * Σ qx` are formed 8
/// lanes at a time. Each row's result is the same whatever the tile. With `FIFTH`, q5_k
/// (176 bytes): 32 bytes of fifth bits come before the nibbles, value `l` of sub-block `j`
/// at bit `j` of byte `l`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4_k_rows<Q: QuadSums, const TILE: usize, const FIFTH: bool>(
    x: [*const u8; TILE],
    a: [&Activations; TILE],
    w: *const u8,
) -> [f32; TILE] {
    // SAFETY: every offset below is inside the buffers the callers' contracts describe;
    // the caller has the features `Q` needs (this body is inlined into its instances).
    unsafe {
        use std::arch::x86_64::*;
        let mask = _mm256_set1_epi8(0x0f);
        let sixteen = _mm256_set1_epi8(0x10);
        let (block_bytes, codes_at) = if FIFTH { (176, 48) } else { (144, 16) };
        let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
        let mut mins = [_mm256_setzero_ps(); TILE];
        let mut factors = [[0f32; 8]; TILE];
        for sb in 0..a[0].dx.len() / 8 {
            let block = w.add(sb * block_bytes);
            let fifth = if FIFTH {
                _mm256_loadu_si256(block.add(16).cast())
            } else {
                _mm256_setzero_si256()
            };
            // `d` and `dmin` from one 32-bit word.
            let both = _mm_cvtph_ps(_mm_cvtsi32_si128(block.cast::<i32>().read_unaligned()));
            let d = _mm256_broadcastss_ps(both);
            let dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(both));
            let (sc, m) = scales_mins(&std::ptr::read_unaligned(block.add(4).cast()));
            let (d_sc, dmin_m) = (
                _mm256_mul_ps(d, byte_lanes(sc)),
                _mm256_mul_ps(dmin, byte_lanes(m)),
            );
            for t in 0..TILE {
                let dx = _mm256_loadu_ps(a[t].dx.as_ptr().add(8 * sb));
                let dx_sum = _mm256_loadu_ps(a[t].dx_sum.as_ptr().add(8 * sb));
                _mm256_storeu_ps(factors[t].as_mut_ptr(), _mm256_mul_ps(d_sc, dx));
                mins[t] = _mm256_fmadd_ps(dmin_m, dx_sum, mins[t]);
            }
            for pair in 0..4 {
                let packed = _mm256_loadu_si256(block.add(codes_at + 32 * pair).cast());
                let halves = [
                    _mm256_and_si256(packed, mask),
                    _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask),
                ];
                for (h, mut codes) in halves.into_iter().enumerate() {
                    let j = 2 * pair + h;
                    if FIFTH {
                        // Bit j of every byte, moved to bit 4 (16-bit shifts move no bit
                        // into the kept one across the byte boundary).
                        let bit = if j > 4 {
                            _mm256_srl_epi16(fifth, _mm_cvtsi32_si128(j as i32 - 4))
                        } else {
                            _mm256_sll_epi16(fifth, _mm_cvtsi32_si128(4 - j as i32))
                        };
                        codes = _mm256_or_si256(codes, _mm256_and_si256(bit, sixteen));
                    }
                    for t in 0..TILE {
                        let xq = _mm256_loadu_si256(x[t].add((8 * sb + j) * X_BLOCK + 2).cast());
                        let sums = _mm256_cvtepi32_ps(Q::quads(codes, xq));
                        let factor = _mm256_broadcast_ss(&factors[t][j]);
                        acc[t][h] = _mm256_fmadd_ps(sums, factor, acc[t][h]);
                    }
                }
            }
        }
        std::array::from_fn(|t| {
            let total = _mm256_sub_ps(_mm256_add_ps(acc[t][0], acc[t][1]), mins[t]);
            super::ukernel::lane_sum(total)
        })
    }
}

/// iq4_xs against `TILE` rows of x: per super-block (136 bytes) an f16 `d`, the eight
/// sub-blocks' 6-bit scales `ls` ([`iq4_xs_scales`]) and each sub-block `j`'s 16 nibble
/// bytes at `8 + 16 j`, which index IQ4_NL's signed levels ([`iq4_xs_pair`]). The levels
/// are looked up once for the tile; per row of x, the sub-blocks' factors
/// `d * (ls - 32) * dx` are formed 8 lanes at a time, and each sub-block's sum of levels
/// times x's codes is exact: with VNNI the levels plus 128 meet the codes as unsigned
/// bytes and the recentring comes off as `128 * d * (ls - 32) * dx * Σ qx`, 8 sub-blocks
/// at a time; with AVX2 (whose pair sums would saturate) as [`QuadSums::signed_quads`].
/// Each row's result is the same whatever the tile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn iq4_xs_rows<Q: QuadSums, const TILE: usize>(
    x: [*const u8; TILE],
    a: [&Activations; TILE],
    w: *const u8,
) -> [f32; TILE] {
    // SAFETY: every offset below is inside the buffers the callers' contracts describe;
    // the caller has the features `Q` needs (this body is inlined into its instances).
    unsafe {
        use std::arch::x86_64::*;
        // With VNNI, the levels plus 128 (the sign bit flipped) as unsigned bytes.
        let levels = level_table(&llm_ir::types::IQ4_NL_LEVELS);
        let table = if Q::ANY_UNSIGNED {
            _mm256_xor_si256(levels, _mm256_set1_epi8(i8::MIN))
        } else {
            levels
        };
        let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
        let mut bias = [_mm256_setzero_ps(); TILE];
        let mut factors = [[0f32; 8]; TILE];
        for sb in 0..a[0].dx.len() / 8 {
            let block = w.add(sb * 136);
            let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                block.cast::<u16>().read_unaligned(),
            ))));
            let d_ls = _mm256_mul_ps(d, _mm256_cvtepi32_ps(iq4_xs_scales(block)));
            for t in 0..TILE {
                let dx = _mm256_loadu_ps(a[t].dx.as_ptr().add(8 * sb));
                _mm256_storeu_ps(factors[t].as_mut_ptr(), _mm256_mul_ps(d_ls, dx));
                if Q::ANY_UNSIGNED {
                    let dx_sum = _mm256_loadu_ps(a[t].dx_sum.as_ptr().add(8 * sb));
                    let centre = _mm256_mul_ps(d_ls, _mm256_set1_ps(128.0));
                    bias[t] = _mm256_fmadd_ps(centre, dx_sum, bias[t]);
                }
            }
            for pair in 0..4 {
                let codes = iq4_xs_pair(block.add(8 + 32 * pair), table);
                for (h, codes) in codes.into_iter().enumerate() {
                    let j = 2 * pair + h;
                    for t in 0..TILE {
                        let xq = _mm256_loadu_si256(x[t].add((8 * sb + j) * X_BLOCK + 2).cast());
                        let sums = if Q::ANY_UNSIGNED {
                            Q::quads(codes, xq)
                        } else {
                            Q::signed_quads(codes, xq)
                        };
                        let factor = _mm256_broadcast_ss(&factors[t][j]);
                        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), factor, acc[t][h]);
                    }
                }
            }
        }
        std::array::from_fn(|t| {
            let total = _mm256_sub_ps(_mm256_add_ps(acc[t][0], acc[t][1]), bias[t]);
            super::ukernel::lane_sum(total)
        })
    }
}

/// A format of signed codes under a scale per 32 or 16 values (a lattice, ternary, binary
/// or 4-bit float format) as [`signed_rows`] reads its super-blocks of 256 values (the
/// smaller formats' blocks grouped into one).
#[cfg(target_arch = "x86_64")]
trait SignedBlocks {
    /// Bytes of a super-block.
    const BYTES: usize;
    /// Whether each sub-block's two halves of 16 values take scales of their own.
    const HALVES: bool;
    /// Where the super-block's f16 scale `d` is (for the default [`SignedBlocks::d`]).
    const D_AT: usize = 0;

    /// The super-block's scale `d` in every lane: the f16 at [`SignedBlocks::D_AT`]
    /// (iq1_m's is split; the 4-bit floats have none, their scales being bytes, and their
    /// [`SignedBlocks::scales`] ignore it).
    ///
    /// # Safety
    ///
    /// `block` points to a whole super-block, and the CPU has AVX2 and F16C.
    #[inline(always)]
    unsafe fn d(block: *const u8) -> std::arch::x86_64::__m256 {
        // SAFETY: the f16 is inside the super-block (the contract); F16C is the caller's.
        unsafe { broadcast_f16(block.add(Self::D_AT).cast::<u16>().read_unaligned()) }
    }

    /// The scales of each sub-block's first and second 16 values (lane `j` for sub-block
    /// `j`; the same twice unless [`SignedBlocks::HALVES`]), `d` the super-block's scale
    /// in every lane: by default `d` itself for every sub-block (the ternary formats).
    ///
    /// # Safety
    ///
    /// `block` points to a whole super-block, and the CPU has AVX2.
    #[inline(always)]
    unsafe fn scales(
        _block: *const u8,
        d: std::arch::x86_64::__m256,
    ) -> [std::arch::x86_64::__m256; 2] {
        [d; 2]
    }

    /// The 32 signed codes (magnitude times sign, or IQ1's `8 q ± 1`, in value order) of
    /// sub-block `j`.
    ///
    /// # Safety
    ///
    /// `block` points to a whole super-block, `j < 8`, and the CPU has AVX2.
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i;
}

/// The f16 of bits `bits` as `f32` in every lane.
///
/// # Safety
///
/// The CPU has AVX2 and F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn broadcast_f16(bits: u16) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 and F16C are the caller's.
    unsafe { _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits)))) }
}

/// A format of [`SignedBlocks`] against `TILE` rows of x: per super-block a scale `d`
/// ([`SignedBlocks::d`]) and eight sub-blocks of 32 values, [`SignedBlocks::codes`]
/// their codes and
/// [`SignedBlocks::scales`] their scales. The codes are decoded once for the tile; per row
/// of x, the sub-blocks' factors (scale times `dx`) are formed 8 lanes at a time, and each
/// sub-block's sum of codes times x's is exact ([`QuadSums::signed_quads`]: no code is
/// -128), its first four lanes (the first 16 values) under the first half's factor and the
/// last four under the second's. Each row's result is the same whatever the tile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn signed_rows<Q: QuadSums, const TILE: usize, L: SignedBlocks>(
    x: [*const u8; TILE],
    a: [&Activations; TILE],
    w: *const u8,
) -> [f32; TILE] {
    // SAFETY: every offset below is inside the buffers the callers' contracts describe;
    // the caller has the features `Q` needs (this body is inlined into its instances).
    unsafe {
        use std::arch::x86_64::*;
        let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
        let mut factors = [[[0f32; 8]; 2]; TILE];
        for sb in 0..a[0].dx.len() / 8 {
            let block = w.add(sb * L::BYTES);
            let scales = L::scales(block, L::d(block));
            for t in 0..TILE {
                let dx = _mm256_loadu_ps(a[t].dx.as_ptr().add(8 * sb));
                _mm256_storeu_ps(factors[t][0].as_mut_ptr(), _mm256_mul_ps(scales[0], dx));
                if L::HALVES {
                    _mm256_storeu_ps(factors[t][1].as_mut_ptr(), _mm256_mul_ps(scales[1], dx));
                }
            }
            for pair in 0..4 {
                // (No closure: one would not inherit the instance's target features.)
                let codes = [L::codes(block, 2 * pair), L::codes(block, 2 * pair + 1)];
                for (h, codes) in codes.into_iter().enumerate() {
                    let j = 2 * pair + h;
                    for t in 0..TILE {
                        let xq = _mm256_loadu_si256(x[t].add((8 * sb + j) * X_BLOCK + 2).cast());
                        let sums = Q::signed_quads(codes, xq);
                        let factor = if L::HALVES {
                            _mm256_set_m128(
                                _mm_broadcast_ss(&factors[t][1][j]),
                                _mm_broadcast_ss(&factors[t][0][j]),
                            )
                        } else {
                            _mm256_broadcast_ss(&factors[t][0][j])
                        };
                        acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), factor, acc[t][h]);
                    }
                }
            }
        }
        std::array::from_fn(|t| super::ukernel::lane_sum(_mm256_add_ps(acc[t][0], acc[t][1])))
    }
}

/// The 32 magnitude bytes `magnitudes` negated where their bit of `signs` is set (byte
/// `l` under bit `l % 8` of sign byte `l / 8`): the sign bits spread into a byte mask,
/// `(m ^ mask) - mask`.
///
/// # Safety
///
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn signed_magnitudes(
    magnitudes: std::arch::x86_64::__m256i,
    signs: u32,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is the caller's.
    unsafe {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(signs as i32),
            _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3,
                3, 3, 3, 3,
            ),
        );
        let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let mask = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits);
        _mm256_sub_epi8(_mm256_xor_si256(magnitudes, mask), mask)
    }
}

/// The sign bytes of four 7-bit codes (the low seven bits of each 32-bit lane of `codes`),
/// each with the parity bit that makes its count of ones even (as
/// [`llm_ir::interp::lattice::EVEN_SIGNS`] holds them), in registers: the parity of each
/// nibble looked up by a byte shuffle, the two nibbles' combined; sign byte `r` at bits
/// `8 r`.
///
/// # Safety
///
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn even_sign_bytes(codes: std::arch::x86_64::__m128i) -> u32 {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 (and so SSSE3) is the caller's.
    unsafe {
        let codes = _mm_and_si128(codes, _mm_set1_epi32(0x7F));
        // Bit 7 set for the nibbles with an odd count of ones.
        let odd = _mm_setr_epi8(
            0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0,
        );
        let low = _mm_shuffle_epi8(odd, codes);
        let high = _mm_shuffle_epi8(odd, _mm_srli_epi32(codes, 4));
        let signs = _mm_or_si128(codes, _mm_xor_si128(low, high));
        let bytes = _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        _mm_cvtsi128_si32(_mm_shuffle_epi8(signs, bytes)) as u32
    }
}

/// The four 7-bit sign codes of a 32-bit word (code `r` at bit `7 r`), one a 32-bit lane.
///
/// # Safety
///
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn word_codes(word: u32) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is the caller's.
    unsafe { _mm_srlv_epi32(_mm_set1_epi32(word as i32), _mm_setr_epi32(0, 7, 14, 21)) }
}

/// `d * (ls + 0.5) * factor` of the multipliers `ls`, lane by lane.
///
/// # Safety
///
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn half_odd_scales(
    d: std::arch::x86_64::__m256,
    ls: std::arch::x86_64::__m256i,
    factor: f32,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is the caller's.
    unsafe {
        let ls = _mm256_add_ps(_mm256_cvtepi32_ps(ls), _mm256_set1_ps(0.5));
        _mm256_mul_ps(_mm256_mul_ps(d, ls), _mm256_set1_ps(factor))
    }
}

/// The scales `d * (ls + 0.5) * 0.25` of each sub-block's two halves (iq2_xs, iq2_s), their
/// 4-bit multipliers `ls` the nibbles of the eight bytes at `at` (low nibble first).
///
/// # Safety
///
/// Eight bytes at `at` are readable, and the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn nibble_scales(
    at: *const u8,
    d: std::arch::x86_64::__m256,
) -> [std::arch::x86_64::__m256; 2] {
    use std::arch::x86_64::*;
    // SAFETY: eight bytes (the contract); AVX2 is the caller's.
    unsafe {
        let bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(at.cast()));
        let low = _mm256_and_si256(bytes, _mm256_set1_epi32(0xf));
        let high = _mm256_srli_epi32(bytes, 4);
        [
            half_odd_scales(d, low, 0.25),
            half_odd_scales(d, high, 0.25),
        ]
    }
}

/// iq3_xxs (98 bytes): per sub-block eight index bytes at `2 + 8 j` into
/// [`llm_ir::types::IQ3XXS_GRID`], and a word at `66 + 4 j` of four 7-bit sign codes under
/// the 4-bit `ls` of scale `d * (ls + 0.5) * 0.5`.
#[cfg(target_arch = "x86_64")]
struct Iq3XxsBlocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Iq3XxsBlocks {
    const BYTES: usize = llm_ir::interp::iq3::IQ3_XXS_BYTES;
    const HALVES: bool = false;

    #[inline(always)]
    unsafe fn scales(
        block: *const u8,
        d: std::arch::x86_64::__m256,
    ) -> [std::arch::x86_64::__m256; 2] {
        use llm_ir::interp::iq3::IQ3_XXS_WORDS_AT;
        use std::arch::x86_64::*;
        // SAFETY: the words are inside the super-block (the contract).
        unsafe {
            let words = _mm256_loadu_si256(block.add(IQ3_XXS_WORDS_AT).cast());
            let scales = half_odd_scales(d, _mm256_srli_epi32(words, 28), 0.5);
            [scales; 2]
        }
    }

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use llm_ir::{interp::iq3::IQ3_XXS_WORDS_AT, types::IQ3XXS_GRID};
        use std::arch::x86_64::*;
        // SAFETY: the bytes are inside the super-block (the contract); the indices are
        // bytes, below the grid's 256 entries.
        unsafe {
            let index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(block.add(2 + 8 * j).cast()));
            let word = block
                .add(IQ3_XXS_WORDS_AT + 4 * j)
                .cast::<u32>()
                .read_unaligned();
            let signs = even_sign_bytes(word_codes(word));
            let grid: *const i32 = IQ3XXS_GRID.as_ptr().cast();
            signed_magnitudes(_mm256_i32gather_epi32::<4>(grid, index), signs)
        }
    }
}

/// iq3_s (110 bytes): the low bytes of the 64 indices into [`llm_ir::types::IQ3S_GRID`] at
/// 2, their ninth bits (group `g` of sub-block `j` at bit `g` of byte `66 + j`), a sign bit
/// a value (sub-block `j`'s at `74 + 4 j`) and the 4-bit `ls` of scale `d * (1 + 2 ls)`
/// (nibble `j % 2` of byte `106 + j / 2`).
#[cfg(target_arch = "x86_64")]
struct Iq3SBlocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Iq3SBlocks {
    const BYTES: usize = llm_ir::interp::iq3::IQ3_S_BYTES;
    const HALVES: bool = false;

    #[inline(always)]
    unsafe fn scales(
        block: *const u8,
        d: std::arch::x86_64::__m256,
    ) -> [std::arch::x86_64::__m256; 2] {
        use llm_ir::interp::iq3::IQ3_S_SCALES_AT;
        use std::arch::x86_64::*;
        // SAFETY: the scale bytes are inside the super-block (the contract).
        unsafe {
            let ls = _mm_cvtsi32_si128(block.add(IQ3_S_SCALES_AT).cast::<i32>().read_unaligned());
            let ls = _mm256_permutevar8x32_epi32(
                _mm256_cvtepu8_epi32(ls),
                _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
            );
            let ls = _mm256_srlv_epi32(ls, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
            let ls = _mm256_and_si256(ls, _mm256_set1_epi32(0xf));
            let odd = _mm256_add_epi32(_mm256_slli_epi32(ls, 1), _mm256_set1_epi32(1));
            [_mm256_mul_ps(d, _mm256_cvtepi32_ps(odd)); 2]
        }
    }

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use llm_ir::{
            interp::iq3::{IQ3_S_HIGH_AT, IQ3_S_SIGNS_AT},
            types::IQ3S_GRID,
        };
        use std::arch::x86_64::*;
        // SAFETY: the bytes are inside the super-block (the contract); the indices are
        // nine bits, below the grid's 512 entries.
        unsafe {
            let low = _mm256_cvtepu8_epi32(_mm_loadl_epi64(block.add(2 + 8 * j).cast()));
            let high = _mm256_set1_epi32(i32::from(*block.add(IQ3_S_HIGH_AT + j)));
            let high = _mm256_srlv_epi32(high, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            let high = _mm256_slli_epi32(_mm256_and_si256(high, _mm256_set1_epi32(1)), 8);
            let index = _mm256_or_si256(low, high);
            let signs = block
                .add(IQ3_S_SIGNS_AT + 4 * j)
                .cast::<u32>()
                .read_unaligned();
            let grid: *const i32 = IQ3S_GRID.as_ptr().cast();
            signed_magnitudes(_mm256_i32gather_epi32::<4>(grid, index), signs)
        }
    }
}

/// The four 64-bit entries of `grid` at the 32-bit `indices`, gathered: a sub-block's 32
/// magnitude bytes of an IQ2 format.
///
/// # Safety
///
/// Every index is below the grid's length, and the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gather_entries(
    grid: &[u64],
    indices: std::arch::x86_64::__m128i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the indices are in bounds (the contract); AVX2 is the caller's.
    unsafe { _mm256_i32gather_epi64::<8>(grid.as_ptr().cast(), indices) }
}

/// iq2_xxs (66 bytes): per sub-block four index bytes at `2 + 8 j` into
/// [`llm_ir::types::IQ2XXS_GRID`] and a word at `6 + 8 j` (`IQ2_XXS_WORDS_AT`) of four
/// 7-bit sign codes under
/// the 4-bit `ls` of scale `d * (ls + 0.5) * 0.25`.
#[cfg(target_arch = "x86_64")]
struct Iq2XxsBlocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Iq2XxsBlocks {
    const BYTES: usize = llm_ir::interp::iq2::IQ2_XXS_BYTES;
    const HALVES: bool = false;

    #[inline(always)]
    unsafe fn scales(
        block: *const u8,
        d: std::arch::x86_64::__m256,
    ) -> [std::arch::x86_64::__m256; 2] {
        use llm_ir::interp::iq2::IQ2_XXS_WORDS_AT;
        use std::arch::x86_64::*;
        // SAFETY: the words are inside the super-block (the contract).
        unsafe {
            let first = IQ2_XXS_WORDS_AT as i32;
            let at = _mm256_add_epi32(
                _mm256_set1_epi32(first),
                _mm256_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56),
            );
            let words = _mm256_i32gather_epi32::<1>(block.cast(), at);
            [half_odd_scales(d, _mm256_srli_epi32(words, 28), 0.25); 2]
        }
    }

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use llm_ir::{interp::iq2::IQ2_XXS_WORDS_AT, types::IQ2XXS_GRID};
        use std::arch::x86_64::*;
        // SAFETY: the bytes are inside the super-block (the contract); the indices are
        // bytes, below the grid's 256 entries.
        unsafe {
            let at = block.add(2 + 8 * j);
            let index = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(at.cast::<i32>().read_unaligned()));
            let word = block
                .add(IQ2_XXS_WORDS_AT + 8 * j)
                .cast::<u32>()
                .read_unaligned();
            let signs = even_sign_bytes(word_codes(word));
            signed_magnitudes(gather_entries(&IQ2XXS_GRID, index), signs)
        }
    }
}

/// iq2_xs (74 bytes): 16-bit words at `2 + 2 g` (a 9-bit index into
/// [`llm_ir::types::IQ2XS_GRID`] under a 7-bit sign code) and the 4-bit `ls` of each 16
/// values' scale `d * (ls + 0.5) * 0.25` (the nibbles of byte `66 + j`).
#[cfg(target_arch = "x86_64")]
struct Iq2XsBlocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Iq2XsBlocks {
    const BYTES: usize = llm_ir::interp::iq2::IQ2_XS_BYTES;
    const HALVES: bool = true;

    #[inline(always)]
    unsafe fn scales(
        block: *const u8,
        d: std::arch::x86_64::__m256,
    ) -> [std::arch::x86_64::__m256; 2] {
        use llm_ir::interp::iq2::IQ2_XS_SCALES_AT;
        // SAFETY: the scale bytes are inside the super-block (the contract).
        unsafe { nibble_scales(block.add(IQ2_XS_SCALES_AT), d) }
    }

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use llm_ir::types::IQ2XS_GRID;
        use std::arch::x86_64::*;
        // SAFETY: the words are inside the super-block (the contract); the indices are
        // nine bits, below the grid's 512 entries.
        unsafe {
            let words = _mm_cvtepu16_epi32(_mm_loadl_epi64(block.add(2 + 8 * j).cast()));
            let index = _mm_and_si128(words, _mm_set1_epi32(511));
            let signs = even_sign_bytes(_mm_srli_epi32(words, 9));
            signed_magnitudes(gather_entries(&IQ2XS_GRID, index), signs)
        }
    }
}

/// iq2_s (82 bytes): the low bytes of the 32 indices into [`llm_ir::types::IQ2S_GRID`] at 2,
/// a sign byte a group at `34 + g`, the high bit pairs (group `l` of sub-block `j` at bits
/// `2 l` of byte `66 + j`) and the 4-bit `ls` of each 16 values' scale `d * (ls + 0.5) *
/// 0.25` (the nibbles of byte `74 + j`).
#[cfg(target_arch = "x86_64")]
struct Iq2SBlocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Iq2SBlocks {
    const BYTES: usize = llm_ir::interp::iq2::IQ2_S_BYTES;
    const HALVES: bool = true;

    #[inline(always)]
    unsafe fn scales(
        block: *const u8,
        d: std::arch::x86_64::__m256,
    ) -> [std::arch::x86_64::__m256; 2] {
        use llm_ir::interp::iq2::IQ2_S_SCALES_AT;
        // SAFETY: the scale bytes are inside the super-block (the contract).
        unsafe { nibble_scales(block.add(IQ2_S_SCALES_AT), d) }
    }

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use llm_ir::{
            interp::iq2::{IQ2_S_HIGH_AT, IQ2_S_SIGNS_AT},
            types::IQ2S_GRID,
        };
        use std::arch::x86_64::*;
        // SAFETY: the bytes are inside the super-block (the contract); the indices are ten
        // bits, below the grid's 1024 entries.
        unsafe {
            let low = block.add(2 + 4 * j).cast::<i32>().read_unaligned();
            let low = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(low));
            let high = _mm_set1_epi32(i32::from(*block.add(IQ2_S_HIGH_AT + j)));
            let high = _mm_srlv_epi32(high, _mm_setr_epi32(0, 2, 4, 6));
            let high = _mm_slli_epi32(_mm_and_si128(high, _mm_set1_epi32(3)), 8);
            let signs = block
                .add(IQ2_S_SIGNS_AT + 4 * j)
                .cast::<u32>()
                .read_unaligned();
            signed_magnitudes(gather_entries(&IQ2S_GRID, _mm_or_si128(low, high)), signs)
        }
    }
}

/// The codes `8 q ± 1` of an IQ1 sub-block: its grid values `q` (-1, 0 or 1; the bytes of
/// the four gathered 64-bit `entries`) in eighths, each group shifted by its `shifts` byte
/// (1 or -1, the same in all eight of its bytes).
///
/// # Safety
///
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn shifted_eighths(
    entries: std::arch::x86_64::__m256i,
    shifts: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is the caller's.
    unsafe { _mm256_add_epi8(_mm256_sign_epi8(_mm256_set1_epi8(8), entries), shifts) }
}

/// The four 64-bit entries of [`llm_ir::types::IQ1S_GRID`] of an IQ1 sub-block, gathered:
/// group `l`'s eleven-bit index is byte `l` at `low` under the three bits of `high.0` at
/// bit `high.1[l]`.
///
/// # Safety
///
/// Four bytes at `low` are readable, and the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn iq1_entries(
    low: *const u8,
    high: (i32, std::arch::x86_64::__m128i),
) -> std::arch::x86_64::__m256i {
    use llm_ir::types::IQ1S_GRID;
    use std::arch::x86_64::*;
    // SAFETY: four bytes (the contract); AVX2 is the caller's. The indices are eleven bits,
    // below the grid's 2048 entries.
    unsafe {
        let low = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(low.cast::<i32>().read_unaligned()));
        let bits = _mm_srlv_epi32(_mm_set1_epi32(high.0), high.1);
        let bits = _mm_slli_epi32(_mm_and_si128(bits, _mm_set1_epi32(7)), 8);
        gather_entries(&IQ1S_GRID, _mm_or_si128(low, bits))
    }
}

/// An eighth of the IQ1 scales `d * (2 ls + 1)` of the multipliers `ls`, lane by lane (the
/// scales of [`shifted_eighths`]' codes).
///
/// # Safety
///
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn iq1_eighth_scales(
    d: std::arch::x86_64::__m256,
    ls: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is the caller's.
    unsafe {
        let odd = _mm256_add_epi32(_mm256_slli_epi32(ls, 1), _mm256_set1_epi32(1));
        let scales = _mm256_mul_ps(d, _mm256_cvtepi32_ps(odd));
        _mm256_mul_ps(scales, _mm256_set1_ps(0.125))
    }
}

/// iq1_s (50 bytes): the low bytes of the 32 eleven-bit indices into
/// [`llm_ir::types::IQ1S_GRID`] at 2, and per sub-block a 16-bit word at `34 + 2 j`
/// (`IQ1_S_WORDS_AT`): group `l`'s three high index bits at bit `3 l`, the 3-bit `ls` of
/// scale `d * (2 ls + 1)` at bit 12 and the sign of the sub-block's shift at bit 15.
#[cfg(target_arch = "x86_64")]
struct Iq1SBlocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Iq1SBlocks {
    const BYTES: usize = llm_ir::interp::iq1::IQ1_S_BYTES;
    const HALVES: bool = false;

    #[inline(always)]
    unsafe fn scales(
        block: *const u8,
        d: std::arch::x86_64::__m256,
    ) -> [std::arch::x86_64::__m256; 2] {
        use llm_ir::interp::iq1::IQ1_S_WORDS_AT;
        use std::arch::x86_64::*;
        // SAFETY: the eight words are the super-block's last 16 bytes (the contract).
        unsafe {
            let words = _mm256_cvtepu16_epi32(_mm_loadu_si128(block.add(IQ1_S_WORDS_AT).cast()));
            let ls = _mm256_and_si256(_mm256_srli_epi32(words, 12), _mm256_set1_epi32(7));
            [iq1_eighth_scales(d, ls); 2]
        }
    }

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use llm_ir::interp::iq1::IQ1_S_WORDS_AT;
        use std::arch::x86_64::*;
        // SAFETY: the bytes are inside the super-block (the contract).
        unsafe {
            let word = block
                .add(IQ1_S_WORDS_AT + 2 * j)
                .cast::<u16>()
                .read_unaligned();
            let high = (i32::from(word), _mm_setr_epi32(0, 3, 6, 9));
            let entries = iq1_entries(block.add(2 + 4 * j), high);
            // 1 or -1 by bit 15, without a branch (the bit is as likely either way).
            let shift = 1 - 2 * (word >> 15) as i8;
            shifted_eighths(entries, _mm256_set1_epi8(shift))
        }
    }
}

/// iq1_m (56 bytes): the low bytes of the 32 indices into [`llm_ir::types::IQ1S_GRID`] at
/// 0, a nibble a group at `32 + g / 2` (`IQ1_M_HIGH_AT`: three high index bits and the
/// group's shift sign), and four 16-bit words at 48 (`IQ1_M_SCALES_AT`) of the 3-bit `ls`
/// of each 16 values' scale `d * (2 ls + 1)` (run `r`'s at bit `3 (r % 4)` of word
/// `r / 4`), whose top nibbles are the f16 `d`'s.
#[cfg(target_arch = "x86_64")]
struct Iq1MBlocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Iq1MBlocks {
    const BYTES: usize = llm_ir::interp::iq1::IQ1_M_BYTES;
    const HALVES: bool = true;

    #[inline(always)]
    unsafe fn d(block: *const u8) -> std::arch::x86_64::__m256 {
        use llm_ir::interp::iq1::IQ1_M_SCALES_AT;
        // SAFETY: the scale words are the super-block's last 8 bytes (the contract); F16C
        // is the caller's.
        unsafe {
            let words = block.add(IQ1_M_SCALES_AT).cast::<u64>().read_unaligned();
            let bits = (words >> 12 & 0xF)
                | (words >> 24 & 0xF0)
                | (words >> 36 & 0xF00)
                | (words >> 48 & 0xF000);
            broadcast_f16(bits as u16)
        }
    }

    #[inline(always)]
    unsafe fn scales(
        block: *const u8,
        d: std::arch::x86_64::__m256,
    ) -> [std::arch::x86_64::__m256; 2] {
        use llm_ir::interp::iq1::IQ1_M_SCALES_AT;
        use std::arch::x86_64::*;
        // SAFETY: the scale words are inside the super-block (the contract).
        unsafe {
            let words = _mm256_cvtepu16_epi32(_mm_loadl_epi64(block.add(IQ1_M_SCALES_AT).cast()));
            let words =
                _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
            let seven = _mm256_set1_epi32(7);
            let first = _mm256_srlv_epi32(words, _mm256_setr_epi32(0, 6, 0, 6, 0, 6, 0, 6));
            let second = _mm256_srlv_epi32(words, _mm256_setr_epi32(3, 9, 3, 9, 3, 9, 3, 9));
            [
                iq1_eighth_scales(d, _mm256_and_si256(first, seven)),
                iq1_eighth_scales(d, _mm256_and_si256(second, seven)),
            ]
        }
    }

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use llm_ir::interp::iq1::IQ1_M_HIGH_AT;
        use std::arch::x86_64::*;
        // SAFETY: the bytes are inside the super-block (the contract).
        unsafe {
            let nibbles = block
                .add(IQ1_M_HIGH_AT + 2 * j)
                .cast::<u16>()
                .read_unaligned();
            let high = (i32::from(nibbles), _mm_setr_epi32(0, 4, 8, 12));
            let entries = iq1_entries(block.add(4 * j), high);
            // Each group's shift sign (its nibble's fourth bit) in its 64-bit lane, made
            // the byte 1 or -1 (0xFF = 0x01 | 0xFE) in all eight bytes.
            let signs = _mm256_srlv_epi64(
                _mm256_set1_epi64x(i64::from(nibbles)),
                _mm256_setr_epi64x(3, 7, 11, 15),
            );
            let negative = _mm256_and_si256(signs, _mm256_set1_epi64x(1));
            let mask = _mm256_sub_epi64(_mm256_setzero_si256(), negative);
            let shifts = _mm256_or_si256(
                _mm256_set1_epi8(1),
                _mm256_and_si256(mask, _mm256_set1_epi8(-2)),
            );
            shifted_eighths(entries, shifts)
        }
    }
}

/// tq2_0 (66 bytes): sub-block `j`'s 32 values are bit pair `j % 4` of the 32 bytes at
/// `32 (j / 4)`, each the trit plus one; the f16 `d` (`TQ2_0_D_AT`) is every sub-block's
/// scale.
#[cfg(target_arch = "x86_64")]
struct Tq2_0Blocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Tq2_0Blocks {
    const BYTES: usize = llm_ir::interp::ternary::TQ2_0_BYTES;
    const HALVES: bool = false;
    const D_AT: usize = llm_ir::interp::ternary::TQ2_0_D_AT;

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        // SAFETY: the 32 bytes are inside the super-block (the contract).
        unsafe {
            let bytes = _mm256_loadu_si256(block.add(32 * (j / 4)).cast());
            let shifted = _mm256_srl_epi16(bytes, _mm_cvtsi32_si128(2 * (j % 4) as i32));
            let codes = _mm256_and_si256(shifted, _mm256_set1_epi8(3));
            _mm256_sub_epi8(codes, _mm256_set1_epi8(1))
        }
    }
}

/// tq1_0 (54 bytes): trits read back from the bytes of [`TQ1_0_SECTIONS`] (trit `n` of a
/// byte `((byte * 3^n) mod 256 * 3) >> 8`); sub-blocks 0 to 4 are the five trits of bytes
/// 0..32, 5 and 6 trits `2 (j - 5)` and `2 (j - 5) + 1` of bytes 32..48 (one per 128-bit
/// lane), and 7 trit 4 of those beside the four trits of bytes 48..52 (the four bytes
/// repeated across the upper lane, each under its power of three); the f16 `d`
/// (`TQ1_0_D_AT`) is every sub-block's scale.
///
/// [`TQ1_0_SECTIONS`]: llm_ir::interp::ternary::TQ1_0_SECTIONS
#[cfg(target_arch = "x86_64")]
struct Tq1_0Blocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Tq1_0Blocks {
    const BYTES: usize = llm_ir::interp::ternary::TQ1_0_BYTES;
    const HALVES: bool = false;
    const D_AT: usize = llm_ir::interp::ternary::TQ1_0_D_AT;

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use llm_ir::interp::ternary::POW3;
        use std::arch::x86_64::*;
        // SAFETY: the bytes are inside the super-block (the contract).
        unsafe {
            let pow = |n: usize| i16::from(POW3[n]);
            let (bytes, powers) = match j {
                0..5 => (_mm256_loadu_si256(block.cast()), _mm256_set1_epi16(pow(j))),
                5 | 6 => (
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(block.add(32).cast())),
                    _mm256_set_m128i(
                        _mm_set1_epi16(pow(2 * (j - 5) + 1)),
                        _mm_set1_epi16(pow(2 * (j - 5))),
                    ),
                ),
                _ => (
                    _mm256_set_m128i(
                        _mm_set1_epi32(block.add(48).cast::<i32>().read_unaligned()),
                        _mm_loadu_si128(block.add(32).cast()),
                    ),
                    _mm256_set_m128i(
                        _mm_setr_epi16(
                            pow(0),
                            pow(0),
                            pow(1),
                            pow(1),
                            pow(2),
                            pow(2),
                            pow(3),
                            pow(3),
                        ),
                        _mm_set1_epi16(pow(4)),
                    ),
                ),
            };
            _mm256_sub_epi8(trits(bytes, powers), _mm256_set1_epi8(1))
        }
    }
}

/// The trits plus one (0, 1 or 2) of the 32 tq1_0 bytes `bytes`, the trit of each 16-bit
/// lane's two bytes the one its lane of `powers` (`3^n`) selects: each byte moved to the
/// top of its own 16-bit lane, multiplied there by `3^n` (the product modulo 256 is what
/// stays in the top byte), and its top base-3 digit `(q * 3) >> 8` taken as the high half
/// of the product with 3.
///
/// # Safety
///
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn trits(
    bytes: std::arch::x86_64::__m256i,
    powers: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is the caller's.
    unsafe {
        let three = _mm256_set1_epi16(3);
        let low = _mm256_mullo_epi16(_mm256_slli_epi16(bytes, 8), powers);
        let high = _mm256_mullo_epi16(_mm256_and_si256(bytes, _mm256_set1_epi16(-256)), powers);
        let low = _mm256_mulhi_epu16(low, three);
        let high = _mm256_mulhi_epu16(high, three);
        _mm256_or_si256(low, _mm256_slli_epi16(high, 8))
    }
}

/// q1_0, two blocks at a time (36 bytes for 256 values): sub-block `j` is the 32 sign bits
/// at byte `2 + 4 (j % 4)` of block `j / 4` (18 bytes, its f16 scale first: the default
/// `d` for the first block's), the codes 1 where a bit is set and -1 where it is clear,
/// under its block's scale.
#[cfg(target_arch = "x86_64")]
struct Q1_0Blocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Q1_0Blocks {
    const BYTES: usize = 2 * llm_ir::interp::ternary::Q1_0_BYTES;
    const HALVES: bool = false;

    #[inline(always)]
    unsafe fn scales(
        block: *const u8,
        d: std::arch::x86_64::__m256,
    ) -> [std::arch::x86_64::__m256; 2] {
        use llm_ir::interp::ternary::Q1_0_BYTES;
        use std::arch::x86_64::*;
        // SAFETY: the second block's f16 scale is inside the super-block (the contract).
        unsafe {
            let second = broadcast_f16(block.add(Q1_0_BYTES).cast::<u16>().read_unaligned());
            [_mm256_blend_ps(d, second, 0xF0); 2]
        }
    }

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use llm_ir::interp::ternary::Q1_0_BYTES;
        use std::arch::x86_64::*;
        // SAFETY: the 32 sign bits are inside block j / 4 (the contract).
        unsafe {
            let at = Q1_0_BYTES * (j / 4) + 2 + 4 * (j % 4);
            let bits = block.add(at).cast::<u32>().read_unaligned();
            signed_magnitudes(_mm256_set1_epi8(1), !bits)
        }
    }
}

/// mxfp4, eight blocks at a time (136 bytes for 256 values): block `j` (17 bytes) is
/// sub-block `j`, its E8M0 byte's half scale `2^(e - 128)` its scale, and its 16 nibble
/// bytes' levels of [`FP4_LEVELS`] (low nibbles values 0..16) its codes.
///
/// [`FP4_LEVELS`]: llm_ir::interp::fp4::FP4_LEVELS
#[cfg(target_arch = "x86_64")]
struct Mxfp4Blocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Mxfp4Blocks {
    const BYTES: usize = 8 * llm_ir::interp::fp4::MXFP4_BYTES;
    const HALVES: bool = false;

    #[inline(always)]
    unsafe fn scales(
        block: *const u8,
        _d: std::arch::x86_64::__m256,
    ) -> [std::arch::x86_64::__m256; 2] {
        use llm_ir::interp::fp4::MXFP4_BYTES;
        use std::arch::x86_64::*;
        // SAFETY: the eight scale bytes are inside the eight blocks (the contract).
        unsafe {
            let e = |j: usize| i32::from(*block.add(j * MXFP4_BYTES));
            let e = _mm256_setr_epi32(e(0), e(1), e(2), e(3), e(4), e(5), e(6), e(7));
            let one = _mm256_set1_epi32(1);
            // `(e - 1) << 23`, or the subnormal `0x0020_0000 << e` where `e < 2`.
            let normal = _mm256_slli_epi32(_mm256_sub_epi32(e, one), 23);
            let subnormal = _mm256_sllv_epi32(_mm256_set1_epi32(0x0020_0000), e);
            let small = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e);
            [_mm256_castsi256_ps(_mm256_blendv_epi8(normal, subnormal, small)); 2]
        }
    }

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use llm_ir::interp::fp4::{FP4_LEVELS, MXFP4_BYTES};
        use std::arch::x86_64::*;
        // SAFETY: the 16 nibble bytes follow block j's scale byte (the contract).
        unsafe {
            let nibbles = nibbles(block.add(j * MXFP4_BYTES + 1));
            _mm256_shuffle_epi8(level_table(&FP4_LEVELS), nibbles)
        }
    }
}

/// nvfp4, four blocks at a time (144 bytes for 256 values): sub-block `j` is the half
/// `j % 2` of block `j / 2` (36 bytes), whose 16 values of either half take the UE4M3
/// scale byte `2 (j % 2)` or `2 (j % 2) + 1` of the block's four ([`ue4m3_halves`]), and
/// whose codes are the levels of [`FP4_LEVELS`] its 16 nibble bytes at
/// `4 + 16 (j % 2)` index (the low nibbles of each 8 bytes are the first 8 values of a
/// scale's 16, the high nibbles the last 8).
///
/// [`FP4_LEVELS`]: llm_ir::interp::fp4::FP4_LEVELS
#[cfg(target_arch = "x86_64")]
struct Nvfp4Blocks;

#[cfg(target_arch = "x86_64")]
impl SignedBlocks for Nvfp4Blocks {
    const BYTES: usize = 4 * llm_ir::interp::fp4::NVFP4_BYTES;
    const HALVES: bool = true;

    #[inline(always)]
    unsafe fn scales(
        block: *const u8,
        _d: std::arch::x86_64::__m256,
    ) -> [std::arch::x86_64::__m256; 2] {
        use llm_ir::interp::fp4::NVFP4_BYTES;
        use std::arch::x86_64::*;
        // SAFETY: the scale bytes are the first four of each of the four blocks (the
        // contract).
        unsafe {
            let x =
                |j: usize, h: usize| i32::from(*block.add(j / 2 * NVFP4_BYTES + 2 * (j % 2) + h));
            let half = |h: usize| {
                _mm256_setr_epi32(
                    x(0, h),
                    x(1, h),
                    x(2, h),
                    x(3, h),
                    x(4, h),
                    x(5, h),
                    x(6, h),
                    x(7, h),
                )
            };
            [ue4m3_halves(half(0)), ue4m3_halves(half(1))]
        }
    }

    #[inline(always)]
    unsafe fn codes(block: *const u8, j: usize) -> std::arch::x86_64::__m256i {
        use llm_ir::interp::fp4::{FP4_LEVELS, NVFP4_BYTES, NVFP4_CODES_AT};
        use std::arch::x86_64::*;
        // SAFETY: the 16 nibble bytes are inside block j / 2 (the contract).
        unsafe {
            let at = j / 2 * NVFP4_BYTES + NVFP4_CODES_AT + 16 * (j % 2);
            // The low nibbles of both halves' 8 bytes, then their high nibbles: the 64-bit
            // lanes regrouped by half.
            let nibbles = nibbles(block.add(at));
            let nibbles = _mm256_permute4x64_epi64(nibbles, 0b11_01_10_00);
            _mm256_shuffle_epi8(level_table(&FP4_LEVELS), nibbles)
        }
    }
}

/// Half the values of eight UE4M3 bytes `x` (one a 32-bit lane), as
/// `llm_ir::interp::fp4::ue4m3_half` gives them: `(8 [e > 0] + m) * 2^(max(e, 1) - 11)`
/// of exponent `e` (bits 3..7) and mantissa `m` (bits 0..3), and 0 for `0x7F`.
///
/// # Safety
///
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn ue4m3_halves(x: std::arch::x86_64::__m256i) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is the caller's.
    unsafe {
        let exp = _mm256_and_si256(_mm256_srli_epi32(x, 3), _mm256_set1_epi32(0xF));
        let man = _mm256_and_si256(x, _mm256_set1_epi32(7));
        let normal = _mm256_cmpgt_epi32(exp, _mm256_setzero_si256());
        let significand = _mm256_add_epi32(man, _mm256_and_si256(normal, _mm256_set1_epi32(8)));
        let exp = _mm256_max_epi32(exp, _mm256_set1_epi32(1));
        let power = _mm256_slli_epi32(_mm256_add_epi32(exp, _mm256_set1_epi32(116)), 23);
        let half = _mm256_mul_ps(_mm256_cvtepi32_ps(significand), _mm256_castsi256_ps(power));
        let nan_code = _mm256_cmpeq_epi32(x, _mm256_set1_epi32(0x7F));
        _mm256_andnot_ps(_mm256_castsi256_ps(nan_code), half)
    }
}

/// The codes of two consecutive iq4_xs sub-blocks from their 32 nibble bytes at `packed`
/// (16 a sub-block: low nibbles are values 0..16, high nibbles 16..32) looked up in
/// `table` (IQ4_NL's levels from [`super::q8dot::level_table`], in both 128-bit lanes), each
/// sub-block's 32 in value order: both halves' nibbles looked up in place, then their
/// 128-bit lanes regrouped by sub-block.
///
/// # Safety
///
/// `packed` points to 32 readable bytes, and the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn iq4_xs_pair(
    packed: *const u8,
    table: std::arch::x86_64::__m256i,
) -> [std::arch::x86_64::__m256i; 2] {
    use std::arch::x86_64::*;
    // SAFETY: 32 bytes (the contract); AVX2 is the caller's.
    unsafe {
        let packed = _mm256_loadu_si256(packed.cast());
        let mask = _mm256_set1_epi8(0x0f);
        let low = _mm256_shuffle_epi8(table, _mm256_and_si256(packed, mask));
        let high = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask));
        [
            _mm256_permute2x128_si256(low, high, 0x20),
            _mm256_permute2x128_si256(low, high, 0x31),
        ]
    }
}

/// The eight sub-block scales `ls - 32` of the iq4_xs super-block at `block`, lane `j` for
/// sub-block `j`: nibble `j % 2` of byte `4 + j / 2` under bit pair `j` of the 16-bit word
/// at 2.
///
/// # Safety
///
/// `block` points to an iq4_xs super-block, and the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn iq4_xs_scales(block: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the word and the four bytes are inside the super-block (the contract).
    unsafe {
        let low = _mm_cvtsi32_si128(block.add(4).cast::<i32>().read_unaligned());
        let low = _mm256_permutevar8x32_epi32(
            _mm256_cvtepu8_epi32(low),
            _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        );
        let low = _mm256_srlv_epi32(low, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
        let high = _mm256_set1_epi32(i32::from(block.add(2).cast::<u16>().read_unaligned()));
        let high = _mm256_srlv_epi32(high, _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
        let ls = _mm256_or_si256(
            _mm256_and_si256(low, _mm256_set1_epi32(0xf)),
            _mm256_slli_epi32(_mm256_and_si256(high, _mm256_set1_epi32(3)), 4),
        );
        _mm256_sub_epi32(ls, _mm256_set1_epi32(32))
    }
}

/// The permutations that give quarter `g` of a half super-block (one block of x) its two
/// runs of 16: the first run's factor in lanes 0..4, the second's in lanes 4..8.
///
/// # Safety
///
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn quarter_runs() -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    std::array::from_fn(|g| {
        let g = 2 * g as i32;
        // SAFETY: AVX is the caller's.
        unsafe { _mm256_setr_epi32(g, g, g, g, g + 1, g + 1, g + 1, g + 1) }
    })
}

/// The eight run factors `d_sc * dx` of a half super-block of runs of 16 for each row of
/// x, whose four blocks start at block `first`: run `r` takes block `first + r / 2`'s `dx`.
///
/// # Safety
///
/// The rows' activations hold blocks `first..first + 4`, and the CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn half_factors<const TILE: usize>(
    d_sc: std::arch::x86_64::__m256,
    a: [&Activations; TILE],
    first: usize,
) -> [std::arch::x86_64::__m256; TILE] {
    use std::arch::x86_64::*;
    // SAFETY: the blocks are inside each row's activations (the contract).
    unsafe {
        let twice = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        std::array::from_fn(|t| {
            let dx = _mm_loadu_ps(a[t].dx.as_ptr().add(first));
            _mm256_mul_ps(
                d_sc,
                _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dx), twice),
            )
        })
    }
}

/// What [`sixteens_rows`] needs of one half (128 values, four blocks of x) of a
/// super-block of a K-quant with sixteen runs of 16 values (q2_k, q3_k, q6_k).
#[cfg(target_arch = "x86_64")]
struct Half {
    /// The half's eight run scales (`d * sc`), lane `r` for run `r`.
    d_sc: std::arch::x86_64::__m256,
    /// The half's eight run minimums (`dmin * m`), where the format has them.
    dmin_m: Option<std::arch::x86_64::__m256>,
    /// Each quarter's 32 codes as unsigned bytes.
    codes: [std::arch::x86_64::__m256i; 4],
}

/// A K-quant of sixteen runs of 16 values a super-block: its size, how its codes are
/// recentred and how a half decodes.
#[cfg(target_arch = "x86_64")]
trait Sixteens {
    /// Bytes of a super-block.
    const BYTES: usize;
    /// The right shift that turns [`Activations`]' `32 * Σ qx` into what the codes are
    /// recentred by (`None`: the codes are the values' own).
    const CENTRE_SHIFT: Option<i32>;
    /// Half `n` of the super-block at `block`.
    ///
    /// # Safety
    ///
    /// `block` points to a whole super-block, `n < 2`, and the CPU has AVX2 and F16C.
    unsafe fn half(block: *const u8, n: usize) -> Half;
}

/// q2_k (84 bytes): 16 run bytes (scale in the low nibble, minimum in the high), 64 bytes
/// of 2-bit codes, an f16 `d` and `dmin`; value `l` of quarter `s` of half `n` is bit pair
/// `s` of code byte `32n + l`, and a run's value `d * sc * q - dmin * m`.
#[cfg(target_arch = "x86_64")]
struct Q2kRuns;

#[cfg(target_arch = "x86_64")]
impl Sixteens for Q2kRuns {
    const BYTES: usize = 84;
    const CENTRE_SHIFT: Option<i32> = None;

    #[inline(always)]
    unsafe fn half(block: *const u8, n: usize) -> Half {
        use std::arch::x86_64::*;
        // SAFETY: the offsets are inside the super-block (the contract).
        unsafe {
            let both = _mm_cvtph_ps(_mm_cvtsi32_si128(
                block.add(80).cast::<i32>().read_unaligned(),
            ));
            let d = _mm256_broadcastss_ps(both);
            let dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(both));
            let bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(block.add(8 * n).cast()));
            let sc = _mm256_and_si256(bytes, _mm256_set1_epi32(0xf));
            let m = _mm256_srli_epi32(bytes, 4);
            let codes = _mm256_loadu_si256(block.add(16 + 32 * n).cast());
            Half {
                d_sc: _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)),
                dmin_m: Some(_mm256_mul_ps(dmin, _mm256_cvtepi32_ps(m))),
                codes: std::array::from_fn(|s| bit_pairs(codes, s)),
            }
        }
    }
}

/// q3_k (110 bytes): 32 bytes of high bits, 64 of 2-bit codes, 12 of 6-bit run scales and
/// an f16 `d`; value `l` of quarter `s` of half `n` takes bit pair `s` of code byte
/// `32n + l` and bit `4n + s` of high byte `l`, an unsigned code `q` of 3 bits whose
/// value is `d * (sc - 32) * (q - 4)`.
#[cfg(target_arch = "x86_64")]
struct Q3kRuns;

#[cfg(target_arch = "x86_64")]
impl Sixteens for Q3kRuns {
    const BYTES: usize = llm_ir::interp::iq3::IQ3_S_BYTES;
    // `4 * Σ qx`: the 32 times of `Activations::centre` over 8.
    const CENTRE_SHIFT: Option<i32> = Some(3);

    #[inline(always)]
    unsafe fn half(block: *const u8, n: usize) -> Half {
        use std::arch::x86_64::*;
        // SAFETY: the offsets are inside the super-block (the contract).
        unsafe {
            let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                block.add(108).cast::<u16>().read_unaligned(),
            ))));
            let packed: &[u8; 12] = &*block.add(96).cast();
            let scales: [i8; 8] = std::array::from_fn(|r| q3_k_scale(8 * n + r, packed) - 32);
            let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(scales.as_ptr().cast()));
            let high = _mm256_loadu_si256(block.cast());
            let codes = _mm256_loadu_si256(block.add(32 + 32 * n).cast());
            Half {
                d_sc: _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc)),
                dmin_m: None,
                codes: std::array::from_fn(|s| {
                    // High bit 4n + s of every byte, moved to bit 2 (16-bit shifts move no
                    // bit into the kept one across the byte boundary).
                    let bit = 4 * n as i32 + s as i32;
                    let moved = if bit >= 2 {
                        _mm256_srl_epi16(high, _mm_cvtsi32_si128(bit - 2))
                    } else {
                        _mm256_sll_epi16(high, _mm_cvtsi32_si128(2 - bit))
                    };
                    let high = _mm256_and_si256(moved, _mm256_set1_epi8(4));
                    _mm256_or_si256(bit_pairs(codes, s), high)
                }),
            }
        }
    }
}

/// q6_k (210 bytes): 128 bytes of low nibbles, 64 of high bit pairs, 16 signed run scales
/// and an f16 `d`; value `l` of quarter `g` of a half takes nibble `g / 2` of low byte
/// `l + 32 * (g % 2)` and bit pair `g` of high byte `l` ([`super::kquant::q6_k_codes`]),
/// and a run's value is `d * sc * (q - 32)`.
#[cfg(target_arch = "x86_64")]
struct Q6kRuns;

#[cfg(target_arch = "x86_64")]
impl Sixteens for Q6kRuns {
    const BYTES: usize = 210;
    const CENTRE_SHIFT: Option<i32> = Some(0);

    #[inline(always)]
    unsafe fn half(block: *const u8, n: usize) -> Half {
        use std::arch::x86_64::*;
        // SAFETY: the offsets are inside the super-block (the contract).
        unsafe {
            let d = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                block.add(208).cast::<u16>().read_unaligned(),
            ))));
            let sc = _mm_loadl_epi64(block.add(192 + 8 * n).cast());
            Half {
                d_sc: _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))),
                dmin_m: None,
                codes: super::kquant::q6_k_codes(block, n),
            }
        }
    }
}

/// Bit pair `s` of each of the 32 bytes `codes` (16-bit shifts, then a mask per byte).
///
/// # Safety
///
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bit_pairs(codes: std::arch::x86_64::__m256i, s: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: AVX2 is the caller's.
    unsafe {
        _mm256_and_si256(
            _mm256_srl_epi16(codes, _mm_cvtsi32_si128(2 * s as i32)),
            _mm256_set1_epi8(3),
        )
    }
}

/// A K-quant of sixteen runs of 16 ([`Sixteens`]) against `TILE` rows of x: each half of
/// 128 values has four quarters of 32, one block of x each, whose codes are decoded once
/// for the tile; per row of x, a half's eight run factors `d * sc * dx` are formed 8 lanes
/// at a time and each quarter takes its two (lanes 0..4 of its sums hold the first run,
/// 4..8 the second), the codes' recentring comes off as a multiple of `Σ qx`, and q2_k's
/// minimum terms `dmin * m * dx * Σ qx` over each run's half block, 8 lanes at a time.
/// Each row's result is the same whatever the tile.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sixteens_rows<Q: QuadSums, const TILE: usize, F: Sixteens>(
    x: [*const u8; TILE],
    a: [&Activations; TILE],
    w: *const u8,
) -> [f32; TILE] {
    // SAFETY: every offset below is inside the buffers the callers' contracts describe;
    // the caller has the features `Q` needs (this body is inlined into its instances).
    unsafe {
        use std::arch::x86_64::*;
        let runs = quarter_runs();
        let mut acc = [[_mm256_setzero_ps(); 2]; TILE];
        let mut mins = [_mm256_setzero_ps(); TILE];
        for sb in 0..a[0].dx.len() / 8 {
            let block = w.add(sb * F::BYTES);
            for n in 0..2 {
                let half = F::half(block, n);
                let factors = half_factors(half.d_sc, a, 8 * sb + 4 * n);
                if let Some(dmin_m) = half.dmin_m {
                    for t in 0..TILE {
                        let sums = _mm256_loadu_ps(a[t].dx_half_sum.as_ptr().add(16 * sb + 8 * n));
                        mins[t] = _mm256_fmadd_ps(dmin_m, sums, mins[t]);
                    }
                }
                for (g, codes) in half.codes.into_iter().enumerate() {
                    let b = 8 * sb + 4 * n + g;
                    for t in 0..TILE {
                        let xq = _mm256_loadu_si256(x[t].add(b * X_BLOCK + 2).cast());
                        let mut sums = Q::quads(codes, xq);
                        if let Some(shift) = F::CENTRE_SHIFT {
                            let centre = if shift == 0 {
                                a[t].centre[b]
                            } else {
                                _mm256_sra_epi32(a[t].centre[b], _mm_cvtsi32_si128(shift))
                            };
                            sums = _mm256_sub_epi32(sums, centre);
                        }
                        let scale = _mm256_permutevar8x32_ps(factors[t], runs[g]);
                        acc[t][g % 2] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[t][g % 2]);
                    }
                }
            }
        }
        std::array::from_fn(|t| {
            let total = _mm256_sub_ps(_mm256_add_ps(acc[t][0], acc[t][1]), mins[t]);
            super::ukernel::lane_sum(total)
        })
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use llm_ir::{interp::quant, types::QuantFormat};

    use super::*;

    /// Seeded bytes.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as u8
            })
            .collect()
    }

    /// A q8_0 row of `blocks` blocks with every code byte (-128 included) and f16 scales,
    /// subnormal ones too.
    fn activations(blocks: usize, seed: u64) -> Vec<u8> {
        let codes = bytes(32 * blocks, seed);
        let mut x = Vec::new();
        for b in 0..blocks {
            let scale = if b % 3 == 2 {
                3e-6
            } else {
                0.01 * (b as f32 + 1.0)
            };
            x.extend(half::f16::from_f32(scale).to_bits().to_le_bytes());
            x.extend(&codes[32 * b..32 * b + 32]);
        }
        x
    }

    /// Weight rows of `format` from random values, as the reference quantizes them: runs
    /// of 16 differ in magnitude (1/32 to 1) and offset, so that the sub-block scales and
    /// minimums take small and large values, all bits of their 6-bit fields included.
    fn weights(format: &QuantFormat, rows: usize, k: usize, seed: u64) -> Vec<u8> {
        if matches!(
            format,
            QuantFormat::Iq3Xxs
                | QuantFormat::Iq3S
                | QuantFormat::Iq2Xxs
                | QuantFormat::Iq2Xs
                | QuantFormat::Iq2S
                | QuantFormat::Iq1S
                | QuantFormat::Iq1M
                | QuantFormat::Tq1_0
                | QuantFormat::Tq2_0
                | QuantFormat::Q1_0
                | QuantFormat::Mxfp4
                | QuantFormat::Nvfp4
        ) {
            return random_blocks(format, rows * k / format.block_elems() as usize, seed);
        }
        let values: Vec<f32> = bytes(rows * k, seed)
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let run = (i % k) / 16;
                let magnitude = (1 << (run % 6)) as f32 / 32.0;
                (f32::from(b) / 64.0 - 2.0) * magnitude + (run % 3) as f32 * 0.5
            })
            .collect();
        quant::quantize(format, &[rows, k], &values)
    }

    /// `blocks` random (super-)blocks of a lattice, ternary, binary or 4-bit float format (any
    /// bytes decode), so that every grid entry, high index bit, sign, scale and code byte
    /// occurs, each with a small scale: an f16 `d`, mxfp4's E8M0 byte of 2^-10 to 2^-3
    /// (2^-128 in one block of five), nvfp4's UE4M3 bytes of 2^-6 to 2^-3 (and 0x7F,
    /// which reads as 0, or the ignored top bit set, in some).
    fn random_blocks(format: &QuantFormat, blocks: usize, seed: u64) -> Vec<u8> {
        use llm_ir::interp::ternary::{TQ1_0_D_AT, TQ2_0_D_AT};
        let size = format.gguf_block_bytes().expect("a GGUF format") as usize;
        let mut w = bytes(blocks * size, seed);
        for (b, block) in w.chunks_mut(size).enumerate() {
            let d = half::f16::from_f32(1e-3 * (b % 7 + 1) as f32);
            let d_at = match format {
                QuantFormat::Iq1M => {
                    llm_ir::interp::iq1::set_iq1_m_d(block, d);
                    continue;
                }
                QuantFormat::Mxfp4 => {
                    block[0] = if b % 5 == 4 { 0 } else { 117 + block[0] % 8 };
                    continue;
                }
                QuantFormat::Nvfp4 => {
                    for (s, scale) in block[..4].iter_mut().enumerate() {
                        *scale = match (b + s) % 15 {
                            0 | 3 | 6 | 9 | 12 => 0x7F,
                            5 => 0x80 | (0x08 + *scale % 0x20),
                            _ => 0x08 + *scale % 0x20,
                        };
                    }
                    continue;
                }
                QuantFormat::Tq1_0 => TQ1_0_D_AT,
                QuantFormat::Tq2_0 => TQ2_0_D_AT,
                _ => 0,
            };
            block[d_at..d_at + 2].copy_from_slice(&d.to_le_bytes());
        }
        w
    }

    /// The unpacked 6-bit scales and minimums against the reference's decoding: a block
    /// with `d = 1`, `dmin = 0` and every code 1 dequantizes to its scales, one with
    /// `d = 0`, `dmin = 1` and codes 0 to its negated minimums.
    #[test]
    fn scales_and_minimums_unpack_as_the_reference() {
        for seed in 0..64 {
            let packed: [u8; 12] = bytes(12, seed).try_into().expect("12 bytes");
            let (scales, mins) = scales_mins(&packed);
            for (dm, code, want) in [([1.0, 0.0], 0x11, scales), ([0.0, 1.0], 0, mins)] {
                let mut block = Vec::new();
                for v in dm {
                    block.extend(half::f16::from_f32(v).to_bits().to_le_bytes());
                }
                block.extend(packed);
                block.extend([code; 128]);
                let values = quant::dequantize(&QuantFormat::Q4K, &[256], &block);
                for j in 0..8 {
                    let field = f32::from((want >> (8 * j)) as u8);
                    let got = values[32 * j].abs();
                    assert_eq!(got, field, "sub-block {j} of {packed:?}");
                }
            }
        }
    }

    /// `dot(dequantize(x), dequantize(w_r))` in f64, and the sum of its terms' magnitudes.
    fn expected(x: &[u8], w: &[u8], format: &QuantFormat, k: usize) -> (f64, f64) {
        let xs = quant::dequantize(&QuantFormat::Q8_0, &[k], x);
        let ws = quant::dequantize(format, &[k], w);
        xs.iter()
            .zip(&ws)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .fold((0.0, 0.0), |(s, m), v| (s + v, m + v.abs()))
    }

    /// Every format, both instruction sets (VNNI where the CPU has it), one to nine rows of
    /// x (whole tiles of either and their remainders) with scales of their own, into rows
    /// of y wider than the outputs (to check the stride).
    #[test]
    fn rows_agree_with_the_dequantized_product() {
        if !super::super::ukernel::available() {
            return;
        }
        for (weight, _) in SYMBOLS {
            let block = weight.row_bytes(256);
            let format = weight.quant_format().expect("a quantized format");
            let [avx2, vnni] = instances(weight).expect("every symbol's format has kernels");
            let kernels = [(false, avx2), (true, vnni)];
            for (with_vnni, kernel) in kernels {
                if with_vnni && !super::super::q8dot::vnni() {
                    continue;
                }
                for (seed, supers, rows) in
                    [(1u64, 1usize, 1usize), (2, 2, 5), (3, 3, 9), (4, 1, 7)]
                {
                    let k = 256 * supers;
                    let w = weights(&format, rows, k, seed + 10);
                    for m in 1..10 {
                        check_rows(
                            kernel,
                            (&format, block),
                            (k, &w, rows),
                            (m, seed),
                            with_vnni,
                        );
                    }
                }
            }
        }
    }

    /// mxfp4's subnormal scales (E8M0 bytes 0 and 1: 2^-128 and 2^-127) reach the products
    /// as they are (the other tests' tolerance, absolute below 1, cannot see them): within
    /// 1% of the dequantized product, whose factors are subnormal in f32 too.
    #[test]
    fn mxfp4_subnormal_scales_count() {
        if !super::super::ukernel::available() {
            return;
        }
        let mut w = bytes(8 * 17, 5);
        for (b, block) in w.chunks_mut(17).enumerate() {
            block[0] = (b % 2) as u8;
        }
        let x = activations(8, 6);
        let (want, magnitude) = expected(&x, &w, &QuantFormat::Mxfp4, 256);
        assert!(magnitude > 0.0);
        for (with_vnni, kernel) in [false, true]
            .into_iter()
            .zip(instances(WeightFormat::Mxfp4).expect("kernels"))
        {
            if with_vnni && !super::super::q8dot::vnni() {
                continue;
            }
            let mut y = [f32::NAN];
            // SAFETY: one row of x and of w, of 256 values; AVX2, FMA and F16C are checked,
            // and VNNI where it is used.
            unsafe {
                kernel(
                    256,
                    x.as_ptr(),
                    w.as_ptr(),
                    y.as_mut_ptr().cast(),
                    1,
                    1,
                    x.len() as i64,
                    4,
                )
            };
            assert!(
                (f64::from(y[0]) - want).abs() <= 1e-2 * magnitude,
                "vnni {with_vnni}: {} != {want}",
                y[0]
            );
        }
    }

    /// Runs `kernel` on `m` rows of x against the `rows` weight rows `w` and checks every
    /// output against the dequantized product.
    fn check_rows(
        kernel: EntryPoint,
        (format, block): (&QuantFormat, usize),
        (k, w, rows): (usize, &[u8], usize),
        (m, seed): (usize, u64),
        with_vnni: bool,
    ) {
        let supers = k / 256;
        let xs: Vec<Vec<u8>> = (0..m)
            .map(|i| {
                let mut x = activations(k / 32, seed + 100 * i as u64);
                for block in x.chunks_mut(X_BLOCK) {
                    let dx = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                    let dx = half::f16::from_f32(dx * (i + 1) as f32);
                    block[..2].copy_from_slice(&dx.to_le_bytes());
                }
                x
            })
            .collect();
        let x: Vec<u8> = xs.concat();
        let width = rows + 2;
        let mut y = vec![f32::NAN; m * width];
        // SAFETY: x holds m rows of k / 32 blocks, w `rows` rows of k / 256 super-blocks, y
        // m rows of `width` floats; AVX2, FMA and F16C are checked, and VNNI where it is
        // used.
        unsafe {
            kernel(
                k as i64,
                x.as_ptr(),
                w.as_ptr(),
                y.as_mut_ptr().cast(),
                rows as i64,
                m as i64,
                xs[0].len() as i64,
                (4 * width) as i64,
            )
        };
        for (i, xi) in xs.iter().enumerate() {
            for r in 0..rows {
                let row = &w[r * supers * block..(r + 1) * supers * block];
                let (want, magnitude) = expected(xi, row, format, k);
                let got = y[i * width + r];
                assert!(
                    (f64::from(got) - want).abs() <= 1e-6 * magnitude.max(1.0),
                    "{format:?}, vnni {with_vnni}, {supers} super-blocks, x row {i} of {m}, row {r}: {got} != {want}"
                );
            }
            assert!(
                y[i * width + rows..(i + 1) * width]
                    .iter()
                    .all(|v| v.is_nan())
            );
        }
    }
}
