//! In-register decoding of GGUF's lattice formats, iq3_xxs and iq3_s, for the generated
//! contraction and dequantization kernels (the layouts: `llm_ir::interp::iq3`).
//!
//! A sub-block of 32 values is one run (`d` times its 4-bit scale's factor) whose codes
//! are grid magnitudes with signs: each group of four is a 32-bit grid entry loaded from
//! the grid the kernel imports as data ([`GRIDS`]; the JIT resolves the symbol to the
//! table in `llm_ir::types`), four entries make an `i8x16`, and the sixteen values' sign
//! bits become a lane mask (`(q ^ mask) - mask` negates where set) before the bytes widen
//! to `f32x4` lanes.

use cranelift_codegen::ir::{GlobalValue, InstBuilder, Value, types};
use cranelift_frontend::FunctionBuilder;
use llm_ir::{
    interp::iq3::{IQ3_S_HIGH_AT, IQ3_S_SCALES_AT, IQ3_S_SIGNS_AT, IQ3_XXS_WORDS_AT},
    types::{IQ3S_GRID, IQ3XXS_GRID},
};

use super::dequant::{Run, Sink, bit_lanes, bytes_to_f32, little, load_f16};
use super::emit::mem;
use crate::kernel::WeightFormat;

/// Each lattice format's grid, as the data symbol generated code imports it under.
pub const GRIDS: [(WeightFormat, &str); 2] = [
    (WeightFormat::Iq3Xxs, "llmc_iq3xxs_grid"),
    (WeightFormat::Iq3S, "llmc_iq3s_grid"),
];

/// The address of `format`'s grid (what [`GRIDS`]' symbol resolves to), for each format
/// of [`GRIDS`].
pub fn grid_address(format: WeightFormat) -> *const u8 {
    match format {
        WeightFormat::Iq3Xxs => IQ3XXS_GRID.as_ptr().cast(),
        WeightFormat::Iq3S => IQ3S_GRID.as_ptr().cast(),
        other => unreachable!("{other:?} has no grid"),
    }
}

/// Decodes the lattice-format super-block at `wb` into its eight runs; `grid` is the
/// format's imported grid.
pub(super) fn runs(
    b: &mut FunctionBuilder,
    format: WeightFormat,
    wb: Value,
    grid: GlobalValue,
    sink: &mut Sink,
) {
    let base = b.ins().symbol_value(types::I64, grid);
    let d = load_f16(b, wb, 0);
    for sub in 0..8i32 {
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
            let mask = bit_lanes(b, signs, 0);
            let flipped = b.ins().bxor(magnitudes, mask);
            let signed = b.ins().isub(flipped, mask);
            codes.extend(bytes_to_f32(b, signed, true));
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
    let ls = b.ins().fcvt_from_uint(types::F32, ls);
    let half = b.ins().f32const(0.5);
    let factor = b.ins().fadd(ls, half);
    let scale = b.ins().fmul(d, factor);
    let scale = b.ins().fmul(scale, half);
    let runs: Vec<Value> = (0..4)
        .map(|run| {
            let code = b.ins().ushr_imm_s(word, 7 * run);
            let code = b.ins().band_imm_s(code, 0x7F);
            let parity = b.ins().popcnt(code);
            let parity = b.ins().band_imm_s(parity, 1);
            let parity = b.ins().ishl_imm_s(parity, 7);
            b.ins().bor(code, parity)
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
