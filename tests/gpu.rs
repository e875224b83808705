//! The GPU backend at model scale: device limits as compiler inputs (weights split to fit a
//! small binding limit, the 110M shape under WebGPU's default limits), the KV pool's block
//! copies in device memory, and the error a machine without an adapter gets. Each test
//! runs where wgpu finds an adapter (lavapipe in CI, where `REQUIRE_GPU` makes a missing
//! one a failure).

use std::{path::PathBuf, process::Command};

use llm_lower::gpu::{self, GpuOptions};
use llm_runtime::{
    generate::{Backend, Model, Step},
    gguf, llama2c,
    sampler::SamplerConfig,
    synth,
    tokenizer::Tokenizer,
};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

const GREEDY: SamplerConfig = SamplerConfig {
    temperature: 0.0,
    top_p: 0.9,
    top_k: 0,
    seed: 1,
};

fn stories260k(backend: &Backend) -> (Model, Tokenizer) {
    let (config, weights) =
        llama2c::load(&shared().join("models/stories260K.bin")).expect("model loads");
    let tok =
        Tokenizer::load(&shared().join("models/tok512.bin"), config.vocab).expect("tokenizer");
    let model = Model::compile_on(backend, config, weights, "default").expect("model compiles");
    (model, tok)
}

/// Under a 48 KiB binding limit the 128 KiB embedding table (tied to the classifier) is
/// uploaded in three row parts, gathered and multiplied part by part; the output is still
/// the golden text. This run also takes the portable reductions (no subgroup operations).
#[test]
fn weights_split_to_fit_a_small_binding_limit_reproduce_golden() {
    let options = GpuOptions {
        max_binding_bytes: Some(48 * 1024),
        no_subgroups: true,
        ..GpuOptions::default()
    };
    if gpu::test_device(&options).is_none() {
        return;
    }
    let (model, tok) = stories260k(&Backend::Gpu(options));
    let stats = model.gpu_lowering(Step::Decode).expect("gpu stats");
    assert!(stats.split_weights > 0, "nothing was split: {stats:?}");
    assert!(stats.reference_ops.is_empty(), "{stats:?}");
    let g = model
        .generate(&tok, "Once upon a time", 256, GREEDY)
        .expect("generates");
    let golden = std::fs::read(shared().join("golden/once_upon_a_time.txt")).expect("golden");
    assert_eq!(
        String::from_utf8_lossy(&g.text),
        String::from_utf8_lossy(&golden)
    );
}

/// A mixture of experts whose stacked experts exceed a 48 KiB binding limit (stories260K
/// with 4 experts of width 86 a layer, `synth::with_experts`: 88 KiB a matrix, in parts
/// of two experts) runs part by part, every op on the GPU, and computes the CPU backend's
/// logits (within 1e-4) for a prompt and a decoded token.
#[test]
fn split_experts_run_part_by_part() {
    let options = GpuOptions {
        max_binding_bytes: Some(48 * 1024),
        no_f16: true,
        ..GpuOptions::default()
    };
    if gpu::test_device(&options).is_none() {
        return;
    }
    let (config, weights) =
        llama2c::load(&shared().join("models/stories260K.bin")).expect("model loads");
    let (config, weights) = synth::with_experts(&config, &weights, (4, 2), 9);
    let logits = |backend: &Backend| {
        let model = Model::compile_on(backend, config.clone(), weights.clone(), "default")
            .expect("compiles");
        let prompt = [1, 403, 407, 261, 379, 500, 297, 280];
        let (prefill, cache) = model
            .forward(Step::Prefill, &prompt, 0, model.new_cache(1))
            .expect("prefill");
        let (decode, _) = model
            .forward(Step::Decode, &[365], prompt.len(), cache)
            .expect("decode");
        let all: Vec<f32> = prefill.into_iter().chain(decode).flatten().collect();
        (model, all)
    };
    let (model, on_gpu) = logits(&Backend::Gpu(options));
    let stats = model.gpu_lowering(Step::Decode).expect("gpu stats");
    // Every layer's three stacked experts, and the embedding table.
    assert!(stats.split_weights > 3 * config.layers, "{stats:?}");
    assert!(stats.reference_ops.is_empty(), "{stats:?}");
    let on_cpu = logits(&Backend::Cpu { threads: 2 }).1;
    let worst = on_gpu
        .iter()
        .zip(&on_cpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "{worst} from the CPU backend's logits");
}

/// With attention split into chunks of 16 positions (merged by a second dispatch), decode
/// still prints the golden text.
#[test]
fn split_attention_reproduces_golden() {
    let options = GpuOptions {
        attention_chunk: Some(16),
        ..GpuOptions::default()
    };
    if gpu::test_device(&options).is_none() {
        return;
    }
    let (model, tok) = stories260k(&Backend::Gpu(options));
    let g = model
        .generate(&tok, "The little dog was sad because", 256, GREEDY)
        .expect("generates");
    let golden = std::fs::read(shared().join("golden/little_dog.txt")).expect("golden");
    assert_eq!(
        String::from_utf8_lossy(&g.text),
        String::from_utf8_lossy(&golden)
    );
}

/// The 110M shape (synthetic weights) compiles under WebGPU's default limits (128 MiB
/// bindings, 8 storage buffers per stage) with every op on the GPU, and its logits agree
/// with the CPU backend's.
#[test]
fn the_110m_shape_runs_under_webgpu_limits() {
    let options = GpuOptions {
        webgpu_limits: true,
        ..GpuOptions::default()
    };
    if gpu::test_device(&options).is_none() {
        return;
    }
    let path = std::env::temp_dir().join(format!("llmc-110m-{}.bin", std::process::id()));
    let shape = synth::shape("110M").expect("known shape");
    synth::write(&path, &shape, 3).expect("synthetic model");
    let load = || llama2c::load(&path).expect("model loads");
    let run = |backend: &Backend| {
        let (config, weights) = load();
        let model = Model::compile_on(backend, config, weights, "default").expect("compiles");
        let cache = model.new_cache(1);
        let (prefill, cache) = model
            .forward(Step::Prefill, &[1, 450, 2172], 0, cache)
            .expect("prefill");
        let (decode, _) = model
            .forward(Step::Decode, &[931], 3, cache)
            .expect("decode");
        (model, prefill.into_iter().chain(decode).collect::<Vec<_>>())
    };
    let (gpu_model, on_gpu) = run(&Backend::Gpu(options));
    std::fs::remove_file(&path).ok();
    for step in [Step::Prefill, Step::Decode] {
        let stats = gpu_model.gpu_lowering(step).expect("gpu stats");
        assert!(stats.reference_ops.is_empty(), "{step:?}: {stats:?}");
        println!(
            "110M @{}: {} shaders, {} dispatches per call, {} MiB uploaded",
            step.name(),
            stats.shaders,
            stats.dispatches,
            stats.upload_bytes >> 20
        );
    }
    drop(gpu_model);
    synth::write(&path, &shape, 3).expect("synthetic model");
    let (_, on_cpu) = run(&Backend::Cpu { threads: 2 });
    std::fs::remove_file(&path).ok();
    for (pos, (g, c)) in on_gpu.iter().zip(&on_cpu).enumerate() {
        for (j, (a, b)) in g.iter().zip(c).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3 * b.abs().max(1.0),
                "position {pos}, logit {j}: gpu {a} vs cpu {b}"
            );
        }
    }
}

/// An f16 model (llama-2-tiny-random.gguf) runs entirely on the GPU; its matrices, kept in
/// the `f16` storage format, are read as WGSL `f16` where the device has `shader-f16` (and
/// decoded from the same bytes with integer operations elsewhere): the logits equal those
/// of the fallback and agree with the CPU backend's.
#[test]
fn exactly_f16_weights_are_stored_as_f16() {
    if gpu::test_device(&GpuOptions::default()).is_none() {
        return;
    }
    let run = |backend: &Backend| {
        let g = gguf::load(&shared().join("models/llama-2-tiny-random.gguf")).expect("loads");
        let model = Model::compile_on(backend, g.config, g.weights, "default").expect("compiles");
        let (logits, _) = model
            .forward(Step::Prefill, &[1, 450, 4996, 17354], 0, model.new_cache(1))
            .expect("prefill");
        (model, logits)
    };
    let (model, on_f16) = run(&Backend::Gpu(GpuOptions::default()));
    for step in [Step::Prefill, Step::Decode] {
        let stats = model.gpu_lowering(step).expect("gpu stats");
        assert!(stats.reference_ops.is_empty(), "{step:?}: {stats:?}");
    }
    let stats = model.gpu_lowering(Step::Prefill).expect("gpu stats");
    let has_f16 = gpu::test_device(&GpuOptions::default()).is_some_and(|g| g.has_f16());
    assert_eq!(stats.f16_weights > 0, has_f16, "{stats:?}");
    let no_f16 = GpuOptions {
        no_f16: true,
        ..GpuOptions::default()
    };
    let (model, on_f32) = run(&Backend::Gpu(no_f16));
    assert_eq!(
        model
            .gpu_lowering(Step::Prefill)
            .expect("stats")
            .f16_weights,
        0
    );
    let (_, on_cpu) = run(&Backend::Cpu { threads: 1 });
    for ((a, b), c) in on_f16
        .iter()
        .flatten()
        .zip(on_f32.iter().flatten())
        .zip(on_cpu.iter().flatten())
    {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(1.0),
            "f16 {a} vs f32 {b}"
        );
        assert!(
            (b - c).abs() <= 1e-4 * c.abs().max(1.0),
            "gpu {b} vs cpu {c}"
        );
    }
}

/// A block copy of a cache in device memory moves the same floats a host copy moves.
#[test]
fn device_block_copies_match_host_copies() {
    if gpu::test_device(&GpuOptions::default()).is_none() {
        return;
    }
    let (on_gpu, _) = stories260k(&Backend::Gpu(GpuOptions::default()));
    let (on_host, _) = stories260k(&Backend::Cpu { threads: 1 });
    let tokens = [
        1, 403, 407, 261, 378, 1217, 293, 1104, 395, 269, 1214, 396, 426, 297, 433, 45, 260,
    ];
    let tokens: Vec<u32> = tokens.iter().map(|&t| t % 512).collect();
    let mut caches = Vec::new();
    for model in [&on_gpu, &on_host] {
        let cache = model.new_cache(4);
        let (_, mut cache) = model
            .forward(Step::Prefill, &tokens, 0, cache)
            .expect("prefill");
        model.copy_block(&mut cache, 0, 3).expect("copy");
        model.copy_block(&mut cache, 1, 2).expect("copy");
        caches.push(gpu::read_cache(&cache).expect("read back"));
    }
    let (g, h) = (&caches[0], &caches[1]);
    let (gk, gv, hk, hv) = (g.k.floats(), g.v.floats(), h.k.floats(), h.v.floats());
    assert_eq!(gk.len(), hk.len());
    for (a, b) in gk.iter().zip(hk.iter()).chain(gv.iter().zip(hv.iter())) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
    let block = 16 * g.slot_len();
    assert_eq!(gk[..block], gk[3 * block..4 * block]);
    assert!(
        on_gpu.copy_block(&mut on_gpu.new_cache(2), 0, 5).is_err(),
        "a block outside the pool is refused"
    );
}

/// Without any adapter `llm-run --backend gpu` fails with a clear message, not a panic.
#[test]
fn no_adapter_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_llm-run"))
        .args(["generate", "--model"])
        .arg(shared().join("models/stories260K.bin"))
        .arg("--tokenizer")
        .arg(shared().join("models/tok512.bin"))
        .args(["--prompt", "Hi", "--backend", "gpu"])
        .env("RUST_BACKTRACE", "0")
        .env("WGPU_BACKEND", "vulkan")
        .env("VK_ICD_FILENAMES", "/nonexistent.json")
        .env("VK_DRIVER_FILES", "/nonexistent.json")
        .output()
        .expect("llm-run runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no GPU adapter"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The device's memory-read probe (the roof GPU decode is read against) runs.
#[test]
fn the_read_probe_runs() {
    let Some(gpu) = gpu::test_device(&GpuOptions::default()) else {
        return;
    };
    let probe = gpu::ReadProbe::new(std::sync::Arc::new(gpu), 1 << 20).expect("compiles");
    assert_eq!(probe.bytes(), 1 << 20);
    probe.run().expect("runs");
}
