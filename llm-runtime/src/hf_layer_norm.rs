//! Hugging Face's models of the original transformer's shape, with LayerNorms that add a
//! bias: Phi-2 (`PhiForCausalLM`), StableLM (`StableLmForCausalLM`, StableLM 2 and 3B-4E1T),
//! StarCoder2 (`Starcoder2ForCausalLM`), GPT-NeoX (`GPTNeoXForCausalLM`: Pythia,
//! GPT-NeoX-20B), GPT-2 (`GPT2LMHeadModel`) and GPT-BigCode (`GPTBigCodeForCausalLM`:
//! StarCoder, SantaCoder), whose positions are learned embeddings, and GPT-J
//! (`GPTJForCausalLM`). What sets each apart from a Llama is read here into
//! [`ModelConfig`] (GPT-2's config keys into the usual ones first, [`standard_config`]);
//! their tensors' names are in `hf::weight_name` (GPT-NeoX's, GPT-2's, GPT-BigCode's
//! and GPT-J's here, [`gpt_neox_name`], [`gpt_name`]).

use serde_json::Value as Json;

use crate::{
    hf::{config_int, flag_or, names_architecture, optional_positive},
    model::{
        AttentionBias, Blocks, FUSED_QKV, FUSED_QKV_BIAS, FeedForward, ModelConfig, Norm,
        POSITION_EMBEDDINGS,
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
}

/// The [`Family`] members by their `architectures` names.
const MEMBERS: [(&str, Family); 7] = [
    ("PhiForCausalLM", Family::Phi),
    ("StableLmForCausalLM", Family::StableLm),
    ("Starcoder2ForCausalLM", Family::Starcoder2),
    ("GPTNeoXForCausalLM", Family::GptNeox),
    ("GPT2LMHeadModel", Family::Gpt2),
    ("GPTBigCodeForCausalLM", Family::GptBigCode),
    ("GPTJForCausalLM", Family::GptJ),
];

/// The `architectures` names of the [`Family`] members.
pub(crate) const ARCHITECTURES: [&str; 7] = [
    MEMBERS[0].0,
    MEMBERS[1].0,
    MEMBERS[2].0,
    MEMBERS[3].0,
    MEMBERS[4].0,
    MEMBERS[5].0,
    MEMBERS[6].0,
];

/// `cfg` with GPT-2's, GPT-BigCode's and GPT-J's keys (`n_embd`, `n_layer`, `n_head`,
/// `n_positions`, `n_inner`, `layer_norm_epsilon`, `multi_query`) also under the names
/// the loader reads (`hidden_size`, ...; `intermediate_size` 4 `n_embd` where `n_inner`
/// is null, `num_key_value_heads` 1 for a multi-query model), as their configuration
/// classes map them; any other config as it is.
pub(crate) fn standard_config(mut cfg: Json) -> Json {
    let Some(family @ (Family::Gpt2 | Family::GptBigCode | Family::GptJ)) = Family::of(&cfg) else {
        return cfg;
    };
    let multi_query = family == Family::GptBigCode
        && cfg
            .get("multi_query")
            .and_then(Json::as_bool)
            .unwrap_or(true);
    let Some(fields) = cfg.as_object_mut() else {
        return cfg;
    };
    let renames = [
        ("n_embd", "hidden_size"),
        ("n_layer", "num_hidden_layers"),
        ("n_head", "num_attention_heads"),
        ("n_positions", "max_position_embeddings"),
        ("layer_norm_epsilon", "layer_norm_eps"),
    ];
    for (theirs, ours) in renames {
        if let Some(v) = fields.get(theirs).cloned() {
            fields.entry(ours).or_insert(v);
        }
    }
    let inner = fields.get("n_inner").filter(|v| !v.is_null()).cloned();
    let width = fields.get("n_embd").and_then(Json::as_u64);
    if let Some(inner) = inner.or_else(|| width.map(|w| Json::from(4 * w))) {
        fields.entry("intermediate_size").or_insert(inner);
    }
    if multi_query {
        fields.entry("num_key_value_heads").or_insert(Json::from(1));
    }
    cfg
}

impl Family {
    /// The member `cfg`'s `architectures` names, if any.
    pub(crate) fn of(cfg: &Json) -> Option<Family> {
        MEMBERS
            .iter()
            .find(|(name, _)| names_architecture(cfg, name))
            .map(|&(_, family)| family)
    }

    /// Whether the classifier is tied to the embedding where the config does not say
    /// (`tie_word_embeddings`: `Starcoder2Config`'s default is true, the others' false).
    pub(crate) fn ties_by_default(self) -> bool {
        matches!(self, Family::Starcoder2 | Family::Gpt2 | Family::GptBigCode)
    }

    /// The share of each head RoPE rotates where `cfg` gives no `partial_rotary_factor`
    /// (the configuration classes' defaults: Phi's 0.5, StableLM's 0.25, GPT-NeoX's
    /// `rotary_pct`, 0.25 by default).
    pub(crate) fn default_rotary_factor(self, cfg: &Json) -> Result<f64, String> {
        Ok(match self {
            Family::Phi => 0.5,
            Family::StableLm => 0.25,
            Family::Starcoder2 | Family::Gpt2 | Family::GptBigCode | Family::GptJ => 1.0,
            Family::GptNeox => match optional_positive(cfg, "rotary_pct")? {
                Some(pct) if pct <= 1.0 => pct,
                Some(pct) => {
                    return Err(format!("`rotary_pct` = {pct} is not a fraction in (0, 1]"));
                }
                None => 0.25,
            },
        })
    }

    /// The feed-forward activation (`hidden_act`) where the config does not say.
    pub(crate) fn default_activation(self) -> &'static str {
        match self {
            Family::Phi => "gelu_new",
            Family::StableLm => "silu",
            Family::Starcoder2 => "gelu_pytorch_tanh",
            Family::GptNeox => "gelu",
            Family::Gpt2 | Family::GptJ => "gelu_new",
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
    /// the classes default it). Phi's and StableLM's per-head q/k LayerNorms
    /// (`qk_layernorm`, StableLM 2 12B's) are refused: the builder has none.
    pub(crate) fn apply(self, cfg: &Json, c: &mut ModelConfig) -> Result<(), String> {
        let flag = |key: &str, default: bool| flag_or(cfg, key, default);
        if matches!(self, Family::Phi | Family::StableLm) && flag("qk_layernorm", false)? {
            return Err("`qk_layernorm` is true: per-head q/k LayerNorms are not supported".into());
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
                c.feed_forward = FeedForward::Ungated;
                c.attention_bias = AttentionBias {
                    qkv: true,
                    output: true,
                };
                c.ffn_bias = true;
                c.classifier_bias = true;
            }
            Family::StableLm => {
                if flag("use_parallel_residual", false)? {
                    c.blocks = Blocks::ParallelSharedNorm;
                }
                c.attention_bias = AttentionBias {
                    qkv: flag("use_qkv_bias", false)?,
                    output: false,
                };
            }
            Family::Starcoder2 => {
                let bias = flag("use_bias", true)?;
                c.feed_forward = FeedForward::Ungated;
                c.attention_bias = AttentionBias {
                    qkv: bias,
                    output: bias,
                };
                c.ffn_bias = bias;
            }
            Family::GptNeox => {
                if flag("use_parallel_residual", true)? {
                    c.blocks = Blocks::Parallel;
                }
                let bias = flag("attention_bias", true)?;
                c.feed_forward = FeedForward::Ungated;
                c.attention_bias = AttentionBias {
                    qkv: bias,
                    output: bias,
                };
                c.ffn_bias = true;
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
                c.feed_forward = FeedForward::Ungated;
                c.attention_bias = AttentionBias {
                    qkv: true,
                    output: true,
                };
                c.ffn_bias = true;
            }
            Family::GptJ => {
                c.blocks = Blocks::ParallelSharedNorm;
                c.feed_forward = FeedForward::Ungated;
                c.ffn_bias = true;
                c.classifier_bias = true;
                c.rope_half = false;
                // `rotary_dim` features of each head, or all where it is null.
                if cfg.get("rotary_dim").is_some_and(|v| !v.is_null()) {
                    let rotary = config_int(cfg, "rotary_dim")?;
                    c.rotary_dim = (rotary != c.head_dim()).then_some(rotary);
                }
            }
        }
        Ok(())
    }

    /// Puts the member's loaded `weights` in the builder's layout: GPT-2's `Conv1D`
    /// matrices (`c_attn`, `c_proj`, `c_fc`) transposed, and a GPT-BigCode model's q, k
    /// and v fused per head (one KV head a query head) named for [`split_qkv_by_head`].
    pub(crate) fn prepare_weights(
        self,
        c: &ModelConfig,
        weights: &mut Weights,
    ) -> Result<(), String> {
        for l in 0..c.layers {
            let p = format!("layers.{l}.");
            match self {
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
                        if let Some(value) = weights.remove(&format!("{p}{fused}")) {
                            weights.insert(format!("{p}{QKV_BY_HEAD}.{kind}"), (*value).clone());
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
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
    let mut parts: Vec<(String, String)> = stems
        .iter()
        .flat_map(|(theirs, ours)| {
            ["weight", "bias"].map(|kind| (format!("{theirs}.{kind}"), format!("{ours}.{kind}")))
        })
        .collect();
    parts.extend([
        ("attn.c_attn.weight".to_string(), FUSED_QKV.to_string()),
        ("attn.c_attn.bias".to_string(), FUSED_QKV_BIAS.to_string()),
    ]);
    let parts: Vec<(&str, &str)> = parts
        .iter()
        .map(|(h, o)| (h.as_str(), o.as_str()))
        .collect();
    builder_name(
        hf,
        &[
            ("wte.weight", "tok_embeddings.weight"),
            ("wpe.weight", POSITION_EMBEDDINGS),
            ("ln_f.weight", "norm.weight"),
            ("ln_f.bias", "norm.bias"),
        ],
        "h.",
        &parts,
    )
}

/// The builder's name for a GPT-NeoX tensor (`gpt_neox.layers.N.attention.dense.weight`
/// -> `layers.N.attention.wo.weight`, ...): its fused q, k and v projection (per head, its
/// q, k and v rows) becomes `attention.wqkv_by_head`, which [`split_gpt_neox_qkv`] splits.
/// `embed_out` is the classifier of checkpoints before transformers 5, `lm_head` since.
pub(crate) fn gpt_neox_name(hf: &str) -> Option<String> {
    let stems = [
        ("input_layernorm", "attention_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("attention.query_key_value", QKV_BY_HEAD),
        ("attention.dense", "attention.wo"),
        ("mlp.dense_h_to_4h", "feed_forward.w3"),
        ("mlp.dense_4h_to_h", "feed_forward.w2"),
    ];
    let parts: Vec<(String, String)> = stems
        .iter()
        .flat_map(|(theirs, ours)| {
            ["weight", "bias"].map(|kind| (format!("{theirs}.{kind}"), format!("{ours}.{kind}")))
        })
        .collect();
    let parts: Vec<(&str, &str)> = parts
        .iter()
        .map(|(h, o)| (h.as_str(), o.as_str()))
        .collect();
    builder_name(
        hf,
        &[
            ("gpt_neox.embed_in.weight", "tok_embeddings.weight"),
            ("gpt_neox.final_layer_norm.weight", "norm.weight"),
            ("gpt_neox.final_layer_norm.bias", "norm.bias"),
            ("embed_out.weight", "output.weight"),
        ],
        "gpt_neox.layers.",
        &parts,
    )
}

/// The builder's stem of GPT-NeoX's fused q, k and v projection ([`gpt_neox_name`]).
pub(crate) const QKV_BY_HEAD: &str = "attention.wqkv_by_head";

/// Splits every layer's q, k and v projection and bias fused per head (GPT-NeoX's, and
/// GPT-BigCode's with a KV head a query head: per head, `head_dim` q rows, then k rows,
/// then v rows) into the builder's `attention.w{q,k,v}`.
pub(crate) fn split_qkv_by_head(c: &ModelConfig, weights: &mut Weights) -> Result<(), String> {
    let head_dim = c.head_dim();
    for l in 0..c.layers {
        for kind in ["weight", "bias"] {
            let fused = format!("layers.{l}.{QKV_BY_HEAD}.{kind}");
            if weights.weight_shape(&fused).is_none() {
                continue;
            }
            let piece = |h: usize, p: &str| format!("{fused}.{h}.{p}");
            let pieces: Vec<(String, usize)> = (0..c.heads)
                .flat_map(|h| ["q", "k", "v"].map(|p| (piece(h, p), head_dim)))
                .collect();
            weights.split_rows(&fused, &pieces)?;
            for p in ["q", "k", "v"] {
                let heads: Vec<String> = (0..c.heads).map(|h| piece(h, p)).collect();
                weights.concat_rows(&heads, &format!("layers.{l}.attention.w{p}.{kind}"))?;
            }
        }
    }
    Ok(())
}
