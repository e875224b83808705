//! Hugging Face layout: a test builds `config.json`, `model.safetensors` and
//! `tokenizer.json` itself (stories260K's weights, with q/k permuted to Hugging Face's
//! half-split RoPE layout) and checks the model generates llama2.c's golden output; the
//! dense families' reference checkpoints (`tests/data`) are checked against the logits
//! `transformers` computed (`reference`), their GGUF forms too. The mixtures of experts'
//! are `hf_moe.rs`'s.

mod common;
mod reference;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use llm_ir::{
    dtype::DType,
    interp::{Value, WeightStore},
    types::{KvStorage, QuantFormat},
};
use llm_runtime::{
    engine::{Engine, EngineConfig, Event, RequestParams},
    generate::{Backend, Generation, Model},
    gguf::Meta,
    llama2c,
    model::{Activation, AttentionBias, Blocks, FeedForward, Norm, QkNorm, build_ir},
    model_file,
    sampler::{SamplerConfig, XorShift},
    tokenizer::{HfTokenizer, TextCodec, Tokenizer},
};
use reference::{
    NamedTensor, TRANSFORMERS_BOUND, computes_what_transformers_computes, gguf_bytes,
    gguf_computes_what_the_directory_computes, gguf_logits, interp_logits, largest_difference,
    permute_rope_rows, reference_checkpoint, reference_gguf, reference_gguf_edited,
    rewritten_checkpoint, transformers_reference, write_safetensors,
};
use safetensors::{Dtype, tensor::TensorView};

fn shared(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(file)
}

/// Writes stories260K as a Hugging Face model directory; returns it.
fn write_hf_dir(name: &str) -> PathBuf {
    write_hf_dir_with(name, "")
}

/// [`write_hf_dir`] with `extra` (`"key": value` pairs, each after a comma) added to
/// `config.json`.
fn write_hf_dir_with(name: &str, extra: &str) -> PathBuf {
    write_hf_dir_of(name, "LlamaForCausalLM", extra, Vec::new())
}

/// [`write_hf_dir_with`] for the architecture `arch`, with the f32 tensors `more`
/// (Hugging Face names, shapes, values) beside stories260K's.
fn write_hf_dir_of(
    name: &str,
    arch: &str,
    extra: &str,
    more: Vec<(String, Vec<usize>, Vec<f32>)>,
) -> PathBuf {
    let mut tensors = hf_tensors();
    tensors.extend(more);
    write_hf_dir_tensors(name, arch, extra, tensors)
}

/// [`write_hf_dir_of`] with exactly `tensors` (Hugging Face names, shapes, values).
fn write_hf_dir_tensors(
    name: &str,
    arch: &str,
    extra: &str,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
) -> PathBuf {
    write_hf_dir_stored(name, (arch, extra), tensors, Dtype::F32)
}

/// [`write_hf_dir_tensors`] with every tensor stored as `dtype` (F32, F16 or BF16, the
/// values rounded to it).
fn write_hf_dir_stored(
    name: &str,
    (arch, extra): (&str, &str),
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
    dtype: Dtype,
) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llmc-hf-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (c, _) = llama2c::load(&shared("models/stories260K.bin")).expect("model");
    let config = format!(
        r#"{{"architectures": ["{arch}"], "hidden_size": {}, "intermediate_size": {}, "num_hidden_layers": {}, "num_attention_heads": {}, "num_key_value_heads": {}, "vocab_size": {}, "max_position_embeddings": {}, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": true{extra}}}"#,
        c.dim, c.hidden_dim, c.layers, c.heads, c.kv_heads, c.vocab, c.seq_len
    );
    std::fs::write(dir.join("config.json"), config).expect("config");
    write_safetensors(&dir, &tensors, dtype);
    dir
}

/// stories260K's weights under Hugging Face's names, q and k rows in its half-split
/// order: (name, shape, values).
fn hf_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let (c, weights) = llama2c::load(&shared("models/stories260K.bin")).expect("model");
    let mut tensors = Vec::new();
    let mut put = |hf: String, ours: &str, permute: Option<usize>| {
        let (shape, mut data) = match weights.weight(ours).as_deref() {
            Some(Value::Tensor(t)) => (t.shape.clone(), t.floats().expect("f32").to_vec()),
            _ => panic!("missing {ours}"),
        };
        if let Some(heads) = permute {
            data = permute_rope_rows(&data, heads, c.head_dim(), shape[1], true);
        }
        tensors.push((hf, shape, data));
    };
    put(
        "model.embed_tokens.weight".into(),
        "tok_embeddings.weight",
        None,
    );
    put("model.norm.weight".into(), "norm.weight", None);
    for l in 0..c.layers {
        let (hf, ours) = (format!("model.layers.{l}."), format!("layers.{l}."));
        for (theirs, mine, permute) in [
            ("input_layernorm", "attention_norm", None),
            ("self_attn.q_proj", "attention.wq", Some(c.heads)),
            ("self_attn.k_proj", "attention.wk", Some(c.kv_heads)),
            ("self_attn.v_proj", "attention.wv", None),
            ("self_attn.o_proj", "attention.wo", None),
            ("post_attention_layernorm", "ffn_norm", None),
            ("mlp.gate_proj", "feed_forward.w1", None),
            ("mlp.down_proj", "feed_forward.w2", None),
            ("mlp.up_proj", "feed_forward.w3", None),
        ] {
            put(
                format!("{hf}{theirs}.weight"),
                &format!("{ours}{mine}.weight"),
                permute,
            );
        }
    }
    tensors
}

/// A checkpoint stored in f16 or bf16 keeps its matrices at 16 bits (half the bytes of
/// the same values in f32) and computes what those values, widened to f32, compute: the
/// same greedy tokens on every backend, logits within rounding of the f32 model's (on
/// the CPU backend, its very bits).
#[test]
fn sixteen_bit_checkpoints_stay_sixteen_bit() {
    for (dtype, format) in [
        (Dtype::F16, QuantFormat::F16),
        (Dtype::BF16, QuantFormat::BF16),
    ] {
        let name = format!("{dtype:?}").to_lowercase();
        let tensors = hf_tensors();
        let narrow = write_hf_dir_stored(&name, ("LlamaForCausalLM", ""), tensors.clone(), dtype);
        let loaded = model_file::load(&narrow).expect("loads");
        std::fs::remove_dir_all(&narrow).ok();
        // The same values rounded to the narrow type, stored as f32.
        let rounded = tensors
            .into_iter()
            .map(|(n, shape, values)| {
                let values = values
                    .iter()
                    .map(|&x| match dtype {
                        Dtype::F16 => half::f16::from_f32(x).to_f32(),
                        _ => half::bf16::from_f32(x).to_f32(),
                    })
                    .collect();
                (n, shape, values)
            })
            .collect();
        let wide = write_hf_dir_stored(
            &format!("{name}-wide"),
            ("LlamaForCausalLM", ""),
            rounded,
            Dtype::F32,
        );
        let widened = model_file::load(&wide).expect("loads");
        std::fs::remove_dir_all(&wide).ok();
        let (mut matrices, mut elems) = (0, 0);
        for (name, shape) in llm_runtime::model::weight_shapes(&loaded.config) {
            match loaded.weights.weight(&name).as_deref() {
                Some(Value::Quantized(q)) if shape.len() == 2 => {
                    assert_eq!(q.format, format, "{name}");
                    matrices += 2 * q.shape.iter().product::<usize>();
                }
                Some(Value::Tensor(t)) if shape.len() == 1 => elems += 4 * t.len(),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(loaded.weights.bytes(), matrices + elems, "{dtype:?}");
        assert_eq!(widened.weights.bytes(), 2 * matrices + elems, "{dtype:?}");
        // `--quantize` converts 16-bit matrices as it converts f32 ones: the same bytes.
        let (mut narrow_q8, mut wide_q8) = (loaded.weights.clone(), widened.weights.clone());
        let converted = narrow_q8.quantize_matrices(&QuantFormat::Q8_0);
        assert_eq!(converted, wide_q8.quantize_matrices(&QuantFormat::Q8_0));
        assert!(converted > 0);
        for (name, _) in llm_runtime::model::weight_shapes(&loaded.config) {
            let narrow = narrow_q8.weight(&name);
            if let Some(Value::Quantized(q)) = narrow.as_deref()
                && q.format == QuantFormat::Q8_0
            {
                assert_eq!(narrow, wide_q8.weight(&name), "{name}");
            }
        }
        let narrow_run = backends_agree(&loaded, 24);
        let wide_run = greedy(&Backend::Interp, &widened, 24);
        assert_eq!(narrow_run.ids, wide_run.ids, "{dtype:?}");
        let gap = largest_difference(&narrow_run.logits, &wide_run.logits);
        assert!(gap < 1e-4, "{dtype:?}: logits {gap} apart");
        // The CPU backend multiplies 16-bit panels with the additions of f32 panels (and
        // the rows after the last panel with those of the f32 rows), on values widened
        // exactly: the very logits of the widened model, prompt and decode.
        let cpu = Backend::Cpu { threads: 1 };
        let bits = |g: Generation| -> Vec<u32> {
            g.logits.iter().flatten().map(|x| x.to_bits()).collect()
        };
        assert_eq!(
            bits(greedy(&cpu, &loaded, 24)),
            bits(greedy(&cpu, &widened, 24)),
            "{dtype:?}: the CPU's logits differ from the widened model's"
        );
    }
}

#[test]
fn a_hugging_face_directory_reproduces_the_golden_output() {
    let dir = write_hf_dir("golden");
    let loaded = model_file::load(&dir).expect("HF directory loads");
    assert!(loaded.config.rope_half && loaded.config.tied_classifier);
    let tok =
        Tokenizer::load(&shared("models/tok512.bin"), loaded.config.vocab).expect("tokenizer");
    let model = Model::compile(loaded.config, loaded.weights, "default").expect("compiles");
    let g = model
        .generate(&tok, "Once upon a time", 256, GREEDY)
        .expect("runs");
    let golden = std::fs::read(shared("golden/once_upon_a_time.txt")).expect("golden");
    assert_eq!(
        String::from_utf8_lossy(&g.text),
        String::from_utf8_lossy(&golden)
    );
    let logits: Vec<f32> = std::fs::read(shared("golden/once_upon_a_time.logits.f32"))
        .expect("golden logits")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(
        g.logits.len() * 512,
        logits.len(),
        "one logits row per position"
    );
    let max_err = g
        .logits
        .iter()
        .flatten()
        .zip(&logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("HF layout (half-split RoPE): max |logit error| = {max_err:e}");
    assert!(max_err <= 1e-4, "{max_err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Writes a `tokenizer.json` of the words `<unk> <s> </s> once upon a time` (ids 0 to 6).
fn write_word_level_tokenizer(path: &Path) {
    use tokenizers::{models::wordlevel::WordLevel, pre_tokenizers::whitespace::Whitespace};
    let vocab: HashMap<String, u32> = ["<unk>", "<s>", "</s>", "once", "upon", "a", "time"]
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .expect("model");
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(Whitespace {}));
    tok.save(path, false).expect("save");
}

/// Generation stops where the model says: `eos_token_id` (one id or a list) of
/// `generation_config.json`, else of `config.json`, besides the vocabulary's BOS and EOS;
/// an id that is not a number is an error naming the file.
#[test]
fn eos_token_ids_end_generations() {
    let dir = write_hf_dir_with("stops", r#", "eos_token_id": [2, 5]"#);
    write_word_level_tokenizer(&dir.join("tokenizer.json"));
    let stops = |dir: &Path| {
        model_file::load(dir)
            .expect("loads")
            .tokenizer
            .expect("tokenizer.json")
            .stop_tokens()
    };
    assert_eq!(stops(&dir), vec![1, 2, 5]);
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 6}"#).expect("write");
    assert_eq!(stops(&dir), vec![1, 2, 6]);
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": "x"}"#,
    )
    .expect("write");
    let err = model_file::load(&dir).err().expect("a bad id");
    assert!(
        err.to_string()
            .contains("generation_config.json: `eos_token_id` holds \"x\""),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tokenizer_json_round_trips_through_the_tokenizers_crate() {
    let dir = std::env::temp_dir().join(format!("llmc-hf-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("tokenizer.json");
    write_word_level_tokenizer(&path);
    let hf = HfTokenizer::load(&path).expect("loads");
    assert_eq!(
        hf.encode("once upon a time", true, false),
        vec![1, 3, 4, 5, 6]
    );
    assert_eq!(hf.decode(3, 4), b" upon".to_vec());
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{").expect("write");
    let err = HfTokenizer::load(&bad).err().expect("invalid JSON");
    assert!(
        err.to_string().contains("bad.json: invalid tokenizer.json"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The greedy ids of "Once upon a time" over `steps` positions from `loaded` (a
/// stories260K directory) on `backend`, with llama2.c's vocabulary.
fn greedy_ids(backend: &Backend, loaded: &model_file::LoadedModel, steps: usize) -> Vec<u32> {
    greedy(backend, loaded, steps).ids
}

/// The reference semantics' greedy generation of `steps` positions, after checking that
/// the CPU backend, and the GPU backend where there is a device, choose the same tokens.
fn backends_agree(loaded: &model_file::LoadedModel, steps: usize) -> Generation {
    let reference = greedy(&Backend::Interp, loaded, steps);
    let cpu = Backend::Cpu { threads: 1 };
    assert_eq!(greedy_ids(&cpu, loaded, steps), reference.ids, "cpu");
    if llm_lower::gpu::test_device(&Default::default()).is_some() {
        let gpu = Backend::Gpu(Default::default());
        assert_eq!(greedy_ids(&gpu, loaded, steps), reference.ids, "gpu");
    }
    reference
}

/// Greedy sampling.
const GREEDY: SamplerConfig = SamplerConfig {
    temperature: 0.0,
    top_p: 0.9,
    top_k: 0,
    seed: 1,
};

/// The greedy generation of [`greedy_ids`], logits included.
fn greedy(backend: &Backend, loaded: &model_file::LoadedModel, steps: usize) -> Generation {
    let tok =
        Tokenizer::load(&shared("models/tok512.bin"), loaded.config.vocab).expect("tokenizer");
    Model::compile_on(
        backend,
        loaded.config.clone(),
        loaded.weights.clone(),
        "default",
    )
    .expect("compiles")
    .generate(&tok, "Once upon a time", steps, GREEDY)
    .expect("runs")
}

/// Llama 3's RoPE scaling (`rope_type = llama3`) divides each frequency by a factor: 1
/// for wavelengths under 1024 / 16 positions, 8 over 1024, a blend between (stories260K's
/// heads of 8 have one pair in each regime but the first two); the factors reach the
/// model as `llm.rope`'s `freq_factors`, and the CPU and GPU backends generate what the
/// reference semantics generate, which is not the unscaled model's text.
#[test]
fn llama3_rope_scaling_divides_the_frequencies() {
    let dir = write_hf_dir_with(
        "llama3",
        r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 16.0, "original_max_position_embeddings": 1024}"#,
    );
    let loaded = model_file::load(&dir).expect("HF directory loads");
    assert!(loaded.config.rope_freq_factors);
    let factors = rope_factors(&loaded);
    // Hugging Face's formula, evaluated independently (in Python, f64).
    let expected = [1.0, 1.0, 6.182_945_211_805_751, 8.0];
    for (got, want) in factors.iter().zip(expected) {
        assert!((f64::from(*got) - want).abs() < 1e-6, "{factors:?}");
    }
    let ir = build_ir(
        &loaded.config,
        &loaded.weights,
        &KvStorage::Float(DType::F32),
    )
    .expect("builds");
    assert!(
        ir.contains("positions, rope_freqs"),
        "the factors reach llm.rope"
    );
    let interp = backends_agree(&loaded, 200).ids;
    let unscaled_dir = write_hf_dir("unscaled");
    let unscaled = model_file::load(&unscaled_dir).expect("loads");
    let plain = greedy_ids(&Backend::Interp, &unscaled, 200);
    assert_ne!(plain, interp, "the factors change the model");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&unscaled_dir).ok();
}

/// Mistral's sliding window becomes the KV cache type's `window`: each position sees at
/// most that many, on every backend alike, which changes the text once sequences pass it.
#[test]
fn a_sliding_window_limits_attention() {
    let dir = write_hf_dir_with("window", r#", "sliding_window": 8"#);
    let loaded = model_file::load(&dir).expect("HF directory loads");
    assert_eq!(loaded.config.sliding_window, Some(8));
    let ir = build_ir(
        &loaded.config,
        &loaded.weights,
        &KvStorage::Float(DType::F32),
    )
    .expect("builds");
    assert!(
        ir.contains("window = 8>"),
        "the window reaches the cache type"
    );
    let windowed = backends_agree(&loaded, 100).ids;
    let full = write_hf_dir("full");
    assert_ne!(
        greedy_ids(
            &Backend::Interp,
            &model_file::load(&full).expect("loads"),
            100
        ),
        windowed,
        "a window of 8 changes the text"
    );
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&full).ok();
}

/// Seeded values in `-scale..scale`.
fn noise(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = XorShift::new(seed);
    (0..len)
        .map(|_| scale * (2.0 * rng.next_f32() - 1.0))
        .collect()
}

/// A bias of `values` for projection `proj` (`q`, `k`, `v`, `o`) of every layer of
/// stories260K.
fn biases(proj: &str, values: impl Fn(usize) -> Vec<f32>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    (0..5)
        .map(|l| {
            let v = values(l);
            (
                format!("model.layers.{l}.self_attn.{proj}_proj.bias"),
                vec![v.len()],
                v,
            )
        })
        .collect()
}

/// stories260K's tensors as Phi-3 stores them: each layer's q, k and v rows in one
/// `qkv_proj`, its gate and up rows in one `gate_up_proj`.
fn phi3_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let tensors = hf_tensors();
    let fuse = |name: String, parts: &[String]| {
        let parts: Vec<&(String, Vec<usize>, Vec<f32>)> = parts
            .iter()
            .map(|p| tensors.iter().find(|(n, ..)| n == p).expect("a part"))
            .collect();
        let rows = parts.iter().map(|(_, shape, _)| shape[0]).sum();
        let values = parts.iter().flat_map(|(.., v)| v.iter().copied()).collect();
        (name, vec![rows, parts[0].1[1]], values)
    };
    let fused_away = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"];
    let mut out: Vec<_> = tensors
        .iter()
        .filter(|(n, ..)| !fused_away.iter().any(|f| n.contains(f)))
        .cloned()
        .collect();
    for l in 0..5 {
        let w = |n: &str| format!("model.layers.{l}.{n}.weight");
        let qkv = [
            w("self_attn.q_proj"),
            w("self_attn.k_proj"),
            w("self_attn.v_proj"),
        ];
        out.push(fuse(w("self_attn.qkv_proj"), &qkv));
        out.push(fuse(
            w("mlp.gate_up_proj"),
            &[w("mlp.gate_proj"), w("mlp.up_proj")],
        ));
    }
    out
}

/// Phi-3's fused projections (Hugging Face's `qkv_proj` and `gate_up_proj`, GGUF's
/// `attn_qkv` and fused `ffn_up`) split into the weights a Llama model has: stories260K
/// stored Phi-3's way computes exactly what it computes stored Llama's way, from either
/// format, and GGUF's `phi3.attention.sliding_window` is the window.
#[test]
fn phi3_fused_projections_compute_what_separate_ones_do() {
    let window = r#", "sliding_window": 8"#;
    let llama = write_hf_dir_with("phi3-llama", window);
    let reference = greedy(
        &Backend::Interp,
        &model_file::load(&llama).expect("loads"),
        40,
    );
    let phi3 = write_hf_dir_tensors("phi3", "Phi3ForCausalLM", window, phi3_tensors());
    let from_hf = greedy(
        &Backend::Interp,
        &model_file::load(&phi3).expect("Phi-3 directory loads"),
        40,
    );
    assert_eq!(from_hf.ids, reference.ids);
    assert_eq!(from_hf.logits, reference.logits);
    let metadata = gguf_metadata(
        "phi3",
        vec![("phi3.attention.sliding_window", Meta::Uint(8))],
    );
    let path = std::env::temp_dir().join(format!("llmc-phi3-{}.gguf", std::process::id()));
    write_gguf(&path, &metadata, &phi3_tensors());
    let gguf = model_file::load(&path).expect("the Phi-3 GGUF file loads");
    assert_eq!(gguf.config.sliding_window, Some(8));
    let from_gguf = greedy(&Backend::Interp, &gguf, 40);
    assert_eq!(from_gguf.logits, reference.logits);
    std::fs::remove_file(&path).ok();
    for dir in [llama, phi3] {
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// stories260K with Qwen3's attention: heads of 16 (not 64 / 8), so seeded q, k, v and
/// output projections of that size (q and k scaled by `qk_scale`), and each head's
/// queries and keys normalized with seeded weights (`q_norm`, `k_norm`; left out unless
/// `norms`).
fn qwen3_tensors(qk_scale: f32, norms: bool) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let (dim, head, heads, kv_heads) = (64, 16, 8, 4);
    let mut out: Vec<_> = hf_tensors()
        .into_iter()
        .filter(|(n, ..)| !n.contains("self_attn."))
        .collect();
    for l in 0..5u64 {
        let p = format!("model.layers.{l}.self_attn.");
        let mut put = |name: &str, shape: Vec<usize>, values: Vec<f32>| {
            out.push((format!("{p}{name}"), shape, values));
        };
        let scaled = |v: Vec<f32>| v.into_iter().map(|x| x * qk_scale).collect();
        let (q, kv) = (heads * head, kv_heads * head);
        put(
            "q_proj.weight",
            vec![q, dim],
            scaled(noise(q * dim, 100 + l, 0.2)),
        );
        put(
            "k_proj.weight",
            vec![kv, dim],
            scaled(noise(kv * dim, 200 + l, 0.2)),
        );
        put(
            "v_proj.weight",
            vec![kv, dim],
            noise(kv * dim, 300 + l, 0.2),
        );
        put("o_proj.weight", vec![dim, q], noise(dim * q, 400 + l, 0.2));
        if norms {
            let around_one = |seed| noise(head, seed, 0.3).iter().map(|x| 1.0 + x).collect();
            put("q_norm.weight", vec![head], around_one(500 + l));
            put("k_norm.weight", vec![head], around_one(600 + l));
        }
    }
    out
}

/// Qwen3's heads: 16 wide where the width over the heads is 8 (`head_dim`, GGUF's
/// `key_length`), and an RMSNorm of each head's queries and keys before RoPE. The norms
/// undo any scale of the q and k projections, which without them changes the text; the
/// CPU and GPU backends compute what the reference semantics compute, and a GGUF file of
/// the same weights what the Hugging Face directory computes.
#[test]
fn qwen3_heads_are_their_own_width_and_normalized() {
    let head_dim = r#", "head_dim": 16"#;
    let dir = write_hf_dir_tensors(
        "qwen3",
        "Qwen3ForCausalLM",
        head_dim,
        qwen3_tensors(1.0, true),
    );
    let loaded = model_file::load(&dir).expect("Qwen3 directory loads");
    assert_eq!(loaded.config.explicit_head_dim, Some(16));
    assert_eq!(loaded.config.qk_norm, QkNorm::Heads);
    let ir = build_ir(
        &loaded.config,
        &loaded.weights,
        &KvStorage::Float(DType::F32),
    )
    .expect("builds");
    assert!(
        ir.contains("qhn_0 = llm.rms_norm qh_0, q_norm_0 {eps = 1e-5} : llm.tensor <?x8x16xf32>"),
        "each head's queries are normalized"
    );
    let reference = backends_agree(&loaded, 40);
    let logits = |arch: &str, scale: f32, norms: bool| {
        let name = format!("qwen3-{arch}-{scale}");
        let dir = write_hf_dir_tensors(&name, arch, head_dim, qwen3_tensors(scale, norms));
        let g = greedy(
            &Backend::Interp,
            &model_file::load(&dir).expect("loads"),
            40,
        );
        std::fs::remove_dir_all(&dir).ok();
        g.logits
    };
    let scaled = logits("Qwen3ForCausalLM", 3.0, true);
    let worst = largest_difference(&scaled, &reference.logits);
    assert!(worst < 1e-3, "the norms undo the scale: {worst}");
    let (plain, plain_scaled) = (
        logits("LlamaForCausalLM", 1.0, false),
        logits("LlamaForCausalLM", 3.0, false),
    );
    let shift = largest_difference(&plain, &plain_scaled);
    assert!(shift > 0.1, "without norms the scale matters: {shift}");
    let metadata = gguf_metadata(
        "qwen3",
        vec![
            ("qwen3.attention.key_length", Meta::Uint(16)),
            ("qwen3.attention.value_length", Meta::Uint(16)),
        ],
    );
    let path = std::env::temp_dir().join(format!("llmc-qwen3-{}.gguf", std::process::id()));
    write_gguf(&path, &metadata, &qwen3_tensors(1.0, true));
    let gguf = model_file::load(&path).expect("the Qwen3 GGUF file loads");
    assert_eq!(greedy(&Backend::Interp, &gguf, 40).logits, reference.logits);
    std::fs::remove_file(&path).ok();
    std::fs::remove_dir_all(&dir).ok();
}

/// Gemma: GeGLU (GELU's tanh approximation), embeddings scaled by `sqrt(hidden_size)`,
/// and norms that scale by `1 + weight`, stored without the 1 in Hugging Face's files
/// and with it in GGUF's: the same weights from either format compute the same logits,
/// the backends agree with the reference semantics, and the text is not the Llama
/// model's of the same weights.
#[test]
fn gemma_gates_with_gelu_and_scales_embeddings_and_norms() {
    let is_norm = |name: &str| name.ends_with("layernorm.weight") || name == "model.norm.weight";
    let hf: Vec<_> = hf_tensors()
        .into_iter()
        .map(|(n, shape, v)| {
            let v = if is_norm(&n) {
                v.iter().map(|w| w - 1.0).collect()
            } else {
                v
            };
            (n, shape, v)
        })
        .collect();
    let config = r#", "hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh""#;
    let dir = write_hf_dir_tensors("gemma", "GemmaForCausalLM", config, hf.clone());
    let loaded = model_file::load(&dir).expect("Gemma directory loads");
    let ir = build_ir(
        &loaded.config,
        &loaded.weights,
        &KvStorage::Float(DType::F32),
    )
    .expect("builds");
    assert!(ir.contains("x0_scale = llm.constant {value = 8.0}") && ir.contains("llm.gelu"));
    let reference = backends_agree(&loaded, 40);
    let llama = write_hf_dir("gemma-llama");
    let plain = greedy_ids(
        &Backend::Interp,
        &model_file::load(&llama).expect("loads"),
        40,
    );
    assert_ne!(plain, reference.ids, "Gemma's model is another one");
    let metadata = gguf_metadata("gemma", Vec::new());
    let gguf: Vec<_> = hf
        .into_iter()
        .map(|(n, shape, v)| {
            let v = if is_norm(&n) {
                v.iter().map(|w| 1.0 + w).collect()
            } else {
                v
            };
            (n, shape, v)
        })
        .collect();
    let path = std::env::temp_dir().join(format!("llmc-gemma-{}.gguf", std::process::id()));
    write_gguf(&path, &metadata, &gguf);
    let from_gguf = greedy(
        &Backend::Interp,
        &model_file::load(&path).expect("loads"),
        40,
    );
    assert_eq!(from_gguf.logits, reference.logits);
    std::fs::remove_file(&path).ok();
    for dir in [dir, llama] {
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// The checkpoint of `tests/data/{arch}-tiny` as llama.cpp's converter writes it for
/// `arch` (`gemma2` or `gemma3`; [`reference_gguf`]) with Gemma 2's or 3's settings.
fn gemma_gguf(arch: &str) -> Vec<u8> {
    let metadata = match arch {
        "gemma2" => vec![
            ("attention.sliding_window", Meta::Uint(8)),
            ("attn_logit_softcapping", Meta::Float(3.0)),
            ("final_logit_softcapping", Meta::Float(10.0)),
            ("attention.scale", Meta::Float(20f64.powf(-0.5))),
        ],
        _ => vec![
            ("attention.sliding_window", Meta::Uint(6)),
            ("rope.scaling.type", Meta::Str("linear".into())),
            ("rope.scaling.factor", Meta::Float(2.0)),
        ],
    };
    reference_gguf(&format!("{arch}-tiny"), arch, metadata, Vec::new())
}

/// Llama 3, against the logits `transformers` computes for a checkpoint it wrote
/// (`tests/data/llama3-tiny`, as [`gemma2_computes_what_transformers_computes`]): Llama
/// 3's RoPE scaling (`rope_type = llama3`, in transformers 5's `rope_parameters`) and an
/// untied classifier.
#[test]
fn llama3_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("llama3-tiny");
    assert!(loaded.config.rope_freq_factors && !loaded.config.tied_classifier);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("Llama 3's RoPE scaling", &|c| c.rope_freq_factors = false)],
    );
}

/// Mistral (`tests/data/mistral-tiny`): a sliding window of 8 in every layer.
#[test]
fn mistral_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("mistral-tiny");
    assert_eq!(loaded.config.sliding_window, Some(8));
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the sliding window", &|c| c.sliding_window = None)],
    );
}

/// Qwen2 (`tests/data/qwen2-tiny`): biases on the q, k and v projections.
#[test]
fn qwen2_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("qwen2-tiny");
    assert!(loaded.config.attention_bias.qkv && !loaded.config.attention_bias.output);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the biases", &|c| {
            c.attention_bias = AttentionBias::default()
        })],
    );
}

/// Qwen3 (`tests/data/qwen3-tiny`): heads of 32 where the width over the heads is 16,
/// each head's queries and keys normalized.
#[test]
fn qwen3_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("qwen3-tiny");
    assert_eq!(
        (loaded.config.head_dim(), loaded.config.qk_norm),
        (32, QkNorm::Heads)
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the q/k norms", &|c| c.qk_norm = QkNorm::None)],
    );
}

/// Phi-3 (`tests/data/phi3-tiny`): fused q/k/v and gate/up projections (split when
/// loading) and a sliding window of 10.
#[test]
fn phi3_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("phi3-tiny");
    assert_eq!(loaded.config.sliding_window, Some(10));
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the sliding window", &|c| c.sliding_window = None)],
    );
}

/// `tests/data/qwen3-yarn-tiny` as llama.cpp's converter writes it: YaRN as
/// `rope.scaling.type`, the factor and the original context length.
fn qwen3_yarn_gguf() -> Vec<u8> {
    reference_gguf(
        "qwen3-yarn-tiny",
        "qwen3",
        vec![
            ("rope.scaling.type", Meta::Str("yarn".into())),
            ("rope.scaling.factor", Meta::Float(4.0)),
            ("rope.scaling.original_context_length", Meta::Uint(64)),
        ],
        Vec::new(),
    )
}

/// The long factors of `tests/data/phi3-longrope-tiny` (`make_references.py`'s).
const PHI3_LONG_FACTORS: [f32; 8] = [1.0, 1.25, 1.6, 2.2, 3.0, 4.5, 6.0, 8.0];

/// LongRoPE's attention factor for `tests/data/phi3-longrope-tiny`: 128 positions over 16.
fn phi3_attention_factor() -> f64 {
    (1.0 + 8f64.ln() / 16f64.ln()).sqrt()
}

/// `tests/data/phi3-longrope-tiny` as llama.cpp's converter writes it: both factor sets as
/// tensors, the attention factor and the original context length as metadata.
fn phi3_longrope_gguf() -> Vec<u8> {
    let short = vec![1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0];
    reference_gguf(
        "phi3-longrope-tiny",
        "phi3",
        vec![
            (
                "rope.scaling.attn_factor",
                Meta::Float(phi3_attention_factor()),
            ),
            ("rope.scaling.original_context_length", Meta::Uint(16)),
        ],
        vec![
            (
                "rope_factors_long.weight".into(),
                vec![8],
                PHI3_LONG_FACTORS.to_vec(),
            ),
            ("rope_factors_short.weight".into(), vec![8], short),
        ],
    )
}

/// Qwen3 with YaRN (`tests/data/qwen3-yarn-tiny`: factor 4 over an original 64
/// positions, heads of 32): its frequency factors and attention factor, and the GGUF file
/// llama.cpp's converter writes for it (`rope.scaling.type = yarn`, the factor and the
/// original context length) computes what the directory computes.
#[test]
fn qwen3_yarn_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("qwen3-yarn-tiny");
    assert!(loaded.config.rope_freq_factors);
    assert!((loaded.config.rope_mscale - (1.0 + 0.1 * 4f64.ln())).abs() < 1e-12);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("YaRN's frequency factors", &|c| c.rope_freq_factors = false),
            ("YaRN's attention factor", &|c| c.rope_mscale = 1.0),
        ],
    );
    gguf_computes_what_the_directory_computes(&qwen3_yarn_gguf(), &loaded, &reference);
}

/// Phi-3 with LongRoPE (`tests/data/phi3-longrope-tiny`: 128 positions over an original
/// 16, so the long factors): its factors and attention factor, and the GGUF file
/// llama.cpp's converter writes for it (both factor sets as tensors, the attention factor
/// and the original context length as metadata) computes what the directory computes.
#[test]
fn phi3_longrope_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("phi3-longrope-tiny");
    assert_eq!(rope_factors(&loaded), PHI3_LONG_FACTORS);
    assert!((loaded.config.rope_mscale - phi3_attention_factor()).abs() < 1e-12);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("LongRoPE's frequency factors", &|c| {
                c.rope_freq_factors = false
            }),
            ("LongRoPE's attention factor", &|c| c.rope_mscale = 1.0),
        ],
    );
    gguf_computes_what_the_directory_computes(&phi3_longrope_gguf(), &loaded, &reference);
}

/// `tests/data/phi4-mini-tiny` as llama.cpp's converter writes it: the rotated features
/// as `rope.dimension_count`, LongRoPE as for [`phi3_longrope_gguf`].
fn phi4_mini_gguf() -> Vec<u8> {
    reference_gguf(
        "phi4-mini-tiny",
        "phi3",
        vec![
            ("rope.dimension_count", Meta::Uint(12)),
            (
                "rope.scaling.attn_factor",
                Meta::Float(phi3_attention_factor()),
            ),
            ("rope.scaling.original_context_length", Meta::Uint(16)),
        ],
        vec![
            (
                "rope_factors_long.weight".into(),
                vec![6],
                PHI4_LONG_FACTORS.to_vec(),
            ),
            (
                "rope_factors_short.weight".into(),
                vec![6],
                vec![1.0, 1.1, 1.2, 1.4, 1.6, 2.0],
            ),
        ],
    )
}

/// The long factors of `tests/data/phi4-mini-tiny` (`make_references.py`'s).
const PHI4_LONG_FACTORS: [f32; 6] = [1.0, 1.5, 2.0, 3.0, 5.0, 8.0];

/// Phi-4-mini's settings (`tests/data/phi4-mini-tiny`): RoPE over 12 of each head's 16
/// features (`partial_rotary_factor` 0.75), with LongRoPE's factors over those 6 pairs,
/// and a tied classifier; its GGUF file (`rope.dimension_count`) computes what the
/// directory computes.
#[test]
fn phi4_mini_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("phi4-mini-tiny");
    assert_eq!(loaded.config.rotary_dim, Some(12));
    assert!(loaded.config.tied_classifier);
    assert_eq!(rope_factors(&loaded), PHI4_LONG_FACTORS);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the partial rotation", &|c| {
                c.rotary_dim = None;
                c.rope_freq_factors = false;
            }),
            ("LongRoPE's frequency factors", &|c| {
                c.rope_freq_factors = false
            }),
            ("LongRoPE's attention factor", &|c| c.rope_mscale = 1.0),
        ],
    );
    gguf_computes_what_the_directory_computes(&phi4_mini_gguf(), &loaded, &reference);
}

/// Granite (`tests/data/granite-tiny`): embeddings times 12, each block's output times
/// 0.22 before its residual add, attention scores scaled by 1/32 and logits divided by 8;
/// its GGUF file (llama.cpp's `granite` keys, q and k rows reordered for interleaved
/// pairs as its converter reorders them) computes what the directory computes, and one
/// without the logit scale is refused.
#[test]
fn granite_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("granite-tiny");
    let c = &loaded.config;
    assert_eq!(
        (
            c.embedding_scale,
            c.residual_scale,
            c.attention_scale,
            c.logit_scale
        ),
        (Some(12.0), Some(0.22), Some(0.03125), Some(0.125))
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the embedding scale", &|c| c.embedding_scale = None),
            ("the residual scale", &|c| c.residual_scale = None),
            ("the attention scale", &|c| c.attention_scale = None),
            ("the logit scale", &|c| c.logit_scale = None),
        ],
    );
    // Its q and k rows are in another order (see the SmolLM3 test): against
    // transformers' logits, as the directory is.
    let from_gguf = gguf_logits(&granite_gguf(), &reference);
    assert!(largest_difference(&from_gguf, &reference.logits) < TRANSFORMERS_BOUND);
    // llama.cpp requires the logit scale of a file; a missing one is an error naming it.
    let without_logit_scale = reference_gguf(
        "granite-tiny",
        "granite",
        vec![
            ("embedding_scale", Meta::Float(12.0)),
            ("residual_scale", Meta::Float(0.22)),
            ("attention.scale", Meta::Float(0.03125)),
        ],
        Vec::new(),
    );
    let err = llm_runtime::gguf::read(&without_logit_scale)
        .err()
        .expect("refused");
    assert!(err.contains("granite.logit_scale"), "{err}");
}

/// `tests/data/granite-tiny` as llama.cpp's converter writes it.
fn granite_gguf() -> Vec<u8> {
    reference_gguf(
        "granite-tiny",
        "granite",
        vec![
            ("embedding_scale", Meta::Float(12.0)),
            ("residual_scale", Meta::Float(0.22)),
            ("attention.scale", Meta::Float(0.03125)),
            ("logit_scale", Meta::Float(8.0)),
        ],
        Vec::new(),
    )
}

/// OLMo 2 (`tests/data/olmo2-tiny`): each block's output normalized before its residual
/// add and no input norms, RMSNorms over the whole q and k projections; its GGUF file
/// (llama.cpp's `olmo2` names) computes what the directory computes.
#[test]
fn olmo2_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("olmo2-tiny");
    let c = &loaded.config;
    assert!(c.post_norms && !c.pre_norms);
    assert_eq!(c.qk_norm, QkNorm::Projections);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the output norms", &|c| c.post_norms = false),
            ("the q/k norms", &|c| c.qk_norm = QkNorm::None),
        ],
    );
    gguf_computes_what_the_directory_computes(&olmo2_gguf(), &loaded, &reference);
}

/// `tests/data/olmo2-tiny` as llama.cpp's converter writes it.
fn olmo2_gguf() -> Vec<u8> {
    reference_gguf("olmo2-tiny", "olmo2", Vec::new(), Vec::new())
}

/// SmolLM3 (`tests/data/smollm3-tiny`): four layers, the fourth without RoPE; its GGUF
/// file (llama.cpp's `smollm3`, whose NoPE step is fixed at 4, q and k rows reordered for
/// interleaved pairs) computes what the directory computes.
#[test]
fn smollm3_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("smollm3-tiny");
    assert_eq!(
        loaded.config.nope_layers.as_deref(),
        Some([false, false, false, true].as_slice())
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the NoPE layer", &|c| c.nope_layers = None)],
    );
    // The file's q and k rows are in another order, which sums the attention scores in
    // another order: against transformers' logits, as the directory is (2.8e-5 from the
    // directory's logits, measured).
    let from_gguf = gguf_logits(&smollm3_gguf(), &reference);
    assert!(largest_difference(&from_gguf, &reference.logits) < TRANSFORMERS_BOUND);
}

/// SmolLM3 with its window (`tests/data/smollm3-window-tiny`, `use_sliding_window`): 6
/// positions in the layer `layer_types` marks sliding, its NoPE layer; read without
/// `layer_types` too (the NoPE layers then slide, as `SmolLM3Config` fills it in).
#[test]
fn smollm3_window_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("smollm3-window-tiny");
    let local = loaded.config.local_attention.as_ref().expect("a window");
    assert_eq!(
        (local.window, local.layers.as_slice()),
        (6, [false, false, false, true].as_slice())
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the window", &|c| c.local_attention = None)],
    );
    let dir = rewritten_checkpoint(
        "smollm3-window-tiny",
        "smollm3-untyped",
        |c| {
            c.as_object_mut().expect("an object").remove("layer_types");
        },
        |_| {},
    );
    let untyped = model_file::load(&dir).map(|m| m.config);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(untyped.expect("loads"), loaded.config);
}

/// `tests/data/smollm3-tiny` as llama.cpp's converter writes it.
fn smollm3_gguf() -> Vec<u8> {
    reference_gguf("smollm3-tiny", "smollm3", Vec::new(), Vec::new())
}

/// Cohere (`tests/data/cohere-tiny`, Command R's architecture): LayerNorms without bias,
/// attention and feed-forward blocks in parallel over one norm, interleaved RoPE pairs
/// and logits times 0.25; its GGUF file (llama.cpp's `command-r` keys) computes what the
/// directory computes.
#[test]
fn cohere_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("cohere-tiny");
    let c = &loaded.config;
    assert!(c.norm == Norm::Layer && c.blocks == Blocks::ParallelSharedNorm && !c.rope_half);
    assert_eq!(c.logit_scale, Some(0.25));
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the LayerNorms", &|c| c.norm = Norm::Rms),
            ("the logit scale", &|c| c.logit_scale = None),
            ("the interleaved pairs", &|c| c.rope_half = true),
        ],
    );
    assert_eq!(c.norm_eps, 1e-3);
    gguf_computes_what_the_directory_computes(&cohere_gguf(Vec::new()), &loaded, &reference);
    // A file with some per-head q norms but not every layer's k norms is refused.
    let q_norm = (
        "blk.0.attn_q_norm.weight".into(),
        vec![4, 16],
        vec![1.0; 64],
    );
    let err = llm_runtime::gguf::read(&cohere_gguf(vec![q_norm]))
        .err()
        .expect("refused");
    assert!(
        err.contains("no weight `layers.0.attention.k_norm.weight`"),
        "{err}"
    );
    // llama.cpp requires the logit scale.
    let unscaled = reference_gguf("cohere-tiny", "command-r", Vec::new(), Vec::new());
    let err = llm_runtime::gguf::read(&unscaled).err().expect("refused");
    assert!(
        err.contains("missing metadata `command-r.logit_scale`"),
        "{err}"
    );
}

/// Command R+ (`tests/data/cohere-qk-norm-tiny`): Cohere's with a LayerNorm (no bias) of
/// each query and key head, each head its own weights (`use_qk_norm`, `[heads,
/// head_dim]`); its GGUF file (`command-r` with `attn_q_norm` and `attn_k_norm`, as
/// llama.cpp reads them) computes what the directory computes.
#[test]
fn cohere_qk_norms_compute_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("cohere-qk-norm-tiny");
    assert_eq!(loaded.config.qk_norm, QkNorm::LayerHeads);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the q/k norms", &|c| c.qk_norm = QkNorm::None)],
    );
    let bytes = reference_gguf(
        "cohere-qk-norm-tiny",
        "command-r",
        vec![("logit_scale", Meta::Float(0.25))],
        Vec::new(),
    );
    gguf_computes_what_the_directory_computes(&bytes, &loaded, &reference);
}

/// Cohere 2 (`tests/data/cohere2-tiny`: Command R7B's, Command A's architecture): Cohere's
/// blocks over four layers, the first three attending locally over 8 positions with
/// RoPE, the fourth globally without (`layer_types`); its GGUF file (llama.cpp's
/// `cohere2`, whose pattern is fixed at three local layers to a global one) computes what
/// the directory computes.
#[test]
fn cohere2_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("cohere2-tiny");
    let c = &loaded.config;
    let local = c.local_attention.as_ref().expect("local layers");
    assert_eq!(
        (local.window, local.layers.as_slice()),
        (8, [true, true, true, false].as_slice())
    );
    assert_eq!(
        c.nope_layers.as_deref(),
        Some([false, false, false, true].as_slice())
    );
    assert!(c.blocks == Blocks::ParallelSharedNorm && c.sliding_window.is_none());
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the local window", &|c| c.local_attention = None),
            ("the global layer's NoPE", &|c| c.nope_layers = None),
        ],
    );
    let metadata = vec![
        ("logit_scale", Meta::Float(0.25)),
        ("attention.sliding_window", Meta::Uint(8)),
    ];
    let bytes = reference_gguf("cohere2-tiny", "cohere2", metadata, Vec::new());
    gguf_computes_what_the_directory_computes(&bytes, &loaded, &reference);
}

/// Qwen2 with its window over some layers (`tests/data/qwen2-window-tiny`:
/// `use_sliding_window`, `max_window_layers` 1): the first layer attends to every
/// position, the second over 8 (local attention; the cache keeps every position); the
/// window read from `layer_types` (transformers 5's) or, without them, from
/// `max_window_layers` is the same.
#[test]
fn qwen2_windows_some_layers_as_transformers_does() {
    let (reference, loaded) = reference_checkpoint("qwen2-window-tiny");
    let c = &loaded.config;
    let local = c.local_attention.as_ref().expect("local layers");
    assert_eq!(
        (local.window, local.layers.as_slice()),
        (8, [false, true].as_slice())
    );
    assert_eq!((c.sliding_window, local.rope_theta), (None, None));
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the window", &|c| c.local_attention = None),
            ("the first layer's full attention", &|c| {
                (c.sliding_window, c.local_attention) = (Some(8), None);
            }),
        ],
    );
    let dir = rewritten_checkpoint(
        "qwen2-window-tiny",
        "qwen2-untyped",
        |c| {
            c.as_object_mut().expect("an object").remove("layer_types");
        },
        |_| {},
    );
    let untyped = model_file::load(&dir).map(|m| m.config);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(untyped.expect("loads"), loaded.config);
}

/// `tests/data/cohere-tiny` as llama.cpp's converter writes it, with the tensors `extra`.
fn cohere_gguf(extra: Vec<(String, Vec<usize>, Vec<f32>)>) -> Vec<u8> {
    reference_gguf(
        "cohere-tiny",
        "command-r",
        vec![("logit_scale", Meta::Float(0.25))],
        extra,
    )
}

/// Phi-2 (`tests/data/phi2-tiny`): LayerNorms with biases, attention and an ungated
/// GELU feed-forward block side by side over one norm, biases on every projection and
/// the classifier, RoPE over 6 of each head's 16 features; its GGUF file (llama.cpp's
/// `phi2` keys) computes what the directory computes, with separate q, k and v
/// projections or with them fused (`attn_qkv`, as the files of Phi-2's original
/// checkpoint have them).
#[test]
fn phi2_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("phi2-tiny");
    let c = &loaded.config;
    assert_eq!(
        (c.norm, c.feed_forward, c.activation),
        (
            Norm::BiasedLayer,
            FeedForward::Ungated,
            Activation::GeluTanh
        )
    );
    assert!(
        c.blocks == Blocks::ParallelSharedNorm && c.ffn_bias && c.classifier_bias && c.rope_half
    );
    assert_eq!(
        c.attention_bias,
        AttentionBias {
            qkv: true,
            output: true
        }
    );
    assert_eq!(c.rotary_dim, Some(6));
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the norms' biases", &|c| c.norm = Norm::Layer),
            ("the feed-forward biases", &|c| c.ffn_bias = false),
            ("the classifier's bias", &|c| c.classifier_bias = false),
            ("the partial rotation", &|c| c.rotary_dim = None),
        ],
    );
    gguf_computes_what_the_directory_computes(&phi2_gguf(false), &loaded, &reference);
    gguf_computes_what_the_directory_computes(&phi2_gguf(true), &loaded, &reference);
}

/// `tests/data/phi2-tiny` as llama.cpp's converter writes it, each layer's q, k and v
/// projections and biases fused in `attn_qkv` where `fused`.
fn phi2_gguf(fused: bool) -> Vec<u8> {
    let metadata = vec![("rope.dimension_count", Meta::Uint(6))];
    reference_gguf_edited("phi2-tiny", "phi2", metadata, |tensors| {
        if fused {
            fuse_qkv(tensors);
        }
    })
}

/// Replaces each layer's q, k and v projections and biases in `tensors` (Hugging Face's
/// names) by the fused `blk.N.attn_qkv` weight and bias: their rows, in that order.
fn fuse_qkv(tensors: &mut Vec<NamedTensor>) {
    let layers = tensors
        .iter()
        .filter(|(name, ..)| name.ends_with("q_proj.weight"))
        .count();
    for layer in 0..layers {
        for kind in ["weight", "bias"] {
            let (mut rows, mut values, mut width) = (0, Vec::new(), None);
            for part in ["q", "k", "v"] {
                let name = format!("model.layers.{layer}.self_attn.{part}_proj.{kind}");
                let i = tensors
                    .iter()
                    .position(|(n, ..)| *n == name)
                    .expect("a q, k or v tensor");
                let (_, shape, part_values) = tensors.remove(i);
                rows += shape[0];
                width = shape.get(1).copied();
                values.extend(part_values);
            }
            let shape = width.map_or(vec![rows], |k| vec![rows, k]);
            tensors.push((format!("blk.{layer}.attn_qkv.{kind}"), shape, values));
        }
    }
}

/// StableLM 2 (`tests/data/stablelm-tiny`): LayerNorms with biases, SwiGLU, biases on
/// the q, k and v projections, RoPE over 4 of each head's 16 features; its GGUF file
/// (llama.cpp's `stablelm` keys) computes what the directory computes, and one without
/// `ffn_norm` is read as StableLM 2 12B's parallel blocks, as llama.cpp reads it.
#[test]
fn stablelm_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("stablelm-tiny");
    let c = &loaded.config;
    assert_eq!(
        (c.norm, c.feed_forward, c.activation),
        (Norm::BiasedLayer, FeedForward::Gated, Activation::Silu)
    );
    assert!(c.blocks == Blocks::Sequential && !c.ffn_bias && !c.classifier_bias);
    assert_eq!(
        c.attention_bias,
        AttentionBias {
            qkv: true,
            output: false
        }
    );
    assert_eq!(c.rotary_dim, Some(4));
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the norms' biases", &|c| c.norm = Norm::Layer),
            ("the q, k and v biases", &|c| c.attention_bias.qkv = false),
            ("the partial rotation", &|c| c.rotary_dim = None),
        ],
    );
    gguf_computes_what_the_directory_computes(&stablelm_gguf(), &loaded, &reference);
    // A file with per-head q norms but no k norms is refused, naming what is missing.
    let metadata = vec![("rope.dimension_count", Meta::Uint(4))];
    let q_norm = (
        "blk.0.attn_q_norm.weight".into(),
        vec![4, 16],
        vec![1.0; 64],
    );
    let bytes = reference_gguf("stablelm-tiny", "stablelm", metadata, vec![q_norm]);
    let err = llm_runtime::gguf::read(&bytes).err().expect("refused");
    assert!(
        err.contains("no weight `layers.0.attention.k_norm.weight`"),
        "{err}"
    );
}

/// StableLM 2 with parallel blocks (`tests/data/stablelm-parallel-tiny`,
/// `use_parallel_residual`, StableLM 2 12B's): attention and feed-forward blocks over one
/// norm; its GGUF file, which has no `ffn_norm`, is read so too, as llama.cpp reads it.
#[test]
fn stablelm_parallel_blocks_compute_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("stablelm-parallel-tiny");
    assert_eq!(loaded.config.blocks, Blocks::ParallelSharedNorm);
    computes_what_transformers_computes(&loaded, &reference, &[]);
    let metadata = vec![("rope.dimension_count", Meta::Uint(4))];
    let bytes = reference_gguf("stablelm-parallel-tiny", "stablelm", metadata, Vec::new());
    gguf_computes_what_the_directory_computes(&bytes, &loaded, &reference);
}

/// StableLM 2 12B's shape (`tests/data/stablelm-12b-tiny`): parallel blocks and a
/// LayerNorm (no bias) of each query and key head, one weight tensor a head
/// (`self_attn.q_layernorm.norms.H`, stacked when loaded); its GGUF file (the heads'
/// weights stacked into `attn_q_norm` and `attn_k_norm`, as llama.cpp's converter stacks
/// them) computes what the directory computes.
#[test]
fn stablelm_qk_norms_compute_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("stablelm-12b-tiny");
    let c = &loaded.config;
    assert_eq!(
        (c.qk_norm, c.blocks),
        (QkNorm::LayerHeads, Blocks::ParallelSharedNorm)
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the q/k norms", &|c| c.qk_norm = QkNorm::None)],
    );
    let metadata = vec![("rope.dimension_count", Meta::Uint(4))];
    let bytes = reference_gguf_edited("stablelm-12b-tiny", "stablelm", metadata, |tensors| {
        // Per layer and q or k, each head's weights with its number.
        type Heads = Vec<(usize, Vec<f32>)>;
        let mut heads: std::collections::BTreeMap<(String, String), Heads> = Default::default();
        tensors.retain_mut(|(name, _, values)| {
            let Some((stem, head)) = name.split_once("_layernorm.norms.") else {
                return true;
            };
            let (layer, x) = stem
                .strip_prefix("model.layers.")
                .and_then(|r| r.split_once(".self_attn."))
                .expect("a layer's q or k norm");
            let head = head.strip_suffix(".weight").expect("a weight");
            heads
                .entry((layer.to_string(), x.to_string()))
                .or_default()
                .push((head.parse().expect("a head"), std::mem::take(values)));
            false
        });
        for ((layer, x), mut parts) in heads {
            parts.sort_by_key(|(h, _)| *h);
            let shape = vec![parts.len(), parts[0].1.len()];
            let values = parts.into_iter().flat_map(|(_, v)| v).collect();
            tensors.push((format!("blk.{layer}.attn_{x}_norm.weight"), shape, values));
        }
    });
    gguf_computes_what_the_directory_computes(&bytes, &loaded, &reference);
}

/// `tests/data/stablelm-tiny` as llama.cpp's converter writes it.
fn stablelm_gguf() -> Vec<u8> {
    let metadata = vec![("rope.dimension_count", Meta::Uint(4))];
    reference_gguf("stablelm-tiny", "stablelm", metadata, Vec::new())
}

/// StarCoder2 (`tests/data/starcoder2-tiny`): LayerNorms with biases, an ungated GELU
/// feed-forward block, biases on every projection, a window of 10 positions and a tied
/// classifier; its GGUF file (llama.cpp's `starcoder2` keys) computes what the directory
/// computes.
#[test]
fn starcoder2_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("starcoder2-tiny");
    let c = &loaded.config;
    assert_eq!(
        (c.norm, c.feed_forward, c.activation),
        (
            Norm::BiasedLayer,
            FeedForward::Ungated,
            Activation::GeluTanh
        )
    );
    assert!(
        c.blocks == Blocks::Sequential && c.ffn_bias && !c.classifier_bias && c.tied_classifier
    );
    assert_eq!(
        c.attention_bias,
        AttentionBias {
            qkv: true,
            output: true
        }
    );
    assert_eq!(c.sliding_window, Some(10));
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the norms' biases", &|c| c.norm = Norm::Layer),
            ("the feed-forward biases", &|c| c.ffn_bias = false),
            ("the attention's biases", &|c| {
                c.attention_bias = AttentionBias::default()
            }),
            ("the window", &|c| c.sliding_window = None),
        ],
    );
    gguf_computes_what_the_directory_computes(&starcoder2_gguf(), &loaded, &reference);
}

/// `tests/data/starcoder2-tiny` as llama.cpp's converter writes it, with its window as
/// `starcoder2.attention.sliding_window`: a key the converter does not write (llama.cpp
/// attends to every position of a StarCoder2 model), which the loader reads where a file
/// has it, so that the file computes what transformers computes.
fn starcoder2_gguf() -> Vec<u8> {
    let metadata = vec![("attention.sliding_window", Meta::Uint(10))];
    reference_gguf("starcoder2-tiny", "starcoder2", metadata, Vec::new())
}

/// GPT-NeoX (`tests/data/gpt-neox-tiny`, Pythia's shape): LayerNorms with biases,
/// attention and an ungated exact-GELU feed-forward block side by side, each over its own
/// norm, q, k and v fused per head, biases on every projection, RoPE over 4 of each
/// head's 16 features; its GGUF file (llama.cpp's `gptneox`, q, k and v rows regrouped as
/// its converter regroups them) computes what the directory computes.
#[test]
fn gpt_neox_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("gpt-neox-tiny");
    let c = &loaded.config;
    assert_eq!(
        (c.norm, c.feed_forward, c.activation, c.blocks),
        (
            Norm::BiasedLayer,
            FeedForward::Ungated,
            Activation::Gelu,
            Blocks::Parallel
        )
    );
    assert!(c.ffn_bias && !c.classifier_bias && !c.tied_classifier);
    assert_eq!(c.rotary_dim, Some(4));
    // Exact GELU and its tanh approximation differ by 4.7e-4 at most (at x = -2.7): the
    // approximation moves the logits by less than ten times the bound, but by more than
    // ten times the exact model's own distance from transformers'.
    let exact = interp_logits(c, &loaded.weights, &reference);
    let mut tanh = c.clone();
    tanh.activation = Activation::GeluTanh;
    let approximated = interp_logits(&tanh, &loaded.weights, &reference);
    let (error, shift) = (
        largest_difference(&exact, &reference.logits),
        largest_difference(&approximated, &reference.logits),
    );
    assert!(
        shift > 10.0 * error,
        "exact GELU: {error}, its approximation: {shift}"
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the parallel blocks", &|c| c.blocks = Blocks::Sequential),
            ("the norms' biases", &|c| c.norm = Norm::Layer),
            ("the partial rotation", &|c| c.rotary_dim = None),
        ],
    );
    gguf_computes_what_the_directory_computes(&gpt_neox_gguf(), &loaded, &reference);
}

/// `tests/data/gpt-neox-tiny` as llama.cpp's converter writes it: GGUF names, each
/// layer's q, k and v rows stacked (per head before).
fn gpt_neox_gguf() -> Vec<u8> {
    let metadata = vec![
        ("rope.dimension_count", Meta::Uint(4)),
        ("use_parallel_residual", Meta::Bool(true)),
    ];
    reference_gguf_edited("gpt-neox-tiny", "gptneox", metadata, |tensors| {
        for (name, shape, values) in tensors.iter_mut() {
            *name = gpt_neox_gguf_name(name);
            if name.contains("attn_qkv") {
                // Per head its q, k and v rows, as [q; k; v] (llama.cpp's converter).
                *values = stack_qkv_groups(values, shape, 4, 1);
            }
        }
    })
}

/// The rows of a q, k and v projection (or bias) of `shape` fused by KV group (`groups`
/// of `group_heads` query heads' rows, a key head's, a value head's) stacked as q, k and
/// v, as llama.cpp's converter stacks GPT-NeoX's and Falcon's.
fn stack_qkv_groups(
    values: &[f32],
    shape: &[usize],
    groups: usize,
    group_heads: usize,
) -> Vec<f32> {
    let width = shape.get(1).copied().unwrap_or(1);
    let head = shape[0] / (groups * (group_heads + 2)) * width;
    let group = (group_heads + 2) * head;
    let runs = |first: usize, heads: usize| {
        (0..groups).flat_map(move |g| {
            let start = g * group + first * head;
            start..start + heads * head
        })
    };
    runs(0, group_heads)
        .chain(runs(group_heads, 1))
        .chain(runs(group_heads + 1, 1))
        .map(|i| values[i])
        .collect()
}

/// Falcon (`tests/data/falcon-tiny`: Falcon 7B's shape, one KV head, attention and an
/// exact-GELU block side by side over one norm; `falcon-40b-tiny`: the new decoder
/// architecture, two KV groups, the blocks each over its own norm): q, k and v fused by
/// KV group; their GGUF files (llama.cpp's `falcon`, q, k and v stacked as its converter
/// stacks them, Falcon 40B's second norm `attn_norm_2`) compute what the directories
/// compute.
#[test]
fn falcon_computes_what_transformers_computes() {
    for (name, kv_heads, blocks) in [
        ("falcon-tiny", 1, Blocks::ParallelSharedNorm),
        ("falcon-40b-tiny", 2, Blocks::Parallel),
    ] {
        let (reference, loaded) = reference_checkpoint(name);
        let c = &loaded.config;
        assert_eq!(
            (c.kv_heads, c.blocks, c.activation),
            (kv_heads, blocks, Activation::Gelu)
        );
        assert!(c.tied_classifier && !c.ffn_bias && c.norm == Norm::BiasedLayer);
        computes_what_transformers_computes(
            &loaded,
            &reference,
            &[("the norms' biases", &|c| c.norm = Norm::Layer)],
        );
        gguf_computes_what_the_directory_computes(
            &falcon_gguf(name, kv_heads),
            &loaded,
            &reference,
        );
    }
}

/// Falcon's other settings (`tests/data/falcon-mha-tiny`): a KV head a query head (q, k
/// and v fused per head), the blocks one after the other (`parallel_attn` false, its
/// `post_attention_layernorm`), biases on every projection (`bias`).
#[test]
fn falcon_sequential_blocks_with_biases_compute_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("falcon-mha-tiny");
    let c = &loaded.config;
    assert_eq!((c.kv_heads, c.blocks), (4, Blocks::Sequential));
    assert!(c.ffn_bias && c.attention_bias.qkv && c.attention_bias.output);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the projections' biases", &|c| {
            c.ffn_bias = false;
            c.attention_bias = AttentionBias::default();
        })],
    );
}

/// The Falcon checkpoint `tests/data/{name}` of `kv_heads` KV heads (and 4 query heads)
/// as llama.cpp's converter writes it: q, k and v stacked.
fn falcon_gguf(name: &str, kv_heads: usize) -> Vec<u8> {
    reference_gguf_edited(name, "falcon", Vec::new(), |tensors| {
        for (tensor, shape, values) in tensors.iter_mut() {
            *tensor = falcon_gguf_name(tensor);
            if tensor.contains("attn_qkv") {
                *values = stack_qkv_groups(values, shape, kv_heads, 4 / kv_heads);
            }
        }
    })
}

/// llama.cpp's `falcon` name for a Falcon checkpoint's tensor.
fn falcon_gguf_name(hf: &str) -> String {
    let renames = [
        ("transformer.word_embeddings", "token_embd"),
        ("transformer.ln_f", "output_norm"),
        ("transformer.h.", "blk."),
        ("input_layernorm", "attn_norm"),
        ("ln_attn", "attn_norm"),
        ("ln_mlp", "attn_norm_2"),
        ("self_attention.query_key_value", "attn_qkv"),
        ("self_attention.dense", "attn_output"),
        ("mlp.dense_h_to_4h", "ffn_up"),
        ("mlp.dense_4h_to_h", "ffn_down"),
    ];
    renamed(hf, &renames)
}

/// `name` with each of `renames` (theirs, ours) replaced in turn.
fn renamed(name: &str, renames: &[(&str, &str)]) -> String {
    renames
        .iter()
        .fold(name.to_string(), |name, (theirs, ours)| {
            name.replace(theirs, ours)
        })
}

/// llama.cpp's `gptneox` name for a GPT-NeoX checkpoint's tensor.
fn gpt_neox_gguf_name(hf: &str) -> String {
    let renames = [
        ("gpt_neox.embed_in", "token_embd"),
        ("gpt_neox.final_layer_norm", "output_norm"),
        ("embed_out", "output"),
        ("gpt_neox.layers.", "blk."),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("attention.query_key_value", "attn_qkv"),
        ("attention.dense", "attn_output"),
        ("mlp.dense_h_to_4h", "ffn_up"),
        ("mlp.dense_4h_to_h", "ffn_down"),
    ];
    renamed(hf, &renames)
}

/// GPT-2 (`tests/data/gpt2-tiny`): learned positions and no RoPE, LayerNorms with biases,
/// `Conv1D` matrices (`[in, out]`, transposed when loaded), q, k and v fused, an ungated
/// GELU block, biases on every projection, a tied classifier; its GGUF file (llama.cpp's
/// `gpt2`, the matrices transposed as its converter transposes them) computes what the
/// directory computes.
#[test]
fn gpt2_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("gpt2-tiny");
    let c = &loaded.config;
    assert!(c.learned_positions && c.tied_classifier && c.ffn_bias);
    assert_eq!(
        (c.norm, c.feed_forward, c.activation),
        (
            Norm::BiasedLayer,
            FeedForward::Ungated,
            Activation::GeluTanh
        )
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the learned positions", &|c| c.learned_positions = false),
            ("the norms' biases", &|c| c.norm = Norm::Layer),
            ("the feed-forward biases", &|c| c.ffn_bias = false),
            ("the attention's biases", &|c| {
                c.attention_bias = AttentionBias::default()
            }),
        ],
    );
    let gguf = gpt2_gguf("gpt2-tiny", "gpt2");
    gguf_computes_what_the_directory_computes(&gguf, &loaded, &reference);
}

/// GPT-BigCode (`tests/data/gpt-bigcode-tiny`, StarCoder's shape: GPT-2's with one KV
/// head, q, k and v stacked; `gpt-bigcode-mha-tiny`: as many KV heads as query heads,
/// q, k and v fused per head); the one-KV-head model's GGUF file (llama.cpp's
/// `starcoder`) computes what the directory computes.
#[test]
fn gpt_bigcode_computes_what_transformers_computes() {
    for (name, kv_heads) in [("gpt-bigcode-tiny", 1), ("gpt-bigcode-mha-tiny", 4)] {
        let (reference, loaded) = reference_checkpoint(name);
        assert_eq!((loaded.config.heads, loaded.config.kv_heads), (4, kv_heads));
        assert!(loaded.config.learned_positions && loaded.config.tied_classifier);
        computes_what_transformers_computes(
            &loaded,
            &reference,
            &[("the learned positions", &|c| c.learned_positions = false)],
        );
        if kv_heads == 1 {
            let gguf = gpt2_gguf(name, "starcoder");
            gguf_computes_what_the_directory_computes(&gguf, &loaded, &reference);
        }
    }
}

/// GPT-J (`tests/data/gptj-tiny`): attention (no biases) and an ungated GELU
/// feed-forward block side by side over one norm, RoPE with interleaved pairs over 8 of
/// each head's 16 features (`rotary_dim`), a classifier with a bias.
#[test]
fn gptj_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("gptj-tiny");
    let c = &loaded.config;
    assert_eq!(
        (c.blocks, c.rotary_dim, c.rope_half),
        (Blocks::ParallelSharedNorm, Some(8), false)
    );
    assert!(c.classifier_bias && c.ffn_bias && !c.attention_bias.qkv && !c.learned_positions);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the interleaved pairs", &|c| c.rope_half = true),
            ("the partial rotation", &|c| c.rotary_dim = None),
            ("the classifier's bias", &|c| c.classifier_bias = false),
        ],
    );
}

/// The GPT-2-shaped checkpoint `tests/data/{name}` as llama.cpp's converter writes it for
/// `arch` (`gpt2`, whose `Conv1D` matrices it transposes, or `starcoder`).
fn gpt2_gguf(name: &str, arch: &str) -> Vec<u8> {
    reference_gguf_edited(name, arch, Vec::new(), |tensors| {
        for (name, shape, values) in tensors.iter_mut() {
            let conv1d = [".c_attn.weight", ".c_proj.weight", ".c_fc.weight"];
            if arch == "gpt2" && conv1d.iter().any(|c| name.ends_with(c)) {
                let (rows, cols) = (shape[0], shape[1]);
                *values = (0..cols)
                    .flat_map(|c| (0..rows).map(move |r| (r, c)))
                    .map(|(r, c)| values[r * cols + c])
                    .collect();
                *shape = vec![cols, rows];
            }
            *name = gpt2_gguf_name(name);
        }
    })
}

/// llama.cpp's `gpt2` (and `starcoder`) name for a GPT-2-shaped checkpoint's tensor.
fn gpt2_gguf_name(hf: &str) -> String {
    let renames = [
        ("transformer.wte", "token_embd"),
        ("transformer.wpe", "position_embd"),
        ("transformer.ln_f", "output_norm"),
        ("transformer.h.", "blk."),
        ("ln_1", "attn_norm"),
        ("attn.c_attn", "attn_qkv"),
        ("attn.c_proj", "attn_output"),
        ("ln_2", "ffn_norm"),
        ("mlp.c_fc", "ffn_up"),
        ("mlp.c_proj", "ffn_down"),
    ];
    renamed(hf, &renames)
}

/// Older checkpoints of the LayerNorm architectures, as the Hub holds them, read as the
/// models transformers 5 wrote: GPT-NeoX's `rotary_pct` and `rotary_emb_base` instead of
/// `rope_parameters` and its causal-mask buffers; GPT-2's names without `transformer.` and
/// its `attn.bias` buffers; OPT's names without `model.` (saved from `OPTModel`);
/// GPT-BigCode without `num_key_value_heads`. Each computes the
/// logits of the checkpoint it was made from, and the older keys are read (another
/// `rotary_pct` and `rotary_emb_base` give another rotation); GPT-2's
/// `activation_function` is read (`gelu` is exact GELU, `relu` ReLU, `quick_gelu` refused
/// by name).
#[test]
fn older_checkpoint_layouts_read_as_the_same_models() {
    let buffer = |name: &str| (name.to_string(), vec![1, 1, 4, 4], vec![1.0; 16]);
    let older_neox = |pct: f64, base: f64| {
        move |c: &mut serde_json::Value| {
            let fields = c.as_object_mut().expect("an object");
            fields.remove("rope_parameters");
            fields.insert("rotary_pct".into(), pct.into());
            fields.insert("rotary_emb_base".into(), base.into());
        }
    };
    let cases = [
        (
            "gpt-neox-tiny",
            rewritten_checkpoint(
                "gpt-neox-tiny",
                "neox-old",
                older_neox(0.25, 10000.0),
                |t| {
                    t.push(buffer("gpt_neox.layers.0.attention.bias"));
                    t.push(buffer("gpt_neox.layers.1.attention.masked_bias"));
                },
            ),
        ),
        (
            "gpt2-tiny",
            rewritten_checkpoint(
                "gpt2-tiny",
                "gpt2-old",
                |_| {},
                |t| {
                    for (name, ..) in t.iter_mut() {
                        *name = name.trim_start_matches("transformer.").to_string();
                    }
                    t.push(buffer("h.0.attn.bias"));
                    t.push(buffer("h.1.attn.masked_bias"));
                },
            ),
        ),
        (
            "opt-tiny",
            rewritten_checkpoint(
                "opt-tiny",
                "opt-old",
                |_| {},
                |t| {
                    for (name, ..) in t.iter_mut() {
                        *name = name.trim_start_matches("model.").to_string();
                    }
                },
            ),
        ),
        (
            "gpt-bigcode-tiny",
            rewritten_checkpoint(
                "gpt-bigcode-tiny",
                "bigcode-old",
                |c| {
                    let fields = c.as_object_mut().expect("an object");
                    fields.remove("num_key_value_heads");
                },
                |_| {},
            ),
        ),
    ];
    for (name, dir) in cases {
        let (reference, original) = reference_checkpoint(name);
        let older = model_file::load(&dir).expect("the older layout loads");
        assert_eq!(older.config, original.config, "{name}");
        let logits = |m: &model_file::LoadedModel| interp_logits(&m.config, &m.weights, &reference);
        assert!(
            largest_difference(&logits(&older), &logits(&original)) < 1e-5,
            "{name}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
    let dir = rewritten_checkpoint(
        "gpt-neox-tiny",
        "neox-half",
        older_neox(0.5, 5000.0),
        |_| {},
    );
    let half = model_file::load(&dir).expect("loads").config;
    assert_eq!((half.rotary_dim, half.rope_theta), (Some(8), 5000.0));
    std::fs::remove_dir_all(&dir).ok();
    let with_activation = |activation: &str| {
        let dir = rewritten_checkpoint(
            "gpt2-tiny",
            &format!("gpt2-{activation}"),
            |c| c["activation_function"] = activation.into(),
            |_| {},
        );
        let loaded = model_file::load(&dir).map(|m| m.config.activation);
        std::fs::remove_dir_all(&dir).ok();
        loaded
    };
    assert_eq!(with_activation("gelu").expect("loads"), Activation::Gelu);
    assert_eq!(with_activation("relu").expect("loads"), Activation::Relu);
    let err = with_activation("quick_gelu")
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("`activation_function` = \"quick_gelu\" is not supported"),
        "{err}"
    );
}

/// OPT (`tests/data/opt-tiny`): learned positions (its table's first two rows unread, as
/// OPT offsets positions by 2), LayerNorms with biases before each block, an ungated ReLU
/// block, biases on every projection, a tied classifier; OPT-350m's norms after each
/// block and projected embeddings are refused by name.
#[test]
fn opt_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("opt-tiny");
    let c = &loaded.config;
    assert!(c.learned_positions && c.tied_classifier && c.ffn_bias);
    assert_eq!(
        (c.activation, c.feed_forward, c.blocks),
        (Activation::Relu, FeedForward::Ungated, Blocks::Sequential)
    );
    assert_eq!(
        loaded.weights.weight_shape("pos_embeddings.weight"),
        Some(vec![128, 64])
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("ReLU", &|c| c.activation = Activation::GeluTanh),
            ("the norms' biases", &|c| c.norm = Norm::Layer),
        ],
    );
    let refused = [
        (
            "do_layer_norm_before",
            serde_json::json!(false),
            "`do_layer_norm_before` is false",
        ),
        (
            "word_embed_proj_dim",
            serde_json::json!(32),
            "`word_embed_proj_dim` = 32",
        ),
    ];
    for (key, value, expected) in refused {
        let dir = rewritten_checkpoint(
            "opt-tiny",
            &format!("opt-{key}"),
            |c| c[key] = value,
            |_| {},
        );
        let err = model_file::load(&dir).err().map(|e| e.to_string());
        std::fs::remove_dir_all(&dir).ok();
        let err = err.expect("refused");
        assert!(err.contains(expected), "{err}");
    }
}

/// A model of learned positions has none past its table: the engine runs a request of
/// more steps than GPT-2's 128 positions as far as the table goes, not into an error.
#[test]
fn learned_positions_bound_a_request() {
    let (_, loaded) = reference_checkpoint("gpt2-tiny");
    let model = Model::compile_on(
        &Backend::Cpu { threads: 1 },
        loaded.config.clone(),
        loaded.weights.clone(),
        "default",
    )
    .expect("compiles");
    let produced = |steps: usize| {
        let mut engine = Engine::new(&model, EngineConfig::default());
        let params = RequestParams {
            steps,
            sampler: GREEDY,
            stop_tokens: Vec::new(),
        };
        engine.add_request(vec![5, 6, 7], params);
        let mut tokens = 0;
        while engine.has_work() {
            let events = engine.step().expect("no position past the table is run");
            tokens += events
                .iter()
                .filter(|e| matches!(e, Event::Token { .. }))
                .count();
        }
        tokens
    };
    assert_eq!(produced(1000), produced(128));
    assert!(produced(128) > 100);
}

/// OLMo (`tests/data/olmo-tiny`, the first OLMo): LayerNorms of neither weight nor bias
/// (no norm tensors), q, k and v clamped to `[-2, 2]` (`clip_qkv`); its GGUF file
/// (llama.cpp's `olmo`, `olmo.attention.clamp_kqv`, q and k rows reordered for interleaved
/// pairs as its converter reorders them) computes what transformers computes, and a
/// clamp that is not a positive number is refused by name.
#[test]
fn olmo_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("olmo-tiny");
    let c = &loaded.config;
    assert_eq!(
        (c.norm, c.norm_eps, c.clip_qkv),
        (Norm::Unit, 1e-5, Some(2.0))
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the q/k/v clamp", &|c| c.clip_qkv = None)],
    );
    let clamp = vec![("attention.clamp_kqv", Meta::Float(2.0))];
    let bytes = reference_gguf("olmo-tiny", "olmo", clamp, Vec::new());
    let gguf = llm_runtime::gguf::read(&bytes).expect("the GGUF file loads");
    assert!(gguf.config.norm == Norm::Unit && !gguf.config.rope_half);
    assert_eq!(gguf.config.clip_qkv, Some(2.0));
    let from_gguf = gguf_logits(&bytes, &reference);
    assert!(largest_difference(&from_gguf, &reference.logits) < TRANSFORMERS_BOUND);
    let dir = rewritten_checkpoint(
        "olmo-tiny",
        "olmo-clip",
        |c| c["clip_qkv"] = (-8.0).into(),
        |_| {},
    );
    let err = model_file::load(&dir).err().map(|e| e.to_string());
    std::fs::remove_dir_all(&dir).ok();
    let err = err.expect("refused");
    assert!(
        err.contains("`clip_qkv` = -8.0 is not a positive number"),
        "{err}"
    );
}

/// A Llama config's `mlp_bias` (`tests/data/llama-mlp-bias-tiny`): biases on the gate,
/// up and down projections; its GGUF file (`llama`, whose `ffn_*.bias` llama.cpp reads
/// where a file has them) computes what transformers computes.
#[test]
fn llama_mlp_bias_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("llama-mlp-bias-tiny");
    assert!(loaded.config.ffn_bias);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[("the feed-forward biases", &|c| c.ffn_bias = false)],
    );
    // The file's q and k rows are reordered for interleaved pairs, which sums the scores
    // in another order: against transformers' logits, as the directory is.
    let bytes = reference_gguf("llama-mlp-bias-tiny", "llama", Vec::new(), Vec::new());
    let gguf = llm_runtime::gguf::read(&bytes).expect("the GGUF file loads");
    assert!(gguf.config.ffn_bias && !gguf.config.rope_half);
    let from_gguf = gguf_logits(&bytes, &reference);
    assert!(largest_difference(&from_gguf, &reference.logits) < TRANSFORMERS_BOUND);
}

/// GLM-4 9B (`tests/data/glm-tiny`, `GlmForCausalLM`): biases on q, k and v (not on the
/// output projection), the gate and up projections fused, RoPE over half of each head
/// (the config's default) with its pairs interleaved.
#[test]
fn glm_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("glm-tiny");
    let c = &loaded.config;
    let bias = c.attention_bias;
    assert!(bias.qkv && !bias.output && !c.rope_half && !c.post_norms);
    assert_eq!((c.rotary_dim, c.explicit_head_dim), (Some(8), None));
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the interleaved pairs", &|c| c.rope_half = true),
            ("the partial rotation", &|c| c.rotary_dim = None),
            ("the q/k/v biases", &|c| c.attention_bias.qkv = false),
        ],
    );
    // `attention_bias` false: no biases, and none read.
    let dir = rewritten_checkpoint(
        "glm-tiny",
        "glm-unbiased",
        |c| c["attention_bias"] = false.into(),
        |tensors| tensors.retain(|(name, _, _)| !name.ends_with(".bias")),
    );
    let unbiased = model_file::load(&dir).map(|m| m.config.attention_bias);
    std::fs::remove_dir_all(&dir).ok();
    assert!(!unbiased.expect("loads").qkv);
}

/// GLM-4-0414 (`tests/data/glm4-tiny`, `Glm4ForCausalLM`): GLM's with each block's
/// output normalized before its residual add (`post_self_attn_layernorm`,
/// `post_mlp_layernorm`; its `post_attention_layernorm` is the feed-forward block's input
/// norm). Its GGUF file (llama.cpp's `glm4`: `ffn_up` fused, `rope.dimension_count`,
/// `post_attention_norm` and `post_ffw_norm`) computes what the directory computes.
#[test]
fn glm4_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("glm4-tiny");
    let c = &loaded.config;
    assert!(c.post_norms && c.pre_norms && !c.rope_half && c.attention_bias.qkv);
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the output norms", &|c| c.post_norms = false),
            ("the interleaved pairs", &|c| c.rope_half = true),
        ],
    );
    let metadata = vec![("rope.dimension_count", Meta::Uint(8))];
    let bytes = reference_gguf("glm4-tiny", "glm4", metadata, Vec::new());
    gguf_computes_what_the_directory_computes(&bytes, &loaded, &reference);
}

/// Gemma (`tests/data/gemma-tiny`): GeGLU, embeddings scaled by `sqrt(hidden_size)`,
/// norms scaling by `1 + weight`.
#[test]
fn gemma_computes_what_transformers_computes() {
    let (reference, loaded) = reference_checkpoint("gemma-tiny");
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the embedding scale", &|c| c.scale_embeddings = false),
            ("GeGLU", &|c| c.activation = Activation::Silu),
        ],
    );
}

/// Gemma 2, against the logits `transformers` computes for a checkpoint it wrote
/// (`tests/data/gemma2-tiny`): sandwich norms, heads of 24 and a query scale of
/// `20^-0.5`, attention scores soft-capped at 3 and logits at 10, and a window of 8
/// positions in the even layers (28 positions, so it matters). Every backend computes
/// `transformers`' logits, prefilling or decoding, each setting matters, and a GGUF file
/// of the same weights (llama.cpp's `gemma2` keys) computes what the directory computes.
#[test]
fn gemma2_computes_what_transformers_computes() {
    let reference = transformers_reference("gemma2-tiny");
    let loaded = model_file::load(&reference.dir).expect("the Gemma 2 checkpoint loads");
    let c = &loaded.config;
    assert!(c.post_norms && c.scale_embeddings);
    assert_eq!(
        (c.head_dim(), c.attention_softcap, c.logit_softcap),
        (24, Some(3.0), Some(10.0))
    );
    let local = c.local_attention.as_ref().expect("local layers");
    assert_eq!(
        (local.window, local.layers.as_slice()),
        (8, [true, false, true, false].as_slice())
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the attention's soft-cap", &|c| c.attention_softcap = None),
            ("the logits' soft-cap", &|c| c.logit_softcap = None),
            ("the query scale", &|c| c.attention_scale = None),
            ("the local layers", &|c| c.local_attention = None),
            ("the sandwich norms", &|c| c.post_norms = false),
        ],
    );
    gguf_computes_what_the_directory_computes(&gemma_gguf("gemma2"), &loaded, &reference);
}

/// Gemma 3, as [`gemma2_computes_what_transformers_computes`]
/// (`tests/data/gemma3-tiny`): q and k norms, one KV head of 32, no soft-caps, five local
/// layers (a window of 6) to a global one, the local layers' RoPE of base 10000 and the
/// global layer's of base 1e6 scaled by 2; the same settings written the older way
/// (`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `sliding_window_pattern`: the
/// released checkpoints' `config.json`) read the same, and so does a `gemma3` GGUF file.
#[test]
fn gemma3_computes_what_transformers_computes() {
    let reference = transformers_reference("gemma3-tiny");
    let loaded = model_file::load(&reference.dir).expect("the Gemma 3 checkpoint loads");
    let c = &loaded.config;
    assert!(
        c.post_norms
            && c.qk_norm == QkNorm::Heads
            && c.attention_softcap.is_none()
            && c.logit_softcap.is_none()
    );
    assert_eq!((c.rope_theta, c.rope_scaling), (1e6, 2.0));
    let local = c.local_attention.as_ref().expect("local layers");
    assert_eq!(
        (local.window, local.rope_theta, local.layers.as_slice()),
        (
            6,
            Some(10000.0),
            [true, true, true, true, true, false].as_slice()
        )
    );
    computes_what_transformers_computes(
        &loaded,
        &reference,
        &[
            ("the local layers", &|c| c.local_attention = None),
            ("the local RoPE base", &|c| {
                if let Some(local) = &mut c.local_attention {
                    local.rope_theta = None;
                }
            }),
            ("the global RoPE's scaling", &|c| c.rope_scaling = 1.0),
            ("the sandwich norms", &|c| c.post_norms = false),
            ("the q/k norms", &|c| c.qk_norm = QkNorm::None),
        ],
    );
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(reference.dir.join("config.json")).expect("config"),
    )
    .expect("JSON");
    let mut older = config.as_object().expect("an object").clone();
    for key in ["rope_parameters", "layer_types", "_sliding_window_pattern"] {
        older.remove(key);
    }
    for (key, value) in [
        ("rope_theta", serde_json::json!(1e6)),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "linear", "factor": 2.0}),
        ),
        ("rope_local_base_freq", serde_json::json!(10000.0)),
        ("sliding_window_pattern", serde_json::json!(6)),
    ] {
        older.insert(key.into(), value);
    }
    let dir = std::env::temp_dir().join(format!("llmc-gemma3-older-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::copy(
        reference.dir.join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .expect("copy");
    std::fs::write(
        dir.join("config.json"),
        serde_json::Value::Object(older).to_string(),
    )
    .expect("config");
    let from_older = model_file::load(&dir).expect("the older config loads");
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(from_older.config, loaded.config);
    gguf_computes_what_the_directory_computes(&gemma_gguf("gemma3"), &loaded, &reference);
    // llama.cpp would scale the local layers' rotation by an attention factor, which the
    // builder leaves unscaled: refused.
    let scaled = reference_gguf(
        "gemma3-tiny",
        "gemma3",
        vec![
            ("attention.sliding_window", Meta::Uint(6)),
            ("rope.scaling.attn_factor", Meta::Float(1.5)),
        ],
        Vec::new(),
    );
    let err = llm_runtime::gguf::read(&scaled).err().expect("refused");
    assert!(err.contains("local layers of their own RoPE base"), "{err}");
}

/// Gemma 3's multimodal checkpoints (4B and up) keep the language model's settings in a
/// sparse `text_config` (Hugging Face fills in `Gemma3TextConfig`'s defaults) and its
/// tensors under `language_model.`, beside a vision tower: `gemma3-tiny` written that way
/// (keys at their defaults left out, a stand-in vision tower and projector) loads as the
/// same configuration and computes the same logits (text-only, transformers'
/// `Gemma3ForConditionalGeneration` computes what `Gemma3ForCausalLM` does: 9e-6 apart on
/// this checkpoint).
#[test]
fn a_multimodal_gemma3_checkpoint_runs_its_language_model() {
    let reference = transformers_reference("gemma3-tiny");
    let text = std::fs::read_to_string(reference.dir.join("config.json")).expect("config");
    let mut text_config: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let fields = text_config.as_object_mut().expect("an object");
    for at_default in [
        "rms_norm_eps",
        "hidden_activation",
        "architectures",
        "tie_word_embeddings",
    ] {
        fields
            .remove(at_default)
            .expect("the tiny config has the key");
    }
    let config = serde_json::json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "eos_token_id": [1, 106],
        "text_config": text_config,
        "vision_config": {"hidden_size": 32, "num_hidden_layers": 1},
    });
    let stored = std::fs::read(reference.dir.join("model.safetensors")).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&stored).expect("safetensors");
    let vision = vec![0u8; 4 * 32];
    let mut views: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (format!("language_model.{name}"), view))
        .collect();
    for name in [
        "vision_tower.vision_model.post_layernorm.weight",
        "multi_modal_projector.mm_soft_emb_norm.weight",
    ] {
        let view = TensorView::new(Dtype::F32, vec![32], &vision).expect("view");
        views.push((name.to_string(), view));
    }
    let dir = std::env::temp_dir().join(format!("llmc-gemma3-mm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("write");
    let multimodal = model_file::load(&dir).expect("the multimodal checkpoint loads");
    std::fs::remove_dir_all(&dir).ok();
    let text_only = model_file::load(&reference.dir).expect("loads");
    assert_eq!(multimodal.config, text_only.config);
    assert_eq!(
        interp_logits(&multimodal.config, &multimodal.weights, &reference),
        interp_logits(&text_only.config, &text_only.weights, &reference)
    );
}

/// Seeded q, k and v biases of every layer of stories260K (Hugging Face names).
fn qwen2_biases() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    [("q", 64, 1), ("k", 32, 2), ("v", 32, 3)]
        .into_iter()
        .flat_map(|(p, n, seed)| biases(p, move |l| noise(n, seed * 10 + l as u64, 0.5)))
        .collect()
}

/// The metadata of stories260K's shape as a GGUF file of architecture `arch` (its keys
/// prefixed with it), then `more`.
fn gguf_metadata(arch: &str, more: Vec<(&str, Meta)>) -> Vec<(String, Meta)> {
    let (c, _) = llama2c::load(&shared("models/stories260K.bin")).expect("model");
    let int = |v: usize| Meta::Uint(v as u64);
    let mut metadata = vec![("general.architecture".to_string(), Meta::Str(arch.into()))];
    for (key, value) in [
        ("embedding_length", int(c.dim)),
        ("feed_forward_length", int(c.hidden_dim)),
        ("block_count", int(c.layers)),
        ("attention.head_count", int(c.heads)),
        ("attention.head_count_kv", int(c.kv_heads)),
        ("context_length", int(c.seq_len)),
    ] {
        metadata.push((format!("{arch}.{key}"), value));
    }
    metadata.extend(more.into_iter().map(|(k, v)| (k.to_string(), v)));
    metadata
}

/// A GGUF v3 file of `metadata` and f32 `tensors` (Hugging Face names mapped to GGUF's,
/// shapes slowest dim first, values), at `path`: what llama.cpp's converter writes for a
/// Qwen2 checkpoint, whose q and k rows stay in Hugging Face's order.
fn write_gguf(
    path: &Path,
    metadata: &[(impl AsRef<str>, Meta)],
    tensors: &[(String, Vec<usize>, Vec<f32>)],
) {
    std::fs::write(path, gguf_bytes(metadata, tensors)).expect("gguf");
}

/// A Qwen2 GGUF file (`general.architecture = qwen2`, its keys, `attn_{q,k,v}.bias`)
/// computes exactly what the Hugging Face directory of the same weights computes: the
/// same layout of RoPE pairs, the same biases.
#[test]
fn a_qwen2_gguf_file_computes_what_its_hugging_face_directory_computes() {
    let metadata = gguf_metadata(
        "qwen2",
        vec![
            ("qwen2.rope.freq_base", Meta::Float(10000.0)),
            ("qwen2.attention.layer_norm_rms_epsilon", Meta::Float(1e-5)),
        ],
    );
    let mut tensors = hf_tensors();
    tensors.extend(qwen2_biases());
    let path = std::env::temp_dir().join(format!("llmc-qwen2-{}.gguf", std::process::id()));
    write_gguf(&path, &metadata, &tensors);
    let gguf = model_file::load(&path).expect("the Qwen2 GGUF file loads");
    assert!(gguf.config.rope_half && gguf.config.attention_bias.qkv);
    let dir = write_hf_dir_of("qwen2-gguf", "Qwen2ForCausalLM", "", qwen2_biases());
    let hf = model_file::load(&dir).expect("loads");
    let (from_gguf, from_hf) = (
        greedy(&Backend::Interp, &gguf, 40),
        greedy(&Backend::Interp, &hf, 40),
    );
    assert_eq!(from_gguf.ids, from_hf.ids);
    assert_eq!(from_gguf.logits, from_hf.logits);
    // As a llama file, the biases are read, as llama.cpp reads them where a file has them.
    let renamed: Vec<(String, Meta)> = metadata
        .iter()
        .map(|(k, v)| match k.as_str() {
            "general.architecture" => (k.to_string(), Meta::Str("llama".into())),
            _ => (k.replace("qwen2.", "llama."), v.clone()),
        })
        .collect();
    write_gguf(&path, &renamed, &tensors);
    let llama = model_file::load(&path).expect("a llama file with biases loads");
    assert_eq!(
        llama.config.attention_bias,
        AttentionBias {
            qkv: true,
            output: false
        }
    );
    // A layer without them is an error naming the missing weight.
    let missing = tensors
        .iter()
        .filter(|(name, ..)| !name.starts_with("model.layers.1.self_attn.q_proj.bias"))
        .cloned()
        .collect::<Vec<_>>();
    write_gguf(&path, &renamed, &missing);
    let err = model_file::load(&path).err().expect("refused").to_string();
    assert!(
        err.contains("no weight `layers.1.attention.wq.bias`"),
        "{err}"
    );
    std::fs::remove_file(&path).ok();
    std::fs::remove_dir_all(&dir).ok();
}

/// GGUF files of every dense family the loader reads (Qwen2's biases, Qwen3's head width
/// and norms, Phi-3's fused projections and window, Gemma's norms, Gemma 2's and 3's, the
/// LayerNorm architectures'; the mixtures of experts' are `hf_moe.rs`'s), mutated, never
/// make the loader panic: an error names what is wrong, or the mutation was harmless.
#[test]
fn mutated_family_gguf_files_never_panic() {
    let mut qwen2 = hf_tensors();
    qwen2.extend(qwen2_biases());
    let originals = [
        gguf_bytes(&gguf_metadata("qwen2", Vec::new()), &qwen2),
        gguf_bytes(
            &gguf_metadata(
                "qwen3",
                vec![("qwen3.attention.key_length", Meta::Uint(16))],
            ),
            &qwen3_tensors(1.0, true),
        ),
        gguf_bytes(
            &gguf_metadata(
                "phi3",
                vec![("phi3.attention.sliding_window", Meta::Uint(8))],
            ),
            &phi3_tensors(),
        ),
        gguf_bytes(&gguf_metadata("gemma", Vec::new()), &hf_tensors()),
        gemma_gguf("gemma2"),
        gemma_gguf("gemma3"),
        qwen3_yarn_gguf(),
        phi3_longrope_gguf(),
        phi4_mini_gguf(),
        granite_gguf(),
        olmo2_gguf(),
        smollm3_gguf(),
        cohere_gguf(Vec::new()),
        phi2_gguf(true),
        stablelm_gguf(),
        starcoder2_gguf(),
        gpt_neox_gguf(),
        gpt2_gguf("gpt2-tiny", "gpt2"),
        gpt2_gguf("gpt-bigcode-tiny", "starcoder"),
        falcon_gguf("falcon-40b-tiny", 2),
        reference_gguf(
            "glm4-tiny",
            "glm4",
            vec![("rope.dimension_count", Meta::Uint(8))],
            Vec::new(),
        ),
        reference_gguf(
            "cohere-qk-norm-tiny",
            "command-r",
            vec![("logit_scale", Meta::Float(0.25))],
            Vec::new(),
        ),
        reference_gguf(
            "cohere2-tiny",
            "cohere2",
            vec![
                ("logit_scale", Meta::Float(0.25)),
                ("attention.sliding_window", Meta::Uint(8)),
            ],
            Vec::new(),
        ),
    ];
    for original in &originals {
        llm_runtime::gguf::read(original).expect("the unmutated file loads");
    }
    let runs = common::mutated_copies_never_panic(&originals, 0x9999, |_, data| {
        let _ = llm_runtime::gguf::read(data);
    });
    assert!(runs > 0);
}

/// Qwen2's q, k and v biases: zero biases change nothing, random ones change the text,
/// and the CPU and GPU backends compute what the reference semantics compute.
#[test]
fn qwen2_adds_biases_to_the_q_k_and_v_projections() {
    let (dim, kv_dim) = (64, 32);
    let zero = [("q", dim), ("k", kv_dim), ("v", kv_dim)]
        .into_iter()
        .flat_map(|(p, n)| biases(p, |_| vec![0.0; n]))
        .collect();
    let zeroed = write_hf_dir_of("qwen2-zero", "Qwen2ForCausalLM", "", zero);
    let loaded = model_file::load(&zeroed).expect("Qwen2 directory loads");
    assert!(loaded.config.attention_bias.qkv && !loaded.config.attention_bias.output);
    let ir = build_ir(
        &loaded.config,
        &loaded.weights,
        &KvStorage::Float(DType::F32),
    )
    .expect("builds");
    assert!(
        ir.contains("layers.4.attention.wv.bias"),
        "the biases reach the IR"
    );
    let llama = write_hf_dir("qwen2-llama");
    let plain = greedy_ids(
        &Backend::Interp,
        &model_file::load(&llama).expect("loads"),
        60,
    );
    assert_eq!(greedy_ids(&Backend::Interp, &loaded, 60), plain);
    // Qwen2's window starts at layer `max_window_layers`: at the last layer, none.
    let windowless = r#", "use_sliding_window": true, "sliding_window": 8, "max_window_layers": 5"#;
    let biased = write_hf_dir_of("qwen2", "Qwen2ForCausalLM", windowless, qwen2_biases());
    let loaded = model_file::load(&biased).expect("Qwen2 directory loads");
    assert_eq!(loaded.config.sliding_window, None);
    let reference = backends_agree(&loaded, 60).ids;
    assert_ne!(reference, plain, "biases change the text");
    for dir in [zeroed, llama, biased] {
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// A Llama config's `attention_bias` biases the output projection too: a value bias `b`
/// passes through attention unchanged (the weights of each query sum to 1), so it equals
/// an output bias of `Wo b`, and the two models' logits agree.
#[test]
fn a_value_bias_equals_its_projection_as_an_output_bias() {
    let (c, weights) = llama2c::load(&shared("models/stories260K.bin")).expect("model");
    let b: Vec<Vec<f32>> = (0..c.layers)
        .map(|l| noise(c.kv_dim(), 40 + l as u64, 0.5))
        .collect();
    let zeros = |n: usize| move |_| vec![0.0; n];
    let projected: Vec<Vec<f32>> = (0..c.layers)
        .map(|l| {
            let wo = match weights
                .weight(&format!("layers.{l}.attention.wo.weight"))
                .as_deref()
            {
                Some(Value::Tensor(t)) => t.floats().expect("f32").to_vec(),
                _ => panic!("no wo"),
            };
            // Each query head reads the value head of its group.
            let group = c.heads / c.kv_heads;
            let hd = c.head_dim();
            let expanded: Vec<f32> = (0..c.dim)
                .map(|i| b[l][(i / hd / group) * hd + i % hd])
                .collect();
            wo.chunks(c.dim)
                .map(|row| row.iter().zip(&expanded).map(|(w, x)| w * x).sum())
                .collect()
        })
        .collect();
    let with = |v: &dyn Fn(usize) -> Vec<f32>, o: &dyn Fn(usize) -> Vec<f32>| {
        let mut all = biases("q", zeros(c.dim));
        all.extend(biases("k", zeros(c.kv_dim())));
        all.extend(biases("v", v));
        all.extend(biases("o", o));
        all
    };
    let value_biased = write_hf_dir_of(
        "value-bias",
        "LlamaForCausalLM",
        r#", "attention_bias": true"#,
        with(&|l| b[l].clone(), &zeros(c.dim)),
    );
    let output_biased = write_hf_dir_of(
        "output-bias",
        "LlamaForCausalLM",
        r#", "attention_bias": true"#,
        with(&zeros(c.kv_dim()), &|l| projected[l].clone()),
    );
    let logits = |dir: &Path| {
        let loaded = model_file::load(dir).expect("loads");
        greedy(&Backend::Interp, &loaded, 24).logits
    };
    let loaded = model_file::load(&value_biased).expect("loads");
    assert_eq!(
        loaded.config.attention_bias,
        AttentionBias {
            qkv: true,
            output: true
        }
    );
    let worst = largest_difference(&logits(&value_biased), &logits(&output_biased));
    assert!(worst < 1e-3, "largest logit difference {worst}");
    let plain = write_hf_dir("no-bias");
    let shift = largest_difference(&logits(&value_biased), &logits(&plain));
    assert!(shift > 0.1, "the value bias moves the logits by {shift}");
    for dir in [value_biased, output_biased, plain] {
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// The frequency factors `loaded` divides its RoPE's frequencies by.
fn rope_factors(loaded: &model_file::LoadedModel) -> Vec<f32> {
    match loaded.weights.weight("rope_freqs.weight").as_deref() {
        Some(Value::Tensor(t)) => t.floats().expect("f32").to_vec(),
        other => panic!("no factors: {other:?}"),
    }
}

/// The frequency factors and magnitude a RoPE scaling of stories260K (heads of 8, 512
/// positions) loads with, and the IR, generation on every backend (which must agree
/// with the reference semantics) and the unscaled model's text, which it must change.
fn scaled_rope(name: &str, extra: &str) -> (Vec<f32>, f64) {
    let dir = write_hf_dir_with(name, extra);
    let loaded = model_file::load(&dir).expect("HF directory loads");
    std::fs::remove_dir_all(&dir).ok();
    let factors = rope_factors(&loaded);
    let ir = build_ir(
        &loaded.config,
        &loaded.weights,
        &KvStorage::Float(DType::F32),
    )
    .expect("builds");
    let mscale = loaded.config.rope_mscale;
    assert!(
        ir.contains(&format!(
            "positions, rope_freqs {{theta = 10000.0, layout = half, mscale = {mscale:?}}}"
        )),
        "the factors and the magnitude reach llm.rope"
    );
    let scaled = backends_agree(&loaded, 200).ids;
    let unscaled_dir = write_hf_dir(&format!("{name}-unscaled"));
    let unscaled = model_file::load(&unscaled_dir).expect("loads");
    std::fs::remove_dir_all(&unscaled_dir).ok();
    assert_ne!(
        greedy_ids(&Backend::Interp, &unscaled, 200),
        scaled,
        "the scaling changes the model"
    );
    (factors, mscale)
}

/// YaRN (`rope_type = yarn`, factor 4 over 128 original positions): the ramp runs from
/// pair 0 to pair 2 (where pairs of heads of 8 turn 32 and 1 times over 128 positions,
/// rounded out), so the factors are 1, 1 / (1/2 + 1/8), 4 and 4, and the attention
/// factor `1 + 0.1 ln 4` (worked out by hand from Hugging Face's formulas).
#[test]
fn yarn_rope_scaling_blends_the_frequencies() {
    let (factors, mscale) = scaled_rope(
        "yarn",
        r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}"#,
    );
    assert_eq!(factors, [1.0, 1.6, 4.0, 4.0]);
    assert!((mscale - (1.0 + 0.1 * 4f64.ln())).abs() < 1e-12, "{mscale}");
    // Hugging Face takes a 0 for the ramp's ends and the mscales as not given.
    let dir = write_hf_dir_with(
        "yarn-zeros",
        r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 0, "beta_slow": 0, "mscale": 0, "mscale_all_dim": 0}"#,
    );
    let loaded = model_file::load(&dir).expect("loads");
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(
        (rope_factors(&loaded), loaded.config.rope_mscale),
        (factors, mscale)
    );
}

/// LongRoPE (`type = longrope`, Phi-3's, the original context at the config's top level
/// as Phi-3's configs give it): 512 positions over 128 take the long factors, and the
/// attention factor is `sqrt(1 + ln 4 / ln 128)`; where the model's context is the
/// original one, the short factors.
#[test]
fn longrope_scaling_takes_the_factors_of_the_context() {
    let scaling = r#", "original_max_position_embeddings": 128, "rope_scaling": {"type": "longrope", "long_factor": [1.0, 1.5, 3.0, 6.0], "short_factor": [1.0, 1.25, 2.0, 2.5]}"#;
    let (factors, mscale) = scaled_rope("longrope", scaling);
    assert_eq!(factors, [1.0, 1.5, 3.0, 6.0]);
    let expected = (1.0 + 4f64.ln() / 128f64.ln()).sqrt();
    assert!((mscale - expected).abs() < 1e-12, "{mscale}");
    let dir = write_hf_dir_with("longrope-short", &scaling.replace("128", "512"));
    let loaded = model_file::load(&dir).expect("loads");
    std::fs::remove_dir_all(&dir).ok();
    let short = rope_factors(&loaded);
    assert_eq!(short, [1.0, 1.25, 2.0, 2.5]);
    assert_eq!(loaded.config.rope_mscale, 1.0);
}

/// SmolLM3's NoPE layers where its config lists none: every `no_rope_layer_interval`-th
/// layer, every fourth by default, as `SmolLM3Config` fills them in (stories260K's five
/// layers).
#[test]
fn smollm3_nope_layers_default_to_every_fourth() {
    for (extra, nope) in [
        ("", [false, false, false, true, false]),
        (
            r#", "no_rope_layer_interval": 2"#,
            [false, true, false, true, false],
        ),
    ] {
        let dir = write_hf_dir_of("smollm3-nope", "SmolLM3ForCausalLM", extra, Vec::new());
        let loaded = model_file::load(&dir).expect("loads");
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(loaded.config.nope_layers.as_deref(), Some(nope.as_slice()));
    }
}

/// Linear RoPE scaling divides the positions (`llm.rope`'s `scaling`).
#[test]
fn linear_rope_scaling_scales_the_positions() {
    let dir = write_hf_dir_with(
        "linear",
        r#", "rope_scaling": {"type": "linear", "factor": 2.0}"#,
    );
    let loaded = model_file::load(&dir).expect("HF directory loads");
    assert_eq!(loaded.config.rope_scaling, 2.0);
    assert!(!loaded.config.rope_freq_factors);
    let ir = build_ir(
        &loaded.config,
        &loaded.weights,
        &KvStorage::Float(DType::F32),
    )
    .expect("builds");
    assert!(ir.contains("scaling = 2.0"), "the scaling reaches llm.rope");
    Model::compile(loaded.config, loaded.weights, "default").expect("compiles");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_directories_name_the_file() {
    let dir = std::env::temp_dir().join(format!("llmc-hf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("config.json"), r#"{"hidden_size": 64}"#).expect("write");
    let err = model_file::load(&dir).err().expect("incomplete config");
    let expected = format!(
        "{}: missing or non-integer `num_attention_heads`",
        dir.join("config.json").display()
    );
    assert_eq!(err.to_string(), expected);
    std::fs::remove_dir_all(&dir).ok();
    // Settings the builder would ignore are refused rather than computed wrongly.
    for (extra, expected) in [
        (
            r#", "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}"#,
            "`rope_scaling` = {\"factor\":4.0,\"rope_type\":\"dynamic\"} is not supported",
        ),
        (
            r#", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}"#,
            "`rope_scaling.low_freq_factor` is missing",
        ),
        (
            r#", "rope_scaling": {"rope_type": "yarn", "factor": -4.0}"#,
            "`rope_scaling.factor` = -4.0 is not a positive number",
        ),
        (
            r#", "rope_scaling": {"type": "longrope", "long_factor": [1, 1, 1, 1], "short_factor": [1, 1, 1, 1]}"#,
            "`rope_scaling.original_max_position_embeddings` is missing",
        ),
        (
            r#", "original_max_position_embeddings": 128, "rope_scaling": {"type": "longrope", "long_factor": [1, 1, 1], "short_factor": [1, 1, 1, 1]}"#,
            "`rope_scaling.long_factor` is not 4 positive numbers, one a rotated pair",
        ),
        (
            r#", "original_max_position_embeddings": 64, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}"#,
            "`rope_scaling.original_max_position_embeddings` (128) differs from the top level's (64)",
        ),
        (
            r#", "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 1.0}"#,
            "YaRN's beta_fast (1) must exceed its beta_slow (1)",
        ),
        (
            r#", "rope_scaling": null, "hidden_act": "quick_gelu""#,
            "`hidden_act` = \"quick_gelu\" is not supported",
        ),
        (
            r#", "architectures": ["PaliGemmaForConditionalGeneration"]"#,
            "`architectures` names \"PaliGemmaForConditionalGeneration\"",
        ),
        (
            r#", "architectures": ["Gemma3ForConditionalGeneration"]"#,
            "`text_config` is missing",
        ),
        (
            r#", "architectures": ["Gemma2ForCausalLM"], "layer_types": ["full_attention", "chunked_attention", "full_attention", "full_attention", "full_attention"]"#,
            "`layer_types` holds \"chunked_attention\"",
        ),
        (
            r#", "architectures": ["Gemma2ForCausalLM"], "layer_types": ["full_attention"]"#,
            "`layer_types` lists 1 layers, but `num_hidden_layers` is 5",
        ),
        (
            r#", "architectures": ["Gemma2ForCausalLM"], "attn_logit_softcapping": -50.0"#,
            "`attn_logit_softcapping` = -50.0 is not a positive number",
        ),
        (
            r#", "architectures": ["Gemma3ForCausalLM"], "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}"#,
            "the local layers' RoPE must be unscaled",
        ),
        (
            r#", "architectures": ["GraniteForCausalLM"], "logits_scaling": 0"#,
            "`logits_scaling` = 0 is not a positive number",
        ),
        (
            r#", "partial_rotary_factor": 0.75"#,
            "`partial_rotary_factor` = 0.75: only Phi-3's, GLM's, Phi's, StableLM's and GPT-NeoX's attention rotate part of each head",
        ),
        (
            r#", "architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.7"#,
            "`partial_rotary_factor` = 0.7 rotates 5 features of heads of 8, not whole pairs",
        ),
        (
            r#", "architectures": ["SmolLM3ForCausalLM"], "no_rope_layers": [1, 2, 1, 1, 1]"#,
            "`no_rope_layers` holds 2, not 0 or 1",
        ),
        (
            r#", "architectures": ["SmolLM3ForCausalLM"], "no_rope_layers": [1, 1, 0]"#,
            "3 layers are marked with or without RoPE, but the model has 5",
        ),
        (
            r#", "architectures": ["SmolLM3ForCausalLM"], "use_sliding_window": true, "sliding_window": 0"#,
            "`sliding_window` = 0 is out of range",
        ),
        (
            r#", "architectures": ["CohereForCausalLM"], "use_qk_norm": 1"#,
            "`use_qk_norm` = 1 is not a boolean",
        ),
        (
            r#", "partial_rotary_factor": 1.5"#,
            "`partial_rotary_factor` = 1.5 is not a fraction in (0, 1]",
        ),
        (
            r#", "partial_rotary_factor": 0.5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}"#,
            "`partial_rotary_factor` is 0.5 at the top level but 0.75 in the RoPE settings",
        ),
        (
            r#", "architectures": ["GemmaForCausalLM"], "hidden_act": "quick_gelu""#,
            "`hidden_act` = \"quick_gelu\" is not supported",
        ),
        (
            r#", "architectures": ["PhiForCausalLM"], "qk_layernorm": true"#,
            "`qk_layernorm` is true: Phi's shared q/k LayerNorms are not supported",
        ),
        (
            r#", "architectures": ["Starcoder2ForCausalLM"], "norm_epsilon": -1"#,
            "`norm_epsilon` = -1 is not a positive number",
        ),
    ] {
        let dir = write_hf_dir_with("refused", extra);
        let err = model_file::load(&dir).err().expect("unsupported config");
        assert!(err.to_string().contains(expected), "{err}");
        assert!(err.to_string().contains("config.json"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
    // A bias the config does not declare would be left out: refused, with the tensor named.
    let dir = write_hf_dir_of(
        "stray-bias",
        "LlamaForCausalLM",
        "",
        biases("q", |_| vec![0.0; 64]),
    );
    let err = model_file::load(&dir)
        .err()
        .expect("undeclared bias")
        .to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("self_attn.q_proj.bias` is a bias that config.json does not declare"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
    // Two tensors of one weight (Phi's name for the final norm beside Llama's): refused,
    // not one of them dropped.
    let twice = vec![(
        "model.final_layernorm.weight".to_string(),
        vec![64],
        vec![1.0; 64],
    )];
    let dir = write_hf_dir_of("twice", "LlamaForCausalLM", "", twice);
    let err = model_file::load(&dir).err().expect("refused").to_string();
    assert!(
        err.contains("is the model's `norm.weight`, which another tensor already gave"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
    // More layers than the files hold tensors: refused before anything walks them.
    let dir = write_hf_dir_with("many-layers", r#", "num_hidden_layers": 1000000"#);
    let err = model_file::load(&dir)
        .err()
        .expect("too many layers")
        .to_string();
    assert!(
        err.contains("the model has 1000000 layers, but its files hold"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
    // A `head_dim` the weights do not have: the first weight of another shape is named.
    let dir = write_hf_dir_with("head-dim", r#", "head_dim": 16"#);
    let err = model_file::load(&dir)
        .err()
        .expect("wrong shapes")
        .to_string();
    assert!(
        err.contains("has shape [64, 64], expected [128, 64]")
            || err.contains("has shape [32, 64], expected [64, 64]")
            || err.contains("has shape [64, 64], expected [64, 128]"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
    // Qwen2 without its biases: the missing weight is named.
    let dir = write_hf_dir_of("qwen2-unbiased", "Qwen2ForCausalLM", "", Vec::new());
    let err = model_file::load(&dir)
        .err()
        .expect("missing biases")
        .to_string();
    assert!(
        err.contains("the model has no weight `layers.0.attention.wq.bias`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
