//! Decode speed of the plain-Rust baseline and of the reference interpreter, and a
//! memory-read bandwidth probe to read decode speed against (the roof of a memory-bound
//! decode is bandwidth / bytes of weights read per token).
//!
//! Models: the real stories260K and a synthetic 15M-shaped llama2.c model written by
//! `llm_runtime::synth` (seeded). Each iteration decodes 32 positions greedily.

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented functions"
)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use llm_runtime::{
    baseline::Baseline,
    generate::Model,
    llama2c,
    sampler::{SamplerConfig, argmax},
    synth,
    tokenizer::Tokenizer,
};

const POSITIONS: usize = 32;

fn models() -> Vec<(String, std::path::PathBuf)> {
    let real =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/stories260K.bin");
    let synthetic = std::env::temp_dir().join("llmc-bench-15M.bin");
    if !synthetic.exists() {
        synth::write(&synthetic, &synth::shape("15M").expect("shape"), 1).expect("synthetic model");
    }
    vec![
        ("stories260K".into(), real),
        ("synthetic-15M".into(), synthetic),
    ]
}

fn bench_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    group.throughput(Throughput::Elements(POSITIONS as u64));
    for (name, path) in models() {
        let (config, weights) = llama2c::load(&path).expect("model");
        let mut baseline = Baseline::new(&config, &weights).expect("baseline");
        group.bench_function(BenchmarkId::new("baseline", &name), |b| {
            b.iter(|| {
                let mut token = 1;
                for pos in 0..POSITIONS {
                    token = argmax(&baseline.forward(token, pos)) as u32;
                }
                token
            })
        });
        let model = Model::compile(config.clone(), weights, "default").expect("compiles");
        let vocab: Vec<Vec<u8>> = (0..config.vocab)
            .map(|i| format!("t{i}").into_bytes())
            .collect();
        // No stop tokens: every iteration runs all POSITIONS, as the baseline does.
        let tokenizer =
            Tokenizer::from_vocab(vocab, vec![0.0; config.vocab]).with_stop_tokens(Vec::new());
        let greedy = SamplerConfig {
            temperature: 0.0,
            top_p: 0.9,
            top_k: 0,
            seed: 1,
        };
        group.bench_function(BenchmarkId::new("interpreter", &name), |b| {
            b.iter(|| {
                let g = model
                    .generate(&tokenizer, "", POSITIONS, greedy.clone())
                    .expect("runs");
                assert_eq!(g.logits.len(), POSITIONS, "ran every position");
                g
            })
        });
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
    group.finish();
}

criterion_group!(benches, bench_decode, bench_bandwidth);
criterion_main!(benches);
