//! Quantization canonicalizations.

use llm_ir::interp::{self, NoWeights};
use pliron::{context::Ptr, operation::Operation, r#type::Typed};

use super::fold::constant_value;
use crate::{
    driver::{Pattern, Rewriter},
    ir,
    pass::PassError,
};

/// `dequantize(quantize(c)) => c` for a constant `c` that the format represents exactly
/// (checked by evaluating the round trip), with the same result type as `c`.
///
/// Round trips are lossy in general, so the rewrite fires only where it provably is not.
pub struct DequantizeOfQuantizedConstant;

impl Pattern for DequantizeOfQuantizedConstant {
    fn name(&self) -> &'static str {
        "dequantize-of-quantized-constant"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.dequantize")
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let ctx = &*rw.ctx;
        let Some(q) = ir::producer_named(ctx, op, 0, "llm.quantize") else {
            return Ok(false);
        };
        let c = ir::operand(ctx, q, 0);
        if c.get_type(ctx) != ir::result(ctx, op, 0).get_type(ctx) {
            return Ok(false);
        }
        let Some(value) = ir::producer(c).and_then(|p| constant_value(ctx, p)) else {
            return Ok(false);
        };
        let exact = interp::eval_op(ctx, q, vec![value.clone()], &NoWeights)
            .and_then(|qv| interp::eval_op(ctx, op, qv, &NoWeights))
            .is_ok_and(|out| out.first().is_some_and(|v| **v == *value));
        if !exact {
            return Ok(false);
        }
        rw.replace_op(op, &[c]);
        Ok(true)
    }
}
