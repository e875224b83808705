//! Semantics of the elementwise ops.

use std::rc::Rc;

use super::{Eval, Outputs, one, strides};
use crate::interp::value::{Data, Tensor, Value};

/// The broadcast of two runtime shapes (NumPy rules).
pub fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let rank = a.len().max(b.len());
    let at = |s: &[usize], i: usize| {
        if i + s.len() >= rank {
            s[i + s.len() - rank]
        } else {
            1
        }
    };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            (x, y) => Err(format!(
                "shapes {a:?} and {b:?} do not broadcast (dim {i}: {x} vs {y})"
            )),
        })
        .collect()
}

/// For each element of `out`, the index of the element of `shape` it reads when broadcast.
pub fn broadcast_index(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let n: usize = out.iter().product();
    if shape == out {
        return (0..n).collect();
    }
    let offset = out.len() - shape.len();
    let src_strides = strides(shape);
    (0..n)
        .map(|flat| {
            let idx = super::unravel(flat, out);
            (0..shape.len())
                .map(|d| {
                    if shape[d] == 1 {
                        0
                    } else {
                        idx[d + offset] * src_strides[d]
                    }
                })
                .sum()
        })
        .collect()
}

fn binary(
    e: &Eval,
    inputs: Vec<Rc<Value>>,
    f: fn(f32, f32) -> f32,
    i: fn(i64, i64) -> Option<i64>,
) -> Outputs {
    let (a, b) = (inputs[0].tensor()?, inputs[1].tensor()?);
    let shape = broadcast(&a.shape, &b.shape)?;
    let (ia, ib) = (
        broadcast_index(&a.shape, &shape),
        broadcast_index(&b.shape, &shape),
    );
    let dtype = e.result_dtype(0)?;
    match (&a.data, &b.data) {
        (Data::Float(x), Data::Float(y)) => {
            let v = ia.iter().zip(&ib).map(|(&p, &q)| f(x[p], y[q])).collect();
            one(Tensor::from_f32(shape, dtype, v))
        }
        (Data::Int(x), Data::Int(y)) => {
            let v = ia
                .iter()
                .zip(&ib)
                .map(|(&p, &q)| i(x[p], y[q]).ok_or_else(|| "integer division by zero".to_string()))
                .collect::<Result<_, _>>()?;
            one(Tensor::from_i64(shape, dtype, v))
        }
        _ => Err("operands of different element kinds".into()),
    }
}

fn add_f32(x: f32, y: f32) -> f32 {
    x + y
}

fn sub_f32(x: f32, y: f32) -> f32 {
    x - y
}

fn mul_f32(x: f32, y: f32) -> f32 {
    x * y
}

fn div_f32(x: f32, y: f32) -> f32 {
    x / y
}

/// The larger of `x` and `y`: NaN where either is (as PyTorch's `maximum`), and `+0`
/// over `-0` (IEEE 754's `maximum`).
fn maximum_f32(x: f32, y: f32) -> f32 {
    if x.is_nan() || y.is_nan() {
        f32::NAN
    } else if x == y {
        // Equal values differ only in a zero's sign: the positive one.
        if x.is_sign_negative() { y } else { x }
    } else if x > y {
        x
    } else {
        y
    }
}

/// The smaller of `x` and `y`: NaN where either is, and `-0` under `+0`.
fn minimum_f32(x: f32, y: f32) -> f32 {
    if x.is_nan() || y.is_nan() {
        f32::NAN
    } else if x == y {
        if x.is_sign_negative() { x } else { y }
    } else if x < y {
        x
    } else {
        y
    }
}

fn neg_f32(x: f32) -> f32 {
    -x
}

fn rsqrt_f32(x: f32) -> f32 {
    1.0 / x.sqrt()
}

/// The logistic function.
pub fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SiLU as llama2.c computes it (`x * (1 / (1 + exp(-x)))`).
fn silu_f32(x: f32) -> f32 {
    x * sigmoid_f32(x)
}

/// GELU, tanh approximation.
fn gelu_f32(x: f32) -> f32 {
    let c = (2.0f32 / std::f32::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044_715 * x * x * x)).tanh())
}

/// The error function, `2 / sqrt(pi)` times the integral of `exp(-t^2)` from 0 to `x`
/// (`libm`'s `erff`, within an ulp or so of the exact value): with it exact GELU is
/// `0.5 * x * (1 + erf(x / sqrt(2)))`.
fn erf_f32(x: f32) -> f32 {
    libm::erff(x)
}

/// ReLU: 0 below 0, `x` from 0 on (a NaN stays NaN, as PyTorch's `relu` keeps it).
fn relu_f32(x: f32) -> f32 {
    if x < 0.0 { 0.0 } else { x }
}

/// A scalar unary function.
pub type UnaryFn = fn(f32) -> f32;

/// A scalar binary function.
pub type BinaryFn = fn(f32, f32) -> f32;

/// The scalar function of each unary elementwise op: one definition for the tensor
/// kernels and for fused scalar bodies.
pub const UNARY: &[(&str, UnaryFn)] = &[
    ("llm.exp", f32::exp),
    ("llm.neg", neg_f32),
    ("llm.sqrt", f32::sqrt),
    ("llm.rsqrt", rsqrt_f32),
    ("llm.tanh", f32::tanh),
    ("llm.sigmoid", sigmoid_f32),
    ("llm.silu", silu_f32),
    ("llm.gelu", gelu_f32),
    ("llm.erf", erf_f32),
    ("llm.relu", relu_f32),
];

/// The scalar float function of each binary elementwise op.
pub const BINARY: &[(&str, BinaryFn)] = &[
    ("llm.add", add_f32),
    ("llm.sub", sub_f32),
    ("llm.mul", mul_f32),
    ("llm.div", div_f32),
    ("llm.maximum", maximum_f32),
    ("llm.minimum", minimum_f32),
];

/// The scalar function of unary op `name`.
pub fn unary_fn(name: &str) -> Option<fn(f32) -> f32> {
    UNARY.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// The scalar function of binary op `name`.
pub fn binary_fn(name: &str) -> Option<fn(f32, f32) -> f32> {
    BINARY.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// `llm.add`.
pub fn add(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    binary(e, inputs, add_f32, |x, y| Some(x.wrapping_add(y)))
}

/// `llm.sub`.
pub fn sub(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    binary(e, inputs, sub_f32, |x, y| Some(x.wrapping_sub(y)))
}

/// `llm.mul`.
pub fn mul(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    binary(e, inputs, mul_f32, |x, y| Some(x.wrapping_mul(y)))
}

/// `llm.maximum`.
pub fn maximum(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    binary(e, inputs, maximum_f32, |x, y| Some(x.max(y)))
}

/// `llm.minimum`.
pub fn minimum(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    binary(e, inputs, minimum_f32, |x, y| Some(x.min(y)))
}

/// `llm.div` (integer division truncates toward zero).
pub fn div(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    binary(e, inputs, div_f32, |x, y| {
        if y == 0 {
            None
        } else {
            Some(x.wrapping_div(y))
        }
    })
}

fn unary(e: &Eval, inputs: Vec<Rc<Value>>, f: fn(f32) -> f32) -> Outputs {
    let x = inputs[0].tensor()?;
    let v = x.floats()?.iter().map(|&v| f(v)).collect();
    one(Tensor::from_f32(x.shape.clone(), e.result_dtype(0)?, v))
}

/// `llm.exp`.
pub fn exp(e: &Eval, i: Vec<Rc<Value>>) -> Outputs {
    unary(e, i, f32::exp)
}

/// `llm.neg`.
pub fn neg(e: &Eval, i: Vec<Rc<Value>>) -> Outputs {
    unary(e, i, neg_f32)
}

/// `llm.sqrt`.
pub fn sqrt(e: &Eval, i: Vec<Rc<Value>>) -> Outputs {
    unary(e, i, f32::sqrt)
}

/// `llm.rsqrt`.
pub fn rsqrt(e: &Eval, i: Vec<Rc<Value>>) -> Outputs {
    unary(e, i, rsqrt_f32)
}

/// `llm.tanh`.
pub fn tanh(e: &Eval, i: Vec<Rc<Value>>) -> Outputs {
    unary(e, i, f32::tanh)
}

/// `llm.sigmoid`.
pub fn sigmoid(e: &Eval, i: Vec<Rc<Value>>) -> Outputs {
    unary(e, i, sigmoid_f32)
}

/// `llm.silu`.
pub fn silu(e: &Eval, i: Vec<Rc<Value>>) -> Outputs {
    unary(e, i, silu_f32)
}

/// `llm.gelu` (tanh approximation).
pub fn gelu(e: &Eval, i: Vec<Rc<Value>>) -> Outputs {
    unary(e, i, gelu_f32)
}

/// `llm.erf`.
pub fn erf(e: &Eval, i: Vec<Rc<Value>>) -> Outputs {
    unary(e, i, erf_f32)
}

/// `llm.relu`.
pub fn relu(e: &Eval, i: Vec<Rc<Value>>) -> Outputs {
    unary(e, i, relu_f32)
}
