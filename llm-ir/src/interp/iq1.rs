//! GGUF's 1-bit lattice formats, IQ1_S and IQ1_M: dequantization exactly as ggml's
//! (`dequantize_row_iq1_s`, `dequantize_row_iq1_m`) and a quantizer of this project's own.
//!
//! Both store super-blocks of 256 values as 32 groups of eight, each group one entry of a
//! 2048-entry grid of signed values -1, 0 and 1 ([`IQ1S_GRID`], indexed by 11 bits),
//! shifted by `delta` ([`IQ1_DELTA`](super::lattice::IQ1_DELTA) or its negation) and
//! scaled by `d * (2 ls + 1)` of an f16 `d` and a 3-bit multiplier `ls`:
//!
//! - `iq1_s` (50 bytes, 1.56 bits a value): `d`, the low bytes of the 32 indices, then per
//!   sub-block of 32 a 16-bit word: group `l`'s three high index bits at bit `3 l`, `ls`
//!   at bit 12, and the sub-block's shift sign at bit 15 (set: negative).
//! - `iq1_m` (56 bytes, 1.75 bits a value): the low bytes of the indices, a nibble a group
//!   (group `g`'s at nibble `g % 2` of byte `32 + g / 2`: three high index bits and its
//!   shift sign at bit 3), then four 16-bit words of 3-bit multipliers (one per 16
//!   values, run `r`'s at bit `3 (r % 4)` of word `r / 4`) whose top nibbles hold `d`'s
//!   16 bits (word `k`'s nibble is bits `4 k` of `d`).
//!
//! The quantizer is [`super::lattice`]'s (a run is a sub-block of 32 for iq1_s, 16 values
//! for iq1_m), the shift tried both ways for each run (iq1_s) or group (iq1_m).
//! llama.cpp refuses to make these formats without an importance matrix; this quantizer,
//! without one, is what `--quantize iq1_*` uses.

use super::lattice::{Format, quantize_super_block, shifted_group_values};
use super::quant::f16_at;
use crate::types::IQ1S_GRID;

/// Bytes of an IQ1_S super-block.
pub const IQ1_S_BYTES: usize = 50;
/// Bytes of an IQ1_M super-block.
pub const IQ1_M_BYTES: usize = 56;
/// Where an IQ1_S super-block's sub-block words (high index bits, multiplier and shift
/// sign) start, after `d` and the 32 low index bytes; sub-block `s`'s is at
/// `IQ1_S_WORDS_AT + 2 s`.
pub const IQ1_S_WORDS_AT: usize = 34;
/// Where an IQ1_M super-block's nibbles of high index bits and shift signs start, after
/// the 32 low index bytes.
pub const IQ1_M_HIGH_AT: usize = 32;
/// Where an IQ1_M super-block's four 16-bit words of multipliers (and `d`) start.
pub const IQ1_M_SCALES_AT: usize = 48;

/// The 16-bit word at byte `at` of `b`.
fn word_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// The f16 `d` of the IQ1_M super-block `b`, from its scale words' top nibbles.
pub fn iq1_m_d(b: &[u8]) -> f32 {
    let bits = (0..4).fold(0u16, |d, k| {
        d | (word_at(b, IQ1_M_SCALES_AT + 2 * k) >> 12) << (4 * k)
    });
    half::f16::from_bits(bits).to_f32()
}

/// Stores `d` in the IQ1_M super-block `b`: nibble `k` of its bits into the top nibble of
/// scale word `k` (the rest of the words kept).
pub fn set_iq1_m_d(b: &mut [u8], d: half::f16) {
    let bits = d.to_bits();
    for k in 0..4 {
        let at = IQ1_M_SCALES_AT + 2 * k + 1;
        b[at] = b[at] & 0x0F | ((bits >> (4 * k)) as u8 & 0xF) << 4;
    }
}

/// Appends the 256 values of the IQ1_S super-block `b`.
pub fn dequantize_iq1_s(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    for sub in 0..8 {
        let word = word_at(b, IQ1_S_WORDS_AT + 2 * sub);
        let scale = Format::Iq1S.scale(d, (word >> 12 & 7) as u8);
        let delta = Format::Iq1S.delta(word >> 15 == 1);
        for group in 0..4 {
            let high = usize::from(word >> (3 * group) & 7);
            let index = usize::from(b[2 + 4 * sub + group]) | high << 8;
            out.extend(shifted_group_values(IQ1S_GRID[index], scale, delta));
        }
    }
}

/// Appends the 256 values of the IQ1_M super-block `b`.
pub fn dequantize_iq1_m(b: &[u8], out: &mut Vec<f32>) {
    let d = iq1_m_d(b);
    for group in 0..32 {
        let run = group / 2;
        let ls = word_at(b, IQ1_M_SCALES_AT + 2 * (run / 4)) >> (3 * (run % 4)) & 7;
        let scale = Format::Iq1M.scale(d, ls as u8);
        let nibble = usize::from(b[IQ1_M_HIGH_AT + group / 2] >> (4 * (group % 2)) & 0xF);
        let index = usize::from(b[group]) | (nibble & 7) << 8;
        out.extend(shifted_group_values(
            IQ1S_GRID[index],
            scale,
            Format::Iq1M.delta(nibble >> 3 == 1),
        ));
    }
}

/// Quantizes a super-block of 256 values to IQ1_S (see the module doc).
pub fn quantize_iq1_s(x: &[f32]) -> Vec<u8> {
    let (d, subs) = quantize_super_block(Format::Iq1S, x);
    let mut out = Vec::with_capacity(IQ1_S_BYTES);
    out.extend(d.to_le_bytes());
    for (_, e) in &subs {
        out.extend(e.indices[..4].iter().map(|&i| i as u8));
    }
    for (ls, e) in &subs {
        let mut word = u16::from(*ls) << 12 | u16::from(e.negative_shift(0)) << 15;
        for (group, &index) in e.indices[..4].iter().enumerate() {
            word |= ((index >> 8) as u16) << (3 * group);
        }
        out.extend(word.to_le_bytes());
    }
    out
}

/// Quantizes a super-block of 256 values to IQ1_M (see the module doc).
pub fn quantize_iq1_m(x: &[f32]) -> Vec<u8> {
    let (d, runs) = quantize_super_block(Format::Iq1M, x);
    let mut out = Vec::with_capacity(IQ1_M_BYTES);
    for (_, e) in &runs {
        out.extend(e.indices[..2].iter().map(|&i| i as u8));
    }
    for (_, e) in &runs {
        let nibble = |g: usize| (e.indices[g] >> 8) as u8 | u8::from(e.negative_shift(g)) << 3;
        out.push(nibble(0) | nibble(1) << 4);
    }
    for four in runs.chunks(4) {
        let mut word = 0u16;
        for (r, (ls, _)) in four.iter().enumerate() {
            word |= u16::from(*ls) << (3 * r);
        }
        out.extend(word.to_le_bytes());
    }
    set_iq1_m_d(&mut out, d);
    out
}
