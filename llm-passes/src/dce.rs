//! `dce`: dead-code elimination.
//!
//! An `llm` op none of whose results is used is removed, walking each block backwards so
//! whole dead chains go in one pass. Ops without results (terminators, plan records) stay.
//! `llm.append_kv` is removable too: in the SSA cache model an update nobody reads has no
//! effect.

use pliron::{
    context::{Context, Ptr},
    operation::Operation,
};

use crate::{
    ir,
    pass::{Pass, PassError, PassInfo, PassOptions, Scope},
};

/// The registry entry.
pub const INFO: PassInfo = PassInfo {
    name: "dce",
    summary: "remove ops whose results are unused",
    options: &[],
    scope: Scope::Any,
    create: |_: &PassOptions| Box::new(Dce),
};

/// The DCE pass.
pub struct Dce;

impl Pass for Dce {
    fn run(&mut self, ctx: &mut Context, root: Ptr<Operation>) -> Result<bool, PassError> {
        let mut changed = false;
        // Innermost blocks first, so a body is cleaned before its op may be erased.
        for block in ir::nested_blocks(ctx, root).into_iter().rev() {
            for op in ir::block_ops(ctx, block).into_iter().rev() {
                let dead = ir::name(ctx, op).starts_with("llm.")
                    && op.deref(ctx).get_num_results() > 0
                    && !ir::has_uses(ctx, op);
                if dead {
                    Operation::erase(op, ctx);
                    changed = true;
                }
            }
        }
        Ok(changed)
    }
}
