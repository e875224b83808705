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
//! The quantizer: ggml's own (`quantize_row_iq3_xxs_impl`, `quantize_row_iq3_s_impl`)
//! search grid neighbourhoods under importance weights, and llama.cpp's files are made
//! that way; any bytes decode, so this one is simpler. Each sub-block's scale is the best
//! of 16 candidates (the largest magnitude onto the grid's largest level and below) by
//! the squared error of the values encoded under it, a group encoded for this search by
//! rounding each magnitude to the nearest level and taking the grid entry nearest that
//! lattice point (`Lattice`, computed once per format); the winner is refitted by least
//! squares to the grid entries nearest the values among the entries within one level of
//! their lattice point in every coordinate (a neighbourhood, as ggml searches one).
//! IQ3_XXS's even count of minus signs flips the sign of the smallest value of a run of
//! eight where the count is odd (that value then wants the smallest magnitude: a group's
//! entry is the nearest to its values along their stored signs). Then `d` is the largest
//! sub-block scale over the largest 4-bit multiplier, rounded to f16; each sub-block takes
//! the multiplier nearest its scale or a neighbour of it, whichever encodes it with the
//! least error, and each group the nearest entry of its neighbourhood under that scale.
//! Values that are not finite take no part in the scale search or the errors (they are
//! stored as whatever entry their group's rounding gives them); nothing panics on them. On near-Gaussian values
//! (`tests/quant.rs`) iq3_s's error is q3_k's and iq3_xxs's between q3_k's and q2_k's.

use std::sync::OnceLock;

use half::f16;

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

/// The sign byte of each 7-bit sign code of IQ3_XXS (and IQ2): the code, with bit 7 set
/// where the code has an odd count of ones (ggml's `ksigns_iq2xs`); bit `j` set means
/// value `j` of the run of eight is negative.
pub static IQ3_XXS_SIGNS: [u8; 128] = {
    let mut table = [0u8; 128];
    let mut code = 0;
    while code < 128 {
        table[code] = code as u8 | (((code.count_ones() & 1) as u8) << 7);
        code += 1;
    }
    table
};

/// The sign byte of the 7-bit sign code in the low bits of `word` ([`IQ3_XXS_SIGNS`]).
fn signs_of(word: u32) -> u8 {
    IQ3_XXS_SIGNS[(word & 0x7F) as usize]
}

/// The four magnitudes of grid entry `entry` (byte `j` is magnitude `j`).
fn magnitudes(entry: u32) -> [f32; 4] {
    entry.to_le_bytes().map(f32::from)
}

/// The four values of a group: grid entry `entry` scaled by `scale`, value `j` negative
/// where bit `j` of `signs` is set.
fn group_values(entry: u32, scale: f32, signs: u8) -> [f32; 4] {
    let m = magnitudes(entry);
    std::array::from_fn(|j| {
        let sign = if signs >> j & 1 == 1 { -1.0 } else { 1.0 };
        scale * m[j] * sign
    })
}

/// Appends the 256 values of the IQ3_XXS super-block `b`.
pub fn dequantize_iq3_xxs(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    for sub in 0..8 {
        let at = IQ3_XXS_WORDS_AT + 4 * sub;
        let word = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let scale = Iq3::Xxs.scale(d, (word >> 28) as u8);
        for group in 0..8 {
            let signs = signs_of(word >> (7 * (group / 2)));
            let signs = signs >> (4 * (group % 2));
            let index = usize::from(b[2 + 8 * sub + group]);
            out.extend(group_values(IQ3XXS_GRID[index], scale, signs));
        }
    }
}

/// Appends the 256 values of the IQ3_S super-block `b`.
pub fn dequantize_iq3_s(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    for sub in 0..8 {
        let ls = (b[IQ3_S_SCALES_AT + sub / 2] >> (4 * (sub % 2))) & 0xF;
        let scale = Iq3::S.scale(d, ls);
        for group in 0..8 {
            let g = 8 * sub + group;
            let high = usize::from(b[IQ3_S_HIGH_AT + g / 8] >> (g % 8) & 1);
            let index = usize::from(b[2 + g]) | high << 8;
            let signs = b[IQ3_S_SIGNS_AT + g / 2] >> (4 * (g % 2));
            out.extend(group_values(IQ3S_GRID[index], scale, signs));
        }
    }
}

/// One of the two formats, as the quantizer sees it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Iq3 {
    Xxs,
    S,
}

impl Iq3 {
    fn grid(self) -> &'static [u32] {
        match self {
            Iq3::Xxs => &IQ3XXS_GRID,
            Iq3::S => &IQ3S_GRID,
        }
    }

    /// The eight magnitudes a grid value takes, ascending.
    fn levels(self) -> [f32; 8] {
        match self {
            Iq3::Xxs => [4.0, 12.0, 20.0, 28.0, 36.0, 44.0, 52.0, 62.0],
            Iq3::S => [1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0],
        }
    }

    /// A sub-block's scale under 4-bit multiplier `ls` of `d`, as ggml computes it in `f32`.
    fn scale(self, d: f32, ls: u8) -> f32 {
        match self {
            Iq3::Xxs => d * (0.5 + f32::from(ls)) * 0.5,
            Iq3::S => d * f32::from(1 + 2 * ls),
        }
    }

    /// The 4-bit multiplier of `d` nearest the sub-block scale `scale`.
    fn multiplier(self, d: f32, scale: f32) -> u8 {
        if d == 0.0 {
            return 0;
        }
        let l = match self {
            Iq3::Xxs => 2.0 * scale / d - 0.5,
            Iq3::S => (scale / d - 1.0) / 2.0,
        };
        l.round().clamp(0.0, 15.0) as u8
    }

    fn lattice(self) -> &'static Lattice {
        static XXS: OnceLock<Lattice> = OnceLock::new();
        static S: OnceLock<Lattice> = OnceLock::new();
        match self {
            Iq3::Xxs => XXS.get_or_init(|| Lattice::new(self)),
            Iq3::S => S.get_or_init(|| Lattice::new(self)),
        }
    }
}

/// For every point of the 8⁴ lattice of level indices, the grid entry nearest it (by the
/// squared distance of the magnitudes; the first of equals) and its neighbourhood: the
/// entries within one level of it in every coordinate, and the nearest.
struct Lattice {
    nearest: Vec<u16>,
    neighbours: Vec<Vec<u16>>,
    /// The midpoints between consecutive levels.
    midpoints: [f32; 7],
}

impl Lattice {
    fn new(format: Iq3) -> Lattice {
        let levels = format.levels();
        let grid = format.grid();
        let level_indices = |entry: u32| {
            magnitudes(entry).map(|m| levels.iter().position(|&l| l == m).unwrap_or(0))
        };
        let indices: Vec<[usize; 4]> = grid.iter().map(|&e| level_indices(e)).collect();
        let mut nearest = Vec::with_capacity(4096);
        let mut neighbours = Vec::with_capacity(4096);
        for point in 0..4096usize {
            let p: [usize; 4] = std::array::from_fn(|j| point >> (3 * j) & 7);
            let m = p.map(|k| levels[k]);
            let best = nearest_entry(grid, m, 0..grid.len());
            let mut near: Vec<u16> = (0..grid.len())
                .filter(|&i| (0..4).all(|j| indices[i][j].abs_diff(p[j]) <= 1))
                .map(|i| i as u16)
                .collect();
            if !near.contains(&(best as u16)) {
                near.push(best as u16);
                near.sort_unstable();
            }
            nearest.push(best as u16);
            neighbours.push(near);
        }
        Lattice {
            nearest,
            neighbours,
            midpoints: std::array::from_fn(|i| (levels[i] + levels[i + 1]) / 2.0),
        }
    }

    /// The lattice point of magnitudes `m` (in units of the scale): each rounded to its
    /// nearest level (the lower of two as near), the count of midpoints between levels
    /// below it.
    fn point(&self, m: [f32; 4]) -> usize {
        let mut point = 0;
        for (j, &v) in m.iter().enumerate() {
            let k = self.midpoints.iter().filter(|&&mid| v > mid).count();
            point |= k << (3 * j);
        }
        point
    }

    /// The grid index for magnitudes `m`: their lattice point's nearest entry.
    fn encode(&self, m: [f32; 4]) -> usize {
        usize::from(self.nearest[self.point(m)])
    }

    /// The grid index for magnitudes `m`: the entry of their lattice point's
    /// neighbourhood nearest `m` itself.
    fn refine(&self, grid: &[u32], m: [f32; 4]) -> usize {
        let near = &self.neighbours[self.point(m)];
        nearest_entry(grid, m, near.iter().map(|&i| usize::from(i)))
    }
}

/// A sub-block of 32 values encoded under one scale.
struct Encoded {
    /// The grid index of each group of four.
    indices: [usize; 8],
    /// The sign bits of each run of eight (bit `j` for value `j`).
    signs: [u8; 4],
    /// The squared error of the values it decodes to.
    error: f32,
}

/// Encodes the 32 values `x` under `scale`: each group's entry is the one
/// [`Lattice::refine`] picks where `exact`, else the one [`Lattice::encode`] picks.
fn encode_sub_block(format: Iq3, x: &[f32], scale: f32, exact: bool) -> Encoded {
    let lattice = format.lattice();
    let grid = format.grid();
    let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    let mut signs = [0u8; 4];
    for (run, values) in x.chunks(8).enumerate() {
        for (j, &v) in values.iter().enumerate() {
            if v < 0.0 {
                signs[run] |= 1 << j;
            }
        }
        // IQ3_XXS stores seven signs; the eighth makes the count of minus signs even:
        // where it is odd, the smallest value's sign flips.
        if format == Iq3::Xxs && signs[run].count_ones() % 2 == 1 {
            let smallest = (0..8)
                .min_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()))
                .unwrap_or(0);
            signs[run] ^= 1 << smallest;
        }
    }
    let mut indices = [0; 8];
    let mut error = 0.0;
    for (group, values) in x.chunks(4).enumerate() {
        let group_signs = signs[group / 2] >> (4 * (group % 2));
        // Each value's magnitude in units of the scale, along its stored sign: a value
        // whose sign flipped wants the smallest magnitude, as a negative target (as does
        // one that is not finite, so that it leaves its group's other values their entry).
        let m: [f32; 4] = std::array::from_fn(|j| {
            let sign = if group_signs >> j & 1 == 1 { -1.0 } else { 1.0 };
            let target = values[j] * sign * inverse;
            if target.is_finite() { target } else { 0.0 }
        });
        let index = if exact {
            lattice.refine(grid, m)
        } else {
            lattice.encode(m)
        };
        indices[group] = index;
        // Values that are not finite take no part in the error.
        let decoded = group_values(grid[index], scale, group_signs);
        error += values
            .iter()
            .zip(&decoded)
            .filter(|(a, _)| a.is_finite())
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>();
    }
    Encoded {
        indices,
        signs,
        error,
    }
}

/// Of the grid entries `candidates` (ascending), the one nearest the magnitudes `m` (the
/// first of equals).
fn nearest_entry(grid: &[u32], m: [f32; 4], candidates: impl Iterator<Item = usize>) -> usize {
    let distance = |entry: u32| -> f32 {
        magnitudes(entry)
            .iter()
            .zip(&m)
            .map(|(g, v)| (g - v) * (g - v))
            .sum()
    };
    let mut best = (f32::INFINITY, 0);
    for i in candidates {
        let d = distance(grid[i]);
        if d < best.0 {
            best = (d, i);
        }
    }
    best.1
}

/// Scale candidates per sub-block.
const CANDIDATES: usize = 16;
/// The relative step between candidates' levels for the largest magnitude.
const STEP: f32 = 0.025;

/// The scale of the 32 values `x`: the best of [`CANDIDATES`] (the largest finite
/// magnitude onto the grid's largest level, then onto levels [`STEP`] apart below it) by
/// the squared error of their lattice encodings, then refitted by least squares to the
/// grid entries nearest the values under it, where that lowers the error.
fn sub_block_scale(format: Iq3, x: &[f32]) -> f32 {
    let amax = x
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return 0.0;
    }
    let top = format.levels()[7];
    let (_, scale) = (0..CANDIDATES)
        .map(|c| amax / (top * (1.0 - STEP * c as f32)))
        .map(|scale| (encode_sub_block(format, x, scale, false).error, scale))
        .fold(
            (f32::INFINITY, 0.0),
            |best, c| if c.0 < best.0 { c } else { best },
        );
    let encoded = encode_sub_block(format, x, scale, true);
    let grid = format.grid();
    let (mut sum_xq, mut sum_q2) = (0f32, 0f32);
    for (group, values) in x.chunks(4).enumerate() {
        let signs = encoded.signs[group / 2] >> (4 * (group % 2));
        let q = group_values(grid[encoded.indices[group]], 1.0, signs);
        for (v, q) in values.iter().zip(q) {
            sum_xq += v * q;
            sum_q2 += q * q;
        }
    }
    let refitted = sum_xq / sum_q2;
    if refitted > 0.0 && encode_sub_block(format, x, refitted, true).error < encoded.error {
        refitted
    } else {
        scale
    }
}

/// The super-block scale `d` (rounded to f16) and each sub-block's 4-bit multiplier and
/// encoding under it.
fn quantize_super_block(format: Iq3, x: &[f32]) -> (f16, Vec<(u8, Encoded)>) {
    let scales: Vec<f32> = x.chunks(32).map(|s| sub_block_scale(format, s)).collect();
    let largest = scales.iter().fold(0f32, |m, &s| m.max(s));
    let d = f16::from_f32(match format {
        Iq3::Xxs => largest / 7.75,
        Iq3::S => largest / 31.0,
    });
    let subs = x
        .chunks(32)
        .zip(&scales)
        .map(|(values, &scale)| {
            // The nearest multiplier and its neighbours: the one whose encoding has the
            // least error (the first of equals).
            let nearest = format.multiplier(d.to_f32(), scale);
            let mut best: Option<(u8, Encoded)> = None;
            for ls in nearest.saturating_sub(1)..=(nearest + 1).min(15) {
                let e = encode_sub_block(format, values, format.scale(d.to_f32(), ls), true);
                if best.as_ref().is_none_or(|(_, b)| e.error < b.error) {
                    best = Some((ls, e));
                }
            }
            best.expect("a multiplier")
        })
        .collect();
    (d, subs)
}

/// Quantizes a super-block of 256 values to IQ3_XXS (see the module doc).
pub fn quantize_iq3_xxs(x: &[f32]) -> Vec<u8> {
    let (d, subs) = quantize_super_block(Iq3::Xxs, x);
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
    let (d, subs) = quantize_super_block(Iq3::S, x);
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
    for pair in subs.chunks(2) {
        out.push(pair[0].0 | pair[1].0 << 4);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_bytes_have_even_counts_of_minus_signs() {
        for code in 0..128u8 {
            let signs = IQ3_XXS_SIGNS[usize::from(code)];
            assert_eq!(signs & 0x7F, code);
            assert_eq!(signs.count_ones() % 2, 0, "{code}");
        }
    }

    #[test]
    fn lattice_points_on_the_grid_encode_as_themselves() {
        for format in [Iq3::Xxs, Iq3::S] {
            let levels = format.levels();
            for (i, &entry) in format.grid().iter().enumerate() {
                assert_eq!(format.lattice().encode(magnitudes(entry)), i);
                for m in magnitudes(entry) {
                    assert!(levels.contains(&m), "{m} is a level");
                }
            }
        }
    }
}
