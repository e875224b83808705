//! Attention and its positional encoding: `llm.attention`, `llm.paged_attention`, `llm.rope`.
//!
//! Heads are grouped (GQA): `heads` query heads share `kv_heads` key/value heads, query head
//! `h` reading KV head `h / (heads / kv_heads)`; `kv_heads = 1` is MQA and
//! `kv_heads = heads` is plain multi-head attention.

use pliron::result::Result;

use crate::{
    dtype::DType,
    llm_op,
    ops::{OpCheck, Operands, show_dim},
    params::{ParamKind, ParamSpec},
    syntax::Dim,
    types::dims_compatible,
};

/// Checks `kv_heads`, `scale`, `softcap` and `window` against `heads` query heads.
pub(crate) fn check_heads(c: &OpCheck, heads: Dim, kv_heads_dim: Dim) -> Result<()> {
    let kv_heads = c.int_at_least("kv_heads", 1)?.unwrap_or(1) as u64;
    if !dims_compatible(kv_heads_dim, Some(kv_heads)) {
        return c.err(format!(
            "parameter `kv_heads` = {kv_heads} does not match the {} KV heads of the keys",
            show_dim(kv_heads_dim)
        ));
    }
    if let Some(h) = heads
        && h % kv_heads != 0
    {
        return c.err(format!(
            "query heads ({h}) must be a multiple of `kv_heads` ({kv_heads}) for grouped-query attention"
        ));
    }
    for key in ["scale", "softcap"] {
        // Kernels compute in f32: the value must stay a positive, normal f32.
        if let Some(v) = c.float(key)
            && !(v > 0.0 && (v as f32).is_normal())
        {
            return c.err(format!(
                "parameter `{key}` must be positive (a normal f32), found {v}"
            ));
        }
    }
    c.int_at_least("window", 1)?;
    Ok(())
}

llm_op! {
    /// Scaled dot-product attention over contiguous keys and values.
    ///
    /// `q` is `[..., Tq, H, D]`, `k` is `[..., Tk, KVH, D]`, `v` is `[..., Tk, KVH, Dv]` with
    /// `H` a multiple of `KVH = kv_heads`. For query `i` and key `j`:
    /// `s[i, j] = cap(scale * dot(q[i], k[j])) + mask[i, j]`, `p = softmax_j(s)` and
    /// `out[i] = sum_j p[i, j] * v[j]`. Queries are the last `Tq` of the `Tk` positions, so
    /// query `i` sits at position `Tk - Tq + i`. With `causal`, key `j` is visible only when
    /// `j <= Tk - Tq + i`; with `window = W`, only when `j > Tk - Tq + i - W`. `cap(x)` is
    /// `x`, or with `softcap = C` the soft-capped `C * tanh(x / C)` (Gemma 2's).
    ///
    /// | | |
    /// |---|---|
    /// | operands | `q`, `k`, `v`: float `llm.tensor`; optional `mask`: additive `[Tq, Tk]` |
    /// | results | `result`: `[..., Tq, H, Dv]` |
    /// | `kv_heads` (int, required) | number of KV heads |
    /// | `scale` (float, default `1/sqrt(D)`) | score scale |
    /// | `softcap` (float, optional) | soft-cap of the scaled scores |
    /// | `causal` (bool, default false) | hide future keys |
    /// | `window` (int, optional) | sliding-window length |
    ///
    /// Example:
    /// ```text
    /// v3 = llm.attention v0, v1, v2 {kv_heads = 2, causal = true} : llm.tensor <5x4x16xf32>
    /// ```
    AttentionOp = "llm.attention",
    operands: Operands::Optional(&["q", "k", "v"], &["mask"]),
    results: ["result"],
    params: [
        ParamSpec::required("kv_heads", ParamKind::Int),
        ParamSpec::optional("scale", ParamKind::Float),
        ParamSpec::optional("softcap", ParamKind::Float),
        ParamSpec::optional("causal", ParamKind::Bool),
        ParamSpec::optional("window", ParamKind::Int),
    ],
    interfaces: [],
    check: check_attention,
    eval: crate::interp::eval::attention::attention,
}

fn check_attention(c: &OpCheck) -> Result<()> {
    let (q, k, v, out) = (
        c.tensor(0)?,
        c.tensor(1)?,
        c.tensor(2)?,
        c.result_tensor(0)?,
    );
    c.float_dtype(&c.operand_desc(0), q.dtype())?;
    for (i, t) in [(1, &k), (2, &v)] {
        c.same_dtype(&c.operand_desc(i), t.dtype(), q.dtype())?;
    }
    c.min_rank(&c.operand_desc(0), q.shape(), 3)?;
    let r = q.rank();
    c.rank(&c.operand_desc(1), k.shape(), r)?;
    c.rank(&c.operand_desc(2), v.shape(), r)?;
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    for i in 0..r - 3 {
        c.dim(
            &format!("batch dim {i} of {}", c.operand_desc(1)),
            ks[i],
            qs[i],
        )?;
        c.dim(
            &format!("batch dim {i} of {}", c.operand_desc(2)),
            vs[i],
            qs[i],
        )?;
    }
    let (tq, h, d) = (qs[r - 3], qs[r - 2], qs[r - 1]);
    let (tk, kvh) = (ks[r - 3], ks[r - 2]);
    c.dim(&format!("head dim of {}", c.operand_desc(1)), ks[r - 1], d)?;
    c.dim(
        &format!("sequence dim of {}", c.operand_desc(2)),
        vs[r - 3],
        tk,
    )?;
    c.dim(
        &format!("KV-head dim of {}", c.operand_desc(2)),
        vs[r - 2],
        kvh,
    )?;
    check_heads(c, h, kvh)?;
    if c.num_operands() == 4 {
        let mask = c.tensor(3)?;
        c.same_dtype(&c.operand_desc(3), mask.dtype(), q.dtype())?;
        c.shape(&c.operand_desc(3), mask.shape(), &[tq, tk])?;
    }
    let mut want = qs[..r - 1].to_vec();
    want.push(vs[r - 1]);
    c.same_dtype(&c.result_desc(0), out.dtype(), q.dtype())?;
    c.shape(&c.result_desc(0), out.shape(), &want)
}

llm_op! {
    /// Causal attention of new queries against the paged KV cache.
    ///
    /// `q` is `[B, T, H, D]`: `T` new tokens for each of `B` sequences. `block_tables` is
    /// `[B, M]` (i32 or i64): row `b` lists the cache blocks of sequence `b` in order.
    /// `context_lens` is `[B]`: sequence `b` holds `context_lens[b]` positions in the cache,
    /// including its `T` new ones (already written with `llm.append_kv`), so query `t` of
    /// sequence `b` sits at position `p = context_lens[b] - T + t` and attends to positions
    /// `0..=p` (the last `window` of them with a sliding window) of layer `layer`, reading
    /// only the blocks in its own table. With `sinks` (`[H]`, gpt-oss's attention sinks),
    /// head `h`'s softmax also counts a position of score `sinks[h]` that has no value: its
    /// weights are `exp(s_j) / (exp(sinks[h]) + sum_i exp(s_i))`, so they sum to less than 1.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `q`: float `llm.tensor` `[B, T, H, D]`; `cache`: `llm.paged_kv_cache`; `block_tables`: `[B, M]`; `context_lens`: `[B]`; optional `sinks`: `[H]`, `q`'s element type |
    /// | results | `result`: `[B, T, H, D]` |
    /// | `layer` (int, required) | which layer of the cache |
    /// | `kv_heads` (int, required) | must equal the cache's `kv_heads` |
    /// | `scale` (float, default `1/sqrt(D)`) | score scale |
    /// | `softcap` (float, optional) | soft-cap of the scaled scores, as `llm.attention`'s |
    /// | `window` (int, optional) | sliding window; required, and at most the cache's, when the cache has one |
    ///
    /// Example:
    /// ```text
    /// v4 = llm.paged_attention v0, v1, v2, v3 {layer = 0, kv_heads = 2} : llm.tensor <2x1x4x16xf32>
    /// ```
    PagedAttentionOp = "llm.paged_attention",
    operands: Operands::Optional(&["q", "cache", "block_tables", "context_lens"], &["sinks"]),
    results: ["result"],
    params: [
        ParamSpec::required("layer", ParamKind::Int),
        ParamSpec::required("kv_heads", ParamKind::Int),
        ParamSpec::optional("scale", ParamKind::Float),
        ParamSpec::optional("softcap", ParamKind::Float),
        ParamSpec::optional("window", ParamKind::Int),
    ],
    interfaces: [],
    check: check_paged_attention,
    eval: crate::interp::eval::attention::paged_attention,
}

fn check_paged_attention(c: &OpCheck) -> Result<()> {
    let (q, cache, tables, lens, out) = (
        c.tensor(0)?,
        c.kv_cache(1)?,
        c.tensor(2)?,
        c.tensor(3)?,
        c.result_tensor(0)?,
    );
    c.float_dtype(&c.operand_desc(0), q.dtype())?;
    c.rank(&c.operand_desc(0), q.shape(), 4)?;
    let qs = q.shape();
    c.dim(
        &format!("head dim of {}", c.operand_desc(0)),
        qs[3],
        Some(cache.head_dim()),
    )?;
    check_layer(c, cache.layers())?;
    check_heads(c, qs[2], Some(cache.kv_heads()))?;
    match (cache.window(), c.int("window")) {
        (Some(w), None) => {
            return c.err(format!(
                "the cache keeps a sliding window of {w} positions, so parameter `window` (at most {w}) is required"
            ));
        }
        (Some(w), Some(ow)) if ow as u64 > w => {
            return c.err(format!(
                "parameter `window` = {ow} exceeds the cache's sliding window of {w}"
            ));
        }
        _ => {}
    }
    c.index_dtype(&c.operand_desc(2), tables.dtype())?;
    c.rank(&c.operand_desc(2), tables.shape(), 2)?;
    c.dim(
        &format!("batch dim of {}", c.operand_desc(2)),
        tables.shape()[0],
        qs[0],
    )?;
    c.index_dtype(&c.operand_desc(3), lens.dtype())?;
    c.shape(&c.operand_desc(3), lens.shape(), &[qs[0]])?;
    check_sinks(c, 4, q.dtype(), qs[2])?;
    c.same_dtype(&c.result_desc(0), out.dtype(), q.dtype())?;
    c.shape(&c.result_desc(0), out.shape(), qs)
}

/// Checks the optional attention sinks, operand `index`: `[heads]` of the queries' `dtype`.
pub(crate) fn check_sinks(c: &OpCheck, index: usize, dtype: DType, heads: Dim) -> Result<()> {
    if c.num_operands() <= index {
        return Ok(());
    }
    let sinks = c.tensor(index)?;
    c.same_dtype(&c.operand_desc(index), sinks.dtype(), dtype)?;
    c.shape(&c.operand_desc(index), sinks.shape(), &[heads])
}

/// Checks the `layer` parameter against a cache of `layers` layers.
pub(crate) fn check_layer(c: &OpCheck, layers: u64) -> Result<()> {
    match c.int("layer") {
        Some(l) if l < 0 || l as u64 >= layers => c.err(format!(
            "parameter `layer` = {l} is out of range for a cache of {layers} layer(s)"
        )),
        _ => Ok(()),
    }
}

llm_op! {
    /// Rotary position embedding (RoPE) of query or key heads.
    ///
    /// `input` is `[..., T, H, D]` and `positions` (i32/i64) is `[..., T]`. For the pair of
    /// features `(a, b)` with pair index `i < rotary_dim / 2`, at position `p`, with angle
    /// `p * scaling^-1 * theta^(-2i / rotary_dim) / factor_i`: `a' = a cos - b sin`,
    /// `b' = a sin + b cos`, where `factor_i` is `freq_factors[i]` (1 without them: Llama 3's
    /// frequency-dependent scaling gives them, GGUF's `rope_freqs.weight`), and `cos` and
    /// `sin` are each multiplied by `mscale` (YaRN's and LongRoPE's attention factor).
    /// `layout = interleaved` pairs features `(2i, 2i+1)` (Meta's Llama, llama2.c);
    /// `layout = half` pairs `(i, i + rotary_dim/2)` (Hugging Face's rotate_half). Features past
    /// `rotary_dim` pass through unchanged.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: float `llm.tensor` `[..., T, H, D]`; `positions`: `[..., T]`; optional `freq_factors`: f32 `[rotary_dim / 2]` |
    /// | results | `result`: same type as `input` |
    /// | `theta` (float, required) | base of the frequencies (10000.0 for Llama 2) |
    /// | `layout` (`interleaved` or `half`, default `interleaved`) | pairing of features |
    /// | `scaling` (float, default 1.0) | linear position scaling |
    /// | `rotary_dim` (int, default `D`) | number of rotated features (even) |
    /// | `mscale` (float, default 1.0) | magnitude of the rotation: `cos` and `sin` are scaled by it |
    ///
    /// Example:
    /// ```text
    /// v2 = llm.rope v0, v1 {theta = 10000.0} : llm.tensor <1x4x16xf32>
    /// ```
    RopeOp = "llm.rope",
    operands: Operands::Optional(&["input", "positions"], &["freq_factors"]),
    results: ["result"],
    params: [
        ParamSpec::required("theta", ParamKind::Float),
        ParamSpec::optional("layout", ParamKind::Word(&["interleaved", "half"])),
        ParamSpec::optional("scaling", ParamKind::Float),
        ParamSpec::optional("rotary_dim", ParamKind::Int),
        ParamSpec::optional("mscale", ParamKind::Float),
    ],
    interfaces: [],
    check: check_rope,
    eval: crate::interp::eval::attention::rope,
}

fn check_rope(c: &OpCheck) -> Result<()> {
    let (x, pos, out) = (c.tensor(0)?, c.tensor(1)?, c.result_tensor(0)?);
    c.float_dtype(&c.operand_desc(0), x.dtype())?;
    c.min_rank(&c.operand_desc(0), x.shape(), 3)?;
    c.index_dtype(&c.operand_desc(1), pos.dtype())?;
    let r = x.rank();
    c.shape(&c.operand_desc(1), pos.shape(), &x.shape()[..r - 2])?;
    for name in ["theta", "scaling"] {
        if let Some(v) = c.float(name)
            && v <= 0.0
        {
            return c.err(format!("parameter `{name}` must be positive, found {v}"));
        }
    }
    // Sines and cosines are scaled in f32: the magnitude must stay a positive, normal f32.
    if let Some(v) = c.float("mscale")
        && !(v > 0.0 && (v as f32).is_normal())
    {
        return c.err(format!(
            "parameter `mscale` must be positive (a normal f32), found {v}"
        ));
    }
    let d = x.shape()[r - 1];
    let rotary = c.int("rotary_dim");
    match (rotary, d) {
        (Some(rd), _) if rd <= 0 || rd % 2 != 0 => {
            return c.err(format!(
                "parameter `rotary_dim` must be even and positive, found {rd}"
            ));
        }
        (Some(rd), Some(d)) if rd as u64 > d => {
            return c.err(format!(
                "parameter `rotary_dim` = {rd} exceeds the head dim {d}"
            ));
        }
        (None, Some(d)) if d % 2 != 0 => {
            return c.err(format!(
                "the head dim of {} must be even to rotate pairs, found {d}",
                c.operand_desc(0)
            ));
        }
        _ => {}
    }
    if c.num_operands() == 3 {
        let factors = c.tensor(2)?;
        c.same_dtype(&c.operand_desc(2), factors.dtype(), DType::F32)?;
        let pairs = match rotary {
            Some(rd) => Some(rd as u64 / 2),
            None => d.map(|d| d / 2),
        };
        c.shape(&c.operand_desc(2), factors.shape(), &[pairs])?;
    }
    c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
    c.shape(&c.result_desc(0), out.shape(), x.shape())
}
