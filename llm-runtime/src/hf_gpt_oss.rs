//! Hugging Face's gpt-oss checkpoints (`GptOssForCausalLM`: gpt-oss-20b, gpt-oss-120b):
//! Llama's blocks with biases on every attention projection, a learned attention sink a
//! head ([`ModelConfig::attention_sinks`]), a sliding window over the layers
//! `layer_types` marks (every other one), YaRN's RoPE, and mixtures of experts whose
//! router and experts add biases and whose experts' gate and up projections meet in a
//! clamped SwiGLU ([`ExpertGlu::ClampedSwiglu`]).
//!
//! The experts are stored stacked, as `x @ W` takes them: `mlp.experts.gate_up_proj`
//! (`[experts, dim, 2 * hidden]`, each gate column beside its up column) and `down_proj`
//! (`[experts, hidden, dim]`), with their biases (`gate_up_proj_bias`, interleaved alike,
//! and `down_proj_bias`). OpenAI's published checkpoints store the two matrices in MXFP4
//! instead: `gate_up_proj_blocks` (`[experts, 2 * hidden, dim / 32, 16]`, each byte two
//! four-bit floats, the low nibble first) with `gate_up_proj_scales` (`[experts,
//! 2 * hidden, dim / 32]`, E8M0 exponents), rows in the `[out, in]` orientation; the
//! loader repacks them into GGUF's MXFP4 blocks, losslessly ([`PackedExperts`]), which
//! `llm.expert_matmul` reads as they are. Either way the loader turns each expert's
//! matrices to `[out, in]` and takes the gate and up projections apart
//! ([`shape_experts`]).

use std::collections::{HashMap, HashSet};

use llm_ir::{interp::QTensor, types::QuantFormat};
use serde_json::Value as Json;

use crate::{
    hf::{flag_or, names_architecture},
    hf_gemma,
    model::{
        ATTENTION_SINKS, AttentionBias, EXPERT_DOWN_BIASES, EXPERT_DOWNS, EXPERT_GATE_BIASES,
        EXPERT_GATES, EXPERT_UP_BIASES, EXPERT_UPS, ExpertGlu, ExpertScoring, Experts,
        LocalAttention, ModelConfig, ROUTER, ROUTER_BIAS,
    },
    weights::{Weights, builder_name},
};

/// gpt-oss's architecture.
pub(crate) const ARCHITECTURE: &str = "GptOssForCausalLM";

/// Whether `cfg` is gpt-oss's.
pub(crate) fn is_gpt_oss(cfg: &Json) -> bool {
    names_architecture(cfg, ARCHITECTURE)
}

/// The experts' gate and up projections as `x @ W` takes them, `[experts, dim,
/// 2 * hidden]` with gate and up columns interleaved, until [`shape_experts`] turns and
/// separates them.
const GATE_UPS_BY_COLUMN: &str = "feed_forward.experts.w13c.weight";

/// The experts' gate and up projections `[experts, 2 * hidden, dim]` with gate and up
/// rows interleaved (the MXFP4 checkpoints' orientation), until [`shape_experts`]
/// separates them.
const GATE_UPS_BY_ROW: &str = "feed_forward.experts.w13r.weight";

/// The experts' down projections as `x @ W` takes them, `[experts, hidden, dim]`, until
/// [`shape_experts`] turns them into [`EXPERT_DOWNS`].
const DOWNS_BY_COLUMN: &str = "feed_forward.experts.w2c.weight";

/// The gate and up projections' biases, `[experts, 2 * hidden]`, interleaved, until
/// [`shape_experts`] separates them.
const GATE_UP_BIASES: &str = "feed_forward.experts.w13_biases";

/// The builder's name of a gpt-oss tensor that is not Llama's: the attention's sinks,
/// the router's matrix and bias, and the experts' stacks; `None` for other tensors.
pub(crate) fn name(hf: &str) -> Option<String> {
    builder_name(
        hf,
        &[],
        "model.layers.",
        &[
            ("self_attn.sinks", ATTENTION_SINKS),
            ("mlp.router.weight", ROUTER),
            ("mlp.router.bias", ROUTER_BIAS),
            ("mlp.experts.gate_up_proj", GATE_UPS_BY_COLUMN),
            ("mlp.experts.gate_up_proj_bias", GATE_UP_BIASES),
            ("mlp.experts.down_proj", DOWNS_BY_COLUMN),
            ("mlp.experts.down_proj_bias", EXPERT_DOWN_BIASES),
        ],
    )
}

/// `cfg` with what a gpt-oss config may leave out filled in as `GptOssConfig` defaults
/// it: heads of 64 (`head_dim`), 8 KV heads, a window of 128 positions
/// (`sliding_window`; null is none), RoPE's base 150000 (`rope_theta`, where neither it
/// nor the RoPE settings give one), and YaRN's scaling (factor 32 over 4096 positions,
/// `beta_fast` 32, `beta_slow` 1, no truncation) where neither `rope_parameters` nor
/// `rope_scaling` is given; any other config as it is. (Which layers the window covers,
/// `layer_types`, [`apply`] reads.)
pub(crate) fn standard_config(mut cfg: Json) -> Json {
    if !is_gpt_oss(&cfg) {
        return cfg;
    }
    let given = |cfg: &Json, key: &str| cfg.get(key).is_some_and(|v| !v.is_null());
    let rope_given = given(&cfg, "rope_parameters") || given(&cfg, "rope_scaling");
    let theta_given = given(&cfg, "rope_theta")
        || cfg
            .get("rope_parameters")
            .is_some_and(|r| given(r, "rope_theta"));
    let theta = cfg
        .get("rope_theta")
        .and_then(Json::as_f64)
        .unwrap_or(150000.0);
    if let Some(fields) = cfg.as_object_mut() {
        for (key, value) in [
            ("head_dim", Json::from(64)),
            ("num_key_value_heads", Json::from(8)),
        ] {
            if fields.get(key).is_none_or(Json::is_null) {
                fields.insert(key.into(), value);
            }
        }
        // Absent is transformers' default; null switches the window off.
        fields.entry("sliding_window").or_insert(Json::from(128));
        if !theta_given {
            fields.insert("rope_theta".into(), Json::from(150000.0));
        }
        if !rope_given {
            fields.insert(
                "rope_parameters".into(),
                serde_json::json!({
                    "rope_type": "yarn",
                    "rope_theta": theta,
                    "factor": 32.0,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "truncate": false,
                    "original_max_position_embeddings": 4096,
                }),
            );
        }
    }
    cfg
}

/// Sets gpt-oss's settings on `c`: biases on the q, k, v and output projections where
/// `attention_bias` (the default), attention sinks, local attention over `sliding_window`
/// positions in the layers `layer_types` marks (every other one from the first where
/// absent), and its experts: `num_local_experts` of
/// `intermediate_size`, `num_experts_per_tok` a token weighted by a softmax over their
/// logits, biases, and the clamped SwiGLU of `swiglu_alpha` (1.702) and `swiglu_limit`
/// (7).
pub(crate) fn apply(cfg: &Json, c: &mut ModelConfig) -> Result<(), String> {
    let bias = flag_or(cfg, "attention_bias", true)?;
    c.attention_bias = AttentionBias {
        qkv: bias,
        output: bias,
    };
    c.attention_sinks = true;
    let int = |key: &str| crate::hf::config_int(cfg, key);
    c.local_attention = match cfg.get("sliding_window").filter(|w| !w.is_null()) {
        None => None,
        Some(_) => {
            // Where `layer_types` is absent, every other layer from the first, as
            // `GptOssConfig` fills it in.
            let layers = hf_gemma::local_layers(cfg, c.layers, || Ok(2))?;
            layers.contains(&true).then_some(LocalAttention {
                window: int("sliding_window")?,
                layers,
                rope_theta: None,
            })
        }
    };
    let number = |key: &str, default: f64| match cfg.get(key) {
        None | Some(Json::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or(format!("`{key}` = {v} is not a number")),
    };
    c.experts = Some(Experts {
        count: int("num_local_experts")?,
        per_token: int("num_experts_per_tok")?,
        hidden: c.hidden_dim,
        normalize: true,
        layers: vec![true; c.layers],
        shared: None,
        scoring: ExpertScoring::Softmax,
        groups: None,
        scale: 1.0,
        biases: true,
        glu: ExpertGlu::ClampedSwiglu {
            alpha: number("swiglu_alpha", 1.702)?,
            limit: number("swiglu_limit", 7.0)?,
        },
    });
    Ok(())
}

/// gpt-oss's experts stored as MXFP4, each matrix in two tensors (`X_blocks` and
/// `X_scales`) that may lie in different files: the halves read so far, each kept until
/// its other half comes.
#[derive(Default)]
pub(crate) struct PackedExperts {
    /// Per matrix (the checkpoint's name without the suffix): its blocks and its scales,
    /// as read.
    halves: HashMap<String, [Option<Half>; 2]>,
    /// The matrices whose halves both came.
    done: HashSet<String>,
}

/// Half of a packed matrix as read: its shape and bytes.
type Half = (Vec<usize>, Vec<u8>);

impl PackedExperts {
    /// Takes the checkpoint's tensor `name` (of `shape`, stored as `data`, `is_u8` where its
    /// dtype is U8) where it is half of a packed expert matrix, inserting
    /// the matrix into `weights` once both halves are in: `Ok(true)` for a tensor taken,
    /// `Ok(false)` for another.
    ///
    /// # Errors
    ///
    /// A half that is not bytes, one given twice, halves whose shapes disagree, or a
    /// matrix the weights already hold.
    pub(crate) fn take(
        &mut self,
        name: &str,
        (shape, data, is_u8): (&[usize], &[u8], bool),
        weights: &mut Weights,
    ) -> Result<bool, String> {
        let Some((matrix, half)) = name
            .strip_suffix("_blocks")
            .map(|m| (m, 0))
            .or_else(|| name.strip_suffix("_scales").map(|m| (m, 1)))
        else {
            return Ok(false);
        };
        let Some(ours) = packed_name(matrix) else {
            return Ok(false);
        };
        if !is_u8 {
            return Err(format!("tensor `{name}` is not U8 (MXFP4's bytes)"));
        }
        let halves = self.halves.entry(matrix.to_string()).or_default();
        if halves[half].is_some() || self.done.contains(matrix) {
            return Err(format!("tensor `{name}` is given twice"));
        }
        halves[half] = Some((shape.to_vec(), data.to_vec()));
        if let [Some(blocks), Some(scales)] = halves {
            let packed = mxfp4_matrix(blocks, scales)
                .map_err(|m| format!("tensors `{matrix}_blocks` and `{matrix}_scales`: {m}"))?;
            if weights.weight_shape(&ours).is_some() {
                return Err(format!(
                    "tensors `{matrix}_blocks` and `{matrix}_scales` are the model's `{ours}`, which another tensor already gave"
                ));
            }
            weights.insert(ours, packed);
            self.halves.remove(matrix);
            self.done.insert(matrix.to_string());
        }
        Ok(true)
    }

    /// Checks that every packed matrix got both halves.
    ///
    /// # Errors
    ///
    /// Names a half whose other half no file gave (the first by name).
    pub(crate) fn finish(self) -> Result<(), String> {
        match self.halves.into_iter().min_by(|a, b| a.0.cmp(&b.0)) {
            None => Ok(()),
            Some((matrix, [blocks, _])) => {
                let (has, lacks) = match blocks {
                    Some(_) => ("blocks", "scales"),
                    None => ("scales", "blocks"),
                };
                Err(format!(
                    "tensor `{matrix}_{has}` has no `{matrix}_{lacks}` in any file"
                ))
            }
        }
    }
}

/// The builder's name of a packed expert matrix of the checkpoint (its name without
/// `_blocks` or `_scales`): the gate and up projections by rows until [`shape_experts`]
/// separates them, the down projections as they are; `None` for another name.
fn packed_name(matrix: &str) -> Option<String> {
    builder_name(
        matrix,
        &[],
        "model.layers.",
        &[
            ("mlp.experts.gate_up_proj", GATE_UPS_BY_ROW),
            ("mlp.experts.down_proj", EXPERT_DOWNS),
        ],
    )
}

/// GGUF's MXFP4 matrix of the checkpoint's `blocks` (`[experts, rows, groups, 16]`: value
/// `2j` of a group in the low nibble of byte `j`, `2j + 1` in the high one) and `scales`
/// (`[experts, rows, groups]`, E8M0): `[experts, rows, 32 * groups]`, each group a block
/// of its scale byte and then its 16 bytes, value `j` in the low nibble of byte `j % 16`
/// for `j < 16` and the high one for the rest. The four-bit codes and the exponent mean
/// the same in both (ggml's doubled levels and halved scale multiply to the same value).
fn mxfp4_matrix(
    (block_shape, blocks): &Half,
    (scale_shape, scales): &Half,
) -> Result<llm_ir::interp::Value, String> {
    let (&[experts, rows, groups, 16], &[e, r, g]) = (&block_shape[..], &scale_shape[..]) else {
        return Err(format!(
            "shapes {block_shape:?} and {scale_shape:?} are not [experts, rows, groups, 16] and [experts, rows, groups]"
        ));
    };
    if [e, r, g] != [experts, rows, groups] {
        return Err(format!(
            "blocks {block_shape:?} and scales {scale_shape:?} disagree"
        ));
    }
    let count = experts
        .checked_mul(rows)
        .and_then(|n| n.checked_mul(groups))
        .filter(|&n| n.checked_mul(16) == Some(blocks.len()) && n == scales.len())
        .ok_or(format!(
            "{} bytes of blocks and {} of scales do not fill {block_shape:?}",
            blocks.len(),
            scales.len()
        ))?;
    let mut bytes = Vec::with_capacity(count * 17);
    for (group, &scale) in blocks.chunks_exact(16).zip(scales) {
        let code = |v: usize| (group[v / 2] >> (4 * (v % 2))) & 0x0F;
        bytes.push(scale);
        bytes.extend((0..16).map(|j| code(j) | code(j + 16) << 4));
    }
    Ok(llm_ir::interp::Value::Quantized(QTensor {
        shape: vec![experts, rows, 32 * groups],
        format: QuantFormat::Mxfp4,
        bytes,
    }))
}

/// Turns each layer's experts into the builder's: the matrices stored as `x @ W` takes
/// them transposed to `[out, in]`, the gate and up projections (and their biases) taken
/// apart from their interleaved rows into [`EXPERT_GATES`] and [`EXPERT_UPS`]
/// ([`EXPERT_GATE_BIASES`], [`EXPERT_UP_BIASES`]).
///
/// # Errors
///
/// A stack of the wrong shape or format, named.
pub(crate) fn shape_experts(c: &ModelConfig, weights: &mut Weights) -> Result<(), String> {
    let Some(experts) = &c.experts else {
        return Ok(());
    };
    for l in 0..c.layers {
        let p = format!("layers.{l}.");
        let at = |name: &str| format!("{p}{name}");
        for (by_column, by_row) in [
            (GATE_UPS_BY_COLUMN, GATE_UPS_BY_ROW),
            (DOWNS_BY_COLUMN, EXPERT_DOWNS),
        ] {
            if weights.weight_shape(&at(by_column)).is_some() {
                if weights.weight_shape(&at(by_row)).is_some() {
                    return Err(format!(
                        "layer {l}'s experts are given both as floats and in MXFP4 (`{by_row}`)"
                    ));
                }
                weights.transpose_matrix(&at(by_column))?;
                weights.rename(&at(by_column), at(by_row));
            }
        }
        weights.deinterleave_rows(&at(GATE_UPS_BY_ROW), [&at(EXPERT_GATES), &at(EXPERT_UPS)])?;
        // The biases as stacks of one-value rows, taken apart alike.
        let biases = at(GATE_UP_BIASES);
        if weights.weight_shape(&biases).is_some() {
            weights.reshape(&biases, vec![experts.count, 2 * experts.hidden, 1])?;
            let parts = [at(EXPERT_GATE_BIASES), at(EXPERT_UP_BIASES)];
            weights.deinterleave_rows(&biases, [&parts[0], &parts[1]])?;
            for part in parts {
                weights.reshape(&part, vec![experts.count, experts.hidden])?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group's 32 values keep their codes and scale through the repacking: value `v`
    /// of the checkpoint's group (byte `v / 2`, low nibble first) is value `v` of the
    /// block GGUF's layout holds (byte `v % 16`, the high nibble from 16 on).
    #[test]
    fn mxfp4_groups_repack_value_by_value() {
        let codes: Vec<u8> = (0..32).map(|v| (v * 7 + 3) % 16).collect();
        let blocks: Vec<u8> = codes.chunks(2).map(|p| p[0] | p[1] << 4).collect();
        let packed = mxfp4_matrix(&(vec![1, 1, 1, 16], blocks), &(vec![1, 1, 1], vec![131]))
            .expect("repacks");
        let llm_ir::interp::Value::Quantized(q) = packed else {
            panic!("not quantized")
        };
        assert_eq!(q.shape, [1, 1, 32]);
        assert_eq!(q.bytes[0], 131);
        for (v, &code) in codes.iter().enumerate() {
            assert_eq!(
                (q.bytes[1 + v % 16] >> (4 * (v / 16))) & 0x0F,
                code,
                "value {v}"
            );
        }
    }

    /// Halves that disagree, lying sizes and a half without its other are refused.
    #[test]
    fn mismatched_halves_are_refused() {
        let scales = (vec![1, 2, 1], vec![127; 2]);
        let wrong = mxfp4_matrix(&(vec![1, 1, 1, 16], vec![0; 16]), &scales);
        assert!(wrong.is_err_and(|m| m.contains("disagree")));
        let lying = mxfp4_matrix(&(vec![1, 2, 1, 16], vec![0; 16]), &scales);
        assert!(lying.is_err_and(|m| m.contains("do not fill")));
        let mut packed = PackedExperts::default();
        let mut weights = Weights::default();
        let name = "model.layers.0.mlp.experts.down_proj_scales";
        let taken = packed.take(name, (&[1, 2, 1], &[127; 2], true), &mut weights);
        assert_eq!(taken, Ok(true));
        let err = packed.finish().expect_err("no blocks");
        assert!(
            err.contains("down_proj_scales") && err.contains("down_proj_blocks"),
            "{err}"
        );
        let other =
            PackedExperts::default().take("model.norm_scales", (&[1], &[0], true), &mut weights);
        assert_eq!(other, Ok(false));
        // A half given again after its matrix is whole, and a half that is not bytes.
        let mut packed = PackedExperts::default();
        let blocks = "model.layers.0.mlp.experts.down_proj_blocks";
        let scales = "model.layers.0.mlp.experts.down_proj_scales";
        let half = |bytes: usize| (vec![1, 2, 1], vec![0u8; bytes]);
        let block_half = (vec![1, 2, 1, 16], vec![0u8; 32]);
        let mut weights = Weights::default();
        for (name, (shape, data)) in [(blocks, &block_half), (scales, &half(2))] {
            let taken = packed.take(name, (shape, data, true), &mut weights);
            assert_eq!(taken, Ok(true));
        }
        assert_eq!(
            weights.weight_shape("layers.0.feed_forward.experts.w2.weight"),
            Some(vec![1, 2, 32])
        );
        let again = packed.take(scales, (&[1, 2, 1], &[0; 2], true), &mut weights);
        assert!(again.is_err_and(|m| m.contains("given twice")));
        let floats = PackedExperts::default().take(blocks, (&[1], &[0; 4], false), &mut weights);
        assert!(floats.is_err_and(|m| m.contains("not U8")));
    }

    /// The window (128), the head sizes (64, 8 KV heads), RoPE's base (150000) and YaRN's
    /// scaling apply where the config leaves them out, and the window covers every other
    /// layer from the first where `layer_types` is absent; a null window is none.
    #[test]
    fn defaults_as_transformers_fills_them() {
        let cfg = serde_json::json!({
            "architectures": [ARCHITECTURE],
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        });
        let cfg = standard_config(cfg);
        assert_eq!(
            (
                &cfg["sliding_window"],
                &cfg["head_dim"],
                &cfg["num_key_value_heads"]
            ),
            (&128.into(), &64.into(), &8.into())
        );
        assert_eq!(cfg["rope_theta"], 150000.0);
        assert_eq!(cfg["rope_parameters"]["rope_type"], "yarn");
        assert_eq!(cfg["rope_parameters"]["truncate"], false);
        let mut c = ModelConfig {
            layers: 3,
            hidden_dim: 32,
            ..ModelConfig::default()
        };
        apply(&cfg, &mut c).expect("applies");
        let local = c.local_attention.expect("a window");
        assert_eq!((local.window, local.layers), (128, vec![true, false, true]));
        let given = serde_json::json!({
            "architectures": [ARCHITECTURE],
            "rope_scaling": {"rope_type": "yarn", "factor": 8.0},
            "sliding_window": null,
        });
        let given = standard_config(given);
        assert!(given["rope_parameters"].is_null());
        assert_eq!(given["rope_theta"], 150000.0);
        assert!(given["sliding_window"].is_null(), "null stays none");
    }
}
