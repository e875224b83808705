//! Kernel generators: one CLIF function per [`Kernel`], specialised to its static shapes.
//!
//! Every kernel takes `i64` parameters (pointers and counts) and returns nothing; the
//! signatures are listed in [`Kernel::params`](super::jit) and checked by the callers in
//! `program.rs` before any call. f32 data is processed as `f32x4` with several accumulators;
//! lengths that are not multiples of the vector width finish with static scalar tails.

use cranelift_codegen::ir::{
    ConstantData, Endianness, FuncRef, GlobalValue, InstBuilder, MemFlagsData, StackSlotData,
    StackSlotKind, Value,
    condcodes::{FloatCC, IntCC},
    types,
};
use cranelift_frontend::{FunctionBuilder, Variable};
use llm_ir::{
    interp::eval::{
        attention::Scoring,
        fused::{ScalarBody, ScalarStep},
    },
    types::Reduction,
};

use super::{
    attention, dequant,
    emit::{
        accumulate, address, erf, exp, for_range, horizontal_max, horizontal_sum, mem, relu, splat,
        tanh, zeroed_accumulators,
    },
};
use crate::kernel::{Contraction, Kernel, PANEL_COLS, PANEL_ROWS, WeightFormat};

/// Number of `i64` parameters of `kernel`'s function.
pub fn param_count(kernel: &Kernel) -> usize {
    match kernel {
        // x, w, y, m, j0, j1, residual (0 without one)
        Kernel::Contraction(_) => 7,
        // inputs (array of pointers), out, len
        Kernel::Elementwise(_) => 3,
        // x, g, y, rows
        Kernel::RmsNorm { .. } => 4,
        // x, y, rows (of n values, or groups of n * inner)
        Kernel::Softmax { .. } => 3,
        // x, indices (i64), rows (as for softmax)
        Kernel::Argmax { .. } => 3,
        // x, w, b, y, rows
        Kernel::LayerNorm { .. } => 5,
        // x (rotated in place), cos, sin, tokens
        Kernel::Rope { .. } => 4,
        // q, k, v, offsets, count, out (, the query row's mask values) (, the sinks)
        Kernel::Attention { source, sinks, .. } => {
            6 + usize::from(source.masked()) + usize::from(*sinks)
        }
        // x, w, y, batch, m, k, n, w's batch stride in floats (0: shared)
        Kernel::BatchedMatmul { .. } => 8,
        // x, y, len
        Kernel::Cast { .. } => 3,
        // inputs (array of pointers), out, dims (4 i64), strides (4 i64 per input)
        Kernel::Broadcast(_) => 4,
        // quantized bytes, out
        Kernel::Dequantize { .. } => 2,
        // x, quantized bytes, number of floats
        Kernel::Quantize { .. } => 3,
        // a, b, out, len
        Kernel::Fold(_) => 4,
        // No code of their own: data movement runs on the host, a sharded linear layer
        // and an expert contraction run their contraction's code, a collective its fold's
        // (`Kernel::code`), a top-k the reference's routine.
        Kernel::Move(_)
        | Kernel::Slice { .. }
        | Kernel::Transpose { .. }
        | Kernel::Mesh(_)
        | Kernel::ShardedLinear { .. }
        | Kernel::ExpertContraction { .. }
        | Kernel::TopK { .. }
        | Kernel::AllReduce { .. }
        | Kernel::ReduceScatter { .. }
        | Kernel::KvAppend { .. }
        | Kernel::KvLookup { .. } => 0,
    }
}

/// The imported microkernels a kernel may call (see [`super::ukernel`]) and the data it
/// reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tiles {
    /// `panel_rows` (`f16_panel_rows`, `bf16_panel_rows`), for every row of x against a
    /// panel of f32 (16-bit) weights.
    pub panel_rows: Option<FuncRef>,
    /// `q8_0_row`, `q4_0_row`, `q4_k_row`, `q6_k_row`, `f16_row` or `bf16_row`, for one row
    /// against a quantized weight row.
    pub quant_row: Option<FuncRef>,
    /// `q8dot::by_q8_0_rows` (q8_0, q4_0, q4_1, q5_0, q5_1 or iq4_nl weights) or a
    /// K-quant's, iq4_xs's, a lattice, ternary, binary or 4-bit float format's
    /// `kq8dot::*_by_q8_0_rows` (`kq8dot::SYMBOLS`; q1_0's and the 4-bit floats' only where
    /// K is a multiple of 256),
    /// for a run of weight rows against every q8_0 row of x.
    pub q8_0_rows: Option<FuncRef>,
    /// `q8dot::by_q8_0_panels` (the same formats of 32-value blocks), for a run of block panels
    /// ([`Contraction::block_panels`]) against every q8_0 row of x (in tiles of rows).
    pub q8_0_panels: Option<FuncRef>,
    /// `attention_row`, for a whole unmasked attention row whose heads fit it
    /// ([`super::attention::fits`]).
    pub attention: Option<FuncRef>,
    /// The grid a lattice-format weight's decoder reads ([`super::lattice::GRIDS`]),
    /// imported as data (on every target: the generated decoder needs it).
    pub grid: Option<GlobalValue>,
}

/// Emits the body of `kernel` into `b`, whose entry block holds the parameters `p`;
/// `tiles` are the microkernels the target has.
pub fn emit(b: &mut FunctionBuilder, kernel: &Kernel, p: &[Value], tiles: Tiles) {
    match kernel {
        Kernel::Contraction(c) => emit_contraction(b, c, p, tiles),
        Kernel::Elementwise(body) => emit_elementwise(b, body, p),
        Kernel::RmsNorm { d, eps_bits } => emit_rms_norm(b, *d, f32::from_bits(*eps_bits), p),
        Kernel::Softmax { n, inner: 1 } => emit_softmax(b, *n, p),
        Kernel::Softmax { n, inner } => emit_strided_softmax(b, *n, *inner, p),
        Kernel::Argmax { n, inner: 1, .. } => emit_argmax(b, *n, p),
        Kernel::Argmax { n, inner, .. } => emit_strided_argmax(b, *n, *inner, p),
        Kernel::LayerNorm { d, eps_bits } => emit_layer_norm(b, *d, f32::from_bits(*eps_bits), p),
        Kernel::Rope {
            heads,
            d,
            rotary,
            half,
            ..
        } => emit_rope(b, *heads, *d, *rotary, *half, p),
        Kernel::Attention {
            heads,
            kv_heads,
            d,
            scoring,
            source,
            sinks,
        } => {
            let mask = source.masked().then(|| p[6]);
            let sinks = sinks.then(|| p[6 + usize::from(source.masked())]);
            match tiles.attention {
                Some(tile) if mask.is_none() => {
                    let shape = attention::shape_word(source.element(), *heads, *kv_heads, *d);
                    let factor = i64::from(scoring.scale.factor().to_bits());
                    // No soft-cap is 0: a cap is positive.
                    let cap = i64::from(scoring.softcap.map_or(0, f32::to_bits));
                    let mut args = p[..6].to_vec();
                    for word in [shape, factor, cap] {
                        args.push(b.ins().iconst(types::I64, word));
                    }
                    // No sinks is a null pointer.
                    args.push(sinks.unwrap_or_else(|| b.ins().iconst(types::I64, 0)));
                    b.ins().call(tile, &args);
                }
                _ => emit_attention(b, [*heads, *kv_heads, *d], *scoring, &p[..6], [mask, sinks]),
            }
        }
        Kernel::BatchedMatmul { transposed } => emit_batched_matmul(b, *transposed, p),
        Kernel::Cast { from, to } => super::convert::emit_cast(b, *from, *to, p),
        Kernel::Broadcast(body) => emit_broadcast(b, body, p),
        Kernel::Dequantize { weight, rows, k } => {
            dequant::emit_dequantize(b, (*weight, tiles.grid), [*rows, *k], p)
        }
        Kernel::Quantize { format, rows, k } => {
            super::quantize::emit_quantize(b, *format, (*rows, *k), p)
        }
        Kernel::Fold(reduction) => emit_fold(b, *reduction, p),
        // No code of their own (`Kernel::code`): data movement runs on the host, a sharded
        // linear layer runs its local contraction's code, a collective its fold's.
        Kernel::Move(_)
        | Kernel::Slice { .. }
        | Kernel::Transpose { .. }
        | Kernel::Mesh(_)
        | Kernel::ShardedLinear { .. }
        | Kernel::ExpertContraction { .. }
        | Kernel::TopK { .. }
        | Kernel::AllReduce { .. }
        | Kernel::ReduceScatter { .. }
        | Kernel::KvAppend { .. }
        | Kernel::KvLookup { .. } => {}
    }
}

/// `y[i, j] = dot(x[i, :], w[j, :])` for `i < m`, `j0 <= j < j1`: blocks of rows of `w`
/// outside, rows of `x` inside (the weight block stays in L1 across the rows of `x`). With
/// the panel tile, one call takes every row of x against a panel (`panel_rows`); with a
/// quantized row tile, every row calls it; without tiles, every row runs the generated
/// dot product.
fn emit_contraction(b: &mut FunctionBuilder, c: &Contraction, p: &[Value], tiles: Tiles) {
    let (x, w, y, m, j0, j1, residual) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6]);
    let add_residual = |b: &mut FunctionBuilder, i: Value, j: Value, count: usize| {
        if c.residual {
            emit_residual(b, c.n, [y, residual], [i, j], count);
        }
    };
    match (tiles.q8_0_rows, tiles.q8_0_panels) {
        (Some(rows), Some(panels)) if c.block_panels => {
            emit_q8_0_chunks(b, c, p, (rows, Some(panels)));
            return;
        }
        (Some(rows), _) if c.q8_0_input && !c.block_panels => {
            emit_q8_0_chunks(b, c, p, (rows, None));
            return;
        }
        _ => {}
    }
    // Row-major weights are read one row at a time: a single sequential stream, which the
    // hardware prefetcher follows (4 interleaved short rows ran at less than half the
    // bandwidth). Panels (f32, or 16-bit in block panels) give 4 rows in one stream,
    // sharing the loads of x.
    let panels =
        c.weight == WeightFormat::F32Panels || (c.block_panels && c.weight.is_sixteen_bit());
    let rows = if panels { PANEL_ROWS } else { 1 };
    // The 16-bit format the generated code widens, if any.
    let half = c.weight.is_sixteen_bit().then_some(c.weight);
    let zero = b.ins().iconst(types::I64, 0);
    // j0 + floor((j1 - j0) / rows) * rows: where the single-row tail starts.
    let span = b.ins().isub(j1, j0);
    let whole = b.ins().band_imm_s(span, !(rows as i64 - 1));
    let blocked_end = b.ins().iadd(j0, whole);
    let row_bytes = c.weight.row_bytes(c.k) as i64;
    let x_row_bytes = c.x_row_bytes() as i64;
    let mut ranges = vec![(j0, blocked_end, rows)];
    if rows > 1 {
        ranges.push((blocked_end, j1, 1));
    }
    for (start, end, count) in ranges {
        for_range(b, start, end, count as i64, |b, j| {
            let wblock = address(b, w, j, row_bytes);
            if let Some(tile) = tiles.panel_rows
                && count == PANEL_ROWS
            {
                let k = b.ins().iconst(types::I64, c.k as i64);
                let n = b.ins().iconst(types::I64, c.n as i64);
                let yj = address(b, y, j, 4);
                b.ins().call(tile, &[k, x, m, wblock, yj, n]);
                if c.residual {
                    for_range(b, zero, m, 1, |b, i| add_residual(b, i, j, PANEL_ROWS));
                }
                return;
            }
            for_range(b, zero, m, 1, |b, i| {
                let xrow = address(b, x, i, x_row_bytes);
                let yrow = address(b, y, i, 4 * c.n as i64);
                let yat = address(b, yrow, j, 4);
                let sums = match (c.weight, tiles.quant_row) {
                    _ if count == PANEL_ROWS => dot_panel(b, half, xrow, wblock, (c.k, PANEL_ROWS)),
                    (WeightFormat::Q8_0 | WeightFormat::Q4_0, _) if c.q8_0_input => {
                        let (row, stride) = block_row(b, c, w, j);
                        vec![super::q8dot::dot_row(b, c.weight, xrow, row, stride, c.k)]
                    }
                    _ if c.q8_0_input => {
                        let row = if c.block_panels {
                            let (row, stride) = block_row(b, c, w, j);
                            (row, Some(stride))
                        } else {
                            (wblock, None)
                        };
                        vec![dequant::dot_row_q8_0_x(
                            b,
                            (c.weight, tiles.grid),
                            xrow,
                            row,
                            c.k,
                        )]
                    }
                    (
                        WeightFormat::Q8_0
                        | WeightFormat::Q4_0
                        | WeightFormat::Q4K
                        | WeightFormat::Q6K
                        | WeightFormat::PackedF16
                        | WeightFormat::PackedBF16,
                        Some(tile),
                    ) => {
                        let k = b.ins().iconst(types::I64, c.k as i64);
                        b.ins().call(tile, &[k, xrow, wblock, yat]);
                        add_residual(b, i, j, 1);
                        return;
                    }
                    // A row of a panel-layout or 16-bit weight (after the last whole panel,
                    // or of a weight computed at run time) in the panels' order, so that a
                    // row's result does not depend on where it lies in the matrix.
                    (
                        WeightFormat::F32Panels
                        | WeightFormat::PackedF16
                        | WeightFormat::PackedBF16,
                        _,
                    ) => dot_panel(b, half, xrow, wblock, (c.k, 1)),
                    // (`F32KN` never reaches code generation: `Kernel::code` has none.)
                    (WeightFormat::F32 | WeightFormat::F32KN, _) => {
                        vec![dot_elems(b, xrow, wblock, c.k)]
                    }
                    _ => vec![dequant::dot_row(b, c, xrow, (w, j, wblock), tiles.grid)],
                };
                let count = sums.len();
                for (r, s) in sums.into_iter().enumerate() {
                    b.ins().store(mem(), s, yat, 4 * r as i32);
                }
                add_residual(b, i, j, count);
            });
        });
    }
}

/// The residual epilogue: `y[i, j..j + count] += residual[i, j..j + count]` (`y` and the
/// residual are `[m, n]`), after the products.
fn emit_residual(
    b: &mut FunctionBuilder,
    n: usize,
    [y, residual]: [Value; 2],
    [i, j]: [Value; 2],
    count: usize,
) {
    let offset = b.ins().imul_imm_s(i, 4 * n as i64);
    let column = b.ins().imul_imm_s(j, 4);
    let offset = b.ins().iadd(offset, column);
    let yat = b.ins().iadd(y, offset);
    let rat = b.ins().iadd(residual, offset);
    for q in 0..count {
        let at = 4 * q as i32;
        let v = b.ins().load(types::F32, mem(), yat, at);
        let r = b.ins().load(types::F32, mem(), rat, at);
        let sum = b.ins().fadd(v, r);
        b.ins().store(mem(), sum, yat, at);
    }
}

/// Weight rows a q8_0-activation microkernel call takes: their blocks stay in L1 or L2
/// across the rows of x.
const Q8_0_ROWS_CHUNK: i64 = 64;

/// Where row `j` of the weight at `w` starts and how far apart its blocks lie: in its
/// block panel (blocks of the panel's four rows in turn) for a
/// [`Contraction::block_panels`] row that a whole panel holds, else row major.
fn block_row(b: &mut FunctionBuilder, c: &Contraction, w: Value, j: Value) -> (Value, Value) {
    let block_bytes = c.weight.row_bytes(32) as i64;
    let row_major = address(b, w, j, c.weight.row_bytes(c.k) as i64);
    let plain = b.ins().iconst(types::I64, block_bytes);
    if !c.block_panels {
        return (row_major, plain);
    }
    let full = (c.n - c.n % PANEL_ROWS) as i64;
    let in_panel = b.ins().icmp_imm_s(IntCC::SignedLessThan, j, full);
    // The panel's first row, then `j % 4` blocks into it.
    let first = b.ins().band_imm_s(j, !(PANEL_ROWS as i64 - 1));
    let panel = address(b, w, first, c.weight.row_bytes(c.k) as i64);
    let lane = b.ins().band_imm_s(j, PANEL_ROWS as i64 - 1);
    let in_panel_at = address(b, panel, lane, block_bytes);
    let interleaved = b.ins().iconst(types::I64, PANEL_ROWS as i64 * block_bytes);
    (
        b.ins().select(in_panel, in_panel_at, row_major),
        b.ins().select(in_panel, interleaved, plain),
    )
}

/// A contraction of q8_0 activations through the microkernels: chunks of
/// [`Q8_0_ROWS_CHUNK`] weight rows outside; per chunk one `rows` call for every row of x
/// (the kernels take them in tiles of rows where that lets a weight block be decoded once
/// for several), then the chunk's residual epilogue. With a `panels` tile (a
/// [`Contraction::block_panels`] weight) a chunk's whole panels go through it first, and
/// only the rows after the last whole panel (row major) through `rows`; chunks then start
/// on a panel (callers split rows in multiples of [`PANEL_ROWS`]).
fn emit_q8_0_chunks(
    b: &mut FunctionBuilder,
    c: &Contraction,
    p: &[Value],
    (rows, panels): (FuncRef, Option<FuncRef>),
) {
    let (x, w, y, m, j0, j1, residual) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6]);
    let zero = b.ins().iconst(types::I64, 0);
    let k = b.ins().iconst(types::I64, c.k as i64);
    let x_row_bytes = c.x_row_bytes() as i64;
    let row_bytes = c.weight.row_bytes(c.k) as i64;
    // Rows before `full` lie in whole panels (none without panels).
    let whole_panels = if panels.is_some() {
        c.n - c.n % PANEL_ROWS
    } else {
        0
    };
    let full = b.ins().iconst(types::I64, whole_panels as i64);
    for_range(b, j0, j1, Q8_0_ROWS_CHUNK, |b, j| {
        let chunk = b.ins().iconst(types::I64, Q8_0_ROWS_CHUNK);
        let left = b.ins().isub(j1, j);
        let count = b.ins().smin(left, chunk);
        let end = b.ins().iadd(j, count);
        // Whole panels: rows j..min(end, full); then rows max(j, full)..end.
        let panel_end = b.ins().smin(end, full);
        let panel_rows = b.ins().isub(panel_end, j);
        let panel_rows = b.ins().smax(panel_rows, zero);
        let panel_count = b
            .ins()
            .ushr_imm_s(panel_rows, PANEL_ROWS.trailing_zeros() as i64);
        let tail_start = b.ins().smax(j, full);
        let tail = b.ins().isub(end, tail_start);
        let tail = b.ins().smax(tail, zero);
        let wpanel = address(b, w, j, row_bytes);
        let wtail = address(b, w, tail_start, row_bytes);
        // Every row of x in one call (the kernels take them in tiles of rows): the whole
        // panels, then the rows after them.
        let x_stride = b.ins().iconst(types::I64, x_row_bytes);
        let y_stride = b.ins().iconst(types::I64, 4 * c.n as i64);
        if let Some(panels) = panels {
            let yat = address(b, y, j, 4);
            let args = [k, x, wpanel, yat, panel_count, m, x_stride, y_stride];
            b.ins().call(panels, &args);
        }
        let ytail = address(b, y, tail_start, 4);
        let args = [k, x, wtail, ytail, tail, m, x_stride, y_stride];
        b.ins().call(rows, &args);
        if c.residual {
            for_range(b, zero, m, 1, |b, i| {
                for_range(b, j, end, 1, |b, jj| {
                    emit_residual(b, c.n, [y, residual], [i, jj], 1);
                });
            });
        }
    });
}

/// A matmul whose dims are all run-time values (`p`: x, w, y, batch, m, k, n, w's batch
/// stride in floats): per batch and row of x, with `w` as `[n, k]` (`transposed`) each
/// output is a 4-lane dot product with a scalar tail; with `w` as `[k, n]` four adjacent
/// outputs share an `f32x4` that accumulates `x[i, p] * w[p, j..j + 4]` in order of `p`,
/// and the last `n % 4` outputs take one lane each.
fn emit_batched_matmul(b: &mut FunctionBuilder, transposed: bool, p: &[Value]) {
    let (x, w, y, batch, m, k, n, w_stride) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]);
    let zero = b.ins().iconst(types::I64, 0);
    let k4 = b.ins().band_imm_s(k, !3);
    let n4 = b.ins().band_imm_s(n, !3);
    let x_row = b.ins().imul_imm_s(k, 4);
    let y_row = b.ins().imul_imm_s(n, 4);
    let w_step = b.ins().imul_imm_s(w_stride, 4);
    for_range(b, zero, batch, 1, |b, bi| {
        let rows = b.ins().imul(bi, m);
        let wb = b.ins().imul(bi, w_step);
        let wb = b.ins().iadd(w, wb);
        for_range(b, zero, m, 1, |b, i| {
            let r = b.ins().iadd(rows, i);
            let xrow = b.ins().imul(r, x_row);
            let xrow = b.ins().iadd(x, xrow);
            let yrow = b.ins().imul(r, y_row);
            let yrow = b.ins().iadd(y, yrow);
            if transposed {
                for_range(b, zero, n, 1, |b, j| {
                    let wrow = b.ins().imul(j, x_row);
                    let wrow = b.ins().iadd(wb, wrow);
                    let acc = zeroed_accumulators(b, 1)[0];
                    for_range(b, zero, k4, 4, |b, q| {
                        let xv = address(b, xrow, q, 4);
                        let xv = b.ins().load(types::F32X4, mem(), xv, 0);
                        let wv = address(b, wrow, q, 4);
                        let wv = b.ins().load(types::F32X4, mem(), wv, 0);
                        accumulate(b, acc, wv, xv);
                    });
                    let a = b.use_var(acc);
                    let total = b.declare_var(types::F32);
                    let sum = horizontal_sum(b, a);
                    b.def_var(total, sum);
                    for_range(b, k4, k, 1, |b, q| {
                        let xs = address(b, xrow, q, 4);
                        let xs = b.ins().load(types::F32, mem(), xs, 0);
                        let ws = address(b, wrow, q, 4);
                        let ws = b.ins().load(types::F32, mem(), ws, 0);
                        let old = b.use_var(total);
                        let new = b.ins().fma(ws, xs, old);
                        b.def_var(total, new);
                    });
                    let t = b.use_var(total);
                    let at = address(b, yrow, j, 4);
                    b.ins().store(mem(), t, at, 0);
                });
            } else {
                let columns = |b: &mut FunctionBuilder, start: Value, end: Value, full: bool| {
                    for_range(b, start, end, if full { 4 } else { 1 }, |b, j| {
                        let acc = zeroed_accumulators(b, 1)[0];
                        for_range(b, zero, k, 1, |b, q| {
                            let xs = address(b, xrow, q, 4);
                            let xs = b.ins().load(types::F32, mem(), xs, 0);
                            let xs = b.ins().splat(types::F32X4, xs);
                            let wrow = b.ins().imul(q, y_row);
                            let wrow = b.ins().iadd(wb, wrow);
                            let at = address(b, wrow, j, 4);
                            let wv = load_lanes(b, at, full, 0.0);
                            accumulate(b, acc, wv, xs);
                        });
                        let a = b.use_var(acc);
                        let at = address(b, yrow, j, 4);
                        store_lanes(b, a, at, full);
                    });
                };
                columns(b, zero, n4, true);
                columns(b, n4, n, false);
            }
        });
    });
}

/// Dot products of one row of x with the `rows` rows of a weight panel (layout in
/// [`pack_panels`](crate::kernel::pack_panels): [`PANEL_ROWS`] rows, or one row-major row,
/// which is a panel of one) of `f32` weights, or with `half` of the 16-bit floats of that
/// format, widened as they load: two `f32x4` accumulators per row over the chunks of 8,
/// then a 4-wide step and scalar tail over the remaining columns.
fn dot_panel(
    b: &mut FunctionBuilder,
    half: Option<WeightFormat>,
    x: Value,
    w: Value,
    (k, rows): (usize, usize),
) -> Vec<Value> {
    let acc = zeroed_accumulators(b, 2 * rows);
    let k8 = k - k % PANEL_COLS;
    let bytes = if half.is_some() { 2 } else { 4 };
    if k8 > 0 {
        let zero = b.ins().iconst(types::I64, 0);
        let end = b.ins().iconst(types::I64, k8 as i64);
        for_range(b, zero, end, PANEL_COLS as i64, |b, p| {
            let xp = address(b, x, p, 4);
            let wp = address(b, w, p, i64::from(bytes) * rows as i64);
            let x0 = b.ins().load(types::F32X4, mem(), xp, 0);
            let x1 = b.ins().load(types::F32X4, mem(), xp, 16);
            for r in 0..rows {
                let at = (PANEL_COLS * r) as i32;
                let w0 = load_weights4(b, half, wp, at);
                accumulate(b, acc[2 * r], w0, x0);
                let w1 = load_weights4(b, half, wp, at + 4);
                accumulate(b, acc[2 * r + 1], w1, x1);
            }
        });
    }
    // Row r's remaining columns start here (in elements).
    let tail = k - k8;
    let tail_at = |r: usize, q: usize| (rows * k8 + r * tail + q) as i32;
    let has_quad = tail >= 4;
    if has_quad {
        let xv = b.ins().load(types::F32X4, mem(), x, 4 * k8 as i32);
        for r in 0..rows {
            let wv = load_weights4(b, half, w, tail_at(r, 0));
            accumulate(b, acc[2 * r], wv, xv);
        }
    }
    (0..rows)
        .map(|r| {
            let mut s = sum_pair(b, acc[2 * r], acc[2 * r + 1]);
            for q in if has_quad { 4 } else { 0 }..tail {
                let xs = b.ins().load(types::F32, mem(), x, 4 * (k8 + q) as i32);
                let ws = load_weight(b, half, w, tail_at(r, q));
                s = b.ins().fma(ws, xs, s);
            }
            s
        })
        .collect()
}

/// Four weights from element `offset` of `at` as an `f32x4`: `f32`s, or with `half` the
/// 16-bit floats of that format, widened ([`dequant::half_lanes`]).
fn load_weights4(
    b: &mut FunctionBuilder,
    half: Option<WeightFormat>,
    at: Value,
    offset: i32,
) -> Value {
    match half {
        Some(format) => {
            let h = b.ins().uload16x4(mem(), at, 2 * offset);
            dequant::half_lanes(b, format, h)
        }
        None => b.ins().load(types::F32X4, mem(), at, 4 * offset),
    }
}

/// One weight of [`load_weights4`].
fn load_weight(
    b: &mut FunctionBuilder,
    half: Option<WeightFormat>,
    at: Value,
    offset: i32,
) -> Value {
    match half {
        Some(format) => dequant::half_scalar(b, format, at, 2 * offset),
        None => b.ins().load(types::F32, mem(), at, 4 * offset),
    }
}

/// The horizontal sum of two `f32x4` accumulators.
fn sum_pair(b: &mut FunctionBuilder, a: Variable, c: Variable) -> Value {
    let a = b.use_var(a);
    let c = b.use_var(c);
    let both = b.ins().fadd(a, c);
    horizontal_sum(b, both)
}

/// Dot product of one row of x with one row-major row of `f32` weights (length `k`): four
/// `f32x4` accumulators over chunks of 16, then 4-wide steps and a scalar tail.
fn dot_elems(b: &mut FunctionBuilder, x: Value, w: Value, k: usize) -> Value {
    let acc = zeroed_accumulators(b, 4);
    let k16 = k - k % 16;
    if k16 > 0 {
        let zero = b.ins().iconst(types::I64, 0);
        let end = b.ins().iconst(types::I64, k16 as i64);
        for_range(b, zero, end, 16, |b, p| {
            let xp = address(b, x, p, 4);
            let wp = address(b, w, p, 4);
            for (a, &v) in acc.iter().enumerate() {
                let xv = b.ins().load(types::F32X4, mem(), xp, 16 * a as i32);
                let wv = b.ins().load(types::F32X4, mem(), wp, 16 * a as i32);
                accumulate(b, v, wv, xv);
            }
        });
    }
    let mut q = k16;
    while k - q >= 4 {
        let xv = b.ins().load(types::F32X4, mem(), x, 4 * q as i32);
        let wv = b.ins().load(types::F32X4, mem(), w, 4 * q as i32);
        accumulate(b, acc[(q - k16) / 4], wv, xv);
        q += 4;
    }
    let lo = sum_pair(b, acc[0], acc[1]);
    let hi = sum_pair(b, acc[2], acc[3]);
    let mut s = b.ins().fadd(lo, hi);
    for q in q..k {
        let xs = b.ins().load(types::F32, mem(), x, 4 * q as i32);
        let ws = b.ins().load(types::F32, mem(), w, 4 * q as i32);
        s = b.ins().fma(ws, xs, s);
    }
    s
}

/// The value of a scalar body on `f32x4` lanes.
fn emit_body(b: &mut FunctionBuilder, body: &ScalarBody, args: &[Value]) -> Value {
    let mut slots = args.to_vec();
    for step in &body.steps {
        let v = match *step {
            ScalarStep::Unary(op, a) => unary(b, op, slots[a]),
            ScalarStep::Binary(op, l, r) => {
                let (l, r) = (slots[l], slots[r]);
                match op {
                    "llm.add" => b.ins().fadd(l, r),
                    "llm.sub" => b.ins().fsub(l, r),
                    "llm.mul" => b.ins().fmul(l, r),
                    "llm.div" => b.ins().fdiv(l, r),
                    // IEEE 754's maximum and minimum, as the reference's: a NaN lane
                    // gives NaN, and `+0` is above `-0`.
                    "llm.maximum" => b.ins().fmax(l, r),
                    "llm.minimum" => b.ins().fmin(l, r),
                    other => unreachable!("no binary op {other} reaches a scalar body"),
                }
            }
            ScalarStep::Constant(c) => splat(b, c),
        };
        // Every step rounds to the body's element type, as a separate op would.
        slots.push(super::convert::round_to(b, body.dtype, v));
    }
    slots[body.result]
}

/// `1 / (1 + exp(-x))`.
fn sigmoid(b: &mut FunctionBuilder, x: Value) -> Value {
    let neg = b.ins().fneg(x);
    let e = exp(b, neg);
    let one = splat(b, 1.0);
    let d = b.ins().fadd(one, e);
    b.ins().fdiv(one, d)
}

/// `cap * tanh(s / cap)` of the scores `s` (`f32x4` lanes): the reference's soft-cap, its
/// division a multiplication by the reciprocal.
fn soft_cap(b: &mut FunctionBuilder, s: Value, cap: f32) -> Value {
    let inverse = splat(b, 1.0 / cap);
    let x = b.ins().fmul(s, inverse);
    let t = tanh(b, x);
    let cap = splat(b, cap);
    b.ins().fmul(t, cap)
}

/// A unary elementwise op on `f32x4` lanes.
fn unary(b: &mut FunctionBuilder, op: &str, x: Value) -> Value {
    match op {
        "llm.exp" => exp(b, x),
        "llm.neg" => b.ins().fneg(x),
        "llm.sqrt" => b.ins().sqrt(x),
        "llm.rsqrt" => {
            let s = b.ins().sqrt(x);
            let one = splat(b, 1.0);
            b.ins().fdiv(one, s)
        }
        "llm.tanh" => tanh(b, x),
        "llm.sigmoid" => sigmoid(b, x),
        "llm.silu" => {
            let s = sigmoid(b, x);
            b.ins().fmul(x, s)
        }
        "llm.erf" => erf(b, x),
        "llm.relu" => relu(b, x),
        // gelu: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        _ => {
            let x3 = b.ins().fmul(x, x);
            let x3 = b.ins().fmul(x3, x);
            let c = splat(b, 0.044_715);
            let inner = b.ins().fma(c, x3, x);
            let k = splat(b, (2.0f32 / std::f32::consts::PI).sqrt());
            let inner = b.ins().fmul(k, inner);
            let t = tanh(b, inner);
            let one = splat(b, 1.0);
            let t1 = b.ins().fadd(one, t);
            let half = splat(b, 0.5);
            let hx = b.ins().fmul(half, x);
            b.ins().fmul(hx, t1)
        }
    }
}

/// `out[i] = body(in_0[i], in_1[i], ...)` for `i < len`: 4 lanes at a time, then one lane.
fn emit_elementwise(b: &mut FunctionBuilder, body: &ScalarBody, p: &[Value]) {
    let (inputs, out, len) = (p[0], p[1], p[2]);
    let ptrs: Vec<Value> = (0..body.args)
        .map(|a| b.ins().load(types::I64, mem(), inputs, 8 * a as i32))
        .collect();
    let zero = b.ins().iconst(types::I64, 0);
    let vec_end = b.ins().band_imm_s(len, !3);
    for_range(b, zero, vec_end, 4, |b, i| {
        let args: Vec<Value> = ptrs
            .iter()
            .map(|&ptr| {
                let at = address(b, ptr, i, 4);
                b.ins().load(types::F32X4, mem(), at, 0)
            })
            .collect();
        let v = emit_body(b, body, &args);
        let at = address(b, out, i, 4);
        b.ins().store(mem(), v, at, 0);
    });
    for_range(b, vec_end, len, 1, |b, i| {
        let args: Vec<Value> = ptrs
            .iter()
            .map(|&ptr| {
                let at = address(b, ptr, i, 4);
                let s = b.ins().load(types::F32, mem(), at, 0);
                b.ins().scalar_to_vector(types::F32X4, s)
            })
            .collect();
        let v = emit_body(b, body, &args);
        let s = b.ins().extractlane(v, 0);
        let at = address(b, out, i, 4);
        b.ins().store(mem(), s, at, 0);
    });
}

/// `out[i] = a[i] (reduction) b[i]` for `i < len` (`p`: a, b, out, len), four at a time,
/// then one lane at a time.
fn emit_fold(b: &mut FunctionBuilder, reduction: Reduction, p: &[Value]) {
    let (x, y, out, len) = (p[0], p[1], p[2], p[3]);
    let combine = |b: &mut FunctionBuilder, l: Value, r: Value| match reduction {
        Reduction::Sum => b.ins().fadd(l, r),
        // `r` where it is beyond `l`, or where `l` is NaN: a NaN loses to a number, and
        // equal values (signed zeros too) give `l`.
        Reduction::Max | Reduction::Min => {
            let beyond = if reduction == Reduction::Max {
                FloatCC::GreaterThan
            } else {
                FloatCC::LessThan
            };
            let take = b.ins().fcmp(beyond, r, l);
            let nan = b.ins().fcmp(FloatCC::Unordered, l, l);
            let take = b.ins().bor(take, nan);
            let take = b.ins().bitcast(types::F32X4, MemFlagsData::new(), take);
            b.ins().bitselect(take, r, l)
        }
    };
    let zero = b.ins().iconst(types::I64, 0);
    let vec_end = b.ins().band_imm_s(len, !3);
    for (start, end, full) in [(zero, vec_end, true), (vec_end, len, false)] {
        for_range(b, start, end, if full { 4 } else { 1 }, |b, i| {
            let (xa, ya, oa) = (
                address(b, x, i, 4),
                address(b, y, i, 4),
                address(b, out, i, 4),
            );
            let l = load_lanes(b, xa, full, 0.0);
            let r = load_lanes(b, ya, full, 0.0);
            let v = combine(b, l, r);
            store_lanes(b, v, oa, full);
        });
    }
}

/// A scalar body over operands that broadcast to the result (`p`: inputs, out, the
/// result's dims padded to rank 4, each input's strides in elements for those dims):
/// loops over the three outer dims, and along the last dim four results at a time. An
/// operand's stride along the last dim is 1 (it varies) or 0 (it repeats); a repeating
/// operand is splatted into a 16-byte stack slot once per row and read there with step 0,
/// so the vector loop has no branch. The `len % 4` last results take one lane each.
fn emit_broadcast(b: &mut FunctionBuilder, body: &ScalarBody, p: &[Value]) {
    let (inputs, out, dims, strides) = (p[0], p[1], p[2], p[3]);
    let args = body.args;
    let ptrs: Vec<Value> = (0..args)
        .map(|a| b.ins().load(types::I64, mem(), inputs, 8 * a as i32))
        .collect();
    let d: Vec<Value> = (0..4)
        .map(|i| b.ins().load(types::I64, mem(), dims, 8 * i))
        .collect();
    // Byte strides per operand and dim.
    let st: Vec<Vec<Value>> = (0..args)
        .map(|a| {
            (0..4)
                .map(|i| {
                    let s = b
                        .ins()
                        .load(types::I64, mem(), strides, 8 * (4 * a + i) as i32);
                    b.ins().imul_imm_s(s, 4)
                })
                .collect()
        })
        .collect();
    let splats = b.create_sized_stack_slot(StackSlotData::new(
        StackSlotKind::ExplicitSlot,
        (16 * args.max(1)) as u32,
        4,
    ));
    let zero = b.ins().iconst(types::I64, 0);
    let d3_4 = b.ins().band_imm_s(d[3], !3);
    let row_bytes = b.ins().imul_imm_s(d[3], 4);
    for_range(b, zero, d[0], 1, |b, i0| {
        for_range(b, zero, d[1], 1, |b, i1| {
            for_range(b, zero, d[2], 1, |b, i2| {
                // The row of the result and of each operand.
                let row = b.ins().imul(i0, d[1]);
                let row = b.ins().iadd(row, i1);
                let row = b.ins().imul(row, d[2]);
                let row = b.ins().iadd(row, i2);
                let yrow = b.ins().imul(row, row_bytes);
                let yrow = b.ins().iadd(out, yrow);
                let mut bases = Vec::with_capacity(args);
                let mut vectors = Vec::with_capacity(args);
                for a in 0..args {
                    let mut base = ptrs[a];
                    for (level, &i) in [i0, i1, i2].iter().enumerate() {
                        let offset = b.ins().imul(i, st[a][level]);
                        base = b.ins().iadd(base, offset);
                    }
                    let first = b.ins().load(types::F32, mem(), base, 0);
                    let lanes = b.ins().splat(types::F32X4, first);
                    let slot = b.ins().stack_addr(types::I64, splats, 16 * a as i32);
                    b.ins().store(mem(), lanes, slot, 0);
                    let repeats = b.ins().icmp_imm_s(IntCC::Equal, st[a][3], 0);
                    vectors.push(b.ins().select(repeats, slot, base));
                    bases.push(base);
                }
                for_range(b, zero, d3_4, 4, |b, j| {
                    let args: Vec<Value> = (0..args)
                        .map(|a| {
                            let offset = b.ins().imul(j, st[a][3]);
                            let at = b.ins().iadd(vectors[a], offset);
                            b.ins().load(types::F32X4, mem(), at, 0)
                        })
                        .collect();
                    let v = emit_body(b, body, &args);
                    let at = address(b, yrow, j, 4);
                    b.ins().store(mem(), v, at, 0);
                });
                for_range(b, d3_4, d[3], 1, |b, j| {
                    let args: Vec<Value> = (0..args)
                        .map(|a| {
                            let offset = b.ins().imul(j, st[a][3]);
                            let at = b.ins().iadd(bases[a], offset);
                            let s = b.ins().load(types::F32, mem(), at, 0);
                            b.ins().scalar_to_vector(types::F32X4, s)
                        })
                        .collect();
                    let v = emit_body(b, body, &args);
                    let s = b.ins().extractlane(v, 0);
                    let at = address(b, yrow, j, 4);
                    b.ins().store(mem(), s, at, 0);
                });
            });
        });
    });
}

/// `y = g * (x / sqrt(mean(x^2) + eps))` for each of `rows` rows of `d` values.
fn emit_rms_norm(b: &mut FunctionBuilder, d: usize, eps: f32, p: &[Value]) {
    let (x, g, y, rows) = (p[0], p[1], p[2], p[3]);
    let zero = b.ins().iconst(types::I64, 0);
    let d4 = d - d % 4;
    for_range(b, zero, rows, 1, |b, r| {
        let xrow = address(b, x, r, 4 * d as i64);
        let yrow = address(b, y, r, 4 * d as i64);
        let acc = zeroed_accumulators(b, 1)[0];
        let vec_end = b.ins().iconst(types::I64, d4 as i64);
        for_range(b, zero, vec_end, 4, |b, q| {
            let at = address(b, xrow, q, 4);
            let v = b.ins().load(types::F32X4, mem(), at, 0);
            accumulate(b, acc, v, v);
        });
        let a = b.use_var(acc);
        let mut ss = horizontal_sum(b, a);
        for q in d4..d {
            let v = b.ins().load(types::F32, mem(), xrow, 4 * q as i32);
            ss = b.ins().fma(v, v, ss);
        }
        let inv_d = b.ins().f32const(1.0 / d as f32);
        let mean = b.ins().fmul(ss, inv_d);
        let eps = b.ins().f32const(eps);
        let var = b.ins().fadd(mean, eps);
        let root = b.ins().sqrt(var);
        let one = b.ins().f32const(1.0);
        let inv = b.ins().fdiv(one, root);
        let inv4 = b.ins().splat(types::F32X4, inv);
        for_range(b, zero, vec_end, 4, |b, q| {
            let xa = address(b, xrow, q, 4);
            let ga = address(b, g, q, 4);
            let ya = address(b, yrow, q, 4);
            let v = b.ins().load(types::F32X4, mem(), xa, 0);
            let gv = b.ins().load(types::F32X4, mem(), ga, 0);
            let n = b.ins().fmul(inv4, v);
            let o = b.ins().fmul(gv, n);
            b.ins().store(mem(), o, ya, 0);
        });
        for q in d4..d {
            let v = b.ins().load(types::F32, mem(), xrow, 4 * q as i32);
            let gv = b.ins().load(types::F32, mem(), g, 4 * q as i32);
            let n = b.ins().fmul(inv, v);
            let o = b.ins().fmul(gv, n);
            b.ins().store(mem(), o, yrow, 4 * q as i32);
        }
    });
}

/// Rotates, in place, the first `rotary` values of each of the `heads` heads of `d` values
/// of every token, pair `i` by the angle whose cosine and sine are entry `i` of the token's
/// row of the tables. Same arithmetic as the reference (no fused multiply-add).
fn emit_rope(
    b: &mut FunctionBuilder,
    heads: usize,
    d: usize,
    rotary: usize,
    half: bool,
    p: &[Value],
) {
    let (x, cos, sin, tokens) = (p[0], p[1], p[2], p[3]);
    let pairs = rotary / 2;
    let zero = b.ins().iconst(types::I64, 0);
    let heads_end = b.ins().iconst(types::I64, heads as i64);
    for_range(b, zero, tokens, 1, |b, t| {
        let xt = address(b, x, t, (4 * heads * d) as i64);
        let ct = address(b, cos, t, 4 * pairs as i64);
        let st = address(b, sin, t, 4 * pairs as i64);
        for_range(b, zero, heads_end, 1, |b, h| {
            let row = address(b, xt, h, 4 * d as i64);
            for i in 0..pairs {
                let (ia, ib) = if half {
                    (i, i + pairs)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let at = |j: usize| 4 * j as i32;
                let a = b.ins().load(types::F32, mem(), row, at(ia));
                let bv = b.ins().load(types::F32, mem(), row, at(ib));
                let c = b.ins().load(types::F32, mem(), ct, at(i));
                let s = b.ins().load(types::F32, mem(), st, at(i));
                let ac = b.ins().fmul(a, c);
                let bs = b.ins().fmul(bv, s);
                let na = b.ins().fsub(ac, bs);
                let as_ = b.ins().fmul(a, s);
                let bc = b.ins().fmul(bv, c);
                let nb = b.ins().fadd(as_, bc);
                b.ins().store(mem(), na, row, at(ia));
                b.ins().store(mem(), nb, row, at(ib));
            }
        });
    });
}

/// The `f32x4` chunks of a row of `d` floats (static `d`) and its scalar tail, loaded once.
struct RowChunks {
    vectors: Vec<Value>,
    tail: Vec<Value>,
}

impl RowChunks {
    fn load(b: &mut FunctionBuilder, row: Value, d: usize) -> RowChunks {
        let d4 = d - d % 4;
        RowChunks {
            vectors: (0..d4)
                .step_by(4)
                .map(|q| b.ins().load(types::F32X4, mem(), row, 4 * q as i32))
                .collect(),
            tail: (d4..d)
                .map(|q| b.ins().load(types::F32, mem(), row, 4 * q as i32))
                .collect(),
        }
    }

    /// The dot product with another row of the same length, already loaded: the same
    /// additions in the same order as [`RowChunks::dot`].
    fn dot_with(&self, b: &mut FunctionBuilder, y: &RowChunks) -> Value {
        let mut acc = [splat(b, 0.0), splat(b, 0.0)];
        for (c, (&xv, &yv)) in self.vectors.iter().zip(&y.vectors).enumerate() {
            acc[c % 2] = b.ins().fma(xv, yv, acc[c % 2]);
        }
        let both = b.ins().fadd(acc[0], acc[1]);
        let mut s = horizontal_sum(b, both);
        for (&xs, &ys) in self.tail.iter().zip(&y.tail) {
            s = b.ins().fma(xs, ys, s);
        }
        s
    }

    /// The dot product with the row at `y` of a length that is a multiple of 4, before the
    /// sum across lanes: two accumulators over the chunks, added.
    fn partial_dot(&self, b: &mut FunctionBuilder, y: Value) -> Value {
        let mut acc = [splat(b, 0.0), splat(b, 0.0)];
        for (c, &xv) in self.vectors.iter().enumerate() {
            let yv = b.ins().load(types::F32X4, mem(), y, 16 * c as i32);
            acc[c % 2] = b.ins().fma(xv, yv, acc[c % 2]);
        }
        b.ins().fadd(acc[0], acc[1])
    }

    /// The dot product with the row of the same length at `y`: two accumulators over the
    /// chunks, then the tail.
    fn dot(&self, b: &mut FunctionBuilder, y: Value) -> Value {
        let mut acc = [splat(b, 0.0), splat(b, 0.0)];
        for (c, &xv) in self.vectors.iter().enumerate() {
            let yv = b.ins().load(types::F32X4, mem(), y, 16 * c as i32);
            acc[c % 2] = b.ins().fma(xv, yv, acc[c % 2]);
        }
        let both = b.ins().fadd(acc[0], acc[1]);
        let mut s = horizontal_sum(b, both);
        let d4 = 4 * self.vectors.len();
        for (q, &xs) in self.tail.iter().enumerate() {
            let ys = b.ins().load(types::F32, mem(), y, 4 * (d4 + q) as i32);
            s = b.ins().fma(xs, ys, s);
        }
        s
    }
}

/// The sums across lanes of four `f32x4`, as the lanes of one: two 32-bit interleaves
/// and a 64-bit one (`punpck*dq`, `punpck*qdq`) between three additions, so lane `i` is
/// `(v[i][0] + v[i][2]) + (v[i][1] + v[i][3])`.
fn transposed_sums(b: &mut FunctionBuilder, v: [Value; 4]) -> Value {
    let flags = MemFlagsData::new().with_endianness(Endianness::Little);
    let bytes = v.map(|x| b.ins().bitcast(types::I8X16, flags, x));
    let interleave = |b: &mut FunctionBuilder, x: Value, y: Value, mask: [u8; 16]| {
        let mask = b
            .func
            .dfg
            .immediates
            .push(ConstantData::from(mask.to_vec()));
        b.ins().shuffle(x, y, mask)
    };
    let as_floats = |b: &mut FunctionBuilder, x: Value| b.ins().bitcast(types::F32X4, flags, x);
    // 32-bit lanes: low halves [x0, y0, x1, y1] and high halves [x2, y2, x3, y3].
    let low32 = [0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23];
    let high32 = [8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31];
    let mut pairs = Vec::with_capacity(2);
    for (x, y) in [(bytes[0], bytes[1]), (bytes[2], bytes[3])] {
        let lo = interleave(b, x, y, low32);
        let hi = interleave(b, x, y, high32);
        let (lo, hi) = (as_floats(b, lo), as_floats(b, hi));
        let sum = b.ins().fadd(lo, hi);
        pairs.push(b.ins().bitcast(types::I8X16, flags, sum));
    }
    // 64-bit lanes: [ab0, ab1, cd0, cd1] and [ab2, ab3, cd2, cd3].
    let low64: [u8; 16] = std::array::from_fn(|i| if i < 8 { i as u8 } else { 8 + i as u8 });
    let high64: [u8; 16] = std::array::from_fn(|i| if i < 8 { 8 + i as u8 } else { 16 + i as u8 });
    let lo = interleave(b, pairs[0], pairs[1], low64);
    let hi = interleave(b, pairs[0], pairs[1], high64);
    let (lo, hi) = (as_floats(b, lo), as_floats(b, hi));
    b.ins().fadd(lo, hi)
}

/// `row[i] += p * v[i]` for the `d` floats of a row (static `d`).
fn axpy_row(b: &mut FunctionBuilder, row: Value, v: Value, p: Value, d: usize) {
    let pv = b.ins().splat(types::F32X4, p);
    let d4 = d - d % 4;
    for q in (0..d4).step_by(4) {
        let o = b.ins().load(types::F32X4, mem(), row, 4 * q as i32);
        let x = b.ins().load(types::F32X4, mem(), v, 4 * q as i32);
        let n = b.ins().fma(pv, x, o);
        b.ins().store(mem(), n, row, 4 * q as i32);
    }
    for q in d4..d {
        let o = b.ins().load(types::F32, mem(), row, 4 * q as i32);
        let x = b.ins().load(types::F32, mem(), v, 4 * q as i32);
        let n = b.ins().fma(p, x, o);
        b.ins().store(mem(), n, row, 4 * q as i32);
    }
}

/// `row[i] *= c` for the `d` floats of a row (static `d`).
fn scale_row(b: &mut FunctionBuilder, row: Value, c: Value, d: usize) {
    let cv = b.ins().splat(types::F32X4, c);
    let d4 = d - d % 4;
    for q in (0..d4).step_by(4) {
        let o = b.ins().load(types::F32X4, mem(), row, 4 * q as i32);
        let n = b.ins().fmul(o, cv);
        b.ins().store(mem(), n, row, 4 * q as i32);
    }
    for q in d4..d {
        let o = b.ins().load(types::F32, mem(), row, 4 * q as i32);
        let n = b.ins().fmul(o, c);
        b.ins().store(mem(), n, row, 4 * q as i32);
    }
}

/// The output rows of the query heads of one GQA group while attention runs over the
/// positions: in variables (small heads: no loads or stores per position), or in the output
/// buffer. Both do the same arithmetic.
enum OutputRows {
    /// Per head: its `f32x4` chunks and scalar tail.
    Registers(Vec<(Vec<Variable>, Vec<Variable>)>),
    /// Per head: the row's address in the output (which starts at zero).
    Memory(Vec<Value>),
}

impl OutputRows {
    /// Zeroed rows of `d` for each of `rows` (output addresses).
    fn new(b: &mut FunctionBuilder, rows: &[Value], d: usize, in_registers: bool) -> Self {
        if !in_registers {
            return OutputRows::Memory(rows.to_vec());
        }
        let zv = splat(b, 0.0);
        let zs = b.ins().f32const(0.0);
        let mut var = |ty, init| {
            let v = b.declare_var(ty);
            b.def_var(v, init);
            v
        };
        OutputRows::Registers(
            rows.iter()
                .map(|_| {
                    (
                        (0..d / 4).map(|_| var(types::F32X4, zv)).collect(),
                        (0..d % 4).map(|_| var(types::F32, zs)).collect(),
                    )
                })
                .collect(),
        )
    }

    /// Row `g` times `c`.
    fn scale(&self, b: &mut FunctionBuilder, g: usize, c: Value, d: usize) {
        match self {
            OutputRows::Memory(rows) => scale_row(b, rows[g], c, d),
            OutputRows::Registers(rows) => {
                let cv = b.ins().splat(types::F32X4, c);
                for &v in &rows[g].0 {
                    let o = b.use_var(v);
                    let n = b.ins().fmul(o, cv);
                    b.def_var(v, n);
                }
                for &v in &rows[g].1 {
                    let o = b.use_var(v);
                    let n = b.ins().fmul(o, c);
                    b.def_var(v, n);
                }
            }
        }
    }

    /// Row `g` plus `p` times the value row at `vrow` (`values`, when already loaded).
    fn add_scaled(
        &self,
        b: &mut FunctionBuilder,
        g: usize,
        vrow: Value,
        values: Option<&RowChunks>,
        p: Value,
        d: usize,
    ) {
        match self {
            OutputRows::Registers(rows) => {
                let loaded;
                let values = match values {
                    Some(values) => values,
                    None => {
                        loaded = RowChunks::load(b, vrow, d);
                        &loaded
                    }
                };
                let pv = b.ins().splat(types::F32X4, p);
                for (&v, &x) in rows[g].0.iter().zip(&values.vectors) {
                    let o = b.use_var(v);
                    let n = b.ins().fma(pv, x, o);
                    b.def_var(v, n);
                }
                for (&v, &x) in rows[g].1.iter().zip(&values.tail) {
                    let o = b.use_var(v);
                    let n = b.ins().fma(p, x, o);
                    b.def_var(v, n);
                }
            }
            OutputRows::Memory(rows) => axpy_row(b, rows[g], vrow, p, d),
        }
    }

    /// Row `g` times `inv`, written to its output address `row`.
    fn finish(&self, b: &mut FunctionBuilder, g: usize, row: Value, inv: Value, d: usize) {
        self.scale(b, g, inv, d);
        if let OutputRows::Registers(rows) = self {
            for (c, &v) in rows[g].0.iter().enumerate() {
                let o = b.use_var(v);
                b.ins().store(mem(), o, row, 16 * c as i32);
            }
            for (q, &v) in rows[g].1.iter().enumerate() {
                let o = b.use_var(v);
                b.ins().store(mem(), o, row, 4 * (4 * (d / 4) + q) as i32);
            }
        }
    }
}

/// Positions per block of the attention kernel's online softmax.
const ATTENTION_BLOCK: usize = 16;

/// Query heads of a group whose rows stay in registers for the whole kernel (beyond, a
/// query row is reloaded from L1 for each position).
const QUERY_REGISTER_FLOATS: usize = 64;

/// Attention of one query row (`heads` heads of `d`) over `count` key/value rows, row `j`
/// starting `offsets[j]` bytes into `k` and `v` (KV head `h` at `+ 4 * h * d`), with an
/// online softmax over blocks of [`ATTENTION_BLOCK`] positions. The query heads that share
/// a KV head (GQA) go through the block together, so each key and value row is addressed
/// and loaded once per group: their scores go to a stack buffer, each head's running
/// maximum `m` and sum `l` absorb the block (its output row is rescaled by
/// `exp(m_old - m_new)` once per block), and the exponentials and the block maximum are
/// computed four lanes at a time. With a `mask`, `mask[j]` is added to position `j`'s
/// score (scaled, then soft-capped where `scoring` has a cap). With `sinks` (one per head),
/// head `h`'s softmax starts from a sink of score `sinks[h]` and no value: its running
/// maximum is the sink and its sum 1. `count` must be at least 1.
fn emit_attention(
    b: &mut FunctionBuilder,
    [heads, kv_heads, d]: [usize; 3],
    scoring: Scoring,
    p: &[Value],
    [mask, sinks]: [Option<Value>; 2],
) {
    let (q, k, v, offsets, count, out) = (p[0], p[1], p[2], p[3], p[4], p[5]);
    let group = heads / kv_heads;
    let scores = b.create_sized_stack_slot(StackSlotData::new(
        StackSlotKind::ExplicitSlot,
        (4 * ATTENTION_BLOCK * group) as u32,
        4,
    ));
    let factor = scoring.scale.factor();
    let zero = b.ins().iconst(types::I64, 0);
    let kv_end = b.ins().iconst(types::I64, kv_heads as i64);
    for_range(b, zero, kv_end, 1, |b, kv| {
        let kv_bytes = b.ins().imul_imm_s(kv, (4 * d) as i64);
        let first = b.ins().imul_imm_s(kv, group as i64);
        let rows: Vec<(Value, Value)> = (0..group)
            .map(|g| {
                let head = b.ins().iadd_imm_s(first, g as i64);
                (
                    address(b, q, head, (4 * d) as i64),
                    address(b, out, head, (4 * d) as i64),
                )
            })
            .collect();
        let preload = group * d <= QUERY_REGISTER_FLOATS;
        let queries: Vec<Option<RowChunks>> = rows
            .iter()
            .map(|&(qrow, _)| preload.then(|| RowChunks::load(b, qrow, d)))
            .collect();
        let lowest = b.ins().f32const(f32::MIN);
        let zs = b.ins().f32const(0.0);
        let sink_sum = sinks.map(|_| b.ins().f32const(1.0));
        let state: Vec<(Variable, Variable)> = (0..group)
            .map(|g| {
                let (m, l) = (b.declare_var(types::F32), b.declare_var(types::F32));
                let (m0, l0) = match (sinks, sink_sum) {
                    (Some(sinks), Some(one)) => {
                        let head = b.ins().iadd_imm_s(first, g as i64);
                        let at = address(b, sinks, head, 4);
                        (b.ins().load(types::F32, mem(), at, 0), one)
                    }
                    _ => (lowest, zs),
                };
                b.def_var(m, m0);
                b.def_var(l, l0);
                (m, l)
            })
            .collect();
        let buf = b.ins().stack_addr(types::I64, scores, 0);
        let row_bytes = (4 * ATTENTION_BLOCK) as i32;
        let out_rows: Vec<Value> = rows.iter().map(|&(_, o)| o).collect();
        let outputs = OutputRows::new(b, &out_rows, d, preload);
        for_range(b, zero, count, ATTENTION_BLOCK as i64, |b, base| {
            let left = b.ins().isub(count, base);
            let full = b.ins().iconst(types::I64, ATTENTION_BLOCK as i64);
            let small = b.ins().icmp(IntCC::SignedLessThan, left, full);
            let n = b.ins().select(small, left, full);
            // Unused lanes stay at the lowest float, so their exponentials vanish.
            let low = splat(b, f32::MIN);
            for c in 0..group * ATTENTION_BLOCK / 4 {
                b.ins().store(mem(), low, buf, 16 * c as i32);
            }
            let factor = b.ins().f32const(factor);
            // Four positions at a time where rows are whole vectors: each query's four
            // partial dot products are summed across lanes together (one transpose), so a
            // score costs a quarter of a horizontal sum.
            let quads_end = if d.is_multiple_of(4) {
                b.ins().band_imm_s(n, !3)
            } else {
                zero
            };
            let factors = b.ins().splat(types::F32X4, factor);
            for_range(b, zero, quads_end, 4, |b, jj| {
                let j = b.ins().iadd(base, jj);
                let krows: Vec<Value> = (0..4)
                    .map(|p| {
                        let jp = b.ins().iadd_imm_s(j, p);
                        kv_row(b, k, offsets, jp, kv_bytes)
                    })
                    .collect();
                let at = address(b, buf, jj, 4);
                for (g, query) in queries.iter().enumerate() {
                    let loaded;
                    let query = match query {
                        Some(chunks) => chunks,
                        None => {
                            loaded = RowChunks::load(b, rows[g].0, d);
                            &loaded
                        }
                    };
                    let partials: Vec<Value> = krows
                        .iter()
                        .map(|&krow| query.partial_dot(b, krow))
                        .collect();
                    let sums =
                        transposed_sums(b, [partials[0], partials[1], partials[2], partials[3]]);
                    let mut s = b.ins().fmul(sums, factors);
                    if let Some(cap) = scoring.softcap {
                        s = soft_cap(b, s, cap);
                    }
                    if let Some(mask) = mask {
                        let at = address(b, mask, j, 4);
                        let bias = b.ins().load(types::F32X4, mem(), at, 0);
                        s = b.ins().fadd(s, bias);
                    }
                    b.ins().store(mem(), s, at, row_bytes * g as i32);
                }
            });
            for_range(b, quads_end, n, 1, |b, jj| {
                let j = b.ins().iadd(base, jj);
                let krow = kv_row(b, k, offsets, j, kv_bytes);
                let at = address(b, buf, jj, 4);
                // Small heads load the key once for the whole group.
                let keys = preload.then(|| RowChunks::load(b, krow, d));
                for (g, query) in queries.iter().enumerate() {
                    let dot = match (query, &keys) {
                        (Some(chunks), Some(keys)) => chunks.dot_with(b, keys),
                        (Some(chunks), None) => chunks.dot(b, krow),
                        (None, _) => RowChunks::load(b, rows[g].0, d).dot(b, krow),
                    };
                    let mut s = b.ins().fmul(dot, factor);
                    if let Some(cap) = scoring.softcap {
                        let lanes = b.ins().splat(types::F32X4, s);
                        let capped = soft_cap(b, lanes, cap);
                        s = b.ins().extractlane(capped, 0);
                    }
                    if let Some(mask) = mask {
                        let at = address(b, mask, j, 4);
                        let bias = b.ins().load(types::F32, mem(), at, 0);
                        s = b.ins().fadd(s, bias);
                    }
                    b.ins().store(mem(), s, at, row_bytes * g as i32);
                }
            });
            for (g, &(m, l)) in state.iter().enumerate() {
                let chunks: Vec<Value> = (0..ATTENTION_BLOCK / 4)
                    .map(|c| {
                        let at = row_bytes * g as i32 + 16 * c as i32;
                        b.ins().load(types::F32X4, mem(), buf, at)
                    })
                    .collect();
                let mut most = chunks[0];
                for &c in &chunks[1..] {
                    most = b.ins().fmax(most, c);
                }
                let lanes: Vec<Value> = (0..4u8).map(|i| b.ins().extractlane(most, i)).collect();
                let hi = b.ins().fmax(lanes[0], lanes[1]);
                let lo = b.ins().fmax(lanes[2], lanes[3]);
                let block_max = b.ins().fmax(hi, lo);
                let m_old = b.use_var(m);
                let m_new = b.ins().fmax(m_old, block_max);
                let shrink = b.ins().fsub(m_old, m_new);
                let shrink = b.ins().splat(types::F32X4, shrink);
                let c = exp(b, shrink);
                let c = b.ins().extractlane(c, 0);
                let centre = b.ins().splat(types::F32X4, m_new);
                let mut sum = splat(b, 0.0);
                for (i, &sv) in chunks.iter().enumerate() {
                    let shifted = b.ins().fsub(sv, centre);
                    let e = exp(b, shifted);
                    let at = row_bytes * g as i32 + 16 * i as i32;
                    b.ins().store(mem(), e, buf, at);
                    sum = b.ins().fadd(sum, e);
                }
                let block_sum = horizontal_sum(b, sum);
                let l_old = b.use_var(l);
                let l_new = b.ins().fma(l_old, c, block_sum);
                b.def_var(l, l_new);
                b.def_var(m, m_new);
                outputs.scale(b, g, c, d);
            }
            for_range(b, zero, n, 1, |b, jj| {
                let j = b.ins().iadd(base, jj);
                let vrow = kv_row(b, v, offsets, j, kv_bytes);
                let at = address(b, buf, jj, 4);
                let values = preload.then(|| RowChunks::load(b, vrow, d));
                for g in 0..group {
                    let pj = b.ins().load(types::F32, mem(), at, row_bytes * g as i32);
                    outputs.add_scaled(b, g, vrow, values.as_ref(), pj, d);
                }
            });
        });
        for (g, (&(_, l), &(_, orow))) in state.iter().zip(&rows).enumerate() {
            let total = b.use_var(l);
            let one = b.ins().f32const(1.0);
            let inv = b.ins().fdiv(one, total);
            outputs.finish(b, g, orow, inv, d);
        }
    });
}

/// The address of KV head row `kv_bytes` of position `j`: `base + offsets[j] + kv_bytes`.
fn kv_row(
    b: &mut FunctionBuilder,
    base: Value,
    offsets: Value,
    j: Value,
    kv_bytes: Value,
) -> Value {
    let at = address(b, offsets, j, 8);
    let off = b.ins().load(types::I64, mem(), at, 0);
    let off = b.ins().iadd(off, kv_bytes);
    b.ins().iadd(base, off)
}

/// Applies `f` to the `f32x4` chunks `0..d4` of a row (a loop), then to each scalar of the
/// tail `d4..d` widened to one lane of an `f32x4`; `f` gets the byte offset's address.
fn for_lanes(
    b: &mut FunctionBuilder,
    row: Value,
    d: usize,
    mut f: impl FnMut(&mut FunctionBuilder, Value, bool),
) {
    let d4 = d - d % 4;
    let zero = b.ins().iconst(types::I64, 0);
    let end = b.ins().iconst(types::I64, d4 as i64);
    for_range(b, zero, end, 4, |b, i| {
        let at = address(b, row, i, 4);
        f(b, at, true);
    });
    for q in d4..d {
        let at = b.ins().iadd_imm_s(row, 4 * q as i64);
        f(b, at, false);
    }
}

/// Loads 4 lanes, or one scalar into lane 0 (the other lanes `fill`).
fn load_lanes(b: &mut FunctionBuilder, at: Value, full: bool, fill: f32) -> Value {
    if full {
        b.ins().load(types::F32X4, mem(), at, 0)
    } else {
        let s = b.ins().load(types::F32, mem(), at, 0);
        let v = splat(b, fill);
        b.ins().insertlane(v, s, 0)
    }
}

/// Stores 4 lanes, or lane 0.
fn store_lanes(b: &mut FunctionBuilder, v: Value, at: Value, full: bool) {
    if full {
        b.ins().store(mem(), v, at, 0);
    } else {
        let s = b.ins().extractlane(v, 0);
        b.ins().store(mem(), s, at, 0);
    }
}

/// `v` with the lanes that hold no element zeroed: all 4 lanes are real when `full`, else
/// only lane 0 (a scalar tail).
fn real_lanes(b: &mut FunctionBuilder, v: Value, full: bool) -> Value {
    if full {
        return v;
    }
    let s = b.ins().extractlane(v, 0);
    let z = splat(b, 0.0);
    b.ins().insertlane(z, s, 0)
}

/// Softmax of each of `rows` rows of `n` values: the maximum, then `exp(x - max)` (inline
/// polynomial) and its sum, then a division by the sum. Tail lanes are padded with the
/// lowest float for the maximum and zero for the sum.
fn emit_softmax(b: &mut FunctionBuilder, n: usize, p: &[Value]) {
    let (x, y, rows) = (p[0], p[1], p[2]);
    let zero = b.ins().iconst(types::I64, 0);
    for_range(b, zero, rows, 1, |b, r| {
        let xrow = address(b, x, r, 4 * n as i64);
        let yrow = address(b, y, r, 4 * n as i64);
        let most = b.declare_var(types::F32X4);
        let low = splat(b, f32::MIN);
        b.def_var(most, low);
        for_lanes(b, xrow, n, |b, at, full| {
            let v = load_lanes(b, at, full, f32::MIN);
            let old = b.use_var(most);
            let new = b.ins().fmax(old, v);
            b.def_var(most, new);
        });
        let m = b.use_var(most);
        let max = horizontal_max(b, m);
        let centre = b.ins().splat(types::F32X4, max);
        let sum = zeroed_accumulators(b, 1)[0];
        // Reads x at the same offsets as it writes y.
        let delta = b.ins().isub(yrow, xrow);
        for_lanes(b, xrow, n, |b, at, full| {
            let v = load_lanes(b, at, full, f32::MIN);
            let shifted = b.ins().fsub(v, centre);
            let e = exp(b, shifted);
            let e = real_lanes(b, e, full);
            let old = b.use_var(sum);
            let new = b.ins().fadd(old, e);
            b.def_var(sum, new);
            let out = b.ins().iadd(at, delta);
            store_lanes(b, e, out, full);
        });
        let s = b.use_var(sum);
        let total = horizontal_sum(b, s);
        let total = b.ins().splat(types::F32X4, total);
        for_lanes(b, yrow, n, |b, at, full| {
            let v = load_lanes(b, at, full, 1.0);
            let q = b.ins().fdiv(v, total);
            store_lanes(b, q, at, full);
        });
    });
}

/// Applies `f` to the columns of each of `groups` groups of `n` rows of `inner` values
/// (a reduction along a dim that is not the last): four adjacent columns at a time, one
/// per lane, then each remaining column in lane 0. `f` gets the column's first address,
/// the index of its first value's column among all `groups * inner`, and whether all four
/// lanes are columns.
fn for_columns(
    b: &mut FunctionBuilder,
    x: Value,
    groups: Value,
    (n, inner): (usize, usize),
    mut f: impl FnMut(&mut FunctionBuilder, Value, Value, bool),
) {
    let zero = b.ins().iconst(types::I64, 0);
    let inner4 = inner - inner % 4;
    for_range(b, zero, groups, 1, |b, g| {
        let group = address(b, x, g, (4 * n * inner) as i64);
        let first = b.ins().imul_imm_s(g, inner as i64);
        let end = b.ins().iconst(types::I64, inner4 as i64);
        for_range(b, zero, end, 4, |b, c| {
            let at = address(b, group, c, 4);
            let column = b.ins().iadd(first, c);
            f(b, at, column, true);
        });
        for c in inner4..inner {
            let at = b.ins().iadd_imm_s(group, 4 * c as i64);
            let column = b.ins().iadd_imm_s(first, c as i64);
            f(b, at, column, false);
        }
    });
}

/// Softmax along a dim of `n` whose values are `inner` apart, over `groups` groups
/// (`p`: x, y, groups): per column, the maximum, the exponentials and their running sum
/// (in order along the dim), then the quotients; four columns share an `f32x4`.
fn emit_strided_softmax(b: &mut FunctionBuilder, n: usize, inner: usize, p: &[Value]) {
    let (x, y, groups) = (p[0], p[1], p[2]);
    let delta = b.ins().isub(y, x);
    let stride = (4 * inner) as i64;
    for_columns(b, x, groups, (n, inner), |b, column, _, full| {
        let zero = b.ins().iconst(types::I64, 0);
        let end = b.ins().iconst(types::I64, n as i64);
        let most = b.declare_var(types::F32X4);
        let low = splat(b, f32::MIN);
        b.def_var(most, low);
        for_range(b, zero, end, 1, |b, i| {
            let at = address(b, column, i, stride);
            let v = load_lanes(b, at, full, f32::MIN);
            let old = b.use_var(most);
            let new = b.ins().fmax(old, v);
            b.def_var(most, new);
        });
        let centre = b.use_var(most);
        let sum = zeroed_accumulators(b, 1)[0];
        for_range(b, zero, end, 1, |b, i| {
            let at = address(b, column, i, stride);
            let v = load_lanes(b, at, full, f32::MIN);
            let shifted = b.ins().fsub(v, centre);
            let e = exp(b, shifted);
            let old = b.use_var(sum);
            let new = b.ins().fadd(old, e);
            b.def_var(sum, new);
            let out = b.ins().iadd(at, delta);
            store_lanes(b, e, out, full);
        });
        let total = b.use_var(sum);
        for_range(b, zero, end, 1, |b, i| {
            let at = address(b, column, i, stride);
            let out = b.ins().iadd(at, delta);
            let e = load_lanes(b, out, full, 1.0);
            let q = b.ins().fdiv(e, total);
            store_lanes(b, q, out, full);
        });
    });
}

/// The index of the first maximum along a dim of `n` whose values are `inner` apart
/// (`p`: x, indices (i64, `groups * inner`), groups); four columns share an `f32x4` and
/// an `i32x4` of indices.
fn emit_strided_argmax(b: &mut FunctionBuilder, n: usize, inner: usize, p: &[Value]) {
    let (x, out, groups) = (p[0], p[1], p[2]);
    let stride = (4 * inner) as i64;
    for_columns(b, x, groups, (n, inner), |b, column, c, full| {
        let one = b.ins().iconst(types::I64, 1);
        let end = b.ins().iconst(types::I64, n as i64);
        let (best, at) = (b.declare_var(types::F32X4), b.declare_var(types::I32X4));
        let first = load_lanes(b, column, full, f32::MIN);
        b.def_var(best, first);
        let zeros = b.ins().iconst(types::I32, 0);
        let zeros = b.ins().splat(types::I32X4, zeros);
        b.def_var(at, zeros);
        for_range(b, one, end, 1, |b, i| {
            let v_at = address(b, column, i, stride);
            let v = load_lanes(b, v_at, full, f32::MIN);
            let old = b.use_var(best);
            let greater = b.ins().fcmp(FloatCC::GreaterThan, v, old);
            let as_floats = b.ins().bitcast(types::F32X4, MemFlagsData::new(), greater);
            let new_best = b.ins().bitselect(as_floats, v, old);
            let i32 = b.ins().ireduce(types::I32, i);
            let index = b.ins().splat(types::I32X4, i32);
            let old_at = b.use_var(at);
            let new_at = b.ins().bitselect(greater, index, old_at);
            b.def_var(best, new_best);
            b.def_var(at, new_at);
        });
        let indices = b.use_var(at);
        let dest = address(b, out, c, 8);
        for lane in 0..if full { 4 } else { 1 } {
            let i = b.ins().extractlane(indices, lane);
            let i = b.ins().uextend(types::I64, i);
            b.ins().store(mem(), i, dest, 8 * i32::from(lane));
        }
    });
}

/// Layer normalisation of each of `rows` rows of `d` values, in the reference's order:
/// the mean, the population variance around it, then `(x - mean) * inv * w + b`.
fn emit_layer_norm(b: &mut FunctionBuilder, d: usize, eps: f32, p: &[Value]) {
    let (x, w, bias, y, rows) = (p[0], p[1], p[2], p[3], p[4]);
    let zero = b.ins().iconst(types::I64, 0);
    for_range(b, zero, rows, 1, |b, r| {
        let xrow = address(b, x, r, 4 * d as i64);
        let yrow = address(b, y, r, 4 * d as i64);
        let inv_d = b.ins().f32const(1.0 / d as f32);
        let sum = zeroed_accumulators(b, 1)[0];
        for_lanes(b, xrow, d, |b, at, full| {
            let v = load_lanes(b, at, full, 0.0);
            let old = b.use_var(sum);
            let new = b.ins().fadd(old, v);
            b.def_var(sum, new);
        });
        let s = b.use_var(sum);
        let total = horizontal_sum(b, s);
        let mean = b.ins().fmul(total, inv_d);
        let centre = b.ins().splat(types::F32X4, mean);
        let squares = zeroed_accumulators(b, 1)[0];
        for_lanes(b, xrow, d, |b, at, full| {
            let v = load_lanes(b, at, full, 0.0);
            let c = b.ins().fsub(v, centre);
            let c = real_lanes(b, c, full);
            let old = b.use_var(squares);
            let new = b.ins().fma(c, c, old);
            b.def_var(squares, new);
        });
        let sq = b.use_var(squares);
        let sq = horizontal_sum(b, sq);
        let var = b.ins().fmul(sq, inv_d);
        let eps = b.ins().f32const(eps);
        let var = b.ins().fadd(var, eps);
        let root = b.ins().sqrt(var);
        let one = b.ins().f32const(1.0);
        let inv = b.ins().fdiv(one, root);
        let inv = b.ins().splat(types::F32X4, inv);
        let to_y = b.ins().isub(yrow, xrow);
        let to_w = b.ins().isub(w, xrow);
        let to_b = b.ins().isub(bias, xrow);
        for_lanes(b, xrow, d, |b, at, full| {
            let v = load_lanes(b, at, full, 0.0);
            let wa = b.ins().iadd(at, to_w);
            let ba = b.ins().iadd(at, to_b);
            let g = load_lanes(b, wa, full, 0.0);
            let c = load_lanes(b, ba, full, 0.0);
            let t = b.ins().fsub(v, centre);
            let t = b.ins().fmul(t, inv);
            let t = b.ins().fmul(t, g);
            let t = b.ins().fadd(t, c);
            let out = b.ins().iadd(at, to_y);
            store_lanes(b, t, out, full);
        });
    });
}

/// The index of the first maximum of each of `rows` rows of `n` values, as `i64`: a scalar
/// scan that replaces the best only on a strictly greater value (the reference's rule).
fn emit_argmax(b: &mut FunctionBuilder, n: usize, p: &[Value]) {
    let (x, out, rows) = (p[0], p[1], p[2]);
    let zero = b.ins().iconst(types::I64, 0);
    let one = b.ins().iconst(types::I64, 1);
    let end = b.ins().iconst(types::I64, n as i64);
    for_range(b, zero, rows, 1, |b, r| {
        let row = address(b, x, r, 4 * n as i64);
        let first = b.ins().load(types::F32, mem(), row, 0);
        let (best, at) = (b.declare_var(types::F32), b.declare_var(types::I64));
        b.def_var(best, first);
        b.def_var(at, zero);
        for_range(b, one, end, 1, |b, j| {
            let v_at = address(b, row, j, 4);
            let v = b.ins().load(types::F32, mem(), v_at, 0);
            let old = b.use_var(best);
            let greater = b.ins().fcmp(FloatCC::GreaterThan, v, old);
            let new_best = b.ins().select(greater, v, old);
            let old_at = b.use_var(at);
            let new_at = b.ins().select(greater, j, old_at);
            b.def_var(best, new_best);
            b.def_var(at, new_at);
        });
        let index = b.use_var(at);
        let dest = address(b, out, r, 8);
        b.ins().store(mem(), index, dest, 0);
    });
}
