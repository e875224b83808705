//! Tensor parallelism: entering and leaving a mesh, sharded linear layers and collectives.
//!
//! Values of type `llm.sharded_tensor` live on every device of a mesh at once; each device
//! holds its shard (see [`ShardedTensorType`]). `llm.shard` and `llm.unshard` move between
//! plain and sharded values without communication; `llm.sharded_linear` computes on local
//! shards; `llm.all_gather`, `llm.reduce_scatter` and `llm.all_reduce` communicate.

use pliron::result::Result;

use crate::{
    llm_op,
    ops::{OpCheck, Operands, show_dim},
    params::{ParamKind, ParamSpec},
    types::{ShardedTensorType, dims_compatible},
};

/// Requires two sharded types to have the same global shape, element type and mesh.
fn same_global(
    c: &OpCheck,
    what: &str,
    t: &ShardedTensorType,
    want: &ShardedTensorType,
) -> Result<()> {
    c.shape(what, t.shape(), want.shape())?;
    c.same_dtype(what, t.dtype(), want.dtype())?;
    if t.mesh() != want.mesh() {
        return c.err(format!("{what} must be on the same mesh as the input"));
    }
    if !t.partial().is_empty() && t.reduction() != want.reduction() {
        return c.err(format!(
            "{what} must keep the input's partial reduction `{}`, found `{}`",
            want.reduction().name(),
            t.reduction().name()
        ));
    }
    Ok(())
}

/// Requires the result's split and partial state to be exactly `split`/`partial`.
fn expect_distribution(
    c: &OpCheck,
    out: &ShardedTensorType,
    split: &[Vec<String>],
    partial: &[String],
) -> Result<()> {
    if out.split() != split || out.partial() != partial {
        let want = out.with_distribution(c.ctx, split.to_vec(), partial.to_vec());
        return c.err(format!(
            "{} must be {}, found {}",
            c.result_desc(0),
            c.show(want.into()),
            c.show(c.result_type(0))
        ));
    }
    Ok(())
}

/// The `mesh_axes` parameter, checked to name distinct axes of the mesh.
fn mesh_axes(c: &OpCheck, t: &ShardedTensorType) -> Result<Vec<String>> {
    let axes = c
        .param("mesh_axes")
        .and_then(|p| p.as_word_list())
        .unwrap_or_default();
    if axes.is_empty() {
        return c.err("parameter `mesh_axes` must name at least one mesh axis");
    }
    for (i, a) in axes.iter().enumerate() {
        if t.axis_size(a).is_none() {
            let names: Vec<&str> = t.mesh().iter().map(|(n, _)| n.as_str()).collect();
            return c.err(format!(
                "parameter `mesh_axes` names `{a}`, which is not an axis of the mesh [{}]",
                names.join(", ")
            ));
        }
        if axes[..i].contains(a) {
            return c.err(format!("parameter `mesh_axes` lists `{a}` twice"));
        }
    }
    Ok(axes)
}

llm_op! {
    /// Distributes a plain tensor (present on every device) as the result's sharding: each
    /// device keeps its own shard. No communication.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: `llm.tensor` |
    /// | results | `result`: `llm.sharded_tensor` of the same shape, not partial |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.shard v0 : llm.sharded_tensor <8x64xf32, mesh = [tp = 2], split = [[], [tp]]>
    /// ```
    ShardOp = "llm.shard",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [],
    interfaces: [],
    check: |c| {
        let (x, out) = (c.tensor(0)?, c.result_sharded(0)?);
        c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
        c.shape(&c.result_desc(0), out.shape(), x.shape())?;
        if !out.partial().is_empty() {
            return c.err(format!("{} must not be partial", c.result_desc(0)));
        }
        Ok(())
    },
    eval: crate::interp::eval::shard::shard,
}

llm_op! {
    /// Leaves the mesh: a fully replicated, non-partial sharded tensor becomes a plain tensor.
    /// Gather or reduce first (`llm.all_gather`, `llm.all_reduce`) to replicate. No
    /// communication.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: replicated `llm.sharded_tensor` |
    /// | results | `result`: `llm.tensor` of the same shape |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.unshard v0 : llm.tensor <8x64xf32>
    /// ```
    UnshardOp = "llm.unshard",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [],
    interfaces: [],
    check: |c| {
        let (x, out) = (c.sharded(0)?, c.result_tensor(0)?);
        if x.split().iter().any(|s| !s.is_empty()) || !x.partial().is_empty() {
            return c.err(format!(
                "{} must be fully replicated (no split, not partial), found {}",
                c.operand_desc(0),
                c.show(c.operand_type(0))
            ));
        }
        c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
        c.shape(&c.result_desc(0), out.shape(), x.shape())
    },
    eval: crate::interp::eval::shard::unshard,
}

llm_op! {
    /// A linear layer on local shards: `result = input @ weight^T`, each device multiplying
    /// its own shards, with no communication.
    ///
    /// `weight` is `[N, K]`, `input` `[..., K]`. The split of `input`'s last dim must equal
    /// the split of `weight`'s `K` dim. The result `[..., N]` keeps `input`'s split on its
    /// leading dims, takes `weight`'s `N` split on its last dim (column parallel), and is
    /// `partial = sum` over the axes that split `K` (row parallel; follow with
    /// `llm.all_reduce` or `llm.reduce_scatter`).
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: `llm.sharded_tensor` `[..., K]`; `weight`: `llm.sharded_tensor` `[N, K]` |
    /// | results | `result`: `llm.sharded_tensor` `[..., N]` |
    ///
    /// Example:
    /// ```text
    /// v2 = llm.sharded_linear v0, v1 : llm.sharded_tensor <4x128xf32, mesh = [tp = 2], split = [[], [tp]]>
    /// ```
    ShardedLinearOp = "llm.sharded_linear",
    operands: Operands::Fixed(&["input", "weight"]),
    results: ["result"],
    params: [],
    interfaces: [],
    check: check_sharded_linear,
    eval: crate::interp::eval::shard::sharded_linear,
}

fn check_sharded_linear(c: &OpCheck) -> Result<()> {
    let (x, w, out) = (c.sharded(0)?, c.sharded(1)?, c.result_sharded(0)?);
    c.float_dtype(&c.operand_desc(0), x.dtype())?;
    c.same_dtype(&c.operand_desc(1), w.dtype(), x.dtype())?;
    if w.mesh() != x.mesh() {
        return c.err(format!(
            "{} must be on the mesh of {}",
            c.operand_desc(1),
            c.operand_desc(0)
        ));
    }
    for i in 0..2 {
        let t = if i == 0 { &x } else { &w };
        if !t.partial().is_empty() {
            return c.err(format!(
                "{} must not be partial; reduce it first",
                c.operand_desc(i)
            ));
        }
    }
    c.min_rank(&c.operand_desc(0), x.shape(), 1)?;
    c.rank(&c.operand_desc(1), w.shape(), 2)?;
    let r = x.shape().len();
    let (k, wk) = (x.shape()[r - 1], w.shape()[1]);
    if !dims_compatible(k, wk) {
        return c.err(format!(
            "contraction dims differ: {} has K = {}, {} has K = {}",
            c.operand_desc(0),
            show_dim(k),
            c.operand_desc(1),
            show_dim(wk)
        ));
    }
    if x.split()[r - 1] != w.split()[1] {
        return c.err(format!(
            "the K dim must be split the same way on both operands: {} splits it over [{}], {} over [{}]",
            c.operand_desc(0),
            x.split()[r - 1].join(", "),
            c.operand_desc(1),
            w.split()[1].join(", ")
        ));
    }
    let mut split: Vec<Vec<String>> = x.split()[..r - 1].to_vec();
    for axis in &w.split()[0] {
        if split.iter().any(|s| s.contains(axis)) {
            return c.err(format!(
                "mesh axis `{axis}` splits both a batch dim of {} and the N dim of {}",
                c.operand_desc(0),
                c.operand_desc(1)
            ));
        }
    }
    split.push(w.split()[0].clone());
    let mut want_shape = x.shape()[..r - 1].to_vec();
    want_shape.push(w.shape()[0]);
    c.shape(&c.result_desc(0), out.shape(), &want_shape)?;
    c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
    if out.mesh() != x.mesh() {
        return c.err(format!(
            "{} must be on the mesh of the operands",
            c.result_desc(0)
        ));
    }
    if out.reduction() != crate::types::Reduction::Sum && !x.split()[r - 1].is_empty() {
        return c.err(format!("{} must be a partial sum", c.result_desc(0)));
    }
    expect_distribution(c, &out, &split, &x.split()[r - 1])
}

llm_op! {
    /// Gathers the shards of dim `dim` over `mesh_axes`, which must be the innermost axes
    /// splitting that dim; afterwards the dim is no longer split over them.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: `llm.sharded_tensor` |
    /// | results | `result`: `llm.sharded_tensor` with `mesh_axes` removed from `dim`'s split |
    /// | `dim` (int, required) | the gathered tensor dim |
    /// | `mesh_axes` (list of names, required) | the axes gathered over |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.all_gather v0 {dim = 1, mesh_axes = [tp]} : llm.sharded_tensor <4x128xf32, mesh = [tp = 2], split = [[], []]>
    /// ```
    AllGatherOp = "llm.all_gather",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [
        ParamSpec::required("dim", ParamKind::Int),
        ParamSpec::required("mesh_axes", ParamKind::WordList),
    ],
    interfaces: [],
    check: |c| {
        let (x, out) = (c.sharded(0)?, c.result_sharded(0)?);
        same_global(c, &c.result_desc(0), &out, &x)?;
        let dim = c.axis("dim", 0, x.shape().len())?;
        let axes = mesh_axes(c, &x)?;
        let current = &x.split()[dim];
        if !current.ends_with(&axes) {
            return c.err(format!(
                "dim {dim} is split over [{}]; parameter `mesh_axes` = [{}] must be its innermost axes",
                current.join(", "),
                axes.join(", ")
            ));
        }
        let mut split = x.split().to_vec();
        split[dim].truncate(current.len() - axes.len());
        expect_distribution(c, &out, &split, x.partial())
    },
    eval: crate::interp::eval::shard::all_gather,
}

llm_op! {
    /// Reduces partial values over `mesh_axes` and scatters the result along `dim`: each
    /// device keeps one shard of the reduced tensor.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: `llm.sharded_tensor` partial over `mesh_axes` |
    /// | results | `result`: no longer partial over `mesh_axes`; `dim` additionally split over them |
    /// | `dim` (int, required) | the scattered tensor dim |
    /// | `mesh_axes` (list of names, required) | the axes reduced over |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.reduce_scatter v0 {dim = 0, mesh_axes = [tp]} : llm.sharded_tensor <4x64xf32, mesh = [tp = 2], split = [[tp], []]>
    /// ```
    ReduceScatterOp = "llm.reduce_scatter",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [
        ParamSpec::required("dim", ParamKind::Int),
        ParamSpec::required("mesh_axes", ParamKind::WordList),
    ],
    interfaces: [],
    check: |c| {
        let (x, out) = (c.sharded(0)?, c.result_sharded(0)?);
        same_global(c, &c.result_desc(0), &out, &x)?;
        let dim = c.axis("dim", 0, x.shape().len())?;
        let axes = mesh_axes(c, &x)?;
        let partial = remove_partial(c, &x, &axes)?;
        let mut split = x.split().to_vec();
        split[dim].extend(axes.iter().cloned());
        let check = x.with_distribution(c.ctx, split.clone(), partial.clone());
        if let Err(msg) = check.deref(c.ctx).validate() {
            return c.err(format!("cannot scatter dim {dim} over [{}]: {msg}", axes.join(", ")));
        }
        expect_distribution(c, &out, &split, &partial)
    },
    eval: crate::interp::eval::shard::reduce_scatter,
}

/// The partial axes of `x` without `axes`, all of which must be partial.
fn remove_partial(c: &OpCheck, x: &ShardedTensorType, axes: &[String]) -> Result<Vec<String>> {
    for a in axes {
        if !x.partial().contains(a) {
            return c.err(format!(
                "{} is not partial over mesh axis `{a}` (partial over [{}])",
                c.operand_desc(0),
                x.partial().join(", ")
            ));
        }
    }
    Ok(x.partial()
        .iter()
        .filter(|a| !axes.contains(a))
        .cloned()
        .collect())
}

llm_op! {
    /// Reduces partial values over `mesh_axes`; every device gets the reduced tensor.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: `llm.sharded_tensor` partial over `mesh_axes` |
    /// | results | `result`: the same sharding, no longer partial over `mesh_axes` |
    /// | `mesh_axes` (list of names, required) | the axes reduced over |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.all_reduce v0 {mesh_axes = [tp]} : llm.sharded_tensor <4x64xf32, mesh = [tp = 2], split = [[], []]>
    /// ```
    AllReduceOp = "llm.all_reduce",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [ParamSpec::required("mesh_axes", ParamKind::WordList)],
    interfaces: [],
    check: |c| {
        let (x, out) = (c.sharded(0)?, c.result_sharded(0)?);
        same_global(c, &c.result_desc(0), &out, &x)?;
        let axes = mesh_axes(c, &x)?;
        let partial = remove_partial(c, &x, &axes)?;
        expect_distribution(c, &out, x.split(), &partial)
    },
    eval: crate::interp::eval::shard::all_reduce,
}
