//! A function compiled for the CPU: its ops in order, each either a JIT kernel or (for ops
//! without a lowering yet) the op's reference semantics, over a flat array of value slots.
//!
//! Every kernel call goes through a safe wrapper ([`calls`]) that checks the run-time
//! shapes and buffer lengths against the kernel's static shapes before entering generated
//! code, which has no bounds checks.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    rc::Rc,
    sync::Arc,
};

use llm_ir::{
    dtype::DType,
    interp::{self, Hoisted, InterpError, QTensor, Tensor, Value, WeightStore},
    syntax::Dim,
};
use pliron::{
    builtin::ops::FuncOp,
    context::{Context, Ptr},
    operation::Operation,
    value::Value as IrValue,
};

use super::{
    calls::{self, Operands, Results},
    jit::{self, CompiledKernels, JitError, Target},
    plan::{CallPlan, PlanStep, StepKind, Traced},
    pool::BufferPool,
    tables::{PagedRows, RopeTables},
    workers::Workers,
};
use crate::{
    kernel::{self, Contraction, Kernel, Movement, WeightFormat},
    layout::{Layout, Signature},
    selection::{Chosen, select_all, weight_operand},
};

/// What one step does.
enum Action {
    /// Runs a kernel.
    Kernel(Chosen),
    /// Copies column ranges `(offset, len)` out of rows of `width`: several `llm.slice`s
    /// of one value merged into one step ([`merge_slices`]), one result per range.
    Columns {
        /// Columns of the sliced value.
        width: usize,
        /// The ranges, in result order.
        parts: Vec<(usize, usize)>,
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
    /// The declared dims of its first result, when that is a tensor.
    dims: Vec<Dim>,
    /// Reshapes folded into this step ([`fold_reshapes`]): result `j` takes the shape
    /// their dims resolve to.
    relabel: Vec<(usize, Relabel)>,
}

/// A reshape folded into the step that makes its operand.
struct Relabel {
    /// The reshape's result dims.
    dims: Vec<Dim>,
    /// `LINE:COL` of the reshape (for its errors).
    location: Option<(u32, u32)>,
}

/// How to compile.
#[derive(Debug, Clone)]
pub struct Options {
    /// The instruction set.
    pub target: Target,
    /// Worker threads for contractions (1: run everything on the calling thread).
    pub threads: usize,
    /// Let generated loops call the Rust microkernels (`cpu::ukernel`) where the CPU has
    /// them; without, every kernel is generated code (tests cover both).
    pub microkernels: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            target: Target::Host,
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            microkernels: true,
        }
    }
}

/// Counts of how a function's ops were lowered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoweringStats {
    /// Ops run by JIT kernels.
    pub kernel_ops: usize,
    /// Distinct kernels compiled.
    pub kernels: usize,
    /// Ops run through their reference semantics, by name.
    pub reference_ops: Vec<(String, usize)>,
    /// Ops evaluated once at compile time (weight-derived).
    pub hoisted_ops: usize,
    /// Ops fused into another op's kernel (adds that became contraction epilogues); they
    /// count in `kernel_ops` too.
    pub fused_ops: usize,
    /// Steps a call runs, its `llm.return` included: one per op, less the reshapes
    /// folded into the steps that make their operands and the slices of one value merged
    /// into one step.
    pub steps: usize,
    /// Milliseconds spent generating and JIT-compiling the kernels.
    pub jit_ms: f64,
    /// Milliseconds spent repacking weights (zero for weights packed by an earlier
    /// function of the same [`Compiler`]).
    pub pack_ms: f64,
    /// Embeddings that gather from a contraction's repacked weight (f32 or block panels: a
    /// classifier tied to the embedding table, kept once).
    pub panel_gathers: usize,
    /// Contractions that read their weight repacked into panels (f32 panels, or block
    /// panels of a weight of 32-value blocks or of 16-bit floats).
    pub panel_contractions: usize,
}

/// A function compiled for the CPU.
pub struct Program {
    signature: Signature,
    steps: Vec<Step>,
    slots: usize,
    params: Vec<usize>,
    constants: Constants,
    code: CompiledKernels,
    workers: Option<Arc<Workers>>,
    stats: LoweringStats,
    /// Memory of values, recycled between steps and calls.
    pool: BufferPool,
    /// Rope tables of the current call.
    ropes: RopeTables,
    /// Paged attention's row offsets of the current call.
    paged: PagedRows,
    /// Kernel steps that ran their op's reference semantics instead (shapes outside the
    /// kernel, known only at run time), over every call.
    fallbacks: Cell<usize>,
    /// Call plans made for the argument shapes seen so far.
    plans: RefCell<Plans>,
}

/// The shapes of a call's tensor arguments (`None` for other values).
type ArgShapes = Vec<Option<Vec<usize>>>;

/// The call plans of a program ([`CallPlan`]): a plan is made when arguments of the same
/// shapes come a second time (a prompt length seen once gets none), and the few most
/// recently used are kept.
#[derive(Default)]
struct Plans {
    /// Shapes of the arguments of recent calls that ran step by step.
    seen: Vec<ArgShapes>,
    /// Shapes whose traced run had a step fall back to the reference semantics (no plan
    /// is made for them, and they are not traced again).
    declined: Vec<ArgShapes>,
    /// Plans, the most recently used first.
    plans: Vec<Rc<CallPlan>>,
    /// A plan could not be made (the function has a step plans do not run).
    unplannable: bool,
    /// Calls that ran through a plan.
    runs: usize,
}

impl Plans {
    /// Argument shapes remembered.
    const SEEN: usize = 8;
    /// Plans kept.
    const KEPT: usize = 4;

    /// The plan for `args`, moved to the front.
    fn find(&mut self, args: &[Value]) -> Option<Rc<CallPlan>> {
        let i = self.plans.iter().position(|p| p.fits(args))?;
        let plan = self.plans.remove(i);
        self.plans.insert(0, Rc::clone(&plan));
        self.runs += 1;
        Some(plan)
    }

    /// The shapes of `args`.
    fn shapes(args: &[Value]) -> ArgShapes {
        args.iter()
            .map(|a| a.tensor().ok().map(|t| t.shape.clone()))
            .collect()
    }

    /// The shapes of `args` when a call with them should be traced to make a plan: the
    /// second time they come, unless a traced run of them could not be planned.
    fn wants_trace(&mut self, args: &[Value]) -> Option<ArgShapes> {
        if self.unplannable {
            return None;
        }
        let shapes = Self::shapes(args);
        if self.declined.contains(&shapes) {
            return None;
        }
        if self.seen.contains(&shapes) {
            return Some(shapes);
        }
        self.seen.insert(0, shapes);
        self.seen.truncate(Self::SEEN);
        None
    }

    /// Remembers that calls with the shapes of `args` get no plan.
    fn decline(&mut self, shapes: ArgShapes) {
        self.declined.insert(0, shapes);
        self.declined.truncate(Self::SEEN);
    }

    /// Keeps `plan` (or, for `None`, stops making plans).
    fn add(&mut self, plan: Option<CallPlan>) {
        match plan {
            Some(plan) => {
                self.plans.insert(0, Rc::new(plan));
                self.plans.truncate(Self::KEPT);
            }
            None => self.unplannable = true,
        }
    }
}

/// What `value` is, for a trace.
fn traced(value: &Value) -> Traced {
    match value {
        Value::Tensor(t) => Traced::Tensor(t.shape.clone(), t.dtype),
        Value::Quantized(q) => Traced::Quantized(q.shape.clone(), q.format.clone()),
        Value::Cache(_) => Traced::Cache,
        _ => Traced::Other,
    }
}

/// Packed copies of constant weights (f32 panels, or block panels of a quantized matrix),
/// shared by the programs of one [`Compiler`] (a model's prefill and decode functions use
/// the same matrices), keyed by the addresses of the matrices whose rows they pack and
/// whether they were transposed.
#[derive(Default)]
struct PackCache(RefCell<HashMap<(Vec<*const Value>, bool), PackedPair>>);

/// The original matrices (kept so that their addresses stay their own) and their packed
/// copy.
type PackedPair = (Vec<Rc<Value>>, Rc<Value>);

impl PackCache {
    /// The panel layout of the weight of `c` (`n x k`, or `k x n` when
    /// `c.transpose_at_pack`) whose rows those of `parts` are, stacked, packed once (on
    /// `threads` threads) from the parts themselves. A transposed weight comes whole.
    fn packed(
        &self,
        parts: &[Rc<Value>],
        c: &Contraction,
        op: &str,
        threads: usize,
    ) -> Result<Rc<Value>, JitError> {
        let key = (parts.iter().map(Rc::as_ptr).collect(), c.transpose_at_pack);
        if let Some((_, packed)) = self.0.borrow().get(&key) {
            return Ok(Rc::clone(packed));
        }
        let stored = if c.transpose_at_pack {
            [c.k, c.n]
        } else {
            [c.n, c.k]
        };
        let mut rows = 0;
        let mut floats = Vec::with_capacity(parts.len());
        for part in parts {
            let t = part.tensor().map_err(JitError)?;
            if t.shape.len() != 2 || t.shape[1] != stored[1] {
                return Err(JitError(format!(
                    "{op}: the weight {:?} does not have {} columns",
                    t.shape, stored[1]
                )));
            }
            rows += t.shape[0];
            floats.push(t.floats().map_err(JitError)?);
        }
        if rows != stored[0] || (c.transpose_at_pack && parts.len() != 1) {
            return Err(JitError(format!(
                "{op}: the weight is not {}x{}",
                stored[0], stored[1]
            )));
        }
        let data = if c.transpose_at_pack {
            // Row j of the [n, k] matrix is column j of the stored one.
            let whole = floats[0];
            let transposed: Vec<f32> = (0..c.n)
                .flat_map(|j| (0..c.k).map(move |p| whole[p * c.n + j]))
                .collect();
            kernel::pack_panels(&transposed, c.n, c.k, threads)
        } else {
            // Packed straight from the weights, without a row-major copy first.
            kernel::pack_stacked_panels(&floats, c.n, c.k, threads)
        };
        let packed = Rc::new(Value::Tensor(Tensor::from_f32(
            vec![c.n, c.k],
            DType::F32,
            data,
        )));
        // The originals are kept with their key, so that the addresses are not reused.
        self.0
            .borrow_mut()
            .insert(key, (parts.to_vec(), Rc::clone(&packed)));
        Ok(packed)
    }

    /// The panel layout ([`kernel::pack_weight_panels`]) of the quantized weight of `c`
    /// whose rows those of `parts` are, stacked (one part, or the 16-bit matrices that
    /// `fuse` merged), packed once (on `threads` threads where that splits) from the parts
    /// themselves.
    fn packed_blocks(
        &self,
        parts: &[Rc<Value>],
        c: &Contraction,
        (op, threads): (&str, usize),
    ) -> Result<Rc<Value>, JitError> {
        let key = (parts.iter().map(Rc::as_ptr).collect(), false);
        if let Some((_, packed)) = self.0.borrow().get(&key) {
            return Ok(Rc::clone(packed));
        }
        let row_bytes = c.weight.row_bytes(c.k);
        let mut rows = 0;
        let mut bytes = Vec::with_capacity(parts.len());
        for part in parts {
            let q = part.quantized().map_err(JitError)?;
            let held = q.shape.len() == 2 && q.bytes.len() == q.shape[0] * row_bytes;
            if !held || q.shape[1] != c.k || WeightFormat::of(&q.format) != Some(c.weight) {
                return Err(JitError(format!(
                    "{op}: the weight {:?} in {} is not rows of {} in {}",
                    q.shape,
                    q.format.name(),
                    c.k,
                    c.weight.name()
                )));
            }
            rows += q.shape[0];
            bytes.push(&q.bytes[..]);
        }
        if rows != c.n {
            return Err(JitError(format!(
                "{op}: the weight is not {}x{} in {}",
                c.n,
                c.k,
                c.weight.name()
            )));
        }
        let format = c
            .weight
            .quant_format()
            .ok_or_else(|| JitError(format!("{op}: {} is not a stored format", c.weight.name())))?;
        let packed = Rc::new(Value::Quantized(QTensor {
            shape: vec![c.n, c.k],
            format,
            bytes: kernel::pack_weight_panels(c.weight, &bytes, [c.n, c.k], threads),
        }));
        self.0
            .borrow_mut()
            .insert(key, (parts.to_vec(), Rc::clone(&packed)));
        Ok(packed)
    }
}

/// Compiles the functions of one model: they share worker threads and packed weights.
pub struct Compiler {
    target: Target,
    microkernels: bool,
    workers: Option<Arc<Workers>>,
    packs: PackCache,
}

impl Compiler {
    /// A compiler for `options`, starting its worker threads.
    pub fn new(options: &Options) -> Result<Compiler, JitError> {
        let workers = (options.threads > 1)
            .then(|| Workers::new(options.threads).map(Arc::new))
            .transpose()
            .map_err(|e| JitError(format!("worker threads: {e}")))?;
        Ok(Compiler {
            target: options.target,
            microkernels: options.microkernels,
            workers,
            packs: PackCache::default(),
        })
    }

    /// Compiles `func`, taking the values of its weight-derived ops from `hoisted` (made by
    /// [`interp::Interpreter::hoist`] for this function).
    pub fn build(
        &self,
        ctx: &Context,
        func: FuncOp,
        hoisted: &Hoisted,
    ) -> Result<Program, JitError> {
        Program::compile(ctx, func, hoisted, self)
    }
}

/// Constant values with their slots.
type Constants = Vec<(usize, Rc<Value>)>;

/// Gives every panel-layout contraction (f32 panels or block panels) a repacked copy of
/// its constant weight (one per weight, shared by the ops that use it; the rows of stacked
/// f32 matrices packed from their parts), and returns the constants the steps read then,
/// with their slots: the packed copies, numbered from `first_free`, and the hoisted values
/// of `constants` that are still read (made now: a stacked matrix only read by
/// contractions is never stacked). Packing runs on `threads` threads; the number of slots
/// after packing comes second.
fn pack_weights(
    steps: &mut [Step],
    (constants, hoisted): (&[(usize, IrValue)], &Hoisted),
    first_free: usize,
    (cache, threads): (&PackCache, usize),
) -> Result<(Constants, usize), JitError> {
    let value_of = |slot: usize| constants.iter().find(|(s, _)| *s == slot).map(|&(_, v)| v);
    // (original slot, transposed) -> packed slot (f32 panels of an f32 weight, block
    // panels of a quantized one).
    let mut packed: HashMap<(usize, bool), usize> = HashMap::new();
    let mut next_slot = first_free;
    let mut extra = Vec::new();
    for step in steps.iter_mut() {
        let Action::Kernel(Chosen {
            kernel: Kernel::Contraction(c),
            ..
        }) = &step.action
        else {
            continue;
        };
        if !c.reads_panels() {
            continue;
        }
        let operand = weight_operand(c);
        let original = step.inputs[operand];
        let key = (original, c.transpose_at_pack);
        let not_constant = || JitError(format!("{}: the weight is not constant", step.name));
        let slot = match packed.get(&key) {
            Some(&slot) => slot,
            None => {
                let v = value_of(original).ok_or_else(not_constant)?;
                // A stacked matrix is packed from its parts, without the stacked copy.
                let whole;
                let parts = match hoisted.stacked_rows(v) {
                    Some(parts) if !c.transpose_at_pack => parts,
                    _ => {
                        whole = [Rc::clone(hoisted.value(v).ok_or_else(not_constant)?)];
                        &whole[..]
                    }
                };
                let panels = if c.block_panels {
                    cache.packed_blocks(parts, c, (&step.name, threads))?
                } else {
                    cache.packed(parts, c, &step.name, threads)?
                };
                let slot = next_slot;
                next_slot += 1;
                extra.push((slot, panels));
                packed.insert(key, slot);
                slot
            }
        };
        step.inputs[operand] = slot;
    }
    // Embeddings of a packed table (a tied classifier) gather from the panels (f32 or
    // block panels), so that the row-major copy can go.
    for step in steps.iter_mut() {
        if let Action::Kernel(Chosen {
            kernel: Kernel::Move(Movement::Rows { panels, .. }),
            ..
        }) = &mut step.action
            && let Some(&slot) = packed.get(&(step.inputs[0], false))
        {
            *panels = true;
            step.inputs[0] = slot;
        }
    }
    let read: std::collections::HashSet<usize> = steps
        .iter()
        .flat_map(|s| s.inputs.iter().copied())
        .collect();
    let mut values = Vec::new();
    for &(slot, v) in constants.iter().filter(|(s, _)| read.contains(s)) {
        let value = hoisted
            .value(v)
            .ok_or_else(|| JitError(format!("constant slot {slot} has no value")))?;
        values.push((slot, Rc::clone(value)));
    }
    values.extend(extra);
    Ok((values, next_slot))
}

/// Evaluates `op` with its reference semantics.
fn reference(
    ctx: &Context,
    op: Ptr<Operation>,
    inputs: Operands,
    weights: &dyn WeightStore,
) -> Result<Results, String> {
    interp::eval_op(ctx, op, inputs.into_vec(), weights).map(Results::from_vec)
}

/// Merges the `llm.slice`s of columns of one value into one step (at the first of them):
/// a Llama layer splits its fused QKV and gate/up projections with five slices.
fn merge_slices(steps: Vec<Step>) -> Vec<Step> {
    // The merged step of each sliced slot.
    let mut merged: HashMap<usize, usize> = HashMap::new();
    let mut kept: Vec<Step> = Vec::with_capacity(steps.len());
    for mut step in steps {
        let (
            Action::Kernel(Chosen {
                kernel: Kernel::Move(Movement::Columns { width, offset, len }),
                ..
            }),
            &[operand],
            &[result],
        ) = (&step.action, &step.inputs[..], &step.outputs[..])
        else {
            kept.push(step);
            continue;
        };
        let (width, part) = (*width, (*offset, *len));
        if let Some(&i) = merged.get(&operand)
            && let Action::Columns { width: w, parts } = &mut kept[i].action
            && *w == width
        {
            parts.push(part);
            kept[i].outputs.push(result);
            continue;
        }
        step.action = Action::Columns {
            width,
            parts: vec![part],
        };
        merged.insert(operand, kept.len());
        kept.push(step);
    }
    kept
}

/// Folds every reshape whose operand is a result of an earlier step that runs generated
/// code or a host copy, used nowhere else, into that step: the step gives its result the
/// reshape's shape ([`calls::relabel`]) under the reshape's result slot, and the
/// reshape's own step goes (a Llama decode step has five reshapes per layer).
fn fold_reshapes(steps: Vec<Step>) -> Vec<Step> {
    let mut uses: HashMap<usize, usize> = HashMap::new();
    for step in &steps {
        for &s in &step.inputs {
            *uses.entry(s).or_default() += 1;
        }
    }
    // The kept step and result index of each slot.
    let mut producer: HashMap<usize, (usize, usize)> = HashMap::new();
    let mut kept: Vec<Step> = Vec::with_capacity(steps.len());
    for step in steps {
        let reshape = matches!(
            &step.action,
            Action::Kernel(Chosen {
                kernel: Kernel::Move(Movement::Reshape),
                ..
            })
        );
        if let ([operand], [result], true) = (&step.inputs[..], &step.outputs[..], reshape)
            && uses.get(operand) == Some(&1)
            && let Some(&(p, j)) = producer.get(operand)
        {
            let target = &mut kept[p];
            target.outputs[j] = *result;
            target.relabel.retain(|(k, _)| *k != j);
            target.relabel.push((
                j,
                Relabel {
                    dims: step.dims,
                    location: step.location,
                },
            ));
            producer.insert(*result, (p, j));
            continue;
        }
        if matches!(step.action, Action::Kernel(_) | Action::Columns { .. }) {
            for (j, &s) in step.outputs.iter().enumerate() {
                producer.insert(s, (kept.len(), j));
            }
        }
        kept.push(step);
    }
    kept
}

fn error(location: Option<(u32, u32)>, message: impl Into<String>) -> InterpError {
    InterpError {
        location,
        message: message.into(),
    }
}

impl Program {
    /// Compiles `func` on its own ([`Compiler::build`] with a new compiler), taking the
    /// values of its weight-derived ops from `hoisted` (made by
    /// [`interp::Interpreter::hoist`] for this function).
    pub fn build(
        ctx: &Context,
        func: FuncOp,
        hoisted: &Hoisted,
        options: &Options,
    ) -> Result<Program, JitError> {
        Compiler::new(options)?.build(ctx, func, hoisted)
    }

    fn compile(
        ctx: &Context,
        func: FuncOp,
        hoisted: &Hoisted,
        compiler: &Compiler,
    ) -> Result<Program, JitError> {
        let mut layout = Layout::new(ctx, func, hoisted).map_err(JitError)?;
        let selection = select_all(ctx, &layout.live, |v| hoisted.holds(v), super::supports);
        let mut stats = LoweringStats {
            hoisted_ops: layout.hoisted_ops(),
            kernels: selection.kernels.len(),
            kernel_ops: selection.kernel_ops(),
            fused_ops: selection.fused_ops(),
            reference_ops: selection.reference_ops(ctx, &layout.live),
            ..LoweringStats::default()
        };
        let constant_slots = layout.constant_slots(ctx, hoisted);
        let steps: Vec<Step> = layout
            .ops(ctx, &selection)
            .into_iter()
            .map(|o| Step {
                action: match &selection.per_op[o.index] {
                    _ if o.is_return => Action::Return,
                    Some(chosen) => Action::Kernel(chosen.clone()),
                    None => Action::Reference,
                },
                dims: o.dims,
                op: o.op,
                inputs: o.inputs,
                outputs: o.outputs,
                release: Vec::new(),
                location: o.location,
                name: o.name,
                relabel: Vec::new(),
            })
            .collect();
        let mut steps = fold_reshapes(merge_slices(steps));
        stats.steps = steps.len();
        let pack_start = std::time::Instant::now();
        let threads = compiler.workers.as_ref().map_or(1, |w| w.threads());
        let (constants, slots) = pack_weights(
            &mut steps,
            (&constant_slots, hoisted),
            layout.slots(),
            (&compiler.packs, threads),
        )?;
        stats.pack_ms = pack_start.elapsed().as_secs_f64() * 1e3;
        stats.panel_contractions = steps
            .iter()
            .filter(|s| {
                matches!(
                    &s.action,
                    Action::Kernel(Chosen {
                        kernel: Kernel::Contraction(c),
                        ..
                    }) if c.reads_panels()
                )
            })
            .count();
        stats.panel_gathers = steps
            .iter()
            .filter(|s| {
                matches!(
                    s.action,
                    Action::Kernel(Chosen {
                        kernel: Kernel::Move(Movement::Rows { panels: true, .. }),
                        ..
                    })
                )
            })
            .count();
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
        let jit_start = std::time::Instant::now();
        let code = jit::compile(
            &selection.kernels,
            compiler.target,
            compiler.microkernels,
            None,
        )?;
        stats.jit_ms = jit_start.elapsed().as_secs_f64() * 1e3;
        let workers = compiler.workers.clone();
        Ok(Program {
            steps,
            slots,
            params: layout.params,
            signature: layout.signature,
            constants,
            code,
            workers,
            stats,
            pool: BufferPool::default(),
            ropes: RopeTables::default(),
            paged: PagedRows::default(),
            fallbacks: Cell::new(0),
            plans: RefCell::default(),
        })
    }

    /// What kernel calls run with.
    fn kernels(&self) -> calls::Kernels<'_> {
        calls::Kernels {
            code: &self.code,
            workers: self.workers.as_deref(),
            pool: &self.pool,
            ropes: &self.ropes,
            paged: &self.paged,
        }
    }

    /// How the function's ops were lowered.
    pub fn stats(&self) -> &LoweringStats {
        &self.stats
    }

    /// How many times, over every call so far, a kernel step ran its op's reference
    /// semantics instead, because the run-time shapes were outside the kernel (operands
    /// that only broadcast at run time): zero when every op ran as [`Self::stats`] says.
    pub fn runtime_fallbacks(&self) -> usize {
        self.fallbacks.get()
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
        self.signature.check_args(ctx, &args)?;
        self.ropes.clear();
        self.paged.clear();
        let plan = self.plans.borrow_mut().find(&args);
        if let Some(plan) = plan {
            return plan.run(&self.kernels(), args).map_err(|(i, m)| {
                let step = &self.steps[i];
                error(step.location, format!("{}: {m}", step.name))
            });
        }
        let Some(shapes) = self.plans.borrow_mut().wants_trace(&args) else {
            return self.run_steps(ctx, weights, args, None);
        };
        let mut trace = vec![Traced::Other; self.slots];
        let fallbacks = self.fallbacks.get();
        let results = self.run_steps(ctx, weights, args, Some(&mut trace))?;
        // A run whose shapes a kernel did not cover is not one to plan from.
        if self.fallbacks.get() == fallbacks {
            let plan = CallPlan::new(&self.plan_steps(), &self.params, &self.constants, &trace);
            self.plans.borrow_mut().add(plan);
        } else {
            self.plans.borrow_mut().decline(shapes);
        }
        Ok(results)
    }

    /// How many calls so far ran through a call plan ([`super::plan`]) rather than step
    /// by step.
    pub fn planned_runs(&self) -> usize {
        self.plans.borrow().runs
    }

    /// The steps as a call plan reads them.
    fn plan_steps(&self) -> Vec<PlanStep<'_>> {
        self.steps
            .iter()
            .map(|step| PlanStep {
                kind: match &step.action {
                    Action::Kernel(chosen) => StepKind::Kernel {
                        kernel: &chosen.kernel,
                        entry: chosen.index.map(|i| self.code.entry(i)),
                        prologue: chosen.prologue.map(|i| self.code.entry(i)),
                    },
                    Action::Columns { width, parts } => StepKind::Columns {
                        width: *width,
                        parts,
                    },
                    Action::Return => StepKind::Return,
                    Action::Reference => StepKind::Other,
                },
                inputs: &step.inputs,
                outputs: &step.outputs,
            })
            .collect()
    }

    /// Runs the steps one by one on `args` (checked), recording what each slot holds in
    /// `trace` when given.
    fn run_steps(
        &self,
        ctx: &Context,
        weights: &dyn WeightStore,
        args: Vec<Value>,
        mut trace: Option<&mut Vec<Traced>>,
    ) -> Result<Vec<Value>, InterpError> {
        let mut env: Vec<Option<Rc<Value>>> = vec![None; self.slots];
        for (&s, arg) in self.params.iter().zip(args) {
            if let Some(trace) = trace.as_deref_mut() {
                trace[s] = traced(&arg);
            }
            env[s] = Some(Rc::new(arg));
        }
        for (s, v) in &self.constants {
            if let Some(trace) = trace.as_deref_mut() {
                trace[*s] = traced(v);
            }
            env[*s] = Some(Rc::clone(v));
        }
        for step in &self.steps {
            let mut inputs = Operands::new();
            for &s in &step.inputs {
                let value = env[s].as_ref().ok_or_else(|| {
                    error(
                        step.location,
                        format!("{}: an operand has no value", step.name),
                    )
                })?;
                inputs.push(Rc::clone(value));
            }
            // Released before the step runs, so that it can update a value in place (the
            // operands still hold them).
            for &s in &step.release {
                env[s] = None;
            }
            let mut outputs = match &step.action {
                Action::Return => {
                    let mut results = Vec::with_capacity(inputs.len());
                    for (j, value) in inputs.into_iter().enumerate() {
                        let value = Rc::unwrap_or_clone(value);
                        self.signature
                            .check_result(ctx, j, &value)
                            .map_err(|m| error(step.location, m))?;
                        results.push(value);
                    }
                    return Ok(results);
                }
                Action::Kernel(chosen) => {
                    let kernels = self.kernels();
                    match calls::call(&kernels, chosen, &step.dims, &mut inputs) {
                        Ok(outputs) => outputs,
                        // Shapes the kernel does not cover (a broadcast found at run time).
                        Err(calls::Unsupported) => {
                            self.fallbacks.set(self.fallbacks.get() + 1);
                            reference(ctx, step.op, std::mem::take(&mut inputs), weights)
                        }
                    }
                }
                Action::Columns { width, parts } => match inputs[..] {
                    [ref x] => x
                        .tensor()
                        .and_then(|x| calls::columns(&self.kernels(), x, *width, parts)),
                    _ => Err("a slice takes one operand".into()),
                },
                Action::Reference => reference(ctx, step.op, std::mem::take(&mut inputs), weights),
            }
            .map_err(|m| error(step.location, format!("{}: {m}", step.name)))?;
            // Operands whose last use this was give their memory back.
            for value in inputs {
                self.pool.recycle(value);
            }
            for (j, reshape) in &step.relabel {
                let result = outputs.get_mut(*j).ok_or_else(|| {
                    error(step.location, format!("{}: no result #{j}", step.name))
                })?;
                calls::relabel(&self.pool, result, &reshape.dims)
                    .map_err(|m| error(reshape.location, format!("llm.reshape: {m}")))?;
            }
            for (&s, v) in step.outputs.iter().zip(outputs) {
                if let Some(trace) = trace.as_deref_mut() {
                    trace[s] = traced(&v);
                }
                env[s] = Some(v);
            }
        }
        Err(error(
            None,
            format!("@{} ended without llm.return", self.signature.name),
        ))
    }
}
