//! Semantics of the fused ops: the same arithmetic, in the same order, as the ops they
//! replace.

use std::rc::Rc;

use pliron::{
    context::{Context, Ptr},
    linked_list::ContainsLinkedList,
    operation::Operation,
    value::Value as IrValue,
};

use super::{
    Eval, Outputs,
    attention::paged_attend,
    elementwise::{BINARY, UNARY, binary_fn, broadcast, broadcast_index, unary_fn},
    kv::append,
    linalg::matmul_2d,
    norm::{eps, rms_norm_rows},
    one,
};
use crate::{
    dtype::DType,
    interp::value::{Tensor, Value, round_float},
    ops::OpCheck,
    params::ParamValue,
};

/// One step of a scalar body: an elementwise op on earlier slots, or a constant.
#[derive(Debug, Clone, PartialEq)]
pub enum ScalarStep {
    /// A unary op (`llm.silu`, ...) on a slot.
    Unary(&'static str, usize),
    /// A binary op (`llm.add`, ...) on two slots.
    Binary(&'static str, usize, usize),
    /// A constant.
    Constant(f32),
}

/// The scalar body of an `llm.fused` op in a form backends consume: slots `0..args` are
/// the block arguments (one element of each operand), slot `args + i` is the result of
/// `steps[i]`, and `result` is the yielded slot.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarBody {
    /// Number of block arguments.
    pub args: usize,
    /// The steps, in order.
    pub steps: Vec<ScalarStep>,
    /// The yielded slot.
    pub result: usize,
    /// The element type of the values: every step's result is rounded to it, as separate
    /// ops of that type would round theirs (`F32` rounds nothing).
    pub dtype: DType,
}

impl ScalarBody {
    /// Reads the body of the `llm.fused` op `op`.
    pub fn of(ctx: &Context, op: Ptr<Operation>) -> Result<ScalarBody, String> {
        let region = op.deref(ctx).get_region(0);
        let block = region
            .deref(ctx)
            .iter(ctx)
            .next()
            .ok_or("the body has no block")?;
        let mut slots: Vec<IrValue> = block.deref(ctx).arguments().collect();
        let args = slots.len();
        let dtype = OpCheck::for_eval(ctx, op)
            .result_tensor(0)
            .map_err(|e| e.err.to_string())?
            .dtype();
        let mut steps = Vec::new();
        let slot_of = |slots: &[IrValue], v: IrValue| {
            slots
                .iter()
                .position(|s| *s == v)
                .ok_or("a body operand is not defined in the body")
        };
        for op in block.deref(ctx).iter(ctx).collect::<Vec<_>>() {
            let name = Operation::get_opid(op, ctx).to_string();
            let operands: Vec<IrValue> = op.deref(ctx).operands().collect();
            let slot_args: Vec<usize> = operands
                .iter()
                .map(|&v| slot_of(&slots, v))
                .collect::<Result<_, _>>()?;
            if name == "llm.yield" {
                let result = *slot_args.first().ok_or("llm.yield has no operand")?;
                return Ok(ScalarBody {
                    args,
                    steps,
                    result,
                    dtype,
                });
            }
            let step = if let Some((n, _)) = UNARY.iter().find(|(n, _)| *n == name) {
                ScalarStep::Unary(n, slot_args[0])
            } else if let Some((n, _)) = BINARY.iter().find(|(n, _)| *n == name) {
                ScalarStep::Binary(n, slot_args[0], slot_args[1])
            } else if name == "llm.constant" {
                let c = OpCheck::for_eval(ctx, op);
                match c.param("value") {
                    Some(ParamValue::List(v)) if v.len() == 1 => {
                        ScalarStep::Constant(v[0].as_number().unwrap_or(0.0) as f32)
                    }
                    Some(v) => ScalarStep::Constant(v.as_number().unwrap_or(0.0) as f32),
                    None => return Err("a body constant has no value".into()),
                }
            } else {
                return Err(format!("{name} cannot appear in a fused body"));
            };
            steps.push(step);
            slots.push(op.deref(ctx).get_result(0));
        }
        Err("the body does not end with llm.yield".into())
    }
}

/// A scalar body step with its function resolved.
enum Step {
    Unary(fn(f32) -> f32, usize),
    Binary(fn(f32, f32) -> f32, usize, usize),
    Constant(f32),
}

/// `llm.fused`: evaluates the scalar body once per element of the broadcast result.
pub fn fused(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let dtype = e.result_dtype(0)?;
    let tensors: Vec<&Tensor> = inputs
        .iter()
        .map(|v| v.tensor())
        .collect::<Result<_, _>>()?;
    let mut shape: Vec<usize> = vec![];
    for t in &tensors {
        shape = broadcast(&shape, &t.shape)?;
    }
    let body = ScalarBody::of(e.op.ctx, e.op.op)?;
    let steps: Vec<Step> = body
        .steps
        .iter()
        .map(|s| {
            Ok(match *s {
                ScalarStep::Unary(n, a) => Step::Unary(unary_fn(n).ok_or(n)?, a),
                ScalarStep::Binary(n, a, b) => Step::Binary(binary_fn(n).ok_or(n)?, a, b),
                ScalarStep::Constant(c) => Step::Constant(c),
            })
        })
        .collect::<Result<_, &str>>()
        .map_err(|n| format!("{n} has no scalar function"))?;
    let n_args = tensors.len();
    if n_args != body.args {
        return Err(format!(
            "{n_args} operands for a body of {} arguments",
            body.args
        ));
    }
    let data: Vec<&[f32]> = tensors
        .iter()
        .map(|t| t.floats())
        .collect::<Result<_, _>>()?;
    let index: Vec<Vec<usize>> = tensors
        .iter()
        .map(|t| broadcast_index(&t.shape, &shape))
        .collect();
    let count: usize = shape.iter().product();
    let mut values = vec![0f32; n_args + steps.len()];
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        for a in 0..n_args {
            values[a] = data[a][index[a][i]];
        }
        for (s, step) in steps.iter().enumerate() {
            // Each intermediate is rounded to the body's element type, as separate ops would.
            values[n_args + s] = round_float(
                dtype,
                match *step {
                    Step::Unary(f, a) => f(values[a]),
                    Step::Binary(f, a, b) => f(values[a], values[b]),
                    Step::Constant(c) => c,
                },
            );
        }
        out.push(values[body.result]);
    }
    one(Tensor::from_f32(shape, dtype, out))
}

/// `llm.rms_norm_matmul`.
pub fn rms_norm_matmul(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let (x, g, w) = (
        inputs[0].tensor()?,
        inputs[1].tensor()?,
        inputs[2].tensor()?,
    );
    let dtype = e.result_dtype(0)?;
    let k = *x.shape.last().unwrap_or(&1);
    let wk = if e.flag("transpose_rhs", false) {
        w.shape[1]
    } else {
        w.shape[0]
    };
    if g.len() != k || wk != k {
        return Err(format!(
            "rows of {k} do not fit the norm weight {:?} and rhs {:?}",
            g.shape, w.shape
        ));
    }
    let normed: Vec<f32> = rms_norm_rows(x.floats()?, k, g.floats()?, eps(e))
        .into_iter()
        .map(|v| round_float(x.dtype, v))
        .collect();
    let m = x.len() / k.max(1);
    let wd = w.floats()?;
    let (out, n) = if e.flag("transpose_rhs", false) {
        let n = w.shape[0];
        (matmul_2d(&normed, m, k, n, |p, j| wd[j * k + p]), n)
    } else {
        let n = w.shape[1];
        (matmul_2d(&normed, m, k, n, |p, j| wd[p * n + j]), n)
    };
    let mut shape = x.shape[..x.shape.len() - 1].to_vec();
    shape.push(n);
    one(Tensor::from_f32(shape, dtype, out))
}

/// `llm.append_attention`: append, then attend over the updated cache.
pub fn append_attention(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let given = inputs.len();
    let mut inputs = inputs.into_iter();
    let mut next = || {
        inputs
            .next()
            .ok_or_else(|| format!("expected 7 or 8 operands, found {given}"))
    };
    let [q, cache, k, v, slots, tables, lens] = [(); 7].map(|()| next());
    let sinks = next().ok();
    let cache = append(e, cache?, k?.tensor()?, v?.tensor()?, slots?.tensor()?)?;
    let sinks = sinks.as_deref().map(Value::tensor).transpose()?;
    let out = paged_attend(
        e,
        q?.tensor()?,
        &cache,
        [tables?.tensor()?, lens?.tensor()?],
        sinks,
    )?;
    Ok(vec![
        Rc::new(Value::Tensor(out)),
        Rc::new(Value::Cache(cache)),
    ])
}
