//! Elementwise ops: binary arithmetic with NumPy broadcasting, and unary float functions.
//!
//! All of them map each element independently, which is what lets fusion merge chains of
//! them into one kernel with a scalar body.

use pliron::result::Result;

use crate::{
    llm_op,
    ops::{OpCheck, Operands, show_shape},
    syntax::Dim,
};

/// The NumPy broadcast of two shapes, or `None` if they do not broadcast.
///
/// Shapes align at their last dim; a pair of dims broadcasts when equal or when one is 1.
/// A dynamic dim paired with 1 stays dynamic; paired with `n > 1` it is taken to be `n`.
pub fn broadcast_shapes(a: &[Dim], b: &[Dim]) -> Option<Vec<Dim>> {
    let rank = a.len().max(b.len());
    let at = |s: &[Dim], i: usize| {
        if i + s.len() >= rank {
            s[i + s.len() - rank]
        } else {
            Some(1)
        }
    };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (Some(1), d) | (d, Some(1)) => Some(d),
            (Some(x), Some(y)) if x == y => Some(Some(x)),
            (Some(_), Some(_)) => None,
            (None, None) => Some(None),
            (None, Some(n)) | (Some(n), None) => Some(Some(n)),
        })
        .collect()
}

fn check_binary(c: &OpCheck) -> Result<()> {
    let (lhs, rhs, out) = (c.tensor(0)?, c.tensor(1)?, c.result_tensor(0)?);
    c.same_dtype(&c.operand_desc(1), rhs.dtype(), lhs.dtype())?;
    c.same_dtype(&c.result_desc(0), out.dtype(), lhs.dtype())?;
    let Some(shape) = broadcast_shapes(lhs.shape(), rhs.shape()) else {
        return c.err(format!(
            "operand shapes {} and {} do not broadcast",
            show_shape(lhs.shape()),
            show_shape(rhs.shape())
        ));
    };
    c.shape(&c.result_desc(0), out.shape(), &shape)
}

fn check_unary(c: &OpCheck) -> Result<()> {
    let (x, out) = (c.tensor(0)?, c.result_tensor(0)?);
    c.float_dtype(&c.operand_desc(0), x.dtype())?;
    c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
    c.shape(&c.result_desc(0), out.shape(), x.shape())
}

macro_rules! binary_op {
    ($name:ident, $text:literal, $math:literal, $eval:ident) => {
        llm_op! {
            #[doc = concat!("Elementwise ", $math, " with NumPy broadcasting.")]
            ///
            /// Both operands and the result have the same element type; the result has the
            /// broadcast shape of the operands.
            ///
            /// | | |
            /// |---|---|
            /// | operands | `lhs`, `rhs`: `llm.tensor` |
            /// | results | `result`: `llm.tensor` of the broadcast shape |
            ///
            /// Example:
            /// ```text
            #[doc = concat!("v2 = ", $text, " v0, v1 : llm.tensor <4x8xf32>")]
            /// ```
            $name = $text,
            operands: Operands::Fixed(&["lhs", "rhs"]),
            results: ["result"],
            params: [],
            interfaces: [],
            check: check_binary,
            eval: crate::interp::eval::elementwise::$eval,
        }
    };
}

binary_op!(AddOp, "llm.add", "`lhs + rhs`", add);
binary_op!(SubOp, "llm.sub", "`lhs - rhs`", sub);
binary_op!(MulOp, "llm.mul", "`lhs * rhs`", mul);
binary_op!(
    DivOp,
    "llm.div",
    "`lhs / rhs` (integers truncate toward zero)",
    div
);
binary_op!(
    MaximumOp,
    "llm.maximum",
    "`max(lhs, rhs)` (a NaN operand gives NaN; `+0` is above `-0`)",
    maximum
);
binary_op!(
    MinimumOp,
    "llm.minimum",
    "`min(lhs, rhs)` (a NaN operand gives NaN; `-0` is below `+0`)",
    minimum
);

macro_rules! unary_op {
    ($name:ident, $text:literal, $math:literal, $eval:ident) => {
        llm_op! {
            #[doc = concat!("Elementwise ", $math, " on a float tensor.")]
            ///
            /// | | |
            /// |---|---|
            /// | operands | `input`: float `llm.tensor` |
            /// | results | `result`: same type as `input` |
            ///
            /// Example:
            /// ```text
            #[doc = concat!("v1 = ", $text, " v0 : llm.tensor <4x8xf32>")]
            /// ```
            $name = $text,
            operands: Operands::Fixed(&["input"]),
            results: ["result"],
            params: [],
            interfaces: [],
            check: check_unary,
            eval: crate::interp::eval::elementwise::$eval,
        }
    };
}

unary_op!(ExpOp, "llm.exp", "`exp(x)`", exp);
unary_op!(NegOp, "llm.neg", "`-x`", neg);
unary_op!(SqrtOp, "llm.sqrt", "`sqrt(x)`", sqrt);
unary_op!(RsqrtOp, "llm.rsqrt", "`1 / sqrt(x)`", rsqrt);
unary_op!(TanhOp, "llm.tanh", "`tanh(x)`", tanh);
unary_op!(SigmoidOp, "llm.sigmoid", "`1 / (1 + exp(-x))`", sigmoid);
unary_op!(SiluOp, "llm.silu", "SiLU, `x * sigmoid(x)`", silu);
unary_op!(ErfOp, "llm.erf", "the error function, `erf(x)`", erf);
unary_op!(
    ReluOp,
    "llm.relu",
    "ReLU, `max(x, 0)` (NaN stays NaN)",
    relu
);
unary_op!(
    GeluOp,
    "llm.gelu",
    "GELU (tanh approximation), `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`",
    gelu
);
