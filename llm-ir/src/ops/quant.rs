//! Quantization ops: `llm.quantize`, `llm.dequantize` and `llm.quantized_matmul`.
//!
//! The storage format is part of the `llm.quantized_tensor` type, so these ops carry no
//! parameters: the result or operand type says exactly how values are laid out.

use pliron::result::Result;

use crate::{
    llm_op,
    ops::{OpCheck, Operands},
    types::dims_compatible,
};

llm_op! {
    /// Quantizes a float tensor into the format of the result type.
    ///
    /// Rounding follows each format's definition (llama.cpp's reference quantizers for the
    /// GGUF formats), so the bytes equal what llama.cpp produces.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: float `llm.tensor` |
    /// | results | `result`: `llm.quantized_tensor` of the same shape |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.quantize v0 : llm.quantized_tensor <64x64, q8_0>
    /// ```
    QuantizeOp = "llm.quantize",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [],
    interfaces: [],
    check: |c| {
        let (x, q) = (c.tensor(0)?, c.result_quantized(0)?);
        c.float_dtype(&c.operand_desc(0), x.dtype())?;
        c.shape(&c.result_desc(0), q.shape(), x.shape())
    },
    eval: crate::interp::eval::quant::quantize,
}

llm_op! {
    /// Expands a quantized tensor to floats of the result's element type.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: `llm.quantized_tensor` |
    /// | results | `result`: float `llm.tensor` of the same shape |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.dequantize v0 : llm.tensor <64x64xf32>
    /// ```
    DequantizeOp = "llm.dequantize",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [],
    interfaces: [],
    check: |c| {
        let (q, x) = (c.quantized(0)?, c.result_tensor(0)?);
        c.float_dtype(&c.result_desc(0), x.dtype())?;
        c.shape(&c.result_desc(0), x.shape(), q.shape())
    },
    eval: crate::interp::eval::quant::dequantize,
}

llm_op! {
    /// Matrix product with a quantized weight: `result = input @ weight^T`.
    ///
    /// `weight` is `[N, K]` (GGUF's layout: one row per output feature, blocks along `K`);
    /// `input` is `[..., K]` and the result `[..., N]` has `input`'s float element type. The
    /// meaning is `matmul(input, dequantize(weight), transpose_rhs = true)`; backends
    /// dequantize blocks in registers instead of materialising the weight.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: float `llm.tensor` `[..., K]`; `weight`: `llm.quantized_tensor` `[N, K]` |
    /// | results | `result`: `llm.tensor` `[..., N]` |
    ///
    /// Example:
    /// ```text
    /// v2 = llm.quantized_matmul v0, v1 : llm.tensor <1x128xf32>
    /// ```
    QuantizedMatmulOp = "llm.quantized_matmul",
    operands: Operands::Fixed(&["input", "weight"]),
    results: ["result"],
    params: [],
    interfaces: [],
    check: check_quantized_matmul,
    eval: crate::interp::eval::quant::quantized_matmul,
}

fn check_quantized_matmul(c: &OpCheck) -> Result<()> {
    let (x, w, out) = (c.tensor(0)?, c.quantized(1)?, c.result_tensor(0)?);
    c.float_dtype(&c.operand_desc(0), x.dtype())?;
    c.min_rank(&c.operand_desc(0), x.shape(), 1)?;
    c.rank(&c.operand_desc(1), w.shape(), 2)?;
    let k = x.shape()[x.rank() - 1];
    let (n, wk) = (w.shape()[0], w.shape()[1]);
    if !dims_compatible(k, wk) {
        return c.err(format!(
            "contraction dims differ: {} has K = {}, {} has K = {}",
            c.operand_desc(0),
            super::show_dim(k),
            c.operand_desc(1),
            super::show_dim(wk)
        ));
    }
    let mut want = x.shape()[..x.rank() - 1].to_vec();
    want.push(n);
    c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
    c.shape(&c.result_desc(0), out.shape(), &want)
}
