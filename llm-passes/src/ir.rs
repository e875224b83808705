//! Small queries and edits of `llm` IR shared by the passes.

use pliron::{
    basic_block::BasicBlock,
    context::{Context, Ptr},
    graph::walkers::IRNode,
    linked_list::{ContainsLinkedList, LinkedList},
    operation::Operation,
    r#type::{TypeHandle, Typed, TypedHandle},
    value::Value,
};

use llm_ir::{
    params::{ParamAttr, ParamValue, param_key},
    types::{QuantizedTensorType, TensorType},
};

/// The op's name (`llm.matmul`).
pub fn name(ctx: &Context, op: Ptr<Operation>) -> String {
    Operation::get_opid(op, ctx).to_string()
}

/// Parameter `key` of `op`.
pub fn param(ctx: &Context, op: Ptr<Operation>, key: &str) -> Option<ParamValue> {
    op.deref(ctx)
        .attributes
        .get::<ParamAttr>(&param_key(key))
        .map(|a| a.0.clone())
}

/// Boolean parameter `key`, or `default`.
pub fn flag(ctx: &Context, op: Ptr<Operation>, key: &str, default: bool) -> bool {
    match param(ctx, op, key) {
        Some(ParamValue::Bool(b)) => b,
        _ => default,
    }
}

/// Operand `i`.
pub fn operand(ctx: &Context, op: Ptr<Operation>, i: usize) -> Value {
    op.deref(ctx).get_operand(i)
}

/// All operands.
pub fn operands(ctx: &Context, op: Ptr<Operation>) -> Vec<Value> {
    op.deref(ctx).operands().collect()
}

/// Result `i`.
pub fn result(ctx: &Context, op: Ptr<Operation>, i: usize) -> Value {
    op.deref(ctx).get_result(i)
}

/// All results.
pub fn results(ctx: &Context, op: Ptr<Operation>) -> Vec<Value> {
    op.deref(ctx).results().collect()
}

/// The op defining `v`, if `v` is an op result.
pub fn producer(v: Value) -> Option<Ptr<Operation>> {
    v.defining_op()
}

/// The producer of operand `i` of `op` if it is an op named `name`.
pub fn producer_named(
    ctx: &Context,
    op: Ptr<Operation>,
    i: usize,
    op_name: &str,
) -> Option<Ptr<Operation>> {
    producer(operand(ctx, op, i)).filter(|p| name(ctx, *p) == op_name)
}

/// The ops using `v` (once per use).
pub fn users(ctx: &Context, v: Value) -> Vec<Ptr<Operation>> {
    v.uses(ctx).iter().map(|u| u.user_op()).collect()
}

/// Whether any result of `op` is used.
pub fn has_uses(ctx: &Context, op: Ptr<Operation>) -> bool {
    op.deref(ctx).has_use()
}

/// The tensor type of `v`, if it has one.
pub fn tensor_type(ctx: &Context, v: Value) -> Option<TensorType> {
    as_tensor(ctx, v.get_type(ctx))
}

/// `ty` as a tensor type.
pub fn as_tensor(ctx: &Context, ty: TypeHandle) -> Option<TensorType> {
    TypedHandle::<TensorType>::from_handle(ty, ctx)
        .ok()
        .map(|t| t.deref(ctx).clone())
}

/// The quantized tensor type of `v`, if it has one.
pub fn quantized_type(ctx: &Context, v: Value) -> Option<QuantizedTensorType> {
    TypedHandle::<QuantizedTensorType>::from_handle(v.get_type(ctx), ctx)
        .ok()
        .map(|t| t.deref(ctx).clone())
}

/// Every op nested under `root` (not `root` itself), in pre-order.
pub fn nested_ops(ctx: &Context, root: Ptr<Operation>) -> Vec<Ptr<Operation>> {
    llm_ir::text::preorder(ctx, root)
        .into_iter()
        .filter_map(|n| match n {
            IRNode::Operation(op) if op != root => Some(op),
            _ => None,
        })
        .collect()
}

/// Every block nested under `root`, in pre-order.
pub fn nested_blocks(ctx: &Context, root: Ptr<Operation>) -> Vec<Ptr<BasicBlock>> {
    llm_ir::text::preorder(ctx, root)
        .into_iter()
        .filter_map(|n| match n {
            IRNode::BasicBlock(b) => Some(b),
            _ => None,
        })
        .collect()
}

/// The ops of `block`, in order.
pub fn block_ops(ctx: &Context, block: Ptr<BasicBlock>) -> Vec<Ptr<Operation>> {
    block.deref(ctx).iter(ctx).collect()
}

/// Whether `a` comes strictly before `b` in the same block.
pub fn is_before(ctx: &Context, a: Ptr<Operation>, b: Ptr<Operation>) -> bool {
    if a.deref(ctx).get_parent_block() != b.deref(ctx).get_parent_block() {
        return false;
    }
    let mut cur = a.deref(ctx).get_next();
    while let Some(op) = cur {
        if op == b {
            return true;
        }
        cur = op.deref(ctx).get_next();
    }
    false
}

/// Whether `v` is available just before `op`: a block argument of an enclosing block, or
/// the result of an op earlier in `op`'s block.
pub fn available_before(ctx: &Context, v: Value, op: Ptr<Operation>) -> bool {
    match producer(v) {
        Some(p) => is_before(ctx, p, op),
        None => true,
    }
}

/// The values of an `llm.constant` op.
pub fn constant_values(ctx: &Context, op: Ptr<Operation>) -> Option<Vec<ParamValue>> {
    if name(ctx, op) != "llm.constant" {
        return None;
    }
    match param(ctx, op, "value")? {
        ParamValue::List(items) => Some(items),
        v => Some(vec![v]),
    }
}

/// Whether `v` is an `llm.constant` whose every element equals `x`.
pub fn is_splat(ctx: &Context, v: Value, x: f64) -> bool {
    producer(v)
        .and_then(|p| constant_values(ctx, p))
        .is_some_and(|vals| !vals.is_empty() && vals.iter().all(|e| e.as_number() == Some(x)))
}
