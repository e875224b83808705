//! A function compiled for the GPU: its ops in order, each a list of shader dispatches or
//! (for ops without a GPU lowering) the op's reference semantics on the host.
//!
//! Weights are uploaded once, when the program is built, split into row parts that each
//! fit one storage binding; the paged KV pool is uploaded on first use and stays on the
//! device between calls (the returned cache names it through
//! [`llm_ir::interp::KvCache::resident`], see `pool.rs`). A call (`call.rs`) records every
//! dispatch into one command encoder and submits it once, reading back only the
//! function's results, unless a reference op needs a device value on the host first.

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, HashSet},
    rc::Rc,
    sync::Arc,
};

use llm_ir::{
    interp::{self, Hoisted, InterpError, Value, WeightStore, eval::shard::DEVICES_DISAGREE},
    syntax::Dim,
    types::ShardedTensorType,
};
use pliron::{
    builtin::{op_interfaces::SymbolOpInterface, ops::FuncOp},
    context::{Context, Ptr},
    linked_list::ContainsLinkedList,
    operation::Operation,
    r#type::{Typed, TypedHandle},
    value::Value as IrValue,
};

use super::{
    GpuError, Limits,
    call::{Call, Slot},
    device::Gpu,
    pool::Pool,
    tensor::{DeviceTensor, device_bytes, exactly_f16, tensor_bytes, upload_parts},
    wgsl::{self, Shader},
};
use crate::{
    kernel::{Kernel, MeshMove, Movement, WeightFormat},
    layout::{Layout, Signature},
    selection::{Selection, live_ops, select_all, weight_operand},
};

/// Bytes between two dispatches' parameter blocks (WebGPU's uniform offset alignment).
pub(super) const PARAM_STRIDE: u64 = 256;

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
    /// Weights stored as `f16` (exactly `f16` values, on a device with `shader-f16`).
    pub f16_weights: usize,
    /// Milliseconds spent validating shaders and creating pipelines.
    pub pipeline_ms: f64,
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
pub(super) struct Step {
    action: Action,
    /// The op (for its reference semantics).
    pub op: Ptr<Operation>,
    /// Slots of the operands.
    pub inputs: Vec<usize>,
    /// Slots of the results.
    pub outputs: Vec<usize>,
    location: Option<(u32, u32)>,
    name: String,
    /// The declared dims of its first result, when that is a tensor.
    pub dims: Vec<Dim>,
}

/// Device buffers a program keeps between calls.
#[derive(Default)]
pub(super) struct Buffers {
    /// Per (step, output): the buffer its result is written to.
    pub outputs: HashMap<(usize, usize), wgpu::Buffer>,
    /// Per slot and shard (0 for an unsharded value): the buffer a host value is
    /// uploaded to.
    pub uploads: HashMap<(usize, usize), wgpu::Buffer>,
    /// The parameter blocks of one call's dispatches.
    pub params: Option<wgpu::Buffer>,
    /// The word a shader's fault lowers to the faulting step's number (`u32::MAX`, no
    /// fault, at the start of each call that records a shader that can fault).
    pub faults: Option<wgpu::Buffer>,
    /// Bind groups by pipeline, parameter offset and buffers.
    pub groups: HashMap<(wgpu::ComputePipeline, u64, Vec<wgpu::Buffer>), wgpu::BindGroup>,
}

/// Uploaded weights shared by the programs of one [`Compiler`], by value, transposition
/// and `f16` storage (each value kept, so that its address stays its own).
type Uploads = RefCell<HashMap<(*const Value, bool, bool), (Rc<Value>, DeviceTensor)>>;

/// Whether each weight is exactly `f16`, checked once per [`Compiler`].
type ExactF16 = RefCell<HashMap<*const Value, (Rc<Value>, bool)>>;

/// How many rows (tokens) a function's contractions see per call, which picks their
/// shader. Either shader computes each row on its own, in one fixed order, so within a
/// program no row's result depends on the rest of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Few (decode: one token per sequence): the matrix-vector shader.
    Few,
    /// Many (prefill: whole prompts): the tiled matrix-matrix shader, which reads each
    /// weight tile once per 16 rows.
    Many,
}

/// Compiles the functions of one model for one device: they share uploaded weights.
pub struct Compiler {
    gpu: Arc<Gpu>,
    uploads: Uploads,
    exact_f16: ExactF16,
}

impl Compiler {
    /// A compiler for `gpu`.
    pub fn new(gpu: Arc<Gpu>) -> Compiler {
        Compiler {
            gpu,
            uploads: RefCell::default(),
            exact_f16: RefCell::default(),
        }
    }

    /// The device programs are compiled for.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Whether every value of `value` is exactly an `f16`.
    fn exactly_f16(&self, value: &Rc<Value>) -> bool {
        let key = Rc::as_ptr(value);
        if let Some((_, exact)) = self.exact_f16.borrow().get(&key) {
            return *exact;
        }
        let exact = exactly_f16(value);
        self.exact_f16
            .borrow_mut()
            .insert(key, (Rc::clone(value), exact));
        exact
    }

    /// Compiles `func` for calls of `rows` rows, taking its weight-derived values from
    /// `hoisted`.
    pub fn build(
        &self,
        ctx: &Context,
        func: FuncOp,
        hoisted: &Hoisted,
        rows: Rows,
    ) -> Result<Program, GpuError> {
        Program::compile(ctx, func, hoisted, rows, self)
    }
}

/// A function compiled for the GPU.
pub struct Program {
    pub(super) gpu: Arc<Gpu>,
    pub(super) signature: Signature,
    steps: Vec<Step>,
    /// What its contractions are shaped for.
    pub(super) rows: Rows,
    pub(super) slots: usize,
    params: Vec<usize>,
    constants: Vec<(usize, Slot)>,
    stats: LoweringStats,
    pub(super) buffers: RefCell<Buffers>,
    /// Kernel steps that ran their op's reference semantics instead, over every call.
    fallbacks: Cell<usize>,
}

/// The shaders each selected op runs (contractions tiled for `Rows::Many`), with the ops
/// the device limits send back to the reference semantics.
fn plan(selection: &mut Selection, limits: &Limits, rows: Rows) -> Vec<Vec<Shader>> {
    selection
        .per_op
        .iter_mut()
        .map(|chosen| {
            let Some(c) = chosen else {
                return Vec::new();
            };
            let mut shaders = wgsl::shaders_for(&c.kernel);
            if rows == Rows::Many
                && let Some(Shader::Contraction(k)) = shaders.first()
            {
                shaders[0] = Shader::TiledContraction(*k);
            }
            // A head too wide for the workgroup memory (its query row) is refused here.
            let fits = shaders.iter().all(|s| limits.admit(s).is_ok());
            if !fits {
                *chosen = None;
                return Vec::new();
            }
            shaders
        })
        .collect()
}

/// The constants stored as `f16`: on a device with `shader-f16`, those whose values are
/// all exactly `f16` (f16 matrices and tables, and f32 weights whose values are) and that
/// are read only as contraction weights or gathered table rows. Their contractions switch
/// to [`WeightFormat::F16`] (their gathers follow in `Program::compile`).
fn f16_weights(
    ctx: &Context,
    ops: &[Ptr<Operation>],
    selection: &mut Selection,
    hoisted: &Hoisted,
    compiler: &Compiler,
) -> HashSet<IrValue> {
    if !compiler.gpu.has_f16() {
        return HashSet::new();
    }
    // Per value: whether every use reads it as a weight or a table.
    let mut uses: HashMap<IrValue, bool> = HashMap::new();
    for (i, &op) in ops.iter().enumerate() {
        let kernel = selection.per_op[i].as_ref().map(|c| &c.kernel);
        for (j, v) in op.deref(ctx).operands().enumerate() {
            let (weight, table) = match kernel {
                Some(Kernel::Contraction(c)) => (
                    j == weight_operand(c)
                        && matches!(
                            c.weight,
                            WeightFormat::F32
                                | WeightFormat::F32Panels
                                | WeightFormat::F32KN
                                | WeightFormat::PackedF16
                        ),
                    false,
                ),
                Some(Kernel::Move(Movement::Rows { table, .. })) => (
                    false,
                    j == 0 && matches!(*table, WeightFormat::F32 | WeightFormat::PackedF16),
                ),
                _ => (false, false),
            };
            *uses.entry(v).or_insert(true) &= weight || table;
        }
    }
    let halves: HashSet<IrValue> = uses
        .into_iter()
        .filter(|&(v, only)| only && hoisted.value(v).is_some_and(|x| compiler.exactly_f16(x)))
        .map(|(v, _)| v)
        .collect();
    for (i, &op) in ops.iter().enumerate() {
        if let Some(chosen) = &mut selection.per_op[i]
            && let Kernel::Contraction(c) = &mut chosen.kernel
            && halves.contains(&op.deref(ctx).get_operand(weight_operand(c)))
        {
            c.weight = WeightFormat::F16;
        }
    }
    halves
}

/// The listing `llm-opt --emit=wgsl` prints for `func`: a summary line, then every
/// distinct shader (validated) in first-use order.
pub(super) fn listing(ctx: &Context, func: FuncOp, limits: &Limits) -> Result<String, GpuError> {
    let all: Vec<_> = func.get_entry_block(ctx).deref(ctx).iter(ctx).collect();
    let constant = interp::weight_derived(ctx, &all);
    let ops = live_ops(ctx, &all, |r| constant.contains(&r));
    let mut selection = select_all(ctx, &ops, |v| constant.contains(&v), super::supports);
    let plans = plan(&mut selection, limits, Rows::Few);
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

impl Program {
    fn compile(
        ctx: &Context,
        func: FuncOp,
        hoisted: &Hoisted,
        rows: Rows,
        compiler: &Compiler,
    ) -> Result<Program, GpuError> {
        let gpu = Arc::clone(&compiler.gpu);
        let mut layout = Layout::new(ctx, func, hoisted).map_err(GpuError)?;
        let live = layout.live.clone();
        let mut selection = select_all(ctx, &live, |v| hoisted.holds(v), super::supports);
        let halves = f16_weights(ctx, &live, &mut selection, hoisted, compiler);
        let mut plans = plan(&mut selection, &gpu.limits(), rows);
        for (i, &op) in live.iter().enumerate() {
            if let Some(Shader::Gather { table, .. }) = plans[i].first_mut()
                && halves.contains(&op.deref(ctx).get_operand(0))
            {
                *table = WeightFormat::F16;
            }
        }
        let mut stats = LoweringStats {
            hoisted_ops: layout.hoisted_ops(),
            kernel_ops: selection.kernel_ops(),
            fused_ops: selection.fused_ops(),
            reference_ops: selection.reference_ops(ctx, &live),
            ..LoweringStats::default()
        };
        let hoisted_slots: HashMap<usize, Rc<Value>> =
            layout.constants(ctx, hoisted).into_iter().collect();
        let pipeline_start = std::time::Instant::now();
        let mut distinct: Vec<Shader> = Vec::new();
        let mut steps = Vec::with_capacity(live.len());
        for o in layout.ops(ctx, &selection) {
            let action = match &selection.per_op[o.index] {
                _ if o.is_return => Action::Return,
                Some(chosen) => {
                    let pipelines = plans[o.index]
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
            steps.push(Step {
                action,
                op: o.op,
                inputs: o.inputs,
                outputs: o.outputs,
                location: o.location,
                name: o.name,
                dims: o.dims,
            });
        }
        stats.pipeline_ms = pipeline_start.elapsed().as_secs_f64() * 1e3;
        stats.shaders = distinct.len();
        stats.f16_weights = halves.len();
        let half_slots: HashSet<usize> = halves.into_iter().map(|v| layout.slot(v)).collect();
        let first_free = layout.slots();
        let constants = upload_constants(
            &gpu,
            compiler,
            &mut steps,
            (&hoisted_slots, &half_slots),
            first_free,
            &mut stats,
        )?;
        stats.dispatches = steps
            .iter()
            .map(|s| match &s.action {
                Action::Kernel(k, pipelines) => {
                    let devices = mesh_devices(ctx, s.op);
                    dispatches_of(k, pipelines.len(), s, &constants) * devices
                }
                _ => 0,
            })
            .sum();
        Ok(Program {
            gpu,
            steps,
            rows,
            slots: constants
                .iter()
                .map(|(s, _)| s + 1)
                .max()
                .unwrap_or(0)
                .max(first_free),
            params: layout.params,
            signature: layout.signature,
            constants,
            stats,
            fallbacks: Cell::new(0),
            buffers: RefCell::default(),
        })
    }

    /// How the function's ops were lowered.
    pub fn stats(&self) -> &LoweringStats {
        &self.stats
    }

    /// How many times, over every call so far, a kernel step ran its op's reference
    /// semantics instead, because the run-time shapes were outside its shaders (operands
    /// that only broadcast at run time, too many dims to merge): zero when every op ran
    /// as [`Self::stats`] says.
    pub fn runtime_fallbacks(&self) -> usize {
        self.fallbacks.get()
    }

    /// Runs the function on `args`, returning the values of its `llm.return`; a KV cache
    /// result stays in device memory ([`llm_ir::interp::KvCache::resident`]). `weights` resolves the
    /// `llm.weight` ops that run at call time (none, when all are hoisted).
    pub fn run(
        &self,
        ctx: &Context,
        weights: &dyn WeightStore,
        args: Vec<Value>,
    ) -> Result<Vec<Value>, InterpError> {
        self.signature.check_args(ctx, &args)?;
        let name = &self.signature.name;
        self.reserve_params();
        let mut call = Call::new(self);
        for (&s, arg) in self.params.iter().zip(args) {
            call.set(
                s,
                // A cache in device memory stays there; a host cache is uploaded when a
                // shader first needs it (a quantized one, which no shader reads, stays on the
                // host).
                match arg {
                    Value::Cache(c) if c.resident.is_some() => Slot::Pool(
                        Pool::of(c, &self.gpu).map_err(|m| error(None, format!("@{name}: {m}")))?,
                    ),
                    other => Slot::Host(Rc::new(other), None),
                },
            );
        }
        for (s, v) in &self.constants {
            call.set(*s, v.clone());
        }
        for (index, step) in self.steps.iter().enumerate() {
            let at = |m: String| error(step.location, format!("{}: {m}", step.name));
            match &step.action {
                Action::Return => {
                    if let Some(faulted) = call.fault().map_err(at)? {
                        let s = &self.steps[faulted];
                        return Err(error(s.location, format!("{}: {}", s.name, fault_of(s))));
                    }
                    return call.finish(ctx, step).map_err(at);
                }
                Action::Kernel(kernel, pipelines) => {
                    let done = call.kernel(index, step, kernel, pipelines).map_err(at)?;
                    if !done {
                        self.fallbacks.set(self.fallbacks.get() + 1);
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
}

/// Uploads the constants the shaders read (split into parts, `[k, n]` weights transposed,
/// each weight once per compiler) and keeps on the host those only reference ops read.
fn upload_constants(
    gpu: &Gpu,
    compiler: &Compiler,
    steps: &mut [Step],
    (hoisted, half): (&HashMap<usize, Rc<Value>>, &HashSet<usize>),
    first_free: usize,
    stats: &mut LoweringStats,
) -> Result<Vec<(usize, Slot)>, GpuError> {
    // (slot, transposed) -> device copy.
    let mut on_device: HashMap<(usize, bool), DeviceTensor> = HashMap::new();
    let mut sharded: Vec<(usize, Slot)> = Vec::new();
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
            // A sharded constant (a weight's shards) is uploaded shard by shard.
            if let Value::Sharded(x) = &**value {
                if !sharded.iter().any(|(c, _)| *c == s) {
                    let shards = x
                        .shards
                        .iter()
                        .map(|t| {
                            let (shape, elem, bytes) = tensor_bytes(t, false, false)?;
                            stats.upload_bytes += bytes.len();
                            upload_parts(gpu, &step.name, shape, elem, &bytes)
                        })
                        .collect::<Result<_, _>>()
                        .map_err(|m| GpuError(format!("{}: {m}", step.name)))?;
                    sharded.push((s, Slot::Sharded(Rc::new(x.with_shards(shards)))));
                }
                continue;
            }
            if on_device.contains_key(&(s, transpose)) {
                continue;
            }
            let half = half.contains(&s);
            let key = (Rc::as_ptr(value), transpose, half);
            let cached = compiler.uploads.borrow().get(&key).map(|(_, t)| t.clone());
            let tensor = match cached {
                Some(t) => t,
                None => {
                    let (shape, elem, bytes) = device_bytes(value, transpose, half)
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
    let mut constants = sharded;
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

/// What a fault of `step`'s shader means (see `Call::fault`).
fn fault_of(step: &Step) -> &'static str {
    match &step.action {
        Action::Kernel(Kernel::Mesh(MeshMove::Unshard), _) => DEVICES_DISAGREE,
        Action::Kernel(Kernel::ExpertContraction { .. }, _) => {
            "an expert id is out of range for the stacked experts"
        }
        _ => "a value does not fit the 32 bits the device holds an integer in",
    }
}

/// The devices of the mesh `op`'s first sharded operand or result lives on (1 for an op
/// on unsharded values).
fn mesh_devices(ctx: &Context, op: Ptr<Operation>) -> usize {
    let op = op.deref(ctx);
    op.operands()
        .map(|v| v.get_type(ctx))
        .chain(op.results().map(|v| v.get_type(ctx)))
        .find_map(|ty| TypedHandle::<ShardedTensorType>::from_handle(ty, ctx).ok())
        .map_or(1, |t| t.deref(ctx).num_devices() as usize)
}

/// The most dispatches one call of `kernel` records on each mesh device (its shaders,
/// once per weight or table part; a mesh step's folds, boxes and placements number at
/// most its devices for each shader).
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
        // One per part of the weight, after the dequantization of quantized activations.
        Kernel::Contraction(c) => {
            parts_of(step.inputs[weight_operand(c)]) + usize::from(c.q8_0_input)
        }
        Kernel::Move(Movement::Rows { .. }) | Kernel::Dequantize { .. } => parts_of(step.inputs[0]),
        // One per part of the stacked experts.
        Kernel::ExpertContraction { .. } => parts_of(step.inputs[1]),
        // One of the whole and the split attention runs (the split one with its merge).
        Kernel::Attention { .. } => shaders - 1,
        // One placement per operand; one of a broadcast's two shaders.
        Kernel::Move(Movement::Concat { inputs, .. }) => *inputs,
        Kernel::Broadcast(_) => 1,
        _ => shaders,
    }
}
