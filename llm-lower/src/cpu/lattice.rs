//! In-register decoding of GGUF's lattice formats, iq3_xxs, iq3_s, iq2_xxs, iq2_xs, iq2_s,
//! iq1_s and iq1_m, for the generated contraction and dequantization kernels (the layouts:
//! `llm_ir::interp::iq3`, `llm_ir::interp::iq2` and `llm_ir::interp::iq1`).
//!
//! A run of 32 values (16 for iq2_xs, iq2_s and iq1_m, whose scales cover 16) takes `d`
//! times its scale's factor, and its codes are grid magnitudes with signs: each group is a
//! grid entry loaded from the grid the kernel imports as data ([`GRIDS`]; the JIT resolves
//! the symbol to the table in `llm_ir::types`), four 32-bit entries (IQ3's groups of four)
//! or two 64-bit ones (IQ2's and IQ1's groups of eight) make an `i8x16`, and the sixteen
//! values' sign bits become a lane mask (`(q ^ mask) - mask` negates where set) before the
//! bytes widen to `f32x4` lanes. IQ1's entries are signed (-1, 0, 1) and shifted by ±1/8
//! a group: its codes are the integers `8 q ± 1` under an eighth of the run's scale, the
//! same products (scaling by a power of two is exact).

use cranelift_codegen::ir::{GlobalValue, InstBuilder, Value, types};
use cranelift_frontend::FunctionBuilder;
use llm_ir::{
    interp::{
        iq1::{IQ1_M_HIGH_AT, IQ1_M_SCALES_AT, IQ1_S_WORDS_AT},
        iq2::{IQ2_S_HIGH_AT, IQ2_S_SCALES_AT, IQ2_S_SIGNS_AT, IQ2_XS_SCALES_AT, IQ2_XXS_WORDS_AT},
        iq3::{IQ3_S_HIGH_AT, IQ3_S_SCALES_AT, IQ3_S_SIGNS_AT, IQ3_XXS_WORDS_AT},
    },
    types::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID},
};

use super::dequant::{Run, Sink, bit_lanes, bytes_to_f32, f16_to_f32, little, load_f16};
use super::emit::mem;
use crate::kernel::WeightFormat;

/// Each lattice format's grid, as the data symbol generated code imports it under (iq1_s
/// and iq1_m share one).
pub const GRIDS: [(WeightFormat, &str); 7] = [
    (WeightFormat::Iq3Xxs, "llmc_iq3xxs_grid"),
    (WeightFormat::Iq3S, "llmc_iq3s_grid"),
    (WeightFormat::Iq2Xxs, "llmc_iq2xxs_grid"),
    (WeightFormat::Iq2Xs, "llmc_iq2xs_grid"),
    (WeightFormat::Iq2S, "llmc_iq2s_grid"),
    (WeightFormat::Iq1S, "llmc_iq1s_grid"),
    (WeightFormat::Iq1M, "llmc_iq1s_grid"),
];

/// The address of `format`'s grid (what [`GRIDS`]' symbol resolves to), for each format
/// of [`GRIDS`].
pub fn grid_address(format: WeightFormat) -> *const u8 {
    match format {
        WeightFormat::Iq3Xxs => IQ3XXS_GRID.as_ptr().cast(),
        WeightFormat::Iq3S => IQ3S_GRID.as_ptr().cast(),
        WeightFormat::Iq2Xxs => IQ2XXS_GRID.as_ptr().cast(),
        WeightFormat::Iq2Xs => IQ2XS_GRID.as_ptr().cast(),
        WeightFormat::Iq2S => IQ2S_GRID.as_ptr().cast(),
        WeightFormat::Iq1S | WeightFormat::Iq1M => IQ1S_GRID.as_ptr().cast(),
        other => unreachable!("{other:?} has no grid"),
    }
}

/// Decodes the lattice-format super-block at `wb` into its runs (eight of 32, or sixteen
/// of 16 for iq2_xs, iq2_s and iq1_m); `grid` is the format's imported grid.
pub(super) fn runs(
    b: &mut FunctionBuilder,
    format: WeightFormat,
    wb: Value,
    grid: GlobalValue,
    sink: &mut Sink,
) {
    let base = b.ins().symbol_value(types::I64, grid);
    let d = match format {
        WeightFormat::Iq1M => iq1_m_d(b, wb),
        _ => load_f16(b, wb, 0),
    };
    for sub in 0..8i32 {
        match format {
            WeightFormat::Iq3Xxs | WeightFormat::Iq3S => {
                iq3_run(b, format, (wb, base, d), sub, sink)
            }
            WeightFormat::Iq1S | WeightFormat::Iq1M => {
                iq1_runs(b, format, (wb, base, d), sub, sink)
            }
            _ => iq2_runs(b, format, (wb, base, d), sub, sink),
        }
    }
}

/// Decodes sub-block `sub` of the iq3 super-block at `wb` (scale `d`, grid at `base`) into
/// one run.
fn iq3_run(
    b: &mut FunctionBuilder,
    format: WeightFormat,
    (wb, base, d): (Value, Value, Value),
    sub: i32,
    sink: &mut Sink,
) {
    let (scale, signs) = match format {
        WeightFormat::Iq3Xxs => iq3_xxs_scale_signs(b, wb, d, sub),
        _ => iq3_s_scale_signs(b, wb, d, sub),
    };
    // iq3_s's ninth index bits, one byte for the sub-block's eight groups.
    let high = (format == WeightFormat::Iq3S).then(|| {
        let at = (IQ3_S_HIGH_AT as i32) + sub;
        b.ins().uload8(types::I64, mem(), wb, at)
    });
    let mut codes = Vec::with_capacity(8);
    for (half, signs) in signs.into_iter().enumerate() {
        let first = 4 * half as i32;
        let entries: Vec<Value> = (first..first + 4)
            .map(|group| entry(b, (wb, high), base, sub, group))
            .collect();
        let mut v = b.ins().scalar_to_vector(types::I32X4, entries[0]);
        for (lane, &e) in entries.iter().enumerate().skip(1) {
            v = b.ins().insertlane(v, e, lane as u8);
        }
        let magnitudes = b.ins().bitcast(types::I8X16, little(), v);
        codes.extend(signed_codes(b, magnitudes, signs));
    }
    sink(
        b,
        Run {
            codes,
            x_at: 4 * 32 * sub,
            scale,
            offset: None,
        },
    );
}

/// The sixteen magnitude bytes `magnitudes` negated where the matching bit of the `i32`
/// `signs` is set, widened to four `f32x4`.
fn signed_codes(b: &mut FunctionBuilder, magnitudes: Value, signs: Value) -> [Value; 4] {
    let mask = bit_lanes(b, signs, 0);
    let flipped = b.ins().bxor(magnitudes, mask);
    let signed = b.ins().isub(flipped, mask);
    bytes_to_f32(b, signed, true)
}

/// Decodes sub-block `sub` of the iq2 super-block at `wb` (scale `d`, grid at `base`):
/// one run of 32 (iq2_xxs) or two of 16 (iq2_xs, iq2_s), whose groups of eight are 64-bit
/// grid entries, two to an `i8x16`.
fn iq2_runs(
    b: &mut FunctionBuilder,
    format: WeightFormat,
    (wb, base, d): (Value, Value, Value),
    sub: i32,
    sink: &mut Sink,
) {
    let (scales, groups) = match format {
        WeightFormat::Iq2Xxs => iq2_xxs_groups(b, wb, d, sub),
        _ => iq2_groups(b, format, wb, d, sub),
    };
    let mut codes = Vec::with_capacity(8);
    for pair in groups.chunks(2) {
        let magnitudes = entry_pair(b, base, [pair[0].0, pair[1].0]);
        let high = b.ins().ishl_imm_s(pair[1].1, 8);
        let signs = b.ins().bor(pair[0].1, high);
        codes.extend(signed_codes(b, magnitudes, signs));
    }
    sink_runs(b, sub, (&scales, &codes), sink);
}

/// The 64-bit entries of the grid at `base` at the `i64` indices `indices`, as one
/// `i8x16` (the first entry's bytes in lanes 0..8).
fn entry_pair(b: &mut FunctionBuilder, base: Value, indices: [Value; 2]) -> Value {
    let entries = indices.map(|index| {
        let offset = b.ins().ishl_imm_s(index, 3);
        let at = b.ins().iadd(base, offset);
        b.ins().load(types::I64, mem(), at, 0)
    });
    bytes_of_pair(b, entries)
}

/// The two `i64` values `pair` as one `i8x16` (the first's bytes in lanes 0..8).
fn bytes_of_pair(b: &mut FunctionBuilder, pair: [Value; 2]) -> Value {
    let v = b.ins().scalar_to_vector(types::I64X2, pair[0]);
    let v = b.ins().insertlane(v, pair[1], 1);
    b.ins().bitcast(types::I8X16, little(), v)
}

/// Sends sub-block `sub`'s eight `f32x4` of codes to `sink` as one run of 32 under the
/// one of `scales`, or two of 16 under its two.
fn sink_runs(
    b: &mut FunctionBuilder,
    sub: i32,
    (scales, codes): (&[Value], &[Value]),
    sink: &mut Sink,
) {
    let per_run = 8 / scales.len();
    for (run, &scale) in scales.iter().enumerate() {
        sink(
            b,
            Run {
                codes: codes[per_run * run..per_run * (run + 1)].to_vec(),
                x_at: 4 * (32 * sub + (4 * per_run * run) as i32),
                scale,
                offset: None,
            },
        );
    }
}

/// A group's grid index (`i64`) and sign byte (`i32`, bit `j` for value `j`).
type Group = (Value, Value);

/// iq2_xxs sub-block `sub`'s scale `d * (ls + 0.5) / 4` (`ls` the top four bits of the
/// word at `6 + 8 sub`) and its four groups: index bytes `2 + 8 sub + g`, the word's
/// 7-bit sign codes with their parities.
fn iq2_xxs_groups(
    b: &mut FunctionBuilder,
    wb: Value,
    d: Value,
    sub: i32,
) -> (Vec<Value>, [Group; 4]) {
    let at = IQ2_XXS_WORDS_AT as i32 + 8 * sub;
    let word = b.ins().load(types::I32, mem(), wb, at);
    let ls = b.ins().ushr_imm_s(word, 28);
    let scale = half_odd_scale(b, d, ls, 0.25);
    let groups = [0, 1, 2, 3].map(|g| {
        let index = b.ins().uload8(types::I64, mem(), wb, 2 + 8 * sub + g);
        let code = b.ins().ushr_imm_s(word, i64::from(7 * g));
        (index, even_signs(b, code))
    });
    (vec![scale], groups)
}

/// iq2_xs or iq2_s sub-block `sub`'s two scales `d * (ls + 0.5) / 4` (the nibbles of
/// byte `sub` of the scales) and its four groups: iq2_xs's 16-bit words `2 + 2 (4 sub +
/// g)` (a 9-bit index under a 7-bit sign code, with its parity); iq2_s's index bytes
/// `2 + 4 sub + g` under the bit pair `2g` of the sub-block's high byte, and its sign
/// bytes.
fn iq2_groups(
    b: &mut FunctionBuilder,
    format: WeightFormat,
    wb: Value,
    d: Value,
    sub: i32,
) -> (Vec<Value>, [Group; 4]) {
    let scales_at = match format {
        WeightFormat::Iq2Xs => IQ2_XS_SCALES_AT,
        _ => IQ2_S_SCALES_AT,
    } as i32;
    let byte = b.ins().uload8(types::I32, mem(), wb, scales_at + sub);
    let scales = [0, 4]
        .map(|shift| {
            let ls = b.ins().ushr_imm_s(byte, shift);
            let ls = b.ins().band_imm_s(ls, 0xF);
            half_odd_scale(b, d, ls, 0.25)
        })
        .to_vec();
    let high = (format == WeightFormat::Iq2S).then(|| {
        b.ins()
            .uload8(types::I64, mem(), wb, IQ2_S_HIGH_AT as i32 + sub)
    });
    let groups = [0, 1, 2, 3].map(|g| match high {
        None => {
            let word = b
                .ins()
                .uload16(types::I32, mem(), wb, 2 + 2 * (4 * sub + g));
            let index = b.ins().band_imm_s(word, 511);
            let index = b.ins().uextend(types::I64, index);
            let code = b.ins().ushr_imm_s(word, 9);
            (index, even_signs(b, code))
        }
        Some(high) => {
            let low = b.ins().uload8(types::I64, mem(), wb, 2 + 4 * sub + g);
            let bits = b.ins().ushr_imm_s(high, i64::from(2 * g));
            let bits = b.ins().band_imm_s(bits, 3);
            let bits = b.ins().ishl_imm_s(bits, 8);
            let index = b.ins().bor(low, bits);
            let signs_at = IQ2_S_SIGNS_AT as i32 + 4 * sub + g;
            (index, b.ins().uload8(types::I32, mem(), wb, signs_at))
        }
    });
    (scales, groups)
}

/// `d * (ls + 0.5) * factor` of the `i32` multiplier `ls`, as ggml computes the scales of
/// iq3_xxs (`factor` 0.5) and the IQ2 formats (0.25).
fn half_odd_scale(b: &mut FunctionBuilder, d: Value, ls: Value, factor: f32) -> Value {
    let ls = b.ins().fcvt_from_uint(types::F32, ls);
    let half = b.ins().f32const(0.5);
    let odd = b.ins().fadd(ls, half);
    let scale = b.ins().fmul(d, odd);
    let factor = b.ins().f32const(factor);
    b.ins().fmul(scale, factor)
}

/// The sign byte of the 7-bit code in the low bits of the `i32` `code` (above them is
/// ignored): the code, with bit 7 set where its count of ones is odd
/// (`llm_ir::interp::lattice::EVEN_SIGNS`).
fn even_signs(b: &mut FunctionBuilder, code: Value) -> Value {
    let code = b.ins().band_imm_s(code, 0x7F);
    let parity = b.ins().popcnt(code);
    let parity = b.ins().band_imm_s(parity, 1);
    let parity = b.ins().ishl_imm_s(parity, 7);
    b.ins().bor(code, parity)
}

/// The grid entry (an `i32` of four magnitude bytes) of group `group` of sub-block `sub`
/// of the super-block at `wb`: the index is byte `2 + 8 sub + group`, with (iq3_s) bit
/// `group` of the sub-block's byte of ninth bits, `high`, above it.
fn entry(
    b: &mut FunctionBuilder,
    (wb, high): (Value, Option<Value>),
    base: Value,
    sub: i32,
    group: i32,
) -> Value {
    let index = b.ins().uload8(types::I64, mem(), wb, 2 + 8 * sub + group);
    let index = match high {
        Some(high) => {
            let bit = b.ins().ushr_imm_s(high, i64::from(group));
            let bit = b.ins().band_imm_s(bit, 1);
            let bit = b.ins().ishl_imm_s(bit, 8);
            b.ins().bor(index, bit)
        }
        None => index,
    };
    let offset = b.ins().ishl_imm_s(index, 2);
    let at = b.ins().iadd(base, offset);
    b.ins().load(types::I32, mem(), at, 0)
}

/// iq3_xxs sub-block `sub`'s scale `d * (ls + 0.5) * 0.5` (`ls` the top four bits of the
/// word at `66 + 4 sub`) and the sign bits of its two halves (16 bits each): the word's
/// four 7-bit codes, each with an eighth bit that makes its count of ones even.
fn iq3_xxs_scale_signs(
    b: &mut FunctionBuilder,
    wb: Value,
    d: Value,
    sub: i32,
) -> (Value, [Value; 2]) {
    let word = b
        .ins()
        .load(types::I32, mem(), wb, IQ3_XXS_WORDS_AT as i32 + 4 * sub);
    let ls = b.ins().ushr_imm_s(word, 28);
    let scale = half_odd_scale(b, d, ls, 0.5);
    let runs: Vec<Value> = (0..4)
        .map(|run| {
            let code = b.ins().ushr_imm_s(word, 7 * run);
            even_signs(b, code)
        })
        .collect();
    let halves = [0, 2].map(|r| {
        let high = b.ins().ishl_imm_s(runs[r + 1], 8);
        b.ins().bor(runs[r], high)
    });
    (scale, halves)
}

/// iq3_s sub-block `sub`'s scale `d * (1 + 2 ls)` (`ls` nibble `sub % 2` of byte
/// `106 + sub / 2`) and the sign bits of its two halves (the 16-bit words at
/// `74 + 4 sub` and `76 + 4 sub`).
fn iq3_s_scale_signs(
    b: &mut FunctionBuilder,
    wb: Value,
    d: Value,
    sub: i32,
) -> (Value, [Value; 2]) {
    let ls = b
        .ins()
        .uload8(types::I32, mem(), wb, IQ3_S_SCALES_AT as i32 + sub / 2);
    let ls = b.ins().ushr_imm_s(ls, i64::from(4 * (sub % 2)));
    let ls = b.ins().band_imm_s(ls, 0xF);
    let factor = b.ins().ishl_imm_s(ls, 1);
    let factor = b.ins().iadd_imm_s(factor, 1);
    let factor = b.ins().fcvt_from_uint(types::F32, factor);
    let scale = b.ins().fmul(d, factor);
    let signs_at = IQ3_S_SIGNS_AT as i32 + 4 * sub;
    let halves = [0, 2].map(|h| b.ins().uload16(types::I32, mem(), wb, signs_at + h));
    (scale, halves)
}

/// Decodes sub-block `sub` of the iq1 super-block at `wb` (scale `d`, grid at `base`):
/// one run of 32 (iq1_s) or two of 16 (iq1_m), whose groups of eight are 64-bit grid
/// entries of -1, 0 and 1, two to an `i8x16`, taken as the codes `8 q ± 1` (the group's
/// shift in eighths) under an eighth of the run's scale.
fn iq1_runs(
    b: &mut FunctionBuilder,
    format: WeightFormat,
    (wb, base, d): (Value, Value, Value),
    sub: i32,
    sink: &mut Sink,
) {
    let (scales, groups) = match format {
        WeightFormat::Iq1S => iq1_s_groups(b, wb, d, sub),
        _ => iq1_m_groups(b, wb, d, sub),
    };
    let mut codes = Vec::with_capacity(8);
    for pair in groups.chunks(2) {
        let values = entry_pair(b, base, [pair[0].0, pair[1].0]);
        let eighths = b.ins().ishl_imm_s(values, 3);
        // Each group's shift, +1 or -1 in every byte of its 64 bits.
        let shifts = [pair[0].1, pair[1].1].map(|negative| {
            let mask = b.ins().ineg(negative);
            let minus_two = b.ins().band_imm_s(mask, 0xFEFE_FEFE_FEFE_FEFEu64 as i64);
            b.ins().iadd_imm_s(minus_two, 0x0101_0101_0101_0101)
        });
        let shifts = bytes_of_pair(b, shifts);
        let shifted = b.ins().iadd(eighths, shifts);
        codes.extend(bytes_to_f32(b, shifted, true));
    }
    sink_runs(b, sub, (&scales, &codes), sink);
}

/// An iq1 group's grid index (`i64`) and whether its shift is negative (`i64`, 0 or 1).
type ShiftedGroup = (Value, Value);

/// An eighth of the iq1 run scale `d * (2 ls + 1)` of the `i32` multiplier `ls`.
fn iq1_eighth_scale(b: &mut FunctionBuilder, d: Value, ls: Value) -> Value {
    let factor = b.ins().ishl_imm_s(ls, 1);
    let factor = b.ins().iadd_imm_s(factor, 1);
    let factor = b.ins().fcvt_from_uint(types::F32, factor);
    let scale = b.ins().fmul(d, factor);
    let eighth = b.ins().f32const(0.125);
    b.ins().fmul(scale, eighth)
}

/// iq1_s sub-block `sub`'s scale (over eight; `ls` bits 12..15 of the word at
/// `34 + 2 sub`) and its four groups: index bytes `2 + 4 sub + l` under the word's bits
/// `3 l`, all shifted as the word's bit 15 says.
fn iq1_s_groups(
    b: &mut FunctionBuilder,
    wb: Value,
    d: Value,
    sub: i32,
) -> (Vec<Value>, [ShiftedGroup; 4]) {
    let word = b
        .ins()
        .uload16(types::I64, mem(), wb, IQ1_S_WORDS_AT as i32 + 2 * sub);
    let ls = b.ins().ushr_imm_s(word, 12);
    let ls = b.ins().band_imm_s(ls, 7);
    let ls = b.ins().ireduce(types::I32, ls);
    let scale = iq1_eighth_scale(b, d, ls);
    let negative = b.ins().ushr_imm_s(word, 15);
    let groups = [0, 1, 2, 3].map(|l| {
        let low = b.ins().uload8(types::I64, mem(), wb, 2 + 4 * sub + l);
        let high = b.ins().ushr_imm_s(word, i64::from(3 * l));
        let high = b.ins().band_imm_s(high, 7);
        let high = b.ins().ishl_imm_s(high, 8);
        (b.ins().bor(low, high), negative)
    });
    (vec![scale], groups)
}

/// iq1_m sub-block `sub`'s two scales (over eight; run `r = 2 sub + h`'s `ls` at bit
/// `3 (r % 4)` of the word at `48 + 2 (r / 4)`) and its four groups: index bytes
/// `4 sub + l` under the low three bits of nibble `l % 2` of byte `32 + 2 sub + l / 2`,
/// whose fourth bit is the group's shift sign.
fn iq1_m_groups(
    b: &mut FunctionBuilder,
    wb: Value,
    d: Value,
    sub: i32,
) -> (Vec<Value>, [ShiftedGroup; 4]) {
    let word = b.ins().uload16(
        types::I32,
        mem(),
        wb,
        IQ1_M_SCALES_AT as i32 + 2 * (sub / 2),
    );
    let scales = [0, 1]
        .map(|h| {
            let run = 2 * sub + h;
            let ls = b.ins().ushr_imm_s(word, i64::from(3 * (run % 4)));
            let ls = b.ins().band_imm_s(ls, 7);
            iq1_eighth_scale(b, d, ls)
        })
        .to_vec();
    let groups = [0, 1, 2, 3].map(|l| {
        let low = b.ins().uload8(types::I64, mem(), wb, 4 * sub + l);
        let at = IQ1_M_HIGH_AT as i32 + 2 * sub + l / 2;
        let byte = b.ins().uload8(types::I64, mem(), wb, at);
        let nibble = b.ins().ushr_imm_s(byte, i64::from(4 * (l % 2)));
        let high = b.ins().band_imm_s(nibble, 7);
        let high = b.ins().ishl_imm_s(high, 8);
        let negative = b.ins().ushr_imm_s(nibble, 3);
        let negative = b.ins().band_imm_s(negative, 1);
        (b.ins().bor(low, high), negative)
    });
    (scales, groups)
}

/// The iq1_m super-block scale at `wb`: the f16 whose nibble `k` is the top nibble of the
/// scale word `k` (at `48 + 2 k`).
fn iq1_m_d(b: &mut FunctionBuilder, wb: Value) -> Value {
    let mut bits = None;
    for k in 0..4 {
        let word = b
            .ins()
            .uload16(types::I32, mem(), wb, IQ1_M_SCALES_AT as i32 + 2 * k);
        let nibble = b.ins().ushr_imm_s(word, 12);
        let nibble = b.ins().ishl_imm_s(nibble, i64::from(4 * k));
        bits = Some(match bits {
            Some(bits) => b.ins().bor(bits, nibble),
            None => nibble,
        });
    }
    f16_to_f32(b, bits.expect("four nibbles"))
}
