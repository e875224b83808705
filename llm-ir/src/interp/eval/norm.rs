//! Semantics of `llm.rms_norm`, `llm.layer_norm` and `llm.softmax`.

use std::rc::Rc;

use super::{Eval, Outputs, one};
use crate::interp::value::{Tensor, Value};

pub(crate) fn eps(e: &Eval) -> f32 {
    e.float("eps").unwrap_or(1e-5) as f32
}

/// RMS normalisation of each row of `x` (rows of `d` values), as llama2.c computes it:
/// `w * (x / sqrt(mean(x^2) + eps))`, accumulating in `f32`.
pub fn rms_norm_rows(x: &[f32], d: usize, w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(d.max(1)) {
        let mut ss = 0f32;
        for &v in row {
            ss += v * v;
        }
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| g * (inv * v)));
    }
    out
}

/// `llm.rms_norm`.
pub fn rms_norm(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let (x, w) = (inputs[0].tensor()?, inputs[1].tensor()?.floats()?);
    let d = *x.shape.last().unwrap_or(&1);
    if w.len() != d {
        return Err(format!(
            "the weight has {} elements for rows of {d}",
            w.len()
        ));
    }
    let out = rms_norm_rows(x.floats()?, d, w, eps(e));
    one(Tensor::from_f32(x.shape.clone(), e.result_dtype(0)?, out))
}

/// `llm.layer_norm`: `(x - mean) / sqrt(var + eps) * w + b` with the population variance.
pub fn layer_norm(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].tensor()?;
    let (w, b) = (inputs[1].tensor()?.floats()?, inputs[2].tensor()?.floats()?);
    let d = *x.shape.last().unwrap_or(&1);
    if w.len() != d || b.len() != d {
        return Err(format!(
            "weight and bias have {} and {} elements for rows of {d}",
            w.len(),
            b.len()
        ));
    }
    let mut out = Vec::with_capacity(x.len());
    for row in x.floats()?.chunks(d.max(1)) {
        let mean = row.iter().sum::<f32>() / d as f32;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps(e)).sqrt();
        out.extend(
            row.iter()
                .zip(w.iter().zip(b))
                .map(|(&v, (&g, &c))| (v - mean) * inv * g + c),
        );
    }
    one(Tensor::from_f32(x.shape.clone(), e.result_dtype(0)?, out))
}

/// Softmax of one row in place, as llama2.c computes it.
pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row.iter_mut() {
        *v /= sum;
    }
}

/// `llm.softmax` along `axis`.
pub fn softmax(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].tensor()?;
    let axis = e.axis("axis", -1, x.shape.len())?;
    let (n, inner) = (x.shape[axis], x.shape[axis + 1..].iter().product::<usize>());
    let outer: usize = x.shape[..axis].iter().product();
    let data = x.floats()?;
    let mut out = data.to_vec();
    let mut row = vec![0f32; n];
    for o in 0..outer {
        for i in 0..inner {
            for (j, r) in row.iter_mut().enumerate() {
                *r = data[(o * n + j) * inner + i];
            }
            softmax_in_place(&mut row);
            for (j, r) in row.iter().enumerate() {
                out[(o * n + j) * inner + i] = *r;
            }
        }
    }
    one(Tensor::from_f32(x.shape.clone(), e.result_dtype(0)?, out))
}
