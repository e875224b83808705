//! Fused ops, produced by the `fuse` pass: an elementwise region with a scalar body, a
//! matmul with an RMSNorm prologue, and a KV append fused with paged attention.
//!
//! Each fused op means exactly the composition it replaces, with the same arithmetic in the
//! same order, so fusion never changes results.

use pliron::{
    builtin::op_interfaces::IsTerminatorInterface,
    linked_list::ContainsLinkedList,
    op::Op,
    operation::Operation,
    result::Result,
    r#type::{Typed, TypedHandle},
};

use crate::{
    llm_op,
    ops::{
        OpCheck, Operands,
        attention::{check_heads, check_layer, check_sinks},
        elementwise::broadcast_shapes,
        kv::{check_cache_is_dead_after, check_kv_rows},
        show_shape,
    },
    params::{ParamKind, ParamSpec},
    types::{TensorType, dims_compatible},
};

/// Whether `name` is an elementwise op (one of the ops with a scalar function in the
/// interpreter's tables: `llm.add` ... `llm.relu`).
pub fn is_elementwise(name: &str) -> bool {
    use crate::interp::eval::elementwise::{BINARY, UNARY};
    UNARY.iter().any(|(n, _)| *n == name) || BINARY.iter().any(|(n, _)| *n == name)
}

/// Whether op `name` may appear in the scalar body of `llm.fused`.
pub fn allowed_in_scalar_body(name: &str) -> bool {
    is_elementwise(name) || name == "llm.constant" || name == "llm.yield"
}

llm_op! {
    /// A chain of elementwise ops as one op: the body is evaluated once per element of the
    /// result on rank-0 tensors.
    ///
    /// The operands broadcast (NumPy rules) to the result shape and share its float element
    /// type. The body has one block whose arguments are rank-0 tensors of that type; it may
    /// use only elementwise ops and rank-0 `llm.constant` on that type, and ends with
    /// `llm.yield` of one rank-0 value. Element `i` of the result is the yielded value
    /// when the arguments hold the operands' (broadcast) elements `i`.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `inputs`: float `llm.tensor`s |
    /// | results | `result`: float `llm.tensor` of the broadcast shape |
    /// | region | the scalar body |
    ///
    /// Example:
    /// ```text
    /// v2 = llm.fused v0, v1 : llm.tensor <1x172xf32>
    /// {
    ///   ^bb0(a: llm.tensor <f32>, b: llm.tensor <f32>):
    ///     s = llm.silu a : llm.tensor <f32>;
    ///     m = llm.mul s, b : llm.tensor <f32>;
    ///     llm.yield m
    /// }
    /// ```
    FusedOp = "llm.fused",
    operands: Operands::Variadic("inputs", 1),
    results: ["result"],
    params: [],
    regions: 1,
    interfaces: [],
    check: check_fused,
    eval: crate::interp::eval::fused::fused,
}

fn check_fused(c: &OpCheck) -> Result<()> {
    let out = c.result_tensor(0)?;
    c.float_dtype(&c.result_desc(0), out.dtype())?;
    let mut shape = Vec::new();
    let mut dtypes = Vec::new();
    for i in 0..c.num_operands() {
        let t = c.tensor(i)?;
        c.same_dtype(&c.operand_desc(i), t.dtype(), out.dtype())?;
        shape = match broadcast_shapes(&shape, t.shape()) {
            Some(s) => s,
            None => {
                return c.err(format!(
                    "{} {} does not broadcast with the other inputs",
                    c.operand_desc(i),
                    show_shape(t.shape())
                ));
            }
        };
        dtypes.push(t.dtype());
    }
    c.shape(&c.result_desc(0), out.shape(), &shape)?;
    let region = c.op.deref(c.ctx).get_region(0);
    let blocks: Vec<_> = region.deref(c.ctx).iter(c.ctx).collect();
    let [block] = blocks[..] else {
        return c.err(format!(
            "the body must have exactly one block, found {}",
            blocks.len()
        ));
    };
    let args: Vec<_> = block.deref(c.ctx).arguments().collect();
    if args.len() != dtypes.len() {
        return c.err(format!(
            "the body takes {} argument(s) for {} input(s)",
            args.len(),
            dtypes.len()
        ));
    }
    for (i, (arg, dtype)) in args.iter().zip(&dtypes).enumerate() {
        let ty = arg.get_type(c.ctx);
        let ok = TypedHandle::<TensorType>::from_handle(ty, c.ctx)
            .is_ok_and(|t| t.deref(c.ctx).rank() == 0 && t.deref(c.ctx).dtype() == *dtype);
        if !ok {
            return c.err(format!(
                "body argument #{i} must be llm.tensor <{dtype}>, found {}",
                c.show(ty)
            ));
        }
    }
    for op in block.deref(c.ctx).iter(c.ctx) {
        let name = Operation::get_opid(op, c.ctx).to_string();
        if !allowed_in_scalar_body(&name) {
            return c.err(format!(
                "the body may hold only elementwise ops, found {name}"
            ));
        }
        for v in op.deref(c.ctx).results() {
            let ty = v.get_type(c.ctx);
            let scalar = TypedHandle::<TensorType>::from_handle(ty, c.ctx)
                .is_ok_and(|t| t.deref(c.ctx).rank() == 0 && t.deref(c.ctx).dtype() == out.dtype());
            if !scalar {
                return c.err(format!(
                    "body values must be llm.tensor <{}>, found {} from {name}",
                    out.dtype(),
                    c.show(ty)
                ));
            }
        }
    }
    Ok(())
}

llm_op! {
    /// Ends the body of `llm.fused` with the element's value.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `value`: one rank-0 `llm.tensor` of the fused result's element type |
    ///
    /// Example:
    /// ```text
    /// llm.yield v3
    /// ```
    YieldOp = "llm.yield",
    operands: Operands::Fixed(&["value"]),
    results: [],
    params: [],
    interfaces: [IsTerminatorInterface],
    check: |c| {
        let parent = c.op.deref(c.ctx).get_parent_op(c.ctx);
        let Some(fused) = parent.and_then(|p| Operation::get_op::<FusedOp>(p, c.ctx)) else {
            return c.err("must be the terminator of an llm.fused body");
        };
        let want = fused.get_operation().deref(c.ctx).get_result(0).get_type(c.ctx);
        let want = TypedHandle::<TensorType>::from_handle(want, c.ctx).map(|t| t.deref(c.ctx).dtype());
        let v = c.tensor(0)?;
        c.rank(&c.operand_desc(0), v.shape(), 0)?;
        if let Ok(d) = want {
            c.same_dtype(&c.operand_desc(0), v.dtype(), d)?;
        }
        Ok(())
    },
    eval: crate::interp::eval::base::ret,
}

llm_op! {
    /// A matmul whose left operand is RMS-normalised first:
    /// `matmul(rms_norm(input, norm_weight, eps), rhs, transpose_rhs)`.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: float `llm.tensor` `[..., K]`; `norm_weight`: `[K]`; `rhs`: `[K, N]`, or `[N, K]` with `transpose_rhs` |
    /// | results | `result`: `[..., N]` |
    /// | `eps` (float, required) | the RMSNorm epsilon |
    /// | `transpose_rhs` (bool, default false) | contract with the last dim of `rhs` |
    ///
    /// Example:
    /// ```text
    /// v3 = llm.rms_norm_matmul v0, v1, v2 {eps = 1e-5, transpose_rhs = true} : llm.tensor <1x96xf32>
    /// ```
    RmsNormMatmulOp = "llm.rms_norm_matmul",
    operands: Operands::Fixed(&["input", "norm_weight", "rhs"]),
    results: ["result"],
    params: [ParamSpec::required("eps", ParamKind::Float), ParamSpec::optional("transpose_rhs", ParamKind::Bool)],
    interfaces: [],
    check: check_rms_norm_matmul,
    eval: crate::interp::eval::fused::rms_norm_matmul,
}

fn check_rms_norm_matmul(c: &OpCheck) -> Result<()> {
    if let Some(eps) = c.float("eps")
        && eps <= 0.0
    {
        return c.err(format!("parameter `eps` must be positive, found {eps}"));
    }
    let (x, g, w, out) = (
        c.tensor(0)?,
        c.tensor(1)?,
        c.tensor(2)?,
        c.result_tensor(0)?,
    );
    c.float_dtype(&c.operand_desc(0), x.dtype())?;
    c.min_rank(&c.operand_desc(0), x.shape(), 1)?;
    let k = x.shape()[x.rank() - 1];
    c.same_dtype(&c.operand_desc(1), g.dtype(), x.dtype())?;
    c.shape(&c.operand_desc(1), g.shape(), &[k])?;
    c.same_dtype(&c.operand_desc(2), w.dtype(), x.dtype())?;
    c.rank(&c.operand_desc(2), w.shape(), 2)?;
    let (wk, n) = if c.flag("transpose_rhs", false) {
        (w.shape()[1], w.shape()[0])
    } else {
        (w.shape()[0], w.shape()[1])
    };
    if !dims_compatible(k, wk) {
        return c.err(format!(
            "contraction dims differ: {} has K = {}, {} has K = {}",
            c.operand_desc(0),
            super::show_dim(k),
            c.operand_desc(2),
            super::show_dim(wk)
        ));
    }
    let mut want = x.shape()[..x.rank() - 1].to_vec();
    want.push(n);
    c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
    c.shape(&c.result_desc(0), out.shape(), &want)
}

llm_op! {
    /// `llm.append_kv` followed by `llm.paged_attention` on the updated cache, as one op:
    /// writes `k` and `v` to `slots` of layer `layer`, then attends `q` over the cache.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `q` `[B, T, H, D]`; `cache`; `k`, `v` `[N, kv_heads, head_dim]`; `slots` `[N]`; `block_tables` `[B, M]`; `context_lens` `[B]`; optional `sinks` `[H]` (as for `llm.paged_attention`) |
    /// | results | `result` `[B, T, H, D]`; `updated`: the cache type |
    /// | `layer`, `kv_heads` (int, required); `scale`, `softcap` (float), `window` (int) | as for `llm.paged_attention` |
    ///
    /// Example:
    /// ```text
    /// v7, v8 = llm.append_attention v0, v1, v2, v3, v4, v5, v6 {layer = 0, kv_heads = 2} : llm.tensor <?x1x4x16xf32>, llm.paged_kv_cache <layers = 1, kv_heads = 2, head_dim = 16, block_size = 16, blocks = ?, dtype = f32>
    /// ```
    AppendAttentionOp = "llm.append_attention",
    operands: Operands::Optional(
        &["q", "cache", "k", "v", "slots", "block_tables", "context_lens"],
        &["sinks"]
    ),
    results: ["result", "updated"],
    params: [
        ParamSpec::required("layer", ParamKind::Int),
        ParamSpec::required("kv_heads", ParamKind::Int),
        ParamSpec::optional("scale", ParamKind::Float),
        ParamSpec::optional("softcap", ParamKind::Float),
        ParamSpec::optional("window", ParamKind::Int),
    ],
    interfaces: [],
    check: check_append_attention,
    eval: crate::interp::eval::fused::append_attention,
}

fn check_append_attention(c: &OpCheck) -> Result<()> {
    let cache = c.kv_cache(1)?;
    check_layer(c, cache.layers())?;
    let (q, k, v, slots) = (c.tensor(0)?, c.tensor(2)?, c.tensor(3)?, c.tensor(4)?);
    c.float_dtype(&c.operand_desc(0), q.dtype())?;
    c.rank(&c.operand_desc(0), q.shape(), 4)?;
    let qs = q.shape();
    c.dim(
        &format!("head dim of {}", c.operand_desc(0)),
        qs[3],
        Some(cache.head_dim()),
    )?;
    check_heads(c, qs[2], Some(cache.kv_heads()))?;
    if let (Some(w), ow) = (cache.window(), c.int("window"))
        && ow.is_none_or(|ow| ow as u64 > w)
    {
        return c.err(format!("the cache keeps a sliding window of {w} positions, so parameter `window` must be at most {w}"));
    }
    for (i, t) in [(2, &k), (3, &v)] {
        c.same_dtype(&c.operand_desc(i), t.dtype(), q.dtype())?;
        check_kv_rows(c, &c.operand_desc(i), t.shape(), &cache)?;
    }
    c.index_dtype(&c.operand_desc(4), slots.dtype())?;
    c.shape(&c.operand_desc(4), slots.shape(), &[k.shape()[0]])?;
    let (tables, lens) = (c.tensor(5)?, c.tensor(6)?);
    c.index_dtype(&c.operand_desc(5), tables.dtype())?;
    c.rank(&c.operand_desc(5), tables.shape(), 2)?;
    c.dim(
        &format!("batch dim of {}", c.operand_desc(5)),
        tables.shape()[0],
        qs[0],
    )?;
    c.index_dtype(&c.operand_desc(6), lens.dtype())?;
    c.shape(&c.operand_desc(6), lens.shape(), &[qs[0]])?;
    check_sinks(c, 7, q.dtype(), qs[2])?;
    let out = c.result_tensor(0)?;
    c.same_dtype(&c.result_desc(0), out.dtype(), q.dtype())?;
    c.shape(&c.result_desc(0), out.shape(), qs)?;
    if c.result_type(1) != c.operand_type(1) {
        return c.err(format!(
            "{} must have the cache's type {}, found {}",
            c.result_desc(1),
            c.show(c.operand_type(1)),
            c.show(c.result_type(1))
        ));
    }
    check_cache_is_dead_after(c, 1)
}
