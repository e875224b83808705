//! GGUF's 3-bit lattice formats, IQ3_XXS and IQ3_S: dequantization exactly as ggml's
//! (`dequantize_row_iq3_xxs`, `dequantize_row_iq3_s`) and a quantizer of this project's
//! own.
//!
//! Both store super-blocks of 256 values as an f16 scale `d` and eight sub-blocks of 32
//! with a 4-bit scale each; a sub-block is eight groups of four values, and a group's index
//! picks four magnitudes from the format's grid ([`IQ3XXS_GRID`], [`IQ3S_GRID`]), each
//! value taking a sign of its own:
//!
//! - `iq3_xxs` (98 bytes, 3.06 bits a value): `d`, 64 grid indices (eight per sub-block),
//!   then per sub-block a 32-bit word holding four 7-bit sign codes (for its four runs of
//!   eight values; the eighth sign makes the count of minus signs even, ggml's
//!   `ksigns_iq2xs`) under its scale `ls` in the top four bits: value `d * (ls + 0.5) / 2 *
//!   magnitude * sign`.
//! - `iq3_s` (110 bytes, 3.44 bits a value): `d`, the low 8 bits of 64 grid indices,
//!   8 bytes of their ninth bits (bit `g % 8` of byte `g / 8` for group `g`), 32 bytes of
//!   signs (one bit a value, value `v` at bit `v % 8` of byte `v / 8`), then the sub-block
//!   scales as nibbles (sub-block `s` in nibble `s % 2` of byte `s / 2`): value
//!   `d * (1 + 2 ls) * magnitude * sign`.
//!
//! The quantizer is [`super::lattice`]'s (a run is a sub-block of 32). On near-Gaussian
//! values (`tests/quant.rs`) iq3_s's error is q3_k's and iq3_xxs's between q3_k's and
//! q2_k's.

use super::lattice::{EVEN_SIGNS, Format, group_values, nibble_pairs, quantize_super_block};
use super::quant::f16_at;
use crate::types::{IQ3S_GRID, IQ3XXS_GRID};

/// Bytes of an IQ3_XXS super-block.
pub const IQ3_XXS_BYTES: usize = 98;
/// Bytes of an IQ3_S super-block.
pub const IQ3_S_BYTES: usize = 110;

/// Where an IQ3_XXS super-block's per-sub-block words (four 7-bit sign codes under a
/// 4-bit scale) start, after `d` and the 64 grid indices.
pub const IQ3_XXS_WORDS_AT: usize = 66;
/// Where an IQ3_S super-block's ninth index bits start, after `d` and the 64 low bytes.
pub const IQ3_S_HIGH_AT: usize = 66;
/// Where an IQ3_S super-block's sign bits start.
pub const IQ3_S_SIGNS_AT: usize = 74;
/// Where an IQ3_S super-block's 4-bit sub-block scales start.
pub const IQ3_S_SCALES_AT: usize = 106;

/// Appends the 256 values of the IQ3_XXS super-block `b`.
pub fn dequantize_iq3_xxs(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    for sub in 0..8 {
        let at = IQ3_XXS_WORDS_AT + 4 * sub;
        let word = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let scale = Format::Iq3Xxs.scale(d, (word >> 28) as u8);
        for group in 0..8 {
            let signs = EVEN_SIGNS[(word >> (7 * (group / 2)) & 0x7F) as usize];
            let signs = signs >> (4 * (group % 2));
            let entry = u64::from(IQ3XXS_GRID[usize::from(b[2 + 8 * sub + group])]);
            out.extend(group_values::<4>(entry, scale, signs));
        }
    }
}

/// Appends the 256 values of the IQ3_S super-block `b`.
pub fn dequantize_iq3_s(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    for sub in 0..8 {
        let ls = (b[IQ3_S_SCALES_AT + sub / 2] >> (4 * (sub % 2))) & 0xF;
        let scale = Format::Iq3S.scale(d, ls);
        for group in 0..8 {
            let g = 8 * sub + group;
            let high = usize::from(b[IQ3_S_HIGH_AT + g / 8] >> (g % 8) & 1);
            let index = usize::from(b[2 + g]) | high << 8;
            let signs = b[IQ3_S_SIGNS_AT + g / 2] >> (4 * (g % 2));
            out.extend(group_values::<4>(u64::from(IQ3S_GRID[index]), scale, signs));
        }
    }
}

/// Quantizes a super-block of 256 values to IQ3_XXS (see the module doc).
pub fn quantize_iq3_xxs(x: &[f32]) -> Vec<u8> {
    let (d, subs) = quantize_super_block(Format::Iq3Xxs, x);
    let mut out = Vec::with_capacity(IQ3_XXS_BYTES);
    out.extend(d.to_le_bytes());
    for (_, e) in &subs {
        out.extend(e.indices.iter().map(|&i| i as u8));
    }
    for (ls, e) in &subs {
        let mut word = u32::from(*ls) << 28;
        for (run, &signs) in e.signs.iter().enumerate() {
            word |= u32::from(signs & 0x7F) << (7 * run);
        }
        out.extend(word.to_le_bytes());
    }
    out
}

/// Quantizes a super-block of 256 values to IQ3_S (see the module doc).
pub fn quantize_iq3_s(x: &[f32]) -> Vec<u8> {
    let (d, subs) = quantize_super_block(Format::Iq3S, x);
    let mut out = Vec::with_capacity(IQ3_S_BYTES);
    out.extend(d.to_le_bytes());
    let indices = || subs.iter().flat_map(|(_, e)| e.indices);
    out.extend(indices().map(|i| i as u8));
    let mut high = [0u8; 8];
    for (g, i) in indices().enumerate() {
        high[g / 8] |= ((i >> 8) as u8) << (g % 8);
    }
    out.extend(high);
    out.extend(subs.iter().flat_map(|(_, e)| e.signs));
    out.extend(nibble_pairs(&subs));
    out
}
