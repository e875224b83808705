//! End-to-end tests on the real stories260K model against `../shared/golden`: greedy
//! generation on the reference interpreter and on the CPU backend reproduces llama2.c's text
//! and token ids exactly, and every forward position's logits are within 1e-4 of the golden
//! logits. Models with quantized weights run in generated code on every backend.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use llm_ir::{
    dtype::DType,
    interp::KvValues,
    types::{KvStorage, QuantFormat},
};
use llm_runtime::{
    generate::{Backend, Generation, Model, Step},
    llama2c,
    sampler::SamplerConfig,
    synth,
    tokenizer::Tokenizer,
};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

fn model_path() -> PathBuf {
    shared().join("models/stories260K.bin")
}

fn tokenizer_path() -> PathBuf {
    shared().join("models/tok512.bin")
}

const GREEDY: SamplerConfig = SamplerConfig {
    temperature: 0.0,
    top_p: 0.9,
    top_k: 0,
    seed: 1,
};

fn generate(prompt: &str, steps: usize) -> Generation {
    generate_with(prompt, steps, "default", &Backend::Interp)
}

/// Greedy generation on `backend` after the pass pipeline `passes`.
fn generate_with(prompt: &str, steps: usize, passes: &str, backend: &Backend) -> Generation {
    let (config, weights) = llama2c::load(&model_path()).expect("model loads");
    let tokenizer = Tokenizer::load(&tokenizer_path(), config.vocab).expect("tokenizer loads");
    let model = Model::compile_on(backend, config, weights, passes).expect("model compiles");
    model
        .generate(&tokenizer, prompt, steps, GREEDY)
        .expect("generation runs")
}

/// The golden `ids.txt`: prompt ids, all ids, whether it stopped at BOS, forward calls.
fn golden_ids(stem: &str) -> (Vec<u32>, Vec<u32>, bool, usize) {
    let text = std::fs::read_to_string(shared().join(format!("golden/{stem}.ids.txt")))
        .expect("golden ids");
    let field = |key: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key}"));
        line[key.len()..]
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let nums = |v: Vec<String>| {
        v.iter()
            .filter_map(|s| s.parse().ok())
            .collect::<Vec<u32>>()
    };
    let ids = field("ids:");
    let stopped = ids.iter().any(|s| s == "[stop:BOS]");
    let calls = field("forward_calls:")[0].parse().expect("forward_calls");
    (nums(field("prompt_ids:")), nums(ids), stopped, calls)
}

fn golden_logits(stem: &str) -> Vec<f32> {
    let bytes =
        std::fs::read(shared().join(format!("golden/{stem}.logits.f32"))).expect("golden logits");
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn check_golden(stem: &str, prompt: &str) {
    for (passes, backend) in [
        ("", Backend::Interp),
        ("default", Backend::Interp),
        ("", Backend::Cpu { threads: 2 }),
        ("default", Backend::Cpu { threads: 1 }),
        ("default", Backend::Cpu { threads: 2 }),
    ] {
        check_golden_with(stem, prompt, passes, &backend);
    }
    if gpu_available() {
        for passes in ["", "default"] {
            check_golden_with(stem, prompt, passes, &Backend::Gpu(Default::default()));
        }
    }
}

/// Whether wgpu finds an adapter ([`llm_lower::gpu::test_device`]: a failure instead
/// when `REQUIRE_GPU` is set).
fn gpu_available() -> bool {
    llm_lower::gpu::test_device(&Default::default()).is_some()
}

/// Checks one golden prompt on `backend` after the pipeline `passes` (`""`: the
/// unoptimized IR).
fn check_golden_with(stem: &str, prompt: &str, passes: &str, backend: &Backend) {
    let g = generate_with(prompt, 256, passes, backend);
    let text = std::fs::read(shared().join(format!("golden/{stem}.txt"))).expect("golden text");
    assert_eq!(
        String::from_utf8_lossy(&g.text),
        String::from_utf8_lossy(&text),
        "text differs"
    );
    let (prompt_ids, ids, stopped, calls) = golden_ids(stem);
    assert_eq!(g.prompt_ids, prompt_ids, "prompt ids differ");
    assert_eq!(g.ids, ids, "token ids differ");
    assert_eq!(g.stopped, stopped);
    assert_eq!(g.stats.forward_calls, calls);
    let golden = golden_logits(stem);
    assert_eq!(golden.len(), calls * 512, "golden logits rows");
    assert_eq!(g.logits.len(), calls, "one logits row per forward call");
    let mut max_err = 0f32;
    for (pos, row) in g.logits.iter().enumerate() {
        for (j, (&a, &b)) in row
            .iter()
            .zip(&golden[pos * 512..(pos + 1) * 512])
            .enumerate()
        {
            let err = (a - b).abs();
            assert!(
                err <= 1e-4,
                "{stem}: logit {j} at position {pos} differs by {err} ({a} vs {b})"
            );
            max_err = max_err.max(err);
        }
    }
    println!(
        "{stem} ({backend:?}, passes `{passes}`): {} positions, max |logit error| = {max_err:e}",
        g.logits.len()
    );
}

#[test]
fn golden_once_upon_a_time() {
    check_golden("once_upon_a_time", "Once upon a time");
}

#[test]
fn golden_little_dog() {
    check_golden("little_dog", "The little dog was sad because");
}

#[test]
fn empty_prompt_matches_once_upon_a_time() {
    let g = generate("", 256);
    let text = std::fs::read(shared().join("golden/once_upon_a_time.txt")).expect("golden text");
    assert_eq!(g.text, text);
}

#[test]
fn steps_count_positions_including_the_prompt() {
    let g = generate("Once upon a time", 8);
    assert_eq!(g.stats.forward_calls, 8);
    let (_, ids, _, _) = golden_ids("once_upon_a_time");
    assert_eq!(g.ids, ids[..9]);
}

/// Runs `llm-run` without backtraces and asserts it succeeded.
fn llm_run(command: &mut Command) -> std::process::Output {
    let out = command
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("llm-run runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `llm-run generate --temperature 0 --stats` on stories260K with `args` added.
fn generate_greedy(args: &[&OsStr]) -> std::process::Output {
    llm_run(
        Command::new(env!("CARGO_BIN_EXE_llm-run"))
            .args(["generate", "--model"])
            .arg(model_path())
            .arg("--tokenizer")
            .arg(tokenizer_path())
            .args(["--temperature", "0", "--stats"])
            .args(args),
    )
}

/// [`generate_greedy`] on one prompt, checking that standard output is the golden text of
/// `stem`; returns the `--stats` JSON.
fn generate_cli(stem: &str, prompt: &str, args: &[&str]) -> String {
    let mut all: Vec<&OsStr> = vec!["--prompt".as_ref(), prompt.as_ref()];
    all.extend(args.iter().map(OsStr::new));
    let out = generate_greedy(&all);
    let golden = std::fs::read(shared().join(format!("golden/{stem}.txt"))).expect("golden");
    assert_eq!(out.stdout, golden);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn llm_run_generate_on_the_interpreter_prints_what_run_c_prints() {
    let stats = generate_cli(
        "little_dog",
        "The little dog was sad because",
        &["--backend", "interp"],
    );
    for key in [
        "prompt_tokens",
        "generated_tokens",
        "compile_ms",
        "jit_ms",
        "prefill_ms",
        "decode_ms",
        "decode_tok_per_s",
        "\"kv_blocks\": 16",
        "\"backend\": \"interp\"",
    ] {
        assert!(stats.contains(key), "stats lack {key}: {stats}");
    }
}

#[test]
fn llm_run_generate_on_the_cpu_backend_prints_what_run_c_prints() {
    let stats = generate_cli(
        "once_upon_a_time",
        "Once upon a time",
        &["--backend", "cpu", "--threads", "2"],
    );
    assert!(stats.contains("\"backend\": \"cpu\""), "{stats}");
    // The CPU backend is the default.
    let stats = generate_cli("once_upon_a_time", "Once upon a time", &[]);
    assert!(stats.contains("\"backend\": \"cpu\""), "{stats}");
}

#[test]
fn llm_run_generate_on_the_gpu_backend_prints_what_run_c_prints() {
    if !gpu_available() {
        return;
    }
    let stats = generate_cli(
        "little_dog",
        "The little dog was sad because",
        &["--backend", "gpu"],
    );
    assert!(stats.contains("\"backend\": \"gpu\""), "{stats}");
}

#[test]
fn llm_run_generate_batches_several_prompts_in_order() {
    let prompts = std::env::temp_dir().join(format!("llmc-prompts-{}.txt", std::process::id()));
    // Outputs follow prompt order: `--prompt`s first, then the lines of `--prompts`.
    std::fs::write(&prompts, "The little dog was sad because\n").expect("prompt file");
    let out = generate_greedy(&[
        "--prompt".as_ref(),
        "Once upon a time".as_ref(),
        "--prompts".as_ref(),
        prompts.as_os_str(),
    ]);
    std::fs::remove_file(&prompts).ok();
    let mut golden = std::fs::read(shared().join("golden/once_upon_a_time.txt")).expect("golden");
    golden.extend(std::fs::read(shared().join("golden/little_dog.txt")).expect("golden"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&golden)
    );
    let stats = String::from_utf8_lossy(&out.stderr);
    assert!(stats.contains("\"requests\": 2"), "{stats}");
}

/// `--n 3` samples three completions of the prompt, prefilling it once: completion `k`
/// is what the prompt alone gives with seed `11 + k`, printed one after another.
#[test]
fn llm_run_generate_n_samples_completions_of_a_prompt() {
    let sampled = |seed: u64, n: usize| {
        let out = llm_run(
            Command::new(env!("CARGO_BIN_EXE_llm-run"))
                .args(["generate", "--model"])
                .arg(model_path())
                .arg("--tokenizer")
                .arg(tokenizer_path())
                .args(["--prompt", "Once upon a time", "--temperature", "1"])
                .args(["--max-tokens", "48", "--seed", &seed.to_string()])
                .args(["--n", &n.to_string(), "--stats"]),
        );
        (
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (together, stats) = sampled(11, 3);
    assert!(stats.contains("\"requests\": 3"), "{stats}");
    let alone: Vec<Vec<u8>> = (0..3).map(|k| sampled(11 + k, 1).0).collect();
    assert_eq!(
        String::from_utf8_lossy(&together),
        String::from_utf8_lossy(&alone.concat())
    );
    assert_ne!(alone[0], alone[1]);
}

/// Text streams as it is generated: one sequence piece by piece, and of several the first
/// unfinished output piece by piece; the pieces make up exactly the whole outputs, and a
/// streamed generation keeps no logits.
#[test]
fn generated_text_streams_piece_by_piece() {
    let (config, weights) = llama2c::load(&model_path()).expect("model loads");
    let tokenizer = Tokenizer::load(&tokenizer_path(), config.vocab).expect("tokenizer loads");
    let model =
        Model::compile_on(&Backend::cpu(), config, weights, "default").expect("model compiles");
    let whole = model
        .generate(&tokenizer, "Once upon a time", 64, GREEDY)
        .expect("runs");
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    let streamed = model
        .generate_streaming(&tokenizer, "Once upon a time", 64, GREEDY, &mut |p| {
            pieces.push(p.to_vec());
            Ok(())
        })
        .expect("runs");
    assert_eq!(pieces.concat(), whole.text);
    assert_eq!(streamed.ids, whole.ids);
    assert!(pieces.len() > 50, "{} pieces", pieces.len());
    assert!(streamed.logits.is_empty());
    assert_eq!(whole.logits.len(), whole.stats.forward_calls);
    // Several prompts: the output of the first streams; together they are the whole texts.
    let prompts = [
        "Once upon a time".to_string(),
        "Tom had a red ball".to_string(),
    ];
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    llmc::serve::generate_batch(&model, &tokenizer, (&prompts, 1), 64, GREEDY, &mut |p| {
        pieces.push(p.to_vec());
        Ok(())
    })
    .expect("runs");
    let second = model
        .generate(&tokenizer, &prompts[1], 64, GREEDY)
        .expect("runs");
    assert_eq!(pieces.concat(), [whole.text, second.text].concat());
    assert!(pieces.len() > 50, "{} pieces", pieces.len());
}

#[test]
fn seeded_sampling_is_reproducible() {
    let (config, weights) = llama2c::load(&model_path()).expect("model loads");
    let tokenizer = Tokenizer::load(&tokenizer_path(), config.vocab).expect("tokenizer loads");
    let model = Model::compile(config, weights, "default").expect("model compiles");
    let sampler = SamplerConfig {
        temperature: 0.8,
        top_p: 0.9,
        top_k: 40,
        seed: 42,
    };
    let a = model
        .generate(&tokenizer, "Once upon a time", 64, sampler.clone())
        .expect("runs");
    let b = model
        .generate(&tokenizer, "Once upon a time", 64, sampler.clone())
        .expect("runs");
    assert_eq!(a.ids, b.ids);
    let other = SamplerConfig {
        seed: 43,
        ..sampler
    };
    let c = model
        .generate(&tokenizer, "Once upon a time", 64, other)
        .expect("runs");
    assert_ne!(
        a.ids, c.ids,
        "a different seed should change a 64-step sample"
    );
}

#[test]
fn imported_ir_is_accepted_by_llm_opt() {
    let out = llm_run(
        Command::new(env!("CARGO_BIN_EXE_llm-run"))
            .args(["import", "--model"])
            .arg(model_path()),
    );
    let ir = String::from_utf8(out.stdout).expect("UTF-8 IR");
    assert!(ir.contains("builtin.func @prefill") && ir.contains("builtin.func @decode"));
    let args = llmc::pipeline::OptArgs::from_run_line("--emit=ir").expect("args");
    let reprinted = llmc::pipeline::run(&args, &ir).expect("llm-opt accepts the imported IR");
    assert_eq!(reprinted.text, ir);
}

/// `--kv-dtype`: the imported IR declares the cache's element type, and `llm-run bench`
/// names it and counts a 16-bit pool at half an f32 pool's bytes.
#[test]
fn the_kv_cache_type_is_chosen_on_the_command_line() {
    let out = llm_run(
        Command::new(env!("CARGO_BIN_EXE_llm-run"))
            .args(["import", "--kv-dtype", "bf16", "--model"])
            .arg(model_path()),
    );
    let ir = String::from_utf8(out.stdout).expect("UTF-8 IR");
    assert!(
        ir.contains("block_size = 16, blocks = ?, dtype = bf16>"),
        "{ir}"
    );
    let bench = |kv: &str| -> (String, f64) {
        let out = llm_run(
            Command::new(env!("CARGO_BIN_EXE_llm-run"))
                .args(["bench", "--model"])
                .arg(model_path())
                .args([
                    "--concurrency",
                    "8",
                    "--prompt-len",
                    "4",
                    "--gen-len",
                    "400",
                ])
                .args(["--kv-dtype", kv]),
        );
        let report = String::from_utf8(out.stdout).expect("UTF-8 report");
        let pool = report
            .split("kv pool ")
            .nth(1)
            .and_then(|rest| rest.split(" MiB").next())
            .and_then(|mib| mib.parse().ok())
            .unwrap_or_else(|| panic!("no pool size in {report}"));
        (report, pool)
    };
    let ((f32_report, f32_pool), (f16_report, f16_pool)) = (bench("f32"), bench("f16"));
    assert!(
        f32_report.contains("kv cache:          f32,"),
        "{f32_report}"
    );
    assert!(
        f16_report.contains("kv cache:          f16,"),
        "{f16_report}"
    );
    assert!(
        (f16_pool * 2.0 - f32_pool).abs() <= 0.15,
        "{f16_pool} MiB vs {f32_pool} MiB"
    );
    // stories260K's heads of 8 values fill no q8_0 block of 32.
    let refused = Command::new(env!("CARGO_BIN_EXE_llm-run"))
        .args(["import", "--kv-dtype", "q8_0", "--model"])
        .arg(model_path())
        .output()
        .expect("llm-run runs");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && refused.stdout.is_empty(),
        "{err}"
    );
    assert!(
        err.contains("a q8_0 KV cache quantizes blocks of 32 values along each head, but the model's heads have 8 values"),
        "{err}"
    );
}

#[test]
fn gguf_model_with_its_embedded_vocabulary_matches_golden() {
    let loaded = llm_runtime::model_file::load(&shared().join("models/stories260K.gguf"))
        .expect("GGUF loads");
    let tokenizer = loaded.tokenizer.expect("embedded vocabulary");
    let model = Model::compile(loaded.config, loaded.weights, "default").expect("compiles");
    let g = model
        .generate(tokenizer.as_ref(), "Once upon a time", 256, GREEDY)
        .expect("runs");
    let text = std::fs::read(shared().join("golden/once_upon_a_time.txt")).expect("golden text");
    assert_eq!(
        String::from_utf8_lossy(&g.text),
        String::from_utf8_lossy(&text)
    );
    let golden = golden_logits("once_upon_a_time");
    assert_eq!(
        g.logits.len() * 512,
        golden.len(),
        "one logits row per position"
    );
    let max_err = g
        .logits
        .iter()
        .flatten()
        .zip(&golden)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max_err <= 1e-4, "max logit error {max_err}");
}

/// A small synthetic model (rows of 256 values, so the k-quants' super-blocks fit) with its
/// matrices, tied embedding included, quantized to each format a model file may hold, runs
/// with no op left to the reference semantics on the CPU backend (and on the GPU where one
/// is present), and its logits agree with the interpreter's.
#[test]
fn quantized_models_run_in_generated_code() {
    let path = quantizable_model("formats");
    let affine = |bits, group_size, symmetric, scale| QuantFormat::Affine {
        bits,
        group_size,
        symmetric,
        axis: 1,
        scale,
    };
    let formats = [
        QuantFormat::Q8_0,
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Iq4Nl,
        QuantFormat::Q4K,
        QuantFormat::Q6K,
        QuantFormat::Q2K,
        QuantFormat::Q3K,
        QuantFormat::Q5K,
        QuantFormat::Iq4Xs,
        QuantFormat::Iq3Xxs,
        QuantFormat::Iq3S,
        QuantFormat::Iq2Xxs,
        QuantFormat::Iq2Xs,
        QuantFormat::Iq2S,
        QuantFormat::Iq1S,
        QuantFormat::Iq1M,
        QuantFormat::Tq1_0,
        QuantFormat::Tq2_0,
        QuantFormat::Q1_0,
        QuantFormat::Mxfp4,
        QuantFormat::Nvfp4,
        QuantFormat::Nf4 {
            block_size: 64,
            scale: DType::F16,
        },
        affine(4, 32, true, DType::BF16),
        affine(8, 64, false, DType::F32),
    ];
    let mut backends = vec![Backend::Cpu { threads: 2 }];
    if gpu_available() {
        backends.push(Backend::Gpu(Default::default()));
    }
    for format in formats {
        let text = format.to_string();
        let (_, reference) = quantized_logits(&path, &format, &Backend::Interp, "default");
        for backend in &backends {
            let (model, got) = quantized_logits(&path, &format, backend, "default");
            expect_generated_code(&model, backend, &text);
            let max_err = max_relative_error(&got, &reference, 1e-4, &text);
            println!("{text} on {backend:?}: max relative logit error {max_err:e}");
        }
    }
    std::fs::remove_file(&path).ok();
}

/// KV caches in a block format (q8_0, q4_0) hold their blocks' bytes: the pool takes 9/32
/// (q8_0) and 5/32 (q4_0) of an f32 pool's bytes, the interpreter's cache holds blocks, and
/// on the CPU backend (and the GPU where there is one) 24 prefill positions and 24 greedy
/// decode steps, across block boundaries, give the interpreter's tokens over the same
/// storage and logits within 5% (as for q8_0 activations: quantizing is a step function,
/// so a last-bit difference upstream, another addition order in a matmul, can move a
/// stored code by a step; the attention kernels' exactness on identical inputs is checked
/// in `llm-lower/tests/kernels.rs`, `paged_attention_over_block_caches`); the logits stay
/// near those over an f32 cache.
#[test]
fn block_format_kv_caches_hold_their_blocks() {
    let path = quantizable_model("kv-blocks");
    let (config, weights) = llama2c::load(&path).expect("model loads");
    std::fs::remove_file(&path).ok();
    let compile = |backend: &Backend, kv: KvStorage| {
        Model::compile_with_kv(backend, config.clone(), weights.clone(), "default", kv)
            .expect("compiles")
    };
    // Greedy decoding: the prompt's logits, then each step's, and the tokens chosen.
    let run = |model: &Model| -> (Vec<Vec<f32>>, Vec<u32>) {
        let prompt: Vec<u32> = (0..24).map(|i| 1 + (i * 37 % 500) as u32).collect();
        let mut cache = model.new_cache(4);
        let (mut rows, next) = model
            .forward(Step::Prefill, &prompt, 0, cache)
            .expect("prefill");
        cache = next;
        let mut tokens = Vec::new();
        for pos in prompt.len()..prompt.len() + 24 {
            let last = rows.last().expect("a row");
            let token = (0..last.len())
                .max_by(|&a, &b| last[a].total_cmp(&last[b]))
                .expect("logits") as u32;
            tokens.push(token);
            let (step, next) = model
                .forward(Step::Decode, &[token], pos, cache)
                .expect("decode");
            (cache, rows) = (next, [rows, step].concat());
        }
        (rows, tokens)
    };
    let f32_storage = KvStorage::Float(DType::F32);
    let exact = compile(&Backend::Interp, f32_storage.clone());
    let (f32_logits, _) = run(&exact);
    let mut backends = vec![Backend::Cpu { threads: 2 }];
    if gpu_available() {
        backends.push(Backend::Gpu(Default::default()));
    }
    for (format, ninths) in [(QuantFormat::Q8_0, 9), (QuantFormat::Q4_0, 5)] {
        let kv = KvStorage::Quantized(format.clone());
        let reference = compile(&Backend::Interp, kv.clone());
        assert_eq!(
            32 * reference.cache_block_bytes(),
            ninths * exact.cache_block_bytes(),
            "{format}"
        );
        let cache = reference.new_cache(3);
        assert!(matches!(cache.k, KvValues::Blocks(..)), "{format}");
        assert_eq!(
            cache.k.bytes().len() + cache.v.bytes().len(),
            3 * reference.cache_block_bytes()
        );
        let (want, want_tokens) = run(&reference);
        let drift = max_relative_error(&want, &f32_logits, 0.5, &format.to_string());
        println!("{format} KV cache: max relative logit change {drift:e} from an f32 cache");
        assert!(drift > 0.0, "{format}: the cache was not quantized");
        for backend in &backends {
            let model = compile(backend, kv.clone());
            assert_eq!(model.cache_block_bytes(), reference.cache_block_bytes());
            let (got, tokens) = run(&model);
            let err = max_relative_error(&got, &want, 0.05, &format!("{format} {backend:?}"));
            println!("{format} KV cache on {backend:?}: max relative logit error {err:e}");
            assert_eq!(tokens, want_tokens, "{format} {backend:?}");
        }
    }
}

/// With `quantize-activations`, the matmuls of models in every GGUF block format (q8_0 to
/// q5_1, iq4_nl, the K-quants, iq4_xs, the IQ3, IQ2 and IQ1 formats, the ternary tq1_0 and
/// tq2_0, the binary q1_0 and the 4-bit float mxfp4 and nvfp4) read q8_0 activations:
/// the CPU backend runs them in generated code (integer block sums), the GPU dequantizes
/// them on the device first, both agree with the interpreter on the same IR, and the
/// logits stay close to those of f32 activations.
///
/// The agreement is within 5%, not 1e-4: rounding to q8_0 is a step function, so a
/// last-bit difference upstream (another addition order in an RMS norm or attention) can
/// move a code by one step, 1/127 of its block's largest value, and the random weights of
/// this model carry such steps on through every layer (measured: 0.7% for q8_0 weights,
/// 2.5% for q4_0, 2.7% for q5_0, 1e-6 for q4_1, q5_1 and iq4_nl, 1.5% for q2_k, 3.0% for q3_k,
/// 1e-6 for q4_k, q5_k, iq4_xs and the lattice formats, 2.3-2.6% for q6_k, 1e-6 for the
/// ternary formats, q1_0 and nvfp4, 1.7% for mxfp4 (on the CPU and on lavapipe alike), about the
/// size of the rounding's own effect). The kernels' exactness is
/// checked on identical inputs in `llm-lower/tests/kernels.rs` (`q8_0_activations`).
#[test]
fn q8_0_activations_run_in_generated_code() {
    let path = quantizable_model("activations");
    let passes = "default,quantize-activations";
    let mut backends = vec![Backend::Cpu { threads: 2 }];
    if gpu_available() {
        backends.push(Backend::Gpu(Default::default()));
    }
    for format in [
        QuantFormat::Q8_0,
        QuantFormat::Q4_0,
        QuantFormat::Q4_1,
        QuantFormat::Q5_0,
        QuantFormat::Q5_1,
        QuantFormat::Iq4Nl,
        QuantFormat::Q2K,
        QuantFormat::Q3K,
        QuantFormat::Q4K,
        QuantFormat::Q5K,
        QuantFormat::Q6K,
        QuantFormat::Iq4Xs,
        QuantFormat::Iq3Xxs,
        QuantFormat::Iq3S,
        QuantFormat::Iq2Xxs,
        QuantFormat::Iq2Xs,
        QuantFormat::Iq2S,
        QuantFormat::Iq1S,
        QuantFormat::Iq1M,
        QuantFormat::Tq1_0,
        QuantFormat::Tq2_0,
        QuantFormat::Q1_0,
        QuantFormat::Mxfp4,
        QuantFormat::Nvfp4,
    ] {
        let text = format.to_string();
        let (_, reference) = quantized_logits(&path, &format, &Backend::Interp, passes);
        // The rounding itself: against the same weights with f32 activations.
        let (_, exact) = quantized_logits(&path, &format, &Backend::Interp, "default");
        for backend in &backends {
            let (model, got) = quantized_logits(&path, &format, backend, passes);
            expect_generated_code(&model, backend, &text);
            let max_err = max_relative_error(&got, &reference, 0.05, &text);
            let drift = max_relative_error(&got, &exact, 0.05, &text);
            println!(
                "{text} with q8_0 activations on {backend:?}: {max_err:e} from the interpreter, {drift:e} from f32 activations"
            );
            assert!(drift > 0.0, "{text}: the activations were not quantized");
        }
    }
    std::fs::remove_file(&path).ok();
}

/// A small synthetic llama2.c model whose rows hold 256 values (so every quantized format's
/// blocks fit), written to a temporary file named after `what`.
fn quantizable_model(what: &str) -> PathBuf {
    let mut shape = synth::shape("260K").expect("known shape");
    (
        shape.dim,
        shape.hidden_dim,
        shape.layers,
        shape.heads,
        shape.kv_heads,
    ) = (256, 512, 2, 4, 2);
    let path = std::env::temp_dir().join(format!("llmc-{what}-{}.bin", std::process::id()));
    synth::write(&path, &shape, 7).expect("synthetic model");
    path
}

/// The logits of a 4-token prefill and a decode step of the model at `path` with its
/// matrices quantized to `format`, compiled with `passes` for `backend`.
fn quantized_logits(
    path: &Path,
    format: &QuantFormat,
    backend: &Backend,
    passes: &str,
) -> (Model, Vec<Vec<f32>>) {
    let (config, mut weights) = llama2c::load(path).expect("model loads");
    // 7 per layer and the embedding table.
    assert_eq!(weights.quantize_matrices(format), 7 * 2 + 1, "{format}");
    let model = Model::compile_on(backend, config, weights, passes).expect("compiles");
    let (prefill, cache) = model
        .forward(Step::Prefill, &[1, 403, 407, 261], 0, model.new_cache(1))
        .expect("prefill");
    let (decode, _) = model
        .forward(Step::Decode, &[98], 4, cache)
        .expect("decode");
    (model, prefill.into_iter().chain(decode).collect())
}

/// Checks that no op of `model`'s prefill or decode step takes the reference path on
/// `backend`.
fn expect_generated_code(model: &Model, backend: &Backend, what: &str) {
    for step in [Step::Prefill, Step::Decode] {
        let reference_ops = match backend {
            Backend::Gpu(_) => &model.gpu_lowering(step).expect("stats").reference_ops,
            _ => &model.lowering(step).expect("stats").reference_ops,
        };
        assert!(
            reference_ops.is_empty(),
            "{what} {backend:?} {step:?}: {reference_ops:?}"
        );
    }
}

/// The largest error of `got` against `want` relative to `max(|want|, 1)`, checked to be
/// at most `tolerance`.
fn max_relative_error(got: &[Vec<f32>], want: &[Vec<f32>], tolerance: f32, what: &str) -> f32 {
    let mut max_err = 0f32;
    for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
        let err = (a - b).abs() / b.abs().max(1.0);
        assert!(err <= tolerance, "{what}: {a} vs {b}");
        max_err = max_err.max(err);
    }
    max_err
}
