//! Semantics of the mixture-of-experts ops: `llm.topk` and `llm.expert_matmul`.

use std::{
    collections::{HashMap, hash_map::Entry},
    rc::Rc,
};

use super::{Eval, Outputs, linalg::matmul_2d, one};
use crate::interp::{
    quant,
    value::{Tensor, Value},
};

/// The `k` largest of each row of `n` values of `xs`, largest first, with their indices:
/// slot `r` takes the first of the largest values not taken by an earlier slot (a value
/// replaces the current best only when it is greater, as in `llm.argmax`).
///
/// # Panics
///
/// When `k > n` or `xs` is not whole rows of `n`.
pub fn topk_rows(xs: &[f32], n: usize, k: usize) -> (Vec<f32>, Vec<i64>) {
    assert!(k <= n && xs.len().is_multiple_of(n.max(1)));
    let rows = xs.len().checked_div(n).unwrap_or(0);
    let (mut values, mut indices) = (Vec::with_capacity(rows * k), Vec::with_capacity(rows * k));
    let mut taken = vec![false; n];
    for row in xs.chunks_exact(n.max(1)).take(rows) {
        taken.fill(false);
        for _ in 0..k {
            let mut best = taken.iter().position(|&t| !t).expect("k <= n");
            for j in best + 1..n {
                if !taken[j] && row[j] > row[best] {
                    best = j;
                }
            }
            taken[best] = true;
            values.push(row[best]);
            indices.push(best as i64);
        }
    }
    (values, indices)
}

/// `llm.topk` along the last dim.
pub fn topk(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].tensor()?;
    let k = usize::try_from(e.int("k", 1)).map_err(|_| "`k` is negative".to_string())?;
    let n = *x.shape.last().ok_or("the input has rank 0")?;
    if k > n {
        return Err(format!("k = {k} is more than the {n} elements of a row"));
    }
    let (values, indices) = topk_rows(x.floats()?, n, k);
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("rank at least 1") = k;
    Ok(vec![
        Rc::new(Value::Tensor(Tensor::from_f32(
            shape.clone(),
            e.result_dtype(0)?,
            values,
        ))),
        Rc::new(Value::Tensor(Tensor::from_i64(
            shape,
            e.result_dtype(1)?,
            indices,
        ))),
    ])
}

/// The dims of an `llm.expert_matmul`, read from its run-time operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertDims {
    /// Tokens.
    pub tokens: usize,
    /// Slots (experts chosen) per token.
    pub slots: usize,
    /// Experts stacked in the weight.
    pub experts: usize,
    /// Rows of each expert's matrix (output features).
    pub n: usize,
    /// The contraction length.
    pub k: usize,
    /// The input has a row per slot (`[T, S, K]`) rather than one per token.
    pub per_slot: bool,
}

impl ExpertDims {
    /// The dims of input `x_shape`, weight `w_shape` and ids `ids_shape`, checked to agree.
    pub fn of(x_shape: &[usize], w_shape: &[usize], ids_shape: &[usize]) -> Result<Self, String> {
        let (&[tokens, slots], &[experts, n, k]) = (ids_shape, w_shape) else {
            return Err(format!(
                "the ids {ids_shape:?} are not [T, S] or the weight {w_shape:?} is not [E, N, K]"
            ));
        };
        let per_slot = match *x_shape {
            [t, xk] if t == tokens && xk == k => false,
            [t, s, xk] if t == tokens && s == slots && xk == k => true,
            _ => {
                return Err(format!(
                    "the input {x_shape:?} is neither [{tokens}, {k}] nor [{tokens}, {slots}, {k}]"
                ));
            }
        };
        Ok(ExpertDims {
            tokens,
            slots,
            experts,
            n,
            k,
            per_slot,
        })
    }

    /// The input row that slot `s` of token `t` reads.
    pub fn input_row(&self, t: usize, s: usize) -> usize {
        if self.per_slot { t * self.slots + s } else { t }
    }
}

/// The dims of an `llm.expert_matmul`'s operands `inputs` (input, stacked weight, ids),
/// checked to agree, and the expert each slot chose, checked to be among the weight's.
pub fn routed_slots(inputs: &[Rc<Value>]) -> Result<(ExpertDims, Vec<usize>), String> {
    let (x, ids) = (inputs[0].tensor()?, inputs[2].tensor()?);
    let w_shape = match &*inputs[1] {
        Value::Tensor(t) => &t.shape,
        Value::Quantized(q) => &q.shape,
        other => return Err(format!("the weight is {}", other.kind())),
    };
    let dims = ExpertDims::of(&x.shape, w_shape, &ids.shape)?;
    Ok((dims, expert_ids(ids, dims.experts)?))
}

/// The expert ids of `ids`, each checked to be in `0..experts`.
fn expert_ids(ids: &Tensor, experts: usize) -> Result<Vec<usize>, String> {
    ids.ints()?
        .iter()
        .map(|&id| {
            usize::try_from(id)
                .ok()
                .filter(|&e| e < experts)
                .ok_or_else(|| format!("expert id {id} is out of range for {experts} experts"))
        })
        .collect()
}

/// The `n x k` floats of expert `e` of a stacked `[E, n, k]` weight: a float tensor's
/// rows, or a quantized one's dequantized (GGUF block formats expert by expert; the
/// whole-matrix formats, nf4 and affine, whole, once, into `whole`).
fn expert_matrix(
    w: &Value,
    e: usize,
    (n, k): (usize, usize),
    whole: &mut Option<Vec<f32>>,
) -> Result<Vec<f32>, String> {
    let size = n * k;
    match w {
        Value::Tensor(t) => Ok(t.floats()?[e * size..(e + 1) * size].to_vec()),
        Value::Quantized(q) if q.format.gguf_block_bytes().is_some() => {
            let bytes = quant::storage_bytes(&q.format, &[n, k]);
            let stored = q.bytes.get(e * bytes..(e + 1) * bytes).ok_or_else(|| {
                format!(
                    "the weight's {} bytes do not hold expert {e}",
                    q.bytes.len()
                )
            })?;
            Ok(quant::dequantize(&q.format, &[n, k], stored))
        }
        Value::Quantized(q) => {
            let all = whole.get_or_insert_with(|| quant::dequantize(&q.format, &q.shape, &q.bytes));
            Ok(all[e * size..(e + 1) * size].to_vec())
        }
        other => Err(format!("the weight is {}", other.kind())),
    }
}

/// `llm.expert_matmul`: each slot's input row times its expert's matrix, transposed.
pub fn expert_matmul(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let (dims, chosen) = routed_slots(&inputs)?;
    let (n, k) = (dims.n, dims.k);
    let xs = inputs[0].tensor()?.floats()?;
    let mut matrices: HashMap<usize, Vec<f32>> = HashMap::new();
    let mut whole = None;
    let mut out = Vec::with_capacity(dims.tokens * dims.slots * n);
    for t in 0..dims.tokens {
        for s in 0..dims.slots {
            let expert = chosen[t * dims.slots + s];
            let w = match matrices.entry(expert) {
                Entry::Occupied(held) => held.into_mut(),
                Entry::Vacant(slot) => {
                    slot.insert(expert_matrix(&inputs[1], expert, (n, k), &mut whole)?)
                }
            };
            let row = dims.input_row(t, s);
            let x_row = &xs[row * k..(row + 1) * k];
            out.extend(matmul_2d(x_row, 1, k, n, |p, j| w[j * k + p]));
        }
    }
    one(Tensor::from_f32(
        vec![dims.tokens, dims.slots, n],
        e.result_dtype(0)?,
        out,
    ))
}
