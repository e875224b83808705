//! In-register decoding of GGUF's ternary formats, tq1_0 and tq2_0, for the generated
//! contraction and dequantization kernels (the layouts: `llm_ir::interp::ternary`).
//!
//! A super-block is eight runs of 32 values under its one scale `d`, each value's code its
//! trit (-1, 0 or 1) as an integer:
//! - tq2_0: a run is bit pair `l` of 32 code bytes, shifted down, masked and recentred by
//!   one in byte lanes;
//! - tq1_0: trit `n` of a byte is `((byte * 3^n) mod 256 * 3) >> 8`, computed in 16-bit
//!   lanes (the bytes widened, multiplied by each lane's power of three, masked to a byte,
//!   tripled and shifted down). The first five runs are the five trits of bytes 0..32; the
//!   next two pair trits `2i` and `2i + 1` of bytes 32..48; the last is trit 4 of those with
//!   the 16 values of bytes 48..52, four trits of four bytes, which one vector holds as the
//!   four bytes repeated with lane `l`'s power of three `3^(l / 4)`.
//!
//! The binary q1_0 is four runs of 32 under its block's scale, each value's sign bit made
//! a byte mask (`dequant::bit_lanes`) and the code 1 or -1 (`(mask & 2) - 1`).

use cranelift_codegen::ir::{ConstantData, InstBuilder, Value, types};
use cranelift_frontend::FunctionBuilder;
use llm_ir::interp::ternary::{POW3, TQ1_0_D_AT, TQ1_0_SECTIONS, TQ2_0_D_AT};

use super::dequant::{Run, Sink, bit_lanes, bytes_to_f32, little, load_f16, splat_i8, widen_i16x8};
use super::emit::mem;
use crate::kernel::WeightFormat;

/// Decodes the ternary super-block or binary block at `wb` into its runs.
pub(super) fn runs(b: &mut FunctionBuilder, format: WeightFormat, wb: Value, sink: &mut Sink) {
    match format {
        WeightFormat::Tq1_0 => tq1_0_runs(b, wb, sink),
        WeightFormat::Tq2_0 => tq2_0_runs(b, wb, sink),
        WeightFormat::Q1_0 => q1_0_runs(b, wb, sink),
        other => unreachable!("{other:?} is not a ternary or binary format"),
    }
}

/// tq2_0: run `4 j + l` is bit pair `l` of bytes `32 j..32 j + 32`, minus one.
fn tq2_0_runs(b: &mut FunctionBuilder, wb: Value, sink: &mut Sink) {
    let scale = load_f16(b, wb, TQ2_0_D_AT as i32);
    let (pair, one) = (splat_i8(b, 3), splat_i8(b, 1));
    for j in 0..2i32 {
        let halves = [0, 16].map(|h| b.ins().load(types::I8X16, mem(), wb, 32 * j + h));
        for l in 0..4i32 {
            let mut codes = Vec::with_capacity(8);
            for half in halves {
                let shift = b.ins().iconst(types::I32, i64::from(2 * l));
                let q = b.ins().ushr(half, shift);
                let q = b.ins().band(q, pair);
                let t = b.ins().isub(q, one);
                codes.extend(bytes_to_f32(b, t, true));
            }
            sink(
                b,
                Run {
                    codes,
                    x_at: 4 * (128 * j + 32 * l),
                    scale,
                    offset: None,
                },
            );
        }
    }
}

/// q1_0: run `r` is the 32 sign bits of the word at `2 + 4 r`, each 1 or -1.
fn q1_0_runs(b: &mut FunctionBuilder, wb: Value, sink: &mut Sink) {
    let scale = load_f16(b, wb, 0);
    let (two, one) = (splat_i8(b, 2), splat_i8(b, 1));
    for r in 0..4i32 {
        let word = b.ins().load(types::I32, mem(), wb, 2 + 4 * r);
        let mut codes = Vec::with_capacity(8);
        for first in [0, 2] {
            let set = bit_lanes(b, word, first);
            let q = b.ins().band(set, two);
            let q = b.ins().isub(q, one);
            codes.extend(bytes_to_f32(b, q, true));
        }
        sink(
            b,
            Run {
                codes,
                x_at: 4 * 32 * r,
                scale,
                offset: None,
            },
        );
    }
}

/// tq1_0: the runs of the module doc, from [`TQ1_0_SECTIONS`].
fn tq1_0_runs(b: &mut FunctionBuilder, wb: Value, sink: &mut Sink) {
    let scale = load_f16(b, wb, TQ1_0_D_AT as i32);
    let [wide, narrow, last] = TQ1_0_SECTIONS;
    let halves = [0, 16].map(|h| b.ins().load(types::I8X16, mem(), wb, wide.at as i32 + h));
    let mut run = |b: &mut FunctionBuilder, first: usize, codes: Vec<Value>| {
        sink(
            b,
            Run {
                codes,
                x_at: 4 * first as i32,
                scale,
                offset: None,
            },
        );
    };
    for (n, &power) in POW3.iter().enumerate().take(wide.trits) {
        let mut codes = trits(b, halves[0], [power; 16]).to_vec();
        codes.extend(trits(b, halves[1], [power; 16]));
        run(b, wide.first + wide.width * n, codes);
    }
    let middle = b.ins().load(types::I8X16, mem(), wb, narrow.at as i32);
    for pair in 0..2 {
        let mut codes = trits(b, middle, [POW3[2 * pair]; 16]).to_vec();
        codes.extend(trits(b, middle, [POW3[2 * pair + 1]; 16]));
        run(b, narrow.first + narrow.width * 2 * pair, codes);
    }
    let mut codes = trits(b, middle, [POW3[4]; 16]).to_vec();
    let word = b.ins().load(types::I32, mem(), wb, last.at as i32);
    let words = b.ins().splat(types::I32X4, word);
    let repeated = b.ins().bitcast(types::I8X16, little(), words);
    codes.extend(trits(b, repeated, std::array::from_fn(|l| POW3[l / 4])));
    run(b, narrow.first + narrow.width * 4, codes);
}

/// The trits minus one of the 16 bytes `bytes` (`i8x16`), lane `l` trit `n` where
/// `powers[l]` is `3^n`, as four `f32x4`.
fn trits(b: &mut FunctionBuilder, bytes: Value, powers: [u8; 16]) -> [Value; 4] {
    let mask = splat_i16(b, 0xff);
    let three = splat_i16(b, 3);
    let one = splat_i16(b, 1);
    let shift = b.ins().iconst(types::I32, 8);
    let [low, high] = [
        (b.ins().uwiden_low(bytes), &powers[..8]),
        (b.ins().uwiden_high(bytes), &powers[8..]),
    ]
    .map(|(wide, powers)| {
        let powers: Vec<u8> = powers
            .iter()
            .flat_map(|&p| u16::from(p).to_le_bytes())
            .collect();
        let powers = b.func.dfg.constants.insert(ConstantData::from(powers));
        let powers = b.ins().vconst(types::I16X8, powers);
        let shifted = b.ins().imul(wide, powers);
        let shifted = b.ins().band(shifted, mask);
        let tripled = b.ins().imul(shifted, three);
        let t = b.ins().ushr(tripled, shift);
        let t = b.ins().isub(t, one);
        widen_i16x8(b, t)
    });
    [low[0], low[1], high[0], high[1]]
}

/// An `i16x8` with every lane `c`.
fn splat_i16(b: &mut FunctionBuilder, c: i64) -> Value {
    let c = b.ins().iconst(types::I16, c);
    b.ins().splat(types::I16X8, c)
}
