//! `llm.quantize` into the K-quants in generated code: q4_k, q6_k and q2_k super-blocks of
//! 256 values, byte for byte as the reference quantizes (ggml's reference quantizers).
//!
//! Each sub-block's scale (and minimum) comes from a search over candidate scales that
//! keeps the one with the least weighted error (`make_qkx2_quants` for q4_k and q2_k,
//! `make_qx_quants` for q6_k); the scales are then quantized against the super-block's
//! largest, and every code is recomputed from the stored scales. The generated code does
//! the reference's float operations in the reference's order, one value at a time, with
//! its strict comparisons and ggml's `nearest_int` (the magic-number rounding), so every
//! byte is the reference's. The codes of a super-block wait in a stack slot until they
//! are packed.

use cranelift_codegen::ir::{
    InstBuilder, MemFlagsData, StackSlotData, StackSlotKind, Value,
    condcodes::{FloatCC, IntCC},
    types,
};
use cranelift_frontend::{FunctionBuilder, Variable};
use llm_ir::dtype::DType;

use super::{
    convert::round_scalar,
    emit::{address, for_range, mem},
    quantize::store_f16,
};
use crate::kernel::WeightFormat;

/// Values in a super-block.
const SUPER_BLOCK: i64 = 256;

/// Byte offsets in the stack slot: the codes of the super-block, then the sub-blocks'
/// float scales, then their minimums.
const SCALES_AT: i32 = 256;
const MINS_AT: i32 = SCALES_AT + 64;
const SLOT_BYTES: u32 = (MINS_AT + 64) as u32;

/// Below this magnitude a sub-block is all zeros (ggml's `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Emits the quantization of the `p[2]` floats at `p[0]` (a multiple of 256) into the
/// K-quant `format`'s super-blocks at `p[1]`.
pub fn emit_kquantize(b: &mut FunctionBuilder, format: WeightFormat, p: &[Value]) {
    let (x, out) = (p[0], p[1]);
    let slot = b.create_sized_stack_slot(StackSlotData::new(
        StackSlotKind::ExplicitSlot,
        SLOT_BYTES,
        4,
    ));
    let block_bytes = format.row_bytes(SUPER_BLOCK as usize) as i64;
    let zero = b.ins().iconst(types::I64, 0);
    let end = b.ins().ushr_imm_u(p[2], 8);
    for_range(b, zero, end, 1, |b, blk| {
        let xb = address(b, x, blk, 4 * SUPER_BLOCK);
        let ob = address(b, out, blk, block_bytes);
        let scratch = b.ins().stack_addr(types::I64, slot, 0);
        match format {
            WeightFormat::Q4K => q4_k_block(b, xb, ob, scratch),
            WeightFormat::Q6K => q6_k_block(b, xb, ob, scratch),
            WeightFormat::Q2K => q2_k_block(b, xb, ob, scratch),
            other => unreachable!("no K-quant quantizer for {other:?}"),
        }
    });
}

/// q4_k: eight sub-blocks of 32 with weights `sqrt(mean(x^2)) + |x|`, 4-bit codes; scales
/// and minimums quantized to 6 bits against the largest of each (`d`, `dmin` in f16).
fn q4_k_block(b: &mut FunctionBuilder, xb: Value, ob: Value, scratch: Value) {
    let search = ScaleMinSearch {
        nmax: 15,
        n: 32,
        rmin: -1.0,
        rdelta: 0.1,
        nstep: 20,
        absolute: false,
    };
    let zero = b.ins().iconst(types::I64, 0);
    let subs = b.ins().iconst(types::I64, 8);
    for_range(b, zero, subs, 1, |b, j| {
        let xs = address(b, xb, j, 4 * 32);
        let sum_x2 = fold_values(b, xs, 32, |b, acc, v| {
            let sq = b.ins().fmul(v, v);
            b.ins().fadd(acc, sq)
        });
        let count = b.ins().f32const(32.0);
        let mean = b.ins().fdiv(sum_x2, count);
        let av_x = b.ins().sqrt(mean);
        let codes = address(b, scratch, j, 32);
        let weight = |b: &mut FunctionBuilder, v: Value| {
            let a = b.ins().fabs(v);
            b.ins().fadd(av_x, a)
        };
        let (scale, min) = search.emit(b, xs, codes, &weight);
        store_sub_block_pair(b, scratch, j, scale, min);
    });
    let scales = load_floats(b, scratch, SCALES_AT, 8);
    let mins = load_floats(b, scratch, MINS_AT, 8);
    let (max_scale, max_min) = (largest(b, &scales), largest(b, &mins));
    // 6-bit levels: `min(nearest_int(63 / max * s), 63)`, as bytes (`as u8` wraps).
    let six_bits = |b: &mut FunctionBuilder, max: Value, values: &[Value]| -> Vec<Value> {
        let sixty_three = b.ins().f32const(63.0);
        let inv = b.ins().fdiv(sixty_three, max);
        let z = b.ins().f32const(0.0);
        let positive = b.ins().fcmp(FloatCC::GreaterThan, max, z);
        let inv = b.ins().select(positive, inv, z);
        values
            .iter()
            .map(|&s| {
                let scaled = b.ins().fmul(inv, s);
                let l = nearest_int(b, scaled);
                let cap = b.ins().iconst(types::I32, 63);
                let l = b.ins().smin(l, cap);
                b.ins().band_imm_s(l, 0xff)
            })
            .collect()
    };
    let ls = six_bits(b, max_scale, &scales);
    let lm = six_bits(b, max_min, &mins);
    // The reference's packing of the twelve scale bytes.
    let mut packed: Vec<Value> = Vec::with_capacity(12);
    packed.extend_from_slice(&ls[..4]);
    packed.extend_from_slice(&lm[..4]);
    for j in 4..8 {
        let low = b.ins().band_imm_s(ls[j], 0xf);
        let high = b.ins().band_imm_s(lm[j], 0xf);
        let high = b.ins().ishl_imm_s(high, 4);
        packed.push(b.ins().bor(low, high));
    }
    for j in 4..8 {
        for (at, l) in [(j - 4, ls[j]), (j, lm[j])] {
            let top = b.ins().ushr_imm_s(l, 4);
            let top = b.ins().ishl_imm_s(top, 6);
            let top = b.ins().band_imm_s(top, 0xff);
            packed[at] = b.ins().bor(packed[at], top);
        }
    }
    for (i, &byte) in packed.iter().enumerate() {
        b.ins().istore8(mem(), byte, ob, 4 + i as i32);
    }
    let d = f16_of_ratio(b, max_scale, 63.0);
    let dmin = f16_of_ratio(b, max_min, 63.0);
    store_f16(b, d, ob, 0);
    store_f16(b, dmin, ob, 2);
    // Every code again from the stored (decoded) scale and minimum.
    for j in 0..8 {
        let (sc, m) = scale_min_k4(b, &packed, j);
        let levels = ScaleMinLevels { d, sc, dmin, m };
        levels.recode(b, (xb, scratch), 32 * j as i64, 32, 15);
    }
    // Codes `l` and `l + 32` of each 64 share a byte, low nibble first.
    by_column(b, scratch, ob, |b, codes, dest| {
        for j in 0..4 {
            let lo = b.ins().uload8(types::I32, mem(), codes, 64 * j);
            let hi = b.ins().uload8(types::I32, mem(), codes, 64 * j + 32);
            let hi = b.ins().ishl_imm_s(hi, 4);
            let byte = b.ins().bor(lo, hi);
            b.ins().istore8(mem(), byte, dest, 16 + 32 * j);
        }
    });
}

/// q6_k: sixteen sub-blocks of 16 with signed scales from `make_qx_quants`, quantized to
/// i8 against the one of largest magnitude (`d` in f16); 6-bit codes offset by 32.
fn q6_k_block(b: &mut FunctionBuilder, xb: Value, ob: Value, scratch: Value) {
    let zero = b.ins().iconst(types::I64, 0);
    let subs = b.ins().iconst(types::I64, 16);
    for_range(b, zero, subs, 1, |b, j| {
        let xs = address(b, xb, j, 4 * 16);
        let codes = address(b, scratch, j, 16);
        let scale = signed_scale(b, xs, codes);
        let at = address(b, scratch, j, 4);
        b.ins().store(mem(), scale, at, SCALES_AT);
    });
    let scales = load_floats(b, scratch, SCALES_AT, 16);
    // The first scale of largest magnitude.
    let z = b.ins().f32const(0.0);
    let (mut max_scale, mut max_abs) = (z, z);
    for &s in &scales {
        let a = b.ins().fabs(s);
        let larger = b.ins().fcmp(FloatCC::GreaterThan, a, max_abs);
        max_abs = b.ins().select(larger, a, max_abs);
        max_scale = b.ins().select(larger, s, max_scale);
    }
    let eps = b.ins().f32const(GROUP_MAX_EPS);
    let empty = b.ins().fcmp(FloatCC::LessThan, max_abs, eps);
    let (zeros, coded, done) = (b.create_block(), b.create_block(), b.create_block());
    b.ins().brif(empty, zeros, &[], coded, &[]);

    // An all-but-zero super-block: every byte zero.
    b.switch_to_block(zeros);
    let nothing = b.ins().iconst(types::I64, 0);
    for offset in (0..208).step_by(8) {
        b.ins().store(mem(), nothing, ob, offset);
    }
    b.ins().istore16(mem(), nothing, ob, 208);
    b.ins().jump(done, &[]);

    b.switch_to_block(coded);
    let minus_128 = b.ins().f32const(-128.0);
    let iscale = b.ins().fdiv(minus_128, max_scale);
    let one = b.ins().f32const(1.0);
    let inverse = b.ins().fdiv(one, iscale);
    let d = round_scalar(b, DType::F16, inverse);
    store_f16(b, d, ob, 208);
    for (j, &s) in scales.iter().enumerate() {
        // `min(nearest_int(iscale * s), 127) as i8`.
        let scaled = b.ins().fmul(iscale, s);
        let l = nearest_int(b, scaled);
        let cap = b.ins().iconst(types::I32, 127);
        let l = b.ins().smin(l, cap);
        b.ins().istore8(mem(), l, ob, 192 + j as i32);
        let l = b.ins().ishl_imm_s(l, 24);
        let sc = b.ins().sshr_imm_s(l, 24);
        let dl = times_level(b, d, sc);
        recode(b, (xb, scratch), 16 * j as i64, 16, dl, |b, v| {
            let q = b.ins().fdiv(v, dl);
            let l = nearest_int(b, q);
            let l = clamp_int(b, l, -32, 31);
            b.ins().iadd_imm_s(l, 32)
        });
    }
    // Low nibbles of codes `l` and `l + 64` share a byte of `ql` (and `l + 32`,
    // `l + 96`); their two high bits fill a byte of `qh`; per half of 128 codes.
    by_column(b, scratch, ob, |b, codes, dest| {
        for half in 0..2 {
            let q: Vec<Value> = (0..4)
                .map(|i| {
                    b.ins()
                        .uload8(types::I32, mem(), codes, 128 * half + 32 * i)
                })
                .collect();
            for (at, lo, hi) in [(0, q[0], q[2]), (32, q[1], q[3])] {
                let lo = b.ins().band_imm_s(lo, 0xf);
                let hi = b.ins().band_imm_s(hi, 0xf);
                let hi = b.ins().ishl_imm_s(hi, 4);
                let byte = b.ins().bor(lo, hi);
                b.ins().istore8(mem(), byte, dest, 64 * half + at);
            }
            let mut high = b.ins().iconst(types::I32, 0);
            for (i, &c) in q.iter().enumerate() {
                let top = b.ins().ushr_imm_s(c, 4);
                let top = b.ins().ishl_imm_s(top, 2 * i as i64);
                high = b.ins().bor(high, top);
            }
            b.ins().istore8(mem(), high, dest, 128 + 32 * half);
        }
    });
    b.ins().jump(done, &[]);
    b.switch_to_block(done);
}

/// q2_k: sixteen sub-blocks of 16 with weights `|x|` (absolute errors), 2-bit codes;
/// scales and minimums quantized to 4 bits against the largest of each.
fn q2_k_block(b: &mut FunctionBuilder, xb: Value, ob: Value, scratch: Value) {
    let search = ScaleMinSearch {
        nmax: 3,
        n: 16,
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        absolute: true,
    };
    let zero = b.ins().iconst(types::I64, 0);
    let subs = b.ins().iconst(types::I64, 16);
    for_range(b, zero, subs, 1, |b, j| {
        let xs = address(b, xb, j, 4 * 16);
        let codes = address(b, scratch, j, 16);
        let weight = |b: &mut FunctionBuilder, v: Value| b.ins().fabs(v);
        let (scale, min) = search.emit(b, xs, codes, &weight);
        store_sub_block_pair(b, scratch, j, scale, min);
    });
    let scales = load_floats(b, scratch, SCALES_AT, 16);
    let mins = load_floats(b, scratch, MINS_AT, 16);
    let (max_scale, max_min) = (largest(b, &scales), largest(b, &mins));
    // 4-bit levels `nearest_int(15 / max * s)` (bytes; zero when the largest is not
    // positive), with `max / 15` in f16 (or zero).
    let four_bits = |b: &mut FunctionBuilder, max: Value, values: &[Value]| {
        let z = b.ins().f32const(0.0);
        let positive = b.ins().fcmp(FloatCC::GreaterThan, max, z);
        let fifteen = b.ins().f32const(15.0);
        let inv = b.ins().fdiv(fifteen, max);
        let none = b.ins().iconst(types::I32, 0);
        let levels: Vec<Value> = values
            .iter()
            .map(|&s| {
                let scaled = b.ins().fmul(inv, s);
                let l = nearest_int(b, scaled);
                let l = b.ins().band_imm_s(l, 0xff);
                b.ins().select(positive, l, none)
            })
            .collect();
        let d = f16_of_ratio(b, max, 15.0);
        (levels, b.ins().select(positive, d, z))
    };
    let (ls, d) = four_bits(b, max_scale, &scales);
    let (lm, dmin) = four_bits(b, max_min, &mins);
    store_f16(b, d, ob, 80);
    store_f16(b, dmin, ob, 82);
    for j in 0..16 {
        let high = b.ins().ishl_imm_s(lm[j], 4);
        let byte = b.ins().bor(ls[j], high);
        let byte = b.ins().band_imm_s(byte, 0xff);
        b.ins().istore8(mem(), byte, ob, j as i32);
        let sc = b.ins().band_imm_s(byte, 0xf);
        let m = b.ins().ushr_imm_s(byte, 4);
        let levels = ScaleMinLevels { d, sc, dmin, m };
        levels.recode(b, (xb, scratch), 16 * j as i64, 16, 3);
    }
    // Codes `l`, `l + 32`, `l + 64`, `l + 96` of each 128 share a byte, low bits first.
    by_column(b, scratch, ob, |b, codes, dest| {
        for half in 0..2 {
            let mut byte = b.ins().iconst(types::I32, 0);
            for i in 0..4 {
                let c = b
                    .ins()
                    .uload8(types::I32, mem(), codes, 128 * half + 32 * i);
                let c = b.ins().ishl_imm_s(c, 2 * i as i64);
                byte = b.ins().bor(byte, c);
            }
            b.ins().istore8(mem(), byte, dest, 16 + 32 * half);
        }
    });
}

/// ggml's `make_qkx2_quants`: the scale and minimum (`x ~ scale * l - min`, `l` in
/// `0..=nmax`) of least weighted error among `nstep + 1` candidates besides the plain
/// range's.
struct ScaleMinSearch {
    nmax: i32,
    n: i64,
    rmin: f32,
    rdelta: f32,
    nstep: i64,
    /// Absolute errors (else squared).
    absolute: bool,
}

impl ScaleMinSearch {
    /// Emits the search over the `n` floats at `xs`, each weighted by `weight(x)`; writes
    /// the codes to the bytes at `codes` and returns `(scale, -min)`.
    fn emit(
        &self,
        b: &mut FunctionBuilder,
        xs: Value,
        codes: Value,
        weight: &dyn Fn(&mut FunctionBuilder, Value) -> Value,
    ) -> (Value, Value) {
        // The range (with zero in it) and the weighted sums, from the first value on.
        let x0 = b.ins().load(types::F32, mem(), xs, 0);
        let w0 = weight(b, x0);
        let wx0 = b.ins().fmul(w0, x0);
        let [min, max, sum_w, sum_x] = vars(b, [x0, x0, w0, wx0]);
        let one = b.ins().iconst(types::I64, 1);
        let n = b.ins().iconst(types::I64, self.n);
        for_range(b, one, n, 1, |b, i| {
            let v = load_at(b, xs, i);
            keep_if(b, min, FloatCC::LessThan, v);
            keep_if(b, max, FloatCC::GreaterThan, v);
            let w = weight(b, v);
            add_to(b, sum_w, w);
            let wx = b.ins().fmul(w, v);
            add_to(b, sum_x, wx);
        });
        let z = b.ins().f32const(0.0);
        let low = b.use_var(min);
        let positive = b.ins().fcmp(FloatCC::GreaterThan, low, z);
        let low = b.ins().select(positive, z, low);
        b.def_var(min, low);
        let high = b.use_var(max);
        let [scale, result_min] = vars(b, [z, low]);
        let zero = b.ins().iconst(types::I64, 0);
        let (flat, search, done) = (b.create_block(), b.create_block(), b.create_block());
        let equal = b.ins().fcmp(FloatCC::Equal, high, low);
        b.ins().brif(equal, flat, &[], search, &[]);

        // No range: codes 0, scale 0, the minimum as it is.
        b.switch_to_block(flat);
        let nothing = b.ins().iconst(types::I32, 0);
        for_range(b, zero, n, 1, |b, i| {
            let at = b.ins().iadd(codes, i);
            b.ins().istore8(mem(), nothing, at, 0);
        });
        b.ins().jump(done, &[]);

        b.switch_to_block(search);
        let range = b.ins().fsub(high, low);
        let nmax = b.ins().f32const(self.nmax as f32);
        let iscale = b.ins().fdiv(nmax, range);
        let unit = b.ins().f32const(1.0);
        let first_scale = b.ins().fdiv(unit, iscale);
        b.def_var(scale, first_scale);
        let [best_error] = vars(b, [z]);
        for_range(b, zero, n, 1, |b, i| {
            let v = load_at(b, xs, i);
            let l = self.level(b, iscale, low, v);
            let at = b.ins().iadd(codes, i);
            b.ins().istore8(mem(), l, at, 0);
            let e = self.error(b, (first_scale, low), l, v);
            let w = weight(b, v);
            let we = b.ins().fmul(w, e);
            add_to(b, best_error, we);
        });
        let steps = b.ins().iconst(types::I64, self.nstep + 1);
        // The reference searches from the best minimum so far (the range changes too).
        for_range(b, zero, steps, 1, |b, step| {
            let low = b.use_var(result_min);
            let range = b.ins().fsub(high, low);
            let step = b.ins().fcvt_from_sint(types::F32, step);
            let rdelta = b.ins().f32const(self.rdelta);
            let offset = b.ins().fmul(rdelta, step);
            let rmin = b.ins().f32const(self.rmin);
            let top = b.ins().fadd(rmin, offset);
            let top = b.ins().fadd(top, nmax);
            let iscale = b.ins().fdiv(top, range);
            let [sum_l, sum_l2, sum_xl] = vars(b, [z; 3]);
            for_range(b, zero, n, 1, |b, i| {
                let v = load_at(b, xs, i);
                let l = self.level(b, iscale, low, v);
                let l = b.ins().fcvt_from_sint(types::F32, l);
                let w = weight(b, v);
                let wl = b.ins().fmul(w, l);
                add_to(b, sum_l, wl);
                let wll = b.ins().fmul(wl, l);
                add_to(b, sum_l2, wll);
                let wlx = b.ins().fmul(wl, v);
                add_to(b, sum_xl, wlx);
            });
            let (sum_w, sum_x) = (b.use_var(sum_w), b.use_var(sum_x));
            let (sum_l, sum_l2, sum_xl) = (b.use_var(sum_l), b.use_var(sum_l2), b.use_var(sum_xl));
            let det = difference_of_products(b, (sum_w, sum_l2), (sum_l, sum_l));
            let this_scale = difference_of_products(b, (sum_w, sum_xl), (sum_x, sum_l));
            let this_scale = b.ins().fdiv(this_scale, det);
            let this_min = difference_of_products(b, (sum_l2, sum_x), (sum_l, sum_xl));
            let this_min = b.ins().fdiv(this_min, det);
            let positive = b.ins().fcmp(FloatCC::GreaterThan, this_min, z);
            let this_min = b.ins().select(positive, z, this_min);
            let through_zero = b.ins().fdiv(sum_xl, sum_l2);
            let this_scale = b.ins().select(positive, through_zero, this_scale);
            let (measure, next) = (b.create_block(), b.create_block());
            let solvable = b.ins().fcmp(FloatCC::GreaterThan, det, z);
            b.ins().brif(solvable, measure, &[], next, &[]);

            b.switch_to_block(measure);
            let [error] = vars(b, [z]);
            for_range(b, zero, n, 1, |b, i| {
                let v = load_at(b, xs, i);
                let l = self.level(b, iscale, low, v);
                let e = self.error(b, (this_scale, this_min), l, v);
                let w = weight(b, v);
                let we = b.ins().fmul(w, e);
                add_to(b, error, we);
            });
            let error = b.use_var(error);
            let best = b.use_var(best_error);
            let better = b.ins().fcmp(FloatCC::LessThan, error, best);
            let take = b.create_block();
            b.ins().brif(better, take, &[], next, &[]);

            b.switch_to_block(take);
            for_range(b, zero, n, 1, |b, i| {
                let v = load_at(b, xs, i);
                let l = self.level(b, iscale, low, v);
                let at = b.ins().iadd(codes, i);
                b.ins().istore8(mem(), l, at, 0);
            });
            b.def_var(best_error, error);
            b.def_var(scale, this_scale);
            b.def_var(result_min, this_min);
            b.ins().jump(next, &[]);
            b.switch_to_block(next);
        });
        b.ins().jump(done, &[]);

        b.switch_to_block(done);
        let min = b.use_var(result_min);
        (b.use_var(scale), b.ins().fneg(min))
    }

    /// `clamp(nearest_int(iscale * (v - min)), 0, nmax)`.
    fn level(&self, b: &mut FunctionBuilder, iscale: Value, min: Value, v: Value) -> Value {
        let shifted = b.ins().fsub(v, min);
        let scaled = b.ins().fmul(iscale, shifted);
        let l = nearest_int(b, scaled);
        clamp_int(b, l, 0, self.nmax)
    }

    /// The error of code `l` for `v`: `|d|` or `d^2` for `d = scale * l + min - v`.
    fn error(
        &self,
        b: &mut FunctionBuilder,
        (scale, min): (Value, Value),
        l: Value,
        v: Value,
    ) -> Value {
        let l = b.ins().fcvt_from_sint(types::F32, l);
        let d = b.ins().fmul(scale, l);
        let d = b.ins().fadd(d, min);
        let d = b.ins().fsub(d, v);
        if self.absolute {
            b.ins().fabs(d)
        } else {
            b.ins().fmul(d, d)
        }
    }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` for q6_k's sixteen values at `xs`: the
/// signed scale of codes in `-32..32` (written at `codes` offset by 32) weighted by `x^2`,
/// the best of the plain one and 18 candidates around it.
fn signed_scale(b: &mut FunctionBuilder, xs: Value, codes: Value) -> Value {
    const NMAX: i32 = 32;
    const N: i64 = 16;
    let z = b.ins().f32const(0.0);
    let [max, amax] = vars(b, [z, z]);
    let zero = b.ins().iconst(types::I64, 0);
    let n = b.ins().iconst(types::I64, N);
    for_range(b, zero, n, 1, |b, i| {
        let v = load_at(b, xs, i);
        let a = b.ins().fabs(v);
        let old = b.use_var(amax);
        let larger = b.ins().fcmp(FloatCC::GreaterThan, a, old);
        let new = b.ins().select(larger, a, old);
        b.def_var(amax, new);
        let old = b.use_var(max);
        let new = b.ins().select(larger, v, old);
        b.def_var(max, new);
    });
    let max = b.use_var(max);
    let amax = b.use_var(amax);
    let [scale] = vars(b, [z]);
    let level = |b: &mut FunctionBuilder, iscale: Value, v: Value| {
        let scaled = b.ins().fmul(iscale, v);
        let l = nearest_int(b, scaled);
        clamp_int(b, l, -NMAX, NMAX - 1)
    };
    // `sum(w x l)` and `sum(w l^2)` with `w = x^2`.
    let sums = |b: &mut FunctionBuilder, iscale: Value| {
        let [lx, l2] = vars(b, [z, z]);
        for_range(b, zero, n, 1, |b, i| {
            let v = load_at(b, xs, i);
            let l = level(b, iscale, v);
            let l = b.ins().fcvt_from_sint(types::F32, l);
            let w = b.ins().fmul(v, v);
            let wx = b.ins().fmul(w, v);
            let wxl = b.ins().fmul(wx, l);
            add_to(b, lx, wxl);
            let wl = b.ins().fmul(w, l);
            let wll = b.ins().fmul(wl, l);
            add_to(b, l2, wll);
        });
        (b.use_var(lx), b.use_var(l2))
    };
    let write_codes = |b: &mut FunctionBuilder, iscale: Value| {
        for_range(b, zero, n, 1, |b, i| {
            let v = load_at(b, xs, i);
            let l = level(b, iscale, v);
            let l = b.ins().iadd_imm_s(l, i64::from(NMAX));
            let at = b.ins().iadd(codes, i);
            b.ins().istore8(mem(), l, at, 0);
        });
    };
    let (flat, search, done) = (b.create_block(), b.create_block(), b.create_block());
    let eps = b.ins().f32const(GROUP_MAX_EPS);
    let tiny = b.ins().fcmp(FloatCC::LessThan, amax, eps);
    b.ins().brif(tiny, flat, &[], search, &[]);

    b.switch_to_block(flat);
    let nothing = b.ins().iconst(types::I64, 0);
    b.ins().store(mem(), nothing, codes, 0);
    b.ins().store(mem(), nothing, codes, 8);
    b.ins().jump(done, &[]);

    b.switch_to_block(search);
    let nmax = b.ins().f32const(NMAX as f32);
    let minus_nmax = b.ins().fneg(nmax);
    let iscale = b.ins().fdiv(minus_nmax, max);
    let (sumlx, suml2) = sums(b, iscale);
    write_codes(b, iscale);
    let ratio = b.ins().fdiv(sumlx, suml2);
    let nonzero = b.ins().fcmp(FloatCC::NotEqual, suml2, z);
    let first = b.ins().select(nonzero, ratio, z);
    b.def_var(scale, first);
    let first_best = b.ins().fmul(first, sumlx);
    let [best] = vars(b, [first_best]);
    // Candidates `is` in -9..=9 but 0, as steps 0..19 less 9.
    let candidates = b.ins().iconst(types::I64, 19);
    for_range(b, zero, candidates, 1, |b, step| {
        let is = b.ins().iadd_imm_s(step, -9);
        let not_plain = b.ins().icmp_imm_s(IntCC::NotEqual, is, 0);
        let is = b.ins().fcvt_from_sint(types::F32, is);
        let tenth = b.ins().f32const(0.1);
        let offset = b.ins().fmul(tenth, is);
        let top = b.ins().fadd(nmax, offset);
        let top = b.ins().fneg(top);
        let iscale = b.ins().fdiv(top, max);
        let (sumlx, suml2) = sums(b, iscale);
        let square = b.ins().fmul(sumlx, sumlx);
        let old = b.use_var(best);
        let bound = b.ins().fmul(old, suml2);
        let gains = b.ins().fcmp(FloatCC::GreaterThan, square, bound);
        let positive = b.ins().fcmp(FloatCC::GreaterThan, suml2, z);
        let better = b.ins().band(gains, positive);
        let better = b.ins().band(better, not_plain);
        let (take, next) = (b.create_block(), b.create_block());
        b.ins().brif(better, take, &[], next, &[]);

        b.switch_to_block(take);
        write_codes(b, iscale);
        let s = b.ins().fdiv(sumlx, suml2);
        b.def_var(scale, s);
        let new_best = b.ins().fmul(s, sumlx);
        b.def_var(best, new_best);
        b.ins().jump(next, &[]);
        b.switch_to_block(next);
    });
    b.ins().jump(done, &[]);
    b.switch_to_block(done);
    b.use_var(scale)
}

/// ggml's `nearest_int`: `x` rounded to the nearest integer, ties to even, from the low
/// mantissa bits of `x + 1.5 * 2^23` (exact for `|x| < 2^22`).
fn nearest_int(b: &mut FunctionBuilder, x: Value) -> Value {
    let magic = b.ins().f32const(12_582_912.0);
    let shifted = b.ins().fadd(x, magic);
    let bits = b.ins().bitcast(types::I32, MemFlagsData::new(), shifted);
    let mantissa = b.ins().band_imm_s(bits, 0x007f_ffff);
    b.ins().iadd_imm_s(mantissa, -0x0040_0000)
}

/// The `i32` `v` clamped to `lo..=hi`.
fn clamp_int(b: &mut FunctionBuilder, v: Value, lo: i32, hi: i32) -> Value {
    let lo = b.ins().iconst(types::I32, i64::from(lo));
    let hi = b.ins().iconst(types::I32, i64::from(hi));
    let v = b.ins().smax(v, lo);
    b.ins().smin(v, hi)
}

/// `max / divisor` rounded to f16 (the stored super-block scale, as an f32).
fn f16_of_ratio(b: &mut FunctionBuilder, max: Value, divisor: f32) -> Value {
    let divisor = b.ins().f32const(divisor);
    let ratio = b.ins().fdiv(max, divisor);
    round_scalar(b, DType::F16, ratio)
}

/// `d * level` for an `i32` level.
fn times_level(b: &mut FunctionBuilder, d: Value, level: Value) -> Value {
    let level = b.ins().fcvt_from_sint(types::F32, level);
    b.ins().fmul(d, level)
}

/// A sub-block's stored scale and minimum: `d * sc` and `dmin * m` (q4_k, q2_k).
struct ScaleMinLevels {
    d: Value,
    sc: Value,
    dmin: Value,
    m: Value,
}

impl ScaleMinLevels {
    /// Recodes the `len` values from `first` on as `clamp(nearest_int((x + dmin * m) /
    /// (d * sc)), 0, nmax)`, keeping the search's codes where `d * sc` is zero.
    fn recode(
        &self,
        b: &mut FunctionBuilder,
        (xb, codes): (Value, Value),
        first: i64,
        len: i64,
        nmax: i32,
    ) {
        let dl = times_level(b, self.d, self.sc);
        let ml = times_level(b, self.dmin, self.m);
        recode(b, (xb, codes), first, len, dl, |b, v| {
            let shifted = b.ins().fadd(v, ml);
            let q = b.ins().fdiv(shifted, dl);
            let l = nearest_int(b, q);
            clamp_int(b, l, 0, nmax)
        });
    }
}

/// Emits `pack(codes + l, out + l)` for each column `l` in `0..32`: the K-quants pack the
/// codes `l`, `l + 32`, ... of the stack slot into the bytes of column `l` of their runs.
fn by_column(
    b: &mut FunctionBuilder,
    codes: Value,
    out: Value,
    pack: impl FnOnce(&mut FunctionBuilder, Value, Value),
) {
    let zero = b.ins().iconst(types::I64, 0);
    let run = b.ins().iconst(types::I64, 32);
    for_range(b, zero, run, 1, |b, l| {
        let codes = b.ins().iadd(codes, l);
        let dest = b.ins().iadd(out, l);
        pack(b, codes, dest);
    });
}

/// q4_k's sub-block `j` scale and minimum levels from the twelve packed bytes (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(b: &mut FunctionBuilder, q: &[Value], j: usize) -> (Value, Value) {
    if j < 4 {
        (
            b.ins().band_imm_s(q[j], 63),
            b.ins().band_imm_s(q[j + 4], 63),
        )
    } else {
        let high = |b: &mut FunctionBuilder, v: Value| {
            let top = b.ins().ushr_imm_s(v, 6);
            b.ins().ishl_imm_s(top, 4)
        };
        let sc = b.ins().band_imm_s(q[j + 4], 0xf);
        let sc_high = high(b, q[j - 4]);
        let m = b.ins().ushr_imm_s(q[j + 4], 4);
        let m_high = high(b, q[j]);
        (b.ins().bor(sc, sc_high), b.ins().bor(m, m_high))
    }
}

/// Recomputes the `len` codes of the values from `first` on with `code(x)` (kept as they
/// are where the sub-block's decoded scale `dl` is zero, as the reference skips them).
fn recode(
    b: &mut FunctionBuilder,
    (xb, codes): (Value, Value),
    first: i64,
    len: i64,
    dl: Value,
    code: impl Fn(&mut FunctionBuilder, Value) -> Value,
) {
    let z = b.ins().f32const(0.0);
    let skipped = b.ins().fcmp(FloatCC::Equal, dl, z);
    let start = b.ins().iconst(types::I64, first);
    let end = b.ins().iconst(types::I64, first + len);
    for_range(b, start, end, 1, |b, i| {
        let v = load_at(b, xb, i);
        let new = code(b, v);
        let at = b.ins().iadd(codes, i);
        let old = b.ins().uload8(types::I32, mem(), at, 0);
        let kept = b.ins().select(skipped, old, new);
        b.ins().istore8(mem(), kept, at, 0);
    });
}

/// The sum of `f(acc, x)` over the `n` floats at `xs` from zero.
fn fold_values(
    b: &mut FunctionBuilder,
    xs: Value,
    n: i64,
    f: impl Fn(&mut FunctionBuilder, Value, Value) -> Value,
) -> Value {
    let z = b.ins().f32const(0.0);
    let [acc] = vars(b, [z]);
    let zero = b.ins().iconst(types::I64, 0);
    let end = b.ins().iconst(types::I64, n);
    for_range(b, zero, end, 1, |b, i| {
        let v = load_at(b, xs, i);
        let old = b.use_var(acc);
        let new = f(b, old, v);
        b.def_var(acc, new);
    });
    b.use_var(acc)
}

/// `a.0 * a.1 - c.0 * c.1`.
fn difference_of_products(b: &mut FunctionBuilder, a: (Value, Value), c: (Value, Value)) -> Value {
    let p = b.ins().fmul(a.0, a.1);
    let q = b.ins().fmul(c.0, c.1);
    b.ins().fsub(p, q)
}

/// Stores sub-block `j`'s scale and minimum in the stack slot.
fn store_sub_block_pair(
    b: &mut FunctionBuilder,
    scratch: Value,
    j: Value,
    scale: Value,
    min: Value,
) {
    let at = address(b, scratch, j, 4);
    b.ins().store(mem(), scale, at, SCALES_AT);
    b.ins().store(mem(), min, at, MINS_AT);
}

/// The `count` floats of the stack slot from byte `at` on.
fn load_floats(b: &mut FunctionBuilder, scratch: Value, at: i32, count: i32) -> Vec<Value> {
    (0..count)
        .map(|j| b.ins().load(types::F32, mem(), scratch, at + 4 * j))
        .collect()
}

/// The largest of `values` and zero, by strict comparisons (the first of equals stays).
fn largest(b: &mut FunctionBuilder, values: &[Value]) -> Value {
    let mut most = b.ins().f32const(0.0);
    for &v in values {
        let larger = b.ins().fcmp(FloatCC::GreaterThan, v, most);
        most = b.ins().select(larger, v, most);
    }
    most
}

/// The float at `xs[i]`.
fn load_at(b: &mut FunctionBuilder, xs: Value, i: Value) -> Value {
    let at = address(b, xs, i, 4);
    b.ins().load(types::F32, mem(), at, 0)
}

/// `f32` variables set to `init`.
fn vars<const N: usize>(b: &mut FunctionBuilder, init: [Value; N]) -> [Variable; N] {
    init.map(|v| {
        let var = b.declare_var(types::F32);
        b.def_var(var, v);
        var
    })
}

/// `var = v cc var ? v : var`.
fn keep_if(b: &mut FunctionBuilder, var: Variable, cc: FloatCC, v: Value) {
    let old = b.use_var(var);
    let takes = b.ins().fcmp(cc, v, old);
    let new = b.ins().select(takes, v, old);
    b.def_var(var, new);
}

/// `var += v`.
fn add_to(b: &mut FunctionBuilder, var: Variable, v: Value) {
    let old = b.use_var(var);
    let new = b.ins().fadd(old, v);
    b.def_var(var, new);
}
