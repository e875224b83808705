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
    interp::value::{Data, Sharded, Tensor, Value},
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

/// Where the shards of a mesh live and how a backend moves and combines them: the mesh
/// logic of this module (which device holds which piece, which devices meet in a
/// collective, in which order they fold) is written once over it, and each executor
/// supplies the data operations for its own shards ([`HostMesh`] for the interpreter's
/// tensors).
pub trait MeshOps {
    /// One device's local value.
    type Shard: Clone;
    /// The dims of `shard`.
    fn dims(shard: &Self::Shard) -> &[usize];
    /// The box `[start, start + size)` of `x`.
    fn take_box(
        &mut self,
        x: &Self::Shard,
        start: &[usize],
        size: &[usize],
    ) -> Result<Self::Shard, String>;
    /// `parts` (one element type and shape but along `dim`) concatenated along `dim`.
    fn concat(&mut self, parts: &[&Self::Shard], dim: usize) -> Result<Self::Shard, String>;
    /// `a` and `b` (of one shape) combined element by element by `reduction`, in f32:
    /// one step of a collective's fold ([`reduce_parts`] orders the steps and rounds once,
    /// at the end).
    fn combine(
        &mut self,
        a: &Self::Shard,
        b: &Self::Shard,
        reduction: Reduction,
    ) -> Result<Self::Shard, String>;
    /// `acc`, folded in f32, rounded to the element type of `like`.
    fn round_like(&mut self, acc: Self::Shard, like: &Self::Shard) -> Result<Self::Shard, String>;
    /// One device's `[.., k]` input by its `[n, k]` weight: the `[.., n]` product.
    fn linear(&mut self, x: &Self::Shard, w: &Self::Shard) -> Result<Self::Shard, String>;
    /// Whether two shards hold the same values.
    fn same(&mut self, a: &Self::Shard, b: &Self::Shard) -> Result<bool, String>;
}

/// The interpreter's shards: host tensors, computed by the reference semantics.
pub struct HostMesh;

impl MeshOps for HostMesh {
    type Shard = Tensor;

    fn dims(shard: &Tensor) -> &[usize] {
        &shard.shape
    }

    fn take_box(&mut self, x: &Tensor, start: &[usize], size: &[usize]) -> Result<Tensor, String> {
        Ok(take_box(x, start, size))
    }

    fn concat(&mut self, parts: &[&Tensor], dim: usize) -> Result<Tensor, String> {
        concat_tensors(parts, dim, parts[0].dtype)
    }

    fn combine(&mut self, a: &Tensor, b: &Tensor, reduction: Reduction) -> Result<Tensor, String> {
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

    fn round_like(&mut self, acc: Tensor, like: &Tensor) -> Result<Tensor, String> {
        Ok(if acc.dtype == like.dtype {
            acc
        } else {
            Tensor::from_f32(acc.shape.clone(), like.dtype, acc.floats()?.to_vec())
        })
    }

    fn linear(&mut self, x: &Tensor, w: &Tensor) -> Result<Tensor, String> {
        let (n, k) = (w.shape[0], w.shape[1]);
        let m = x.len() / k.max(1);
        let wd = w.floats()?;
        let y = matmul_2d(x.floats()?, m, k, n, |p, j| wd[j * k + p]);
        Ok(Tensor::from_f32(product_shape(&x.shape, n), x.dtype, y))
    }

    fn same(&mut self, a: &Tensor, b: &Tensor) -> Result<bool, String> {
        Ok(same_bits(a, b))
    }
}

/// Whether two tensors hold the same values bit for bit (a NaN is the same as itself, so
/// devices that agree on a NaN agree).
pub fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    let data = match (&a.data, &b.data) {
        (Data::Float(x), Data::Float(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits())
        }
        (Data::Int(x), Data::Int(y)) => x == y,
        _ => false,
    };
    a.shape == b.shape && a.dtype == b.dtype && data
}

/// The shape of a `[.., k]` input's product by an `[n, k]` weight: `[.., n]`.
pub fn product_shape(x: &[usize], n: usize) -> Vec<usize> {
    let mut shape = x[..x.len().saturating_sub(1)].to_vec();
    shape.push(n);
    shape
}

/// `parts` of one shape folded in order (`((p0 . p1) . p2) ...`) by `reduction`, each step
/// in f32 ([`MeshOps::combine`]), and rounded once to the parts' element type.
pub fn reduce_parts<M: MeshOps>(
    m: &mut M,
    parts: &[&M::Shard],
    reduction: Reduction,
) -> Result<M::Shard, String> {
    let (first, rest) = parts.split_first().ok_or("no devices to fold")?;
    let mut acc = (*first).clone();
    for p in rest {
        if M::dims(p) != M::dims(first) {
            return Err(format!(
                "shards {:?} and {:?} differ",
                M::dims(first),
                M::dims(p)
            ));
        }
        acc = m.combine(&acc, p, reduction)?;
    }
    m.round_like(acc, first)
}

/// The box (start and size per dim) that `device` holds of a value of `dims` split by
/// `split`.
fn local_box(
    dims: &[usize],
    mesh: &[(String, u64)],
    split: &[Vec<String>],
    device: usize,
) -> (Vec<usize>, Vec<usize>) {
    let c = coords(mesh, device);
    let mut start = Vec::new();
    let mut size = Vec::new();
    for (d, axes) in split.iter().enumerate() {
        let (idx, parts) = piece(mesh, axes, &c);
        let len = dims[d] / parts;
        start.push(idx * len);
        size.push(len);
    }
    (start, size)
}

/// The local shard of `global` for `device` under `split`.
pub fn local_shard(
    global: &Tensor,
    mesh: &[(String, u64)],
    split: &[Vec<String>],
    device: usize,
) -> Tensor {
    let (start, size) = local_box(&global.shape, mesh, split, device);
    take_box(global, &start, &size)
}

fn num_devices(mesh: &[(String, u64)]) -> usize {
    mesh.iter().map(|(_, s)| *s as usize).product()
}

/// `llm.shard`.
pub fn shard(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let ty = e.op.result_sharded(0).map_err(|err| err.err.to_string())?;
    let y = shard_value(
        &mut HostMesh,
        inputs[0].tensor()?,
        ty.mesh(),
        ty.split(),
        ty.reduction(),
    )?;
    Ok(vec![Rc::new(Value::Sharded(y))])
}

/// `x` entering `mesh`: every device's box of it under `split` (no partial axes; a value
/// later made partial combines by `reduction`). Every split dim must divide evenly.
pub fn shard_value<M: MeshOps>(
    m: &mut M,
    x: &M::Shard,
    mesh: &[(String, u64)],
    split: &[Vec<String>],
    reduction: Reduction,
) -> Result<Sharded<M::Shard>, String> {
    let dims = M::dims(x).to_vec();
    let coords = vec![0; mesh.len()];
    for (d, axes) in split.iter().enumerate() {
        let parts = piece(mesh, axes, &coords).1;
        if dims.get(d).is_none_or(|len| !len.is_multiple_of(parts)) {
            return Err(format!(
                "dim {d} of a {dims:?} value does not split into {parts} equal pieces"
            ));
        }
    }
    let shards = (0..num_devices(mesh))
        .map(|d| {
            let (start, size) = local_box(&dims, mesh, split, d);
            m.take_box(x, &start, &size)
        })
        .collect::<Result<_, _>>()?;
    Ok(Sharded {
        shape: dims,
        mesh: mesh.to_vec(),
        split: split.to_vec(),
        partial: vec![],
        reduction,
        shards,
    })
}

/// Why an `unshard` fails when the devices hold different values.
pub const DEVICES_DISAGREE: &str = "the devices hold different values for a replicated tensor";

/// `llm.unshard`.
pub fn unshard(_: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let y = unshard_value(&mut HostMesh, inputs[0].sharded()?)?;
    Ok(vec![Rc::new(Value::Tensor(y))])
}

/// A replicated value leaving its mesh: device 0's shard, after checking that every
/// device holds the same.
pub fn unshard_value<M: MeshOps>(m: &mut M, s: &Sharded<M::Shard>) -> Result<M::Shard, String> {
    let (first, rest) = s
        .shards
        .split_first()
        .ok_or("a sharded value on no device")?;
    for other in rest {
        if !m.same(first, other)? {
            return Err(DEVICES_DISAGREE.into());
        }
    }
    Ok(first.clone())
}

/// `llm.sharded_linear`: each device multiplies its shards.
pub fn sharded_linear(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let (x, w) = (inputs[0].sharded()?, inputs[1].sharded()?);
    let ty = e.op.result_sharded(0).map_err(|err| err.err.to_string())?;
    let y = sharded_linear_with(&mut HostMesh, x, w, ty.reduction())?;
    Ok(vec![Rc::new(Value::Sharded(y))])
}

/// `llm.sharded_linear` of `x` by `w`, each device's product by [`MeshOps::linear`]
/// (the rows of `n` outputs of the local `[.., k]` by `[n, k]`): the result keeps `x`'s
/// split on its leading dims, takes `w`'s `N` split on its last, and is partial (combined
/// by `reduction`) over the axes that split `K`, as the verifier says.
pub fn sharded_linear_with<M: MeshOps>(
    m: &mut M,
    x: &Sharded<M::Shard>,
    w: &Sharded<M::Shard>,
    reduction: Reduction,
) -> Result<Sharded<M::Shard>, String> {
    let r = x.shape.len();
    if w.shape.len() != 2 || r == 0 || x.shards.len() != w.shards.len() {
        return Err(format!(
            "cannot multiply a sharded {:?} by a sharded {:?}",
            x.shape, w.shape
        ));
    }
    let mut shards = Vec::with_capacity(x.shards.len());
    for (xs, ws) in x.shards.iter().zip(&w.shards) {
        let (xd, wd) = (M::dims(xs), M::dims(ws));
        if wd.len() != 2 || xd.last() != Some(&wd[1]) {
            return Err(format!(
                "a local input {xd:?} does not fit the local weight {wd:?}"
            ));
        }
        shards.push(m.linear(xs, ws)?);
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

/// For each device, `f` of its group's shards over `axes` (in piece order): one call per
/// distinct group, its result shared by the group's members (they see the same shards in
/// the same order).
fn per_group<M: MeshOps>(
    m: &mut M,
    x: &Sharded<M::Shard>,
    axes: &[String],
    mut f: impl FnMut(&mut M, &[&M::Shard]) -> Result<M::Shard, String>,
) -> Result<Vec<M::Shard>, String> {
    let mut done: Vec<(Vec<usize>, M::Shard)> = Vec::new();
    let mut out = Vec::with_capacity(x.shards.len());
    for d in 0..x.shards.len() {
        let members = group(&x.mesh, axes, d);
        let result = match done.iter().find(|(g, _)| *g == members) {
            Some((_, r)) => r.clone(),
            None => {
                let parts: Vec<&M::Shard> = members.iter().map(|&i| &x.shards[i]).collect();
                let r = f(m, &parts)?;
                done.push((members, r.clone()));
                r
            }
        };
        out.push(result);
    }
    Ok(out)
}

/// The partial axes of `x` other than `axes`.
fn partial_without<T>(x: &Sharded<T>, axes: &[String]) -> Vec<String> {
    x.partial
        .iter()
        .filter(|a| !axes.contains(a))
        .cloned()
        .collect()
}

fn axes_param(e: &Eval) -> Vec<String> {
    e.param("mesh_axes")
        .and_then(|p| p.as_word_list())
        .unwrap_or_default()
}

/// `llm.all_reduce`.
pub fn all_reduce(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let y = all_reduce_with(&mut HostMesh, inputs[0].sharded()?, &axes_param(e))?;
    Ok(vec![Rc::new(Value::Sharded(y))])
}

/// `llm.all_reduce` of `x` over mesh `axes`: each device's group of partial values folded
/// in piece order ([`reduce_parts`]).
pub fn all_reduce_with<M: MeshOps>(
    m: &mut M,
    x: &Sharded<M::Shard>,
    axes: &[String],
) -> Result<Sharded<M::Shard>, String> {
    let shards = per_group(m, x, axes, |m, parts| reduce_parts(m, parts, x.reduction))?;
    let mut y = x.with_shards(shards);
    y.partial = partial_without(x, axes);
    Ok(y)
}

/// `llm.all_gather`.
pub fn all_gather(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].sharded()?;
    let dim = e.axis("dim", 0, x.shape.len())?;
    let y = all_gather_with(&mut HostMesh, x, dim, &axes_param(e))?;
    Ok(vec![Rc::new(Value::Sharded(y))])
}

/// `llm.all_gather` of `x` along `dim` over mesh `axes`: each device's group's shards
/// concatenated in piece order; `dim` is then no longer split over `axes` (its last ones).
pub fn all_gather_with<M: MeshOps>(
    m: &mut M,
    x: &Sharded<M::Shard>,
    dim: usize,
    axes: &[String],
) -> Result<Sharded<M::Shard>, String> {
    if x.shards.is_empty() {
        return Err("a sharded value on no device".into());
    }
    if dim >= x.shape.len() {
        return Err(format!(
            "dim {dim} is outside a rank-{} tensor",
            x.shape.len()
        ));
    }
    let shards = per_group(m, x, axes, |m, parts| m.concat(parts, dim))?;
    let mut y = x.with_shards(shards);
    let keep = y.split[dim].len().saturating_sub(axes.len());
    y.split[dim].truncate(keep);
    Ok(y)
}

/// `llm.reduce_scatter`.
pub fn reduce_scatter(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let x = inputs[0].sharded()?;
    let dim = e.axis("dim", 0, x.shape.len())?;
    let y = reduce_scatter_with(&mut HostMesh, x, dim, &axes_param(e))?;
    Ok(vec![Rc::new(Value::Sharded(y))])
}

/// `llm.reduce_scatter` of `x` along `dim` over mesh `axes`: each device's group folded
/// as by [`all_reduce_with`], and the device keeps its piece of the result along `dim`.
pub fn reduce_scatter_with<M: MeshOps>(
    m: &mut M,
    x: &Sharded<M::Shard>,
    dim: usize,
    axes: &[String],
) -> Result<Sharded<M::Shard>, String> {
    if dim >= x.shape.len() {
        return Err(format!(
            "dim {dim} is outside a rank-{} tensor",
            x.shape.len()
        ));
    }
    let reduced = per_group(m, x, axes, |m, parts| reduce_parts(m, parts, x.reduction))?;
    let mut shards = Vec::with_capacity(x.shards.len());
    for (d, r) in reduced.iter().enumerate() {
        let dims = M::dims(r).to_vec();
        let (idx, parts) = piece(&x.mesh, axes, &coords(&x.mesh, d));
        let len = dims[dim] / parts;
        let mut start = vec![0; dims.len()];
        let mut size = dims;
        start[dim] = idx * len;
        size[dim] = len;
        shards.push(m.take_box(r, &start, &size)?);
    }
    let mut y = x.with_shards(shards);
    y.split[dim].extend(axes.iter().cloned());
    y.partial = partial_without(x, axes);
    Ok(y)
}
