//! Hugging Face's models of the original transformer's shape, with LayerNorms that add a
//! bias: Phi-2 (`PhiForCausalLM`), StableLM (`StableLmForCausalLM`, StableLM 2 and 3B-4E1T)
//! and StarCoder2 (`Starcoder2ForCausalLM`). What sets each apart from a Llama is read
//! here into [`ModelConfig`]; their tensors' names are in `hf::weight_name`.

use serde_json::Value as Json;

use crate::model::{AttentionBias, FeedForward, ModelConfig, Norm};

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
}

/// The `architectures` names of the [`Family`] members.
pub(crate) const ARCHITECTURES: [&str; 3] = [
    "PhiForCausalLM",
    "StableLmForCausalLM",
    "Starcoder2ForCausalLM",
];

impl Family {
    /// The member `cfg`'s `architectures` names, if any.
    pub(crate) fn of(cfg: &Json) -> Option<Family> {
        let family = [Family::Phi, Family::StableLm, Family::Starcoder2];
        ARCHITECTURES
            .iter()
            .zip(family)
            .find(|(name, _)| crate::hf::names_architecture(cfg, name))
            .map(|(_, family)| family)
    }

    /// The share of each head RoPE rotates where the config does not say (the
    /// configuration classes' defaults: Phi's 0.5, StableLM's 0.25).
    pub(crate) fn default_rotary_factor(self) -> f64 {
        match self {
            Family::Phi => 0.5,
            Family::StableLm => 0.25,
            Family::Starcoder2 => 1.0,
        }
    }

    /// The feed-forward activation (`hidden_act`) where the config does not say.
    pub(crate) fn default_activation(self) -> &'static str {
        match self {
            Family::Phi => "gelu_new",
            Family::StableLm => "silu",
            Family::Starcoder2 => "gelu_pytorch_tanh",
        }
    }

    /// Sets the member's norms, blocks and biases in `c` from `cfg`: LayerNorms with biases
    /// of epsilon `layer_norm_eps` (StarCoder2's `norm_epsilon`; 1e-5 where left out, as
    /// the classes default it). Phi's and StableLM's per-head q/k LayerNorms
    /// (`qk_layernorm`, StableLM 2 12B's) are refused: the builder has none.
    pub(crate) fn apply(self, cfg: &Json, c: &mut ModelConfig) -> Result<(), String> {
        let flag = |key: &str, default: bool| match cfg.get(key) {
            None | Some(Json::Null) => Ok(default),
            Some(Json::Bool(b)) => Ok(*b),
            Some(other) => Err(format!("`{key}` = {other} is not a boolean")),
        };
        if self != Family::Starcoder2 && flag("qk_layernorm", false)? {
            return Err("`qk_layernorm` is true: per-head q/k LayerNorms are not supported".into());
        }
        let eps_key = match self {
            Family::Starcoder2 => "norm_epsilon",
            _ => "layer_norm_eps",
        };
        c.norm_eps = match cfg.get(eps_key) {
            None | Some(Json::Null) => 1e-5,
            Some(v) => v
                .as_f64()
                .filter(|v| v.is_finite() && *v > 0.0)
                .ok_or_else(|| format!("`{eps_key}` = {v} is not a positive number"))?,
        };
        c.norm = Norm::BiasedLayer;
        match self {
            Family::Phi => {
                c.parallel_blocks = true;
                c.feed_forward = FeedForward::Ungated;
                c.attention_bias = AttentionBias {
                    qkv: true,
                    output: true,
                };
                c.ffn_bias = true;
                c.classifier_bias = true;
            }
            Family::StableLm => {
                c.parallel_blocks = flag("use_parallel_residual", false)?;
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
        }
        Ok(())
    }
}
