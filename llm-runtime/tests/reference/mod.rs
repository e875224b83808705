//! Helpers shared by the tests that check the model builder against Hugging Face
//! `transformers` (`hf.rs`, `hf_moe.rs`): the reference checkpoints of `tests/data` and
//! the logits `transformers` computed for them, the check that every backend computes
//! those logits and that each of a checkpoint's settings matters, and the GGUF forms of
//! a checkpoint as llama.cpp's converter writes them.
#![allow(
    dead_code,
    reason = "each test binary that includes this module uses a part of it"
)]

use std::path::{Path, PathBuf};

use llm_runtime::{
    generate::{Backend, Model, Step},
    gguf::Meta,
    model::ModelConfig,
    model_file,
};
use safetensors::{Dtype, tensor::TensorView};

use crate::common;

/// Rows of a `[heads * head_dim, K]` projection reordered from interleaved RoPE pairs
/// `(2i, 2i + 1)` to half-split pairs `(i, i + head_dim / 2)` (`to_half`), or back (as
/// llama.cpp's converter reorders a `llama` or `granite` checkpoint).
pub fn permute_rope_rows(
    w: &[f32],
    heads: usize,
    head_dim: usize,
    k: usize,
    to_half: bool,
) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..head_dim / 2 {
            for j in 0..2 {
                let interleaved = (h * head_dim + 2 * i + j) * k;
                let half = (h * head_dim + j * head_dim / 2 + i) * k;
                let (from, to) = if to_half {
                    (interleaved, half)
                } else {
                    (half, interleaved)
                };
                out[to..to + k].copy_from_slice(&w[from..from + k]);
            }
        }
    }
    out
}

/// Writes `tensors` (names, shapes, values) to `dir/model.safetensors`, each stored as
/// `dtype` (F32, F16 or BF16, the values rounded to it).
pub fn write_safetensors(dir: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: Dtype) {
    let encode = |x: &f32| match dtype {
        Dtype::F16 => half::f16::from_f32(*x).to_le_bytes().to_vec(),
        Dtype::BF16 => half::bf16::from_f32(*x).to_le_bytes().to_vec(),
        _ => x.to_le_bytes().to_vec(),
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(encode).collect())
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), d)| {
            (
                n.clone(),
                TensorView::new(dtype, s.clone(), d).expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))
        .expect("safetensors");
}

/// A checkpoint that Hugging Face `transformers` wrote (`tests/data/NAME`, made by
/// `make_references.py`) and the logits it computed for the checkpoint's token ids:
/// an independent implementation of the architecture.
pub struct TransformersReference {
    /// The checkpoint's directory.
    pub dir: PathBuf,
    /// The token ids: a prompt of `prompt_len`, then tokens fed one at a time.
    pub ids: Vec<u32>,
    /// Tokens of the prompt.
    pub prompt_len: usize,
    /// `transformers`' logits at every position of one forward pass over `ids`.
    pub logits: Vec<Vec<f32>>,
}

/// `tests/data/NAME`'s checkpoint directory and `reference.json`.
pub fn transformers_reference(name: &str) -> TransformersReference {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let numbers = |v: &serde_json::Value| -> Vec<f64> {
        let items = v.as_array().expect("a list");
        items
            .iter()
            .map(|x| x.as_f64().expect("a number"))
            .collect()
    };
    TransformersReference {
        ids: numbers(&json["ids"])
            .into_iter()
            .map(|x| x as u32)
            .collect(),
        prompt_len: json["prompt_len"].as_u64().expect("prompt_len") as usize,
        logits: json["logits"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|row| numbers(row).into_iter().map(|x| x as f32).collect())
            .collect(),
        dir,
    }
}

/// The logits `model` computes for `ids`: in one prefill call, and with the first
/// `prompt_len` prefilled and the rest decoded one at a time.
pub fn prefill_and_decode_logits(
    model: &Model,
    ids: &[u32],
    prompt_len: usize,
) -> [Vec<Vec<f32>>; 2] {
    let n = ids.len();
    let cache = || model.new_cache(model.sequence_blocks(n, n));
    let (all, _) = model
        .forward(Step::Prefill, ids, 0, cache())
        .expect("prefill");
    let (mut stepwise, mut kv) = model
        .forward(Step::Prefill, &ids[..prompt_len], 0, cache())
        .expect("prompt");
    for (p, &id) in ids.iter().enumerate().skip(prompt_len) {
        let (rows, next) = model.forward(Step::Decode, &[id], p, kv).expect("decode");
        stepwise.extend(rows);
        kv = next;
    }
    [all, stepwise]
}

/// The position of each row's largest logit.
pub fn top_tokens(logits: &[Vec<f32>]) -> Vec<usize> {
    logits
        .iter()
        .map(|row| (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }))
        .collect()
}

/// The reference semantics' logits of the model `config` over `weights` for
/// `reference`'s ids, in one prefill call.
pub fn interp_logits(
    config: &ModelConfig,
    weights: &llm_runtime::weights::Weights,
    reference: &TransformersReference,
) -> Vec<Vec<f32>> {
    let model = Model::compile_on(&Backend::Interp, config.clone(), weights.clone(), "default")
        .expect("compiles");
    let [all, _] = prefill_and_decode_logits(&model, &reference.ids, reference.prompt_len);
    all
}

/// How far every backend's logits may be from `transformers'` (the largest difference
/// measured is 1.6e-5, logits being up to about 30).
pub const TRANSFORMERS_BOUND: f32 = 1e-4;

/// A change to a model's configuration that leaves out one of its settings.
pub type Ablation<'a> = &'a dyn Fn(&mut ModelConfig);

/// Checks that the CPU and GPU backends (the GPU where there is a device) lower every op
/// of both step functions, that the reference semantics and both backends compute
/// `reference`'s logits for `loaded` within [`TRANSFORMERS_BOUND`], prefilling
/// every token or decoding them one at a time, and pick its top token at every position;
/// and that each of `ablations` (a name and a change to the configuration) moves the
/// logits by more than ten times the bound: the checkpoint exercises that setting.
pub fn computes_what_transformers_computes(
    loaded: &model_file::LoadedModel,
    reference: &TransformersReference,
    ablations: &[(&str, Ablation)],
) {
    let tolerance = TRANSFORMERS_BOUND;
    let mut backends = vec![Backend::Interp, Backend::Cpu { threads: 1 }];
    if llm_lower::gpu::test_device(&Default::default()).is_some() {
        backends.push(Backend::Gpu(Default::default()));
    }
    let want = top_tokens(&reference.logits);
    for backend in &backends {
        let model = Model::compile_on(
            backend,
            loaded.config.clone(),
            loaded.weights.clone(),
            "default",
        )
        .expect("compiles");
        let runs = prefill_and_decode_logits(&model, &reference.ids, reference.prompt_len);
        for step in [Step::Prefill, Step::Decode] {
            let left = common::reference_ops(&model, backend, step);
            assert!(
                left.is_empty(),
                "{backend:?} {step:?} left {left:?} to the reference"
            );
        }
        for (how, logits) in ["prefill", "decode"].into_iter().zip(runs) {
            let worst = largest_difference(&logits, &reference.logits);
            let name = backend.name();
            assert!(
                worst < tolerance,
                "{name}, {how}: {worst} from transformers' logits"
            );
            assert_eq!(top_tokens(&logits), want, "{name}, {how}");
        }
    }
    for (setting, ablate) in ablations {
        let mut config = loaded.config.clone();
        ablate(&mut config);
        let logits = interp_logits(&config, &loaded.weights, reference);
        let shift = largest_difference(&logits, &reference.logits);
        assert!(shift > 10.0 * tolerance, "without {setting}: {shift}");
    }
}

/// [`transformers_reference`] `name` and its checkpoint, loaded.
pub fn reference_checkpoint(name: &str) -> (TransformersReference, model_file::LoadedModel) {
    let reference = transformers_reference(name);
    let loaded = model_file::load(&reference.dir).expect("the checkpoint loads");
    (reference, loaded)
}

/// The checkpoint `tests/data/{name}` as llama.cpp's converter writes it for `arch`:
/// GGUF names, f32 values (Gemma's norm weights with their 1 added), the sizes of the
/// checkpoint's `config.json` (unless `metadata` gives them), `metadata` (keys after
/// `{arch}.`) and the f32 tensors
/// `extra` (GGUF names).
pub fn reference_gguf(
    name: &str,
    arch: &str,
    metadata: Vec<(&str, Meta)>,
    extra: Vec<(String, Vec<usize>, Vec<f32>)>,
) -> Vec<u8> {
    reference_gguf_edited(name, arch, metadata, |tensors| tensors.extend(extra))
}

/// A named tensor's shape and f32 values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// [`reference_gguf`] with the tensors (Hugging Face's names where the checkpoint has
/// them, GGUF's for others) changed by `edit` before they are written.
pub fn reference_gguf_edited(
    name: &str,
    arch: &str,
    metadata: Vec<(&str, Meta)>,
    edit: impl FnOnce(&mut Vec<NamedTensor>),
) -> Vec<u8> {
    let reference = transformers_reference(name);
    let gemma = arch.starts_with("gemma");
    let post_norms = matches!(arch, "gemma2" | "gemma3" | "olmo2");
    let loaded = model_file::load(&reference.dir).expect("loads");
    let c = &loaded.config;
    let mut tensors: Vec<_> = reference_tensors(&reference)
        .into_iter()
        .map(|(name, shape, values)| {
            let sandwich = [
                ("post_attention_layernorm", "post_attention_norm"),
                ("pre_feedforward_layernorm", "ffn_norm"),
                ("post_feedforward_layernorm", "post_ffw_norm"),
            ];
            let gguf = sandwich
                .iter()
                .find(|(hf, _)| post_norms && name.contains(hf))
                .map_or(name.clone(), |(hf, ours)| {
                    name.replace("model.layers.", "blk.").replace(hf, ours)
                });
            let values = if gemma && name.ends_with("norm.weight") {
                values.iter().map(|w| 1.0 + w).collect()
            } else {
                values
            };
            // llama.cpp's converter reorders the q and k rows (and biases) of Llama,
            // Granite, Granite-MoE, SmolLM3 and OLMo for interleaved RoPE pairs.
            let heads = match name.rsplit('.').nth(1) {
                Some("q_proj") => c.heads,
                Some("k_proj") => c.kv_heads,
                _ => 0,
            };
            let interleaved = matches!(
                arch,
                "llama" | "granite" | "granitemoe" | "smollm3" | "olmo"
            );
            let values = if interleaved && heads > 0 {
                let width = shape.get(1).copied().unwrap_or(1);
                permute_rope_rows(&values, heads, c.head_dim(), width, false)
            } else {
                values
            };
            (gguf, shape, values)
        })
        .collect();
    edit(&mut tensors);
    let int = |v: usize| Meta::Uint(v as u64);
    let mut meta = vec![("general.architecture".to_string(), Meta::Str(arch.into()))];
    let sizes = [
        ("embedding_length", int(c.dim)),
        ("feed_forward_length", int(c.hidden_dim)),
        ("block_count", int(c.layers)),
        ("attention.head_count", int(c.heads)),
        ("attention.head_count_kv", int(c.kv_heads)),
        ("attention.key_length", int(c.head_dim())),
        ("attention.value_length", int(c.head_dim())),
        ("context_length", int(c.seq_len)),
        // LayerNorms have their own key.
        (
            if matches!(
                arch,
                "command-r"
                    | "cohere2"
                    | "phi2"
                    | "stablelm"
                    | "starcoder2"
                    | "gptneox"
                    | "gpt2"
                    | "starcoder"
                    | "falcon"
                    | "olmo"
                    | "dbrx"
            ) {
                "attention.layer_norm_epsilon"
            } else {
                "attention.layer_norm_rms_epsilon"
            },
            Meta::Float(c.norm_eps),
        ),
        ("rope.freq_base", Meta::Float(c.rope_theta)),
    ];
    // `metadata` overrides a size of the same key.
    let given: Vec<&str> = metadata.iter().map(|(key, _)| *key).collect();
    let sizes = sizes.into_iter().filter(|(key, _)| !given.contains(key));
    for (key, value) in sizes.chain(metadata) {
        meta.push((format!("{arch}.{key}"), value));
    }
    gguf_bytes(&meta, &tensors)
}

/// The tensors of `reference`'s checkpoint (bf16) as f32 values, by their names.
pub fn reference_tensors(reference: &TransformersReference) -> Vec<NamedTensor> {
    let map = std::fs::read(reference.dir.join("model.safetensors")).expect("safetensors file");
    let st = safetensors::SafeTensors::deserialize(&map).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect();
            (name, view.shape().to_vec(), values)
        })
        .collect()
}

/// `tests/data/{name}` written again to a temporary directory (`as_name`), its
/// `config.json` changed by `config` and its tensors (f32) by `tensors`: how older
/// checkpoints of the architecture store it.
pub fn rewritten_checkpoint(
    name: &str,
    as_name: &str,
    config: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut Vec<NamedTensor>),
) -> PathBuf {
    let reference = transformers_reference(name);
    let text = std::fs::read_to_string(reference.dir.join("config.json")).expect("config");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    config(&mut json);
    let mut stored = reference_tensors(&reference);
    tensors(&mut stored);
    let dir = std::env::temp_dir().join(format!("llmc-hf-{as_name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("config.json"), json.to_string()).expect("config");
    write_safetensors(&dir, &stored, Dtype::F32);
    dir
}

/// Checks that the GGUF file `bytes` computes `loaded`'s logits for `reference`'s ids
/// within `1e-5` (the reference semantics on both).
pub fn gguf_computes_what_the_directory_computes(
    bytes: &[u8],
    loaded: &model_file::LoadedModel,
    reference: &TransformersReference,
) {
    let from_gguf = gguf_logits(bytes, reference);
    let from_hf = interp_logits(&loaded.config, &loaded.weights, reference);
    let worst = largest_difference(&from_gguf, &from_hf);
    assert!(worst < 1e-5, "{worst} from the directory's logits");
}

/// The logits of the reference semantics for `reference`'s ids from the GGUF file
/// `bytes`.
pub fn gguf_logits(bytes: &[u8], reference: &TransformersReference) -> Vec<Vec<f32>> {
    let gguf = llm_runtime::gguf::read(bytes).expect("the GGUF file loads");
    interp_logits(&gguf.config, &gguf.weights, reference)
}

/// The largest difference between two runs' logits.
pub fn largest_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// A GGUF v3 file of `metadata` and f32 `tensors` (Hugging Face names mapped to GGUF's,
/// shapes slowest dim first, values): what llama.cpp's converter writes.
pub fn gguf_bytes(
    metadata: &[(impl AsRef<str>, Meta)],
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn type_of(m: &Meta) -> u32 {
        match m {
            Meta::Uint(_) => 4,
            Meta::Int(_) => 5,
            Meta::Float(_) => 6,
            Meta::Bool(_) => 7,
            Meta::Str(_) => 8,
            Meta::Array(_) => 9,
        }
    }
    fn value(out: &mut Vec<u8>, m: &Meta) {
        match m {
            Meta::Uint(v) => out.extend((*v as u32).to_le_bytes()),
            Meta::Int(v) => out.extend((*v as i32).to_le_bytes()),
            Meta::Float(v) => out.extend((*v as f32).to_le_bytes()),
            Meta::Bool(v) => out.push(u8::from(*v)),
            Meta::Str(s) => string(out, s),
            Meta::Array(items) => {
                out.extend(items.first().map_or(4, type_of).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|item| value(out, item));
            }
        }
    }
    let gguf_name = |hf: &str| -> String {
        let globals = [
            ("model.embed_tokens", "token_embd"),
            ("model.norm", "output_norm"),
            ("model.final_layernorm", "output_norm"),
            ("lm_head", "output"),
        ];
        let (stem, kind) = hf.rsplit_once('.').expect("stem.kind");
        if let Some((_, g)) = globals.iter().find(|(h, _)| *h == stem) {
            return format!("{g}.{kind}");
        }
        if !hf.starts_with("model.") {
            // Already GGUF's name.
            return hf.to_string();
        }
        let rest = hf.strip_prefix("model.layers.").expect("a layer tensor");
        let (layer, part) = rest.split_once('.').expect("layer.part");
        let parts = [
            ("input_layernorm", "attn_norm"),
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("self_attn.qkv_proj", "attn_qkv"),
            ("self_attn.q_norm", "attn_q_norm"),
            ("self_attn.k_norm", "attn_k_norm"),
            ("mlp.gate_up_proj", "ffn_up"),
            ("post_attention_layernorm", "ffn_norm"),
            // GLM-4-0414's output norms.
            ("post_self_attn_layernorm", "post_attention_norm"),
            ("post_mlp_layernorm", "post_ffw_norm"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.down_proj", "ffn_down"),
            ("mlp.up_proj", "ffn_up"),
            ("self_attn.dense", "attn_output"),
            ("mlp.fc1", "ffn_up"),
            ("mlp.fc2", "ffn_down"),
            ("mlp.c_fc", "ffn_up"),
            ("mlp.c_proj", "ffn_down"),
        ];
        let (stem, kind) = part.rsplit_once('.').expect("stem.kind");
        let (_, g) = parts
            .iter()
            .find(|(h, _)| *h == stem)
            .expect("a known tensor");
        format!("blk.{layer}.{g}.{kind}")
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, v) in metadata {
        string(&mut out, key.as_ref());
        out.extend(type_of(v).to_le_bytes());
        value(&mut out, v);
    }
    let mut offset = 0u64;
    for (name, shape, values) in tensors {
        string(&mut out, &gguf_name(name));
        out.extend((shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(0u32.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (values.len() as u64 * 4).next_multiple_of(32);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    for (_, _, values) in tensors {
        out.extend(values.iter().flat_map(|x| x.to_le_bytes()));
        out.resize(out.len().next_multiple_of(32), 0);
    }
    out
}
