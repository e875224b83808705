//! Semantics of `llm.matmul` and `llm.embedding`.

use std::rc::Rc;

use super::{Eval, Outputs, one};
use crate::interp::{
    quant,
    value::{Tensor, Value},
};

/// `out[m, n] = sum_k a[m, k] * b(k, n)` for one matrix pair, accumulating in `f32` in order
/// of `k`. `b_at(k, n)` reads the right-hand side.
pub fn matmul_2d(
    a: &[f32],
    m: usize,
    k: usize,
    n: usize,
    b_at: impl Fn(usize, usize) -> f32,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for p in 0..k {
                acc += a[i * k + p] * b_at(p, j);
            }
            out[i * n + j] = acc;
        }
    }
    out
}

/// `llm.matmul`.
pub fn matmul(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let (a, b) = (inputs[0].tensor()?, inputs[1].tensor()?);
    let transposed = e.flag("transpose_rhs", false);
    let (ar, br) = (a.shape.len(), b.shape.len());
    let (m, k) = (a.shape[ar - 2], a.shape[ar - 1]);
    let (bk, n) = if transposed {
        (b.shape[br - 1], b.shape[br - 2])
    } else {
        (b.shape[br - 2], b.shape[br - 1])
    };
    if k != bk {
        return Err(format!("contraction dims differ at run time: {k} vs {bk}"));
    }
    let batch: usize = a.shape[..ar - 2].iter().product();
    let b_batched = br > 2;
    if b_batched && b.shape[..br - 2] != a.shape[..ar - 2] {
        return Err(format!(
            "batch dims differ at run time: {:?} vs {:?}",
            a.shape, b.shape
        ));
    }
    let (x, w) = (a.floats()?, b.floats()?);
    let mut out = Vec::with_capacity(batch * m * n);
    for bi in 0..batch {
        let xa = &x[bi * m * k..(bi + 1) * m * k];
        let wb = if b_batched {
            &w[bi * k * n..(bi + 1) * k * n]
        } else {
            w
        };
        let block = if transposed {
            matmul_2d(xa, m, k, n, |p, j| wb[j * k + p])
        } else {
            matmul_2d(xa, m, k, n, |p, j| wb[p * n + j])
        };
        out.extend(block);
    }
    let mut shape = a.shape[..ar - 2].to_vec();
    shape.extend([m, n]);
    one(Tensor::from_f32(shape, e.result_dtype(0)?, out))
}

/// Row `r` of an embedding table (dequantized for a quantized table).
fn table_row(table: &Value, r: usize) -> Result<Vec<f32>, String> {
    match table {
        Value::Tensor(t) => {
            let d = t.shape[1];
            Ok(t.floats()?[r * d..(r + 1) * d].to_vec())
        }
        Value::Quantized(q) if q.format.gguf_block_bytes().is_some() => {
            // GGUF rows are whole blocks, stored one after another.
            let row_bytes = quant::storage_bytes(&q.format, &q.shape[1..]);
            let bytes = &q.bytes[r * row_bytes..(r + 1) * row_bytes];
            Ok(quant::dequantize(&q.format, &q.shape[1..], bytes))
        }
        Value::Quantized(q) => {
            // nf4 and affine formats store all codes before all scales.
            let d = q.shape[1];
            Ok(quant::dequantize(&q.format, &q.shape, &q.bytes)[r * d..(r + 1) * d].to_vec())
        }
        other => Err(format!("the table is {}", other.kind())),
    }
}

/// `llm.embedding`: gathers (and dequantizes) rows of the table.
pub fn embedding(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let ids = inputs[1].tensor()?;
    let (vocab, dim) = match &*inputs[0] {
        Value::Tensor(t) => (t.shape[0], t.shape[1]),
        Value::Quantized(q) => (q.shape[0], q.shape[1]),
        other => return Err(format!("the table is {}", other.kind())),
    };
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids.ints()? {
        if id < 0 || id as usize >= vocab {
            return Err(format!(
                "token id {id} is out of range for a table of {vocab} rows"
            ));
        }
        out.extend(table_row(&inputs[0], id as usize)?);
    }
    let mut shape = ids.shape.clone();
    shape.push(dim);
    one(Tensor::from_f32(shape, e.result_dtype(0)?, out))
}
