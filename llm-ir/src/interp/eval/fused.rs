//! Semantics of the fused ops: the same arithmetic, in the same order, as the ops they
//! replace.

use std::rc::Rc;

use pliron::{linked_list::ContainsLinkedList, operation::Operation, value::Value as IrValue};

use super::{
    Eval, Outputs,
    attention::paged_attend,
    elementwise::{binary_fn, broadcast, broadcast_index, unary_fn},
    kv::append,
    linalg::matmul_2d,
    norm::{eps, rms_norm_rows},
    one,
};
use crate::{
    interp::value::{Tensor, Value, round_float},
    params::ParamValue,
};

/// One step of a compiled scalar body.
enum Step {
    Unary(fn(f32) -> f32, usize),
    Binary(fn(f32, f32) -> f32, usize, usize),
    Constant(f32),
}

/// `llm.fused`: evaluates the scalar body once per element of the broadcast result.
pub fn fused(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let ctx = e.op.ctx;
    let dtype = e.result_dtype(0)?;
    let tensors: Vec<&Tensor> = inputs
        .iter()
        .map(|v| v.tensor())
        .collect::<Result<_, _>>()?;
    let mut shape: Vec<usize> = vec![];
    for t in &tensors {
        shape = broadcast(&shape, &t.shape)?;
    }
    let region = e.op.op.deref(ctx).get_region(0);
    let block = region
        .deref(ctx)
        .iter(ctx)
        .next()
        .ok_or("the body has no block")?;
    let mut slots: Vec<IrValue> = block.deref(ctx).arguments().collect();
    let mut steps = Vec::new();
    let mut result_slot = None;
    let slot_of = |slots: &[IrValue], v: IrValue| {
        slots
            .iter()
            .position(|s| *s == v)
            .ok_or("a body operand is not defined in the body")
    };
    for op in block.deref(ctx).iter(ctx).collect::<Vec<_>>() {
        let name = Operation::get_opid(op, ctx).to_string();
        let operands: Vec<IrValue> = op.deref(ctx).operands().collect();
        let args: Vec<usize> = operands
            .iter()
            .map(|&v| slot_of(&slots, v))
            .collect::<Result<_, _>>()?;
        if name == "llm.yield" {
            result_slot = args.first().copied();
            break;
        }
        let step = if let Some(f) = unary_fn(&name) {
            Step::Unary(f, args[0])
        } else if let Some(f) = binary_fn(&name) {
            Step::Binary(f, args[0], args[1])
        } else if name == "llm.constant" {
            let c = crate::ops::OpCheck::for_eval(ctx, op);
            match c.param("value") {
                Some(ParamValue::List(v)) if v.len() == 1 => {
                    Step::Constant(v[0].as_number().unwrap_or(0.0) as f32)
                }
                Some(v) => Step::Constant(v.as_number().unwrap_or(0.0) as f32),
                None => return Err("a body constant has no value".into()),
            }
        } else {
            return Err(format!("{name} cannot appear in a fused body"));
        };
        steps.push(step);
        slots.push(op.deref(ctx).get_result(0));
    }
    let result_slot = result_slot.ok_or("the body does not end with llm.yield")?;
    let n_args = tensors.len();
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
        out.push(values[result_slot]);
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
    let [q, cache, k, v, slots, tables, lens]: [Rc<Value>; 7] = inputs
        .try_into()
        .map_err(|i: Vec<_>| format!("expected 7 operands, found {}", i.len()))?;
    let cache = append(e, cache, k.tensor()?, v.tensor()?, slots.tensor()?)?;
    let out = paged_attend(e, q.tensor()?, &cache, tables.tensor()?, lens.tensor()?)?;
    Ok(vec![
        Rc::new(Value::Tensor(out)),
        Rc::new(Value::Cache(cache)),
    ])
}
