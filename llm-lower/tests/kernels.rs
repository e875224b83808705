//! Every CPU and GPU kernel against the reference interpreter, on random shapes (odd
//! sizes included, so the vector tails run) and random values. The GPU runs wherever wgpu
//! finds an adapter (lavapipe in CI, where `REQUIRE_GPU` makes a missing one a failure).

use std::{
    rc::Rc,
    sync::{Arc, OnceLock},
};

use llm_ir::{
    dtype::DType,
    interp::{
        self, Data, Hoisted, Interpreter, KvCache, KvValues, NoWeights, QTensor, Sharded, Tensor,
        Value, WeightStore, quant, value::round_float,
    },
    text,
    types::{KvCacheParams, KvStorage, QuantFormat, Reduction},
};
use llm_lower::{
    cpu::{LoweringStats, Options, Program, Target},
    gpu::{self, Gpu, GpuOptions, Rows},
};
use llm_passes::{Pipeline, RunConfig};
use pliron::{builtin::ops::FuncOp, context::Context};
use proptest::prelude::*;

/// Seeded uniform values in [-scale, scale).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// An `n x k` matrix of seeded values in [-1, 1) quantized to `format` by the reference
/// (for the lattice, ternary, binary and 4-bit float formats on odd seeds, [`random_blocks`]
/// instead).
fn quantized(format: &QuantFormat, [n, k]: [usize; 2], seed: u64) -> Value {
    let any_bytes_decode = matches!(
        format,
        QuantFormat::Iq3Xxs
            | QuantFormat::Iq3S
            | QuantFormat::Iq2Xxs
            | QuantFormat::Iq2Xs
            | QuantFormat::Iq2S
            | QuantFormat::Iq1S
            | QuantFormat::Iq1M
            | QuantFormat::Tq1_0
            | QuantFormat::Tq2_0
            | QuantFormat::Q1_0
            | QuantFormat::Mxfp4
            | QuantFormat::Nvfp4
    );
    let bytes = if any_bytes_decode && seed % 2 == 1 {
        random_blocks(format, n * k / format.block_elems() as usize, seed)
    } else {
        quant::quantize(format, &[n, k], &values(seed, n * k, 1.0))
    };
    Value::Quantized(QTensor {
        shape: vec![n, k],
        format: format.clone(),
        bytes,
    })
}

/// `count` random blocks of the lattice, ternary, binary or 4-bit float format `format` (any bytes
/// decode), so that every grid entry, high index bit, sign, multiplier and code byte
/// occurs, not only those the quantizer picks, each with a small scale: an f16 at the
/// block's start (iq1_m's in its scale words, the ternary formats' at their end), or
/// mxfp4's E8M0 byte of 2^-10 to 2^-3 (2^-128, subnormal, in one block of five) and
/// nvfp4's UE4M3 bytes of 2^-6 to 2^-3 (0x7F, which reads as 0, for one sub-block of
/// three, and one of fifteen with the ignored top bit set).
fn random_blocks(format: &QuantFormat, count: usize, seed: u64) -> Vec<u8> {
    let size = format.gguf_block_bytes().expect("a GGUF format") as usize;
    let mut state = seed;
    let mut bytes: Vec<u8> = (0..count * size)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect();
    for (b, block) in bytes.chunks_mut(size).enumerate() {
        let d = half::f16::from_f32(1e-3 * (b % 4 + 1) as f32);
        let d_at = match format {
            QuantFormat::Iq1M => {
                interp::iq1::set_iq1_m_d(block, d);
                continue;
            }
            QuantFormat::Mxfp4 => {
                block[0] = if b % 5 == 4 { 0 } else { 117 + block[0] % 8 };
                continue;
            }
            QuantFormat::Nvfp4 => {
                for (s, scale) in block[..4].iter_mut().enumerate() {
                    *scale = match (b + s) % 15 {
                        0 | 3 | 6 | 9 | 12 => 0x7F,
                        5 => 0x80 | (0x08 + *scale % 0x20),
                        _ => 0x08 + *scale % 0x20,
                    };
                }
                continue;
            }
            QuantFormat::Tq1_0 => interp::ternary::TQ1_0_D_AT,
            QuantFormat::Tq2_0 => interp::ternary::TQ2_0_D_AT,
            _ => 0,
        };
        block[d_at..d_at + 2].copy_from_slice(&d.to_le_bytes());
    }
    bytes
}

/// The GGUF formats of 32-value blocks (one scale each), whose constant weights the CPU
/// repacks into block panels for q8_0 activations, with their names in the IR.
const BLOCKS_OF_32: [(QuantFormat, &str); 6] = [
    (QuantFormat::Q8_0, "q8_0"),
    (QuantFormat::Q4_0, "q4_0"),
    (QuantFormat::Q4_1, "q4_1"),
    (QuantFormat::Q5_0, "q5_0"),
    (QuantFormat::Q5_1, "q5_1"),
    (QuantFormat::Iq4Nl, "iq4_nl"),
];

/// `y = quantized_matmul(quantize(x) to q8_0, w) + r` for `x` of `[m, k]` and a weight
/// `w` of `[n, k]` in `format` (seeded, in the returned store).
fn quantized_activations(
    [m, n, k]: [usize; 3],
    format: &QuantFormat,
    seed: u64,
) -> (String, Store) {
    let y = ty(&[m, n]);
    let ir = func(
        &[("x".into(), ty(&[m, k])), ("r".into(), y.clone())],
        &y,
        &format!(
            "w = llm.weight {{name = \"w\"}} : llm.quantized_tensor <{n}x{k}, {}>;\n        xq = llm.quantize x : llm.quantized_tensor <{m}x{k}, q8_0>;\n        p = llm.quantized_matmul xq, w : {y};\n        y = llm.add p, r : {y};",
            format.name()
        ),
    );
    let store = Store(vec![("w".into(), Rc::new(quantized(format, [n, k], seed)))]);
    (ir, store)
}

fn tensor(shape: &[usize], seed: u64, scale: f32) -> Value {
    let n = shape.iter().product();
    Value::Tensor(Tensor::from_f32(
        shape.to_vec(),
        DType::F32,
        values(seed, n, scale),
    ))
}

/// The test binary's GPU (WebGPU's default limits, so that nothing passes only because
/// the adapter is generous), or `None` when there is no adapter and `REQUIRE_GPU` is unset.
fn gpu() -> Option<Arc<Gpu>> {
    static GPU: OnceLock<Option<Arc<Gpu>>> = OnceLock::new();
    GPU.get_or_init(|| {
        // A short attention chunk, so that the random contexts exercise both the whole
        // and the split attention.
        let options = GpuOptions {
            webgpu_limits: true,
            attention_chunk: Some(5),
            ..GpuOptions::default()
        };
        gpu::test_device(&options).map(Arc::new)
    })
    .clone()
}

fn ty(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    format!("llm.tensor <{}xf32>", dims.join("x"))
}

/// A weight store over named values.
struct Store(Vec<(String, Rc<Value>)>);

impl WeightStore for Store {
    fn weight(&self, name: &str) -> Option<Rc<Value>> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| Rc::clone(v))
    }
}

/// Runs `@f` of `ir` on `args` with the interpreter and with the CPU backend (1 and 2
/// threads) and checks that every float agrees within `tol` (relative to max(1, |ref|)).
fn agree(ir: &str, args: Vec<Value>, tol: f32) -> Result<(), TestCaseError> {
    agree_with(ir, args, &Store(Vec::new()), tol)
}

/// [`agree`] with `llm.weight`s resolved in `weights` (hoisted, as a model runs them).
fn agree_with(ir: &str, args: Vec<Value>, weights: &Store, tol: f32) -> Result<(), TestCaseError> {
    agree_fused(ir, args, weights, tol, 0)
}

/// [`agree_with`], also checking that `fused` ops were fused into other kernels.
fn agree_fused(
    ir: &str,
    args: Vec<Value>,
    weights: &Store,
    tol: f32,
    fused: usize,
) -> Result<(), TestCaseError> {
    agree_on(ir, args, weights, (tol, fused), true)
}

/// [`agree`] on the CPU alone, for what the GPU keeps on the host by design.
fn cpu_agrees(ir: &str, args: Vec<Value>, tol: f32) -> Result<(), TestCaseError> {
    agree_on(ir, args, &Store(Vec::new()), (tol, 0), false)
}

/// The checks of [`agree_fused`], on the GPU too when `with_gpu` (and there is one).
fn agree_on(
    ir: &str,
    args: Vec<Value>,
    weights: &Store,
    (tol, fused): (f32, usize),
    with_gpu: bool,
) -> Result<(), TestCaseError> {
    let (ctx, func, want, hoisted) = reference(ir, &args, weights)?;
    let mut runs: Vec<(String, Vec<Value>)> = Vec::new();
    for (threads, microkernels) in [(1, true), (2, true), (1, false)] {
        let options = Options {
            target: Target::Host,
            threads,
            microkernels,
        };
        let program = Program::build(&ctx, func, &hoisted, &options)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(program.stats().kernel_ops > 0, "nothing was lowered: {ir}");
        prop_assert!(
            program.stats().reference_ops.is_empty(),
            "not lowered on the CPU: {:?} in {ir}",
            program.stats().reference_ops
        );
        prop_assert_eq!(program.stats().fused_ops, fused, "fused ops");
        let got = program
            .run(&ctx, weights, args.clone())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(
            program.runtime_fallbacks(),
            0,
            "fell back at run time: {}",
            ir
        );
        // Again with the same shapes (traced for a call plan), then through the plan when
        // the function has one: the same kernels in the same order, so the same bits.
        for _ in 0..2 {
            let again = program
                .run(&ctx, weights, args.clone())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(
                identical(&again, &got),
                "a repeated or planned call differs: {ir}"
            );
        }
        runs.push((
            format!("cpu, threads {threads}, microkernels {microkernels}"),
            got,
        ));
    }
    if let Some(gpu) = gpu().filter(|_| with_gpu) {
        runs.extend(runs_on_gpu(
            gpu,
            &ctx,
            func,
            &hoisted,
            (weights, &args),
            |stats| {
                prop_assert!(stats.kernel_ops > 0, "nothing was lowered on the GPU: {ir}");
                prop_assert!(
                    stats.reference_ops.is_empty(),
                    "not lowered on the GPU: {ir}"
                );
                prop_assert_eq!(stats.fused_ops, fused, "fused ops on the GPU");
                Ok(())
            },
        )?);
    }
    compare(&runs, &want, tol, ir)
}

/// Whether two calls' results are the same bits (NaNs included).
fn identical(a: &[Value], b: &[Value]) -> bool {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    a.len() == b.len()
        && a.iter().zip(b).all(|(a, b)| match (a, b) {
            (Value::Tensor(x), Value::Tensor(y)) => match (x.floats(), y.floats()) {
                (Ok(xs), Ok(ys)) => {
                    x.shape == y.shape && x.dtype == y.dtype && bits(xs) == bits(ys)
                }
                _ => x == y,
            },
            (Value::Cache(x), Value::Cache(y)) => {
                x.k.bytes() == y.k.bytes() && x.v.bytes() == y.v.bytes()
            }
            _ => a == b,
        })
}

/// Parses `ir`, runs its `@f` on `args` with the interpreter (the expected results) and
/// hoists its weight-derived values, as a model's runtime does.
fn reference(
    ir: &str,
    args: &[Value],
    weights: &Store,
) -> Result<(Context, FuncOp, Vec<Value>, Hoisted), TestCaseError> {
    let mut ctx = Context::new();
    let module =
        text::parse_module(&mut ctx, ir).map_err(|d| TestCaseError::fail(d.render("t")))?;
    let func = interp::find_func(&ctx, module, "f").expect("@f");
    let interpreter = Interpreter::new(&ctx, weights);
    let want = interpreter
        .run(func, args.to_vec())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let hoisted = interpreter
        .hoist(func)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok((ctx, func, want, hoisted))
}

/// Compiles `func` for the GPU shaped for both `Rows`, checks each program's `stats`, and
/// runs it on `args`, checking that no kernel step fell back to the reference semantics at
/// run time.
fn runs_on_gpu(
    gpu: Arc<Gpu>,
    ctx: &Context,
    func: FuncOp,
    hoisted: &Hoisted,
    (weights, args): (&dyn WeightStore, &[Value]),
    check: impl Fn(&gpu::LoweringStats) -> Result<(), TestCaseError>,
) -> Result<Vec<(String, Vec<Value>)>, TestCaseError> {
    let compiler = gpu::Compiler::new(gpu);
    let mut runs = Vec::new();
    for rows in [Rows::Few, Rows::Many] {
        let program = compiler
            .build(ctx, func, hoisted, rows)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        check(program.stats())?;
        let got = run_on_gpu(&program, ctx, weights, args)?;
        prop_assert_eq!(
            program.runtime_fallbacks(),
            0,
            "fell back at run time on the GPU"
        );
        runs.push((format!("gpu, {rows:?} rows"), got));
    }
    Ok(runs)
}

/// The error of running `@f` of `ir` on the GPU with `args` (a panic if it runs).
fn gpu_error(gpu: Arc<Gpu>, ir: &str, args: Vec<Value>) -> String {
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, ir).expect("parses");
    let func = interp::find_func(&ctx, module, "f").expect("@f");
    let program = gpu::Compiler::new(gpu)
        .build(&ctx, func, &Hoisted::default(), Rows::Few)
        .expect("compiles");
    assert!(program.stats().reference_ops.is_empty(), "{ir}");
    program
        .run(&ctx, &NoWeights, args)
        .expect_err("fails on the GPU")
        .to_string()
}

/// Runs a GPU program, reading back the caches it returns (they stay in device memory).
fn run_on_gpu(
    program: &gpu::Program,
    ctx: &Context,
    weights: &dyn WeightStore,
    args: &[Value],
) -> Result<Vec<Value>, TestCaseError> {
    program
        .run(ctx, weights, args.to_vec())
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .into_iter()
        .map(|v| match v {
            Value::Cache(c) => gpu::read_cache(&c).map(Value::Cache),
            other => Ok(other),
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(TestCaseError::fail)
}

/// [`agree`] on the GPU alone (for what only the GPU does: f16 storage), with
/// `llm.weight`s from `store`, checking that `f16_weights` weights were stored as `f16`
/// (where the device has `shader-f16`).
fn gpu_agrees_with(
    ir: &str,
    args: Vec<Value>,
    store: &Store,
    tol: f32,
    f16_weights: usize,
) -> Result<(), TestCaseError> {
    let Some(gpu) = gpu() else {
        return Ok(());
    };
    let f16_weights = if gpu.has_f16() { f16_weights } else { 0 };
    let (ctx, func, want, hoisted) = reference(ir, &args, store)?;
    let runs = runs_on_gpu(gpu, &ctx, func, &hoisted, (store, &args), |stats| {
        prop_assert!(stats.reference_ops.is_empty(), "not lowered: {ir}");
        prop_assert_eq!(stats.f16_weights, f16_weights, "f16 weights");
        Ok(())
    })?;
    compare(&runs, &want, tol, ir)
}

/// Checks every backend's results against the interpreter's: integers exactly, floats
/// within `tol` relative to max(1, |reference|).
fn compare(
    runs: &[(String, Vec<Value>)],
    want: &[Value],
    tol: f32,
    ir: &str,
) -> Result<(), TestCaseError> {
    for (backend, got) in runs {
        for (g, w) in got.iter().zip(want) {
            let keys;
            let (g, w): (&[f32], &[f32]) = match (g, w) {
                (Value::Cache(g), Value::Cache(w)) => {
                    prop_assert_eq!(&g.v, &w.v, "{}", backend);
                    keys = (g.k.floats(), w.k.floats());
                    (&keys.0, &keys.1)
                }
                (Value::Quantized(g), Value::Quantized(w)) => {
                    // Quantized results must be the same bytes.
                    prop_assert_eq!(g, w, "{} {}", backend, ir);
                    continue;
                }
                _ => {
                    let (g, w) = (g.tensor().unwrap(), w.tensor().unwrap());
                    prop_assert_eq!(&g.shape, &w.shape);
                    prop_assert_eq!(g.dtype, w.dtype);
                    if let (Ok(gi), Ok(wi)) = (g.ints(), w.ints()) {
                        // Integer results (indices) must be equal.
                        prop_assert_eq!(gi, wi, "{} {}", backend, ir);
                        continue;
                    }
                    (g.floats().unwrap(), w.floats().unwrap())
                }
            };
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                prop_assert!(
                    a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol * b.abs().max(1.0),
                    "element {i}: {a} vs {b} ({backend})\n{ir}"
                );
                // Exact results keep the reference's zeros' signs (`==` does not tell them
                // apart; within a tolerance, sums may reach zero from another side).
                prop_assert!(
                    tol != 0.0
                        || *a != 0.0
                        || *b != 0.0
                        || a.is_sign_negative() == b.is_sign_negative(),
                    "element {i}: {a} vs {b}, zeros of two signs ({backend})\n{ir}"
                );
            }
        }
    }
    Ok(())
}

fn func(args: &[(String, String)], result: &str, body: &str) -> String {
    let sig: Vec<&str> = args.iter().map(|(_, t)| t.as_str()).collect();
    let params: Vec<String> = args.iter().map(|(n, t)| format!("{n}: {t}")).collect();
    format!(
        "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({}) -> ({result})> {{\n      ^body({}):\n        {body}\n        llm.return y\n    }}\n}}\n",
        sig.join(", "),
        params.join(", ")
    )
}

/// Test cases of the quantized formats beyond q8_0/q4_0: the row length (`blocks` blocks
/// or groups), the format and its text. GGUF k-quants, nf4 blocks with and without a
/// scalar tail, affine integers grouped along either dim, with every scale type.
fn format_case(which: usize, blocks: usize) -> (usize, QuantFormat, String) {
    match which {
        0 => (32 * blocks, QuantFormat::Q4_1, "q4_1".to_string()),
        1 => (256 * blocks, QuantFormat::Q4K, "q4_k".into()),
        2 => (256 * blocks, QuantFormat::Q6K, "q6_k".into()),
        3 => (256 * blocks, QuantFormat::Q2K, "q2_k".into()),
        4 => (
            64 * blocks,
            QuantFormat::Nf4 {
                block_size: 64,
                scale: DType::F16,
            },
            "nf4 {block_size = 64, scale = f16}".into(),
        ),
        5 => (
            38 * blocks,
            QuantFormat::Nf4 {
                block_size: 38,
                scale: DType::F32,
            },
            "nf4 {block_size = 38, scale = f32}".into(),
        ),
        6 => (
            6 * blocks,
            QuantFormat::Nf4 {
                block_size: 6,
                scale: DType::BF16,
            },
            "nf4 {block_size = 6, scale = bf16}".into(),
        ),
        7 => (
            32 * blocks,
            QuantFormat::Affine {
                bits: 8,
                group_size: 32,
                symmetric: true,
                axis: 1,
                scale: DType::F32,
            },
            "int8 {group_size = 32, axis = 1, scale = f32}".into(),
        ),
        8 => (
            36 * blocks,
            QuantFormat::Affine {
                bits: 4,
                group_size: 2,
                symmetric: false,
                axis: 0,
                scale: DType::BF16,
            },
            "int4 {group_size = 2, symmetric = false, axis = 0, scale = bf16}".into(),
        ),
        9 => (
            40 * blocks,
            QuantFormat::Affine {
                bits: 2,
                group_size: 40,
                symmetric: true,
                axis: 1,
                scale: DType::F16,
            },
            "int2 {group_size = 40, axis = 1, scale = f16}".into(),
        ),
        10 => (
            12 * blocks,
            QuantFormat::Affine {
                bits: 4,
                group_size: 6,
                symmetric: false,
                axis: 1,
                scale: DType::F32,
            },
            "int4 {group_size = 6, symmetric = false, axis = 1, scale = f32}".into(),
        ),
        11 => (
            34 * blocks,
            QuantFormat::Affine {
                bits: 8,
                group_size: 1,
                symmetric: false,
                axis: 0,
                scale: DType::F16,
            },
            "int8 {group_size = 1, symmetric = false, axis = 0, scale = f16}".into(),
        ),
        // Rows of lengths that leave every tail of the 16-bit kernels (32, 8, 4 and 1).
        12 => (37 * blocks, QuantFormat::F16, "f16".into()),
        13 => (45 * blocks, QuantFormat::BF16, "bf16".into()),
        14 => (256 * blocks, QuantFormat::Q3K, "q3_k".into()),
        15 => (256 * blocks, QuantFormat::Q5K, "q5_k".into()),
        16 => (32 * blocks, QuantFormat::Q5_0, "q5_0".into()),
        17 => (32 * blocks, QuantFormat::Q5_1, "q5_1".into()),
        18 => (32 * blocks, QuantFormat::Iq4Nl, "iq4_nl".into()),
        19 => (256 * blocks, QuantFormat::Iq4Xs, "iq4_xs".into()),
        20 => (256 * blocks, QuantFormat::Iq3Xxs, "iq3_xxs".into()),
        21 => (256 * blocks, QuantFormat::Iq3S, "iq3_s".into()),
        22 => (256 * blocks, QuantFormat::Iq2Xxs, "iq2_xxs".into()),
        23 => (256 * blocks, QuantFormat::Iq2Xs, "iq2_xs".into()),
        24 => (256 * blocks, QuantFormat::Iq2S, "iq2_s".into()),
        25 => (256 * blocks, QuantFormat::Iq1S, "iq1_s".into()),
        26 => (256 * blocks, QuantFormat::Iq1M, "iq1_m".into()),
        27 => (256 * blocks, QuantFormat::Tq1_0, "tq1_0".into()),
        28 => (256 * blocks, QuantFormat::Tq2_0, "tq2_0".into()),
        29 => (32 * blocks, QuantFormat::Mxfp4, "mxfp4".into()),
        30 => (64 * blocks, QuantFormat::Nvfp4, "nvfp4".into()),
        31 => (128 * blocks, QuantFormat::Q1_0, "q1_0".into()),
        _ => (
            70 * blocks,
            QuantFormat::Affine {
                bits: 4,
                group_size: 70,
                symmetric: false,
                axis: 1,
                scale: DType::BF16,
            },
            "int4 {group_size = 70, symmetric = false, axis = 1, scale = bf16}".into(),
        ),
    }
}

/// `llm.erf` over a sweep of [-5, 5] (both branches: the Taylor polynomial below 1 and
/// Abramowitz and Stegun's form beyond), tiny arguments, signed zeros, large ones and the
/// infinities: within 2.5e-7 of `libm`'s `erff` (the reference's) on every backend (the
/// approximation's own error is below 2e-7; the rest is room for a device's `exp`).
#[test]
fn erf_is_within_its_error_bound() {
    let mut x: Vec<f32> = (0..=2000).map(|i| -5.0 + i as f32 * 0.005).collect();
    x.extend([
        1e-30,
        -1e-20,
        1e-6,
        0.0,
        -0.0,
        9.0,
        -12.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ]);
    let n = x.len();
    let ir = func(
        &[("x".into(), ty(&[n]))],
        &ty(&[n]),
        &format!("y = llm.erf x : {};", ty(&[n])),
    );
    let x = Value::Tensor(Tensor::from_f32(vec![n], DType::F32, x));
    agree(&ir, vec![x], 2.5e-7).unwrap();
}

/// The 4-bit float formats' scales decode exactly on every backend: mxfp4 blocks of every
/// E8M0 byte (infinite values from 254 up; on the CPU the subnormal scales of 0 and 1 too,
/// which a device's arithmetic may flush to zero) and nvfp4 sub-blocks of every UE4M3
/// byte (the top bit ignored, 0x7F reading as 0), each with all 16 codes in its nibbles,
/// dequantized to the reference's values.
#[test]
fn four_bit_float_scales_decode_exactly() {
    let codes: Vec<u8> = (0..16).map(|j| j | (15 - j) << 4).collect();
    let mxfp4 = |first: u8| -> Vec<u8> {
        (0..=255u8)
            .flat_map(|e| std::iter::once(e.max(first)).chain(codes.iter().copied()))
            .collect()
    };
    let nvfp4: Vec<u8> = (0..64u8)
        .flat_map(|b| {
            (0..4)
                .map(move |s| 4 * b + s)
                .chain(codes.iter().copied().cycle().take(32))
        })
        .collect();
    for (format, text, bytes, k, cpu_only) in [
        (QuantFormat::Mxfp4, "mxfp4", mxfp4(0), 1024, true),
        (QuantFormat::Mxfp4, "mxfp4", mxfp4(2), 1024, false),
        (QuantFormat::Nvfp4, "nvfp4", nvfp4.clone(), 512, false),
    ] {
        let n = 8;
        let ir = func(
            &[(
                "w".into(),
                format!("llm.quantized_tensor <{n}x{k}, {text}>"),
            )],
            &ty(&[n, k]),
            &format!("y = llm.dequantize w : {};", ty(&[n, k])),
        );
        let w = Value::Quantized(QTensor {
            shape: vec![n, k],
            format,
            bytes,
        });
        if cpu_only {
            cpu_agrees(&ir, vec![w], 0.0).unwrap();
        } else {
            agree(&ir, vec![w], 0.0).unwrap();
        }
    }
}

/// q8_0 activations against constant q1_0 and 4-bit float weights whose K is one block
/// beyond a multiple of 256: the CPU takes its generated decoders there, not the integer
/// kernels, which take groups of 256 values.
#[test]
fn q8_0_activations_beyond_the_kernels_groups() {
    for format in [QuantFormat::Q1_0, QuantFormat::Mxfp4, QuantFormat::Nvfp4] {
        let (m, n, k) = (3, 37, 256 + format.block_elems() as usize);
        let (ir, store) = quantized_activations([m, n, k], &format, 5);
        let args = vec![tensor(&[m, k], 6, 3.0), tensor(&[m, n], 7, 1.0)];
        agree_fused(&ir, args, &store, 1e-4, 1).unwrap();
    }
}

/// 16-bit weights widen exactly on every backend, infinities, subnormals and signed zeros
/// included: f16 and bf16 bits dequantized, and finite ones multiplied by one-hot x. (A
/// bf16 subnormal is an f32 subnormal, which a device's arithmetic may flush to zero, as
/// an H100 does, for f32 weights too: the products take the smallest normal bf16s.)
#[test]
fn sixteen_bit_weights_widen_exactly() {
    let f16_bits: [u16; 8] = [
        0x7c00, 0xfc00, 0x0001, 0x8001, 0x03ff, 0x7bff, 0x8000, 0x3555,
    ];
    let bf16_bits: [u16; 8] = [
        0x7f80, 0xff80, 0x0001, 0x8001, 0x007f, 0x7f7f, 0x8000, 0x3eab,
    ];
    let f16_finite: [u16; 6] = [0x0001, 0x8001, 0x03ff, 0x7bff, 0x8000, 0x3555];
    let bf16_finite: [u16; 6] = [0x0080, 0x8080, 0x3f80, 0x7f7f, 0x8000, 0x3eab];
    for (format, text, bits, finite) in [
        (QuantFormat::F16, "f16", f16_bits, f16_finite),
        (QuantFormat::BF16, "bf16", bf16_bits, bf16_finite),
    ] {
        // Rows of the values, then the same reversed.
        let matrix = |values: &[u16]| {
            let mut bytes: Vec<u8> = values.iter().flat_map(|b| b.to_le_bytes()).collect();
            bytes.extend(values.iter().rev().flat_map(|b| b.to_le_bytes()));
            let shape = vec![2, values.len()];
            Value::Quantized(QTensor {
                shape,
                format: format.clone(),
                bytes,
            })
        };
        let ir = func(
            &[("w".into(), format!("llm.quantized_tensor <2x8, {text}>"))],
            &ty(&[2, 8]),
            &format!("y = llm.dequantize w : {};", ty(&[2, 8])),
        );
        agree(&ir, vec![matrix(&bits)], 0.0).unwrap();
        let finite = matrix(&finite);
        let ir = func(
            &[
                ("x".into(), ty(&[1, 6])),
                ("w".into(), format!("llm.quantized_tensor <2x6, {text}>")),
            ],
            &ty(&[1, 2]),
            &format!("y = llm.quantized_matmul x, w : {};", ty(&[1, 2])),
        );
        for hot in 0..6 {
            let mut x = vec![0f32; 6];
            x[hot] = 1.0;
            let x = Value::Tensor(Tensor::from_f32(vec![1, 6], DType::F32, x));
            agree(&ir, vec![x, finite.clone()], 0.0).unwrap();
        }
    }
}

/// `quantized_matmul(x, w)` for x of `[m, k]` and a seeded weight of `[n, k]` in `format`,
/// on every backend against the reference.
fn matmul_agrees(
    format: &QuantFormat,
    [m, n, k]: [usize; 3],
    seed: u64,
    tol: f32,
) -> Result<(), TestCaseError> {
    let ir = func(
        &[
            ("x".into(), ty(&[m, k])),
            (
                "w".into(),
                format!("llm.quantized_tensor <{n}x{k}, {format}>"),
            ),
        ],
        &ty(&[m, n]),
        &format!("y = llm.quantized_matmul x, w : {};", ty(&[m, n])),
    );
    let q = quantized(format, [n, k], seed + 1);
    agree(&ir, vec![tensor(&[m, k], seed, 1.0), q], tol)
}

/// The bits of a float tensor's values.
fn bits(v: &Value) -> Vec<u32> {
    let floats = v.tensor().and_then(|t| t.floats()).expect("a float tensor");
    floats.iter().map(|f| f.to_bits()).collect()
}

/// How many [`format_case`]s there are.
const FORMAT_CASES: usize = 33;

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn matmul_transposed(m in 1usize..6, n in 1usize..40, k in 1usize..70, seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[m, k])), ("w".into(), ty(&[n, k]))],
            &ty(&[m, n]),
            &format!("y = llm.matmul x, w {{transpose_rhs = true}} : {};", ty(&[m, n])),
        );
        agree(&ir, vec![tensor(&[m, k], seed, 1.0), tensor(&[n, k], seed + 1, 1.0)], 1e-5)?;
    }

    /// A constant weight is repacked into panels; odd row counts leave row-major tails.
    #[test]
    fn matmul_constant_weight_in_panels(m in 1usize..4, n in 1usize..40, k in 1usize..70, norm in any::<bool>(), seed: u64) {
        let (op, extra, params) = if norm {
            ("rms_norm_matmul", "x, g, w", "eps = 1e-5, transpose_rhs = true")
        } else {
            ("matmul", "x, w", "transpose_rhs = true")
        };
        let body = format!(
            "w = llm.weight {{name = \"w\"}} : {};\n        g = llm.weight {{name = \"g\"}} : {};\n        y = llm.{op} {extra} {{{params}}} : {};",
            ty(&[n, k]), ty(&[k]), ty(&[m, n])
        );
        let ir = func(&[("x".into(), ty(&[m, k]))], &ty(&[m, n]), &body);
        let store = Store(vec![
            ("w".into(), Rc::new(tensor(&[n, k], seed + 1, 1.0))),
            ("g".into(), Rc::new(tensor(&[k], seed + 2, 1.0))),
        ]);
        agree_with(&ir, vec![tensor(&[m, k], seed, 1.0)], &store, 1e-5)?;
    }

    /// A constant `[k, n]` rhs (no `transpose_rhs`) is transposed into panels at compile
    /// time.
    #[test]
    fn matmul_constant_kn_weight(m in 1usize..4, n in 1usize..30, k in 1usize..40, seed: u64) {
        let body = format!(
            "w = llm.weight {{name = \"w\"}} : {};\n        y = llm.matmul x, w : {};",
            ty(&[k, n]), ty(&[m, n])
        );
        let ir = func(&[("x".into(), ty(&[m, k]))], &ty(&[m, n]), &body);
        let store = Store(vec![("w".into(), Rc::new(tensor(&[k, n], seed + 1, 1.0)))]);
        agree_with(&ir, vec![tensor(&[m, k], seed, 1.0)], &store, 1e-5)?;
    }

    /// Prompts of many rows: several tiles of rows and outputs in the tiled GPU shader,
    /// with the norm prologue and the residual epilogue.
    #[test]
    fn matmul_many_rows(m in 15usize..40, n in 1usize..40, k in 1usize..70, norm in any::<bool>(), seed: u64) {
        let (op, extra, params) = if norm {
            ("rms_norm_matmul", "x, g, w", "eps = 1e-5, transpose_rhs = true")
        } else {
            ("matmul", "x, w", "transpose_rhs = true")
        };
        let body = format!(
            "w = llm.weight {{name = \"w\"}} : {};\n        g = llm.weight {{name = \"g\"}} : {};\n        p = llm.{op} {extra} {{{params}}} : {};\n        y = llm.add p, r : {};",
            ty(&[n, k]), ty(&[k]), ty(&[m, n]), ty(&[m, n])
        );
        let ir = func(&[("x".into(), ty(&[m, k])), ("r".into(), ty(&[m, n]))], &ty(&[m, n]), &body);
        let store = Store(vec![
            ("w".into(), Rc::new(tensor(&[n, k], seed + 1, 1.0))),
            ("g".into(), Rc::new(tensor(&[k], seed + 2, 1.0))),
        ]);
        agree_fused(&ir, vec![tensor(&[m, k], seed, 1.0), tensor(&[m, n], seed + 3, 1.0)], &store, 1e-5, 1)?;
    }

    /// `add(r, matmul(x, w))` becomes one contraction with a residual epilogue (both
    /// operand orders; constant weights take the pair microkernel for m > 1).
    #[test]
    fn matmul_with_residual_epilogue(m in 1usize..5, n in 1usize..30, k in 1usize..40, swap in any::<bool>(), seed: u64) {
        let sum = if swap { "llm.add p, r" } else { "llm.add r, p" };
        let body = format!(
            "w = llm.weight {{name = \"w\"}} : {};\n        p = llm.matmul x, w {{transpose_rhs = true}} : {};\n        y = {sum} : {};",
            ty(&[n, k]), ty(&[m, n]), ty(&[m, n])
        );
        let ir = func(&[("x".into(), ty(&[m, k])), ("r".into(), ty(&[m, n]))], &ty(&[m, n]), &body);
        let store = Store(vec![("w".into(), Rc::new(tensor(&[n, k], seed + 1, 1.0)))]);
        agree_fused(&ir, vec![tensor(&[m, k], seed, 1.0), tensor(&[m, n], seed + 2, 1.0)], &store, 1e-5, 1)?;
    }

    #[test]
    fn matmul_batched_lhs(b in 1usize..3, m in 1usize..4, n in 1usize..20, k in 1usize..40, seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[b, m, k])), ("w".into(), ty(&[n, k]))],
            &ty(&[b, m, n]),
            &format!("y = llm.matmul x, w {{transpose_rhs = true}} : {};", ty(&[b, m, n])),
        );
        agree(&ir, vec![tensor(&[b, m, k], seed, 1.0), tensor(&[n, k], seed + 1, 1.0)], 1e-5)?;
    }

    #[test]
    fn rms_norm_matmul(m in 1usize..4, n in 1usize..30, k in 1usize..50, seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[m, k])), ("g".into(), ty(&[k])), ("w".into(), ty(&[n, k]))],
            &ty(&[m, n]),
            &format!("y = llm.rms_norm_matmul x, g, w {{eps = 1e-5, transpose_rhs = true}} : {};", ty(&[m, n])),
        );
        let args = vec![tensor(&[m, k], seed, 2.0), tensor(&[k], seed + 1, 1.0), tensor(&[n, k], seed + 2, 1.0)];
        agree(&ir, args, 1e-5)?;
    }

    #[test]
    fn quantized_matmul(m in 1usize..4, n in 1usize..20, blocks in 1usize..4, q4 in any::<bool>(), seed: u64) {
        let format = if q4 { QuantFormat::Q4_0 } else { QuantFormat::Q8_0 };
        matmul_agrees(&format, [m, n, 32 * blocks], seed, 1e-5)?;
    }

    /// Activations quantized to q8_0 (`quantize-activations`) meet the formats of 32-value
    /// blocks (q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl), the K-quants q2_k to q6_k, iq4_xs,
    /// the IQ3, IQ2 and IQ1 formats and the ternary formats in dot products on the CPU (integer
    /// ones where the CPU has them; dequantized first on
    /// the GPU),
    /// with static or run-time rows.
    #[test]
    fn q8_0_activations(m in 1usize..5, n in 1usize..150, blocks in 1usize..5, which in 0usize..24, dynamic in any::<bool>(), seed: u64) {
        let k_quants = [(QuantFormat::Q4K, "q4_k"), (QuantFormat::Q6K, "q6_k"), (QuantFormat::Q5K, "q5_k"), (QuantFormat::Q3K, "q3_k"), (QuantFormat::Q2K, "q2_k"), (QuantFormat::Iq4Xs, "iq4_xs"), (QuantFormat::Iq3Xxs, "iq3_xxs"), (QuantFormat::Iq3S, "iq3_s"), (QuantFormat::Iq2Xxs, "iq2_xxs"), (QuantFormat::Iq2Xs, "iq2_xs"), (QuantFormat::Iq2S, "iq2_s"), (QuantFormat::Iq1S, "iq1_s"), (QuantFormat::Iq1M, "iq1_m"), (QuantFormat::Tq1_0, "tq1_0"), (QuantFormat::Tq2_0, "tq2_0"), (QuantFormat::Mxfp4, "mxfp4"), (QuantFormat::Nvfp4, "nvfp4"), (QuantFormat::Q1_0, "q1_0")];
        let (format, name) = BLOCKS_OF_32.into_iter().chain(k_quants).nth(which).expect("a case");
        // Whole super-blocks of 256 for the k-quants, iq4_xs, the lattice and ternary
        // formats; for q1_0 and the 4-bit floats, whose integer kernels take groups of 256,
        // one block more on even `blocks`, so that the CPU's generated decoders take those K.
        let blocks_of_32 = which < BLOCKS_OF_32.len();
        let block = format.block_elems() as usize;
        let k = if blocks_of_32 {
            32 * blocks
        } else if block < 256 && blocks % 2 == 0 {
            256 * blocks.div_ceil(2) + block
        } else {
            256 * blocks.div_ceil(2)
        };
        let rows = if dynamic { "?".to_string() } else { m.to_string() };
        let y = format!("llm.tensor <{rows}x{n}xf32>");
        // The residual epilogue: added after each chunk of 64 weight rows.
        let ir = func(
            &[("x".into(), format!("llm.tensor <{rows}x{k}xf32>")), ("w".into(), format!("llm.quantized_tensor <{n}x{k}, {name}>")), ("r".into(), y.clone())],
            &y,
            &format!(
                "xq = llm.quantize x : llm.quantized_tensor <{rows}x{k}, q8_0>;\n        p = llm.quantized_matmul xq, w : {y};\n        y = llm.add p, r : {y};"
            ),
        );
        let q = quantized(&format, [n, k], seed + 1);
        let args = vec![tensor(&[m, k], seed, 3.0), q, tensor(&[m, n], seed + 2, 1.0)];
        // The interpreter adds k f32 products in order; the kernels' integer run sums are
        // exact, so they differ by the interpreter's rounding, which a sum that cancels
        // makes large beside the result (measured up to 3e-5 for the super-block formats,
        // and 2.2e-5 for q8_0 weights at k = 128, a result of 0.52 from products up to 3:
        // `kernels.proptest-regressions`).
        agree_fused(&ir, args, &Store(Vec::new()), 1e-4, 1)?;
    }

    /// A constant weight of 32-value blocks (`llm.weight`: q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl)
    /// that only quantized matmuls read is repacked into block panels: whole panels
    /// through the panel microkernel (or the generated code, reading rows in their
    /// panels), the last `n % 4` rows row major, across chunks and thread splits (from
    /// 65,536 multiply-adds), with the residual.
    /// (`lower/cpu/q8_0_block_panels.plir` shows that such a weight takes block panels.)
    #[test]
    fn q8_0_activations_with_block_panels(m in 1usize..4, n in 1usize..150, blocks in 1usize..9, which in 0usize..6, seed: u64) {
        let k = 32 * blocks;
        let format = BLOCKS_OF_32[which].0.clone();
        let (ir, store) = quantized_activations([m, n, k], &format, seed + 1);
        let args = vec![tensor(&[m, k], seed, 3.0), tensor(&[m, n], seed + 2, 1.0)];
        // Up to 256 products: the interpreter's f32 sum in order rounds where the
        // kernels' exact block sums do not (measured up to 1.9e-5).
        agree_fused(&ir, args, &store, 4e-5, 1)?;
    }

    /// A table of 32-value blocks that an embedding gathers from and a contraction of q8_0
    /// activations reads (a tied classifier) is repacked into block panels once, and the
    /// embedding gathers its rows from them.
    #[test]
    fn tied_quantized_table_in_block_panels(m in 1usize..4, n in 1usize..40, blocks in 1usize..4, which in 0usize..6, seed: u64) {
        let k = 32 * blocks;
        let (format, name) = BLOCKS_OF_32[which].clone();
        let ir = func(
            &[("ids".into(), ity(&[m]))],
            &ty(&[m, n]),
            &format!(
                "w = llm.weight {{name = \"w\"}} : llm.quantized_tensor <{n}x{k}, {name}>;\n        e = llm.embedding w, ids : {e};\n        xq = llm.quantize e : llm.quantized_tensor <{m}x{k}, q8_0>;\n        y = llm.quantized_matmul xq, w : {y};",
                e = ty(&[m, k]), y = ty(&[m, n]),
            ),
        );
        let q = quantized(&format, [n, k], seed + 1);
        let store = Store(vec![("w".into(), Rc::new(q))]);
        let ids: Vec<i64> = values(seed + 2, m, 1.0).iter().map(|v| ((v + 1.0) / 2.0 * n as f32) as i64 % n as i64).collect();
        let args = vec![ints(&[m], ids)];
        let (ctx, func, _, hoisted) = reference(&ir, &args, &store)?;
        let program = Program::build(&ctx, func, &hoisted, &Options::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(program.stats().panel_gathers, 1, "the embedding gathers from the block panels");
        agree_with(&ir, args, &store, 4e-5)?;
    }

    /// A weight whose values are all exactly f16 (a converted f16 model) is stored as f16
    /// on a device with `shader-f16`, and so is the table of an embedding tied to it; a
    /// weight that is not stays f32.
    #[test]
    fn f16_exact_weights_on_the_gpu(m in 1usize..4, n in 1usize..40, k in 1usize..70, exact in any::<bool>(), seed: u64) {
        let body = format!(
            "w = llm.weight {{name = \"w\"}} : {};\n        e = llm.embedding w, ids : {};\n        y = llm.matmul e, w {{transpose_rhs = true}} : {};",
            ty(&[n, k]), ty(&[m, k]), ty(&[m, n])
        );
        let ir = func(&[("ids".into(), format!("llm.tensor <{m}xi32>"))], &ty(&[m, n]), &body);
        let mut w = values(seed, n * k, 1.0);
        if exact {
            w.iter_mut().for_each(|x| *x = half::f16::from_f32(*x).to_f32());
        }
        let store = Store(vec![("w".into(), Rc::new(Value::Tensor(Tensor::from_f32(vec![n, k], DType::F32, w))))]);
        let ids: Vec<i64> = (0..m as i64).map(|i| (i * 7 + seed as i64 % 5).rem_euclid(n as i64)).collect();
        let ids = Value::Tensor(Tensor::from_i64(vec![m], DType::I32, ids));
        gpu_agrees_with(&ir, vec![ids], &store, 1e-5, usize::from(exact))?;
    }

    /// 16-bit weights of any shape against up to 7 rows of x: every tail of the row
    /// kernels (chunks of 32 and 8, single values).
    #[test]
    fn sixteen_bit_matmuls(m in 1usize..8, n in 1usize..12, k in 1usize..80, brain in any::<bool>(), seed: u64) {
        let format = if brain { QuantFormat::BF16 } else { QuantFormat::F16 };
        matmul_agrees(&format, [m, n, k], seed, 2e-5)?;
    }

    /// A constant 16-bit weight (`llm.weight`) is repacked into panels: whole panels
    /// through the panel microkernels (or the generated code reading them), the last
    /// `n % 4` rows row major, across tiles of three, two and one rows of x and thread
    /// splits (from 65,536 multiply-adds); with `tied`, an embedding gathers its rows out
    /// of the panels too.
    #[test]
    fn sixteen_bit_constant_weights_in_panels(m in 1usize..8, n in 1usize..40, k in prop::sample::select(vec![1usize, 3, 4, 7, 8, 12, 13, 16, 21, 64, 100, 1027]), brain in any::<bool>(), tied in any::<bool>(), seed: u64) {
        let format = if brain { QuantFormat::BF16 } else { QuantFormat::F16 };
        let w_ty = format!("llm.quantized_tensor <{n}x{k}, {}>", format.name());
        let (args, x) = if tied {
            let ids: Vec<i64> = values(seed + 2, m, 1.0).iter().map(|v| ((v + 1.0) / 2.0 * n as f32) as i64 % n as i64).collect();
            (vec![("ids".to_string(), ity(&[m]))], vec![ints(&[m], ids)])
        } else {
            (vec![("x".to_string(), ty(&[m, k]))], vec![tensor(&[m, k], seed, 1.0)])
        };
        let embed = if tied { format!("x = llm.embedding w, ids : {};\n        ", ty(&[m, k])) } else { String::new() };
        let ir = func(
            &args,
            &ty(&[m, n]),
            &format!("w = llm.weight {{name = \"w\"}} : {w_ty};\n        {embed}y = llm.quantized_matmul x, w : {};", ty(&[m, n])),
        );
        let store = Store(vec![("w".into(), Rc::new(quantized(&format, [n, k], seed + 1)))]);
        let (ctx, f, _, hoisted) = reference(&ir, &x, &store)?;
        let program = Program::build(&ctx, f, &hoisted, &Options::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(program.stats().panel_contractions, 1, "the weight is read in panels");
        prop_assert_eq!(program.stats().panel_gathers, usize::from(tied), "the embedding gathers from the panels");
        agree_with(&ir, x, &store, 1e-4)?;
    }

    /// 16-bit sibling weights that `fuse` merged (an `llm.concat` of constant weights, read
    /// by one quantized matmul) are packed into panels from their parts on the CPU (panels
    /// that straddle two parts included), and stacked for the GPU; on the CPU every row
    /// gives the bits it gives unmerged (rows add in the panels' order wherever they lie).
    #[test]
    fn merged_sixteen_bit_siblings(m in 1usize..6, n1 in 1usize..14, n2 in 1usize..14, k in 1usize..40, brain in any::<bool>(), seed: u64) {
        let format = if brain { QuantFormat::BF16 } else { QuantFormat::F16 };
        let q = |n: usize| format!("llm.quantized_tensor <{n}x{k}, {}>", format.name());
        let n = n1 + n2;
        let ir = func(
            &[("x".into(), ty(&[m, k]))],
            &ty(&[m, n]),
            &format!(
                "a = llm.weight {{name = \"a\"}} : {};\n        b = llm.weight {{name = \"b\"}} : {};\n        w = llm.concat a, b {{axis = 0}} : {};\n        y = llm.quantized_matmul x, w : {};",
                q(n1), q(n2), q(n), ty(&[m, n])
            ),
        );
        let store = Store(vec![
            ("a".into(), Rc::new(quantized(&format, [n1, k], seed + 1))),
            ("b".into(), Rc::new(quantized(&format, [n2, k], seed + 2))),
        ]);
        let x = vec![tensor(&[m, k], seed, 1.0)];
        let (ctx, f, _, hoisted) = reference(&ir, &x, &store)?;
        let program = Program::build(&ctx, f, &hoisted, &Options::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(program.stats().panel_contractions, 1, "the merged weight is read in panels");
        // Each part's rows give the bits they give unmerged, wherever the panels cut them.
        let merged = bits(&program.run(&ctx, &store, x.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?[0]);
        let apart = func(
            &[("x".into(), ty(&[m, k]))],
            &ty(&[m, n]),
            &format!(
                "a = llm.weight {{name = \"a\"}} : {};\n        b = llm.weight {{name = \"b\"}} : {};\n        ya = llm.quantized_matmul x, a : {};\n        yb = llm.quantized_matmul x, b : {};\n        y = llm.concat ya, yb {{axis = 1}} : {};",
                q(n1), q(n2), ty(&[m, n1]), ty(&[m, n2]), ty(&[m, n])
            ),
        );
        let (actx, af, _, ahoisted) = reference(&apart, &x, &store)?;
        let separate = Program::build(&actx, af, &ahoisted, &Options::default()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let outs = separate.run(&actx, &store, x.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(merged, bits(&outs[0]), "merged rows differ from their parts' products");
        agree_with(&ir, x, &store, 2e-5)?;
    }

    /// Every other weight format ([`format_case`]), dequantized in the contraction kernel
    /// of both backends.
    #[test]
    fn quantized_formats(m in 1usize..3, half_n in 1usize..6, blocks in 1usize..3, seed: u64) {
        let n = 2 * half_n;
        for which in 0..FORMAT_CASES {
            let (k, format, text) = format_case(which, blocks);
            let ir = func(
                &[("x".into(), ty(&[m, k])), ("w".into(), format!("llm.quantized_tensor <{n}x{k}, {text}>"))],
                &ty(&[m, n]),
                &format!("y = llm.quantized_matmul x, w : {};", ty(&[m, n])),
            );
            let q = quantized(&format, [n, k], seed + 1);
            agree(&ir, vec![tensor(&[m, k], seed, 1.0), q], 2e-5)?;
        }
    }

    #[test]
    fn rms_norm(m in 1usize..4, d in 1usize..70, seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[m, d])), ("g".into(), ty(&[d]))],
            &ty(&[m, d]),
            &format!("y = llm.rms_norm x, g {{eps = 1e-5}} : {};", ty(&[m, d])),
        );
        agree(&ir, vec![tensor(&[m, d], seed, 3.0), tensor(&[d], seed + 1, 1.0)], 1e-5)?;
    }

    #[test]
    fn softmax(m in 1usize..4, n in 1usize..70, seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[m, n]))],
            &ty(&[m, n]),
            &format!("y = llm.softmax x {{axis = -1}} : {};", ty(&[m, n])),
        );
        agree(&ir, vec![tensor(&[m, n], seed, 8.0)], 2e-6)?;
    }

    #[test]
    fn argmax(m in 1usize..4, n in 1usize..40, ties in any::<bool>(), seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[m, n]))],
            &ity(&[m]),
            &format!("y = llm.argmax x {{axis = -1}} : {};", ity(&[m])),
        );
        // Rounded values make ties common (the first maximum wins).
        let x: Vec<f32> = values(seed, m * n, 4.0).iter().map(|v| if ties { v.round() } else { *v }).collect();
        agree(&ir, vec![Value::Tensor(Tensor::from_f32(vec![m, n], DType::F32, x))], 0.0)?;
    }

    /// Softmax and argmax along an axis that is not the last (columns in groups of four
    /// lanes and a tail on the CPU).
    #[test]
    fn reductions_along_any_axis(a in 1usize..4, n in 1usize..40, c in 1usize..10, ties in any::<bool>(), seed: u64) {
        let body = format!(
            "s = llm.softmax x {{axis = 1}} : {};\n        i = llm.argmax x {{axis = 1}} : {};",
            ty(&[a, n, c]), ity(&[a, c])
        );
        let ir = format!(
            "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({x}) -> ({x}, {i})> {{\n      ^body(x: {x}):\n        {body}\n        llm.return s, i\n    }}\n}}\n",
            x = ty(&[a, n, c]), i = ity(&[a, c]),
        );
        let x: Vec<f32> = values(seed, a * n * c, 4.0).iter().map(|v| if ties { v.round() } else { *v }).collect();
        agree(&ir, vec![Value::Tensor(Tensor::from_f32(vec![a, n, c], DType::F32, x))], 2e-6)?;
    }

    /// Transposes of ranks 1 to 4, and concatenations along every axis, of floats and
    /// integers.
    #[test]
    fn transpose_and_concat(dims in proptest::collection::vec(1usize..6, 1..=4), rot in 0usize..4, axis in 0usize..4, extra in 1usize..4, seed: u64) {
        let rank = dims.len();
        let perm: Vec<usize> = (0..rank).map(|i| (i + rot) % rank).collect();
        let axis = axis % rank;
        let mut other = dims.clone();
        other[axis] = extra;
        let mut joined = dims.clone();
        joined[axis] += extra;
        let transposed: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
        let body = format!(
            "t = llm.transpose x {{perm = [{}]}} : {};\n        c = llm.concat x, z, x {{axis = {axis}}} : {};\n        k = llm.concat i, j {{axis = {axis}}} : {};",
            perm.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
            ty(&transposed),
            ty(&{ let mut d = dims.clone(); d[axis] = 2 * dims[axis] + extra; d }),
            ity(&joined),
        );
        let (x_t, z_t, i_t, j_t) = (ty(&dims), ty(&other), ity(&dims), ity(&other));
        let mut triple = dims.clone();
        triple[axis] = 2 * dims[axis] + extra;
        let ir = format!(
            "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({x_t}, {z_t}, {i_t}, {j_t}) -> ({}, {}, {})> {{\n      ^body(x: {x_t}, z: {z_t}, i: {i_t}, j: {j_t}):\n        {body}\n        llm.return t, c, k\n    }}\n}}\n",
            ty(&transposed), ty(&triple), ity(&joined),
        );
        let count = |d: &[usize]| d.iter().product::<usize>();
        let int_tensor = |d: &[usize], seed: u64| {
            let v: Vec<i64> = values(seed, count(d), 100.0).iter().map(|&x| x as i64).collect();
            ints(d, v)
        };
        agree(&ir, vec![tensor(&dims, seed, 1.0), tensor(&other, seed + 1, 1.0), int_tensor(&dims, seed + 2), int_tensor(&other, seed + 3)], 0.0)?;
    }

    /// Slices of any dims with any steps, of floats and integers: strided copies on both
    /// backends (the column slices take their own kernel).
    #[test]
    fn strided_slices(dims in proptest::collection::vec(1usize..7, 1..=4), picks in proptest::collection::vec((0usize..6, 1usize..4), 4), seed: u64) {
        let rank = dims.len();
        let starts: Vec<usize> = (0..rank).map(|d| picks[d].0 % dims[d]).collect();
        let steps: Vec<usize> = (0..rank).map(|d| picks[d].1).collect();
        let sizes: Vec<usize> = (0..rank).map(|d| (dims[d] - starts[d]).div_ceil(steps[d])).collect();
        let attrs = format!("{{starts = [{}], steps = [{}]}}", list(&starts), list(&steps));
        moves_floats_and_ints("llm.slice", &attrs, (&dims, &sizes), seed)?;
    }

    /// Transposes of rank 5 and 6 (rotations of the dims, whose runs merge into two on the
    /// GPU's strided copy), of floats and integers.
    #[test]
    fn transposes_above_rank_four(dims in proptest::collection::vec(1usize..4, 5..=6), rot in 1usize..6, seed: u64) {
        let rank = dims.len();
        let perm: Vec<usize> = (0..rank).map(|i| (i + rot) % rank).collect();
        let out: Vec<usize> = perm.iter().map(|&p| dims[p]).collect();
        let attrs = format!("{{perm = [{}]}}", list(&perm));
        moves_floats_and_ints("llm.transpose", &attrs, (&dims, &out), seed)?;
    }

    /// Embeddings gathered from quantized and f16 tables, exactly the reference's rows.
    #[test]
    fn embedding_of_packed_tables(rows in 1usize..5, vocab in 2usize..7, seed: u64) {
        for which in 0..24 {
            let ids: Vec<i64> = values(seed + 2, rows, 1.0).iter().map(|v| ((v + 1.0) / 2.0 * vocab as f32) as i64 % vocab as i64).collect();
            let (dim, table_ty, table) = if which == 5 {
                let dim = 6;
                let w: Vec<f32> = values(seed, vocab * dim, 1.0).iter().map(|&x| half::f16::from_f32(x).to_f32()).collect();
                (dim, format!("llm.tensor <{vocab}x{dim}xf16>"), Value::Tensor(Tensor::from_f32(vec![vocab, dim], DType::F16, w)))
            } else {
                let (dim, format, text) = match which {
                    0 => (64, QuantFormat::Q8_0, "q8_0".to_string()),
                    1 => (32, QuantFormat::Q4_0, "q4_0".into()),
                    2 => (256, QuantFormat::Q6K, "q6_k".into()),
                    3 => (64, QuantFormat::Nf4 { block_size: 32, scale: DType::F16 }, "nf4 {block_size = 32, scale = f16}".into()),
                    4 => (12, QuantFormat::Affine { bits: 8, group_size: 1, symmetric: false, axis: 0, scale: DType::BF16 }, "int8 {group_size = 1, symmetric = false, axis = 0, scale = bf16}".into()),
                    6 => (256, QuantFormat::Q5K, "q5_k".into()),
                    7 => (64, QuantFormat::Q5_0, "q5_0".into()),
                    8 => (32, QuantFormat::Q5_1, "q5_1".into()),
                    9 => (96, QuantFormat::Iq4Nl, "iq4_nl".into()),
                    10 => (256, QuantFormat::Iq4Xs, "iq4_xs".into()),
                    11 => (256, QuantFormat::Iq3Xxs, "iq3_xxs".into()),
                    12 => (512, QuantFormat::Iq3S, "iq3_s".into()),
                    13 => (256, QuantFormat::Iq2Xxs, "iq2_xxs".into()),
                    14 => (512, QuantFormat::Iq2Xs, "iq2_xs".into()),
                    15 => (256, QuantFormat::Iq2S, "iq2_s".into()),
                    16 => (256, QuantFormat::Iq1S, "iq1_s".into()),
                    17 => (512, QuantFormat::Iq1M, "iq1_m".into()),
                    18 => (256, QuantFormat::Tq1_0, "tq1_0".into()),
                    19 => (512, QuantFormat::Tq2_0, "tq2_0".into()),
                    20 => (64, QuantFormat::Mxfp4, "mxfp4".into()),
                    21 => (128, QuantFormat::Nvfp4, "nvfp4".into()),
                    22 => (256, QuantFormat::Q1_0, "q1_0".into()),
                    _ => (512, QuantFormat::Q3K, "q3_k".into()),
                };
                (dim, format!("llm.quantized_tensor <{vocab}x{dim}, {text}>"), quantized(&format, [vocab, dim], seed))
            };
            let ir = func(
                &[("table".into(), table_ty), ("ids".into(), ity(&[rows]))],
                &ty(&[rows, dim]),
                &format!("y = llm.embedding table, ids : {};", ty(&[rows, dim])),
            );
            agree(&ir, vec![table, ints(&[rows], ids)], 0.0)?;
        }
    }

    /// `llm.quantize` into the block formats, nf4 and the affine formats (every scale type,
    /// groups along either dim, with and without zero points, all-zero blocks too), byte
    /// for byte as the reference quantizes, and quantized values fed on to a quantized
    /// matmul, on both backends.
    #[test]
    fn quantize(rows in 1usize..6, blocks in 1usize..4, scale in prop::sample::select(vec![0.0f32, 1e-3, 1.0, 300.0, 3e4]), seed: u64) {
        let k = 32 * blocks;
        for text in [
            "q8_0", "q4_0", "q4_1",
            "nf4 {block_size = 32, scale = f16}", "nf4 {block_size = 16, scale = bf16}", "nf4 {block_size = 8, scale = f32}",
            "int8 {group_size = 32, axis = 1, scale = f32}",
            "int4 {group_size = 16, symmetric = false, axis = 1, scale = bf16}",
            "int2 {group_size = 4, symmetric = false, axis = 1, scale = f16}",
            "int8 {group_size = 1, symmetric = false, axis = 0, scale = f16}",
            "int4 {group_size = 32, axis = 1, scale = f16}",
        ] {
            let qt = format!("llm.quantized_tensor <{rows}x{k}, {text}>");
            let ir = format!(
                "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({x}, {a}) -> ({qt}, {y})> {{\n      ^body(x: {x}, a: {a}):\n        q = llm.quantize x : {qt};\n        y = llm.quantized_matmul a, q : {y};\n        llm.return q, y\n    }}\n}}\n",
                x = ty(&[rows, k]), a = ty(&[2, k]), y = ty(&[2, rows]),
            );
            // The bytes must be equal; the product's sums of terms up to `scale` in size
            // cancel, so its tolerance grows with the scale.
            let args = vec![tensor(&[rows, k], seed, scale), tensor(&[2, k], seed + 1, 1.0)];
            agree(&ir, args, 1e-5 * scale.max(1.0))?;
        }
    }

    /// `llm.quantize` into the K-quants, byte for byte as the reference quantizes, on rows
    /// whose sub-blocks of 16 differ in magnitude by up to 1e9 (so some scales quantize to
    /// level 0 and keep the search's codes), with all-positive, constant and all-zero
    /// sub-blocks among them; the values fed on to a quantized matmul. On the CPU in
    /// generated code, on the GPU in shaders (one invocation per super-block, or two for
    /// q6_k's 210 bytes).
    #[test]
    fn k_quantize(rows in 1usize..4, blocks in 1usize..3, scale in prop::sample::select(vec![0.0f32, 1e-3, 1.0, 3e4]), seed: u64) {
        let k = 256 * blocks;
        let mut x = values(seed, rows * k, scale);
        for (g, group) in x.chunks_mut(16).enumerate() {
            let pick = (seed as usize).wrapping_add(7 * g) % 8;
            match pick {
                0 => group.iter_mut().for_each(|v| *v = v.abs()),
                1 => group.iter_mut().for_each(|v| *v = scale * 0.5),
                2 => group.iter_mut().for_each(|v| *v = 0.0),
                _ => {
                    let magnitude = 10f32.powi(pick as i32 - 6);
                    group.iter_mut().for_each(|v| *v *= magnitude);
                }
            }
        }
        let x = Value::Tensor(Tensor::from_f32(vec![rows, k], DType::F32, x));
        for text in ["q4_k", "q6_k", "q2_k"] {
            let qt = format!("llm.quantized_tensor <{rows}x{k}, {text}>");
            let ir = format!(
                "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({xt}, {a}) -> ({qt}, {y})> {{\n      ^body(x: {xt}, a: {a}):\n        q = llm.quantize x : {qt};\n        y = llm.quantized_matmul a, q : {y};\n        llm.return q, y\n    }}\n}}\n",
                xt = ty(&[rows, k]), a = ty(&[2, k]), y = ty(&[2, rows]),
            );
            let args = vec![x.clone(), tensor(&[2, k], seed + 1, 1.0)];
            agree(&ir, args, 1e-4 * scale.max(1.0))?;
        }
    }

    /// f16 and bf16 norms, matmuls, rope, attention, softmax and argmax run no op through
    /// the reference once `widen-floats` has put them in f32 between casts, on the CPU
    /// and the GPU, and give the interpreter's results on the IR as written (within one
    /// unit in the last place: the kernels sum in another order than the reference, so a
    /// rounding to the narrow type may land on the neighbour).
    #[test]
    fn narrow_float_ops_lower_after_widen_floats(m in 1usize..6, seed: u64) {
        for dtype in [DType::F16, DType::BF16] {
            let t = |shape: &[usize]| {
                let s: Vec<String> = shape.iter().map(ToString::to_string).collect();
                format!("llm.tensor <{}x{}>", s.join("x"), dtype.name())
            };
            let narrow = |shape: &[usize], seed: u64| {
                let n = shape.iter().product();
                let v = values(seed, n, 1.0).iter().map(|&x| round_float(dtype, x)).collect();
                Value::Tensor(Tensor::from_f32(shape.to_vec(), dtype, v))
            };
            let (x, g, w, h) = (t(&[m, 32]), t(&[32]), t(&[32, 32]), t(&[m, 2, 16]));
            let pos = format!("llm.tensor <{m}xi32>");
            let ir = format!(
                "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({x}, {g}, {w}, {pos}) -> ({h}, {x}, {pos})> {{\n      ^body(x: {x}, g: {g}, w: {w}, pos: {pos}):\n        n = llm.rms_norm x, g {{eps = 1e-5}} : {x};\n        q = llm.matmul n, w {{transpose_rhs = true}} : {x};\n        qh = llm.reshape q : {h};\n        r = llm.rope qh, pos {{theta = 10000.0}} : {h};\n        a = llm.attention r, r, r {{kv_heads = 2, causal = true}} : {h};\n        s = llm.softmax q : {x};\n        i = llm.argmax s {{axis = -1}} : {pos};\n        llm.return a, s, i\n    }}\n}}\n"
            );
            let positions = Value::Tensor(Tensor::from_i64(vec![m], DType::I32, (0..m as i64).collect()));
            let args = vec![narrow(&[m, 32], seed), narrow(&[32], seed + 1), narrow(&[32, 32], seed + 2), positions];
            let store = Store(Vec::new());
            let (_, _, want, _) = reference(&ir, &args, &store)?;
            let mut ctx = Context::new();
            let module = text::parse_module(&mut ctx, &ir).map_err(|d| TestCaseError::fail(d.render("t")))?;
            Pipeline::parse("widen-floats")
                .expect("a pipeline")
                .run(&mut ctx, module, &RunConfig::default())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let func = interp::find_func(&ctx, module, "f").expect("@f");
            let hoisted = Hoisted::default();
            let mut runs = Vec::new();
            for threads in [1, 2] {
                let options = Options { target: Target::Host, threads, microkernels: true };
                let program = Program::build(&ctx, func, &hoisted, &options).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(program.stats().reference_ops.is_empty(), "{:?}", program.stats());
                let got = program.run(&ctx, &store, args.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                runs.push((format!("cpu, {threads} threads"), got));
            }
            if let Some(gpu) = gpu() {
                runs.extend(runs_on_gpu(gpu, &ctx, func, &hoisted, (&store, &args), |stats| {
                    prop_assert!(stats.reference_ops.is_empty(), "{stats:?}");
                    Ok(())
                })?);
            }
            // The kernels' f32 results differ from the reference's in the last bits, so
            // an intermediate (q, the norm) can round to the neighbouring narrow value
            // and move what follows by an ulp or two (f16 attention was seen 1.3 epsilons
            // off); allow four of the type's epsilons.
            let epsilon = if dtype == DType::F16 { 2f32.powi(-10) } else { 2f32.powi(-7) };
            compare(&runs, &want, 4.0 * epsilon, &ir)?;
        }
    }

    /// `llm.dequantize` of a tensor that is an argument (so not evaluated at load), in
    /// every format.
    #[test]
    fn dequantize(half_n in 1usize..4, blocks in 1usize..3, seed: u64) {
        let n = 2 * half_n;
        for which in 0..FORMAT_CASES + 2 {
            let (k, format, text) = match which {
                FORMAT_CASES => (32 * blocks, QuantFormat::Q8_0, "q8_0".to_string()),
                w if w > FORMAT_CASES => (32 * blocks, QuantFormat::Q4_0, "q4_0".into()),
                w => format_case(w, blocks),
            };
            let ir = func(
                &[("w".into(), format!("llm.quantized_tensor <{n}x{k}, {text}>"))],
                &ty(&[n, k]),
                &format!("y = llm.dequantize w : {};", ty(&[n, k])),
            );
            let q = quantized(&format, [n, k], seed);
            agree(&ir, vec![q], 1e-6)?;
        }
    }

    #[test]
    fn layer_norm(m in 1usize..4, d in 1usize..70, seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[m, d])), ("w".into(), ty(&[d])), ("b".into(), ty(&[d]))],
            &ty(&[m, d]),
            &format!("y = llm.layer_norm x, w, b {{eps = 1e-5}} : {};", ty(&[m, d])),
        );
        let args = vec![tensor(&[m, d], seed, 3.0), tensor(&[d], seed + 1, 1.0), tensor(&[d], seed + 2, 1.0)];
        agree(&ir, args, 2e-5)?;
    }

    #[test]
    fn unary(n in 1usize..40, op in prop::sample::select(vec!["exp", "neg", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "gelu", "erf", "relu"]), seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[n]))],
            &ty(&[n]),
            &format!("y = llm.{op} x : {};", ty(&[n])),
        );
        let x = match op {
            // Positive inputs for the roots.
            "sqrt" | "rsqrt" => Value::Tensor(Tensor::from_f32(vec![n], DType::F32, values(seed, n, 4.0).iter().map(|v| v.abs() + 0.01).collect())),
            _ => tensor(&[n], seed, 10.0),
        };
        agree(&ir, vec![x], 2e-6)?;
    }

    #[test]
    fn binary(rows in 1usize..4, n in 1usize..40, op in prop::sample::select(vec!["add", "sub", "mul", "div", "maximum", "minimum"]), seed: u64) {
        let ir = func(
            &[("a".into(), ty(&[rows, n])), ("b".into(), ty(&[rows, n]))],
            &ty(&[rows, n]),
            &format!("y = llm.{op} a, b : {};", ty(&[rows, n])),
        );
        agree(&ir, vec![tensor(&[rows, n], seed, 5.0), tensor(&[rows, n], seed + 1, 5.0)], 1e-6)?;
    }

    /// `llm.maximum` and `llm.minimum` of zeros of two signs and of NaNs on either side,
    /// alone and in a fused body: every backend gives the reference's values (a NaN where
    /// either operand is one, `+0` the maximum and `-0` the minimum of `+0` and `-0`).
    #[test]
    fn extrema_of_zeros_and_nans(op in prop::sample::select(vec!["maximum", "minimum"]), seed: u64) {
        let n = 16;
        let t = ty(&[n]);
        let body = format!(
            "y = llm.{op} a, b : {t};\n        z = llm.fused a, b : {t}\n        {{\n          ^bb0(p: llm.tensor <f32>, q: llm.tensor <f32>):\n            r = llm.{op} p, q : llm.tensor <f32>;\n            s = llm.add r, r : llm.tensor <f32>;\n            llm.yield s\n        }};\n        w = llm.add y, z : {t};"
        );
        let ir = func(&[("a".into(), t.clone()), ("b".into(), t.clone())], &t, &body)
            .replace("llm.return y", "llm.return w");
        let specials = [(0.0, -0.0), (-0.0, 0.0), (-0.0, -0.0), (f32::NAN, 1.0), (1.0, f32::NAN), (f32::NAN, f32::NAN), (-0.0, 2.0), (f32::INFINITY, f32::NEG_INFINITY)];
        let (mut a, mut b) = (values(seed, n, 4.0), values(seed + 1, n, 4.0));
        for (i, (x, y)) in specials.into_iter().enumerate() {
            (a[i], b[i]) = (x, y);
        }
        let tensor = |v: Vec<f32>| Value::Tensor(Tensor::from_f32(vec![n], DType::F32, v));
        agree(&ir, vec![tensor(a), tensor(b)], 0.0)?;
    }

    /// A clamp (OLMo's `clip_qkv`), `min(max(x, -c), c)`, fused into one body: every
    /// backend keeps the reference's NaNs and infinities.
    #[test]
    fn fused_clamp(n in 1usize..50, seed: u64) {
        let t = ty(&[n]);
        let body = format!(
            "y = llm.fused a : {t}\n        {{\n          ^bb0(p: llm.tensor <f32>):\n            lo = llm.constant {{value = -1.5}} : llm.tensor <f32>;\n            hi = llm.constant {{value = 1.5}} : llm.tensor <f32>;\n            m = llm.maximum p, lo : llm.tensor <f32>;\n            r = llm.minimum m, hi : llm.tensor <f32>;\n            llm.yield r\n        }};"
        );
        let ir = func(&[("a".into(), t.clone())], &t, &body);
        let mut x = values(seed, n, 4.0);
        for (i, special) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0].into_iter().enumerate() {
            if let Some(v) = x.get_mut(i * 3) {
                *v = special;
            }
        }
        agree(&ir, vec![Value::Tensor(Tensor::from_f32(vec![n], DType::F32, x))], 0.0)?;
    }

    #[test]
    fn fused_swiglu(n in 1usize..50, seed: u64) {
        let t = ty(&[n]);
        let body = format!(
            "y = llm.fused a, b : {t}\n        {{\n          ^bb0(p: llm.tensor <f32>, q: llm.tensor <f32>):\n            s = llm.silu p : llm.tensor <f32>;\n            c = llm.constant {{value = 0.5}} : llm.tensor <f32>;\n            h = llm.mul s, c : llm.tensor <f32>;\n            r = llm.mul h, q : llm.tensor <f32>;\n            llm.yield r\n        }};"
        );
        let ir = func(&[("a".into(), t.clone()), ("b".into(), t.clone())], &t, &body);
        agree(&ir, vec![tensor(&[n], seed, 6.0), tensor(&[n], seed + 1, 2.0)], 2e-6)?;
    }
}

/// Quantization where codes fall exactly halfway: q8_0 rounds them away from zero (C's
/// `roundf`), q4_0 and q4_1 truncate after adding one half.
#[test]
fn quantize_ties() {
    // 127 (q8_0: d = 1) or -8 (q4_0: d = 1), then halves of both signs.
    for (text, first) in [("q8_0", 127.0f32), ("q4_0", -8.0), ("q4_1", -7.5)] {
        let mut x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 2.0).collect();
        x[0] = first;
        let qt = format!("llm.quantized_tensor <1x32, {text}>");
        let ir = format!(
            "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({x}) -> ({qt})> {{\n      ^body(x: {x}):\n        y = llm.quantize x : {qt};\n        llm.return y\n    }}\n}}\n",
            x = ty(&[1, 32]),
        );
        agree(
            &ir,
            vec![Value::Tensor(Tensor::from_f32(vec![1, 32], DType::F32, x))],
            0.0,
        )
        .unwrap();
    }
}

/// Checks that every op runs a kernel (none takes the reference path) and that there are
/// `kernel_ops` of them.
fn expect_lowering(stats: &LoweringStats, kernel_ops: usize) {
    assert!(stats.reference_ops.is_empty(), "{stats:?}");
    assert_eq!(stats.kernel_ops, kernel_ops, "{stats:?}");
}

/// Partial maxima and minima (function arguments: no op makes them, some of them NaN)
/// reduced by an all-reduce and a reduce-scatter gathered back: the folds run in
/// generated code on the CPU and as shaders on the GPU, and the results are the
/// interpreter's exactly.
#[test]
fn max_and_min_collectives_run_in_generated_code() {
    let (m, k) = (3, 10);
    let mesh = "mesh = [dp = 2, tp = 2]";
    let sharded = |split: &str, partial: &str| {
        format!("llm.sharded_tensor <{m}x{k}xf32, {mesh}, split = {split}{partial}>")
    };
    for (reduction, name) in [(Reduction::Max, "max"), (Reduction::Min, "min")] {
        let p = sharded("[[], []]", &format!(", partial = {name} [tp]"));
        let body = format!(
            "r = llm.all_reduce p {{mesh_axes = [tp]}} : {r};\n        s = llm.reduce_scatter p {{dim = 1, mesh_axes = [tp]}} : {sc};\n        g = llm.all_gather s {{dim = 1, mesh_axes = [tp]}} : {r};\n        a = llm.unshard r : {t};\n        c = llm.unshard g : {t};\n        y = llm.add a, c : {t};",
            r = sharded("[[], []]", ""),
            sc = sharded("[[], [tp]]", ""),
            t = ty(&[m, k]),
        );
        let ir = func(&[("p".into(), p)], &ty(&[m, k]), &body);
        // The two devices of each dp group hold different partial values; the groups
        // agree (the unshard checks that the devices agree once reduced). A NaN loses to
        // a number (element 0 of the even devices) and two NaNs stay NaN (element 1).
        let parts: Vec<Tensor> = (0..4u64)
            .map(|d| match tensor(&[m, k], 10 + d % 2, 1.0) {
                Value::Tensor(mut t) => {
                    if let Data::Float(v) = &mut t.data {
                        if d % 2 == 0 {
                            v[0] = f32::NAN;
                        }
                        v[1] = f32::NAN;
                    }
                    t
                }
                _ => unreachable!("a tensor"),
            })
            .collect();
        let arg = Value::Sharded(Sharded {
            shape: vec![m, k],
            mesh: vec![("dp".into(), 2), ("tp".into(), 2)],
            split: vec![vec![], vec![]],
            partial: vec!["tp".into()],
            reduction,
            shards: parts,
        });
        let (ctx, func, want, hoisted) =
            reference(&ir, std::slice::from_ref(&arg), &Store(Vec::new())).expect("reference");
        let program = Program::build(&ctx, func, &hoisted, &Options::default()).expect("compiles");
        // The two collectives, the all-gather, two unshards and the final add.
        expect_lowering(program.stats(), 6);
        let got = program
            .run(&ctx, &Store(Vec::new()), vec![arg.clone()])
            .expect("runs");
        let mut runs = vec![(name.to_string(), got)];
        if let Some(gpu) = gpu() {
            let store = Store(Vec::new());
            let args = [arg];
            runs.extend(
                runs_on_gpu(gpu, &ctx, func, &hoisted, (&store, &args), lowered_on_gpu)
                    .expect("runs on the GPU backend"),
            );
        }
        compare(&runs, &want, 0.0, &ir).expect("agrees");
    }
}

/// A tensor-parallel MLP on a 2x2 mesh (column-parallel up projection, row-parallel down
/// projection from a hoisted weight's shards, then an all-reduce, and a reduce-scatter gathered back): each
/// `sharded_linear` runs its local contraction on the CPU, shard by shard, and the
/// collectives' sums the generated add; `shard`, `all_gather` and `unshard` copy shards on
/// the host. On the GPU the shards are device tensors, the products contraction shaders,
/// the sums fold shaders and the moves strided copies and placements. The result is the
/// interpreter's.
#[test]
fn tensor_parallel_layers_run_in_generated_code() {
    let (m, k, hidden) = (4, 12, 8);
    let mesh = "mesh = [dp = 2, tp = 2]";
    let sharded = |shape: &[usize], split: &str, partial: &str| {
        let s: Vec<String> = shape.iter().map(ToString::to_string).collect();
        format!(
            "llm.sharded_tensor <{}xf32, {mesh}, split = {split}{partial}>",
            s.join("x")
        )
    };
    let body = format!(
        "xs = llm.shard x : {xs};\n        us = llm.shard up : {us};\n        down = llm.weight {{name = \"down\"}} : {dt};\n        ds = llm.shard down : {ds};\n        h = llm.sharded_linear xs, us : {h};\n        p = llm.sharded_linear h, ds : {p};\n        r = llm.all_reduce p {{mesh_axes = [tp]}} : {r};\n        s = llm.reduce_scatter p {{dim = 0, mesh_axes = [tp]}} : {sc};\n        g = llm.all_gather s {{dim = 0, mesh_axes = [tp]}} : {r};\n        a = llm.unshard r : {t};\n        c = llm.unshard g : {t};\n        y = llm.add a, c : {t};",
        xs = sharded(&[m, k], "[[], []]", ""),
        us = sharded(&[hidden, k], "[[tp], []]", ""),
        ds = sharded(&[k, hidden], "[[], [tp]]", ""),
        dt = ty(&[k, hidden]),
        h = sharded(&[m, hidden], "[[], [tp]]", ""),
        p = sharded(&[m, k], "[[], []]", ", partial = sum [tp]"),
        r = sharded(&[m, k], "[[], []]", ""),
        sc = sharded(&[m, k], "[[tp], []]", ""),
        t = ty(&[m, k]),
    );
    let ir = func(
        &[("x".into(), ty(&[m, k])), ("up".into(), ty(&[hidden, k]))],
        &ty(&[m, k]),
        &body,
    );
    let args = vec![tensor(&[m, k], 1, 1.0), tensor(&[hidden, k], 2, 1.0)];
    // The down projection is a weight: its shards are hoisted, computed once.
    let store = Store(vec![("down".into(), Rc::new(tensor(&[k, hidden], 3, 1.0)))]);
    let (ctx, func, want, hoisted) = reference(&ir, &args, &store).expect("reference");
    for threads in [1, 2] {
        let options = Options {
            target: Target::Host,
            threads,
            microkernels: true,
        };
        let program = Program::build(&ctx, func, &hoisted, &options).expect("compiles");
        // Two shards, two linear layers, three collectives, two unshards, the add.
        expect_lowering(program.stats(), 10);
        let got = program.run(&ctx, &store, args.clone()).expect("runs");
        compare(
            &[(format!("cpu, {threads} threads"), got)],
            &want,
            1e-5,
            &ir,
        )
        .expect("agrees");
    }
    // On the GPU each device's shard is a device tensor, and nothing runs on the host.
    if let Some(gpu) = gpu() {
        let runs = runs_on_gpu(gpu, &ctx, func, &hoisted, (&store, &args), lowered_on_gpu)
            .expect("runs on the GPU backend");
        compare(&runs, &want, 1e-5, &ir).expect("agrees");
    }
}

/// The check of a GPU program that must run no op through its reference semantics.
fn lowered_on_gpu(stats: &gpu::LoweringStats) -> Result<(), TestCaseError> {
    prop_assert!(stats.reference_ops.is_empty(), "{stats:?}");
    Ok(())
}

/// A broadcast only known at run time falls back to the reference semantics (and says
/// so), with the reference's values.
#[test]
fn runtime_broadcast_falls_back() {
    let t = "llm.tensor <?x4xf32>";
    let ir = func(
        &[("a".into(), t.into()), ("b".into(), t.into())],
        t,
        &format!("y = llm.add a, b : {t};"),
    );
    let args = vec![tensor(&[3, 4], 1, 1.0), tensor(&[1, 4], 2, 1.0)];
    let (ctx, func, want, hoisted) = reference(&ir, &args, &Store(Vec::new())).expect("reference");
    let program = Program::build(&ctx, func, &hoisted, &Options::default()).expect("compiles");
    let got = program.run(&ctx, &NoWeights, args).expect("runs");
    assert_eq!(program.runtime_fallbacks(), 1);
    compare(&[("cpu".into(), got)], &want, 0.0, &ir).expect("agrees");
}

/// Operands whose dims are declared as the result's, dynamic ones included, broadcast in
/// generated code: a `[?, 1]` scale of `[?, 8]` rows (a shared expert's gate) is selected
/// as a broadcast and runs without falling back, on both backends; rows that do not
/// broadcast at run time are an error there, as in the reference.
#[test]
fn dynamic_rows_broadcast_in_generated_code() {
    let (rows, scale) = ("llm.tensor <?x8xf32>", "llm.tensor <?x1xf32>");
    let ir = func(
        &[("a".into(), rows.into()), ("b".into(), scale.into())],
        rows,
        &format!("y = llm.mul a, b : {rows};"),
    );
    agree(
        &ir,
        vec![tensor(&[3, 8], 1, 1.0), tensor(&[3, 1], 2, 1.0)],
        0.0,
    )
    .expect("agrees");
    // Run-time rows that do not broadcast are the reference semantics' error on both.
    let args = vec![tensor(&[3, 8], 1, 1.0), tensor(&[2, 1], 2, 1.0)];
    let (mut ctx, want) = (Context::new(), "do not broadcast");
    let module = text::parse_module(&mut ctx, &ir).expect("parses");
    let f = interp::find_func(&ctx, module, "f").expect("@f");
    let program =
        Program::build(&ctx, f, &Hoisted::default(), &Options::default()).expect("compiles");
    let err = program
        .run(&ctx, &NoWeights, args.clone())
        .expect_err("fails")
        .to_string();
    assert!(err.contains(want), "cpu: {err}");
    if let Some(gpu) = gpu() {
        let err = gpu_error(gpu, &ir, args);
        assert!(err.contains(want), "gpu: {err}");
    }
}

/// Arguments of the wrong shape are rejected before any kernel runs.
#[test]
fn wrong_shapes_are_rejected() {
    let ir = func(
        &[("x".into(), ty(&[2, 8])), ("w".into(), ty(&[4, 8]))],
        &ty(&[2, 4]),
        &format!(
            "y = llm.matmul x, w {{transpose_rhs = true}} : {};",
            ty(&[2, 4])
        ),
    );
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, &ir).unwrap();
    let func = interp::find_func(&ctx, module, "f").unwrap();
    let program = Program::build(&ctx, func, &Hoisted::default(), &Options::default()).unwrap();
    let err = program
        .run(
            &ctx,
            &NoWeights,
            vec![tensor(&[2, 8], 1, 1.0), tensor(&[4, 7], 2, 1.0)],
        )
        .unwrap_err();
    assert!(err.to_string().contains("argument #1"), "{err}");
}

/// A dynamic dim that does not split evenly over the mesh is refused at run time (the
/// verifier cannot see it), with the op's location, and so is an unshard of devices that
/// disagree; an even one runs. On both backends.
#[test]
fn mesh_moves_refuse_uneven_splits_and_disagreeing_devices() {
    let mesh = "mesh = [tp = 2]";
    let body = format!(
        "xs = llm.shard x : llm.sharded_tensor <?x4xf32, {mesh}, split = [[tp], []]>;\n        g = llm.all_gather xs {{dim = 0, mesh_axes = [tp]}} : llm.sharded_tensor <?x4xf32, {mesh}, split = [[], []]>;\n        y = llm.unshard g : llm.tensor <?x4xf32>;"
    );
    let ir = func(
        &[("x".into(), "llm.tensor <?x4xf32>".into())],
        "llm.tensor <?x4xf32>",
        &body,
    );
    let even = tensor(&[4, 4], 1, 1.0);
    on_both_backends(&ir, |backend, run| {
        assert_eq!(run(vec![even.clone()]).expect(backend), vec![even.clone()]);
        let err = run(vec![tensor(&[3, 4], 1, 1.0)]).unwrap_err();
        assert!(
            err.contains("does not split into 2 equal pieces"),
            "{backend}: {err}"
        );
        assert!(err.contains("llm.shard"), "{backend}: {err}");
    });

    let ir = func(
        &[(
            "p".into(),
            format!("llm.sharded_tensor <2x4xf32, {mesh}, split = [[], []]>"),
        )],
        &ty(&[2, 4]),
        "y = llm.unshard p : llm.tensor <2x4xf32>;",
    );
    let shard = |seed| match tensor(&[2, 4], seed, 1.0) {
        Value::Tensor(t) => t,
        _ => unreachable!("a tensor"),
    };
    let disagreeing = Value::Sharded(Sharded {
        shape: vec![2, 4],
        mesh: vec![("tp".into(), 2)],
        split: vec![vec![], vec![]],
        partial: vec![],
        reduction: Reduction::Sum,
        shards: vec![shard(1), shard(2)],
    });
    on_both_backends(&ir, |backend, run| {
        let err = run(vec![disagreeing.clone()]).unwrap_err();
        assert!(err.contains("different values"), "{backend}: {err}");
    });
}

/// Calls `check` with each backend's name and a run of `@f` of `ir` (without weights):
/// the CPU's, and the GPU's where there is one; both programs must lower every op.
fn on_both_backends(
    ir: &str,
    check: impl Fn(&str, &dyn Fn(Vec<Value>) -> Result<Vec<Value>, String>),
) {
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, ir).unwrap();
    let entry = interp::find_func(&ctx, module, "f").unwrap();
    let cpu = Program::build(&ctx, entry, &Hoisted::default(), &Options::default()).unwrap();
    assert!(cpu.stats().reference_ops.is_empty(), "{ir}");
    check("cpu", &|args| {
        cpu.run(&ctx, &NoWeights, args).map_err(|e| e.to_string())
    });
    if let Some(gpu) = gpu() {
        let program = gpu::Compiler::new(gpu)
            .build(&ctx, entry, &Hoisted::default(), Rows::Few)
            .unwrap();
        assert!(program.stats().reference_ops.is_empty(), "{ir}");
        check("gpu", &|args| {
            program
                .run(&ctx, &NoWeights, args)
                .map_err(|e| e.to_string())
        });
    }
}

fn ints(shape: &[usize], values: Vec<i64>) -> Value {
    Value::Tensor(Tensor::from_i64(shape.to_vec(), DType::I32, values))
}

fn ity(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    format!("llm.tensor <{}xi32>", dims.join("x"))
}

/// `values` as a comma-separated list.
fn list(values: &[usize]) -> String {
    values
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The data movement op `name` with `attrs`, of an f32 and of an i32 tensor of `dims`
/// into `out`, on both backends, exactly.
fn moves_floats_and_ints(
    name: &str,
    attrs: &str,
    (dims, out): (&[usize], &[usize]),
    seed: u64,
) -> Result<(), TestCaseError> {
    let ir = format!(
        "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({x}, {i}) -> ({y}, {j})> {{\n      ^body(x: {x}, i: {i}):\n        y = {name} x {attrs} : {y};\n        j = {name} i {attrs} : {j};\n        llm.return y, j\n    }}\n}}\n",
        x = ty(dims),
        i = ity(dims),
        y = ty(out),
        j = ity(out),
    );
    let count: usize = dims.iter().product();
    let int_values: Vec<i64> = values(seed + 1, count, 100.0)
        .iter()
        .map(|&v| v as i64)
        .collect();
    agree(
        &ir,
        vec![tensor(dims, seed, 1.0), ints(dims, int_values)],
        0.0,
    )
}

/// A paged decode attention of `seqs` rows (`kv * group` query heads of `d`) over a
/// cache of `width` blocks per sequence stored as `storage`, with contexts `lens`, an
/// optional window, an optional soft-cap and optional attention sinks (an argument of
/// seeded values in [-3, 3), on the scale of the scores): the function and its arguments
/// (seeded from `seed`).
fn paged_attention_case(
    [seqs, kv, group, d, width]: [usize; 5],
    storage: KvStorage,
    lens: Vec<i64>,
    (window, softcap, sinks): (Option<usize>, Option<f32>, bool),
    seed: u64,
) -> (String, Vec<Value>) {
    let h = kv * group;
    let (c, cty) = stored_cache(storage, kv, d, seqs * width, seed + 3);
    let mut win = window.map_or(String::new(), |w| format!(", window = {w}"));
    if let Some(cap) = softcap {
        win.push_str(&format!(", softcap = {cap:?}"));
    }
    let mut params = vec![
        ("q".into(), ty(&[seqs, 1, h, d])),
        ("c".into(), cty),
        ("t".into(), ity(&[seqs, width])),
        ("l".into(), ity(&[seqs])),
    ];
    let mut args = vec![
        tensor(&[seqs, 1, h, d], seed, 1.0),
        c,
        ints(&[seqs, width], tables(seqs, width, seed + 5)),
        ints(&[seqs], lens),
    ];
    if sinks {
        params.push(("s".into(), ty(&[h])));
        args.push(tensor(&[h], seed + 6, 3.0));
    }
    let ir = func(
        &params,
        &ty(&[seqs, 1, h, d]),
        &format!(
            "y = llm.paged_attention q, c, t, l{} {{layer = 1, kv_heads = {kv}{win}}} : {};",
            if sinks { ", s" } else { "" },
            ty(&[seqs, 1, h, d])
        ),
    );
    (ir, args)
}

/// A cache of `blocks` blocks filled with seeded values, and its type.
fn cache(kv: usize, d: usize, blocks: usize, seed: u64) -> (Value, String) {
    stored_cache(KvStorage::Float(DType::F32), kv, d, blocks, seed)
}

/// [`cache`] stored as `storage` (its random values rounded to it, or quantized into its
/// blocks, as the pool holds them).
fn stored_cache(
    storage: KvStorage,
    kv: usize,
    d: usize,
    blocks: usize,
    seed: u64,
) -> (Value, String) {
    let params = KvCacheParams {
        layers: 2,
        kv_heads: kv as u64,
        head_dim: d as u64,
        block_size: 4,
        blocks: None,
        storage,
        window: None,
    };
    let mut c = KvCache::new(params, blocks);
    let (len, storage) = (c.k.len(), c.params.storage.clone());
    let rounded = |seed| KvValues::from_f32(&storage, &values(seed, len, 1.0));
    (c.k, c.v) = (rounded(seed), rounded(seed + 1));
    let ty = format!(
        "llm.paged_kv_cache <layers = 2, kv_heads = {kv}, head_dim = {d}, block_size = 4, blocks = ?, dtype = {}>",
        c.params.storage
    );
    (Value::Cache(c), ty)
}

/// The float types a KV cache stores, for the cases that cover them all.
fn float_storages() -> impl Strategy<Value = KvStorage> {
    prop::sample::select(vec![DType::F32, DType::F16, DType::BF16]).prop_map(KvStorage::Float)
}

/// The block formats a KV pool holds as their blocks, each with a head size its blocks
/// fill (one or two blocks of 32; one of the K-quants' 256).
fn block_storages() -> impl Strategy<Value = (KvStorage, usize)> {
    prop::sample::select(vec![
        (QuantFormat::Q8_0, 32),
        (QuantFormat::Q8_0, 64),
        (QuantFormat::Q4_0, 32),
        (QuantFormat::Q4_1, 64),
        (QuantFormat::Q4K, 256),
        (QuantFormat::Q6K, 256),
        (QuantFormat::Q2K, 256),
    ])
    .prop_map(|(format, d)| (KvStorage::Quantized(format), d))
}

/// Block tables for `lens.len()` sequences: a seeded permutation of the pool's blocks,
/// `width` blocks each.
fn tables(seqs: usize, width: usize, seed: u64) -> Vec<i64> {
    let mut blocks: Vec<i64> = (0..(seqs * width) as i64).collect();
    let r = values(seed, blocks.len(), 1.0);
    for i in (1..blocks.len()).rev() {
        let j = ((r[i] + 1.0) / 2.0 * (i + 1) as f32) as usize % (i + 1);
        blocks.swap(i, j);
    }
    blocks
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn rope(t in 1usize..5, h in 1usize..4, pairs in 1usize..9, partial in any::<bool>(), half in any::<bool>(), factors in 0usize..3, mscale in prop::option::of(0.5f32..2.0), seed: u64) {
        let d = 2 * pairs + if partial { 2 } else { 0 };
        let layout = if half { "half" } else { "interleaved" };
        let mut extra = if partial { format!(", rotary_dim = {}", 2 * pairs) } else { String::new() };
        if let Some(m) = mscale {
            extra.push_str(&format!(", mscale = {m:?}"));
        }
        let mut params = vec![("x".into(), ty(&[t, h, d])), ("p".into(), ity(&[t]))];
        // Frequency factors in [1, 8): none (0), an argument (1) or a weight (2).
        let factor_values = Value::Tensor(Tensor::from_f32(
            vec![pairs],
            DType::F32,
            values(seed + 2, pairs, 1.0).iter().map(|v| 4.5 + 3.5 * v).collect(),
        ));
        let mut body = String::new();
        let operands = match factors {
            0 => "x, p",
            1 => {
                params.push(("f".into(), ty(&[pairs])));
                "x, p, f"
            }
            _ => {
                body = format!("f = llm.weight {{name = \"f\"}} : {};\n        ", ty(&[pairs]));
                "x, p, f"
            }
        };
        body.push_str(&format!("y = llm.rope {operands} {{theta = 10000.0, layout = {layout}{extra}}} : {};", ty(&[t, h, d])));
        let ir = func(&params, &ty(&[t, h, d]), &body);
        let positions = values(seed + 1, t, 1.0).iter().map(|v| ((v + 1.0) * 500.0) as i64).collect();
        let mut args = vec![tensor(&[t, h, d], seed, 2.0), ints(&[t], positions)];
        let mut store = Store(Vec::new());
        match factors {
            0 => {}
            1 => args.push(factor_values),
            _ => store.0.push(("f".into(), Rc::new(factor_values))),
        }
        agree_with(&ir, args, &store, 1e-6)?;
    }

    #[test]
    fn paged_attention(seqs in 1usize..4, kv in 1usize..3, group in 1usize..3, d in prop::sample::select(vec![1usize, 3, 4, 7, 8, 13, 16, 33, 40, 64]), width in 1usize..12, window in prop::option::of(1usize..30), softcap in prop::option::of(prop::sample::select(vec![0.5f32, 2.0, 50.0])), sinks in any::<bool>(), storage in float_storages(), seed: u64) {
        let lens: Vec<i64> = values(seed + 4, seqs, 1.0).iter().map(|v| 1 + ((v + 1.0) / 2.0 * (4 * width - 1) as f32) as i64).collect();
        let (ir, args) = paged_attention_case([seqs, kv, group, d, width], storage, lens, (window, softcap, sinks), seed);
        agree(&ir, args, 2e-6)?;
    }

    /// Paged attention over pools held as a block format's blocks: each backend decodes
    /// the blocks as the reference does (the CPU into f32 rows first, the GPU as it
    /// reads them).
    #[test]
    fn paged_attention_over_block_caches(seqs in 1usize..4, kv in 1usize..3, group in 1usize..3, (storage, d) in block_storages(), width in 1usize..8, window in prop::option::of(1usize..30), sinks in any::<bool>(), seed: u64) {
        let lens: Vec<i64> = values(seed + 4, seqs, 1.0).iter().map(|v| 1 + ((v + 1.0) / 2.0 * (4 * width - 1) as f32) as i64).collect();
        let (ir, args) = paged_attention_case([seqs, kv, group, d, width], storage, lens, (window, None, sinks), seed);
        agree(&ir, args, 2e-6)?;
    }

    /// `append_attention` on caches of every float storage (the appended rows rounded to
    /// it) and every block format (the rows quantized into its blocks).
    #[test]
    fn append_attention(t in 1usize..4, kv in 1usize..3, group in 1usize..3, (storage, d) in prop_oneof![(float_storages(), 1usize..12), block_storages()], start in 0usize..6, sinks in any::<bool>(), seed: u64) {
        let h = kv * group;
        let width = (start + t).div_ceil(4);
        let (c, cty) = stored_cache(storage, kv, d, width + 1, seed + 3);
        let table = tables(1, width + 1, seed + 5)[..width].to_vec();
        let slots: Vec<i64> = (start..start + t).map(|p| table[p / 4] * 4 + (p % 4) as i64).collect();
        // The attention sinks, where the case has them: an argument after the others.
        let (sink_param, sink_operand) = if sinks { (format!(", {}", ty(&[h])), ", z") } else { (String::new(), "") };
        let sink_arg = if sinks { format!(", z: {}", ty(&[h])) } else { String::new() };
        let ir = format!(
            "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({q}, {cty}, {kvt}, {kvt}, {st}, {tt}, {lt}{sink_param}) -> ({q}, {cty})> {{\n      ^body(q: {q}, c: {cty}, k: {kvt}, v: {kvt}, s: {st}, t: {tt}, l: {lt}{sink_arg}):\n        y, c2 = llm.append_attention q, c, k, v, s, t, l{sink_operand} {{layer = 0, kv_heads = {kv}}} : {q}, {cty};\n        llm.return y, c2\n    }}\n}}\n",
            q = ty(&[1, t, h, d]), kvt = ty(&[t, kv, d]), st = ity(&[t]), tt = ity(&[1, width]), lt = ity(&[1]),
        );
        let mut args = vec![
            tensor(&[1, t, h, d], seed, 1.0), c, tensor(&[t, kv, d], seed + 6, 1.0), tensor(&[t, kv, d], seed + 7, 1.0),
            ints(&[t], slots), ints(&[1, width], table), ints(&[1], vec![(start + t) as i64]),
        ];
        if sinks {
            args.push(tensor(&[h], seed + 8, 3.0));
        }
        agree(&ir, args, 2e-6)?;
    }

    /// A standalone `append_kv` and a `lookup_kv` of the sequence, on caches of every
    /// float storage and every block format: the rounding (or the blocks' encoding) is
    /// exact, as the reference's, and so are the values looked up.
    #[test]
    fn append_and_lookup_kv(t in 1usize..4, kv in 1usize..3, (storage, d) in prop_oneof![(float_storages(), 1usize..12), block_storages()], start in 0usize..6, seed: u64) {
        let width = (start + t).div_ceil(4);
        let (c, cty) = stored_cache(storage, kv, d, width + 1, seed + 3);
        let table = tables(1, width + 1, seed + 5)[..width].to_vec();
        let slots: Vec<i64> = (start..start + t).map(|p| table[p / 4] * 4 + (p % 4) as i64).collect();
        let rows = format!("llm.tensor <?x{kv}x{d}xf32>");
        let ir = format!(
            "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({cty}, {kvt}, {kvt}, {st}, {tt}, {lt}) -> ({cty}, {rows}, {rows})> {{\n      ^body(c: {cty}, k: {kvt}, v: {kvt}, s: {st}, t: {tt}, l: {lt}):\n        c2 = llm.append_kv c, k, v, s {{layer = 0}} : {cty};\n        lk, lv = llm.lookup_kv c2, t, l {{layer = 0}} : {rows}, {rows};\n        llm.return c2, lk, lv\n    }}\n}}\n",
            kvt = ty(&[t, kv, d]), st = ity(&[t]), tt = ity(&[width]), lt = "llm.tensor <i32>",
        );
        let args = vec![
            c, tensor(&[t, kv, d], seed + 6, 1.0), tensor(&[t, kv, d], seed + 7, 1.0),
            ints(&[t], slots), ints(&[width], table), ints(&[], vec![(start + t) as i64]),
        ];
        agree(&ir, args, 0.0)?;
    }

    /// Elementwise ops whose operand broadcasts to the result: along leading dims (a bias,
    /// read at `i % len`) or anywhere (a per-row scale, a scalar; the strided shader on
    /// the GPU, a repeated operand on the CPU), alone and in a fused body.
    #[test]
    fn broadcasting_elementwise(m in 1usize..5, n in 1usize..40, form in 0usize..4, which in 0usize..6, seed: u64) {
        let small = match form {
            0 => vec![n],
            1 => vec![1, n],
            2 => vec![m, 1],
            _ => vec![1, 1],
        };
        let op = ["add", "sub", "mul", "div", "maximum", "minimum"][which];
        let body = format!(
            "y = llm.{op} x, b : {t};\n        z = llm.fused b, x : {t} {{\n          ^scalar(p: {s}, q: {s}):\n            s = llm.silu q : {s};\n            r = llm.mul p, s : {s};\n            llm.yield r\n        }};\n        w = llm.add y, z : {t};",
            t = ty(&[m, n]),
            s = "llm.tensor <f32>"
        );
        let ir = func(&[("x".into(), ty(&[m, n])), ("b".into(), ty(&small))], &ty(&[m, n]), &body);
        let ir = ir.replace("llm.return y", "llm.return w");
        agree(&ir, vec![tensor(&[m, n], seed, 1.0), tensor(&small, seed + 1, 1.0)], 1e-5)?;
    }

    /// Arithmetic on f16 and bf16 values (held as f32): every step rounded to the type, as
    /// the reference rounds each op; exact for the four operations, within a unit in the
    /// last place of the narrow type for a body with a transcendental step (whose f32
    /// value the backends approximate, so rounding may land on the neighbour).
    #[test]
    fn narrow_float_arithmetic(m in 1usize..4, n in 1usize..30, seed: u64) {
        for dtype in [DType::F16, DType::BF16] {
            let t = |shape: &[usize]| {
                let s: Vec<String> = shape.iter().map(ToString::to_string).collect();
                format!("llm.tensor <{}x{}>", s.join("x"), dtype.name())
            };
            let s = format!("llm.tensor <{}>", dtype.name());
            let narrow = |shape: &[usize], seed: u64| {
                let n = shape.iter().product();
                let v = values(seed, n, 4.0).iter().map(|&x| round_float(dtype, x)).collect();
                Value::Tensor(Tensor::from_f32(shape.to_vec(), dtype, v))
            };
            for (op, tol) in [("add", 0.0), ("sub", 0.0), ("mul", 0.0), ("div", 0.0)] {
                let ir = func(&[("a".into(), t(&[m, n])), ("b".into(), t(&[n]))], &t(&[m, n]), &format!("y = llm.{op} a, b : {};", t(&[m, n])));
                agree(&ir, vec![narrow(&[m, n], seed), narrow(&[n], seed + 1)], tol)?;
            }
            let body = format!(
                "y = llm.fused a, b : {tm} {{\n          ^scalar(p: {s}, q: {s}):\n            u = llm.silu p : {s};\n            c = llm.constant {{value = [0.3]}} : {s};\n            v = llm.mul u, c : {s};\n            w = llm.add v, q : {s};\n            llm.yield w\n        }};",
                tm = t(&[m, n])
            );
            let ir = func(&[("a".into(), t(&[m, n])), ("b".into(), t(&[m, n]))], &t(&[m, n]), &body);
            let ulp = if dtype == DType::F16 { 1e-3 } else { 8e-3 };
            agree(&ir, vec![narrow(&[m, n], seed + 2), narrow(&[m, n], seed + 3)], 2.0 * ulp)?;
            // Exact steps: each intermediate must be rounded, not only the result.
            let body = format!(
                "y = llm.fused a, b : {tm} {{\n          ^scalar(p: {s}, q: {s}):\n            u = llm.mul p, q : {s};\n            v = llm.add u, p : {s};\n            w = llm.sub v, q : {s};\n            llm.yield w\n        }};",
                tm = t(&[m, n])
            );
            let ir = func(&[("a".into(), t(&[m, n])), ("b".into(), t(&[m, n]))], &t(&[m, n]), &body);
            agree(&ir, vec![narrow(&[m, n], seed + 4), narrow(&[m, n], seed + 5)], 0.0)?;
        }
    }

    /// Three operands of ranks up to 4 broadcasting along any dims, in a fused body.
    #[test]
    fn broadcasting_in_four_dims(dims in proptest::collection::vec(1usize..6, 4), masks in proptest::collection::vec(0u8..16, 2), ranks in proptest::collection::vec(1usize..=4, 2), seed: u64) {
        let operand = |mask: u8, rank: usize| -> Vec<usize> {
            (4 - rank..4).map(|i| if mask & (1 << i) != 0 { 1 } else { dims[i] }).collect()
        };
        let (b, c) = (operand(masks[0], ranks[0]), operand(masks[1], ranks[1]));
        let s = "llm.tensor <f32>";
        let body = format!(
            "y = llm.fused x, b, c : {t} {{\n          ^scalar(p: {s}, q: {s}, r: {s}):\n            u = llm.mul p, q : {s};\n            v = llm.sub u, r : {s};\n            llm.yield v\n        }};",
            t = ty(&dims)
        );
        let ir = func(&[("x".into(), ty(&dims)), ("b".into(), ty(&b)), ("c".into(), ty(&c))], &ty(&dims), &body);
        agree(&ir, vec![tensor(&dims, seed, 1.0), tensor(&b, seed + 1, 1.0), tensor(&c, seed + 2, 1.0)], 1e-6)?;
    }

    /// Five to eight dims that do not merge into four (operands broadcasting along
    /// alternate dims, and five operands): the CPU runs its four-dim kernel once per index
    /// of the dims beyond four, the GPU's strided shader walks up to eight.
    #[test]
    fn broadcasting_in_more_than_four_dims(dims in proptest::collection::vec(2usize..4, 5..=8), masks in proptest::collection::vec(0u8..=255, 2), seed: u64) {
        let rank = dims.len();
        let alternate: Vec<usize> = (0..rank).map(|i| if i % 2 == 1 { 1 } else { dims[i] }).collect();
        let masked = |mask: u8| -> Vec<usize> { (0..rank).map(|i| if mask & (1 << i) != 0 { 1 } else { dims[i] }).collect() };
        let (c, d) = (masked(masks[0]), masked(masks[1]));
        let e = vec![dims[rank - 1]];
        let s = "llm.tensor <f32>";
        let body = format!(
            "y = llm.fused x, b, c, d, e : {t} {{\n          ^scalar(p: {s}, q: {s}, r: {s}, w: {s}, z: {s}):\n            u = llm.mul p, q : {s};\n            v = llm.sub u, r : {s};\n            o = llm.add v, w : {s};\n            k = llm.mul o, z : {s};\n            llm.yield k\n        }};",
            t = ty(&dims)
        );
        let ir = func(&[("x".into(), ty(&dims)), ("b".into(), ty(&alternate)), ("c".into(), ty(&c)), ("d".into(), ty(&d)), ("e".into(), ty(&e))], &ty(&dims), &body);
        let args = vec![tensor(&dims, seed, 1.0), tensor(&alternate, seed + 1, 1.0), tensor(&c, seed + 2, 1.0), tensor(&d, seed + 3, 1.0), tensor(&e, seed + 4, 1.0)];
        agree(&ir, args, 1e-6)?;
    }

    /// A rank-6 broadcast whose dims merge into four or fewer (a bias over the last two
    /// dims, a scale over the first three): the kernels' layout, not the reference.
    #[test]
    fn broadcasting_beyond_four_dims(dims in proptest::collection::vec(1usize..4, 6), seed: u64) {
        let bias: Vec<usize> = (0..6).map(|i| if i >= 4 { dims[i] } else { 1 }).collect();
        let scale: Vec<usize> = (0..6).map(|i| if i < 3 { dims[i] } else { 1 }).collect();
        let s = "llm.tensor <f32>";
        let body = format!(
            "y = llm.fused x, b, c : {t} {{\n          ^scalar(p: {s}, q: {s}, r: {s}):\n            u = llm.mul p, r : {s};\n            v = llm.add u, q : {s};\n            llm.yield v\n        }};",
            t = ty(&dims)
        );
        let ir = func(&[("x".into(), ty(&dims)), ("b".into(), ty(&bias)), ("c".into(), ty(&scale))], &ty(&dims), &body);
        agree(&ir, vec![tensor(&dims, seed, 1.0), tensor(&bias, seed + 1, 1.0), tensor(&scale, seed + 2, 1.0)], 1e-6)?;
    }

    /// Casts between every pair of element types, exactly: floats from f16 subnormals to
    /// past f16's range and i32's, ties, NaN, integers that wrap to i8; a float cast to
    /// i64 beyond 32 bits is an error naming the cast on the GPU, which holds i64 values in
    /// 32 bits.
    #[test]
    fn casts(n in 1usize..40, seed: u64) {
        for (from, to) in DType::ALL.iter().flat_map(|&f| DType::ALL.map(|t| (f, t))) {
            let name = |d: DType| format!("llm.tensor <{n}x{}>", d.name());
            let ir = func(&[("x".into(), name(from))], &name(to), &format!("y = llm.cast x : {};", name(to)));
            let raw = values(seed, n, 1.0);
            let x = if from.is_float() {
                let scale = [1e-6f32, 1.0, 300.0, 7e4, 3e9][seed as usize % 5];
                let mut v: Vec<f32> = raw.iter().map(|r| round_float(from, r * scale)).collect();
                // Every third value of an f32 operand lies exactly halfway between two values
                // of the narrow target, where rounding must go to the even one.
                if from == DType::F32 && matches!(to, DType::F16 | DType::BF16) {
                    for x in v.iter_mut().step_by(3).filter(|x| x.abs() < 6e4) {
                        let (lo, hi) = match to {
                            DType::BF16 => {
                                let a = half::bf16::from_f32(*x);
                                (a.to_f32(), half::bf16::from_bits(a.to_bits() + 1).to_f32())
                            }
                            _ => {
                                let a = half::f16::from_f32(*x);
                                (a.to_f32(), half::f16::from_bits(a.to_bits() + 1).to_f32())
                            }
                        };
                        *x = ((f64::from(lo) + f64::from(hi)) / 2.0) as f32;
                    }
                }
                // A NaN, which truncates to 0.
                v[n / 2] = f32::NAN;
                Value::Tensor(Tensor::from_f32(vec![n], from, v))
            } else {
                let v = raw.iter().map(|r| (r * 1000.0) as i64).collect();
                Value::Tensor(Tensor::from_i64(vec![n], from, v))
            };
            // The GPU holds i64 values in 32 bits: a float beyond them is an error there.
            let beyond_32_bits = to == DType::I64 && x.tensor().is_ok_and(|t| {
                t.floats().is_ok_and(|v| v.iter().any(|f| f.abs() >= 2147483648.0))
            });
            if beyond_32_bits {
                cpu_agrees(&ir, vec![x.clone()], 0.0)?;
                if let Some(gpu) = gpu() {
                    let err = gpu_error(gpu, &ir, vec![x]);
                    prop_assert!(err.contains("llm.cast") && err.contains("32 bits"), "{err}");
                }
            } else {
                agree(&ir, vec![x], 0.0)?;
            }
        }
    }

    /// Matmuls against a rhs only known at run time: batched, `[k, n]` or `[n, k]`.
    #[test]
    fn general_matmul(b in 1usize..3, m in 1usize..5, n in 1usize..20, k in 1usize..30, batched in any::<bool>(), transposed in any::<bool>(), seed: u64) {
        let rhs: Vec<usize> = match (batched, transposed) {
            (true, true) => vec![b, n, k],
            (true, false) => vec![b, k, n],
            (false, true) => vec![n, k],
            (false, false) => vec![k, n],
        };
        let ir = func(
            &[("x".into(), ty(&[b, m, k])), ("w".into(), ty(&rhs))],
            &ty(&[b, m, n]),
            &format!("y = llm.matmul x, w {{transpose_rhs = {transposed}}} : {};", ty(&[b, m, n])),
        );
        agree(&ir, vec![tensor(&[b, m, k], seed, 1.0), tensor(&rhs, seed + 1, 1.0)], 1e-5)?;
    }

    /// Attention with a `[tq, tk]` mask added to the scores (shared by the batch), windows,
    /// soft-caps and contexts long enough to split on the GPU.
    #[test]
    fn masked_attention(b in 1usize..3, tq in 1usize..5, extra in 0usize..40, kv in 1usize..3, group in 1usize..3, d in 1usize..12, causal in any::<bool>(), window in prop::option::of(1usize..30), softcap in prop::option::of(prop::sample::select(vec![0.5f32, 4.0])), seed: u64) {
        let (h, tk) = (kv * group, tq + extra);
        let mut win = window.map_or(String::new(), |w| format!(", window = {w}"));
        if let Some(cap) = softcap {
            win.push_str(&format!(", softcap = {cap:?}"));
        }
        let ir = func(
            &[("q".into(), ty(&[b, tq, h, d])), ("k".into(), ty(&[b, tk, kv, d])), ("v".into(), ty(&[b, tk, kv, d])), ("m".into(), ty(&[tq, tk]))],
            &ty(&[b, tq, h, d]),
            &format!("y = llm.attention q, k, v, m {{kv_heads = {kv}, causal = {causal}{win}}} : {};", ty(&[b, tq, h, d])),
        );
        let args = vec![tensor(&[b, tq, h, d], seed, 1.0), tensor(&[b, tk, kv, d], seed + 1, 1.0), tensor(&[b, tk, kv, d], seed + 2, 1.0), tensor(&[tq, tk], seed + 3, 2.0)];
        agree(&ir, args, 2e-6)?;
    }

    #[test]
    fn contiguous_attention(b in 1usize..3, tq in 1usize..5, extra in 0usize..40, kv in 1usize..3, group in 1usize..3, d in 1usize..12, causal in any::<bool>(), window in prop::option::of(1usize..5), seed: u64) {
        let (h, tk) = (kv * group, tq + extra);
        let win = window.map_or(String::new(), |w| format!(", window = {w}"));
        let ir = func(
            &[("q".into(), ty(&[b, tq, h, d])), ("k".into(), ty(&[b, tk, kv, d])), ("v".into(), ty(&[b, tk, kv, d]))],
            &ty(&[b, tq, h, d]),
            &format!("y = llm.attention q, k, v {{kv_heads = {kv}, causal = {causal}{win}}} : {};", ty(&[b, tq, h, d])),
        );
        let args = vec![tensor(&[b, tq, h, d], seed, 1.0), tensor(&[b, tk, kv, d], seed + 1, 1.0), tensor(&[b, tk, kv, d], seed + 2, 1.0)];
        agree(&ir, args, 2e-6)?;
    }

    #[test]
    fn data_movement(rows in 1usize..5, width in 2usize..20, cut in 0usize..20, vocab in 1usize..9, seed: u64) {
        let offset = cut % width;
        let len = width - offset;
        let ids: Vec<i64> = values(seed + 2, rows, 1.0).iter().map(|v| ((v + 1.0) / 2.0 * vocab as f32) as i64 % vocab as i64).collect();
        let body = format!(
            "s = llm.slice x {{starts = [0, {offset}]}} : {s};\n        r = llm.reshape s : {r};\n        e = llm.embedding table, ids : {e};\n        y = llm.reshape e : {y};",
            s = ty(&[rows, len]), r = ty(&[rows * len]), e = ty(&[rows, width]), y = ty(&[rows * width]),
        );
        let ir = format!(
            "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({x}, {ids}) -> ({r}, {y})> {{\n      ^body(x: {x}, ids: {ids}):\n        table = llm.weight {{name = \"table\"}} : {t};\n        {body}\n        llm.return r, y\n    }}\n}}\n",
            x = ty(&[rows, width]), ids = ity(&[rows]), t = ty(&[vocab, width]), r = ty(&[rows * len]), y = ty(&[rows * width]),
        );
        let store = Store(vec![("table".into(), Rc::new(tensor(&[vocab, width], seed + 1, 1.0)))]);
        agree_with(&ir, vec![tensor(&[rows, width], seed, 1.0), ints(&[rows], ids)], &store, 0.0)?;
    }
}

/// A float cast to i64 on the GPU, which holds i64 values in 32 bits: the extremes of
/// that range (and NaN, which gives 0) convert exactly; a value beyond is an error that
/// names the cast, reported when the call ends.
#[test]
fn float_casts_to_i64_fit_32_bits_on_the_gpu() {
    let Some(gpu) = gpu() else { return };
    let ir = func(
        &[("x".into(), "llm.tensor <4xf32>".into())],
        "llm.tensor <4xi64>",
        "y = llm.cast x : llm.tensor <4xi64>;",
    );
    let fits = Value::Tensor(Tensor::from_f32(
        vec![4],
        DType::F32,
        vec![-2147483648.0, 2147483520.0, f32::NAN, -7.9],
    ));
    let (ctx, func, want, hoisted) =
        reference(&ir, std::slice::from_ref(&fits), &Store(Vec::new())).expect("reference");
    let store = Store(Vec::new());
    let runs = runs_on_gpu(
        Arc::clone(&gpu),
        &ctx,
        func,
        &hoisted,
        (&store, &[fits]),
        lowered_on_gpu,
    )
    .expect("runs on the GPU backend");
    compare(&runs, &want, 0.0, &ir).expect("agrees");
    let beyond = Value::Tensor(Tensor::from_f32(
        vec![4],
        DType::F32,
        vec![1.0, 2147483648.0, 0.0, 0.0],
    ));
    let err = gpu_error(gpu, &ir, vec![beyond]);
    assert!(
        err.contains("llm.cast") && err.contains("does not fit the 32 bits"),
        "{err}"
    );
}

/// Heads wider than the workgroup's 64 invocations take ten or sixteen values each
/// (520 and 1,000: the last invocations hold fewer; soft-capped scores at 1,000), on both
/// backends.
#[test]
fn wide_attention_heads() {
    for (d, seed, softcap) in [(520, 1u64, None), (1000, 2, Some(30.0))] {
        let (ir, args) = paged_attention_case(
            [2, 1, 2, d, 3],
            KvStorage::Float(DType::F32),
            vec![7, 12],
            (None, softcap, false),
            seed,
        );
        agree(&ir, args, 2e-6).expect("agrees");
    }
}

/// Attention sinks over contexts of every length class: shorter than, equal to and longer
/// than the row kernel's 8-position vectors and 64-position blocks (its softmax starts
/// from the sinks and rescales at each block) and than the GPU's chunks (the first chunk
/// starts from the sinks, the merge takes them in), in the row kernel's shapes (heads of
/// 8 and 64) and the generated kernel's (heads of 12), with sinks of up to 8 either way,
/// which dominate a short row's softmax or vanish from it, and sinks near 0.
#[test]
fn attention_sinks_over_long_contexts() {
    let lens = vec![1, 8, 63, 64, 65, 129, 300];
    let width = 300usize.div_ceil(4);
    for (d, kv, group) in [(8, 2, 4), (64, 1, 2), (12, 2, 1)] {
        let (ir, mut args) = paged_attention_case(
            [lens.len(), kv, group, d, width],
            KvStorage::Float(DType::F32),
            lens.clone(),
            (None, None, true),
            23,
        );
        let h = kv * group;
        for scale in [8.0, 0.01] {
            args[4] = tensor(&[h], 29, scale);
            agree(&ir, args.clone(), 2e-6)
                .unwrap_or_else(|e| panic!("d {d}, {kv}x{group}, sinks of {scale}: {e}"));
        }
    }
}

/// Decode attention over long contexts, in the shapes the AVX2 row kernel takes (heads of
/// a multiple of 8, groups of 1 to 8 query heads per KV head: pairs of heads, and an odd
/// one left over; passes of several KV heads, and a last pass of fewer): contexts shorter than, equal to and longer than its 8-position score
/// vectors and 64-position blocks, with both scalings, against the interpreter (and the
/// generated kernel, without microkernels).
#[test]
fn long_context_attention_rows() {
    for (d, kv, group) in [
        (8, 4, 2),
        (16, 1, 3),
        (24, 2, 1),
        (8, 1, 1),
        (8, 1, 8),
        (16, 2, 5),
        (8, 5, 2),
        (8, 3, 3),
        (16, 8, 1),
    ] {
        for tk in [1, 7, 8, 9, 33, 63, 64, 65, 100, 129] {
            let h = kv * group;
            for scale in ["", ", scale = 0.3", ", scale = 0.3, softcap = 1.5"] {
                let ir = func(
                    &[
                        ("q".into(), ty(&[1, 1, h, d])),
                        ("k".into(), ty(&[1, tk, kv, d])),
                        ("v".into(), ty(&[1, tk, kv, d])),
                    ],
                    &ty(&[1, 1, h, d]),
                    &format!(
                        "y = llm.attention q, k, v {{kv_heads = {kv}, causal = true{scale}}} : {};",
                        ty(&[1, 1, h, d])
                    ),
                );
                let args = vec![
                    tensor(&[1, 1, h, d], 11, 2.0),
                    tensor(&[1, tk, kv, d], 12, 2.0),
                    tensor(&[1, tk, kv, d], 13, 1.0),
                ];
                agree(&ir, args, 2e-6).unwrap_or_else(|e| panic!("d {d}, {kv}x{group}, {tk}: {e}"));
            }
        }
    }
}

/// Attention rows split over the worker threads (`agree` runs two threads): a batch of
/// paged decode rows over contexts of different lengths, and a causal prompt of 64
/// queries, each with more than the 2^16 multiply-adds below which one thread runs all
/// rows; results must match the interpreter on every thread count.
#[test]
fn attention_rows_in_parallel() {
    let (kv, group, d, seqs, width) = (2, 2, 16, 8, 30);
    let h = kv * group;
    let lens: Vec<i64> = (0..seqs as i64).map(|s| 40 + 9 * s).collect();
    let (ir, args) = paged_attention_case(
        [seqs, kv, group, d, width],
        KvStorage::Float(DType::F32),
        lens,
        (None, None, false),
        19,
    );
    agree(&ir, args, 2e-6).unwrap();
    let t = 64;
    let ir = func(
        &[
            ("q".into(), ty(&[1, t, h, d])),
            ("k".into(), ty(&[1, t, kv, d])),
            ("v".into(), ty(&[1, t, kv, d])),
        ],
        &ty(&[1, t, h, d]),
        &format!(
            "y = llm.attention q, k, v {{kv_heads = {kv}, causal = true}} : {};",
            ty(&[1, t, h, d])
        ),
    );
    let args = vec![
        tensor(&[1, t, h, d], 24, 1.0),
        tensor(&[1, t, kv, d], 25, 1.0),
        tensor(&[1, t, kv, d], 26, 1.0),
    ];
    agree(&ir, args, 2e-6).unwrap();
}

/// Calls with no rows (an empty prompt) run on both backends and give empty results.
#[test]
fn empty_calls_give_empty_results() {
    let (k, n) = (8, 6);
    let body = format!(
        "w = llm.weight {{name = \"w\"}} : {};\n        g = llm.weight {{name = \"g\"}} : {};\n        p = llm.rms_norm_matmul x, g, w {{eps = 1e-5, transpose_rhs = true}} : {o};\n        s = llm.silu p : {o};\n        y = llm.softmax s {{axis = -1}} : {o};",
        ty(&[n, k]),
        ty(&[k]),
        o = "llm.tensor <?x6xf32>"
    );
    let ir = func(
        &[("x".into(), "llm.tensor <?x8xf32>".into())],
        "llm.tensor <?x6xf32>",
        &body,
    );
    let store = Store(vec![
        ("w".into(), Rc::new(tensor(&[n, k], 1, 1.0))),
        ("g".into(), Rc::new(tensor(&[k], 2, 1.0))),
    ]);
    agree_with(&ir, vec![tensor(&[0, k], 3, 1.0)], &store, 0.0).unwrap();
}

/// KV caches stored quantized along the head run in generated code on the CPU, and on the
/// GPU, whose appends a shader rounds through the format's blocks (q8_0, q4_0, q4_1, and
/// the K-quants' super-blocks of 256) or groups (nf4 and the affine formats); every
/// backend gives the interpreter's results, the stored values bit for bit.
#[test]
fn quantized_caches_append_on_the_gpu() {
    let (kv, t) = (2, 3);
    let affine = |bits, group_size, symmetric, scale| QuantFormat::Affine {
        bits,
        group_size,
        symmetric,
        axis: 3,
        scale,
    };
    for (format, d) in [
        (QuantFormat::Q8_0, 32),
        (QuantFormat::Q4_0, 64),
        (QuantFormat::Q4_1, 32),
        (
            QuantFormat::Nf4 {
                block_size: 32,
                scale: DType::F16,
            },
            64,
        ),
        (
            QuantFormat::Nf4 {
                block_size: 16,
                scale: DType::BF16,
            },
            16,
        ),
        (affine(8, 32, true, DType::F32), 32),
        (affine(4, 16, false, DType::F16), 48),
        (affine(2, 8, false, DType::BF16), 16),
        (affine(4, 64, true, DType::BF16), 64),
        (QuantFormat::Q4K, 256),
        (QuantFormat::Q6K, 256),
        (QuantFormat::Q2K, 256),
    ] {
        let cty = format!(
            "llm.paged_kv_cache <layers = 1, kv_heads = {kv}, head_dim = {d}, block_size = 4, blocks = ?, dtype = {format}>"
        );
        let ir = format!(
            "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({q}, {cty}, {kvt}, {kvt}, {st}, {tt}, {lt}) -> ({q}, {cty})> {{\n      ^body(q: {q}, c: {cty}, k: {kvt}, v: {kvt}, s: {st}, t: {tt}, l: {lt}):\n        y, c2 = llm.append_attention q, c, k, v, s, t, l {{layer = 0, kv_heads = {kv}}} : {q}, {cty};\n        z = llm.paged_attention q, c2, t, l {{layer = 0, kv_heads = {kv}}} : {q};\n        w = llm.add y, z : {q};\n        llm.return w, c2\n    }}\n}}\n",
            q = ty(&[1, t, kv, d]),
            kvt = ty(&[t, kv, d]),
            st = ity(&[t]),
            tt = ity(&[1, 1]),
            lt = ity(&[1]),
        );
        let params = KvCacheParams {
            layers: 1,
            kv_heads: kv as u64,
            head_dim: d as u64,
            block_size: 4,
            blocks: None,
            storage: KvStorage::Quantized(format.clone()),
            window: None,
        };
        let args = vec![
            tensor(&[1, t, kv, d], 1, 1.0),
            Value::Cache(KvCache::new(params, 2)),
            tensor(&[t, kv, d], 2, 1.0),
            tensor(&[t, kv, d], 3, 1.0),
            ints(&[t], vec![4, 5, 6]),
            ints(&[1, 1], vec![1]),
            ints(&[1], vec![t as i64]),
        ];
        agree(&ir, args, 2e-6).unwrap_or_else(|e| panic!("{format}: {e}"));
    }
}

/// Token ids outside the table, block-table entries outside the pool, KV slots outside
/// it and expert ids outside the stacked experts are errors on both backends, not reads
/// or writes out of bounds (on a GPU those would not even fault), in the kernels: no op is
/// left to the reference semantics, which reports them too.
#[test]
fn bad_indices_are_rejected() {
    let check = |ir: &str, store: &Store, args: Vec<Value>, want: &str| {
        let mut ctx = Context::new();
        let module = text::parse_module(&mut ctx, ir).unwrap();
        let f = interp::find_func(&ctx, module, "f").unwrap();
        let hoisted = Interpreter::new(&ctx, store).hoist(f).unwrap();
        let program = Program::build(&ctx, f, &hoisted, &Options::default()).unwrap();
        assert!(program.stats().reference_ops.is_empty(), "cpu: {ir}");
        let err = program.run(&ctx, store, args.clone()).unwrap_err();
        assert!(err.to_string().contains(want), "cpu: {err}");
        if let Some(gpu) = gpu() {
            let program = gpu::Compiler::new(gpu)
                .build(&ctx, f, &hoisted, Rows::Few)
                .unwrap();
            assert!(program.stats().reference_ops.is_empty(), "gpu: {ir}");
            let err = program.run(&ctx, store, args).unwrap_err();
            assert!(err.to_string().contains(want), "gpu: {err}");
        }
    };
    let ir = func(
        &[("ids".into(), ity(&[2]))],
        &ty(&[2, 4]),
        &format!(
            "table = llm.weight {{name = \"table\"}} : {};\n        y = llm.embedding table, ids : {};",
            ty(&[3, 4]),
            ty(&[2, 4])
        ),
    );
    let store = Store(vec![("table".into(), Rc::new(tensor(&[3, 4], 1, 1.0)))]);
    check(&ir, &store, vec![ints(&[2], vec![1, 3])], "token id 3");

    let (c, cty) = cache(1, 4, 2, 1);
    let ir = func(
        &[
            ("q".into(), ty(&[1, 1, 1, 4])),
            ("c".into(), cty.clone()),
            ("t".into(), ity(&[1, 2])),
            ("l".into(), ity(&[1])),
        ],
        &ty(&[1, 1, 1, 4]),
        &format!(
            "y = llm.paged_attention q, c, t, l {{layer = 0, kv_heads = 1}} : {};",
            ty(&[1, 1, 1, 4])
        ),
    );
    let args = vec![
        tensor(&[1, 1, 1, 4], 1, 1.0),
        c.clone(),
        ints(&[1, 2], vec![0, 7]),
        ints(&[1], vec![6]),
    ];
    check(&ir, &Store(Vec::new()), args, "block 7 is out of range");

    let ir = format!(
        "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({cty}, {kvt}, {st}) -> ({cty})> {{\n      ^body(c: {cty}, k: {kvt}, s: {st}):\n        c2 = llm.append_kv c, k, k, s {{layer = 0}} : {cty};\n        llm.return c2\n    }}\n}}\n",
        kvt = ty(&[1, 1, 4]),
        st = ity(&[1]),
    );
    let args = vec![c, tensor(&[1, 1, 4], 2, 1.0), ints(&[1], vec![8])];
    check(&ir, &Store(Vec::new()), args, "slot 8");

    let ir = func(
        &[
            ("x".into(), ty(&[2, 8])),
            ("w".into(), ty(&[3, 4, 8])),
            ("ids".into(), ity(&[2, 2])),
        ],
        &ty(&[2, 2, 4]),
        &format!("y = llm.expert_matmul x, w, ids : {};", ty(&[2, 2, 4])),
    );
    for bad in [3, -1] {
        let args = vec![
            tensor(&[2, 8], 3, 1.0),
            tensor(&[3, 4, 8], 4, 1.0),
            ints(&[2, 2], vec![0, 2, 1, bad]),
        ];
        check(&ir, &Store(Vec::new()), args, "expert id");
    }
}

/// Slices of one value run as one step, and a reshape whose operand has no other use is
/// folded into the step that makes the operand: the results are the interpreter's and the
/// call runs 6 steps for the 12 ops (return included).
#[test]
fn slices_merge_and_reshapes_fold_into_their_producers() {
    let m = 3;
    let body = format!(
        "a = llm.slice x {{starts = [0, 0]}} : {s};
        b = llm.slice x {{starts = [0, 4]}} : {s};
        c = llm.slice x {{starts = [0, 8]}} : {s};
        ar = llm.reshape a : {r};
        br = llm.reshape b : {r};
        sum = llm.add ar, br : {r};
        t = llm.reshape sum : {s};
        q = llm.reshape t : {r};
        u = llm.mul t, c : {s};
        ur = llm.reshape u : {r};
        y = llm.add q, ur : {r};",
        s = ty(&[m, 4]),
        r = ty(&[m, 2, 2]),
    );
    let ir = func(&[("x".into(), ty(&[m, 12]))], &ty(&[m, 2, 2]), &body);
    let args = vec![tensor(&[m, 12], 5, 1.0)];
    cpu_agrees(&ir, args.clone(), 0.0).unwrap();
    let (ctx, f, _, hoisted) = reference(&ir, &args, &Store(Vec::new())).unwrap();
    let program = Program::build(&ctx, f, &hoisted, &Options::default()).unwrap();
    // The three slices; the add (relabelled as t: ar and br fold into the slices); q (t
    // has two uses); the mul (relabelled as ur); the last add; the return.
    assert_eq!(program.stats().steps, 6);
}

/// A reshape folded into the step that makes its operand still fails as itself: at run
/// time 6 values cannot take the shape `?x4`, and the error points at the reshape.
#[test]
fn a_folded_reshape_reports_its_own_location() {
    let ir = func(
        &[("x".into(), "llm.tensor <?x6xf32>".into())],
        "llm.tensor <?x4xf32>",
        "e = llm.exp x : llm.tensor <?x6xf32>;\n        y = llm.reshape e : llm.tensor <?x4xf32>;",
    );
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, &ir).unwrap();
    let f = interp::find_func(&ctx, module, "f").unwrap();
    let store = Store(Vec::new());
    let hoisted = Interpreter::new(&ctx, &store).hoist(f).unwrap();
    let program = Program::build(&ctx, f, &hoisted, &Options::default()).unwrap();
    assert_eq!(
        program.stats().steps,
        2,
        "the reshape is folded into the exp"
    );
    let err = program
        .run(&ctx, &store, vec![tensor(&[1, 6], 1, 1.0)])
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("6:9: llm.reshape: 6 elements"), "{err}");
    let ok = program
        .run(&ctx, &store, vec![tensor(&[2, 6], 1, 1.0)])
        .unwrap();
    assert_eq!(ok[0].tensor().unwrap().shape, [3, 4]);
}

/// A row's result does not depend on the rows computed with it, nor on whether the
/// microkernels run: `panel_rows` (and its 16-bit siblings) takes rows three, two or one
/// at a time, the 16-bit row kernels take the rows after the last panel, and without
/// microkernels every row takes the generated code, all with the same additions in the
/// same order (batching must not change a sequence's tokens).
#[test]
fn rows_are_bit_identical_alone_and_in_pairs() {
    for (n, k) in [
        (8, 64),
        (6, 20),
        (9, 13),
        (4, 5),
        (12, 24),
        (21, 9),
        (20, 6),
        (7, 47),
    ] {
        for format in [None, Some(QuantFormat::F16), Some(QuantFormat::BF16)] {
            // Two rows take a pair, three a tile of three, four a tile of three and a row
            // alone, five a tile of three and a pair (16-bit panels are widened whole from
            // four rows).
            let m = 5;
            let (w_ty, w, op) = match &format {
                None => (ty(&[n, k]), tensor(&[n, k], 7, 1.0), "matmul"),
                Some(f) => (
                    format!("llm.quantized_tensor <{n}x{k}, {}>", f.name()),
                    quantized(f, [n, k], 7),
                    "quantized_matmul",
                ),
            };
            let attrs = if format.is_none() {
                " {transpose_rhs = true}"
            } else {
                ""
            };
            let body = |m: usize| {
                format!(
                    "w = llm.weight {{name = \"w\"}} : {w_ty};\n        y = llm.{op} x, w{attrs} : {};",
                    ty(&[m, n])
                )
            };
            let store = Store(vec![("w".into(), Rc::new(w))]);
            let x = values(3, m * k, 1.0);
            let run = |rows: usize, data: &[f32], microkernels: bool| -> Vec<u32> {
                let ir = func(
                    &[("x".into(), ty(&[rows, k]))],
                    &ty(&[rows, n]),
                    &body(rows),
                );
                let mut ctx = Context::new();
                let module = text::parse_module(&mut ctx, &ir).unwrap();
                let f = interp::find_func(&ctx, module, "f").unwrap();
                let hoisted = Interpreter::new(&ctx, &store).hoist(f).unwrap();
                let options = Options {
                    microkernels,
                    ..Options::default()
                };
                let program = Program::build(&ctx, f, &hoisted, &options).unwrap();
                let arg = Value::Tensor(Tensor::from_f32(vec![rows, k], DType::F32, data.to_vec()));
                let out = program.run(&ctx, &store, vec![arg]).unwrap();
                let floats = out[0].tensor().unwrap().floats().unwrap().to_vec();
                floats.iter().map(|f| f.to_bits()).collect()
            };
            let alone: Vec<Vec<u32>> = (0..m)
                .map(|r| run(1, &x[r * k..(r + 1) * k], true))
                .collect();
            for rows in 2..=m {
                let together = run(rows, &x[..rows * k], true);
                assert_eq!(
                    together,
                    run(rows, &x[..rows * k], false),
                    "{n}x{k} {format:?}: microkernels changed bits"
                );
                for (r, alone) in alone.iter().take(rows).enumerate() {
                    assert_eq!(
                        *alone,
                        together[r * n..(r + 1) * n],
                        "{n}x{k} {format:?} row {r} of {rows}"
                    );
                }
            }
        }
    }
}

/// A Llama-shaped decode step (embedding, RMS-normed q/k/v projection, slices, rope,
/// append-attention over the paged cache, output projection with its residual, SiLU, RMS
/// norm and a classifier tied to the embedding) runs step by step, then traced, then
/// through its call plan: every call agrees with the interpreter, the plan's call with
/// the step-by-step one bit for bit, and a later context (more positions, a wider block
/// table) still runs through the plan. Bad token ids, slots and positions are errors on
/// the planned path too.
#[test]
fn decode_steps_run_through_a_call_plan() {
    let (vocab, dim, heads, kv, d, seqs) = (24, 16, 4, 2, 4, 2);
    let qkv = (heads + 2 * kv) * d;
    let (c, cty) = cache(kv, d, 8, 31);
    let body = format!(
        "emb = llm.weight {{name = \"emb\"}} : {emb};
        g = llm.weight {{name = \"g\"}} : {g};
        w = llm.weight {{name = \"wqkv\"}} : {wqkv};
        wo = llm.weight {{name = \"wo\"}} : {wo};
        x = llm.embedding emb, tokens : {x};
        p = llm.rms_norm_matmul x, g, w {{eps = 1e-5, transpose_rhs = true}} : {pt};
        q = llm.slice p {{starts = [0, 0]}} : {qt};
        k = llm.slice p {{starts = [0, {ko}]}} : {kt};
        v = llm.slice p {{starts = [0, {vo}]}} : {kt};
        qh = llm.reshape q : {qh};
        kh = llm.reshape k : {kh};
        vh = llm.reshape v : {kh};
        qr = llm.rope qh, positions {{theta = 10000.0, layout = interleaved}} : {qh};
        kr = llm.rope kh, positions {{theta = 10000.0, layout = interleaved}} : {kh};
        qb = llm.reshape qr : {qb};
        a, c2 = llm.append_attention qb, c, kr, vh, slots, tables, lens {{layer = 1, kv_heads = {kv}}} : {qb}, {cty};
        af = llm.reshape a : {qt};
        o = llm.matmul af, wo {{transpose_rhs = true}} : {x};
        xa = llm.add x, o : {x};
        s = llm.silu xa : {x};
        n = llm.rms_norm s, g {{eps = 1e-5}} : {x};
        y = llm.matmul n, emb {{transpose_rhs = true}} : {logits};
        llm.return y, c2",
        emb = ty(&[vocab, dim]),
        g = ty(&[dim]),
        wqkv = ty(&[qkv, dim]),
        wo = ty(&[dim, heads * d]),
        x = ty(&[seqs, dim]),
        pt = ty(&[seqs, qkv]),
        qt = ty(&[seqs, heads * d]),
        kt = ty(&[seqs, kv * d]),
        ko = heads * d,
        vo = (heads + kv) * d,
        qh = ty(&[seqs, heads, d]),
        kh = ty(&[seqs, kv, d]),
        qb = ty(&[seqs, 1, heads, d]),
        logits = ty(&[seqs, vocab]),
    );
    let ir = format!(
        "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <(llm.tensor <?xi32>, llm.tensor <?xi32>, llm.tensor <?xi32>, llm.tensor <?x?xi32>, llm.tensor <?xi32>, {cty}) -> ({logits}, {cty})> {{\n      ^body(tokens: llm.tensor <?xi32>, positions: llm.tensor <?xi32>, slots: llm.tensor <?xi32>, tables: llm.tensor <?x?xi32>, lens: llm.tensor <?xi32>, c: {cty}):\n        {body}\n    }}\n}}\n",
        logits = ty(&[seqs, vocab]),
    );
    let store = Store(vec![
        ("emb".into(), Rc::new(tensor(&[vocab, dim], 32, 1.0))),
        ("g".into(), Rc::new(tensor(&[dim], 33, 1.0))),
        ("wqkv".into(), Rc::new(tensor(&[qkv, dim], 34, 0.5))),
        ("wo".into(), Rc::new(tensor(&[dim, heads * d], 35, 0.5))),
    ]);
    // Two sequences whose tables are blocks 0..4 and 4..8, at `len - 1` (4 slots a block).
    let args = |lens: [i64; 2], width: usize, tokens: [i64; 2]| {
        let table: Vec<i64> = (0..seqs as i64)
            .flat_map(|s| (0..width as i64).map(move |b| 4 * s + b))
            .collect();
        let slot = |s: usize| table[s * width + (lens[s] as usize - 1) / 4] * 4 + (lens[s] - 1) % 4;
        vec![
            ints(&[seqs], tokens.to_vec()),
            ints(&[seqs], lens.iter().map(|l| l - 1).collect()),
            ints(&[seqs], vec![slot(0), slot(1)]),
            ints(&[seqs, width], table),
            ints(&[seqs], lens.to_vec()),
            c.clone(),
        ]
    };
    let first = args([3, 2], 1, [5, 17]);
    let (ctx, func, want, hoisted) = reference(&ir, &first, &store).unwrap();
    let options = Options {
        target: Target::Host,
        threads: 1,
        microkernels: true,
    };
    let program = Program::build(&ctx, func, &hoisted, &options).unwrap();
    assert!(program.stats().reference_ops.is_empty());
    let mut runs = Vec::new();
    for planned in [0, 0, 1] {
        let got = program.run(&ctx, &store, first.clone()).unwrap();
        assert_eq!(program.planned_runs(), planned);
        runs.push(("cpu".to_string(), got));
    }
    assert!(
        identical(&runs[2].1, &runs[0].1),
        "the planned call differs"
    );
    // The logits (the appended keys and values are the projection's, which rounds
    // differently from the interpreter's: compared through the logits they make).
    let logits = |runs: &[(String, Vec<Value>)]| -> Vec<(String, Vec<Value>)> {
        runs.iter()
            .map(|(name, got)| (name.clone(), got[..1].to_vec()))
            .collect()
    };
    compare(&logits(&runs), &want[..1], 2e-5, &ir).unwrap();
    // Longer contexts over wider tables: the same plan.
    let later = args([7, 5], 2, [1, 23]);
    let (_, _, want, _) = reference(&ir, &later, &store).unwrap();
    let got = program.run(&ctx, &store, later).unwrap();
    assert_eq!(program.planned_runs(), 2);
    compare(
        &logits(&[("cpu, planned".into(), got)]),
        &want[..1],
        2e-5,
        &ir,
    )
    .unwrap();
    // Bad values are errors, with the op's location.
    let bad_token = args([3, 2], 1, [5, vocab as i64]);
    let e = program
        .run(&ctx, &store, bad_token)
        .unwrap_err()
        .to_string();
    assert!(e.contains("out of range"), "{e}");
    let mut bad_slot = args([3, 2], 1, [5, 17]);
    bad_slot[2] = ints(&[seqs], vec![0, 64]);
    let e = program.run(&ctx, &store, bad_slot).unwrap_err().to_string();
    assert!(e.contains("slot 64"), "{e}");
    let mut short = args([3, 2], 1, [5, 17]);
    short[1] = ints(&[1], vec![2]);
    let e = program.run(&ctx, &store, short).unwrap_err().to_string();
    assert!(e.contains("positions"), "{e}");
    assert_eq!(program.planned_runs(), 5);
}

/// q8_0 activations (a quantize, its contraction with a q4_0 weight in block panels and
/// the residual) run through a call plan too, with the step-by-step run's bits, on one
/// and two threads.
#[test]
fn quantized_activations_run_through_a_call_plan() {
    let (m, n, k) = (3, 40, 64);
    let (ir, store) = quantized_activations([m, n, k], &QuantFormat::Q4_0, 41);
    let args = vec![tensor(&[m, k], 42, 3.0), tensor(&[m, n], 43, 1.0)];
    let (ctx, func, want, hoisted) = reference(&ir, &args, &store).unwrap();
    for threads in [1, 2] {
        let options = Options {
            target: Target::Host,
            threads,
            microkernels: true,
        };
        let program = Program::build(&ctx, func, &hoisted, &options).unwrap();
        let runs: Vec<(String, Vec<Value>)> = (0..3)
            .map(|i| {
                (
                    format!("run {i}"),
                    program.run(&ctx, &store, args.clone()).unwrap(),
                )
            })
            .collect();
        assert_eq!(program.planned_runs(), 1);
        assert!(
            identical(&runs[2].1, &runs[0].1),
            "the planned call differs"
        );
        compare(&runs, &want, 4e-5, &ir).unwrap();
        // A tensor whose values outnumber its shape is an error on the planned path, not a
        // write past the plan's buffers.
        let mut long = args.clone();
        long[0] = Value::Tensor(Tensor {
            shape: vec![m, k],
            dtype: DType::F32,
            data: Data::Float(values(44, m * k + 64, 1.0)),
        });
        let e = program.run(&ctx, &store, long).unwrap_err().to_string();
        assert!(e.contains("not the 192 of its shape"), "{e}");
        assert_eq!(program.planned_runs(), 2);
    }
}

/// Row-blocked [`format_case`]s (whose experts' rows lie by themselves): the GGUF block
/// formats but q8_0 and q4_0, which `expert_matmul_agrees` adds, and the 16-bit floats.
const ROW_BLOCKED_CASES: [usize; 24] = [
    0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// `llm.expert_matmul` on both backends against the reference: `f32` experts and every
    /// row-blocked format, an input shared by a token's slots or one per slot, and tokens
    /// that choose one expert several times (so an expert's rows are gathered).
    #[test]
    fn expert_matmul_agrees(
        t in 1usize..7,
        s in 1usize..4,
        e in 1usize..5,
        n in 1usize..20,
        blocks in 1usize..3,
        case in 0usize..ROW_BLOCKED_CASES.len() + 3,
        per_slot in any::<bool>(),
        seed: u64,
    ) {
        // The row-blocked cases, then q8_0 and q4_0 (the GPU's block-at-a-time loop), then f32.
        let block_case = match ROW_BLOCKED_CASES.get(case) {
            Some(&which) => Some(format_case(which, blocks)),
            None => match case - ROW_BLOCKED_CASES.len() {
                0 => Some((32 * blocks, QuantFormat::Q8_0, "q8_0".to_string())),
                1 => Some((32 * blocks, QuantFormat::Q4_0, "q4_0".to_string())),
                _ => None,
            },
        };
        let (k, weight, w_type) = match block_case {
            Some((k, format, text)) => {
                let Value::Quantized(mut q) = quantized(&format, [e * n, k], seed + 1) else {
                    unreachable!("a quantized weight")
                };
                q.shape = vec![e, n, k];
                (k, Value::Quantized(q), format!("llm.quantized_tensor <{e}x{n}x{k}, {text}>"))
            }
            None => {
                let k = 13 * blocks;
                (k, tensor(&[e, n, k], seed + 1, 1.0), ty(&[e, n, k]))
            }
        };
        let x_shape = if per_slot { vec![t, s, k] } else { vec![t, k] };
        let ids: Vec<i64> = values(seed + 2, t * s, 1.0)
            .iter()
            .map(|v| ((v + 1.0) * 0.5 * e as f32) as i64 % e as i64)
            .collect();
        let ir = func(
            &[
                ("x".into(), ty(&x_shape)),
                ("w".into(), w_type),
                ("ids".into(), ity(&[t, s])),
            ],
            &ty(&[t, s, n]),
            &format!("y = llm.expert_matmul x, w, ids : {};", ty(&[t, s, n])),
        );
        let args = vec![tensor(&x_shape, seed, 1.0), weight, ints(&[t, s], ids)];
        agree(&ir, args, 1e-4)?;
    }

    /// `llm.topk` on both backends against the reference, on rows with ties: the values, then
    /// the indices as floats.
    #[test]
    fn topk_agrees(rows in 1usize..5, n in 1usize..12, pick in 0usize..12, seed: u64) {
        let k = pick % n + 1;
        let x: Vec<f32> = values(seed, rows * n, 2.0).iter().map(|v| v.round()).collect();
        let body = format!(
            "v, i = llm.topk x {{k = {k}}} : {}, {};\n        c = llm.cast i : {};\n        y = llm.concat v, c {{axis = 1}} : {};",
            ty(&[rows, k]),
            ity(&[rows, k]),
            ty(&[rows, k]),
            ty(&[rows, 2 * k])
        );
        let ir = func(&[("x".into(), ty(&[rows, n]))], &ty(&[rows, 2 * k]), &body);
        agree(&ir, vec![Value::Tensor(Tensor::from_f32(vec![rows, n], DType::F32, x))], 0.0)?;
    }
}
