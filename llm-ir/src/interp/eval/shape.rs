//! Semantics of the shape ops: reshape, transpose, slice, concat, cast and argmax.

use std::rc::Rc;

use super::{Eval, Outputs, one, resolve_shape, strides};
use crate::{
    dtype::DType,
    interp::value::{Data, QTensor, Tensor, Value},
    types::QuantFormat,
};

/// `llm.reshape`.
pub fn reshape(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].tensor()?;
    let ty = e.result_tensor(0)?;
    let shape = resolve_shape(ty.shape(), x.len())?;
    Ok(vec![Rc::new(Value::Tensor(Tensor {
        shape,
        dtype: x.dtype,
        data: x.data.clone(),
    }))])
}

/// `llm.transpose`.
pub fn transpose(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].tensor()?;
    let perm: Vec<usize> = e
        .param("perm")
        .and_then(|p| p.as_int_list())
        .unwrap_or_default()
        .iter()
        .map(|&p| p as usize)
        .collect();
    one(permute(x, &perm)?)
}

/// `x` with its dims in the order `perm` gives (dim `i` of the result is dim `perm[i]` of
/// `x`).
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor, String> {
    let (shape, step) = permute_layout(&x.shape, perm)?;
    Ok(strided_view(x, 0, shape, &step))
}

/// Where a transpose of a `dims` tensor by `perm` reads: the result's shape and the
/// distance between consecutive elements along each of its dims (from element 0). Fails
/// when `perm` is not a permutation of the dims.
pub fn permute_layout(dims: &[usize], perm: &[usize]) -> Result<(Vec<usize>, Vec<usize>), String> {
    let rank = dims.len();
    let mut seen = vec![false; rank];
    if perm.len() != rank
        || perm
            .iter()
            .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
    {
        return Err(format!("{perm:?} is not a permutation of {rank} dims"));
    }
    let shape = perm.iter().map(|&p| dims[p]).collect();
    let src = strides(dims);
    let step = perm.iter().map(|&p| src[p]).collect();
    Ok((shape, step))
}

/// The tensor of `shape` whose element at index `i` is element `first + Σ i[d] * step[d]`
/// of `x` (a transpose, a slice).
pub fn strided_view(x: &Tensor, first: usize, shape: Vec<usize>, step: &[usize]) -> Tensor {
    match &x.data {
        Data::Float(v) => {
            let out = strided(v, first, &shape, step);
            Tensor::from_f32(shape, x.dtype, out)
        }
        Data::Int(v) => {
            let out = strided(v, first, &shape, step);
            Tensor::from_i64(shape, x.dtype, out)
        }
    }
}

/// The elements of `v` read in the order of a tensor of `shape` whose first element is
/// `v[first]` and whose dims step `step` elements through `v`: rows of the last dim are
/// strided copies, and an odometer over the other dims moves each row's start.
fn strided<T: Copy>(v: &[T], first: usize, shape: &[usize], step: &[usize]) -> Vec<T> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    let Some((&last, outer)) = shape.split_last() else {
        out.push(v[first]);
        return out;
    };
    if n == 0 {
        return out;
    }
    let inner = step[outer.len()];
    let mut index = vec![0usize; outer.len()];
    let mut base = first;
    for _ in 0..n / last {
        out.extend((0..last).map(|j| v[base + j * inner]));
        for d in (0..outer.len()).rev() {
            index[d] += 1;
            base += step[d];
            if index[d] < outer[d] {
                break;
            }
            base -= step[d] * outer[d];
            index[d] = 0;
        }
    }
    out
}

/// `llm.slice`.
pub fn slice(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].tensor()?;
    let rank = x.shape.len();
    let starts = e
        .param("starts")
        .and_then(|p| p.as_int_list())
        .unwrap_or_default();
    let steps = e
        .param("steps")
        .and_then(|p| p.as_int_list())
        .unwrap_or_else(|| vec![1; rank]);
    let ty = e.result_tensor(0)?;
    let (shape, first, step) = slice_layout(&x.shape, &starts, &steps, ty.shape())?;
    one(strided_view(x, first, shape, &step))
}

/// Where a slice of a `dims` tensor reads: the result's shape (each dim as `result`
/// declares it, or as many steps as fit where it is dynamic), its first element and the
/// distance between consecutive elements along each dim. Fails when a dim would read past
/// the input.
pub fn slice_layout(
    dims: &[usize],
    starts: &[i64],
    steps: &[i64],
    result: &[Option<u64>],
) -> Result<(Vec<usize>, usize, Vec<usize>), String> {
    let rank = dims.len();
    if starts.len() != rank || steps.len() != rank || result.len() != rank {
        return Err(format!(
            "a slice of a rank-{rank} value needs {rank} starts and steps"
        ));
    }
    let mut shape = Vec::with_capacity(rank);
    for d in 0..rank {
        let (start, step) = (starts[d] as usize, steps[d] as usize);
        let size = match result[d] {
            Some(s) => s as usize,
            None => (dims[d].saturating_sub(start)).div_ceil(step),
        };
        if size > 0 && start + (size - 1) * step >= dims[d] {
            return Err(format!("dim {d} reads past the input's size {}", dims[d]));
        }
        shape.push(size);
    }
    let src = strides(dims);
    let first = (0..rank).map(|d| starts[d] as usize * src[d]).sum();
    let step = (0..rank).map(|d| steps[d] as usize * src[d]).collect();
    Ok((shape, first, step))
}

/// Concatenates tensors of one element kind along `axis` into a tensor of `dtype`.
pub fn concat_tensors(parts: &[&Tensor], axis: usize, dtype: DType) -> Result<Tensor, String> {
    let mut shape = parts[0].shape.clone();
    shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
    for p in parts {
        if p.shape.len() != shape.len()
            || p.shape
                .iter()
                .enumerate()
                .any(|(d, &s)| d != axis && s != shape[d])
        {
            return Err(format!(
                "cannot concatenate shapes {:?} and {:?} along {axis}",
                parts[0].shape, p.shape
            ));
        }
    }
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let chunks = |o: usize, p: &Tensor| {
        let chunk = p.shape[axis] * inner;
        o * chunk..(o + 1) * chunk
    };
    if dtype.is_float() {
        let mut out = Vec::with_capacity(shape.iter().product());
        for o in 0..outer {
            for p in parts {
                out.extend_from_slice(&p.floats()?[chunks(o, p)]);
            }
        }
        Ok(Tensor::from_f32(shape, dtype, out))
    } else {
        let mut out = Vec::with_capacity(shape.iter().product());
        for o in 0..outer {
            for p in parts {
                out.extend_from_slice(&p.ints()?[chunks(o, p)]);
            }
        }
        Ok(Tensor::from_i64(shape, dtype, out))
    }
}

/// `llm.concat` (of quantized tensors: their bytes in turn, as the verifier allows only
/// along dim 0 of a format whose rows are whole blocks).
pub fn concat(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    if let Value::Quantized(first) = &*inputs[0] {
        let parts: Vec<&QTensor> = inputs
            .iter()
            .map(|v| v.quantized())
            .collect::<Result<_, _>>()?;
        if let Some(q) = parts.iter().find(|q| {
            q.format != first.format || q.shape.is_empty() || q.shape[1..] != first.shape[1..]
        }) {
            return Err(format!(
                "cannot stack a {} {:?} on a {} {:?}",
                q.format.name(),
                q.shape,
                first.format.name(),
                first.shape
            ));
        }
        let stacked = stack_quantized(&first.format, &parts);
        return Ok(vec![Rc::new(Value::Quantized(stacked))]);
    }
    let parts: Vec<&Tensor> = inputs
        .iter()
        .map(|v| v.tensor())
        .collect::<Result<_, _>>()?;
    let axis = e.axis("axis", 0, parts[0].shape.len())?;
    one(concat_tensors(&parts, axis, e.result_dtype(0)?)?)
}

/// Quantized tensors of `format` stacked along dim 0: the first one's dims after the
/// first, the rows of every part in turn, their bytes one after another (the caller
/// checked that the parts share the format and those dims).
pub fn stack_quantized(format: &QuantFormat, parts: &[&QTensor]) -> QTensor {
    let mut shape = parts.first().map_or_else(Vec::new, |q| q.shape.clone());
    if let Some(rows) = shape.first_mut() {
        *rows = parts.iter().filter_map(|q| q.shape.first()).sum();
    }
    let bytes: Vec<&[u8]> = parts.iter().map(|q| &q.bytes[..]).collect();
    QTensor {
        shape,
        format: format.clone(),
        bytes: bytes.concat(),
    }
}

/// `llm.cast`: float rounding to nearest, float to int truncating and saturating, int wrapping.
pub fn cast(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].tensor()?;
    let to = e.result_dtype(0)?;
    let shape = x.shape.clone();
    one(match (&x.data, to.is_float()) {
        (Data::Float(v), true) => Tensor::from_f32(shape, to, v.clone()),
        (Data::Int(v), true) => Tensor::from_f32(shape, to, v.iter().map(|&i| i as f32).collect()),
        (Data::Float(v), false) => {
            let (min, max) = match to {
                DType::I8 => (i8::MIN as i64, i8::MAX as i64),
                DType::I32 => (i32::MIN as i64, i32::MAX as i64),
                _ => (i64::MIN, i64::MAX),
            };
            Tensor::from_i64(
                shape,
                to,
                v.iter().map(|&f| (f as i64).clamp(min, max)).collect(),
            )
        }
        (Data::Int(v), false) => Tensor::from_i64(shape, to, v.clone()),
    })
}

/// `llm.argmax`: the first index of the maximum along `axis`.
pub fn argmax(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].tensor()?;
    let axis = e.axis("axis", -1, x.shape.len())?;
    let (n, inner) = (x.shape[axis], x.shape[axis + 1..].iter().product::<usize>());
    let outer: usize = x.shape[..axis].iter().product();
    let data = x.floats()?;
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let mut best = 0;
            for j in 1..n {
                if data[(o * n + j) * inner + i] > data[(o * n + best) * inner + i] {
                    best = j;
                }
            }
            out.push(best as i64);
        }
    }
    let mut shape = x.shape.clone();
    shape.remove(axis);
    one(Tensor::from_i64(shape, e.result_dtype(0)?, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::eval::unravel;

    /// Every permutation of a rank-3 and a rank-4 tensor against index arithmetic.
    #[test]
    fn permute_matches_index_arithmetic() {
        for shape in [vec![2usize, 3, 4], vec![3, 1, 2, 5]] {
            let n: usize = shape.iter().product();
            let x = Tensor::from_i64(shape.clone(), DType::I64, (0..n as i64).collect());
            let src = strides(&shape);
            let rank = shape.len();
            let mut perms = vec![vec![]];
            for _ in 0..rank {
                perms = perms
                    .into_iter()
                    .flat_map(|p: Vec<usize>| {
                        (0..rank)
                            .filter(|d| !p.contains(d))
                            .map(|d| [p.clone(), vec![d]].concat())
                            .collect::<Vec<_>>()
                    })
                    .collect();
            }
            for perm in perms {
                let y = permute(&x, &perm).expect("a permutation");
                let out: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
                assert_eq!(y.shape, out);
                for (i, &v) in y.ints().expect("ints").iter().enumerate() {
                    let at: usize = unravel(i, &out)
                        .iter()
                        .zip(&perm)
                        .map(|(&idx, &p)| idx * src[p])
                        .sum();
                    assert_eq!(v, at as i64, "{perm:?} element {i}");
                }
            }
            assert!(permute(&x, &[0, 0, 1]).is_err());
        }
    }

    /// A strided view with an offset (a slice with steps) against index arithmetic.
    #[test]
    fn strided_view_reads_from_its_first_element() {
        let x = Tensor::from_i64(vec![4, 6], DType::I64, (0..24).collect());
        // Rows 1 and 3, columns 2, 4.
        let y = strided_view(&x, 6 + 2, vec![2, 2], &[12, 2]);
        assert_eq!(y.ints().expect("ints"), &[8, 10, 20, 22]);
    }
}
