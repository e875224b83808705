//! GGUF model files (versions 2 and 3).
//!
//! The file is a header (`GGUF`, version, tensor count, metadata count), typed metadata
//! key/value pairs, tensor descriptions (name, dims fastest first, ggml type, data offset),
//! then the tensor data, aligned to `general.alignment` (32 by default). Every read is
//! bounds-checked and every count is checked against the bytes that remain, so a malformed
//! file gives an error naming the key or tensor, never a panic or a huge allocation. A
//! model split across files (`split.count` parts, llama.cpp's `PREFIX-0000K-of-0000N.gguf`)
//! loads from its first part, which holds the metadata ([`split_paths`], [`read_parts`]).
//!
//! Llama, Qwen2, Qwen3, Phi-3, Gemma, Granite, OLMo, OLMo 2, SmolLM3 and Cohere models, the
//! LayerNorm architectures and the mixtures of experts (Mixtral's `llama`, `qwen3moe`,
//! `qwen2moe`, `olmoe`, `granitemoe`, `dbrx`, `gpt-oss`, DeepSeek's `deepseek2`) are read
//! into the builder's weight names (`blk.N.attn_q.weight`
//! becomes `layers.N.attention.wq.weight`, ...). F32 tensors and F16/BF16 vectors are float
//! tensors; F16 and BF16 matrices keep their 16 bits (`llm.quantized_tensor`s of format `f16`
//! or `bf16`, [`stored_floats`]), and Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the K-quants
//! (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: every type llama.cpp's K-quant files mix, with the
//! Q5_0/Q5_1/Q8_0 it writes for rows that are not whole super-blocks), IQ4_XS and IQ4_NL
//! (its fallback), and the lattice types IQ3_XXS and IQ3_S (llama.cpp's IQ3_XXS, IQ3_XS,
//! IQ3_S and IQ3_M files), IQ2_XXS, IQ2_XS and IQ2_S (its IQ2_XXS, IQ2_XS, IQ2_S and IQ2_M
//! files), IQ1_S and IQ1_M (its IQ1_S and IQ1_M files), the ternary TQ1_0 and TQ2_0 and
//! binary Q1_0 (ternary and 1-bit models' files), and the 4-bit floats MXFP4 and NVFP4
//! stay quantized with their exact bytes. The
//! vocabulary in the metadata (SentencePiece or byte-level BPE) becomes the tokenizer
//! (`gguf_vocab.rs`).

use std::path::{Path, PathBuf};

use llm_ir::{
    dtype::DType,
    interp::{QTensor, Value, quant},
    types::QuantFormat,
};

use crate::{
    hf_deepseek,
    model::{
        ATTENTION_SINKS, Activation, AttentionBias, Blocks, EXPERT_DOWN_BIASES, EXPERT_DOWNS,
        EXPERT_GATE_BIASES, EXPERT_GATES, EXPERT_UP_BIASES, EXPERT_UPS, ExpertGlu, ExpertGroups,
        ExpertScoring, Experts, FUSED_GATE_UP, FUSED_QKV, FUSED_QKV_BIAS, FeedForward, LATENT_K_UP,
        LATENT_KV_DOWN, LATENT_KV_NORM, LATENT_Q_DOWN, LATENT_Q_NORM, LATENT_Q_UP, LATENT_V_UP,
        LatentAttention, LocalAttention, ModelConfig, Norm, POSITION_EMBEDDINGS,
        POST_ATTENTION_NORM, POST_FFW_NORM, QkNorm, ROPE_FREQS, ROUTER, ROUTER_BIAS,
        ROUTER_SELECTION_BIAS, SHARED_EXPERT_DOWN, SHARED_EXPERT_GATE, SHARED_EXPERT_UP,
        SHARED_GATE, SharedExpert, every_nth_layer, reciprocal, split_fused_weights,
        uneven_head_dim,
    },
    rope_scaling::{
        LONGROPE_FACTORS, RopeScaling, Yarn, longrope_uses_long, pair_factors, set_factors,
    },
    tokenizer::TextCodec,
    weights::{LoadError, Weights, builder_name, stored_floats},
};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    /// Any unsigned integer type.
    Uint(u64),
    /// Any signed integer type.
    Int(i64),
    /// `f32` or `f64`.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array.
    Array(Vec<Meta>),
}

impl Meta {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Meta::Uint(v) => Some(*v),
            Meta::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }
}

/// One tensor description.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The name.
    pub name: String,
    /// Dims, fastest-varying first (ggml's `ne`).
    pub dims: Vec<u64>,
    /// The ggml type id.
    pub ggml_type: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

/// A parsed GGUF file.
#[derive(Debug, Clone)]
pub struct GgufFile {
    /// Format version.
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Meta)>,
    /// Tensor descriptions in file order.
    pub tensors: Vec<TensorInfo>,
    /// Byte offset of the data section.
    pub data_start: usize,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.bytes.len().saturating_sub(self.at) < n {
            return Err(format!(
                "truncated at byte offset {} reading {what}",
                self.at
            ));
        }
        self.at += n;
        Ok(&self.bytes[self.at - n..self.at])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    }

    /// A count of items of at least `min_item_bytes` each, checked against what remains.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize, String> {
        let at = self.at;
        let n = self.u64(what)?;
        let left = (self.bytes.len() - self.at) as u64;
        if n > left / min_item_bytes.max(1) as u64 {
            return Err(format!(
                "{what} at byte offset {at} claims {n} items, more than the file holds"
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let at = self.at;
        let n = self.count(1, what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| format!("{what} at byte offset {at} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Meta, String> {
        let b = |r: &mut Self, n| r.take(n, what).map(|s| s.to_vec());
        Ok(match ty {
            0 => Meta::Uint(u64::from(b(self, 1)?[0])),
            1 => Meta::Int(i64::from(b(self, 1)?[0] as i8)),
            2 => Meta::Uint(u64::from(u16::from_le_bytes(
                b(self, 2)?.try_into().unwrap_or([0; 2]),
            ))),
            3 => Meta::Int(i64::from(i16::from_le_bytes(
                b(self, 2)?.try_into().unwrap_or([0; 2]),
            ))),
            4 => Meta::Uint(u64::from(self.u32(what)?)),
            5 => Meta::Int(i64::from(self.u32(what)? as i32)),
            6 => Meta::Float(f64::from(f32::from_bits(self.u32(what)?))),
            7 => Meta::Bool(b(self, 1)?[0] != 0),
            8 => Meta::Str(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(format!("{what}: arrays nest too deeply"));
                }
                let elem = self.u32(what)?;
                let n = self.count(1, what)?;
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                Meta::Array(items)
            }
            10 => Meta::Uint(self.u64(what)?),
            11 => Meta::Int(self.u64(what)? as i64),
            12 => Meta::Float(f64::from_bits(self.u64(what)?)),
            other => return Err(format!("{what} has unknown value type {other}")),
        })
    }
}

/// Parses the header, metadata and tensor descriptions of a GGUF file.
pub fn parse(bytes: &[u8]) -> Result<GgufFile, String> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4, "the magic")? != b"GGUF" {
        return Err("not a GGUF file (bad magic at byte offset 0)".into());
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (supported: 2 and 3)"
        ));
    }
    let n_tensors = r.count(24, "the tensor count")?;
    let n_meta = r.count(12, "the metadata count")?;
    let mut metadata = Vec::with_capacity(n_meta);
    for i in 0..n_meta {
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&format!("the type of `{key}`"))?;
        let value = r.value(ty, &format!("metadata `{key}`"), 0)?;
        metadata.push((key, value));
    }
    let mut tensors = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let name = r.string(&format!("tensor name #{i}"))?;
        let nd = r.u32(&format!("the rank of tensor `{name}`"))?;
        if nd == 0 || nd > 4 {
            return Err(format!("tensor `{name}` has rank {nd} (expected 1 to 4)"));
        }
        let dims = (0..nd)
            .map(|_| r.u64(&format!("the dims of tensor `{name}`")))
            .collect::<Result<Vec<_>, _>>()?;
        let ggml_type = r.u32(&format!("the type of tensor `{name}`"))?;
        let offset = r.u64(&format!("the offset of tensor `{name}`"))?;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    let alignment = metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(32);
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(format!(
            "general.alignment = {alignment} is not a power of two"
        ));
    }
    let data_start = r.at.div_ceil(alignment as usize) * alignment as usize;
    Ok(GgufFile {
        version,
        metadata,
        tensors,
        data_start,
    })
}

/// How a ggml type is stored: a float element type or a quantization format.
enum Storage {
    Float(DType),
    Quant(QuantFormat),
}

fn storage(ggml_type: u32) -> Option<Storage> {
    Some(match ggml_type {
        0 => Storage::Float(DType::F32),
        1 => Storage::Float(DType::F16),
        30 => Storage::Float(DType::BF16),
        2 => Storage::Quant(QuantFormat::Q4_0),
        3 => Storage::Quant(QuantFormat::Q4_1),
        6 => Storage::Quant(QuantFormat::Q5_0),
        7 => Storage::Quant(QuantFormat::Q5_1),
        8 => Storage::Quant(QuantFormat::Q8_0),
        10 => Storage::Quant(QuantFormat::Q2K),
        11 => Storage::Quant(QuantFormat::Q3K),
        12 => Storage::Quant(QuantFormat::Q4K),
        13 => Storage::Quant(QuantFormat::Q5K),
        14 => Storage::Quant(QuantFormat::Q6K),
        20 => Storage::Quant(QuantFormat::Iq4Nl),
        23 => Storage::Quant(QuantFormat::Iq4Xs),
        18 => Storage::Quant(QuantFormat::Iq3Xxs),
        21 => Storage::Quant(QuantFormat::Iq3S),
        16 => Storage::Quant(QuantFormat::Iq2Xxs),
        17 => Storage::Quant(QuantFormat::Iq2Xs),
        22 => Storage::Quant(QuantFormat::Iq2S),
        19 => Storage::Quant(QuantFormat::Iq1S),
        29 => Storage::Quant(QuantFormat::Iq1M),
        34 => Storage::Quant(QuantFormat::Tq1_0),
        35 => Storage::Quant(QuantFormat::Tq2_0),
        39 => Storage::Quant(QuantFormat::Mxfp4),
        40 => Storage::Quant(QuantFormat::Nvfp4),
        41 => Storage::Quant(QuantFormat::Q1_0),
        _ => return None,
    })
}

/// ggml's name of the types this loader does not read (for its error messages).
fn ggml_type_name(ggml_type: u32) -> Option<&'static str> {
    Some(match ggml_type {
        9 => "Q8_1",
        15 => "Q8_K",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        _ => return None,
    })
}

impl GgufFile {
    /// The metadata value of `key`.
    pub(crate) fn meta(&self, key: &str) -> Option<&Meta> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn int(&self, key: &str) -> Result<usize, String> {
        match self.meta(key).and_then(Meta::as_u64) {
            Some(v) if v > 0 && v <= 1 << 24 => Ok(v as usize),
            Some(v) => Err(format!("metadata `{key}` = {v} is out of range")),
            None => Err(format!("missing or non-integer metadata `{key}`")),
        }
    }

    fn float(&self, key: &str) -> Option<f64> {
        match self.meta(key)? {
            Meta::Float(v) => Some(*v),
            _ => None,
        }
    }

    /// The metadata value of `key` where the file has it, a positive, finite float.
    fn positive(&self, key: &str) -> Result<Option<f64>, String> {
        match self.meta(key) {
            None => Ok(None),
            Some(_) => self
                .float(key)
                .filter(|v| v.is_finite() && *v > 0.0)
                .map(Some)
                .ok_or_else(|| format!("metadata `{key}` is not a positive number")),
        }
    }

    /// The metadata value of `key`, a boolean; an error naming it where the file has none.
    fn boolean(&self, key: &str) -> Result<bool, String> {
        match self.meta(key) {
            Some(Meta::Bool(b)) => Ok(*b),
            Some(_) => Err(format!("metadata `{key}` is not a boolean")),
            None => Err(format!("missing metadata `{key}`")),
        }
    }

    /// The tensor `name` as an interpreter value (shape slowest dim first).
    pub fn tensor(&self, bytes: &[u8], info: &TensorInfo) -> Result<Value, String> {
        let name = &info.name;
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        if info.dims.iter().any(|&d| d == 0 || d > 1 << 32) {
            return Err(format!(
                "tensor `{name}` has dims {:?} out of range",
                info.dims
            ));
        }
        let count = info
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 40)
            .ok_or_else(|| format!("tensor `{name}` is too large"))? as usize;
        let kind = storage(info.ggml_type).ok_or_else(|| {
            format!(
                "tensor `{name}` has unsupported ggml type {}{}",
                info.ggml_type,
                ggml_type_name(info.ggml_type).map_or(String::new(), |t| format!(" ({t})"))
            )
        })?;
        let size = match &kind {
            Storage::Float(d) => count * d.size_bytes(),
            Storage::Quant(q) => {
                let dims: Vec<Option<u64>> = shape.iter().map(|&d| Some(d as u64)).collect();
                q.validate_shape(&dims)
                    .map_err(|e| format!("tensor `{name}`: {e}"))?;
                quant::storage_bytes(q, &shape)
            }
        };
        let start = self.data_start as u64 + info.offset;
        let end = start.checked_add(size as u64).filter(|&e| e <= bytes.len() as u64).ok_or_else(|| {
            format!("tensor `{name}` at data offset {} with {size} bytes runs past the end of the file", info.offset)
        })?;
        let data = &bytes[start as usize..end as usize];
        Ok(match kind {
            Storage::Float(d) => stored_floats(shape, d, data),
            Storage::Quant(format) => Value::Quantized(QTensor {
                shape,
                format,
                bytes: data.to_vec(),
            }),
        })
    }
}

/// The builder's name for a GGUF tensor name of architecture `arch`, or `None` for a
/// tensor that is not part of such a model (biases outside `qwen2`, `qwen2moe`, `llama`,
/// `glm4`, `gpt-oss` and the LayerNorm architectures ([`LAYER_NORM_ARCHITECTURES`]),
/// output norms outside `gemma2`, `gemma3`, `olmo2` and `glm4`, attention sinks and the
/// router's and experts' biases outside `gpt-oss`, whose `post_attention_norm` is its
/// feed-forward block's input norm): Phi-3's
/// and GLM-4-0414's `ffn_up` and
/// Phi-3's `attn_qkv` are fused matrices ([`FUSED_QKV`],
/// [`FUSED_GATE_UP`]: its `ffn_up` holds the gate's rows, then the up projection's), and
/// so are Phi-2's `attn_qkv` and its bias where the file has them ([`FUSED_QKV_BIAS`]).
fn weight_name(gguf: &str, arch: &str) -> Option<String> {
    if let Some(expert) = expert_matrix_name(gguf) {
        return Some(expert);
    }
    let name = builder_name(
        gguf,
        &[
            ("token_embd.weight", "tok_embeddings.weight"),
            ("position_embd.weight", POSITION_EMBEDDINGS),
            ("output_norm.weight", "norm.weight"),
            ("output_norm.bias", "norm.bias"),
            ("output.weight", "output.weight"),
            ("output.bias", "output.bias"),
            (ROPE_FREQS, ROPE_FREQS),
            (LONGROPE_FACTORS[0], LONGROPE_FACTORS[0]),
            (LONGROPE_FACTORS[1], LONGROPE_FACTORS[1]),
        ],
        "blk.",
        &[
            ("attn_norm.weight", "attention_norm.weight"),
            ("attn_norm.bias", "attention_norm.bias"),
            ("attn_q.weight", "attention.wq.weight"),
            ("attn_k.weight", "attention.wk.weight"),
            ("attn_v.weight", "attention.wv.weight"),
            ("attn_output.weight", "attention.wo.weight"),
            ("attn_q.bias", "attention.wq.bias"),
            ("attn_k.bias", "attention.wk.bias"),
            ("attn_v.bias", "attention.wv.bias"),
            ("attn_output.bias", "attention.wo.bias"),
            ("attn_qkv.bias", FUSED_QKV_BIAS),
            ("ffn_norm.weight", "ffn_norm.weight"),
            ("ffn_norm.bias", "ffn_norm.bias"),
            // Falcon 40B's norm of the feed-forward block's input.
            ("attn_norm_2.weight", "ffn_norm.weight"),
            ("attn_norm_2.bias", "ffn_norm.bias"),
            // DBRX's norm of the feed-forward block's input.
            ("attn_output_norm.weight", "ffn_norm.weight"),
            ("ffn_gate.bias", "feed_forward.w1.bias"),
            ("ffn_down.bias", "feed_forward.w2.bias"),
            ("ffn_up.bias", "feed_forward.w3.bias"),
            ("ffn_gate.weight", "feed_forward.w1.weight"),
            ("ffn_down.weight", "feed_forward.w2.weight"),
            ("ffn_up.weight", "feed_forward.w3.weight"),
            ("attn_qkv.weight", FUSED_QKV),
            ("attn_q_norm.weight", "attention.q_norm.weight"),
            ("attn_k_norm.weight", "attention.k_norm.weight"),
            (POST_ATTENTION_NORM, POST_ATTENTION_NORM),
            (POST_FFW_NORM, POST_FFW_NORM),
            ("ffn_gate_inp.weight", ROUTER),
            ("ffn_gate_inp_shexp.weight", SHARED_GATE),
            ("ffn_gate_shexp.weight", SHARED_EXPERT_GATE),
            ("ffn_up_shexp.weight", SHARED_EXPERT_UP),
            ("ffn_down_shexp.weight", SHARED_EXPERT_DOWN),
            ("ffn_gate_exps.weight", EXPERT_GATES),
            ("ffn_up_exps.weight", EXPERT_UPS),
            ("ffn_down_exps.weight", EXPERT_DOWNS),
            // gpt-oss's attention sinks, router bias and experts' biases.
            ("attn_sinks.weight", ATTENTION_SINKS),
            ("ffn_gate_inp.bias", ROUTER_BIAS),
            ("ffn_gate_exps.bias", EXPERT_GATE_BIASES),
            ("ffn_up_exps.bias", EXPERT_UP_BIASES),
            ("ffn_down_exps.bias", EXPERT_DOWN_BIASES),
            // DeepSeek's latent attention and selection bias.
            ("attn_q_a.weight", LATENT_Q_DOWN),
            ("attn_q_a_norm.weight", LATENT_Q_NORM),
            ("attn_q_b.weight", LATENT_Q_UP),
            ("attn_kv_a_mqa.weight", LATENT_KV_DOWN),
            ("attn_kv_a_norm.weight", LATENT_KV_NORM),
            ("attn_kv_b.weight", hf_deepseek::KV_UP_JOINED),
            ("attn_k_b.weight", LATENT_K_UP),
            ("attn_v_b.weight", LATENT_V_UP),
            ("exp_probs_b.bias", ROUTER_SELECTION_BIAS),
        ],
    )?;
    let gpt_oss = arch == "gpt-oss";
    let gpt_oss_only = [
        ATTENTION_SINKS,
        ROUTER_BIAS,
        EXPERT_GATE_BIASES,
        EXPERT_UP_BIASES,
        EXPERT_DOWN_BIASES,
    ];
    if !gpt_oss && gpt_oss_only.iter().any(|n| name.ends_with(n)) {
        return None;
    }
    // DeepSeek's latent attention and selection bias only in `deepseek2` files.
    let deepseek_only = [
        LATENT_Q_DOWN,
        LATENT_Q_NORM,
        LATENT_Q_UP,
        LATENT_KV_DOWN,
        LATENT_KV_NORM,
        hf_deepseek::KV_UP_JOINED,
        LATENT_K_UP,
        LATENT_V_UP,
        ROUTER_SELECTION_BIAS,
    ];
    if arch != "deepseek2" && deepseek_only.iter().any(|n| name.ends_with(n)) {
        return None;
    }
    // gpt-oss's `post_attention_norm` is the feed-forward block's input norm.
    if gpt_oss && name.ends_with(POST_ATTENTION_NORM) {
        return Some(name.replace(POST_ATTENTION_NORM, "ffn_norm.weight"));
    }
    // Biases only in qwen2's, llama's, glm4's and gpt-oss's projections and the LayerNorm
    // architectures', output norms only in Gemma 2's and 3's sandwiches, OLMo 2's and
    // GLM-4-0414's.
    let output_norms = matches!(arch, "gemma2" | "gemma3" | "olmo2" | "glm4");
    // Falcon 40B's second input norm only in `falcon` files.
    let second_norm = gguf.ends_with(".attn_norm_2.weight") || gguf.ends_with(".attn_norm_2.bias");
    if second_norm && arch != "falcon"
        || gguf.ends_with(".attn_output_norm.weight") && arch != "dbrx"
    {
        return None;
    }
    let biases = matches!(arch, "qwen2" | "qwen2moe" | "llama" | "glm4" | "gpt-oss")
        || LAYER_NORM_ARCHITECTURES.contains(&arch);
    if name.ends_with(".bias") && !biases
        || !output_norms && (name.ends_with(POST_ATTENTION_NORM) || name.ends_with(POST_FFW_NORM))
    {
        return None;
    }
    Some(match arch {
        "phi3" | "glm4" => name.replace("feed_forward.w3.weight", FUSED_GATE_UP),
        _ => name,
    })
}

/// The builder's name, before stacking, of an expert's matrix as Mixtral's files of
/// before llama.cpp stacked the experts store it (`blk.N.ffn_gate.E.weight`,
/// `ffn_up.E`, `ffn_down.E`: one tensor an expert); `None` for other tensors.
fn expert_matrix_name(gguf: &str) -> Option<String> {
    let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let (part, rest) = rest.strip_prefix("ffn_")?.split_once('.')?;
    let expert = rest.strip_suffix(".weight")?;
    let w = match part {
        "gate" => "w1",
        "up" => "w3",
        "down" => "w2",
        _ => return None,
    };
    Some(crate::hf_moe::expert_matrix(
        layer.parse().ok()?,
        expert.parse().ok()?,
        w,
    ))
}

/// A model read from GGUF: configuration, weights and the embedded tokenizer.
pub struct GgufModel {
    /// Hyperparameters.
    pub config: ModelConfig,
    /// Weights under the builder's names.
    pub weights: Weights,
    /// The vocabulary of the file, if it has one.
    pub tokenizer: Option<Box<dyn TextCodec>>,
}

/// Reads a llama GGUF file (memory-mapped), or a model split across files from its first
/// part ([`split_paths`]).
pub fn load(path: &Path) -> Result<GgufModel, LoadError> {
    load_with(path, &mut |_| {})
}

/// [`load`], reporting the fraction of tensors read to `progress`.
pub fn load_with(path: &Path, progress: &mut dyn FnMut(f64)) -> Result<GgufModel, LoadError> {
    let err = |path: &Path| {
        let file = path.display().to_string();
        move |message: String| LoadError { file, message }
    };
    let map =
        |path: &Path| crate::mmap::map(path).map_err(|e| err(path)(format!("cannot read: {e}")));
    let first = map(path)?;
    let head = parse(&first).map_err(err(path))?;
    let paths = split_paths(path, &head).map_err(err(path))?;
    let mut maps = vec![first];
    let mut files = vec![head];
    for part in &paths[1..] {
        let bytes = map(part)?;
        files.push(parse(&bytes).map_err(err(part))?);
        maps.push(bytes);
    }
    let bytes: Vec<&[u8]> = maps.iter().map(|m| &m[..]).collect();
    read_files(files, &bytes, progress).map_err(|(part, message)| err(&paths[part])(message))
}

/// The files of the model whose first file is at `path` with header `first`: `path`
/// alone, or for a model split across files (`split.count` above 1: llama.cpp's
/// `gguf-split`, and its converters' `--split-max-tensors`/`--split-max-size`) the parts
/// beside it, named as llama.cpp names them: `PREFIX-00001-of-0000N.gguf` to
/// `PREFIX-0000N-of-0000N.gguf`. A later part is an error that names the first, and a
/// first part named otherwise an error that gives the pattern.
pub fn split_paths(path: &Path, first: &GgufFile) -> Result<Vec<PathBuf>, String> {
    let (part, count) = split_part(first, false)?;
    if count == 1 {
        return Ok(vec![path.to_path_buf()]);
    }
    let suffix = |n: usize| format!("-{n:05}-of-{count:05}.gguf");
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Err(format!(
            "part {} of a model split in {count} files, whose siblings are found by a UTF-8 file name",
            part + 1
        ));
    };
    match name.strip_suffix(&suffix(part + 1)) {
        Some(prefix) if part == 0 => Ok((1..=count)
            .map(|n| path.with_file_name(format!("{prefix}{}", suffix(n))))
            .collect()),
        Some(prefix) => Err(format!(
            "part {} of a model split in {count} files: load its first part, {prefix}{}",
            part + 1,
            suffix(1)
        )),
        None => Err(format!(
            "part {} of a model split in {count} files, but not named `PREFIX{}` as llama.cpp names the parts",
            part + 1,
            suffix(part + 1)
        )),
    }
}

/// A file's place in a split model: its part (from 0, `split.no`) and the number of parts
/// (`split.count`), at most 65,535 (a `u16`, as llama.cpp reads it). A file without
/// `split.count`, or with one of 0 or 1, is a whole model, `(0, 1)` (as llama.cpp reads
/// it); a later part (`later`) must state both keys.
fn split_part(g: &GgufFile, later: bool) -> Result<(usize, usize), String> {
    let key = |k: &str| match g.meta(k).map(Meta::as_u64) {
        None if later => Err(format!("missing metadata `{k}` in a part of a split model")),
        None => Ok(None),
        Some(Some(v)) if v <= u64::from(u16::MAX) => Ok(Some(v as usize)),
        Some(_) => Err(format!("metadata `{k}` is not an integer in 0..=65535")),
    };
    let count = key("split.count")?.unwrap_or(1);
    if count <= 1 && !later {
        return Ok((0, 1));
    }
    let part = key("split.no")?.unwrap_or(0);
    if part >= count {
        return Err(format!(
            "split.no = {part} is not a part of split.count = {count}"
        ));
    }
    Ok((part, count))
}

/// The architectures read (`general.architecture`): `llama` (Llama 2 and 3, Mistral),
/// `qwen2`, which is llama's with biases on the q, k and v projections, `qwen3`, with an
/// RMSNorm of each head's queries and keys (`attn_q_norm`, `attn_k_norm`), and `phi3`,
/// whose projections are fused ([`weight_name`]). `granite` is llama's with Granite's
/// scales ([`apply_granite`]); `smollm3` is llama's with every fourth layer's RoPE left
/// out (every fourth, as llama.cpp fixes it); `command-r` is Cohere's and `cohere2` Cohere 2's ([`apply_cohere`]); `olmo2` is
/// llama's with its blocks' outputs normalized
/// (`post_attention_norm`, `post_ffw_norm`) instead of their inputs, and RMSNorms over
/// the whole q and k projections (`attn_q_norm`, `attn_k_norm`). The RoPE pairs of all but llama and granite are
/// half-split ([`interleaved_rope`]). `gemma` is llama's with GeGLU and embeddings scaled
/// by `sqrt(embedding_length)`; its norm weights are stored with Gemma's `1 +` added
/// (llama.cpp's converter adds it). `gemma2` and `gemma3` add Gemma 2's and 3's settings
/// ([`apply_gemma`]). `olmo` is llama's with LayerNorms of neither weight nor bias (no
/// norm tensors). `qwen3moe` is qwen3's, `qwen2moe` qwen2's (with a shared expert) and
/// `olmoe` olmo2's q/k norms (with input norms) with experts ([`apply_experts`], which
/// also reads a `llama` file's: Mixtral's); `granitemoe` is granite's with experts (and
/// Granite-MoE-Shared's shared expert, added without a gate); `dbrx` is DBRX's: LayerNorms
/// without bias (`dbrx.attention.layer_norm_epsilon`), q, k and v fused (`attn_qkv`) and
/// clamped, the feed-forward block's input norm `attn_output_norm`, experts; `glm4` is
/// GLM-4-0414's: llama's with q, k and v biases, the gate and up projections fused in
/// `ffn_up` (as phi3's), RoPE over part of each head (`rope.dimension_count`) with its
/// pairs interleaved as GLM's checkpoints have them, and output norms (`post_attention_norm`,
/// `post_ffw_norm`) besides the input norms; `gpt-oss` is gpt-oss's ([`apply_gpt_oss`]);
/// `deepseek2` is DeepSeek V2's and V3's ([`apply_deepseek2`]).
/// The other architectures read are [`LAYER_NORM_ARCHITECTURES`]. Metadata keys begin
/// with the name.
const ARCHITECTURES: [&str; 21] = [
    "llama",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3",
    "granite",
    "olmo2",
    "smollm3",
    "command-r",
    "cohere2",
    "olmo",
    "qwen3moe",
    "qwen2moe",
    "olmoe",
    "granitemoe",
    "dbrx",
    "glm4",
    "gpt-oss",
    "deepseek2",
];

/// The architectures of the original transformer's shape, with LayerNorms that add a
/// bias ([`apply_layer_norms`]): Phi-2's, StableLM's, StarCoder2's, GPT-NeoX's, GPT-2's,
/// GPT-BigCode's (`starcoder`) and Falcon's.
const LAYER_NORM_ARCHITECTURES: [&str; 7] = [
    "phi2",
    "stablelm",
    "starcoder2",
    "gptneox",
    "gpt2",
    "starcoder",
    "falcon",
];

/// Whether a file of architecture `arch` pairs RoPE's features `(2i, 2i + 1)`: llama.cpp's
/// converter reorders the q and k rows of `llama`, `granite`, `granitemoe`, `smollm3` and
/// `olmo` models for them ([`reordered_rope`]), Cohere's (`command-r`) and GLM's (`glm4`)
/// pair them so already, and the others keep Hugging Face's half-split order.
fn interleaved_rope(arch: &str) -> bool {
    reordered_rope(arch) || matches!(arch, "command-r" | "cohere2" | "glm4")
}

/// Whether llama.cpp's converter reorders the q and k rows of a model of architecture
/// `arch`, a whole head at a time, for interleaved RoPE pairs.
fn reordered_rope(arch: &str) -> bool {
    matches!(
        arch,
        "llama" | "granite" | "granitemoe" | "smollm3" | "olmo"
    )
}

/// Cohere's settings (`command-r`, and Cohere 2's, `cohere2`: `arch`), as llama.cpp reads
/// them: LayerNorms without bias, of epsilon `ARCH.attention.layer_norm_epsilon`,
/// parallel attention and feed-forward blocks, and the logits multiplied by
/// `ARCH.logit_scale` (both keys required); Cohere 2's three local layers (of
/// `ARCH.attention.sliding_window` positions, with RoPE) to a global one (without).
fn apply_cohere(g: &GgufFile, arch: &str, c: &mut ModelConfig) -> Result<(), String> {
    let required = |key: &str| {
        let key = format!("{arch}.{key}");
        g.positive(&key)?
            .ok_or_else(|| format!("missing metadata `{key}`"))
    };
    c.logit_scale = Some(required("logit_scale")?);
    c.norm_eps = required("attention.layer_norm_epsilon")?;
    c.norm = Norm::Layer;
    c.blocks = Blocks::ParallelSharedNorm;
    if arch == "cohere2" {
        // llama.cpp's pattern: three local layers with RoPE to a global one without.
        let window = g.int(&format!("{arch}.attention.sliding_window"))?;
        let local = LocalAttention::periodic(window, c.layers, 4, None);
        c.nope_layers = Some(local.global_layers());
        c.local_attention = Some(local);
    }
    Ok(())
}

/// The settings of the LayerNorm architectures' files ([`LAYER_NORM_ARCHITECTURES`]), as
/// llama.cpp reads them: LayerNorms with biases, of epsilon
/// `ARCH.attention.layer_norm_epsilon` (required);
/// Phi-2's attention and ungated GELU feed-forward block side by side over one norm,
/// StableLM's SwiGLU, side by side where the file has no `ffn_norm` (StableLM 2 12B's
/// parallel residual), StarCoder2's ungated GELU feed-forward block, GPT-NeoX's ungated
/// exact-GELU block, side by side with the attention, each over its own norm, where the
/// required `gptneox.use_parallel_residual` says (llama.cpp computes GELU's tanh
/// approximation for it; Pythia's, transformers', is exact, GPT-NeoX-20B's `gelu_fast`
/// its tanh form, which a file does not tell apart), GPT-2's and GPT-BigCode's
/// (`starcoder`) learned positions (`position_embd`) and ungated GELU blocks, Falcon's
/// ungated exact-GELU block side by side with the attention, over one norm, or each over
/// its own where the file has `attn_norm_2` (Falcon 40B's; llama.cpp computes GELU's tanh
/// approximation for it too); their biases as [`read_biases`] finds them. (StableLM 2
/// 12B's per-head q/k LayerNorms, `attn_q_norm` and `attn_k_norm`, are read with the
/// other families' q/k norms, in [`model`].)
fn apply_layer_norms(
    g: &GgufFile,
    arch: &str,
    weights: &Weights,
    c: &mut ModelConfig,
) -> Result<(), String> {
    let key = format!("{arch}.attention.layer_norm_epsilon");
    c.norm_eps = g
        .positive(&key)?
        .ok_or_else(|| format!("missing metadata `{key}`"))?;
    c.norm = Norm::BiasedLayer;
    read_biases(weights, c);
    let has = |name: &str| weights.weight_shape(name).is_some();
    c.blocks = match arch {
        "phi2" => Blocks::ParallelSharedNorm,
        "stablelm" if !has("layers.0.ffn_norm.weight") => Blocks::ParallelSharedNorm,
        "gptneox" if g.boolean("gptneox.use_parallel_residual")? => Blocks::Parallel,
        "falcon" if has("layers.0.ffn_norm.weight") => Blocks::Parallel,
        "falcon" => Blocks::ParallelSharedNorm,
        _ => Blocks::Sequential,
    };
    c.learned_positions = matches!(arch, "gpt2" | "starcoder");
    if arch != "stablelm" {
        c.feed_forward = FeedForward::Ungated;
        c.activation = match arch {
            "gptneox" | "falcon" => Activation::Gelu,
            _ => Activation::GeluTanh,
        };
    }
    Ok(())
}

/// The biases of a file whose projections may add them (the LayerNorm architectures', and
/// llama's, which llama.cpp reads where a file has them): which projections do is read
/// from the first layer's tensors (`attn_q`'s or `attn_qkv`'s, `attn_output`'s, `ffn_up`'s)
/// and the classifier's (`output.bias`); every layer must then have them (a missing one
/// is an error naming it, [`crate::model::check_weights`]).
fn read_biases(weights: &Weights, c: &mut ModelConfig) {
    let has = |name: &str| weights.weight_shape(name).is_some();
    c.attention_bias = AttentionBias {
        qkv: has("layers.0.attention.wq.bias") || has(&format!("layers.0.{FUSED_QKV_BIAS}")),
        output: has("layers.0.attention.wo.bias"),
    };
    c.ffn_bias = has("layers.0.feed_forward.w3.bias");
    c.classifier_bias = has("output.bias");
}

/// gpt-oss's settings, as llama.cpp reads them: an attention sink a head
/// (`blk.N.attn_sinks`) and local attention over `gpt-oss.attention.sliding_window`
/// positions in every other layer, from the first (its `swa_pattern` of 2); the biases
/// and experts are read with the other files' ([`read_biases`], [`apply_experts`]).
fn apply_gpt_oss(g: &GgufFile, c: &mut ModelConfig) -> Result<(), String> {
    c.attention_sinks = true;
    let window = g.int("gpt-oss.attention.sliding_window")?;
    c.local_attention = Some(LocalAttention::periodic(window, c.layers, 2, None));
    Ok(())
}

/// DeepSeek V2's and V3's settings (`deepseek2` files), as llama.cpp reads them: latent
/// attention (`attention.q_lora_rank`, absent or 0 for direct queries, `attn_q`;
/// `attention.kv_lora_rank`; RoPE over `rope.dimension_count` features; the heads'
/// widths under `attention.key_length_mla` and `value_length_mla` where the file has
/// both, else `attention.key_length` and `value_length`; `attn_kv_b` cut per head, or
/// `attn_k_b` and `attn_v_b` as they are), RoPE over neighbouring pairs, the scores
/// scaled by `1 / sqrt(key length)` times `(1 + rope.scaling.yarn_log_multiplier *
/// ln(rope.scaling.factor))` squared; the experts' `expert_shared_count` shared ones (one
/// ungated block), weights by a softmax (`expert_gating_func` 1, 0 or absent: V2's) or
/// by sigmoids chosen with `exp_probs_b` (2, V3's; other values refused), divided by
/// their sum where `expert_weights_norm`, times `expert_weights_scale`, within
/// `expert_group_used_count` of `expert_group_count` groups scored by their two best
/// where a file has them (as llama.cpp scores them for V2's files too, whose own groups
/// are scored by their best); the layers without a router dense (llama.cpp's
/// `leading_dense_block_count` first ones, not read: the tensors tell). Counts of 0 are
/// none.
fn apply_deepseek2(g: &GgufFile, weights: &mut Weights, c: &mut ModelConfig) -> Result<(), String> {
    let key = |k: &str| format!("deepseek2.{k}");
    let int = |k: &str| g.int(&key(k));
    // A count of 0 (llama.cpp's converter writes some so) is none.
    let optional = |k: &str| match g.meta(&key(k)) {
        None => Ok(None),
        Some(m) if m.as_u64() == Some(0) => Ok(None),
        Some(_) => g.int(&key(k)).map(Some),
    };
    let rope = int("rope.dimension_count")?;
    // Files written since llama.cpp caches the latent give the heads' widths under
    // `_mla` keys (`key_length` then being the latent's and the RoPE key's).
    let mla = g.meta(&key("attention.key_length_mla")).is_some()
        && g.meta(&key("attention.value_length_mla")).is_some();
    let (heads_key, values_key) = match mla {
        true => ("attention.key_length_mla", "attention.value_length_mla"),
        false => ("attention.key_length", "attention.value_length"),
    };
    let width = int(heads_key)?;
    let latent = LatentAttention {
        q_rank: optional("attention.q_lora_rank")?,
        kv_rank: int("attention.kv_lora_rank")?,
        nope: width.checked_sub(rope).ok_or_else(|| {
            format!(
                "{} ({width}) is less than RoPE's {rope} features",
                key(heads_key)
            )
        })?,
        rope,
        value: int(values_key)?,
        // llama.cpp normalizes the latents with the file's epsilon.
        norm_eps: c.norm_eps,
    };
    // The cache's one head: the latent and the RoPE key.
    c.explicit_head_dim = Some(latent.kv_rank + rope);
    c.rotary_dim = Some(rope);
    c.kv_heads = 1;
    c.rope_half = false;
    c.latent_attention = Some(latent);
    let factor = g.float(&key("rope.scaling.factor")).unwrap_or(1.0);
    let log_multiplier = g
        .float(&key("rope.scaling.yarn_log_multiplier"))
        .unwrap_or(0.0);
    let yarn = matches!(g.meta(&key("rope.scaling.type")), Some(Meta::Str(t)) if t == "yarn");
    let m = if yarn {
        crate::rope_scaling::yarn_magnitude(factor, log_multiplier)
    } else {
        1.0
    };
    if !(m.is_finite() && m > 0.0) {
        return Err(format!(
            "{} gives the scores a scale factor of {m}",
            key("rope.scaling.yarn_log_multiplier")
        ));
    }
    c.attention_scale = Some((width as f64).powf(-0.5) * m * m);
    if let Some(experts) = c.experts.as_mut() {
        let shared = optional("expert_shared_count")?.unwrap_or(0);
        experts.shared = (shared > 0)
            .then(|| experts.hidden.checked_mul(shared))
            .flatten()
            .map(|hidden| SharedExpert {
                hidden,
                gated: false,
            });
        experts.normalize = match g.meta(&key("expert_weights_norm")) {
            Some(_) => g.boolean(&key("expert_weights_norm"))?,
            None => false,
        };
        let sigmoid = match optional("expert_gating_func")? {
            // Absent or 0 is V2's softmax, as llama.cpp reads older files.
            None | Some(1) => false,
            Some(2) => true,
            Some(other) => {
                return Err(format!(
                    "{} = {other}: only the softmax (1) and sigmoid (2) gating are supported",
                    key("expert_gating_func")
                ));
            }
        };
        experts.scoring = match sigmoid {
            true => ExpertScoring::Sigmoid {
                selection_bias: weights
                    .weight_shape(&format!(
                        "layers.{}.{ROUTER_SELECTION_BIAS}",
                        c.layers.saturating_sub(1)
                    ))
                    .is_some(),
            },
            false => ExpertScoring::Softmax,
        };
        experts.scale = g.positive(&key("expert_weights_scale"))?.unwrap_or(1.0);
        experts.groups = match (
            optional("expert_group_count")?,
            optional("expert_group_used_count")?,
        ) {
            (Some(count), Some(chosen)) => ExpertGroups::limiting(count, chosen, 2),
            _ => None,
        };
    }
    hf_deepseek::split_keys_and_values(c, weights)
}

/// Granite's scales (`granite` and `granitemoe` files, `arch`), as llama.cpp reads them:
/// `granite.embedding_scale` multiplies the embeddings, `granite.residual_scale` each
/// block's output before its residual add and `granite.attention.scale` scales the
/// attention scores, each where the file gives it (llama.cpp's converter writes each the
/// config has), and the required `granite.logit_scale` divides the logits
/// ([`reciprocal`]).
fn apply_granite(g: &GgufFile, arch: &str, c: &mut ModelConfig) -> Result<(), String> {
    let key = |k: &str| format!("{arch}.{k}");
    c.embedding_scale = g.positive(&key("embedding_scale"))?;
    c.residual_scale = g.positive(&key("residual_scale"))?;
    c.attention_scale = g.positive(&key("attention.scale"))?;
    let logit = g
        .positive(&key("logit_scale"))?
        .ok_or_else(|| format!("missing metadata `{}`", key("logit_scale")))?;
    c.logit_scale = Some(reciprocal(logit));
    Ok(())
}

/// Gemma 2's and 3's settings, as llama.cpp reads them: sandwich norms
/// (`blk.N.post_attention_norm`, `post_ffw_norm`); the query scale by llama.cpp's rule
/// (`1 / sqrt(key_length)`, but `1 / sqrt(embedding_length / head_count)` for the 27B
/// models, which are the ones of 46 (Gemma 2) or 62 (Gemma 3) layers: their
/// `query_pre_attn_scalar`), unless the file has `ARCH.attention.scale` (a key llama.cpp
/// reads for other architectures; this loader's extension for Gemma, for a scalar the rule
/// does not give); the soft-caps `ARCH.attn_logit_softcapping` and
/// `ARCH.final_logit_softcapping` (Gemma 2's default 50 and 30); and local attention over
/// `ARCH.attention.sliding_window` positions (Gemma 2's default 4096, as llama.cpp's, for
/// early files without the key) in every other layer (Gemma 2, the even ones) or five of
/// every six (Gemma 3, whose local layers' RoPE has base 10000, unscaled).
fn apply_gemma(g: &GgufFile, arch: &str, c: &mut ModelConfig) -> Result<(), String> {
    let key = |k: &str| format!("{arch}.{k}");
    let gemma2 = arch == "gemma2";
    let positive = |k: &str, default: Option<f64>| g.positive(&key(k)).map(|v| v.or(default));
    let large = c.layers == if gemma2 { 46 } else { 62 };
    let scalar = if large {
        (c.dim / c.heads) as f64
    } else {
        c.head_dim() as f64
    };
    c.post_norms = true;
    c.attention_scale = positive("attention.scale", Some(scalar.powf(-0.5)))?;
    c.attention_softcap = positive("attn_logit_softcapping", gemma2.then_some(50.0))?;
    c.logit_softcap = positive("final_logit_softcapping", gemma2.then_some(30.0))?;
    let (period, rope_theta) = if gemma2 {
        (2, None)
    } else {
        (6, Some(10000.0))
    };
    let window = match g.meta(&key("attention.sliding_window")) {
        None if gemma2 => 4096,
        _ => g.int(&key("attention.sliding_window"))?,
    };
    c.local_attention = Some(LocalAttention::periodic(
        window, c.layers, period, rope_theta,
    ));
    Ok(())
}

/// RoPE's scaling as llama.cpp reads it for a model configured as `c` (`ARCH.rope.*`; the
/// linear factor `rope.scaling.factor`, or the older `rope.scale_linear`): a factor
/// divides positions when `rope.scaling.type` is `linear` or absent; `yarn` makes it
/// YaRN's ([`Yarn`], over `rope.scaling.original_context_length`, by default the
/// context length, with the ramp's ends `rope.scaling.yarn_beta_fast` and
/// `yarn_beta_slow`, by default 32 and 1, and an attention factor of `1 + 0.1 ln(factor)`,
/// or [`Yarn::mscale`] over `rope.scaling.yarn_log_multiplier` where the file gives one
/// other than 0); `longrope` divides positions by the factor too, as llama.cpp does.
/// LongRoPE's factor sets come as the tensors `rope_factors_long.weight` and
/// `rope_factors_short.weight` (taken out of `weights`): unless the file has
/// `rope_freqs.weight`, which llama.cpp takes instead, the one [`longrope_uses_long`]
/// picks becomes it. Any type scales the rotation by `rope.scaling.attn_factor`
/// (LongRoPE's attention factor in Phi-3's files); Llama 3's frequency factors are the
/// tensor `rope_freqs.weight`, which YaRN's multiply. Factors are one a rotated pair
/// ([`ModelConfig::rotary`]). A factor with the type `none`, other types and a
/// `rope.scaling.yarn_ext_factor` other than 1 are refused: the builder would compute
/// another model than the file describes.
fn rope_scaling(
    g: &GgufFile,
    arch: &str,
    c: &ModelConfig,
    weights: &mut Weights,
) -> Result<RopeScaling, String> {
    let key = |k: &str| format!("{arch}.{k}");
    let rotary = c.rotary();
    let positive = |k: &str| g.positive(&key(k));
    let factor = g
        .float(&key("rope.scaling.factor"))
        .or_else(|| g.float(&key("rope.scale_linear")))
        .unwrap_or(1.0);
    if !(factor.is_finite() && factor > 0.0) {
        return Err(format!("the RoPE scaling factor {factor} is not positive"));
    }
    let mscale = positive("rope.scaling.attn_factor")?.unwrap_or(1.0);
    let original = match g.meta(&key("rope.scaling.original_context_length")) {
        None => c.seq_len as f64,
        Some(_) => g.int(&key("rope.scaling.original_context_length"))? as f64,
    };
    if original < 2.0 {
        return Err(format!(
            "the original context of {original} positions is too short to scale"
        ));
    }
    let kind = match g.meta(&key("rope.scaling.type")) {
        None => "linear",
        Some(Meta::Str(kind)) => kind.as_str(),
        Some(other) => {
            return Err(format!(
                "{} is {other:?}, not a string",
                key("rope.scaling.type")
            ));
        }
    };
    let rope = match kind {
        "linear" | "longrope" => RopeScaling {
            linear: factor,
            factors: None,
            mscale,
        },
        "none" if factor == 1.0 => RopeScaling {
            mscale,
            ..RopeScaling::NONE
        },
        "none" => {
            return Err(format!(
                "{arch}.rope.scaling.type is none, but the scaling factor is {factor}"
            ));
        }
        "yarn" => {
            let betas = (
                positive("rope.scaling.yarn_beta_fast")?,
                positive("rope.scaling.yarn_beta_slow")?,
            );
            // gpt-oss's own RoPE does not round YaRN's ramp out to whole pairs (its
            // `truncate` false; llama.cpp rounds it for every model).
            let yarn = Yarn::new(factor, original, betas, arch != "gpt-oss")?;
            if let Some(ext) = g.meta(&key("rope.scaling.yarn_ext_factor"))
                && g.float(&key("rope.scaling.yarn_ext_factor")) != Some(1.0)
            {
                return Err(format!(
                    "{arch}.rope.scaling.yarn_ext_factor is {ext:?}; only YaRN's full blend (1) is supported"
                ));
            }
            // 0, llama.cpp's converter's value for none, is none.
            let log_multiplier = match g.float(&key("rope.scaling.yarn_log_multiplier")) {
                Some(v) if v.is_finite() && v >= 0.0 => v,
                None if g.meta(&key("rope.scaling.yarn_log_multiplier")).is_none() => 0.0,
                _ => {
                    return Err(format!(
                        "metadata `{}` is not a number of at least 0",
                        key("rope.scaling.yarn_log_multiplier")
                    ));
                }
            };
            RopeScaling {
                linear: 1.0,
                factors: Some(yarn.factors(c.rope_theta, rotary)),
                mscale: mscale * yarn.mscale(1.0, log_multiplier),
            }
        }
        other => {
            return Err(format!(
                "{arch}.rope.scaling.type is {other:?}; unscaled, linear, yarn and longrope RoPE are supported"
            ));
        }
    };
    let [long, short] = LONGROPE_FACTORS.map(|name| weights.remove(name));
    if (long.is_some() || short.is_some()) && weights.weight_shape(ROPE_FREQS).is_none() {
        let (chosen, name) = match longrope_uses_long(c.seq_len, original) {
            true => (long, LONGROPE_FACTORS[0]),
            false => (short, LONGROPE_FACTORS[1]),
        };
        let chosen = chosen.ok_or_else(|| {
            format!(
                "tensor `{name}` is missing: a context of {} positions over {original} uses it",
                c.seq_len
            )
        })?;
        set_factors(weights, pair_factors(&chosen, name, rotary / 2)?);
    }
    Ok(rope)
}

/// The features of each head of `head_dim` that RoPE rotates where that is not all:
/// `ARCH.rope.dimension_count` (Phi-4-mini's 96 of 128), a positive number of whole
/// pairs. Files whose q and k rows llama.cpp's converter reordered for interleaved pairs
/// ([`reordered_rope`], for whole heads) are refused it, as llama.cpp refuses it in
/// `llama` files; GLM's, whose pairs are interleaved in the checkpoint, rotate part of
/// each head.
fn rotary_dim(g: &GgufFile, arch: &str, head_dim: usize) -> Result<Option<usize>, String> {
    let key = format!("{arch}.rope.dimension_count");
    if g.meta(&key).is_none() {
        return Ok(None);
    }
    let rotary = g.int(&key)?;
    if rotary == head_dim {
        return Ok(None);
    }
    if reordered_rope(arch) || rotary > head_dim || !rotary.is_multiple_of(2) {
        return Err(format!(
            "{key} is {rotary}: RoPE over part of a head of {head_dim} is taken in whole pairs, and not in files whose q and k rows were reordered for interleaved pairs"
        ));
    }
    Ok(Some(rotary))
}

/// The head size `ARCH.attention.key_length` gives where it is not the width over the
/// heads (Qwen3's); a `value_length` other than it is refused.
fn explicit_head_dim(
    g: &GgufFile,
    arch: &str,
    dim: usize,
    heads: usize,
) -> Result<Option<usize>, String> {
    let key = format!("{arch}.attention.key_length");
    if g.meta(&key).is_none() {
        return Ok(None);
    }
    let head_dim = g.int(&key)?;
    let value = format!("{arch}.attention.value_length");
    if g.meta(&value).is_some() && g.int(&value)? != head_dim {
        return Err(format!(
            "{value} differs from {key} ({head_dim}): keys and values of other sizes are not supported"
        ));
    }
    Ok(uneven_head_dim(head_dim, dim, heads))
}

/// Reads a llama GGUF model from its bytes.
pub fn read(bytes: &[u8]) -> Result<GgufModel, String> {
    read_parts(&[bytes], &mut |_| {}).map_err(|(_, message)| message)
}

/// Reads a llama GGUF model from the bytes of its files: one file, or every part of a
/// split model in order (the metadata in the first, each part's tensors in it), reporting
/// the fraction of tensors read to `progress`. No parts, parts that do not number
/// themselves `0..parts.len()` of as many (`split.no`, `split.count`), that hold other
/// than `split.tensors.count` tensors in all, or that repeat a tensor are errors; an error
/// comes with the index of the part it concerns.
pub fn read_parts(
    parts: &[&[u8]],
    progress: &mut dyn FnMut(f64),
) -> Result<GgufModel, (usize, String)> {
    let files = parts
        .iter()
        .enumerate()
        .map(|(i, bytes)| parse(bytes).map_err(|e| (i, e)))
        .collect::<Result<Vec<_>, _>>()?;
    read_files(files, parts, progress)
}

/// [`read_parts`] of the parsed `files` whose bytes are `parts`.
fn read_files(
    files: Vec<GgufFile>,
    parts: &[&[u8]],
    progress: &mut dyn FnMut(f64),
) -> Result<GgufModel, (usize, String)> {
    if files.is_empty() {
        return Err((0, "no GGUF file to read".into()));
    }
    for (i, file) in files.iter().enumerate() {
        let (part, count) = split_part(file, i > 0).map_err(|e| (i, e))?;
        if (part, count) == (i, files.len()) {
            continue;
        }
        let message = if files.len() == 1 {
            format!(
                "part {} of a model split in {count} files: load its first part by its file name, beside the other {}",
                part + 1,
                count - 1
            )
        } else {
            format!(
                "part {} of a model split in {count} files, read as part {} of {}",
                part + 1,
                i + 1,
                files.len()
            )
        };
        return Err((i, message));
    }
    let total: usize = files.iter().map(|f| f.tensors.len()).sum();
    if files.len() > 1 {
        let stated = files[0].int("split.tensors.count").map_err(|e| (0, e))?;
        if stated != total {
            return Err((
                0,
                format!(
                    "split.tensors.count = {stated}, but the {} parts hold {total} tensors",
                    files.len()
                ),
            ));
        }
    }
    let g = &files[0];
    let arch = architecture(g).map_err(|e| (0, e))?;
    let mut weights = Weights::default();
    let mut read = 0;
    for (part, (file, bytes)) in files.iter().zip(parts).enumerate() {
        for info in &file.tensors {
            progress(read as f64 / total as f64);
            read += 1;
            let name = weight_name(&info.name, arch).ok_or_else(|| {
                (
                    part,
                    format!("tensor `{}` is not part of a {arch} model", info.name),
                )
            })?;
            if weights.weight_shape(&name).is_some() {
                return Err((part, format!("tensor `{}` appears twice", info.name)));
            }
            weights.insert(name, file.tensor(bytes, info).map_err(|e| (part, e))?);
        }
    }
    model(g, arch, weights).map_err(|e| (0, e))
}

/// The model's architecture (`general.architecture`), one of [`ARCHITECTURES`] or
/// [`LAYER_NORM_ARCHITECTURES`].
fn architecture(g: &GgufFile) -> Result<&str, String> {
    match g.meta("general.architecture") {
        Some(Meta::Str(a)) if every_architecture().any(|s| s == a) => Ok(a.as_str()),
        other => Err(format!(
            "general.architecture is {other:?}, but only {} models are supported",
            every_architecture().collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Every architecture read: [`ARCHITECTURES`], then [`LAYER_NORM_ARCHITECTURES`].
fn every_architecture() -> impl Iterator<Item = &'static str> {
    ARCHITECTURES
        .iter()
        .chain(&LAYER_NORM_ARCHITECTURES)
        .copied()
}

/// The experts of a mixture-of-experts file (`{arch}.expert_count` of them, none where it
/// is absent or 0; `qwen3moe`, `qwen2moe`, `olmoe`, `granitemoe`, `dbrx` and `gpt-oss`
/// files must have them): `expert_used_count` a
/// token, each of `expert_feed_forward_length` (Qwen3-MoE's key) or else, as llama.cpp
/// reads them, `feed_forward_length` over the experts a token runs (`qwen3moe`,
/// `qwen2moe`) or `feed_forward_length`, in the layers that have a router (`ffn_gate_inp`: llama.cpp
/// routes every layer, the builder also a file whose some layers are dense). The chosen
/// experts' weights are renormalized as llama.cpp does for the architecture (`llama`'s,
/// Mixtral's, and `qwen3moe`'s, not `olmoe`'s or `qwen2moe`'s) unless
/// `expert_weights_norm` says. A `qwen2moe` file's shared expert
/// (`ffn_{gate,up,down}_shexp`, its gate `ffn_gate_inp_shexp`) is
/// `expert_shared_feed_forward_length` wide, else `feed_forward_length`; a `granitemoe`
/// file's (Granite-MoE-Shared's) is that wide where the key is given and not 0, and has
/// no gate. A `gpt-oss` file's router and experts add biases, and its experts' gate and
/// up projections meet in the clamped SwiGLU of gain 1.702 and limit 7, the constants
/// llama.cpp fixes for it.
fn apply_experts(
    g: &GgufFile,
    arch: &str,
    weights: &mut Weights,
    c: &mut ModelConfig,
) -> Result<(), String> {
    let key = |k: &str| format!("{arch}.{k}");
    let count = match g.meta(&key("expert_count")) {
        None => 0,
        Some(m) if m.as_u64() == Some(0) => 0,
        Some(_) => g.int(&key("expert_count"))?,
    };
    if count == 0 {
        return match arch {
            "qwen3moe" | "qwen2moe" | "olmoe" | "granitemoe" | "dbrx" | "gpt-oss" => Err(format!(
                "metadata `{}` is missing or 0",
                key("expert_count")
            )),
            _ => Ok(()),
        };
    }
    let per_token = g.int(&key("expert_used_count"))?;
    // Where the widths are not given, llama.cpp's: the Qwen MoEs' experts share the dense
    // width among the experts a token runs, and a shared expert takes all of it.
    let hidden = match g.meta(&key("expert_feed_forward_length")) {
        Some(_) => g.int(&key("expert_feed_forward_length"))?,
        None if matches!(arch, "qwen3moe" | "qwen2moe") => c.hidden_dim / per_token,
        None => c.hidden_dim,
    };
    let normalize = match g.meta(&key("expert_weights_norm")) {
        Some(_) => g.boolean(&key("expert_weights_norm"))?,
        None => !matches!(arch, "olmoe" | "qwen2moe"),
    };
    // Qwen2-MoE's shared expert is gated, Granite-MoE-Shared's not (nor has it a gate).
    let shared_width = match g.meta(&key("expert_shared_feed_forward_length")) {
        Some(_) => Some(g.int(&key("expert_shared_feed_forward_length"))?),
        None if arch == "qwen2moe" => Some(c.hidden_dim),
        None => None,
    };
    // A width of 0 is no shared expert (as Granite-MoE-Shared's config means it).
    let shared = shared_width.filter(|&w| w > 0).map(|hidden| SharedExpert {
        hidden,
        gated: arch == "qwen2moe",
    });
    // llama.cpp reads the shared expert's gate as a vector; the builder multiplies by it
    // as a matrix of one row.
    for l in 0..c.layers {
        let gate = format!("layers.{l}.{SHARED_GATE}");
        if weights.weight_shape(&gate) == Some(vec![c.dim]) {
            weights.reshape(&gate, vec![1, c.dim])?;
        }
    }
    c.experts = Some(Experts {
        count,
        per_token,
        hidden,
        normalize,
        layers: (0..c.layers)
            .map(|l| {
                weights
                    .weight_shape(&format!("layers.{l}.{ROUTER}"))
                    .is_some()
            })
            .collect(),
        shared,
        scoring: ExpertScoring::Softmax,
        groups: None,
        scale: 1.0,
        biases: arch == "gpt-oss",
        glu: match arch {
            "gpt-oss" => ExpertGlu::ClampedSwiglu {
                alpha: 1.702,
                limit: 7.0,
            },
            _ => ExpertGlu::Gated,
        },
    });
    Ok(())
}

/// The model of architecture `arch` whose metadata is `g`'s and whose tensors are
/// `weights` (under the builder's names).
fn model(g: &GgufFile, arch: &str, mut weights: Weights) -> Result<GgufModel, String> {
    let qwen2 = matches!(arch, "qwen2" | "qwen2moe");
    let sandwich = matches!(arch, "gemma2" | "gemma3");
    let tokenizer = crate::gguf_vocab::vocab(g)?;
    let key = |k: &str| format!("{arch}.{k}");
    let dim = g.int(&key("embedding_length"))?;
    let heads = g.int(&key("attention.head_count"))?;
    let kv_heads = g
        .meta(&key("attention.head_count_kv"))
        .map_or(Ok(heads), |_| g.int(&key("attention.head_count_kv")))?;
    if heads == 0 || kv_heads == 0 {
        return Err("head counts must be positive".into());
    }
    let vocab = match weights.weight_shape("tok_embeddings.weight") {
        Some(s) if s.len() == 2 && s[1] == dim => s[0],
        other => {
            return Err(format!(
                "token_embd.weight has shape {other:?}, expected [vocab, {dim}]"
            ));
        }
    };
    let gemma = arch.starts_with("gemma");
    let mut config = ModelConfig {
        dim,
        hidden_dim: g.int(&key("feed_forward_length"))?,
        layers: g.int(&key("block_count"))?,
        heads,
        kv_heads,
        vocab,
        seq_len: g.int(&key("context_length"))?,
        rope_theta: g.float(&key("rope.freq_base")).unwrap_or(10000.0),
        // Cohere's LayerNorms take theirs in `apply_cohere`.
        norm_eps: g
            .float(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        tied_classifier: weights.weight_shape("output.weight").is_none(),
        rope_half: !interleaved_rope(arch),
        // Gemma 2's and 3's, Cohere 2's and gpt-oss's window is their local layers'.
        sliding_window: match g.meta(&key("attention.sliding_window")) {
            Some(_) if !sandwich && !matches!(arch, "cohere2" | "gpt-oss") => {
                Some(g.int(&key("attention.sliding_window"))?)
            }
            _ => None,
        },
        attention_bias: AttentionBias {
            qkv: qwen2,
            output: false,
        },
        // DeepSeek's heads are latent attention's (`apply_deepseek2`).
        explicit_head_dim: match arch {
            "deepseek2" => None,
            _ => explicit_head_dim(g, arch, dim, heads)?,
        },
        qk_norm: match arch {
            "qwen3" | "qwen3moe" | "gemma3" => QkNorm::Heads,
            "olmo2" | "olmoe" => QkNorm::Projections,
            // Command R+'s and StableLM 2 12B's LayerNorm of each head, `[heads, head_dim]`
            // weights, where the file has them.
            "command-r" | "stablelm"
                if weights
                    .weight_shape("layers.0.attention.q_norm.weight")
                    .is_some() =>
            {
                QkNorm::LayerHeads
            }
            _ => QkNorm::None,
        },
        pre_norms: arch != "olmo2",
        activation: match gemma {
            true => Activation::GeluTanh,
            false => Activation::Silu,
        },
        scale_embeddings: gemma,
        post_norms: matches!(arch, "olmo2" | "glm4"),
        ..ModelConfig::default()
    };
    crate::model::check_layer_count(&config, &weights)?;
    let sections = key("rope.dimension_sections");
    if g.meta(&sections).is_some() {
        // GLM-4.1V's and Qwen2-VL's rotation of each head's sections by separate
        // positions (llama.cpp's M-RoPE) would be computed as plain RoPE.
        return Err(format!(
            "metadata `{sections}`: RoPE over sections of each head (M-RoPE) is not supported"
        ));
    }
    if sandwich {
        apply_gemma(g, arch, &mut config)?;
    }
    if matches!(arch, "granite" | "granitemoe") {
        apply_granite(g, arch, &mut config)?;
    }
    if matches!(arch, "command-r" | "cohere2") {
        apply_cohere(g, arch, &mut config)?;
    }
    if arch == "dbrx" {
        // LayerNorms without bias.
        config.norm = Norm::Layer;
        config.norm_eps = g
            .positive(&key("attention.layer_norm_epsilon"))?
            .unwrap_or(1e-5);
    }
    if matches!(arch, "olmo" | "olmoe" | "dbrx") {
        // q, k and v clamped, as llama.cpp's converter writes `clip_qkv`.
        config.clip_qkv = g.positive(&key("attention.clamp_kqv"))?;
    }
    if arch == "olmo" {
        // LayerNorms of neither weight nor bias.
        config.norm = Norm::Unit;
        config.norm_eps = g
            .positive("olmo.attention.layer_norm_epsilon")?
            .unwrap_or(1e-5);
    }
    if LAYER_NORM_ARCHITECTURES.contains(&arch) {
        apply_layer_norms(g, arch, &weights, &mut config)?;
    }
    // GLM-4-0414's q, k and v biases where the file has them (`attention_bias`, its
    // default), as llama's.
    if matches!(arch, "llama" | "glm4" | "gpt-oss") {
        read_biases(&weights, &mut config);
    }
    apply_experts(g, arch, &mut weights, &mut config)?;
    // Early Mixtral files' experts, one tensor each, stacked as the others store them.
    crate::hf_moe::stack_experts(&config, &mut weights)?;
    if arch == "gpt-oss" {
        apply_gpt_oss(g, &mut config)?;
    }
    if arch == "smollm3" {
        // llama.cpp's fixed step, with no metadata for it.
        config.nope_layers = Some(every_nth_layer(config.layers, 4));
    }
    // DeepSeek's heads and RoPE features are latent attention's (`apply_deepseek2`).
    if arch == "deepseek2" {
        apply_deepseek2(g, &mut weights, &mut config)?;
    } else {
        config.rotary_dim = rotary_dim(g, arch, config.head_dim())?;
    }
    let rope = rope_scaling(g, arch, &config, &mut weights)?;
    if rope.mscale != 1.0
        && config
            .local_attention
            .as_ref()
            .is_some_and(|l| l.rope_theta.is_some())
    {
        // llama.cpp scales every layer's rotation; the builder leaves a local layer's
        // RoPE of its own base unscaled (Hugging Face's rule).
        return Err(format!(
            "a RoPE attention factor ({}) with local layers of their own RoPE base is not supported",
            rope.mscale
        ));
    }
    let config = ModelConfig {
        rope_scaling: rope.linear,
        rope_freq_factors: rope.add_factors(&mut weights)?,
        // llama.cpp cancels YaRN's magnitude for DeepSeek (its `attn_factor_scaled`), as
        // DeepSeek's `mscale` and `mscale_all_dim` cancel in Hugging Face's.
        rope_mscale: if arch == "deepseek2" {
            1.0
        } else {
            rope.mscale
        },
        ..config
    };
    config.validate()?;
    split_fused_weights(&config, &mut weights)?;
    crate::model::check_every_weight_read(&config, &weights)?;
    Ok(GgufModel {
        config,
        weights,
        tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `metadata` only.
    fn file(metadata: &[(&str, Meta)]) -> GgufFile {
        GgufFile {
            version: 3,
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            tensors: Vec::new(),
            data_start: 0,
        }
    }

    /// The scaling of a model of heads of 8 (base 10000, 64 positions) read from `f`.
    fn scaling(f: &GgufFile, weights: &mut Weights) -> Result<RopeScaling, String> {
        let config = ModelConfig::llama2c(8, 16, 1, 1, 1, 32, 64);
        rope_scaling(f, "llama", &config, weights)
    }

    /// Linear scaling comes from `llama.rope.scaling.factor` (or the older
    /// `llama.rope.scale_linear`); a factor typed `none` and unknown scaling types are
    /// refused.
    #[test]
    fn rope_settings_are_read_or_refused() {
        let kind = |kind: &str| Meta::Str(kind.to_string());
        let linear = |f: &GgufFile| scaling(f, &mut Weights::default()).map(|r| r.linear);
        assert_eq!(
            scaling(&file(&[]), &mut Weights::default()),
            Ok(RopeScaling::NONE)
        );
        let scaled = file(&[
            ("llama.rope.scaling.type", kind("linear")),
            ("llama.rope.scaling.factor", Meta::Float(4.0)),
        ]);
        assert_eq!(linear(&scaled), Ok(4.0));
        let legacy = file(&[("llama.rope.scale_linear", Meta::Float(2.0))]);
        assert_eq!(linear(&legacy), Ok(2.0));
        let none = file(&[("llama.rope.scaling.type", kind("none"))]);
        assert_eq!(linear(&none), Ok(1.0));
        // Without a type, a factor scales linearly (llama.cpp's default type).
        let untyped = file(&[("llama.rope.scaling.factor", Meta::Float(8.0))]);
        assert_eq!(linear(&untyped), Ok(8.0));
        let refused = [
            (
                file(&[("llama.rope.scaling.type", kind("ntk"))]),
                "llama.rope.scaling.type is \"ntk\"; unscaled, linear, yarn and longrope RoPE are supported",
            ),
            (
                file(&[
                    ("llama.rope.scaling.type", kind("none")),
                    ("llama.rope.scaling.factor", Meta::Float(2.0)),
                ]),
                "llama.rope.scaling.type is none, but the scaling factor is 2",
            ),
            (
                file(&[("llama.rope.scale_linear", Meta::Float(0.0))]),
                "the RoPE scaling factor 0 is not positive",
            ),
            (
                file(&[("llama.rope.scaling.attn_factor", Meta::Float(-1.0))]),
                "metadata `llama.rope.scaling.attn_factor` is not a positive number",
            ),
        ];
        for (f, message) in refused {
            let err = linear(&f).expect_err(message);
            assert!(err.contains(message), "{err}");
        }
        // Llama 3's factors are a tensor of the model.
        assert_eq!(
            weight_name("rope_freqs.weight", "llama").as_deref(),
            Some(ROPE_FREQS)
        );
    }

    /// Partial rotation: `rope.dimension_count` below the head size, in whole pairs, not in
    /// `llama` files (as llama.cpp reads them).
    #[test]
    fn rotary_dims_are_read_or_refused() {
        let count = |arch: &str, n: u64| {
            let key = format!("{arch}.rope.dimension_count");
            let f = file(&[(key.as_str(), Meta::Uint(n))]);
            rotary_dim(&f, arch, 8)
        };
        assert_eq!(rotary_dim(&file(&[]), "phi3", 8), Ok(None));
        assert_eq!(count("phi3", 8), Ok(None));
        assert_eq!(count("phi3", 6), Ok(Some(6)));
        assert_eq!(count("llama", 8), Ok(None));
        // GLM's pairs are interleaved in the checkpoint: part of each head rotates.
        assert_eq!(count("glm4", 4), Ok(Some(4)));
        for (arch, n) in [("llama", 4), ("granite", 4), ("phi3", 5), ("phi3", 10)] {
            let err = count(arch, n).unwrap_err();
            assert!(err.contains("part of a head of 8"), "{arch} {n}: {err}");
        }
    }

    /// YaRN's factors and attention factor, from the file's original context and the
    /// defaults llama.cpp takes for the rest, times the file's `attn_factor`.
    #[test]
    fn yarn_scaling_is_read_as_llama_cpp_reads_it() {
        let yarn = |extra: &[(&str, Meta)]| {
            let mut metadata = vec![
                ("llama.rope.scaling.type", Meta::Str("yarn".into())),
                ("llama.rope.scaling.factor", Meta::Float(4.0)),
                ("llama.rope.scaling.original_context_length", Meta::Uint(16)),
            ];
            metadata.extend_from_slice(extra);
            scaling(&file(&metadata), &mut Weights::default()).expect("yarn")
        };
        let expected = Yarn::new(4.0, 16.0, (None, None), true).expect("yarn");
        let m = 1.0 + 0.1 * 4f64.ln();
        let plain = yarn(&[]);
        assert_eq!(plain.linear, 1.0);
        assert_eq!(plain.factors, Some(expected.factors(10000.0, 8)));
        assert!((plain.mscale - m).abs() < 1e-12);
        let doubled = yarn(&[("llama.rope.scaling.attn_factor", Meta::Float(2.0))]);
        assert!((doubled.mscale - 2.0 * m).abs() < 1e-12);
        let logged = yarn(&[("llama.rope.scaling.yarn_log_multiplier", Meta::Float(0.1))]);
        assert!((logged.mscale - m / (1.0 + 0.01 * 4f64.ln())).abs() < 1e-12);
        // The ends move the ramp: from pairs 0-1 to 0-3.
        let betas = yarn(&[
            ("llama.rope.scaling.yarn_beta_fast", Meta::Float(4.0)),
            ("llama.rope.scaling.yarn_beta_slow", Meta::Float(0.01)),
        ]);
        let wide = Yarn::new(4.0, 16.0, (Some(4.0), Some(0.01)), true).expect("yarn");
        assert_eq!(betas.factors, Some(wide.factors(10000.0, 8)));
        assert_ne!(betas.factors, plain.factors);
        // A log multiplier of 0 is none (llama.cpp's converter writes it so).
        let zero = yarn(&[("llama.rope.scaling.yarn_log_multiplier", Meta::Float(0.0))]);
        assert_eq!(zero, plain);
        // Llama 3's factors in the file are multiplied by YaRN's.
        let mut weights = Weights::default();
        let stored = vec![2.0f32; 4];
        set_factors(&mut weights, stored.clone());
        let metadata = [
            ("llama.rope.scaling.type", Meta::Str("yarn".into())),
            ("llama.rope.scaling.factor", Meta::Float(4.0)),
            ("llama.rope.scaling.original_context_length", Meta::Uint(16)),
        ];
        let rope = scaling(&file(&metadata), &mut weights).expect("yarn");
        assert_eq!(rope.add_factors(&mut weights), Ok(true));
        let combined = weights.remove(ROPE_FREQS).expect("factors");
        let want: Vec<f32> = expected
            .factors(10000.0, 8)
            .iter()
            .map(|f| f * 2.0)
            .collect();
        assert_eq!(pair_factors(&combined, ROPE_FREQS, 4), Ok(want));
        let refused = [
            (
                "llama.rope.scaling.yarn_ext_factor",
                Meta::Float(0.5),
                "yarn_ext_factor",
            ),
            (
                "llama.rope.scaling.yarn_beta_slow",
                Meta::Float(64.0),
                "beta_fast",
            ),
            (
                "llama.rope.scaling.yarn_log_multiplier",
                Meta::Float(-1.0),
                "at least 0",
            ),
            (
                "llama.rope.scaling.original_context_length",
                Meta::Uint(1),
                "too short",
            ),
        ];
        for (key, value, message) in refused {
            let mut metadata = metadata.to_vec();
            metadata.retain(|(k, _)| *k != key);
            metadata.push((key, value));
            let err = scaling(&file(&metadata), &mut Weights::default()).unwrap_err();
            assert!(err.contains(message), "{key}: {err}");
        }
    }

    /// LongRoPE's factor sets: the long ones for a context past the original, the short
    /// ones within it; a file's own `rope_freqs.weight` wins (as in llama.cpp); the set a
    /// context needs must be there.
    #[test]
    fn longrope_factors_are_picked_by_the_context() {
        // The model's factors read from a file of `sets` (a name and a value for each of
        // 4 pairs) and an original context of `original`, with its attention factor.
        let read = |original: u64, sets: &[(&str, f32)]| {
            let mut weights = Weights::default();
            for &(name, v) in sets {
                set_factors(&mut weights, vec![v; 4]);
                let value = weights.remove(ROPE_FREQS).expect("set");
                weights.insert(name, (*value).clone());
            }
            let f = file(&[
                (
                    "llama.rope.scaling.original_context_length",
                    Meta::Uint(original),
                ),
                ("llama.rope.scaling.attn_factor", Meta::Float(1.19)),
            ]);
            let rope = scaling(&f, &mut weights)?;
            assert!(
                LONGROPE_FACTORS
                    .iter()
                    .all(|n| weights.weight_shape(n).is_none())
            );
            assert_eq!(rope.factors, None);
            let factors = weights.remove(ROPE_FREQS).expect("factors");
            Ok::<_, String>((pair_factors(&factors, ROPE_FREQS, 4)?, rope.mscale))
        };
        let both = [(LONGROPE_FACTORS[0], 2.0), (LONGROPE_FACTORS[1], 1.5)];
        assert_eq!(read(16, &both), Ok((vec![2.0; 4], 1.19)));
        assert_eq!(read(64, &both), Ok((vec![1.5; 4], 1.19)));
        let err = read(16, &both[1..]).expect_err("no long factors");
        assert!(err.contains("rope_factors_long.weight"), "{err}");
        let err = read(16, &[(LONGROPE_FACTORS[0], f32::NAN)]).expect_err("NaN factors");
        assert!(err.contains("positive numbers"), "{err}");
        // A file's own factors win, and the sets are not read (as in llama.cpp).
        let stored = read(16, &[(LONGROPE_FACTORS[1], 1.5), (ROPE_FREQS, 3.0)]);
        assert_eq!(stored, Ok((vec![3.0; 4], 1.19)));
    }

    /// Gemma 2's and 3's settings where a file states only the window (or, for Gemma 2,
    /// not even that): llama.cpp's defaults and its rule for the query scale, whose 27B
    /// models (46 and 62 layers) scale by the width over the heads.
    #[test]
    fn gemma_settings_default_as_llama_cpp_reads_them() {
        let config = |layers| ModelConfig {
            explicit_head_dim: Some(256),
            ..ModelConfig::llama2c(2304, 9216, layers, 8, 4, 256000, 8192)
        };
        let mut c = config(26);
        apply_gemma(&file(&[]), "gemma2", &mut c).expect("defaults");
        assert_eq!(
            (c.attention_softcap, c.logit_softcap),
            (Some(50.0), Some(30.0))
        );
        assert_eq!(c.attention_scale, Some(1.0 / 16.0));
        let local = c.local_attention.as_ref().expect("local layers");
        assert_eq!((local.window, local.rope_theta), (4096, None));
        assert_eq!(local.layers[..4], [true, false, true, false]);
        let mut c = config(46);
        apply_gemma(&file(&[]), "gemma2", &mut c).expect("defaults");
        assert_eq!(c.attention_scale, Some((2304f64 / 8.0).powf(-0.5)));
        let window = [("gemma3.attention.sliding_window", Meta::Uint(1024))];
        let mut c = config(62);
        apply_gemma(&file(&window), "gemma3", &mut c).expect("settings");
        assert_eq!((c.attention_softcap, c.logit_softcap), (None, None));
        assert_eq!(c.attention_scale, Some((2304f64 / 8.0).powf(-0.5)));
        let local = c.local_attention.as_ref().expect("local layers");
        assert_eq!((local.window, local.rope_theta), (1024, Some(10000.0)));
        assert_eq!(local.layers[..6], [true, true, true, true, true, false]);
        let err = apply_gemma(&file(&[]), "gemma3", &mut config(26)).expect_err("no window");
        assert!(err.contains("gemma3.attention.sliding_window"), "{err}");
    }
}
