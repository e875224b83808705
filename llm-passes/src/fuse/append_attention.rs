//! `append_kv` feeding `paged_attention`.

use llm_ir::ops::{self, AppendAttentionOp};
use pliron::{context::Ptr, op::Op, operation::Operation, r#type::Typed};

use crate::{
    driver::{Pattern, Rewriter},
    ir,
    pass::PassError,
};

/// `paged_attention(q, append_kv(c, k, v, s), t, l) => append_attention(q, c, k, v, s, t, l)`
/// (same layer; attention sinks stay the last operand): the fused op writes the new keys
/// and values, then attends over the updated cache, and also returns that cache for the
/// append's other users, which must all come after the attention.
pub struct AppendAttention;

impl Pattern for AppendAttention {
    fn name(&self) -> &'static str {
        "append-attention"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.paged_attention")
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let ctx = &*rw.ctx;
        let Some(append) = ir::producer_named(ctx, op, 1, "llm.append_kv") else {
            return Ok(false);
        };
        if ir::param(ctx, append, "layer") != ir::param(ctx, op, "layer") {
            return Ok(false);
        }
        let updated = ir::result(ctx, append, 0);
        if ir::users(ctx, updated)
            .iter()
            .any(|&u| u != op && !ir::is_before(ctx, op, u))
        {
            return Ok(false);
        }
        let [c, k, v, s] = [0, 1, 2, 3].map(|i| ir::operand(ctx, append, i));
        let [q, _, t, l] = [0, 1, 2, 3].map(|i| ir::operand(ctx, op, i));
        // The attention sinks, where the attention has them, stay its last operand.
        let sinks = ir::operands(ctx, op).get(4).copied();
        let types = vec![ir::result(ctx, op, 0).get_type(ctx), updated.get_type(ctx)];
        let params: Vec<(&str, llm_ir::params::ParamValue)> =
            ["layer", "kv_heads", "scale", "softcap", "window"]
                .into_iter()
                .filter_map(|key| ir::param(ctx, op, key).map(|p| (key, p)))
                .collect();
        let operands = [q, c, k, v, s, t, l].into_iter().chain(sinks).collect();
        let new: AppendAttentionOp = ops::build(rw.ctx, operands, types, params);
        let new = new.get_operation();
        rw.insert_before(op, new);
        let (out, cache) = (ir::result(rw.ctx, new, 0), ir::result(rw.ctx, new, 1));
        rw.replace_op(op, &[out]);
        rw.replace_op(append, &[cache]);
        Ok(true)
    }
}
