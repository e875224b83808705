//! Constant folding: an op whose operands are all small constants becomes a constant.

use std::rc::Rc;

use llm_ir::{
    interp::{self, Data, NoWeights, Value},
    ops::{self, ConstantOp},
    params::ParamValue,
    types::num_elements,
};
use pliron::{
    context::{Context, Ptr},
    op::Op,
    operation::Operation,
    r#type::Typed,
};

use crate::{
    driver::{Pattern, Rewriter},
    ir,
    pass::PassError,
};

/// Results with at most this many elements are folded.
pub const MAX_FOLDED_ELEMENTS: u64 = 1024;

/// Ops that are never folded: they are constants already, name external data, or end a body.
const NOT_FOLDED: &[&str] = &["llm.constant", "llm.weight", "llm.return", "llm.yield"];

/// Evaluates a constant op to its value.
pub fn constant_value(ctx: &Context, op: Ptr<Operation>) -> Option<Rc<Value>> {
    if ir::name(ctx, op) != "llm.constant" {
        return None;
    }
    interp::eval_op(ctx, op, vec![], &NoWeights).ok()?.pop()
}

/// Builds an `llm.constant` holding `value` (a tensor) before `anchor`.
pub fn insert_constant(
    rw: &mut Rewriter,
    anchor: Ptr<Operation>,
    value: &Value,
    ty: pliron::r#type::TypeHandle,
) -> Option<Ptr<Operation>> {
    let Value::Tensor(t) = value else { return None };
    let items: Vec<ParamValue> = match &t.data {
        Data::Float(v) => v.iter().map(|&x| ParamValue::Float(f64::from(x))).collect(),
        Data::Int(v) => v.iter().map(|&x| ParamValue::Int(x)).collect(),
    };
    if items
        .iter()
        .any(|v| matches!(v, ParamValue::Float(f) if !f.is_finite()))
    {
        return None;
    }
    let c: ConstantOp = ops::build(
        rw.ctx,
        vec![],
        vec![ty],
        vec![("value", ParamValue::List(items))],
    );
    let c = c.get_operation();
    rw.insert_before(anchor, c);
    Some(c)
}

/// `op(constants...) => constant` for results of at most [`MAX_FOLDED_ELEMENTS`] elements.
pub struct FoldConstants;

impl Pattern for FoldConstants {
    fn name(&self) -> &'static str {
        "fold-constants"
    }

    fn root(&self) -> Option<&'static str> {
        None
    }

    fn benefit(&self) -> u32 {
        0
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let ctx = &*rw.ctx;
        if NOT_FOLDED.contains(&ir::name(ctx, op).as_str())
            || !ir::name(ctx, op).starts_with("llm.")
            || op.deref(ctx).num_regions() != 0
            || op.deref(ctx).get_num_results() != 1
        {
            return Ok(false);
        }
        let res = ir::result(ctx, op, 0);
        let Some(t) = ir::tensor_type(ctx, res) else {
            return Ok(false);
        };
        if num_elements(t.shape()).is_none_or(|n| n > MAX_FOLDED_ELEMENTS) {
            return Ok(false);
        }
        let mut inputs = Vec::new();
        for v in ir::operands(ctx, op) {
            let Some(value) = ir::producer(v).and_then(|p| constant_value(ctx, p)) else {
                return Ok(false);
            };
            inputs.push(value);
        }
        let Ok(mut out) = interp::eval_op(ctx, op, inputs, &NoWeights) else {
            return Ok(false);
        };
        let Some(value) = out.pop() else {
            return Ok(false);
        };
        let ty = res.get_type(ctx);
        let Some(c) = insert_constant(rw, op, &value, ty) else {
            return Ok(false);
        };
        rw.replace_op(op, &[ir::result(rw.ctx, c, 0)]);
        Ok(true)
    }
}
