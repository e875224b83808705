//! `llm-run exec`: run one function of an IR file on the reference interpreter with inputs
//! from `.npy` files or seeded random data.

use std::{collections::HashMap, path::Path};

use llm_ir::{
    dtype::DType,
    interp::{self, Interpreter, KvCache, NoWeights, QTensor, Tensor, Value, WeightStore},
    text,
    types::{PagedKvCacheType, QuantizedTensorType, ShardedTensorType, TensorType},
};
use llm_runtime::{generate::Backend, npy, sampler::XorShift};
use pliron::{
    builtin::{type_interfaces::FunctionTypeInterface, types::FunctionType},
    common_traits::Named,
    context::Context,
    printable::Printable,
    r#type::{TypeHandle, TypedHandle},
};

/// Uniform in `[-1, 1)`.
fn uniform(rng: &mut XorShift) -> f32 {
    rng.next_f32() * 2.0 - 1.0
}

/// Size used for a dynamic dim of a random input.
const DYNAMIC_DIM: usize = 1;
/// Blocks of a random KV cache whose type leaves the count open.
const DYNAMIC_BLOCKS: usize = 8;

fn concrete(dims: &[Option<u64>]) -> Vec<usize> {
    dims.iter()
        .map(|d| d.map_or(DYNAMIC_DIM, |d| d as usize))
        .collect()
}

fn random_tensor(rng: &mut XorShift, shape: Vec<usize>, dtype: DType) -> Tensor {
    let n = shape.iter().product();
    if dtype.is_float() {
        Tensor::from_f32(shape, dtype, (0..n).map(|_| uniform(rng)).collect())
    } else {
        Tensor::from_i64(
            shape,
            dtype,
            (0..n).map(|_| 1 + (rng.next_u64() % 7) as i64).collect(),
        )
    }
}

/// A seeded random value of type `ty`.
fn random_value(ctx: &Context, rng: &mut XorShift, ty: TypeHandle) -> Result<Value, String> {
    if let Ok(t) = TypedHandle::<TensorType>::from_handle(ty, ctx) {
        let t = t.deref(ctx);
        return Ok(Value::Tensor(random_tensor(
            rng,
            concrete(t.shape()),
            t.dtype(),
        )));
    }
    if let Ok(t) = TypedHandle::<QuantizedTensorType>::from_handle(ty, ctx) {
        let t = t.deref(ctx);
        let shape = concrete(t.shape());
        let values = random_tensor(rng, shape.clone(), DType::F32);
        let bytes = interp::quant::quantize(t.format(), &shape, values.floats()?);
        return Ok(Value::Quantized(QTensor {
            shape,
            format: t.format().clone(),
            bytes,
        }));
    }
    if let Ok(t) = TypedHandle::<PagedKvCacheType>::from_handle(ty, ctx) {
        let t = t.deref(ctx);
        let blocks = t.blocks().map_or(DYNAMIC_BLOCKS, |b| b as usize);
        return Ok(Value::Cache(KvCache::new(t.params(), blocks)));
    }
    if let Ok(t) = TypedHandle::<ShardedTensorType>::from_handle(ty, ctx) {
        let t = t.deref(ctx);
        let global = random_tensor(rng, concrete(t.shape()), t.dtype());
        let shards = (0..t.num_devices() as usize)
            .map(|d| interp::eval::shard::local_shard(&global, t.mesh(), t.split(), d))
            .collect();
        return Ok(Value::Sharded(interp::Sharded {
            shape: global.shape.clone(),
            mesh: t.mesh().to_vec(),
            split: t.split().to_vec(),
            partial: t.partial().to_vec(),
            reduction: t.reduction(),
            shards,
        }));
    }
    Err(format!(
        "cannot make a random value of type {}",
        ty.disp(ctx)
    ))
}

/// One line describing a value: kind, shape, and its first elements.
pub fn describe(value: &Value) -> String {
    fn head(t: &Tensor) -> String {
        let v = t.to_f64();
        let shown: Vec<String> = v.iter().take(8).map(|x| format!("{x:.6}")).collect();
        let more = if v.len() > 8 { ", ..." } else { "" };
        format!(
            "tensor<{:?} x {}> [{}{more}]",
            t.shape,
            t.dtype,
            shown.join(", ")
        )
    }
    match value {
        Value::Tensor(t) => head(t),
        Value::Quantized(q) => format!(
            "quantized_tensor<{:?}, {}> ({} bytes)",
            q.shape,
            q.format.name(),
            q.bytes.len()
        ),
        Value::Cache(c) => format!("paged_kv_cache<{} blocks>", c.blocks),
        Value::Sharded(s) => format!(
            "sharded_tensor<{:?}> on {} devices, device 0: {}",
            s.shape,
            s.shards.len(),
            head(&s.shards[0])
        ),
    }
}

/// Seeded random arguments for `func`: floats uniform in `[-1, 1)`, integers in `[1, 8)`,
/// dynamic dims of size 1 and open KV block counts of 8.
pub fn random_args(
    ctx: &Context,
    func: pliron::builtin::ops::FuncOp,
    seed: u64,
) -> Result<Vec<Value>, String> {
    let fty = TypedHandle::<FunctionType>::from_handle(func.get_type(ctx), ctx)
        .map_err(|_| "bad function type")?;
    let mut rng = XorShift::new(seed.wrapping_mul(2).wrapping_add(0x9E37_79B9_7F4A_7C15) | 1);
    let arg_types = fty.deref(ctx).arg_types();
    arg_types
        .into_iter()
        .map(|ty| random_value(ctx, &mut rng, ty))
        .collect()
}

/// Runs `func` of the IR in `source` with named `.npy` inputs (others random from `seed`);
/// returns the results.
pub fn exec(
    file: &str,
    source: &str,
    func: &str,
    inputs: &HashMap<String, std::path::PathBuf>,
    seed: u64,
    weights: Option<&dyn WeightStore>,
    backend: &Backend,
) -> Result<Vec<Value>, String> {
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, source).map_err(|d| d.render(file))?;
    let f = interp::find_func(&ctx, module, func)
        .ok_or_else(|| format!("{file}: no function @{func}"))?;
    let entry = f.get_entry_block(&ctx);
    let params: Vec<_> = entry.deref(&ctx).arguments().collect();
    let mut args = random_args(&ctx, f, seed)?;
    let mut used = 0;
    for (i, param) in params.iter().enumerate() {
        let name = param
            .given_name(&ctx)
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("arg{i}"));
        if let Some(path) = inputs.get(&name) {
            used += 1;
            let bytes =
                std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
            args[i] =
                Value::Tensor(npy::read(&bytes).map_err(|e| format!("{}: {e}", path.display()))?);
        }
    }
    if used != inputs.len() {
        let names: Vec<String> = params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                p.given_name(&ctx)
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| format!("arg{i}"))
            })
            .collect();
        let unknown: Vec<&String> = inputs.keys().filter(|k| !names.contains(k)).collect();
        return Err(format!(
            "@{func} has no argument named {unknown:?} (arguments: {})",
            names.join(", ")
        ));
    }
    let no_weights = NoWeights;
    let store: &dyn WeightStore = weights.unwrap_or(&no_weights);
    let interpreter = Interpreter::new(&ctx, store);
    match backend {
        Backend::Interp => interpreter.run(f, args),
        Backend::Cpu { threads } => {
            let hoisted = interpreter.hoist(f).map_err(|e| format!("{file}: {e}"))?;
            let options = llm_lower::cpu::Options {
                threads: *threads,
                ..Default::default()
            };
            let program = llm_lower::cpu::Program::build(&ctx, f, &hoisted, &options)
                .map_err(|e| format!("{file}: cpu backend: {e}"))?;
            program.run(&ctx, store, args)
        }
        Backend::Gpu(options) => {
            let hoisted = interpreter.hoist(f).map_err(|e| format!("{file}: {e}"))?;
            let device =
                llm_lower::gpu::Gpu::new(options).map_err(|e| format!("gpu backend: {e}"))?;
            let program = llm_lower::gpu::Compiler::new(std::sync::Arc::new(device))
                .build(&ctx, f, &hoisted, llm_lower::gpu::Rows::Few)
                .map_err(|e| format!("{file}: gpu backend: {e}"))?;
            program.run(&ctx, store, args)
        }
    }
    .map_err(|e| match e.location {
        Some((line, col)) => format!("{file}:{line}:{col}: {}", e.message),
        None => format!("{file}: {}", e.message),
    })
}

/// Writes tensor results as `result<i>.npy` in `dir`, returning the paths written.
pub fn save_results(dir: &Path, results: &[Value]) -> Result<Vec<std::path::PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut written = Vec::new();
    for (i, value) in results.iter().enumerate() {
        if let Value::Tensor(t) = value {
            let path = dir.join(format!("result{i}.npy"));
            std::fs::write(&path, npy::write(t)).map_err(|e| format!("{}: {e}", path.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}
