//! Safe entry points of the compiled kernels: each checks the run-time values against the
//! kernel's static shapes (and every index the kernel will follow) before it enters
//! generated code, which has no bounds checks; data movement runs here as memory copies.

#![allow(unsafe_code, reason = "calls into JIT-compiled kernels")]

use std::rc::Rc;

use smallvec::{SmallVec, smallvec};

use llm_ir::{
    dtype::DType,
    interp::{
        Data, KvCache, KvElement, KvValues, QTensor, Tensor, Value,
        eval::{
            attention::RopeAngles,
            fused::ScalarBody,
            kv::{append_rows, lookup},
            resolve_shape, resolve_shape_into,
            shape::{concat_tensors, permute, slice_layout, strided_view},
            shard::{
                HostMesh, MeshOps, all_gather_with, all_reduce_with, product_shape,
                reduce_scatter_with, shard_value, sharded_linear_with, unshard_value,
            },
        },
        quant::{dequantize_row, storage_bytes},
    },
    syntax::Dim,
    types::{QuantFormat, Reduction},
};

use super::{
    attention,
    experts::{expert_contraction, top_k},
    jit::CompiledKernels,
    pool::BufferPool,
    tables::{PagedRows, RopeTables},
    workers::Workers,
};
use crate::{
    kernel::{
        self, AttentionSource, Contraction, Kernel, MeshMove, Movement, PANEL_ROWS, WeightFormat,
        batched_matmul_dims, broadcast_layout, contiguous_attention_shape, panel_row,
        weight_panel_row, whole_rows,
    },
    selection::Chosen,
};

/// Multiply-adds below which a contraction runs on the calling thread only.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// The compiled code, threads and buffers kernels run with.
pub struct Kernels<'a> {
    /// The compiled functions.
    pub code: &'a CompiledKernels,
    /// Worker threads, if more than one.
    pub workers: Option<&'a Workers>,
    /// Buffers for kernel outputs.
    pub pool: &'a BufferPool,
    /// Rope tables of the current run.
    pub ropes: &'a RopeTables,
    /// Paged attention's row offsets of the current run.
    pub paged: &'a PagedRows,
}

/// The operands of a kernel call (held inline: no op takes more than eight).
pub type Operands = SmallVec<[Rc<Value>; 8]>;

/// The results of a kernel call (held inline: no op has more than two, and a merged
/// slice step rarely more than four).
pub type Results = SmallVec<[Rc<Value>; 4]>;

/// The run-time values are outside what the kernel handles (for example a broadcast that
/// only shows at run time); the operands are left as they were, for the reference
/// semantics.
pub struct Unsupported;

/// The outputs of a kernel, or an error about its inputs.
pub type Outputs = Result<Results, String>;

impl Kernels<'_> {
    /// `values` as a call's results, in pooled boxes.
    pub(super) fn results<const N: usize>(&self, values: [Value; N]) -> Outputs {
        Ok(values.into_iter().map(|v| self.pool.wrap(v)).collect())
    }

    /// `t` as a call's only result.
    fn tensor(&self, t: Tensor) -> Outputs {
        Ok(smallvec![self.pool.wrap_tensor(t)])
    }
}

/// Runs `chosen` on `inputs`; `dims` are the declared dims of the op's first result.
pub fn call(
    k: &Kernels,
    chosen: &Chosen,
    dims: &[Dim],
    inputs: &mut Operands,
) -> Result<Outputs, Unsupported> {
    let entry = chosen.index.map(|i| k.code.entry(i));
    Ok(match (&chosen.kernel, entry) {
        (Kernel::Contraction(c), Some(f)) => {
            let norm = chosen.prologue.map(|i| k.code.entry(i));
            contraction(k, c, f, norm, inputs).and_then(|t| k.tensor(t))
        }
        (Kernel::Elementwise(body), Some(f)) => match elementwise(k, body, f, inputs) {
            Some(out) => out.and_then(|t| k.tensor(t)),
            None => return Err(Unsupported),
        },
        (Kernel::RmsNorm { d, .. }, Some(f)) => {
            rms_norm(k, *d, f, inputs).and_then(|t| k.tensor(t))
        }
        (Kernel::Softmax { n, inner }, Some(f)) => {
            softmax(k, [*n, *inner], f, inputs).and_then(|t| k.tensor(t))
        }
        (Kernel::Argmax { n, inner, index }, Some(f)) => {
            argmax([*n, *inner], *index, dims, f, inputs).and_then(|t| k.tensor(t))
        }
        (Kernel::LayerNorm { d, .. }, Some(f)) => {
            layer_norm(k, *d, f, inputs).and_then(|t| k.tensor(t))
        }
        (Kernel::Rope { heads, d, .. }, Some(f)) => {
            rope(k, (&chosen.kernel, *heads, *d), f, inputs).and_then(|t| k.tensor(t))
        }
        (
            Kernel::Attention {
                heads,
                kv_heads,
                d,
                source,
                sinks,
                ..
            },
            Some(f),
        ) => attention(k, [*heads, *kv_heads, *d], (*source, *sinks), f, inputs),
        (Kernel::Broadcast(body), Some(f)) => match broadcast(k, body, f, inputs) {
            Some(out) => out.and_then(|t| k.tensor(t)),
            None => return Err(Unsupported),
        },
        (
            Kernel::Dequantize {
                weight,
                rows,
                k: cols,
            },
            Some(f),
        ) => dequantize(k, *weight, [*rows, *cols], f, inputs).and_then(|t| k.tensor(t)),
        (
            Kernel::Quantize {
                format,
                rows,
                k: cols,
            },
            Some(f),
        ) => quantize(*format, (*rows, *cols), f, inputs)
            .and_then(|q| k.results([Value::Quantized(q)])),
        (Kernel::Cast { from, to }, Some(f)) => {
            cast([*from, *to], f, inputs).and_then(|t| k.tensor(t))
        }
        (Kernel::TopK { n, k: kept, index }, _) => top_k(k, [*n, *kept], *index, inputs),
        (Kernel::ExpertContraction { expert, .. }, Some(f)) => {
            expert_contraction(k, expert, f, inputs).and_then(|t| k.tensor(t))
        }
        (Kernel::BatchedMatmul { transposed }, Some(f)) => {
            batched_matmul(k, *transposed, f, inputs).and_then(|t| k.tensor(t))
        }
        (Kernel::ShardedLinear { local, reduction }, Some(f)) => {
            let (x, w) = (inputs[0].sharded(), inputs[1].sharded());
            x.and_then(|x| {
                // Every device in turn, each over all the threads.
                let mut mesh = CpuMesh {
                    k,
                    code: f,
                    local: Some(local),
                };
                let y = sharded_linear_with(&mut mesh, x, w?, *reduction)?;
                k.results([Value::Sharded(y)])
            })
        }
        (Kernel::AllReduce { axes, .. }, Some(f)) => inputs[0].sharded().and_then(|x| {
            let mut mesh = CpuMesh {
                k,
                code: f,
                local: None,
            };
            let y = all_reduce_with(&mut mesh, x, axes)?;
            k.results([Value::Sharded(y)])
        }),
        (Kernel::ReduceScatter { axes, dim, .. }, Some(f)) => inputs[0].sharded().and_then(|x| {
            let mut mesh = CpuMesh {
                k,
                code: f,
                local: None,
            };
            let y = reduce_scatter_with(&mut mesh, x, *dim, axes)?;
            k.results([Value::Sharded(y)])
        }),
        (Kernel::Move(m), _) => movement(k, *m, dims, inputs),
        (Kernel::Transpose { perm }, _) => {
            inputs[0].tensor().and_then(|x| k.tensor(permute(x, perm)?))
        }
        (Kernel::Slice { starts, steps }, _) => inputs[0].tensor().and_then(|x| {
            let (shape, first, step) = slice_layout(&x.shape, starts, steps, dims)?;
            k.tensor(strided_view(x, first, shape, &step))
        }),
        (Kernel::Mesh(m), _) => mesh_move(m, inputs).and_then(|v| k.results([v])),
        (Kernel::KvAppend { layer, .. }, _) => append_kv(k, *layer, inputs),
        (Kernel::KvLookup { layer, .. }, _) => inputs[0].cache().and_then(|cache| {
            let [keys, values] = lookup(
                cache,
                *layer,
                inputs[1].tensor()?,
                inputs[2].tensor()?,
                DType::F32,
            )?;
            k.results([Value::Tensor(keys), Value::Tensor(values)])
        }),
        _ => Err("the kernel was not compiled".to_string()),
    })
}

/// Calls a contraction: `y[i, j] = dot(x[i], w[j])`, split over the workers by panels.
fn contraction(
    k: &Kernels,
    c: &Contraction,
    f: *const u8,
    norm: Option<*const u8>,
    inputs: &[Rc<Value>],
) -> Result<Tensor, String> {
    let x_shape = match &*inputs[0] {
        Value::Quantized(q) if c.q8_0_input => &q.shape,
        other => &other.tensor()?.shape,
    };
    if x_shape.last() != Some(&c.k) {
        return Err(format!("the input {x_shape:?} does not end in K = {}", c.k));
    }
    let normed;
    let (rows, w) = match norm {
        Some(norm) => {
            normed = rms_norm(k, c.k, norm, &inputs[..2])?;
            (Rows::of_floats(normed.floats()?, c.k), &inputs[2])
        }
        None => (Rows::of(c, &inputs[0])?, &inputs[1]),
    };
    let wbytes = weight_bytes(c, w)?;
    let mut shape = k.pool.shape(&x_shape[..x_shape.len() - 1]);
    shape.push(c.n);
    // The residual epilogue's operand comes last, shaped like the output.
    let residual = extra_operand(c.residual.then(|| inputs.last()), &shape, "residual")?;
    let out = run_contraction(k, c, f, rows, wbytes, residual);
    Ok(Tensor::from_f32(shape, DType::F32, out))
}

/// The rows of x a contraction reads: where they start and how many there are.
#[derive(Clone, Copy)]
pub(super) struct Rows {
    /// The first row's first byte.
    at: i64,
    /// The number of rows.
    count: usize,
}

impl Rows {
    /// `count` rows of q8_0 blocks at `bytes` (the caller checked that they hold them).
    pub(super) fn of_q8_0(bytes: &[u8], count: usize) -> Rows {
        Rows {
            at: bytes.as_ptr() as i64,
            count,
        }
    }

    /// Rows of `k` floats.
    pub(super) fn of_floats(xs: &[f32], k: usize) -> Rows {
        Rows {
            at: xs.as_ptr() as i64,
            count: xs.len() / k.max(1),
        }
    }

    /// The rows of `x`, floats or (for quantized activations) whole q8_0 rows of `c.k`.
    fn of(c: &Contraction, x: &Value) -> Result<Rows, String> {
        match x {
            Value::Quantized(q) if c.q8_0_input => {
                let expected = storage_bytes(&q.format, &q.shape);
                if q.format != QuantFormat::Q8_0 || q.bytes.len() != expected {
                    return Err(format!(
                        "the input ({}, {} bytes) is not a q8_0 tensor of {:?}",
                        q.format,
                        q.bytes.len(),
                        q.shape
                    ));
                }
                Ok(Rows {
                    at: q.bytes.as_ptr() as i64,
                    count: q.shape.iter().product::<usize>() / c.k.max(1),
                })
            }
            Value::Quantized(_) => Err("the input is quantized; the kernel takes floats".into()),
            other if c.q8_0_input => Err(format!(
                "the input is {}; the kernel takes q8_0 activations",
                other.kind()
            )),
            other => Ok(Rows::of_floats(other.tensor()?.floats()?, c.k)),
        }
    }
}

/// The floats of a kernel's optional operand (`Some` when the kernel takes it: a
/// residual, a mask), checked to have `shape`; `what` names it in errors.
fn extra_operand<'a>(
    operand: Option<Option<&'a Rc<Value>>>,
    shape: &[usize],
    what: &str,
) -> Result<Option<&'a [f32]>, String> {
    let Some(operand) = operand else {
        return Ok(None);
    };
    let t = operand
        .ok_or_else(|| format!("no {what} operand"))?
        .tensor()?;
    if t.shape != shape {
        return Err(format!(
            "the {what} has shape {:?}, expected {shape:?}",
            t.shape
        ));
    }
    Ok(Some(t.floats()?))
}

/// The bytes of a contraction's weight operand, checked to be an `n x k` matrix in the
/// contraction's format.
pub(super) fn weight_bytes<'a>(c: &Contraction, w: &'a Value) -> Result<&'a [u8], String> {
    stacked_weight_bytes(c, w, &[])
}

/// The bytes of a weight operand of `stack` dims followed by the `n x k` matrix of the
/// contraction `c` (each matrix's rows after the last's), checked to be in its format.
pub(super) fn stacked_weight_bytes<'a>(
    c: &Contraction,
    w: &'a Value,
    stack: &[usize],
) -> Result<&'a [u8], String> {
    let shape = [stack, &[c.n, c.k]].concat();
    let wbytes: &[u8] = match (c.weight, w) {
        (WeightFormat::F32 | WeightFormat::F32Panels, Value::Tensor(t)) => {
            return f32_weight_bytes(&shape, t);
        }
        (
            _,
            Value::Quantized(QTensor {
                shape: stored,
                bytes,
                format,
            }),
        ) if *stored == shape && c.weight.quant_format().as_ref() == Some(format) => bytes,
        (_, other) => {
            return Err(format!(
                "the weight ({}) is not {shape:?} in {}",
                other.kind(),
                c.weight.name()
            ));
        }
    };
    let matrices: usize = stack.iter().product();
    let expected = match c.weight.quant_format() {
        Some(format) => storage_bytes(&format, &[c.n, c.k]),
        None => c.n * c.weight.row_bytes(c.k),
    };
    if Some(wbytes.len()) != expected.checked_mul(matrices) {
        return Err(format!("the weight holds {} bytes", wbytes.len()));
    }
    Ok(wbytes)
}

/// The bytes of an f32 contraction weight, checked to have `shape`.
fn f32_weight_bytes<'a>(shape: &[usize], t: &'a Tensor) -> Result<&'a [u8], String> {
    if t.shape != shape {
        return Err(format!("the weight {:?} is not {shape:?}", t.shape));
    }
    Ok(as_bytes(t.floats()?))
}

/// Runs a compiled contraction over the rows of `xs` (a multiple of `k` floats) against
/// checked weight bytes, adding `residual` (as many rows of `n`) when the kernel has the
/// epilogue; the rows of `n` outputs, in a buffer from the pool.
fn run_contraction(
    k: &Kernels,
    c: &Contraction,
    f: *const u8,
    rows: Rows,
    wbytes: &[u8],
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = k.pool.for_overwrite(rows.count * c.n);
    contract_into(k, c, f, (rows, wbytes, residual), &mut out);
    out
}

/// Runs a compiled contraction over `rows` of x against checked weight bytes (adding the
/// residual, as many rows of `n`, when the kernel has the epilogue) into `out`, split over
/// the workers by panels when it is large enough.
///
/// # Panics
///
/// When `out` or the residual does not hold `rows.count * n` floats.
pub(super) fn contract_into(
    k: &Kernels,
    c: &Contraction,
    f: *const u8,
    (rows, wbytes, residual): (Rows, &[u8], Option<&[f32]>),
    out: &mut [f32],
) {
    let m = rows.count;
    assert!(out.len() == m * c.n && residual.is_none_or(|r| r.len() == out.len()));
    let rp = residual.map_or(0, |r| r.as_ptr() as i64);
    // SAFETY: a contraction's signature is seven i64 params.
    let f: extern "C" fn(i64, i64, i64, i64, i64, i64, i64) = unsafe { std::mem::transmute(f) };
    let (xp, wp, yp) = (rows.at, wbytes.as_ptr() as i64, out.as_mut_ptr() as i64);
    // The kernel reads m rows of x (k floats or k / 32 q8_0 blocks each) at xp, rows
    // j0..j1 of the weight at wp (and the residual's y-shaped rows at rp) and writes
    // y[i, j0..j1] for i < m at yp: all inside the buffers the callers checked.
    let run = |j0: usize, j1: usize| f(xp, wp, yp, m as i64, j0 as i64, j1 as i64, rp);
    match k.workers {
        Some(workers) if m * c.n * c.k >= PARALLEL_MIN_MACS && c.n >= 8 => {
            // Chunks of whole panels, one per thread.
            let chunk = c.n.div_ceil(workers.threads()).next_multiple_of(PANEL_ROWS);
            workers.run(c.n.div_ceil(chunk), &|i| {
                run(i * chunk, ((i + 1) * chunk).min(c.n));
            });
        }
        _ => run(0, c.n),
    }
}

/// The operands of a scalar body (as many as it takes, all float tensors of its element
/// type) and their data pointers; `None` otherwise.
fn float_operands<'a>(
    inputs: &'a [Rc<Value>],
    body: &ScalarBody,
) -> Option<(Vec<&'a Tensor>, Vec<i64>)> {
    let tensors: Vec<&Tensor> = inputs
        .iter()
        .map(|v| v.tensor().ok())
        .collect::<Option<_>>()?;
    let ptrs: Vec<i64> = tensors
        .iter()
        .filter(|t| t.dtype == body.dtype)
        .map(|t| t.floats().ok().map(|d| d.as_ptr() as i64))
        .collect::<Option<_>>()?;
    (tensors.len() == body.args && ptrs.len() == body.args).then_some((tensors, ptrs))
}

/// Calls an elementwise kernel; `None` unless every operand has the same shape.
fn elementwise(
    k: &Kernels,
    body: &ScalarBody,
    f: *const u8,
    inputs: &[Rc<Value>],
) -> Option<Result<Tensor, String>> {
    let (tensors, ptrs) = float_operands(inputs, body)?;
    let shape = &tensors.first()?.shape;
    if tensors.iter().any(|t| t.shape != *shape) {
        return None;
    }
    let mut out = k.pool.for_overwrite(tensors[0].len());
    // Every input holds as many floats as `out` (same shape).
    elementwise_into(f, &ptrs, &mut out);
    Some(Ok(body_result(body, k.pool.shape(shape), out)))
}

/// Runs a compiled elementwise body over the inputs at `ptrs` into `out`.
///
/// The caller guarantees that every pointer is to `out.len()` values of the body's
/// element type.
pub(super) fn elementwise_into(f: *const u8, ptrs: &[i64], out: &mut [f32]) {
    // SAFETY: an elementwise kernel's signature is (inputs, out, len).
    let f: extern "C" fn(i64, i64, i64) = unsafe { std::mem::transmute(f) };
    f(
        ptrs.as_ptr() as i64,
        out.as_mut_ptr() as i64,
        out.len() as i64,
    );
}

/// Two f32 tensors of one shape (checked by `reduce_parts`) combined by the compiled
/// [`Kernel::Fold`] `f` (two devices' partial values meeting in a collective: a sum,
/// maximum or minimum).
fn fold_tensors(k: &Kernels, f: *const u8, a: &Tensor, b: &Tensor) -> Result<Tensor, String> {
    let (x, y) = (a.floats()?, b.floats()?);
    let mut out = k.pool.for_overwrite(x.len());
    // SAFETY: a fold's signature is (a, b, out, len).
    let f: extern "C" fn(i64, i64, i64, i64) = unsafe { std::mem::transmute(f) };
    // Both inputs and `out` hold len floats (one shape).
    f(
        x.as_ptr() as i64,
        y.as_ptr() as i64,
        out.as_mut_ptr() as i64,
        x.len() as i64,
    );
    Ok(Tensor::from_f32(k.pool.shape(&a.shape), DType::F32, out))
}

/// A scalar body's result: its values, already rounded to the body's element type by the
/// kernel (not rounded again, so that a kernel that did not would be caught).
fn body_result(body: &ScalarBody, shape: Vec<usize>, values: Vec<f32>) -> Tensor {
    Tensor {
        shape,
        dtype: body.dtype,
        data: Data::Float(values),
    }
}

/// Calls a dequantization of a `rows x k` quantized tensor in `weight`'s format.
fn dequantize(
    k: &Kernels,
    weight: WeightFormat,
    [rows, cols]: [usize; 2],
    f: *const u8,
    inputs: &[Rc<Value>],
) -> Result<Tensor, String> {
    let Value::Quantized(q) = &*inputs[0] else {
        return Err(format!(
            "expected a quantized tensor, found {}",
            inputs[0].kind()
        ));
    };
    let expected = weight.quant_format();
    let len: usize = q.shape.iter().product();
    if expected.as_ref() != Some(&q.format)
        || q.shape.last() != Some(&cols)
        || len != rows * cols
        || q.bytes.len() != storage_bytes(&q.format, &q.shape)
    {
        return Err(format!(
            "the operand ({:?}, {}, {} bytes) is not {rows}x{cols} in {}",
            q.shape,
            q.format,
            q.bytes.len(),
            weight.name()
        ));
    }
    let mut out = k.pool.zeroed(len);
    // SAFETY: a dequantization's signature is (bytes, out).
    let f: extern "C" fn(i64, i64) = unsafe { std::mem::transmute(f) };
    // The bytes hold rows x cols values in the format (checked above), out as many floats.
    f(q.bytes.as_ptr() as i64, out.as_mut_ptr() as i64);
    Ok(Tensor::from_f32(q.shape.clone(), DType::F32, out))
}

/// Calls a quantization of `rows x k` floats into `format`'s blocks.
fn quantize(
    format: WeightFormat,
    (rows, cols): (Option<usize>, usize),
    f: *const u8,
    inputs: &[Rc<Value>],
) -> Result<QTensor, String> {
    let x = inputs[0].tensor()?;
    let xs = x.floats()?;
    if !whole_rows(rows, xs.len(), cols) || x.shape.last() != Some(&cols) {
        let rows = rows.map_or("whole".to_string(), |r| r.to_string());
        return Err(format!(
            "the operand {:?} is not {rows} rows of {cols}",
            x.shape
        ));
    }
    let qformat = format.quant_format().ok_or("not a quantized format")?;
    let mut bytes = vec![0u8; storage_bytes(&qformat, &x.shape)];
    quantize_into(f, xs, &mut bytes);
    Ok(QTensor {
        shape: x.shape.clone(),
        format: qformat,
        bytes,
    })
}

/// Runs a compiled quantization of `xs` (whole rows of the kernel's row length: a
/// multiple of the block for the block formats and K-quants, the static count for the
/// others) into `bytes`, which the caller sized for the blocks they quantize to.
pub(super) fn quantize_into(f: *const u8, xs: &[f32], bytes: &mut [u8]) {
    // SAFETY: a quantization's signature is (x, bytes, number of floats).
    let f: extern "C" fn(i64, i64, i64) = unsafe { std::mem::transmute(f) };
    f(
        xs.as_ptr() as i64,
        bytes.as_mut_ptr() as i64,
        xs.len() as i64,
    );
}

/// Calls a cast from `from` to `to` (floats held as `f32`, integers as `i64`).
fn cast([from, to]: [DType; 2], f: *const u8, inputs: &[Rc<Value>]) -> Result<Tensor, String> {
    let x = inputs[0].tensor()?;
    if x.dtype != from {
        return Err(format!(
            "the operand is {}, not {}",
            x.dtype.name(),
            from.name()
        ));
    }
    // SAFETY: a cast's signature is (x, y, len).
    let f: extern "C" fn(i64, i64, i64) = unsafe { std::mem::transmute(f) };
    let (src, len) = match &x.data {
        Data::Float(v) => (v.as_ptr() as i64, v.len()),
        Data::Int(v) => (v.as_ptr() as i64, v.len()),
    };
    // x holds len values of its storage type, y len of the target's. The values are
    // already what `to` holds (built as they are, not rounded or wrapped again).
    let data = if to.is_float() {
        let mut out = vec![0f32; len];
        f(src, out.as_mut_ptr() as i64, len as i64);
        Data::Float(out)
    } else {
        let mut out = vec![0i64; len];
        f(src, out.as_mut_ptr() as i64, len as i64);
        Data::Int(out)
    };
    Ok(Tensor {
        shape: x.shape.clone(),
        dtype: to,
        data,
    })
}

/// Calls a general matmul (`transposed`: the rhs is `[.., n, k]`) after checking the
/// run-time shapes.
fn batched_matmul(
    k: &Kernels,
    transposed: bool,
    f: *const u8,
    inputs: &[Rc<Value>],
) -> Result<Tensor, String> {
    let (x, w) = (inputs[0].tensor()?, inputs[1].tensor()?);
    let dims = batched_matmul_dims(&x.shape, &w.shape, transposed)?;
    let (xs, ws) = (x.floats()?, w.floats()?);
    let mut out = k.pool.zeroed(dims.batch * dims.m * dims.n);
    let w_stride = if dims.batched { dims.k * dims.n } else { 0 };
    // SAFETY: a batched matmul's signature is (x, w, y, batch, m, k, n, w stride).
    let f: extern "C" fn(i64, i64, i64, i64, i64, i64, i64, i64) =
        unsafe { std::mem::transmute(f) };
    // x holds batch * m * k floats, w k * n (times batch when batched), y batch * m * n.
    f(
        xs.as_ptr() as i64,
        ws.as_ptr() as i64,
        out.as_mut_ptr() as i64,
        dims.batch as i64,
        dims.m as i64,
        dims.k as i64,
        dims.n as i64,
        w_stride as i64,
    );
    Ok(Tensor::from_f32(
        dims.result_shape(&x.shape),
        DType::F32,
        out,
    ))
}

/// Calls a broadcasting elementwise body; `None` (the reference semantics) when the
/// operands are not tensors of the body's element type that broadcast. The kernel loops
/// over the last four simplified dims (`broadcast_layout`); any before them are looped
/// over here, one call per index.
fn broadcast(
    k: &Kernels,
    body: &ScalarBody,
    f: *const u8,
    inputs: &[Rc<Value>],
) -> Option<Result<Tensor, String>> {
    let (tensors, ptrs) = float_operands(inputs, body)?;
    let shapes: Vec<&[usize]> = tensors.iter().map(|t| t.shape.as_slice()).collect();
    let layout = broadcast_layout(&shapes)?;
    let len: usize = layout.shape.iter().product();
    let mut out = k.pool.zeroed(len);
    if len > 0 {
        let dims = layout.dims.map(|d| d as i64);
        let strides: Vec<i64> = layout.strides.iter().flatten().map(|&s| s as i64).collect();
        let inner: usize = layout.dims.iter().product();
        // SAFETY: a broadcast's signature is (inputs, out, dims, strides).
        let f: extern "C" fn(i64, i64, i64, i64) = unsafe { std::mem::transmute(f) };
        // Inline for up to 8 operands: no allocation in the common single pass.
        let mut at: SmallVec<[i64; 8]> = SmallVec::from_slice(&ptrs);
        for index in 0..len / inner {
            // Each operand's first element for this outer index (row-major over `outer`).
            let mut rest = index;
            at.copy_from_slice(&ptrs);
            for (d, &dim) in layout.outer.iter().enumerate().rev() {
                let i = rest % dim;
                rest /= dim;
                for (a, base) in at.iter_mut().enumerate() {
                    *base += 4 * (i * layout.outer_strides[a][d]) as i64;
                }
            }
            // Every operand holds the elements its strides reach within `dims` from its
            // first element for this index; `out` holds `inner` floats from `index * inner`.
            f(
                at.as_ptr() as i64,
                out[index * inner..].as_mut_ptr() as i64,
                dims.as_ptr() as i64,
                strides.as_ptr() as i64,
            );
        }
    }
    Some(Ok(body_result(body, layout.shape, out)))
}

/// Calls an RMS norm over rows of `d`.
fn rms_norm(k: &Kernels, d: usize, f: *const u8, inputs: &[Rc<Value>]) -> Result<Tensor, String> {
    let (x, g) = (inputs[0].tensor()?, inputs[1].tensor()?);
    let (xs, gs) = (x.floats()?, g.floats()?);
    if x.shape.last() != Some(&d) || gs.len() != d {
        return Err(format!(
            "rows of {:?} do not fit the norm weight {:?}",
            x.shape, g.shape
        ));
    }
    let mut out = k.pool.for_overwrite(xs.len());
    norm_into(f, d, (xs, gs), &mut out);
    Ok(Tensor::from_f32(k.pool.shape(&x.shape), DType::F32, out))
}

/// Runs a compiled RMS norm of the rows of `d` of `xs` with the gain `gs` into `out`.
///
/// # Panics
///
/// When `gs` does not hold `d` floats or `out` not as many as `xs`.
pub(super) fn norm_into(f: *const u8, d: usize, (xs, gs): (&[f32], &[f32]), out: &mut [f32]) {
    assert!(gs.len() == d && out.len() == xs.len());
    // SAFETY: an RMS norm's signature is (x, g, y, rows).
    let f: extern "C" fn(i64, i64, i64, i64) = unsafe { std::mem::transmute(f) };
    // x and y hold rows * d floats, g holds d.
    f(
        xs.as_ptr() as i64,
        gs.as_ptr() as i64,
        out.as_mut_ptr() as i64,
        (xs.len() / d.max(1)) as i64,
    );
}

/// The number of groups of `n * inner` values in `x`, whose dims must hold a dim of `n`
/// followed by dims of `inner` values (the reduced dim and those after it).
fn reduced_groups(x: &Tensor, n: usize, inner: usize) -> Result<usize, String> {
    let fits = (0..x.shape.len())
        .any(|a| x.shape[a] == n && x.shape[a + 1..].iter().product::<usize>() == inner);
    if !fits {
        return Err(format!(
            "the input {:?} has no dim of {n} followed by {inner} values",
            x.shape
        ));
    }
    Ok(x.len() / (n * inner).max(1))
}

/// Calls a softmax along a dim of `n` whose values are `inner` apart.
fn softmax(
    k: &Kernels,
    [n, inner]: [usize; 2],
    f: *const u8,
    inputs: &[Rc<Value>],
) -> Result<Tensor, String> {
    let x = inputs[0].tensor()?;
    let xs = x.floats()?;
    let groups = reduced_groups(x, n, inner)?;
    let mut out = k.pool.zeroed(xs.len());
    // SAFETY: a softmax's signature is (x, y, groups).
    let f: extern "C" fn(i64, i64, i64) = unsafe { std::mem::transmute(f) };
    // x and y hold groups * n * inner floats.
    f(xs.as_ptr() as i64, out.as_mut_ptr() as i64, groups as i64);
    Ok(Tensor::from_f32(k.pool.shape(&x.shape), DType::F32, out))
}

/// Calls an argmax along a dim of `n` whose values are `inner` apart, returning
/// `index`-typed indices shaped by the result's declared `dims`.
fn argmax(
    [n, inner]: [usize; 2],
    index: DType,
    dims: &[Dim],
    f: *const u8,
    inputs: &[Rc<Value>],
) -> Result<Tensor, String> {
    let x = inputs[0].tensor()?;
    let xs = x.floats()?;
    let groups = reduced_groups(x, n, inner)?;
    let mut out = vec![0i64; groups * inner];
    // SAFETY: an argmax's signature is (x, indices, groups).
    let f: extern "C" fn(i64, i64, i64) = unsafe { std::mem::transmute(f) };
    // x holds groups * n * inner floats, out groups * inner indices.
    f(xs.as_ptr() as i64, out.as_mut_ptr() as i64, groups as i64);
    let shape = resolve_shape(dims, out.len())?;
    Ok(Tensor::from_i64(shape, index, out))
}

/// Calls a layer norm over rows of `d`.
fn layer_norm(k: &Kernels, d: usize, f: *const u8, inputs: &[Rc<Value>]) -> Result<Tensor, String> {
    let (x, w, b) = (
        inputs[0].tensor()?,
        inputs[1].tensor()?,
        inputs[2].tensor()?,
    );
    let (xs, ws, bs) = (x.floats()?, w.floats()?, b.floats()?);
    if x.shape.last() != Some(&d) || ws.len() != d || bs.len() != d {
        return Err(format!(
            "rows of {:?} do not fit the weight {:?} and bias {:?}",
            x.shape, w.shape, b.shape
        ));
    }
    let mut out = k.pool.zeroed(xs.len());
    // SAFETY: a layer norm's signature is (x, w, b, y, rows).
    let f: extern "C" fn(i64, i64, i64, i64, i64) = unsafe { std::mem::transmute(f) };
    // x and y hold rows * d floats, w and b hold d.
    f(
        xs.as_ptr() as i64,
        ws.as_ptr() as i64,
        bs.as_ptr() as i64,
        out.as_mut_ptr() as i64,
        (xs.len() / d) as i64,
    );
    Ok(Tensor::from_f32(k.pool.shape(&x.shape), DType::F32, out))
}

/// The floats of a tensor value, moved out when nothing else holds it.
fn take_floats(k: &Kernels, value: Rc<Value>) -> Result<(Vec<usize>, Vec<f32>), String> {
    let t = k.pool.take_tensor(value)?;
    match t.data {
        Data::Float(v) if t.dtype == DType::F32 => Ok((t.shape, v)),
        _ => Err(format!("expected an f32 tensor, found {}", t.dtype.name())),
    }
}

/// Calls rope kernel `kernel` with the run's sine and cosine tables ([`RopeTables`]);
/// the kernel rotates the values in place.
fn rope(
    k: &Kernels,
    (kernel, heads, d): (&Kernel, usize, usize),
    f: *const u8,
    inputs: &mut Operands,
) -> Result<Tensor, String> {
    if !(2..=3).contains(&inputs.len()) {
        return Err("rope takes two or three operands".into());
    }
    let factors = match inputs.get(2) {
        Some(factors) => factors.tensor()?.floats()?,
        None => &[],
    };
    let angles = kernel::rope_angles(kernel, factors)?;
    // Moved out of the operands, so that x is rotated in place when nothing else holds it.
    let x = inputs.remove(0);
    let positions = inputs[0].tensor()?.ints()?;
    let (shape, mut x) = take_floats(k, x)?;
    let r = shape.len();
    if r < 2 || shape[r - 2..] != [heads, d] {
        return Err(format!("{shape:?} does not end in {heads} heads of {d}"));
    }
    rotate_in_place(k, (f, &angles, heads * d), positions, &mut x)?;
    Ok(Tensor::from_f32(shape, DType::F32, x))
}

/// Rotates `x` (one row of `row` values, its heads, per position) in place with a compiled
/// rope kernel and the run's tables for `angles` at `positions`, after checking that
/// there is a row per position.
pub(super) fn rotate_in_place(
    k: &Kernels,
    (f, angles, row): (*const u8, &RopeAngles, usize),
    positions: &[i64],
    x: &mut [f32],
) -> Result<(), String> {
    if positions.len() * row != x.len() {
        return Err(format!(
            "{} positions do not match {} rows of {row}",
            positions.len(),
            x.len() / row.max(1)
        ));
    }
    // SAFETY: a rope kernel's signature is (x, cos, sin, tokens).
    let f: extern "C" fn(i64, i64, i64, i64) = unsafe { std::mem::transmute(f) };
    k.ropes.with(angles, positions, |cos, sin| {
        // x holds tokens * heads * d floats; the tables tokens * rotary / 2 each.
        f(
            x.as_mut_ptr() as i64,
            cos.as_ptr() as i64,
            sin.as_ptr() as i64,
            positions.len() as i64,
        );
    });
    Ok(())
}

/// Calls an attention kernel once per query row, with the byte offsets of the key/value
/// rows it sees (computed and bounds-checked here) and, where it has `sinks`, the op's
/// last operand.
fn attention(
    k: &Kernels,
    [heads, kv_heads, d]: [usize; 3],
    (source, sinks): (AttentionSource, bool),
    f: *const u8,
    inputs: &mut Operands,
) -> Outputs {
    if inputs.len() != source.operands() + usize::from(sinks) {
        return Err(format!(
            "{} operands for the attention, expected {}",
            inputs.len(),
            source.operands() + usize::from(sinks)
        ));
    }
    let sinks = if sinks { inputs.pop() } else { None };
    let sinks = extra_operand(sinks.as_ref().map(Some), &[heads], "sinks")?;
    // The cache an append updates, taken out of the operands (`[q, k, v, slots, tables,
    // lens]` remain) so that it is updated in place when nothing else holds it.
    let appended = match source {
        AttentionSource::Paged { append: true, .. } => Some(inputs.remove(1)),
        _ => None,
    };
    let q = inputs[0].tensor()?;
    let qd = q.floats()?;
    if q.shape.len() < 3 || q.shape[q.shape.len() - 2..] != [heads, d] {
        return Err(format!(
            "queries {:?} do not have {heads} heads of {d}",
            q.shape
        ));
    }
    let mut out = k.pool.zeroed(qd.len());
    let rows = AttentionRows::new(f, [heads, d], qd, sinks);
    match source {
        AttentionSource::Paged { layer, window, .. } => {
            let mut updated = None;
            let (cache, tables, lens) = if let Some(cache) = appended {
                let mut cache = match Rc::unwrap_or_clone(cache) {
                    Value::Cache(c) => c,
                    other => return Err(format!("expected a KV cache, found {}", other.kind())),
                };
                append_rows(
                    &mut cache,
                    layer,
                    inputs[1].tensor()?,
                    inputs[2].tensor()?,
                    inputs[3].tensor()?,
                )?;
                let cache: &KvCache = updated.insert(cache);
                (cache, inputs[4].tensor()?, inputs[5].tensor()?)
            } else {
                (inputs[1].cache()?, inputs[2].tensor()?, inputs[3].tensor()?)
            };
            if q.shape.len() != 4 {
                return Err(format!("queries {:?} are not [b, t, heads, d]", q.shape));
            }
            let sequences = [q.shape[0], q.shape[1]];
            let paged = PagedSource {
                cache,
                layer,
                window,
                kv_heads,
                element: source.element(),
            };
            paged.attend(k, &rows, (sequences, tables, lens), &mut out)?;
            let out = Value::Tensor(Tensor::from_f32(k.pool.shape(&q.shape), DType::F32, out));
            match updated {
                Some(cache) => k.results([out, Value::Cache(cache)]),
                None => k.results([out]),
            }
        }
        AttentionSource::Contiguous {
            causal,
            window,
            masked,
        } => {
            let (kt, vt) = (inputs[1].tensor()?, inputs[2].tensor()?);
            let r = q.shape.len();
            let [tq, tk] = contiguous_attention_shape(
                [&q.shape, &kt.shape, &vt.shape],
                [kv_heads, d],
                causal,
            )?;
            let (kd, vd) = (kt.floats()?, vt.floats()?);
            let (kd, vd) = (bytemuck::cast_slice(kd), bytemuck::cast_slice(vd));
            let mask = extra_operand(masked.then(|| inputs.get(3)), &[tq, tk], "mask")?;
            let batch: usize = q.shape[..r - 3].iter().product();
            let out_at = out.as_mut_ptr() as usize;
            for_rows(k, batch * tq, 2 * batch * tq * tk * rows.row, &|query| {
                let (b, i) = (query / tq, query % tq);
                let pos = (tk + i).saturating_sub(tq);
                let start = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let end = if causal { pos + 1 } else { tk };
                let offsets: Vec<i64> = (start..end)
                    .map(|j| (4 * (b * tk + j) * kv_heads * d) as i64)
                    .collect();
                let row_mask = mask.map(|m| &m[i * tk + start..i * tk + end]);
                rows.attend(query, (kd, vd), &offsets, row_mask, out_at);
            });
            k.tensor(Tensor::from_f32(k.pool.shape(&q.shape), DType::F32, out))
        }
    }
}

/// The signature of an attention kernel: (q, k, v, offsets, count, out); a masked one's
/// takes the mask after them, one with sinks the sinks last.
type AttentionFn = extern "C" fn(i64, i64, i64, i64, i64, i64);

/// A compiled attention kernel and the query rows it runs over.
pub(super) struct AttentionRows<'a> {
    /// The kernel.
    f: AttentionFn,
    /// The head size.
    d: usize,
    /// Values per query row (heads x head size).
    row: usize,
    /// The query rows.
    queries: &'a [f32],
    /// The heads' attention sinks, for a kernel that takes them.
    sinks: Option<&'a [f32]>,
}

impl<'a> AttentionRows<'a> {
    /// The query rows `queries` of `heads` heads of `d` for the compiled kernel `f`, with
    /// the heads' attention `sinks` (one a head, checked by the caller) exactly where `f`
    /// takes them.
    pub(super) fn new(
        f: *const u8,
        [heads, d]: [usize; 2],
        queries: &'a [f32],
        sinks: Option<&'a [f32]>,
    ) -> Self {
        AttentionRows {
            // SAFETY: `f` is a compiled attention kernel.
            f: unsafe { std::mem::transmute::<*const u8, AttentionFn>(f) },
            d,
            row: heads * d,
            queries,
            sinks,
        }
    }

    /// Runs query row `r` over `offsets` into `kd`/`vd` (the bytes of the rows the kernel
    /// reads: f32, or what [`KvElement`] its shape names; the caller checked each offset
    /// plus a row to lie inside both), with the mask values of those positions if the
    /// kernel takes them, writing the row's outputs at `out_at + 4 * r * row` (the
    /// caller's buffer of as many floats as the queries).
    fn attend(
        &self,
        r: usize,
        (kd, vd): (&[u8], &[u8]),
        offsets: &[i64],
        mask: Option<&[f32]>,
        out_at: usize,
    ) {
        if offsets.is_empty() {
            return;
        }
        let a = [
            self.queries[r * self.row..].as_ptr() as i64,
            kd.as_ptr() as i64,
            vd.as_ptr() as i64,
            offsets.as_ptr() as i64,
            offsets.len() as i64,
            (out_at + 4 * r * self.row) as i64,
        ];
        type Seven = extern "C" fn(i64, i64, i64, i64, i64, i64, i64);
        type Eight = extern "C" fn(i64, i64, i64, i64, i64, i64, i64, i64);
        let at = |x: &[f32]| x.as_ptr() as i64;
        // SAFETY: the kernel takes a parameter for the mask's values and then one for the
        // sinks where its op has them (`codegen::param_count`); the callers give them to
        // match.
        unsafe {
            match (mask, self.sinks) {
                (None, None) => (self.f)(a[0], a[1], a[2], a[3], a[4], a[5]),
                (Some(x), None) | (None, Some(x)) => std::mem::transmute::<AttentionFn, Seven>(
                    self.f,
                )(
                    a[0], a[1], a[2], a[3], a[4], a[5], at(x)
                ),
                (Some(m), Some(s)) => std::mem::transmute::<AttentionFn, Eight>(self.f)(
                    a[0],
                    a[1],
                    a[2],
                    a[3],
                    a[4],
                    a[5],
                    at(m),
                    at(s),
                ),
            }
        }
    }
}

/// One layer of a paged KV cache that attention reads.
pub(super) struct PagedSource<'a> {
    /// The cache.
    pub cache: &'a KvCache,
    /// The layer.
    pub layer: usize,
    /// Sliding window.
    pub window: Option<usize>,
    /// KV heads the kernel expects.
    pub kv_heads: usize,
    /// The rows the kernel reads where it calls the row microkernel.
    pub element: KvElement,
}

impl PagedSource<'_> {
    /// Runs `rows` (`[sequences, tokens]` of query rows) over the layer through the block
    /// `tables` and context `lens` (the row offsets computed and checked once per call,
    /// [`PagedRows`]) into `out` (as many floats as the queries, zeroed).
    pub(super) fn attend(
        &self,
        k: &Kernels,
        rows: &AttentionRows,
        (sequences, tables, lens): ([usize; 2], &Tensor, &Tensor),
        out: &mut [f32],
    ) -> Result<(), String> {
        check_cache(self.cache, self.layer, self.kv_heads, rows.d)?;
        if rows.queries.len() != sequences[0] * sequences[1] * rows.row
            || out.len() != rows.queries.len()
        {
            return Err(format!(
                "{} queries are not {sequences:?} rows of {}",
                rows.queries.len(),
                rows.row
            ));
        }
        // The offsets are from the start of the layer's rows.
        let layer_start = self.cache.slot_offset(self.layer, 0);
        // Rows run in parallel, each writing its own outputs through this address.
        let out_at = out.as_mut_ptr() as usize;
        let (slot_len, keys, values) = (self.cache.slot_len(), &self.cache.k, &self.cache.v);
        // The row microkernel reads every storage's rows itself; the generated kernel reads
        // f32. Where the microkernel does not run, other rows are widened or decoded first.
        let heads = rows.row / rows.d.max(1);
        if keys.element() != self.element || values.element() != self.element {
            return Err("the cache's storage does not match its type".into());
        }
        let reads_stored = self.element == KvElement::F32
            || attention::row_kernel_runs(k.code.tiles(), heads, self.kv_heads, rows.d);
        k.paged
            .with(self.cache, (sequences, tables, lens, self.window), |all| {
                let positions = all.iter().map(Vec::len).sum::<usize>();
                let macs = 2 * positions * rows.row;
                if reads_stored {
                    let start = keys.element().bytes(layer_start);
                    let pool = (&keys.bytes()[start..], &values.bytes()[start..]);
                    for_rows(k, all.len(), macs, &|r| {
                        rows.attend(r, pool, &all[r], None, out_at);
                    });
                } else {
                    // Each row's keys and values widened into a scratch (in cache while
                    // the kernel reads them) and attended there.
                    let longest = all.iter().map(Vec::len).max().unwrap_or(0);
                    let dense: Vec<i64> = (0..longest).map(|j| (4 * j * slot_len) as i64).collect();
                    for_rows(k, all.len(), macs, &|r| {
                        WIDENED.with_borrow_mut(|(ks, vs)| {
                            let at = |offset: i64| layer_start + offset as usize / 4;
                            widen_rows(keys, &all[r], slot_len, at, ks);
                            widen_rows(values, &all[r], slot_len, at, vs);
                            let n = all[r].len();
                            let scratch = (bytemuck::cast_slice(ks), bytemuck::cast_slice(vs));
                            rows.attend(r, scratch, &dense[..n], None, out_at);
                        });
                    });
                }
            })
    }
}

thread_local! {
    /// The keys and values of one query row of a 16-bit or block-format cache, as `f32`.
    static WIDENED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = Default::default();
}

/// Widens the rows of `slot_len` elements of `data` at `offsets` (byte offsets of `f32`
/// rows from a layer's start; `at` turns one into an element index) into `out`, one after
/// another: consecutive slots (the positions of one block) in one conversion.
fn widen_rows(
    data: &KvValues,
    offsets: &[i64],
    slot_len: usize,
    at: impl Fn(i64) -> usize,
    out: &mut Vec<f32>,
) {
    out.resize(offsets.len() * slot_len, 0.0);
    let step = (4 * slot_len) as i64;
    let mut j = 0;
    while j < offsets.len() {
        let mut run = 1;
        while j + run < offsets.len() && offsets[j + run] == offsets[j] + run as i64 * step {
            run += 1;
        }
        data.read(at(offsets[j]), &mut out[j * slot_len..(j + run) * slot_len]);
        j += run;
    }
}

/// Runs `attend_row(r)` for every query row `r < rows`: over the workers, a row at a time
/// (rows see contexts of different lengths), when there are several rows and `macs`
/// multiply-adds in all to share.
fn for_rows(k: &Kernels, rows: usize, macs: usize, attend_row: &(dyn Fn(usize) + Sync)) {
    match k.workers {
        Some(workers) if rows > 1 && macs >= PARALLEL_MIN_MACS => workers.run(rows, attend_row),
        _ => (0..rows).for_each(attend_row),
    }
}

/// `llm.append_kv` on the host: each token's key and value rows written to its slot of
/// `layer`, in place when nothing else holds the cache.
fn append_kv(k: &Kernels, layer: usize, inputs: &mut Operands) -> Outputs {
    if inputs.len() != 4 {
        return Err("append_kv takes four operands".into());
    }
    let mut cache = match Rc::unwrap_or_clone(inputs.remove(0)) {
        Value::Cache(c) => c,
        other => return Err(format!("expected a KV cache, found {}", other.kind())),
    };
    let [keys, values, slots] = [&inputs[0], &inputs[1], &inputs[2]];
    append_rows(
        &mut cache,
        layer,
        keys.tensor()?,
        values.tensor()?,
        slots.tensor()?,
    )?;
    k.results([Value::Cache(cache)])
}

/// Checks that `layer` and the head shape fit `cache`.
fn check_cache(cache: &KvCache, layer: usize, kv_heads: usize, d: usize) -> Result<(), String> {
    let p = &cache.params;
    if layer >= p.layers as usize || p.kv_heads as usize != kv_heads || p.head_dim as usize != d {
        return Err(format!(
            "layer {layer} with {kv_heads} heads of {d} does not fit a cache of {} layers of {} heads of {}",
            p.layers, p.kv_heads, p.head_dim
        ));
    }
    if cache.k.len() != cache.slot_offset(p.layers as usize, 0) || cache.v.len() != cache.k.len() {
        return Err("the cache's storage does not match its shape".into());
    }
    Ok(())
}

/// Runs a data movement.
fn movement(k: &Kernels, m: Movement, dims: &[Dim], inputs: &mut Operands) -> Outputs {
    match m {
        Movement::Concat { axis, .. } => {
            let parts: Vec<&Tensor> = inputs
                .iter()
                .map(|v| v.tensor())
                .collect::<Result<_, _>>()?;
            let first = parts.first().ok_or("no operand")?;
            if parts
                .iter()
                .any(|p| p.dtype != first.dtype || p.shape.len() <= axis)
            {
                return Err(format!("cannot concatenate along {axis}"));
            }
            k.tensor(concat_tensors(&parts, axis, first.dtype)?)
        }
        Movement::Reshape => {
            if inputs.is_empty() {
                return Err("no operand".into());
            }
            let mut value = inputs.remove(0);
            relabel(k.pool, &mut value, dims)?;
            Ok(smallvec![value])
        }
        Movement::Columns { width, offset, len } => {
            columns(k, inputs[0].tensor()?, width, &[(offset, len)])
        }
        Movement::Rows {
            dim, vocab, panels, ..
        } => {
            let ids = inputs[1].tensor()?;
            let table = Table::of(&inputs[0], [vocab, dim], panels)?;
            let mut out = k.pool.for_overwrite(ids.len() * dim);
            table.gather_into(ids.ints()?, &mut out)?;
            let mut shape = k.pool.shape(&ids.shape);
            shape.push(dim);
            k.tensor(Tensor::from_f32(shape, DType::F32, out))
        }
    }
}

/// Moves a value into, out of or across the in-process mesh.
fn mesh_move(m: &MeshMove, inputs: &Operands) -> Result<Value, String> {
    Ok(match m {
        MeshMove::Shard {
            mesh,
            split,
            reduction,
        } => Value::Sharded(shard_value(
            &mut HostMesh,
            inputs[0].tensor()?,
            mesh,
            split,
            *reduction,
        )?),
        MeshMove::Unshard => Value::Tensor(unshard_value(&mut HostMesh, inputs[0].sharded()?)?),
        MeshMove::AllGather { axes, dim } => Value::Sharded(all_gather_with(
            &mut HostMesh,
            inputs[0].sharded()?,
            *dim,
            axes,
        )?),
    })
}

/// The CPU's shards: host tensors, each device's product or fold in the kernel's
/// generated `code` (a contraction, `local`, for `sharded_linear`; a [`Kernel::Fold`]
/// for the collectives), moves as the reference's copies.
struct CpuMesh<'a> {
    k: &'a Kernels<'a>,
    code: *const u8,
    local: Option<&'a Contraction>,
}

impl MeshOps for CpuMesh<'_> {
    type Shard = Tensor;

    fn dims(shard: &Tensor) -> &[usize] {
        &shard.shape
    }

    fn take_box(&mut self, x: &Tensor, start: &[usize], size: &[usize]) -> Result<Tensor, String> {
        HostMesh.take_box(x, start, size)
    }

    fn concat(&mut self, parts: &[&Tensor], dim: usize) -> Result<Tensor, String> {
        HostMesh.concat(parts, dim)
    }

    fn combine(&mut self, a: &Tensor, b: &Tensor, _: Reduction) -> Result<Tensor, String> {
        // The fold's code is the reduction's.
        fold_tensors(self.k, self.code, a, b)
    }

    fn round_like(&mut self, acc: Tensor, like: &Tensor) -> Result<Tensor, String> {
        HostMesh.round_like(acc, like)
    }

    fn linear(&mut self, x: &Tensor, w: &Tensor) -> Result<Tensor, String> {
        let c = self.local.ok_or("a fold kernel has no product")?;
        let wbytes = f32_weight_bytes(&[c.n, c.k], w)?;
        let rows = Rows::of_floats(x.floats()?, c.k);
        let y = run_contraction(self.k, c, self.code, rows, wbytes, None);
        Ok(Tensor::from_f32(product_shape(&x.shape, c.n), x.dtype, y))
    }

    fn same(&mut self, a: &Tensor, b: &Tensor) -> Result<bool, String> {
        HostMesh.same(a, b)
    }
}

/// Copies column ranges `(offset, len)` of the rows of `width` of `x` out, one result
/// per range (`llm.slice`s of the last dim; several slices of one value are one call).
pub fn columns(k: &Kernels, x: &Tensor, width: usize, parts: &[(usize, usize)]) -> Outputs {
    let xs = x.floats()?;
    if x.shape.last() != Some(&width) || parts.iter().any(|&(o, n)| o + n > width) {
        return Err(format!(
            "the input {:?} does not end in {width} columns holding {parts:?}",
            x.shape
        ));
    }
    let rows = xs.len() / width.max(1);
    let mut results = Results::new();
    for &(offset, len) in parts {
        let mut out = k.pool.for_overwrite(rows * len);
        copy_columns(xs, width, (offset, len), &mut out);
        let mut shape = k.pool.shape(&x.shape);
        *shape.last_mut().ok_or("a scalar has no columns")? = len;
        results.push(k.pool.wrap_tensor(Tensor::from_f32(shape, DType::F32, out)));
    }
    Ok(results)
}

/// Copies columns `offset..offset + len` of each row of `width` of `xs` to the rows of
/// `len` of `out`.
pub(super) fn copy_columns(
    xs: &[f32],
    width: usize,
    (offset, len): (usize, usize),
    out: &mut [f32],
) {
    for (row, part) in xs
        .chunks_exact(width.max(1))
        .zip(out.chunks_exact_mut(len.max(1)))
    {
        part.copy_from_slice(&row[offset..offset + len]);
    }
}

/// Gives the tensor `value` the shape `dims` resolve to for its element count (an
/// `llm.reshape`): in place when nothing else holds it, else on a copy.
pub fn relabel(pool: &BufferPool, value: &mut Rc<Value>, dims: &[Dim]) -> Result<(), String> {
    let count = value.tensor()?.len();
    match Rc::get_mut(value) {
        Some(Value::Tensor(t)) => resolve_shape_into(dims, count, &mut t.shape),
        _ => {
            let mut t = value.tensor()?.clone();
            resolve_shape_into(dims, count, &mut t.shape)?;
            *value = pool.wrap_tensor(t);
            Ok(())
        }
    }
}

/// An embedding table as a gather reads it.
pub(super) enum Table<'a> {
    /// f32 rows of `dim` (row major, or in panels when `panels`).
    Floats {
        /// The values.
        values: &'a [f32],
        /// In panels ([`panel_row`]).
        panels: bool,
        /// `[vocab, dim]`.
        shape: [usize; 2],
    },
    /// Quantized rows, decoded as they are gathered (in weight panels when `panels`).
    Quantized {
        /// The table.
        q: &'a QTensor,
        /// In weight panels ([`pack_weight_panels`](crate::kernel::pack_weight_panels)).
        panels: bool,
    },
}

impl<'a> Table<'a> {
    /// The `[vocab, dim]` table `value` (f32 values, row major or in `panels`, or a
    /// quantized tensor), checked to hold as much.
    pub(super) fn of(value: &'a Value, shape: [usize; 2], panels: bool) -> Result<Self, String> {
        let [vocab, dim] = shape;
        match value {
            // A quantized table's rows are decoded one by one, never the whole table.
            Value::Quantized(q) if q.shape == shape => {
                let expected = storage_bytes(&q.format, &q.shape);
                if q.bytes.len() != expected {
                    return Err(format!(
                        "the table holds {} bytes, not {expected}",
                        q.bytes.len()
                    ));
                }
                Ok(Table::Quantized { q, panels })
            }
            other => {
                let t = other.tensor()?;
                let values = t.floats()?;
                if values.len() != vocab * dim {
                    return Err(format!("the table {:?} is not {vocab}x{dim}", t.shape));
                }
                Ok(Table::Floats {
                    values,
                    panels,
                    shape,
                })
            }
        }
    }

    /// Row `ids[i]` of the table into row `i` of `out` (as many rows of `dim`), each id
    /// checked to be a row.
    pub(super) fn gather_into(&self, ids: &[i64], out: &mut [f32]) -> Result<(), String> {
        let [vocab, dim] = match self {
            Table::Floats { shape, .. } => *shape,
            Table::Quantized { q, .. } => [q.shape[0], q.shape[1]],
        };
        // A row's bytes gathered out of weight panels.
        let mut row_bytes = Vec::new();
        if out.len() != ids.len() * dim {
            return Err(format!(
                "{} ids do not fill {} values",
                ids.len(),
                out.len()
            ));
        }
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(dim.max(1))) {
            if id < 0 || id as usize >= vocab {
                return Err(format!(
                    "token id {id} is out of range for a table of {vocab} rows"
                ));
            }
            match self {
                Table::Floats {
                    values,
                    panels: true,
                    ..
                } => panel_row(values, vocab, dim, id as usize, row),
                Table::Floats { values, .. } => {
                    row.copy_from_slice(&values[id as usize * dim..][..dim]);
                }
                Table::Quantized { q, panels: false } => {
                    dequantize_row(&q.format, [vocab, dim], &q.bytes, id as usize, row)
                }
                Table::Quantized { q, panels: true } => {
                    let format = WeightFormat::of(&q.format).ok_or("no weight panels")?;
                    row_bytes.resize(format.row_bytes(dim), 0);
                    weight_panel_row(format, &q.bytes, [vocab, dim], id as usize, &mut row_bytes);
                    dequantize_row(&q.format, [1, dim], &row_bytes, 0, row);
                }
            }
        }
        Ok(())
    }
}

/// The bytes of a float slice.
fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), size_of_val(v)) }
}
