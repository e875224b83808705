//! Hugging Face's models of the original transformer's shape, with LayerNorms that add a
//! bias: Phi-2 (`PhiForCausalLM`), StableLM (`StableLmForCausalLM`, StableLM 2 and 3B-4E1T),
//! StarCoder2 (`Starcoder2ForCausalLM`), GPT-NeoX (`GPTNeoXForCausalLM`: Pythia,
//! GPT-NeoX-20B), GPT-2 (`GPT2LMHeadModel`) and GPT-BigCode (`GPTBigCodeForCausalLM`:
//! StarCoder, SantaCoder), whose positions are learned embeddings, GPT-J
//! (`GPTJForCausalLM`), Falcon (`FalconForCausalLM`) and OPT (`OPTForCausalLM`, learned
//! positions too). What sets each apart from a Llama is read here into [`ModelConfig`]
//! (GPT-2's, Falcon's and OPT's config keys into the usual ones first,
//! [`standard_config`]); their tensors' names are in `hf::weight_name` (GPT-NeoX's,
//! GPT-2's, GPT-BigCode's, GPT-J's, Falcon's and OPT's here, [`gpt_neox_name`],
//! [`gpt_name`], [`falcon_name`], [`opt_name`]; StableLM 2 12B's per-head q/k norms,
//! [`stablelm_head_norm_name`]).

use serde_json::Value as Json;

use crate::{
    hf::{config_int, flag_or, names_architecture, optional_positive},
    model::{
        AttentionBias, Blocks, FUSED_QKV, FUSED_QKV_BIAS, FeedForward, ModelConfig, Norm,
        POSITION_EMBEDDINGS, QkNorm,
    },
    weights::{Weights, builder_name},
};

/// One of the architectures of this module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// Phi-2 (and Phi-1.5): one LayerNorm feeding attention and an ungated GELU
    /// feed-forward block side by side, biases on every projection and the classifier,
    /// RoPE over part of each head.
    Phi,
    /// StableLM: LayerNorms, SwiGLU, RoPE over a quarter of each head, biases on the q, k
    /// and v projections where `use_qkv_bias`, parallel blocks where
    /// `use_parallel_residual`.
    StableLm,
    /// StarCoder2: LayerNorms, an ungated GELU feed-forward block, biases on every
    /// projection where `use_bias` (the default).
    Starcoder2,
    /// GPT-NeoX: LayerNorms, attention and an ungated exact-GELU feed-forward block side
    /// by side, each over its own norm, where `use_parallel_residual` (the default), q, k
    /// and v fused per head, biases on every projection where `attention_bias` (the
    /// default), RoPE over a quarter of each head.
    GptNeox,
    /// GPT-2: learned position embeddings and no RoPE, LayerNorms, an ungated GELU
    /// feed-forward block, biases on every projection, `Conv1D` matrices stored
    /// `[in, out]`, q, k and v fused (stacked).
    Gpt2,
    /// GPT-BigCode: GPT-2's shape with `nn.Linear` matrices and one KV head where
    /// `multi_query` (the default; q, k and v stacked), else q, k and v fused per head.
    GptBigCode,
    /// GPT-J: GPT-2's names and config keys, attention (no biases) and an ungated GELU
    /// feed-forward block side by side over one norm, RoPE with interleaved pairs over
    /// `rotary_dim` features of each head, a classifier with a bias.
    GptJ,
    /// Falcon: LayerNorms with biases, exact GELU, q, k and v fused by KV group (Falcon
    /// 7B's one KV head, Falcon 40B's and 180B's `new_decoder_architecture` groups),
    /// attention and feed-forward blocks side by side over one norm (`parallel_attn`) or
    /// each over its own (`ln_attn`, `ln_mlp`), biases where `bias`.
    Falcon,
    /// OPT: learned positions (offset by 2 rows), LayerNorms with biases before each
    /// block, an ungated ReLU feed-forward block, biases on every projection where
    /// `enable_bias` (the default).
    Opt,
}

/// The [`Family`] members by their `architectures` names.
const MEMBERS: [(&str, Family); 9] = [
    ("PhiForCausalLM", Family::Phi),
    ("StableLmForCausalLM", Family::StableLm),
    ("Starcoder2ForCausalLM", Family::Starcoder2),
    ("GPTNeoXForCausalLM", Family::GptNeox),
    ("GPT2LMHeadModel", Family::Gpt2),
    ("GPTBigCodeForCausalLM", Family::GptBigCode),
    ("GPTJForCausalLM", Family::GptJ),
    ("FalconForCausalLM", Family::Falcon),
    ("OPTForCausalLM", Family::Opt),
];

/// The `architectures` names of the [`Family`] members.
pub(crate) fn architectures() -> impl Iterator<Item = &'static str> {
    MEMBERS.iter().map(|(name, _)| *name)
}

/// `cfg` with GPT-2's, GPT-BigCode's and GPT-J's keys (`n_embd`, `n_layer`, `n_head`,
/// `n_positions`, `n_inner`, `layer_norm_epsilon`, `multi_query`)
/// also under the names the loader reads (`hidden_size`, ...; `intermediate_size` 4
/// `n_embd` where `n_inner` is null; GPT-BigCode's `num_key_value_heads` 1 for a
/// multi-query model, the default, else the head count, whatever the config says, as
/// `GPTBigCodeConfig` sets it), as their configuration classes map them; Falcon's too
/// ([`falcon_config`]), and OPT's `ffn_dim` as `intermediate_size`; any other config as
/// it is.
///
/// # Errors
///
/// A `multi_query` (or Falcon's `new_decoder_architecture`) that is not a boolean, or
/// an `n_embd` too large to widen.
pub(crate) fn standard_config(mut cfg: Json) -> Result<Json, String> {
    let family = Family::of(&cfg);
    if family == Some(Family::Falcon) {
        return falcon_config(cfg);
    }
    if family == Some(Family::Opt) {
        if let Some(fields) = cfg.as_object_mut() {
            copy_key(fields, "ffn_dim", "intermediate_size");
        }
        return Ok(cfg);
    }
    let Some(family @ (Family::Gpt2 | Family::GptBigCode | Family::GptJ)) = family else {
        return Ok(cfg);
    };
    let multi_query = family == Family::GptBigCode && flag_or(&cfg, "multi_query", true)?;
    let heads = cfg.get("n_head").cloned();
    let Some(fields) = cfg.as_object_mut() else {
        return Ok(cfg);
    };
    let renames = [
        ("n_embd", "hidden_size"),
        ("n_layer", "num_hidden_layers"),
        ("n_head", "num_attention_heads"),
        ("n_positions", "max_position_embeddings"),
        ("layer_norm_epsilon", "layer_norm_eps"),
    ];
    for (theirs, ours) in renames {
        copy_key(fields, theirs, ours);
    }
    copy_key(fields, "n_inner", "intermediate_size");
    widen_by_default(fields, "n_embd")?;
    if family == Family::GptBigCode {
        let kv_heads = if multi_query {
            Some(Json::from(1))
        } else {
            heads
        };
        if let Some(kv_heads) = kv_heads {
            fields.insert("num_key_value_heads".into(), kv_heads);
        }
    }
    Ok(cfg)
}

/// Gives `c` an ungated feed-forward block, biases on every attention projection where
/// `attention` and on the feed-forward projections where `ffn`.
fn ungated(c: &mut ModelConfig, attention: bool, ffn: bool) {
    c.feed_forward = FeedForward::Ungated;
    c.attention_bias = AttentionBias {
        qkv: attention,
        output: attention,
    };
    c.ffn_bias = ffn;
}

/// Copies `fields[theirs]`, where it is there and not null, to `ours` unless that is set.
fn copy_key(fields: &mut serde_json::Map<String, Json>, theirs: &str, ours: &str) {
    if let Some(v) = fields.get(theirs).filter(|v| !v.is_null()).cloned() {
        fields.entry(ours).or_insert(v);
    }
}

/// Sets `intermediate_size`, where nothing set it, to 4 times the width `fields[width]`
/// (GPT-2's and Falcon's default).
fn widen_by_default(fields: &mut serde_json::Map<String, Json>, width: &str) -> Result<(), String> {
    if fields.contains_key("intermediate_size") {
        return Ok(());
    }
    if let Some(w) = fields.get(width).and_then(Json::as_u64) {
        let wide = w
            .checked_mul(4)
            .ok_or_else(|| format!("`{width}` = {w} is out of range"))?;
        fields.insert("intermediate_size".into(), Json::from(wide));
    }
    Ok(())
}

impl Family {
    /// The member `cfg`'s `architectures` names, if any.
    pub(crate) fn of(cfg: &Json) -> Option<Family> {
        MEMBERS
            .iter()
            .find(|(name, _)| names_architecture(cfg, name))
            .map(|&(_, family)| family)
    }

    /// The share of each head RoPE rotates where `cfg` gives no `partial_rotary_factor`
    /// (the configuration classes' defaults: Phi's 0.5, StableLM's 0.25, GPT-NeoX's
    /// `rotary_pct`, 0.25 by default).
    pub(crate) fn default_rotary_factor(self, cfg: &Json) -> Result<f64, String> {
        Ok(match self {
            Family::Phi => 0.5,
            Family::StableLm => 0.25,
            Family::Starcoder2
            | Family::Gpt2
            | Family::GptBigCode
            | Family::GptJ
            | Family::Falcon
            | Family::Opt => 1.0,
            Family::GptNeox => match optional_positive(cfg, "rotary_pct")? {
                Some(pct) if pct <= 1.0 => pct,
                Some(pct) => {
                    return Err(format!("`rotary_pct` = {pct} is not a fraction in (0, 1]"));
                }
                None => 0.25,
            },
        })
    }

    /// The config key naming the feed-forward activation: `hidden_act`, GPT-2's,
    /// GPT-BigCode's, GPT-J's and OPT's `activation_function`, Falcon's `activation`.
    pub(crate) fn activation_key(self) -> &'static str {
        match self {
            Family::Gpt2 | Family::GptBigCode | Family::GptJ | Family::Opt => "activation_function",
            Family::Falcon => "activation",
            _ => "hidden_act",
        }
    }

    /// The feed-forward activation ([`Family::activation_key`]) where the config does not
    /// say.
    pub(crate) fn default_activation(self) -> &'static str {
        match self {
            Family::Phi => "gelu_new",
            Family::StableLm => "silu",
            Family::Starcoder2 => "gelu_pytorch_tanh",
            Family::GptNeox => "gelu",
            Family::Gpt2 | Family::GptJ => "gelu_new",
            Family::Falcon => "gelu",
            Family::Opt => "relu",
            Family::GptBigCode => "gelu_pytorch_tanh",
        }
    }

    /// Whether the member rotates part of each head (Phi's, StableLM's and GPT-NeoX's
    /// attention do; StarCoder2's rotates whole heads).
    pub(crate) fn rotates_part(self) -> bool {
        matches!(self, Family::Phi | Family::StableLm | Family::GptNeox)
    }

    /// Sets the member's norms, blocks, biases and RoPE in `c` from `cfg`: LayerNorms with biases
    /// of epsilon `layer_norm_eps` (StarCoder2's `norm_epsilon`; 1e-5 where left out, as
    /// the classes default it). StableLM's per-head q/k LayerNorms (`qk_layernorm`,
    /// StableLM 2 12B's: each head its own weights, no bias) are read; Phi's (one
    /// LayerNorm with a bias shared by the heads) are refused.
    pub(crate) fn apply(self, cfg: &Json, c: &mut ModelConfig) -> Result<(), String> {
        let flag = |key: &str, default: bool| flag_or(cfg, key, default);
        if self == Family::Phi && flag("qk_layernorm", false)? {
            return Err(
                "`qk_layernorm` is true: Phi's shared q/k LayerNorms are not supported".into(),
            );
        }
        let eps_key = match self {
            Family::Starcoder2 => "norm_epsilon",
            _ => "layer_norm_eps",
        };
        c.norm_eps = optional_positive(cfg, eps_key)?.unwrap_or(1e-5);
        c.norm = Norm::BiasedLayer;
        match self {
            Family::Phi => {
                c.blocks = Blocks::ParallelSharedNorm;
                ungated(c, true, true);
                c.classifier_bias = true;
            }
            Family::StableLm => {
                if flag("use_parallel_residual", false)? {
                    c.blocks = Blocks::ParallelSharedNorm;
                }
                if flag("qk_layernorm", false)? {
                    c.qk_norm = QkNorm::LayerHeads;
                }
                c.attention_bias = AttentionBias {
                    qkv: flag("use_qkv_bias", false)?,
                    output: false,
                };
            }
            Family::Starcoder2 => {
                let bias = flag("use_bias", true)?;
                ungated(c, bias, bias);
            }
            Family::GptNeox => {
                if flag("use_parallel_residual", true)? {
                    c.blocks = Blocks::Parallel;
                }
                ungated(c, flag("attention_bias", true)?, true);
                // Older configs name RoPE's base `rotary_emb_base`.
                let stated = cfg.get("rope_theta").is_some()
                    || cfg
                        .get("rope_parameters")
                        .is_some_and(|p| p.get("rope_theta").is_some());
                if let (false, Some(base)) = (stated, optional_positive(cfg, "rotary_emb_base")?) {
                    c.rope_theta = base;
                }
                if c.kv_heads != c.heads {
                    return Err(format!(
                        "`num_key_value_heads` = {}: GPT-NeoX's q, k and v are fused per head, one KV head a query head",
                        config_int(cfg, "num_key_value_heads")?
                    ));
                }
            }
            Family::Gpt2 | Family::GptBigCode => {
                if flag("scale_attn_by_inverse_layer_idx", false)? {
                    return Err("`scale_attn_by_inverse_layer_idx` is true: scores scaled by layer are not supported".into());
                }
                if !flag("scale_attn_weights", true)? {
                    c.attention_scale = Some(1.0);
                }
                c.learned_positions = true;
                ungated(c, true, true);
            }
            Family::GptJ => {
                c.blocks = Blocks::ParallelSharedNorm;
                ungated(c, false, true);
                c.classifier_bias = true;
                c.rope_half = false;
                // `rotary_dim` features of each head (64 where absent, as `GPTJConfig`
                // defaults it); a null one rotates over the whole width, which only a
                // model of one head can take.
                let rotary = match cfg.get("rotary_dim") {
                    None => 64,
                    Some(Json::Null) if c.heads == 1 => c.head_dim(),
                    Some(Json::Null) => {
                        return Err(
                            "`rotary_dim` is null: RoPE over the whole width of several heads is not supported"
                                .into(),
                        );
                    }
                    Some(_) => config_int(cfg, "rotary_dim")?,
                };
                c.rotary_dim = (rotary != c.head_dim()).then_some(rotary);
            }
            Family::Falcon => {
                if flag("alibi", false)? {
                    return Err("`alibi` is true: ALiBi position biases are not supported".into());
                }
                let bias = flag("bias", false)?;
                ungated(c, bias, bias);
                c.blocks = if flag("new_decoder_architecture", false)? {
                    let norms = match cfg.get("num_ln_in_parallel_attn") {
                        None | Some(Json::Null) => 2,
                        Some(_) => config_int(cfg, "num_ln_in_parallel_attn")?,
                    };
                    match (norms, flag("parallel_attn", true)?) {
                        (2, true) => Blocks::Parallel,
                        (1, true) => Blocks::ParallelSharedNorm,
                        (n, parallel) => {
                            return Err(format!(
                                "`num_ln_in_parallel_attn` = {n} with `parallel_attn` = {parallel} is not supported (the new decoder architecture runs its blocks side by side, over 1 or 2 norms)"
                            ));
                        }
                    }
                } else if flag("parallel_attn", true)? {
                    Blocks::ParallelSharedNorm
                } else {
                    Blocks::Sequential
                };
            }
            Family::Opt => {
                let refused = [
                    (
                        "do_layer_norm_before",
                        true,
                        "norms after each block (OPT-350m's)",
                    ),
                    (
                        "layer_norm_elementwise_affine",
                        true,
                        "LayerNorms without weights",
                    ),
                    ("_remove_final_layer_norm", false, "no final norm"),
                ];
                for (key, supported, what) in refused {
                    if flag(key, supported)? != supported {
                        return Err(format!("`{key}` is {}: {what} not supported", !supported));
                    }
                }
                if let Some(projected) = cfg.get("word_embed_proj_dim").filter(|v| !v.is_null())
                    && projected.as_u64() != Some(c.dim as u64)
                {
                    return Err(format!(
                        "`word_embed_proj_dim` = {projected}: embeddings projected to the width (OPT-350m's) are not supported"
                    ));
                }
                c.learned_positions = true;
                let bias = flag("enable_bias", true)?;
                ungated(c, bias, bias);
            }
        }
        Ok(())
    }

    /// Puts the member's loaded `weights` in the builder's layout: GPT-2's `Conv1D`
    /// matrices (`c_attn`, `c_proj`, `c_fc`) transposed, a GPT-BigCode model's q, k and v
    /// fused per head (one KV head a query head) named for [`split_qkv_by_group`], and
    /// OPT's position table without its first two rows (OPT offsets positions by 2).
    pub(crate) fn prepare_weights(
        self,
        c: &ModelConfig,
        weights: &mut Weights,
    ) -> Result<(), String> {
        if self == Family::Opt {
            // Its positions' table begins with two rows no position reads.
            let rows = match weights.weight_shape(POSITION_EMBEDDINGS).as_deref() {
                Some([rows, _]) if *rows >= 2 => *rows,
                Some(shape) => {
                    return Err(format!(
                        "`embed_positions.weight` has shape {shape:?}: not a table of 2 rows and more"
                    ));
                }
                None => return Err("the model has no `embed_positions.weight`".into()),
            };
            let kept = format!("{POSITION_EMBEDDINGS}.kept");
            let parts = [
                ("positions.offset".to_string(), 2),
                (kept.clone(), rows - 2),
            ];
            weights.split_rows(POSITION_EMBEDDINGS, &parts)?;
            weights.remove("positions.offset");
            weights.rename(&kept, POSITION_EMBEDDINGS);
        }
        for l in 0..c.layers {
            let p = format!("layers.{l}.");
            match self {
                Family::StableLm if c.qk_norm == QkNorm::LayerHeads => {
                    // Each head's LayerNorm weights, one tensor a head, as `[heads, head_dim]`.
                    for (x, heads) in [("q", c.heads), ("k", c.kv_heads)] {
                        let parts: Vec<String> = (0..heads)
                            .map(|h| format!("{p}attention.{x}_norm.{h}.weight"))
                            .collect();
                        weights.stack(&parts, &format!("{p}attention.{x}_norm.weight"))?;
                    }
                }
                Family::Gpt2 => {
                    for name in [
                        FUSED_QKV,
                        "attention.wo.weight",
                        "feed_forward.w3.weight",
                        "feed_forward.w2.weight",
                    ] {
                        weights.transpose_matrix(&format!("{p}{name}"))?;
                    }
                }
                Family::GptBigCode if c.kv_heads == c.heads && c.heads > 1 => {
                    for (fused, kind) in [(FUSED_QKV, "weight"), (FUSED_QKV_BIAS, "bias")] {
                        weights.rename(&format!("{p}{fused}"), format!("{p}{QKV_BY_GROUP}.{kind}"));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The builder's name of one head's q or k LayerNorm weight of StableLM 2 12B
/// (`model.layers.N.self_attn.q_layernorm.norms.H.weight` ->
/// `layers.N.attention.q_norm.H.weight`), which [`Family::prepare_weights`] stacks into
/// `attention.q_norm.weight`; `None` for other tensors.
pub(crate) fn stablelm_head_norm_name(hf: &str) -> Option<String> {
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let (x, rest) = rest
        .strip_prefix("self_attn.")?
        .split_once("_layernorm.norms.")?;
    let head = rest.strip_suffix(".weight")?;
    let (layer, head): (usize, usize) = (layer.parse().ok()?, head.parse().ok()?);
    matches!(x, "q" | "k").then(|| format!("layers.{layer}.attention.{x}_norm.{head}.weight"))
}

/// `cfg` with Falcon's keys under the names the loader reads, as `FalconConfig` maps and
/// defaults them: `intermediate_size` from `ffn_hidden_size` (4 `hidden_size` where
/// null), `layer_norm_eps` from `layer_norm_epsilon`, `max_position_embeddings` 2048
/// where absent, and
/// `num_key_value_heads` from `num_kv_heads` in the new decoder architecture, else 1
/// for a multi-query model (the default) and the head count for another (whatever
/// `num_key_value_heads` said).
fn falcon_config(mut cfg: Json) -> Result<Json, String> {
    let new_architecture = flag_or(&cfg, "new_decoder_architecture", false)?;
    let multi_query = flag_or(&cfg, "multi_query", true)?;
    let heads = cfg.get("num_attention_heads").cloned();
    let Some(fields) = cfg.as_object_mut() else {
        return Ok(cfg);
    };
    copy_key(fields, "ffn_hidden_size", "intermediate_size");
    widen_by_default(fields, "hidden_size")?;
    copy_key(fields, "layer_norm_epsilon", "layer_norm_eps");
    fields
        .entry("max_position_embeddings")
        .or_insert(Json::from(2048));
    // `FalconAttention`'s KV heads, whatever `num_key_value_heads` says.
    let kv_heads = if new_architecture {
        fields.get("num_kv_heads").filter(|v| !v.is_null()).cloned()
    } else if multi_query {
        Some(Json::from(1))
    } else {
        heads
    };
    if let Some(kv_heads) = kv_heads {
        fields.insert("num_key_value_heads".into(), kv_heads);
    }
    Ok(cfg)
}

/// The builder's name for `hf` by `globals` and, under `layer_prefix`, by `stems` (each
/// a stem of theirs and ours, for the weight and the bias: `stem.weight`, `stem.bias`) and
/// the whole names `extra`.
fn layer_norm_model_name(
    hf: &str,
    stems: &[(&str, &str)],
    extra: &[(&str, &str)],
    globals: &[(&str, &str)],
    layer_prefix: &str,
) -> Option<String> {
    let pairs: Vec<(String, String)> = stems
        .iter()
        .flat_map(|(theirs, ours)| {
            ["weight", "bias"].map(|kind| (format!("{theirs}.{kind}"), format!("{ours}.{kind}")))
        })
        .collect();
    let mut parts: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(h, o)| (h.as_str(), o.as_str()))
        .collect();
    parts.extend_from_slice(extra);
    builder_name(hf, globals, layer_prefix, &parts)
}

/// The builder's name for an OPT tensor, with or without the `model.` prefix
/// (`model.decoder.layers.N.fc1.weight` ->
/// `layers.N.feed_forward.w3.weight`, ...): `self_attn_layer_norm` and a layer's
/// `final_layer_norm` are its attention's and feed-forward block's input norms, the
/// decoder's `final_layer_norm` the final norm, `embed_positions` the position table.
pub(crate) fn opt_name(hf: &str) -> Option<String> {
    // Checkpoints saved from `OPTModel` leave out `model.`.
    let hf = hf
        .strip_prefix("model.")
        .unwrap_or(hf)
        .strip_prefix("decoder.")?;
    let stems = [
        ("self_attn_layer_norm", "attention_norm"),
        ("self_attn.q_proj", "attention.wq"),
        ("self_attn.k_proj", "attention.wk"),
        ("self_attn.v_proj", "attention.wv"),
        ("self_attn.out_proj", "attention.wo"),
        ("final_layer_norm", "ffn_norm"),
        ("fc1", "feed_forward.w3"),
        ("fc2", "feed_forward.w2"),
    ];
    layer_norm_model_name(
        hf,
        &stems,
        &[],
        &[
            ("embed_tokens.weight", "tok_embeddings.weight"),
            ("embed_positions.weight", POSITION_EMBEDDINGS),
            ("final_layer_norm.weight", "norm.weight"),
            ("final_layer_norm.bias", "norm.bias"),
        ],
        "layers.",
    )
}

/// The builder's name for a Falcon tensor, with or without the `transformer.` prefix
/// (`transformer.h.N.self_attention.dense.weight` -> `layers.N.attention.wo.weight`,
/// ...): its q, k and v projection, fused by KV group, becomes the one
/// [`split_qkv_by_group`] splits; `ln_attn` and `ln_mlp` (the new decoder architecture's)
/// are the attention's and the feed-forward block's norms, as `input_layernorm` and
/// `post_attention_layernorm` are.
pub(crate) fn falcon_name(hf: &str) -> Option<String> {
    let hf = hf.strip_prefix("transformer.").unwrap_or(hf);
    let stems = [
        ("input_layernorm", "attention_norm"),
        ("ln_attn", "attention_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("ln_mlp", "ffn_norm"),
        ("self_attention.query_key_value", QKV_BY_GROUP),
        ("self_attention.dense", "attention.wo"),
        ("mlp.dense_h_to_4h", "feed_forward.w3"),
        ("mlp.dense_4h_to_h", "feed_forward.w2"),
    ];
    layer_norm_model_name(
        hf,
        &stems,
        &[],
        &[
            ("word_embeddings.weight", "tok_embeddings.weight"),
            ("ln_f.weight", "norm.weight"),
            ("ln_f.bias", "norm.bias"),
        ],
        "h.",
    )
}

/// The builder's name for a GPT-2, GPT-BigCode or GPT-J tensor, with or without the
/// `transformer.` prefix (`h.N.attn.c_attn.weight` -> `layers.N.attention.wqkv.weight`,
/// `wpe.weight` -> the position embeddings, `h.N.mlp.fc_in.weight` ->
/// `layers.N.feed_forward.w3.weight`, ...).
pub(crate) fn gpt_name(hf: &str) -> Option<String> {
    let hf = hf.strip_prefix("transformer.").unwrap_or(hf);
    let stems = [
        ("ln_1", "attention_norm"),
        ("attn.c_proj", "attention.wo"),
        ("ln_2", "ffn_norm"),
        ("mlp.c_fc", "feed_forward.w3"),
        ("mlp.c_proj", "feed_forward.w2"),
        ("attn.q_proj", "attention.wq"),
        ("attn.k_proj", "attention.wk"),
        ("attn.v_proj", "attention.wv"),
        ("attn.out_proj", "attention.wo"),
        ("mlp.fc_in", "feed_forward.w3"),
        ("mlp.fc_out", "feed_forward.w2"),
    ];
    layer_norm_model_name(
        hf,
        &stems,
        &[
            ("attn.c_attn.weight", FUSED_QKV),
            ("attn.c_attn.bias", FUSED_QKV_BIAS),
        ],
        &[
            ("wte.weight", "tok_embeddings.weight"),
            ("wpe.weight", POSITION_EMBEDDINGS),
            ("ln_f.weight", "norm.weight"),
            ("ln_f.bias", "norm.bias"),
        ],
        "h.",
    )
}

/// The builder's name for a GPT-NeoX tensor (`gpt_neox.layers.N.attention.dense.weight`
/// -> `layers.N.attention.wo.weight`, ...): its fused q, k and v projection (per head, its
/// q, k and v rows) becomes `attention.wqkv_by_group`, which [`split_qkv_by_group`] splits.
/// `embed_out` is the classifier as transformers saves it (it loads it as `lm_head`, a
/// name the generic mapping reads too).
pub(crate) fn gpt_neox_name(hf: &str) -> Option<String> {
    let stems = [
        ("input_layernorm", "attention_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("attention.query_key_value", QKV_BY_GROUP),
        ("attention.dense", "attention.wo"),
        ("mlp.dense_h_to_4h", "feed_forward.w3"),
        ("mlp.dense_4h_to_h", "feed_forward.w2"),
    ];
    layer_norm_model_name(
        hf,
        &stems,
        &[],
        &[
            ("gpt_neox.embed_in.weight", "tok_embeddings.weight"),
            ("gpt_neox.final_layer_norm.weight", "norm.weight"),
            ("gpt_neox.final_layer_norm.bias", "norm.bias"),
            ("embed_out.weight", "output.weight"),
        ],
        "gpt_neox.layers.",
    )
}

/// The builder's stem of a q, k and v projection fused by KV group (GPT-NeoX's, Falcon's,
/// a multi-head GPT-BigCode's), which [`split_qkv_by_group`] splits.
pub(crate) const QKV_BY_GROUP: &str = "attention.wqkv_by_group";

/// Splits every layer's q, k and v projection and bias fused by KV group into the
/// builder's `attention.w{q,k,v}`: per group, its query heads' rows, then its key head's,
/// then its value head's (GPT-NeoX's and a multi-head GPT-BigCode's, a group a head;
/// Falcon's, a group a KV head, one for Falcon 7B's one KV head).
pub(crate) fn split_qkv_by_group(c: &ModelConfig, weights: &mut Weights) -> Result<(), String> {
    let head_dim = c.head_dim();
    let group_heads = c.heads / c.kv_heads.max(1);
    for l in 0..c.layers {
        for kind in ["weight", "bias"] {
            let fused = format!("layers.{l}.{QKV_BY_GROUP}.{kind}");
            if weights.weight_shape(&fused).is_none() {
                continue;
            }
            let piece = |g: usize, p: &str| format!("{fused}.{g}.{p}");
            let pieces: Vec<(String, usize)> = (0..c.kv_heads)
                .flat_map(|g| {
                    [("q", group_heads), ("k", 1), ("v", 1)]
                        .map(|(p, heads)| (piece(g, p), heads * head_dim))
                })
                .collect();
            weights.split_rows(&fused, &pieces)?;
            for p in ["q", "k", "v"] {
                let groups: Vec<String> = (0..c.kv_heads).map(|g| piece(g, p)).collect();
                weights.concat_rows(&groups, &format!("layers.{l}.attention.w{p}.{kind}"))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{stablelm_head_norm_name, standard_config};

    /// StableLM 2 12B's per-head q and k norms are named by head; other tensors are not.
    #[test]
    fn per_head_norm_names() {
        assert_eq!(
            stablelm_head_norm_name("model.layers.2.self_attn.k_layernorm.norms.7.weight")
                .as_deref(),
            Some("layers.2.attention.k_norm.7.weight")
        );
        for other in [
            "model.layers.2.self_attn.v_layernorm.norms.7.weight",
            "model.layers.2.self_attn.q_layernorm.norms.x.weight",
            "model.layers.2.self_attn.q_layernorm.norms.7.bias",
            "model.layers.2.self_attn.q_norm.weight",
        ] {
            assert_eq!(stablelm_head_norm_name(other), None, "{other}");
        }
    }

    /// GPT-2's keys are read as the usual ones, `n_inner` null as 4 `n_embd`;
    /// GPT-BigCode's KV heads follow `multi_query` whatever the config says; Falcon's
    /// defaults are `FalconConfig`'s; keys of the wrong type are errors.
    #[test]
    fn older_config_keys_are_read_as_their_classes_read_them() {
        let gpt2 = json!({"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2,
            "n_head": 4, "n_positions": 128, "n_inner": null, "layer_norm_epsilon": 1e-5});
        let read = standard_config(gpt2).expect("reads");
        assert_eq!(
            (
                &read["hidden_size"],
                &read["intermediate_size"],
                &read["num_attention_heads"]
            ),
            (&json!(64), &json!(256), &json!(4))
        );
        assert_eq!(read["max_position_embeddings"], json!(128));
        let bigcode = |multi_query: serde_json::Value| {
            standard_config(
                json!({"architectures": ["GPTBigCodeForCausalLM"], "n_embd": 64,
                "n_head": 4, "num_key_value_heads": 2, "multi_query": multi_query}),
            )
        };
        assert_eq!(
            bigcode(json!(true)).expect("reads")["num_key_value_heads"],
            json!(1)
        );
        assert_eq!(
            bigcode(json!(false)).expect("reads")["num_key_value_heads"],
            json!(4)
        );
        let err = bigcode(json!("yes")).expect_err("not a boolean");
        assert!(err.contains("`multi_query`"), "{err}");
        let falcon = |more: serde_json::Value| {
            let mut cfg = json!({"architectures": ["FalconForCausalLM"], "hidden_size": 64,
                "num_attention_heads": 4, "num_kv_heads": 2});
            cfg.as_object_mut()
                .expect("object")
                .extend(more.as_object().expect("object").clone());
            standard_config(cfg).expect("reads")
        };
        let seven_b = falcon(json!({}));
        assert_eq!(
            (
                &seven_b["num_key_value_heads"],
                &seven_b["intermediate_size"]
            ),
            (&json!(1), &json!(256))
        );
        assert_eq!(seven_b["max_position_embeddings"], json!(2048));
        let forty_b = falcon(json!({"new_decoder_architecture": true}));
        assert_eq!(forty_b["num_key_value_heads"], json!(2));
        let mha = falcon(json!({"multi_query": false}));
        assert_eq!(mha["num_key_value_heads"], json!(4));
        let huge = standard_config(json!({"architectures": ["GPT2LMHeadModel"],
            "n_embd": u64::MAX}));
        assert!(huge.expect_err("too wide").contains("`n_embd`"));
    }
}
