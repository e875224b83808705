//! Benchmarks of the compiler front end on the real stories260K model: building, parsing
//! and verifying its IR, and running the `default` pass pipeline on it.

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented functions"
)]

use criterion::{Criterion, criterion_group, criterion_main};
use llm_ir::text;
use llm_passes::{Pipeline, RunConfig};
use llm_runtime::{llama2c, model};
use pliron::context::Context;

fn stories260k_ir() -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/models/stories260K.bin");
    let (config, weights) = llama2c::load(&path).expect("stories260K loads");
    model::build_ir(
        &config,
        &weights,
        &llm_ir::types::KvStorage::Float(llm_ir::dtype::DType::F32),
    )
    .expect("builds")
}

fn bench_front_end(c: &mut Criterion) {
    let source = stories260k_ir();
    c.bench_function("stories260k/parse+verify", |b| {
        b.iter(|| {
            let mut ctx = Context::new();
            text::parse_module(&mut ctx, &source).expect("parses")
        })
    });
    let pipeline = Pipeline::parse("default").expect("pipeline");
    c.bench_function("stories260k/parse+verify+default-pipeline", |b| {
        b.iter(|| {
            let mut ctx = Context::new();
            let module = text::parse_module(&mut ctx, &source).expect("parses");
            pipeline
                .run(&mut ctx, module, &RunConfig::default())
                .expect("runs")
        })
    });
}

criterion_group!(benches, bench_front_end);
criterion_main!(benches);
