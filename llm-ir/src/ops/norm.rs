//! Row reductions: `llm.rms_norm`, `llm.layer_norm` and `llm.softmax`.

use pliron::result::Result;

use crate::{
    llm_op,
    ops::{OpCheck, Operands},
    params::{ParamKind, ParamSpec},
};

fn check_eps(c: &OpCheck) -> Result<()> {
    match c.float("eps") {
        Some(eps) if eps <= 0.0 => c.err(format!("parameter `eps` must be positive, found {eps}")),
        _ => Ok(()),
    }
}

/// Checks a normalisation over the last dim with per-feature operands `1..`.
fn check_norm(c: &OpCheck) -> Result<()> {
    check_eps(c)?;
    let (x, out) = (c.tensor(0)?, c.result_tensor(0)?);
    c.float_dtype(&c.operand_desc(0), x.dtype())?;
    c.min_rank(&c.operand_desc(0), x.shape(), 1)?;
    let d = x.shape()[x.rank() - 1];
    for i in 1..c.num_operands() {
        let w = c.tensor(i)?;
        c.same_dtype(&c.operand_desc(i), w.dtype(), x.dtype())?;
        c.shape(&c.operand_desc(i), w.shape(), &[d])?;
    }
    c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
    c.shape(&c.result_desc(0), out.shape(), x.shape())
}

llm_op! {
    /// RMS normalisation over the last dim: `x / sqrt(mean(x^2) + eps) * weight`.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: float `llm.tensor` `[..., D]`; `weight`: `[D]` |
    /// | results | `result`: same type as `input` |
    /// | `eps` (float, required) | added to the mean square, > 0 |
    ///
    /// Example:
    /// ```text
    /// v2 = llm.rms_norm v0, v1 {eps = 1e-5} : llm.tensor <1x64xf32>
    /// ```
    RmsNormOp = "llm.rms_norm",
    operands: Operands::Fixed(&["input", "weight"]),
    results: ["result"],
    params: [ParamSpec::required("eps", ParamKind::Float)],
    interfaces: [],
    check: check_norm,
    eval: crate::interp::eval::norm::rms_norm,
}

llm_op! {
    /// Layer normalisation over the last dim: `(x - mean) / sqrt(var + eps) * weight + bias`.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: float `llm.tensor` `[..., D]`; `weight`, `bias`: `[D]` |
    /// | results | `result`: same type as `input` |
    /// | `eps` (float, required) | added to the variance, > 0 |
    ///
    /// Example:
    /// ```text
    /// v3 = llm.layer_norm v0, v1, v2 {eps = 1e-5} : llm.tensor <1x64xf32>
    /// ```
    LayerNormOp = "llm.layer_norm",
    operands: Operands::Fixed(&["input", "weight", "bias"]),
    results: ["result"],
    params: [ParamSpec::required("eps", ParamKind::Float)],
    interfaces: [],
    check: check_norm,
    eval: crate::interp::eval::norm::layer_norm,
}

llm_op! {
    /// Softmax along `axis`: `exp(x - max) / sum(exp(x - max))`.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: float `llm.tensor` |
    /// | results | `result`: same type as `input` |
    /// | `axis` (int, default -1) | the reduced dim; negative counts from the end |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.softmax v0 {axis = -1} : llm.tensor <4x16xf32>
    /// ```
    SoftmaxOp = "llm.softmax",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [ParamSpec::optional("axis", ParamKind::Int)],
    interfaces: [],
    check: |c| {
        let (x, out) = (c.tensor(0)?, c.result_tensor(0)?);
        c.float_dtype(&c.operand_desc(0), x.dtype())?;
        c.axis("axis", -1, x.rank())?;
        c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
        c.shape(&c.result_desc(0), out.shape(), x.shape())
    },
    eval: crate::interp::eval::norm::softmax,
}
