//! Arithmetic identities.

use pliron::{context::Ptr, operation::Operation, r#type::Typed};

use crate::{
    driver::{Pattern, Rewriter},
    ir,
    pass::PassError,
};

/// `mul(x, 1) => x`, `mul(1, x) => x`, `add(x, 0) => x`, `add(0, x) => x`, `sub(x, 0) => x`,
/// `div(x, 1) => x`, when the constant is a splat and the result has `x`'s type (so the
/// constant does not broadcast `x` to a larger shape).
///
/// For floats, `add(x, 0)` differs from `x` only in the sign of a zero (`-0 + 0 = +0`);
/// the two compare equal.
pub struct NeutralOperand;

impl Pattern for NeutralOperand {
    fn name(&self) -> &'static str {
        "neutral-operand"
    }

    fn root(&self) -> Option<&'static str> {
        None
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let (neutral, commutes) = match ir::name(rw.ctx, op).as_str() {
            "llm.mul" => (1.0, true),
            "llm.add" => (0.0, true),
            "llm.sub" => (0.0, false),
            "llm.div" => (1.0, false),
            _ => return Ok(false),
        };
        let (a, b) = (ir::operand(rw.ctx, op, 0), ir::operand(rw.ctx, op, 1));
        let ty = ir::result(rw.ctx, op, 0).get_type(rw.ctx);
        let keep = if ir::is_splat(rw.ctx, b, neutral) && a.get_type(rw.ctx) == ty {
            a
        } else if commutes && ir::is_splat(rw.ctx, a, neutral) && b.get_type(rw.ctx) == ty {
            b
        } else {
            return Ok(false);
        };
        rw.replace_op(op, &[keep]);
        Ok(true)
    }
}
