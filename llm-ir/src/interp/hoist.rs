//! The values of weight-derived ops, evaluated once ([`Interpreter::hoist`]): the
//! [`Hoisted`] values of one function and the [`HoistMemo`] the functions of one model
//! share.
//!
//! The rows of weight matrices that an `llm.concat` stacks (the fused q/k/v or gate/up
//! projections a `fuse` pass makes, f32 or 16-bit: a third of a Llama model's weights; any
//! f32 or GGUF-format matrices) are kept as their parts until something reads the whole
//! ([`Hoisted::value`]): a backend that repacks the matrix anyway reads the parts
//! ([`Hoisted::stacked_rows`]), and then the stacked copy is never made.
//!
//! [`Interpreter::hoist`]: super::Interpreter::hoist

use std::{cell::OnceCell, collections::HashMap, rc::Rc};

use pliron::{
    context::{Context, Ptr},
    operation::Operation,
    printable::Printable,
    r#type::Typed,
    value::Value as IrValue,
};

use super::{Data, QTensor, Tensor, Value, eval::shape::stack_quantized, quant::storage_bytes};
use crate::{dtype::DType, ops::OpCheck, types::QuantFormat};

/// A hoisted result: its value, or the matrices whose rows it stacks.
#[derive(Clone)]
pub(super) enum Entry {
    /// Evaluated.
    Ready(Rc<Value>),
    /// Rows of f32 matrices, stacked on first use.
    Stacked(Rc<Stacked>),
}

/// The rows of several f32 matrices of one width, and their stacking once made.
pub(super) struct Stacked {
    parts: Vec<Rc<Value>>,
    whole: OnceCell<Rc<Value>>,
}

impl Entry {
    /// The value (stacking the rows on first use).
    pub(super) fn value(&self) -> &Rc<Value> {
        match self {
            Entry::Ready(v) => v,
            Entry::Stacked(s) => s.whole.get_or_init(|| Rc::new(stack_rows(&s.parts))),
        }
    }

    /// The result of `op` on `inputs` kept lazy, if it stacks rows of matrices: an
    /// `llm.concat` along dim 0 of rank-2 f32 tensors, or of quantized tensors of one
    /// GGUF format (whose rows are whole blocks), of one width (what [`stack_rows`] then
    /// copies without a check that could fail).
    pub(super) fn lazy(ctx: &Context, op: Ptr<Operation>, inputs: &[Rc<Value>]) -> Option<Entry> {
        let first = stackable_rows(inputs.first()?)?;
        if Operation::get_opid(op, ctx).to_string() != "llm.concat" {
            return None;
        }
        let check = OpCheck::for_eval(ctx, op);
        // Dim 0 of a rank-2 tensor (the default), into an f32 or quantized result.
        let result = match first.0 {
            None => check
                .result_tensor(0)
                .is_ok_and(|t| t.dtype() == DType::F32),
            Some(format) => check
                .result_quantized(0)
                .is_ok_and(|t| t.format() == format),
        };
        let stacks = matches!(check.int("axis"), None | Some(0) | Some(-2))
            && result
            && inputs.len() > 1
            && inputs.iter().all(|v| stackable_rows(v) == Some(first));
        stacks.then(|| {
            Entry::Stacked(Rc::new(Stacked {
                parts: inputs.to_vec(),
                whole: OnceCell::new(),
            }))
        })
    }
}

/// The kind of `v`'s rows (`None`: f32; else the quantized format) and their width, when
/// `v` is a matrix whose rows [`stack_rows`] stacks: f32, or of a GGUF format (rows of
/// whole blocks) holding its bytes.
fn stackable_rows(v: &Value) -> Option<(Option<&QuantFormat>, usize)> {
    match v {
        Value::Tensor(Tensor {
            shape,
            dtype: DType::F32,
            data: Data::Float(d),
        }) if shape.len() == 2 && d.len() == shape[0] * shape[1] => Some((None, shape[1])),
        Value::Quantized(q)
            if q.shape.len() == 2
                && q.format.gguf_block_bytes().is_some()
                && q.bytes.len() == storage_bytes(&q.format, &q.shape) =>
        {
            Some((Some(&q.format), q.shape[1]))
        }
        _ => None,
    }
}

/// The rows of `parts` (f32 matrices, or quantized ones of one format, of one width,
/// checked by [`Entry::lazy`]) stacked.
fn stack_rows(parts: &[Rc<Value>]) -> Value {
    let quantized: Vec<&QTensor> = parts.iter().filter_map(|v| v.quantized().ok()).collect();
    if let Some(first) = quantized.first() {
        return Value::Quantized(stack_quantized(&first.format, &quantized));
    }
    let (mut rows, mut width, mut floats) = (0, 0, Vec::new());
    for part in parts {
        if let Value::Tensor(t) = &**part
            && let Data::Float(values) = &t.data
        {
            (rows, width) = (rows + t.shape[0], t.shape[1]);
            floats.extend_from_slice(values);
        }
    }
    Value::Tensor(Tensor {
        shape: vec![rows, width],
        dtype: DType::F32,
        data: Data::Float(floats),
    })
}

/// Weight-derived values evaluated by [`Interpreter::hoist_shared`], keyed by the op's
/// name, attributes and result types and the addresses of its operand values (the memo
/// keeps the operands alive, so the addresses stay theirs).
///
/// [`Interpreter::hoist_shared`]: super::Interpreter::hoist_shared
#[derive(Default)]
pub struct HoistMemo(pub(super) HoistTable);

/// The memo's table: key to (operands, results).
type HoistTable = HashMap<(String, Vec<usize>), (Vec<Rc<Value>>, Vec<Entry>)>;

impl HoistMemo {
    /// The key of `op` on `inputs`.
    pub(super) fn key(
        ctx: &Context,
        op: Ptr<Operation>,
        inputs: &[Rc<Value>],
    ) -> (String, Vec<usize>) {
        let o = op.deref(ctx);
        let types: Vec<String> = o
            .results()
            .map(|r| r.get_type(ctx).disp(ctx).to_string())
            .collect();
        let text = format!(
            "{} {} {}",
            Operation::get_opid(op, ctx),
            o.attributes.disp(ctx),
            types.join(",")
        );
        (
            text,
            inputs.iter().map(|v| Rc::as_ptr(v) as usize).collect(),
        )
    }
}

/// The weight-derived ops of a function, evaluated once by [`Interpreter::hoist`]: each of
/// their results, with its value where an op that is not hoisted uses it.
///
/// [`Interpreter::hoist`]: super::Interpreter::hoist
#[derive(Default)]
pub struct Hoisted(pub(super) HashMap<IrValue, Option<Entry>>);

impl Hoisted {
    /// Whether `value` is the result of a hoisted op.
    pub fn covers(&self, value: IrValue) -> bool {
        self.0.contains_key(&value)
    }

    /// Whether hoisted result `value` is used by an op that is not hoisted (and so has a
    /// value), without making that value.
    pub fn holds(&self, value: IrValue) -> bool {
        self.0.get(&value).is_some_and(Option::is_some)
    }

    /// The value of hoisted result `value`, where an op that is not hoisted uses it (rows
    /// kept as their parts are stacked now, once).
    pub fn value(&self, value: IrValue) -> Option<&Rc<Value>> {
        self.0.get(&value)?.as_ref().map(Entry::value)
    }

    /// The matrices (f32, or quantized of one GGUF format; of one width) whose rows
    /// hoisted result `value` stacks, when it is kept as its parts: what a backend
    /// repacking the matrix reads instead of the whole.
    pub fn stacked_rows(&self, value: IrValue) -> Option<&[Rc<Value>]> {
        match self.0.get(&value)?.as_ref()? {
            Entry::Stacked(s) => Some(&s.parts),
            Entry::Ready(_) => None,
        }
    }
}
