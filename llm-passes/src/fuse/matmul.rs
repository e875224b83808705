//! Matmul fusions.

use llm_ir::{
    dtype::DType,
    ops::{self, ConcatOp, MatmulOp, QuantizedMatmulOp, RmsNormMatmulOp, SliceOp},
    params::ParamValue,
    types::{QuantFormat, QuantizedTensorType, TensorType},
};
use pliron::{context::Ptr, op::Op, operation::Operation, r#type::Typed};

use crate::{
    driver::{Pattern, Rewriter},
    ir,
    pass::PassError,
};

/// `matmul(x, dequantize(w) : f32, transpose_rhs = true) => quantized_matmul(x, w)`: both
/// compute `x @ dequantize(w)^T` with `w` stored `[N, K]` and the weight in f32.
pub struct DequantizeMatmul;

impl Pattern for DequantizeMatmul {
    fn name(&self) -> &'static str {
        "dequantize-matmul"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.matmul")
    }

    fn benefit(&self) -> u32 {
        4
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let ctx = &*rw.ctx;
        let Some(dq) = ir::producer_named(ctx, op, 1, "llm.dequantize") else {
            return Ok(false);
        };
        let rhs = ir::tensor_type(ctx, ir::result(ctx, dq, 0));
        // An f16/bf16 dequantize rounds the weight, which quantized_matmul does not.
        let f32_rank2 = rhs.is_some_and(|t| t.rank() == 2 && t.dtype() == DType::F32);
        if !ir::flag(ctx, op, "transpose_rhs", false) || !f32_rank2 {
            return Ok(false);
        }
        let (x, w) = (ir::operand(ctx, op, 0), ir::operand(ctx, dq, 0));
        let ty = ir::result(ctx, op, 0).get_type(ctx);
        let new: QuantizedMatmulOp = ops::build(rw.ctx, vec![x, w], vec![ty], vec![]);
        let new = new.get_operation();
        rw.insert_before(op, new);
        rw.replace_op(op, &[ir::result(rw.ctx, new, 0)]);
        Ok(true)
    }
}

/// What the weights of a merged group hold: floats of one type (`llm.matmul`), or 16-bit
/// floats stored as a quantized tensor (`llm.quantized_matmul` of an `f16` or `bf16`
/// weight).
#[derive(Debug, Clone, PartialEq)]
enum Rows {
    /// An `llm.tensor` weight of this element type.
    Floats(DType),
    /// An `llm.quantized_tensor` weight of this format.
    Stored(QuantFormat),
}

/// What makes matmuls siblings that merge: the contraction length `K`, the weights' rows
/// and the result's element type.
type Kin = (u64, Rows, DType);

/// A matmul that can join a merged group, with its weight's static `N` and its [`Kin`]:
/// `x @ w^T` with a plain rank-2 weight (not a dequantized one, which `dequantize-matmul`
/// keeps quantized), or a quantized matmul of a 16-bit `llm.weight` (whose concatenation
/// a runtime makes once, at load; no backend has a kernel that stacks quantized bytes on
/// every call). Quantized siblings of the block formats stay apart: a backend that reads
/// their rows as they are stored would need the stacked copy besides the parts.
fn mergeable(rw: &Rewriter, op: Ptr<Operation>) -> Option<(u64, Kin)> {
    let ctx = &*rw.ctx;
    let (shape, rows) = match ir::name(ctx, op).as_str() {
        "llm.matmul" => {
            if !ir::flag(ctx, op, "transpose_rhs", false)
                || ir::producer_named(ctx, op, 1, "llm.dequantize").is_some()
            {
                return None;
            }
            let t = ir::tensor_type(ctx, ir::operand(ctx, op, 1))?;
            (t.shape().to_vec(), Rows::Floats(t.dtype()))
        }
        "llm.quantized_matmul" => {
            let q = ir::quantized_type(ctx, ir::operand(ctx, op, 1))?;
            if !matches!(q.format(), QuantFormat::F16 | QuantFormat::BF16)
                || ir::producer_named(ctx, op, 1, "llm.weight").is_none()
            {
                return None;
            }
            (q.shape().to_vec(), Rows::Stored(q.format().clone()))
        }
        _ => return None,
    };
    // (A matmul or quantized matmul has one result.)
    let result = ir::tensor_type(ctx, ir::result(ctx, op, 0))?.dtype();
    match shape[..] {
        [Some(n), Some(k)] => Some((n, (k, rows, result))),
        _ => None,
    }
}

/// `matmul(x, w1^T), ..., matmul(x, wn^T) => slices of matmul(x, concat(w1, ..., wn)^T)`
/// (and likewise quantized matmuls of 16-bit weights): row `j` of the concatenated weight
/// is row `j - off_i` of `w_i`, so each slice of the merged product equals one original
/// product (the same dot products, in the same order).
pub struct MergeSiblingMatmuls;

impl Pattern for MergeSiblingMatmuls {
    fn name(&self) -> &'static str {
        "merge-sibling-matmuls"
    }

    fn root(&self) -> Option<&'static str> {
        None
    }

    fn benefit(&self) -> u32 {
        3
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let Some((_, kin)) = mergeable(rw, op) else {
            return Ok(false);
        };
        let x = ir::operand(rw.ctx, op, 0);
        let mut group: Vec<(Ptr<Operation>, u64)> = Vec::new();
        let mut users = ir::users(rw.ctx, x);
        users.dedup();
        for u in users {
            if ir::operand(rw.ctx, u, 0) != x || group.iter().any(|(g, _)| *g == u) {
                continue;
            }
            if let Some((n, ukin)) = mergeable(rw, u)
                && ukin == kin
            {
                group.push((u, n));
            }
        }
        if group.len() < 2 {
            return Ok(false);
        }
        // Order by position; every weight must exist before the first matmul.
        group.sort_by(|a, b| {
            if ir::is_before(rw.ctx, a.0, b.0) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        let anchor = group[0].0;
        group.retain(|(u, _)| ir::available_before(rw.ctx, ir::operand(rw.ctx, *u, 1), anchor));
        if group.len() < 2 {
            return Ok(false);
        }
        let total: u64 = group.iter().map(|(_, n)| n).sum();
        let weights: Vec<_> = group
            .iter()
            .map(|(u, _)| ir::operand(rw.ctx, *u, 1))
            .collect();
        let (k, rows, _) = kin;
        let wty = match &rows {
            Rows::Floats(dtype) => TensorType::get_static(rw.ctx, &[total, k], *dtype).into(),
            Rows::Stored(format) => {
                QuantizedTensorType::get(rw.ctx, vec![Some(total), Some(k)], format.clone()).into()
            }
        };
        let concat: ConcatOp = ops::build(
            rw.ctx,
            weights,
            vec![wty],
            vec![("axis", ParamValue::Int(0))],
        );
        let concat = concat.get_operation();
        rw.insert_before(anchor, concat);
        let first = ir::tensor_type(rw.ctx, ir::result(rw.ctx, anchor, 0))
            .ok_or_else(|| PassError::new("matmul without a tensor result"))?;
        let mut shape = first.shape().to_vec();
        let last = shape.len() - 1;
        shape[last] = Some(total);
        let mty = TensorType::get(rw.ctx, shape, first.dtype());
        let operands = vec![x, ir::result(rw.ctx, concat, 0)];
        let merged = match rows {
            Rows::Floats(_) => {
                let merged: MatmulOp = ops::build(
                    rw.ctx,
                    operands,
                    vec![mty.into()],
                    vec![("transpose_rhs", ParamValue::Bool(true))],
                );
                merged.get_operation()
            }
            Rows::Stored(_) => {
                let merged: QuantizedMatmulOp =
                    ops::build(rw.ctx, operands, vec![mty.into()], vec![]);
                merged.get_operation()
            }
        };
        rw.insert_before(anchor, merged);
        let mut offset = 0;
        let mut replaced = Vec::new();
        for (u, n) in group {
            let ty = ir::result(rw.ctx, u, 0).get_type(rw.ctx);
            let mut starts = vec![ParamValue::Int(0); last + 1];
            starts[last] = ParamValue::Int(offset as i64);
            let slice: SliceOp = ops::build(
                rw.ctx,
                vec![ir::result(rw.ctx, merged, 0)],
                vec![ty],
                vec![("starts", ParamValue::List(starts))],
            );
            let slice = slice.get_operation();
            rw.insert_before(anchor, slice);
            replaced.push((u, slice));
            offset += n;
        }
        for (u, slice) in replaced {
            rw.replace_op(u, &[ir::result(rw.ctx, slice, 0)]);
        }
        Ok(true)
    }
}

/// `matmul(rms_norm(x, g, eps), w) => rms_norm_matmul(x, g, w, eps)` when the norm has no
/// other user: the normalisation becomes the contraction's prologue.
pub struct RmsNormMatmul;

impl Pattern for RmsNormMatmul {
    fn name(&self) -> &'static str {
        "rms-norm-matmul"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.matmul")
    }

    fn benefit(&self) -> u32 {
        2
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let ctx = &*rw.ctx;
        let Some(norm) = ir::producer_named(ctx, op, 0, "llm.rms_norm") else {
            return Ok(false);
        };
        let rhs = ir::operand(ctx, op, 1);
        let rhs_rank = ir::tensor_type(ctx, rhs).map_or(0, |t| t.rank());
        // The norm's single use is `op`'s operand 0, so it is not also the weight.
        if ir::result(ctx, norm, 0).num_uses(ctx) != 1 || rhs_rank != 2 {
            return Ok(false);
        }
        let (x, g) = (ir::operand(ctx, norm, 0), ir::operand(ctx, norm, 1));
        let eps = ir::param(ctx, norm, "eps").unwrap_or(ParamValue::Float(1e-5));
        let transposed = ir::flag(ctx, op, "transpose_rhs", false);
        let ty = ir::result(ctx, op, 0).get_type(ctx);
        let new: RmsNormMatmulOp = ops::build(
            rw.ctx,
            vec![x, g, rhs],
            vec![ty],
            vec![
                ("eps", eps),
                ("transpose_rhs", ParamValue::Bool(transposed)),
            ],
        );
        let new = new.get_operation();
        rw.insert_before(op, new);
        rw.replace_op(op, &[ir::result(rw.ctx, new, 0)]);
        rw.erase(norm);
        Ok(true)
    }
}
