//! Gemma 2's and 3's `config.json` settings, and the language model of Gemma 3's
//! multimodal checkpoints.
//!
//! Hugging Face fills what a Gemma config leaves out from its class's defaults
//! (`Gemma2Config`, `Gemma3TextConfig`), and the multimodal checkpoints
//! (`Gemma3ForConditionalGeneration`: Gemma 3 from 4B up) keep a sparse language-model
//! config in `text_config` and its tensors under `language_model.`, beside a vision tower
//! that text generation does not use. [`language_model_config`] gives the config the
//! loader reads, [`language_model_tensor`] the tensors, and [`apply`] the settings.

use serde_json::{Value as Json, json};

use crate::{
    hf::{config_int, names_architecture, optional_positive, rope_scaling, rope_settings},
    model::{LocalAttention, ModelConfig},
    rope_scaling::RopeScaling,
};

/// The multimodal Gemma 3 architecture, whose language model the loader reads.
pub(crate) const MULTIMODAL: &str = "Gemma3ForConditionalGeneration";

/// The generation of Gemma (1, 2 or 3) that `architectures` names, if any.
pub(crate) fn generation(cfg: &Json) -> Option<u8> {
    [
        ("GemmaForCausalLM", 1),
        ("Gemma2ForCausalLM", 2),
        ("Gemma3ForCausalLM", 3),
    ]
    .into_iter()
    .find(|(arch, _)| names_architecture(cfg, arch))
    .map(|(_, generation)| generation)
}

/// Hugging Face's defaults for the keys the loader reads (`Gemma2Config`'s and
/// `Gemma3TextConfig`'s, transformers 5.24): Gemma 3's RoPE base is 1e6 for the global
/// layers and 10000 for the local ones, and its soft-caps are off.
fn defaults(generation: u8) -> Json {
    let mut defaults = json!({
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
    });
    let more = match generation {
        2 => json!({
            "vocab_size": 256000,
            "max_position_embeddings": 8192,
            "rope_theta": 10000.0,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        }),
        _ => json!({
            "vocab_size": 262208,
            "max_position_embeddings": 131072,
            "rope_theta": 1e6,
            "rope_local_base_freq": 10000.0,
            "sliding_window_pattern": 6,
            "attn_logit_softcapping": null,
            "final_logit_softcapping": null,
        }),
    };
    if let (Json::Object(all), Json::Object(more)) = (&mut defaults, more) {
        all.extend(more);
    }
    defaults
}

/// The configuration of the language model that `cfg` (a `config.json`) describes: a
/// multimodal Gemma 3's `text_config` as a `Gemma3ForCausalLM`, a Gemma 2's or 3's
/// with Hugging Face's defaults where it has no key ([`defaults`]); any other as it is.
pub(crate) fn language_model_config(cfg: &Json) -> Result<Json, String> {
    let (mut text, generation) = if names_architecture(cfg, MULTIMODAL) {
        let mut text = cfg
            .get("text_config")
            .filter(|t| t.is_object())
            .ok_or("`text_config` is missing: a Gemma 3 multimodal checkpoint keeps its language model's settings there")?
            .clone();
        text["architectures"] = json!(["Gemma3ForCausalLM"]);
        (text, 3)
    } else {
        match generation(cfg) {
            Some(generation @ 2..) => (cfg.clone(), generation),
            _ => return Ok(cfg.clone()),
        }
    };
    if let (Json::Object(text), Json::Object(defaults)) = (&mut text, defaults(generation)) {
        for (key, value) in defaults {
            text.entry(key).or_insert(value);
        }
    }
    Ok(text)
}

/// A multimodal Gemma 3's tensor `name` as the language model's (`language_model.model.`
/// or transformers 5's `model.language_model.` becomes `model.`), or `None` for the
/// vision tower's and projector's, which text generation does not read. Other names come
/// back as they are.
pub(crate) fn language_model_tensor(name: &str) -> Option<String> {
    let vision = ["vision_tower.", "multi_modal_projector."];
    if vision.iter().any(|v| {
        name.starts_with(v)
            || name
                .strip_prefix("model.")
                .is_some_and(|n| n.starts_with(v))
    }) {
        return None;
    }
    let renames = [
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ];
    Some(
        renames
            .iter()
            .find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}")))
            .unwrap_or_else(|| name.to_string()),
    )
}

/// `key` of a Gemma config as a positive number.
fn positive(cfg: &Json, key: &str) -> Result<f64, String> {
    optional_positive(cfg, key)?.ok_or_else(|| format!("`{key}` is missing"))
}

/// Which of `layers` layers attend locally: as `layer_types` says (`sliding_attention` or
/// `full_attention` each), else every `period()`-th layer global and the others local
/// (Gemma 2's alternation, Gemma 3's and Cohere 2's `sliding_window_pattern`), as
/// Hugging Face derives them.
pub(crate) fn local_layers(
    cfg: &Json,
    layers: usize,
    period: impl FnOnce() -> Result<usize, String>,
) -> Result<Vec<bool>, String> {
    if let Some(types) = cfg.get("layer_types").filter(|t| !t.is_null()) {
        let types = types.as_array().ok_or("`layer_types` is not a list")?;
        if types.len() != layers {
            return Err(format!(
                "`layer_types` lists {} layers, but `num_hidden_layers` is {layers}",
                types.len()
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(format!(
                    "`layer_types` holds {t}: only sliding_attention and full_attention layers are supported"
                )),
            })
            .collect();
    }
    Ok(LocalAttention::periodic_layers(layers, period()?))
}

/// Gemma 2's and 3's settings (`cfg` with its defaults, [`language_model_config`]) over
/// the Llama configuration `c`: sandwich norms; the query scale `query_pre_attn_scalar **
/// -0.5`; the soft-caps `attn_logit_softcapping` and `final_logit_softcapping` (null for
/// none); local attention over `sliding_window` positions in the layers
/// [`local_layers`] names (Gemma 2's even layers, Gemma 3's by `sliding_window_pattern`),
/// with Gemma 3's local RoPE base (`rope_local_base_freq`, or
/// transformers 5's `rope_parameters.sliding_attention`, which must be unscaled).
pub(crate) fn apply(cfg: &Json, generation: u8, c: &mut ModelConfig) -> Result<(), String> {
    c.post_norms = true;
    c.attention_scale = Some(positive(cfg, "query_pre_attn_scalar")?.powf(-0.5));
    // A soft-cap is none where it is null.
    c.attention_softcap = optional_positive(cfg, "attn_logit_softcapping")?;
    c.logit_softcap = optional_positive(cfg, "final_logit_softcapping")?;
    let rope_theta = match generation {
        2 => None,
        _ if cfg
            .get("rope_parameters")
            .is_some_and(|p| p.get("sliding_attention").is_some()) =>
        {
            let (theta, scaling) = rope_settings(cfg, "sliding_attention")?;
            if rope_scaling(scaling, cfg, theta, c.rotary())? != RopeScaling::NONE {
                return Err(
                    "`rope_parameters.sliding_attention` scales RoPE: the local layers' RoPE must be unscaled"
                        .into(),
                );
            }
            Some(theta)
        }
        _ => Some(positive(cfg, "rope_local_base_freq")?),
    };
    c.local_attention = Some(LocalAttention {
        window: config_int(cfg, "sliding_window")?,
        layers: local_layers(cfg, c.layers, || match generation {
            2 => Ok(2),
            _ => config_int(cfg, "sliding_window_pattern"),
        })?,
        rope_theta,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both layouts of a multimodal checkpoint's language model read as the text model's
    /// names; the vision tower and projector are skipped in either.
    #[test]
    fn multimodal_tensor_names() {
        let cases = [
            (
                "language_model.model.layers.3.mlp.up_proj.weight",
                Some("model.layers.3.mlp.up_proj.weight"),
            ),
            (
                "model.language_model.norm.weight",
                Some("model.norm.weight"),
            ),
            ("language_model.lm_head.weight", Some("lm_head.weight")),
            ("vision_tower.vision_model.post_layernorm.weight", None),
            (
                "model.vision_tower.vision_model.post_layernorm.weight",
                None,
            ),
            ("multi_modal_projector.mm_input_projection_weight", None),
            ("model.multi_modal_projector.mm_soft_emb_norm.weight", None),
            (
                "model.layers.0.input_layernorm.weight",
                Some("model.layers.0.input_layernorm.weight"),
            ),
        ];
        for (stored, ours) in cases {
            assert_eq!(language_model_tensor(stored).as_deref(), ours, "{stored}");
        }
    }

    /// A sparse `text_config` gets `Gemma3TextConfig`'s defaults where it has no key, and
    /// keeps its own values.
    #[test]
    fn a_sparse_text_config_gets_the_defaults() {
        let cfg = json!({
            "architectures": [MULTIMODAL],
            "text_config": {"hidden_size": 2560, "num_hidden_layers": 34},
        });
        let text = language_model_config(&cfg).expect("a text config");
        assert_eq!(text["hidden_size"], 2560);
        assert_eq!(text["num_hidden_layers"], 34);
        assert_eq!(text["num_attention_heads"], 8);
        assert_eq!(text["rope_theta"], 1e6);
        assert_eq!(text["final_logit_softcapping"], Json::Null);
        assert_eq!(generation(&text), Some(3));
        let llama = json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64});
        assert_eq!(language_model_config(&llama).expect("as it is"), llama);
    }
}
