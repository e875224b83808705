//! Contractions and gathers: `llm.matmul` and `llm.embedding`.

use pliron::result::Result;

use crate::{
    llm_op,
    ops::{OpCheck, Operands, show_shape},
    params::{ParamKind, ParamSpec},
    types::dims_compatible,
};

llm_op! {
    /// Batched matrix product `lhs @ rhs` (or `lhs @ rhs^T` with `transpose_rhs`).
    ///
    /// `lhs` is `[..., M, K]`. `rhs` is `[..., K, N]`, or `[..., N, K]` when `transpose_rhs` is
    /// true (the layout of `nn.Linear` weights and of a tied embedding used as classifier).
    /// `rhs` either has the same batch dims as `lhs` or is a plain matrix shared by every batch.
    /// The result is `[..., M, N]`; all three share one float element type.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `lhs`, `rhs`: float `llm.tensor` of rank >= 2 |
    /// | results | `result`: `llm.tensor` `[..., M, N]` |
    /// | `transpose_rhs` (bool, default false) | contract with the last dim of `rhs` |
    ///
    /// Example:
    /// ```text
    /// v2 = llm.matmul v0, v1 {transpose_rhs = true} : llm.tensor <1x512xf32>
    /// ```
    MatmulOp = "llm.matmul",
    operands: Operands::Fixed(&["lhs", "rhs"]),
    results: ["result"],
    params: [ParamSpec::optional("transpose_rhs", ParamKind::Bool)],
    interfaces: [],
    check: check_matmul,
    eval: crate::interp::eval::linalg::matmul,
}

fn check_matmul(c: &OpCheck) -> Result<()> {
    let (lhs, rhs, out) = (c.tensor(0)?, c.tensor(1)?, c.result_tensor(0)?);
    c.float_dtype(&c.operand_desc(0), lhs.dtype())?;
    c.same_dtype(&c.operand_desc(1), rhs.dtype(), lhs.dtype())?;
    c.same_dtype(&c.result_desc(0), out.dtype(), lhs.dtype())?;
    c.min_rank(&c.operand_desc(0), lhs.shape(), 2)?;
    c.min_rank(&c.operand_desc(1), rhs.shape(), 2)?;
    let (l, r) = (lhs.shape(), rhs.shape());
    let (lb, rb) = (&l[..l.len() - 2], &r[..r.len() - 2]);
    if !rb.is_empty() && !crate::types::shapes_compatible(lb, rb) {
        return c.err(format!(
            "batch dims of {} {} must equal those of {} {} or be absent",
            c.operand_desc(1),
            show_shape(rb),
            c.operand_desc(0),
            show_shape(lb)
        ));
    }
    let (m, k) = (l[l.len() - 2], l[l.len() - 1]);
    let transposed = c.flag("transpose_rhs", false);
    let (rk, n) = if transposed {
        (r[r.len() - 1], r[r.len() - 2])
    } else {
        (r[r.len() - 2], r[r.len() - 1])
    };
    if !dims_compatible(k, rk) {
        return c.err(format!(
            "contraction dims differ: {} has K = {}, {} has K = {}",
            c.operand_desc(0),
            super::show_dim(k),
            c.operand_desc(1),
            super::show_dim(rk)
        ));
    }
    let mut want = lb.to_vec();
    want.extend([m, n]);
    c.shape(&c.result_desc(0), out.shape(), &want)
}

llm_op! {
    /// Gathers rows of an embedding table: `result[i..., :] = table[ids[i...], :]`.
    ///
    /// `table` is `[vocab, dim]`, plain or quantized (rows are dequantized when gathered);
    /// `ids` holds i32 or i64 token ids of any shape `S`; the result is `S ++ [dim]`.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `table`: `llm.tensor` or `llm.quantized_tensor` `[V, D]`; `ids`: i32/i64 `llm.tensor` |
    /// | results | `result`: float `llm.tensor` `[..., D]` |
    ///
    /// Example:
    /// ```text
    /// v2 = llm.embedding v0, v1 : llm.tensor <1x64xf32>
    /// ```
    EmbeddingOp = "llm.embedding",
    operands: Operands::Fixed(&["table", "ids"]),
    results: ["result"],
    params: [],
    interfaces: [],
    check: check_embedding,
    eval: crate::interp::eval::linalg::embedding,
}

fn check_embedding(c: &OpCheck) -> Result<()> {
    let table_shape = if c.is_quantized(0) {
        c.quantized(0)?.shape().to_vec()
    } else {
        let t = c.tensor(0)?;
        c.float_dtype(&c.operand_desc(0), t.dtype())?;
        t.shape().to_vec()
    };
    c.rank(&c.operand_desc(0), &table_shape, 2)?;
    let (ids, out) = (c.tensor(1)?, c.result_tensor(0)?);
    c.index_dtype(&c.operand_desc(1), ids.dtype())?;
    c.float_dtype(&c.result_desc(0), out.dtype())?;
    let mut want = ids.shape().to_vec();
    want.push(table_shape[1]);
    c.shape(&c.result_desc(0), out.shape(), &want)
}
