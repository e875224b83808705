//! CLIF building blocks shared by the kernel generators: counted loops, memory flags,
//! vector accumulators, horizontal sums and the inline polynomial `exp`.

use cranelift_codegen::ir::{
    BlockArg, InstBuilder, MemFlagsData, Value,
    condcodes::{FloatCC, IntCC},
    types,
};
use cranelift_frontend::{FunctionBuilder, Variable};

/// Loads and stores through pointers the caller validated: they cannot trap, but need not
/// be aligned.
pub fn mem() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Emits `for i in (start..end).step_by(step) { body(i) }` over `i64` values: the body runs
/// for `i = start, start + step, ...` while `i < end` (nothing when `start >= end`). The body
/// may emit blocks of its own; loop-carried state goes through `Variable`s.
pub fn for_range(
    b: &mut FunctionBuilder,
    start: Value,
    end: Value,
    step: i64,
    body: impl FnOnce(&mut FunctionBuilder, Value),
) {
    let looped = b.create_block();
    let exit = b.create_block();
    let i = b.append_block_param(looped, types::I64);
    let enter = b.ins().icmp(IntCC::SignedLessThan, start, end);
    b.ins()
        .brif(enter, looped, &[BlockArg::from(start)], exit, &[]);
    b.switch_to_block(looped);
    body(b, i);
    let next = b.ins().iadd_imm_s(i, step);
    let again = b.ins().icmp(IntCC::SignedLessThan, next, end);
    b.ins()
        .brif(again, looped, &[BlockArg::from(next)], exit, &[]);
    b.switch_to_block(exit);
}

/// `base + index * scale + offset` as an address.
pub fn address(b: &mut FunctionBuilder, base: Value, index: Value, scale: i64) -> Value {
    let scaled = b.ins().imul_imm_s(index, scale);
    b.ins().iadd(base, scaled)
}

/// The sum of the four lanes of an `f32x4`, as `(l0 + l1) + (l2 + l3)`.
pub fn horizontal_sum(b: &mut FunctionBuilder, v: Value) -> Value {
    let lanes: Vec<Value> = (0..4u8).map(|l| b.ins().extractlane(v, l)).collect();
    let lo = b.ins().fadd(lanes[0], lanes[1]);
    let hi = b.ins().fadd(lanes[2], lanes[3]);
    b.ins().fadd(lo, hi)
}

/// Declares `count` `f32x4` accumulators set to zero.
pub fn zeroed_accumulators(b: &mut FunctionBuilder, count: usize) -> Vec<Variable> {
    let z = splat(b, 0.0);
    (0..count)
        .map(|_| {
            let v = b.declare_var(types::F32X4);
            b.def_var(v, z);
            v
        })
        .collect()
}

/// `acc += a * x` on a variable.
pub fn accumulate(b: &mut FunctionBuilder, acc: Variable, a: Value, x: Value) {
    let old = b.use_var(acc);
    let new = b.ins().fma(a, x, old);
    b.def_var(acc, new);
}

/// The maximum of the 4 lanes of `v`.
pub fn horizontal_max(b: &mut FunctionBuilder, v: Value) -> Value {
    let lanes: Vec<Value> = (0..4u8).map(|l| b.ins().extractlane(v, l)).collect();
    let lo = b.ins().fmax(lanes[0], lanes[1]);
    let hi = b.ins().fmax(lanes[2], lanes[3]);
    b.ins().fmax(lo, hi)
}

/// An `f32x4` with every lane `c`.
pub fn splat(b: &mut FunctionBuilder, c: f32) -> Value {
    let s = b.ins().f32const(c);
    b.ins().splat(types::F32X4, s)
}

/// The input range of the exponential kernels: results stay finite and normal.
pub const EXP_RANGE: [f32; 2] = [-87.3, 88.0];

/// `ln 2` split in two for the range reduction `r = x - n ln 2`: `r = x + n * hi + n * lo`.
pub const EXP_LN2: [f32; 2] = [-0.693_359_4, 2.121_944_4e-4];

/// The polynomial's coefficients, highest degree first (Horner's order): `y` then
/// `exp(r) = y * r^2 + r + 1`.
pub const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// Below this magnitude `tanh` is its odd polynomial ([`TANH_POLY`]): there the
/// exponential form `1 - 2 / (exp(2x) + 1)` loses the low bits to cancellation.
pub const TANH_SMALL: f32 = 0.625;

/// `tanh(x) = x + x^3 P(x^2)` for `|x|` below [`TANH_SMALL`]: `P`'s coefficients, highest
/// degree first (fitted to `tanh` over that range; relative error below 1e-7 in `f32`).
pub const TANH_POLY: [f32; 5] = [
    -0.005_705_317_5,
    0.020_639_377,
    -0.053_739_8,
    0.133_314_43,
    -0.333_332_8,
];

/// Below this magnitude `erf` is its odd Taylor polynomial ([`ERF_POLY`]); beyond, Abramowitz
/// and Stegun's 7.1.26 ([`ERF_TAIL`]), whose absolute error (below 1.5e-7) would be a large
/// relative one near 0.
pub const ERF_SMALL: f32 = 1.0;

/// `erf(x) = x P(x^2)` for `|x|` below [`ERF_SMALL`]: `P`'s coefficients, highest degree
/// first, the Taylor series' `2 / sqrt(pi) (-1)^n / (n! (2n + 1))` to `n = 10` (the first
/// term left out is below 1.2e-9 there).
pub const ERF_POLY: [f32; 11] = [
    1.480_719_3e-8,
    -1.636_584_4e-7,
    1.646_211_4e-6,
    -1.492_565e-5,
    1.205_533_3e-4,
    -8.548_327e-4,
    5.223_978e-3,
    -2.686_617_2e-2,
    0.112_837_92,
    -0.376_126_38,
    std::f32::consts::FRAC_2_SQRT_PI,
];

/// `erf(x) = 1 - t Q(t) exp(-x^2)` with `t = 1 / (1 + p x)` for `x` from [`ERF_SMALL`] on
/// (Abramowitz and Stegun 7.1.26): `p`, then `Q`'s coefficients, highest degree first.
pub const ERF_TAIL: [f32; 6] = [
    0.327_591_1,
    1.061_405_4,
    -1.453_152,
    1.421_413_8,
    -0.284_496_74,
    0.254_829_6,
];

/// `erf(x)` for each lane of an `f32x4`: the odd Taylor polynomial ([`ERF_POLY`]) below
/// [`ERF_SMALL`], Abramowitz and Stegun's form ([`ERF_TAIL`]) beyond, on `|x|` with the
/// sign put back (its absolute error below 2e-7 against `libm`'s `erff`, the reference's).
pub fn erf(b: &mut FunctionBuilder, x: Value) -> Value {
    let z = b.ins().fmul(x, x);
    let mut p = splat(b, ERF_POLY[0]);
    for &c in &ERF_POLY[1..] {
        let c = splat(b, c);
        p = b.ins().fma(p, z, c);
    }
    let near = b.ins().fmul(x, p);
    let magnitude = b.ins().fabs(x);
    let one = splat(b, 1.0);
    let slope = splat(b, ERF_TAIL[0]);
    let d = b.ins().fma(slope, magnitude, one);
    let t = b.ins().fdiv(one, d);
    let mut q = splat(b, ERF_TAIL[1]);
    for &c in &ERF_TAIL[2..] {
        let c = splat(b, c);
        q = b.ins().fma(q, t, c);
    }
    let tq = b.ins().fmul(t, q);
    let minus_z = b.ins().fneg(z);
    let e = exp(b, minus_z);
    let tail = b.ins().fmul(tq, e);
    let far = b.ins().fsub(one, tail);
    let far_neg = b.ins().fneg(far);
    let zero = splat(b, 0.0);
    let far = select_lanes(b, FloatCC::LessThan, (x, zero), far_neg, far);
    let small = splat(b, ERF_SMALL);
    select_lanes(b, FloatCC::LessThan, (magnitude, small), near, far)
}

/// ReLU for each lane of an `f32x4`: 0 where `x < 0`, else `x` (a NaN stays NaN).
pub fn relu(b: &mut FunctionBuilder, x: Value) -> Value {
    let zero = splat(b, 0.0);
    select_lanes(b, FloatCC::LessThan, (x, zero), zero, x)
}

/// `tanh(x)` for each lane of an `f32x4`: the odd polynomial ([`TANH_POLY`]) below
/// [`TANH_SMALL`], `1 - 2 / (exp(2x) + 1)` beyond (which [`exp`]'s clamp keeps finite,
/// so large magnitudes give exactly 1 or -1).
pub fn tanh(b: &mut FunctionBuilder, x: Value) -> Value {
    let z = b.ins().fmul(x, x);
    let mut p = splat(b, TANH_POLY[0]);
    for &c in &TANH_POLY[1..] {
        let c = splat(b, c);
        p = b.ins().fma(p, z, c);
    }
    let xz = b.ins().fmul(x, z);
    let near = b.ins().fma(xz, p, x);
    let two = splat(b, 2.0);
    let one = splat(b, 1.0);
    let x2 = b.ins().fmul(x, two);
    let e = exp(b, x2);
    let d = b.ins().fadd(e, one);
    let q = b.ins().fdiv(two, d);
    let far = b.ins().fsub(one, q);
    let magnitude = b.ins().fabs(x);
    let small = splat(b, TANH_SMALL);
    select_lanes(b, FloatCC::LessThan, (magnitude, small), near, far)
}

/// `exp(x)` for each lane of an `f32x4`: Cephes' single-precision polynomial (relative
/// error about 1e-7). Inputs are clamped to [`EXP_RANGE`], so the result is finite and
/// normal; a NaN stays NaN.
///
/// The clamps are `x < lo ? lo : x` and `hi < x ? hi : x`, which Cranelift lowers to one
/// `maxps`/`minps` each (its IEEE `fmax`/`fmin` take about eight instructions), and
/// `n = round(x log2 e)` comes from adding and subtracting 1.5 * 2^23, whose bits also
/// hold `n` as an integer (no saturating conversion): the same `n` as `nearest` (ties to
/// even) for the clamped range, so the results are those of the straightforward form.
pub fn exp(b: &mut FunctionBuilder, x: Value) -> Value {
    let lo = splat(b, EXP_RANGE[0]);
    let hi = splat(b, EXP_RANGE[1]);
    let x = select_lanes(b, FloatCC::LessThan, (x, lo), lo, x);
    let x = select_lanes(b, FloatCC::LessThan, (hi, x), hi, x);
    let log2e = splat(b, std::f32::consts::LOG2_E);
    let scaled = b.ins().fmul(x, log2e);
    // 1.5 * 2^23: adding it leaves round(scaled) in the low mantissa bits.
    let magic = splat(b, 12_582_912.0);
    let shifted = b.ins().fadd(scaled, magic);
    let n = b.ins().fsub(shifted, magic);
    let c1 = splat(b, EXP_LN2[0]);
    let c2 = splat(b, EXP_LN2[1]);
    let r = b.ins().fma(n, c1, x);
    let r = b.ins().fma(n, c2, r);
    let mut y = splat(b, EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        let c = splat(b, c);
        y = b.ins().fma(y, r, c);
    }
    let r2 = b.ins().fmul(r, r);
    let one = splat(b, 1.0);
    let r1 = b.ins().fadd(r, one);
    let y = b.ins().fma(y, r2, r1);
    // 2^n from the exponent bits: the shifted bits are 0x4b400000 + n, whose high bits
    // the shift by 23 drops, so (bits + 127) << 23 is (n + 127) << 23.
    let bits = b.ins().bitcast(types::I32X4, MemFlagsData::new(), shifted);
    let bias = b.ins().iconst(types::I32, 127);
    let bias = b.ins().splat(types::I32X4, bias);
    let biased = b.ins().iadd(bits, bias);
    let shift = b.ins().iconst(types::I32, 23);
    let bits = b.ins().ishl(biased, shift);
    let pow2 = b.ins().bitcast(types::F32X4, MemFlagsData::new(), bits);
    b.ins().fmul(y, pow2)
}

/// `a cc b ? yes : no` per lane of `f32x4`s (a `bitselect` on the comparison's mask,
/// which Cranelift matches to `maxps`/`minps` in the clamp shapes).
fn select_lanes(
    b: &mut FunctionBuilder,
    cc: FloatCC,
    (a, c): (Value, Value),
    yes: Value,
    no: Value,
) -> Value {
    let mask = b.ins().fcmp(cc, a, c);
    let mask = b.ins().bitcast(types::F32X4, MemFlagsData::new(), mask);
    b.ins().bitselect(mask, yes, no)
}
