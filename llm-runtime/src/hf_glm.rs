//! Hugging Face's GLM checkpoints: GLM-4 9B's (`GlmForCausalLM`) and GLM-4-0414's
//! (`Glm4ForCausalLM`), Llama's blocks with biases on the q, k and v projections (not on
//! the output projection), the gate and up projections fused (`mlp.gate_up_proj`, as
//! Phi-3's), RoPE over half of each head with its pairs interleaved (`(2i, 2i + 1)`, as
//! GLM's `rotate_half` pairs them), and GLM-4-0414's sandwich norms: each block's output
//! normalized before its residual add (`post_self_attn_layernorm`,
//! `post_mlp_layernorm`) besides the input norms (`input_layernorm`, and
//! `post_attention_layernorm`, which is the feed-forward block's input norm).

use serde_json::Value as Json;

use crate::{
    hf::{flag_or, names_architecture},
    model::{AttentionBias, ModelConfig, POST_ATTENTION_NORM, POST_FFW_NORM},
    weights::builder_name,
};

/// The GLM architectures read: GLM-4 9B's and GLM-4-0414's (with output norms).
pub(crate) const ARCHITECTURES: [&str; 2] = ["GlmForCausalLM", GLM4];

/// GLM-4-0414's architecture.
const GLM4: &str = "Glm4ForCausalLM";

/// Whether `cfg` is a GLM model's.
pub(crate) fn is_glm(cfg: &Json) -> bool {
    ARCHITECTURES.iter().any(|a| names_architecture(cfg, a))
}

/// Whether `cfg` is GLM-4-0414's, whose blocks' outputs are normalized: its
/// `post_attention_layernorm` is then the feed-forward block's input norm, not Gemma's
/// output norm of that name.
pub(crate) fn has_output_norms(cfg: &Json) -> bool {
    names_architecture(cfg, GLM4)
}

/// `cfg` with what a GLM config leaves out filled in as `GlmConfig` and `Glm4Config`
/// default it: `partial_rotary_factor` 0.5 (where the RoPE settings do not give it
/// either), `head_dim` 128, `num_key_value_heads` 2 and `rms_norm_eps` 1.5625e-7; any
/// other config as it is.
pub(crate) fn standard_config(mut cfg: Json) -> Json {
    if !is_glm(&cfg) {
        return cfg;
    }
    let rotation_given = cfg
        .get("rope_parameters")
        .and_then(|r| r.get("partial_rotary_factor"))
        .is_some_and(|f| !f.is_null());
    if let Some(fields) = cfg.as_object_mut() {
        let mut defaults = vec![
            ("head_dim", Json::from(128)),
            ("num_key_value_heads", Json::from(2)),
            ("rms_norm_eps", Json::from(1.5625e-7)),
        ];
        if !rotation_given {
            defaults.push(("partial_rotary_factor", Json::from(0.5)));
        }
        for (key, value) in defaults {
            if fields.get(key).is_none_or(Json::is_null) {
                fields.insert(key.into(), value);
            }
        }
    }
    cfg
}

/// Sets GLM's settings on `c`: interleaved RoPE pairs, biases on q, k and v where
/// `attention_bias` (the default), and GLM-4-0414's output norms.
pub(crate) fn apply(cfg: &Json, c: &mut ModelConfig) -> Result<(), String> {
    c.rope_half = false;
    c.attention_bias = AttentionBias {
        qkv: flag_or(cfg, "attention_bias", true)?,
        output: false,
    };
    c.post_norms = has_output_norms(cfg);
    Ok(())
}

/// The builder's name of GLM-4-0414's output norms (`post_self_attn_layernorm`, the
/// attention's, and `post_mlp_layernorm`, the feed-forward block's); `None` for other
/// tensors.
pub(crate) fn output_norm_name(hf: &str) -> Option<String> {
    builder_name(
        hf,
        &[],
        "model.layers.",
        &[
            ("post_self_attn_layernorm.weight", POST_ATTENTION_NORM),
            ("post_mlp_layernorm.weight", POST_FFW_NORM),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RoPE over half of each head, heads of 128, two KV heads and GLM's epsilon where
    /// the config leaves them out, as transformers' GLM configs default them; a given
    /// setting is kept.
    /// GLM-4-0414's output norms are named; other tensors are not GLM's.
    #[test]
    fn output_norm_names() {
        assert_eq!(
            output_norm_name("model.layers.3.post_mlp_layernorm.weight").as_deref(),
            Some("layers.3.post_ffw_norm.weight")
        );
        for other in [
            "model.layers.3.post_attention_layernorm.weight",
            "model.layers.x.post_self_attn_layernorm.weight",
            "model.post_mlp_layernorm.weight",
        ] {
            assert_eq!(output_norm_name(other), None, "{other}");
        }
    }

    #[test]
    fn half_of_each_head_rotates_by_default() {
        let cfg = serde_json::json!({"architectures": ["Glm4ForCausalLM"], "head_dim": 64});
        let cfg = standard_config(cfg);
        assert_eq!(cfg["partial_rotary_factor"], 0.5);
        assert_eq!(
            (&cfg["head_dim"], &cfg["num_key_value_heads"]),
            (&64.into(), &2.into())
        );
        assert_eq!(cfg["rms_norm_eps"], 1.5625e-7);
        let given = serde_json::json!({
            "architectures": ["GlmForCausalLM"],
            "rope_parameters": {"partial_rotary_factor": 0.25},
        });
        assert!(standard_config(given)["partial_rotary_factor"].is_null());
        let llama = serde_json::json!({"architectures": ["LlamaForCausalLM"]});
        assert!(standard_config(llama)["partial_rotary_factor"].is_null());
    }
}
