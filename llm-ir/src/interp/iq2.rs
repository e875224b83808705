//! GGUF's 2-bit lattice formats, IQ2_XXS, IQ2_XS and IQ2_S: dequantization exactly as
//! ggml's (`dequantize_row_iq2_xxs`, `dequantize_row_iq2_xs`, `dequantize_row_iq2_s`) and
//! a quantizer of this project's own.
//!
//! All three store super-blocks of 256 values as an f16 scale `d` and 32 groups of eight
//! values whose magnitudes (8, 25 or 43) are one entry of the format's grid
//! ([`IQ2XXS_GRID`], [`IQ2XS_GRID`], [`IQ2S_GRID`]), each value with a sign; a 4-bit
//! multiplier `ls` scales a run of values by `d * (ls + 0.5) / 4`:
//!
//! - `iq2_xxs` (66 bytes, 2.06 bits a value): `d`, then per sub-block of 32 four grid
//!   indices (a byte each) and a 32-bit word holding four 7-bit sign codes (one per group;
//!   the eighth sign makes the count of minus signs even, [`EVEN_SIGNS`]) under the
//!   sub-block's `ls` in the top four bits.
//! - `iq2_xs` (74 bytes, 2.31 bits a value): `d`, 32 16-bit words (a group's 9-bit index
//!   under its 7-bit sign code), then a 4-bit `ls` for every 16 values (byte `s` holds
//!   sub-block `s`'s two, the first in the low nibble).
//! - `iq2_s` (82 bytes, 2.56 bits a value): `d`, the low bytes of 32 10-bit indices, 32
//!   sign bytes (one bit a value), a byte of high index bit pairs per sub-block (group
//!   `l`'s in bits `2l` and `2l + 1`), then the scales as iq2_xs's.
//!
//! The quantizer is [`super::lattice`]'s (a run is a sub-block of 32 for iq2_xxs, 16
//! values for iq2_xs and iq2_s). llama.cpp refuses to make these formats without an
//! importance matrix; this quantizer, without one, is what `--quantize iq2_*` uses. On
//! near-Gaussian values (`tests/quant.rs`) their errors lie beyond q2_k's, the smaller the
//! format the further.

use super::lattice::{EVEN_SIGNS, Format, group_values, nibble_pairs, quantize_super_block};
use super::quant::f16_at;
use crate::types::{IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID};

/// Bytes of an IQ2_XXS super-block.
pub const IQ2_XXS_BYTES: usize = 66;
/// Bytes of an IQ2_XS super-block.
pub const IQ2_XS_BYTES: usize = 74;
/// Bytes of an IQ2_S super-block.
pub const IQ2_S_BYTES: usize = 82;

/// Where an IQ2_XXS super-block's first sub-block word (four 7-bit sign codes under a 4-bit
/// scale) starts, after `d` and the sub-block's four index bytes; sub-block `s`'s is at
/// `IQ2_XXS_WORDS_AT + 8 s`.
pub const IQ2_XXS_WORDS_AT: usize = 6;
/// Where an IQ2_XS super-block's 4-bit scales start, after `d` and the 32 index words.
pub const IQ2_XS_SCALES_AT: usize = 66;
/// Where an IQ2_S super-block's sign bytes start, after `d` and the 32 low index bytes.
pub const IQ2_S_SIGNS_AT: usize = 34;
/// Where an IQ2_S super-block's high index bit pairs start.
pub const IQ2_S_HIGH_AT: usize = 66;
/// Where an IQ2_S super-block's 4-bit scales start.
pub const IQ2_S_SCALES_AT: usize = 74;

/// The 4-bit multipliers of the two runs of 16 of sub-block `sub`, from the scale bytes
/// at `at` (iq2_xs, iq2_s).
fn half_multipliers(b: &[u8], at: usize, sub: usize) -> [u8; 2] {
    [b[at + sub] & 0xF, b[at + sub] >> 4]
}

/// Appends the 256 values of the IQ2_XXS super-block `b`.
pub fn dequantize_iq2_xxs(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    for sub in 0..8 {
        let at = IQ2_XXS_WORDS_AT + 8 * sub;
        let word = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let scale = Format::Iq2Xxs.scale(d, (word >> 28) as u8);
        for group in 0..4 {
            let signs = EVEN_SIGNS[(word >> (7 * group) & 0x7F) as usize];
            let entry = IQ2XXS_GRID[usize::from(b[2 + 8 * sub + group])];
            out.extend(group_values::<8>(entry, scale, signs));
        }
    }
}

/// Appends the 256 values of the IQ2_XS super-block `b`.
pub fn dequantize_iq2_xs(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    for sub in 0..8 {
        let ls = half_multipliers(b, IQ2_XS_SCALES_AT, sub);
        for group in 0..4 {
            let at = 2 + 2 * (4 * sub + group);
            let word = usize::from(u16::from_le_bytes([b[at], b[at + 1]]));
            let scale = Format::Iq2Xs.scale(d, ls[group / 2]);
            let signs = EVEN_SIGNS[word >> 9];
            out.extend(group_values::<8>(IQ2XS_GRID[word & 511], scale, signs));
        }
    }
}

/// Appends the 256 values of the IQ2_S super-block `b`.
pub fn dequantize_iq2_s(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    for sub in 0..8 {
        let ls = half_multipliers(b, IQ2_S_SCALES_AT, sub);
        let high = usize::from(b[IQ2_S_HIGH_AT + sub]);
        for group in 0..4 {
            let g = 4 * sub + group;
            let index = usize::from(b[2 + g]) | (high >> (2 * group) & 3) << 8;
            let scale = Format::Iq2S.scale(d, ls[group / 2]);
            let signs = b[IQ2_S_SIGNS_AT + g];
            out.extend(group_values::<8>(IQ2S_GRID[index], scale, signs));
        }
    }
}

/// Quantizes a super-block of 256 values to IQ2_XXS (see the module doc).
pub fn quantize_iq2_xxs(x: &[f32]) -> Vec<u8> {
    let (d, subs) = quantize_super_block(Format::Iq2Xxs, x);
    let mut out = Vec::with_capacity(IQ2_XXS_BYTES);
    out.extend(d.to_le_bytes());
    for (ls, e) in &subs {
        out.extend(e.indices[..4].iter().map(|&i| i as u8));
        let mut word = u32::from(*ls) << 28;
        for (group, &signs) in e.signs.iter().enumerate() {
            word |= u32::from(signs & 0x7F) << (7 * group);
        }
        out.extend(word.to_le_bytes());
    }
    out
}

/// Quantizes a super-block of 256 values to IQ2_XS (see the module doc).
pub fn quantize_iq2_xs(x: &[f32]) -> Vec<u8> {
    let (d, runs) = quantize_super_block(Format::Iq2Xs, x);
    let mut out = Vec::with_capacity(IQ2_XS_BYTES);
    out.extend(d.to_le_bytes());
    for (_, e) in &runs {
        for group in 0..2 {
            let word = e.indices[group] as u16 | u16::from(e.signs[group] & 0x7F) << 9;
            out.extend(word.to_le_bytes());
        }
    }
    out.extend(nibble_pairs(&runs));
    out
}

/// Quantizes a super-block of 256 values to IQ2_S (see the module doc).
pub fn quantize_iq2_s(x: &[f32]) -> Vec<u8> {
    let (d, runs) = quantize_super_block(Format::Iq2S, x);
    let mut out = Vec::with_capacity(IQ2_S_BYTES);
    out.extend(d.to_le_bytes());
    let groups = || {
        runs.iter()
            .flat_map(|(_, e)| e.indices[..2].iter().zip(&e.signs[..2]))
    };
    out.extend(groups().map(|(&i, _)| i as u8));
    out.extend(groups().map(|(_, &s)| s));
    let mut high = [0u8; 8];
    for (g, (&i, _)) in groups().enumerate() {
        high[g / 4] |= ((i >> 8) as u8) << (2 * (g % 4));
    }
    out.extend(high);
    out.extend(nibble_pairs(&runs));
    out
}
