//! A program's steps for one set of argument shapes, as kernel calls over fixed buffers.
//!
//! Run step by step, a [`Program`](super::Program) makes every intermediate a value of its
//! own: a reference-counted box, a shape vector and a float buffer, taken from and given
//! back to a pool, with the shapes worked out and checked again at every step. For a small
//! model that bookkeeping is most of a decode step. Once a program has run twice with the
//! same shapes of the arguments that decide its intermediates' shapes (the token ids of a
//! decode step, say), it makes a `CallPlan` from what the traced run saw: every
//! intermediate gets a place in one arena, planned by liveness like `plan-buffers` does
//! ([`place_buffers`]: two values share memory only when their lives do not overlap), and
//! every step becomes a `Call` whose operands are arena offsets, arguments or constant
//! weights. A call of the plan then allocates nothing and runs no shape logic per step.
//!
//! What still depends on the arguments' values is checked as the step-by-step run checks
//! it, by the same code: token ids against the embedding table, positions against the
//! rows they rotate, slots and block tables against the KV pool, context lengths against
//! the new tokens. The arguments whose shapes only such checks read (positions, slots,
//! block tables, context lengths) are not part of the plan's key, so a decode plan
//! serves every context length.
//!
//! Only steps whose results' shapes follow from their operands' shapes are planned:
//! contractions (with their RMS-norm prologue and residual epilogue, or on q8_0
//! activations), quantization of activations to q8_0, RMS norms, same-shape elementwise
//! bodies, column slices, rope, paged attention (with or without its append; the KV cache
//! passes from one to the next), embeddings of token ids, reshapes and the return. A
//! function with any other step runs step by step.

#![allow(
    unsafe_code,
    reason = "reads and writes the arena through raw pointers into regions the plan keeps apart"
)]

use std::{cell::RefCell, rc::Rc};

use llm_ir::{
    dtype::DType,
    interp::{KvCache, KvElement, Tensor, Value, eval::kv::write_rows, quant::storage_bytes},
    types::QuantFormat,
};
use llm_passes::plan_buffers::place_buffers;

use super::calls::{
    self, AttentionRows, Kernels, PagedSource, Rows, Table, contract_into, copy_columns,
    elementwise_into, norm_into, quantize_into, rotate_in_place,
};
use crate::kernel::{AttentionSource, Contraction, Kernel, Movement, WeightFormat, whole_rows};

/// What a traced run saw in a slot.
#[derive(Clone, Default)]
pub(super) enum Traced {
    /// A tensor of this shape and element type.
    Tensor(Vec<usize>, DType),
    /// A quantized tensor of this shape and format.
    Quantized(Vec<usize>, QuantFormat),
    /// A KV cache.
    Cache,
    /// Another kind of value, or none.
    #[default]
    Other,
}

/// What a plan is made from: one step of the program.
pub(super) struct PlanStep<'a> {
    /// What the step runs.
    pub kind: StepKind<'a>,
    /// Slots of the operands.
    pub inputs: &'a [usize],
    /// Slots of the results.
    pub outputs: &'a [usize],
}

/// The action of a [`PlanStep`].
pub(super) enum StepKind<'a> {
    /// A kernel, with the entries of its code and its prologue's.
    Kernel {
        /// The kernel.
        kernel: &'a Kernel,
        /// Its compiled entry (none for data movement).
        entry: Option<*const u8>,
        /// The RMS-norm prologue's entry.
        prologue: Option<*const u8>,
    },
    /// Merged column slices of rows of `width`.
    Columns {
        /// The input's last dim.
        width: usize,
        /// `(offset, len)` per result.
        parts: &'a [(usize, usize)],
    },
    /// The return.
    Return,
    /// Anything else (the plan is then not made).
    Other,
}

/// A buffer of the arena: `len` floats at float offset `at` (the buffer's number while
/// the plan is built, until [`CallPlan::new`] places it).
#[derive(Clone, Copy)]
struct Buf {
    at: usize,
    len: usize,
}

/// Where an operand is.
#[derive(Clone, Copy)]
enum Src {
    /// In the arena.
    Arena(Buf),
    /// Argument `i` of the call, a tensor of `len` values (its shape is in the plan's key
    /// when it is read as floats; the length is checked at every read).
    Arg { i: usize, len: usize },
    /// A constant of the program (kept alive by it).
    Constant(*const Value),
    /// The KV cache.
    Cache,
}

/// One kernel call of a plan; `step` is the program step it runs (for errors).
struct Call {
    step: usize,
    op: Op,
}

/// What a [`Call`] does.
enum Op {
    /// A contraction of `rows` rows of x (RMS-normed first into `normed` when `norm`; q8_0
    /// blocks when the contraction takes quantized activations).
    Contraction {
        c: Contraction,
        f: *const u8,
        norm: Option<(*const u8, Src, Buf)>,
        x: Src,
        weight: (*const u8, usize),
        residual: Option<Src>,
        rows: usize,
        out: Buf,
    },
    /// Rows of floats quantized to q8_0, `bytes` bytes into `out`.
    Quantize {
        f: *const u8,
        x: Src,
        out: Buf,
        bytes: usize,
    },
    /// An RMS norm over rows of `d`.
    RmsNorm {
        f: *const u8,
        d: usize,
        x: Src,
        gain: Src,
        out: Buf,
    },
    /// An elementwise body over operands of `out.len` floats.
    Elementwise {
        f: *const u8,
        inputs: Vec<Src>,
        out: Buf,
    },
    /// Column ranges `(offset, len, out)` of rows of `width`.
    Columns {
        x: Src,
        width: usize,
        parts: Vec<(usize, usize, Buf)>,
    },
    /// x copied to `out` and rotated there, by the angles of `kernel` with the frequency
    /// factors in `factors`, if any.
    Rope {
        f: *const u8,
        kernel: Kernel,
        factors: Option<Src>,
        row: usize,
        x: Src,
        positions: usize,
        out: Buf,
    },
    /// Paged attention, after appending the new keys and values when `append`.
    Attention {
        f: *const u8,
        shape: [usize; 3],
        element: KvElement,
        layer: usize,
        window: Option<usize>,
        q: Src,
        append: Option<(Src, Src, usize)>,
        tables: usize,
        lens: usize,
        sinks: Option<Src>,
        sequences: [usize; 2],
        out: Buf,
    },
    /// Embedding rows of the token ids in argument `ids`.
    Gather {
        table: *const Value,
        shape: [usize; 2],
        panels: bool,
        ids: usize,
        out: Buf,
    },
}

/// What the plan returns, in order.
enum Returned {
    /// A tensor of the arena, copied out.
    Tensor(Src, Vec<usize>),
    /// The KV cache.
    Cache,
}

/// A program's calls for one set of argument shapes.
pub(super) struct CallPlan {
    /// The shape each argument that decides intermediate shapes must have (`None` for
    /// the others).
    key: Vec<Option<Vec<usize>>>,
    calls: Vec<Call>,
    returns: Vec<Returned>,
    /// The program step of the return (for the errors of copying results out).
    return_step: usize,
    /// The argument that holds the KV cache, if any.
    cache_arg: Option<usize>,
    arena: RefCell<Vec<f32>>,
}

/// Why a plan stopped: the program step and the message.
pub(super) type PlanError = (usize, String);

/// The slots of a plan under construction.
struct Builder<'a> {
    /// Traced shapes by slot.
    traced: &'a [Traced],
    /// Where each slot's value is.
    src: Vec<Option<Src>>,
    /// Arena buffers: floats, first step, last step (the return counts as a step).
    buffers: Vec<(usize, usize, usize)>,
    /// The last step that reads each slot.
    last_use: Vec<usize>,
    /// The slot that holds the KV cache now.
    cache: Option<usize>,
    /// Arguments whose shapes the plan relies on.
    shaping: Vec<bool>,
}

impl Builder<'_> {
    /// The traced tensor in `slot`, when it is an f32 tensor.
    fn floats(&self, slot: usize) -> Option<&[usize]> {
        match &self.traced[slot] {
            Traced::Tensor(shape, DType::F32) => Some(shape),
            _ => None,
        }
    }

    /// The number of values of the traced f32 tensor in `slot`.
    fn count(&self, slot: usize) -> Option<usize> {
        self.floats(slot).map(|shape| shape.iter().product())
    }

    /// The traced q8_0 tensor in `slot` (quantized activations).
    fn q8_0(&self, slot: usize) -> Option<&[usize]> {
        match &self.traced[slot] {
            Traced::Quantized(shape, QuantFormat::Q8_0) => Some(shape),
            _ => None,
        }
    }

    /// The operand in `slot`, read as floats whose shape decides the step's results.
    fn shaping(&mut self, slot: usize) -> Option<Src> {
        self.floats(slot)?;
        let src = self.src[slot]?;
        if let Src::Arg { i, .. } = src {
            self.shaping[i] = true;
        }
        matches!(src, Src::Arena(_) | Src::Arg { .. } | Src::Constant(_)).then_some(src)
    }

    /// The argument in `slot`, read for its values (ints).
    fn arg(&self, slot: usize) -> Option<usize> {
        match self.src[slot]? {
            Src::Arg { i, .. } => Some(i),
            _ => None,
        }
    }

    /// A new arena buffer of `len` floats made at `step` for `slot`.
    fn define(&mut self, slot: usize, step: usize, len: usize) -> Buf {
        let buf = self.scratch(step, len);
        self.buffers[buf.at].2 = self.last_use[slot].max(step);
        self.src[slot] = Some(Src::Arena(buf));
        buf
    }

    /// A buffer of `len` floats used at `step` only.
    fn scratch(&mut self, step: usize, len: usize) -> Buf {
        self.buffers.push((len, step, step));
        Buf {
            at: self.buffers.len() - 1,
            len,
        }
    }

    /// `result` is `operand` under another shape (a reshape): the same place, whose
    /// buffer then lives as long as either.
    fn alias(&mut self, result: usize, operand: usize) -> Option<()> {
        let src = self.src[operand]?;
        self.src[result] = Some(src);
        if let Src::Arena(buf) = src {
            let last = &mut self.buffers[buf.at].2;
            *last = (*last).max(self.last_use[result]);
        }
        Some(())
    }
}

impl CallPlan {
    /// The plan of `steps` for the shapes `traced` saw (by slot), where `params` are the
    /// slots of the arguments and `constants` the program's constant values by slot;
    /// `None` when a step is not one a plan runs, or the trace does not fit it.
    pub(super) fn new(
        steps: &[PlanStep],
        params: &[usize],
        constants: &[(usize, Rc<Value>)],
        traced: &[Traced],
    ) -> Option<CallPlan> {
        let slots = traced.len();
        let mut last_use = vec![0; slots];
        for (i, step) in steps.iter().enumerate() {
            for &s in step.inputs {
                last_use[s] = i;
            }
        }
        let mut b = Builder {
            traced,
            src: vec![None; slots],
            buffers: Vec::new(),
            last_use,
            cache: None,
            shaping: vec![false; params.len()],
        };
        let mut cache_arg = None;
        for (i, &s) in params.iter().enumerate() {
            match traced[s] {
                Traced::Tensor(ref shape, _) => {
                    let len = shape.iter().product();
                    b.src[s] = Some(Src::Arg { i, len });
                }
                // One KV cache, passed from step to step.
                Traced::Cache if cache_arg.is_none() => {
                    b.src[s] = Some(Src::Cache);
                    b.cache = Some(s);
                    cache_arg = Some(i);
                }
                _ => return None,
            }
        }
        for (s, v) in constants {
            b.src[*s] = Some(Src::Constant(Rc::as_ptr(v)));
        }
        let mut calls = Vec::new();
        let mut returns = None;
        for (i, step) in steps.iter().enumerate() {
            let op = match &step.kind {
                StepKind::Return => {
                    returns = Some((plan_return(&mut b, step.inputs)?, i));
                    continue;
                }
                StepKind::Columns { width, parts } => {
                    plan_columns(&mut b, i, step, (*width, parts))?
                }
                StepKind::Kernel {
                    kernel,
                    entry,
                    prologue,
                } => match plan_kernel(&mut b, i, step, kernel, (*entry, *prologue))? {
                    Some(op) => op,
                    // A reshape: nothing runs.
                    None => continue,
                },
                StepKind::Other => return None,
            };
            calls.push(Call { step: i, op });
        }
        let (returns, return_step) = returns?;
        // Arena offsets in floats, each buffer aligned as `plan-buffers` aligns.
        let bytes: Vec<(u64, usize, usize)> = b
            .buffers
            .iter()
            .map(|&(len, first, last)| ((4 * len.max(1)) as u64, first, last))
            .collect();
        let (offsets, arena_bytes) = place_buffers(&bytes);
        let place = |buf: &mut Buf| buf.at = offsets[buf.at] as usize / 4;
        for call in &mut calls {
            call.op.place(&place);
        }
        let mut returns = returns;
        for r in &mut returns {
            if let Returned::Tensor(src, _) = r {
                src.place(&place);
            }
        }
        let key = params
            .iter()
            .enumerate()
            .map(|(i, &s)| match &traced[s] {
                Traced::Tensor(shape, _) if b.shaping[i] => Some(shape.clone()),
                _ => None,
            })
            .collect();
        // Every buffer is whole floats at an aligned offset: the arena is whole floats.
        let arena_len = arena_bytes as usize / 4;
        Some(CallPlan {
            key,
            calls,
            returns,
            return_step,
            cache_arg,
            arena: RefCell::new(vec![0.0; arena_len]),
        })
    }

    /// Whether the plan was made for the shapes of `args`.
    pub(super) fn fits(&self, args: &[Value]) -> bool {
        args.len() == self.key.len()
            && self
                .key
                .iter()
                .zip(args)
                .all(|(key, arg)| match (key, arg) {
                    (None, _) => true,
                    (Some(shape), Value::Tensor(t)) => t.shape == *shape,
                    (Some(_), _) => false,
                })
    }

    /// Runs the plan on `args` (checked against the function type by the caller) with the
    /// program's kernels and tables.
    pub(super) fn run(&self, k: &Kernels, mut args: Vec<Value>) -> Result<Vec<Value>, PlanError> {
        let placeholder = || Value::Tensor(Tensor::from_f32(vec![0], DType::F32, Vec::new()));
        let mut cache = match self.cache_arg {
            Some(i) => match std::mem::replace(&mut args[i], placeholder()) {
                Value::Cache(c) => Some(c),
                other => {
                    return Err((
                        self.return_step,
                        format!("expected a KV cache, found {}", other.kind()),
                    ));
                }
            },
            None => None,
        };
        let mut arena = self.arena.borrow_mut();
        let base = arena.as_mut_ptr();
        let frame = Frame { base, args: &args };
        for call in &self.calls {
            call.op
                .run(k, frame, &mut cache)
                .map_err(|m| (call.step, m))?;
        }
        let mut out = Vec::with_capacity(self.returns.len());
        for r in &self.returns {
            out.push(match r {
                Returned::Tensor(src, shape) => {
                    let values = frame
                        .floats(*src)
                        .map_err(|m| (self.return_step, m))?
                        .to_vec();
                    Value::Tensor(Tensor::from_f32(shape.clone(), DType::F32, values))
                }
                Returned::Cache => Value::Cache(
                    cache
                        .take()
                        .ok_or((self.return_step, "the cache is returned twice".to_string()))?,
                ),
            });
        }
        Ok(out)
    }
}

/// The return's operands: arena tensors, arguments or constants (copied out), and the
/// KV cache.
fn plan_return(b: &mut Builder, inputs: &[usize]) -> Option<Vec<Returned>> {
    inputs
        .iter()
        .map(|&s| match b.src[s]? {
            Src::Cache if b.cache == Some(s) => Some(Returned::Cache),
            Src::Cache => None,
            // An argument returned as it is: its shape is the result's.
            _ => Some(Returned::Tensor(b.shaping(s)?, b.floats(s)?.to_vec())),
        })
        .collect()
}

/// Merged column slices of `x`.
fn plan_columns(
    b: &mut Builder,
    i: usize,
    step: &PlanStep,
    (width, parts): (usize, &[(usize, usize)]),
) -> Option<Op> {
    let [x] = step.inputs else { return None };
    let shape = b.floats(*x)?.to_vec();
    let x = b.shaping(*x)?;
    if shape.last() != Some(&width) || parts.len() != step.outputs.len() {
        return None;
    }
    let rows = shape.iter().product::<usize>() / width.max(1);
    let mut planned = Vec::with_capacity(parts.len());
    for (&(offset, len), &result) in parts.iter().zip(step.outputs) {
        if offset + len > width || b.count(result)? != rows * len {
            return None;
        }
        planned.push((offset, len, b.define(result, i, rows * len)));
    }
    Some(Op::Columns {
        x,
        width,
        parts: planned,
    })
}

/// A kernel step's call (`None` inside for a reshape, which runs nothing).
fn plan_kernel(
    b: &mut Builder,
    i: usize,
    step: &PlanStep,
    kernel: &Kernel,
    (entry, prologue): (Option<*const u8>, Option<*const u8>),
) -> Option<Option<Op>> {
    let inputs = step.inputs;
    let result = *step.outputs.first()?;
    let op = match (kernel, entry) {
        (Kernel::Move(Movement::Reshape), _) => {
            let [x] = inputs else { return None };
            b.floats(*x)?;
            b.floats(result)?;
            b.alias(result, *x)?;
            return Some(None);
        }
        (Kernel::Contraction(c), Some(f)) => {
            let (norm, rest) = match prologue {
                Some(norm) => {
                    let [x, gain, rest @ ..] = inputs else {
                        return None;
                    };
                    (Some((norm, *x, *gain)), rest)
                }
                None => (None, inputs),
            };
            let (x, w, residual) = match (norm, rest) {
                (Some((_, x, _)), [w, residual @ ..]) => (x, *w, residual),
                (None, [x, w, residual @ ..]) => (*x, *w, residual),
                _ => return None,
            };
            let x_shape = if c.q8_0_input {
                // Quantized activations come from an earlier step.
                (norm.is_none() && matches!(b.src[x]?, Src::Arena(_))).then_some(())?;
                b.q8_0(x)?.to_vec()
            } else {
                b.floats(x)?.to_vec()
            };
            if x_shape.last() != Some(&c.k) || residual.len() != usize::from(c.residual) {
                return None;
            }
            let rows = x_shape.iter().product::<usize>() / c.k.max(1);
            let Src::Constant(wv) = b.src[w]? else {
                return None;
            };
            // SAFETY: the program keeps its constants alive as long as its plans.
            let wbytes = calls::weight_bytes(c, unsafe { &*wv }).ok()?;
            let len = rows * c.n;
            let residual = match residual {
                [r] if b.count(*r)? == len => Some(b.shaping(*r)?),
                [] => None,
                _ => return None,
            };
            let x_src = if c.q8_0_input {
                b.src[x]?
            } else {
                b.shaping(x)?
            };
            let norm = match norm {
                Some((f, _, gain)) if b.floats(gain)? == [c.k] => {
                    Some((f, b.shaping(gain)?, b.scratch(i, rows * c.k)))
                }
                Some(_) => return None,
                None => None,
            };
            (b.count(result)? == len).then_some(())?;
            Op::Contraction {
                c: *c,
                f,
                norm,
                x: x_src,
                weight: (wbytes.as_ptr(), wbytes.len()),
                residual,
                rows,
                out: b.define(result, i, len),
            }
        }
        (
            Kernel::Quantize {
                format: WeightFormat::Q8_0,
                rows,
                k,
            },
            Some(f),
        ) => {
            let [x] = inputs else { return None };
            let shape = b.floats(*x)?.to_vec();
            let len = shape.iter().product::<usize>();
            if !whole_rows(*rows, len, *k) || shape.last() != Some(k) || b.q8_0(result)? != shape {
                return None;
            }
            let bytes = storage_bytes(&QuantFormat::Q8_0, &shape);
            Op::Quantize {
                f,
                x: b.shaping(*x)?,
                out: b.define(result, i, bytes.div_ceil(4)),
                bytes,
            }
        }
        (Kernel::RmsNorm { d, .. }, Some(f)) => {
            let [x, gain] = inputs else { return None };
            let len = b.count(*x)?;
            if b.floats(*x)?.last() != Some(d)
                || b.floats(*gain)? != [*d]
                || b.count(result)? != len
            {
                return None;
            }
            Op::RmsNorm {
                f,
                d: *d,
                x: b.shaping(*x)?,
                gain: b.shaping(*gain)?,
                out: b.define(result, i, len),
            }
        }
        (Kernel::Elementwise(body), Some(f)) => {
            let shape = b.floats(*inputs.first()?)?.to_vec();
            if body.dtype != DType::F32
                || body.args != inputs.len()
                || inputs.iter().any(|&s| b.floats(s) != Some(&shape))
            {
                return None;
            }
            let len = shape.iter().product::<usize>();
            (b.count(result)? == len).then_some(())?;
            let srcs = inputs
                .iter()
                .map(|&s| b.shaping(s))
                .collect::<Option<Vec<_>>>()?;
            Op::Elementwise {
                f,
                inputs: srcs,
                out: b.define(result, i, len),
            }
        }
        (Kernel::Rope { heads, d, .. }, Some(f)) => {
            let (x, positions, factors) = match inputs {
                [x, positions] => (x, positions, None),
                [x, positions, factors] => {
                    b.floats(*factors)?;
                    (x, positions, Some(b.src[*factors]?))
                }
                _ => return None,
            };
            let len = b.count(*x)?;
            (b.count(result)? == len).then_some(())?;
            Op::Rope {
                f,
                kernel: kernel.clone(),
                factors,
                row: heads * d,
                x: b.shaping(*x)?,
                positions: b.arg(*positions)?,
                out: b.define(result, i, len),
            }
        }
        (
            Kernel::Attention {
                heads,
                kv_heads,
                d,
                source:
                    source @ AttentionSource::Paged {
                        layer,
                        window,
                        append,
                        ..
                    },
                sinks,
                ..
            },
            Some(f),
        ) => {
            let q_shape = b.floats(*inputs.first()?)?.to_vec();
            if q_shape.len() != 4 || q_shape[2..] != [*heads, *d] {
                return None;
            }
            // The cache in use; an append updates it in place, so nothing may read the
            // old one after.
            let cache = *inputs.get(1)?;
            if b.cache != Some(cache) || (*append && b.last_use[cache] != i) {
                return None;
            }
            let (append, rest) = match (append, inputs) {
                (true, [_, _, keys, values, slots, rest @ ..]) if step.outputs.len() == 2 => {
                    let rows = q_shape[0] * q_shape[1] * kv_heads * d;
                    if [*keys, *values].iter().any(|&s| b.count(s) != Some(rows)) {
                        return None;
                    }
                    let appended = (b.shaping(*keys)?, b.shaping(*values)?, b.arg(*slots)?);
                    // The updated cache is the one later steps read.
                    b.cache = Some(step.outputs[1]);
                    b.src[step.outputs[1]] = Some(Src::Cache);
                    (Some(appended), rest)
                }
                (false, [_, _, rest @ ..]) if step.outputs.len() == 1 => (None, rest),
                _ => return None,
            };
            let (tables, lens, sinks) = match (rest, sinks) {
                ([tables, lens], false) => (tables, lens, None),
                ([tables, lens, sinks], true) => {
                    (b.count(*sinks)? == *heads).then_some(())?;
                    (tables, lens, Some(b.shaping(*sinks)?))
                }
                _ => return None,
            };
            let len = q_shape.iter().product::<usize>();
            (b.count(result)? == len).then_some(())?;
            Op::Attention {
                f,
                shape: [*heads, *kv_heads, *d],
                element: source.element(),
                layer: *layer,
                window: *window,
                q: b.shaping(inputs[0])?,
                append,
                tables: b.arg(*tables)?,
                lens: b.arg(*lens)?,
                sinks,
                sequences: [q_shape[0], q_shape[1]],
                out: b.define(result, i, len),
            }
        }
        (
            Kernel::Move(Movement::Rows {
                dim, vocab, panels, ..
            }),
            _,
        ) => {
            let [table, ids] = inputs else { return None };
            let Src::Constant(table) = b.src[*table]? else {
                return None;
            };
            let Traced::Tensor(ids_shape, _) = &b.traced[*ids] else {
                return None;
            };
            let ids_shape = ids_shape.clone();
            let ids = b.arg(*ids)?;
            b.shaping[ids] = true;
            let len = ids_shape.iter().product::<usize>() * dim;
            (b.count(result)? == len).then_some(())?;
            Op::Gather {
                table,
                shape: [*vocab, *dim],
                panels: *panels,
                ids,
                out: b.define(result, i, len),
            }
        }
        _ => return None,
    };
    Some(Some(op))
}

/// The arena and arguments calls read and write.
#[derive(Clone, Copy)]
struct Frame<'a> {
    base: *mut f32,
    args: &'a [Value],
}

impl<'a> Frame<'a> {
    /// The floats of `src`.
    fn floats(&self, src: Src) -> Result<&[f32], String> {
        match src {
            // SAFETY: the plan placed `len` floats at `at` inside the arena, and no buffer
            // a call writes overlaps one it reads.
            Src::Arena(Buf { at, len }) => {
                Ok(unsafe { std::slice::from_raw_parts(self.base.add(at), len) })
            }
            Src::Arg { i, len } => {
                let values = self.args[i].tensor()?.floats()?;
                if values.len() != len {
                    return Err(format!(
                        "argument #{i} holds {} values, not the {len} of its shape",
                        values.len()
                    ));
                }
                Ok(values)
            }
            // SAFETY: the program keeps its constants alive as long as its plans.
            Src::Constant(v) => unsafe { &*v }.tensor()?.floats(),
            Src::Cache => Err("the KV cache is not a tensor".into()),
        }
    }

    /// The bytes of the arena buffer `src` (quantized activations).
    fn bytes(&self, src: Src) -> Result<&[u8], String> {
        match src {
            // SAFETY: as in `floats`; any float is four plain bytes.
            Src::Arena(Buf { at, len }) => {
                Ok(unsafe { std::slice::from_raw_parts(self.base.add(at).cast::<u8>(), 4 * len) })
            }
            _ => Err("quantized activations are not in the arena".into()),
        }
    }

    /// The floats of `buf`, a buffer the current call writes.
    fn output(self, buf: Buf) -> &'a mut [f32] {
        // SAFETY: as in `floats`: the call's results are placed apart from every buffer
        // live during it.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(buf.at), buf.len) }
    }

    /// The ints of argument `i`.
    fn ints(&self, i: usize) -> Result<&[i64], String> {
        self.args[i].tensor()?.ints()
    }
}

impl Src {
    /// Places an arena operand's buffer ([`Buf`]).
    fn place(&mut self, place: &impl Fn(&mut Buf)) {
        if let Src::Arena(buf) = self {
            place(buf);
        }
    }
}

impl Op {
    /// Places every arena buffer the call reads or writes.
    fn place(&mut self, place: &impl Fn(&mut Buf)) {
        match self {
            Op::Contraction {
                norm,
                x,
                residual,
                out,
                ..
            } => {
                if let Some((_, gain, normed)) = norm {
                    gain.place(place);
                    place(normed);
                }
                x.place(place);
                if let Some(r) = residual {
                    r.place(place);
                }
                place(out);
            }
            Op::RmsNorm { x, gain, out, .. } => {
                x.place(place);
                gain.place(place);
                place(out);
            }
            Op::Elementwise { inputs, out, .. } => {
                inputs.iter_mut().for_each(|x| x.place(place));
                place(out);
            }
            Op::Columns { x, parts, .. } => {
                x.place(place);
                parts.iter_mut().for_each(|part| place(&mut part.2));
            }
            Op::Quantize { x, out, .. } | Op::Rope { x, out, .. } => {
                x.place(place);
                place(out);
            }
            Op::Attention {
                q,
                append,
                sinks,
                out,
                ..
            } => {
                q.place(place);
                if let Some(sinks) = sinks {
                    sinks.place(place);
                }
                if let Some((keys, values, _)) = append {
                    keys.place(place);
                    values.place(place);
                }
                place(out);
            }
            Op::Gather { out, .. } => place(out),
        }
    }

    /// Runs the call, which reads and writes `frame` and may update `cache`.
    fn run(&self, k: &Kernels, frame: Frame, cache: &mut Option<KvCache>) -> Result<(), String> {
        match self {
            Op::Contraction {
                c,
                f,
                norm,
                x,
                weight,
                residual,
                rows,
                out,
            } => {
                let x_rows = if c.q8_0_input {
                    Rows::of_q8_0(frame.bytes(*x)?, *rows)
                } else {
                    let xs = frame.floats(*x)?;
                    let xs = match norm {
                        Some((norm, gain, normed)) => {
                            let normed = frame.output(*normed);
                            norm_into(*norm, c.k, (xs, frame.floats(*gain)?), normed);
                            &*normed
                        }
                        None => xs,
                    };
                    Rows::of_floats(xs, c.k)
                };
                let residual = residual.map(|r| frame.floats(r)).transpose()?;
                // SAFETY: the program keeps the checked weight bytes alive.
                let wbytes = unsafe { std::slice::from_raw_parts(weight.0, weight.1) };
                contract_into(k, c, *f, (x_rows, wbytes, residual), frame.output(*out));
            }
            Op::Quantize { f, x, out, bytes } => {
                let xs = frame.floats(*x)?;
                let q = frame.output(*out);
                // SAFETY: the buffer's floats are plain bytes to the quantizer.
                let q = unsafe { std::slice::from_raw_parts_mut(q.as_mut_ptr().cast(), *bytes) };
                quantize_into(*f, xs, q);
            }
            Op::RmsNorm { f, d, x, gain, out } => {
                let y = frame.output(*out);
                norm_into(*f, *d, (frame.floats(*x)?, frame.floats(*gain)?), y);
            }
            Op::Elementwise { f, inputs, out } => {
                let mut ptrs = smallvec::SmallVec::<[i64; 8]>::new();
                for &src in inputs {
                    ptrs.push(frame.floats(src)?.as_ptr() as i64);
                }
                elementwise_into(*f, &ptrs, frame.output(*out));
            }
            Op::Columns { x, width, parts } => {
                let xs = frame.floats(*x)?;
                for &(offset, len, out) in parts {
                    copy_columns(xs, *width, (offset, len), frame.output(out));
                }
            }
            Op::Rope {
                f,
                kernel,
                factors,
                row,
                x,
                positions,
                out,
            } => {
                let factors = match factors {
                    Some(src) => frame.floats(*src)?,
                    None => &[],
                };
                let angles = crate::kernel::rope_angles(kernel, factors)?;
                let y = frame.output(*out);
                y.copy_from_slice(frame.floats(*x)?);
                rotate_in_place(k, (*f, &angles, *row), frame.ints(*positions)?, y)?;
            }
            Op::Attention {
                f,
                shape: [heads, kv_heads, d],
                element,
                layer,
                window,
                q,
                append,
                tables,
                lens,
                sinks,
                sequences,
                out,
            } => {
                let sinks = sinks.map(|s| frame.floats(s)).transpose()?;
                if sinks.is_some_and(|s| s.len() != *heads) {
                    return Err(format!(
                        "the attention sinks are not one for each of {heads} heads"
                    ));
                }
                let cache = cache.as_mut().ok_or("no KV cache")?;
                if let Some((keys, values, slots)) = append {
                    let kv = (frame.floats(*keys)?, frame.floats(*values)?);
                    write_rows(cache, *layer, kv, frame.ints(*slots)?)?;
                }
                let y = frame.output(*out);
                y.fill(0.0);
                let rows = AttentionRows::new(*f, [*heads, *d], frame.floats(*q)?, sinks);
                let source = PagedSource {
                    cache,
                    layer: *layer,
                    window: *window,
                    kv_heads: *kv_heads,
                    element: *element,
                };
                let (tables, lens) = (frame.args[*tables].tensor()?, frame.args[*lens].tensor()?);
                source.attend(k, &rows, (*sequences, tables, lens), y)?;
            }
            Op::Gather {
                table,
                shape,
                panels,
                ids,
                out,
            } => {
                // SAFETY: the program keeps its constants alive as long as its plans.
                let table = Table::of(unsafe { &**table }, *shape, *panels)?;
                table.gather_into(frame.ints(*ids)?, frame.output(*out))?;
            }
        }
        Ok(())
    }
}
