//! Shape and type manipulation: reshape, transpose, slice, concat, cast, argmax.

use pliron::result::Result;

use crate::{
    llm_op,
    ops::{OpCheck, Operands, show_shape},
    params::{ParamKind, ParamSpec},
    syntax::Dim,
    types::num_elements,
};

llm_op! {
    /// Reinterprets a tensor with a new shape of the same element count (row-major order).
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: `llm.tensor` |
    /// | results | `result`: `llm.tensor` of the same element type and count |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.reshape v0 : llm.tensor <1x4x16xf32>
    /// ```
    ReshapeOp = "llm.reshape",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [],
    interfaces: [],
    check: |c| {
        let (x, out) = (c.tensor(0)?, c.result_tensor(0)?);
        c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
        if let (Some(a), Some(b)) = (num_elements(x.shape()), num_elements(out.shape()))
            && a != b
        {
            return c.err(format!(
                "{} has {b} elements but the input {} has {a}",
                c.result_desc(0),
                show_shape(x.shape())
            ));
        }
        Ok(())
    },
    eval: crate::interp::eval::shape::reshape,
}

llm_op! {
    /// Permutes dims: `result.shape[i] = input.shape[perm[i]]`.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: `llm.tensor` |
    /// | results | `result`: the permuted `llm.tensor` |
    /// | `perm` (list of ints, required) | a permutation of `0..rank` |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.transpose v0 {perm = [1, 0, 2]} : llm.tensor <4x5x16xf32>
    /// ```
    TransposeOp = "llm.transpose",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [ParamSpec::required("perm", ParamKind::IntList)],
    interfaces: [],
    check: |c| {
        let (x, out) = (c.tensor(0)?, c.result_tensor(0)?);
        let perm = c.param("perm").and_then(|p| p.as_int_list()).unwrap_or_default();
        let mut sorted = perm.clone();
        sorted.sort_unstable();
        if sorted != (0..x.rank() as i64).collect::<Vec<_>>() {
            return c.err(format!(
                "parameter `perm` = {perm:?} is not a permutation of 0..{} (the input rank)",
                x.rank()
            ));
        }
        let want: Vec<_> = perm.iter().map(|&p| x.shape()[p as usize]).collect();
        c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
        c.shape(&c.result_desc(0), out.shape(), &want)
    },
    eval: crate::interp::eval::shape::transpose,
}

llm_op! {
    /// Takes a strided box: `result[i...] = input[starts + i * steps ...]`.
    ///
    /// The result type gives the box size. `steps` defaults to all ones. Static bounds are
    /// checked: the last element read must lie inside the input.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: `llm.tensor` |
    /// | results | `result`: `llm.tensor` of the same rank and element type |
    /// | `starts` (list of ints, required) | first index per dim, >= 0 |
    /// | `steps` (list of ints, optional) | stride per dim, >= 1 |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.slice v0 {starts = [0, 16]} : llm.tensor <4x16xf32>
    /// ```
    SliceOp = "llm.slice",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [
        ParamSpec::required("starts", ParamKind::IntList),
        ParamSpec::optional("steps", ParamKind::IntList),
    ],
    interfaces: [],
    check: check_slice,
    eval: crate::interp::eval::shape::slice,
}

fn check_slice(c: &OpCheck) -> Result<()> {
    let (x, out) = (c.tensor(0)?, c.result_tensor(0)?);
    let rank = x.rank();
    let starts = c
        .param("starts")
        .and_then(|p| p.as_int_list())
        .unwrap_or_default();
    let steps = match c.param("steps").and_then(|p| p.as_int_list()) {
        Some(s) => s,
        None => vec![1; rank],
    };
    for (name, list) in [("starts", &starts), ("steps", &steps)] {
        if list.len() != rank {
            return c.err(format!(
                "parameter `{name}` has {} entries but the input has rank {rank}",
                list.len()
            ));
        }
    }
    c.same_dtype(&c.result_desc(0), out.dtype(), x.dtype())?;
    c.rank(&c.result_desc(0), out.shape(), rank)?;
    for i in 0..rank {
        if starts[i] < 0 {
            return c.err(format!(
                "parameter `starts` must be non-negative, found {} in dim {i}",
                starts[i]
            ));
        }
        if steps[i] < 1 {
            return c.err(format!(
                "parameter `steps` must be positive, found {} in dim {i}",
                steps[i]
            ));
        }
        if let (Some(size), Some(n)) = (out.shape()[i], x.shape()[i])
            && size > 0
        {
            let last = starts[i] as u128 + (size as u128 - 1) * steps[i] as u128;
            if last >= n as u128 {
                return c.err(format!(
                    "dim {i} reads index {last}, past the input's size {n}"
                ));
            }
        }
    }
    Ok(())
}

llm_op! {
    /// Concatenates tensors along `axis`; other dims must match. Quantized tensors of one
    /// GGUF format (the block formats, `f16`, `bf16`: each row whole blocks) stack along
    /// dim 0, their bytes one after another.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `inputs`: one or more `llm.tensor` of one element type and rank, or `llm.quantized_tensor` of one GGUF format and rank |
    /// | results | `result`: `llm.tensor` (`llm.quantized_tensor` of that format) whose `axis` dim is the sum |
    /// | `axis` (int, required) | the joined dim (0 for quantized tensors); negative counts from the end |
    ///
    /// Example:
    /// ```text
    /// v2 = llm.concat v0, v1 {axis = 0} : llm.tensor <8x16xf32>
    /// ```
    ConcatOp = "llm.concat",
    operands: Operands::Variadic("inputs", 1),
    results: ["result"],
    params: [ParamSpec::required("axis", ParamKind::Int)],
    interfaces: [],
    check: check_concat,
    eval: crate::interp::eval::shape::concat,
}

fn check_concat(c: &OpCheck) -> Result<()> {
    if c.is_quantized(0) {
        return check_quantized_concat(c);
    }
    let first = c.tensor(0)?;
    let axis = c.axis("axis", 0, first.rank())?;
    let mut want = first.shape().to_vec();
    for i in 1..c.num_operands() {
        let t = c.tensor(i)?;
        c.same_dtype(&c.operand_desc(i), t.dtype(), first.dtype())?;
        joined_shape(c, i, (&mut want, t.shape()), (first.shape(), axis))?;
    }
    let out = c.result_tensor(0)?;
    c.same_dtype(&c.result_desc(0), out.dtype(), first.dtype())?;
    c.shape(&c.result_desc(0), out.shape(), &want)
}

/// Adds operand `i`'s `shape` (of the first operand's rank, every dim but `axis` equal to
/// the first's) into the concatenation's shape `want`.
fn joined_shape(
    c: &OpCheck,
    i: usize,
    (want, shape): (&mut [Dim], &[Dim]),
    (first, axis): (&[Dim], usize),
) -> Result<()> {
    c.rank(&c.operand_desc(i), shape, first.len())?;
    for (d, (total, &dim)) in want.iter_mut().zip(shape).enumerate() {
        if d == axis {
            *total = total.zip(dim).map(|(a, b)| a + b);
        } else {
            c.dim(&format!("dim {d} of {}", c.operand_desc(i)), dim, first[d])?;
        }
    }
    Ok(())
}

/// `llm.concat` of quantized tensors: one GGUF format (whose rows are whole blocks, so
/// the bytes of tensors stacked along dim 0 are the parts' bytes in turn), dim 0.
fn check_quantized_concat(c: &OpCheck) -> Result<()> {
    let first = c.quantized(0)?;
    let format = first.format();
    if format.gguf_block_bytes().is_none() {
        return c.err(format!(
            "{} is {}, whose bytes do not stack: quantized tensors concatenate in a GGUF format (a block format, f16 or bf16)",
            c.operand_desc(0),
            format.name()
        ));
    }
    if c.axis("axis", 0, first.shape().len())? != 0 {
        return c.err("quantized tensors concatenate along dim 0 only");
    }
    let mut want = first.shape().to_vec();
    for i in 1..c.num_operands() {
        let q = c.quantized(i)?;
        if q.format() != format {
            return c.err(format!(
                "{} is {}, not {} as {} is",
                c.operand_desc(i),
                q.format().name(),
                format.name(),
                c.operand_desc(0)
            ));
        }
        joined_shape(c, i, (&mut want, q.shape()), (first.shape(), 0))?;
    }
    let out = c.result_quantized(0)?;
    if out.format() != format {
        return c.err(format!(
            "{} is {}, not {} as its operands are",
            c.result_desc(0),
            out.format().name(),
            format.name()
        ));
    }
    c.shape(&c.result_desc(0), out.shape(), &want)
}

llm_op! {
    /// Converts elements to the result's element type (float rounding to nearest even;
    /// float to int truncates toward zero and saturates).
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: `llm.tensor` |
    /// | results | `result`: `llm.tensor` of the same shape |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.cast v0 : llm.tensor <4x16xf16>
    /// ```
    CastOp = "llm.cast",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [],
    interfaces: [],
    check: |c| {
        let (x, out) = (c.tensor(0)?, c.result_tensor(0)?);
        c.shape(&c.result_desc(0), out.shape(), x.shape())
    },
    eval: crate::interp::eval::shape::cast,
}

llm_op! {
    /// Index of the largest element along `axis` (the first one on ties); the axis is removed.
    ///
    /// | | |
    /// |---|---|
    /// | operands | `input`: float `llm.tensor` |
    /// | results | `result`: i32/i64 `llm.tensor` without the `axis` dim |
    /// | `axis` (int, default -1) | the reduced dim |
    ///
    /// Example:
    /// ```text
    /// v1 = llm.argmax v0 {axis = -1} : llm.tensor <1xi32>
    /// ```
    ArgmaxOp = "llm.argmax",
    operands: Operands::Fixed(&["input"]),
    results: ["result"],
    params: [ParamSpec::optional("axis", ParamKind::Int)],
    interfaces: [],
    check: |c| {
        let (x, out) = (c.tensor(0)?, c.result_tensor(0)?);
        c.float_dtype(&c.operand_desc(0), x.dtype())?;
        let axis = c.axis("axis", -1, x.rank())?;
        c.index_dtype(&c.result_desc(0), out.dtype())?;
        let mut want = x.shape().to_vec();
        want.remove(axis);
        c.shape(&c.result_desc(0), out.shape(), &want)
    },
    eval: crate::interp::eval::shape::argmax,
}
