//! Semantics of `llm.quantize`, `llm.dequantize` and `llm.quantized_matmul`.

use std::rc::Rc;

use super::{Eval, Outputs, linalg::matmul_2d, one};
use crate::interp::{
    quant,
    value::{QTensor, Tensor, Value},
};

/// `llm.quantize`.
pub fn quantize(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].tensor()?;
    let ty =
        e.op.result_quantized(0)
            .map_err(|err| err.err.to_string())?;
    let dims: Vec<Option<u64>> = x.shape.iter().map(|&d| Some(d as u64)).collect();
    ty.format().validate_shape(&dims)?;
    let bytes = quant::quantize(ty.format(), &x.shape, x.floats()?);
    Ok(vec![Rc::new(Value::Quantized(QTensor {
        shape: x.shape.clone(),
        format: ty.format().clone(),
        bytes,
    }))])
}

/// `llm.dequantize`.
pub fn dequantize(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let q = inputs[0].quantized()?;
    one(Tensor::from_f32(
        q.shape.clone(),
        e.result_dtype(0)?,
        quant::dequantize(&q.format, &q.shape, &q.bytes),
    ))
}

/// `llm.quantized_matmul`: `x @ dequantize(w)^T`, with a quantized `x` dequantized first.
pub fn quantized_matmul(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let w = inputs[1].quantized()?;
    let (n, k) = (w.shape[0], w.shape[1]);
    let dequantized;
    let (x_shape, xs) = match &*inputs[0] {
        Value::Quantized(q) => {
            dequantized = quant::dequantize(&q.format, &q.shape, &q.bytes);
            (&q.shape, &dequantized[..])
        }
        other => {
            let x = other.tensor()?;
            (&x.shape, x.floats()?)
        }
    };
    if x_shape.last() != Some(&k) {
        return Err(format!(
            "the input {x_shape:?} does not end in the weight's K = {k}"
        ));
    }
    let weights = quant::dequantize(&w.format, &w.shape, &w.bytes);
    let m = xs.len() / k.max(1);
    let out = matmul_2d(xs, m, k, n, |p, j| weights[j * k + p]);
    let mut shape = x_shape[..x_shape.len() - 1].to_vec();
    shape.push(n);
    one(Tensor::from_f32(shape, e.result_dtype(0)?, out))
}
