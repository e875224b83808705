//! A function compiled for the GPU: its ops in order, each a list of shader dispatches or
//! (for ops without a GPU lowering) the op's reference semantics on the host.
//!
//! Weights are uploaded once, when the program is built, split into row parts that each
//! fit one storage binding; the paged KV pool is uploaded on first use and stays on the
//! device between calls (the returned cache names it through [`KvCache::resident`]). A
//! call records every dispatch into one command encoder and submits it once, reading
//! back only the function's results, unless a reference op needs a device value on the
//! host first. Indices the shaders follow (token ids, KV slots, block tables, context
//! lengths) are checked on the host before anything is dispatched: out-of-range storage
//! accesses on a GPU do not fault, they read or write the wrong place.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    rc::Rc,
    sync::Arc,
};

use llm_ir::{
    dtype::DType,
    interp::{
        self, Hoisted, InterpError, KvCache, Resident, Tensor, Value, WeightStore,
        eval::{
            attention::{for_each_paged_row, rope_sin_cos},
            resolve_shape,
        },
    },
    syntax::Dim,
    types::{KvCacheParams, KvStorage, QuantFormat, TensorType},
};
use pliron::{
    builtin::{
        op_interfaces::SymbolOpInterface, ops::FuncOp, type_interfaces::FunctionTypeInterface,
        types::FunctionType,
    },
    context::{Context, Ptr},
    linked_list::ContainsLinkedList,
    operation::Operation,
    r#type::{TypeHandle, Typed, TypedHandle},
    value::Value as IrValue,
};

use super::{
    GpuError, Limits,
    device::Gpu,
    wgsl::{self, CONTRACTION_ROWS, MAX_HEAD_DIM, PARAM_WORDS, Shader, WORKGROUP},
};
use crate::{
    kernel::{AttentionSource, Contraction, Kernel, Movement, WeightFormat},
    selection::{Selection, live_ops, select_all, weight_operand},
};

/// Invocations per workgroup, as a count.
const WG: usize = WORKGROUP as usize;

/// Bytes between two dispatches' parameter blocks (WebGPU's uniform offset alignment).
const PARAM_STRIDE: u64 = 256;

/// Counts of how a function's ops were lowered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoweringStats {
    /// Ops run by shaders (fused ones included).
    pub kernel_ops: usize,
    /// Distinct shaders (compute pipelines).
    pub shaders: usize,
    /// Dispatches of one call, when every op runs as planned.
    pub dispatches: usize,
    /// Ops run through their reference semantics on the host, by name.
    pub reference_ops: Vec<(String, usize)>,
    /// Ops evaluated once at load (weight-derived).
    pub hoisted_ops: usize,
    /// Ops fused into another op's shader.
    pub fused_ops: usize,
    /// Bytes of weights this program uploaded (zero for weights an earlier program of the
    /// same [`Compiler`] uploaded).
    pub upload_bytes: usize,
    /// Constants its shaders read that are split into several row parts, because one
    /// binding cannot hold them.
    pub split_weights: usize,
    /// Milliseconds spent validating shaders and creating pipelines.
    pub pipeline_ms: f64,
}

/// How one element of a device tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    /// `f32`.
    F32,
    /// `i32` (integer tensors of any width; values are range-checked on upload).
    I32(DType),
    /// Quantized rows (q8_0, q4_0).
    Quant(WeightFormat),
}

/// Rows `first..first + rows` of a tensor, in one buffer.
#[derive(Clone)]
struct Part {
    first: usize,
    rows: usize,
    buffer: wgpu::Buffer,
}

/// A tensor in device memory, in row parts that each fit one binding.
#[derive(Clone)]
struct DeviceTensor {
    shape: Vec<usize>,
    elem: Elem,
    parts: Vec<Part>,
}

impl DeviceTensor {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The one buffer of an unsplit tensor.
    fn whole(&self) -> Result<&wgpu::Buffer, String> {
        match self.parts.as_slice() {
            [p] => Ok(&p.buffer),
            _ => Err(format!(
                "a tensor {:?} split in {} parts cannot be bound whole",
                self.shape,
                self.parts.len()
            )),
        }
    }
}

/// A paged KV pool in device memory: one key and one value buffer per layer.
struct Pool {
    params: KvCacheParams,
    blocks: usize,
    k: Vec<wgpu::Buffer>,
    v: Vec<wgpu::Buffer>,
    /// The device that holds it (a cache cannot move between devices).
    gpu: Arc<Gpu>,
}

impl Pool {
    /// The cache value that names this pool.
    fn cache(self: &Arc<Pool>) -> KvCache {
        KvCache {
            params: self.params.clone(),
            blocks: self.blocks,
            k: Vec::new(),
            v: Vec::new(),
            resident: Some(Resident(Arc::clone(self) as Arc<_>)),
        }
    }
}

/// What a value slot holds during a call.
#[derive(Clone)]
enum Slot {
    /// A host value, with its device copy once a shader needed it.
    Host(Rc<Value>, Option<DeviceTensor>),
    /// A value only the device has.
    Device(DeviceTensor),
    /// A KV pool on the device.
    Pool(Arc<Pool>),
}

/// What one step does.
enum Action {
    /// Dispatches the shaders (pipelines) of a kernel.
    Kernel(Kernel, Vec<wgpu::ComputePipeline>),
    /// Evaluates the op on the host.
    Reference,
    /// Returns the inputs.
    Return,
}

/// One op of the function.
struct Step {
    action: Action,
    op: Ptr<Operation>,
    inputs: Vec<usize>,
    outputs: Vec<usize>,
    location: Option<(u32, u32)>,
    name: String,
    dims: Vec<Dim>,
}

/// One recorded dispatch.
struct Dispatch {
    pipeline: wgpu::ComputePipeline,
    group: wgpu::BindGroup,
    grid: [u32; 2],
}

/// Device buffers a program keeps between calls.
#[derive(Default)]
struct Buffers {
    /// Per (step, output): the buffer its result is written to.
    outputs: HashMap<(usize, usize), wgpu::Buffer>,
    /// Per slot: the buffer a host value is uploaded to.
    uploads: HashMap<usize, wgpu::Buffer>,
    /// The parameter blocks of one call's dispatches.
    params: Option<wgpu::Buffer>,
    /// Bind groups by pipeline, parameter offset and buffers.
    groups: HashMap<(wgpu::ComputePipeline, u64, Vec<wgpu::Buffer>), wgpu::BindGroup>,
}

/// Uploaded weights shared by the programs of one [`Compiler`].
type Uploads = RefCell<HashMap<(*const Value, bool), (Rc<Value>, DeviceTensor)>>;

/// Compiles the functions of one model for one device: they share uploaded weights.
pub struct Compiler {
    gpu: Arc<Gpu>,
    uploads: Uploads,
}

impl Compiler {
    /// A compiler for `gpu`.
    pub fn new(gpu: Arc<Gpu>) -> Compiler {
        Compiler {
            gpu,
            uploads: RefCell::default(),
        }
    }

    /// The device programs are compiled for.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Compiles `func`, taking its weight-derived values from `hoisted`.
    pub fn build(
        &self,
        ctx: &Context,
        func: FuncOp,
        hoisted: &Hoisted,
    ) -> Result<Program, GpuError> {
        Program::compile(ctx, func, hoisted, self)
    }
}

/// A function compiled for the GPU.
pub struct Program {
    gpu: Arc<Gpu>,
    name: String,
    steps: Vec<Step>,
    slots: usize,
    params: Vec<usize>,
    arg_types: Vec<TypeHandle>,
    res_types: Vec<TypeHandle>,
    constants: Vec<(usize, Slot)>,
    stats: LoweringStats,
    buffers: RefCell<Buffers>,
}

/// The shaders each selected op runs, with the ops the device limits send back to the
/// reference semantics.
fn plan(selection: &mut Selection, limits: &Limits) -> Vec<Vec<Shader>> {
    selection
        .per_op
        .iter_mut()
        .map(|chosen| {
            let Some(c) = chosen else {
                return Vec::new();
            };
            let shaders = wgsl::shaders_for(&c.kernel);
            let too_wide = matches!(c.kernel, Kernel::Attention { d, .. } if d > MAX_HEAD_DIM);
            let fits = shaders.iter().all(|s| limits.admit(s).is_ok());
            if too_wide || !fits {
                *chosen = None;
                return Vec::new();
            }
            shaders
        })
        .collect()
}

/// The listing `llm-opt --emit=wgsl` prints for `func`: a summary line, then every
/// distinct shader (validated) in first-use order.
pub(super) fn listing(ctx: &Context, func: FuncOp, limits: &Limits) -> Result<String, GpuError> {
    let all: Vec<_> = func.get_entry_block(ctx).deref(ctx).iter(ctx).collect();
    let constant = interp::weight_derived(ctx, &all);
    let ops = live_ops(ctx, &all, |r| constant.contains(&r));
    let mut selection = select_all(ctx, &ops, |v| constant.contains(&v));
    let plans = plan(&mut selection, limits);
    let mut shaders: Vec<Shader> = Vec::new();
    for s in plans.into_iter().flatten() {
        if !shaders.contains(&s) {
            shaders.push(s);
        }
    }
    let reference: Vec<String> = selection
        .reference_ops(ctx, &ops)
        .iter()
        .map(|(n, c)| format!("{n} x{c}"))
        .collect();
    let mut out = format!(
        "// @{}: {} shader(s) for {} op(s); {} op(s) evaluated once at load; reference semantics: {}\n",
        func.get_symbol_name(ctx),
        shaders.len(),
        selection.kernel_ops(),
        all.len() - ops.len(),
        if reference.is_empty() {
            "none".to_string()
        } else {
            reference.join(", ")
        }
    );
    for s in &shaders {
        let source = s.source();
        super::validate(&source).map_err(|e| GpuError(format!("{}: {e}", s.name())))?;
        out.push_str(&source);
        out.push('\n');
    }
    Ok(out)
}

fn error(location: Option<(u32, u32)>, message: impl Into<String>) -> InterpError {
    InterpError {
        location,
        message: message.into(),
    }
}

/// The bytes of `value` as a device tensor: `f32` as is, integers as `i32` (checked),
/// quantized rows as stored; `transpose` turns a `[k, n]` matrix into `[n, k]`.
fn device_bytes(value: &Value, transpose: bool) -> Result<(Vec<usize>, Elem, Vec<u8>), String> {
    match value {
        Value::Tensor(t) if t.dtype == DType::F32 => {
            let floats = t.floats()?;
            let (shape, data) = match (transpose, t.shape.as_slice()) {
                (true, &[k, n]) => (
                    vec![n, k],
                    (0..n)
                        .flat_map(|j| (0..k).map(move |p| floats[p * n + j]))
                        .collect::<Vec<f32>>(),
                ),
                _ => (t.shape.clone(), floats.to_vec()),
            };
            Ok((shape, Elem::F32, bytemuck::cast_slice(&data).to_vec()))
        }
        Value::Tensor(t) => {
            let ints = t
                .ints()
                .map_err(|_| format!("a {:?} tensor has no GPU representation", t.dtype))?;
            let mut out = Vec::with_capacity(ints.len() * 4);
            for &i in ints {
                let v = i32::try_from(i)
                    .map_err(|_| format!("the integer {i} does not fit the GPU's 32 bits"))?;
                out.extend_from_slice(&v.to_le_bytes());
            }
            Ok((t.shape.clone(), Elem::I32(t.dtype), out))
        }
        Value::Quantized(q) => {
            let format = match q.format {
                QuantFormat::Q8_0 => WeightFormat::Q8_0,
                QuantFormat::Q4_0 => WeightFormat::Q4_0,
                ref other => return Err(format!("{other:?} weights have no GPU kernel")),
            };
            Ok((q.shape.clone(), Elem::Quant(format), q.bytes.clone()))
        }
        other => Err(format!("{} has no GPU representation", other.kind())),
    }
}

/// Bytes of one row (the first dim) of a tensor of `shape` stored as `elem`.
fn row_bytes(shape: &[usize], elem: Elem) -> usize {
    let inner: usize = shape.iter().skip(1).product();
    match elem {
        Elem::Quant(f) => f.row_bytes(inner),
        _ => 4 * inner,
    }
}

/// Uploads `bytes` in row parts of at most `limits.max_binding_bytes` each.
fn upload_parts(
    gpu: &Gpu,
    label: &str,
    shape: Vec<usize>,
    elem: Elem,
    bytes: &[u8],
) -> Result<DeviceTensor, String> {
    let rows = shape.first().copied().unwrap_or(1).max(1);
    let row = row_bytes(&shape, elem).max(1);
    let limit = gpu.limits().max_binding_bytes as usize;
    // Parts are padded to 4 bytes, so a part of `per` rows takes up to `per * row + 3`.
    let per = if shape.len() < 2 {
        rows
    } else {
        (limit.saturating_sub(3) / row).max(1)
    };
    if per * row > limit && shape.len() >= 2 || (shape.len() < 2 && bytes.len() > limit) {
        return Err(format!(
            "{label}: one row of {row} bytes exceeds the device's {limit}-byte binding limit"
        ));
    }
    let parts = (0..rows)
        .step_by(per)
        .map(|first| {
            let n = per.min(rows - first);
            let end = if shape.len() < 2 {
                bytes.len()
            } else {
                (first + n) * row
            };
            Part {
                first,
                rows: n,
                buffer: gpu.upload(label, &bytes[first * row..end]),
            }
        })
        .collect();
    Ok(DeviceTensor { shape, elem, parts })
}

impl Program {
    fn compile(
        ctx: &Context,
        func: FuncOp,
        hoisted: &Hoisted,
        compiler: &Compiler,
    ) -> Result<Program, GpuError> {
        let gpu = Arc::clone(&compiler.gpu);
        let name = func.get_symbol_name(ctx).to_string();
        let fty = TypedHandle::<FunctionType>::from_handle(func.get_type(ctx), ctx)
            .map_err(|_| GpuError(format!("@{name} has no function type")))?;
        let (arg_types, res_types) = {
            let f = fty.deref(ctx);
            (f.arg_types(), f.res_types())
        };
        let entry = func.get_entry_block(ctx);
        let mut slot_of: HashMap<IrValue, usize> = HashMap::new();
        let mut slot = |v: IrValue| {
            let next = slot_of.len();
            *slot_of.entry(v).or_insert(next)
        };
        let params: Vec<usize> = entry.deref(ctx).arguments().map(&mut slot).collect();
        let ops: Vec<Ptr<Operation>> = entry.deref(ctx).iter(ctx).collect();
        let live = live_ops(ctx, &ops, |r| hoisted.covers(r));
        let mut selection = select_all(ctx, &live, |v| hoisted.value(v).is_some());
        let plans = plan(&mut selection, &gpu.limits());
        let mut stats = LoweringStats {
            hoisted_ops: ops.len() - live.len(),
            kernel_ops: selection.kernel_ops(),
            fused_ops: selection.fused_ops(),
            reference_ops: selection.reference_ops(ctx, &live),
            ..LoweringStats::default()
        };
        let mut hoisted_slots: HashMap<usize, Rc<Value>> = HashMap::new();
        for &op in &ops {
            for r in op.deref(ctx).results() {
                if let Some(v) = hoisted.value(r) {
                    hoisted_slots.insert(slot(r), Rc::clone(v));
                }
            }
        }
        let pipeline_start = std::time::Instant::now();
        let mut steps = Vec::with_capacity(live.len());
        let mut distinct: Vec<Shader> = Vec::new();
        for (i, &op) in live.iter().enumerate() {
            if selection.fused_into[i].is_some() {
                continue;
            }
            let o = op.deref(ctx);
            let op_name = Operation::get_opid(op, ctx).to_string();
            let mut inputs: Vec<usize> = o.operands().map(&mut slot).collect();
            let mut outputs: Vec<usize> = o.results().map(&mut slot).collect();
            if let Some((residual, sum)) = selection.epilogues[i] {
                inputs.push(slot(residual));
                outputs = vec![slot(sum)];
            }
            let action = match &selection.per_op[i] {
                _ if op_name == "llm.return" => Action::Return,
                Some(chosen) => {
                    let pipelines = plans[i]
                        .iter()
                        .map(|s| {
                            if !distinct.contains(s) {
                                distinct.push(s.clone());
                            }
                            gpu.pipeline(s)
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Action::Kernel(chosen.kernel.clone(), pipelines)
                }
                None => Action::Reference,
            };
            let dims = o
                .results()
                .next()
                .and_then(|r| TypedHandle::<TensorType>::from_handle(r.get_type(ctx), ctx).ok())
                .map(|t| t.deref(ctx).shape().to_vec())
                .unwrap_or_default();
            steps.push(Step {
                action,
                op,
                inputs,
                outputs,
                location: interp::locate(o.loc()),
                name: op_name,
                dims,
            });
        }
        stats.pipeline_ms = pipeline_start.elapsed().as_secs_f64() * 1e3;
        stats.shaders = distinct.len();
        let first_free = slot_of.len();
        let constants = upload_constants(
            &gpu,
            compiler,
            &mut steps,
            &hoisted_slots,
            first_free,
            &mut stats,
        )?;
        stats.dispatches = steps
            .iter()
            .map(|s| match &s.action {
                Action::Kernel(k, pipelines) => dispatches_of(k, pipelines.len(), s, &constants),
                _ => 0,
            })
            .sum();
        Ok(Program {
            gpu,
            name,
            steps,
            slots: constants
                .iter()
                .map(|(s, _)| s + 1)
                .max()
                .unwrap_or(0)
                .max(first_free),
            params,
            arg_types,
            res_types,
            constants,
            stats,
            buffers: RefCell::default(),
        })
    }

    /// How the function's ops were lowered.
    pub fn stats(&self) -> &LoweringStats {
        &self.stats
    }

    /// Runs the function on `args`, returning the values of its `llm.return`; a KV cache
    /// result stays in device memory ([`KvCache::resident`]). `weights` resolves the
    /// `llm.weight` ops that run at call time (none, when all are hoisted).
    pub fn run(
        &self,
        ctx: &Context,
        weights: &dyn WeightStore,
        args: Vec<Value>,
    ) -> Result<Vec<Value>, InterpError> {
        let name = &self.name;
        if args.len() != self.arg_types.len() {
            return Err(error(
                None,
                format!(
                    "@{name} takes {} argument(s), {} given",
                    self.arg_types.len(),
                    args.len()
                ),
            ));
        }
        for (i, (arg, ty)) in args.iter().zip(&self.arg_types).enumerate() {
            interp::check_value(ctx, arg, *ty)
                .map_err(|m| error(None, format!("argument #{i} of @{name}: {m}")))?;
        }
        self.reserve_params();
        let mut call = Call {
            program: self,
            env: vec![None; self.slots],
            pending: Vec::new(),
            params: Vec::new(),
            validated: HashSet::new(),
        };
        for (&s, arg) in self.params.iter().zip(args) {
            call.env[s] = Some(match arg {
                Value::Cache(c) => Slot::Pool(
                    self.pool_of(c)
                        .map_err(|m| error(None, format!("@{name}: {m}")))?,
                ),
                other => Slot::Host(Rc::new(other), None),
            });
        }
        for (s, v) in &self.constants {
            call.env[*s] = Some(v.clone());
        }
        for (index, step) in self.steps.iter().enumerate() {
            let at = |m: String| error(step.location, format!("{}: {m}", step.name));
            match &step.action {
                Action::Return => return call.finish(ctx, step).map_err(at),
                Action::Kernel(kernel, pipelines) => {
                    let done = call.kernel(index, step, kernel, pipelines).map_err(at)?;
                    if !done {
                        call.reference(ctx, step, weights).map_err(at)?;
                    }
                }
                Action::Reference => call.reference(ctx, step, weights).map_err(at)?,
            }
        }
        Err(error(None, format!("@{name} ended without llm.return")))
    }

    /// Makes the parameter buffer hold the blocks of every planned dispatch.
    fn reserve_params(&self) {
        let bytes = (self.stats.dispatches as u64).max(1) * PARAM_STRIDE;
        let mut buffers = self.buffers.borrow_mut();
        if buffers.params.as_ref().is_none_or(|b| b.size() < bytes) {
            buffers.params = Some(self.gpu.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: bytes,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
            buffers.groups.clear();
        }
    }

    /// The device pool of cache `c`: the one it names, or a new one holding its data.
    fn pool_of(&self, c: KvCache) -> Result<Arc<Pool>, String> {
        if let Some(Resident(any)) = &c.resident {
            let pool = Arc::clone(any)
                .downcast::<Pool>()
                .map_err(|_| "the KV cache lives in another backend's memory".to_string())?;
            if !Arc::ptr_eq(&pool.gpu, &self.gpu) {
                return Err("the KV cache lives on another GPU device".into());
            }
            return Ok(pool);
        }
        if c.params.storage != KvStorage::Float(DType::F32) {
            return Err(format!(
                "the GPU holds f32 KV caches only, not {:?}",
                c.params.storage
            ));
        }
        let per_layer = c.slot_offset(1, 0);
        let bytes = per_layer as u64 * 4;
        let limit = self.gpu.limits().max_binding_bytes;
        if bytes > limit {
            return Err(format!(
                "one layer of the KV pool takes {bytes} bytes, over the device's {limit}-byte binding limit; use fewer blocks"
            ));
        }
        let layers = c.params.layers as usize;
        let upload = |data: &[f32], which: &str| -> Vec<wgpu::Buffer> {
            (0..layers)
                .map(|l| {
                    let label = format!("kv {which} layer {l}");
                    let part = data.get(l * per_layer..(l + 1) * per_layer).unwrap_or(&[]);
                    if part.iter().all(|&x| x == 0.0) {
                        self.gpu.storage(&label, bytes)
                    } else {
                        self.gpu.upload(&label, bytemuck::cast_slice(part))
                    }
                })
                .collect()
        };
        Ok(Arc::new(Pool {
            k: upload(&c.k, "k"),
            v: upload(&c.v, "v"),
            params: c.params,
            blocks: c.blocks,
            gpu: Arc::clone(&self.gpu),
        }))
    }
}

/// Copies block `from` of every layer of a device-resident cache to block `to` (the
/// copy-on-write of a shared prefix block).
pub fn copy_block(cache: &KvCache, from: usize, to: usize) -> Result<(), String> {
    let Some(Resident(any)) = &cache.resident else {
        return Err("the cache is not in device memory".into());
    };
    let pool = Arc::clone(any)
        .downcast::<Pool>()
        .map_err(|_| "the KV cache lives in another backend's memory".to_string())?;
    if from >= pool.blocks || to >= pool.blocks {
        return Err(format!(
            "block {from} or {to} is outside a pool of {} blocks",
            pool.blocks
        ));
    }
    let gpu = &pool.gpu;
    let block = cache.params.block_size * cache.params.kv_heads * cache.params.head_dim * 4;
    // WebGPU copies never have the same buffer at both ends: go through a scratch block.
    let scratch = gpu.storage("block copy", block);
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    for buffer in pool.k.iter().chain(&pool.v) {
        encoder.copy_buffer_to_buffer(buffer, from as u64 * block, &scratch, 0, block);
        encoder.copy_buffer_to_buffer(&scratch, 0, buffer, to as u64 * block, block);
    }
    gpu.submit_and_read(encoder, &[])
        .map(|_| ())
        .map_err(|e| e.0)
}

/// A host copy of a cache that lives in device memory (for tests and inspection); a
/// host cache is returned as is.
pub fn read_cache(cache: &KvCache) -> Result<KvCache, String> {
    match &cache.resident {
        None => Ok(cache.clone()),
        Some(Resident(any)) => {
            let pool = Arc::clone(any)
                .downcast::<Pool>()
                .map_err(|_| "the KV cache lives in another backend's memory".to_string())?;
            read_pool(&pool)
        }
    }
}

/// Reads every layer of `pool` back.
fn read_pool(pool: &Pool) -> Result<KvCache, String> {
    let mut cache = KvCache::new(pool.params.clone(), pool.blocks);
    let per_layer = cache.slot_offset(1, 0) as u64 * 4;
    let reads: Vec<(&wgpu::Buffer, u64)> = pool
        .k
        .iter()
        .chain(&pool.v)
        .map(|b| (b, per_layer))
        .collect();
    let encoder = pool
        .gpu
        .device()
        .create_command_encoder(&Default::default());
    let layers = pool.gpu.submit_and_read(encoder, &reads).map_err(|e| e.0)?;
    let (k, v) = layers.split_at(pool.k.len());
    cache.k = bytemuck::pod_collect_to_vec(&k.concat());
    cache.v = bytemuck::pod_collect_to_vec(&v.concat());
    Ok(cache)
}

/// Uploads the constants the shaders read (split into parts, `[k, n]` weights transposed,
/// each weight once per compiler) and keeps on the host those only reference ops read.
fn upload_constants(
    gpu: &Gpu,
    compiler: &Compiler,
    steps: &mut [Step],
    hoisted: &HashMap<usize, Rc<Value>>,
    first_free: usize,
    stats: &mut LoweringStats,
) -> Result<Vec<(usize, Slot)>, GpuError> {
    // (slot, transposed) -> device copy.
    let mut on_device: HashMap<(usize, bool), DeviceTensor> = HashMap::new();
    let mut host_reads: HashSet<usize> = HashSet::new();
    for step in steps.iter() {
        let shader_inputs: Vec<(usize, bool)> = match &step.action {
            Action::Kernel(Kernel::Contraction(c), _) => step
                .inputs
                .iter()
                .enumerate()
                .map(|(i, &s)| (s, i == weight_operand(c) && c.transpose_at_pack))
                .collect(),
            Action::Kernel(..) => step.inputs.iter().map(|&s| (s, false)).collect(),
            _ => {
                host_reads.extend(step.inputs.iter().copied());
                continue;
            }
        };
        for (s, transpose) in shader_inputs {
            let Some(value) = hoisted.get(&s) else {
                continue;
            };
            if on_device.contains_key(&(s, transpose)) {
                continue;
            }
            let key = (Rc::as_ptr(value), transpose);
            let cached = compiler.uploads.borrow().get(&key).map(|(_, t)| t.clone());
            let tensor = match cached {
                Some(t) => t,
                None => {
                    let (shape, elem, bytes) = device_bytes(value, transpose)
                        .map_err(|m| GpuError(format!("{}: {m}", step.name)))?;
                    let t = upload_parts(gpu, &step.name, shape, elem, &bytes).map_err(GpuError)?;
                    stats.upload_bytes += bytes.len();
                    compiler
                        .uploads
                        .borrow_mut()
                        .insert(key, (Rc::clone(value), t.clone()));
                    t
                }
            };
            if tensor.parts.len() > 1 {
                stats.split_weights += 1;
            }
            on_device.insert((s, transpose), tensor);
        }
    }
    // A transposed weight gets a slot of its own, numbered from `first_free`.
    let mut next = first_free;
    let mut transposed_slot: HashMap<usize, usize> = HashMap::new();
    let mut constants = Vec::new();
    for ((s, transpose), tensor) in on_device {
        if transpose {
            let fresh = next;
            next += 1;
            transposed_slot.insert(s, fresh);
            constants.push((fresh, Slot::Device(tensor)));
        } else {
            let host = host_reads.contains(&s).then(|| Rc::clone(&hoisted[&s]));
            constants.push((
                s,
                match host {
                    Some(v) => Slot::Host(v, Some(tensor)),
                    None => Slot::Device(tensor),
                },
            ));
        }
    }
    for step in steps.iter_mut() {
        if let Action::Kernel(Kernel::Contraction(c), _) = &step.action
            && c.transpose_at_pack
        {
            let w = weight_operand(c);
            if let Some(&fresh) = transposed_slot.get(&step.inputs[w]) {
                step.inputs[w] = fresh;
            }
        }
    }
    for &s in &host_reads {
        if let Some(v) = hoisted.get(&s)
            && !constants.iter().any(|(c, _)| *c == s)
        {
            constants.push((s, Slot::Host(Rc::clone(v), None)));
        }
    }
    Ok(constants)
}

/// Dispatches one call of `kernel` records (its shaders, once per weight or table part).
fn dispatches_of(
    kernel: &Kernel,
    shaders: usize,
    step: &Step,
    constants: &[(usize, Slot)],
) -> usize {
    let parts_of = |slot: usize| {
        constants
            .iter()
            .find(|(s, _)| *s == slot)
            .map_or(1, |(_, v)| match v {
                Slot::Device(t) | Slot::Host(_, Some(t)) => t.parts.len(),
                _ => 1,
            })
    };
    match kernel {
        Kernel::Contraction(c) => parts_of(step.inputs[weight_operand(c)]),
        Kernel::Move(Movement::Rows { .. }) => parts_of(step.inputs[0]),
        _ => shaders,
    }
}

/// The state of one call.
struct Call<'a> {
    program: &'a Program,
    env: Vec<Option<Slot>>,
    pending: Vec<Dispatch>,
    /// Parameter blocks of the dispatches recorded so far, [`PARAM_STRIDE`] apart.
    params: Vec<u8>,
    /// (tables, lens, tokens, window) combinations already checked.
    validated: HashSet<(usize, usize, usize, usize)>,
}

impl Call<'_> {
    fn gpu(&self) -> &Gpu {
        &self.program.gpu
    }

    fn slot(&self, s: usize) -> Result<&Slot, String> {
        self.env[s]
            .as_ref()
            .ok_or_else(|| "an operand has no value".to_string())
    }

    /// The host value of slot `s`, reading it back from the device when only the device
    /// has it.
    fn host(&mut self, s: usize) -> Result<Rc<Value>, String> {
        match self.slot(s)?.clone() {
            Slot::Host(v, _) => Ok(v),
            Slot::Device(t) => {
                let value = Rc::new(self.read_tensor(&t)?);
                self.env[s] = Some(Slot::Host(Rc::clone(&value), Some(t)));
                Ok(value)
            }
            Slot::Pool(pool) => {
                let value = Rc::new(Value::Cache(self.read_pool(&pool)?));
                Ok(value)
            }
        }
    }

    /// The device tensor of slot `s`, uploading a host value on first use.
    fn device(&mut self, s: usize) -> Result<DeviceTensor, String> {
        match self.slot(s)?.clone() {
            Slot::Device(t) | Slot::Host(_, Some(t)) => Ok(t),
            Slot::Host(v, None) => {
                let (shape, elem, bytes) = device_bytes(&v, false)?;
                let buffer = {
                    let mut buffers = self.program.buffers.borrow_mut();
                    let buffer = buffers
                        .uploads
                        .entry(s)
                        .or_insert_with(|| self.program.gpu.storage("upload", bytes.len() as u64));
                    if buffer.size() < bytes.len() as u64 {
                        *buffer = self.program.gpu.storage("upload", bytes.len() as u64);
                    }
                    buffer.clone()
                };
                if bytes.len() as u64 > self.gpu().limits().max_binding_bytes {
                    return Err(format!(
                        "a value of {} bytes exceeds the device's binding limit",
                        bytes.len()
                    ));
                }
                self.gpu().write(&buffer, 0, &bytes);
                let t = DeviceTensor {
                    parts: vec![Part {
                        first: 0,
                        rows: shape.first().copied().unwrap_or(1),
                        buffer,
                    }],
                    shape,
                    elem,
                };
                self.env[s] = Some(Slot::Host(v, Some(t.clone())));
                Ok(t)
            }
            Slot::Pool(_) => Err("expected a tensor, found a KV cache".into()),
        }
    }

    /// The device pool of slot `s`, uploading a host cache (a reference op's result).
    fn pool(&mut self, s: usize) -> Result<Arc<Pool>, String> {
        match self.slot(s)?.clone() {
            Slot::Pool(p) => Ok(p),
            Slot::Host(v, _) => match &*v {
                Value::Cache(c) => {
                    let pool = self.program.pool_of(c.clone())?;
                    self.env[s] = Some(Slot::Pool(Arc::clone(&pool)));
                    Ok(pool)
                }
                other => Err(format!("expected a KV cache, found {}", other.kind())),
            },
            Slot::Device(_) => Err("expected a KV cache, found a tensor".into()),
        }
    }

    /// The buffer output `i` of step `index` is written to, holding at least `bytes`.
    fn output(&self, index: usize, i: usize, bytes: usize) -> wgpu::Buffer {
        let mut buffers = self.program.buffers.borrow_mut();
        let buffer = buffers
            .outputs
            .entry((index, i))
            .or_insert_with(|| self.program.gpu.storage("output", bytes as u64));
        if buffer.size() < bytes as u64 {
            *buffer = self.program.gpu.storage("output", bytes as u64);
        }
        buffer.clone()
    }

    /// Records a dispatch of `pipeline` over `workgroups` workgroups with parameters
    /// `words` and storage `bindings` (in the shader's binding order).
    fn dispatch(
        &mut self,
        pipeline: &wgpu::ComputePipeline,
        words: &[u32],
        bindings: &[&wgpu::Buffer],
        workgroups: usize,
    ) -> Result<(), String> {
        if workgroups == 0 {
            return Ok(());
        }
        let max = self.gpu().limits().max_workgroups_per_dim as usize;
        let x = workgroups.min(max);
        let y = workgroups.div_ceil(x);
        if y > max {
            return Err(format!(
                "{workgroups} workgroups exceed the device's {max} x {max} grid"
            ));
        }
        let offset = self.params.len() as u64;
        let mut block = [0u32; PARAM_WORDS];
        block[..words.len()].copy_from_slice(words);
        self.params.extend_from_slice(bytemuck::cast_slice(&block));
        self.params
            .resize(offset as usize + PARAM_STRIDE as usize, 0);
        let params = self.params_buffer()?;
        let key = (
            pipeline.clone(),
            offset,
            bindings.iter().map(|b| (*b).clone()).collect::<Vec<_>>(),
        );
        let group = {
            let mut buffers = self.program.buffers.borrow_mut();
            if buffers.groups.len() > 4096 {
                buffers.groups.clear();
            }
            buffers
                .groups
                .entry(key)
                .or_insert_with(|| {
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &params,
                            offset,
                            size: wgpu::BufferSize::new((PARAM_WORDS * 4) as u64),
                        }),
                    }];
                    for (i, b) in bindings.iter().enumerate() {
                        entries.push(wgpu::BindGroupEntry {
                            binding: i as u32 + 1,
                            resource: b.as_entire_binding(),
                        });
                    }
                    self.program
                        .gpu
                        .device()
                        .create_bind_group(&wgpu::BindGroupDescriptor {
                            label: None,
                            layout: &pipeline.get_bind_group_layout(0),
                            entries: &entries,
                        })
                })
                .clone()
        };
        self.pending.push(Dispatch {
            pipeline: pipeline.clone(),
            group,
            grid: [x as u32, y as u32],
        });
        Ok(())
    }

    /// The parameter buffer, sized for the program's dispatches before the call records
    /// any (a buffer replaced mid-call would leave recorded bind groups on the old one).
    fn params_buffer(&self) -> Result<wgpu::Buffer, String> {
        let buffers = self.program.buffers.borrow();
        match &buffers.params {
            Some(b) if b.size() >= self.params.len() as u64 => Ok(b.clone()),
            _ => Err("more dispatches than the program planned".into()),
        }
    }

    /// Submits the recorded dispatches and reads back `reads`.
    fn flush(&mut self, reads: &[(&wgpu::Buffer, u64)]) -> Result<Vec<Vec<u8>>, String> {
        let gpu = &self.program.gpu;
        if !self.params.is_empty() {
            gpu.write(&self.params_buffer()?, 0, &self.params);
        }
        let mut encoder = gpu.device().create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for d in self.pending.drain(..) {
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, &d.group, &[]);
                pass.dispatch_workgroups(d.grid[0], d.grid[1], 1);
            }
        }
        gpu.submit_and_read(encoder, reads).map_err(|e| e.0)
    }

    /// Reads a device tensor back into a host value.
    fn read_tensor(&mut self, t: &DeviceTensor) -> Result<Value, String> {
        let row = row_bytes(&t.shape, t.elem);
        let reads: Vec<(&wgpu::Buffer, u64)> = t
            .parts
            .iter()
            .map(|p| {
                let bytes = if t.shape.len() < 2 {
                    t.len() * 4
                } else {
                    p.rows * row
                };
                (&p.buffer, bytes as u64)
            })
            .collect();
        let bytes: Vec<u8> = self.flush(&reads)?.concat();
        Ok(match t.elem {
            Elem::F32 => Value::Tensor(Tensor::from_f32(
                t.shape.clone(),
                DType::F32,
                bytemuck::pod_collect_to_vec(&bytes),
            )),
            Elem::I32(dtype) => {
                let ints: Vec<i32> = bytemuck::pod_collect_to_vec(&bytes);
                Value::Tensor(Tensor::from_i64(
                    t.shape.clone(),
                    dtype,
                    ints.into_iter().map(i64::from).collect(),
                ))
            }
            Elem::Quant(_) => return Err("quantized device tensors are not read back".into()),
        })
    }

    /// Reads a device pool back into a host cache (after the recorded dispatches).
    fn read_pool(&mut self, pool: &Pool) -> Result<KvCache, String> {
        self.flush(&[])?;
        read_pool(pool)
    }

    /// Evaluates a step on the host.
    fn reference(
        &mut self,
        ctx: &Context,
        step: &Step,
        weights: &dyn WeightStore,
    ) -> Result<(), String> {
        let inputs = step
            .inputs
            .iter()
            .map(|&s| self.host(s))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = interp::eval_op(ctx, step.op, inputs, weights)?;
        for (&s, v) in step.outputs.iter().zip(outputs) {
            self.env[s] = Some(Slot::Host(v, None));
        }
        Ok(())
    }

    /// Reads back the returned values.
    fn finish(&mut self, ctx: &Context, step: &Step) -> Result<Vec<Value>, String> {
        let mut results = Vec::with_capacity(step.inputs.len());
        for (j, (&s, ty)) in step.inputs.iter().zip(&self.program.res_types).enumerate() {
            let value = match self.slot(s)?.clone() {
                Slot::Pool(pool) => Value::Cache(pool.cache()),
                _ => Rc::unwrap_or_clone(self.host(s)?),
            };
            interp::check_value(ctx, &value, *ty)
                .map_err(|m| format!("result #{j} of @{}: {m}", self.program.name))?;
            results.push(value);
        }
        Ok(results)
    }

    /// Runs a kernel step's dispatches; `false` when its run-time shapes need the
    /// reference semantics instead.
    fn kernel(
        &mut self,
        index: usize,
        step: &Step,
        kernel: &Kernel,
        pipelines: &[wgpu::ComputePipeline],
    ) -> Result<bool, String> {
        let out = match kernel {
            Kernel::Contraction(c) => self.contraction(index, step, c, &pipelines[0])?,
            Kernel::Elementwise(body) => {
                let xs = step
                    .inputs
                    .iter()
                    .map(|&s| self.device(s))
                    .collect::<Result<Vec<_>, _>>()?;
                let shape = xs[0].shape.clone();
                if xs.len() != body.args
                    || xs.iter().any(|x| x.shape != shape || x.elem != Elem::F32)
                {
                    return Ok(false);
                }
                let len = xs[0].len();
                let y = self.output(index, 0, len * 4);
                let mut bindings = xs
                    .iter()
                    .map(DeviceTensor::whole)
                    .collect::<Result<Vec<_>, _>>()?;
                bindings.push(&y);
                self.dispatch(&pipelines[0], &[len as u32], &bindings, len.div_ceil(WG))?;
                f32_tensor(shape, y)
            }
            Kernel::RmsNorm { d, .. } | Kernel::LayerNorm { d, .. } => {
                let x = self.f32_rows(step.inputs[0], *d)?;
                let mut params = Vec::new();
                for &s in &step.inputs[1..] {
                    let p = self.device(s)?;
                    if p.len() != *d {
                        return Err(format!("a norm parameter {:?} is not [{d}]", p.shape));
                    }
                    params.push(p);
                }
                let rows = x.len() / d;
                let y = self.output(index, 0, x.len() * 4);
                let mut bindings = vec![x.whole()?];
                for p in &params {
                    bindings.push(p.whole()?);
                }
                bindings.push(&y);
                self.dispatch(&pipelines[0], &[rows as u32], &bindings, rows)?;
                f32_tensor(x.shape.clone(), y)
            }
            Kernel::Softmax { n } => {
                let x = self.f32_rows(step.inputs[0], *n)?;
                let rows = x.len() / n;
                let y = self.output(index, 0, x.len() * 4);
                self.dispatch(&pipelines[0], &[rows as u32], &[x.whole()?, &y], rows)?;
                f32_tensor(x.shape.clone(), y)
            }
            Kernel::Argmax { n, index: dtype } => {
                let x = self.f32_rows(step.inputs[0], *n)?;
                let rows = x.len() / n;
                let y = self.output(index, 0, rows * 4);
                self.dispatch(&pipelines[0], &[rows as u32], &[x.whole()?, &y], rows)?;
                let shape = x.shape[..x.shape.len() - 1].to_vec();
                DeviceTensor {
                    parts: vec![Part {
                        first: 0,
                        rows: shape.first().copied().unwrap_or(1),
                        buffer: y,
                    }],
                    shape,
                    elem: Elem::I32(*dtype),
                }
            }
            Kernel::Rope {
                heads,
                d,
                rotary,
                theta_bits,
                scaling_bits,
                ..
            } => {
                let x = self.device(step.inputs[0])?;
                let positions = self.host(step.inputs[1])?;
                let positions = positions.tensor()?.ints()?;
                let r = x.shape.len();
                if r < 2
                    || x.shape[r - 2..] != [*heads, *d]
                    || positions.len() * heads * d != x.len()
                {
                    return Err(format!(
                        "{} positions do not match the tokens of {:?}",
                        positions.len(),
                        x.shape
                    ));
                }
                let (theta, scaling) = (f32::from_bits(*theta_bits), f32::from_bits(*scaling_bits));
                let pairs = rotary / 2;
                let mut cos = Vec::with_capacity(positions.len() * pairs);
                let mut sin = Vec::with_capacity(positions.len() * pairs);
                for &p in positions {
                    let p = p as f32 / scaling;
                    for i in 0..pairs {
                        let (s, c) = rope_sin_cos(p, theta, i, *rotary);
                        sin.push(s);
                        cos.push(c);
                    }
                }
                let cos_b = self.output(index, 1, cos.len() * 4);
                let sin_b = self.output(index, 2, sin.len() * 4);
                self.gpu().write(&cos_b, 0, bytemuck::cast_slice(&cos));
                self.gpu().write(&sin_b, 0, bytemuck::cast_slice(&sin));
                let y = self.output(index, 0, x.len() * 4);
                self.dispatch(
                    &pipelines[0],
                    &[positions.len() as u32],
                    &[x.whole()?, &cos_b, &sin_b, &y],
                    x.len().div_ceil(WG),
                )?;
                f32_tensor(x.shape.clone(), y)
            }
            Kernel::Attention {
                heads,
                kv_heads,
                d,
                source,
                ..
            } => {
                return self
                    .attention(index, step, [*heads, *kv_heads, *d], *source, pipelines)
                    .map(|()| true);
            }
            Kernel::Move(m) => self.movement(index, step, *m, pipelines)?,
        };
        self.env[step.outputs[0]] = Some(Slot::Device(out));
        Ok(true)
    }

    /// The `f32` device tensor of slot `s`, whose rows have `n` values.
    fn f32_rows(&mut self, s: usize, n: usize) -> Result<DeviceTensor, String> {
        let x = self.device(s)?;
        if x.shape.last() != Some(&n) || x.elem != Elem::F32 {
            return Err(format!("the input {:?} does not end in {n}", x.shape));
        }
        Ok(x)
    }

    fn contraction(
        &mut self,
        index: usize,
        step: &Step,
        c: &Contraction,
        pipeline: &wgpu::ComputePipeline,
    ) -> Result<DeviceTensor, String> {
        let x = self.f32_rows(step.inputs[0], c.k)?;
        let g = match c.norm_eps_bits {
            Some(_) => {
                let g = self.device(step.inputs[1])?;
                if g.len() != c.k {
                    return Err(format!("the norm weight {:?} is not [{}]", g.shape, c.k));
                }
                Some(g)
            }
            None => None,
        };
        let w = self.device(step.inputs[weight_operand(c)])?;
        let want = match c.weight {
            WeightFormat::Q8_0 | WeightFormat::Q4_0 => Elem::Quant(c.weight),
            _ => Elem::F32,
        };
        if w.shape != [c.n, c.k] || w.elem != want {
            return Err(format!(
                "the weight {:?} is not a {}x{} {} matrix",
                w.shape,
                c.n,
                c.k,
                c.weight.name()
            ));
        }
        let m = x.len() / c.k;
        let mut shape = x.shape[..x.shape.len() - 1].to_vec();
        shape.push(c.n);
        let residual = if c.residual {
            let r = self.device(*step.inputs.last().ok_or("no residual operand")?)?;
            if r.shape != shape {
                return Err(format!(
                    "the residual {:?} does not match the product {shape:?}",
                    r.shape
                ));
            }
            Some(r)
        } else {
            None
        };
        let y = self.output(index, 0, m * c.n * 4);
        for part in &w.parts {
            let mut bindings = vec![x.whole()?, &part.buffer, &y];
            if let Some(g) = &g {
                bindings.push(g.whole()?);
            }
            if let Some(r) = &residual {
                bindings.push(r.whole()?);
            }
            let blocks = part.rows.div_ceil(CONTRACTION_ROWS as usize);
            self.dispatch(
                pipeline,
                &[m as u32, c.n as u32, part.first as u32, part.rows as u32],
                &bindings,
                blocks * m,
            )?;
        }
        Ok(f32_tensor(shape, y))
    }

    fn attention(
        &mut self,
        index: usize,
        step: &Step,
        [heads, kv_heads, d]: [usize; 3],
        source: AttentionSource,
        pipelines: &[wgpu::ComputePipeline],
    ) -> Result<(), String> {
        let q = self.device(step.inputs[0])?;
        let r = q.shape.len();
        if r < 3 || q.shape[r - 2..] != [heads, d] || q.elem != Elem::F32 {
            return Err(format!(
                "queries {:?} do not have {heads} heads of {d}",
                q.shape
            ));
        }
        let y = self.output(index, 0, q.len() * 4);
        match source {
            AttentionSource::Paged {
                layer,
                window,
                append,
            } => {
                let pool = self.pool(step.inputs[1])?;
                let p = &pool.params;
                if layer >= p.layers as usize
                    || p.kv_heads as usize != kv_heads
                    || p.head_dim as usize != d
                {
                    return Err(format!(
                        "layer {layer} with {kv_heads} heads of {d} does not fit a cache of {} layers of {} heads of {}",
                        p.layers, p.kv_heads, p.head_dim
                    ));
                }
                if r != 4 {
                    return Err(format!("queries {:?} are not [b, t, heads, d]", q.shape));
                }
                let (tables_at, lens_at) = if append { (5, 6) } else { (2, 3) };
                let (b, t) = (q.shape[0], q.shape[1]);
                self.check_paged(
                    &pool,
                    [b, t],
                    [step.inputs[tables_at], step.inputs[lens_at]],
                    window,
                )?;
                if append {
                    let (kn, vn) = (self.device(step.inputs[2])?, self.device(step.inputs[3])?);
                    let slots_at = step.inputs[4];
                    let row = kv_heads * d;
                    let slots = self.host(slots_at)?;
                    let slots = slots.tensor()?.ints()?;
                    let capacity = pool.blocks * p.block_size as usize;
                    if kn.shape != vn.shape || kn.len() != slots.len() * row {
                        return Err(format!(
                            "keys {:?} and values {:?} do not hold {} rows of {row}",
                            kn.shape,
                            vn.shape,
                            slots.len()
                        ));
                    }
                    if let Some(bad) = slots.iter().find(|&&s| s < 0 || s as usize >= capacity) {
                        return Err(format!(
                            "slot {bad} is out of range for a pool of {capacity} slots"
                        ));
                    }
                    let tokens = slots.len();
                    let slot_buf = self.device(slots_at)?;
                    self.dispatch(
                        &pipelines[0],
                        &[tokens as u32],
                        &[
                            kn.whole()?,
                            vn.whole()?,
                            slot_buf.whole()?,
                            &pool.k[layer],
                            &pool.v[layer],
                        ],
                        (tokens * row).div_ceil(WG),
                    )?;
                }
                let tables = self.device(step.inputs[tables_at])?;
                let lens = self.device(step.inputs[lens_at])?;
                let width = tables.shape.get(1).copied().unwrap_or(0);
                self.dispatch(
                    pipelines.last().ok_or("no attention shader")?,
                    &[
                        (b * t) as u32,
                        t as u32,
                        width as u32,
                        window.unwrap_or(0) as u32,
                        p.block_size as u32,
                    ],
                    &[
                        q.whole()?,
                        &pool.k[layer],
                        &pool.v[layer],
                        tables.whole()?,
                        lens.whole()?,
                        &y,
                    ],
                    b * t * heads,
                )?;
                self.env[step.outputs[0]] = Some(Slot::Device(f32_tensor(q.shape.clone(), y)));
                if append && let Some(&out) = step.outputs.get(1) {
                    self.env[out] = Some(Slot::Pool(pool));
                }
            }
            AttentionSource::Contiguous { causal, window } => {
                let (kt, vt) = (self.device(step.inputs[1])?, self.device(step.inputs[2])?);
                let (tq, tk) = (q.shape[r - 3], kt.shape.get(r - 3).copied().unwrap_or(0));
                if kt.shape != vt.shape
                    || kt.shape.len() != r
                    || kt.shape[r - 2..] != [kv_heads, d]
                    || kt.shape[..r - 3] != q.shape[..r - 3]
                    || (causal && tk < tq)
                {
                    return Err(format!(
                        "q {:?}, k {:?} and v {:?} do not fit together at run time",
                        q.shape, kt.shape, vt.shape
                    ));
                }
                let rows = q.len() / (heads * d);
                self.dispatch(
                    &pipelines[0],
                    &[
                        rows as u32,
                        tq as u32,
                        tk as u32,
                        window.unwrap_or(0) as u32,
                        u32::from(causal),
                    ],
                    &[q.whole()?, kt.whole()?, vt.whole()?, &y],
                    rows * heads,
                )?;
                self.env[step.outputs[0]] = Some(Slot::Device(f32_tensor(q.shape.clone(), y)));
            }
        }
        Ok(())
    }

    /// Checks block tables and context lengths against the pool (what the reference
    /// checks), once per call for each combination.
    fn check_paged(
        &mut self,
        pool: &Pool,
        [b, t]: [usize; 2],
        [tables, lens]: [usize; 2],
        window: Option<usize>,
    ) -> Result<(), String> {
        let key = (tables, lens, t, window.unwrap_or(0));
        if self.validated.contains(&key) {
            return Ok(());
        }
        let (tv, lv) = (self.host(tables)?, self.host(lens)?);
        let shape_only = KvCache {
            params: pool.params.clone(),
            blocks: pool.blocks,
            k: Vec::new(),
            v: Vec::new(),
            resident: None,
        };
        for_each_paged_row(
            &shape_only,
            [b, t],
            tv.tensor()?,
            lv.tensor()?,
            window,
            |_, _| Ok(()),
        )?;
        self.validated.insert(key);
        Ok(())
    }

    fn movement(
        &mut self,
        index: usize,
        step: &Step,
        m: Movement,
        pipelines: &[wgpu::ComputePipeline],
    ) -> Result<DeviceTensor, String> {
        match m {
            Movement::Reshape => {
                let mut x = self.device(step.inputs[0])?;
                x.shape = resolve_shape(&step.dims, x.len())?;
                if let [p] = x.parts.as_mut_slice() {
                    p.rows = x.shape.first().copied().unwrap_or(1);
                }
                Ok(x)
            }
            Movement::Columns { width, len, .. } => {
                let x = self.f32_rows(step.inputs[0], width)?;
                let rows = x.len() / width.max(1);
                let y = self.output(index, 0, rows * len * 4);
                self.dispatch(
                    &pipelines[0],
                    &[rows as u32],
                    &[x.whole()?, &y],
                    (rows * len).div_ceil(WG),
                )?;
                let mut shape = x.shape.clone();
                *shape.last_mut().ok_or("a scalar has no columns")? = len;
                Ok(f32_tensor(shape, y))
            }
            Movement::Rows { dim, .. } => {
                let table = self.device(step.inputs[0])?;
                let vocab = table.shape.first().copied().unwrap_or(0);
                if table.shape != [vocab, dim] || table.elem != Elem::F32 {
                    return Err(format!("the table {:?} is not [N, {dim}]", table.shape));
                }
                let ids = self.host(step.inputs[1])?;
                let ids_t = ids.tensor()?;
                if let Some(bad) = ids_t
                    .ints()?
                    .iter()
                    .find(|&&i| i < 0 || i as usize >= vocab)
                {
                    return Err(format!(
                        "token id {bad} is out of range for a table of {vocab} rows"
                    ));
                }
                let count = ids_t.len();
                let mut shape = ids_t.shape.clone();
                shape.push(dim);
                let ids = self.device(step.inputs[1])?;
                let y = self.output(index, 0, count * dim * 4);
                for part in &table.parts {
                    self.dispatch(
                        &pipelines[0],
                        &[count as u32, part.first as u32, part.rows as u32],
                        &[&part.buffer, ids.whole()?, &y],
                        (count * dim).div_ceil(WG),
                    )?;
                }
                Ok(f32_tensor(shape, y))
            }
        }
    }
}

/// An unsplit `f32` device tensor of `shape` in `buffer`.
fn f32_tensor(shape: Vec<usize>, buffer: wgpu::Buffer) -> DeviceTensor {
    DeviceTensor {
        parts: vec![Part {
            first: 0,
            rows: shape.first().copied().unwrap_or(1),
            buffer,
        }],
        shape,
        elem: Elem::F32,
    }
}
