//! Semantics of the sharding ops over an in-process mesh of simulated devices.
//!
//! Device `d` has coordinates on the mesh axes in row-major order. A dim split over axes
//! `[a, b]` is cut into `size(a) * size(b)` equal pieces and device `d` holds piece
//! `coord(a) * size(b) + coord(b)`.

use std::rc::Rc;

use super::{
    Eval, Outputs,
    linalg::matmul_2d,
    shape::{concat_tensors, strided_view},
    strides,
};
use crate::{
    dtype::DType,
    interp::value::{Sharded, Tensor, Value},
    types::Reduction,
};

fn coords(mesh: &[(String, u64)], mut device: usize) -> Vec<usize> {
    let mut out = vec![0; mesh.len()];
    for (i, (_, size)) in mesh.iter().enumerate().rev() {
        out[i] = device % *size as usize;
        device /= *size as usize;
    }
    out
}

fn axis_pos(mesh: &[(String, u64)], axis: &str) -> usize {
    mesh.iter().position(|(n, _)| n == axis).unwrap_or(0)
}

/// The piece index and piece count of `axes` at `coords`.
fn piece(mesh: &[(String, u64)], axes: &[String], coords: &[usize]) -> (usize, usize) {
    axes.iter().fold((0, 1), |(idx, parts), a| {
        let p = axis_pos(mesh, a);
        let size = mesh[p].1 as usize;
        (idx * size + coords[p], parts * size)
    })
}

/// The box `[start, start + size)` of `x`.
fn take_box(x: &Tensor, start: &[usize], size: &[usize]) -> Tensor {
    let src = strides(&x.shape);
    let first = start.iter().zip(&src).map(|(&s, &st)| s * st).sum();
    strided_view(x, first, size.to_vec(), &src)
}

/// The local shard of `global` for `device` under `split`.
pub fn local_shard(
    global: &Tensor,
    mesh: &[(String, u64)],
    split: &[Vec<String>],
    device: usize,
) -> Tensor {
    let c = coords(mesh, device);
    let mut start = Vec::new();
    let mut size = Vec::new();
    for (d, axes) in split.iter().enumerate() {
        let (idx, parts) = piece(mesh, axes, &c);
        let len = global.shape[d] / parts;
        start.push(idx * len);
        size.push(len);
    }
    take_box(global, &start, &size)
}

fn num_devices(mesh: &[(String, u64)]) -> usize {
    mesh.iter().map(|(_, s)| *s as usize).product()
}

/// `llm.shard`.
pub fn shard(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let ty = e.op.result_sharded(0).map_err(|err| err.err.to_string())?;
    let y = shard_value(inputs[0].tensor()?, ty.mesh(), ty.split(), ty.reduction())?;
    Ok(vec![Rc::new(Value::Sharded(y))])
}

/// `x` entering `mesh`: every device's box of it under `split` (no partial axes; a value
/// later made partial combines by `reduction`). Every split dim must divide evenly.
pub fn shard_value(
    x: &Tensor,
    mesh: &[(String, u64)],
    split: &[Vec<String>],
    reduction: Reduction,
) -> Result<Sharded, String> {
    let coords = vec![0; mesh.len()];
    for (d, axes) in split.iter().enumerate() {
        let parts = piece(mesh, axes, &coords).1;
        if x.shape.get(d).is_none_or(|len| !len.is_multiple_of(parts)) {
            return Err(format!(
                "dim {d} of a {:?} value does not split into {parts} equal pieces",
                x.shape
            ));
        }
    }
    Ok(Sharded {
        shape: x.shape.clone(),
        mesh: mesh.to_vec(),
        split: split.to_vec(),
        partial: vec![],
        reduction,
        shards: (0..num_devices(mesh))
            .map(|d| local_shard(x, mesh, split, d))
            .collect(),
    })
}

/// `llm.unshard`.
pub fn unshard(_: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let y = unshard_value(inputs[0].sharded()?)?;
    Ok(vec![Rc::new(Value::Tensor(y))])
}

/// A replicated value leaving its mesh: device 0's shard, after checking that every
/// device holds the same.
pub fn unshard_value(s: &Sharded) -> Result<Tensor, String> {
    let first = s.shards.first().ok_or("a sharded value on no device")?;
    if s.shards.iter().any(|t| t != first) {
        return Err("the devices hold different values for a replicated tensor".into());
    }
    Ok(first.clone())
}

/// `llm.sharded_linear`: each device multiplies its shards.
pub fn sharded_linear(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let (x, w) = (inputs[0].sharded()?, inputs[1].sharded()?);
    let ty = e.op.result_sharded(0).map_err(|err| err.err.to_string())?;
    let y = sharded_linear_with(x, w, ty.reduction(), |xs, ws| {
        let (n, k) = (ws.shape[0], ws.shape[1]);
        let m = xs.len() / k.max(1);
        let wd = ws.floats()?;
        Ok(matmul_2d(xs.floats()?, m, k, n, |p, j| wd[j * k + p]))
    })?;
    Ok(vec![Rc::new(Value::Sharded(y))])
}

/// `llm.sharded_linear` of `x` by `w` with `local(x_shard, w_shard)` computing each
/// device's product (the rows of `n` outputs of the local `[.., k]` by `[n, k]`): the
/// result keeps `x`'s split on its leading dims, takes `w`'s `N` split on its last, and is
/// partial (combined by `reduction`) over the axes that split `K`, as the verifier says.
pub fn sharded_linear_with(
    x: &Sharded,
    w: &Sharded,
    reduction: Reduction,
    mut local: impl FnMut(&Tensor, &Tensor) -> Result<Vec<f32>, String>,
) -> Result<Sharded, String> {
    let r = x.shape.len();
    if w.shape.len() != 2 || r == 0 || x.shards.len() != w.shards.len() {
        return Err(format!(
            "cannot multiply a sharded {:?} by a sharded {:?}",
            x.shape, w.shape
        ));
    }
    let mut shards = Vec::with_capacity(x.shards.len());
    for (xs, ws) in x.shards.iter().zip(&w.shards) {
        let (n, k) = (ws.shape[0], ws.shape[1]);
        if xs.shape.last() != Some(&k) {
            return Err(format!(
                "a local input {:?} does not end in the local K = {k}",
                xs.shape
            ));
        }
        let mut shape = xs.shape[..xs.shape.len() - 1].to_vec();
        shape.push(n);
        shards.push(Tensor::from_f32(shape, xs.dtype, local(xs, ws)?));
    }
    let mut split = x.split[..r - 1].to_vec();
    split.push(w.split[0].clone());
    let mut shape = x.shape.clone();
    shape[r - 1] = w.shape[0];
    Ok(Sharded {
        shape,
        mesh: x.mesh.clone(),
        split,
        partial: x.split[r - 1].clone(),
        reduction,
        shards,
    })
}

/// The devices that differ from `device` only on `axes`, ordered by their piece index.
fn group(mesh: &[(String, u64)], axes: &[String], device: usize) -> Vec<usize> {
    let c = coords(mesh, device);
    let mut members: Vec<(usize, usize)> = (0..num_devices(mesh))
        .filter(|&other| {
            let oc = coords(mesh, other);
            mesh.iter()
                .enumerate()
                .all(|(i, (name, _))| axes.contains(name) || oc[i] == c[i])
        })
        .map(|other| (piece(mesh, axes, &coords(mesh, other)).0, other))
        .collect();
    members.sort_unstable();
    members.into_iter().map(|(_, d)| d).collect()
}

/// The local shards of the devices in `device`'s group over `axes`.
fn members<'a>(x: &'a Sharded, axes: &[String], device: usize) -> Vec<&'a Tensor> {
    group(&x.mesh, axes, device)
        .iter()
        .map(|&m| &x.shards[m])
        .collect()
}

/// The partial axes of `x` other than `axes`.
fn partial_without(x: &Sharded, axes: &[String]) -> Vec<String> {
    x.partial
        .iter()
        .filter(|a| !axes.contains(a))
        .cloned()
        .collect()
}

/// How two devices' partial values combine into one (the reduction of a collective).
pub type Combine<'a> = dyn FnMut(&Tensor, &Tensor) -> Result<Tensor, String> + 'a;

/// `a` and `b` combined element by element by `reduction`, in f32 (not rounded to a
/// narrower type: [`reduce`] rounds once, at the end).
fn combine(reduction: Reduction, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    let mut acc = a.floats()?.to_vec();
    for (x, &y) in acc.iter_mut().zip(b.floats()?) {
        *x = match reduction {
            Reduction::Sum => *x + y,
            Reduction::Max => x.max(y),
            Reduction::Min => x.min(y),
        };
    }
    Ok(Tensor::from_f32(a.shape.clone(), DType::F32, acc))
}

/// The parts folded in order with `combine` (`((p0 . p1) . p2) ...`), as the parts'
/// element type.
fn reduce(parts: &[&Tensor], combine: &mut Combine) -> Result<Tensor, String> {
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        acc = combine(&acc, p)?;
    }
    let dtype = parts[0].dtype;
    Ok(if acc.dtype == dtype {
        acc
    } else {
        Tensor::from_f32(acc.shape.clone(), dtype, acc.floats()?.to_vec())
    })
}

fn axes_param(e: &Eval) -> Vec<String> {
    e.param("mesh_axes")
        .and_then(|p| p.as_word_list())
        .unwrap_or_default()
}

/// `llm.all_reduce`.
pub fn all_reduce(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].sharded()?;
    let reduction = x.reduction;
    let y = all_reduce_with(x, &axes_param(e), &mut |a, b| combine(reduction, a, b))?;
    Ok(vec![Rc::new(Value::Sharded(y))])
}

/// `llm.all_reduce` of `x` over mesh `axes`, each device's group of partial values folded
/// with `combine` in piece order.
pub fn all_reduce_with(
    x: &Sharded,
    axes: &[String],
    combine: &mut Combine,
) -> Result<Sharded, String> {
    let shards = (0..x.shards.len())
        .map(|d| reduce(&members(x, axes, d), combine))
        .collect::<Result<_, _>>()?;
    Ok(Sharded {
        shape: x.shape.clone(),
        mesh: x.mesh.clone(),
        split: x.split.clone(),
        partial: partial_without(x, axes),
        reduction: x.reduction,
        shards,
    })
}

/// `llm.all_gather`.
pub fn all_gather(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].sharded()?;
    let dim = e.axis("dim", 0, x.shape.len())?;
    let y = all_gather_with(x, dim, &axes_param(e))?;
    Ok(vec![Rc::new(Value::Sharded(y))])
}

/// `llm.all_gather` of `x` along `dim` over mesh `axes`: each device's group's shards
/// concatenated in piece order; `dim` is then no longer split over `axes` (its last ones).
pub fn all_gather_with(x: &Sharded, dim: usize, axes: &[String]) -> Result<Sharded, String> {
    let Some(first) = x.shards.first() else {
        return Err("a sharded value on no device".into());
    };
    if dim >= x.shape.len() {
        return Err(format!(
            "dim {dim} is outside a rank-{} tensor",
            x.shape.len()
        ));
    }
    let shards = (0..x.shards.len())
        .map(|d| concat_tensors(&members(x, axes, d), dim, first.dtype))
        .collect::<Result<_, _>>()?;
    let mut split = x.split.clone();
    let keep = split[dim].len().saturating_sub(axes.len());
    split[dim].truncate(keep);
    Ok(Sharded {
        shape: x.shape.clone(),
        mesh: x.mesh.clone(),
        split,
        partial: x.partial.clone(),
        reduction: x.reduction,
        shards,
    })
}

/// `llm.reduce_scatter`.
pub fn reduce_scatter(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].sharded()?;
    let dim = e.axis("dim", 0, x.shape.len())?;
    let reduction = x.reduction;
    let y = reduce_scatter_with(x, dim, &axes_param(e), &mut |a, b| combine(reduction, a, b))?;
    Ok(vec![Rc::new(Value::Sharded(y))])
}

/// `llm.reduce_scatter` of `x` along `dim` over mesh `axes`: each device's group folded
/// with `combine`, and the device keeps its piece of the result along `dim`.
pub fn reduce_scatter_with(
    x: &Sharded,
    dim: usize,
    axes: &[String],
    combine: &mut Combine,
) -> Result<Sharded, String> {
    if dim >= x.shape.len() {
        return Err(format!(
            "dim {dim} is outside a rank-{} tensor",
            x.shape.len()
        ));
    }
    let mut shards = Vec::with_capacity(x.shards.len());
    for d in 0..x.shards.len() {
        let reduced = reduce(&members(x, axes, d), combine)?;
        let (idx, parts) = piece(&x.mesh, axes, &coords(&x.mesh, d));
        let len = reduced.shape[dim] / parts;
        let mut start = vec![0; reduced.shape.len()];
        let mut size = reduced.shape.clone();
        start[dim] = idx * len;
        size[dim] = len;
        shards.push(take_box(&reduced, &start, &size));
    }
    let mut split = x.split.clone();
    split[dim].extend(axes.iter().cloned());
    Ok(Sharded {
        shape: x.shape.clone(),
        mesh: x.mesh.clone(),
        split,
        partial: partial_without(x, axes),
        reduction: x.reduction,
        shards,
    })
}
