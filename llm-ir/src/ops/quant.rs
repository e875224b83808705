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
    /// `input` is `[..., K]` and the result is `[..., N]`. The meaning is
    /// `matmul(input, dequantize(weight), transpose_rhs = true)`; backends dequantize blocks
    /// in registers instead of materialising the weight.
    ///
    /// `input` is a float tensor (the result has its element type) or itself quantized
    /// (the result has any float element type), meaning `dequantize(input)` in its place:
    /// activations quantized to q8_0 by the `quantize-activations` pass let a backend
    /// multiply integer codes block by block.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: float `llm.tensor` or `llm.quantized_tensor` `[..., K]`; `weight`: `llm.quantized_tensor` `[N, K]` |
    /// | results | `result`: float `llm.tensor` `[..., N]` |
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
    let (w, out) = (c.quantized(1)?, c.result_tensor(0)?);
    // A quantized input stands for its dequantized values, of any float type.
    let (x_shape, x_dtype) = if c.is_quantized(0) {
        (c.quantized(0)?.shape().to_vec(), None)
    } else {
        let x = c.tensor(0)?;
        c.float_dtype(&c.operand_desc(0), x.dtype())?;
        (x.shape().to_vec(), Some(x.dtype()))
    };
    c.min_rank(&c.operand_desc(0), &x_shape, 1)?;
    c.rank(&c.operand_desc(1), w.shape(), 2)?;
    let k = x_shape[x_shape.len() - 1];
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
    let mut want = x_shape[..x_shape.len() - 1].to_vec();
    want.push(n);
    match x_dtype {
        Some(dtype) => c.same_dtype(&c.result_desc(0), out.dtype(), dtype)?,
        None => c.float_dtype(&c.result_desc(0), out.dtype())?,
    }
    c.shape(&c.result_desc(0), out.shape(), &want)
}
