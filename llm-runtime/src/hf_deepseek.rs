//! Hugging Face's DeepSeek V2 and V3 checkpoints (`DeepseekV2ForCausalLM`: DeepSeek-V2,
//! V2-Lite, Coder-V2; `DeepseekV3ForCausalLM`: DeepSeek-V3, R1, Kimi K2): Llama's blocks
//! with multi-head latent attention ([`LatentAttention`]) and, after the first
//! `first_k_dense_replace` dense layers, mixtures of `n_routed_experts` experts beside
//! `n_shared_experts` shared ones, routed by a softmax (V2) or by sigmoids chosen with a
//! bias (V3's `e_score_correction_bias`), within the best groups of experts where
//! `n_group` and `topk_group` limit them, the weights scaled by `routed_scaling_factor`.
//!
//! The attention's RoPE features pair their neighbours (V2's complex rotation, V3's
//! `rope_interleave`, its default; half-split otherwise) and span `qk_rope_head_dim`
//! (the config's `head_dim`); the scores' scale is `1 / sqrt(qk_nope_head_dim +
//! qk_rope_head_dim)` times YaRN's `mscale_all_dim` factor squared. The cache holds each
//! token's latent and RoPE key, the keys' and values' up projection (`kv_b_proj`) taken
//! apart per head when loaded ([`split_keys_and_values`]); the multi-token-prediction
//! layers V3's checkpoints append (`num_nextn_predict_layers`, beyond
//! `num_hidden_layers`) are skipped.

use serde_json::Value as Json;

use crate::{
    hf::{config_int, flag_or, names_architecture},
    model::{
        ExpertGlu, ExpertGroups, ExpertScoring, Experts, LATENT_K_UP, LATENT_KV_DOWN,
        LATENT_KV_NORM, LATENT_Q_DOWN, LATENT_Q_NORM, LATENT_Q_UP, LATENT_V_UP, LatentAttention,
        ModelConfig, ROUTER_SELECTION_BIAS, SHARED_EXPERT_DOWN, SHARED_EXPERT_GATE,
        SHARED_EXPERT_UP, SharedExpert,
    },
    weights::{Weights, builder_name},
};

/// The DeepSeek architectures read.
pub(crate) const ARCHITECTURES: [&str; 2] = [V2, V3];

/// DeepSeek V2's architecture.
const V2: &str = "DeepseekV2ForCausalLM";

/// DeepSeek V3's architecture.
const V3: &str = "DeepseekV3ForCausalLM";

/// Whether `cfg` is a DeepSeek model's.
pub(crate) fn is_deepseek(cfg: &Json) -> bool {
    ARCHITECTURES.iter().any(|a| names_architecture(cfg, a))
}

/// Whether `cfg` is DeepSeek V3's, whose checkpoints append multi-token-prediction
/// layers ([`is_prediction_layer`]).
pub(crate) fn is_v3(cfg: &Json) -> bool {
    names_architecture(cfg, V3)
}

/// `cfg` with what a DeepSeek config leaves out filled in as `DeepseekV2Config` and
/// `DeepseekV3Config` default it (a key given as null stays null): the latents' ranks
/// (1536 for the queries, 512 for the keys and values), heads of 128 + 64 RoPE features,
/// values of 128, and the experts: V2's 64 of 1407, two shared, no dense layer, greedy
/// softmax routing, a scale of 1; V3's 256 of 2048, eight a token, one shared, three
/// dense layers, a scale of 2.5, normalized, within 4 of 8 groups; any other config as it
/// is.
pub(crate) fn standard_config(mut cfg: Json) -> Json {
    if !is_deepseek(&cfg) {
        return cfg;
    }
    let v3 = is_v3(&cfg);
    let common = [
        ("q_lora_rank", Json::from(1536)),
        ("kv_lora_rank", Json::from(512)),
        ("qk_nope_head_dim", Json::from(128)),
        ("qk_rope_head_dim", Json::from(64)),
        ("v_head_dim", Json::from(128)),
    ];
    let versioned = if v3 {
        vec![
            ("n_routed_experts", Json::from(256)),
            ("moe_intermediate_size", Json::from(2048)),
            ("num_experts_per_tok", Json::from(8)),
            ("n_shared_experts", Json::from(1)),
            ("first_k_dense_replace", Json::from(3)),
            ("routed_scaling_factor", Json::from(2.5)),
            ("norm_topk_prob", Json::from(true)),
            ("n_group", Json::from(8)),
            ("topk_group", Json::from(4)),
        ]
    } else {
        vec![
            ("n_routed_experts", Json::from(64)),
            ("moe_intermediate_size", Json::from(1407)),
            ("n_shared_experts", Json::from(2)),
            ("first_k_dense_replace", Json::from(0)),
            ("routed_scaling_factor", Json::from(1.0)),
            ("topk_method", Json::from("greedy")),
        ]
    };
    if let Some(fields) = cfg.as_object_mut() {
        for (key, value) in common.into_iter().chain(versioned) {
            fields.entry(key).or_insert(value);
        }
    }
    cfg
}

/// The keys' and values' up projection as the checkpoint stores it, `[heads * (nope +
/// value), kv_rank]` (per head its key rows, then its value rows), until
/// [`split_keys_and_values`] takes it apart.
pub(crate) const KV_UP_JOINED: &str = "attention.wkv_b_joined.weight";

/// The builder's name of a DeepSeek tensor that is not Llama's (nor a mixture's, which
/// `hf_moe` names): latent attention's projections and norms, the router's selection
/// bias and the shared experts; `None` for other tensors.
pub(crate) fn name(hf: &str) -> Option<String> {
    builder_name(
        hf,
        &[],
        "model.layers.",
        &[
            ("self_attn.q_a_proj.weight", LATENT_Q_DOWN),
            ("self_attn.q_a_layernorm.weight", LATENT_Q_NORM),
            ("self_attn.q_b_proj.weight", LATENT_Q_UP),
            ("self_attn.kv_a_proj_with_mqa.weight", LATENT_KV_DOWN),
            ("self_attn.kv_a_layernorm.weight", LATENT_KV_NORM),
            ("self_attn.kv_b_proj.weight", KV_UP_JOINED),
            ("mlp.gate.e_score_correction_bias", ROUTER_SELECTION_BIAS),
            ("mlp.shared_experts.gate_proj.weight", SHARED_EXPERT_GATE),
            ("mlp.shared_experts.up_proj.weight", SHARED_EXPERT_UP),
            ("mlp.shared_experts.down_proj.weight", SHARED_EXPERT_DOWN),
        ],
    )
}

/// Whether a checkpoint tensor of a DeepSeek model of `layers` layers belongs to a
/// multi-token-prediction layer (V3's, numbered from `layers` on), which the loader
/// skips as transformers does.
pub(crate) fn is_prediction_layer(hf: &str, layers: usize) -> bool {
    hf.strip_prefix("model.layers.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(layer, _)| layer.parse::<usize>().ok())
        .is_some_and(|layer| layer >= layers)
}

/// Sets DeepSeek's settings on `c`: latent attention (`q_lora_rank`, null for direct
/// queries; `kv_lora_rank`, `qk_nope_head_dim`, `qk_rope_head_dim`, `v_head_dim`), its
/// RoPE layout and scale, and the experts. `attention_bias` (not DeepSeek's released
/// configs') is refused.
pub(crate) fn apply(cfg: &Json, c: &mut ModelConfig) -> Result<(), String> {
    if flag_or(cfg, "attention_bias", false)? {
        return Err("`attention_bias`: latent attention's biases are not supported".into());
    }
    let int = |key: &str| config_int(cfg, key);
    let q_rank = match cfg.get("q_lora_rank") {
        None | Some(Json::Null) => None,
        Some(_) => Some(int("q_lora_rank")?),
    };
    // Transformers builds the latents' norms with RMSNorm's default epsilon, whatever
    // `rms_norm_eps` says.
    let norm_eps = 1e-6;
    let latent = LatentAttention {
        q_rank,
        kv_rank: int("kv_lora_rank")?,
        nope: int("qk_nope_head_dim")?,
        rope: int("qk_rope_head_dim")?,
        value: int("v_head_dim")?,
        norm_eps,
    };
    let width = latent.nope + latent.rope;
    // The cache's one head: the latent and the RoPE key.
    c.explicit_head_dim = Some(latent.kv_rank + latent.rope);
    c.rotary_dim = Some(latent.rope);
    c.kv_heads = 1;
    c.latent_attention = Some(latent);
    // V2 rotates neighbouring pairs (as complex numbers), V3 where `rope_interleave`.
    c.rope_half = is_v3(cfg) && !flag_or(cfg, "rope_interleave", true)?;
    c.attention_scale = Some((width as f64).powf(-0.5) * scale_factor(cfg)?.powi(2));
    c.experts = experts(cfg, c.layers)?;
    Ok(())
}

/// YaRN's `mscale_all_dim` factor of the scores' scale (`1 + 0.1 mscale_all_dim
/// ln(factor)`, transformers' `yarn_get_mscale`), where the RoPE settings are YaRN's with
/// a non-zero `mscale_all_dim` and a factor above 1; 1 otherwise.
fn scale_factor(cfg: &Json) -> Result<f64, String> {
    let settings = ["rope_parameters", "rope_scaling"]
        .iter()
        .find_map(|key| cfg.get(*key).filter(|s| s.is_object()));
    let Some(settings) = settings else {
        return Ok(1.0);
    };
    let kind = settings
        .get("rope_type")
        .or_else(|| settings.get("type"))
        .and_then(Json::as_str)
        .unwrap_or("default");
    let number = |key: &str| settings.get(key).and_then(Json::as_f64).unwrap_or(0.0);
    let (all_dim, factor) = (number("mscale_all_dim"), number("factor"));
    if kind == "default" || all_dim == 0.0 {
        return Ok(1.0);
    }
    let m = crate::rope_scaling::yarn_magnitude(factor, 0.1 * all_dim);
    if !(m.is_finite() && m > 0.0) {
        return Err(format!(
            "YaRN's `mscale_all_dim` {all_dim} gives the scores a scale factor of {m}"
        ));
    }
    Ok(m)
}

/// The experts of a DeepSeek config: `n_routed_experts` of `moe_intermediate_size`
/// (none where 0 or absent), `num_experts_per_tok` a token, in the layers from
/// `first_k_dense_replace` on, beside `n_shared_experts` shared ones (one ungated block
/// of their summed width); V2's weighted by the softmax probabilities (unnormalized),
/// within `topk_group` of `n_group` groups scored by their best where `topk_method` is
/// `group_limited_greedy`; V3's by sigmoids chosen with their selection bias, divided by
/// their sum where `norm_topk_prob`, within `topk_group` of `n_group` groups scored by
/// their two best; both times `routed_scaling_factor`.
fn experts(cfg: &Json, layers: usize) -> Result<Option<Experts>, String> {
    let int = |key: &str| config_int(cfg, key);
    // A count that may be 0 (none): `config_int`'s range otherwise.
    let optional = |key: &str| match cfg.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) if v.as_u64() == Some(0) => Ok(Some(0)),
        Some(_) => int(key).map(Some),
    };
    let count = optional("n_routed_experts")?.unwrap_or(0);
    if count == 0 {
        return Ok(None);
    }
    let v3 = is_v3(cfg);
    let dense = optional("first_k_dense_replace")?.unwrap_or(0);
    let hidden = int("moe_intermediate_size")?;
    let shared = optional("n_shared_experts")?.unwrap_or(0);
    let shared_width = hidden
        .checked_mul(shared)
        .ok_or("the shared experts' width overflows")?;
    let limited = match cfg.get("topk_method").and_then(Json::as_str) {
        _ if v3 => true,
        None | Some("greedy") => false,
        Some("group_limited_greedy") => true,
        Some(other) => {
            return Err(format!(
                "`topk_method` = {other:?}: DeepSeek V2's routing is greedy or group_limited_greedy"
            ));
        }
    };
    let groups = match (optional("n_group")?, optional("topk_group")?) {
        (Some(count), Some(chosen)) if limited => {
            ExpertGroups::limiting(count, chosen, if v3 { 2 } else { 1 })
        }
        _ => None,
    };
    let scale = match cfg.get("routed_scaling_factor") {
        None | Some(Json::Null) => 1.0,
        Some(v) => v
            .as_f64()
            .ok_or(format!("`routed_scaling_factor` = {v} is not a number"))?,
    };
    Ok(Some(Experts {
        count,
        per_token: int("num_experts_per_tok")?,
        hidden,
        normalize: v3 && flag_or(cfg, "norm_topk_prob", true)?,
        layers: (0..layers).map(|l| l >= dense).collect(),
        shared: (shared_width > 0).then_some(SharedExpert {
            hidden: shared_width,
            gated: false,
        }),
        scoring: if v3 {
            ExpertScoring::Sigmoid {
                selection_bias: true,
            }
        } else {
            ExpertScoring::Softmax
        },
        groups,
        scale,
        biases: false,
        glu: ExpertGlu::Gated,
    }))
}

/// Each layer's keys' and values' up projections as the builder takes them
/// ([`LATENT_K_UP`], `[heads, kv_rank, nope]`, and [`LATENT_V_UP`], `[heads, value,
/// kv_rank]`: llama.cpp's `attn_k_b` and `attn_v_b`, which a GGUF file may hold as they
/// are; where a file also holds the joined matrix, it is dropped), from the checkpoint's
/// joined matrix ([`KV_UP_JOINED`], `[heads * (nope + value), kv_rank]`): cut per head,
/// each head's key rows turned (a block-quantized matrix dequantized to f32 first).
///
/// # Errors
///
/// A joined matrix of another shape, named.
pub(crate) fn split_keys_and_values(c: &ModelConfig, weights: &mut Weights) -> Result<(), String> {
    let Some(latent) = &c.latent_attention else {
        return Ok(());
    };
    let per_head = latent
        .nope
        .checked_add(latent.value)
        .ok_or("latent attention's widths overflow")?;
    for l in 0..c.layers {
        let at = |name: &str| format!("layers.{l}.{name}");
        let joined = at(KV_UP_JOINED);
        let Some(shape) = weights.weight_shape(&joined) else {
            continue;
        };
        if weights.weight_shape(&at(LATENT_K_UP)).is_some() {
            // A GGUF file with both forms (as some converters write): its split
            // projections, as they are stored, rather than the joined one.
            weights.remove(&joined);
            continue;
        }
        let rows = c.heads.checked_mul(per_head);
        if rows.is_none_or(|rows| shape != [rows, latent.kv_rank]) {
            return Err(format!(
                "layer {l}'s keys' and values' up projection is {shape:?}, expected [{} heads x {per_head}, {}]",
                c.heads, latent.kv_rank
            ));
        }
        weights.reshape(&joined, vec![c.heads, per_head, latent.kv_rank])?;
        let parts = [
            (at(LATENT_K_UP), latent.nope),
            (at(LATENT_V_UP), latent.value),
        ];
        weights.split_rows(&joined, &parts)?;
        weights.transpose_matrix(&at(LATENT_K_UP))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// V3's multi-token-prediction layers (from `num_hidden_layers` on) are told apart
    /// from the model's.
    #[test]
    fn prediction_layers_are_those_past_the_model() {
        assert!(is_prediction_layer("model.layers.61.eh_proj.weight", 61));
        assert!(!is_prediction_layer("model.layers.60.mlp.gate.weight", 61));
        assert!(!is_prediction_layer("model.norm.weight", 61));
    }

    /// Counts of 0 are none (no dense layer, no shared expert), absent keys take
    /// transformers' defaults, and an unknown V2 routing method is refused.
    #[test]
    fn counts_of_zero_and_defaults() {
        let v2 = standard_config(serde_json::json!({
            "architectures": [V2],
            "num_experts_per_tok": 2,
            "first_k_dense_replace": 0,
            "n_shared_experts": 0,
        }));
        let dense_less = experts(&v2, 3).expect("reads").expect("experts");
        assert_eq!(dense_less.layers, [true, true, true]);
        assert_eq!(
            (
                dense_less.count,
                dense_less.hidden,
                dense_less.shared,
                dense_less.scale
            ),
            (64, 1407, None, 1.0)
        );
        let v3 = standard_config(serde_json::json!({"architectures": [V3]}));
        let routed = experts(&v3, 4).expect("reads").expect("experts");
        let groups = routed.groups.map(|g| (g.count, g.chosen, g.scored_by));
        assert_eq!(
            (routed.count, routed.per_token, routed.scale, groups),
            (256, 8, 2.5, Some((8, 4, 2)))
        );
        assert_eq!(routed.layers, [false, false, false, true]);
        assert_eq!(v3["q_lora_rank"], 1536);
        let unknown = serde_json::json!({
            "architectures": [V2],
            "num_experts_per_tok": 2,
            "topk_method": "noaux_tc",
        });
        let err = experts(&standard_config(unknown), 2).expect_err("refused");
        assert!(err.contains("`topk_method` = \"noaux_tc\""), "{err}");
    }

    /// The scores' scale factor is YaRN's `mscale_all_dim` one, squared by the caller;
    /// none without YaRN, without `mscale_all_dim` or at a factor of 1.
    #[test]
    fn scale_factor_follows_mscale_all_dim() {
        let yarn = serde_json::json!({"rope_parameters": {
            "rope_type": "yarn", "factor": 40.0, "mscale_all_dim": 1.0, "rope_theta": 1e4,
        }});
        let want = 1.0 + 0.1 * 40f64.ln();
        assert!((scale_factor(&yarn).expect("a factor") - want).abs() < 1e-12);
        for other in [
            serde_json::json!({}),
            serde_json::json!({"rope_scaling": {"type": "yarn", "factor": 40.0}}),
            serde_json::json!({"rope_parameters": {"rope_type": "default", "mscale_all_dim": 1.0}}),
        ] {
            assert_eq!(scale_factor(&other), Ok(1.0), "{other}");
        }
    }
}
