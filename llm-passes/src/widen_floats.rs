//! `widen-floats`: ops on f16/bf16 tensors that backends compute in `f32` get `f32`
//! operands and results, between exact casts.
//!
//! The reference computes every float op in `f32` on `f32`-held values and rounds each
//! result to its element type when it is stored (`docs/dialect.md`, "Numbers"). So
//! `y: f16 = rms_norm(x: f16, g: f16)` is exactly `cast(rms_norm(cast(x), cast(g)) : f32)
//! : f16`: widening an f16 or bf16 value to f32 is exact, and the cast back rounds to
//! nearest even as the store does. The rewrite changes no bit of any result, and the
//! widened op meets the backends' `f32` kernels (norms, softmax, argmax, rope, attention,
//! matmuls, quantization), where the narrow one would run through its reference
//! semantics; the casts are elementwise kernels. This is MLIR's emulation of unsupported
//! float types (`arith-emulate-unsupported-floats`) for the `llm` dialect.
//!
//! Elementwise ops, casts and data movement keep their types (their kernels take narrow
//! floats), and so do an embedding's table (the gather reads f16/bf16 tables), quantized
//! values, KV caches and sharded values. One cast serves every widened op of a block that
//! reads the same narrow value.
//!
//! An f16/bf16 `llm.rms_norm_matmul` rounds the normalised rows to their type before the
//! product, which one widened op would not: the pass splits it back into `rms_norm` and
//! `matmul` and widens both (the norm's result is cast back to the narrow type between
//! them, which is that rounding).

use std::collections::HashMap;

use llm_ir::{
    dtype::DType,
    ops::{self, CastOp, MatmulOp, RmsNormOp},
    params::ParamValue,
    types::TensorType,
};
use pliron::{
    context::{Context, Ptr},
    op::Op,
    operation::Operation,
    r#type::{TypeHandle, Typed},
    value::Value,
};

use crate::{
    ir,
    pass::{Pass, PassError, PassInfo, PassOptions, Scope},
};

/// The registry entry.
pub const INFO: PassInfo = PassInfo {
    name: "widen-floats",
    summary: "compute f16/bf16 norms, softmax, rope, attention and matmuls in f32 between exact casts",
    options: &[],
    scope: Scope::Any,
    create: |_: &PassOptions| Box::new(WidenFloats),
};

/// The pass.
pub struct WidenFloats;

/// The ops whose kernels compute in `f32` only.
const F32_OPS: &[&str] = &[
    "llm.matmul",
    "llm.quantized_matmul",
    "llm.expert_matmul",
    "llm.topk",
    "llm.rms_norm",
    "llm.layer_norm",
    "llm.softmax",
    "llm.argmax",
    "llm.rope",
    "llm.attention",
    "llm.paged_attention",
    "llm.append_attention",
    "llm.lookup_kv",
    "llm.quantize",
    "llm.dequantize",
    "llm.embedding",
];

impl Pass for WidenFloats {
    fn run(&mut self, ctx: &mut Context, root: Ptr<Operation>) -> Result<bool, PassError> {
        let mut changed = false;
        for block in ir::nested_blocks(ctx, root) {
            for op in ir::block_ops(ctx, block) {
                changed |= split_narrow_norm_matmul(ctx, op);
            }
            // Per block: the f32 cast already made of a narrow value.
            let mut widened: HashMap<Value, Value> = HashMap::new();
            for op in ir::block_ops(ctx, block) {
                let name = ir::name(ctx, op);
                if !F32_OPS.contains(&name.as_str()) {
                    continue;
                }
                let is_embedding = name == "llm.embedding";
                for (i, x) in ir::operands(ctx, op).into_iter().enumerate() {
                    // An embedding gathers from its narrow table directly.
                    if is_embedding && i == 0 {
                        continue;
                    }
                    let Some(wide) = wide_type(ctx, x) else {
                        continue;
                    };
                    let cast = *widened
                        .entry(x)
                        .or_insert_with(|| cast_before(ctx, op, x, wide));
                    Operation::replace_operand(op, ctx, i, cast);
                    changed = true;
                }
                for y in ir::results(ctx, op) {
                    let Some(wide) = wide_type(ctx, y) else {
                        continue;
                    };
                    let narrow = y.get_type(ctx);
                    y.set_type(ctx, wide);
                    narrow_after(ctx, op, y, narrow);
                    changed = true;
                }
            }
        }
        Ok(changed)
    }
}

/// Splits `rms_norm_matmul(x, g, w)` into `matmul(rms_norm(x, g), w)` when `x` is an f16
/// or bf16 tensor, so that the norm's result is rounded to `x`'s type as the fused op's
/// reference rounds it. Returns whether it split `op`.
fn split_narrow_norm_matmul(ctx: &mut Context, op: Ptr<Operation>) -> bool {
    if ir::name(ctx, op) != "llm.rms_norm_matmul" {
        return false;
    }
    let [x, g, w] = ir::operands(ctx, op)[..] else {
        return false;
    };
    if wide_type(ctx, x).is_none() {
        return false;
    }
    let eps = ir::param(ctx, op, "eps").unwrap_or(ParamValue::Float(1e-5));
    let transposed = ir::flag(ctx, op, "transpose_rhs", false);
    let y = ir::result(ctx, op, 0);
    let y_type = y.get_type(ctx);
    let normed_type = x.get_type(ctx);
    let norm: RmsNormOp = ops::build(ctx, vec![x, g], vec![normed_type], vec![("eps", eps)]);
    let norm = norm.get_operation();
    norm.insert_before(ctx, op);
    let normed = ir::result(ctx, norm, 0);
    let matmul: MatmulOp = ops::build(
        ctx,
        vec![normed, w],
        vec![y_type],
        vec![("transpose_rhs", ParamValue::Bool(transposed))],
    );
    let matmul = matmul.get_operation();
    matmul.insert_before(ctx, op);
    y.replace_all_uses_with(ctx, &ir::result(ctx, matmul, 0));
    Operation::erase(op, ctx);
    true
}

/// The `f32` tensor type of `v`'s shape, when `v` is an f16 or bf16 tensor.
fn wide_type(ctx: &Context, v: Value) -> Option<TypeHandle> {
    let t = ir::tensor_type(ctx, v)?;
    matches!(t.dtype(), DType::F16 | DType::BF16)
        .then(|| TensorType::get(ctx, t.shape().to_vec(), DType::F32).into())
}

/// Builds `cast(x) : wide` just before `op`.
fn cast_before(ctx: &mut Context, op: Ptr<Operation>, x: Value, wide: TypeHandle) -> Value {
    let cast: CastOp = ops::build(ctx, vec![x], vec![wide], vec![]);
    let cast = cast.get_operation();
    cast.insert_before(ctx, op);
    ir::result(ctx, cast, 0)
}

/// Builds `cast(y) : narrow` just after `op` and makes every other use of `y` read it.
fn narrow_after(ctx: &mut Context, op: Ptr<Operation>, y: Value, narrow: TypeHandle) {
    let cast: CastOp = ops::build(ctx, vec![y], vec![narrow], vec![]);
    let cast = cast.get_operation();
    cast.insert_after(ctx, op);
    let rounded = ir::result(ctx, cast, 0);
    y.replace_some_uses_with(ctx, |_, u| u.user_op() != cast, &rounded);
}
