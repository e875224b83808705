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

use std::collections::HashMap;

use llm_ir::{
    dtype::DType,
    ops::{self, CastOp},
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
    "llm.rms_norm_matmul",
    "llm.quantized_matmul",
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
            // Per block: the f32 cast already made of a narrow value.
            let mut widened: HashMap<Value, Value> = HashMap::new();
            for op in ir::block_ops(ctx, block) {
                if !F32_OPS.contains(&ir::name(ctx, op).as_str()) {
                    continue;
                }
                let is_embedding = ir::name(ctx, op) == "llm.embedding";
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
