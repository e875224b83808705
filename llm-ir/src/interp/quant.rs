//! Bit-exact quantization formats.
//!
//! # Layouts
//!
//! GGUF formats (`q8_0`, `q4_0`, `q4_1`, `q5_0`, `q5_1`, the K-quants `q2_k`, `q3_k`, `q4_k`,
//! `q5_k`, `q6_k`, `iq4_nl`, `iq4_xs`, and the lattice formats `iq3_xxs`, `iq3_s` of
//! [`iq3`], `iq2_xxs`, `iq2_xs`, `iq2_s` of [`iq2`] and `iq1_s`, `iq1_m` of [`iq1`], the
//! ternary `tq1_0`, `tq2_0` and binary `q1_0` of [`ternary`], and the 4-bit floats `mxfp4`, `nvfp4` of
//! [`fp4`]) store
//! each row (the last dim) as
//! consecutive blocks exactly as ggml does; see [`crate::types::QuantFormat`]. The
//! quantizers follow ggml's reference quantizers operation for operation in `f32` (except
//! the lattice formats', this project's own, [`super::lattice`]); for `q8_0`, `q4_0`,
//! `q4_1`, `q5_0`, `q5_1`, `tq1_0`, `tq2_0` and `mxfp4` the bytes are checked against llama.cpp's vectors (see
//! [`quantize_k`] for the K-quants and [`quantize_iq4_nl`] for `iq4_nl` and `iq4_xs`, whose
//! dequantization alone has vectors).
//!
//! `nf4` stores, for each block of `block_size` values along the last dim, 4-bit indices
//! into the NormalFloat table (two per byte, low nibble first, in row-major element order),
//! then one absmax scale per block (in the scale dtype, little-endian, row-major block order).
//!
//! Affine `intN` stores the N-bit codes of all elements in row-major order (`8 / N` per
//! byte, first element in the lowest bits), then one scale per group (scale dtype), then for
//! asymmetric formats one zero point per group (one byte each). Groups are `group_size`
//! consecutive elements along `axis`. Symmetric: `q = round(x / s)` in
//! `[-(2^(N-1) - 1), 2^(N-1) - 1]` stored as two's complement, `x = q * s`, with
//! `s = max|x| / (2^(N-1) - 1)`. Asymmetric: `s = (max - min) / (2^N - 1)`,
//! `z = round(-min / s)` in `[0, 2^N - 1]`, `q = clamp(round(x / s) + z)`, `x = (q - z) * s`.
//! Rounding is to nearest with ties away from zero.

use half::{bf16, f16};

use super::{fp4, iq1, iq2, iq3, ternary};
use crate::{
    dtype::DType,
    types::{IQ4_NL_LEVELS, QuantFormat},
};

/// The 16 levels of 4-bit NormalFloat (QLoRA), ascending.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The f16 at byte `at` of `bytes`, as `f32`.
pub(super) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

fn push_f16(out: &mut Vec<u8>, x: f32) {
    out.extend_from_slice(&f16::from_f32(x).to_le_bytes());
}

fn scale_bytes(dtype: DType) -> usize {
    dtype.size_bytes()
}

fn push_scale(out: &mut Vec<u8>, dtype: DType, x: f32) {
    match dtype {
        DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
        _ => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn read_scale(bytes: &[u8], at: usize, dtype: DType) -> f32 {
    match dtype {
        DType::F16 => f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32(),
        DType::BF16 => bf16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32(),
        _ => f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]),
    }
}

fn round_scale(dtype: DType, x: f32) -> f32 {
    super::value::round_float(dtype, x)
}

/// Number of bytes a tensor of `shape` takes in `format`.
pub fn storage_bytes(format: &QuantFormat, shape: &[usize]) -> usize {
    let n: usize = shape.iter().product();
    let groups = n / format.block_elems() as usize;
    match format {
        QuantFormat::Nf4 { scale, .. } => n.div_ceil(2) + groups * scale_bytes(*scale),
        QuantFormat::Affine {
            bits,
            symmetric,
            scale,
            ..
        } => {
            let codes = (n * *bits as usize).div_ceil(8);
            codes + groups * scale_bytes(*scale) + if *symmetric { 0 } else { groups }
        }
        gguf => groups * gguf.gguf_block_bytes().unwrap_or(0) as usize,
    }
}

/// Quantizes `values` of logical shape `shape` (whose blocking the type verifier checked).
pub fn quantize(format: &QuantFormat, shape: &[usize], values: &[f32]) -> Vec<u8> {
    match format {
        QuantFormat::Q8_0 => values.chunks(32).flat_map(quantize_q8_0).collect(),
        QuantFormat::Q4_0 => values.chunks(32).flat_map(quantize_q4_0).collect(),
        QuantFormat::Q4_1 => values.chunks(32).flat_map(quantize_q4_1).collect(),
        QuantFormat::Q5_0 | QuantFormat::Q5_1 => values
            .chunks(32)
            .flat_map(|b| quantize_q5(b, *format == QuantFormat::Q5_1))
            .collect(),
        QuantFormat::Iq4Nl => values.chunks(32).flat_map(quantize_iq4_nl).collect(),
        QuantFormat::Iq4Xs => values.chunks(256).flat_map(quantize_iq4_xs).collect(),
        QuantFormat::Iq3Xxs => values.chunks(256).flat_map(iq3::quantize_iq3_xxs).collect(),
        QuantFormat::Iq3S => values.chunks(256).flat_map(iq3::quantize_iq3_s).collect(),
        QuantFormat::Iq2Xxs => values.chunks(256).flat_map(iq2::quantize_iq2_xxs).collect(),
        QuantFormat::Iq2Xs => values.chunks(256).flat_map(iq2::quantize_iq2_xs).collect(),
        QuantFormat::Iq2S => values.chunks(256).flat_map(iq2::quantize_iq2_s).collect(),
        QuantFormat::Iq1S => values.chunks(256).flat_map(iq1::quantize_iq1_s).collect(),
        QuantFormat::Iq1M => values.chunks(256).flat_map(iq1::quantize_iq1_m).collect(),
        QuantFormat::Tq1_0 => values
            .chunks(256)
            .flat_map(ternary::quantize_tq1_0)
            .collect(),
        QuantFormat::Tq2_0 => values
            .chunks(256)
            .flat_map(ternary::quantize_tq2_0)
            .collect(),
        QuantFormat::Q1_0 => values
            .chunks(128)
            .flat_map(ternary::quantize_q1_0)
            .collect(),
        QuantFormat::Mxfp4 => values.chunks(32).flat_map(fp4::quantize_mxfp4).collect(),
        QuantFormat::Nvfp4 => values.chunks(64).flat_map(fp4::quantize_nvfp4).collect(),
        QuantFormat::Q4K
        | QuantFormat::Q6K
        | QuantFormat::Q2K
        | QuantFormat::Q3K
        | QuantFormat::Q5K => values
            .chunks(256)
            .flat_map(|b| quantize_k(format, b))
            .collect(),
        QuantFormat::F16 => values
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        QuantFormat::BF16 => values
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        QuantFormat::Nf4 { block_size, scale } => {
            quantize_nf4(*block_size as usize, *scale, values)
        }
        QuantFormat::Affine {
            bits,
            group_size,
            symmetric,
            axis,
            scale,
        } => quantize_affine(
            *bits,
            *group_size as usize,
            *symmetric,
            *axis as usize,
            *scale,
            shape,
            values,
        ),
    }
}

/// Expands `bytes` of a tensor of logical shape `shape` to floats.
pub fn dequantize(format: &QuantFormat, shape: &[usize], bytes: &[u8]) -> Vec<f32> {
    match format {
        QuantFormat::Nf4 { .. } | QuantFormat::Affine { .. } => {
            let n: usize = shape.iter().product();
            (0..n)
                .map(|i| whole_value(format, shape, bytes, i))
                .collect()
        }
        gguf => {
            let block_bytes = gguf.gguf_block_bytes().unwrap_or(1) as usize;
            let mut out = Vec::with_capacity(shape.iter().product());
            for block in bytes.chunks(block_bytes) {
                dequantize_gguf_block(gguf, block, &mut out);
            }
            out
        }
    }
}

/// Expands row `row` of the `[rows, k]` matrix `bytes` (checked by the caller to hold
/// `storage_bytes(format, shape)`) into `out` (`k` floats): what [`dequantize`] gives for
/// that row, without expanding the others (an embedding's gather).
pub fn dequantize_row(
    format: &QuantFormat,
    shape: [usize; 2],
    bytes: &[u8],
    row: usize,
    out: &mut [f32],
) {
    let k = shape[1];
    let first = row * k;
    match format {
        QuantFormat::Nf4 { .. } | QuantFormat::Affine { .. } => {
            for (c, o) in out.iter_mut().enumerate() {
                *o = whole_value(format, &shape, bytes, first + c);
            }
        }
        gguf => {
            let block_bytes = gguf.gguf_block_bytes().unwrap_or(1) as usize;
            let row_bytes = k / format.block_elems() as usize * block_bytes;
            let mut values = Vec::with_capacity(k);
            for block in bytes[row * row_bytes..][..row_bytes].chunks(block_bytes) {
                dequantize_gguf_block(gguf, block, &mut values);
            }
            out.copy_from_slice(&values);
        }
    }
}

/// Quantizes a block of 32 values to IQ4_NL as ggml's `quantize_row_iq4_nl_ref` does
/// (`quantize_row_iq4_nl_impl` for one block of 32): the block's scale is searched for
/// ([`iq4_nl_block_scale`]) and stored as f16, and every value takes its nearest level
/// under the scale in `f32`, before the rounding to f16. No reference implementation of
/// the quantizer is at hand as bytes (the `gguf` package only dequantizes IQ4_NL), so it
/// is checked by round trips.
pub fn quantize_iq4_nl(x: &[f32]) -> Vec<u8> {
    let scale = iq4_nl_block_scale(x);
    let mut out = Vec::with_capacity(18);
    push_f16(&mut out, scale);
    out.extend(iq4_nibbles(x, scale));
    out
}

/// Quantizes a super-block of 256 values to IQ4_XS as ggml's `quantize_row_iq4_xs_ref`
/// does (`quantize_row_iq4_nl_impl` for eight blocks of 32): each sub-block's scale is
/// searched for as IQ4_NL's ([`iq4_nl_block_scale`]); the super-block scale `d` is the
/// largest in magnitude (the first of equals) over `-32`, stored as f16; each sub-block
/// stores `l = round(scale / d)` (ties to even, clamped to -32..=31) offset by 32 in six
/// bits, and its values take their nearest levels under `d * l`, with `d` in `f32`
/// before its rounding to f16. Checked by round trips, as [`quantize_iq4_nl`].
pub fn quantize_iq4_xs(x: &[f32]) -> Vec<u8> {
    let scales: Vec<f32> = x.chunks(32).map(iq4_nl_block_scale).collect();
    let largest = scales
        .iter()
        .fold(0f32, |max, &s| if s.abs() > max.abs() { s } else { max });
    let d = -largest / 32.0;
    let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (mut high, mut low, mut nibbles) = (0u16, [0u8; 4], Vec::with_capacity(128));
    for (ib, (xb, &scale)) in x.chunks(32).zip(&scales).enumerate() {
        let l = nearest_int(inverse * scale).clamp(-32, 31);
        nibbles.extend(iq4_nibbles(xb, d * l as f32));
        let stored = (l + 32) as u8;
        low[ib / 2] |= (stored & 0xF) << (4 * (ib % 2));
        high |= u16::from(stored >> 4) << (2 * ib);
    }
    let mut out = Vec::with_capacity(136);
    push_f16(&mut out, d);
    out.extend(high.to_le_bytes());
    out.extend(low);
    out.extend(nibbles);
    out
}

/// The scale ggml's `quantize_row_iq4_nl_impl` finds for a block of 32 values without
/// importance weights (7 tries each way): a first scale `-max / -127` (the value of
/// largest magnitude maps onto +127, beyond the last level), every value takes its
/// nearest level ([`nearest_iq4_nl_level`]), and the scale is refitted by least squares
/// weighted by `x²`; then the 15 scales that map the largest value onto `-127 + t` for `t`
/// in -7..=7 (the opposite sign) compete by the same fit. A block whose largest magnitude
/// is below 1e-15 has a zero scale.
pub fn iq4_nl_block_scale(x: &[f32]) -> f32 {
    let levels = IQ4_NL_LEVELS.map(f32::from);
    let (amax, max) = x.iter().fold((0f32, 0f32), |(amax, max), &v| {
        if v.abs() > amax {
            (v.abs(), v)
        } else {
            (amax, max)
        }
    });
    if amax < 1e-15 {
        return 0.0;
    }
    // The 16 candidates' inverse scales, and the weighted least-squares fit of the levels
    // the values take under each, `(Σ w·q·x, Σ w·q²)`: each candidate's sums in the
    // values' order, the candidates side by side (independent chains of additions).
    let inverses: [f32; 16] = std::array::from_fn(|c| match c {
        0 => 1.0 / (-max / levels[0]),
        c => ((c as i32 - 8) as f32 + levels[0]) / max,
    });
    let mut fits = [(0f32, 0f32); 16];
    for &v in x {
        // The value's weight, `x²`.
        let w = v * v;
        for ((sumqx, sumq2), &inverse) in fits.iter_mut().zip(&inverses) {
            let q = levels[nearest_iq4_nl_level(inverse * v)];
            *sumqx += w * q * v;
            *sumq2 += w * q * q;
        }
    }
    let (sumqx, sumq2) = fits[0];
    let mut d = sumqx / sumq2;
    let mut best = d * sumqx;
    for &(sumqx, sumq2) in &fits[1..] {
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// The 16 nibble bytes of a block of 32 values under `scale` (each value's nearest level
/// of `value / scale`, index 8 (level 1) for a zero scale): value `j` in the low nibble of
/// byte `j`, value `16 + j` in its high nibble.
fn iq4_nibbles(x: &[f32], scale: f32) -> impl Iterator<Item = u8> {
    let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let code = |v: f32| nearest_iq4_nl_level(inverse * v) as u8;
    let codes: [u8; 32] = std::array::from_fn(|j| code(x[j]));
    (0..16).map(move |j| codes[j] | codes[j + 16] << 4)
}

/// The index of the IQ4_NL level nearest `x` (ggml's `best_index_int8`: the first or last
/// level beyond the ends, a bisection between, and the upper of two equally near levels).
pub fn nearest_iq4_nl_level(x: f32) -> usize {
    let level = |i: usize| f32::from(IQ4_NL_LEVELS[i]);
    if x <= level(0) {
        return 0;
    }
    if x >= level(15) {
        return 15;
    }
    let (mut low, mut high) = (0, 15);
    while high - low > 1 {
        let middle = (low + high) / 2;
        if x < level(middle) {
            high = middle;
        } else {
            low = middle;
        }
    }
    if x - level(high - 1) < level(high) - x {
        high - 1
    } else {
        high
    }
}

/// Appends the 32 values of IQ4_NL's 16 nibble bytes `qs` under `scale`: low nibbles are
/// values 0..16, high nibbles 16..32, each indexing [`IQ4_NL_LEVELS`].
fn iq4_levels(scale: f32, qs: &[u8], out: &mut Vec<f32>) {
    let level = |nibble: u8| scale * f32::from(IQ4_NL_LEVELS[usize::from(nibble)]);
    out.extend(qs.iter().map(|&q| level(q & 0xF)));
    out.extend(qs.iter().map(|&q| level(q >> 4)));
}

/// Dequantizes one GGUF block, appending its values to `out`.
pub fn dequantize_gguf_block(format: &QuantFormat, b: &[u8], out: &mut Vec<f32>) {
    match format {
        QuantFormat::Q8_0 => {
            let d = f16_at(b, 0);
            out.extend(b[2..34].iter().map(|&q| d * f32::from(q as i8)));
        }
        QuantFormat::Q4_0 => {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            out.extend(qs.iter().map(|&q| d * f32::from((q & 0xF) as i8 - 8)));
            out.extend(qs.iter().map(|&q| d * f32::from((q >> 4) as i8 - 8)));
        }
        QuantFormat::F16 => out.push(f16_at(b, 0)),
        QuantFormat::BF16 => out.push(bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        QuantFormat::Q4_1 => {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qs = &b[4..20];
            out.extend(qs.iter().map(|&q| d * f32::from(q & 0xF) + m));
            out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
        }
        QuantFormat::Q5_0 | QuantFormat::Q5_1 => {
            // Value `j` is nibble `j / 16` of byte `j % 16` with bit `j` of the 32 fifth
            // bits on top: q5_0 recentred by 16, q5_1 scaled and offset by its minimum.
            let q5_1 = *format == QuantFormat::Q5_1;
            let at = if q5_1 { 4 } else { 2 };
            let high = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let qs = &b[at + 4..at + 20];
            let d = f16_at(b, 0);
            out.extend((0..32).map(|j| {
                let q = ((qs[j % 16] >> (4 * (j / 16))) & 0xF) | (((high >> j) & 1) << 4) as u8;
                if q5_1 {
                    d * f32::from(q) + f16_at(b, 2)
                } else {
                    d * f32::from(q as i8 - 16)
                }
            }));
        }
        QuantFormat::Iq4Nl => iq4_levels(f16_at(b, 0), &b[2..18], out),
        QuantFormat::Iq4Xs => {
            // Sub-block `ib`'s 6-bit scale: nibble `ib % 2` of byte `4 + ib / 2`, with
            // bit pair `ib` of the 16-bit word at 2 on top.
            let d = f16_at(b, 0);
            let high = u16::from_le_bytes([b[2], b[3]]);
            for (ib, qs) in b[8..136].chunks(16).enumerate() {
                let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF;
                let ls = i32::from(low) | i32::from((high >> (2 * ib)) & 3) << 4;
                iq4_levels(d * (ls - 32) as f32, qs, out);
            }
        }
        QuantFormat::Iq3Xxs => iq3::dequantize_iq3_xxs(b, out),
        QuantFormat::Iq3S => iq3::dequantize_iq3_s(b, out),
        QuantFormat::Iq2Xxs => iq2::dequantize_iq2_xxs(b, out),
        QuantFormat::Iq2Xs => iq2::dequantize_iq2_xs(b, out),
        QuantFormat::Iq2S => iq2::dequantize_iq2_s(b, out),
        QuantFormat::Iq1S => iq1::dequantize_iq1_s(b, out),
        QuantFormat::Iq1M => iq1::dequantize_iq1_m(b, out),
        QuantFormat::Tq1_0 => ternary::dequantize_tq1_0(b, out),
        QuantFormat::Tq2_0 => ternary::dequantize_tq2_0(b, out),
        QuantFormat::Q1_0 => ternary::dequantize_q1_0(b, out),
        QuantFormat::Mxfp4 => fp4::dequantize_mxfp4(b, out),
        QuantFormat::Nvfp4 => fp4::dequantize_nvfp4(b, out),
        QuantFormat::Q4K | QuantFormat::Q5K => {
            // q5_k adds a fifth bit per value: bit `2j` (`2j + 1`) of high byte `l` for
            // value `l` of sub-block `2j` (`2j + 1`).
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = match format {
                QuantFormat::Q5K => (Some(&b[16..48]), &b[48..176]),
                _ => (None, &b[16..144]),
            };
            for j in 0..4 {
                for h in 0..2 {
                    let (sc, m) = scale_min_k4(2 * j + h, scales);
                    let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
                    let q = &qs[32 * j..32 * j + 32];
                    out.extend(q.iter().enumerate().map(|(l, &x)| {
                        let high = qh.map_or(0, |qh| ((qh[l] >> (2 * j + h)) & 1) << 4);
                        dl * f32::from(((x >> (4 * h)) & 0xF) | high) - ml
                    }));
                }
            }
        }
        QuantFormat::Q3K => {
            let (hmask, qs, scales) = (&b[0..32], &b[32..96], &b[96..108]);
            let d = f16_at(b, 108);
            for sub in 0..16 {
                let dl = d * f32::from(q3_k_scale(sub, scales) - 32);
                let (n, shift, half) = (sub / 8, 2 * ((sub % 8) / 2), sub % 2);
                for l in 16 * half..16 * half + 16 {
                    let low = (qs[32 * n + l] >> shift) & 3;
                    let high = (hmask[l] >> (4 * n + shift / 2)) & 1;
                    out.push(dl * f32::from(low as i8 - if high == 1 { 0 } else { 4 }));
                }
            }
        }
        QuantFormat::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = f16_at(b, 208);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                let mut y = [0f32; 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                    let s = |i: usize| d * f32::from(sc[i] as i8);
                    y[l] = s(is) * f32::from(q1);
                    y[l + 32] = s(is + 2) * f32::from(q2);
                    y[l + 64] = s(is + 4) * f32::from(q3);
                    y[l + 96] = s(is + 6) * f32::from(q4);
                }
                out.extend_from_slice(&y);
            }
        }
        QuantFormat::Q2K => {
            let (scales, qs) = (&b[0..16], &b[16..80]);
            let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
            let mut is = 0;
            for n in 0..2 {
                let q = &qs[32 * n..32 * n + 32];
                for shift in [0, 2, 4, 6] {
                    for half in 0..2 {
                        let sc = scales[is];
                        is += 1;
                        let (dl, ml) = (d * f32::from(sc & 0xF), dmin * f32::from(sc >> 4));
                        let q = &q[16 * half..16 * half + 16];
                        out.extend(q.iter().map(|&x| dl * f32::from((x >> shift) & 3) - ml));
                    }
                }
            }
        }
        QuantFormat::Nf4 { .. } | QuantFormat::Affine { .. } => {}
    }
}

/// The 6-bit scale and min of sub-block `j` of a q4_k block from its 12 scale bytes `q`
/// (ggml's `get_scale_min_k4`).
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 6-bit scale (stored offset by 32) of q3_k sub-block `j` from its 12 scale bytes
/// `q`: the low nibble in byte `j` (`j - 8`'s high nibble from 8 on), the top two bits in
/// byte `8 + j % 4` at bit `2 * (j / 4)`.
#[inline]
pub fn q3_k_scale(j: usize, q: &[u8]) -> i8 {
    let low = if j < 8 { q[j] & 0xF } else { q[j - 8] >> 4 };
    (low | (((q[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i8
}

/// The value of `x` of largest magnitude (the first of equal magnitudes, 0 for none) and
/// that magnitude, by ggml's strict comparison.
fn largest_magnitude(x: &[f32]) -> (f32, f32) {
    x.iter().fold((0f32, 0f32), |(max, amax), &v| {
        if v.abs() > amax {
            (v, v.abs())
        } else {
            (max, amax)
        }
    })
}

/// C's `roundf`: to nearest, ties away from zero.
fn roundf(x: f32) -> f32 {
    x.round()
}

fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut out = Vec::with_capacity(34);
    push_f16(&mut out, d);
    out.extend(x.iter().map(|&v| roundf(v * id) as i8 as u8));
    out
}

fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    let (max, _) = largest_magnitude(x);
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| ((v * id + 8.5) as i8).clamp(0, 15) as u8;
    let mut out = Vec::with_capacity(18);
    push_f16(&mut out, d);
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    out
}

fn quantize_q4_1(x: &[f32]) -> Vec<u8> {
    // ggml's comparisons (the first of equal values stays: +0 and -0 do not trade places).
    let min = x.iter().fold(f32::MAX, |m, &v| if v < m { v } else { m });
    let max = x.iter().fold(-f32::MAX, |m, &v| if v > m { v } else { m });
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q = |v: f32| (((v - min) * id + 0.5) as i8).clamp(0, 15) as u8;
    let mut out = Vec::with_capacity(20);
    push_f16(&mut out, d);
    push_f16(&mut out, min);
    out.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
    out
}

/// q5_0 (`d = max / -16` of the largest magnitude, codes recentred by 16) or, with
/// `minimum`, q5_1 (`d = (max - min) / 31` above the minimum), as ggml's
/// `quantize_row_q5_{0,1}_ref`.
fn quantize_q5(x: &[f32], minimum: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    let codes: Vec<u8> = if minimum {
        let min = x.iter().fold(f32::MAX, |m, &v| if v < m { v } else { m });
        let max = x.iter().fold(-f32::MAX, |m, &v| if v > m { v } else { m });
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        push_f16(&mut out, d);
        push_f16(&mut out, min);
        x.iter()
            .map(|&v| (((v - min) * id + 0.5) as u8).min(31))
            .collect()
    } else {
        let (max, _) = largest_magnitude(x);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        push_f16(&mut out, d);
        x.iter()
            .map(|&v| ((v * id + 16.5) as i8).clamp(0, 31) as u8)
            .collect()
    };
    let high = codes
        .iter()
        .enumerate()
        .fold(0u32, |h, (j, &c)| h | (u32::from(c >> 4) << j));
    out.extend_from_slice(&high.to_le_bytes());
    out.extend((0..16).map(|j| (codes[j] & 0xF) | ((codes[j + 16] & 0xF) << 4)));
    out
}

/// Quantizes one 256-value super-block into a K-quant format.
///
/// These follow ggml's reference quantizers (`quantize_row_q{2,3,4,5,6}_K_ref`): sub-block
/// scales and mins come from the same weighted least-squares searches (`make_qkx2_quants`
/// for q2_k, q4_k and q5_k, `make_q3_quants` for q3_k, `make_qx_quants` for q6_k), are
/// quantized against the super-block
/// scale, and the codes are recomputed with the stored scales. The shared reference vectors
/// only cover K-quant dequantization, so byte equality of these quantizers with llama.cpp is
/// not independently tested.
pub fn quantize_k(format: &QuantFormat, x: &[f32]) -> Vec<u8> {
    match format {
        QuantFormat::Q4K => quantize_q4_k_q5_k(x, false),
        QuantFormat::Q5K => quantize_q4_k_q5_k(x, true),
        QuantFormat::Q6K => quantize_q6_k(x),
        QuantFormat::Q3K => quantize_q3_k(x),
        _ => quantize_q2_k(x),
    }
}

/// ggml's `nearest_int`: round to nearest, ties to even (for |x| < 2^22).
fn nearest_int(x: f32) -> i32 {
    let bits = (x + 12_582_912.0).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `make_qkx2_quants`: a scale and min (`x ~ scale * L - min`, `L` in `0..=nmax`)
/// minimising the weighted error, searching `nstep + 1` scale candidates. Writes the codes
/// to `codes` and returns `(scale, min)`.
#[allow(
    clippy::too_many_arguments,
    reason = "mirrors the reference algorithm's parameters"
)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    codes: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let (mut sum_w, mut sum_x) = (weights[0], weights[0] * x[0]);
    // ggml's strict comparisons (the first of equal values stays: defined for signed zeros).
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        codes.iter_mut().for_each(|c| *c = 0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        codes[i] = l as u8;
        best_error += weights[i] * err(scale * l as f32 + min - x[i]);
    }
    // Sub-blocks hold at most 32 values (q4_k's; q2_k's 16).
    let mut aux = [0u8; 32];
    let aux = &mut aux[..n];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                cur_error += weights[i] * err(this_scale * f32::from(aux[i]) + this_min - x[i]);
            }
            if cur_error < best_error {
                codes.copy_from_slice(aux);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Below this magnitude a group is treated as all zeros (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `make_qx_quants` with `rmse_type = 1`: a signed scale for codes in
/// `-nmax..nmax`, stored in `codes` offset by `nmax`.
fn make_qx_quants(nmax: i32, x: &[f32], codes: &mut [u8]) -> f32 {
    let (max, amax) = largest_magnitude(x);
    if amax < GROUP_MAX_EPS {
        codes.iter_mut().for_each(|c| *c = 0);
        return 0.0;
    }
    let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        x.iter().fold((0f32, 0f32), |(lx, l2), &v| {
            let (l, w) = (quant(iscale, v) as f32, v * v);
            (lx + w * v * l, l2 + w * l * l)
        })
    };
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = sums(iscale);
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (quant(iscale, v) + nmax) as u8;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = (quant(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// The largest of `values` and zero, by ggml's strict comparisons.
fn largest(values: &[f32]) -> f32 {
    values
        .iter()
        .fold(0.0, |most, &v| if v > most { v } else { most })
}

/// q4_k, or with `five_bits` q5_k: the same search and scale packing with codes of 4 or 5
/// bits (ggml's `-1.0, 0.1, 20` and `-0.5, 0.1, 15` search parameters), q5_k's fifth bits
/// stored apart.
fn quantize_q4_k_q5_k(x: &[f32], five_bits: bool) -> Vec<u8> {
    let (nmax, rmin, nstep) = if five_bits {
        (31, -0.5, 15)
    } else {
        (15, -1.0, 20)
    };
    let mut codes = [0u8; 256];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    for j in 0..8 {
        let sub = &x[32 * j..32 * j + 32];
        let sum_x2: f32 = sub.iter().fold(0.0, |a, v| a + v * v);
        let av_x = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| av_x + sub[i].abs());
        (scales[j], mins[j]) = make_qkx2_quants(
            nmax,
            sub,
            &weights,
            &mut codes[32 * j..32 * j + 32],
            rmin,
            0.1,
            nstep,
            false,
        );
    }
    let (max_scale, max_min) = (largest(&scales), largest(&mins));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed = [0u8; 12];
    for j in 0..8 {
        let ls = nearest_int(inv_scale * scales[j]).min(63) as u8;
        let lm = nearest_int(inv_min * mins[j]).min(63) as u8;
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &packed);
        let dl = d.to_f32() * f32::from(sc);
        if dl == 0.0 {
            continue;
        }
        let ml = dmin.to_f32() * f32::from(m);
        for i in 0..32 {
            codes[32 * j + i] = nearest_int((x[32 * j + i] + ml) / dl).clamp(0, nmax) as u8;
        }
    }
    let mut out = Vec::with_capacity(176);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(&packed);
    if five_bits {
        out.extend(
            (0..32).map(|l| (0..8).fold(0u8, |qh, sub| qh | ((codes[32 * sub + l] >> 4) << sub))),
        );
    }
    for j in 0..4 {
        for l in 0..32 {
            out.push((codes[64 * j + l] & 0xF) | ((codes[64 * j + 32 + l] & 0xF) << 4));
        }
    }
    out
}

/// ggml's `make_q3_quants` with `do_rmse`: a signed scale for codes in `-nmax..nmax`
/// (stored offset by `nmax`), refined code by code for up to five rounds while the
/// weighted (`x²`) fit improves.
fn make_q3_quants(nmax: i32, x: &[f32], codes: &mut [u8]) -> f32 {
    let (max, amax) = largest_magnitude(x);
    if amax < GROUP_MAX_EPS {
        codes.iter_mut().for_each(|c| *c = 0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut l = [0i32; 16];
    let l = &mut l[..x.len()];
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (li, &v) in l.iter_mut().zip(x) {
        *li = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        let w = v * v;
        sumlx += w * v * *li as f32;
        suml2 += w * *li as f32 * *li as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (li, &v) in l.iter_mut().zip(x) {
            let w = v * v;
            let mut slx = sumlx - w * v * *li as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * *li as f32 * *li as f32;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != *li {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *li = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for (c, &li) in codes.iter_mut().zip(l.iter()) {
        *c = (li + nmax) as u8;
    }
    sumlx / suml2
}

fn quantize_q3_k(x: &[f32]) -> Vec<u8> {
    let mut codes = [0u8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut amax) = (0f32, 0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut codes[16 * j..16 * j + 16]);
        if scales[j].abs() > amax {
            amax = scales[j].abs();
            max_scale = scales[j];
        }
    }
    let mut packed = [0u8; 12];
    let d = if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            let l = (nearest_int(iscale * scales[j]).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                packed[j] = l & 0xF;
            } else {
                packed[j - 8] |= (l & 0xF) << 4;
            }
            packed[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
        }
        f16::from_f32(1.0 / iscale)
    } else {
        f16::from_f32(0.0)
    };
    for j in 0..16 {
        let dl = d.to_f32() * f32::from(q3_k_scale(j, &packed) - 32);
        if dl == 0.0 {
            continue;
        }
        for i in 0..16 {
            codes[16 * j + i] = (nearest_int(x[16 * j + i] / dl).clamp(-4, 3) + 4) as u8;
        }
    }
    // Codes 4..8 set their value's high bit (value `v` at bit `v / 32` of byte `v % 32`);
    // the low two bits go four values to a byte as q2_k's do.
    let mut out = vec![0u8; 110];
    for (v, &c) in codes.iter().enumerate() {
        if c > 3 {
            out[v % 32] |= 1 << (v / 32);
        }
        let (n, l, shift) = (v / 128, v % 32, 2 * ((v % 128) / 32));
        out[32 + 32 * n + l] |= (c & 3) << shift;
    }
    out[96..108].copy_from_slice(&packed);
    out[108..110].copy_from_slice(&d.to_le_bytes());
    out
}

fn quantize_q6_k(x: &[f32]) -> Vec<u8> {
    let mut codes = [0u8; 256];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for j in 0..16 {
        scales[j] = make_qx_quants(32, &x[16 * j..16 * j + 16], &mut codes[16 * j..16 * j + 16]);
        if scales[j].abs() > max_abs_scale {
            max_abs_scale = scales[j].abs();
            max_scale = scales[j];
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        return vec![0u8; 210];
    }
    let iscale = -128.0 / max_scale;
    let d = f16::from_f32(1.0 / iscale);
    let mut sc = [0i8; 16];
    for j in 0..16 {
        sc[j] = nearest_int(iscale * scales[j]).min(127) as i8;
        let dl = d.to_f32() * f32::from(sc[j]);
        if dl == 0.0 {
            continue;
        }
        for i in 0..16 {
            let l = nearest_int(x[16 * j + i] / dl).clamp(-32, 31);
            codes[16 * j + i] = (l + 32) as u8;
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for n in 0..2 {
        let (c, ql, qh) = (&codes[128 * n..], &mut ql[64 * n..], &mut qh[32 * n..]);
        for l in 0..32 {
            let (q1, q2, q3, q4) = (c[l], c[l + 32], c[l + 64], c[l + 96]);
            ql[l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            ql[l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    let mut out = Vec::with_capacity(210);
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend_from_slice(&d.to_le_bytes());
    out
}

fn quantize_q2_k(x: &[f32]) -> Vec<u8> {
    let mut codes = [0u8; 256];
    let (mut scales, mut mins) = ([0f32; 16], [0f32; 16]);
    for j in 0..16 {
        let sub = &x[16 * j..16 * j + 16];
        let weights: [f32; 16] = std::array::from_fn(|i| sub[i].abs());
        (scales[j], mins[j]) = make_qkx2_quants(
            3,
            sub,
            &weights,
            &mut codes[16 * j..16 * j + 16],
            -0.5,
            0.1,
            15,
            true,
        );
    }
    let (max_scale, max_min) = (largest(&scales), largest(&mins));
    let mut packed = [0u8; 16];
    let d = if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for j in 0..16 {
            packed[j] = nearest_int(iscale * scales[j]) as u8;
        }
        f16::from_f32(max_scale / 15.0)
    } else {
        f16::from_f32(0.0)
    };
    let dmin = if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for j in 0..16 {
            packed[j] |= (nearest_int(iscale * mins[j]) as u8) << 4;
        }
        f16::from_f32(max_min / 15.0)
    } else {
        f16::from_f32(0.0)
    };
    for j in 0..16 {
        let dl = d.to_f32() * f32::from(packed[j] & 0xF);
        if dl == 0.0 {
            continue;
        }
        let ml = dmin.to_f32() * f32::from(packed[j] >> 4);
        for i in 0..16 {
            codes[16 * j + i] = nearest_int((x[16 * j + i] + ml) / dl).clamp(0, 3) as u8;
        }
    }
    let mut qs = [0u8; 64];
    for n in 0..2 {
        let c = &codes[128 * n..];
        for l in 0..32 {
            qs[32 * n + l] = c[l] | (c[l + 32] << 2) | (c[l + 64] << 4) | (c[l + 96] << 6);
        }
    }
    let mut out = Vec::with_capacity(84);
    out.extend_from_slice(&packed);
    out.extend_from_slice(&qs);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out
}

fn nearest_nf4(x: f32) -> u8 {
    let mut best = 0;
    for (i, level) in NF4_LEVELS.iter().enumerate() {
        if (x - level).abs() < (x - NF4_LEVELS[best]).abs() {
            best = i;
        }
    }
    best as u8
}

fn pack_codes(codes: &[u8], bits: usize) -> Vec<u8> {
    let per_byte = 8 / bits;
    let mask = ((1u16 << bits) - 1) as u8;
    codes
        .chunks(per_byte)
        .map(|chunk| {
            chunk
                .iter()
                .enumerate()
                .fold(0u8, |b, (i, &c)| b | ((c & mask) << (i * bits)))
        })
        .collect()
}

fn code_at(bytes: &[u8], index: usize, bits: usize) -> u8 {
    let per_byte = 8 / bits;
    let mask = ((1u16 << bits) - 1) as u8;
    (bytes[index / per_byte] >> ((index % per_byte) * bits)) & mask
}

fn quantize_nf4(block: usize, scale: DType, values: &[f32]) -> Vec<u8> {
    let mut codes = Vec::with_capacity(values.len());
    let mut scales = Vec::new();
    for chunk in values.chunks(block) {
        let absmax = round_scale(scale, chunk.iter().fold(0f32, |m, v| m.max(v.abs())));
        scales.push(absmax);
        codes.extend(chunk.iter().map(|&v| {
            if absmax == 0.0 {
                7
            } else {
                nearest_nf4(v / absmax)
            }
        }));
    }
    let mut out = pack_codes(&codes, 4);
    for s in scales {
        push_scale(&mut out, scale, s);
    }
    out
}

/// The group index of every element for groups of `group` along `axis`, and the group count.
fn affine_groups(shape: &[usize], axis: usize, group: usize) -> (Vec<usize>, usize) {
    let n: usize = shape.iter().product();
    let index = (0..n)
        .map(|i| affine_group(shape, axis, group, i))
        .collect();
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    (index, outer * (shape[axis] / group) * inner)
}

/// The group of element `i` (row-major) for groups of `group` along `axis`.
fn affine_group(shape: &[usize], axis: usize, group: usize, i: usize) -> usize {
    let inner: usize = shape[axis + 1..].iter().product();
    let dim = shape[axis];
    let (o, a, within) = (i / (dim * inner), i / inner % dim, i % inner);
    (o * (dim / group) + a / group) * inner + within
}

fn quantize_affine(
    bits: u8,
    group: usize,
    symmetric: bool,
    axis: usize,
    scale: DType,
    shape: &[usize],
    values: &[f32],
) -> Vec<u8> {
    let (index, count) = affine_groups(shape, axis, group);
    let (mut lo, mut hi) = (vec![f32::INFINITY; count], vec![f32::NEG_INFINITY; count]);
    // Strict comparisons: the first of equal values (+0, -0) stays, as for q4_1.
    for (&g, &v) in index.iter().zip(values) {
        if v < lo[g] {
            lo[g] = v;
        }
        if v > hi[g] {
            hi[g] = v;
        }
    }
    let levels = (1u32 << bits) as f32;
    let qmax = (1i32 << (bits - 1)) - 1;
    let mut scales = vec![0f32; count];
    let mut zeros = vec![0u8; count];
    for g in 0..count {
        if symmetric {
            scales[g] = round_scale(scale, lo[g].abs().max(hi[g].abs()) / qmax as f32);
        } else {
            // The range includes 0 (a +0, whatever the signs of zeros in the group).
            let min = if lo[g] < 0.0 { lo[g] } else { 0.0 };
            let max = if hi[g] > 0.0 { hi[g] } else { 0.0 };
            scales[g] = round_scale(scale, (max - min) / (levels - 1.0));
            zeros[g] = if scales[g] == 0.0 {
                0
            } else {
                roundf(-min / scales[g]).clamp(0.0, levels - 1.0) as u8
            };
        }
    }
    let codes: Vec<u8> = index
        .iter()
        .zip(values)
        .map(|(&g, &v)| {
            let s = scales[g];
            let q = if s == 0.0 { 0.0 } else { roundf(v / s) };
            if symmetric {
                q.clamp(-qmax as f32, qmax as f32) as i32 as u8
            } else {
                (q + f32::from(zeros[g])).clamp(0.0, levels - 1.0) as u8
            }
        })
        .collect();
    let mut out = pack_codes(&codes, bits as usize);
    for s in &scales {
        push_scale(&mut out, scale, *s);
    }
    if !symmetric {
        out.extend_from_slice(&zeros);
    }
    out
}

/// Element `i` (row-major) of a tensor of `shape` in a whole-matrix format (nf4, affine):
/// its code, its group's scale and (asymmetric affine) zero point.
fn whole_value(format: &QuantFormat, shape: &[usize], bytes: &[u8], i: usize) -> f32 {
    let n: usize = shape.iter().product();
    match *format {
        QuantFormat::Nf4 { block_size, scale } => {
            let at = n.div_ceil(2) + (i / block_size as usize) * scale_bytes(scale);
            NF4_LEVELS[code_at(bytes, i, 4) as usize] * read_scale(bytes, at, scale)
        }
        QuantFormat::Affine {
            bits,
            group_size,
            symmetric,
            axis,
            scale,
        } => {
            let count = n / group_size as usize;
            let scales_at = (n * bits as usize).div_ceil(8);
            let zeros_at = scales_at + count * scale_bytes(scale);
            let g = affine_group(shape, axis as usize, group_size as usize, i);
            let s = read_scale(bytes, scales_at + g * scale_bytes(scale), scale);
            let code = code_at(bytes, i, bits as usize);
            let q = if symmetric {
                // Sign-extend the N-bit code.
                if bits < 8 && code & (1u8 << (bits - 1)) != 0 {
                    i32::from(code) - (1 << bits)
                } else {
                    i32::from(code as i8)
                }
            } else {
                i32::from(code) - i32::from(bytes[zeros_at + g])
            };
            q as f32 * s
        }
        _ => unreachable!("{format} is a block format"),
    }
}
