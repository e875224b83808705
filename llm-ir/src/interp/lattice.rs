//! The quantizer GGUF's lattice formats share: IQ3_XXS and IQ3_S ([`super::iq3`]),
//! IQ2_XXS, IQ2_XS and IQ2_S ([`super::iq2`]), IQ1_S and IQ1_M ([`super::iq1`]).
//!
//! Each stores super-blocks of 256 values as an f16 scale `d`, a 4-bit (IQ1: 3-bit)
//! multiplier `ls` for every run of 32 (IQ3, IQ2_XXS, IQ1_S) or 16 values (IQ2_XS, IQ2_S,
//! IQ1_M), and groups of four (IQ3) or eight (IQ2, IQ1) values whose magnitudes are one
//! entry of the format's grid, each value with a sign: one stored bit (IQ3_S, IQ2_S), or
//! seven of every eight stored and the eighth making the count of minus signs even
//! ([`EVEN_SIGNS`]). IQ1's grid entries are signed themselves (-1, 0 or 1), with no sign
//! bits, and shifted by [`IQ1_DELTA`] up or down: a shift for each run (IQ1_S) or each
//! group (IQ1_M), tried both ways.
//!
//! ggml's own quantizers search grid neighbourhoods under importance weights, and
//! llama.cpp's files are made that way; any bytes decode, so this one is simpler. Each
//! run's scale is the best of 16 candidates (the largest magnitude onto the grid's largest
//! level and below; for IQ1 onto its shifted largest level and above) by the squared error
//! of the values encoded under it, a group encoded for this search by rounding each
//! magnitude to the nearest level and taking the grid entry nearest that lattice point
//! (`Lattice`, computed once per format); the winner is refitted by least squares to the
//! grid entries nearest the values among those of the lattice point's neighbourhood (the
//! entries within one level of it in every coordinate, and for the groups of eight in at
//! most three coordinates for IQ2, two for IQ1 (three changed its errors barely, at 1.7
//! times the time): a neighbourhood, as ggml searches one). Where the count of minus
//! signs must be even, the smallest value of a run of eight with an odd count flips its
//! sign (that value then wants the smallest magnitude:
//! a group's entry is the nearest to its values along their stored signs). Then `d` is the
//! largest run scale over the largest multiplier's factor, rounded to f16; each run takes
//! the multiplier nearest its scale or a neighbour of it, whichever encodes it with the
//! least error, and each group the nearest entry of its neighbourhood under that scale.
//! Values that are not finite take no part in the scale search or the errors (they are
//! stored as whatever entry their group's rounding gives them); nothing panics on them.

use std::sync::OnceLock;

use half::f16;

use crate::types::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID};

/// The shift of IQ1's groups: a group's values are `scale * (entry + delta)`, `delta` this
/// or its negation (ggml's `IQ1S_DELTA`, `IQ1M_DELTA`).
pub const IQ1_DELTA: f32 = 0.125;

/// The sign byte of each 7-bit sign code (IQ3_XXS, IQ2_XXS, IQ2_XS): the code, with bit 7
/// set where the code has an odd count of ones (ggml's `ksigns_iq2xs`); bit `j` set means
/// value `j` of the run of eight is negative.
pub static EVEN_SIGNS: [u8; 128] = {
    let mut table = [0u8; 128];
    let mut code = 0;
    while code < 128 {
        table[code] = code as u8 | (((code.count_ones() & 1) as u8) << 7);
        code += 1;
    }
    table
};

/// The values of a group: the magnitudes of a grid entry (byte `j` of `entry` is value
/// `j`'s) scaled by `scale`, value `j` negative where bit `j` of `signs` is set.
pub(super) fn group_values<const W: usize>(entry: u64, scale: f32, signs: u8) -> [f32; W] {
    let m = entry.to_le_bytes();
    let mut values = [0.0; W];
    for (j, v) in values.iter_mut().enumerate() {
        let sign = if signs >> j & 1 == 1 { -1.0 } else { 1.0 };
        *v = scale * f32::from(m[j]) * sign;
    }
    values
}

/// The values of an IQ1 group: the signed values of a grid entry (byte `j` of `entry` is
/// value `j`'s, an `i8`) shifted by `delta` and scaled by `scale`, as ggml computes them.
pub(super) fn shifted_group_values(entry: u64, scale: f32, delta: f32) -> [f32; 8] {
    entry
        .to_le_bytes()
        .map(|q| scale * (f32::from(q as i8) + delta))
}

/// A lattice format, as the quantizer sees it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Format {
    Iq3Xxs,
    Iq3S,
    Iq2Xxs,
    Iq2Xs,
    Iq2S,
    Iq1S,
    Iq1M,
}

/// How a lattice format stores its values' signs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Signs {
    /// A bit a value.
    Each,
    /// Seven bits of every eight values, the eighth making the count of minus signs even.
    EvenCount,
    /// None: the grid's entries are signed.
    InTheGrid,
}

/// Where an IQ1 format's shift ([`IQ1_DELTA`]) applies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shift {
    /// One for each run.
    PerRun,
    /// One for each group.
    PerGroup,
}

impl Format {
    /// Values in a group (one grid entry).
    fn width(self) -> usize {
        match self {
            Format::Iq3Xxs | Format::Iq3S => 4,
            Format::Iq2Xxs | Format::Iq2Xs | Format::Iq2S | Format::Iq1S | Format::Iq1M => 8,
        }
    }

    /// Values under one multiplier.
    fn run_len(self) -> usize {
        match self {
            Format::Iq3Xxs | Format::Iq3S | Format::Iq2Xxs | Format::Iq1S => 32,
            Format::Iq2Xs | Format::Iq2S | Format::Iq1M => 16,
        }
    }

    /// How the format stores its values' signs.
    fn signs(self) -> Signs {
        match self {
            Format::Iq3S | Format::Iq2S => Signs::Each,
            Format::Iq3Xxs | Format::Iq2Xxs | Format::Iq2Xs => Signs::EvenCount,
            Format::Iq1S | Format::Iq1M => Signs::InTheGrid,
        }
    }

    /// Where the format's shift applies; `None` for the formats without one.
    fn shift(self) -> Option<Shift> {
        match self {
            Format::Iq1S => Some(Shift::PerRun),
            Format::Iq1M => Some(Shift::PerGroup),
            Format::Iq3Xxs | Format::Iq3S | Format::Iq2Xxs | Format::Iq2Xs | Format::Iq2S => None,
        }
    }

    /// The shift a group's stored shift bit (`negative`) stands for (0 for the formats
    /// without one).
    pub(super) fn delta(self, negative: bool) -> f32 {
        match (self.shift(), negative) {
            (None, _) => 0.0,
            (Some(_), false) => IQ1_DELTA,
            (Some(_), true) => -IQ1_DELTA,
        }
    }

    /// The grid's entries (byte `j` of an entry is magnitude `j`, or for IQ1 value `j` as
    /// an `i8`).
    fn entries(self) -> Vec<u64> {
        match self {
            Format::Iq3Xxs => IQ3XXS_GRID.iter().map(|&e| u64::from(e)).collect(),
            Format::Iq3S => IQ3S_GRID.iter().map(|&e| u64::from(e)).collect(),
            Format::Iq2Xxs => IQ2XXS_GRID.to_vec(),
            Format::Iq2Xs => IQ2XS_GRID.to_vec(),
            Format::Iq2S => IQ2S_GRID.to_vec(),
            Format::Iq1S | Format::Iq1M => IQ1S_GRID.to_vec(),
        }
    }

    /// The values a grid value takes (magnitudes; IQ1's signed values), ascending.
    fn levels(self) -> &'static [f32] {
        match self {
            Format::Iq3Xxs => &[4.0, 12.0, 20.0, 28.0, 36.0, 44.0, 52.0, 62.0],
            Format::Iq3S => &[1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0],
            Format::Iq2Xxs | Format::Iq2Xs | Format::Iq2S => &[8.0, 25.0, 43.0],
            Format::Iq1S | Format::Iq1M => &[-1.0, 0.0, 1.0],
        }
    }

    /// Coordinates in which a neighbour of a lattice point may differ from it.
    fn reach(self) -> usize {
        match self {
            Format::Iq3Xxs | Format::Iq3S => 4,
            Format::Iq2Xxs | Format::Iq2Xs | Format::Iq2S => 3,
            Format::Iq1S | Format::Iq1M => 2,
        }
    }

    /// The largest multiplier (4-bit, IQ1's 3-bit).
    fn largest_multiplier(self) -> u8 {
        match self {
            Format::Iq1S | Format::Iq1M => 7,
            Format::Iq3Xxs | Format::Iq3S | Format::Iq2Xxs | Format::Iq2Xs | Format::Iq2S => 15,
        }
    }

    /// Where scale candidate `c` of the search ([`run_scale`]) puts a run's largest
    /// magnitude, in units of the scale: the grid's largest level, then levels 2.5% apart
    /// below it; for IQ1, whose largest level is 1 (shifted by [`IQ1_DELTA`]), the shifted
    /// level and levels 8% apart above it (its three levels want the largest values cut).
    fn candidate_level(self, c: usize) -> f32 {
        let levels = self.levels();
        let top = levels[levels.len() - 1];
        match self {
            Format::Iq1S | Format::Iq1M => (top + IQ1_DELTA) * (1.0 + 0.08 * c as f32),
            Format::Iq3Xxs | Format::Iq3S | Format::Iq2Xxs | Format::Iq2Xs | Format::Iq2S => {
                top * (1.0 - 0.025 * c as f32)
            }
        }
    }

    /// A run's scale under multiplier `ls` of `d`, as ggml computes it in `f32`.
    pub(super) fn scale(self, d: f32, ls: u8) -> f32 {
        match self {
            Format::Iq3Xxs => d * (0.5 + f32::from(ls)) * 0.5,
            Format::Iq3S | Format::Iq1S | Format::Iq1M => d * f32::from(1 + 2 * ls),
            Format::Iq2Xxs | Format::Iq2Xs | Format::Iq2S => d * (0.5 + f32::from(ls)) * 0.25,
        }
    }

    /// The multiplier of `d` nearest the run scale `scale`.
    fn multiplier(self, d: f32, scale: f32) -> u8 {
        if d == 0.0 {
            return 0;
        }
        let l = match self {
            Format::Iq3Xxs => 2.0 * scale / d - 0.5,
            Format::Iq3S | Format::Iq1S | Format::Iq1M => (scale / d - 1.0) / 2.0,
            Format::Iq2Xxs | Format::Iq2Xs | Format::Iq2S => 4.0 * scale / d - 0.5,
        };
        l.round().clamp(0.0, f32::from(self.largest_multiplier())) as u8
    }

    fn lattice(self) -> &'static Lattice {
        static LATTICES: [OnceLock<Lattice>; 7] = [const { OnceLock::new() }; 7];
        LATTICES[self as usize].get_or_init(|| Lattice::new(self))
    }
}

/// For every point of the lattice of level indices (8⁴ points for IQ3, 3⁸ for IQ2, IQ1), the
/// grid entry nearest it (by the squared distance of the magnitudes; the first of equals)
/// and its neighbourhood: the entries within one level of it in every coordinate and in
/// at most [`Format::reach`] coordinates, and the nearest.
struct Lattice {
    /// Each entry's magnitudes (IQ1's signed values; `width` of the eight used).
    magnitudes: Vec<[f32; 8]>,
    nearest: Vec<u16>,
    neighbours: Vec<Vec<u16>>,
    /// The midpoints between consecutive levels.
    midpoints: Vec<f32>,
    width: usize,
}

impl Lattice {
    fn new(format: Format) -> Lattice {
        let levels = format.levels();
        let width = format.width();
        let magnitudes: Vec<[f32; 8]> = format
            .entries()
            .into_iter()
            .map(|e| e.to_le_bytes().map(|q| f32::from(q as i8)))
            .collect();
        let indices: Vec<Vec<usize>> = magnitudes
            .iter()
            .map(|m| {
                m[..width]
                    .iter()
                    .map(|&v| levels.iter().position(|&l| l == v).unwrap_or(0))
                    .collect()
            })
            .collect();
        let points = levels.len().pow(width as u32);
        let mut lattice = Lattice {
            magnitudes,
            nearest: Vec::with_capacity(points),
            neighbours: Vec::with_capacity(points),
            midpoints: levels.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect(),
            width,
        };
        let all = 0..lattice.magnitudes.len();
        for point in 0..points {
            let p: Vec<usize> = (0..width)
                .map(|j| point / levels.len().pow(j as u32) % levels.len())
                .collect();
            let mut m = [0.0; 8];
            for (m, &k) in m.iter_mut().zip(&p) {
                *m = levels[k];
            }
            let best = lattice.nearest_entry(&m, all.clone());
            let mut near: Vec<u16> = all
                .clone()
                .filter(|&i| {
                    let differing = (0..width).filter(|&j| indices[i][j] != p[j]).count();
                    let within = (0..width).all(|j| indices[i][j].abs_diff(p[j]) <= 1);
                    within && differing <= format.reach()
                })
                .map(|i| i as u16)
                .collect();
            if !near.contains(&(best as u16)) {
                near.push(best as u16);
                near.sort_unstable();
            }
            lattice.nearest.push(best as u16);
            lattice.neighbours.push(near);
        }
        lattice
    }

    /// The lattice point of magnitudes `m` (in units of the scale): each rounded to its
    /// nearest level (the lower of two as near), the count of midpoints between levels
    /// below it.
    fn point(&self, m: &[f32; 8]) -> usize {
        let base = self.midpoints.len() + 1;
        let mut point = 0;
        for &v in m[..self.width].iter().rev() {
            let k = self.midpoints.iter().filter(|&&mid| v > mid).count();
            point = point * base + k;
        }
        point
    }

    /// The grid index for magnitudes `m`: their lattice point's nearest entry.
    fn encode(&self, m: &[f32; 8]) -> usize {
        usize::from(self.nearest[self.point(m)])
    }

    /// The grid index for magnitudes `m`: the entry of their lattice point's
    /// neighbourhood nearest `m` itself.
    fn refine(&self, m: &[f32; 8]) -> usize {
        let near = &self.neighbours[self.point(m)];
        self.nearest_entry(m, near.iter().map(|&i| usize::from(i)))
    }

    /// Of the entries `candidates` (ascending), the one nearest the magnitudes `m` (the
    /// first of equals).
    fn nearest_entry(&self, m: &[f32; 8], candidates: impl Iterator<Item = usize>) -> usize {
        let mut best = (f32::INFINITY, 0);
        for i in candidates {
            let g = &self.magnitudes[i];
            let d: f32 = (0..self.width).map(|j| (g[j] - m[j]) * (g[j] - m[j])).sum();
            if d < best.0 {
                best = (d, i);
            }
        }
        best.1
    }
}

/// A run of values encoded under one scale.
pub(super) struct Encoded {
    /// The grid index of each group (the first `run_len / width`).
    pub(super) indices: [usize; 8],
    /// The sign bits of each eight values (bit `j` for value `j`; the first `run_len / 8`;
    /// none for IQ1).
    pub(super) signs: [u8; 4],
    /// IQ1's shift bits: bit `g` set where group `g`'s shift is `-IQ1_DELTA`.
    pub(super) shifts: u8,
    /// The squared error of the values it decodes to.
    error: f32,
}

impl Encoded {
    /// The sign bits of group `group` (of `width` values) in their low bits.
    fn group_signs(&self, group: usize, width: usize) -> u8 {
        let first = group * width;
        self.signs[first / 8] >> (first % 8)
    }

    /// Whether group `group`'s shift is negative (IQ1).
    pub(super) fn negative_shift(&self, group: usize) -> bool {
        self.shifts >> group & 1 == 1
    }
}

/// Encodes the run `x` under `scale`: each group's entry is the one [`Lattice::refine`]
/// picks where `exact`, else the one [`Lattice::encode`] picks; IQ1_S's run takes the
/// shift whose encoding has the least error, IQ1_M's groups each theirs.
fn encode_run(format: Format, x: &[f32], scale: f32, exact: bool) -> Encoded {
    match format.shift() {
        Some(Shift::PerRun) => {
            let up = encode_shifted_run(format, x, scale, exact, &[false]);
            let down = encode_shifted_run(format, x, scale, exact, &[true]);
            if down.error < up.error { down } else { up }
        }
        Some(Shift::PerGroup) => encode_shifted_run(format, x, scale, exact, &[false, true]),
        None => encode_shifted_run(format, x, scale, exact, &[false]),
    }
}

/// [`encode_run`] with each group's shift the best of `shifts` (negative where `true`;
/// `[false]` for the formats without one).
fn encode_shifted_run(
    format: Format,
    x: &[f32],
    scale: f32,
    exact: bool,
    shifts: &[bool],
) -> Encoded {
    let width = format.width();
    let mut encoded = Encoded {
        indices: [0; 8],
        signs: [0; 4],
        shifts: 0,
        error: 0.0,
    };
    if format.signs() != Signs::InTheGrid {
        for (eight, values) in x.chunks(8).enumerate() {
            let signs = &mut encoded.signs[eight];
            for (j, &v) in values.iter().enumerate() {
                if v < 0.0 {
                    *signs |= 1 << j;
                }
            }
            // Seven signs stored, the eighth making the count of minus signs even: where
            // it is odd, the smallest value's sign flips.
            if format.signs() == Signs::EvenCount && signs.count_ones() % 2 == 1 {
                let smallest = (0..8)
                    .min_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()))
                    .unwrap_or(0);
                *signs ^= 1 << smallest;
            }
        }
    }
    for (group, values) in x.chunks(width).enumerate() {
        let signs = encoded.group_signs(group, width);
        let mut best: Option<(f32, usize, bool)> = None;
        for &negative in shifts {
            let delta = format.delta(negative);
            let (index, error) = encode_group(format, values, (scale, delta), signs, exact);
            if best.is_none_or(|(least, _, _)| error < least) {
                best = Some((error, index, negative));
            }
        }
        let (error, index, negative) = best.expect("a shift");
        encoded.indices[group] = index;
        encoded.shifts |= u8::from(negative) << group;
        encoded.error += error;
    }
    encoded
}

/// The grid index of the group `values` (sign bits `signs`) under `scale` and shift
/// `delta`, and the squared error of the values it decodes to: the entry
/// [`Lattice::refine`] picks where `exact`, else the one [`Lattice::encode`] picks.
fn encode_group(
    format: Format,
    values: &[f32],
    (scale, delta): (f32, f32),
    signs: u8,
    exact: bool,
) -> (usize, f32) {
    let lattice = format.lattice();
    let inverse = if scale != 0.0 { 1.0 / scale } else { 0.0 };
    // Each value's magnitude in units of the scale, along its stored sign, less the
    // shift: a value whose sign flipped wants the smallest magnitude, as a negative
    // target (as does one that is not finite, so that it leaves its group's other values
    // their entry).
    let mut m = [0.0; 8];
    for (j, (m, &v)) in m.iter_mut().zip(values).enumerate() {
        let sign = if signs >> j & 1 == 1 { -1.0 } else { 1.0 };
        let target = v * sign * inverse - delta;
        *m = if target.is_finite() { target } else { 0.0 };
    }
    let index = if exact {
        lattice.refine(&m)
    } else {
        lattice.encode(&m)
    };
    // Values that are not finite take no part in the error.
    let entry = &lattice.magnitudes[index];
    let mut error = 0.0;
    for (j, &v) in values.iter().enumerate() {
        if v.is_finite() {
            let sign = if signs >> j & 1 == 1 { -1.0 } else { 1.0 };
            let e = v - scale * (entry[j] + delta) * sign;
            error += e * e;
        }
    }
    (index, error)
}

/// Scale candidates per run.
const CANDIDATES: usize = 16;

/// The scale of the run `x`: the best of [`CANDIDATES`] (the largest finite magnitude onto
/// each [`Format::candidate_level`]) by the squared error of their lattice encodings, then
/// refitted by least squares to the grid entries nearest the values under it, where that
/// lowers the error.
fn run_scale(format: Format, x: &[f32]) -> f32 {
    let amax = x
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return 0.0;
    }
    let (_, scale) = (0..CANDIDATES)
        .map(|c| amax / format.candidate_level(c))
        .map(|scale| (encode_run(format, x, scale, false).error, scale))
        .fold(
            (f32::INFINITY, 0.0),
            |best, c| if c.0 < best.0 { c } else { best },
        );
    let encoded = encode_run(format, x, scale, true);
    let lattice = format.lattice();
    let width = format.width();
    let (mut sum_xq, mut sum_q2) = (0f32, 0f32);
    for (group, values) in x.chunks(width).enumerate() {
        let signs = encoded.group_signs(group, width);
        let entry = &lattice.magnitudes[encoded.indices[group]];
        let delta = format.delta(encoded.negative_shift(group));
        for (j, v) in values.iter().enumerate() {
            let q = if signs >> j & 1 == 1 {
                -(entry[j] + delta)
            } else {
                entry[j] + delta
            };
            sum_xq += v * q;
            sum_q2 += q * q;
        }
    }
    let refitted = sum_xq / sum_q2;
    if refitted > 0.0 && encode_run(format, x, refitted, true).error < encoded.error {
        refitted
    } else {
        scale
    }
}

/// The runs' 4-bit multipliers two to a byte, the first in the low nibble (IQ3_S's,
/// IQ2_XS's and IQ2_S's scale bytes).
pub(super) fn nibble_pairs(runs: &[(u8, Encoded)]) -> Vec<u8> {
    runs.chunks(2)
        .map(|pair| pair[0].0 | pair[1].0 << 4)
        .collect()
}

/// The super-block scale `d` (rounded to f16) of the 256 values `x`, and each run's
/// multiplier (4-bit; IQ1's 3-bit) and encoding under it.
pub(super) fn quantize_super_block(format: Format, x: &[f32]) -> (f16, Vec<(u8, Encoded)>) {
    let runs = || x.chunks(format.run_len());
    let scales: Vec<f32> = runs().map(|run| run_scale(format, run)).collect();
    let largest = scales.iter().fold(0f32, |m, &s| m.max(s));
    let largest_multiplier = format.largest_multiplier();
    let d = f16::from_f32(largest / format.scale(1.0, largest_multiplier));
    let encoded = runs()
        .zip(&scales)
        .map(|(values, &scale)| {
            // The nearest multiplier and its neighbours: the one whose encoding has the
            // least error (the first of equals).
            let nearest = format.multiplier(d.to_f32(), scale);
            let mut best: Option<(u8, Encoded)> = None;
            for ls in nearest.saturating_sub(1)..=(nearest + 1).min(largest_multiplier) {
                let e = encode_run(format, values, format.scale(d.to_f32(), ls), true);
                if best.as_ref().is_none_or(|(_, b)| e.error < b.error) {
                    best = Some((ls, e));
                }
            }
            best.expect("a multiplier")
        })
        .collect();
    (d, encoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMATS: [Format; 7] = [
        Format::Iq3Xxs,
        Format::Iq3S,
        Format::Iq2Xxs,
        Format::Iq2Xs,
        Format::Iq2S,
        Format::Iq1S,
        Format::Iq1M,
    ];

    #[test]
    fn sign_bytes_have_even_counts_of_minus_signs() {
        for code in 0..128u8 {
            let signs = EVEN_SIGNS[usize::from(code)];
            assert_eq!(signs & 0x7F, code);
            assert_eq!(signs.count_ones() % 2, 0, "{code}");
        }
    }

    #[test]
    fn lattice_points_on_the_grid_encode_as_themselves() {
        for format in FORMATS {
            let levels = format.levels();
            let lattice = format.lattice();
            for (i, m) in lattice.magnitudes.iter().enumerate() {
                assert_eq!(lattice.encode(m), i, "{format:?}");
                assert_eq!(lattice.refine(m), i, "{format:?}");
                for v in &m[..format.width()] {
                    assert!(levels.contains(v), "{v} is a level of {format:?}");
                }
            }
        }
    }
}
