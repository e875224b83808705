//! Hugging Face model directories: `config.json`, `*.safetensors` and `tokenizer.json`.
//!
//! Llama-family checkpoints (Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite, OLMo 2, SmolLM3,
//! Cohere, Gemma 1 to 3; and Phi-2, StableLM and StarCoder2, with LayerNorms:
//! `hf_layer_norm`; the mixtures of experts: `hf_moe`, gpt-oss's `hf_gpt_oss` and
//! DeepSeek's `hf_deepseek`; GLM's `hf_glm`) are read into
//! the builder's weight names (`model.layers.N.self_attn.q_proj.weight` becomes
//! `layers.N.attention.wq.weight`, ...).
//! Hugging Face's q/k projections are laid out for the half-split RoPE, so models read
//! from here use `layout = half` (Cohere's pair neighbours: `interleaved`). Safetensors files are memory-mapped; F32 tensors are read
//! as floats, F16 and BF16 matrices keep their 16 bits ([`stored_floats`]: half the memory
//! of `f32`, widened as the kernels read them).

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

use llm_ir::{
    dtype::DType,
    interp::{Tensor, Value, WeightStore},
};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;

use crate::{
    hf_deepseek, hf_gemma, hf_glm, hf_gpt_oss,
    hf_layer_norm::{self, Family},
    hf_moe,
    model::{
        Activation, AttentionBias, Blocks, FUSED_GATE_UP, FUSED_QKV, LocalAttention, ModelConfig,
        Norm, POST_ATTENTION_NORM, POST_FFW_NORM, QkNorm, check_every_weight_read,
        check_layer_count, every_nth_layer, reciprocal, split_fused_weights, uneven_head_dim,
        weight_shapes,
    },
    model_file::LoadedModel,
    rope_scaling::{
        Llama3Scaling, RopeScaling, Yarn, checked_factors, longrope_mscale, longrope_uses_long,
    },
    tokenizer::HfTokenizer,
    weights::{LoadError, Weights, builder_name, stored_floats},
};

/// The builder's name for a Hugging Face Llama tensor name; with `post_norms` (Gemma 2's
/// and 3's sandwich norms, OLMo 2's output norms) a layer's `post_attention_layernorm` is
/// the norm of the attention's output, `post_feedforward_layernorm` the feed-forward
/// block's, and `pre_feedforward_layernorm` the feed-forward block's input norm. The
/// mixtures', GLM-4-0414's output norms, the LayerNorm families', DBRX's, gpt-oss's and
/// DeepSeek's names are their modules' (`hf_moe`, `hf_glm`, `hf_layer_norm`,
/// `hf_gpt_oss`, `hf_deepseek`), StableLM 2 12B's per-head norms too.
fn weight_name(hf: &str, post_norms: bool) -> Option<String> {
    let named = hf_moe::expert_name(hf)
        .or_else(|| hf_glm::output_norm_name(hf))
        .or_else(|| hf_layer_norm::gpt_neox_name(hf))
        .or_else(|| hf_layer_norm::opt_name(hf))
        .or_else(|| hf_layer_norm::falcon_name(hf))
        .or_else(|| hf_layer_norm::gpt_name(hf))
        .or_else(|| hf_layer_norm::stablelm_head_norm_name(hf))
        .or_else(|| hf_moe::dbrx_name(hf))
        .or_else(|| hf_gpt_oss::name(hf))
        .or_else(|| hf_deepseek::name(hf));
    if let Some(name) = named {
        return Some(name);
    }
    if post_norms {
        let sandwich = builder_name(
            hf,
            &[],
            "model.layers.",
            &[
                ("post_attention_layernorm.weight", POST_ATTENTION_NORM),
                ("pre_feedforward_layernorm.weight", "ffn_norm.weight"),
                ("post_feedforward_layernorm.weight", POST_FFW_NORM),
            ],
        );
        if sandwich.is_some() {
            return sandwich;
        }
    }
    builder_name(
        hf,
        &[
            ("model.embed_tokens.weight", "tok_embeddings.weight"),
            ("model.norm.weight", "norm.weight"),
            ("model.norm.bias", "norm.bias"),
            ("model.final_layernorm.weight", "norm.weight"),
            ("model.final_layernorm.bias", "norm.bias"),
            ("lm_head.weight", "output.weight"),
            ("lm_head.bias", "output.bias"),
        ],
        "model.layers.",
        &[
            ("input_layernorm.weight", "attention_norm.weight"),
            ("input_layernorm.bias", "attention_norm.bias"),
            ("self_attn.q_proj.weight", "attention.wq.weight"),
            ("self_attn.k_proj.weight", "attention.wk.weight"),
            ("self_attn.v_proj.weight", "attention.wv.weight"),
            ("self_attn.o_proj.weight", "attention.wo.weight"),
            ("self_attn.q_proj.bias", "attention.wq.bias"),
            ("self_attn.k_proj.bias", "attention.wk.bias"),
            ("self_attn.v_proj.bias", "attention.wv.bias"),
            ("self_attn.o_proj.bias", "attention.wo.bias"),
            ("self_attn.dense.weight", "attention.wo.weight"),
            ("self_attn.dense.bias", "attention.wo.bias"),
            ("self_attn.qkv_proj.weight", FUSED_QKV),
            ("self_attn.q_norm.weight", "attention.q_norm.weight"),
            ("self_attn.k_norm.weight", "attention.k_norm.weight"),
            ("mlp.gate_up_proj.weight", FUSED_GATE_UP),
            ("post_attention_layernorm.weight", "ffn_norm.weight"),
            ("post_attention_layernorm.bias", "ffn_norm.bias"),
            ("mlp.gate_proj.weight", "feed_forward.w1.weight"),
            ("mlp.down_proj.weight", "feed_forward.w2.weight"),
            ("mlp.up_proj.weight", "feed_forward.w3.weight"),
            ("mlp.gate_proj.bias", "feed_forward.w1.bias"),
            ("mlp.down_proj.bias", "feed_forward.w2.bias"),
            ("mlp.up_proj.bias", "feed_forward.w3.bias"),
            // The ungated blocks' up and down projections: Phi-2's, StarCoder2's.
            ("mlp.fc1.weight", "feed_forward.w3.weight"),
            ("mlp.fc1.bias", "feed_forward.w3.bias"),
            ("mlp.fc2.weight", "feed_forward.w2.weight"),
            ("mlp.fc2.bias", "feed_forward.w2.bias"),
            ("mlp.c_fc.weight", "feed_forward.w3.weight"),
            ("mlp.c_fc.bias", "feed_forward.w3.bias"),
            ("mlp.c_proj.weight", "feed_forward.w2.weight"),
            ("mlp.c_proj.bias", "feed_forward.w2.bias"),
        ],
    )
}

/// The RoPE settings of the layers of type `kind` (`full_attention` or
/// `sliding_attention`): the base, and the object that gives the scaling with the key it
/// is under. Transformers 5 writes `rope_parameters`, one object for every layer or one
/// per layer type (Gemma 3's); older configs `rope_theta` (default 10000) and
/// `rope_scaling`.
pub(crate) fn rope_settings<'a>(
    cfg: &'a Json,
    kind: &str,
) -> Result<(f64, Option<Scaling<'a>>), String> {
    let Some(parameters) = cfg.get("rope_parameters").filter(|p| !p.is_null()) else {
        let theta = cfg
            .get("rope_theta")
            .and_then(Json::as_f64)
            .unwrap_or(10000.0);
        let scaling = cfg.get("rope_scaling").filter(|s| !s.is_null());
        let key = "rope_scaling".to_string();
        return Ok((theta, scaling.map(|json| Scaling { json, key })));
    };
    let (object, key) = match parameters.get(kind) {
        Some(per_type) => (per_type, format!("rope_parameters.{kind}")),
        None => (parameters, "rope_parameters".to_string()),
    };
    let theta = object
        .get("rope_theta")
        .and_then(Json::as_f64)
        .filter(|t| t.is_finite() && *t > 0.0)
        .ok_or_else(|| format!("`{key}.rope_theta` is missing or not a positive number"))?;
    Ok((theta, Some(Scaling { json: object, key })))
}

/// An object of `config.json` giving RoPE's scaling, and the key it is under.
pub(crate) struct Scaling<'a> {
    /// The object (`rope_scaling`, or one of `rope_parameters`).
    json: &'a Json,
    /// Its key, for errors.
    key: String,
}

/// RoPE's scaling, for a base of `theta` and `rotary` rotated features a head, as the
/// object `scaling` of `config.json` `cfg` (under `key`) gives it (absent, null or
/// `rope_type = default`: none): `linear` divides positions by `factor`; `llama3` gives each pair a frequency
/// factor ([`Llama3Scaling::factors`]); `yarn` gives factors ([`Yarn::factors`]) and an
/// attention factor (`attention_factor`, else [`Yarn::mscale`] of `mscale` and
/// `mscale_all_dim` where both are given, else `1 + 0.1 ln(factor)`), its `factor`
/// defaulting to the ratio of `max_position_embeddings` to
/// `original_max_position_embeddings` and that to `max_position_embeddings`; `longrope`
/// (or the older `su`: Phi-3's) gives its `long_factor`s or `short_factor`s
/// ([`longrope_uses_long`] over `max_position_embeddings`) and an attention factor
/// (`attention_factor`, else [`longrope_mscale`]), reading
/// `original_max_position_embeddings` from the object or, as Phi-3's configs have it,
/// from `cfg`. Dynamic NTK scaling is refused: the builder would compute another model.
pub(crate) fn rope_scaling(
    scaling: Option<Scaling>,
    cfg: &Json,
    theta: f64,
    rotary: usize,
) -> Result<RopeScaling, String> {
    let Some(Scaling {
        json: scaling,
        key: under,
    }) = scaling
    else {
        return Ok(RopeScaling::NONE);
    };
    // Older configs name the type `type`.
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(Json::as_str);
    let optional = |key: &str| positive_named(scaling, key, &format!("{under}.{key}"));
    let number = |key: &str| optional(key)?.ok_or_else(|| format!("`{under}.{key}` is missing"));
    // Hugging Face takes 0 for these as not given.
    let unless_zero = |key: &str| match scaling.get(key).and_then(Json::as_f64) {
        Some(0.0) => Ok(None),
        _ => optional(key),
    };
    let context = config_int(cfg, "max_position_embeddings")? as f64;
    // The original context: in the object or, as Phi-3's configs give it, at the top
    // level (transformers 5 writes both).
    let original = || {
        let inner = match scaling.get("original_max_position_embeddings") {
            None | Some(Json::Null) => None,
            Some(_) => Some(
                config_int(scaling, "original_max_position_embeddings")
                    .map_err(|e| format!("`{under}`: {e}"))?,
            ),
        };
        let outer = match cfg.get("original_max_position_embeddings") {
            None | Some(Json::Null) => None,
            Some(_) => Some(config_int(cfg, "original_max_position_embeddings")?),
        };
        match (inner, outer) {
            (Some(a), Some(b)) if a != b => Err(format!(
                "`{under}.original_max_position_embeddings` ({a}) differs from the top level's ({b})"
            )),
            (Some(o), _) | (None, Some(o)) if o < 2 => Err(format!(
                "the original context of {o} positions is too short to scale"
            )),
            (inner, outer) => Ok(inner.or(outer).map(|o| o as f64)),
        }
    };
    match kind {
        Some("default") => Ok(RopeScaling::NONE),
        Some("linear") => Ok(RopeScaling {
            linear: number("factor")?,
            ..RopeScaling::NONE
        }),
        Some("llama3") => {
            let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
            if high <= low {
                return Err(format!(
                    "`{under}.high_freq_factor` ({high}) must exceed `low_freq_factor` ({low})"
                ));
            }
            let scaling = Llama3Scaling {
                factor: number("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_context: number("original_max_position_embeddings")?,
            };
            Ok(RopeScaling {
                factors: Some(scaling.factors(theta, rotary)),
                ..RopeScaling::NONE
            })
        }
        Some("yarn") => {
            let original = original()?.unwrap_or(context);
            let yarn = Yarn::new(
                optional("factor")?.unwrap_or(context / original),
                original,
                (unless_zero("beta_fast")?, unless_zero("beta_slow")?),
                scaling.get("truncate").and_then(Json::as_bool) != Some(false),
            )
            .map_err(|e| format!("`{under}`: {e}"))?;
            let mscale = match (
                optional("attention_factor")?,
                unless_zero("mscale")?,
                unless_zero("mscale_all_dim")?,
            ) {
                (Some(given), ..) => given,
                (None, Some(mscale), Some(all_dim)) => yarn.mscale(mscale, all_dim),
                _ => yarn.mscale(1.0, 0.0),
            };
            Ok(RopeScaling {
                factors: Some(yarn.factors(theta, rotary)),
                mscale,
                ..RopeScaling::NONE
            })
        }
        Some("longrope" | "su") => {
            let original = original()?
                .ok_or_else(|| format!("`{under}.original_max_position_embeddings` is missing"))?;
            let factor = optional("factor")?.unwrap_or(context / original);
            let set = if longrope_uses_long(context as usize, original) {
                "long_factor"
            } else {
                "short_factor"
            };
            let values = scaling
                .get(set)
                .and_then(Json::as_array)
                .map_or(Vec::new(), |v| {
                    v.iter()
                        .map(|v| v.as_f64().map_or(f32::NAN, |v| v as f32))
                        .collect()
                });
            let factors = checked_factors(values, &format!("`{under}.{set}`"), rotary / 2)?;
            Ok(RopeScaling {
                factors: Some(factors),
                mscale: optional("attention_factor")?
                    .unwrap_or_else(|| longrope_mscale(factor, original)),
                ..RopeScaling::NONE
            })
        }
        _ => Err(format!(
            "`{under}` = {scaling} is not supported (unscaled, linear, llama3, yarn and longrope RoPE are)"
        )),
    }
}

/// An error in `file`.
fn err(file: &Path, message: String) -> LoadError {
    LoadError {
        file: file.display().to_string(),
        message,
    }
}

/// The tokens that end a generation as the model says: `eos_token_id` (one id or a list,
/// such as an instruction-tuned Llama 3's end of text, end of message and end of turn) of
/// `generation_config.json` where the directory has one, else of `config.json` (`cfg`,
/// read from `config_path`); none when neither names any.
fn eos_ids(dir: &Path, cfg: &Json, config_path: &Path) -> Result<Vec<u32>, LoadError> {
    let generation_path = dir.join("generation_config.json");
    let (source, path) = if generation_path.exists() {
        let text = std::fs::read_to_string(&generation_path)
            .map_err(|e| err(&generation_path, format!("cannot read: {e}")))?;
        let json: Json = serde_json::from_str(&text)
            .map_err(|e| err(&generation_path, format!("invalid JSON: {e}")))?;
        (json, generation_path)
    } else {
        (cfg.clone(), config_path.to_path_buf())
    };
    let id = |v: &Json| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| err(&path, format!("`eos_token_id` holds {v}, not a token id")))
    };
    match source.get("eos_token_id") {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(ids)) => ids.iter().map(id).collect(),
        Some(one) => Ok(vec![id(one)?]),
    }
}

/// The sliding window (`sliding_window`, unless null or switched off by
/// `use_sliding_window = false`: each position attends to at most that many) and the
/// layers it covers, of `layers`: every layer (Mistral's), or, where `use_sliding_window`
/// is true (Qwen2's, Qwen3's), the layers `layer_types` marks `sliding_attention`, or
/// else those from `max_window_layers` on (28 where absent, as their classes default it).
/// `None` where there is no window.
fn windowed_layers(cfg: &Json, layers: usize) -> Result<Option<(usize, Vec<bool>)>, String> {
    let switch = cfg.get("use_sliding_window").and_then(Json::as_bool);
    if switch == Some(false) {
        return Ok(None);
    }
    let window = match cfg.get("sliding_window") {
        None | Some(Json::Null) => return Ok(None),
        Some(_) => config_int(cfg, "sliding_window")?,
    };
    let typed = cfg.get("layer_types").is_some_and(|t| !t.is_null());
    let covered = if switch == Some(true) && typed {
        hf_gemma::local_layers(cfg, layers, || unreachable!("`layer_types` is given"))?
    } else {
        let from = match cfg.get("max_window_layers").filter(|m| !m.is_null()) {
            None if switch == Some(true) => 28,
            None => 0,
            Some(m) => m
                .as_u64()
                .and_then(|m| usize::try_from(m).ok())
                .ok_or("`max_window_layers` is not a non-negative integer")?,
        };
        (0..layers).map(|l| l >= from).collect()
    };
    Ok(Some((window, covered)))
}

/// The window of `windowed_layers` as the builder takes it: `ModelConfig::sliding_window`
/// where it covers every layer, local attention where it covers some (the cache then
/// keeps every position, as the other layers read them all), nothing where it covers none.
fn window_settings(
    windowed: Option<(usize, Vec<bool>)>,
) -> (Option<usize>, Option<LocalAttention>) {
    match windowed {
        Some((window, layers)) if layers.iter().all(|&l| l) => (Some(window), None),
        Some((window, layers)) if layers.iter().any(|&l| l) => (
            None,
            Some(LocalAttention {
                window,
                layers,
                rope_theta: None,
            }),
        ),
        _ => (None, None),
    }
}

/// The Llama-family architectures the builder computes (Mistral's is Llama's with a
/// sliding window, Qwen2's Llama's with biases on the q, k and v projections, Qwen3's
/// Llama's with an RMSNorm of each head's queries and keys, Phi-3's Llama's with the q,
/// k and v projections fused in one matrix and the gate and up projections in another,
/// which the loader splits, Gemma's Llama's with GeGLU, embeddings scaled by
/// `sqrt(hidden_size)` and norms scaling by `1 + weight`, Gemma 2's Gemma's with sandwich
/// norms, soft-capped attention scores and logits and local attention in every other
/// layer, Gemma 3's with q/k norms instead of the soft-caps and five local layers to a
/// global one: `hf_gemma`, Granite's Llama's with its four scales: [`granite_scales`],
/// OLMo 2's Llama's with its blocks' outputs normalized instead of their inputs and
/// RMSNorms over the whole q and k projections, SmolLM3's Llama's with some layers'
/// RoPE left out: [`smollm3_nope_layers`], Cohere's with LayerNorms, parallel blocks,
/// scaled logits and interleaved RoPE pairs: [`cohere_settings`], OLMo's with LayerNorms
/// of neither weight nor bias: [`olmo_settings`]; the original transformer's shapes with
/// LayerNorms: `hf_layer_norm`, whose names are listed there),
/// and Gemma 3's multimodal checkpoints, whose language model
/// the loader reads (named here for the error message: `hf_gemma` turns their config into
/// a `Gemma3ForCausalLM`'s before it is checked).
const ARCHITECTURES: [&str; 15] = [
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    hf_gemma::MULTIMODAL,
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "GraniteForCausalLM",
    "Olmo2ForCausalLM",
    "OlmoForCausalLM",
    "SmolLM3ForCausalLM",
    "CohereForCausalLM",
    "Cohere2ForCausalLM",
];

/// OLMo's settings (`OlmoForCausalLM`, the first OLMo): LayerNorms of neither weight nor
/// bias, of epsilon 1e-5 (`OlmoLayerNorm`'s, which no key sets), and its `clip_qkv` (q, k
/// and v clamped to `[-clip_qkv, clip_qkv]`, OLMo-7B-0424's).
fn olmo_settings(cfg: &Json, c: &mut ModelConfig) -> Result<(), String> {
    c.clip_qkv = optional_positive(cfg, "clip_qkv")?;
    c.norm = Norm::Unit;
    c.norm_eps = 1e-5;
    Ok(())
}

/// Cohere's settings (`CohereForCausalLM`: Command R, Aya): LayerNorms without bias,
/// attention and feed-forward blocks in parallel, and the logits multiplied by
/// `logit_scale` (0.0625 where left out, as `CohereConfig` defaults it), and its per-head
/// q/k LayerNorms where `use_qk_norm` (Command R+'s: `self_attn.q_norm.weight`,
/// `[heads, head_dim]`).
fn cohere_settings(cfg: &Json, c: &mut ModelConfig) -> Result<(), String> {
    if flag_or(cfg, "use_qk_norm", false)? {
        c.qk_norm = QkNorm::LayerHeads;
    }
    let scale = optional_positive(cfg, "logit_scale")?.unwrap_or(0.0625);
    c.norm = Norm::Layer;
    c.blocks = Blocks::ParallelSharedNorm;
    c.logit_scale = Some(scale);
    Ok(())
}

/// Cohere 2's layers (`Cohere2ForCausalLM`: Command R7B, Command A): local attention
/// over `sliding_window` positions in the layers `layer_types` marks sliding (by default
/// three of every `sliding_window_pattern`, 4), which alone take RoPE; the global layers
/// attend to every position without positions of their own (NoPE).
fn cohere2_layers(cfg: &Json, c: &mut ModelConfig) -> Result<(), String> {
    let local = hf_gemma::local_layers(cfg, c.layers, || {
        match cfg.get("sliding_window_pattern").filter(|p| !p.is_null()) {
            Some(_) => config_int(cfg, "sliding_window_pattern"),
            None => Ok(4),
        }
    })?;
    let local = LocalAttention {
        window: config_int(cfg, "sliding_window")?,
        layers: local,
        rope_theta: None,
    };
    c.nope_layers = Some(local.global_layers());
    c.local_attention = Some(local);
    Ok(())
}

/// SmolLM3's window: over `sliding_window` positions where `use_sliding_window` is true,
/// in the layers `layer_types` marks sliding or, where it is absent, in its NoPE layers
/// `nope` (as `SmolLM3Config` fills `layer_types` in); none otherwise.
fn smollm3_window(cfg: &Json, nope: &[bool]) -> Result<Option<LocalAttention>, String> {
    let on = cfg.get("use_sliding_window").and_then(Json::as_bool) == Some(true);
    if !on || cfg.get("sliding_window").is_none_or(Json::is_null) {
        return Ok(None);
    }
    let window = config_int(cfg, "sliding_window")?;
    let layers = if cfg.get("layer_types").is_some_and(|t| !t.is_null()) {
        hf_gemma::local_layers(cfg, nope.len(), || Err("`layer_types` is given".into()))?
    } else {
        nope.to_vec()
    };
    Ok(layers.contains(&true).then_some(LocalAttention {
        window,
        layers,
        rope_theta: None,
    }))
}

/// SmolLM3's NoPE layers: `no_rope_layers` (1 for a layer with RoPE, 0 for one without),
/// or, where the config leaves it out, every `no_rope_layer_interval`-th layer (4 by
/// default) without, as `SmolLM3Config` fills it in.
fn smollm3_nope_layers(cfg: &Json, layers: usize) -> Result<Vec<bool>, String> {
    match cfg.get("no_rope_layers") {
        None | Some(Json::Null) => {
            let interval = match cfg.get("no_rope_layer_interval") {
                None | Some(Json::Null) => 4,
                Some(_) => config_int(cfg, "no_rope_layer_interval")?,
            };
            Ok(every_nth_layer(layers, interval))
        }
        Some(Json::Array(flags)) => flags
            .iter()
            .map(|f| match f.as_u64() {
                Some(0) => Ok(true),
                Some(1) => Ok(false),
                _ => Err(format!("`no_rope_layers` holds {f}, not 0 or 1")),
            })
            .collect(),
        Some(other) => Err(format!("`no_rope_layers` = {other} is not a list")),
    }
}

/// Granite's scales (`GraniteForCausalLM`'s, Granite-MoE's), each 1 where the config leaves it out, as
/// Hugging Face's `GraniteConfig` defaults them: the embeddings times
/// `embedding_multiplier`, each block's output times `residual_multiplier` before its
/// residual add, the attention scores scaled by `attention_multiplier` (instead of one
/// over the square root of the head size) and the logits divided by `logits_scaling`.
pub(crate) fn granite_scales(cfg: &Json, c: &mut ModelConfig) -> Result<(), String> {
    let scale = |key: &str| optional_positive(cfg, key).map(|v| v.unwrap_or(1.0));
    let unless_one = |v: f64| (v != 1.0).then_some(v);
    c.embedding_scale = unless_one(scale("embedding_multiplier")?);
    c.residual_scale = unless_one(scale("residual_multiplier")?);
    c.attention_scale = Some(scale("attention_multiplier")?);
    c.logit_scale = unless_one(scale("logits_scaling")?).map(reciprocal);
    Ok(())
}

/// `key` of `cfg` as a positive, finite number; `None` where it is absent or null.
pub(crate) fn optional_positive(cfg: &Json, key: &str) -> Result<Option<f64>, String> {
    positive_named(cfg, key, key)
}

/// [`optional_positive`] of `key` in `json`, an error naming it `shown` (its path in
/// `config.json`).
fn positive_named(json: &Json, key: &str, shown: &str) -> Result<Option<f64>, String> {
    match json.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|v| v.is_finite() && *v > 0.0)
            .map(Some)
            .ok_or_else(|| format!("`{shown}` = {v} is not a positive number")),
    }
}

/// Whether `config.json`'s `architectures` names `arch`.
pub(crate) fn names_architecture(cfg: &Json, arch: &str) -> bool {
    cfg.get("architectures")
        .and_then(Json::as_array)
        .is_some_and(|names| names.iter().any(|n| n == arch))
}

/// The head size `head_dim` gives where it is not `hidden_size / num_attention_heads`
/// (Qwen3's, Mistral Nemo's): the q projection is then `heads * head_dim` wide.
fn explicit_head_dim(cfg: &Json, width: usize, heads: usize) -> Result<Option<usize>, String> {
    if cfg.get("head_dim").is_none_or(Json::is_null) {
        return Ok(None);
    }
    Ok(uneven_head_dim(config_int(cfg, "head_dim")?, width, heads))
}

/// `key` of `cfg` as a boolean, `default` where it is absent or null.
pub(crate) fn flag_or(cfg: &Json, key: &str, default: bool) -> Result<bool, String> {
    match cfg.get(key) {
        None | Some(Json::Null) => Ok(default),
        Some(Json::Bool(b)) => Ok(*b),
        Some(other) => Err(format!("`{key}` = {other} is not a boolean")),
    }
}

/// The attention's biases: Qwen2's on q, k and v; a Llama config's `attention_bias` on
/// q, k, v and the output projection (as Hugging Face's `LlamaAttention` adds them).
fn attention_bias(cfg: &Json) -> Result<AttentionBias, String> {
    let llama_bias = flag_or(cfg, "attention_bias", false)?;
    Ok(AttentionBias {
        qkv: names_architecture(cfg, "Qwen2ForCausalLM") || llama_bias,
        output: llama_bias,
    })
}

/// Whether the feed-forward projections add biases: `mlp_bias`, in the architectures
/// whose blocks read it (Llama's, as a config without `architectures` is read, Granite's,
/// SmolLM3's); the others' ignore it, as Hugging Face's do.
fn mlp_bias(cfg: &Json) -> Result<bool, String> {
    let reads_it = cfg.get("architectures").is_none()
        || [
            "LlamaForCausalLM",
            "GraniteForCausalLM",
            "SmolLM3ForCausalLM",
        ]
        .iter()
        .any(|arch| names_architecture(cfg, arch));
    Ok(reads_it && flag_or(cfg, "mlp_bias", false)?)
}

/// Refuses settings the builder would ignore, computing another model than the one
/// described: an architecture other than [`ARCHITECTURES`] and `hf_layer_norm`'s, and
/// feed-forward activations other than [`activation`]'s (RoPE's: [`rope_scaling`],
/// [`rotary_dim`]).
fn check_supported(cfg: &Json) -> Result<(), String> {
    if let Some(names) = cfg.get("architectures").and_then(Json::as_array)
        && let Some(other) = names.iter().find(|n| {
            !n.as_str().is_some_and(|n| {
                ARCHITECTURES.contains(&n)
                    || hf_moe::ARCHITECTURES.contains(&n)
                    || hf_glm::ARCHITECTURES.contains(&n)
                    || n == hf_gpt_oss::ARCHITECTURE
                    || hf_deepseek::ARCHITECTURES.contains(&n)
                    || hf_layer_norm::architectures().any(|a| a == n)
            })
        })
    {
        return Err(format!(
            "`architectures` names {other}; the Llama-family models built are {}, {}, {}, {}, {}, {}",
            ARCHITECTURES.join(", "),
            hf_glm::ARCHITECTURES.join(", "),
            hf_moe::ARCHITECTURES.join(", "),
            hf_gpt_oss::ARCHITECTURE,
            hf_deepseek::ARCHITECTURES.join(", "),
            hf_layer_norm::architectures()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    activation(cfg).map(|_| ())
}

/// The features of each head of `head_dim` that RoPE rotates where that is not all:
/// `head_dim * partial_rotary_factor`, rounded down as Hugging Face does (Phi-4-mini's
/// 0.75), the factor given in the RoPE settings `scaling` (transformers 5's
/// `rope_parameters`) or at the top level of `cfg` (which must then agree), else the
/// configuration class's default ([`Family::default_rotary_factor`]; GLM's 0.5 is filled
/// in by `hf_glm::standard_config`). Only Phi-3's, GLM's, Phi's, StableLM's and
/// GPT-NeoX's attention rotate part of each head in transformers; another architecture's
/// factor below 1 is refused.
fn rotary_dim(
    cfg: &Json,
    scaling: Option<&Scaling>,
    head_dim: usize,
) -> Result<Option<usize>, String> {
    let factor = |json: &Json, key: &str| match json.get("partial_rotary_factor") {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|f| *f > 0.0 && *f <= 1.0)
            .map(Some)
            .ok_or_else(|| format!("`{key}` = {v} is not a fraction in (0, 1]")),
    };
    let inner = match scaling {
        Some(s) => factor(s.json, &format!("{}.partial_rotary_factor", s.key))?,
        None => None,
    };
    let outer = factor(cfg, "partial_rotary_factor")?;
    let factor = match (inner, outer) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "`partial_rotary_factor` is {b} at the top level but {a} in the RoPE settings"
            ));
        }
        (inner, outer) => match (inner.or(outer), Family::of(cfg)) {
            (Some(factor), _) => factor,
            (None, Some(family)) => family.default_rotary_factor(cfg)?,
            (None, None) => 1.0,
        },
    };
    let partial = names_architecture(cfg, "Phi3ForCausalLM")
        || hf_glm::is_glm(cfg)
        || Family::of(cfg).is_some_and(Family::rotates_part);
    if factor != 1.0 && !partial {
        return Err(format!(
            "`partial_rotary_factor` = {factor}: only Phi-3's, GLM's, Phi's, StableLM's and GPT-NeoX's attention rotate part of each head"
        ));
    }
    let rotary = (head_dim as f64 * factor) as usize;
    if rotary == 0 || !rotary.is_multiple_of(2) {
        return Err(format!(
            "`partial_rotary_factor` = {factor} rotates {rotary} features of heads of {head_dim}, not whole pairs"
        ));
    }
    Ok((rotary != head_dim).then_some(rotary))
}

/// The feed-forward block's activation: `hidden_act` (or the family's key,
/// [`Family::activation_key`]), SiLU, GELU's tanh approximation
/// (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: GPT-NeoX-20B's) or exact GELU (`gelu`,
/// `gelu_python`) or ReLU (`relu`, OPT's), the architecture's default where it is left
/// out (SiLU, or
/// [`Family::default_activation`]); as transformers 5.24 reads Gemma's, the first
/// generation's `hidden_act` (its legacy `gelu` the tanh approximation) and Gemma 2's and
/// 3's `hidden_activation`, GELU's tanh approximation where left out. Any other
/// activation is refused.
fn activation(cfg: &Json) -> Result<Activation, String> {
    let (key, default) = match (hf_gemma::generation(cfg), Family::of(cfg)) {
        // Gemma's legacy `gelu` means the tanh approximation (`GemmaConfig` rewrites it).
        (Some(1), _) if cfg.get("hidden_act").and_then(Json::as_str) == Some("gelu") => {
            return Ok(Activation::GeluTanh);
        }
        (Some(1), _) => ("hidden_act", "gelu_pytorch_tanh"),
        (Some(_), _) => ("hidden_activation", "gelu_pytorch_tanh"),
        (None, Some(family)) => (family.activation_key(), family.default_activation()),
        (None, None) => ("hidden_act", "silu"),
    };
    match cfg.get(key).and_then(Json::as_str).unwrap_or(default) {
        "silu" => Ok(Activation::Silu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" | "gelu_python" => Ok(Activation::Gelu),
        "relu" => Ok(Activation::Relu),
        other => Err(format!(
            "`{key}` = \"{other}\" is not supported (SiLU, GELU, GELU's tanh approximation or ReLU)"
        )),
    }
}

/// Gemma's RMSNorms scale by `1 + weight`: its norm weights (every one the model has,
/// the sandwich and q/k norms of Gemma 2 and 3 too) become that sum, in `f32` as Hugging
/// Face computes it, so that the builder's `llm.rms_norm` scales by them.
fn offset_norm_weights(c: &ModelConfig, weights: &mut Weights) -> Result<(), String> {
    let names = weight_shapes(c)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| name.ends_with("norm.weight"));
    for name in names {
        let Some(value) = weights.weight(&name) else {
            continue;
        };
        let Value::Tensor(t) = &*value else {
            return Err(format!("norm weight `{name}` is not a float tensor"));
        };
        let shifted = t.floats()?.iter().map(|w| 1.0 + w).collect();
        weights.insert(
            name,
            Value::Tensor(Tensor::from_f32(t.shape.clone(), DType::F32, shifted)),
        );
    }
    Ok(())
}

pub(crate) fn config_int(cfg: &Json, key: &str) -> Result<usize, String> {
    match cfg.get(key).and_then(Json::as_u64) {
        Some(v) if v > 0 && v <= 1 << 24 => Ok(v as usize),
        Some(v) => Err(format!("`{key}` = {v} is out of range")),
        None => Err(format!("missing or non-integer `{key}`")),
    }
}

/// How a checkpoint's tensors are read.
struct TensorRules {
    /// The biases the model declares (the builder's names): another bias is an error
    /// naming the checkpoint's tensor.
    biases: HashSet<String>,
    /// Output norms, Gemma 2's and 3's and OLMo 2's ([`weight_name`]).
    post_norms: bool,
    /// A multimodal Gemma 3's checkpoint: the language model's tensors are read, the
    /// vision tower's skipped ([`hf_gemma::language_model_tensor`]).
    multimodal: bool,
    /// A DeepSeek V3 model's layers: the multi-token-prediction layers past them are
    /// skipped ([`hf_deepseek::is_prediction_layer`]).
    model_layers: Option<usize>,
}

/// The builder's name `name` of a layer's weight as layer 0's (`layers.7.x` ->
/// `layers.0.x`); another name as it is.
fn first_layer(name: &str) -> String {
    match name
        .strip_prefix("layers.")
        .and_then(|rest| rest.split_once('.'))
    {
        Some((_, part)) => format!("layers.0.{part}"),
        None => name.to_string(),
    }
}

/// Reads the tensors of one safetensors file into `weights`, by `rules`; gpt-oss's MXFP4
/// experts' halves go to `packed`, which puts each matrix into `weights` once both are in.
fn read_safetensors(
    path: &Path,
    (weights, packed): (&mut Weights, &mut hf_gpt_oss::PackedExperts),
    rules: &TensorRules,
) -> Result<(), String> {
    let map = crate::mmap::map(path).map_err(|e| format!("cannot read: {e}"))?;
    let st =
        SafeTensors::deserialize(&map).map_err(|e| format!("invalid safetensors file: {e}"))?;
    for (stored, view) in st.tensors() {
        let name = match rules.multimodal {
            true => match hf_gemma::language_model_tensor(&stored) {
                Some(name) => name,
                None => continue,
            },
            false => stored,
        };
        if rules
            .model_layers
            .is_some_and(|layers| hf_deepseek::is_prediction_layer(&name, layers))
        {
            continue;
        }
        let is_u8 = view.dtype() == Dtype::U8;
        if packed.take(&name, (view.shape(), view.data(), is_u8), weights)? {
            continue;
        }
        let Some(ours) = weight_name(&name, rules.post_norms) else {
            // RoPE's frequencies, and GPT-NeoX's and GPT-2's causal masks of older
            // checkpoints: buffers.
            let buffers = [
                "rotary_emb.inv_freq",
                ".attention.bias",
                ".attention.masked_bias",
                ".attn.bias",
                ".attn.masked_bias",
            ];
            if buffers.iter().any(|b| name.ends_with(b)) {
                continue;
            }
            return Err(format!("tensor `{name}` is not part of a supported model"));
        };
        if weights.weight_shape(&ours).is_some() {
            return Err(format!(
                "tensor `{name}` is the model's `{ours}`, which another tensor already gave"
            ));
        }
        // A fused q, k and v bias stands for the layer's q, k and v biases.
        let declared_as = first_layer(&ours)
            .replace(hf_layer_norm::QKV_BY_GROUP, "attention.wq")
            .replace("attention.wqkv", "attention.wq");
        if ours.ends_with(".bias") && !rules.biases.contains(&declared_as) {
            return Err(format!(
                "tensor `{name}` is a bias that config.json does not declare (`attention_bias`, `mlp_bias`, `use_bias`, ...)"
            ));
        }
        let shape = view.shape().to_vec();
        let data = view.data();
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => return Err(format!("tensor `{name}` has unsupported dtype {other:?}")),
        };
        weights.insert(ours, stored_floats(shape, dtype, data));
    }
    Ok(())
}

/// Reads a Hugging Face Llama model directory.
pub fn load(dir: &Path) -> Result<LoadedModel, LoadError> {
    load_with(dir, &mut |_| {})
}

/// [`load`], reporting the fraction of safetensors files read to `progress`.
pub fn load_with(dir: &Path, progress: &mut dyn FnMut(f64)) -> Result<LoadedModel, LoadError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|e| err(&config_path, format!("cannot read: {e}")))?;
    let stored: Json =
        serde_json::from_str(&text).map_err(|e| err(&config_path, format!("invalid JSON: {e}")))?;
    let multimodal = names_architecture(&stored, hf_gemma::MULTIMODAL);
    let cfg = hf_gemma::language_model_config(&stored).map_err(|m| err(&config_path, m))?;
    let cfg = hf_layer_norm::standard_config(cfg).map_err(|m| err(&config_path, m))?;
    let cfg = hf_moe::dbrx_config(cfg);
    let cfg = hf_glm::standard_config(cfg);
    let cfg = hf_gpt_oss::standard_config(cfg);
    let cfg = hf_deepseek::standard_config(cfg);
    let int = |key: &str| config_int(&cfg, key).map_err(|m| err(&config_path, m));
    check_supported(&cfg).map_err(|m| err(&config_path, m))?;
    let gemma = hf_gemma::generation(&cfg);
    let olmo2 = names_architecture(&cfg, "Olmo2ForCausalLM");
    let cohere2 = names_architecture(&cfg, "Cohere2ForCausalLM");
    let cohere = cohere2 || names_architecture(&cfg, "CohereForCausalLM");
    let gpt_oss = hf_gpt_oss::is_gpt_oss(&cfg);
    let (rope_theta, global_scaling) =
        rope_settings(&cfg, "full_attention").map_err(|m| err(&config_path, m))?;
    let heads = int("num_attention_heads")?;
    // Gemma 2's and 3's, Cohere 2's and gpt-oss's window is their local layers' (set
    // below).
    let window = if matches!(gemma, Some(2..)) || cohere2 || gpt_oss {
        (None, None)
    } else {
        window_settings(
            windowed_layers(&cfg, int("num_hidden_layers")?).map_err(|m| err(&config_path, m))?,
        )
    };
    let mut config = ModelConfig {
        dim: int("hidden_size")?,
        hidden_dim: int("intermediate_size")?,
        layers: int("num_hidden_layers")?,
        heads,
        kv_heads: cfg
            .get("num_key_value_heads")
            .map_or(Ok(heads), |_| int("num_key_value_heads"))?,
        vocab: int("vocab_size")?,
        seq_len: int("max_position_embeddings")?,
        rope_theta,
        // Cohere's norms are LayerNorms, with their own key.
        norm_eps: cfg
            .get(if cohere {
                "layer_norm_eps"
            } else {
                "rms_norm_eps"
            })
            .and_then(Json::as_f64)
            .unwrap_or(1e-5),
        // Cohere's rotation pairs neighbours, as Meta's Llama does.
        rope_half: !cohere,
        sliding_window: window.0,
        local_attention: window.1,
        attention_bias: attention_bias(&cfg).map_err(|m| err(&config_path, m))?,
        ffn_bias: mlp_bias(&cfg).map_err(|m| err(&config_path, m))?,
        explicit_head_dim: explicit_head_dim(&cfg, int("hidden_size")?, heads)
            .map_err(|m| err(&config_path, m))?,
        qk_norm: if names_architecture(&cfg, "Qwen3ForCausalLM") || gemma == Some(3) {
            QkNorm::Heads
        } else if olmo2 {
            QkNorm::Projections
        } else {
            QkNorm::None
        },
        pre_norms: !olmo2,
        activation: activation(&cfg).map_err(|m| err(&config_path, m))?,
        scale_embeddings: gemma.is_some(),
        post_norms: olmo2,
        ..ModelConfig::default()
    };
    config.rotary_dim = rotary_dim(&cfg, global_scaling.as_ref(), config.head_dim())
        .map_err(|m| err(&config_path, m))?;
    if let Some(family) = Family::of(&cfg) {
        family
            .apply(&cfg, &mut config)
            .map_err(|m| err(&config_path, m))?;
    }
    if let Some(generation @ 2..) = gemma {
        hf_gemma::apply(&cfg, generation, &mut config).map_err(|m| err(&config_path, m))?;
    }
    if names_architecture(&cfg, "GraniteForCausalLM") {
        granite_scales(&cfg, &mut config).map_err(|m| err(&config_path, m))?;
    }
    if cohere {
        cohere_settings(&cfg, &mut config).map_err(|m| err(&config_path, m))?;
    }
    if cohere2 {
        cohere2_layers(&cfg, &mut config).map_err(|m| err(&config_path, m))?;
    }
    if names_architecture(&cfg, "OlmoForCausalLM") {
        olmo_settings(&cfg, &mut config).map_err(|m| err(&config_path, m))?;
    }
    hf_moe::apply(&cfg, &mut config).map_err(|m| err(&config_path, m))?;
    if gpt_oss {
        hf_gpt_oss::apply(&cfg, &mut config).map_err(|m| err(&config_path, m))?;
    }
    let deepseek = hf_deepseek::is_deepseek(&cfg);
    if deepseek {
        hf_deepseek::apply(&cfg, &mut config).map_err(|m| err(&config_path, m))?;
    }
    if hf_glm::is_glm(&cfg) {
        hf_glm::apply(&cfg, &mut config).map_err(|m| err(&config_path, m))?;
    }
    if names_architecture(&cfg, "SmolLM3ForCausalLM") {
        let nope = smollm3_nope_layers(&cfg, config.layers).map_err(|m| err(&config_path, m))?;
        config.sliding_window = None;
        config.local_attention = smollm3_window(&cfg, &nope).map_err(|m| err(&config_path, m))?;
        config.nope_layers = Some(nope);
    }
    let rope = rope_scaling(global_scaling, &cfg, config.rope_theta, config.rotary())
        .map_err(|m| err(&config_path, m))?;
    let config = ModelConfig {
        rope_scaling: rope.linear,
        rope_freq_factors: rope.factors.is_some(),
        rope_mscale: rope.mscale,
        ..config
    };
    config.validate().map_err(|m| err(&config_path, m))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| err(dir, format!("cannot read the directory: {e}")))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err(dir, "no *.safetensors file".into()));
    }
    let mut weights = Weights::default();
    // The biases one layer declares: every layer's are its layer's (the list stays short
    // however many layers config.json claims, which `check_layer_count` checks once the
    // tensors are read).
    let one_layer = ModelConfig {
        layers: config.layers.min(1),
        nope_layers: None,
        local_attention: None,
        ..config.clone()
    };
    let rules = TensorRules {
        biases: weight_shapes(&one_layer)
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| name.ends_with(".bias"))
            .collect(),
        // GLM-4-0414's output norms have names of their own (`hf_glm`).
        post_norms: config.post_norms && !hf_glm::has_output_norms(&cfg),
        multimodal,
        model_layers: hf_deepseek::is_v3(&cfg).then_some(config.layers),
    };
    let mut packed = hf_gpt_oss::PackedExperts::default();
    for (i, file) in files.iter().enumerate() {
        progress(i as f64 / files.len() as f64);
        read_safetensors(file, (&mut weights, &mut packed), &rules).map_err(|m| err(file, m))?;
    }
    packed.finish().map_err(|m| err(dir, m))?;
    rope.add_factors(&mut weights).map_err(|m| err(dir, m))?;
    check_layer_count(&config, &weights).map_err(|m| err(dir, m))?;
    if gpt_oss {
        hf_gpt_oss::shape_experts(&config, &mut weights).map_err(|m| err(dir, m))?;
    } else {
        hf_moe::stack_experts(&config, &mut weights).map_err(|m| err(dir, m))?;
    }
    hf_deepseek::split_keys_and_values(&config, &mut weights).map_err(|m| err(dir, m))?;
    if let Some(family) = Family::of(&cfg) {
        family
            .prepare_weights(&config, &mut weights)
            .map_err(|m| err(dir, m))?;
    }
    hf_layer_norm::split_qkv_by_group(&config, &mut weights).map_err(|m| err(dir, m))?;
    split_fused_weights(&config, &mut weights).map_err(|m| err(dir, m))?;
    if config.scale_embeddings {
        offset_norm_weights(&config, &mut weights).map_err(|m| err(dir, m))?;
    }
    // The classifier is tied where the files have no `lm_head.weight`, whatever
    // `tie_word_embeddings` says: transformers 5 unties a tied pair whose two tensors are
    // both stored and differ (and using the stored copy of an equal one computes the same).
    let config = ModelConfig {
        tied_classifier: weights.weight_shape("output.weight").is_none(),
        ..config
    };
    check_every_weight_read(&config, &weights).map_err(|m| err(dir, m))?;
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() {
        let stops = eos_ids(dir, &stored, &config_path)?;
        let tokenizer = HfTokenizer::load(&tokenizer_path)?.with_stop_tokens(&stops);
        Some(Box::new(tokenizer) as Box<dyn crate::tokenizer::TextCodec>)
    } else {
        None
    };
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
    })
}
