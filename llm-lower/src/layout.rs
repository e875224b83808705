//! A function laid out for a backend, shared by both: its signature (checked against the
//! arguments of every call), its values numbered as slots, the ops that run each call, and
//! per op the slots it reads and writes, after residual adds have been fused away.

use std::{collections::HashMap, rc::Rc};

use llm_ir::{
    interp::{self, Hoisted, InterpError, Value},
    syntax::Dim,
    types::TensorType,
};
use pliron::{
    builtin::{
        op_interfaces::{SingleBlockRegionInterface, SymbolOpInterface},
        ops::{FuncOp, ModuleOp},
        type_interfaces::FunctionTypeInterface,
        types::FunctionType,
    },
    context::{Context, Ptr},
    linked_list::ContainsLinkedList,
    operation::Operation,
    r#type::{TypeHandle, Typed, TypedHandle},
    value::Value as IrValue,
};

use crate::selection::{Selection, live_ops};

/// The functions of `module`, in order.
pub fn functions(ctx: &Context, module: ModuleOp) -> Vec<FuncOp> {
    module
        .get_body(ctx, 0)
        .deref(ctx)
        .iter(ctx)
        .filter_map(|op| Operation::get_op::<FuncOp>(op, ctx))
        .collect()
}

/// A function's name and type.
pub struct Signature {
    /// The symbol name.
    pub name: String,
    /// Argument types.
    pub args: Vec<TypeHandle>,
    /// Result types.
    pub results: Vec<TypeHandle>,
}

impl Signature {
    /// The signature of `func`.
    pub fn of(ctx: &Context, func: FuncOp) -> Result<Signature, String> {
        let name = func.get_symbol_name(ctx).to_string();
        let fty = TypedHandle::<FunctionType>::from_handle(func.get_type(ctx), ctx)
            .map_err(|_| format!("@{name} has no function type"))?;
        let f = fty.deref(ctx);
        Ok(Signature {
            args: f.arg_types(),
            results: f.res_types(),
            name,
        })
    }

    /// Checks `args` against the argument types, before anything runs.
    pub fn check_args(&self, ctx: &Context, args: &[Value]) -> Result<(), InterpError> {
        let name = &self.name;
        let error = |message: String| InterpError {
            location: None,
            message,
        };
        if args.len() != self.args.len() {
            return Err(error(format!(
                "@{name} takes {} argument(s), {} given",
                self.args.len(),
                args.len()
            )));
        }
        for (i, (arg, ty)) in args.iter().zip(&self.args).enumerate() {
            interp::check_value(ctx, arg, *ty)
                .map_err(|m| error(format!("argument #{i} of @{name}: {m}")))?;
        }
        Ok(())
    }

    /// Checks result `j` against its declared type.
    pub fn check_result(&self, ctx: &Context, j: usize, value: &Value) -> Result<(), String> {
        let ty = self
            .results
            .get(j)
            .ok_or_else(|| format!("@{} returns no result #{j}", self.name))?;
        interp::check_value(ctx, value, *ty)
            .map_err(|m| format!("result #{j} of @{}: {m}", self.name))
    }
}

/// One op that runs each call, with its value slots.
pub struct OpSlots {
    /// Its index in [`Layout::live`] (and in the selection made for them).
    pub index: usize,
    /// The op.
    pub op: Ptr<Operation>,
    /// The op's name.
    pub name: String,
    /// Slots of the operands (a fused residual's operand last).
    pub inputs: Vec<usize>,
    /// Slots of the results (a fused residual's sum instead of the product).
    pub outputs: Vec<usize>,
    /// `LINE:COL` of the op.
    pub location: Option<(u32, u32)>,
    /// The declared dims of its first result, when that is a tensor.
    pub dims: Vec<Dim>,
    /// Whether it is the `llm.return`.
    pub is_return: bool,
}

/// A function's values as slots, and the ops that run each call.
pub struct Layout {
    /// The signature.
    pub signature: Signature,
    /// Slots of the arguments.
    pub params: Vec<usize>,
    /// Every op of the entry block.
    pub all: Vec<Ptr<Operation>>,
    /// The ops that run each call: all but the weight-derived ones of `hoisted`.
    pub live: Vec<Ptr<Operation>>,
    slot_of: HashMap<IrValue, usize>,
}

impl Layout {
    /// The layout of `func`, whose weight-derived values `hoisted` holds.
    pub fn new(ctx: &Context, func: FuncOp, hoisted: &Hoisted) -> Result<Layout, String> {
        let signature = Signature::of(ctx, func)?;
        let entry = func.get_entry_block(ctx);
        let mut layout = Layout {
            signature,
            params: Vec::new(),
            all: entry.deref(ctx).iter(ctx).collect(),
            live: Vec::new(),
            slot_of: HashMap::new(),
        };
        layout.params = entry
            .deref(ctx)
            .arguments()
            .map(|a| layout.slot(a))
            .collect();
        layout.live = live_ops(ctx, &layout.all, |r| hoisted.covers(r));
        Ok(layout)
    }

    /// The slot of `v` (numbered on first use).
    pub fn slot(&mut self, v: IrValue) -> usize {
        let next = self.slot_of.len();
        *self.slot_of.entry(v).or_insert(next)
    }

    /// Slots numbered so far: the first free one.
    pub fn slots(&self) -> usize {
        self.slot_of.len()
    }

    /// Ops evaluated once at load instead of each call.
    pub fn hoisted_ops(&self) -> usize {
        self.all.len() - self.live.len()
    }

    /// The slots and values of the results `hoisted` holds.
    pub fn constants(&mut self, ctx: &Context, hoisted: &Hoisted) -> Vec<(usize, Rc<Value>)> {
        self.constant_slots(ctx, hoisted)
            .into_iter()
            .filter_map(|(s, r)| Some((s, Rc::clone(hoisted.value(r)?))))
            .collect()
    }

    /// The slots of the results `hoisted` holds a value for, with the results (whose
    /// values [`Hoisted::value`] makes, or whose parts [`Hoisted::stacked_rows`] gives).
    pub fn constant_slots(&mut self, ctx: &Context, hoisted: &Hoisted) -> Vec<(usize, IrValue)> {
        let mut out = Vec::new();
        for op in self.all.clone() {
            for r in op.deref(ctx).results() {
                if hoisted.holds(r) {
                    out.push((self.slot(r), r));
                }
            }
        }
        out
    }

    /// The live ops that are not fused into another's kernel, in order, with their slots
    /// (a contraction with a residual epilogue reads the residual last and writes the
    /// sum).
    pub fn ops(&mut self, ctx: &Context, selection: &Selection) -> Vec<OpSlots> {
        let mut out = Vec::with_capacity(self.live.len());
        for (index, op) in self.live.clone().into_iter().enumerate() {
            if selection.fused_into[index].is_some() {
                continue;
            }
            let o = op.deref(ctx);
            let name = Operation::get_opid(op, ctx).to_string();
            let mut inputs: Vec<usize> = o.operands().map(|v| self.slot(v)).collect();
            let mut outputs: Vec<usize> = o.results().map(|v| self.slot(v)).collect();
            if let Some((residual, sum)) = selection.epilogues[index] {
                inputs.push(self.slot(residual));
                outputs = vec![self.slot(sum)];
            }
            let dims = o
                .results()
                .next()
                .and_then(|r| TypedHandle::<TensorType>::from_handle(r.get_type(ctx), ctx).ok())
                .map(|t| t.deref(ctx).shape().to_vec())
                .unwrap_or_default();
            out.push(OpSlots {
                index,
                op,
                is_return: name == "llm.return",
                name,
                inputs,
                outputs,
                location: interp::locate(o.loc()),
                dims,
            });
        }
        out
    }
}
