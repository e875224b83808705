//! In-register decoding of quantized weight rows for the contraction kernels.
//!
//! Every quantized format a CPU contraction reads is decoded into `f32x4` lanes right
//! before they meet x in a multiply-add: codes are loaded as bytes, unpacked with vector
//! shifts, masks and shuffles, widened and converted; no weight is ever stored as f32.
//!
//! A row is a sequence of *runs*, consecutive weights that share a scale and an offset
//! (`w = scale * q + offset`): a run's codes meet x unscaled, and the run adds
//! `scale * Σ q·x + offset * Σ x` to the row's accumulator. GGUF formats have runs inside
//! fixed blocks (32 values for q8_0/q4_0/q4_1/q5_0/q5_1/iq4_nl, sub-blocks of 32 or 16
//! inside the 256-value super-blocks of the K-quants, iq4_xs and the lattice formats,
//! [`super::lattice`], the ternary and binary formats' runs of 32 under one scale,
//! [`super::ternary`], and the 4-bit floats' blocks of 32 and runs of 16, [`super::fp4`]);
//! the whole-matrix formats
//! (nf4, affine integers) have a run per scale group, decoded 32 values at a time with a
//! scalar tail, or (affine groups along the output rows) a scale and zero point per
//! column, decoded lane by lane.
//! The 16-bit float formats (`PackedF16`, `PackedBF16`) have no runs: their values widen
//! four at a time ([`half_lanes`]) and meet x as `f32` weights do (`codegen::dot_elems`).

use cranelift_codegen::ir::{
    ConstantData, Endianness, GlobalValue, InstBuilder, MemFlagsData, Value, condcodes::IntCC,
    types,
};
use cranelift_frontend::{FunctionBuilder, Variable};
use llm_ir::{dtype::DType, interp::quant::NF4_LEVELS, types::IQ4_NL_LEVELS};

use super::emit::{
    accumulate, address, for_range, horizontal_sum, mem, splat, zeroed_accumulators,
};
use super::fp4;
use super::lattice;
use super::q8dot::Q8_0_BLOCK_BYTES;
use super::ternary;
use crate::kernel::{Contraction, WeightFormat};

/// Values a whole-matrix format decodes per vector step (16 code bytes of 4 bits).
const CHUNK: usize = 32;

/// Whether the CPU's generated code decodes `format`: every quantized format; `F16` weights
/// are a GPU storage.
pub fn decodes(format: WeightFormat) -> bool {
    match format {
        WeightFormat::F32 | WeightFormat::F32Panels | WeightFormat::F32KN => true,
        WeightFormat::Q8_0
        | WeightFormat::Q4_0
        | WeightFormat::Q4_1
        | WeightFormat::Q5_0
        | WeightFormat::Q5_1
        | WeightFormat::Iq4Nl
        | WeightFormat::Q4K
        | WeightFormat::Q6K
        | WeightFormat::Q2K
        | WeightFormat::Q3K
        | WeightFormat::Q5K
        | WeightFormat::Iq4Xs
        | WeightFormat::Iq3Xxs
        | WeightFormat::Iq3S
        | WeightFormat::Iq2Xxs
        | WeightFormat::Iq2Xs
        | WeightFormat::Iq2S
        | WeightFormat::Iq1S
        | WeightFormat::Iq1M
        | WeightFormat::Tq1_0
        | WeightFormat::Tq2_0
        | WeightFormat::Q1_0
        | WeightFormat::Mxfp4
        | WeightFormat::Nvfp4 => true,
        WeightFormat::PackedF16 | WeightFormat::PackedBF16 => true,
        WeightFormat::F16 => false,
        WeightFormat::Nf4 { .. } | WeightFormat::Affine { .. } => true,
    }
}

/// The dot product of the `k` floats at `x` with row `j` of the contraction's quantized
/// weight, whose storage starts at `w` and whose row `j` starts at `row`; `grid` is a
/// lattice format's imported grid ([`super::lattice`]).
pub fn dot_row(
    b: &mut FunctionBuilder,
    c: &Contraction,
    x: Value,
    (w, j, row): (Value, Value, Value),
    grid: Option<GlobalValue>,
) -> Value {
    match c.weight {
        WeightFormat::Nf4 { .. } | WeightFormat::Affine { .. } => {
            let acc = zeroed_accumulators(b, 2);
            let tail = b.declare_var(types::F32);
            let zero = b.ins().f32const(0.0);
            b.def_var(tail, zero);
            let sums = Sums { acc, tail };
            decode_whole(b, c.weight, [c.n, c.k], Purpose::Dot(&sums), [w, j, row], x);
            let both = sums.total(b);
            let t = b.use_var(sums.tail);
            b.ins().fadd(both, t)
        }
        format => {
            let acc = zeroed_accumulators(b, 1)[0];
            let stride = 4 * format.block().expect("a block format") as i64;
            let blocks = Blocks {
                format,
                grid,
                row: (row, None),
                k: c.k,
            };
            decode_blocks(b, &blocks, (x, stride), |b, xb, run| {
                accumulate_run(b, acc, xb, run)
            });
            let a = b.use_var(acc);
            horizontal_sum(b, a)
        }
    }
}

/// The dot product of the q8_0 row at `x` (`k` values) with the row at `row` of a
/// block-format weight whose runs lie inside blocks of 32 (every GGUF block format), whose blocks follow one another or lie `block_stride` bytes apart (a row of a
/// block panel), in generated code: the weight decoded into its runs as for `f32`
/// activations, each run meeting the codes of its block of x as floats. A run's products
/// of small integers and their sums are exact in `f32`, so each run costs one scaling by
/// its scale times x's block scale, as in the AVX2 kernels of [`super::kq8dot`] and
/// [`super::q8dot`], which run instead where the CPU has them; `grid` is a lattice
/// format's imported grid.
pub fn dot_row_q8_0_x(
    b: &mut FunctionBuilder,
    (format, grid): (WeightFormat, Option<GlobalValue>),
    x: Value,
    (row, block_stride): (Value, Option<Value>),
    k: usize,
) -> Value {
    let acc = zeroed_accumulators(b, 1)[0];
    let block = format.block().expect("a block format");
    let stride = (block / 32 * Q8_0_BLOCK_BYTES) as i64;
    let blocks = Blocks {
        format,
        grid,
        row: (row, block_stride),
        k,
    };
    decode_blocks(b, &blocks, (x, stride), |b, xb, run| {
        accumulate_q8_0_run(b, acc, xb, run)
    });
    let a = b.use_var(acc);
    horizontal_sum(b, a)
}

/// `acc += dx * (scale * Σ q·qx + offset * Σ qx)` over `run`, whose values lie in one
/// q8_0 block of the activations at `xb` (the weight block's first).
fn accumulate_q8_0_run(b: &mut FunctionBuilder, acc: Variable, xb: Value, run: Run) {
    let first = run.x_at as usize / 4;
    let block_at = (first / 32 * Q8_0_BLOCK_BYTES) as i32;
    let codes_at = block_at + 2 + (first % 32) as i32;
    let mut sums = [splat(b, 0.0), splat(b, 0.0)];
    let mut xsum = None;
    for (chunk, qs) in run.codes.chunks(4).enumerate() {
        let bytes = b
            .ins()
            .load(types::I8X16, mem(), xb, codes_at + 16 * chunk as i32);
        for (c, (&q, xv)) in qs.iter().zip(bytes_to_f32(b, bytes, true)).enumerate() {
            sums[c % 2] = b.ins().fma(q, xv, sums[c % 2]);
            if run.offset.is_some() {
                xsum = Some(match xsum {
                    Some(s) => b.ins().fadd(s, xv),
                    None => xv,
                });
            }
        }
    }
    let dx = load_f16(b, xb, block_at);
    let total = b.ins().fadd(sums[0], sums[1]);
    let scale = b.ins().fmul(run.scale, dx);
    let scale = b.ins().splat(types::F32X4, scale);
    accumulate(b, acc, total, scale);
    if let (Some(offset), Some(xsum)) = (run.offset, xsum) {
        let offset = b.ins().fmul(offset, dx);
        let offset = b.ins().splat(types::F32X4, offset);
        accumulate(b, acc, xsum, offset);
    }
}

/// Emits the dequantization of the `rows x k` quantized tensor at `p[0]` into the `f32`
/// buffer at `p[1]` (`llm.dequantize`): every row decoded as the contractions decode it,
/// each run stored as `scale * q + offset`; `grid` is a lattice format's imported grid.
pub fn emit_dequantize(
    b: &mut FunctionBuilder,
    (weight, grid): (WeightFormat, Option<GlobalValue>),
    [rows, k]: [usize; 2],
    p: &[Value],
) {
    let (w, out) = (p[0], p[1]);
    let zero = b.ins().iconst(types::I64, 0);
    let end = b.ins().iconst(types::I64, rows as i64);
    let row_bytes = weight.row_bytes(k) as i64;
    for_range(b, zero, end, 1, |b, j| {
        let row = address(b, w, j, row_bytes);
        let out_row = address(b, out, j, 4 * k as i64);
        match weight {
            WeightFormat::Nf4 { .. } | WeightFormat::Affine { .. } => {
                decode_whole(b, weight, [rows, k], Purpose::Store, [w, j, row], out_row);
            }
            WeightFormat::PackedF16 | WeightFormat::PackedBF16 => {
                store_half_row(b, weight, row, out_row, k)
            }
            format => {
                let stride = 4 * format.block().expect("a block format") as i64;
                let blocks = Blocks {
                    format,
                    grid,
                    row: (row, None),
                    k,
                };
                decode_blocks(b, &blocks, (out_row, stride), store_run)
            }
        }
    });
}

/// What decoded weights are for.
#[derive(Clone, Copy)]
enum Purpose<'a> {
    /// Multiply-adds with x into a row's sums.
    Dot(&'a Sums),
    /// Stored as `f32`.
    Store,
}

/// Consecutive weights `scale * q + offset` of a row.
pub(super) struct Run {
    /// The codes `q` as `f32x4`, in element order.
    pub codes: Vec<Value>,
    /// Byte offset of the run's first value from the block's first (in x, or the output).
    pub x_at: i32,
    /// The run's scale (`f32`).
    pub scale: Value,
    /// The run's offset (`f32`), if the format has one.
    pub offset: Option<Value>,
}

/// A row of a GGUF block format to decode.
struct Blocks {
    format: WeightFormat,
    /// The format's imported grid, for the lattice formats.
    grid: Option<GlobalValue>,
    /// The row's address, and how far apart its blocks lie where they do not follow one
    /// another (a row of a block panel).
    row: (Value, Option<Value>),
    /// Values in the row.
    k: usize,
}

/// `acc += scale * Σ q·x + offset * Σ x` over `run`, with x of the block at `xb`; the
/// products go to two partial sums (lanes of even and odd vectors) to shorten the chain.
fn accumulate_run(b: &mut FunctionBuilder, acc: Variable, xb: Value, run: Run) {
    let mut sums = [splat(b, 0.0), splat(b, 0.0)];
    let mut xsum = None;
    for (c, &q) in run.codes.iter().enumerate() {
        let xv = b
            .ins()
            .load(types::F32X4, mem(), xb, run.x_at + 16 * c as i32);
        sums[c % 2] = b.ins().fma(q, xv, sums[c % 2]);
        if run.offset.is_some() {
            xsum = Some(match xsum {
                Some(s) => b.ins().fadd(s, xv),
                None => xv,
            });
        }
    }
    let total = b.ins().fadd(sums[0], sums[1]);
    let scale = b.ins().splat(types::F32X4, run.scale);
    accumulate(b, acc, total, scale);
    if let (Some(offset), Some(xsum)) = (run.offset, xsum) {
        let offset = b.ins().splat(types::F32X4, offset);
        accumulate(b, acc, xsum, offset);
    }
}

/// Decodes the row `blocks`: a loop over the row's blocks, each decoded into its runs,
/// which go to `take_run` with the address of the block's first value in `values` (x for
/// a dot product, the output for a dequantization), whose blocks lie `stride` bytes
/// apart.
fn decode_blocks(
    b: &mut FunctionBuilder,
    blocks: &Blocks,
    (values, stride): (Value, i64),
    mut take_run: impl FnMut(&mut FunctionBuilder, Value, Run),
) {
    let Blocks {
        format,
        grid,
        row: (row, block_stride),
        k,
    } = *blocks;
    let block = format.block().expect("a block format");
    let block_bytes = format.row_bytes(block) as i64;
    let zero = b.ins().iconst(types::I64, 0);
    let blocks = b.ins().iconst(types::I64, (k / block) as i64);
    for_range(b, zero, blocks, 1, |b, blk| {
        let wb = match block_stride {
            Some(apart) => {
                let offset = b.ins().imul(blk, apart);
                b.ins().iadd(row, offset)
            }
            None => address(b, row, blk, block_bytes),
        };
        let vb = address(b, values, blk, stride);
        let mut sink = |b: &mut FunctionBuilder, run: Run| take_run(b, vb, run);
        match format {
            WeightFormat::Q8_0 => q8_0_runs(b, wb, &mut sink),
            WeightFormat::Q4_0
            | WeightFormat::Q4_1
            | WeightFormat::Q5_0
            | WeightFormat::Q5_1
            | WeightFormat::Iq4Nl => nibble_runs(b, wb, format, &mut sink),
            WeightFormat::Q4K => q4_k_runs(b, wb, false, &mut sink),
            WeightFormat::Q5K => q4_k_runs(b, wb, true, &mut sink),
            WeightFormat::Q6K => q6_k_runs(b, wb, &mut sink),
            WeightFormat::Q2K => q2_k_runs(b, wb, &mut sink),
            WeightFormat::Q3K => q3_k_runs(b, wb, &mut sink),
            WeightFormat::Iq4Xs => iq4_xs_runs(b, wb, &mut sink),
            WeightFormat::Iq3Xxs
            | WeightFormat::Iq3S
            | WeightFormat::Iq2Xxs
            | WeightFormat::Iq2Xs
            | WeightFormat::Iq2S
            | WeightFormat::Iq1S
            | WeightFormat::Iq1M => {
                let grid = grid.expect("a lattice format's kernel imports its grid");
                lattice::runs(b, format, wb, grid, &mut sink)
            }
            WeightFormat::Tq1_0 | WeightFormat::Tq2_0 | WeightFormat::Q1_0 => {
                ternary::runs(b, format, wb, &mut sink)
            }
            WeightFormat::Mxfp4 | WeightFormat::Nvfp4 => fp4::runs(b, format, wb, &mut sink),
            other => unreachable!("{other:?} is not a block format"),
        }
    });
}

/// Stores `run` as `scale * q + offset` at `out` (the block's first value).
fn store_run(b: &mut FunctionBuilder, out: Value, run: Run) {
    let scale = b.ins().splat(types::F32X4, run.scale);
    let offset = run.offset.map(|o| b.ins().splat(types::F32X4, o));
    for (c, &q) in run.codes.iter().enumerate() {
        let v = match offset {
            Some(o) => b.ins().fma(q, scale, o),
            None => b.ins().fmul(q, scale),
        };
        b.ins().store(mem(), v, out, run.x_at + 16 * c as i32);
    }
}

/// Where a format's decoder sends its runs.
pub(super) type Sink<'a> = dyn FnMut(&mut FunctionBuilder, Run) + 'a;

/// q8_0: an f16 scale and 32 signed bytes.
fn q8_0_runs(b: &mut FunctionBuilder, wb: Value, sink: &mut Sink) {
    let scale = load_f16(b, wb, 0);
    let mut codes = Vec::with_capacity(8);
    for half in 0..4 {
        let v16 = b.ins().sload8x8(mem(), wb, 2 + 8 * half);
        codes.extend(widen_i16x8(b, v16));
    }
    sink(
        b,
        Run {
            codes,
            x_at: 0,
            scale,
            offset: None,
        },
    );
}

/// The blocks of 32 with nibbles: q4_0 (an f16 scale, nibbles recentred by 8), q4_1 (an
/// f16 scale and minimum, unsigned nibbles), q5_0 and q5_1, the same with a fifth bit
/// per value from the 32-bit word after the scales ([`fifth_bits`]; codes recentred by
/// 16 in q5_0), and iq4_nl (an f16 scale, nibbles that index its 16 signed levels, looked
/// up with a byte swizzle). Low nibbles are values 0..16, high nibbles 16..32.
fn nibble_runs(b: &mut FunctionBuilder, wb: Value, format: WeightFormat, sink: &mut Sink) {
    let minimum = matches!(format, WeightFormat::Q4_1 | WeightFormat::Q5_1);
    let five_bits = matches!(format, WeightFormat::Q5_0 | WeightFormat::Q5_1);
    let scale = load_f16(b, wb, 0);
    let offset = minimum.then(|| load_f16(b, wb, 2));
    let scales_end = if minimum { 4 } else { 2 };
    let fifth = five_bits.then(|| fifth_bits(b, wb, scales_end));
    let packed_at = if five_bits {
        scales_end + 4
    } else {
        scales_end
    };
    let packed = b.ins().load(types::I8X16, mem(), wb, packed_at);
    let mut codes = Vec::with_capacity(8);
    for (h, nibbles) in split_nibbles(b, packed).into_iter().enumerate() {
        let q = match fifth {
            Some(high) => b.ins().bor(nibbles, high[h]),
            None => nibbles,
        };
        codes.extend(if format == WeightFormat::Iq4Nl {
            signed_levels(b, IQ4_NL_LEVELS, q)
        } else if minimum {
            bytes_to_f32(b, q, false)
        } else {
            let centre = splat_i8(b, if five_bits { 16 } else { 8 });
            let centred = b.ins().isub(q, centre);
            bytes_to_f32(b, centred, true)
        });
    }
    sink(
        b,
        Run {
            codes,
            x_at: 0,
            scale,
            offset,
        },
    );
}

/// The signed levels of `table` that 16 nibbles (`i8x16`) index, as `f32x4` lanes: the
/// levels looked up by a byte swizzle and widened.
pub(super) fn signed_levels(
    b: &mut FunctionBuilder,
    table: [i8; 16],
    nibbles: Value,
) -> [Value; 4] {
    let levels = table.map(|l| l as u8).to_vec();
    let levels = b.func.dfg.constants.insert(ConstantData::from(levels));
    let levels = b.ins().vconst(types::I8X16, levels);
    let signed = b.ins().swizzle(levels, nibbles);
    bytes_to_f32(b, signed, true)
}

/// iq4_xs: an f16 scale `d`, the 16-bit word of the sub-blocks' scale high bit pairs at 2,
/// four bytes of their low nibbles at 4, and iq4_nl's 16 nibble bytes for each sub-block
/// `s` of 32 at `8 + 16 s`. A sub-block is a run whose scale is `d * (ls - 32)`, its
/// 6-bit `ls` being nibble `s % 2` of byte `4 + s / 2` under bit pair `s` of the word.
fn iq4_xs_runs(b: &mut FunctionBuilder, wb: Value, sink: &mut Sink) {
    let d = load_f16(b, wb, 0);
    let high = b.ins().uload16(types::I32, mem(), wb, 2);
    for s in 0..8i32 {
        let low = b.ins().uload8(types::I32, mem(), wb, 4 + s / 2);
        let low = b.ins().ushr_imm_s(low, i64::from(4 * (s % 2)));
        let low = b.ins().band_imm_s(low, 0xf);
        let top = b.ins().ushr_imm_s(high, i64::from(2 * s));
        let top = b.ins().band_imm_s(top, 3);
        let top = b.ins().ishl_imm_s(top, 4);
        let ls = b.ins().bor(low, top);
        let ls = b.ins().iadd_imm_s(ls, -32);
        let ls = b.ins().fcvt_from_sint(types::F32, ls);
        let scale = b.ins().fmul(d, ls);
        let packed = b.ins().load(types::I8X16, mem(), wb, 8 + 16 * s);
        let mut codes = Vec::with_capacity(8);
        for nibbles in split_nibbles(b, packed) {
            codes.extend(signed_levels(b, IQ4_NL_LEVELS, nibbles));
        }
        sink(
            b,
            Run {
                codes,
                x_at: 4 * 32 * s,
                scale,
                offset: None,
            },
        );
    }
}

/// The fifth bits of a q5 block's 32 values, from the little-endian word at `wb + at`, as
/// two `i8x16` holding 16 where the bit is set and 0 elsewhere: lane `l` of the first
/// takes bit `l`, of the second bit `16 + l`.
fn fifth_bits(b: &mut FunctionBuilder, wb: Value, at: i32) -> [Value; 2] {
    let word = b.ins().load(types::I32, mem(), wb, at);
    let sixteen = splat_i8(b, 16);
    [0u8, 2].map(|first| {
        let set = bit_lanes(b, word, first);
        b.ins().band(set, sixteen)
    })
}

/// An `i8x16` mask of 16 bits of the `i32` `word`: lane `l` all ones where bit `l % 8` of
/// byte `first + l / 8` is set, zero elsewhere (the word broadcast, its bytes spread by a
/// shuffle, each lane's bit kept and compared).
pub(super) fn bit_lanes(b: &mut FunctionBuilder, word: Value, first: u8) -> Value {
    let words = b.ins().splat(types::I32X4, word);
    let bytes = b.ins().bitcast(types::I8X16, little(), words);
    let spread: [u8; 16] = std::array::from_fn(|l| first + (l / 8) as u8);
    let spread = shuffle(b, bytes, bytes, &spread);
    let bit_of_lane: Vec<u8> = (0..16).map(|l| 1 << (l % 8)).collect();
    let bit_of_lane = b.func.dfg.constants.insert(ConstantData::from(bit_of_lane));
    let bit_of_lane = b.ins().vconst(types::I8X16, bit_of_lane);
    let bit = b.ins().band(spread, bit_of_lane);
    let zero = splat_i8(b, 0);
    b.ins().icmp(IntCC::NotEqual, bit, zero)
}

/// q4_k: an f16 scale and minimum, 6-bit sub-block scales and minimums (12 bytes), and 128
/// bytes of nibbles: sub-block `2p` is the low nibbles of bytes `32p..32p + 32`, `2p + 1`
/// their high nibbles; `w = d * sc * q - dmin * m`. With `five_bits`, q5_k: 32 bytes of
/// fifth bits come before the nibbles, value `l` of sub-block `s` at bit `s` of byte `l`.
fn q4_k_runs(b: &mut FunctionBuilder, wb: Value, five_bits: bool, sink: &mut Sink) {
    let d = load_f16(b, wb, 0);
    let dmin = load_f16(b, wb, 2);
    let codes_at = if five_bits { 48 } else { 16 };
    let fifth = five_bits.then(|| [0, 16].map(|at| b.ins().load(types::I8X16, mem(), wb, 16 + at)));
    for pair in 0..4 {
        let at = codes_at + 32 * pair as i32;
        let lo = b.ins().load(types::I8X16, mem(), wb, at);
        let hi = b.ins().load(types::I8X16, mem(), wb, at + 16);
        let [lo_low, lo_high] = split_nibbles(b, lo);
        let [hi_low, hi_high] = split_nibbles(b, hi);
        for (h, mut halves) in [[lo_low, hi_low], [lo_high, hi_high]]
            .into_iter()
            .enumerate()
        {
            let sub = 2 * pair + h;
            if let Some(fifth) = fifth {
                let bit = splat_i8(b, 1);
                for (half, high) in halves.iter_mut().zip(fifth) {
                    let t = shift_right(b, high, sub as i32);
                    let t = b.ins().band(t, bit);
                    let four = b.ins().iconst(types::I32, 4);
                    let t = b.ins().ishl(t, four);
                    *half = b.ins().bor(*half, t);
                }
            }
            let (sc, m) = q4_k_scale_min(b, wb, sub);
            let sc = b.ins().fcvt_from_sint(types::F32, sc);
            let m = b.ins().fcvt_from_sint(types::F32, m);
            let scale = b.ins().fmul(d, sc);
            let min = b.ins().fmul(dmin, m);
            let offset = b.ins().fneg(min);
            let mut codes = bytes_to_f32(b, halves[0], false).to_vec();
            codes.extend(bytes_to_f32(b, halves[1], false));
            sink(
                b,
                Run {
                    codes,
                    x_at: 4 * 32 * sub as i32,
                    scale,
                    offset: Some(offset),
                },
            );
        }
    }
}

/// The 6-bit scale and minimum (`i32`) of q4_k sub-block `sub`, from the 12 bytes at
/// `wb + 4`: sub-blocks 0..4 in the low 6 bits of bytes `sub` and `sub + 4`, sub-blocks
/// 4..8 split between the nibbles of byte `sub + 4` and the top bits of `sub - 4` and `sub`.
fn q4_k_scale_min(b: &mut FunctionBuilder, wb: Value, sub: usize) -> (Value, Value) {
    let byte =
        |b: &mut FunctionBuilder, i: usize| b.ins().uload8(types::I32, mem(), wb, 4 + i as i32);
    if sub < 4 {
        let sc = byte(b, sub);
        let m = byte(b, sub + 4);
        (b.ins().band_imm_s(sc, 63), b.ins().band_imm_s(m, 63))
    } else {
        let packed = byte(b, sub + 4);
        let below = byte(b, sub - 4);
        let same = byte(b, sub);
        let top = |b: &mut FunctionBuilder, v: Value| {
            let t = b.ins().ushr_imm_s(v, 6);
            b.ins().ishl_imm_s(t, 4)
        };
        let sc_lo = b.ins().band_imm_s(packed, 0xf);
        let sc_hi = top(b, below);
        let m_lo = b.ins().ushr_imm_s(packed, 4);
        let m_hi = top(b, same);
        (b.ins().bor(sc_lo, sc_hi), b.ins().bor(m_lo, m_hi))
    }
}

/// q6_k: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed sub-block scales and an
/// f16 scale at 208. Each half of 128 values has four quarters `g` of 32; value `l` of
/// quarter `g` takes nibble `g / 2` of low byte `l + 32 * (g % 2)` and bit pair `g` of high
/// byte `l`, minus 32; runs of 16 share a scale.
fn q6_k_runs(b: &mut FunctionBuilder, wb: Value, sink: &mut Sink) {
    let d = load_f16(b, wb, 208);
    let mask = splat_i8(b, 0xf);
    let pair = splat_i8(b, 3);
    let bias = splat_i8(b, 32);
    for n in 0..2i32 {
        for g in 0..4i32 {
            for h in 0..2i32 {
                let ql = b
                    .ins()
                    .load(types::I8X16, mem(), wb, 64 * n + 32 * (g % 2) + 16 * h);
                let qh = b.ins().load(types::I8X16, mem(), wb, 128 + 32 * n + 16 * h);
                let low = shift_right(b, ql, 4 * (g / 2));
                let low = b.ins().band(low, mask);
                let high = shift_right(b, qh, 2 * g);
                let high = b.ins().band(high, pair);
                let four = b.ins().iconst(types::I32, 4);
                let high = b.ins().ishl(high, four);
                let q = b.ins().bor(low, high);
                let q = b.ins().isub(q, bias);
                let codes = bytes_to_f32(b, q, true).to_vec();
                let sc = b
                    .ins()
                    .sload8(types::I32, mem(), wb, 192 + 8 * n + h + 2 * g);
                let sc = b.ins().fcvt_from_sint(types::F32, sc);
                let scale = b.ins().fmul(d, sc);
                sink(
                    b,
                    Run {
                        codes,
                        x_at: 4 * (128 * n + 32 * g + 16 * h),
                        scale,
                        offset: None,
                    },
                );
            }
        }
    }
}

/// q3_k: 32 bytes of high bits, 64 of 2-bit codes, 12 of 6-bit scales, an f16 scale at
/// 108. Run `s` (16 values) of half `n = s / 8` reads code bytes `32n + 16 (s % 2)..` at
/// shift `2 ((s % 8) / 2)` and their high bits from bytes `16 (s % 2)..` at bit
/// `4n + (s % 8) / 2`; a set high bit keeps the code, a clear one subtracts 4, and the
/// run's scale is `d * (sc - 32)` ([`q3_k_scale`]).
fn q3_k_runs(b: &mut FunctionBuilder, wb: Value, sink: &mut Sink) {
    let d = load_f16(b, wb, 108);
    let pair = splat_i8(b, 3);
    let bit = splat_i8(b, 1);
    let four = splat_i8(b, 4);
    for s in 0..16i32 {
        let (n, quarter, half) = (s / 8, (s % 8) / 2, s % 2);
        let q = b
            .ins()
            .load(types::I8X16, mem(), wb, 32 + 32 * n + 16 * half);
        let q = shift_right(b, q, 2 * quarter);
        let low = b.ins().band(q, pair);
        let h = b.ins().load(types::I8X16, mem(), wb, 16 * half);
        let h = shift_right(b, h, 4 * n + quarter);
        let h = b.ins().band(h, bit);
        let two = b.ins().iconst(types::I32, 2);
        let h = b.ins().ishl(h, two);
        let q = b.ins().bor(low, h);
        let q = b.ins().isub(q, four);
        let codes = bytes_to_f32(b, q, true).to_vec();
        let sc = q3_k_scale(b, wb, s as usize);
        let sc = b.ins().iadd_imm_s(sc, -32);
        let sc = b.ins().fcvt_from_sint(types::F32, sc);
        let scale = b.ins().fmul(d, sc);
        sink(
            b,
            Run {
                codes,
                x_at: 4 * 16 * s,
                scale,
                offset: None,
            },
        );
    }
}

/// The 6-bit scale (`i32`, stored offset by 32) of q3_k sub-block `sub`, from the 12 bytes
/// at `wb + 96`: its low nibble in byte `sub` (the high nibble of `sub - 8` from 8 on), its
/// top two bits in byte `8 + sub % 4` at bit `2 (sub / 4)`.
fn q3_k_scale(b: &mut FunctionBuilder, wb: Value, sub: usize) -> Value {
    let byte =
        |b: &mut FunctionBuilder, i: usize| b.ins().uload8(types::I32, mem(), wb, 96 + i as i32);
    let low = if sub < 8 {
        let v = byte(b, sub);
        b.ins().band_imm_s(v, 0xf)
    } else {
        let v = byte(b, sub - 8);
        b.ins().ushr_imm_s(v, 4)
    };
    let top = byte(b, 8 + sub % 4);
    let top = b.ins().ushr_imm_s(top, 2 * (sub / 4) as i64);
    let top = b.ins().band_imm_s(top, 3);
    let top = b.ins().ishl_imm_s(top, 4);
    b.ins().bor(low, top)
}

/// q2_k: 16 sub-block bytes (scale in the low nibble, minimum in the high), 64 bytes of
/// 2-bit codes, f16 scale and minimum at 80 and 82. Each half of 128 values reads its 32
/// code bytes four times, at shifts 0, 2, 4 and 6; runs of 16 share a sub-block byte.
fn q2_k_runs(b: &mut FunctionBuilder, wb: Value, sink: &mut Sink) {
    let d = load_f16(b, wb, 80);
    let dmin = load_f16(b, wb, 82);
    let pair = splat_i8(b, 3);
    for n in 0..2i32 {
        for s in 0..4i32 {
            for half in 0..2i32 {
                let q = b
                    .ins()
                    .load(types::I8X16, mem(), wb, 16 + 32 * n + 16 * half);
                let q = shift_right(b, q, 2 * s);
                let q = b.ins().band(q, pair);
                let codes = bytes_to_f32(b, q, false).to_vec();
                let sc = b.ins().uload8(types::I32, mem(), wb, 8 * n + 2 * s + half);
                let low = b.ins().band_imm_s(sc, 0xf);
                let high = b.ins().ushr_imm_s(sc, 4);
                let low = b.ins().fcvt_from_sint(types::F32, low);
                let high = b.ins().fcvt_from_sint(types::F32, high);
                let scale = b.ins().fmul(d, low);
                let min = b.ins().fmul(dmin, high);
                let offset = b.ins().fneg(min);
                sink(
                    b,
                    Run {
                        codes,
                        x_at: 4 * (128 * n + 32 * s + 16 * half),
                        scale,
                        offset: Some(offset),
                    },
                );
            }
        }
    }
}

/// The codes of a whole-matrix format and what they mean.
#[derive(Clone, Copy)]
struct Codes {
    /// Bits per code.
    bits: usize,
    /// Codes index the NormalFloat levels.
    nf4: bool,
    /// Codes are signed (symmetric affine).
    signed: bool,
    /// Scale storage type.
    scale: DType,
}

/// Decodes row `j` of a `[n, k]` nf4 or affine weight (`[w, j, row]`: the storage, the
/// row's index and its first code byte; codes of the whole matrix first, then one scale
/// per group, then (asymmetric affine) one zero point byte per group) for `purpose`, with
/// `values` the row's x (a dot product) or output (a dequantization).
fn decode_whole(
    b: &mut FunctionBuilder,
    weight: WeightFormat,
    [n, k]: [usize; 2],
    purpose: Purpose,
    [w, j, row]: [Value; 3],
    values: Value,
) {
    let (codes, group, zeros, axis) = match weight {
        WeightFormat::Nf4 { block, scale } => (
            Codes {
                bits: 4,
                nf4: true,
                signed: false,
                scale,
            },
            block as usize,
            false,
            1,
        ),
        WeightFormat::Affine {
            bits,
            group,
            symmetric,
            axis,
            scale,
        } => (
            Codes {
                bits: usize::from(bits),
                nf4: false,
                signed: symmetric,
                scale,
            },
            group as usize,
            !symmetric,
            axis,
        ),
        other => unreachable!("{other:?} is not a whole-matrix format"),
    };
    let scale_bytes = codes.scale.size_bytes() as i64;
    let scales = b.ins().iadd_imm_s(w, (n * weight.row_bytes(k)) as i64);
    let zero_points = zeros.then(|| {
        let groups = n * k / group;
        b.ins().iadd_imm_s(scales, groups as i64 * scale_bytes)
    });
    if axis == 0 {
        // Group r = j / group of rows has a scale (and zero point) per column.
        let r = if group > 1 {
            b.ins().udiv_imm_u(j, group as i64)
        } else {
            j
        };
        let first = b.ins().imul_imm_s(r, k as i64);
        let scale_row = address(b, scales, first, scale_bytes);
        let zero_row = zero_points.map(|z| b.ins().iadd(z, first));
        lane_scaled_run(b, codes, purpose, (values, row), k, (scale_row, zero_row));
    } else {
        // Row j holds groups j * (k / group) ..; one loop step per group (the type
        // verifier keeps groups to whole bytes).
        let groups = (k / group) as i64;
        let first = b.ins().imul_imm_s(j, groups);
        let start = b.ins().iconst(types::I64, 0);
        let end = b.ins().iconst(types::I64, groups);
        for_range(b, start, end, 1, |b, t| {
            let g = b.ins().iadd(first, t);
            let vg = address(b, values, t, 4 * group as i64);
            let cg = address(b, row, t, (group * codes.bits / 8) as i64);
            let at = address(b, scales, g, scale_bytes);
            let scale = scalar_scale(b, codes.scale, at, 0);
            let offset = zero_points.map(|z| {
                let at = b.ins().iadd(z, g);
                let z = b.ins().uload8(types::I32, mem(), at, 0);
                let z = b.ins().fcvt_from_sint(types::F32, z);
                let product = b.ins().fmul(scale, z);
                b.ins().fneg(product)
            });
            group_run(b, codes, purpose, (vg, cg), group, (scale, offset));
        });
    }
}

/// A whole-matrix row's accumulators: two `f32x4` for the vector steps, an `f32` for the
/// scalar tails.
struct Sums {
    acc: Vec<Variable>,
    tail: Variable,
}

impl Sums {
    /// The sum of the vector accumulators.
    fn total(&self, b: &mut FunctionBuilder) -> Value {
        let a = b.use_var(self.acc[0]);
        let c = b.use_var(self.acc[1]);
        let both = b.ins().fadd(a, c);
        horizontal_sum(b, both)
    }

    /// `tail += v`.
    fn add_tail(&self, b: &mut FunctionBuilder, v: Value) {
        let t = b.use_var(self.tail);
        let t = b.ins().fadd(t, v);
        b.def_var(self.tail, t);
    }
}

/// `len` values sharing `scale` and `offset` (`(values, codes)` at their first value),
/// decoded [`CHUNK`] at a time with a scalar tail, for `purpose`.
fn group_run(
    b: &mut FunctionBuilder,
    codes: Codes,
    purpose: Purpose,
    span: (Value, Value),
    len: usize,
    scaling: (Value, Option<Value>),
) {
    match purpose {
        Purpose::Dot(sums) => dot_group(b, codes, sums, span, len, scaling),
        Purpose::Store => store_group(b, codes, span, len, scaling),
    }
}

/// Stores `len` values `scale * q + offset` (`(out, codes)` at their first value).
fn store_group(
    b: &mut FunctionBuilder,
    codes: Codes,
    (out, at): (Value, Value),
    len: usize,
    (scale, offset): (Value, Option<Value>),
) {
    let scale_v = b.ins().splat(types::F32X4, scale);
    let offset_v = offset.map(|o| b.ins().splat(types::F32X4, o));
    let vectorized = for_chunks(b, codes, (out, at), len, |b, oc, q, _| {
        for (v, q) in q.into_iter().enumerate() {
            let w = match offset_v {
                Some(o) => b.ins().fma(q, scale_v, o),
                None => b.ins().fmul(q, scale_v),
            };
            b.ins().store(mem(), w, oc, 16 * v as i32);
        }
    });
    for e in vectorized..len {
        let q = scalar_value(b, codes, at, e * codes.bits);
        let w = match offset {
            Some(o) => b.ins().fma(q, scale, o),
            None => b.ins().fmul(q, scale),
        };
        b.ins().store(mem(), w, out, 4 * e as i32);
    }
}

/// The dot product of `len` values sharing `scale` and `offset` (`(x, codes)` at their
/// first value) with x: [`CHUNK`]-value vector steps into two partial sums, a scalar tail,
/// then scaled once, into `sums`.
fn dot_group(
    b: &mut FunctionBuilder,
    codes: Codes,
    sums: &Sums,
    (x, at): (Value, Value),
    len: usize,
    (scale, offset): (Value, Option<Value>),
) {
    let parts = zeroed_accumulators(b, 3);
    let vectorized = for_chunks(b, codes, (x, at), len, |b, xc, q, _| {
        for (v, q) in q.into_iter().enumerate() {
            let xv = b.ins().load(types::F32X4, mem(), xc, 16 * v as i32);
            accumulate(b, parts[v % 2], q, xv);
            if offset.is_some() {
                let s = b.use_var(parts[2]);
                let s = b.ins().fadd(s, xv);
                b.def_var(parts[2], s);
            }
        }
    });
    let scale_v = b.ins().splat(types::F32X4, scale);
    let p0 = b.use_var(parts[0]);
    let p1 = b.use_var(parts[1]);
    let products = b.ins().fadd(p0, p1);
    accumulate(b, sums.acc[0], products, scale_v);
    if let Some(offset) = offset {
        let offset_v = b.ins().splat(types::F32X4, offset);
        let xs = b.use_var(parts[2]);
        accumulate(b, sums.acc[1], xs, offset_v);
    }
    // The tail: values `vectorized..len`, one at a time.
    let (mut products, mut xs) = (b.ins().f32const(0.0), b.ins().f32const(0.0));
    for e in vectorized..len {
        let q = scalar_value(b, codes, at, e * codes.bits);
        let xe = b.ins().load(types::F32, mem(), x, 4 * e as i32);
        products = b.ins().fma(q, xe, products);
        xs = b.ins().fadd(xs, xe);
    }
    if vectorized < len {
        let mut v = b.ins().fmul(products, scale);
        if let Some(offset) = offset {
            v = b.ins().fma(xs, offset, v);
        }
        sums.add_tail(b, v);
    }
}

/// A row of `len` values (`(values, codes)` at its first value) whose scales (and zero
/// points) change along the row (`(scales, zero points)` of its first value): every lane
/// is `(q - z) * s`, then multiplied with x or stored, as `purpose` says.
fn lane_scaled_run(
    b: &mut FunctionBuilder,
    codes: Codes,
    purpose: Purpose,
    (x, at): (Value, Value),
    len: usize,
    (scales, zeros): (Value, Option<Value>),
) {
    let scale_bytes = codes.scale.size_bytes();
    let vectorized = for_chunks(b, codes, (x, at), len, |b, xc, q, i| {
        let sc = address(b, scales, i, (CHUNK * scale_bytes) as i64);
        let zero_points = zeros.map(|z| {
            let zc = address(b, z, i, CHUNK as i64);
            let mut out = Vec::with_capacity(CHUNK / 4);
            for half in 0..2 {
                let bytes = b.ins().load(types::I8X16, mem(), zc, 16 * half);
                out.extend(bytes_to_f32(b, bytes, false));
            }
            out
        });
        for (v, q) in q.into_iter().enumerate() {
            let s = load_scales(b, codes.scale, sc, (4 * v * scale_bytes) as i32);
            let q = match &zero_points {
                Some(z) => b.ins().fsub(q, z[v]),
                None => q,
            };
            let weight = b.ins().fmul(q, s);
            match purpose {
                Purpose::Dot(sums) => {
                    let xv = b.ins().load(types::F32X4, mem(), xc, 16 * v as i32);
                    accumulate(b, sums.acc[v % 2], weight, xv);
                }
                Purpose::Store => {
                    b.ins().store(mem(), weight, xc, 16 * v as i32);
                }
            }
        }
    });
    for e in vectorized..len {
        let mut q = scalar_value(b, codes, at, e * codes.bits);
        if let Some(z) = zeros {
            let z = b.ins().uload8(types::I32, mem(), z, e as i32);
            let z = b.ins().fcvt_from_sint(types::F32, z);
            q = b.ins().fsub(q, z);
        }
        let s = scalar_scale(b, codes.scale, scales, (e * scale_bytes) as i32);
        let weight = b.ins().fmul(q, s);
        match purpose {
            Purpose::Dot(sums) => {
                let xe = b.ins().load(types::F32, mem(), x, 4 * e as i32);
                let product = b.ins().fmul(weight, xe);
                sums.add_tail(b, product);
            }
            Purpose::Store => {
                b.ins().store(mem(), weight, x, 4 * e as i32);
            }
        }
    }
}

/// Runs `body` on each whole [`CHUNK`] of `len` values (`(values, codes)` at the first:
/// x or the output, and the codes), in a loop: `body` gets the chunk's values address,
/// its eight decoded `f32x4` ([`chunk_values`]) and the chunk's index. Returns where the
/// scalar tail starts.
fn for_chunks(
    b: &mut FunctionBuilder,
    codes: Codes,
    (values, at): (Value, Value),
    len: usize,
    mut body: impl FnMut(&mut FunctionBuilder, Value, Vec<Value>, Value),
) -> usize {
    let chunks = len / CHUNK;
    if chunks > 0 {
        let start = b.ins().iconst(types::I64, 0);
        let end = b.ins().iconst(types::I64, chunks as i64);
        for_range(b, start, end, 1, |b, i| {
            let vc = address(b, values, i, 4 * CHUNK as i64);
            let cc = address(b, at, i, (CHUNK * codes.bits / 8) as i64);
            let decoded = chunk_values(b, codes, cc);
            body(b, vc, decoded, i);
        });
    }
    chunks * CHUNK
}

/// The [`CHUNK`] values coded at `at` as eight `f32x4`, in element order: NormalFloat
/// levels, sign-extended codes, or unsigned codes (the zero point is applied later).
fn chunk_values(b: &mut FunctionBuilder, codes: Codes, at: Value) -> Vec<Value> {
    let raw = chunk_codes(b, codes.bits, at);
    let mut out = Vec::with_capacity(CHUNK / 4);
    for v in raw {
        if codes.nf4 {
            out.extend(nf4_levels(b, v));
        } else if codes.signed {
            let v = if codes.bits < 8 {
                let up = b.ins().iconst(types::I32, 8 - codes.bits as i64);
                let shifted = b.ins().ishl(v, up);
                b.ins().sshr(shifted, up)
            } else {
                v
            };
            out.extend(bytes_to_f32(b, v, true));
        } else {
            out.extend(bytes_to_f32(b, v, false));
        }
    }
    out
}

/// The [`CHUNK`] codes at `at` as two `i8x16` in element order (each code in the low bits
/// of its byte). Codes pack low bits first, so a byte's codes interleave.
fn chunk_codes(b: &mut FunctionBuilder, bits: usize, at: Value) -> [Value; 2] {
    match bits {
        8 => [
            b.ins().load(types::I8X16, mem(), at, 0),
            b.ins().load(types::I8X16, mem(), at, 16),
        ],
        4 => {
            let packed = b.ins().load(types::I8X16, mem(), at, 0);
            let [low, high] = split_nibbles(b, packed);
            [
                shuffle(b, low, high, &interleave_bytes(0)),
                shuffle(b, low, high, &interleave_bytes(8)),
            ]
        }
        _ => {
            // 8 bytes of 2-bit codes: code 4i + s is bits 2s.. of byte i.
            let word = b.ins().load(types::I64, mem(), at, 0);
            let wide = b.ins().scalar_to_vector(types::I64X2, word);
            let packed = b.ins().bitcast(types::I8X16, little(), wide);
            let pair = splat_i8(b, 3);
            let planes: Vec<Value> = (0..4)
                .map(|s| {
                    let v = shift_right(b, packed, 2 * s);
                    b.ins().band(v, pair)
                })
                .collect();
            let even = shuffle(b, planes[0], planes[1], &interleave_bytes(0));
            let odd = shuffle(b, planes[2], planes[3], &interleave_bytes(0));
            [
                shuffle(b, even, odd, &interleave_pairs(0)),
                shuffle(b, even, odd, &interleave_pairs(4)),
            ]
        }
    }
}

/// The f32 value of the code at bit `bit` from `at` (one scalar load; the tails of
/// [`group_run`] and [`lane_scaled_run`]).
fn scalar_value(b: &mut FunctionBuilder, codes: Codes, at: Value, bit: usize) -> Value {
    let byte = b.ins().uload8(types::I32, mem(), at, (bit / 8) as i32);
    let code = b.ins().ushr_imm_s(byte, (bit % 8) as i64);
    let code = b.ins().band_imm_s(code, (1 << codes.bits) - 1);
    if codes.nf4 {
        // A tree of selects on the code's bits, from the lowest.
        let mut level: Vec<Value> = NF4_LEVELS.iter().map(|&l| b.ins().f32const(l)).collect();
        for bit in 0..4 {
            let set = b.ins().band_imm_s(code, 1 << bit);
            let set = b.ins().icmp_imm_s(IntCC::NotEqual, set, 0);
            level = level
                .chunks(2)
                .map(|p| b.ins().select(set, p[1], p[0]))
                .collect();
        }
        level[0]
    } else if codes.signed {
        let up = 32 - codes.bits as i64;
        let shifted = b.ins().ishl_imm_s(code, up);
        let extended = b.ins().sshr_imm_s(shifted, up);
        b.ins().fcvt_from_sint(types::F32, extended)
    } else {
        b.ins().fcvt_from_sint(types::F32, code)
    }
}

/// The NormalFloat levels of 16 codes (0..16) as four `f32x4`: each byte of the levels'
/// f32 bits is looked up with a byte swizzle, and the four byte planes are interleaved
/// back into floats.
fn nf4_levels(b: &mut FunctionBuilder, codes: Value) -> [Value; 4] {
    let planes: Vec<Value> = (0..4)
        .map(|p| {
            let table: Vec<u8> = NF4_LEVELS
                .iter()
                .map(|l| (l.to_bits() >> (8 * p)) as u8)
                .collect();
            let table = b.func.dfg.constants.insert(ConstantData::from(table));
            let table = b.ins().vconst(types::I8X16, table);
            b.ins().swizzle(table, codes)
        })
        .collect();
    // Bytes 0 and 1, and 2 and 3, of values 0..8 and 8..16.
    let low01 = shuffle(b, planes[0], planes[1], &interleave_bytes(0));
    let high01 = shuffle(b, planes[0], planes[1], &interleave_bytes(8));
    let low23 = shuffle(b, planes[2], planes[3], &interleave_bytes(0));
    let high23 = shuffle(b, planes[2], planes[3], &interleave_bytes(8));
    [
        (low01, low23, 0),
        (low01, low23, 4),
        (high01, high23, 0),
        (high01, high23, 4),
    ]
    .map(|(a, c, from)| {
        let bytes = shuffle(b, a, c, &interleave_pairs(from));
        b.ins().bitcast(types::F32X4, little(), bytes)
    })
}

/// The shuffle mask `a[from], c[from], a[from + 1], c[from + 1], ...` over 8 lanes each.
fn interleave_bytes(from: u8) -> [u8; 16] {
    std::array::from_fn(|i| from + (i / 2) as u8 + if i % 2 == 1 { 16 } else { 0 })
}

/// The shuffle mask taking byte pairs `from..from + 4` of `a` and `c` in turn.
fn interleave_pairs(from: u8) -> [u8; 16] {
    std::array::from_fn(|i| {
        let pair = from + (i / 4) as u8;
        2 * pair + (i % 2) as u8 + if (i / 2) % 2 == 1 { 16 } else { 0 }
    })
}

/// `shuffle(a, c, mask)`: lane `i` is byte `mask[i]` of `a` (0..16) or `c` (16..32).
pub(super) fn shuffle(b: &mut FunctionBuilder, a: Value, c: Value, mask: &[u8; 16]) -> Value {
    let mask = b
        .func
        .dfg
        .immediates
        .push(ConstantData::from(mask.to_vec()));
    b.ins().shuffle(a, c, mask)
}

/// A little-endian flag for bitcasts between vector shapes.
pub(super) fn little() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

/// The scale of type `dtype` at `at`, as `f32`.
pub fn scale_at(b: &mut FunctionBuilder, dtype: DType, at: Value) -> Value {
    scalar_scale(b, dtype, at, 0)
}

/// The scale at `at + offset` as `f32`.
fn scalar_scale(b: &mut FunctionBuilder, dtype: DType, at: Value, offset: i32) -> Value {
    match dtype {
        DType::F16 => load_f16(b, at, offset),
        DType::BF16 => {
            let h = b.ins().uload16(types::I32, mem(), at, offset);
            let bits = b.ins().ishl_imm_s(h, 16);
            b.ins().bitcast(types::F32, MemFlagsData::new(), bits)
        }
        _ => b.ins().load(types::F32, mem(), at, offset),
    }
}

/// The four scales at `at + offset` as an `f32x4`.
fn load_scales(b: &mut FunctionBuilder, dtype: DType, at: Value, offset: i32) -> Value {
    match dtype {
        DType::F16 => {
            let h = b.ins().uload16x4(mem(), at, offset);
            f16_lanes(b, h)
        }
        DType::BF16 => {
            let h = b.ins().uload16x4(mem(), at, offset);
            let sixteen = b.ins().iconst(types::I32, 16);
            let bits = b.ins().ishl(h, sixteen);
            b.ins().bitcast(types::F32X4, MemFlagsData::new(), bits)
        }
        _ => b.ins().load(types::F32X4, mem(), at, offset),
    }
}

/// The f32 value of the little-endian f16 at `at + offset` (normal and subnormal values;
/// scales are never infinite or NaN).
pub fn load_f16(b: &mut FunctionBuilder, at: Value, offset: i32) -> Value {
    let h = b.ins().uload16(types::I32, mem(), at, offset);
    f16_to_f32(b, h)
}

/// The f16 whose bits are the low 16 of the `i32` `h` (the rest zero), as an `f32`
/// (normal and subnormal values).
pub(super) fn f16_to_f32(b: &mut FunctionBuilder, h: Value) -> Value {
    let magnitude = b.ins().band_imm_s(h, 0x7fff);
    let shifted = b.ins().ishl_imm_s(magnitude, 13);
    let f = b.ins().bitcast(types::F32, MemFlagsData::new(), shifted);
    // Rebias the exponent from 15 to 127: multiply by 2^112.
    let rebias = b.ins().f32const(f32::from_bits((127 + 112) << 23));
    let value = b.ins().fmul(f, rebias);
    let sign = b.ins().band_imm_s(h, 0x8000);
    let sign = b.ins().ishl_imm_s(sign, 16);
    let bits = b.ins().bitcast(types::I32, MemFlagsData::new(), value);
    let bits = b.ins().bor(bits, sign);
    b.ins().bitcast(types::F32, MemFlagsData::new(), bits)
}

/// [`load_f16`] on four f16 bit patterns held in the lanes of an `i32x4`.
fn f16_lanes(b: &mut FunctionBuilder, h: Value) -> Value {
    let low = splat_i32(b, 0x7fff);
    let magnitude = b.ins().band(h, low);
    let thirteen = b.ins().iconst(types::I32, 13);
    let shifted = b.ins().ishl(magnitude, thirteen);
    let f = b.ins().bitcast(types::F32X4, MemFlagsData::new(), shifted);
    let rebias = splat(b, f32::from_bits((127 + 112) << 23));
    let value = b.ins().fmul(f, rebias);
    let top = splat_i32(b, 0x8000);
    let sign = b.ins().band(h, top);
    let sixteen = b.ins().iconst(types::I32, 16);
    let sign = b.ins().ishl(sign, sixteen);
    let bits = b.ins().bitcast(types::I32X4, MemFlagsData::new(), value);
    let bits = b.ins().bor(bits, sign);
    b.ins().bitcast(types::F32X4, MemFlagsData::new(), bits)
}

/// Stores the `k` 16-bit floats of the `format` row at `row` as `f32` at `out`.
fn store_half_row(b: &mut FunctionBuilder, format: WeightFormat, row: Value, out: Value, k: usize) {
    let fours = (k / 4) as i64;
    if fours > 0 {
        let zero = b.ins().iconst(types::I64, 0);
        let end = b.ins().iconst(types::I64, fours);
        for_range(b, zero, end, 1, |b, q| {
            let from = address(b, row, q, 8);
            let h = b.ins().uload16x4(mem(), from, 0);
            let v = half_lanes(b, format, h);
            let to = address(b, out, q, 16);
            b.ins().store(mem(), v, to, 0);
        });
    }
    for e in k - k % 4..k {
        let v = half_scalar(b, format, row, 2 * e as i32);
        b.ins().store(mem(), v, out, 4 * e as i32);
    }
}

/// The `f32` values of four 16-bit floats of `format` (`PackedF16`: every f16, infinities
/// included, a NaN as a NaN; `PackedBF16`: the top halves of f32s) held in the lanes of an
/// `i32x4`.
pub fn half_lanes(b: &mut FunctionBuilder, format: WeightFormat, h: Value) -> Value {
    let flags = MemFlagsData::new();
    let sixteen = b.ins().iconst(types::I32, 16);
    if format == WeightFormat::PackedBF16 {
        let bits = b.ins().ishl(h, sixteen);
        return b.ins().bitcast(types::F32X4, flags, bits);
    }
    let finite = f16_lanes(b, h);
    // Exponent 31: infinity or NaN, whose f32 keeps the sign and the mantissa.
    let exponent_mask = splat_i32(b, 0x7c00);
    let exponent = b.ins().band(h, exponent_mask);
    let special = b.ins().icmp(IntCC::Equal, exponent, exponent_mask);
    let mantissa_mask = splat_i32(b, 0x3ff);
    let mantissa = b.ins().band(h, mantissa_mask);
    let thirteen = b.ins().iconst(types::I32, 13);
    let mantissa = b.ins().ishl(mantissa, thirteen);
    let sign_mask = splat_i32(b, 0x8000);
    let sign = b.ins().band(h, sign_mask);
    let sign = b.ins().ishl(sign, sixteen);
    let top = splat_i32(b, 0x7f80_0000);
    let inf_nan = b.ins().bor(mantissa, top);
    let inf_nan = b.ins().bor(inf_nan, sign);
    let finite = b.ins().bitcast(types::I32X4, flags, finite);
    let bits = b.ins().bitselect(special, inf_nan, finite);
    b.ins().bitcast(types::F32X4, flags, bits)
}

/// The `f32` value of the 16-bit float of `format` at `at + offset` ([`half_lanes`] on
/// one value).
pub fn half_scalar(b: &mut FunctionBuilder, format: WeightFormat, at: Value, offset: i32) -> Value {
    let h = b.ins().uload16(types::I32, mem(), at, offset);
    let lanes = b.ins().splat(types::I32X4, h);
    let v = half_lanes(b, format, lanes);
    b.ins().extractlane(v, 0)
}

/// `c` in every lane of an `i32x4`.
fn splat_i32(b: &mut FunctionBuilder, c: i64) -> Value {
    let c = b.ins().iconst(types::I32, c);
    b.ins().splat(types::I32X4, c)
}

/// Eight 16-bit integers widened to two `f32x4`.
pub fn widen_i16x8(b: &mut FunctionBuilder, v16: Value) -> [Value; 2] {
    let lo = b.ins().swiden_low(v16);
    let hi = b.ins().swiden_high(v16);
    [
        b.ins().fcvt_from_sint(types::F32X4, lo),
        b.ins().fcvt_from_sint(types::F32X4, hi),
    ]
}

/// Sixteen bytes (signed or unsigned) widened to four `f32x4`.
pub(super) fn bytes_to_f32(b: &mut FunctionBuilder, v: Value, signed: bool) -> [Value; 4] {
    let (lo, hi) = if signed {
        (b.ins().swiden_low(v), b.ins().swiden_high(v))
    } else {
        (b.ins().uwiden_low(v), b.ins().uwiden_high(v))
    };
    let [a, c] = widen_i16x8(b, lo);
    let [d, e] = widen_i16x8(b, hi);
    [a, c, d, e]
}

/// The low and high nibbles of 16 bytes.
pub(super) fn split_nibbles(b: &mut FunctionBuilder, packed: Value) -> [Value; 2] {
    let mask = splat_i8(b, 0xf);
    let low = b.ins().band(packed, mask);
    let high = shift_right(b, packed, 4);
    let high = b.ins().band(high, mask);
    [low, high]
}

/// The bytes of `v` shifted right (logically) by `bits` (none for 0).
fn shift_right(b: &mut FunctionBuilder, v: Value, bits: i32) -> Value {
    if bits == 0 {
        return v;
    }
    let n = b.ins().iconst(types::I32, i64::from(bits));
    b.ins().ushr(v, n)
}

/// An `i8x16` with every lane `c`.
pub(super) fn splat_i8(b: &mut FunctionBuilder, c: i64) -> Value {
    let c = b.ins().iconst(types::I8, c);
    b.ins().splat(types::I8X16, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The masks put a's and c's lanes where the unpack instructions would.
    #[test]
    fn interleave_masks() {
        assert_eq!(
            interleave_bytes(0),
            [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23]
        );
        assert_eq!(interleave_bytes(8)[..4], [8, 24, 9, 25]);
        assert_eq!(
            interleave_pairs(0),
            [0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23]
        );
        assert_eq!(interleave_pairs(4)[..4], [8, 9, 24, 25]);
    }
}
