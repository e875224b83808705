//! Plan records: module-level ops in which the planning passes record their decisions.
//!
//! They compute nothing; backends and the runtime read them.

use pliron::result::Result;

use crate::{
    llm_op,
    ops::{OpCheck, Operands},
    params::{ParamKind, ParamSpec},
};

llm_op! {
    /// The KV-cache memory plan (written by `plan-kv-memory`).
    ///
    /// The pool of `blocks` blocks of `block_size` positions (`bytes_per_block` bytes each,
    /// all layers, K and V) holds `tokens = blocks * block_size` positions in `budget` bytes
    /// at most. It is split into `buffers` (blocks per buffer; each buffer at most
    /// `max_binding_size` bytes), laid out `[blocks][layers][2][block_size][kv_heads][head_dim]`
    /// within a buffer.
    ///
    /// | | |
    /// |---|---|
    /// | `block_size`, `blocks`, `bytes_per_block`, `tokens`, `budget`, `max_binding_size` (ints) | the plan |
    /// | `buffers` (list of ints) | blocks in each buffer |
    ///
    /// Example:
    /// ```text
    /// llm.kv_plan {block_size = 16, blocks = 64, bytes_per_block = 81920, tokens = 1024, budget = 8388608, max_binding_size = 134217728, buffers = [64]}
    /// ```
    KvPlanOp = "llm.kv_plan",
    operands: Operands::Fixed(&[]),
    results: [],
    params: [
        ParamSpec::required("block_size", ParamKind::Int),
        ParamSpec::required("blocks", ParamKind::Int),
        ParamSpec::required("bytes_per_block", ParamKind::Int),
        ParamSpec::required("tokens", ParamKind::Int),
        ParamSpec::required("budget", ParamKind::Int),
        ParamSpec::required("max_binding_size", ParamKind::Int),
        ParamSpec::required("buffers", ParamKind::IntList),
    ],
    interfaces: [],
    check: check_kv_plan,
    eval: crate::interp::eval::base::nothing,
}

fn check_kv_plan(c: &OpCheck) -> Result<()> {
    let get = |name: &str| c.int(name).unwrap_or(0);
    let (block_size, blocks, bytes_per_block) =
        (get("block_size"), get("blocks"), get("bytes_per_block"));
    if block_size < 1 || blocks < 1 || bytes_per_block < 1 {
        return c.err("block_size, blocks and bytes_per_block must be positive");
    }
    if get("tokens") != blocks.saturating_mul(block_size) {
        return c.err(format!(
            "tokens must be blocks * block_size = {}, found {}",
            blocks.saturating_mul(block_size),
            get("tokens")
        ));
    }
    let buffers = c
        .param("buffers")
        .and_then(|p| p.as_int_list())
        .unwrap_or_default();
    if buffers.iter().sum::<i64>() != blocks || buffers.iter().any(|&b| b < 1) {
        return c.err(format!(
            "buffers {buffers:?} must be positive and add up to the {blocks} blocks"
        ));
    }
    if let Some(&most) = buffers.iter().max()
        && most.saturating_mul(bytes_per_block) > get("max_binding_size")
    {
        return c.err(format!(
            "a buffer of {most} blocks exceeds max_binding_size"
        ));
    }
    if blocks.saturating_mul(bytes_per_block) > get("budget") {
        return c.err("the pool exceeds the budget");
    }
    Ok(())
}

llm_op! {
    /// The arena plan of a function's intermediate tensors (written by `plan-buffers`).
    ///
    /// Value `i` (the function's tensor op results in order, except weights, constants and
    /// values computed from them alone, which a runtime computes once) lives at
    /// `offsets[i]..offsets[i] + sizes[i]` of one arena of `arena_bytes` bytes; `naive_bytes`
    /// is the sum of all sizes. Dynamic dims are planned with `dynamic_dim`.
    ///
    /// | | |
    /// |---|---|
    /// | `func` (string) | the planned function |
    /// | `arena_bytes`, `naive_bytes`, `dynamic_dim` (ints) | totals and assumption |
    /// | `offsets`, `sizes` (lists of ints) | per value |
    ///
    /// Example:
    /// ```text
    /// llm.buffer_plan {func = "decode", arena_bytes = 1024, naive_bytes = 4096, dynamic_dim = 1, offsets = [0, 512], sizes = [512, 512]}
    /// ```
    BufferPlanOp = "llm.buffer_plan",
    operands: Operands::Fixed(&[]),
    results: [],
    params: [
        ParamSpec::required("func", ParamKind::Str),
        ParamSpec::required("arena_bytes", ParamKind::Int),
        ParamSpec::required("naive_bytes", ParamKind::Int),
        ParamSpec::required("dynamic_dim", ParamKind::Int),
        ParamSpec::required("offsets", ParamKind::IntList),
        ParamSpec::required("sizes", ParamKind::IntList),
    ],
    interfaces: [],
    check: |c| {
        let offsets = c.param("offsets").and_then(|p| p.as_int_list()).unwrap_or_default();
        let sizes = c.param("sizes").and_then(|p| p.as_int_list()).unwrap_or_default();
        let arena = c.int("arena_bytes").unwrap_or(0);
        if offsets.len() != sizes.len() {
            return c.err(format!("{} offsets for {} sizes", offsets.len(), sizes.len()));
        }
        if let Some(i) = (0..sizes.len()).find(|&i| offsets[i] < 0 || sizes[i] < 0 || offsets[i].saturating_add(sizes[i]) > arena) {
            return c.err(format!("value {i} at offset {} of size {} is outside the arena of {arena} bytes", offsets[i], sizes[i]));
        }
        if c.int("naive_bytes") != Some(sizes.iter().sum()) {
            return c.err("naive_bytes must be the sum of the sizes");
        }
        Ok(())
    },
    eval: crate::interp::eval::base::nothing,
}
