//! Collective canonicalizations.

use llm_ir::{
    ops::{self, AllReduceOp},
    params::ParamValue,
};
use pliron::{context::Ptr, op::Op, operation::Operation, r#type::Typed};

use crate::{
    driver::{Pattern, Rewriter},
    ir,
    pass::PassError,
};

/// `all_gather(reduce_scatter(x, dim, axes), dim, axes) => all_reduce(x, axes)`: scattering
/// the reduced tensor along `dim` and gathering it back along the same dim over the same
/// axes leaves every device with the whole reduced tensor, which is what `all_reduce` gives.
pub struct AllGatherOfReduceScatter;

impl Pattern for AllGatherOfReduceScatter {
    fn name(&self) -> &'static str {
        "all-gather-of-reduce-scatter"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.all_gather")
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let ctx = &*rw.ctx;
        let Some(rs) = ir::producer_named(ctx, op, 0, "llm.reduce_scatter") else {
            return Ok(false);
        };
        let same = |key: &str| ir::param(ctx, op, key) == ir::param(ctx, rs, key);
        if !same("dim") || !same("mesh_axes") {
            return Ok(false);
        }
        let x = ir::operand(ctx, rs, 0);
        let ty = ir::result(ctx, op, 0).get_type(ctx);
        let axes = ir::param(ctx, op, "mesh_axes").unwrap_or(ParamValue::List(vec![]));
        let new: AllReduceOp = ops::build(rw.ctx, vec![x], vec![ty], vec![("mesh_axes", axes)]);
        let new = new.get_operation();
        // The all-gather result type is the input's sharding without the partial axes, which
        // is exactly what all_reduce produces; the verifier rechecks it after the pass.
        rw.insert_before(op, new);
        rw.replace_op(op, &[ir::result(rw.ctx, new, 0)]);
        Ok(true)
    }
}
