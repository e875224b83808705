//! The Llama-family model builder: the `llm` IR of a model's forward step.
//!
//! The module has two functions with one signature; each takes `N` new tokens and returns
//! their logits and the updated KV cache:
//!
//! ```text
//! (tokens: [N] i32, positions: [N] i32, slots: [N] i32,
//!  block_tables: [B, M] i32, context_lens: [B] i32, cache) -> (logits: [N, vocab] f32, cache)
//! ```
//!
//! `@prefill` runs `N` tokens of one sequence (`B = 1`, typically a whole prompt);
//! `@decode` runs one token for each of `B = N` sequences. `slots[i]` is the cache slot
//! (`block * block_size + offset`) where token `i`'s keys and values go. Each layer is RMSNorm, grouped-query attention with
//! interleaved RoPE over the paged cache (`llm.append_kv` then `llm.paged_attention`), a
//! residual add, RMSNorm, a SwiGLU feed-forward block and a second residual add; a final
//! RMSNorm and the classifier (tied to the embedding unless the model has its own) give the
//! logits. Weights are referenced by name with `llm.weight`.
//!
//! The builder writes the IR as text and parses it, so what `llm-run import` prints is
//! exactly what runs, and every build goes through the parser and verifier.

use std::fmt::Write as _;

/// The hyperparameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Model (residual) width.
    pub dim: usize,
    /// Feed-forward hidden width.
    pub hidden_dim: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Maximum sequence length.
    pub seq_len: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Whether the classifier reuses the token embedding.
    pub tied_classifier: bool,
}

impl ModelConfig {
    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Width of the key/value projections.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim()
    }
}

/// Token positions per KV-cache block used by the builder.
pub const BLOCK_SIZE: usize = 16;

/// The textual type of the model's KV cache (block count left to the runtime).
pub fn cache_type(c: &ModelConfig) -> String {
    format!(
        "llm.paged_kv_cache <layers = {}, kv_heads = {}, head_dim = {}, block_size = {BLOCK_SIZE}, blocks = ?, dtype = f32>",
        c.layers,
        c.kv_heads,
        c.head_dim()
    )
}

fn float(v: f64) -> String {
    format!("{v:?}")
}

/// Writes the module `@model` with the functions `@prefill` and `@decode` for `c`.
pub fn build_ir(c: &ModelConfig) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "builtin.module @model {{");
    let _ = writeln!(out, "  ^entry():");
    // Ops of a block are separated by `;`.
    out.push_str(forward_func(c, "prefill", "1x?").trim_end());
    out.push_str(";\n");
    out.push_str(&forward_func(c, "decode", "?x1"));
    let _ = writeln!(out, "}}");
    out
}

/// Writes one forward function; `batch` gives the `[B, T]` dims of the attention queries.
fn forward_func(c: &ModelConfig, name: &str, batch: &str) -> String {
    let (d, hd, kvd, v) = (c.dim, c.hidden_dim, c.kv_dim(), c.vocab);
    let (h, kvh, dh) = (c.heads, c.kv_heads, c.head_dim());
    let cache = cache_type(c);
    let t = |shape: &str| format!("llm.tensor <{shape}>");
    let eps = float(c.norm_eps);
    let theta = float(c.rope_theta);
    let mut s = String::new();
    let mut line = |text: String| {
        let _ = writeln!(s, "        {text};");
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "    builtin.func @{name}: builtin.function <({}, {}, {}, {}, {}, {cache}) -> ({}, {cache})> {{",
        t("?xi32"),
        t("?xi32"),
        t("?xi32"),
        t("?x?xi32"),
        t("?xi32"),
        t(&format!("?x{v}xf32"))
    );
    let _ = writeln!(
        out,
        "      ^body(tokens: {}, positions: {}, slots: {}, block_tables: {}, context_lens: {}, cache: {cache}):",
        t("?xi32"),
        t("?xi32"),
        t("?xi32"),
        t("?x?xi32"),
        t("?xi32")
    );
    let w = |name: &str, shape: &str| {
        format!(
            "llm.weight {{name = \"{name}\"}} : {}",
            t(&format!("{shape}xf32"))
        )
    };
    line(format!(
        "embed = {}",
        w("tok_embeddings.weight", &format!("{v}x{d}"))
    ));
    line(format!(
        "x0 = llm.embedding embed, tokens : {}",
        t(&format!("?x{d}xf32"))
    ));
    let act = t(&format!("?x{d}xf32"));
    let mut x = "x0".to_string();
    let mut cache_name = "cache".to_string();
    for l in 0..c.layers {
        let p = format!("layers.{l}.");
        line(format!(
            "attn_norm_{l} = {}",
            w(&format!("{p}attention_norm.weight"), &d.to_string())
        ));
        line(format!(
            "h_{l} = llm.rms_norm {x}, attn_norm_{l} {{eps = {eps}}} : {act}"
        ));
        line(format!(
            "wq_{l} = {}",
            w(&format!("{p}attention.wq.weight"), &format!("{d}x{d}"))
        ));
        line(format!(
            "wk_{l} = {}",
            w(&format!("{p}attention.wk.weight"), &format!("{kvd}x{d}"))
        ));
        line(format!(
            "wv_{l} = {}",
            w(&format!("{p}attention.wv.weight"), &format!("{kvd}x{d}"))
        ));
        line(format!(
            "q_{l} = llm.matmul h_{l}, wq_{l} {{transpose_rhs = true}} : {act}"
        ));
        line(format!(
            "k_{l} = llm.matmul h_{l}, wk_{l} {{transpose_rhs = true}} : {}",
            t(&format!("?x{kvd}xf32"))
        ));
        line(format!(
            "v_{l} = llm.matmul h_{l}, wv_{l} {{transpose_rhs = true}} : {}",
            t(&format!("?x{kvd}xf32"))
        ));
        line(format!(
            "qh_{l} = llm.reshape q_{l} : {}",
            t(&format!("?x{h}x{dh}xf32"))
        ));
        line(format!(
            "kh_{l} = llm.reshape k_{l} : {}",
            t(&format!("?x{kvh}x{dh}xf32"))
        ));
        line(format!(
            "vh_{l} = llm.reshape v_{l} : {}",
            t(&format!("?x{kvh}x{dh}xf32"))
        ));
        line(format!(
            "qr_{l} = llm.rope qh_{l}, positions {{theta = {theta}, layout = interleaved}} : {}",
            t(&format!("?x{h}x{dh}xf32"))
        ));
        line(format!(
            "kr_{l} = llm.rope kh_{l}, positions {{theta = {theta}, layout = interleaved}} : {}",
            t(&format!("?x{kvh}x{dh}xf32"))
        ));
        let next_cache = format!("cache_{}", l + 1);
        line(format!(
            "{next_cache} = llm.append_kv {cache_name}, kr_{l}, vh_{l}, slots {{layer = {l}}} : {cache}"
        ));
        cache_name = next_cache;
        let queries = t(&format!("{batch}x{h}x{dh}xf32"));
        line(format!("qb_{l} = llm.reshape qr_{l} : {queries}"));
        line(format!(
            "att_{l} = llm.paged_attention qb_{l}, {cache_name}, block_tables, context_lens {{layer = {l}, kv_heads = {kvh}}} : {queries}"
        ));
        line(format!("attf_{l} = llm.reshape att_{l} : {act}"));
        line(format!(
            "wo_{l} = {}",
            w(&format!("{p}attention.wo.weight"), &format!("{d}x{d}"))
        ));
        line(format!(
            "o_{l} = llm.matmul attf_{l}, wo_{l} {{transpose_rhs = true}} : {act}"
        ));
        line(format!("xa_{l} = llm.add {x}, o_{l} : {act}"));
        line(format!(
            "ffn_norm_{l} = {}",
            w(&format!("{p}ffn_norm.weight"), &d.to_string())
        ));
        line(format!(
            "hf_{l} = llm.rms_norm xa_{l}, ffn_norm_{l} {{eps = {eps}}} : {act}"
        ));
        line(format!(
            "w1_{l} = {}",
            w(&format!("{p}feed_forward.w1.weight"), &format!("{hd}x{d}"))
        ));
        line(format!(
            "w3_{l} = {}",
            w(&format!("{p}feed_forward.w3.weight"), &format!("{hd}x{d}"))
        ));
        line(format!(
            "w2_{l} = {}",
            w(&format!("{p}feed_forward.w2.weight"), &format!("{d}x{hd}"))
        ));
        let hid = t(&format!("?x{hd}xf32"));
        line(format!(
            "gate_{l} = llm.matmul hf_{l}, w1_{l} {{transpose_rhs = true}} : {hid}"
        ));
        line(format!(
            "up_{l} = llm.matmul hf_{l}, w3_{l} {{transpose_rhs = true}} : {hid}"
        ));
        line(format!("act_{l} = llm.silu gate_{l} : {hid}"));
        line(format!("glu_{l} = llm.mul act_{l}, up_{l} : {hid}"));
        line(format!(
            "down_{l} = llm.matmul glu_{l}, w2_{l} {{transpose_rhs = true}} : {act}"
        ));
        let next = format!("x{}", l + 1);
        line(format!("{next} = llm.add xa_{l}, down_{l} : {act}"));
        x = next;
    }
    line(format!("final_norm = {}", w("norm.weight", &d.to_string())));
    line(format!(
        "xn = llm.rms_norm {x}, final_norm {{eps = {eps}}} : {act}"
    ));
    let classifier = if c.tied_classifier {
        "embed".to_string()
    } else {
        line(format!(
            "classifier = {}",
            w("output.weight", &format!("{v}x{d}"))
        ));
        "classifier".to_string()
    };
    line(format!(
        "logits = llm.matmul xn, {classifier} {{transpose_rhs = true}} : {}",
        t(&format!("?x{v}xf32"))
    ));
    out.push_str(&s);
    let _ = writeln!(out, "        llm.return logits, {cache_name}");
    let _ = writeln!(out, "    }}");
    out
}
