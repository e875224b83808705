//! Core ops: weights, constants and the function terminator.

use pliron::{
    builtin::{
        op_interfaces::{IsTerminatorInterface, SymbolOpInterface},
        ops::FuncOp,
        type_interfaces::FunctionTypeInterface,
        types::FunctionType,
    },
    operation::Operation,
    r#type::TypedHandle,
};

use crate::{
    llm_op,
    ops::{OpCheck, Operands},
    params::{ParamKind, ParamSpec, ParamValue},
    types::{QuantizedTensorType, num_elements},
};

llm_op! {
    /// Names a tensor of the external weight store.
    ///
    /// Weights are not IR constants: the op names a tensor that the runtime resolves in its
    /// weight store (usually a memory-mapped model file), so no bulk data lives in the IR.
    ///
    /// | | |
    /// |---|---|
    /// | results | `weight`: a static-shaped `llm.tensor` or `llm.quantized_tensor` |
    /// | `name` (string, required) | the tensor's name in the weight store |
    ///
    /// Example:
    /// ```text
    /// v0 = llm.weight {name = "layers.0.attention.wq"} : llm.tensor <64x64xf32>
    /// ```
    WeightOp = "llm.weight",
    operands: Operands::Fixed(&[]),
    results: ["weight"],
    params: [ParamSpec::required("name", ParamKind::Str)],
    interfaces: [],
    check: |c| {
        if matches!(c.param("name"), Some(ParamValue::Str(ref n)) if n.is_empty()) {
            return c.err("parameter `name` must not be empty");
        }
        let ty = c.result_type(0);
        let shape = if ty.deref(c.ctx).is::<QuantizedTensorType>() {
            c.result_quantized(0)?.shape().to_vec()
        } else {
            c.result_tensor(0)?.shape().to_vec()
        };
        if shape.iter().any(Option::is_none) {
            return c.err(format!("{} must have a static shape, found {}", c.result_desc(0), c.show(ty)));
        }
        Ok(())
    },
    eval: crate::interp::eval::base::weight,
}

llm_op! {
    /// A small constant tensor given inline.
    ///
    /// `value` is one number (every element takes it) or a list with one number per element in
    /// row-major order. Integer element types need integer values. Keep constants small:
    /// model weights belong in the weight store (`llm.weight`).
    ///
    /// | | |
    /// |---|---|
    /// | results | `value`: a static-shaped `llm.tensor` |
    /// | `value` (number or list of numbers, required) | the elements |
    ///
    /// Example:
    /// ```text
    /// v0 = llm.constant {value = [1.0, 2.0, 3.0]} : llm.tensor <3xf32>
    /// ```
    ConstantOp = "llm.constant",
    operands: Operands::Fixed(&[]),
    results: ["value"],
    params: [ParamSpec::required("value", ParamKind::Numbers)],
    interfaces: [],
    check: |c| {
        let t = c.result_tensor(0)?;
        let Some(count) = num_elements(t.shape()) else {
            return c.err(format!("{} must have a static shape, found {}", c.result_desc(0), c.show(c.result_type(0))));
        };
        let values = match c.param("value") {
            Some(ParamValue::List(items)) => items,
            Some(v) => vec![v],
            None => vec![],
        };
        if values.len() != 1 && values.len() as u64 != count {
            return c.err(format!(
                "parameter `value` must have 1 or {count} elements for shape {}, found {}",
                super::show_shape(t.shape()),
                values.len()
            ));
        }
        if !t.dtype().is_float() {
            let (min, max) = match t.dtype() {
                crate::dtype::DType::I8 => (i64::from(i8::MIN), i64::from(i8::MAX)),
                crate::dtype::DType::I32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
                _ => (i64::MIN, i64::MAX),
            };
            for v in &values {
                match v {
                    ParamValue::Int(i) if (min..=max).contains(i) => {}
                    ParamValue::Int(i) => {
                        return c.err(format!("parameter `value` holds {i}, out of range for element type {}", t.dtype()));
                    }
                    _ => {
                        return c.err(format!("parameter `value` must hold integers for element type {}", t.dtype()));
                    }
                }
            }
        }
        Ok(())
    },
    eval: crate::interp::eval::base::constant,
}

llm_op! {
    /// Returns values from a `builtin.func`; the terminator of every function body.
    ///
    /// The operands must match the function's result types.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `values`: any number of values |
    ///
    /// Example:
    /// ```text
    /// llm.return v3, v4
    /// ```
    ReturnOp = "llm.return",
    operands: Operands::Variadic("values", 0),
    results: [],
    params: [],
    interfaces: [IsTerminatorInterface],
    check: check_return,
    eval: crate::interp::eval::base::ret,
}

fn check_return(c: &OpCheck) -> pliron::result::Result<()> {
    let Some(parent) = c.op.deref(c.ctx).get_parent_op(c.ctx) else {
        return Ok(());
    };
    let Some(func) = Operation::get_op::<FuncOp>(parent, c.ctx) else {
        return Ok(());
    };
    let Ok(fty) = TypedHandle::<FunctionType>::from_handle(func.get_type(c.ctx), c.ctx) else {
        return Ok(());
    };
    let results = fty.deref(c.ctx).res_types();
    if results.len() != c.num_operands() {
        return c.err(format!(
            "returns {} value(s), but the function `{}` declares {} result(s)",
            c.num_operands(),
            func.get_symbol_name(c.ctx),
            results.len()
        ));
    }
    for (i, want) in results.into_iter().enumerate() {
        let found = c.operand_type(i);
        if found != want {
            return c.err(format!(
                "{} must have the function's result type {}, found {}",
                c.operand_desc(i),
                c.show(want),
                c.show(found)
            ));
        }
    }
    Ok(())
}
