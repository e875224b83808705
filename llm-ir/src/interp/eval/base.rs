//! Semantics of `llm.weight`, `llm.constant` and `llm.return`.

use std::rc::Rc;

use super::{Eval, Outputs, one};
use crate::{
    interp::value::{Tensor, Value},
    params::ParamValue,
};

/// `llm.weight`: looks the name up in the weight store.
pub fn weight(e: &Eval, _: Vec<Rc<Value>>) -> Outputs {
    let Some(ParamValue::Str(name)) = e.param("name") else {
        return Err("missing the `name` parameter".into());
    };
    e.weights
        .weight(&name)
        .map(|w| vec![w])
        .ok_or_else(|| format!("the weight store has no tensor named {name:?}"))
}

/// `llm.constant`: the inline values, splatted when one is given.
pub fn constant(e: &Eval, _: Vec<Rc<Value>>) -> Outputs {
    let ty = e.result_tensor(0)?;
    let shape: Vec<usize> = ty.shape().iter().map(|d| d.unwrap_or(0) as usize).collect();
    let n: usize = shape.iter().product();
    let values = match e.param("value") {
        Some(ParamValue::List(items)) => items,
        Some(v) => vec![v; n],
        None => return Err("missing the `value` parameter".into()),
    };
    if ty.dtype().is_float() {
        let v = values
            .iter()
            .map(|v| v.as_number().unwrap_or(0.0) as f32)
            .collect();
        one(Tensor::from_f32(shape, ty.dtype(), v))
    } else {
        let v = values
            .iter()
            .map(|v| if let ParamValue::Int(i) = v { *i } else { 0 })
            .collect();
        one(Tensor::from_i64(shape, ty.dtype(), v))
    }
}

/// `llm.return`: passes its operands through (the interpreter returns them).
pub fn ret(_: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    Ok(inputs)
}

/// Ops that compute nothing (plan records).
pub fn nothing(_: &Eval, _: Vec<Rc<Value>>) -> Outputs {
    Ok(vec![])
}
