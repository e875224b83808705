//! The reference interpreter: executable semantics for every op of the dialect.
//!
//! It is the oracle that every pass and backend is tested against, so it is written to be
//! obviously correct rather than fast: plain loops, `f32` arithmetic accumulated in the
//! natural order (the order llama2.c's `run.c` uses), f16/bf16 storage by rounding through
//! the `half` crate, and quantized formats implemented bit for bit ([`quant`]).
//!
//! Every op declares its evaluation function in [`llm_op!`](crate::llm_op), so an op without
//! semantics does not compile. The interpreter runs one `builtin.func` at a time on
//! [`Value`]s; weights come from a [`WeightStore`]. Values are reference counted and dropped
//! after their last use, so `llm.append_kv` updates a cache in place when nothing else
//! holds it (the dialect's linear cache model guarantees that in verified IR).
//! [`Interpreter::hoist`] evaluates a function's weight-derived ops once, so that repeated
//! calls ([`Interpreter::run_hoisted`]) do not recompute them.

pub mod eval;
pub mod fp4;
mod hoist;
pub mod iq1;
pub mod iq2;
pub mod iq3;
pub mod kv_values;
pub mod lattice;
pub mod quant;
pub mod ternary;
pub mod value;

use std::{collections::HashMap, rc::Rc};

use pliron::{
    builtin::{
        op_interfaces::SymbolOpInterface, ops::FuncOp, type_interfaces::FunctionTypeInterface,
        types::FunctionType,
    },
    context::{Context, Ptr},
    linked_list::ContainsLinkedList,
    location::Location,
    operation::Operation,
    printable::Printable,
    r#type::{TypeHandle, Typed, TypedHandle},
    value::Value as IrValue,
};

pub use eval::{Eval, EvalFn, WeightStore};
pub use kv_values::{KvBlocks, KvElement, KvValues};
pub use value::{Data, KvCache, QTensor, Resident, Sharded, Tensor, Value};

use hoist::Entry;
pub use hoist::{HoistMemo, Hoisted};

use crate::{
    ops::{LLM_OPS, OpCheck, ReturnOp},
    types::{PagedKvCacheType, QuantizedTensorType, ShardedTensorType, TensorType},
};

/// An error raised while executing IR, with the location of the op at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterpError {
    /// `LINE:COL` of the op, when known.
    pub location: Option<(u32, u32)>,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for InterpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.location {
            Some((line, col)) => write!(f, "{line}:{col}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for InterpError {}

fn error(message: impl Into<String>) -> InterpError {
    InterpError {
        location: None,
        message: message.into(),
    }
}

/// A weight store with no tensors.
pub struct NoWeights;

impl WeightStore for NoWeights {
    fn weight(&self, _name: &str) -> Option<Rc<Value>> {
        None
    }
}

/// Executes functions of a verified module.
pub struct Interpreter<'a> {
    ctx: &'a Context,
    weights: &'a dyn WeightStore,
    evals: HashMap<&'static str, EvalFn>,
}

impl<'a> Interpreter<'a> {
    /// An interpreter over `ctx` that resolves `llm.weight` in `weights`.
    pub fn new(ctx: &'a Context, weights: &'a dyn WeightStore) -> Self {
        let evals = LLM_OPS.iter().map(|d| (d.name, d.eval)).collect();
        Interpreter {
            ctx,
            weights,
            evals,
        }
    }

    /// Runs `func` on `args`, returning the values its `llm.return` returns.
    pub fn run(&self, func: FuncOp, args: Vec<Value>) -> Result<Vec<Value>, InterpError> {
        self.run_hoisted(func, args, &Hoisted::default())
    }

    /// Evaluates, once, every op of `func` that depends only on weights and constants (the
    /// weights themselves, and what passes derive from them, such as the concatenated q/k/v
    /// matrices of fused projections), keeping the values that the rest of the function
    /// uses. [`Interpreter::run_hoisted`] then skips those ops on every call.
    pub fn hoist(&self, func: FuncOp) -> Result<Hoisted, InterpError> {
        self.hoist_shared(func, &mut HoistMemo::default())
    }

    /// [`Interpreter::hoist`], reusing the values of ops that an earlier call with the same
    /// `memo` evaluated (same op, attributes, result types and operand values): the
    /// functions of one model then share what they derive from the same weights.
    pub fn hoist_shared(&self, func: FuncOp, memo: &mut HoistMemo) -> Result<Hoisted, InterpError> {
        let ctx = self.ctx;
        let ops: Vec<_> = func.get_entry_block(ctx).deref(ctx).iter(ctx).collect();
        let mut derived: HashMap<IrValue, Entry> = HashMap::new();
        let mut used_later = std::collections::HashSet::new();
        for &op in &ops {
            let operands: Vec<IrValue> = op.deref(ctx).operands().collect();
            if hoistable(ctx, op, |v| derived.contains_key(v)) {
                let inputs: Vec<Rc<Value>> = operands
                    .iter()
                    .map(|v| Rc::clone(derived[v].value()))
                    .collect();
                let key = HoistMemo::key(ctx, op, &inputs);
                let results: Vec<IrValue> = op.deref(ctx).results().collect();
                let values = match memo.0.get(&key) {
                    Some((_, values)) => values.clone(),
                    None => {
                        let values: Vec<Entry> = match Entry::lazy(ctx, op, &inputs) {
                            Some(stacked) => vec![stacked],
                            None => self
                                .eval_op(op, inputs.clone())?
                                .into_iter()
                                .map(|(_, v)| Entry::Ready(v))
                                .collect(),
                        };
                        memo.0.insert(key, (inputs, values.clone()));
                        values
                    }
                };
                derived.extend(results.into_iter().zip(values));
            } else {
                used_later.extend(operands.into_iter().filter(|v| derived.contains_key(v)));
            }
        }
        Ok(Hoisted(
            derived
                .into_iter()
                .map(|(v, value)| (v, used_later.contains(&v).then_some(value)))
                .collect(),
        ))
    }

    /// [`Interpreter::run`], taking the values of hoisted ops from `hoisted` (made by
    /// [`Interpreter::hoist`] for this function) instead of evaluating them again.
    pub fn run_hoisted(
        &self,
        func: FuncOp,
        args: Vec<Value>,
        hoisted: &Hoisted,
    ) -> Result<Vec<Value>, InterpError> {
        let ctx = self.ctx;
        let fty = TypedHandle::<FunctionType>::from_handle(func.get_type(ctx), ctx)
            .map_err(|_| error("the function has no function type"))?;
        let (arg_types, res_types) = {
            let f = fty.deref(ctx);
            (f.arg_types(), f.res_types())
        };
        let name = func.get_symbol_name(ctx);
        if args.len() != arg_types.len() {
            return Err(error(format!(
                "@{name} takes {} argument(s), {} given",
                arg_types.len(),
                args.len()
            )));
        }
        for (i, (arg, ty)) in args.iter().zip(&arg_types).enumerate() {
            check_value(ctx, arg, *ty)
                .map_err(|m| error(format!("argument #{i} of @{name}: {m}")))?;
        }
        let entry = func.get_entry_block(ctx);
        let params: Vec<IrValue> = entry.deref(ctx).arguments().collect();
        let ops: Vec<_> = entry.deref(ctx).iter(ctx).collect();
        let mut last_use: HashMap<IrValue, usize> = HashMap::new();
        for (i, op) in ops.iter().enumerate() {
            for v in op.deref(ctx).operands() {
                last_use.insert(v, i);
            }
        }
        let mut env: HashMap<IrValue, Rc<Value>> = params
            .into_iter()
            .zip(args.into_iter().map(Rc::new))
            .collect();
        for (i, &op) in ops.iter().enumerate() {
            let results: Vec<IrValue> = op.deref(ctx).results().collect();
            if !results.is_empty() && results.iter().all(|r| hoisted.0.contains_key(r)) {
                env.extend(
                    results
                        .iter()
                        .filter_map(|r| Some((*r, Rc::clone(hoisted.value(*r)?)))),
                );
                continue;
            }
            let operands: Vec<IrValue> = op.deref(ctx).operands().collect();
            let mut inputs = Vec::with_capacity(operands.len());
            for v in &operands {
                let value = env.get(v).ok_or_else(|| InterpError {
                    location: locate(op.deref(ctx).loc()),
                    message: format!("{}: an operand has no value", Operation::get_opid(op, ctx)),
                })?;
                inputs.push(Rc::clone(value));
            }
            for v in &operands {
                if last_use.get(v) == Some(&i) {
                    env.remove(v);
                }
            }
            if Operation::get_op::<ReturnOp>(op, ctx).is_some() {
                let at = locate(op.deref(ctx).loc());
                let mut results = Vec::with_capacity(inputs.len());
                for (j, (value, ty)) in inputs.into_iter().zip(&res_types).enumerate() {
                    let value = Rc::unwrap_or_clone(value);
                    check_value(ctx, &value, *ty).map_err(|m| InterpError {
                        location: at,
                        message: format!("result #{j} of @{name}: {m}"),
                    })?;
                    results.push(value);
                }
                return Ok(results);
            }
            env.extend(self.eval_op(op, inputs)?);
        }
        Err(error(format!("@{name} ended without llm.return")))
    }

    /// Evaluates one op on its operand values, checking each result against its type.
    fn eval_op(
        &self,
        op: Ptr<Operation>,
        inputs: Vec<Rc<Value>>,
    ) -> Result<Vec<(IrValue, Rc<Value>)>, InterpError> {
        let ctx = self.ctx;
        let at = locate(op.deref(ctx).loc());
        let fail = |message: String| InterpError {
            location: at,
            message,
        };
        let opid = Operation::get_opid(op, ctx).to_string();
        let eval_fn = self
            .evals
            .get(opid.as_str())
            .ok_or_else(|| fail(format!("{opid} has no reference semantics")))?;
        let check = OpCheck::for_eval(ctx, op);
        let eval = Eval {
            op: &check,
            weights: self.weights,
        };
        let outputs = eval_fn(&eval, inputs).map_err(|m| fail(format!("{opid}: {m}")))?;
        let results: Vec<IrValue> = op.deref(ctx).results().collect();
        if outputs.len() != results.len() {
            return Err(fail(format!(
                "{opid}: produced {} values for {} results",
                outputs.len(),
                results.len()
            )));
        }
        for (j, (res, out)) in results.iter().zip(&outputs).enumerate() {
            check_value(ctx, out, res.get_type(ctx))
                .map_err(|m| fail(format!("{opid}: result #{j}: {m}")))?;
        }
        Ok(results.into_iter().zip(outputs).collect())
    }
}

/// Whether hoisting evaluates `op` once, given which values are already weight-derived:
/// every op but `llm.return` whose operands all are (the weights and constants themselves
/// have none).
fn hoistable(ctx: &Context, op: Ptr<Operation>, derived: impl Fn(&IrValue) -> bool) -> bool {
    Operation::get_op::<ReturnOp>(op, ctx).is_none()
        && op.deref(ctx).operands().all(|v| derived(&v))
}

/// The results of `ops` (a block, in order) that [`Interpreter::hoist`] would evaluate
/// once: the values computed from weights and constants only.
pub fn weight_derived(ctx: &Context, ops: &[Ptr<Operation>]) -> std::collections::HashSet<IrValue> {
    let mut derived = std::collections::HashSet::new();
    for &op in ops {
        if hoistable(ctx, op, |v| derived.contains(v)) {
            derived.extend(op.deref(ctx).results());
        }
    }
    derived
}

/// `LINE:COL` of a source location, when it has one.
pub fn locate(loc: &Location) -> Option<(u32, u32)> {
    match loc {
        Location::SrcPos { pos, .. } => Some((pos.line as u32, pos.column as u32)),
        _ => None,
    }
}

/// `ty` as a `T`, if it is one. Checks first, because a failed
/// [`TypedHandle::from_handle`] builds an error (with a backtrace when `RUST_BACKTRACE` is
/// set), which cost a compiled decode step more than its kernels.
fn typed<T: pliron::r#type::Type>(ty: TypeHandle, ctx: &Context) -> Option<TypedHandle<T>> {
    if ty.deref(ctx).is::<T>() {
        TypedHandle::<T>::from_handle(ty, ctx).ok()
    } else {
        None
    }
}

/// Checks that a runtime value matches a declared type (static dims must agree).
pub fn check_value(ctx: &Context, value: &Value, ty: TypeHandle) -> Result<(), String> {
    let shape_ok = |dims: &[crate::syntax::Dim], shape: &[usize]| {
        dims.len() == shape.len()
            && dims
                .iter()
                .zip(shape)
                .all(|(d, &s)| d.is_none_or(|d| d as usize == s))
    };
    let shown = || ty.disp(ctx).to_string();
    let mismatch = |what: String| {
        Err(format!(
            "{what} does not match the declared type {}",
            shown()
        ))
    };
    if let Some(t) = typed::<TensorType>(ty, ctx) {
        let t = t.deref(ctx);
        let Value::Tensor(v) = value else {
            return mismatch(value.kind().to_string());
        };
        if v.dtype != t.dtype() || !shape_ok(t.shape(), &v.shape) {
            return mismatch(format!("a {} tensor of shape {:?}", v.dtype, v.shape));
        }
        return Ok(());
    }
    if let Some(t) = typed::<QuantizedTensorType>(ty, ctx) {
        let t = t.deref(ctx);
        let Value::Quantized(q) = value else {
            return mismatch(value.kind().to_string());
        };
        if q.format != *t.format() || !shape_ok(t.shape(), &q.shape) {
            return mismatch(format!(
                "a {} quantized tensor of shape {:?}",
                q.format.name(),
                q.shape
            ));
        }
        if q.bytes.len() != quant::storage_bytes(&q.format, &q.shape) {
            return Err(format!(
                "a quantized tensor of shape {:?} in {} needs {} bytes, found {}",
                q.shape,
                q.format.name(),
                quant::storage_bytes(&q.format, &q.shape),
                q.bytes.len()
            ));
        }
        return Ok(());
    }
    if let Some(t) = typed::<PagedKvCacheType>(ty, ctx) {
        let t = t.deref(ctx);
        let Value::Cache(c) = value else {
            return mismatch(value.kind().to_string());
        };
        let mut want = t.params();
        want.blocks = None;
        let mut found = c.params.clone();
        found.blocks = None;
        if want != found || t.blocks().is_some_and(|b| b as usize != c.blocks) {
            return mismatch(format!("a cache of {} blocks", c.blocks));
        }
        return Ok(());
    }
    if let Some(t) = typed::<ShardedTensorType>(ty, ctx) {
        let t = t.deref(ctx);
        let Value::Sharded(s) = value else {
            return mismatch(value.kind().to_string());
        };
        if !shape_ok(t.shape(), &s.shape)
            || s.mesh != t.mesh()
            || s.split != t.split()
            || s.partial != t.partial()
            || (!s.partial.is_empty() && s.reduction != t.reduction())
            || s.shards.iter().any(|sh| sh.dtype != t.dtype())
        {
            return mismatch(format!("a sharded tensor of shape {:?}", s.shape));
        }
        return Ok(());
    }
    Err(format!("values of type {} are not supported", shown()))
}

/// Evaluates one op on `inputs` (in operand order) with its reference semantics.
pub fn eval_op(
    ctx: &Context,
    op: Ptr<Operation>,
    inputs: Vec<Rc<Value>>,
    weights: &dyn WeightStore,
) -> Result<Vec<Rc<Value>>, String> {
    let name = Operation::get_opid(op, ctx).to_string();
    let descriptor = LLM_OPS
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| format!("{name} has no reference semantics"))?;
    let check = OpCheck::for_eval(ctx, op);
    (descriptor.eval)(
        &Eval {
            op: &check,
            weights,
        },
        inputs,
    )
}

/// Finds the function `name` among the top-level ops of `module`.
pub fn find_func(
    ctx: &Context,
    module: pliron::builtin::ops::ModuleOp,
    name: &str,
) -> Option<FuncOp> {
    use pliron::builtin::op_interfaces::SingleBlockRegionInterface;
    let body = module.get_body(ctx, 0);
    let ops: Vec<_> = body.deref(ctx).iter(ctx).collect();
    ops.into_iter()
        .filter_map(|op| Operation::get_op::<FuncOp>(op, ctx))
        .find(|f| f.get_symbol_name(ctx).to_string() == name)
}
