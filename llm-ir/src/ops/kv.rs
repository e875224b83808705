//! Paged KV cache access: `llm.append_kv` and `llm.lookup_kv`.
//!
//! # KV-cache value model
//!
//! The cache is an SSA value threaded through the program: `llm.append_kv` takes a cache and
//! returns the updated cache, and readers (`llm.paged_attention`, `llm.lookup_kv`) take the
//! version they must see. A cache value is *linear*: once `llm.append_kv` consumes it, no
//! later op may use it. That makes the update in place (bufferization reuses the pool)
//! without changing meaning, and it lets passes reorder ops freely as long as they follow the
//! SSA edges. The verifier of `llm.append_kv` enforces the rule.

use pliron::{context::Ptr, linked_list::LinkedList, operation::Operation, result::Result};

use crate::{
    llm_op,
    ops::{OpCheck, Operands, attention::check_layer},
    params::{ParamKind, ParamSpec},
    types::PagedKvCacheType,
};

/// Checks `k`/`v`-shaped tensors `[N, kv_heads, head_dim]` against a cache.
pub(crate) fn check_kv_rows(
    c: &OpCheck,
    what: &str,
    shape: &[crate::syntax::Dim],
    cache: &PagedKvCacheType,
) -> Result<()> {
    c.rank(what, shape, 3)?;
    c.dim(
        &format!("KV-head dim of {what}"),
        shape[1],
        Some(cache.kv_heads()),
    )?;
    c.dim(
        &format!("head dim of {what}"),
        shape[2],
        Some(cache.head_dim()),
    )
}

llm_op! {
    /// Writes new keys and values into cache slots and returns the updated cache.
    ///
    /// `k` and `v` are `[N, kv_heads, head_dim]`; `slots` (i32/i64) is `[N]`. Row `n` is
    /// written to layer `layer` at flat slot `slots[n] = block * block_size + offset`. The
    /// input cache may not be used after this op (see the module docs).
    ///
    /// | | |
    /// |---|---|
    /// | operands | `cache`: `llm.paged_kv_cache`; `k`, `v`: float `llm.tensor`; `slots`: `[N]` |
    /// | results | `updated`: the same cache type |
    /// | `layer` (int, required) | which layer to write |
    ///
    /// Example:
    /// ```text
    /// v4 = llm.append_kv v0, v1, v2, v3 {layer = 0} : llm.paged_kv_cache <layers = 1, kv_heads = 2, head_dim = 16, block_size = 16, blocks = 8, dtype = f32>
    /// ```
    AppendKvOp = "llm.append_kv",
    operands: Operands::Fixed(&["cache", "k", "v", "slots"]),
    results: ["updated"],
    params: [ParamSpec::required("layer", ParamKind::Int)],
    interfaces: [],
    check: check_append_kv,
    eval: crate::interp::eval::kv::append_kv,
}

fn check_append_kv(c: &OpCheck) -> Result<()> {
    let cache = c.kv_cache(0)?;
    check_layer(c, cache.layers())?;
    let (k, v, slots) = (c.tensor(1)?, c.tensor(2)?, c.tensor(3)?);
    c.float_dtype(&c.operand_desc(1), k.dtype())?;
    c.same_dtype(&c.operand_desc(2), v.dtype(), k.dtype())?;
    check_kv_rows(c, &c.operand_desc(1), k.shape(), &cache)?;
    check_kv_rows(c, &c.operand_desc(2), v.shape(), &cache)?;
    c.shape(&c.operand_desc(2), v.shape(), k.shape())?;
    c.index_dtype(&c.operand_desc(3), slots.dtype())?;
    c.shape(&c.operand_desc(3), slots.shape(), &[k.shape()[0]])?;
    if c.result_type(0) != c.operand_type(0) {
        return c.err(format!(
            "{} must have the cache's type {}, found {}",
            c.result_desc(0),
            c.show(c.operand_type(0)),
            c.show(c.result_type(0))
        ));
    }
    check_cache_is_dead_after(c, 0)
}

/// Enforces linearity: no user of the cache consumed as operand `index` may come after
/// this op.
pub(crate) fn check_cache_is_dead_after(c: &OpCheck, index: usize) -> Result<()> {
    let cache = c.operand(index);
    let block = c.op.deref(c.ctx).get_parent_block();
    for use_ in cache.uses(c.ctx) {
        let user: Ptr<Operation> = use_.user_op();
        if user == c.op {
            continue;
        }
        let same_block = user.deref(c.ctx).get_parent_block() == block;
        if !same_block || comes_after(c, user, c.op) {
            let name = Operation::get_opid(user, c.ctx);
            return c.err(format!(
                "{} is used afterwards by {name}; {} consumes the cache it updates, so later ops must use the returned cache",
                c.operand_desc(index),
                c.name
            ));
        }
    }
    Ok(())
}

/// Whether `a` comes after `b` in their (shared) block.
fn comes_after(c: &OpCheck, a: Ptr<Operation>, b: Ptr<Operation>) -> bool {
    let mut cur = b.deref(c.ctx).get_next();
    while let Some(op) = cur {
        if op == a {
            return true;
        }
        cur = op.deref(c.ctx).get_next();
    }
    false
}

llm_op! {
    /// Gathers one sequence's keys and values from the cache into contiguous tensors.
    ///
    /// `block_table` (i32/i64) is `[M]`, the sequence's blocks in order; `context_len` is a
    /// rank-0 i32/i64 tensor. The results `k` and `v` are `[T, kv_heads, head_dim]` holding
    /// positions `0..T` of layer `layer` with `T = context_len` (a static `T` must equal it at
    /// run time). Quantized storage is dequantized into the results' float type.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `cache`: `llm.paged_kv_cache`; `block_table`: `[M]`; `context_len`: rank 0 |
    /// | results | `k`, `v`: float `llm.tensor` `[T, kv_heads, head_dim]` |
    /// | `layer` (int, required) | which layer to read |
    ///
    /// Example:
    /// ```text
    /// v3, v4 = llm.lookup_kv v0, v1, v2 {layer = 0} : llm.tensor <?x2x16xf32>, llm.tensor <?x2x16xf32>
    /// ```
    LookupKvOp = "llm.lookup_kv",
    operands: Operands::Fixed(&["cache", "block_table", "context_len"]),
    results: ["k", "v"],
    params: [ParamSpec::required("layer", ParamKind::Int)],
    interfaces: [],
    check: check_lookup_kv,
    eval: crate::interp::eval::kv::lookup_kv,
}

fn check_lookup_kv(c: &OpCheck) -> Result<()> {
    let cache = c.kv_cache(0)?;
    check_layer(c, cache.layers())?;
    let (table, len) = (c.tensor(1)?, c.tensor(2)?);
    c.index_dtype(&c.operand_desc(1), table.dtype())?;
    c.rank(&c.operand_desc(1), table.shape(), 1)?;
    c.index_dtype(&c.operand_desc(2), len.dtype())?;
    c.rank(&c.operand_desc(2), len.shape(), 0)?;
    let (k, v) = (c.result_tensor(0)?, c.result_tensor(1)?);
    c.float_dtype(&c.result_desc(0), k.dtype())?;
    check_kv_rows(c, &c.result_desc(0), k.shape(), &cache)?;
    c.same_dtype(&c.result_desc(1), v.dtype(), k.dtype())?;
    c.shape(&c.result_desc(1), v.shape(), k.shape())
}
