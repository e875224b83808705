//! llama2.c checkpoints (the legacy fp32 `.bin` format).
//!
//! The file is a header of seven little-endian `i32`s — `dim`, `hidden_dim`, `n_layers`,
//! `n_heads`, `n_kv_heads`, `vocab_size`, `seq_len` — followed by `f32` weights in this
//! order: token embedding `[vocab, dim]`; per layer (all layers of one kind together)
//! attention RMSNorm `[L, dim]`, `wq [L, dim, dim]`, `wk [L, kv_dim, dim]`,
//! `wv [L, kv_dim, dim]`, `wo [L, dim, dim]`, FFN RMSNorm `[L, dim]`, `w1 [L, hidden, dim]`,
//! `w2 [L, dim, hidden]`, `w3 [L, hidden, dim]`; the final RMSNorm `[dim]`; the legacy RoPE
//! tables `[seq_len, head_dim / 2]` twice (skipped); and, when `vocab_size` is negative, an
//! untied classifier `[vocab, dim]`.

use std::path::Path;

use llm_ir::{
    dtype::DType,
    interp::{Tensor, Value},
};

use crate::{
    model::ModelConfig,
    weights::{LoadError, Weights},
};

/// Largest accepted value of any header field: far above real models, and small enough that
/// every size computed from the header fits comfortably in 64 bits.
const MAX_HEADER_VALUE: i64 = 1 << 20;

/// Reads a llama2.c checkpoint: its configuration and weights.
pub fn load(path: &Path) -> Result<(ModelConfig, Weights), LoadError> {
    load_with(path, &mut |_| {})
}

/// [`load`], reporting the fraction of the weights read to `progress`.
pub fn load_with(
    path: &Path,
    progress: &mut dyn FnMut(f64),
) -> Result<(ModelConfig, Weights), LoadError> {
    let file = path.display().to_string();
    let err = |message: String| LoadError {
        file: file.clone(),
        message,
    };
    let bytes = crate::mmap::map(path).map_err(|e| err(format!("cannot read: {e}")))?;
    parse_with(&bytes, progress).map_err(err)
}

/// Parses the bytes of a llama2.c checkpoint.
pub fn parse(bytes: &[u8]) -> Result<(ModelConfig, Weights), String> {
    parse_with(bytes, &mut |_| {})
}

/// [`parse`], reporting the fraction of the weights read to `progress`.
pub fn parse_with(
    bytes: &[u8],
    progress: &mut dyn FnMut(f64),
) -> Result<(ModelConfig, Weights), String> {
    if bytes.len() < 28 {
        return Err(format!(
            "the file has {} bytes, too short for the 28-byte header",
            bytes.len()
        ));
    }
    let field = |i: usize| {
        i64::from(i32::from_le_bytes(
            bytes[4 * i..4 * i + 4].try_into().unwrap_or([0; 4]),
        ))
    };
    let names = [
        "dim",
        "hidden_dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "seq_len",
    ];
    let mut h = [0i64; 7];
    for (i, name) in names.iter().enumerate() {
        h[i] = field(i);
        let v = if i == 5 { h[i].abs() } else { h[i] };
        if v <= 0 || v > MAX_HEADER_VALUE {
            return Err(format!(
                "header field {name} = {} at byte offset {} is out of range (expected 1..={MAX_HEADER_VALUE})",
                h[i],
                4 * i
            ));
        }
    }
    let [dim, hidden, layers, heads, kv_heads, vocab, seq_len] = h;
    let tied = vocab > 0;
    let vocab = vocab.abs();
    let config = ModelConfig {
        tied_classifier: tied,
        ..ModelConfig::llama2c(
            dim as usize,
            hidden as usize,
            layers as usize,
            heads as usize,
            kv_heads as usize,
            vocab as usize,
            seq_len as usize,
        )
    };
    config.validate()?;
    let (head_dim, kv_dim) = (config.head_dim() as i64, config.kv_dim() as i64);
    let (d, hd, l, v, kv) = (
        dim as usize,
        hidden as usize,
        layers as usize,
        vocab as usize,
        kv_dim as usize,
    );
    let layout: Vec<(String, Vec<usize>, usize)> = {
        let mut out = vec![("tok_embeddings.weight".to_string(), vec![v, d], 1)];
        let per_layer: [(&str, Vec<usize>); 9] = [
            ("attention_norm.weight", vec![d]),
            ("attention.wq.weight", vec![d, d]),
            ("attention.wk.weight", vec![kv, d]),
            ("attention.wv.weight", vec![kv, d]),
            ("attention.wo.weight", vec![d, d]),
            ("ffn_norm.weight", vec![d]),
            ("feed_forward.w1.weight", vec![hd, d]),
            ("feed_forward.w2.weight", vec![d, hd]),
            ("feed_forward.w3.weight", vec![hd, d]),
        ];
        for (name, shape) in per_layer {
            out.push((format!("layers.*.{name}"), shape, l));
        }
        out.push(("norm.weight".to_string(), vec![d], 1));
        out.push((
            "(rope tables)".to_string(),
            vec![seq_len as usize, head_dim as usize],
            1,
        ));
        if !tied {
            out.push(("output.weight".to_string(), vec![v, d], 1));
        }
        out
    };
    // Header values are at most 2^20, so these products fit in u128.
    let floats: u128 = layout
        .iter()
        .map(|(_, s, n)| *n as u128 * s.iter().map(|&d| d as u128).product::<u128>())
        .sum();
    let expected = 28 + 4 * floats;
    if bytes.len() as u128 != expected {
        return Err(format!(
            "the header (dim {dim}, hidden_dim {hidden}, n_layers {layers}, n_heads {heads}, n_kv_heads {kv_heads}, vocab_size {}, seq_len {seq_len}) needs {expected} bytes, but the file has {}",
            field(5),
            bytes.len()
        ));
    }
    let mut weights = Weights::default();
    let mut at = 28;
    let total = layout.len();
    for (i, (name, shape, count)) in layout.into_iter().enumerate() {
        progress(i as f64 / total as f64);
        let n: usize = shape.iter().product();
        for layer in 0..count {
            let raw = &bytes[at..at + 4 * n];
            at += 4 * n;
            // Skipped tables (the legacy RoPE frequencies) are not decoded.
            if name.starts_with('(') {
                continue;
            }
            let values = crate::weights::floats_le(DType::F32, raw);
            let key = name.replace('*', &layer.to_string());
            weights.insert(
                key,
                Value::Tensor(Tensor::from_f32(shape.clone(), DType::F32, values)),
            );
        }
    }
    Ok((config, weights))
}
