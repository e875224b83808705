//! Shape canonicalizations.

use llm_ir::{
    ops::{self, ReshapeOp, TransposeOp},
    params::ParamValue,
};
use pliron::{context::Ptr, operation::Operation, r#type::Typed};

use crate::{
    driver::{Pattern, Rewriter},
    ir,
    pass::PassError,
};

fn perm(rw: &Rewriter, op: Ptr<Operation>) -> Vec<i64> {
    ir::param(rw.ctx, op, "perm")
        .and_then(|p| p.as_int_list())
        .unwrap_or_default()
}

/// Replaces `op` by its operand when its result has the operand's type and `identity` holds.
fn forward_operand(rw: &mut Rewriter, op: Ptr<Operation>, identity: bool) -> bool {
    let x = ir::operand(rw.ctx, op, 0);
    if identity && x.get_type(rw.ctx) == ir::result(rw.ctx, op, 0).get_type(rw.ctx) {
        rw.replace_op(op, &[x]);
        true
    } else {
        false
    }
}

/// `transpose(transpose(y, p1), p2) => transpose(y, [p1[p2[i]]])`.
pub struct TransposeOfTranspose;

impl Pattern for TransposeOfTranspose {
    fn name(&self) -> &'static str {
        "transpose-of-transpose"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.transpose")
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let Some(inner) = ir::producer_named(rw.ctx, op, 0, "llm.transpose") else {
            return Ok(false);
        };
        let (outer_perm, inner_perm) = (perm(rw, op), perm(rw, inner));
        let composed: Vec<ParamValue> = outer_perm
            .iter()
            .map(|&i| ParamValue::Int(inner_perm[i as usize]))
            .collect();
        let y = ir::operand(rw.ctx, inner, 0);
        let ty = ir::result(rw.ctx, op, 0).get_type(rw.ctx);
        let new: TransposeOp = ops::build(
            rw.ctx,
            vec![y],
            vec![ty],
            vec![("perm", ParamValue::List(composed))],
        );
        let new = pliron::op::Op::get_operation(&new);
        rw.insert_before(op, new);
        rw.replace_op(op, &[ir::result(rw.ctx, new, 0)]);
        Ok(true)
    }
}

/// `transpose(x, [0, 1, ..]) => x`.
pub struct IdentityTranspose;

impl Pattern for IdentityTranspose {
    fn name(&self) -> &'static str {
        "identity-transpose"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.transpose")
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let identity = perm(rw, op).iter().enumerate().all(|(i, &p)| p == i as i64);
        Ok(forward_operand(rw, op, identity))
    }
}

/// `reshape(reshape(x)) => reshape(x)`.
pub struct ReshapeOfReshape;

impl Pattern for ReshapeOfReshape {
    fn name(&self) -> &'static str {
        "reshape-of-reshape"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.reshape")
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let Some(inner) = ir::producer_named(rw.ctx, op, 0, "llm.reshape") else {
            return Ok(false);
        };
        let x = ir::operand(rw.ctx, inner, 0);
        let ty = ir::result(rw.ctx, op, 0).get_type(rw.ctx);
        let new: ReshapeOp = ops::build(rw.ctx, vec![x], vec![ty], vec![]);
        let new = pliron::op::Op::get_operation(&new);
        rw.insert_before(op, new);
        rw.replace_op(op, &[ir::result(rw.ctx, new, 0)]);
        Ok(true)
    }
}

/// `reshape(x) : type(x) => x`.
pub struct IdentityReshape;

impl Pattern for IdentityReshape {
    fn name(&self) -> &'static str {
        "identity-reshape"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.reshape")
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        Ok(forward_operand(rw, op, true))
    }
}

/// `slice(x, starts = 0, steps = 1) : type(x) => x`.
pub struct IdentitySlice;

impl Pattern for IdentitySlice {
    fn name(&self) -> &'static str {
        "identity-slice"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.slice")
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let zeros = ir::param(rw.ctx, op, "starts")
            .and_then(|p| p.as_int_list())
            .is_some_and(|s| s.iter().all(|&v| v == 0));
        let ones = ir::param(rw.ctx, op, "steps")
            .and_then(|p| p.as_int_list())
            .is_none_or(|s| s.iter().all(|&v| v == 1));
        Ok(forward_operand(rw, op, zeros && ones))
    }
}

/// `cast(x) : type(x) => x`.
pub struct IdentityCast;

impl Pattern for IdentityCast {
    fn name(&self) -> &'static str {
        "identity-cast"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.cast")
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        Ok(forward_operand(rw, op, true))
    }
}
