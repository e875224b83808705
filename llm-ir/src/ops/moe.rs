//! Mixture-of-experts routing: `llm.topk` chooses each token's experts and
//! `llm.expert_matmul` multiplies by the chosen experts' weights only.

use pliron::result::Result;

use crate::{
    llm_op,
    ops::{OpCheck, Operands, show_dim},
    params::{ParamKind, ParamSpec},
    syntax::Dim,
    types::dims_compatible,
};

llm_op! {
    /// The `k` largest elements along the last dim, largest first, and their indices.
    ///
    /// `input` is `[..., N]`; both results are `[..., k]`. Slot `r` holds what
    /// `llm.argmax` chooses among the elements not taken by slots `0..r`: the first of the
    /// largest, so ties go to the lower index and a NaN is taken only when it comes first
    /// among the elements left.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: float `llm.tensor` `[..., N]` |
    /// | results | `values`: `input`'s element type, `[..., k]`; `indices`: i32/i64 `llm.tensor` `[..., k]` |
    /// | `k` (int, required, at least 1) | how many elements each row keeps |
    ///
    /// Example:
    /// ```text
    /// v1, v2 = llm.topk v0 {k = 2} : llm.tensor <?x2xf32>, llm.tensor <?x2xi32>
    /// ```
    TopkOp = "llm.topk",
    operands: Operands::Fixed(&["input"]),
    results: ["values", "indices"],
    params: [ParamSpec::required("k", ParamKind::Int)],
    interfaces: [],
    check: check_topk,
    eval: crate::interp::eval::moe::topk,
}

fn check_topk(c: &OpCheck) -> Result<()> {
    let x = c.tensor(0)?;
    c.float_dtype(&c.operand_desc(0), x.dtype())?;
    c.min_rank(&c.operand_desc(0), x.shape(), 1)?;
    let k = c.int_at_least("k", 1)?.unwrap_or(1);
    let n = x.shape()[x.rank() - 1];
    if let Some(n) = n
        && k as u64 > n
    {
        return c.err(format!(
            "parameter `k` = {k} is more than the {n} elements of {}'s last dim",
            c.operand_desc(0)
        ));
    }
    let (values, indices) = (c.result_tensor(0)?, c.result_tensor(1)?);
    c.same_dtype(&c.result_desc(0), values.dtype(), x.dtype())?;
    c.index_dtype(&c.result_desc(1), indices.dtype())?;
    let mut want = x.shape().to_vec();
    *want.last_mut().expect("rank at least 1") = Some(k as u64);
    c.shape(&c.result_desc(0), values.shape(), &want)?;
    c.shape(&c.result_desc(1), indices.shape(), &want)
}

llm_op! {
    /// Each token's product with the weights of the experts chosen for it:
    /// `result[t, s, :] = input[t] @ weight[ids[t, s]]^T`.
    ///
    /// `ids` (i32/i64) is `[T, S]`: token `t`'s `S` chosen experts. `weight` is the experts'
    /// stacked `[N, K]` matrices, `[E, N, K]`, a float tensor or quantized (each expert's
    /// rows dequantized as `llm.quantized_matmul` reads them). `input` is `[T, K]`, one row
    /// a token that all its slots read, or `[T, S, K]`, a row for each slot (the input of
    /// an expert's second projection). The result is `[T, S, N]` of `input`'s element type.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: float `llm.tensor` `[T, K]` or `[T, S, K]`; `weight`: `llm.tensor` or `llm.quantized_tensor` `[E, N, K]`; `ids`: i32/i64 `llm.tensor` `[T, S]` |
    /// | results | `result`: float `llm.tensor` `[T, S, N]` |
    ///
    /// Example:
    /// ```text
    /// v3 = llm.expert_matmul v0, v1, v2 : llm.tensor <?x2x64xf32>
    /// ```
    ExpertMatmulOp = "llm.expert_matmul",
    operands: Operands::Fixed(&["input", "weight", "ids"]),
    results: ["result"],
    params: [],
    interfaces: [],
    check: check_expert_matmul,
    eval: crate::interp::eval::moe::expert_matmul,
}

fn check_expert_matmul(c: &OpCheck) -> Result<()> {
    let (x, ids, out) = (c.tensor(0)?, c.tensor(2)?, c.result_tensor(0)?);
    c.float_dtype(&c.operand_desc(0), x.dtype())?;
    let w_shape: Vec<Dim> = if c.is_quantized(1) {
        c.quantized(1)?.shape().to_vec()
    } else {
        let w = c.tensor(1)?;
        c.same_dtype(&c.operand_desc(1), w.dtype(), x.dtype())?;
        w.shape().to_vec()
    };
    c.rank(&c.operand_desc(1), &w_shape, 3)?;
    c.index_dtype(&c.operand_desc(2), ids.dtype())?;
    c.rank(&c.operand_desc(2), ids.shape(), 2)?;
    let (t, s) = (ids.shape()[0], ids.shape()[1]);
    let (n, k) = (w_shape[1], w_shape[2]);
    let want_x: Vec<Dim> = match x.rank() {
        2 => vec![t, k],
        3 => vec![t, s, k],
        rank => {
            return c.err(format!(
                "{} must have rank 2 or 3, found rank {rank}",
                c.operand_desc(0)
            ));
        }
    };
    if !dims_compatible(x.shape()[x.rank() - 1], k) {
        return c.err(format!(
            "contraction dims differ: {} has K = {}, {} has K = {}",
            c.operand_desc(0),
            show_dim(x.shape()[x.rank() - 1]),
            c.operand_desc(1),
            show_dim(k)
        ));
    }
    c.shape(&c.operand_desc(0), x.shape(), &want_x)?;
    c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
    c.shape(&c.result_desc(0), out.shape(), &[t, s, n])
}
