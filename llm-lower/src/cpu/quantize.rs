//! `llm.quantize` in generated code: f32 values into q8_0, q4_0 or q4_1 blocks of 32, nf4
//! blocks or the affine formats (the K-quants: [`super::kquantize`]), byte for byte as the
//! reference quantizes (ggml's reference quantizers, and QLoRA's absmax NormalFloat).
//!
//! A GGUF block's scale is computed in f32 and used as is for the codes; it is stored as
//! f16, rounded to nearest even ([`f16_bits`]). Codes round as C's `roundf` (ties away
//! from zero, q8_0) or truncate after adding one half (q4_0, q4_1), and saturate to their
//! range. An nf4 block's absmax is rounded to the scale type first, and each value takes
//! the first of the nearest levels to `x / absmax`.

use cranelift_codegen::ir::{
    InstBuilder, MemFlagsData, Value,
    condcodes::{FloatCC, IntCC},
    types,
};
use cranelift_frontend::FunctionBuilder;
use llm_ir::{dtype::DType, interp::quant::NF4_LEVELS};

use super::{
    convert::round_scalar,
    emit::{address, for_range, horizontal_max, mem, splat},
};
use crate::kernel::WeightFormat;

/// Emits the quantization of the floats at `p[0]` into `format`'s bytes at `p[1]`: `rows`
/// rows of `k` for nf4 and the affine formats, `p[2]` floats (a run-time count) for the
/// block formats and the K-quants.
pub fn emit_quantize(
    b: &mut FunctionBuilder,
    format: WeightFormat,
    (rows, k): (Option<usize>, usize),
    p: &[Value],
) {
    let (x, out) = (p[0], p[1]);
    // nf4 and the affine formats lay out a whole matrix (`kernel::select` gives them rows).
    let matrix_len = || rows.expect("a whole-matrix quantization has static rows") * k;
    match format {
        WeightFormat::Nf4 { block, scale } => {
            return nf4(b, [x, out], matrix_len(), (block as usize, scale));
        }
        WeightFormat::Affine {
            bits,
            group,
            symmetric,
            axis,
            scale,
        } => {
            let affine = Affine {
                bits: usize::from(bits),
                group: group as usize,
                symmetric,
                axis,
                scale,
            };
            return affine.emit(b, [x, out], [matrix_len() / k, k]);
        }
        WeightFormat::Q4K | WeightFormat::Q6K | WeightFormat::Q2K => {
            return super::kquantize::emit_kquantize(b, format, p);
        }
        _ => {}
    }
    let block_bytes = format.row_bytes(32) as i64;
    let zero = b.ins().iconst(types::I64, 0);
    let end = b.ins().ushr_imm_u(p[2], 5);
    for_range(b, zero, end, 1, |b, blk| {
        let xb = address(b, x, blk, 128);
        let ob = address(b, out, blk, block_bytes);
        match format {
            WeightFormat::Q8_0 => q8_0_block(b, xb, ob),
            WeightFormat::Q4_0 => q4_0_block(b, xb, ob),
            WeightFormat::Q4_1 => q4_1_block(b, xb, ob),
            other => unreachable!("no quantizer for {other:?}"),
        }
    });
}

/// nf4: for each block of `block` values, the absmax rounded to the scale type, then each
/// value's code (two a byte, low nibble first); the scales follow all the codes.
fn nf4(b: &mut FunctionBuilder, [x, out]: [Value; 2], len: usize, (block, dtype): (usize, DType)) {
    let scale_bytes = dtype.size_bytes() as i64;
    let zero = b.ins().iconst(types::I64, 0);
    let blocks = b.ins().iconst(types::I64, (len / block) as i64);
    let values = b.ins().iconst(types::I64, block as i64);
    let pairs = b.ins().iconst(types::I64, (block / 2) as i64);
    let scales = b.ins().iadd_imm_s(out, len.div_ceil(2) as i64);
    for_range(b, zero, blocks, 1, |b, blk| {
        let xb = address(b, x, blk, 4 * block as i64);
        let most = b.declare_var(types::F32);
        let start = b.ins().f32const(0.0);
        b.def_var(most, start);
        for_range(b, zero, values, 1, |b, i| {
            let at = address(b, xb, i, 4);
            let v = b.ins().load(types::F32, mem(), at, 0);
            let a = b.ins().fabs(v);
            let old = b.use_var(most);
            let new = b.ins().fmax(old, a);
            b.def_var(most, new);
        });
        let amax = b.use_var(most);
        let absmax = round_scalar(b, dtype, amax);
        let at = address(b, scales, blk, scale_bytes);
        store_scale(b, dtype, absmax, at);
        let codes = address(b, out, blk, (block / 2) as i64);
        let zero_f = b.ins().f32const(0.0);
        let empty = b.ins().fcmp(FloatCC::Equal, absmax, zero_f);
        for_range(b, zero, pairs, 1, |b, pair| {
            let at = address(b, xb, pair, 8);
            let code = |b: &mut FunctionBuilder, offset: i32| {
                let v = b.ins().load(types::F32, mem(), at, offset);
                let q = b.ins().fdiv(v, absmax);
                let level = nearest_level(b, q);
                // An all-zero block codes every value as level 7 (zero).
                let seven = b.ins().iconst(types::I32, 7);
                b.ins().select(empty, seven, level)
            };
            let low = code(b, 0);
            let high = code(b, 4);
            let high = b.ins().ishl_imm_s(high, 4);
            let byte = b.ins().bor(low, high);
            let dest = b.ins().iadd(codes, pair);
            b.ins().istore8(mem(), byte, dest, 0);
        });
    });
}

/// An affine integer format of a `[rows, k]` matrix, as the quantizer needs it.
struct Affine {
    bits: usize,
    group: usize,
    symmetric: bool,
    axis: u8,
    scale: DType,
}

impl Affine {
    /// Quantizes the `[rows, k]` floats at `x` into `out`: each group's minimum and
    /// maximum (strict comparisons), its scale (rounded to the scale type and stored) and
    /// zero point, then every code in element order, packed low bits first.
    fn emit(&self, b: &mut FunctionBuilder, [x, out]: [Value; 2], [rows, k]: [usize; 2]) {
        let n = rows * k;
        let groups = n / self.group;
        let scale_bytes = self.scale.size_bytes() as i64;
        let scales = b.ins().iadd_imm_s(out, (n * self.bits).div_ceil(8) as i64);
        let zeros = b.ins().iadd_imm_s(scales, groups as i64 * scale_bytes);
        let levels = (1u32 << self.bits) as f32;
        let qmax = ((1i32 << (self.bits - 1)) - 1) as f32;
        let zero = b.ins().iconst(types::I64, 0);
        // Pass 1: every group's scale and zero point.
        let end = b.ins().iconst(types::I64, groups as i64);
        for_range(b, zero, end, 1, |b, g| {
            let (first, stride) = self.members(b, g, k);
            let (lo, hi) = (b.declare_var(types::F32), b.declare_var(types::F32));
            let inf = b.ins().f32const(f32::INFINITY);
            let neg_inf = b.ins().f32const(f32::NEG_INFINITY);
            b.def_var(lo, inf);
            b.def_var(hi, neg_inf);
            let count = b.ins().iconst(types::I64, self.group as i64);
            for_range(b, zero, count, 1, |b, i| {
                let at = b.ins().imul_imm_s(i, stride);
                let at = b.ins().iadd(first, at);
                let at = address(b, x, at, 4);
                let v = b.ins().load(types::F32, mem(), at, 0);
                for (var, cc) in [(lo, FloatCC::LessThan), (hi, FloatCC::GreaterThan)] {
                    let old = b.use_var(var);
                    let takes = b.ins().fcmp(cc, v, old);
                    let new = b.ins().select(takes, v, old);
                    b.def_var(var, new);
                }
            });
            let (lo, hi) = (b.use_var(lo), b.use_var(hi));
            let at = address(b, scales, g, scale_bytes);
            let zp = b.ins().iadd(zeros, g);
            if self.symmetric {
                let (a, c) = (b.ins().fabs(lo), b.ins().fabs(hi));
                let most = b.ins().fmax(a, c);
                let q = b.ins().f32const(qmax);
                let s = b.ins().fdiv(most, q);
                self.store_scale(b, s, at);
            } else {
                // The range includes 0 (a +0, as the reference takes it).
                let z = b.ins().f32const(0.0);
                let below = b.ins().fcmp(FloatCC::LessThan, lo, z);
                let min = b.ins().select(below, lo, z);
                let above = b.ins().fcmp(FloatCC::GreaterThan, hi, z);
                let max = b.ins().select(above, hi, z);
                let range = b.ins().fsub(max, min);
                let steps = b.ins().f32const(levels - 1.0);
                let s = b.ins().fdiv(range, steps);
                let s = self.store_scale(b, s, at);
                let neg = b.ins().fneg(min);
                let ratio = b.ins().fdiv(neg, s);
                let point = round_half_away_scalar(b, ratio);
                let point = clamp_to_int(b, point, 0.0, levels - 1.0);
                let zero_scale = b.ins().fcmp(FloatCC::Equal, s, z);
                let none = b.ins().iconst(types::I32, 0);
                let point = b.ins().select(zero_scale, none, point);
                b.ins().istore8(mem(), point, zp, 0);
            }
        });
        // Pass 2: the codes, a byte (8 / bits codes) at a time.
        let per_byte = 8 / self.bits;
        let bytes = b.ins().iconst(types::I64, (n * self.bits / 8) as i64);
        for_range(b, zero, bytes, 1, |b, byte| {
            let first = b.ins().imul_imm_s(byte, per_byte as i64);
            let mut packed = b.ins().iconst(types::I32, 0);
            for j in 0..per_byte {
                let e = b.ins().iadd_imm_s(first, j as i64);
                let g = self.group_of(b, e, k);
                let at = address(b, scales, g, scale_bytes);
                let s = super::dequant::scale_at(b, self.scale, at);
                let xe = address(b, x, e, 4);
                let v = b.ins().load(types::F32, mem(), xe, 0);
                let ratio = b.ins().fdiv(v, s);
                let q = round_half_away_scalar(b, ratio);
                let z = b.ins().f32const(0.0);
                let zero_scale = b.ins().fcmp(FloatCC::Equal, s, z);
                let q = b.ins().select(zero_scale, z, q);
                let code = if self.symmetric {
                    clamp_to_int(b, q, -qmax, qmax)
                } else {
                    let zp = b.ins().iadd(zeros, g);
                    let point = b.ins().uload8(types::I32, mem(), zp, 0);
                    let point = b.ins().fcvt_from_sint(types::F32, point);
                    let shifted = b.ins().fadd(q, point);
                    clamp_to_int(b, shifted, 0.0, levels - 1.0)
                };
                let code = b.ins().band_imm_s(code, (1 << self.bits) - 1);
                let code = b.ins().ishl_imm_s(code, (j * self.bits) as i64);
                packed = b.ins().bor(packed, code);
            }
            let dest = b.ins().iadd(out, byte);
            b.ins().istore8(mem(), packed, dest, 0);
        });
    }

    /// The first member's element index of group `g` and the distance between members.
    fn members(&self, b: &mut FunctionBuilder, g: Value, k: usize) -> (Value, i64) {
        if self.axis == 0 {
            // Group (R, c): rows R * group .. of column c.
            let band = b.ins().udiv_imm_u(g, k as i64);
            let c = b.ins().urem_imm_u(g, k as i64);
            let row = b.ins().imul_imm_s(band, (self.group * k) as i64);
            (b.ins().iadd(row, c), k as i64)
        } else {
            (b.ins().imul_imm_s(g, self.group as i64), 1)
        }
    }

    /// The group of element `e` of a `[rows, k]` matrix.
    fn group_of(&self, b: &mut FunctionBuilder, e: Value, k: usize) -> Value {
        let r = b.ins().udiv_imm_u(e, k as i64);
        let c = b.ins().urem_imm_u(e, k as i64);
        if self.axis == 0 {
            let band = b.ins().udiv_imm_u(r, self.group as i64);
            let first = b.ins().imul_imm_s(band, k as i64);
            b.ins().iadd(first, c)
        } else {
            let per_row = b.ins().imul_imm_s(r, (k / self.group) as i64);
            let within = b.ins().udiv_imm_u(c, self.group as i64);
            b.ins().iadd(per_row, within)
        }
    }

    /// Stores scale `s` rounded to the scale type at `at`; returns the rounded value.
    fn store_scale(&self, b: &mut FunctionBuilder, s: Value, at: Value) -> Value {
        let rounded = round_scalar(b, self.scale, s);
        store_scale(b, self.scale, rounded, at);
        rounded
    }
}

/// `x` rounded to an integer, halves away from zero (C's `roundf`).
fn round_half_away_scalar(b: &mut FunctionBuilder, x: Value) -> Value {
    let lanes = b.ins().scalar_to_vector(types::F32X4, x);
    let r = round_half_away(b, lanes);
    b.ins().extractlane(r, 0)
}

/// `x` clamped to `lo..=hi` and truncated to an `i32` (Rust's `as` after `clamp`).
fn clamp_to_int(b: &mut FunctionBuilder, x: Value, lo: f32, hi: f32) -> Value {
    let lo = b.ins().f32const(lo);
    let hi = b.ins().f32const(hi);
    let x = b.ins().fmax(x, lo);
    let x = b.ins().fmin(x, hi);
    b.ins().fcvt_to_sint_sat(types::I32, x)
}

/// Stores a scale already rounded to `dtype` in its storage form at `at`.
fn store_scale(b: &mut FunctionBuilder, dtype: DType, s: Value, at: Value) {
    match dtype {
        DType::F16 => store_f16(b, s, at, 0),
        DType::BF16 => {
            let bits = b.ins().bitcast(types::I32, MemFlagsData::new(), s);
            let high = b.ins().ushr_imm_s(bits, 16);
            b.ins().istore16(mem(), high, at, 0);
        }
        _ => {
            b.ins().store(mem(), s, at, 0);
        }
    }
}

/// The index (`i32`) of the first NormalFloat level nearest to `x`.
fn nearest_level(b: &mut FunctionBuilder, x: Value) -> Value {
    let level = |b: &mut FunctionBuilder, i: usize| {
        let l = b.ins().f32const(NF4_LEVELS[i]);
        let d = b.ins().fsub(x, l);
        b.ins().fabs(d)
    };
    let mut best = b.ins().iconst(types::I32, 0);
    let mut best_distance = level(b, 0);
    for i in 1..NF4_LEVELS.len() {
        let d = level(b, i);
        let closer = b.ins().fcmp(FloatCC::LessThan, d, best_distance);
        let index = b.ins().iconst(types::I32, i as i64);
        best = b.ins().select(closer, index, best);
        best_distance = b.ins().select(closer, d, best_distance);
    }
    best
}

/// `1 / d`, or 0 when `d` is 0.
fn inverse(b: &mut FunctionBuilder, d: Value) -> Value {
    let one = b.ins().f32const(1.0);
    let inv = b.ins().fdiv(one, d);
    let zero = b.ins().f32const(0.0);
    let is_zero = b.ins().fcmp(FloatCC::Equal, d, zero);
    b.ins().select(is_zero, zero, inv)
}

/// q8_0: `d = max|x| / 127` and 32 codes `roundf(x / d)`, eight lanes of four at a time.
fn q8_0_block(b: &mut FunctionBuilder, xb: Value, ob: Value) {
    let xs: Vec<Value> = (0..8)
        .map(|c| b.ins().load(types::F32X4, mem(), xb, 16 * c))
        .collect();
    let mut most = b.ins().fabs(xs[0]);
    for &v in &xs[1..] {
        let a = b.ins().fabs(v);
        most = b.ins().fmax(most, a);
    }
    let amax = horizontal_max(b, most);
    let divisor = b.ins().f32const(127.0);
    let d = b.ins().fdiv(amax, divisor);
    let id = inverse(b, d);
    store_f16(b, d, ob, 0);
    let id = b.ins().splat(types::F32X4, id);
    let words: Vec<Value> = xs
        .iter()
        .map(|&v| {
            let scaled = b.ins().fmul(v, id);
            let rounded = round_half_away(b, scaled);
            b.ins().fcvt_to_sint_sat(types::I32X4, rounded)
        })
        .collect();
    // Saturating narrows: i32 to i16 to i8 (`as i8` saturates at the first step already,
    // as the codes are within ±128 by construction).
    for half in 0..2 {
        let w = &words[4 * half..4 * half + 4];
        let lo = b.ins().snarrow(w[0], w[1]);
        let hi = b.ins().snarrow(w[2], w[3]);
        let bytes = b.ins().snarrow(lo, hi);
        b.ins().store(mem(), bytes, ob, 2 + 16 * half as i32);
    }
}

/// `x` rounded to an integer, halves away from zero (C's `roundf`), lane by lane.
fn round_half_away(b: &mut FunctionBuilder, x: Value) -> Value {
    let t = b.ins().trunc(x);
    let rest = b.ins().fsub(x, t);
    let rest = b.ins().fabs(rest);
    let half = splat(b, 0.5);
    let away = b.ins().fcmp(FloatCC::GreaterThanOrEqual, rest, half);
    // ±1 with x's sign (`fcopysign` has no vector form on x86-64): x's sign bit or-ed
    // into 1.0's bits, kept where the rest reaches one half.
    let flags = MemFlagsData::new();
    let bits = b.ins().bitcast(types::I32X4, flags, x);
    let sign = b.ins().iconst(types::I32, i64::from(i32::MIN));
    let sign = b.ins().splat(types::I32X4, sign);
    let sign = b.ins().band(bits, sign);
    let one = b.ins().iconst(types::I32, i64::from(1f32.to_bits()));
    let one = b.ins().splat(types::I32X4, one);
    let step = b.ins().bor(sign, one);
    let step = b.ins().band(step, away);
    let step = b.ins().bitcast(types::F32X4, flags, step);
    b.ins().fadd(t, step)
}

/// q4_0: `d = m / -8` for the value `m` of largest magnitude (the first such), codes
/// `trunc(x / d + 8.5)` clamped to 0..=15, values `j` and `j + 16` in byte `j`.
fn q4_0_block(b: &mut FunctionBuilder, xb: Value, ob: Value) {
    let zero = b.ins().f32const(0.0);
    let (mut amax, mut max) = (zero, zero);
    for j in 0..32 {
        let v = b.ins().load(types::F32, mem(), xb, 4 * j);
        let a = b.ins().fabs(v);
        let larger = b.ins().fcmp(FloatCC::LessThan, amax, a);
        amax = b.ins().select(larger, a, amax);
        max = b.ins().select(larger, v, max);
    }
    let minus_eight = b.ins().f32const(-8.0);
    let d = b.ins().fdiv(max, minus_eight);
    let id = inverse(b, d);
    store_f16(b, d, ob, 0);
    let bias = b.ins().f32const(8.5);
    // Multiplied, then added: two roundings, as the reference computes it.
    pack_nibbles(b, xb, ob, 2, |b, v| {
        let scaled = b.ins().fmul(v, id);
        b.ins().fadd(scaled, bias)
    });
}

/// q4_1: `d = (max - min) / 15`, codes `trunc((x - min) / d + 0.5)` clamped to 0..=15.
fn q4_1_block(b: &mut FunctionBuilder, xb: Value, ob: Value) {
    // The reference's (ggml's) strict comparisons: the first of equal values stays.
    let mut min = b.ins().f32const(f32::MAX);
    let mut max = b.ins().f32const(-f32::MAX);
    for j in 0..32 {
        let v = b.ins().load(types::F32, mem(), xb, 4 * j);
        let lower = b.ins().fcmp(FloatCC::LessThan, v, min);
        min = b.ins().select(lower, v, min);
        let higher = b.ins().fcmp(FloatCC::GreaterThan, v, max);
        max = b.ins().select(higher, v, max);
    }
    let range = b.ins().fsub(max, min);
    let fifteen = b.ins().f32const(15.0);
    let d = b.ins().fdiv(range, fifteen);
    let id = inverse(b, d);
    store_f16(b, d, ob, 0);
    store_f16(b, min, ob, 2);
    let half = b.ins().f32const(0.5);
    pack_nibbles(b, xb, ob, 4, |b, v| {
        let shifted = b.ins().fsub(v, min);
        let scaled = b.ins().fmul(shifted, id);
        b.ins().fadd(scaled, half)
    });
}

/// Stores the 16 bytes of nibbles at `ob + at`: value `j`'s code in the low nibble of
/// byte `j`, value `j + 16`'s in the high nibble, each code `biased(x)` truncated and
/// clamped to 0..=15.
fn pack_nibbles(
    b: &mut FunctionBuilder,
    xb: Value,
    ob: Value,
    at: i32,
    biased: impl Fn(&mut FunctionBuilder, Value) -> Value,
) {
    let code = |b: &mut FunctionBuilder, j: i32| {
        let v = b.ins().load(types::F32, mem(), xb, 4 * j);
        let t = biased(b, v);
        // `as i8` saturates (NaN to 0), then the clamp.
        let q = b.ins().fcvt_to_sint_sat(types::I32, t);
        let lo = b.ins().iconst(types::I32, 0);
        let hi = b.ins().iconst(types::I32, 15);
        let q = b.ins().smax(q, lo);
        b.ins().smin(q, hi)
    };
    for j in 0..16 {
        let low = code(b, j);
        let high = code(b, j + 16);
        let high = b.ins().ishl_imm_s(high, 4);
        let byte = b.ins().bor(low, high);
        b.ins().istore8(mem(), byte, ob, at + j);
    }
}

/// Stores `x` as the bits of the nearest f16 (ties to even) at `at + offset`.
pub(super) fn store_f16(b: &mut FunctionBuilder, x: Value, at: Value, offset: i32) {
    let bits = f16_bits(b, x);
    b.ins().istore16(mem(), bits, at, offset);
}

/// The f16 bits (in an `i32`) of the f16 nearest to `x`: `x` rounded to f16 precision
/// ([`round_scalar`]), then re-encoded: the exponent rebiased for normal values, the multiple
/// of 2^-24 for subnormal ones, infinity and NaN kept.
pub fn f16_bits(b: &mut FunctionBuilder, x: Value) -> Value {
    let r = round_scalar(b, DType::F16, x);
    let flags = MemFlagsData::new();
    let u = b.ins().bitcast(types::I32, flags, r);
    let sign = b.ins().ushr_imm_s(u, 16);
    let sign = b.ins().band_imm_s(sign, 0x8000);
    let a = b.ins().band_imm_s(u, 0x7fff_ffff);
    // Normal: exponent 127 -> 15, mantissa's top 10 bits.
    let shifted = b.ins().ushr_imm_s(a, 13);
    let normal = b.ins().iadd_imm_s(shifted, -((127 - 15) << 10));
    // Subnormal: the multiple of 2^-24.
    let fa = b.ins().bitcast(types::F32, flags, a);
    let up = b.ins().f32const(16_777_216.0);
    let units = b.ins().fmul(fa, up);
    let sub = b.ins().fcvt_to_sint_sat(types::I32, units);
    let is_small = b.ins().icmp_imm_s(IntCC::SignedLessThan, a, 0x3880_0000);
    let magnitude = b.ins().select(is_small, sub, normal);
    // Infinity (0x7c00) and NaN (quiet, 0x7e00).
    let is_inf = b.ins().icmp_imm_s(IntCC::Equal, a, 0x7f80_0000);
    let inf = b.ins().iconst(types::I32, 0x7c00);
    let magnitude = b.ins().select(is_inf, inf, magnitude);
    let is_nan = b.ins().icmp_imm_s(IntCC::SignedGreaterThan, a, 0x7f80_0000);
    let nan = b.ins().iconst(types::I32, 0x7e00);
    let magnitude = b.ins().select(is_nan, nan, magnitude);
    b.ins().bor(magnitude, sign)
}
