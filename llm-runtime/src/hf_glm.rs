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

/// `cfg` with `partial_rotary_factor` 0.5 where a GLM config leaves it out, as
/// `GlmConfig` and `Glm4Config` default it; any other config as it is.
pub(crate) fn standard_config(mut cfg: Json) -> Json {
    let absent = cfg.get("partial_rotary_factor").is_none_or(Json::is_null)
        && cfg
            .get("rope_parameters")
            .and_then(|r| r.get("partial_rotary_factor"))
            .is_none_or(Json::is_null);
    if is_glm(&cfg)
        && absent
        && let Some(fields) = cfg.as_object_mut()
    {
        fields.insert("partial_rotary_factor".into(), 0.5.into());
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

    /// RoPE over half of each head where the config leaves the share out, as
    /// transformers' GLM configs default it; a given share is kept.
    #[test]
    fn half_of_each_head_rotates_by_default() {
        let cfg = serde_json::json!({"architectures": ["Glm4ForCausalLM"]});
        assert_eq!(standard_config(cfg)["partial_rotary_factor"], 0.5);
        let given = serde_json::json!({
            "architectures": ["GlmForCausalLM"],
            "rope_parameters": {"partial_rotary_factor": 0.25},
        });
        assert!(standard_config(given)["partial_rotary_factor"].is_null());
        let llama = serde_json::json!({"architectures": ["LlamaForCausalLM"]});
        assert!(standard_config(llama)["partial_rotary_factor"].is_null());
    }
}
