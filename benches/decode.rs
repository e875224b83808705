//! Decode and prefill speed of the CPU backend against the plain-Rust baseline (and the
//! reference interpreter), all measured in the same run, and a memory-read bandwidth probe
//! to read decode speed against (the roof of a memory-bound decode is bandwidth / bytes of
//! weights read per token).
//!
//! Models: the real stories260K and synthetic 15M- and 110M-shaped llama2.c models written
//! by `llm_runtime::synth` (seeded), with f32 matrices and converted to q8_0, q4_0 and
//! f16 (16-bit weights as a GGUF F16 or Hugging Face float16 model keeps them). Each
//! decode iteration runs 32 positions greedily (`decode-256` runs whole 256-position
//! stories260K sequences, where attention over long contexts counts); the prefill
//! iteration runs one 128-token prompt through `@prefill` and is reported in multiply-adds
//! x 2 per second (criterion's "elements" are FLOPs there).
//! `batched-decode` times one decode call of 1 and of 32 stories260K sequences over 256
//! positions of context each, with f32 and f16 KV caches (elements: tokens);
//! `kv-storage` and `softcap` one decode call of 8 110M-shaped sequences over 512
//! positions each, the first with the cache in f32, f16, q8_0, q4_0 and q4_1 (and, as
//! heads of 256, the K-quants), the second with
//! and without Gemma 2's soft-capped attention scores. `gguf-types` decodes the 110M shape
//! with its matrices in each GGUF block format, compiled as `llm-run` compiles them and
//! with f32 activations (`-f32-x`: `--passes default`, no integer dot products).
//! `experts` times one decode call of 1 and of 8 110M-shaped sequences over 64 positions
//! (q8_0 weights) for the dense model and for its mixture-of-experts variant
//! (`synth::with_experts`: 8 experts of half the width a layer, 2 a token, so each token
//! runs the dense model's multiply-adds): what routing costs.
//!
//! Set `LLMC_BENCH_MODELS` to a comma-separated subset of `260K,15M,110M` to run fewer, and
//! `LLMC_BENCH_GPU=1` on a machine with a GPU to add the GPU backend's rows and the
//! device's memory-read probe (`memory-read/gpu-read`).

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented functions"
)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use llm_ir::{
    dtype::DType,
    types::{KvStorage, QuantFormat},
};
use llm_runtime::{
    baseline::Baseline,
    generate::{Backend, Model, Step},
    llama2c,
    model::ModelConfig,
    sampler::{SamplerConfig, argmax},
    synth,
    tokenizer::Tokenizer,
    weights::Weights,
};

const POSITIONS: usize = 32;
const PREFILL: usize = 128;

/// The benchmarked models: name, file, and whether the interpreter is fast enough to run.
fn models() -> Vec<(String, std::path::PathBuf, bool)> {
    let wanted = std::env::var("LLMC_BENCH_MODELS").unwrap_or_else(|_| "260K,15M,110M".into());
    let mut out = Vec::new();
    for name in wanted.split(',').map(str::trim) {
        let path = if name == "260K" {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/models/stories260K.bin")
        } else {
            let path = std::env::temp_dir().join(format!("llmc-bench-{name}.bin"));
            if !path.exists() {
                let shape = synth::shape(name).expect("a known shape");
                synth::write(&path, &shape, 1).expect("synthetic model");
            }
            path
        };
        out.push((format!("stories{name}"), path, name != "110M"));
    }
    out
}

fn greedy() -> SamplerConfig {
    SamplerConfig {
        temperature: 0.0,
        top_p: 0.9,
        top_k: 0,
        seed: 1,
    }
}

/// A tokenizer of `vocab` placeholder tokens with no stop tokens, so every iteration runs
/// all positions.
fn tokenizer(vocab: usize) -> Tokenizer {
    let tokens = (0..vocab).map(|i| format!("t{i}").into_bytes()).collect();
    Tokenizer::from_vocab(tokens, vec![0.0; vocab]).with_stop_tokens(Vec::new())
}

/// The backends benchmarked: label, backend, quantization of the weights. The GPU rows
/// run with `LLMC_BENCH_GPU=1` (on a machine with a GPU: a software adapter's timings
/// mean nothing).
fn backends() -> Vec<(String, Backend, Option<QuantFormat>)> {
    let mut out = vec![
        ("cpu-1t".into(), Backend::Cpu { threads: 1 }, None),
        ("cpu-2t".into(), Backend::Cpu { threads: 2 }, None),
    ];
    if std::env::var_os("LLMC_BENCH_GPU").is_some() {
        let gpu = Backend::Gpu(Default::default());
        out.push(("gpu".into(), gpu.clone(), None));
        out.push(("gpu-q8_0".into(), gpu.clone(), Some(QuantFormat::Q8_0)));
        out.push(("gpu-q4_0".into(), gpu, Some(QuantFormat::Q4_0)));
    }
    for (name, format) in [
        ("q8_0", QuantFormat::Q8_0),
        ("q4_0", QuantFormat::Q4_0),
        ("f16", QuantFormat::F16),
    ] {
        for threads in [1, 2] {
            out.push((
                format!("cpu-{threads}t-{name}"),
                Backend::Cpu { threads },
                Some(format.clone()),
            ));
        }
    }
    out
}

/// `config` over `weights` (their matrices quantized to `q`, if any) compiled with the
/// `default` pipeline for `backend`.
fn compile(
    config: &ModelConfig,
    weights: &Weights,
    backend: &Backend,
    q: Option<&QuantFormat>,
) -> Model {
    compile_with(
        config,
        weights,
        backend,
        q,
        ("default", &KvStorage::Float(DType::F32)),
    )
}

/// [`compile`] with the pass pipeline and the KV cache's storage given.
fn compile_with(
    config: &ModelConfig,
    weights: &Weights,
    backend: &Backend,
    q: Option<&QuantFormat>,
    (passes, kv): (&str, &KvStorage),
) -> Model {
    let mut weights = weights.clone();
    if let Some(format) = q {
        weights.quantize_matrices(format);
    }
    Model::compile_with_kv(backend, config.clone(), weights, passes, kv.clone()).expect("compiles")
}

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// Benchmarks the baseline decoding `positions` greedy positions from BOS.
fn bench_baseline(group: &mut Group, name: &str, baseline: &mut Baseline, positions: usize) {
    group.bench_function(BenchmarkId::new("baseline", name), |b| {
        b.iter(|| {
            let mut token = 1;
            for pos in 0..positions {
                token = argmax(&baseline.forward(token, pos)) as u32;
            }
            token
        })
    });
}

/// Benchmarks `model` generating `positions` greedy positions from the empty prompt.
fn bench_generate(
    group: &mut Group,
    id: BenchmarkId,
    model: &Model,
    tokenizer: &Tokenizer,
    positions: usize,
) {
    group.bench_function(id, |b| {
        b.iter(|| {
            let g = model
                .generate(tokenizer, "", positions, greedy())
                .expect("runs");
            assert_eq!(g.logits.len(), positions, "ran every position");
            g
        })
    });
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    group.throughput(Throughput::Elements(POSITIONS as u64));
    for (name, path, interpreted) in models() {
        let (config, weights) = llama2c::load(&path).expect("model");
        let mut baseline = Baseline::new(&config, &weights).expect("baseline");
        bench_baseline(&mut group, &name, &mut baseline, POSITIONS);
        drop(baseline);
        let tokenizer = tokenizer(config.vocab);
        let mut runs = backends();
        if interpreted {
            runs.insert(0, ("interpreter".into(), Backend::Interp, None));
        }
        for (label, backend, q) in runs {
            let model = compile(&config, &weights, &backend, q.as_ref());
            let id = BenchmarkId::new(label, &name);
            bench_generate(&mut group, id, &model, &tokenizer, POSITIONS);
        }
    }
    group.finish();
}

/// Decode of a whole 256-position stories260K sequence (run.c's default length, at which
/// llama2.c's reference numbers are taken): attention over long contexts counts here.
fn bench_decode_long(c: &mut Criterion) {
    let Some((name, path, _)) = models().into_iter().find(|(n, _, _)| n == "stories260K") else {
        return;
    };
    const LONG: usize = 256;
    let (config, weights) = llama2c::load(&path).expect("model");
    let mut group = c.benchmark_group("decode-256");
    group.sample_size(10);
    group.throughput(Throughput::Elements(LONG as u64));
    let mut baseline = Baseline::new(&config, &weights).expect("baseline");
    bench_baseline(&mut group, &name, &mut baseline, LONG);
    let tokenizer = tokenizer(config.vocab);
    for threads in [1, 2] {
        let model = compile(&config, &weights, &Backend::Cpu { threads }, None);
        let id = BenchmarkId::new(format!("cpu-{threads}t"), &name);
        bench_generate(&mut group, id, &model, &tokenizer, LONG);
    }
    group.finish();
}

/// One `@decode` call of 1 and of 32 stories260K sequences, each over 256 positions of
/// context, on one and two threads, with f32 and f16 KV caches: what batching gains per
/// token where the matrices' weights are read once for every row but each sequence's
/// attention reads its own KV blocks (the batching target's ratio, without the engine's
/// scheduling and sampling).
fn bench_batched_decode(c: &mut Criterion) {
    let Some((name, path, _)) = models().into_iter().find(|(n, _, _)| n == "stories260K") else {
        return;
    };
    let (config, weights) = llama2c::load(&path).expect("model");
    let mut group = c.benchmark_group("batched-decode");
    group.sample_size(20);
    for (threads, kv) in [1, 2]
        .into_iter()
        .flat_map(|t| [(t, DType::F32), (t, DType::F16)])
    {
        let backend = Backend::Cpu { threads };
        let kv = KvStorage::Float(kv);
        let model = compile_with(&config, &weights, &backend, None, ("default", &kv));
        for batch in [1, 32] {
            let id = BenchmarkId::new(
                format!("cpu-{threads}t-kv-{kv}"),
                format!("{name}-x{batch}"),
            );
            bench_decode_call(&mut group, id, &model, batch, 256);
        }
    }
    group.finish();
}

/// Greedy decoding of 32 positions of the 110M shape on two threads with its matrices in
/// each GGUF block format, compiled as `llm-run` compiles for the CPU (`default,
/// quantize-activations`: every format meets q8_0 activations as integers) and with f32
/// activations (`default`: the weights' runs decoded into f32 lanes): what a file of each
/// type costs per token, and what the integer kernels gain.
fn bench_gguf_types(c: &mut Criterion) {
    let Some((name, path, _)) = models().into_iter().find(|(n, _, _)| n == "stories110M") else {
        return;
    };
    let (config, weights) = llama2c::load(&path).expect("model");
    let tokenizer = tokenizer(config.vocab);
    let mut group = c.benchmark_group("gguf-types");
    group.sample_size(10);
    group.throughput(Throughput::Elements(POSITIONS as u64));
    let backend = Backend::Cpu { threads: 2 };
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
        // As `llm-run` compiles it, and with f32 activations (`--passes default`): what
        // the integer kernels gain, measured in the same run.
        for (passes, suffix) in [("default,quantize-activations", ""), ("default", "-f32-x")] {
            let pipeline = (passes, &KvStorage::Float(DType::F32));
            let model = compile_with(&config, &weights, &backend, Some(&format), pipeline);
            let id = BenchmarkId::new(format!("cpu-2t-{format}{suffix}"), &name);
            bench_generate(&mut group, id, &model, &tokenizer, POSITIONS);
        }
    }
    group.finish();
}

/// One `@decode` call of 8 sequences of the 110M shape (heads of 64), each over 512
/// positions of context, on two threads, with the KV cache in f32, f16, q8_0, q4_0 and
/// q4_1: what each storage costs or saves where attention streams every sequence's keys
/// and values (12 layers of 512 positions of 768 keys and 768 values a sequence: 37.7 MiB
/// in f32, 18.9 in f16, 10.6 in q8_0, 5.9 in q4_0 and q4_1); then the same weights as
/// three heads of 256 with the cache in f32, f16 and the K-quants q4_k, q6_k and q2_k
/// (5.1, 7.5 and 3.0 MiB a sequence).
fn bench_kv_storage(c: &mut Criterion) {
    let Some((name, path, _)) = models().into_iter().find(|(n, _, _)| n == "stories110M") else {
        return;
    };
    let (config, weights) = llama2c::load(&path).expect("model");
    let mut group = c.benchmark_group("kv-storage");
    group.sample_size(10);
    let quantized = KvStorage::Quantized;
    let f32_f16 = [KvStorage::Float(DType::F32), KvStorage::Float(DType::F16)];
    let heads_64 = [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1].map(quantized);
    // The same weights as three heads of 256 (Gemma's width), which the K-quants' blocks fill.
    let heads_256 = ModelConfig {
        heads: 3,
        kv_heads: 3,
        ..config.clone()
    };
    let k_quants = [QuantFormat::Q4K, QuantFormat::Q6K, QuantFormat::Q2K].map(quantized);
    let runs = [(&config, "", heads_64), (&heads_256, "-heads256", k_quants)];
    for (config, heads, storages) in runs {
        for kv in f32_f16.iter().chain(&storages) {
            let backend = Backend::Cpu { threads: 2 };
            let model = compile_with(config, &weights, &backend, None, ("default", kv));
            let id = BenchmarkId::new(format!("cpu-2t-kv-{kv}"), format!("{name}{heads}-x8"));
            bench_decode_call(&mut group, id, &model, 8, 512);
        }
    }
    group.finish();
}

/// One `@decode` call as [`bench_kv_storage`]'s (an f32 cache), with and without Gemma 2's
/// soft-capping of the attention scores (`softcap = 50`): what the `tanh` of every score
/// costs the attention microkernel.
fn bench_softcap(c: &mut Criterion) {
    let Some((name, path, _)) = models().into_iter().find(|(n, _, _)| n == "stories110M") else {
        return;
    };
    let (config, weights) = llama2c::load(&path).expect("model");
    let mut group = c.benchmark_group("softcap");
    group.sample_size(10);
    for softcap in [None, Some(50.0)] {
        let config = ModelConfig {
            attention_softcap: softcap,
            ..config.clone()
        };
        let model = compile(&config, &weights, &Backend::Cpu { threads: 2 }, None);
        let label = softcap.map_or("none".to_string(), |c| format!("{c}"));
        let id = BenchmarkId::new(format!("cpu-2t-softcap-{label}"), format!("{name}-x8"));
        bench_decode_call(&mut group, id, &model, 8, 512);
    }
    group.finish();
}

/// Benchmarks one `@decode` call of `model` over `batch` sequences, each prefilled with
/// `context` positions first, throughput in tokens (one a sequence). The sequences'
/// blocks interleave in the pool as the engine's do when sequences grow together.
fn bench_decode_call(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    model: &Model,
    batch: usize,
    context: usize,
) {
    use llm_runtime::{generate::Batch, model::BLOCK_SIZE};
    let per_sequence = (context + 1).div_ceil(BLOCK_SIZE);
    let tables: Vec<Vec<i64>> = (0..batch)
        .map(|s| (0..per_sequence).map(|j| (j * batch + s) as i64).collect())
        .collect();
    let slot = |s: usize, pos: usize| {
        tables[s][pos / BLOCK_SIZE] * BLOCK_SIZE as i64 + (pos % BLOCK_SIZE) as i64
    };
    let mut cache = model.new_cache(batch * per_sequence);
    for (s, table) in tables.iter().enumerate() {
        let prompt = Batch {
            tokens: (0..context)
                .map(|i| (1 + (i * 7 + s) % 500) as u32)
                .collect(),
            positions: (0..context as i64).collect(),
            slots: (0..context).map(|p| slot(s, p)).collect(),
            tables: vec![table.clone()],
            context_lens: vec![context as i64],
        };
        cache = model
            .run(Step::Prefill, &prompt, cache)
            .expect("prefills")
            .1;
    }
    let step = Batch {
        tokens: (0..batch).map(|s| (2 + s) as u32).collect(),
        positions: vec![context as i64; batch],
        slots: (0..batch).map(|s| slot(s, context)).collect(),
        tables: tables.clone(),
        context_lens: vec![context as i64 + 1; batch],
    };
    let mut cache = Some(cache);
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function(id, |b| {
        b.iter(|| {
            let held = cache.take().expect("the cache is back");
            let (logits, held) = model.run(Step::Decode, &step, held).expect("runs");
            cache = Some(held);
            logits
        })
    });
}

/// The dense 110M shape against its mixture of 8 experts of width 1024, 2 a token (q8_0
/// weights, 2 threads): one decode call of 1 and of 8 sequences over 64 positions each.
fn bench_experts(c: &mut Criterion) {
    let Some((name, path, _)) = models().into_iter().find(|(n, _, _)| n == "stories110M") else {
        return;
    };
    let (config, weights) = llama2c::load(&path).expect("model");
    let (moe_config, moe_weights) = synth::with_experts(&config, &weights, (8, 2), 3);
    let mut group = c.benchmark_group("experts");
    group.sample_size(10);
    let backend = Backend::Cpu { threads: 2 };
    let runs = [
        ("dense", &config, &weights),
        ("moe-8x1024-top2", &moe_config, &moe_weights),
    ];
    for (label, config, weights) in runs {
        let model = compile(config, weights, &backend, Some(&QuantFormat::Q8_0));
        for batch in [1, 8] {
            let id = BenchmarkId::new(format!("cpu-2t-q8_0-{label}"), format!("{name}-x{batch}"));
            bench_decode_call(&mut group, id, &model, batch, 64);
        }
    }
    group.finish();
}

/// Prefill of one 128-token prompt on the 110M shape, in FLOP/s (2 per multiply-add of the
/// matrices; attention not counted), with f32 and with f16 matrices.
fn bench_prefill(c: &mut Criterion) {
    let Some((_, path, _)) = models().into_iter().find(|(n, _, _)| n == "stories110M") else {
        return;
    };
    let (config, weights) = llama2c::load(&path).expect("model");
    let d = config.dim;
    let kv = config.kv_heads * config.head_dim();
    let per_token =
        config.layers * (d * (d + 2 * kv) + d * d + 3 * d * config.hidden_dim) + config.vocab * d;
    let mut group = c.benchmark_group("prefill-128");
    group.sample_size(10);
    group.throughput(Throughput::Elements((2 * per_token * PREFILL) as u64));
    let formats = [
        (String::new(), None),
        ("-f16".to_string(), Some(QuantFormat::F16)),
    ];
    for (threads, (suffix, format)) in [1, 2]
        .into_iter()
        .flat_map(|t| formats.iter().map(move |f| (t, f)))
    {
        let model = compile(
            &config,
            &weights,
            &Backend::Cpu { threads },
            format.as_ref(),
        );
        let tokens: Vec<u32> = (0..PREFILL as u32).map(|i| 1 + i * 7 % 31_000).collect();
        group.bench_function(
            BenchmarkId::new(format!("cpu-{threads}t{suffix}"), "stories110M"),
            |b| {
                b.iter(|| {
                    let cache = model.new_cache(PREFILL.div_ceil(llm_runtime::model::BLOCK_SIZE));
                    let batch = llm_runtime::generate::Batch {
                        tokens: tokens.clone(),
                        positions: (0..PREFILL as i64).collect(),
                        slots: (0..PREFILL as i64).collect(),
                        tables: vec![
                            (0..PREFILL.div_ceil(llm_runtime::model::BLOCK_SIZE) as i64).collect(),
                        ],
                        context_lens: vec![PREFILL as i64],
                    };
                    model.run(Step::Prefill, &batch, cache).expect("runs")
                })
            },
        );
    }
    group.finish();
}

fn bench_bandwidth(c: &mut Criterion) {
    let data = vec![1.0f32; 64 << 20];
    let mut group = c.benchmark_group("memory-read");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((data.len() * 4) as u64));
    group.bench_function("sum-256MiB", |b| {
        b.iter(|| {
            let mut acc = [0f32; 8];
            for chunk in data.chunks_exact(8) {
                for (a, x) in acc.iter_mut().zip(chunk) {
                    *a += x;
                }
            }
            acc.iter().sum::<f32>()
        })
    });
    // The device's roof, beside the GPU decode rows (`LLMC_BENCH_GPU=1`).
    if std::env::var_os("LLMC_BENCH_GPU").is_some() {
        let gpu = llm_lower::gpu::Gpu::new(&Default::default()).expect("a GPU");
        eprintln!("gpu-read on {}", gpu.adapter());
        let probe = llm_lower::gpu::ReadProbe::new(std::sync::Arc::new(gpu), 1 << 30)
            .expect("the probe compiles");
        group.throughput(Throughput::Bytes(probe.bytes()));
        group.bench_function("gpu-read", |b| b.iter(|| probe.run().expect("runs")));
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_bandwidth,
    bench_decode,
    bench_decode_long,
    bench_batched_decode,
    bench_kv_storage,
    bench_gguf_types,
    bench_softcap,
    bench_experts,
    bench_prefill
);
criterion_main!(benches);
