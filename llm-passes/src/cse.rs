//! `cse`: common-subexpression elimination.
//!
//! Within each block, an op that repeats an earlier op — same name, same operands, same
//! parameters, same result types, no regions — is replaced by the earlier op's results.
//! Every `llm` op is a pure function of its operands (the KV cache is an SSA value), so
//! this is always sound; two `llm.weight` ops naming the same tensor also merge.

use std::collections::HashMap;

use pliron::{
    context::{Context, Ptr},
    operation::Operation,
    printable::Printable,
    r#type::Typed,
};

use crate::{
    ir,
    pass::{Pass, PassError, PassInfo, PassOptions, Scope},
};

/// The registry entry.
pub const INFO: PassInfo = PassInfo {
    name: "cse",
    summary: "replace ops that repeat an earlier op in the same block by its results",
    options: &[],
    scope: Scope::Any,
    create: |_: &PassOptions| Box::new(Cse),
};

/// The CSE pass.
pub struct Cse;

/// The identity of an op for CSE, or `None` if it must not be merged.
fn key(ctx: &Context, op: Ptr<Operation>) -> Option<String> {
    let name = ir::name(ctx, op);
    let opr = op.deref(ctx);
    if !name.starts_with("llm.") || opr.num_regions() != 0 || opr.get_num_results() == 0 {
        return None;
    }
    let operands: Vec<String> = opr.operands().map(|v| format!("{v:?}")).collect();
    let mut params: Vec<String> = opr
        .attributes
        .0
        .iter()
        .filter(|(k, _)| k.to_string().starts_with("llm_"))
        .map(|(k, v)| format!("{k}={}", v.disp(ctx)))
        .collect();
    params.sort();
    let types: Vec<String> = opr
        .results()
        .map(|r| r.get_type(ctx).disp(ctx).to_string())
        .collect();
    Some(format!(
        "{name}({}){{{}}}:{}",
        operands.join(","),
        params.join(","),
        types.join(",")
    ))
}

impl Pass for Cse {
    fn run(&mut self, ctx: &mut Context, root: Ptr<Operation>) -> Result<bool, PassError> {
        let mut changed = false;
        for block in ir::nested_blocks(ctx, root) {
            let mut seen: HashMap<String, Ptr<Operation>> = HashMap::new();
            for op in ir::block_ops(ctx, block) {
                let Some(k) = key(ctx, op) else { continue };
                match seen.get(&k) {
                    Some(&earlier) => {
                        for (r, e) in ir::results(ctx, op)
                            .into_iter()
                            .zip(ir::results(ctx, earlier))
                        {
                            r.replace_all_uses_with(ctx, &e);
                        }
                        Operation::erase(op, ctx);
                        changed = true;
                    }
                    None => {
                        seen.insert(k, op);
                    }
                }
            }
        }
        Ok(changed)
    }
}
