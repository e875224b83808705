//! The mixtures of experts against Hugging Face `transformers` (as `hf.rs` checks the
//! dense families): Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, Granite-MoE,
//! Granite-MoE-Shared, DBRX, gpt-oss, DeepSeek V2 and V3 reference checkpoints
//! (`tests/data`; gpt-oss's
//! also with its experts in MXFP4) and their GGUF forms, computed on every backend;
//! quantized experts; mutated GGUF files of each.

mod common;
mod reference;

use std::collections::HashMap;

use llm_ir::{
    interp::{Value, WeightStore},
    types::QuantFormat,
};
use llm_runtime::{
    generate::{Backend, Model, Step},
    gguf::Meta,
    model::{
        AttentionBias, ExpertGlu, ExpertGroups, ExpertScoring, Experts, ModelConfig, Norm, QkNorm,
        SharedExpert,
    },
    model_file,
};
use reference::{
    NamedTensor, TRANSFORMERS_BOUND, computes_what_transformers_computes,
    gguf_computes_what_the_directory_computes, gguf_logits, interp_logits, largest_difference,
    prefill_and_decode_logits, reference_checkpoint, reference_gguf_edited, rewritten_checkpoint,
    transformers_reference,
};

/// A mixture's experts a layer, experts a token, expert width and whether the chosen
/// experts' weights are renormalized.
fn expert_settings(experts: &Experts) -> (usize, usize, usize, bool) {
    (
        experts.count,
        experts.per_token,
        experts.hidden,
        experts.normalize,
    )
}

/// Mixtral (`tests/data/mixtral-tiny`): four experts a layer, each token running the two
/// its router scores highest, their outputs weighted by the renormalized probabilities.
#[test]
fn mixtral_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("mixtral-tiny");
    let experts = loaded.config.experts.as_ref().expect("experts");
    assert_eq!(expert_settings(experts), (4, 2, 64, true));
    assert_eq!(experts.layers, [true, true]);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the renormalization choice", &flip_renormalization),
            ("the second expert", &|c| {
                c.experts.as_mut().expect("experts").per_token = 1;
            }),
        ],
    );
    let gguf = moe_gguf("mixtral-tiny", "llama", vec![]);
    gguf_computes_what_the_directory_computes(&gguf, &loaded, &reference);
    // Mixtral's early GGUF files, one tensor an expert: stacked when loaded.
    let early = experts_gguf("mixtral-tiny", "llama", vec![], false);
    gguf_computes_what_the_directory_computes(&early, &loaded, &reference);
}

/// Flips whether the chosen experts' weights are renormalized to sum to 1: each
/// mixture's checkpoint must tell its choice from the other.
fn flip_renormalization(c: &mut ModelConfig) {
    let experts = c.experts.as_mut().expect("experts");
    experts.normalize = !experts.normalize;
}

/// Experts' values, each with its number.
type ExpertValues = Vec<(usize, Vec<f32>)>;

/// `tests/data/{name}` as llama.cpp's converter writes it for `arch`: each layer's
/// experts' matrices stacked (`ffn_{gate,up,down}_exps`), the router `ffn_gate_inp`, the
/// expert count and the experts a token runs, and `metadata` besides.
fn moe_gguf(name: &str, arch: &str, metadata: Vec<(&str, Meta)>) -> Vec<u8> {
    experts_gguf(name, arch, metadata, true)
}

/// [`moe_gguf`], its experts' matrices stacked or, where not `stacked`, one tensor each
/// (`blk.N.ffn_gate.E.weight`, ...), as Mixtral's early GGUF files store them.
fn experts_gguf(
    name: &str,
    arch: &str,
    metadata: Vec<(&str, Meta)>,
    stacked_experts: bool,
) -> Vec<u8> {
    let loaded = model_file::load(&transformers_reference(name).dir).expect("loads");
    let experts = loaded.config.experts.clone().expect("experts");
    let mut meta = vec![
        ("expert_count", Meta::Uint(experts.count as u64)),
        ("expert_used_count", Meta::Uint(experts.per_token as u64)),
    ];
    meta.extend(metadata);
    reference_gguf_edited(name, arch, meta, |tensors| {
        gguf_expert_tensors(tensors, experts.count, stacked_experts);
    })
}

/// Renames a checkpoint's routers, shared experts and experts in `tensors` to GGUF's
/// (`ffn_gate_inp`, `ffn_{gate,up,down}_shexp`), each layer's `count` experts' matrices
/// stacked (`ffn_{gate,up,down}_exps`) or, where not `stacked_experts`, one tensor each.
fn gguf_expert_tensors(tensors: &mut Vec<NamedTensor>, count: usize, stacked_experts: bool) {
    // Per stacked name: an expert's shape, and each expert's values by number.
    let mut stacked: HashMap<String, (Vec<usize>, ExpertValues)> = HashMap::new();
    tensors.retain_mut(|(name, shape, values)| {
        let Some((layer, rest)) = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
        else {
            return true;
        };
        let layer = layer.to_string();
        let renamed = match rest {
            "block_sparse_moe.gate.weight" | "mlp.gate.weight" => "ffn_gate_inp",
            "mlp.shared_expert_gate.weight" => {
                // llama.cpp's converter writes the gate as a vector.
                shape.remove(0);
                "ffn_gate_inp_shexp"
            }
            "mlp.shared_expert.gate_proj.weight" => "ffn_gate_shexp",
            "mlp.shared_expert.up_proj.weight" => "ffn_up_shexp",
            "mlp.shared_expert.down_proj.weight" => "ffn_down_shexp",
            _ => "",
        };
        if !renamed.is_empty() {
            *name = format!("blk.{layer}.{renamed}.weight");
            return true;
        }
        let Some(expert) = rest
            .strip_prefix("block_sparse_moe.experts.")
            .or_else(|| rest.strip_prefix("mlp.experts."))
        else {
            return true;
        };
        let (e, part) = expert.split_once('.').expect("E.part");
        let gguf = match part {
            "w1.weight" | "gate_proj.weight" => "ffn_gate_exps",
            "w3.weight" | "up_proj.weight" => "ffn_up_exps",
            _ => "ffn_down_exps",
        };
        if !stacked_experts {
            let single = gguf.strip_suffix("_exps").expect("a stack's name");
            *name = format!("blk.{layer}.{single}.{e}.weight");
            return true;
        }
        let entry = stacked
            .entry(format!("blk.{layer}.{gguf}.weight"))
            .or_insert_with(|| (shape.clone(), Vec::new()));
        entry
            .1
            .push((e.parse().expect("an expert"), std::mem::take(values)));
        false
    });
    for (name, (shape, mut parts)) in stacked {
        parts.sort_by_key(|(e, _)| *e);
        let values = parts.into_iter().flat_map(|(_, v)| v).collect();
        let shape = [vec![count], shape].concat();
        tensors.push((name, shape, values));
    }
}

/// Qwen3-MoE (`tests/data/qwen3-moe-tiny`): eight experts of width 32 in its second
/// layer, two a token, renormalized; its first layer dense (`mlp_only_layers`); per-head
/// q and k norms.
#[test]
fn qwen3_moe_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("qwen3-moe-tiny");
    let c = &loaded.config;
    let experts = c.experts.as_ref().expect("experts");
    assert_eq!(expert_settings(experts), (8, 2, 32, true));
    assert_eq!(
        (experts.layers.as_slice(), c.hidden_dim),
        ([false, true].as_slice(), 64)
    );
    assert_eq!(c.qk_norm, QkNorm::Heads);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the renormalization choice", &flip_renormalization)],
    );
    let gguf = moe_gguf(
        "qwen3-moe-tiny",
        "qwen3moe",
        vec![("expert_feed_forward_length", Meta::Uint(32))],
    );
    gguf_computes_what_the_directory_computes(&gguf, &loaded, &reference);
}

/// OLMoE (`tests/data/olmoe-tiny`): eight experts, three a token, weighted by their
/// probabilities among all eight (not renormalized); RMSNorms over the whole q and k
/// projections, and q, k and v clamped to `[-1.5, 1.5]` after them (`clip_qkv`; in its
/// GGUF form `olmoe.attention.clamp_kqv`).
#[test]
fn olmoe_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("olmoe-tiny");
    let experts = loaded.config.experts.as_ref().expect("experts");
    assert_eq!(expert_settings(experts), (8, 3, 64, false));
    assert_eq!(loaded.config.qk_norm, QkNorm::Projections);
    assert_eq!(loaded.config.clip_qkv, Some(1.5));
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the renormalization choice", &flip_renormalization),
            ("the q/k norms", &|c| c.qk_norm = QkNorm::None),
            ("the q/k/v clamp", &|c| c.clip_qkv = None),
        ],
    );
    let gguf = moe_gguf(
        "olmoe-tiny",
        "olmoe",
        vec![("attention.clamp_kqv", Meta::Float(1.5))],
    );
    gguf_computes_what_the_directory_computes(&gguf, &loaded, &reference);
    // A checkpoint missing an expert's matrix, or running more experts a token than it
    // has, is refused, naming what is wrong.
    let refusal = |as_name: &str, edit: &dyn Fn(&mut serde_json::Value), drop: &str| {
        let dir = rewritten_checkpoint("olmoe-tiny", as_name, edit, |tensors| {
            tensors.retain(|(name, _, _)| name != drop);
        });
        let err = model_file::load(&dir).err().map(|e| e.to_string());
        std::fs::remove_dir_all(&dir).ok();
        err.expect("refused")
    };
    let missing = refusal(
        "olmoe-missing",
        &|_| {},
        "model.layers.1.mlp.experts.5.up_proj.weight",
    );
    assert!(
        missing.contains("layer 1's expert 5 has no `w3` or `up_proj`")
            && missing.contains("`ffn_up_exps` stack or `ffn_up.5` tensor"),
        "{missing}"
    );
    let too_many = refusal("olmoe-nine", &|c| c["num_experts_per_tok"] = 9.into(), "");
    assert!(
        too_many.contains("each token runs 9 of 8 experts"),
        "{too_many}"
    );
}

/// `--quantize` stores a mixture's stacked experts quantized too (`[4, 64, 64]` in
/// q8_0, q4_0 and q4_k's fallback; the routers as they are), and the CPU and GPU backends run them through the
/// expert kernels (every op lowered) computing the reference semantics' logits within
/// [`TRANSFORMERS_BOUND`]; those stay near transformers' unquantized logits (measured:
/// 0.30 off in q8_0, 2.6 in q4_0, 1.5 in q5_0, logits reaching about 30).
#[test]
fn quantized_experts_run_on_every_backend() {
    let (reference, loaded) = reference_checkpoint("mixtral-tiny");
    let mut backends = vec![Backend::Cpu { threads: 2 }];
    if llm_lower::gpu::test_device(&Default::default()).is_some() {
        backends.push(Backend::Gpu(Default::default()));
    }
    for (format, stored, bound) in [
        (QuantFormat::Q8_0, QuantFormat::Q8_0, 1.0),
        (QuantFormat::Q4_0, QuantFormat::Q4_0, 5.0),
        (QuantFormat::Q4K, QuantFormat::Q5_0, 5.0),
    ] {
        let mut weights = loaded.weights.clone();
        weights.quantize_matrices(&format);
        let experts = weights.weight("layers.1.feed_forward.experts.w2.weight");
        match experts.as_deref() {
            Some(Value::Quantized(q)) => {
                assert_eq!((&q.format, &q.shape[..]), (&stored, &[4, 64, 64][..]))
            }
            other => panic!("{format}: the experts are {other:?}"),
        }
        // The router stays as it was, as llama.cpp keeps it.
        let router = weights.weight("layers.1.feed_forward.gate_inp.weight");
        assert!(
            matches!(router.as_deref(), Some(Value::Quantized(q)) if q.format == QuantFormat::BF16)
        );
        let want = interp_logits(&loaded.config, &weights, &reference);
        let error = largest_difference(&want, &reference.logits);
        assert!(error < bound, "{format}: {error} from transformers' logits");
        for backend in &backends {
            let model =
                Model::compile_on(backend, loaded.config.clone(), weights.clone(), "default")
                    .expect("compiles");
            for step in [Step::Prefill, Step::Decode] {
                let left = common::reference_ops(&model, backend, step);
                assert!(left.is_empty(), "{format} {backend:?} {step:?}: {left:?}");
            }
            let runs = prefill_and_decode_logits(&model, &reference.ids, reference.prompt_len);
            for (how, logits) in ["prefill", "decode"].into_iter().zip(runs) {
                let worst = largest_difference(&logits, &want);
                assert!(
                    worst < TRANSFORMERS_BOUND,
                    "{format} {backend:?} {how}: {worst}"
                );
            }
        }
    }
}

/// Qwen2-MoE (`tests/data/qwen2-moe-tiny`; Qwen1.5-MoE's architecture): four experts of
/// width 32, two a token, not renormalized, beside a shared expert of width 48 whose
/// output a sigmoid gates; Qwen2's q, k and v biases. Its GGUF form (`qwen2moe`, the
/// shared expert's `_shexp` tensors, its gate a vector) computes the same.
#[test]
fn qwen2_moe_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("qwen2-moe-tiny");
    let c = &loaded.config;
    let experts = c.experts.as_ref().expect("experts");
    assert_eq!(expert_settings(experts), (4, 2, 32, false));
    assert_eq!(
        experts.shared,
        Some(SharedExpert {
            hidden: 48,
            gated: true
        })
    );
    assert!(c.attention_bias.qkv && !c.attention_bias.output);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the renormalization choice", &flip_renormalization),
            ("the q/k/v biases", &|c| c.attention_bias.qkv = false),
            ("the shared expert", &|c| {
                c.experts.as_mut().expect("experts").shared = None;
            }),
        ],
    );
    let gguf = moe_gguf(
        "qwen2-moe-tiny",
        "qwen2moe",
        vec![
            ("expert_feed_forward_length", Meta::Uint(32)),
            ("expert_shared_feed_forward_length", Meta::Uint(48)),
        ],
    );
    gguf_computes_what_the_directory_computes(&gguf, &loaded, &reference);
}

/// Granite-MoE (`tests/data/granite-moe-tiny`): Granite's four scales (embeddings times
/// 2, block outputs times 0.5, scores by 1/16, logits divided by 2) over eight experts
/// of width 32, two a token, weighted by a softmax over the chosen logits; the checkpoint
/// stores every expert's matrices stacked, each expert's gate and up projections fused
/// (`input_linear`, split when loaded). Its GGUF form (`granitemoe`: the stacked experts
/// split into `ffn_gate_exps` and `ffn_up_exps` as llama.cpp's converter splits them, q
/// and k rows reordered for interleaved pairs) computes transformers' logits too.
#[test]
fn granite_moe_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("granite-moe-tiny");
    let c = &loaded.config;
    let experts = c.experts.as_ref().expect("experts");
    assert_eq!(expert_settings(experts), (8, 2, 32, true));
    assert_eq!(
        (experts.layers.as_slice(), experts.shared),
        ([true, true].as_slice(), None)
    );
    assert_eq!(
        (
            c.embedding_scale,
            c.residual_scale,
            c.attention_scale,
            c.logit_scale
        ),
        (Some(2.0), Some(0.5), Some(0.0625), Some(0.5))
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the renormalization choice", &flip_renormalization),
            ("the residual scale", &|c| c.residual_scale = None),
            ("the attention scale", &|c| c.attention_scale = None),
        ],
    );
    // Its q and k rows are in another order: against transformers' logits.
    let from_gguf = gguf_logits(&granite_moe_gguf("granite-moe-tiny"), &reference);
    let worst = largest_difference(&from_gguf, &reference.logits);
    assert!(worst < TRANSFORMERS_BOUND, "the GGUF form: {worst}");
}

/// Granite-MoE-Shared (`tests/data/granite-moe-shared-tiny`): four experts of width 32,
/// two a token, beside a shared expert of width 48 whose output is added without a gate
/// (`shared_mlp`, its gate and up projections fused); Granite's scales. Its GGUF form
/// (`granitemoe` with the `_shexp` tensors and `expert_shared_feed_forward_length`)
/// computes transformers' logits too.
#[test]
fn granite_moe_shared_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("granite-moe-shared-tiny");
    let experts = loaded.config.experts.as_ref().expect("experts");
    assert_eq!(expert_settings(experts), (4, 2, 32, true));
    let ungated = SharedExpert {
        hidden: 48,
        gated: false,
    };
    assert_eq!(experts.shared, Some(ungated));
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the renormalization choice", &flip_renormalization),
            ("the shared expert", &|c| {
                c.experts.as_mut().expect("experts").shared = None;
            }),
        ],
    );
    let gguf = granite_moe_gguf("granite-moe-shared-tiny");
    let loaded_gguf = llm_runtime::gguf::read(&gguf).expect("the GGUF file loads");
    let shared = loaded_gguf.config.experts.as_ref().and_then(|x| x.shared);
    assert_eq!(shared, Some(ungated));
    let worst = largest_difference(&gguf_logits(&gguf, &reference), &reference.logits);
    assert!(worst < TRANSFORMERS_BOUND, "the GGUF form: {worst}");
}

/// `tests/data/{name}` (a Granite-MoE checkpoint) as llama.cpp's converter writes it
/// (`granitemoe`): Granite's scales, the experts' stacked `input_linear` split into
/// `ffn_gate_exps` and `ffn_up_exps` (each expert's first half of rows its gate) and
/// `output_linear` as `ffn_down_exps`, the router `ffn_gate_inp`, a shared expert's fused
/// `input_linear` split into `ffn_gate_shexp` and `ffn_up_shexp` and its width given.
fn granite_moe_gguf(name: &str) -> Vec<u8> {
    let loaded = model_file::load(&transformers_reference(name).dir).expect("loads");
    let experts = loaded.config.experts.clone().expect("experts");
    let mut meta = vec![
        ("expert_count", Meta::Uint(experts.count as u64)),
        ("expert_used_count", Meta::Uint(experts.per_token as u64)),
        ("embedding_scale", Meta::Float(2.0)),
        ("residual_scale", Meta::Float(0.5)),
        ("attention.scale", Meta::Float(0.0625)),
        ("logit_scale", Meta::Float(2.0)),
    ];
    if let Some(shared) = experts.shared {
        let width = Meta::Uint(shared.hidden as u64);
        meta.push(("expert_shared_feed_forward_length", width));
    }
    reference_gguf_edited(name, "granitemoe", meta, |tensors| {
        let mut split = Vec::new();
        tensors.retain_mut(|(name, shape, values)| {
            let Some((layer, rest)) = name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once('.'))
            else {
                return true;
            };
            let gguf = |n: &str| format!("blk.{layer}.{n}.weight");
            let fused = match rest {
                "block_sparse_moe.router.layer.weight" => {
                    *name = gguf("ffn_gate_inp");
                    return true;
                }
                "block_sparse_moe.output_linear.weight" => {
                    *name = gguf("ffn_down_exps");
                    return true;
                }
                "shared_mlp.output_linear.weight" => {
                    *name = gguf("ffn_down_shexp");
                    return true;
                }
                "block_sparse_moe.input_linear.weight" => ["ffn_gate_exps", "ffn_up_exps"],
                "shared_mlp.input_linear.weight" => ["ffn_gate_shexp", "ffn_up_shexp"],
                _ => return true,
            };
            // `[rows, k]` or `[experts, rows, k]`: each matrix's first half of rows the
            // gate, the rest the up projection.
            let (k, rows) = (shape[shape.len() - 1], shape[shape.len() - 2]);
            let half = rows / 2 * k;
            for (part, n) in fused.into_iter().enumerate() {
                let values = values
                    .chunks(rows * k)
                    .flat_map(|m| &m[part * half..(part + 1) * half])
                    .copied()
                    .collect();
                let mut part_shape = shape.clone();
                part_shape[shape.len() - 2] = rows / 2;
                split.push((gguf(n), part_shape, values));
            }
            false
        });
        tensors.extend(split);
    })
}

/// DBRX (`tests/data/dbrx-tiny`): LayerNorms without bias, q, k and v fused in one
/// projection and clamped to `[-1.5, 1.5]`, four experts of width 32, two a token, their
/// probabilities divided by their sum (`moe_normalize_expert_weights` 1); its
/// configuration nested (`attn_config`, `ffn_config`), its experts' matrices stacked in
/// `[experts * hidden, dim]` tensors, the down projections transposed. Its GGUF form
/// (`dbrx`, as llama.cpp's converter writes it: the experts `[experts, ...]`, the down
/// projections turned back, `attn_output_norm` the feed-forward block's norm) computes
/// what the directory computes.
#[test]
fn dbrx_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("dbrx-tiny");
    let c = &loaded.config;
    let experts = c.experts.as_ref().expect("experts");
    assert_eq!(expert_settings(experts), (4, 2, 32, true));
    assert_eq!(
        (c.norm, c.norm_eps, c.clip_qkv, c.heads, c.kv_heads),
        (Norm::Layer, 1e-5, Some(1.5), 4, 2)
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the renormalization choice", &flip_renormalization),
            ("the q/k/v clamp", &|c| c.clip_qkv = None),
            ("LayerNorms", &|c| c.norm = Norm::Rms),
        ],
    );
    let gguf = dbrx_gguf();
    gguf_computes_what_the_directory_computes(&gguf, &loaded, &reference);
    // The Hub's configs (written before transformers 5) hold the head and RoPE settings
    // in `attn_config` only, and may leave out the experts' norm (1 by default): the same
    // model.
    let dir = rewritten_checkpoint(
        "dbrx-tiny",
        "dbrx-nested",
        |c| {
            let fields = c.as_object_mut().expect("an object");
            fields.remove("num_key_value_heads");
            fields.remove("rope_parameters");
            let ffn = fields["ffn_config"].as_object_mut().expect("ffn_config");
            ffn.remove("moe_normalize_expert_weights");
        },
        |_| {},
    );
    let nested = model_file::load(&dir).map(|m| m.config);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(nested.expect("loads"), loaded.config);
    // Another norm of the chosen probabilities than L1 is refused by name.
    let dir = rewritten_checkpoint(
        "dbrx-tiny",
        "dbrx-l2",
        |c| c["ffn_config"]["moe_normalize_expert_weights"] = 2.0.into(),
        |_| {},
    );
    let err = model_file::load(&dir).err().map(|e| e.to_string());
    std::fs::remove_dir_all(&dir).ok();
    let err = err.expect("refused");
    assert!(
        err.contains("`moe_normalize_expert_weights` = 2.0"),
        "{err}"
    );
}

/// gpt-oss (`tests/data/gpt-oss-tiny`): biases on every attention projection, an
/// attention sink a head, a window of 6 over its first layer, YaRN's RoPE, and four
/// experts of width 32, two a token weighted by a softmax over their logits, with
/// router and expert biases and a clamped SwiGLU (limit 1.5), stored stacked as `x @ W`
/// takes them with the gate and up columns interleaved.
#[test]
fn gpt_oss_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("gpt-oss-tiny");
    let c = &loaded.config;
    let experts = c.experts.as_ref().expect("experts");
    assert_eq!(expert_settings(experts), (4, 2, 32, true));
    let clamped = ExpertGlu::ClampedSwiglu {
        alpha: 1.702,
        limit: 1.5,
    };
    assert_eq!((experts.biases, experts.glu), (true, clamped));
    let all_biases = AttentionBias {
        qkv: true,
        output: true,
    };
    assert_eq!((c.attention_sinks, c.attention_bias), (true, all_biases));
    let local = c.local_attention.as_ref().expect("local attention");
    assert_eq!(
        (local.window, local.layers.as_slice()),
        (6, [true, false].as_slice())
    );
    assert!(c.rope_freq_factors && c.rope_mscale > 1.0, "YaRN's RoPE");
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the attention sinks", &|c| c.attention_sinks = false),
            ("the window", &|c| c.local_attention = None),
            ("YaRN's attention factor", &|c| c.rope_mscale = 1.0),
            ("the experts' biases", &|c| experts_of(c).biases = false),
            ("the SwiGLU's clamp", &|c| {
                experts_of(c).glu = ExpertGlu::ClampedSwiglu {
                    alpha: 1.702,
                    limit: 1e6,
                }
            }),
            ("the clamped SwiGLU", &|c| {
                experts_of(c).glu = ExpertGlu::Gated
            }),
        ],
    );
    // Its GGUF form computes the same, but with llama.cpp's fixed SwiGLU limit (7): the
    // file's model is the directory's but for the limit.
    let gguf = llm_runtime::gguf::read(&gpt_oss_gguf()).expect("the GGUF form loads");
    let mut expected = loaded.config.clone();
    experts_of(&mut expected).glu = ExpertGlu::ClampedSwiglu {
        alpha: 1.702,
        limit: 7.0,
    };
    let read = &gguf.config;
    assert_eq!(
        (
            read.experts.as_ref(),
            read.attention_sinks,
            &read.local_attention
        ),
        (expected.experts.as_ref(), true, &expected.local_attention)
    );
    let mut at_limit = gguf.config.clone();
    experts_of(&mut at_limit).glu = clamped;
    let logits = interp_logits(&at_limit, &gguf.weights, &reference);
    let worst = largest_difference(&logits, &reference.logits);
    assert!(worst < TRANSFORMERS_BOUND, "the GGUF form: {worst}");
}

/// `tests/data/gpt-oss-tiny` as llama.cpp's converter writes it (`gpt-oss`): the
/// feed-forward block's input norm `post_attention_norm`, the sinks `attn_sinks`, the
/// router `ffn_gate_inp` with its bias, each expert stack turned to `[experts, out, in]`
/// with the gate and up projections (and their biases) taken apart from their interleaved
/// columns, the window and YaRN's settings in the metadata.
fn gpt_oss_gguf() -> Vec<u8> {
    let meta = vec![
        ("expert_count", Meta::Uint(4)),
        ("expert_used_count", Meta::Uint(2)),
        ("expert_feed_forward_length", Meta::Uint(32)),
        ("attention.sliding_window", Meta::Uint(6)),
        ("rope.scaling.type", Meta::Str("yarn".into())),
        ("rope.scaling.factor", Meta::Float(4.0)),
        ("rope.scaling.original_context_length", Meta::Uint(32)),
    ];
    reference_gguf_edited("gpt-oss-tiny", "gpt-oss", meta, |tensors| {
        let mut parts = Vec::new();
        tensors.retain_mut(|(name, shape, values)| {
            let Some((layer, rest)) = name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once('.'))
            else {
                return true;
            };
            let gguf = |n: &str| format!("blk.{layer}.{n}");
            let renamed = match rest {
                "post_attention_layernorm.weight" => "post_attention_norm.weight",
                "self_attn.sinks" => "attn_sinks.weight",
                "mlp.router.weight" => "ffn_gate_inp.weight",
                "mlp.router.bias" => "ffn_gate_inp.bias",
                "mlp.experts.down_proj_bias" => "ffn_down_exps.bias",
                _ => "",
            };
            if !renamed.is_empty() {
                *name = gguf(renamed);
                return true;
            }
            if rest == "mlp.experts.gate_up_proj_bias" {
                // `[experts, 2 * hidden]`: even values the gate's, odd the up's.
                for (first, n) in [(0, "ffn_gate_exps.bias"), (1, "ffn_up_exps.bias")] {
                    let picked = values.iter().skip(first).step_by(2).copied().collect();
                    parts.push((gguf(n), vec![shape[0], shape[1] / 2], picked));
                }
                return false;
            }
            let &[experts, rows, cols] = &shape[..] else {
                return true;
            };
            // `[experts, in, out]` turned to `[experts, out, in]`, keeping the output
            // columns `keep` picks.
            let values: &[f32] = values;
            let turned = |keep: &dyn Fn(usize) -> bool| -> Vec<f32> {
                let mut out = Vec::with_capacity(values.len());
                for e in 0..experts {
                    for c in (0..cols).filter(|&c| keep(c)) {
                        out.extend((0..rows).map(|r| values[(e * rows + r) * cols + c]));
                    }
                }
                out
            };
            match rest {
                "mlp.experts.gate_up_proj" => {
                    let half = vec![experts, cols / 2, rows];
                    let gates = turned(&|c| c % 2 == 0);
                    parts.push((gguf("ffn_gate_exps.weight"), half.clone(), gates));
                    parts.push((gguf("ffn_up_exps.weight"), half, turned(&|c| c % 2 == 1)));
                }
                "mlp.experts.down_proj" => {
                    let all = turned(&|_| true);
                    parts.push((gguf("ffn_down_exps.weight"), vec![experts, cols, rows], all));
                }
                _ => return true,
            }
            false
        });
        tensors.extend(parts);
    })
}

/// DeepSeek V3 (`tests/data/deepseek-v3-tiny`): latent attention (queries and keys and
/// values through latents of 48 and 32, heads of 16 + 24 RoPE features, more than the
/// width over the heads, as DeepSeek-V3's; values of 12), YaRN whose `mscale_all_dim`
/// scales the scores, a dense first layer, then eight experts in four groups, two kept,
/// two experts a token chosen by sigmoid scores plus a selection bias, weighted by the
/// normalized scores times 2.5, beside a shared expert.
#[test]
fn deepseek_v3_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("deepseek-v3-tiny");
    let c = &loaded.config;
    let latent = c.latent_attention.expect("latent attention");
    assert_eq!(
        (
            latent.q_rank,
            latent.kv_rank,
            latent.nope,
            latent.rope,
            latent.value
        ),
        (Some(48), 32, 16, 24, 12)
    );
    // The cache's one head: the latent and the RoPE key.
    assert_eq!(
        (c.head_dim(), c.kv_heads, c.rotary(), c.rope_half),
        (56, 1, 24, false)
    );
    let experts = c.experts.as_ref().expect("experts");
    assert_eq!(expert_settings(experts), (8, 2, 32, true));
    assert_eq!(
        (experts.layers.as_slice(), experts.scale, experts.groups),
        (
            [false, true].as_slice(),
            2.5,
            Some(ExpertGroups {
                count: 4,
                chosen: 2,
                scored_by: 2
            })
        )
    );
    let unscaled = 40f64.powf(-0.5);
    assert!(
        c.attention_scale.expect("a scale") > unscaled,
        "YaRN's factor"
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the selection bias", &|c| {
                experts_of(c).scoring = ExpertScoring::Sigmoid {
                    selection_bias: false,
                }
            }),
            ("the groups", &|c| experts_of(c).groups = None),
            ("the scale", &|c| experts_of(c).scale = 1.0),
            ("the normalization", &|c| experts_of(c).normalize = false),
            ("the shared expert", &|c| experts_of(c).shared = None),
            ("YaRN's scale of the scores", &|c| {
                c.attention_scale = Some(unscaled)
            }),
        ],
    );
    // Its GGUF forms, `attn_kv_b` whole and split as llama.cpp's converter now splits it.
    let meta = || {
        vec![
            ("expert_weights_scale", Meta::Float(2.5)),
            ("expert_weights_norm", Meta::Bool(true)),
            ("expert_gating_func", Meta::Uint(2)),
            ("expert_group_count", Meta::Uint(4)),
            ("expert_group_used_count", Meta::Uint(2)),
            ("rope.scaling.type", Meta::Str("yarn".into())),
            ("rope.scaling.factor", Meta::Float(4.0)),
            ("rope.scaling.original_context_length", Meta::Uint(32)),
            ("rope.scaling.yarn_log_multiplier", Meta::Float(0.1)),
        ]
    };
    for split in [false, true] {
        let gguf = deepseek_gguf("deepseek-v3-tiny", split, meta());
        gguf_computes_what_the_directory_computes(&gguf, &loaded, &reference);
    }
}

/// `tests/data/{name}` (DeepSeek V2's or V3's) as llama.cpp's converter writes it
/// (`deepseek2`): latent attention's tensors (`attn_q_a`, `attn_q_a_norm`, `attn_q_b`
/// or `attn_q`; `attn_kv_a_mqa`, `attn_kv_a_norm`; and `attn_kv_b`, or, where `split`,
/// as the converter now writes them, `attn_k_b` with each head's keys turned and
/// `attn_v_b`, the widths then under `key_length_mla` and `value_length_mla`), the
/// selection bias `exp_probs_b`, the shared experts `ffn_*_shexp`, stacked experts, and
/// `metadata` besides the latent widths.
fn deepseek_gguf(name: &str, split: bool, metadata: Vec<(&str, Meta)>) -> Vec<u8> {
    let loaded = model_file::load(&transformers_reference(name).dir).expect("loads");
    let c = &loaded.config;
    let latent = c.latent_attention.expect("latent attention");
    let experts = c.experts.clone().expect("experts");
    let uint = |v: usize| Meta::Uint(v as u64);
    let width = latent.nope + latent.rope;
    let mut meta = vec![
        ("expert_count", uint(experts.count)),
        ("expert_used_count", uint(experts.per_token)),
        ("expert_feed_forward_length", uint(experts.hidden)),
        ("expert_shared_count", uint(1)),
        ("leading_dense_block_count", uint(1)),
        ("attention.kv_lora_rank", uint(latent.kv_rank)),
        ("rope.dimension_count", uint(latent.rope)),
    ];
    if let Some(rank) = latent.q_rank {
        meta.push(("attention.q_lora_rank", uint(rank)));
    }
    meta.extend(if split {
        [
            ("attention.key_length", uint(latent.kv_rank + latent.rope)),
            ("attention.value_length", uint(latent.kv_rank)),
            ("attention.key_length_mla", uint(width)),
            ("attention.value_length_mla", uint(latent.value)),
        ]
        .to_vec()
    } else {
        [
            ("attention.key_length", uint(width)),
            ("attention.value_length", uint(latent.value)),
        ]
        .to_vec()
    });
    meta.extend(metadata);
    let heads = c.heads;
    reference_gguf_edited(name, "deepseek2", meta, |tensors| {
        let mut parts = Vec::new();
        tensors.retain_mut(|(name, shape, values)| {
            let Some((layer, rest)) = name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once('.'))
            else {
                return true;
            };
            let gguf = |n: &str| format!("blk.{layer}.{n}");
            let renamed = match rest {
                "self_attn.q_a_proj.weight" => "attn_q_a.weight",
                "self_attn.q_a_layernorm.weight" => "attn_q_a_norm.weight",
                "self_attn.q_b_proj.weight" => "attn_q_b.weight",
                "self_attn.kv_a_proj_with_mqa.weight" => "attn_kv_a_mqa.weight",
                "self_attn.kv_a_layernorm.weight" => "attn_kv_a_norm.weight",
                "mlp.gate.e_score_correction_bias" => "exp_probs_b.bias",
                "mlp.shared_experts.gate_proj.weight" => "ffn_gate_shexp.weight",
                "mlp.shared_experts.up_proj.weight" => "ffn_up_shexp.weight",
                "mlp.shared_experts.down_proj.weight" => "ffn_down_shexp.weight",
                "self_attn.kv_b_proj.weight" if !split => "attn_kv_b.weight",
                "self_attn.kv_b_proj.weight" => {
                    // Per head: its key rows turned to `[kv_rank, nope]`, its value rows.
                    let (rank, per_head) = (shape[1], latent.nope + latent.value);
                    let mut keys = Vec::new();
                    let mut vals = Vec::new();
                    for h in 0..heads {
                        let head = &values[h * per_head * rank..][..per_head * rank];
                        for r in 0..rank {
                            keys.extend((0..latent.nope).map(|i| head[i * rank + r]));
                        }
                        vals.extend_from_slice(&head[latent.nope * rank..]);
                    }
                    parts.push((
                        gguf("attn_k_b.weight"),
                        vec![heads, rank, latent.nope],
                        keys,
                    ));
                    parts.push((
                        gguf("attn_v_b.weight"),
                        vec![heads, latent.value, rank],
                        vals,
                    ));
                    return false;
                }
                _ => return true,
            };
            *name = gguf(renamed);
            true
        });
        tensors.extend(parts);
        gguf_expert_tensors(tensors, experts.count, true);
    })
}

/// DeepSeek V2 (`tests/data/deepseek-v2-tiny`, V2-Lite's shape: queries projected
/// directly): latent keys and values, RoPE over neighbouring pairs, experts weighted by
/// their softmax probabilities (not renormalized) times 1.5, both chosen within the best
/// of four groups of two, scored by their best.
#[test]
fn deepseek_v2_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("deepseek-v2-tiny");
    let c = &loaded.config;
    assert_eq!(c.latent_attention.expect("latent attention").q_rank, None);
    let experts = c.experts.as_ref().expect("experts");
    assert_eq!(
        (experts.scoring, experts.normalize, experts.scale),
        (ExpertScoring::Softmax, false, 1.5)
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the groups", &|c| experts_of(c).groups = None),
            ("the scale", &|c| experts_of(c).scale = 1.0),
            ("RoPE's pairs", &|c| c.rope_half = true),
        ],
    );
    // Its GGUF form without group keys: llama.cpp scores groups by their two best, not
    // by their best as V2 does, so the file computes the directory's model without its
    // groups.
    let gguf = deepseek_gguf(
        "deepseek-v2-tiny",
        false,
        vec![("expert_weights_scale", Meta::Float(1.5))],
    );
    let mut ungrouped = loaded.config.clone();
    experts_of(&mut ungrouped).groups = None;
    let from_gguf = gguf_logits(&gguf, &reference);
    let directory = interp_logits(&ungrouped, &loaded.weights, &reference);
    let worst = largest_difference(&from_gguf, &directory);
    assert!(
        worst < 1e-5,
        "the GGUF form: {worst} from the ungrouped directory"
    );
}

/// The experts of `c`, which has them.
fn experts_of(c: &mut ModelConfig) -> &mut Experts {
    c.experts.as_mut().expect("experts")
}

/// gpt-oss with its experts' matrices in MXFP4 as OpenAI publishes them
/// (`tests/data/gpt-oss-mxfp4-tiny`: `gate_up_proj_blocks` and `_scales`, `down_proj`'s,
/// which transformers itself loads to within 5e-7 of the float form's logits): the
/// loader repacks them into GGUF's MXFP4 blocks, kept quantized, and every backend
/// computes transformers' logits of the model whose experts they hold.
#[test]
fn gpt_oss_mxfp4_experts_compute_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("gpt-oss-mxfp4-tiny");
    for name in ["w1", "w3", "w2"] {
        let stack = loaded
            .weights
            .weight(&format!("layers.1.feed_forward.experts.{name}.weight"));
        match stack.as_deref() {
            Some(Value::Quantized(q)) => assert_eq!(q.format, QuantFormat::Mxfp4, "{name}"),
            _ => panic!("the experts' {name} is not kept in MXFP4"),
        }
    }
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the attention sinks", &|c| c.attention_sinks = false)],
    );
    // A scales tensor without its blocks is refused by name.
    let dropped = "model.layers.1.mlp.experts.down_proj_blocks";
    let dir = std::env::temp_dir().join(format!("llmc-gpt-oss-halves-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::copy(reference.dir.join("config.json"), dir.join("config.json")).expect("config");
    let stored = std::fs::read(reference.dir.join("model.safetensors")).expect("tensors");
    let st = safetensors::SafeTensors::deserialize(&stored).expect("safetensors");
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != dropped)
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.join("model.safetensors")).expect("written");
    let err = model_file::load(&dir).err().map(|e| e.to_string());
    std::fs::remove_dir_all(&dir).ok();
    let err = err.expect("refused");
    assert!(
        err.contains("`model.layers.1.mlp.experts.down_proj_scales` has no"),
        "{err}"
    );
}

/// `tests/data/dbrx-tiny` as llama.cpp's converter writes it (`dbrx`): GGUF names, the
/// experts' `[experts * hidden, dim]` matrices as `[experts, hidden, dim]`, the down
/// projections each transposed to `[experts, dim, hidden]`, and the clamp.
fn dbrx_gguf() -> Vec<u8> {
    let loaded = model_file::load(&transformers_reference("dbrx-tiny").dir).expect("loads");
    let c = loaded.config;
    let experts = c.experts.clone().expect("experts");
    let meta = vec![
        ("expert_count", Meta::Uint(experts.count as u64)),
        ("expert_used_count", Meta::Uint(experts.per_token as u64)),
        ("attention.clamp_kqv", Meta::Float(1.5)),
    ];
    let (count, hidden, dim) = (experts.count, experts.hidden, c.dim);
    reference_gguf_edited("dbrx-tiny", "dbrx", meta, |tensors| {
        for (name, shape, values) in tensors.iter_mut() {
            let global = match name.as_str() {
                "transformer.wte.weight" => Some("token_embd.weight"),
                "transformer.norm_f.weight" => Some("output_norm.weight"),
                "lm_head.weight" => Some("output.weight"),
                _ => None,
            };
            if let Some(global) = global {
                *name = global.to_string();
                continue;
            }
            let (layer, rest) = name
                .strip_prefix("transformer.blocks.")
                .and_then(|r| r.split_once('.'))
                .expect("a block's tensor");
            let gguf = match rest {
                "norm_attn_norm.norm_1.weight" => "attn_norm",
                "norm_attn_norm.attn.Wqkv.weight" => "attn_qkv",
                "norm_attn_norm.attn.out_proj.weight" => "attn_output",
                "norm_attn_norm.norm_2.weight" => "attn_output_norm",
                "ffn.router.layer.weight" => "ffn_gate_inp",
                "ffn.experts.mlp.w1" => "ffn_gate_exps",
                "ffn.experts.mlp.v1" => "ffn_up_exps",
                "ffn.experts.mlp.w2" => "ffn_down_exps",
                other => panic!("an unexpected tensor {other}"),
            };
            if rest.starts_with("ffn.experts.") {
                *shape = vec![count, hidden, dim];
            }
            if gguf == "ffn_down_exps" {
                // Each expert's `[hidden, dim]` matrix as `[dim, hidden]`.
                *values = values
                    .chunks(hidden * dim)
                    .flat_map(|m| {
                        (0..dim).flat_map(move |d| (0..hidden).map(move |h| m[h * dim + d]))
                    })
                    .collect();
                *shape = vec![count, dim, hidden];
            }
            *name = format!("blk.{layer}.{gguf}.weight");
        }
    })
}

/// The mixtures' GGUF files (Mixtral's `llama` with experts, stacked and one tensor each,
/// `olmoe`, `granitemoe` with a shared expert, `dbrx`, `gpt-oss`, `deepseek2` (V3's
/// with split key and value projections, V2's whole), `qwen2moe`, `qwen3moe`), mutated,
/// never make the loader panic.
#[test]
fn mutated_moe_gguf_files_never_panic() {
    let originals = [
        moe_gguf("mixtral-tiny", "llama", vec![]),
        experts_gguf("mixtral-tiny", "llama", vec![], false),
        moe_gguf("olmoe-tiny", "olmoe", vec![]),
        granite_moe_gguf("granite-moe-shared-tiny"),
        dbrx_gguf(),
        gpt_oss_gguf(),
        deepseek_gguf(
            "deepseek-v3-tiny",
            true,
            vec![("expert_gating_func", Meta::Uint(2))],
        ),
        deepseek_gguf("deepseek-v2-tiny", false, vec![]),
        moe_gguf(
            "qwen2-moe-tiny",
            "qwen2moe",
            vec![
                ("expert_feed_forward_length", Meta::Uint(32)),
                ("expert_shared_feed_forward_length", Meta::Uint(48)),
            ],
        ),
        moe_gguf(
            "qwen3-moe-tiny",
            "qwen3moe",
            vec![("expert_feed_forward_length", Meta::Uint(32))],
        ),
    ];
    for original in &originals {
        llm_runtime::gguf::read(original).expect("the unmutated file loads");
    }
    let runs = common::mutated_copies_never_panic(&originals, 0x9998, |_, data| {
        let _ = llm_runtime::gguf::read(data);
    });
    assert!(runs > 0);
}
