//! `llm.cast` in generated code: element type conversions between the host's storage of
//! floats (`f32`, f16 and bf16 values held as `f32`) and integers (`i64`).
//!
//! Floats round to the target's precision to nearest, ties to even, with integer
//! operations on their bits (what `half`'s conversions do); floats truncate to integers
//! saturating (NaN to 0); integers convert to the nearest float, or wrap to the target's
//! width.

use cranelift_codegen::ir::{InstBuilder, MemFlagsData, Value, condcodes::IntCC, types};
use cranelift_frontend::FunctionBuilder;
use llm_ir::dtype::DType;

use super::emit::{address, for_range, mem, splat};

/// Emits `y[i] = cast(x[i])` for `i < len` (`p`: x, y, len); floats are `f32` in memory,
/// integers `i64`.
pub fn emit_cast(b: &mut FunctionBuilder, from: DType, to: DType, p: &[Value]) {
    let (x, y, len) = (p[0], p[1], p[2]);
    let zero = b.ins().iconst(types::I64, 0);
    if from.is_float() && to == DType::I64 {
        // One at a time: the vector conversion saturates at 32 bits.
        for_range(b, zero, len, 1, |b, i| {
            let at = address(b, x, i, 4);
            let v = b.ins().load(types::F32, mem(), at, 0);
            let q = b.ins().fcvt_to_sint_sat(types::I64, v);
            let dest = address(b, y, i, 8);
            b.ins().store(mem(), q, dest, 0);
        });
    } else if from.is_float() {
        // Four floats at a time, then one at a time in lane 0.
        let vec_end = b.ins().band_imm_s(len, !3);
        for (start, end, lanes) in [(zero, vec_end, 4u8), (vec_end, len, 1)] {
            for_range(b, start, end, i64::from(lanes), |b, i| {
                let at = address(b, x, i, 4);
                let v = if lanes == 4 {
                    b.ins().load(types::F32X4, mem(), at, 0)
                } else {
                    let s = b.ins().load(types::F32, mem(), at, 0);
                    b.ins().scalar_to_vector(types::F32X4, s)
                };
                if to.is_float() {
                    let r = round_to(b, to, v);
                    let dest = address(b, y, i, 4);
                    if lanes == 4 {
                        b.ins().store(mem(), r, dest, 0);
                    } else {
                        let s = b.ins().extractlane(r, 0);
                        b.ins().store(mem(), s, dest, 0);
                    }
                } else {
                    let q = truncate(b, to, v);
                    let dest = address(b, y, i, 8);
                    for lane in 0..lanes {
                        let s = b.ins().extractlane(q, lane);
                        let s = b.ins().sextend(types::I64, s);
                        b.ins().store(mem(), s, dest, 8 * i32::from(lane));
                    }
                }
            });
        }
    } else {
        for_range(b, zero, len, 1, |b, i| {
            let at = address(b, x, i, 8);
            let v = b.ins().load(types::I64, mem(), at, 0);
            if to.is_float() {
                let f = b.ins().fcvt_from_sint(types::F32, v);
                let r = round_scalar(b, to, f);
                let dest = address(b, y, i, 4);
                b.ins().store(mem(), r, dest, 0);
            } else {
                let bits = match to {
                    DType::I8 => 8,
                    DType::I32 => 32,
                    _ => 64,
                };
                let w = if bits < 64 {
                    let up = b.ins().ishl_imm_s(v, 64 - bits);
                    b.ins().sshr_imm_s(up, 64 - bits)
                } else {
                    v
                };
                let dest = address(b, y, i, 8);
                b.ins().store(mem(), w, dest, 0);
            }
        });
    }
}

/// The `f32x4` `v` rounded to the precision of float type `to`.
pub fn round_to(b: &mut FunctionBuilder, to: DType, v: Value) -> Value {
    match to {
        DType::F16 => round_f16(b, v),
        DType::BF16 => round_bf16(b, v),
        _ => v,
    }
}

/// The `f32` `x` rounded to the precision of float type `to` ([`round_to`] on one lane).
pub fn round_scalar(b: &mut FunctionBuilder, to: DType, x: Value) -> Value {
    let lanes = b.ins().scalar_to_vector(types::F32X4, x);
    let r = round_to(b, to, lanes);
    b.ins().extractlane(r, 0)
}

/// An `i32x4` with every lane `c`.
fn splat_i32(b: &mut FunctionBuilder, c: i64) -> Value {
    let c = b.ins().iconst(types::I32, c);
    b.ins().splat(types::I32X4, c)
}

/// `v` rounded to bf16: the low 16 bits rounded off to nearest, ties to even; NaNs stay
/// NaN (quiet).
fn round_bf16(b: &mut FunctionBuilder, v: Value) -> Value {
    let flags = MemFlagsData::new();
    let u = b.ins().bitcast(types::I32X4, flags, v);
    let sixteen = b.ins().iconst(types::I32, 16);
    let odd = b.ins().ushr(u, sixteen);
    let one = splat_i32(b, 1);
    let odd = b.ins().band(odd, one);
    let half = splat_i32(b, 0x7fff);
    let bias = b.ins().iadd(half, odd);
    let rounded = b.ins().iadd(u, bias);
    let keep = splat_i32(b, 0xffff_0000_u32 as i32 as i64);
    let rounded = b.ins().band(rounded, keep);
    let quiet = splat_i32(b, 0x0040_0000);
    let nan = b.ins().bor(u, quiet);
    let nan = b.ins().band(nan, keep);
    let r = select_nan(b, v, nan, rounded);
    b.ins().bitcast(types::F32X4, flags, r)
}

/// `v` rounded to f16: to nearest, ties to even, at the precision of the f16 value's
/// range: 11 significant bits for normal values, multiples of 2^-24 below 2^-14, infinity
/// from 65520 up; NaNs stay NaN (quiet).
fn round_f16(b: &mut FunctionBuilder, v: Value) -> Value {
    let flags = MemFlagsData::new();
    let u = b.ins().bitcast(types::I32X4, flags, v);
    let magnitude_mask = splat_i32(b, 0x7fff_ffff);
    let a = b.ins().band(u, magnitude_mask);
    let sign = b.ins().bxor(u, a);
    // Normal range: round off the low 13 mantissa bits.
    let thirteen = b.ins().iconst(types::I32, 13);
    let odd = b.ins().ushr(a, thirteen);
    let one = splat_i32(b, 1);
    let odd = b.ins().band(odd, one);
    let half = splat_i32(b, 0xfff);
    let bias = b.ins().iadd(half, odd);
    let normal = b.ins().iadd(a, bias);
    let keep = splat_i32(b, !0x1fff);
    let normal = b.ins().band(normal, keep);
    // Below 2^-14: multiples of 2^-24, rounded to nearest even by `nearest`.
    let fa = b.ins().bitcast(types::F32X4, flags, a);
    let up = splat(b, 16_777_216.0);
    let scaled = b.ins().fmul(fa, up);
    let whole = b.ins().nearest(scaled);
    let down = splat(b, 1.0 / 16_777_216.0);
    let small = b.ins().fmul(whole, down);
    let small = b.ins().bitcast(types::I32X4, flags, small);
    let min_normal = splat_i32(b, 0x3880_0000);
    let is_small = b.ins().icmp(IntCC::SignedLessThan, a, min_normal);
    let r = b.ins().bitselect(is_small, small, normal);
    // From 65520 (where rounding reaches 2^16) up: infinity.
    let overflow = splat_i32(b, 0x477f_f000);
    let is_big = b.ins().icmp(IntCC::SignedGreaterThanOrEqual, a, overflow);
    let inf = splat_i32(b, 0x7f80_0000);
    let r = b.ins().bitselect(is_big, inf, r);
    let r = b.ins().bor(r, sign);
    let quiet = splat_i32(b, 0x0040_0000);
    let nan = b.ins().bor(u, quiet);
    let r = select_nan(b, v, nan, r);
    b.ins().bitcast(types::F32X4, flags, r)
}

/// `nan` where `v` is NaN, else `other` (both `i32x4` bits).
fn select_nan(b: &mut FunctionBuilder, v: Value, nan: Value, other: Value) -> Value {
    let is_nan = b
        .ins()
        .fcmp(cranelift_codegen::ir::condcodes::FloatCC::Unordered, v, v);
    b.ins().bitselect(is_nan, nan, other)
}

/// `v` truncated towards zero to integer type `to`, saturating (NaN to 0), as `i32x4`.
fn truncate(b: &mut FunctionBuilder, to: DType, v: Value) -> Value {
    let q = b.ins().fcvt_to_sint_sat(types::I32X4, v);
    if to != DType::I8 {
        return q;
    }
    let lo = splat_i32(b, i64::from(i8::MIN));
    let hi = splat_i32(b, i64::from(i8::MAX));
    let q = b.ins().smax(q, lo);
    b.ins().smin(q, hi)
}
