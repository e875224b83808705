//! The engine on stories260K: batched sequences produce exactly what each produces alone,
//! prefix caching skips shared prompt work, and preemption under a tiny pool still gives the
//! same tokens.

use std::{collections::HashMap, path::Path};

use llm_ir::{
    dtype::DType,
    interp::KvValues,
    types::{KvStorage, QuantFormat},
};
use llm_runtime::{
    engine::{Engine, EngineConfig, Event, RequestParams},
    generate::{Backend, Model, Step},
    llama2c,
    model::BLOCK_SIZE,
    sampler::{Sampler, SamplerConfig},
    synth,
    tokenizer::{BOS, TextCodec, Tokenizer},
};

fn model() -> (Model, Tokenizer) {
    model_on(&Backend::Interp)
}

fn model_on(backend: &Backend) -> (Model, Tokenizer) {
    model_with_kv(backend, DType::F32, "default")
}

/// stories260K through `passes` on `backend`, with a KV cache of `kv` elements.
fn model_with_kv(backend: &Backend, kv: DType, passes: &str) -> (Model, Tokenizer) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models");
    let (config, weights) = llama2c::load(&dir.join("stories260K.bin")).expect("model");
    let tok = Tokenizer::load(&dir.join("tok512.bin"), config.vocab).expect("tokenizer");
    (
        Model::compile_with_kv(backend, config, weights, passes, KvStorage::Float(kv))
            .expect("compiles"),
        tok,
    )
}

const GREEDY: SamplerConfig = SamplerConfig {
    temperature: 0.0,
    top_p: 0.9,
    top_k: 0,
    seed: 1,
};

/// A request of `steps` positions sampled at temperature 1 (top-p 0.9) with `seed`.
fn sampled(steps: usize, seed: u64) -> RequestParams {
    RequestParams {
        steps,
        sampler: SamplerConfig {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 0,
            seed,
        },
        stop_tokens: vec![BOS],
    }
}

fn params(steps: usize) -> RequestParams {
    RequestParams {
        steps,
        sampler: GREEDY,
        stop_tokens: vec![BOS],
    }
}

/// Steps `engine` until it has no work, appending each request's tokens to its entry of
/// `out`.
fn drain(engine: &mut Engine, out: &mut HashMap<u64, Vec<u32>>) {
    while engine.has_work() {
        for event in engine.step().expect("step") {
            if let Event::Token { id, token, .. } = event {
                out.get_mut(&id).expect("known").push(token);
            }
        }
    }
}

/// Runs all `prompts` through one engine; returns each request's tokens (prompt + output).
fn run_engine(
    model: &Model,
    tok: &Tokenizer,
    prompts: &[String],
    steps: usize,
    config: EngineConfig,
) -> (Vec<Vec<u32>>, llm_runtime::engine::EngineStats) {
    let mut engine = Engine::new(model, config);
    let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
    for p in prompts {
        let ids = tok.encode(p, true, false);
        let id = engine.add_request(ids.clone(), params(steps));
        out.insert(id, ids);
    }
    drain(&mut engine, &mut out);
    let stats = engine.stats().clone();
    (
        (0..prompts.len() as u64)
            .map(|i| out.remove(&i).expect("all requests"))
            .collect(),
        stats,
    )
}

/// Forks a greedy request after it has produced a few tokens, while its last block is
/// partly filled: parent and child share that block, the first to write to it copies it
/// (one block copy), and both give the prompt's single-sequence tokens. Forking what does
/// not run is an error.
fn forked_requests_copy_their_shared_block(model: &Model, tok: &Tokenizer) {
    let prompt = "Once upon a time, there was a little girl";
    let alone = model.generate(tok, prompt, 64, GREEDY).expect("single").ids;
    let ids = tok.encode(prompt, true, false);
    let mut engine = Engine::new(model, EngineConfig::default());
    let parent = engine.add_request(ids.clone(), params(64));
    assert!(
        engine.fork(parent, GREEDY).is_err(),
        "a waiting request forks"
    );
    let mut out: HashMap<u64, Vec<u32>> = HashMap::from([(parent, ids)]);
    let mut child = None;
    while engine.has_work() {
        for event in engine.step().expect("step") {
            if let Event::Token { id, token, .. } = event {
                out.get_mut(&id).expect("known").push(token);
            }
        }
        let held = out[&parent].len() - 1;
        if child.is_none() && held > 20 && !held.is_multiple_of(BLOCK_SIZE) {
            let id = engine.fork(parent, GREEDY).expect("forks");
            out.insert(id, out[&parent].clone());
            child = Some(id);
        }
    }
    let child = child.expect("the request ran long enough to fork");
    assert_eq!(engine.stats().block_copies, 1);
    assert_eq!(out[&parent], alone);
    assert_eq!(out[&child], alone);
    assert!(
        engine.fork(child, GREEDY).is_err(),
        "a finished request forks"
    );
}

#[test]
fn forked_requests_share_blocks_until_written() {
    let (model, tok) = model();
    forked_requests_copy_their_shared_block(&model, &tok);
    let (on_cpu, _) = model_on(&Backend::Cpu { threads: 2 });
    forked_requests_copy_their_shared_block(&on_cpu, &tok);
}

/// Parallel sampling: four completions of one prompt (`Engine::add_request_n`) prefill it
/// once and each is what the prompt gives alone with its sampler (seed `7 + k`, sampling
/// at temperature 1); the partly filled last prompt block is copied for three of them
/// (the fourth writes the original). Under a pool too small for all four, preempted
/// completions give the same tokens. A completion cancelled before it starts never runs,
/// and more completions than the engine runs at once is an error.
fn parallel_completions_of(model: &Model, tok: &Tokenizer) {
    let prompt = "Once upon a time, there was a little girl";
    let ids = tok.encode(prompt, true, false);
    assert!(!ids.len().is_multiple_of(BLOCK_SIZE));
    let request = sampled(64, 7);
    let mut engine = Engine::new(model, EngineConfig::default());
    let completions = engine
        .add_request_n(ids.clone(), request.clone(), 5)
        .expect("queues");
    assert!(
        engine.cancel(completions[4]),
        "an unstarted completion cancels"
    );
    let mut out: HashMap<u64, Vec<u32>> = completions.iter().map(|&id| (id, ids.clone())).collect();
    drain(&mut engine, &mut out);
    assert_eq!(engine.stats().prefilled_tokens, ids.len(), "one prefill");
    assert_eq!(engine.stats().block_copies, 3);
    assert_eq!(out[&completions[4]], ids, "the cancelled completion ran");
    for (k, id) in completions[..4].iter().enumerate() {
        let alone = model
            .generate(tok, prompt, 64, sampled(64, 7 + k as u64).sampler)
            .expect("single")
            .ids;
        assert_eq!(out[id], alone, "completion {k}");
    }
    assert_ne!(out[&completions[0]], out[&completions[1]]);
    // Under a pool of 10 blocks the four completions (4 blocks each at the end) preempt
    // one another; each recomputed one goes on as it would have.
    let tight = EngineConfig {
        num_blocks: 10,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, tight);
    let group = engine
        .add_request_n(ids.clone(), request.clone(), 4)
        .expect("queues");
    let mut preempted: HashMap<u64, Vec<u32>> = group.iter().map(|&id| (id, ids.clone())).collect();
    drain(&mut engine, &mut preempted);
    assert!(engine.stats().preemptions > 0);
    for (k, id) in group.iter().enumerate() {
        assert_eq!(
            preempted[id], out[&completions[k]],
            "completion {k}, preempted"
        );
    }
    let small = EngineConfig {
        max_running: 2,
        ..EngineConfig::default()
    };
    let err = Engine::new(model, small)
        .add_request_n(ids, request, 3)
        .expect_err("too many completions");
    assert!(
        err.contains("3 completions of a prompt run together"),
        "{err}"
    );
}

/// Cancelling the first completion of a group (the request that prefills the prompt for
/// all of them) leaves the others to run as they would have: while the group waits, and
/// while its prompt is half prefilled; cancelling every completion of a half-prefilled
/// group ends it.
#[test]
fn cancelling_one_completion_leaves_the_others() {
    let (model, tok) = model();
    let prompt = "Once upon a time, there was a little girl";
    let ids = tok.encode(prompt, true, false);
    let request = sampled(48, 3);
    let alone = |k: u64| {
        model
            .generate(&tok, prompt, 48, sampled(48, 3 + k).sampler)
            .expect("single")
            .ids
    };
    // Cancelled before the first step, or after the first of the prompt's chunks of 4.
    for steps_before in [0, 1] {
        let config = EngineConfig {
            max_step_tokens: 4,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(&model, config);
        let group = engine
            .add_request_n(ids.clone(), request.clone(), 3)
            .expect("queues");
        let mut out: HashMap<u64, Vec<u32>> = group.iter().map(|&id| (id, ids.clone())).collect();
        for _ in 0..steps_before {
            assert!(engine.step().expect("step").is_empty(), "still prefilling");
        }
        assert!(engine.cancel(group[0]));
        assert!(!engine.cancel(group[0]), "cancelled twice");
        drain(&mut engine, &mut out);
        assert_eq!(out[&group[0]], ids, "the cancelled completion ran");
        assert_eq!(out[&group[1]], alone(1), "after {steps_before} steps");
        assert_eq!(out[&group[2]], alone(2), "after {steps_before} steps");
        assert_eq!(engine.stats().prefilled_tokens, ids.len());
    }
    let mut engine = Engine::new(
        &model,
        EngineConfig {
            max_step_tokens: 4,
            ..EngineConfig::default()
        },
    );
    let group = engine.add_request_n(ids, request, 3).expect("queues");
    engine.step().expect("step");
    for id in group {
        assert!(engine.cancel(id));
    }
    assert!(!engine.has_work(), "a group with no completion left ends");
}

#[test]
fn parallel_completions_prefill_their_prompt_once() {
    let (model, tok) = model();
    parallel_completions_of(&model, &tok);
    let (on_cpu, _) = model_on(&Backend::Cpu { threads: 2 });
    parallel_completions_of(&on_cpu, &tok);
}

fn prompts(n: usize) -> Vec<String> {
    let starts = [
        "Once upon a time",
        "The little dog was sad because",
        "Lily and Ben",
        "One day, a big bear",
        "Tom had a red ball",
    ];
    (0..n)
        .map(|i| {
            format!(
                "{} {}",
                starts[i % starts.len()],
                ["", "and", "the", "a"][i / starts.len() % 4]
            )
            .trim()
            .to_string()
        })
        .collect()
}

#[test]
fn batched_sequences_equal_their_single_sequence_outputs() {
    batched_equals_single(&Backend::Interp);
}

/// The same on the CPU backend: its kernels compute each row of a batch alone, so batching
/// (and the thread split) changes no bit of any sequence's logits.
#[test]
fn batched_sequences_equal_their_single_sequence_outputs_on_the_cpu_backend() {
    batched_equals_single(&Backend::Cpu { threads: 2 });
}

/// The same on the GPU backend (its shaders also compute each row alone), with the KV
/// cache in device memory.
#[test]
fn batched_sequences_equal_their_single_sequence_outputs_on_the_gpu_backend() {
    if llm_lower::gpu::test_device(&Default::default()).is_some() {
        batched_equals_single(&Backend::Gpu(Default::default()));
    }
}

/// A model whose matrices are 16-bit (the `f16` storage format) batches as an `f32` one
/// does: the CPU backend's 16-bit row kernel computes each row of a batch alone.
#[test]
fn batched_sequences_with_sixteen_bit_weights_equal_their_single_sequence_outputs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models");
    let (config, mut weights) = llama2c::load(&dir.join("stories260K.bin")).expect("model");
    assert_eq!(weights.quantize_matrices(&QuantFormat::F16), 36);
    let tok = Tokenizer::load(&dir.join("tok512.bin"), config.vocab).expect("tokenizer");
    let cpu = Backend::Cpu { threads: 2 };
    let model = Model::compile_with_kv(
        &cpu,
        config,
        weights,
        "default",
        KvStorage::Float(DType::F32),
    )
    .expect("compiles");
    batched_equals_single_with(&model, &tok, 32);
}

/// A mixture of experts (stories260K's feed-forward blocks replaced by four experts of
/// half the width, two a token: `synth::with_experts`) batches as a dense model does, on
/// the CPU (which gathers the rows each expert is chosen for and multiplies them
/// together) and on the GPU: the expert kernels compute each slot's row alone.
#[test]
fn batched_mixtures_of_experts_equal_their_single_sequence_outputs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models");
    let (dense_config, dense_weights) = llama2c::load(&dir.join("stories260K.bin")).expect("model");
    let (config, weights) = synth::with_experts(&dense_config, &dense_weights, (4, 2), 5);
    let tok = Tokenizer::load(&dir.join("tok512.bin"), config.vocab).expect("tokenizer");
    let mut backends = vec![Backend::Cpu { threads: 2 }];
    if llm_lower::gpu::test_device(&Default::default()).is_some() {
        backends.push(Backend::Gpu(Default::default()));
    }
    for backend in &backends {
        let model = Model::compile_with_kv(
            backend,
            config.clone(),
            weights.clone(),
            "default",
            KvStorage::Float(DType::F32),
        )
        .expect("compiles");
        batched_equals_single_with(&model, &tok, 16);
    }
    // The experts decide the tokens: the dense model writes another text.
    let compile = |config, weights| {
        Model::compile_on(&Backend::Cpu { threads: 2 }, config, weights, "default")
    };
    let text = |model: Model| {
        model
            .generate(&tok, "Once upon a time", 32, GREEDY)
            .expect("runs")
            .ids
    };
    let dense = compile(dense_config, dense_weights).expect("compiles");
    assert_ne!(
        text(compile(config, weights).expect("compiles")),
        text(dense)
    );
}

fn batched_equals_single(backend: &Backend) {
    let (model, tok) = model_on(backend);
    batched_equals_single_with(&model, &tok, 32);
}

fn batched_equals_single_with(model: &Model, tok: &Tokenizer, n: usize) {
    let prompts = prompts(n);
    let (batched, stats) = run_engine(model, tok, &prompts, 64, EngineConfig::default());
    for (p, ids) in prompts.iter().zip(&batched) {
        let alone = model.generate(tok, p, 64, GREEDY).expect("single");
        assert_eq!(ids, &alone.ids, "prompt {p:?}");
    }
    assert_eq!(stats.preemptions, 0);
}

/// A step prefills at most `max_step_tokens` prompt positions: with a budget of 3, the
/// prompts go through `@prefill` in chunks over several steps while the others decode,
/// and every sequence still gives its single-sequence output.
#[test]
fn long_prompts_are_prefilled_in_chunks() {
    let cpu = Backend::Cpu { threads: 2 };
    for backend in [Backend::Interp, cpu] {
        let (model, tok) = model_on(&backend);
        let prompts = prompts(6);
        let prompt_tokens: usize = prompts
            .iter()
            .map(|p| tok.encode(p, true, false).len())
            .sum();
        let config = EngineConfig {
            max_step_tokens: 3,
            ..EngineConfig::default()
        };
        let (served, stats) = run_engine(&model, &tok, &prompts, 40, config);
        for (p, ids) in prompts.iter().zip(&served) {
            assert_eq!(
                ids,
                &model.generate(&tok, p, 40, GREEDY).expect("single").ids,
                "{p:?}"
            );
        }
        assert_eq!(stats.prefilled_tokens, prompt_tokens);
        assert!(
            stats.prefill_calls >= prompt_tokens.div_ceil(3),
            "{} calls for {prompt_tokens} prompt tokens",
            stats.prefill_calls
        );
    }
}

/// A prompt cancelled half prefilled leaves only the blocks it wrote in the prefix
/// cache: the same prompt again reuses its first, fully written block (16 positions),
/// not the second, of which 4 positions were written, and gives its single-sequence
/// tokens.
#[test]
fn a_cancelled_prefill_caches_only_what_it_wrote() {
    let (model, tok) = model_on(&Backend::Cpu { threads: 2 });
    let prompt = "Once upon a time, there was a little girl named Lily. She loved to play \
        outside in the sun with her friends and her dog.";
    let ids = tok.encode(prompt, true, false);
    assert!(ids.len() > 32, "{} tokens", ids.len());
    let config = EngineConfig {
        max_step_tokens: 20,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(&model, config);
    let first = engine.add_request(ids.clone(), params(64));
    engine.step().expect("step");
    assert!(engine.cancel(first));
    assert!(!engine.has_work());
    let second = engine.add_request(ids.clone(), params(64));
    let mut out = ids;
    while engine.has_work() {
        for event in engine.step().expect("step") {
            if let Event::Token { id, token, .. } = event {
                assert_eq!(id, second);
                out.push(token);
            }
        }
    }
    assert_eq!(engine.stats().cached_prompt_tokens, 16);
    assert_eq!(
        out,
        model
            .generate(&tok, prompt, 64, GREEDY)
            .expect("single")
            .ids
    );
}

/// Under a sliding window the engine releases the blocks that slid out of every later
/// query's window, and `Model::generate` writes its positions into a ring of blocks: the
/// two mechanisms give each sequence the same tokens. Three sequences of up to 200
/// positions (10 to 13 blocks of 16 each) run in a pool of 15 blocks without a
/// preemption, each holding at most 5 (the window of 40 spans 4 blocks, and a new one
/// opens before the oldest is released), so released blocks are handed out again and
/// rewritten while the others read theirs; a sequence alone runs in a ring of 3 or 4
/// blocks (its prompt and the 39 positions before each query, rounded up to blocks)
/// instead of 13.
#[test]
fn sliding_windows_release_the_blocks_they_no_longer_read() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models");
    let (mut config, weights) = llama2c::load(&dir.join("stories260K.bin")).expect("model");
    let tok = Tokenizer::load(&dir.join("tok512.bin"), config.vocab).expect("tokenizer");
    config.sliding_window = Some(40);
    let model = Model::compile_with_kv(
        &Backend::Cpu { threads: 2 },
        config,
        weights,
        "default",
        KvStorage::Float(DType::F32),
    )
    .expect("compiles");
    let prompts = prompts(3);
    let config = EngineConfig {
        num_blocks: 15,
        ..EngineConfig::default()
    };
    let (served, stats) = run_engine(&model, &tok, &prompts, 200, config);
    for (p, ids) in prompts.iter().zip(&served) {
        let alone = model.generate(&tok, p, 200, GREEDY).expect("single");
        assert_eq!(ids, &alone.ids, "prompt {p:?}");
        assert!(ids.len() > 100, "prompt {p:?} outruns the window");
        assert!(
            alone.stats.kv_blocks <= 4,
            "prompt {p:?}: {}",
            alone.stats.kv_blocks
        );
    }
    assert_eq!(stats.preemptions, 0);
    assert!(
        stats.peak_blocks <= 3 * 5,
        "{} blocks at the peak",
        stats.peak_blocks
    );
}

/// f16 and bf16 KV caches: the pool takes half an f32 pool's bytes (and `plan-kv-memory`
/// fits twice the blocks in a budget, rounded down), batched sequences still equal their single runs on
/// the CPU backend, and the CPU's greedy tokens over an f16 cache are the interpreter's.
#[test]
fn sixteen_bit_kv_caches_take_half_the_memory() {
    let cpu = Backend::Cpu { threads: 2 };
    let (f32_model, tok) = model_on(&cpu);
    for kv in [DType::F16, DType::BF16] {
        let (model, _) = model_with_kv(&cpu, kv, "default");
        assert_eq!(2 * model.cache_block_bytes(), f32_model.cache_block_bytes());
        let cache = model.new_cache(4);
        assert_eq!(
            cache.k.bytes().len() + cache.v.bytes().len(),
            4 * model.cache_block_bytes()
        );
        batched_equals_single_with(&model, &tok, 8);
        let (planned, _) = model_with_kv(
            &Backend::Interp,
            kv,
            "default,plan-kv-memory{budget=256KiB}",
        );
        // 256 KiB holds 25 blocks of 10 KiB (and 12 of f32's 20 KiB).
        assert_eq!(planned.cache_blocks(1024), 25, "{kv}");
    }
    let (on_cpu, _) = model_with_kv(&cpu, DType::F16, "default");
    let (reference, _) = model_with_kv(&Backend::Interp, DType::F16, "default");
    let prompts = prompts(4);
    let config = EngineConfig::default;
    assert_eq!(
        run_engine(&on_cpu, &tok, &prompts, 64, config()).0,
        run_engine(&reference, &tok, &prompts, 64, config()).0
    );
}

/// f16 and bf16 KV caches on the GPU: the device pool takes the host pool's bytes, the
/// GPU's greedy tokens over it are the interpreter's, and prefix sharing (copy-on-write
/// of 16-bit blocks on the device) keeps every output.
#[test]
fn sixteen_bit_kv_caches_on_the_gpu_backend() {
    if llm_lower::gpu::test_device(&Default::default()).is_none() {
        return;
    }
    let gpu = Backend::Gpu(Default::default());
    let prompts = prompts(4);
    for kv in [DType::F16, DType::BF16] {
        let (on_gpu, tok) = model_with_kv(&gpu, kv, "default");
        let (reference, _) = model_with_kv(&Backend::Interp, kv, "default");
        assert_eq!(on_gpu.cache_block_bytes(), reference.cache_block_bytes());
        let config = EngineConfig::default;
        assert_eq!(
            run_engine(&on_gpu, &tok, &prompts, 64, config()).0,
            run_engine(&reference, &tok, &prompts, 64, config()).0,
            "{kv}"
        );
    }
    shared_prefixes(model_with_kv(&gpu, DType::F16, "default"));
}

/// A q8_0 KV cache (its blocks' bytes in the pool) under the engine, on a synthetic model
/// of stories260K's vocabulary with heads of 64 (stories260K's heads of 8 fill no block):
/// batched sequences equal their single runs, shared prefixes keep every output, a block
/// copy (copy-on-write, on the device where there is a GPU) moves a block's bytes, and a
/// forked request's copy-on-write keeps its tokens, on the CPU and GPU backends.
#[test]
fn q8_0_kv_caches_batch_share_prefixes_and_copy_blocks() {
    let mut shape = synth::shape("260K").expect("known shape");
    (shape.dim, shape.hidden_dim, shape.heads, shape.kv_heads) = (128, 256, 2, 1);
    let path = std::env::temp_dir().join(format!("llmc-q8-kv-{}.bin", std::process::id()));
    synth::write(&path, &shape, 11).expect("synthetic model");
    let (config, weights) = llama2c::load(&path).expect("model");
    std::fs::remove_file(&path).ok();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models");
    let tok = Tokenizer::load(&dir.join("tok512.bin"), config.vocab).expect("tokenizer");
    let kv = KvStorage::Quantized(QuantFormat::Q8_0);
    let mut backends = vec![Backend::Cpu { threads: 2 }];
    if llm_lower::gpu::test_device(&Default::default()).is_some() {
        backends.push(Backend::Gpu(Default::default()));
    }
    for backend in backends {
        let model = Model::compile_with_kv(
            &backend,
            config.clone(),
            weights.clone(),
            "default",
            kv.clone(),
        )
        .expect("compiles");
        assert_eq!(model.kv_storage(), &kv);
        let tokens: Vec<u32> = (0..20).map(|i| 1 + i * 23 % 500).collect();
        let (_, mut cache) = model
            .forward(Step::Prefill, &tokens, 0, model.new_cache(4))
            .expect("prefill");
        model.copy_block(&mut cache, 0, 3).expect("copy");
        let cache = llm_lower::gpu::read_cache(&cache).expect("read back");
        assert!(matches!(cache.k, KvValues::Blocks(..)));
        // Per layer, 4 blocks of 16 positions of 64 values: 32 q8_0 blocks of 36 bytes each.
        let block = 16 * 64 / 32 * 36;
        for data in [&cache.k, &cache.v] {
            let layers = data.bytes().chunks_exact(4 * block);
            assert_eq!(layers.len(), config.layers);
            for (l, layer) in layers.enumerate() {
                assert_eq!(layer[..block], layer[3 * block..], "{backend:?} layer {l}");
                assert!(layer[..block].iter().any(|&b| b != 0));
            }
        }
        batched_equals_single_with(&model, &tok, 8);
        forked_requests_copy_their_shared_block(&model, &tok);
        shared_prefixes((model, tok.clone()));
    }
}

/// The continuation of `prompt` by `model` alone, sampled by `sampler` as the engine
/// samples a request of `steps` positions (a token from each, the last position's
/// included): one sequence, prefilled in one call, then decoded a token at a time.
fn sampled_alone(model: &Model, prompt: &[u32], steps: usize, sampler: SamplerConfig) -> Vec<u32> {
    let mut sampler = Sampler::new(sampler);
    let cache = model.new_cache(model.sequence_blocks(steps, prompt.len()));
    let (mut rows, mut cache) = model
        .forward(Step::Prefill, prompt, 0, cache)
        .expect("prefill");
    let mut tokens = prompt.to_vec();
    loop {
        let next = sampler.sample(rows.last().expect("a row")) as u32;
        tokens.push(next);
        if tokens.len() > steps {
            return tokens;
        }
        (rows, cache) = model
            .forward(Step::Decode, &[next], tokens.len() - 1, cache)
            .expect("decode");
    }
}

/// Gemma 3's local layers in the engine (`tests/data/gemma3-tiny`: five of its six layers
/// see the last 6 positions, the sixth all): eight prompts of 3 to 33 tokens, two sharing
/// a 16-token block, prefilled at most 8 tokens a step (so chunks cross the window),
/// sampled (temperature 4, seeded: this random model's likeliest token is the last one,
/// by far) to
/// 48 positions: each request gives what the model gives its prompt alone, on the
/// reference semantics, the CPU and the GPU (where there is a device), and the shared
/// block is prefilled once.
#[test]
fn gemma3_local_layers_batch_as_single_sequences() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/gemma3-tiny");
    let loaded = llm_runtime::model_file::load(&dir).expect("the Gemma 3 checkpoint loads");
    let shared: Vec<u32> = (0..16).map(|j| 3 + (j * 11 + 5) % 250).collect();
    let mut prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| {
            (0..3 + 6 * i)
                .map(|j| 3 + (7 + 13 * j + 31 * i) % 250)
                .collect()
        })
        .collect();
    prompts.push([shared.as_slice(), &[40, 41, 42]].concat());
    prompts.push([shared.as_slice(), &[50, 51]].concat());
    let mut backends = vec![Backend::Interp, Backend::Cpu { threads: 2 }];
    if llm_lower::gpu::test_device(&Default::default()).is_some() {
        backends.push(Backend::Gpu(Default::default()));
    }
    for backend in backends {
        let model = Model::compile_on(
            &backend,
            loaded.config.clone(),
            loaded.weights.clone(),
            "default",
        )
        .expect("compiles");
        let config = EngineConfig {
            num_blocks: 64,
            max_step_tokens: 8,
            max_running: 8,
        };
        let mut engine = Engine::new(&model, config);
        let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
        let sampler = |i: usize| SamplerConfig {
            temperature: 4.0,
            top_p: 1.0,
            top_k: 0,
            seed: 100 + i as u64,
        };
        for (i, prompt) in prompts.iter().enumerate() {
            let params = RequestParams {
                steps: 48,
                sampler: sampler(i),
                stop_tokens: Vec::new(),
            };
            out.insert(engine.add_request(prompt.clone(), params), prompt.clone());
        }
        drain(&mut engine, &mut out);
        for (i, prompt) in prompts.iter().enumerate() {
            let alone = sampled_alone(&model, prompt, 48, sampler(i));
            assert_eq!(out[&(i as u64)], alone, "{backend:?}, prompt {i}");
        }
        assert_eq!(engine.stats().cached_prompt_tokens, 16, "{backend:?}");
    }
}

#[test]
fn preemption_under_a_small_pool_keeps_outputs() {
    let (model, tok) = model();
    let prompts = prompts(8);
    let small = EngineConfig {
        num_blocks: 12,
        max_step_tokens: 64,
        max_running: 8,
    };
    let (tight, stats) = run_engine(&model, &tok, &prompts, 64, small);
    let (roomy, _) = run_engine(&model, &tok, &prompts, 64, EngineConfig::default());
    assert_eq!(tight, roomy);
    assert!(
        stats.preemptions > 0,
        "the small pool should force preemptions"
    );
}

#[test]
fn shared_prompt_prefixes_are_prefilled_once() {
    shared_prefixes(model());
}

/// The same with the pool in device memory.
#[test]
fn shared_prompt_prefixes_are_prefilled_once_on_the_gpu_backend() {
    if llm_lower::gpu::test_device(&Default::default()).is_some() {
        shared_prefixes(model_on(&Backend::Gpu(Default::default())));
    }
}

fn shared_prefixes((model, tok): (Model, Tokenizer)) {
    // 16 requests sharing a long prefix, each with its own ending.
    let prefix = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball.";
    let prompts: Vec<String> = (0..16)
        .map(|i| format!("{prefix} {}", ["Tom", "Ben", "Sue", "Max"][i % 4]))
        .collect();
    let config = EngineConfig {
        max_running: 1,
        ..EngineConfig::default()
    };
    let (outputs, stats) = run_engine(&model, &tok, &prompts, 48, config);
    assert!(
        stats.cached_prompt_tokens >= 15 * 32,
        "cached {} prompt positions",
        stats.cached_prompt_tokens
    );
    for (p, ids) in prompts.iter().zip(&outputs).take(4) {
        assert_eq!(
            ids,
            &model.generate(&tok, p, 48, GREEDY).expect("single").ids
        );
    }
    // Request `i` repeats request `i % 4`'s prompt, whose full blocks it takes from the
    // prefix cache.
    for (i, ids) in outputs.iter().enumerate().skip(4) {
        assert_eq!(ids, &outputs[i % 4], "request {i}");
    }
}

#[test]
fn generation_ends_at_any_stop_token() {
    let (model, tok) = model();
    let prompt = "Once upon a time";
    let full = model.generate(&tok, prompt, 64, GREEDY).expect("runs");
    let prompt_len = full.prompt_ids.len();
    // Make the third generated token a stop token: both paths end just before it.
    let stop = full.ids[prompt_len + 2];
    let kept = &full.ids[..prompt_len + 2];
    let stopping = tok.clone().with_stop_tokens(vec![BOS, stop]);
    let short = model.generate(&stopping, prompt, 64, GREEDY).expect("runs");
    assert!(short.stopped && !full.stopped);
    assert_eq!(short.ids, kept);
    let mut engine = Engine::new(&model, EngineConfig::default());
    let ids = tok.encode(prompt, true, false);
    let mut out = ids.clone();
    engine.add_request(
        ids,
        RequestParams {
            stop_tokens: stopping.stop_tokens(),
            ..params(64)
        },
    );
    while engine.has_work() {
        for event in engine.step().expect("step") {
            if let Event::Token { token, .. } = event {
                out.push(token);
            }
        }
    }
    assert_eq!(out, kept);
}

/// `plan-kv-memory` sizes the engine's pool: under a 256 KiB budget stories260K's blocks
/// of 16 positions (5 layers x k, v x 4 heads x 8 floats: 20,480 bytes) come to 12, the
/// engine runs in them (preempting as it must) and gives the same tokens as a roomy pool; a
/// plan with another block size than the runtime's is refused.
#[test]
fn plan_kv_memory_sizes_the_pool() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models");
    let load = || llama2c::load(&dir.join("stories260K.bin")).expect("model");
    let (config, weights) = load();
    let tok = Tokenizer::load(&dir.join("tok512.bin"), config.vocab).expect("tokenizer");
    let planned = Model::compile_on(
        &Backend::Interp,
        config,
        weights,
        "default,plan-kv-memory{budget=256KiB}",
    )
    .expect("compiles");
    assert_eq!(planned.cache_blocks(1024), 12);
    let prompts = prompts(6);
    let (tight, stats) = run_engine(&planned, &tok, &prompts, 40, EngineConfig::default());
    let (model, _) = model();
    let (roomy, _) = run_engine(&model, &tok, &prompts, 40, EngineConfig::default());
    assert_eq!(tight, roomy);
    assert!(stats.peak_blocks <= 12, "{stats:?}");
    let (config, weights) = load();
    let err = Model::compile_on(
        &Backend::Interp,
        config,
        weights,
        "default,plan-kv-memory{block-size=32}",
    )
    .err()
    .expect("a block size the runtime does not use is refused");
    assert!(err.contains("32 positions"), "{err}");
}
