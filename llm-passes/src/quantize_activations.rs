//! `quantize-activations`: quantized matmuls read q8_0 activations.
//!
//! `quantized_matmul(x, w)` with `f32` activations `x` and a weight of GGUF's block
//! formats (q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, the K-quants q2_k to q6_k, iq4_xs, and the
//! lattice formats iq3_xxs, iq3_s, iq2_xxs, iq2_xs, iq2_s, iq1_s and iq1_m, the ternary
//! tq1_0 and tq2_0, the binary q1_0, and the 4-bit floats mxfp4 and nvfp4, whose runs of
//! 32 or 16 under one scale each also lie inside a block of `x`) becomes
//! `quantized_matmul(quantize(x) : q8_0, w)`. q8_0 to q5_1 and iq4_nl hold blocks of 32 values along
//! K with one scale each (and a minimum in q4_1 and q5_1, which takes the block's `Σ x`),
//! so a block of `x` meets a block of `w` as two scales and 32 pairs of small integers: a
//! backend multiplies the codes as integers and scales the block's sum once (the usual
//! int8 dot product of quantized inference engines). The k-quants' runs of 16 or 32 values that share a scale (and q4_k's
//! minimum), and the runs of 32 or 16 of iq4_xs and the lattice formats, each lie inside one block of
//! `x`, so they meet it the same way, run by run.
//!
//! This changes the numbers: each activation is rounded to its block's q8_0 grid (a
//! relative error of at most 1/254 of the block's largest magnitude) before the product.
//! The pass is therefore not in the `default` pipeline: ask for it after the fusions that
//! make quantized matmuls (`llm-run --quantize q4_0 --passes default,quantize-activations`).
//! One `llm.quantize` serves every matmul of a block that reads the same `x` (a layer's
//! q/k/v or gate/up projections).

use std::collections::HashMap;

use llm_ir::{
    dtype::DType,
    ops::{self, QuantizeOp},
    syntax::Dim,
    types::{QuantFormat, QuantizedTensorType},
};
use pliron::{
    context::{Context, Ptr},
    op::Op,
    operation::Operation,
    value::Value,
};

use crate::{
    ir,
    pass::{Pass, PassError, PassInfo, PassOptions, Scope},
};

/// The registry entry.
pub const INFO: PassInfo = PassInfo {
    name: "quantize-activations",
    summary: "quantize the f32 inputs of GGUF block-format matmuls to q8_0 (integer dot products)",
    options: &[],
    scope: Scope::Any,
    create: |_: &PassOptions| Box::new(QuantizeActivations),
};

/// The pass.
pub struct QuantizeActivations;

/// The block size the activations and the weights share.
const BLOCK: u64 = 32;

impl Pass for QuantizeActivations {
    fn run(&mut self, ctx: &mut Context, root: Ptr<Operation>) -> Result<bool, PassError> {
        let mut changed = false;
        for block in ir::nested_blocks(ctx, root) {
            // Per block: the q8_0 value already made for an activation.
            let mut quantized: HashMap<Value, Value> = HashMap::new();
            for op in ir::block_ops(ctx, block) {
                let Some(shape) = activation_shape(ctx, op) else {
                    continue;
                };
                let x = ir::operand(ctx, op, 0);
                let q = *quantized
                    .entry(x)
                    .or_insert_with(|| quantize_before(ctx, op, x, shape));
                Operation::replace_operand(op, ctx, 0, q);
                changed = true;
            }
        }
        Ok(changed)
    }
}

/// The shape of `op`'s activations when it is a `quantized_matmul` of `f32` activations,
/// whose K is a static multiple of 32, with a weight of GGUF's block formats (q8_0 to q5_1,
/// iq4_nl, mxfp4, nvfp4's blocks of 64, q1_0's of 128, a K-quant, q2_k to q6_k, iq4_xs, a
/// lattice or a ternary format: the K of these is a multiple of their blocks or 256-value
/// super-blocks, as their type requires).
fn activation_shape(ctx: &Context, op: Ptr<Operation>) -> Option<Vec<Dim>> {
    if ir::name(ctx, op) != "llm.quantized_matmul" {
        return None;
    }
    let x = ir::tensor_type(ctx, ir::operand(ctx, op, 0))?;
    let k_blocked = matches!(x.shape().last(), Some(Some(k)) if k % BLOCK == 0);
    let weight_blocked = ir::quantized_type(ctx, ir::operand(ctx, op, 1))
        .is_some_and(|w| w.format().meets_q8_0_blocks());
    (x.dtype() == DType::F32 && k_blocked && weight_blocked).then(|| x.shape().to_vec())
}

/// Builds `quantize(x) : q8_0` of `x`'s `shape` just before `op`.
fn quantize_before(ctx: &mut Context, op: Ptr<Operation>, x: Value, shape: Vec<Dim>) -> Value {
    let ty = QuantizedTensorType::get(ctx, shape, QuantFormat::Q8_0).into();
    let quantize: QuantizeOp = ops::build(ctx, vec![x], vec![ty], vec![]);
    let quantize = quantize.get_operation();
    quantize.insert_before(ctx, op);
    ir::result(ctx, quantize, 0)
}
