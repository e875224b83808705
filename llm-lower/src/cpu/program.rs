//! A function compiled for the CPU: its ops in order, each either a JIT kernel or (for ops
//! without a lowering yet) the op's reference semantics, over a flat array of value slots.
//!
//! Every kernel call goes through a safe wrapper that checks the run-time shapes and buffer
//! lengths against the kernel's static shapes before entering generated code, which has
//! no bounds checks.

#![allow(unsafe_code, reason = "calls into JIT-compiled kernels")]

use std::{collections::HashMap, rc::Rc, sync::Arc};

use llm_ir::{
    dtype::DType,
    interp::{
        self, Hoisted, InterpError, QTensor, Tensor, Value, WeightStore, eval::fused::ScalarBody,
    },
};
use pliron::{
    builtin::{
        op_interfaces::SymbolOpInterface, ops::FuncOp, type_interfaces::FunctionTypeInterface,
        types::FunctionType,
    },
    context::{Context, Ptr},
    linked_list::ContainsLinkedList,
    operation::Operation,
    r#type::{TypeHandle, TypedHandle},
    value::Value as IrValue,
};

use super::{
    jit::{self, CompiledKernels, JitError, Target},
    workers::Workers,
};
use crate::kernel::{self, Contraction, Kernel, PANEL_ROWS, WeightFormat};

/// Multiply-adds below which a contraction runs on the calling thread only.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// What one step does.
enum Action {
    /// Calls compiled kernel `index`; `prologue` is the RMS-norm kernel of a contraction
    /// with a norm prologue.
    Kernel {
        kernel: Kernel,
        index: usize,
        prologue: Option<usize>,
    },
    /// Evaluates the op with its reference semantics.
    Reference,
    /// Returns the inputs.
    Return,
}

/// One op of the function.
struct Step {
    action: Action,
    /// The op (for its reference semantics and diagnostics).
    op: Ptr<Operation>,
    /// Slots of the operands.
    inputs: Vec<usize>,
    /// Slots of the results.
    outputs: Vec<usize>,
    /// Slots whose last use is this step (released before it runs, so a reference
    /// evaluation can update a cache in place).
    release: Vec<usize>,
    /// `LINE:COL` of the op.
    location: Option<(u32, u32)>,
    /// The op's name.
    name: String,
}

/// How to compile.
#[derive(Debug, Clone)]
pub struct Options {
    /// The instruction set.
    pub target: Target,
    /// Worker threads for contractions (1: run everything on the calling thread).
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            target: Target::Host,
            threads: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

/// Counts of how a function's ops were lowered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoweringStats {
    /// Ops run by JIT kernels.
    pub kernel_ops: usize,
    /// Distinct kernels compiled.
    pub kernels: usize,
    /// Ops run through their reference semantics, by name.
    pub reference_ops: Vec<(String, usize)>,
    /// Ops evaluated once at compile time (weight-derived).
    pub hoisted_ops: usize,
}

/// A function compiled for the CPU.
pub struct Program {
    name: String,
    steps: Vec<Step>,
    slots: usize,
    params: Vec<usize>,
    arg_types: Vec<TypeHandle>,
    res_types: Vec<TypeHandle>,
    constants: Vec<(usize, Rc<Value>)>,
    code: CompiledKernels,
    workers: Option<Arc<Workers>>,
    stats: LoweringStats,
}

/// The kernels of a function's ops (deduplicated) and, per op, its kernel and prologue.
pub struct Selection {
    /// Distinct kernels, in first-use order.
    pub kernels: Vec<Kernel>,
    /// Per op of the entry block: the kernel index and the prologue kernel index.
    pub per_op: Vec<Option<(usize, Option<usize>)>>,
}

/// The operand of a contraction op that holds its weight matrix.
fn weight_operand(kernel: &Contraction) -> usize {
    if kernel.norm_eps_bits.is_some() { 2 } else { 1 }
}

/// Selects kernels for every op of `ops`. Contractions whose weight `is_constant` read it
/// in the CPU's panel layout (the weight is repacked once, at compile time).
pub fn select_all(
    ctx: &Context,
    ops: &[Ptr<Operation>],
    is_constant: impl Fn(IrValue) -> bool,
) -> Selection {
    let mut kernels: Vec<Kernel> = Vec::new();
    let mut index_of = |k: Kernel| match kernels.iter().position(|x| *x == k) {
        Some(i) => i,
        None => {
            kernels.push(k);
            kernels.len() - 1
        }
    };
    let per_op = ops
        .iter()
        .map(|&op| {
            let mut k = kernel::select(ctx, op)?;
            if let Kernel::Contraction(c) = &mut k
                && c.weight == WeightFormat::F32
                && is_constant(op.deref(ctx).get_operand(weight_operand(c)))
            {
                c.weight = WeightFormat::F32Panels;
            }
            let prologue = match &k {
                Kernel::Contraction(Contraction {
                    k: d,
                    norm_eps_bits: Some(eps_bits),
                    ..
                }) => Some(index_of(Kernel::RmsNorm {
                    d: *d,
                    eps_bits: *eps_bits,
                })),
                _ => None,
            };
            Some((index_of(k), prologue))
        })
        .collect();
    Selection { kernels, per_op }
}

/// Gives every panel-layout contraction a repacked copy of its constant weight (one per
/// weight, shared by the ops that use it), and drops constants no step reads any more.
/// New slots are numbered from `first_free`; returns the number of slots after packing.
fn pack_weights(
    steps: &mut [Step],
    constants: &mut Vec<(usize, Rc<Value>)>,
    first_free: usize,
) -> Result<usize, JitError> {
    let mut packed: HashMap<usize, usize> = HashMap::new();
    let mut next_slot = first_free;
    let mut extra = Vec::new();
    for step in steps.iter_mut() {
        let Action::Kernel {
            kernel: Kernel::Contraction(c),
            ..
        } = &step.action
        else {
            continue;
        };
        if c.weight != WeightFormat::F32Panels {
            continue;
        }
        let operand = weight_operand(c);
        let original = step.inputs[operand];
        let slot = match packed.get(&original) {
            Some(&slot) => slot,
            None => {
                let value = constants
                    .iter()
                    .find(|(s, _)| *s == original)
                    .map(|(_, v)| v)
                    .ok_or_else(|| {
                        JitError(format!("{}: the weight is not constant", step.name))
                    })?;
                let t = value.tensor().map_err(JitError)?;
                if t.shape != [c.n, c.k] {
                    return Err(JitError(format!(
                        "{}: the weight {:?} is not {}x{}",
                        step.name, t.shape, c.n, c.k
                    )));
                }
                let data = kernel::pack_panels(t.floats().map_err(JitError)?, c.n, c.k);
                let panels = Tensor::from_f32(t.shape.clone(), DType::F32, data);
                let slot = next_slot;
                next_slot += 1;
                extra.push((slot, Rc::new(Value::Tensor(panels))));
                packed.insert(original, slot);
                slot
            }
        };
        step.inputs[operand] = slot;
    }
    constants.extend(extra);
    let read: std::collections::HashSet<usize> = steps
        .iter()
        .flat_map(|s| s.inputs.iter().copied())
        .collect();
    constants.retain(|(s, _)| read.contains(s));
    Ok(next_slot)
}

fn error(location: Option<(u32, u32)>, message: impl Into<String>) -> InterpError {
    InterpError {
        location,
        message: message.into(),
    }
}

impl Program {
    /// Compiles `func`, taking the values of its weight-derived ops from `hoisted` (made by
    /// [`interp::Interpreter::hoist`] for this function).
    pub fn build(
        ctx: &Context,
        func: FuncOp,
        hoisted: &Hoisted,
        options: &Options,
    ) -> Result<Program, JitError> {
        let name = func.get_symbol_name(ctx).to_string();
        let fty = TypedHandle::<FunctionType>::from_handle(func.get_type(ctx), ctx)
            .map_err(|_| JitError(format!("@{name} has no function type")))?;
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
        let live_ops: Vec<Ptr<Operation>> = ops
            .iter()
            .copied()
            .filter(|&op| {
                let results: Vec<IrValue> = op.deref(ctx).results().collect();
                results.is_empty() || !results.iter().all(|&r| hoisted.covers(r))
            })
            .collect();
        let selection = select_all(ctx, &live_ops, |v| hoisted.value(v).is_some());
        let mut stats = LoweringStats {
            hoisted_ops: ops.len() - live_ops.len(),
            kernels: selection.kernels.len(),
            ..LoweringStats::default()
        };
        let mut constants = Vec::new();
        for &op in &ops {
            for r in op.deref(ctx).results() {
                if let Some(v) = hoisted.value(r) {
                    constants.push((slot(r), Rc::clone(v)));
                }
            }
        }
        let mut steps = Vec::with_capacity(live_ops.len());
        for (&op, chosen) in live_ops.iter().zip(&selection.per_op) {
            let o = op.deref(ctx);
            let op_name = Operation::get_opid(op, ctx).to_string();
            let inputs: Vec<usize> = o.operands().map(&mut slot).collect();
            let outputs: Vec<usize> = o.results().map(&mut slot).collect();
            let action = match chosen {
                _ if op_name == "llm.return" => Action::Return,
                Some((index, prologue)) => {
                    stats.kernel_ops += 1;
                    Action::Kernel {
                        kernel: selection.kernels[*index].clone(),
                        index: *index,
                        prologue: *prologue,
                    }
                }
                None => {
                    match stats.reference_ops.iter_mut().find(|(n, _)| *n == op_name) {
                        Some((_, count)) => *count += 1,
                        None => stats.reference_ops.push((op_name.clone(), 1)),
                    }
                    Action::Reference
                }
            };
            steps.push(Step {
                action,
                op,
                inputs,
                outputs,
                release: Vec::new(),
                location: interp::locate(o.loc()),
                name: op_name,
            });
        }
        let slots = pack_weights(&mut steps, &mut constants, slot_of.len())?;
        let mut last_use = vec![None; slots];
        for (i, step) in steps.iter().enumerate() {
            for &s in &step.inputs {
                last_use[s] = Some(i);
            }
        }
        for (s, last) in last_use.iter().enumerate() {
            if let Some(i) = *last {
                steps[i].release.push(s);
            }
        }
        let code = jit::compile(&selection.kernels, options.target, None)?;
        let workers = (options.threads > 1)
            .then(|| Workers::new(options.threads).map(Arc::new))
            .transpose()
            .map_err(|e| JitError(format!("worker threads: {e}")))?;
        Ok(Program {
            name,
            steps,
            slots,
            params,
            arg_types,
            res_types,
            constants,
            code,
            workers,
            stats,
        })
    }

    /// How the function's ops were lowered.
    pub fn stats(&self) -> &LoweringStats {
        &self.stats
    }

    /// Runs the function on `args`, returning the values of its `llm.return`. Arguments are
    /// checked against the function type before anything runs; `weights` resolves the
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
        let mut env: Vec<Option<Rc<Value>>> = vec![None; self.slots];
        for (&s, arg) in self.params.iter().zip(args) {
            env[s] = Some(Rc::new(arg));
        }
        for (s, v) in &self.constants {
            env[*s] = Some(Rc::clone(v));
        }
        for step in &self.steps {
            let inputs = step
                .inputs
                .iter()
                .map(|&s| env[s].clone())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    error(
                        step.location,
                        format!("{}: an operand has no value", step.name),
                    )
                })?;
            for &s in &step.release {
                env[s] = None;
            }
            let outputs = match &step.action {
                Action::Return => {
                    let mut results = Vec::with_capacity(inputs.len());
                    for (j, (value, ty)) in inputs.into_iter().zip(&self.res_types).enumerate() {
                        let value = Rc::unwrap_or_clone(value);
                        interp::check_value(ctx, &value, *ty).map_err(|m| {
                            error(step.location, format!("result #{j} of @{name}: {m}"))
                        })?;
                        results.push(value);
                    }
                    return Ok(results);
                }
                Action::Kernel {
                    kernel,
                    index,
                    prologue,
                } => match self.call(kernel, *index, *prologue, &inputs) {
                    Some(result) => result.map(|t| vec![Rc::new(Value::Tensor(t))]),
                    // Shapes the kernel does not cover (a broadcast found at run time).
                    None => interp::eval_op(ctx, step.op, inputs, weights),
                },
                Action::Reference => interp::eval_op(ctx, step.op, inputs, weights),
            }
            .map_err(|m| error(step.location, format!("{}: {m}", step.name)))?;
            for (&s, v) in step.outputs.iter().zip(outputs) {
                env[s] = Some(v);
            }
        }
        Err(error(None, format!("@{name} ended without llm.return")))
    }

    /// Calls a kernel on `inputs` after checking them; `None` when the run-time shapes are
    /// not the kernel's (the caller then uses the reference semantics).
    fn call(
        &self,
        kernel: &Kernel,
        index: usize,
        prologue: Option<usize>,
        inputs: &[Rc<Value>],
    ) -> Option<Result<Tensor, String>> {
        match kernel {
            Kernel::Contraction(c) => Some(self.contraction(c, index, prologue, inputs)),
            Kernel::Elementwise(body) => self.elementwise(body, index, inputs),
            Kernel::RmsNorm { d, .. } => Some(self.rms_norm(*d, index, inputs)),
        }
    }

    fn contraction(
        &self,
        c: &Contraction,
        index: usize,
        prologue: Option<usize>,
        inputs: &[Rc<Value>],
    ) -> Result<Tensor, String> {
        let x = inputs[0].tensor()?;
        let xs = x.floats()?;
        if x.shape.last() != Some(&c.k) {
            return Err(format!(
                "the input {:?} does not end in K = {}",
                x.shape, c.k
            ));
        }
        let m = xs.len() / c.k.max(1);
        let normed;
        let (xs, w) = match prologue {
            Some(norm) => {
                normed = self.rms_norm(c.k, norm, &inputs[..2])?;
                (normed.floats()?, &inputs[2])
            }
            None => (xs, &inputs[1]),
        };
        let wbytes: &[u8] = match (c.weight, &**w) {
            (WeightFormat::F32 | WeightFormat::F32Panels, Value::Tensor(t))
                if t.shape == [c.n, c.k] =>
            {
                as_bytes(t.floats()?)
            }
            (
                WeightFormat::Q8_0 | WeightFormat::Q4_0,
                Value::Quantized(QTensor { shape, bytes, .. }),
            ) if *shape == [c.n, c.k] => bytes,
            (_, other) => {
                return Err(format!(
                    "the weight ({}) is not a {}x{} matrix",
                    other.kind(),
                    c.n,
                    c.k
                ));
            }
        };
        if wbytes.len() != c.n * c.weight.row_bytes(c.k) {
            return Err(format!("the weight holds {} bytes", wbytes.len()));
        }
        let mut out = vec![0f32; m * c.n];
        let f: extern "C" fn(i64, i64, i64, i64, i64, i64) =
            // SAFETY: kernel `index` is a contraction, whose signature has six i64 params.
            unsafe { std::mem::transmute(self.code.entry(index)) };
        let (xp, wp, yp) = (
            xs.as_ptr() as i64,
            wbytes.as_ptr() as i64,
            out.as_mut_ptr() as i64,
        );
        // The kernel reads m rows of k floats at xp, rows j0..j1 of the weight at wp and
        // writes y[i, j0..j1] for i < m at yp: all inside the buffers checked above.
        let run = |j0: usize, j1: usize| f(xp, wp, yp, m as i64, j0 as i64, j1 as i64);
        match &self.workers {
            Some(workers) if m * c.n * c.k >= PARALLEL_MIN_MACS && c.n >= 8 => {
                // Chunks of whole panels, one per thread.
                let chunk = c.n.div_ceil(workers.threads()).next_multiple_of(PANEL_ROWS);
                workers.run(c.n.div_ceil(chunk), &|i| {
                    run(i * chunk, ((i + 1) * chunk).min(c.n));
                });
            }
            _ => run(0, c.n),
        }
        let mut shape = x.shape[..x.shape.len() - 1].to_vec();
        shape.push(c.n);
        Ok(Tensor::from_f32(shape, DType::F32, out))
    }

    fn elementwise(
        &self,
        body: &ScalarBody,
        index: usize,
        inputs: &[Rc<Value>],
    ) -> Option<Result<Tensor, String>> {
        let tensors: Vec<&Tensor> = inputs
            .iter()
            .map(|v| v.tensor().ok())
            .collect::<Option<_>>()?;
        let shape = &tensors.first()?.shape;
        if tensors.len() != body.args || tensors.iter().any(|t| t.shape != *shape) {
            return None;
        }
        let data: Vec<&[f32]> = tensors
            .iter()
            .map(|t| t.floats().ok())
            .collect::<Option<_>>()?;
        let len = data[0].len();
        let ptrs: Vec<i64> = data.iter().map(|d| d.as_ptr() as i64).collect();
        let mut out = vec![0f32; len];
        let f: extern "C" fn(i64, i64, i64) =
            // SAFETY: kernel `index` is elementwise: (inputs, out, len).
            unsafe { std::mem::transmute(self.code.entry(index)) };
        // Every input holds `len` floats (same shape), as does `out`.
        f(ptrs.as_ptr() as i64, out.as_mut_ptr() as i64, len as i64);
        Some(Ok(Tensor::from_f32(shape.clone(), DType::F32, out)))
    }

    fn rms_norm(&self, d: usize, index: usize, inputs: &[Rc<Value>]) -> Result<Tensor, String> {
        let (x, g) = (inputs[0].tensor()?, inputs[1].tensor()?);
        let (xs, gs) = (x.floats()?, g.floats()?);
        if x.shape.last() != Some(&d) || gs.len() != d {
            return Err(format!(
                "rows of {:?} do not fit the norm weight {:?}",
                x.shape, g.shape
            ));
        }
        let mut out = vec![0f32; xs.len()];
        let f: extern "C" fn(i64, i64, i64, i64) =
            // SAFETY: kernel `index` is an RMS norm: (x, g, y, rows).
            unsafe { std::mem::transmute(self.code.entry(index)) };
        // x and y hold rows * d floats, g holds d.
        f(
            xs.as_ptr() as i64,
            gs.as_ptr() as i64,
            out.as_mut_ptr() as i64,
            (xs.len() / d.max(1)) as i64,
        );
        Ok(Tensor::from_f32(x.shape.clone(), DType::F32, out))
    }
}

/// The bytes of a float slice.
fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), size_of_val(v)) }
}

/// The values of `ops` computed from weights and constants only (what a runtime hoists).
pub fn weight_derived(ctx: &Context, ops: &[Ptr<Operation>]) -> std::collections::HashSet<IrValue> {
    let mut derived = std::collections::HashSet::new();
    for &op in ops {
        let o = op.deref(ctx);
        if Operation::get_opid(op, ctx).to_string() != "llm.return"
            && o.operands().all(|v| derived.contains(&v))
        {
            derived.extend(o.results());
        }
    }
    derived
}
