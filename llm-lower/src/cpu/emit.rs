//! CLIF building blocks shared by the kernel generators: counted loops, memory flags,
//! vector accumulators, horizontal sums and the inline polynomial `exp`.

use cranelift_codegen::ir::{BlockArg, InstBuilder, MemFlagsData, Value, condcodes::IntCC, types};
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

/// `exp(x)` for each lane of an `f32x4`: Cephes' single-precision polynomial (relative
/// error about 1e-7). Inputs are clamped to [`EXP_RANGE`], so the result is finite and
/// normal.
pub fn exp(b: &mut FunctionBuilder, x: Value) -> Value {
    let lo = splat(b, EXP_RANGE[0]);
    let hi = splat(b, EXP_RANGE[1]);
    let x = b.ins().fmax(x, lo);
    let x = b.ins().fmin(x, hi);
    let log2e = splat(b, std::f32::consts::LOG2_E);
    let scaled = b.ins().fmul(x, log2e);
    let n = b.ins().nearest(scaled);
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
    // 2^n from the exponent bits.
    let ni = b.ins().fcvt_to_sint_sat(types::I32X4, n);
    let bias = b.ins().iconst(types::I32, 127);
    let bias = b.ins().splat(types::I32X4, bias);
    let biased = b.ins().iadd(ni, bias);
    let shift = b.ins().iconst(types::I32, 23);
    let bits = b.ins().ishl(biased, shift);
    let pow2 = b.ins().bitcast(types::F32X4, MemFlagsData::new(), bits);
    b.ins().fmul(y, pow2)
}
