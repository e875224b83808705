//! Evaluation functions: the reference semantics of each op, one module per op family
//! (mirroring `ops/`).

pub mod attention;
pub mod base;
pub mod elementwise;
pub mod fused;
pub mod kv;
pub mod linalg;
pub mod moe;
pub mod norm;
pub mod quant;
pub mod shape;
pub mod shard;

use std::rc::Rc;

use crate::{dtype::DType, ops::OpCheck, params::ParamValue, syntax::Dim, types::TensorType};

use super::value::{Tensor, Value};

/// Resolves `llm.weight` names to values.
pub trait WeightStore {
    /// The weight called `name`, if the store has it.
    fn weight(&self, name: &str) -> Option<Rc<Value>>;
}

/// What an evaluation function sees: the op (parameters and result types) and the weights.
pub struct Eval<'a> {
    /// The op being evaluated.
    pub op: &'a OpCheck<'a>,
    /// The weight store.
    pub weights: &'a dyn WeightStore,
}

/// The reference semantics of an op: inputs in operand order to outputs in result order.
pub type EvalFn = fn(&Eval, Vec<Rc<Value>>) -> Result<Vec<Rc<Value>>, String>;

/// Results of an evaluation function.
pub type Outputs = Result<Vec<Rc<Value>>, String>;

/// One tensor result.
pub fn one(t: Tensor) -> Outputs {
    Ok(vec![Rc::new(Value::Tensor(t))])
}

impl Eval<'_> {
    /// The declared type of result `i` as a tensor type.
    pub fn result_tensor(&self, i: usize) -> Result<TensorType, String> {
        self.op.result_tensor(i).map_err(|e| e.err.to_string())
    }

    /// The element type of tensor result `i`.
    pub fn result_dtype(&self, i: usize) -> Result<DType, String> {
        Ok(self.result_tensor(i)?.dtype())
    }

    /// Parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<ParamValue> {
        self.op.param(name)
    }

    /// Integer parameter `name`, or `default`.
    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.op.int(name).unwrap_or(default)
    }

    /// Float parameter `name`, if present.
    pub fn float(&self, name: &str) -> Option<f64> {
        self.op.float(name)
    }

    /// Boolean parameter `name`, or `default`.
    pub fn flag(&self, name: &str, default: bool) -> bool {
        self.op.flag(name, default)
    }

    /// An axis parameter resolved against `rank`.
    pub fn axis(&self, name: &str, default: i64, rank: usize) -> Result<usize, String> {
        let axis = self.int(name, default);
        let resolved = if axis < 0 { axis + rank as i64 } else { axis };
        if resolved < 0 || resolved >= rank as i64 {
            return Err(format!("axis {axis} is out of range for rank {rank}"));
        }
        Ok(resolved as usize)
    }
}

/// Resolves a declared shape against a known element count: static dims are kept, and a
/// single dynamic dim takes the remaining size.
pub fn resolve_shape(dims: &[Dim], count: usize) -> Result<Vec<usize>, String> {
    let mut shape = Vec::with_capacity(dims.len());
    resolve_shape_into(dims, count, &mut shape)?;
    Ok(shape)
}

/// [`resolve_shape`] into `shape` (cleared first; its memory is reused).
pub fn resolve_shape_into(
    dims: &[Dim],
    count: usize,
    shape: &mut Vec<usize>,
) -> Result<(), String> {
    let known: usize = dims.iter().flatten().map(|&d| d as usize).product();
    let dynamic = dims.iter().filter(|d| d.is_none()).count();
    let rest = match dynamic {
        0 if known == count => 0,
        1 if known > 0 && count.is_multiple_of(known) => count / known,
        1 if known == 0 && count == 0 => 0,
        0 | 1 => {
            return Err(format!(
                "{count} elements cannot take the shape {}",
                crate::ops::show_shape(dims)
            ));
        }
        _ => {
            return Err(format!(
                "cannot infer more than one dynamic dim of {} at run time",
                crate::ops::show_shape(dims)
            ));
        }
    };
    shape.clear();
    shape.extend(dims.iter().map(|d| d.map_or(rest, |d| d as usize)));
    Ok(())
}

/// Row-major strides of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The multi-index of flat `index` in `shape`.
pub fn unravel(mut index: usize, shape: &[usize]) -> Vec<usize> {
    let mut out = vec![0; shape.len()];
    for i in (0..shape.len()).rev() {
        if shape[i] > 0 {
            out[i] = index % shape[i];
            index /= shape[i];
        }
    }
    out
}
