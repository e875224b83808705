//! In-register decoding of GGUF's 4-bit float formats, mxfp4 and nvfp4, for the
//! generated contraction and dequantization kernels (the layouts: `llm_ir::interp::fp4`).
//!
//! Each nibble indexes the doubled E2M1 levels (`FP4_LEVELS`, -12 to 12), looked up by a
//! byte swizzle as iq4_nl's levels are, under half the block's scale, which both formats
//! store as a byte and this module widens to `f32` in scalar code, exactly:
//! - mxfp4: one run of 32 under the E8M0 byte `e`, half of `2^(e - 127)`, built as the
//!   bits `(e - 1) << 23` (`0x0020_0000 << e` below 2, the subnormals);
//! - nvfp4: four runs of 16 under their UE4M3 bytes `x`, half of each:
//!   `(8 [e > 0] + m) * 2^(max(e, 1) - 11)` for exponent `e` and mantissa `m`, 0 for
//!   `0x7F`; two runs' 16 nibble bytes are loaded at once and their low and high nibbles
//!   regrouped by a shuffle.

use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value, condcodes::IntCC, types};
use cranelift_frontend::FunctionBuilder;
use llm_ir::interp::fp4::{FP4_LEVELS, NVFP4_CODES_AT};

use super::dequant::{Run, Sink, shuffle, signed_levels, split_nibbles};
use super::emit::mem;
use crate::kernel::WeightFormat;

/// Decodes the 4-bit float block at `wb` into its runs.
pub(super) fn runs(b: &mut FunctionBuilder, format: WeightFormat, wb: Value, sink: &mut Sink) {
    match format {
        WeightFormat::Mxfp4 => mxfp4_run(b, wb, sink),
        WeightFormat::Nvfp4 => nvfp4_runs(b, wb, sink),
        other => unreachable!("{other:?} is not a 4-bit float format"),
    }
}

/// mxfp4: the E8M0 byte, then 16 nibble bytes (low nibbles values 0..16).
fn mxfp4_run(b: &mut FunctionBuilder, wb: Value, sink: &mut Sink) {
    let e = b.ins().uload8(types::I32, mem(), wb, 0);
    let small = b.ins().icmp_imm_u(IntCC::UnsignedLessThan, e, 2);
    let subnormal = b.ins().iconst(types::I32, 0x0020_0000);
    let subnormal = b.ins().ishl(subnormal, e);
    let normal = b.ins().iadd_imm_s(e, -1);
    let normal = b.ins().ishl_imm_s(normal, 23);
    let bits = b.ins().select(small, subnormal, normal);
    let scale = b.ins().bitcast(types::F32, MemFlagsData::new(), bits);
    let packed = b.ins().load(types::I8X16, mem(), wb, 1);
    let mut codes = Vec::with_capacity(8);
    for nibbles in split_nibbles(b, packed) {
        codes.extend(signed_levels(b, FP4_LEVELS, nibbles));
    }
    sink(
        b,
        Run {
            codes,
            x_at: 0,
            scale,
            offset: None,
        },
    );
}

/// nvfp4: four UE4M3 bytes, then 8 nibble bytes for each run of 16 (low nibbles its
/// first 8 values).
fn nvfp4_runs(b: &mut FunctionBuilder, wb: Value, sink: &mut Sink) {
    let first: [u8; 16] = std::array::from_fn(|l| if l < 8 { l } else { l + 8 } as u8);
    let second = first.map(|l| l + 8);
    for pair in 0..2 {
        let at = NVFP4_CODES_AT as i32 + 16 * pair;
        let packed = b.ins().load(types::I8X16, mem(), wb, at);
        let [low, high] = split_nibbles(b, packed);
        for (h, order) in [first, second].iter().enumerate() {
            let s = 2 * pair + h as i32;
            let nibbles = shuffle(b, low, high, order);
            let codes = signed_levels(b, FP4_LEVELS, nibbles).to_vec();
            let scale = ue4m3_half(b, wb, s);
            sink(
                b,
                Run {
                    codes,
                    x_at: 4 * 16 * s,
                    scale,
                    offset: None,
                },
            );
        }
    }
}

/// Half the UE4M3 scale byte at `wb + at`, as an `f32`.
fn ue4m3_half(b: &mut FunctionBuilder, wb: Value, at: i32) -> Value {
    let x = b.ins().uload8(types::I32, mem(), wb, at);
    let exp = b.ins().ushr_imm_s(x, 3);
    let exp = b.ins().band_imm_s(exp, 0xF);
    let man = b.ins().band_imm_s(x, 7);
    let normal = b.ins().icmp_imm_u(IntCC::NotEqual, exp, 0);
    let (eight, one) = (b.ins().iconst(types::I32, 8), b.ins().iconst(types::I32, 1));
    let zero = b.ins().iconst(types::I32, 0);
    let lead = b.ins().select(normal, eight, zero);
    let significand = b.ins().iadd(man, lead);
    let significand = b.ins().fcvt_from_sint(types::F32, significand);
    let exp = b.ins().select(normal, exp, one);
    // 2^(exp - 11): the biased exponent `exp + 116`.
    let power = b.ins().iadd_imm_s(exp, 116);
    let power = b.ins().ishl_imm_s(power, 23);
    let power = b.ins().bitcast(types::F32, MemFlagsData::new(), power);
    let half = b.ins().fmul(significand, power);
    let nan_code = b.ins().icmp_imm_u(IntCC::Equal, x, 0x7F);
    let zero = b.ins().f32const(0.0);
    b.ins().select(nan_code, zero, half)
}
