//! Elementwise chains into `llm.fused`.

use llm_ir::{
    ops::{self, ConstantOp, FusedOp, YieldOp},
    params::ParamValue,
    types::TensorType,
};
use pliron::{
    basic_block::BasicBlock,
    context::{Context, Ptr},
    linked_list::ContainsLinkedList,
    op::Op,
    operation::Operation,
    r#type::TypeHandle,
    value::Value,
};

use crate::{
    driver::{Pattern, Rewriter},
    ir,
    pass::PassError,
};

/// Where a scalar step reads a value.
#[derive(Clone, Copy, PartialEq)]
enum Arg {
    Input(usize),
    Step(usize),
}

/// One scalar operation of a body.
#[derive(Clone)]
struct Step {
    op: String,
    args: Vec<Arg>,
    constant: Option<f64>,
}

/// An elementwise computation: tensor inputs and scalar steps, the last of which is the
/// result.
struct Program {
    inputs: Vec<Value>,
    steps: Vec<Step>,
    out: Arg,
}

/// The program of an elementwise or fused op.
fn program(ctx: &Context, op: Ptr<Operation>) -> Option<Program> {
    let name = ir::name(ctx, op);
    let inputs = ir::operands(ctx, op);
    if ops::is_elementwise(&name) {
        let args = (0..inputs.len()).map(Arg::Input).collect();
        return Some(Program {
            inputs,
            steps: vec![Step {
                op: name,
                args,
                constant: None,
            }],
            out: Arg::Step(0),
        });
    }
    if name != "llm.fused" {
        return None;
    }
    let region = op.deref(ctx).get_region(0);
    let block = region.deref(ctx).iter(ctx).next()?;
    let args: Vec<Value> = block.deref(ctx).arguments().collect();
    let mut values: Vec<(Value, Arg)> = args
        .iter()
        .enumerate()
        .map(|(i, v)| (*v, Arg::Input(i)))
        .collect();
    let lookup =
        |values: &[(Value, Arg)], v: Value| values.iter().find(|(x, _)| *x == v).map(|(_, a)| *a);
    let mut steps = Vec::new();
    for body_op in ir::block_ops(ctx, block) {
        let body_name = ir::name(ctx, body_op);
        let step_args: Vec<Arg> = ir::operands(ctx, body_op)
            .into_iter()
            .map(|v| lookup(&values, v))
            .collect::<Option<_>>()?;
        if body_name == "llm.yield" {
            return Some(Program {
                inputs,
                steps,
                out: *step_args.first()?,
            });
        }
        let constant = ir::constant_values(ctx, body_op)
            .and_then(|v| v.first().and_then(ParamValue::as_number));
        steps.push(Step {
            op: body_name,
            args: step_args,
            constant,
        });
        values.push((ir::result(ctx, body_op, 0), Arg::Step(steps.len() - 1)));
    }
    None
}

/// Substitutes `inner` for input `k` of `outer`.
fn compose(outer: &Program, k: usize, inner: Program) -> Program {
    let mut inputs = inner.inputs.clone();
    let mut outer_map = Vec::new();
    for (i, v) in outer.inputs.iter().enumerate() {
        if i == k {
            outer_map.push(None);
            continue;
        }
        let at = inputs.iter().position(|x| x == v).unwrap_or_else(|| {
            inputs.push(*v);
            inputs.len() - 1
        });
        outer_map.push(Some(at));
    }
    let offset = inner.steps.len();
    let mut steps = inner.steps.clone();
    let remap = |a: Arg| match a {
        Arg::Input(i) if i == k => inner.out,
        Arg::Input(i) => Arg::Input(outer_map[i].unwrap_or(0)),
        Arg::Step(s) => Arg::Step(s + offset),
    };
    for s in &outer.steps {
        steps.push(Step {
            op: s.op.clone(),
            args: s.args.iter().copied().map(remap).collect(),
            constant: s.constant,
        });
    }
    Program {
        inputs,
        steps,
        out: remap(outer.out),
    }
}

/// Builds the `llm.fused` op of `p` with result type `ty` (not yet inserted).
fn build_fused(ctx: &mut Context, p: &Program, ty: TensorType) -> Ptr<Operation> {
    let result_ty = TensorType::get(ctx, ty.shape().to_vec(), ty.dtype()).into();
    let fused: FusedOp = ops::build(ctx, p.inputs.clone(), vec![result_ty], vec![]);
    let fused = fused.get_operation();
    let scalar: TypeHandle = TensorType::get(ctx, vec![], ty.dtype()).into();
    let region = Operation::add_region(fused, ctx);
    let block = BasicBlock::new(ctx, None, vec![scalar; p.inputs.len()]);
    block.insert_at_front(region, ctx);
    let args: Vec<Value> = block.deref(ctx).arguments().collect();
    let mut results: Vec<Value> = Vec::new();
    let value_of = |results: &[Value], a: Arg| match a {
        Arg::Input(i) => args[i],
        Arg::Step(s) => results[s],
    };
    for step in &p.steps {
        let operands: Vec<Value> = step.args.iter().map(|&a| value_of(&results, a)).collect();
        let op = match step.constant {
            Some(c) => {
                let c: ConstantOp = ops::build(
                    ctx,
                    vec![],
                    vec![scalar],
                    vec![("value", ParamValue::Float(c))],
                );
                c.get_operation()
            }
            None => build_elementwise(ctx, &step.op, operands, scalar),
        };
        op.insert_at_back(block, ctx);
        results.push(op.deref(ctx).get_result(0));
    }
    let out = value_of(&results, p.out);
    let y: YieldOp = ops::build(ctx, vec![out], vec![], vec![]);
    y.get_operation().insert_at_back(block, ctx);
    fused
}

/// Builds elementwise op `name` on `operands`.
fn build_elementwise(
    ctx: &mut Context,
    name: &str,
    operands: Vec<Value>,
    ty: TypeHandle,
) -> Ptr<Operation> {
    macro_rules! build {
        ($op:ty) => {
            ops::build::<$op>(ctx, operands, vec![ty], vec![]).get_operation()
        };
    }
    match name {
        "llm.add" => build!(ops::AddOp),
        "llm.sub" => build!(ops::SubOp),
        "llm.mul" => build!(ops::MulOp),
        "llm.div" => build!(ops::DivOp),
        "llm.maximum" => build!(ops::MaximumOp),
        "llm.minimum" => build!(ops::MinimumOp),
        "llm.exp" => build!(ops::ExpOp),
        "llm.neg" => build!(ops::NegOp),
        "llm.sqrt" => build!(ops::SqrtOp),
        "llm.rsqrt" => build!(ops::RsqrtOp),
        "llm.tanh" => build!(ops::TanhOp),
        "llm.sigmoid" => build!(ops::SigmoidOp),
        "llm.silu" => build!(ops::SiluOp),
        "llm.gelu" => build!(ops::GeluOp),
        "llm.erf" => build!(ops::ErfOp),
        "llm.relu" => build!(ops::ReluOp),
        // Only names `ops::is_elementwise` accepts reach here.
        other => unreachable!("{other} is not an elementwise op"),
    }
}

/// The most tensor inputs a fused body takes: a kernel binds each input and its output,
/// and WebGPU's default limits (what any conforming device offers) allow 8 storage
/// buffers a shader.
pub const MAX_FUSED_INPUTS: usize = 7;

/// `e(.., p(xs), ..) => fused(.., xs, ..)` where `p` and `e` are elementwise (or fused) ops
/// of one float element type and `e` is `p`'s only user: evaluating `p` per element inside
/// `e`'s body gives the same values, since both map elements independently (a broadcast
/// operand of `e` is `p` applied to broadcast inputs). A body stays within
/// [`MAX_FUSED_INPUTS`] inputs.
pub struct FuseElementwise;

impl Pattern for FuseElementwise {
    fn name(&self) -> &'static str {
        "fuse-elementwise"
    }

    fn root(&self) -> Option<&'static str> {
        None
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let ctx = &*rw.ctx;
        // Ops inside a fused body are already fused.
        if op
            .deref(ctx)
            .get_parent_op(ctx)
            .is_some_and(|p| ir::name(ctx, p) == "llm.fused")
        {
            return Ok(false);
        }
        let Some(outer) = program(ctx, op) else {
            return Ok(false);
        };
        let Some(out_ty) = ir::tensor_type(ctx, ir::result(ctx, op, 0)) else {
            return Ok(false);
        };
        if !out_ty.dtype().is_float() {
            return Ok(false);
        }
        for (k, v) in outer.inputs.iter().enumerate() {
            let Some(p) = ir::producer(*v) else { continue };
            let same_dtype = ir::tensor_type(ctx, *v).is_some_and(|t| t.dtype() == out_ty.dtype());
            let single_use = v.num_uses(ctx) == 1;
            if !same_dtype || !single_use {
                continue;
            }
            let Some(inner) = program(ctx, p) else {
                continue;
            };
            let composed = compose(&outer, k, inner);
            if composed.inputs.len() > MAX_FUSED_INPUTS {
                continue;
            }
            let fused = build_fused(rw.ctx, &composed, out_ty.clone());
            rw.insert_before(op, fused);
            rw.replace_op(op, &[ir::result(rw.ctx, fused, 0)]);
            rw.erase(p);
            return Ok(true);
        }
        Ok(false)
    }
}
