//! Hugging Face's mixture-of-experts checkpoints: Mixtral (`MixtralForCausalLM`),
//! Qwen3-MoE (`Qwen3MoeForCausalLM`), Qwen2-MoE (`Qwen2MoeForCausalLM`, Qwen1.5-MoE),
//! OLMoE (`OlmoeForCausalLM`), Granite-MoE (`GraniteMoeForCausalLM`,
//! `GraniteMoeSharedForCausalLM`) and DBRX (`DbrxForCausalLM`), Llama's blocks (with
//! Qwen3's per-head and OLMoE's whole-projection q/k norms, Qwen2's q, k and v biases,
//! Granite's scales, DBRX's LayerNorms, fused and clamped q, k and v) whose feed-forward
//! blocks route each token to a few experts ([`Experts`]; Qwen2-MoE's beside a gated
//! shared expert, Granite-MoE-Shared's beside an ungated one).
//!
//! The Hub's checkpoints store each expert's matrices as tensors of their own
//! (`model.layers.N.block_sparse_moe.experts.E.w1.weight`, Qwen3-MoE's and OLMoE's
//! `model.layers.N.mlp.experts.E.gate_proj.weight`; transformers 5 fuses them when it
//! loads and splits them again when it saves); the loader stacks them into the builder's
//! `[experts, ...]` weights ([`stack_experts`]). Granite-MoE's are stacked already, each
//! expert's gate and up projections fused (`block_sparse_moe.input_linear.weight`,
//! `[experts, 2 * hidden, dim]`, gate rows first), which the loader splits; DBRX's are
//! stacked in matrices of `experts * hidden` rows (`ffn.experts.mlp.w1`, `v1`, `w2`, the
//! down projections transposed), which the loader reshapes ([`dbrx_name`],
//! [`dbrx_config`] for its nested configuration).

use serde_json::Value as Json;

use crate::{
    hf::{config_int, flag_or, granite_scales, names_architecture, optional_positive},
    model::{
        EXPERT_DOWNS, EXPERT_GATES, EXPERT_UPS, ExpertGlu, ExpertScoring, Experts, FUSED_QKV,
        ModelConfig, Norm, QkNorm, ROUTER, SHARED_EXPERT_DOWN, SHARED_EXPERT_GATE,
        SHARED_EXPERT_UP, SHARED_GATE, SharedExpert,
    },
    weights::{Weights, builder_name},
};

/// The mixture-of-experts architectures read.
pub(crate) const ARCHITECTURES: [&str; 7] = [
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "OlmoeForCausalLM",
    GRANITE_MOE[0],
    GRANITE_MOE[1],
    DBRX,
];

/// DBRX's architecture.
const DBRX: &str = "DbrxForCausalLM";

/// Granite-MoE's architectures: without and with a shared expert.
const GRANITE_MOE: [&str; 2] = ["GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM"];

/// Whether `cfg` is Granite-MoE's, with or without a shared expert.
fn is_granite_moe(cfg: &Json) -> bool {
    GRANITE_MOE.iter().any(|a| names_architecture(cfg, a))
}

/// An expert's matrices in a checkpoint (Mixtral's names, then Qwen3-MoE's and OLMoE's)
/// and the builder's, per expert, before [`stack_experts`].
const EXPERT_PARTS: [(&str, &str); 6] = [
    ("w1", "w1"),
    ("w3", "w3"),
    ("w2", "w2"),
    ("gate_proj", "w1"),
    ("up_proj", "w3"),
    ("down_proj", "w2"),
];

/// Granite-MoE-Shared's shared expert's gate and up projections, fused (gate rows first)
/// until [`stack_experts`] splits them.
const SHARED_W13: &str = "feed_forward.shared.w13.weight";

/// Granite-MoE's experts' gate and up projections, stacked and fused:
/// `[experts, 2 * hidden, dim]`, each expert's gate rows first, until [`stack_experts`]
/// splits them.
const FUSED_EXPERT_GATE_UPS: &str = "feed_forward.experts.w13.weight";

/// The builder's name of a router, shared expert or expert tensor of a checkpoint: a
/// router is the layer's [`ROUTER`], a shared expert's matrices those under
/// [`SHARED_EXPERT`](crate::model::SHARED_EXPERT) (Granite's fused gate and up
/// [`SHARED_W13`]) and Qwen2-MoE's gate [`SHARED_GATE`]; an expert's matrix
/// `feed_forward.experts.E.w{1,3,2}.weight` of its layer until [`stack_experts`] stacks
/// it, Granite-MoE's stacked ones [`FUSED_EXPERT_GATE_UPS`] and [`EXPERT_DOWNS`]. `None`
/// for other tensors.
pub(crate) fn expert_name(hf: &str) -> Option<String> {
    let router = builder_name(
        hf,
        &[],
        "model.layers.",
        &[
            ("block_sparse_moe.gate.weight", ROUTER),
            ("mlp.gate.weight", ROUTER),
            ("mlp.shared_expert_gate.weight", SHARED_GATE),
            ("mlp.shared_expert.gate_proj.weight", SHARED_EXPERT_GATE),
            ("mlp.shared_expert.up_proj.weight", SHARED_EXPERT_UP),
            ("mlp.shared_expert.down_proj.weight", SHARED_EXPERT_DOWN),
            ("block_sparse_moe.router.layer.weight", ROUTER),
            (
                "block_sparse_moe.input_linear.weight",
                FUSED_EXPERT_GATE_UPS,
            ),
            ("block_sparse_moe.output_linear.weight", EXPERT_DOWNS),
            ("shared_mlp.input_linear.weight", SHARED_W13),
            ("shared_mlp.output_linear.weight", SHARED_EXPERT_DOWN),
        ],
    );
    if router.is_some() {
        return router;
    }
    let (layer, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let rest = rest
        .strip_prefix("block_sparse_moe.experts.")
        .or_else(|| rest.strip_prefix("mlp.experts."))?;
    let (expert, part) = rest.strip_suffix(".weight")?.split_once('.')?;
    let (layer, expert): (usize, usize) = (layer.parse().ok()?, expert.parse().ok()?);
    let (_, ours) = EXPERT_PARTS.iter().find(|(theirs, _)| *theirs == part)?;
    Some(expert_matrix(layer, expert, ours))
}

/// DBRX's experts' down projections, stacked and each transposed (`[experts * hidden,
/// dim]`), until [`stack_experts`] turns them into [`EXPERT_DOWNS`].
const TRANSPOSED_EXPERT_DOWNS: &str = "feed_forward.experts.w2t.weight";

/// The builder's name of a DBRX tensor (`transformer.wte.weight`,
/// `transformer.blocks.N.norm_attn_norm.attn.Wqkv.weight`, ...; the classifier's,
/// `lm_head.weight`, is Llama's): its experts' stacked matrices `ffn.experts.mlp.w1` and
/// `v1` as [`EXPERT_GATES`] and [`EXPERT_UPS`] of `experts * hidden` rows and `w2` as
/// [`TRANSPOSED_EXPERT_DOWNS`], until [`stack_experts`] shapes them.
pub(crate) fn dbrx_name(hf: &str) -> Option<String> {
    builder_name(
        hf,
        &[
            ("transformer.wte.weight", "tok_embeddings.weight"),
            ("transformer.norm_f.weight", "norm.weight"),
        ],
        "transformer.blocks.",
        &[
            ("norm_attn_norm.norm_1.weight", "attention_norm.weight"),
            ("norm_attn_norm.attn.Wqkv.weight", FUSED_QKV),
            ("norm_attn_norm.attn.out_proj.weight", "attention.wo.weight"),
            ("norm_attn_norm.norm_2.weight", "ffn_norm.weight"),
            ("ffn.router.layer.weight", ROUTER),
            ("ffn.experts.mlp.w1", EXPERT_GATES),
            ("ffn.experts.mlp.v1", EXPERT_UPS),
            ("ffn.experts.mlp.w2", TRANSPOSED_EXPERT_DOWNS),
        ],
    )
}

/// DBRX's `config.json` with its keys copied to the names the loader reads, where those
/// are not set (transformers 5 writes some of them at the top level too): `d_model`,
/// `n_heads`, `n_layers`, `max_seq_len`; `attn_config`'s `kv_n_heads` (1 where absent),
/// `rope_theta` (10000) and `clip_qkv`; `ffn_config`'s `ffn_hidden_size` (each expert's
/// width, 3584), `moe_num_experts` (4), `moe_top_k` (1), `moe_normalize_expert_weights`
/// (1; null stays null: no renormalization) and `ffn_act_fn.name` (SiLU), each
/// defaulted as `DbrxAttentionConfig` and `DbrxFFNConfig` default it. Any other config is
/// returned as it is.
pub(crate) fn dbrx_config(mut cfg: Json) -> Json {
    if !names_architecture(&cfg, DBRX) {
        return cfg;
    }
    // `section.key` of the config: its value, `default` where absent or (but for the
    // experts' norm, whose null means none) null.
    let nested =
        |section: &str, key: &str, default: Json| match cfg.get(section).and_then(|s| s.get(key)) {
            Some(Json::Null) if key == "moe_normalize_expert_weights" => Some(Json::Null),
            None | Some(Json::Null) => Some(default),
            Some(v) => Some(v.clone()),
        };
    let act = cfg
        .get("ffn_config")
        .and_then(|f| f.get("ffn_act_fn"))
        .and_then(|f| f.get("name"))
        .cloned();
    let copies = [
        ("hidden_size", cfg.get("d_model").cloned()),
        ("num_attention_heads", cfg.get("n_heads").cloned()),
        ("num_hidden_layers", cfg.get("n_layers").cloned()),
        ("max_position_embeddings", cfg.get("max_seq_len").cloned()),
        (
            "num_key_value_heads",
            nested("attn_config", "kv_n_heads", 1.into()),
        ),
        (
            "rope_theta",
            nested("attn_config", "rope_theta", 10000.0.into()),
        ),
        ("clip_qkv", nested("attn_config", "clip_qkv", Json::Null)),
        (
            "intermediate_size",
            nested("ffn_config", "ffn_hidden_size", 3584.into()),
        ),
        (
            "num_local_experts",
            nested("ffn_config", "moe_num_experts", 4.into()),
        ),
        (
            "num_experts_per_tok",
            nested("ffn_config", "moe_top_k", 1.into()),
        ),
        (
            "moe_normalize_expert_weights",
            nested("ffn_config", "moe_normalize_expert_weights", 1.0.into()),
        ),
        ("hidden_act", act),
    ];
    if let Some(fields) = cfg.as_object_mut() {
        for (ours, value) in copies {
            if let Some(value) = value {
                fields.entry(ours).or_insert(value);
            }
        }
    }
    cfg
}

/// The builder's name of expert `expert`'s matrix `w` (`w1`, `w3` or `w2`) of `layer`
/// before stacking.
pub(crate) fn expert_matrix(layer: usize, expert: usize, w: &str) -> String {
    format!("layers.{layer}.feed_forward.experts.{expert}.{w}.weight")
}

/// The experts `cfg` describes (`None` for the other architectures): Mixtral's
/// `num_local_experts`, each of `intermediate_size`, renormalized, in every layer;
/// Qwen3-MoE's `num_experts` (transformers 5 writes `num_local_experts`) of
/// `moe_intermediate_size` in the layers `mlp_only_layers` leaves out and
/// `decoder_sparse_step` picks, the others dense, and so Qwen2-MoE's, beside a shared
/// expert of `shared_expert_intermediate_size`; OLMoE's `num_experts` of
/// `intermediate_size` in every layer; all but Mixtral's renormalized where
/// `norm_topk_prob` says; Granite-MoE's as Mixtral's (a softmax over the chosen logits),
/// Granite-MoE-Shared's beside a shared expert of `shared_intermediate_size` (none where
/// 0 or absent, as transformers builds none); DBRX's renormalized where
/// `moe_normalize_expert_weights` is 1 (the L1 norm of the chosen probabilities), not
/// where it is null (another norm is refused).
fn experts(cfg: &Json, layers: usize) -> Result<Option<Experts>, String> {
    let granite = is_granite_moe(cfg);
    let dbrx = names_architecture(cfg, DBRX);
    let mixtral = granite || dbrx || names_architecture(cfg, "MixtralForCausalLM");
    let qwen2 = names_architecture(cfg, "Qwen2MoeForCausalLM");
    // Qwen2-MoE's experts are laid out as Qwen3-MoE's.
    let qwen3 = qwen2 || names_architecture(cfg, "Qwen3MoeForCausalLM");
    if !(mixtral || qwen3 || names_architecture(cfg, "OlmoeForCausalLM")) {
        return Ok(None);
    }
    let count = match (cfg.get("num_experts"), cfg.get("num_local_experts")) {
        (Some(_), Some(_))
            if config_int(cfg, "num_experts")? != config_int(cfg, "num_local_experts")? =>
        {
            return Err("`num_experts` and `num_local_experts` differ".into());
        }
        (Some(_), _) => config_int(cfg, "num_experts")?,
        _ => config_int(cfg, "num_local_experts")?,
    };
    let hidden = config_int(
        cfg,
        if qwen3 {
            "moe_intermediate_size"
        } else {
            "intermediate_size"
        },
    )?;
    let routing = if qwen3 {
        let step = match cfg.get("decoder_sparse_step") {
            None | Some(Json::Null) => 1,
            Some(_) => config_int(cfg, "decoder_sparse_step")?,
        };
        let dense: Vec<u64> = match cfg.get("mlp_only_layers") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::Array(list)) => list
                .iter()
                .map(|l| l.as_u64().ok_or(format!("`mlp_only_layers` holds {l}")))
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(format!("`mlp_only_layers` = {other} is not a list")),
        };
        (0..layers)
            .map(|l| !dense.contains(&(l as u64)) && (l + 1) % step == 0)
            .collect()
    } else {
        vec![true; layers]
    };
    Ok(Some(Experts {
        count,
        per_token: config_int(cfg, "num_experts_per_tok")?,
        hidden,
        normalize: if dbrx {
            // `dbrx_config` sets it (null where the config says null).
            match cfg.get("moe_normalize_expert_weights") {
                Some(Json::Null) => false,
                None => true,
                Some(p) if p.as_f64() == Some(1.0) => true,
                Some(p) => {
                    return Err(format!(
                        "`moe_normalize_expert_weights` = {p}: only the L1 norm (1) is supported"
                    ));
                }
            }
        } else {
            mixtral || flag_or(cfg, "norm_topk_prob", false)?
        },
        layers: routing,
        shared: if qwen2 {
            Some(SharedExpert {
                hidden: config_int(cfg, "shared_expert_intermediate_size")?,
                gated: true,
            })
        } else if names_architecture(cfg, GRANITE_MOE[1]) {
            // transformers builds no shared expert of width 0 (the config's default).
            match cfg.get("shared_intermediate_size") {
                None | Some(Json::Null) => None,
                Some(w) if w.as_f64() == Some(0.0) => None,
                Some(_) => Some(SharedExpert {
                    hidden: config_int(cfg, "shared_intermediate_size")?,
                    gated: false,
                }),
            }
        } else {
            None
        },
        scoring: ExpertScoring::Softmax,
        groups: None,
        scale: 1.0,
        biases: false,
        glu: ExpertGlu::Gated,
    }))
}

/// Sets the mixture-of-experts settings of `cfg` on `c`: the experts, the q/k norms
/// (Qwen3-MoE's per head, OLMoE's over the whole projections), Qwen2-MoE's q/k/v biases
/// and Granite-MoE's scales; OLMoE's `clip_qkv`, the q, k and v projections clamped
/// after their norms; DBRX's LayerNorms and `clip_qkv`.
pub(crate) fn apply(cfg: &Json, c: &mut ModelConfig) -> Result<(), String> {
    c.experts = experts(cfg, c.layers)?;
    if is_granite_moe(cfg) {
        granite_scales(cfg, c)?;
    }
    if names_architecture(cfg, DBRX) {
        // `nn.LayerNorm(bias=False)` of the default epsilon; q, k and v clamped.
        c.norm = Norm::Layer;
        c.norm_eps = 1e-5;
        c.clip_qkv = optional_positive(cfg, "clip_qkv")?;
    }
    if names_architecture(cfg, "Qwen3MoeForCausalLM") {
        c.qk_norm = QkNorm::Heads;
    }
    if names_architecture(cfg, "Qwen2MoeForCausalLM") {
        c.attention_bias.qkv = flag_or(cfg, "qkv_bias", true)?;
    }
    if names_architecture(cfg, "OlmoeForCausalLM") {
        c.clip_qkv = optional_positive(cfg, "clip_qkv")?;
        c.qk_norm = QkNorm::Projections;
    }
    Ok(())
}

/// Stacks each routing layer's experts' matrices, one weight an expert as a checkpoint
/// (or an early Mixtral GGUF file) stores them, into the builder's [`EXPERT_GATES`],
/// [`EXPERT_UPS`] and
/// [`EXPERT_DOWNS`], or splits Granite-MoE's stacked gate and up projections
/// ([`FUSED_EXPERT_GATE_UPS`]) into the first two, and its shared expert's
/// ([`SHARED_W13`]); a model without experts is left as it is. An expert missing a matrix
/// is an error naming it.
pub(crate) fn stack_experts(c: &ModelConfig, weights: &mut Weights) -> Result<(), String> {
    let Some(experts) = &c.experts else {
        return Ok(());
    };
    if let Some(shared) = experts.shared {
        for l in 0..c.layers {
            let hidden = |name: &str| (format!("layers.{l}.{name}"), shared.hidden);
            let fused = format!("layers.{l}.{SHARED_W13}");
            weights.split_rows(
                &fused,
                &[hidden(SHARED_EXPERT_GATE), hidden(SHARED_EXPERT_UP)],
            )?;
        }
    }
    let held = weights.names().len();
    for l in (0..c.layers).filter(|&l| experts.routes(l)) {
        let p = format!("layers.{l}.");
        let has = |name: &str| weights.weight_shape(&format!("{p}{name}")).is_some();
        if has(FUSED_EXPERT_GATE_UPS) {
            // Granite-MoE's: split each expert's fused gate and up projections.
            let hidden = |name: &str| (format!("{p}{name}"), experts.hidden);
            let fused = format!("{p}{FUSED_EXPERT_GATE_UPS}");
            weights.split_rows(&fused, &[hidden(EXPERT_GATES), hidden(EXPERT_UPS)])?;
        } else if has(TRANSPOSED_EXPERT_DOWNS) {
            shape_dbrx_experts(experts, &p, weights)?;
        } else if has(EXPERT_GATES) {
            // Stacked already (a GGUF file's `ffn_gate_exps`).
        } else {
            // Each expert's matrices are tensors of their own: a count beyond the tensors
            // held is refused before the names are listed.
            if experts.count > held {
                return Err(format!(
                    "the model has {} experts a layer, but its files hold {held} tensors",
                    experts.count
                ));
            }
            stack_expert_tensors(experts, l, weights)?;
        }
    }
    Ok(())
}

/// DBRX's experts of the layer whose weights' prefix is `p`, `[experts * hidden, dim]`
/// each: the gates and ups reshaped as they are, the downs transposed matrix by matrix
/// into `[experts, dim, hidden]`.
fn shape_dbrx_experts(experts: &Experts, p: &str, weights: &mut Weights) -> Result<(), String> {
    let (count, hidden) = (experts.count, experts.hidden);
    for name in [EXPERT_GATES, EXPERT_UPS, TRANSPOSED_EXPERT_DOWNS] {
        let name = format!("{p}{name}");
        let dim = matrix_width(weights, &name)?;
        weights.reshape(&name, vec![count, hidden, dim])?;
    }
    let transposed = format!("{p}{TRANSPOSED_EXPERT_DOWNS}");
    weights.transpose_matrix(&transposed)?;
    weights.rename(&transposed, format!("{p}{EXPERT_DOWNS}"));
    Ok(())
}

/// Stacks layer `l`'s experts' matrices, one tensor an expert, into [`EXPERT_GATES`],
/// [`EXPERT_UPS`] and [`EXPERT_DOWNS`]; an expert missing one is an error naming it (by
/// a checkpoint's names and a GGUF file's).
fn stack_expert_tensors(experts: &Experts, l: usize, weights: &mut Weights) -> Result<(), String> {
    for (w, gguf, stacked) in [
        ("w1", "ffn_gate", EXPERT_GATES),
        ("w3", "ffn_up", EXPERT_UPS),
        ("w2", "ffn_down", EXPERT_DOWNS),
    ] {
        let parts: Vec<String> = (0..experts.count).map(|e| expert_matrix(l, e, w)).collect();
        if let Some(e) = parts.iter().position(|p| weights.weight_shape(p).is_none()) {
            let names = EXPERT_PARTS.iter().filter(|(_, ours)| *ours == w);
            let theirs: Vec<&str> = names.map(|(theirs, _)| *theirs).collect();
            return Err(format!(
                "layer {l}'s expert {e} has no `{}` matrix (a GGUF file's `{gguf}_exps` stack or `{gguf}.{e}` tensor; of {} experts a layer)",
                theirs.join("` or `"),
                experts.count
            ));
        }
        weights.stack(&parts, &format!("layers.{l}.{stacked}"))?;
    }
    Ok(())
}

/// The row length of weight `name` (a DBRX expert stack, `[experts * hidden, dim]`).
fn matrix_width(weights: &Weights, name: &str) -> Result<usize, String> {
    match weights.weight_shape(name).as_deref() {
        Some(&[_, dim]) => Ok(dim),
        Some(other) => Err(format!(
            "weight `{name}` is {other:?}, not a matrix of stacked experts"
        )),
        None => Err(format!("the model has no weight `{name}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_names_of_each_family() {
        let named = |hf: &str| expert_name(hf);
        assert_eq!(
            named("model.layers.3.block_sparse_moe.experts.7.w2.weight").as_deref(),
            Some("layers.3.feed_forward.experts.7.w2.weight")
        );
        assert_eq!(
            named("model.layers.0.mlp.experts.12.up_proj.weight").as_deref(),
            Some("layers.0.feed_forward.experts.12.w3.weight")
        );
        assert_eq!(
            named("model.layers.1.mlp.gate.weight").as_deref(),
            Some("layers.1.feed_forward.gate_inp.weight")
        );
        // Granite-MoE's stacked experts, their gate and up fused.
        assert_eq!(
            named("model.layers.2.block_sparse_moe.input_linear.weight").as_deref(),
            Some("layers.2.feed_forward.experts.w13.weight")
        );
        for other in [
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.experts.x.up_proj.weight",
            "model.layers.1.mlp.experts.2.other.weight",
            "model.layers.1.mlp.experts.gate_up_proj",
        ] {
            assert_eq!(named(other), None, "{other}");
        }
    }

    /// Granite-MoE-Shared's shared expert is ungated, and none where its width is 0 (as
    /// transformers builds none).
    #[test]
    fn granite_moe_shared_experts() {
        let cfg = |width: u64| {
            serde_json::json!({
                "architectures": ["GraniteMoeSharedForCausalLM"],
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "intermediate_size": 32,
                "shared_intermediate_size": width,
            })
        };
        let x = experts(&cfg(48), 2).expect("valid").expect("experts");
        assert_eq!(
            (x.count, x.per_token, x.hidden, x.normalize, x.shared),
            (
                4,
                2,
                32,
                true,
                Some(SharedExpert {
                    hidden: 48,
                    gated: false
                })
            )
        );
        let none = experts(&cfg(0), 2).expect("valid").expect("experts");
        assert_eq!(none.shared, None);
    }

    /// DBRX's nested keys are read as the usual ones, defaulted as `DbrxAttentionConfig`
    /// and `DbrxFFNConfig` default them; a null experts' norm stays null (none), and the
    /// top level's keys win.
    #[test]
    fn dbrx_config_defaults_as_transformers() {
        let read = |ffn: Json| {
            dbrx_config(serde_json::json!({
                "architectures": ["DbrxForCausalLM"],
                "d_model": 64,
                "rope_theta": 500000.0,
                "attn_config": {"clip_qkv": 8},
                "ffn_config": ffn,
            }))
        };
        let cfg = read(serde_json::json!({}));
        for (key, value) in [
            ("hidden_size", serde_json::json!(64)),
            ("num_key_value_heads", serde_json::json!(1)),
            ("rope_theta", serde_json::json!(500000.0)),
            ("clip_qkv", serde_json::json!(8)),
            ("intermediate_size", serde_json::json!(3584)),
            ("num_local_experts", serde_json::json!(4)),
            ("num_experts_per_tok", serde_json::json!(1)),
            ("moe_normalize_expert_weights", serde_json::json!(1.0)),
        ] {
            assert_eq!(cfg[key], value, "{key}");
        }
        let x = experts(&cfg, 2).expect("valid").expect("experts");
        assert!(x.normalize);
        let unnormalized = read(serde_json::json!({"moe_normalize_expert_weights": null}));
        assert!(
            !experts(&unnormalized, 2)
                .expect("valid")
                .expect("experts")
                .normalize
        );
    }

    #[test]
    fn qwen3_moe_dense_layers() {
        let cfg: Json = serde_json::json!({
            "architectures": ["Qwen3MoeForCausalLM"],
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "mlp_only_layers": [1],
            "decoder_sparse_step": 2,
        });
        let x = experts(&cfg, 6).expect("valid").expect("experts");
        assert_eq!(x.layers, [false, false, false, true, false, true]);
        assert_eq!(
            (x.count, x.per_token, x.hidden, x.normalize),
            (8, 2, 16, false)
        );
        let both = serde_json::json!({
            "architectures": ["Qwen3MoeForCausalLM"],
            "num_experts": 8,
            "num_local_experts": 4,
        });
        assert!(experts(&both, 2).is_err());
    }
}
