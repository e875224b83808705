//! Backend-neutral kernel families: what an `llm` op becomes before any code generator sees
//! it.
//!
//! [`select`] maps one op, with the static shapes of its types, to a [`Kernel`]; code
//! generators (Cranelift for the CPU, WGSL for the GPU) implement the families, never the
//! ops. An op [`select`] does not map yet runs through its reference semantics (see
//! `docs/lowering.md` for the list).
//!
//! Static dims are baked into the kernel (the contraction length, the row length of a
//! norm); dynamic dims (tokens, batch) become loop bounds passed at run time.

use llm_ir::{
    dtype::DType,
    interp::{
        KvBlocks, KvElement,
        eval::{
            attention::{RopeAngles, Scoring},
            fused::{ScalarBody, ScalarStep},
        },
    },
    ops::OpCheck,
    params::ParamValue,
    types::{KvStorage, QuantFormat, Reduction, TensorType},
};
use pliron::{
    context::{Context, Ptr},
    operation::Operation,
};

/// How the rows of a contraction's weight matrix are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// `f32`, row major.
    F32,
    /// `f32` in panels of [`PANEL_ROWS`] rows: a backend repacks a constant `F32` (or
    /// `F32KN`) weight into this layout when it compiles ([`pack_panels`]), so that a
    /// kernel computing [`PANEL_ROWS`] outputs at once reads one sequential stream.
    F32Panels,
    /// `f16`, row major, read as WGSL `f16`: the GPU backend stores a weight this way when
    /// the device has `shader-f16` and the weight is an `f16` matrix (`PackedF16`, the same
    /// bytes) or an `f32` one whose every value is exactly an `f16`.
    F16,
    /// The bits of `f16` values, row major, two to a 32-bit word: an `llm.quantized_tensor`
    /// of format `f16` (a GGUF F16 or Hugging Face float16 matrix kept at 16 bits), widened
    /// as it is read.
    PackedF16,
    /// The bits of `bf16` values, as [`WeightFormat::PackedF16`] (format `bf16`).
    PackedBF16,
    /// `f32` stored `[k, n]` (a matmul without `transpose_rhs`): no kernel reads it as is;
    /// a constant one is transposed into panels at compile time.
    F32KN,
    /// GGUF q8_0: blocks of 32 weights, an f16 scale and 32 signed bytes (34 bytes).
    Q8_0,
    /// GGUF q4_0: blocks of 32 weights, an f16 scale and 16 bytes of nibbles (18 bytes);
    /// low nibbles are weights 0..16, high nibbles 16..32, value = nibble - 8.
    Q4_0,
    /// GGUF q4_1: blocks of 32, an f16 scale and minimum and 16 bytes of nibbles (20 bytes).
    Q4_1,
    /// GGUF q5_0: blocks of 32, an f16 scale, 32 fifth bits and 16 bytes of nibbles (22
    /// bytes); value = code - 16.
    Q5_0,
    /// GGUF q5_1: blocks of 32, an f16 scale and minimum, 32 fifth bits and 16 bytes of
    /// nibbles (24 bytes).
    Q5_1,
    /// GGUF q4_k: super-blocks of 256 (144 bytes): f16 scale and minimum, twelve bytes of
    /// 6-bit sub-block scales and minimums, 128 bytes of nibbles.
    Q4K,
    /// GGUF q6_k: super-blocks of 256 (210 bytes): low nibbles, high bit pairs, 16 signed
    /// sub-block scales, an f16 scale.
    Q6K,
    /// GGUF q2_k: super-blocks of 256 (84 bytes): sub-block scales and minimums, 2-bit codes,
    /// f16 scale and minimum.
    Q2K,
    /// GGUF q3_k: super-blocks of 256 (110 bytes): high bits, 2-bit codes, 6-bit signed
    /// sub-block scales, an f16 scale.
    Q3K,
    /// GGUF q5_k: super-blocks of 256 (176 bytes): q4_k's scales and nibbles with a fifth
    /// bit per value.
    Q5K,
    /// GGUF iq4_nl: blocks of 32, an f16 scale and 16 bytes of nibbles (18 bytes), each
    /// nibble an index into the 16 signed levels of `llm_ir::types::IQ4_NL_LEVELS`; low
    /// nibbles are weights 0..16, high nibbles 16..32.
    Iq4Nl,
    /// GGUF iq4_xs: super-blocks of 256 (136 bytes): an f16 scale, the eight 6-bit
    /// sub-block scales (high bit pairs in a 16-bit word, low nibbles in four bytes), and
    /// iq4_nl's nibbles for each sub-block of 32.
    Iq4Xs,
    /// GGUF iq3_xxs: super-blocks of 256 (98 bytes): an f16 scale, 64 indices into
    /// `llm_ir::types::IQ3XXS_GRID` (a group of four magnitudes each), and per sub-block of
    /// 32 a word of four 7-bit sign codes and a 4-bit scale.
    Iq3Xxs,
    /// GGUF iq3_s: super-blocks of 256 (110 bytes): an f16 scale, 64 nine-bit indices into
    /// `llm_ir::types::IQ3S_GRID` (low bytes, then the ninth bits), a sign bit per value
    /// and 4-bit sub-block scales.
    Iq3S,
    /// GGUF iq2_xxs: super-blocks of 256 (66 bytes): an f16 scale and per sub-block of 32
    /// four indices into `llm_ir::types::IQ2XXS_GRID` (a group of eight magnitudes each)
    /// and a word of four 7-bit sign codes and a 4-bit scale.
    Iq2Xxs,
    /// GGUF iq2_xs: super-blocks of 256 (74 bytes): an f16 scale, 32 words of a 9-bit
    /// index into `llm_ir::types::IQ2XS_GRID` and a 7-bit sign code, and a 4-bit scale per
    /// 16 values.
    Iq2Xs,
    /// GGUF iq2_s: super-blocks of 256 (82 bytes): an f16 scale, the low bytes of 32
    /// ten-bit indices into `llm_ir::types::IQ2S_GRID`, a sign bit per value, the indices'
    /// high bit pairs, and a 4-bit scale per 16 values.
    Iq2S,
    /// GGUF iq1_s: super-blocks of 256 (50 bytes): an f16 scale, the low bytes of 32
    /// eleven-bit indices into `llm_ir::types::IQ1S_GRID` (a group of eight values -1, 0
    /// or 1 each), and per sub-block of 32 a word of the indices' high bits, a 3-bit scale
    /// and the sign of the sub-block's shift (±1/8).
    Iq1S,
    /// GGUF iq1_m: super-blocks of 256 (56 bytes): the low bytes of 32 indices into
    /// `llm_ir::types::IQ1S_GRID`, a nibble a group of the index's high bits and its
    /// shift's sign, and a 3-bit scale per 16 values in four words whose top nibbles hold
    /// the f16 scale.
    Iq1M,
    /// GGUF tq1_0: super-blocks of 256 ternary values (54 bytes): 48 bytes of five trits
    /// each and four bytes of four (`llm_ir::interp::ternary::TQ1_0_SECTIONS`), an f16 scale.
    Tq1_0,
    /// GGUF tq2_0: super-blocks of 256 ternary values (66 bytes): 64 bytes of 2-bit codes
    /// (the trit plus one), an f16 scale.
    Tq2_0,
    /// GGUF q1_0: blocks of 128 (18 bytes): an f16 scale `d` and 16 bytes of sign bits
    /// (set: `d`, clear: `-d`; weight `j` at bit `j % 8` of byte `2 + j / 8`).
    Q1_0,
    /// GGUF mxfp4: blocks of 32 (17 bytes): an E8M0 scale byte and 16 bytes of nibbles
    /// indexing the doubled E2M1 levels of `llm_ir::interp::fp4::FP4_LEVELS` (low nibbles
    /// weights 0..16, high nibbles 16..32).
    Mxfp4,
    /// GGUF nvfp4: blocks of 64 (36 bytes): four UE4M3 scale bytes, one per 16 weights,
    /// and 8 bytes of such nibbles for each 16 (low nibbles its first 8 weights).
    Nvfp4,
    /// 4-bit NormalFloat over the whole matrix: every code (two per byte, row-major), then
    /// one absmax scale per `block` consecutive values.
    Nf4 {
        /// Values per scale.
        block: u32,
        /// Storage type of the scales.
        scale: DType,
    },
    /// Affine `bits`-bit integers over the whole matrix: every code (row-major, low bits
    /// first), then one scale per group, then (asymmetric) one zero-point byte per group.
    Affine {
        /// Bits per code (2, 4 or 8).
        bits: u8,
        /// Values per group.
        group: u32,
        /// No zero points.
        symmetric: bool,
        /// The dim groups run along (0: output rows, 1: the contraction).
        axis: u8,
        /// Storage type of the scales.
        scale: DType,
    },
}

impl WeightFormat {
    /// The weight format of a quantized tensor's `format`.
    pub fn of(format: &QuantFormat) -> Option<WeightFormat> {
        Some(match format {
            QuantFormat::Q8_0 => WeightFormat::Q8_0,
            QuantFormat::Q4_0 => WeightFormat::Q4_0,
            QuantFormat::Q4_1 => WeightFormat::Q4_1,
            QuantFormat::Q5_0 => WeightFormat::Q5_0,
            QuantFormat::Q5_1 => WeightFormat::Q5_1,
            QuantFormat::Iq4Nl => WeightFormat::Iq4Nl,
            QuantFormat::Iq4Xs => WeightFormat::Iq4Xs,
            QuantFormat::Iq3Xxs => WeightFormat::Iq3Xxs,
            QuantFormat::Iq3S => WeightFormat::Iq3S,
            QuantFormat::Iq2Xxs => WeightFormat::Iq2Xxs,
            QuantFormat::Iq2Xs => WeightFormat::Iq2Xs,
            QuantFormat::Iq2S => WeightFormat::Iq2S,
            QuantFormat::Iq1S => WeightFormat::Iq1S,
            QuantFormat::Iq1M => WeightFormat::Iq1M,
            QuantFormat::Tq1_0 => WeightFormat::Tq1_0,
            QuantFormat::Tq2_0 => WeightFormat::Tq2_0,
            QuantFormat::Q1_0 => WeightFormat::Q1_0,
            QuantFormat::Mxfp4 => WeightFormat::Mxfp4,
            QuantFormat::Nvfp4 => WeightFormat::Nvfp4,
            QuantFormat::Q4K => WeightFormat::Q4K,
            QuantFormat::Q6K => WeightFormat::Q6K,
            QuantFormat::Q2K => WeightFormat::Q2K,
            QuantFormat::Q3K => WeightFormat::Q3K,
            QuantFormat::Q5K => WeightFormat::Q5K,
            QuantFormat::F16 => WeightFormat::PackedF16,
            QuantFormat::BF16 => WeightFormat::PackedBF16,
            QuantFormat::Nf4 { block_size, scale } => WeightFormat::Nf4 {
                block: u32::try_from(*block_size).ok()?,
                scale: *scale,
            },
            QuantFormat::Affine {
                bits,
                group_size,
                symmetric,
                axis,
                scale,
            } => WeightFormat::Affine {
                bits: *bits,
                group: u32::try_from(*group_size).ok()?,
                symmetric: *symmetric,
                axis: u8::try_from(*axis).ok().filter(|&a| a < 2)?,
                scale: *scale,
            },
        })
    }

    /// Values per block of a row-blocked format (1 for `f32`); `None` for the whole-matrix
    /// layouts (nf4, affine), whose rows are not self-contained.
    pub fn block(self) -> Option<usize> {
        match self {
            WeightFormat::F32 | WeightFormat::F32Panels | WeightFormat::F32KN => Some(1),
            WeightFormat::F16 | WeightFormat::PackedF16 | WeightFormat::PackedBF16 => Some(1),
            WeightFormat::Q8_0
            | WeightFormat::Q4_0
            | WeightFormat::Q4_1
            | WeightFormat::Q5_0
            | WeightFormat::Q5_1
            | WeightFormat::Iq4Nl
            | WeightFormat::Mxfp4 => Some(32),
            WeightFormat::Nvfp4 => Some(64),
            WeightFormat::Q1_0 => Some(128),
            WeightFormat::Q4K
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
            | WeightFormat::Tq2_0 => Some(256),
            WeightFormat::Nf4 { .. } | WeightFormat::Affine { .. } => None,
        }
    }

    /// Whether a constant weight of the format is repacked into block panels for q8_0
    /// activations ([`Contraction::block_panels`]): the formats of 32-value blocks that
    /// start with an f16 scale (q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl), which the CPU's
    /// panel microkernel reads (mxfp4, whose scale is a byte, goes row by row).
    pub fn has_block_panels(self) -> bool {
        matches!(
            self,
            WeightFormat::Q8_0
                | WeightFormat::Q4_0
                | WeightFormat::Q4_1
                | WeightFormat::Q5_0
                | WeightFormat::Q5_1
                | WeightFormat::Iq4Nl
        )
    }

    /// Whether the format holds 16-bit floats, one a value (`PackedF16`, `PackedBF16`).
    pub fn is_sixteen_bit(self) -> bool {
        matches!(self, WeightFormat::PackedF16 | WeightFormat::PackedBF16)
    }

    /// Bytes of one weight row of `k` values (for the whole-matrix layouts: of its codes).
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            WeightFormat::F32 | WeightFormat::F32Panels | WeightFormat::F32KN => 4 * k,
            WeightFormat::F16 | WeightFormat::PackedF16 | WeightFormat::PackedBF16 => 2 * k,
            WeightFormat::Q8_0 => k / 32 * 34,
            WeightFormat::Q4_0 | WeightFormat::Iq4Nl => k / 32 * 18,
            WeightFormat::Q4_1 => k / 32 * 20,
            WeightFormat::Q5_0 => k / 32 * 22,
            WeightFormat::Q5_1 => k / 32 * 24,
            WeightFormat::Q4K => k / 256 * 144,
            WeightFormat::Q6K => k / 256 * 210,
            WeightFormat::Q2K => k / 256 * 84,
            WeightFormat::Q3K => k / 256 * 110,
            WeightFormat::Q5K => k / 256 * 176,
            WeightFormat::Iq4Xs => k / 256 * 136,
            WeightFormat::Iq3Xxs => k / 256 * 98,
            WeightFormat::Iq3S => k / 256 * 110,
            WeightFormat::Iq2Xxs => k / 256 * 66,
            WeightFormat::Iq2Xs => k / 256 * 74,
            WeightFormat::Iq2S => k / 256 * 82,
            WeightFormat::Iq1S => k / 256 * 50,
            WeightFormat::Iq1M => k / 256 * 56,
            WeightFormat::Tq1_0 => k / 256 * 54,
            WeightFormat::Tq2_0 => k / 256 * 66,
            WeightFormat::Q1_0 => k / 128 * 18,
            WeightFormat::Mxfp4 => k / 32 * 17,
            WeightFormat::Nvfp4 => k / 64 * 36,
            WeightFormat::Nf4 { .. } => k / 2,
            WeightFormat::Affine { bits, .. } => k * usize::from(bits) / 8,
        }
    }

    /// The quantized tensor format this weight format stores (`None` for the float ones).
    pub fn quant_format(self) -> Option<QuantFormat> {
        Some(match self {
            WeightFormat::F32
            | WeightFormat::F32Panels
            | WeightFormat::F32KN
            | WeightFormat::F16 => return None,
            WeightFormat::Q8_0 => QuantFormat::Q8_0,
            WeightFormat::Q4_0 => QuantFormat::Q4_0,
            WeightFormat::Q4_1 => QuantFormat::Q4_1,
            WeightFormat::Q5_0 => QuantFormat::Q5_0,
            WeightFormat::Q5_1 => QuantFormat::Q5_1,
            WeightFormat::Iq4Nl => QuantFormat::Iq4Nl,
            WeightFormat::Iq4Xs => QuantFormat::Iq4Xs,
            WeightFormat::Iq3Xxs => QuantFormat::Iq3Xxs,
            WeightFormat::Iq3S => QuantFormat::Iq3S,
            WeightFormat::Iq2Xxs => QuantFormat::Iq2Xxs,
            WeightFormat::Iq2Xs => QuantFormat::Iq2Xs,
            WeightFormat::Iq2S => QuantFormat::Iq2S,
            WeightFormat::Iq1S => QuantFormat::Iq1S,
            WeightFormat::Iq1M => QuantFormat::Iq1M,
            WeightFormat::Tq1_0 => QuantFormat::Tq1_0,
            WeightFormat::Tq2_0 => QuantFormat::Tq2_0,
            WeightFormat::Q1_0 => QuantFormat::Q1_0,
            WeightFormat::Mxfp4 => QuantFormat::Mxfp4,
            WeightFormat::Nvfp4 => QuantFormat::Nvfp4,
            WeightFormat::Q4K => QuantFormat::Q4K,
            WeightFormat::Q6K => QuantFormat::Q6K,
            WeightFormat::Q2K => QuantFormat::Q2K,
            WeightFormat::Q3K => QuantFormat::Q3K,
            WeightFormat::Q5K => QuantFormat::Q5K,
            WeightFormat::PackedF16 => QuantFormat::F16,
            WeightFormat::PackedBF16 => QuantFormat::BF16,
            WeightFormat::Nf4 { block, scale } => QuantFormat::Nf4 {
                block_size: u64::from(block),
                scale,
            },
            WeightFormat::Affine {
                bits,
                group,
                symmetric,
                axis,
                scale,
            } => QuantFormat::Affine {
                bits,
                group_size: u64::from(group),
                symmetric,
                axis: u64::from(axis),
                scale,
            },
        })
    }

    /// The name used in kernel names and CLIF dumps.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F32Panels => "f32panels",
            WeightFormat::F32KN => "f32kn",
            WeightFormat::F16 => "f16",
            WeightFormat::PackedF16 => "packed_f16",
            WeightFormat::PackedBF16 => "packed_bf16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
            WeightFormat::Q4_1 => "q4_1",
            WeightFormat::Q5_0 => "q5_0",
            WeightFormat::Q5_1 => "q5_1",
            WeightFormat::Iq4Nl => "iq4_nl",
            WeightFormat::Iq4Xs => "iq4_xs",
            WeightFormat::Iq3Xxs => "iq3_xxs",
            WeightFormat::Iq3S => "iq3_s",
            WeightFormat::Iq2Xxs => "iq2_xxs",
            WeightFormat::Iq2Xs => "iq2_xs",
            WeightFormat::Iq2S => "iq2_s",
            WeightFormat::Iq1S => "iq1_s",
            WeightFormat::Iq1M => "iq1_m",
            WeightFormat::Tq1_0 => "tq1_0",
            WeightFormat::Tq2_0 => "tq2_0",
            WeightFormat::Q1_0 => "q1_0",
            WeightFormat::Mxfp4 => "mxfp4",
            WeightFormat::Nvfp4 => "nvfp4",
            WeightFormat::Q4K => "q4_k",
            WeightFormat::Q6K => "q6_k",
            WeightFormat::Q2K => "q2_k",
            WeightFormat::Q3K => "q3_k",
            WeightFormat::Q5K => "q5_k",
            WeightFormat::Nf4 { .. } => "nf4",
            WeightFormat::Affine { bits: 2, .. } => "int2",
            WeightFormat::Affine { bits: 4, .. } => "int4",
            WeightFormat::Affine { .. } => "int8",
        }
    }
}

/// Rows of a weight panel ([`WeightFormat::F32Panels`]).
pub const PANEL_ROWS: usize = 4;

/// Columns of a panel chunk: a panel stores, for each chunk of 8 columns, the chunk of each
/// of its rows in turn.
pub const PANEL_COLS: usize = 8;

/// What a panel holds: `f32` values, or the bytes of one 16-bit value (`[u8; 2]`).
pub trait Element: Copy + Default + Send + Sync {}

impl Element for f32 {}

impl Element for [u8; 2] {}

/// Repacks a row-major `n x k` matrix into [`WeightFormat::F32Panels`]: rows are grouped
/// in panels of [`PANEL_ROWS`]; within a panel, for each full chunk of [`PANEL_COLS`]
/// columns, the chunk of row 0, then of row 1, ...; then the remaining `k % PANEL_COLS`
/// columns of each row in turn. The last `n % PANEL_ROWS` rows stay row major. Every row
/// block starts at the same offset as in the row-major matrix. The panels are split over
/// `threads` threads (the copy is bound by memory bandwidth and page faults). Elements of
/// any type pack alike (16-bit weights pack as `[u8; 2]`, [`pack_weight_panels`]).
pub fn pack_panels<T: Element>(w: &[T], n: usize, k: usize, threads: usize) -> Vec<T> {
    pack_stacked_panels(&[w], n, k, threads)
}

/// [`pack_panels`] of the matrix whose rows are those of `parts` (row-major matrices of
/// `k` columns, `n` rows in all) stacked in order, without stacking them first.
pub fn pack_stacked_panels<T: Element>(
    parts: &[&[T]],
    n: usize,
    k: usize,
    threads: usize,
) -> Vec<T> {
    let rows = StackedRows { parts, k };
    let mut out = vec![T::default(); n * k];
    if k == 0 {
        return out;
    }
    let full = n - n % PANEL_ROWS;
    let (panels, rest) = out.split_at_mut(full * k);
    rows.copy(full, n - full, rest);
    let block = PANEL_ROWS * k;
    let per = (full / PANEL_ROWS).div_ceil(threads.max(1)).max(1) * block;
    if threads <= 1 || per == 0 || panels.len() <= per {
        pack_rows(&rows, 0, panels);
        return out;
    }
    std::thread::scope(|scope| {
        for (i, dst) in panels.chunks_mut(per).enumerate() {
            let rows = &rows;
            scope.spawn(move || pack_rows(rows, i * per / k, dst));
        }
    });
    out
}

/// The rows of row-major matrices of `k` columns, stacked.
struct StackedRows<'a, T> {
    parts: &'a [&'a [T]],
    k: usize,
}

impl<'a, T: Element> StackedRows<'a, T> {
    /// Rows `first..first + count`, when one part holds them all.
    fn slice(&self, mut first: usize, count: usize) -> Option<&'a [T]> {
        for part in self.parts {
            let rows = part.len() / self.k.max(1);
            if first < rows {
                return (first + count <= rows)
                    .then(|| &part[first * self.k..(first + count) * self.k]);
            }
            first -= rows;
        }
        None
    }

    /// Copies rows `first..first + count` into `out` (`count * k` elements).
    fn copy(&self, first: usize, count: usize, out: &mut [T]) {
        for (r, row) in out.chunks_exact_mut(self.k.max(1)).take(count).enumerate() {
            if let Some(src) = self.slice(first + r, 1) {
                row.copy_from_slice(src);
            }
        }
    }
}

/// Packs the whole panels of rows `first..` of `rows` into `out` (whole panels).
fn pack_rows<T: Element>(rows: &StackedRows<T>, first: usize, out: &mut [T]) {
    let k = rows.k;
    let tail = k % PANEL_COLS;
    let block = PANEL_ROWS * k;
    // A panel whose rows two parts share is gathered here first.
    let mut gathered = Vec::new();
    for (p, dest) in out.chunks_exact_mut(block).enumerate() {
        let start = first + p * PANEL_ROWS;
        let rows: &[T] = match rows.slice(start, PANEL_ROWS) {
            Some(rows) => rows,
            None => {
                gathered.resize(block, T::default());
                rows.copy(start, PANEL_ROWS, &mut gathered);
                &gathered
            }
        };
        let mut at = 0;
        for c in (0..k - tail).step_by(PANEL_COLS) {
            for r in 0..PANEL_ROWS {
                dest[at..at + PANEL_COLS].copy_from_slice(&rows[r * k + c..r * k + c + PANEL_COLS]);
                at += PANEL_COLS;
            }
        }
        for r in 0..PANEL_ROWS {
            dest[at..at + tail].copy_from_slice(&rows[r * k + k - tail..(r + 1) * k]);
            at += tail;
        }
    }
}

/// Repacks `n` row-major rows of a block format (`row_bytes` each, in blocks of
/// `block_bytes`) for [`Contraction::block_panels`]: rows are grouped in panels of
/// [`PANEL_ROWS`], and within a panel block `b` of each row in turn, then block `b + 1`.
/// The last `n % PANEL_ROWS` rows stay row major; every panel starts where its first row
/// did.
pub fn pack_block_panels(bytes: &[u8], n: usize, row_bytes: usize, block_bytes: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let full = n - n % PANEL_ROWS;
    let panel = PANEL_ROWS * row_bytes;
    for (dest, rows) in out[..full * row_bytes]
        .chunks_exact_mut(panel)
        .zip(bytes.chunks_exact(panel))
    {
        for (b, group) in dest.chunks_exact_mut(PANEL_ROWS * block_bytes).enumerate() {
            for (r, block) in group.chunks_exact_mut(block_bytes).enumerate() {
                let at = r * row_bytes + b * block_bytes;
                block.copy_from_slice(&rows[at..at + block_bytes]);
            }
        }
    }
    out
}

/// The panel layout of a constant quantized weight of `n x k` values in `format` that
/// [`Contraction::block_panels`] reads, whose rows those of `parts` (row-major bytes of
/// whole rows) are, stacked: the 16-bit formats in the layout of [`pack_panels`] (their
/// values are its elements; packed from the parts on `threads` threads), the block
/// formats in [`pack_block_panels`]'s.
pub fn pack_weight_panels(
    format: WeightFormat,
    parts: &[&[u8]],
    [n, k]: [usize; 2],
    threads: usize,
) -> Vec<u8> {
    if format.is_sixteen_bit() {
        let values: Vec<&[[u8; 2]]> = parts.iter().map(|p| p.as_chunks::<2>().0).collect();
        return pack_stacked_panels(&values, n, k, threads).into_flattened();
    }
    pack_block_panels(
        &parts.concat(),
        n,
        format.row_bytes(k),
        format.row_bytes(32),
    )
}

/// Copies the bytes of row `r` of an `n x k` weight in `format` stored by
/// [`pack_weight_panels`] into `out` (`format.row_bytes(k)`), as the row-major matrix held
/// them.
pub fn weight_panel_row(
    format: WeightFormat,
    packed: &[u8],
    [n, k]: [usize; 2],
    r: usize,
    out: &mut [u8],
) {
    if format.is_sixteen_bit() {
        let (values, _) = packed.as_chunks::<2>();
        let (row, _) = out.as_chunks_mut::<2>();
        return panel_row(values, n, k, r, row);
    }
    let sizes = (format.row_bytes(k), format.row_bytes(32));
    block_panel_row(packed, n, sizes, r, out);
}

/// Copies the bytes of row `r` of `n` rows stored by [`pack_block_panels`] (`row_bytes`
/// each, in blocks of `block_bytes`) into `out` (`row_bytes`), as the row-major matrix
/// held them.
pub fn block_panel_row(
    packed: &[u8],
    n: usize,
    (row_bytes, block_bytes): (usize, usize),
    r: usize,
    out: &mut [u8],
) {
    let full = n - n % PANEL_ROWS;
    if r >= full {
        out.copy_from_slice(&packed[r * row_bytes..(r + 1) * row_bytes]);
        return;
    }
    let (panel, row) = (&packed[(r - r % PANEL_ROWS) * row_bytes..], r % PANEL_ROWS);
    for (b, block) in out.chunks_exact_mut(block_bytes).enumerate() {
        let at = (b * PANEL_ROWS + row) * block_bytes;
        block.copy_from_slice(&panel[at..at + block_bytes]);
    }
}

/// Copies row `r` of an `n x k` matrix stored by [`pack_panels`] into `out` (`k`
/// elements).
pub fn panel_row<T: Element>(packed: &[T], n: usize, k: usize, r: usize, out: &mut [T]) {
    let full = n - n % PANEL_ROWS;
    if r >= full {
        out.copy_from_slice(&packed[r * k..(r + 1) * k]);
        return;
    }
    let (panel, row) = (&packed[(r - r % PANEL_ROWS) * k..], r % PANEL_ROWS);
    let k8 = k - k % PANEL_COLS;
    for c in (0..k8).step_by(PANEL_COLS) {
        let at = c * PANEL_ROWS + row * PANEL_COLS;
        out[c..c + PANEL_COLS].copy_from_slice(&panel[at..at + PANEL_COLS]);
    }
    let tail = k - k8;
    let at = k8 * PANEL_ROWS + row * tail;
    out[k8..].copy_from_slice(&panel[at..at + tail]);
}

/// `y[m, j] = sum_p norm(x)[m, p] * w[j, p]` for every row `m` of `x`: the weight rows are
/// the output features (`transpose_rhs` layout), the optional prologue RMS-normalises each
/// row of `x` first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Contraction {
    /// The contraction length (columns of `x` and of `w`).
    pub k: usize,
    /// Output features (rows of `w`).
    pub n: usize,
    /// Storage of `w`.
    pub weight: WeightFormat,
    /// RMS-norm prologue: `epsilon`'s bits, when present.
    pub norm_eps_bits: Option<u32>,
    /// Elementwise epilogue: a tensor of the output's shape is added to the result (a
    /// residual connection, fused by the backend when the sum is the product's only use).
    pub residual: bool,
    /// The constant weight is stored `[k, n]` and transposed when it is repacked into
    /// panels (it changes the packing, not the generated code).
    pub transpose_at_pack: bool,
    /// `x` is quantized to q8_0 (`quantize-activations`; the weight is then in a GGUF block
    /// format: blocks of 32, 64 or 128, or super-blocks of 256): each run of weight codes
    /// that shares a scale meets the codes of `x` in its block of 32 in an integer dot
    /// product, scaled by both scales.
    pub q8_0_input: bool,
    /// The constant quantized weight (of 32-value blocks meeting q8_0 activations, or a 16-bit
    /// one) is repacked so that each panel of four rows lies together
    /// ([`pack_weight_panels`]: blocks of the four rows in turn, or 16-bit values in the
    /// f32 panels' layout): one stream of weight bytes feeds four rows, and x is loaded
    /// once for them (it changes the packing and the generated code).
    pub block_panels: bool,
}

impl Contraction {
    /// `y = x @ w^T` of `n` rows of `k` in `weight`'s format, plain: no norm prologue or
    /// residual epilogue, no repacking, `f32` activations.
    pub fn plain(k: usize, n: usize, weight: WeightFormat) -> Contraction {
        Contraction {
            k,
            n,
            weight,
            norm_eps_bits: None,
            residual: false,
            transpose_at_pack: false,
            q8_0_input: false,
            block_panels: false,
        }
    }

    /// Whether the constant weight is repacked at compile time: into f32 panels, or into
    /// block panels ([`pack_weight_panels`]).
    pub fn reads_panels(&self) -> bool {
        self.weight == WeightFormat::F32Panels || self.block_panels
    }

    /// The bytes of a row of `x`: `k` floats, or `k / 32` q8_0 blocks.
    pub fn x_row_bytes(&self) -> usize {
        if self.q8_0_input {
            WeightFormat::Q8_0.row_bytes(self.k)
        } else {
            4 * self.k
        }
    }
}

/// How the kernels that write a paged KV cache round its values (what the reference
/// stores); the pool then holds each value as [`KvRounding::element`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvRounding {
    /// `f32` storage: values are stored as given.
    Exact,
    /// `f16` or `bf16` storage: each value rounded to that type (ties to even).
    Float(DType),
    /// Quantized storage: each head's row quantized as the reference does it (a block
    /// format's pool holds the blocks, an nf4 or affine pool the values they decode to);
    /// the format as a kernel names it for a `[rows, head_dim]` matrix (affine
    /// groups along the pool's fourth dim, head_dim, are groups along axis 1), none where
    /// no kernel format names it.
    Quantized(Option<WeightFormat>),
}

impl KvRounding {
    /// The rounding of a cache with `storage`.
    pub fn of(storage: &KvStorage) -> KvRounding {
        match storage {
            KvStorage::Float(DType::F32) => KvRounding::Exact,
            KvStorage::Float(d) => KvRounding::Float(*d),
            KvStorage::Quantized(q) => {
                // A head row's groups run along head_dim, the pool's axis 3 (the only axis
                // a cache's affine format takes): axis 1 of a `[rows, head_dim]` matrix.
                let mut row = q.clone();
                if let QuantFormat::Affine { axis, .. } = &mut row {
                    *axis = 1;
                }
                KvRounding::Quantized(WeightFormat::of(&row))
            }
        }
    }

    /// How a pool of this storage holds each value, on every backend (as the
    /// interpreter's [`KvValues`](llm_ir::interp::KvValues)): a GGUF block format as its
    /// blocks.
    pub fn element(self) -> KvElement {
        match self {
            KvRounding::Float(dtype) => KvElement::of(&KvStorage::Float(dtype)),
            KvRounding::Quantized(Some(format)) => format
                .quant_format()
                .and_then(|q| KvBlocks::of(&q))
                .map_or(KvElement::F32, KvElement::Blocks),
            KvRounding::Exact | KvRounding::Quantized(None) => KvElement::F32,
        }
    }
}

/// The angles of rope kernel `kernel` with `factors` (the values of its `freq_factors`
/// operand; empty without one): what the backends build the kernel's sine and cosine
/// tables from.
///
/// # Errors
///
/// For another kernel, or factors that are not one per pair ([`RopeAngles::new`]).
pub fn rope_angles(kernel: &Kernel, factors: &[f32]) -> Result<RopeAngles, String> {
    match kernel {
        Kernel::Rope {
            rotary,
            theta_bits,
            scaling_bits,
            mscale_bits,
            ..
        } => RopeAngles::new(
            f32::from_bits(*theta_bits),
            f32::from_bits(*scaling_bits),
            *rotary,
            factors,
            f32::from_bits(*mscale_bits),
        ),
        _ => Err("not a rope kernel".into()),
    }
}

/// Where an attention kernel finds keys and values, and which positions a query sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionSource {
    /// `llm.paged_attention`: the cache's `layer`, through block tables.
    Paged {
        /// The cache layer.
        layer: usize,
        /// Sliding window.
        window: Option<usize>,
        /// `llm.append_attention`: the new keys and values are written first.
        append: bool,
        /// How the cache's storage rounds its values (what an append writes).
        rounding: KvRounding,
    },
    /// `llm.attention` on contiguous `[batch..., tokens, kv_heads, head_dim]` keys and values.
    Contiguous {
        /// Whether query `i` sees only keys up to its own position.
        causal: bool,
        /// Sliding window.
        window: Option<usize>,
        /// A `[tq, tk]` bias is added to the (scaled, soft-capped) scores (`llm.attention`'s
        /// mask).
        masked: bool,
    },
}

impl AttentionSource {
    /// The op's operands before its attention sinks: a paged attention's four, an append
    /// attention's seven, a contiguous attention's three and its mask.
    pub fn operands(&self) -> usize {
        match self {
            AttentionSource::Paged { append: false, .. } => 4,
            AttentionSource::Paged { append: true, .. } => 7,
            AttentionSource::Contiguous { masked, .. } => 3 + usize::from(*masked),
        }
    }

    /// Whether a mask is added to the scores (a contiguous attention's fourth operand).
    pub fn masked(&self) -> bool {
        matches!(self, AttentionSource::Contiguous { masked: true, .. })
    }

    /// The elements of the key and value rows attention reads: a paged cache's pool
    /// elements, `f32` for contiguous tensors.
    pub fn element(&self) -> KvElement {
        match self {
            AttentionSource::Paged { rounding, .. } => rounding.element(),
            AttentionSource::Contiguous { .. } => KvElement::F32,
        }
    }
}

/// Data movement without arithmetic: on the CPU these run as memory copies (or no copy at
/// all), which no generated loop beats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Movement {
    /// `llm.reshape`: the same elements under the result type's shape.
    Reshape,
    /// `llm.slice` that keeps every dim whole but the last, of which it takes
    /// `offset..offset + len` out of `width`.
    Columns {
        /// The input's last dim.
        width: usize,
        /// The first column taken.
        offset: usize,
        /// Columns taken.
        len: usize,
    },
    /// `llm.concat` of `inputs` tensors of one element type along `axis`.
    Concat {
        /// The axis.
        axis: usize,
        /// Operands.
        inputs: usize,
    },
    /// `llm.embedding`: row `ids[i]` of a `[vocab, dim]` table.
    Rows {
        /// The row length.
        dim: usize,
        /// Rows in the table.
        vocab: usize,
        /// The table's storage: `F32` for a float table (f32, or f16/bf16 values held as
        /// f32), or a quantized format.
        table: WeightFormat,
        /// The table is stored in panels ([`pack_panels`]; for a quantized table, weight
        /// panels, [`pack_weight_panels`]: block panels of a format of 32-value blocks, or the f32 panels'
        /// layout of 16-bit values), because a contraction shares it (a classifier tied to
        /// the embedding).
        panels: bool,
    },
}

/// How operands of `shapes` broadcast together (numpy-style).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastLayout {
    /// The result's shape.
    pub shape: Vec<usize>,
    /// The result's dims, simplified (dims of 1 dropped, dims every operand steps through
    /// alike merged) and padded with leading 1s to rank 4.
    pub dims: [usize; 4],
    /// Each operand's strides (in elements) for `dims`: its own strides, right-aligned,
    /// 0 along the dims it broadcasts.
    pub strides: Vec<[usize; 4]>,
    /// The simplified dims before the last four, when more remain (outermost first): a
    /// caller runs the four-dim kernel once per index of these.
    pub outer: Vec<usize>,
    /// Each operand's strides (in elements) for `outer`.
    pub outer_strides: Vec<Vec<usize>>,
}

/// The [`BroadcastLayout`] of operands of `shapes`; `None` when they do not broadcast.
/// Dims that remain beyond four, once dims of 1 are dropped and dims the operands step
/// through alike are merged, are the layout's `outer` dims.
pub fn broadcast_layout(shapes: &[&[usize]]) -> Option<BroadcastLayout> {
    let mut shape: Vec<usize> = Vec::new();
    for s in shapes {
        shape = llm_ir::interp::eval::elementwise::broadcast(&shape, s).ok()?;
    }
    let rank = shape.len();
    // Each operand's strides for the result's dims: right-aligned, 0 where it broadcasts.
    let full: Vec<Vec<usize>> = shapes
        .iter()
        .map(|s| {
            let mut out = vec![0usize; rank];
            let mut stride = 1usize;
            for (i, &d) in s.iter().enumerate().rev() {
                if d != 1 {
                    out[rank - s.len() + i] = stride;
                }
                stride *= d;
            }
            out
        })
        .collect();
    // Dims of 1 vanish, and a dim merges into the one before it where every operand steps
    // through the two as through one (both broadcast, or both contiguous), so most
    // broadcasts of higher rank fit the four dims the kernels loop over.
    let mut dims: Vec<usize> = Vec::new();
    let mut strides: Vec<Vec<usize>> = vec![Vec::new(); shapes.len()];
    for i in (0..rank).filter(|&i| shape[i] != 1) {
        let merges = !dims.is_empty()
            && full
                .iter()
                .zip(&strides)
                .all(|(f, s)| s.last() == Some(&(f[i] * shape[i])));
        if merges {
            *dims.last_mut()? *= shape[i];
        } else {
            dims.push(shape[i]);
        }
        for (f, s) in full.iter().zip(&mut strides) {
            if merges {
                *s.last_mut()? = f[i];
            } else {
                s.push(f[i]);
            }
        }
    }
    // The last four dims go to the kernel, any before them to the caller's loop.
    let split = dims.len().saturating_sub(4);
    let kept = dims.len() - split;
    let mut padded = [1usize; 4];
    padded[4 - kept..].copy_from_slice(&dims[split..]);
    let outer_strides = strides.iter().map(|s| s[..split].to_vec()).collect();
    let strides = strides
        .iter()
        .map(|s| {
            let mut out = [0usize; 4];
            out[4 - kept..].copy_from_slice(&s[split..]);
            out
        })
        .collect();
    Some(BroadcastLayout {
        shape,
        dims: padded,
        strides,
        outer: dims[..split].to_vec(),
        outer_strides,
    })
}

/// Whether `len` values are whole rows of `k` for a [`Kernel::Quantize`] of `rows` rows
/// (`None`: any number).
pub fn whole_rows(rows: Option<usize>, len: usize, k: usize) -> bool {
    rows.map_or(len.is_multiple_of(k), |r| len == r * k)
}

/// The run-time dims of a [`Kernel::BatchedMatmul`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatmulDims {
    /// Product of the batch dims of `x`.
    pub batch: usize,
    /// Rows of each batch of `x`.
    pub m: usize,
    /// The contraction length.
    pub k: usize,
    /// Columns of the result.
    pub n: usize,
    /// The rhs has a matrix per batch (else one shared matrix).
    pub batched: bool,
}

impl MatmulDims {
    /// The result's shape: `x`'s batch dims, then `[m, n]`.
    pub fn result_shape(&self, x: &[usize]) -> Vec<usize> {
        let mut shape = x[..x.len() - 2].to_vec();
        shape.extend([self.m, self.n]);
        shape
    }
}

/// Checks the run-time shapes of a general matmul of `x [.., m, k]` by `w` (`[k, n]`, or
/// `[n, k]` when `transposed`, shared or with `x`'s batch dims).
pub fn batched_matmul_dims(
    x: &[usize],
    w: &[usize],
    transposed: bool,
) -> Result<MatmulDims, String> {
    let (ar, br) = (x.len(), w.len());
    if ar < 2 || br < 2 {
        return Err(format!("cannot multiply {x:?} by {w:?}"));
    }
    let (m, k) = (x[ar - 2], x[ar - 1]);
    let (wk, n) = if transposed {
        (w[br - 1], w[br - 2])
    } else {
        (w[br - 2], w[br - 1])
    };
    let batched = br > 2;
    if k != wk || (batched && w[..br - 2] != x[..ar - 2]) {
        return Err(format!("{x:?} and {w:?} do not multiply at run time"));
    }
    Ok(MatmulDims {
        batch: x[..ar - 2].iter().product(),
        m,
        k,
        n,
        batched,
    })
}

/// Checks the run-time shapes of a contiguous attention's queries `q` (`[.., tq, heads, d]`),
/// keys `k` and values `v` (`[.., tk, kv_heads, d]`, the same batch dims), and returns
/// `[tq, tk]`; a causal attention needs at least as many keys as queries.
pub fn contiguous_attention_shape(
    [q, k, v]: [&[usize]; 3],
    [kv_heads, d]: [usize; 2],
    causal: bool,
) -> Result<[usize; 2], String> {
    let r = q.len();
    let fits =
        r >= 3 && k == v && k.len() == r && k[r - 2..] == [kv_heads, d] && k[..r - 3] == q[..r - 3];
    if !fits || (causal && k[r - 3] < q[r - 3]) {
        return Err(format!(
            "q {q:?}, k {k:?} and v {v:?} do not fit together at run time"
        ));
    }
    Ok([q[r - 3], k[r - 3]])
}

/// One kernel family instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Kernel {
    /// A matrix-vector or matrix-matrix product against a weight matrix.
    Contraction(Contraction),
    /// A scalar body applied to equally shaped `f32` operands, element by element.
    Elementwise(ScalarBody),
    /// A scalar body whose operands broadcast to the result numpy-style (right-aligned,
    /// each dim the result's or 1).
    Broadcast(ScalarBody),
    /// RMS normalisation of rows of `d` values: `w * x / sqrt(mean(x^2) + eps)`.
    RmsNorm {
        /// Row length.
        d: usize,
        /// `epsilon`'s bits.
        eps_bits: u32,
    },
    /// Softmax along an axis of `n` values: `exp(x - max) / sum`. Consecutive values of a
    /// row are `inner` apart (the product of the dims after the axis; 1 for the last).
    Softmax {
        /// Row length.
        n: usize,
        /// Distance between a row's consecutive values.
        inner: usize,
    },
    /// The index of the first maximum along an axis of `n` values, as an integer tensor
    /// without that axis (`llm.argmax`); values `inner` apart, as for `Softmax`.
    Argmax {
        /// Row length.
        n: usize,
        /// Distance between a row's consecutive values.
        inner: usize,
        /// The result's integer type.
        index: DType,
    },
    /// The `k` largest of each row of `n` `f32` values, largest first, and their indices
    /// (`llm.topk` along the last dim): run by the reference's routine
    /// (`llm_ir::interp::eval::moe::topk_rows`), a scan of a few values per token.
    TopK {
        /// Row length.
        n: usize,
        /// Values kept per row.
        k: usize,
        /// The indices' integer type.
        index: DType,
    },
    /// `llm.expert_matmul`: each token's slots multiplied by their experts' matrices, the
    /// `[E, N, K]` weight read expert by expert through the code of the contraction
    /// `expert` (one expert's `[N, K]`, in a row-major format): the rows routed to an
    /// expert are gathered and meet its matrix together, so a prefill reads each chosen
    /// expert once.
    ExpertContraction {
        /// One expert's contraction (its code is the kernel's).
        expert: Contraction,
        /// The input has a row per slot (`[T, S, K]`), not one per token.
        per_slot: bool,
    },
    /// Every value of a quantized tensor as `f32` (`llm.dequantize`): `rows` rows of `k`
    /// (the last dim) in `weight`'s layout.
    Dequantize {
        /// The storage format.
        weight: WeightFormat,
        /// Rows (the product of the leading dims).
        rows: usize,
        /// Values per row.
        k: usize,
    },
    /// Layer normalisation of rows of `d` values: `(x - mean) / sqrt(var + eps) * w + b`.
    LayerNorm {
        /// Row length.
        d: usize,
        /// `epsilon`'s bits.
        eps_bits: u32,
    },
    /// Rotary embedding of `heads` heads of `d` values per token, the first `rotary` of
    /// each head rotated in pairs; the sines and cosines of each token's angles come in a
    /// table (`llm.rope`).
    Rope {
        /// Heads per token.
        heads: usize,
        /// Head size.
        d: usize,
        /// Rotated values per head.
        rotary: usize,
        /// Pairs are `(i, i + rotary / 2)` instead of `(2i, 2i + 1)`.
        half: bool,
        /// `theta`'s bits.
        theta_bits: u32,
        /// Position scaling's bits.
        scaling_bits: u32,
        /// The bits of the magnitude the sines and cosines are scaled by.
        mscale_bits: u32,
    },
    /// Attention of one query row (all heads) over a list of key/value rows, with an online
    /// softmax (one pass over keys and values).
    Attention {
        /// Query heads.
        heads: usize,
        /// Key/value heads (query head `h` reads KV head `h / (heads / kv_heads)`).
        kv_heads: usize,
        /// Head size.
        d: usize,
        /// How dot products become scores (scaling, soft-cap).
        scoring: Scoring,
        /// Where keys and values are.
        source: AttentionSource,
        /// Each head's softmax counts an attention sink (a score without a value; the op's
        /// `sinks` operand, `[heads]`, is the kernel's last parameter).
        sinks: bool,
    },
    /// `llm.quantize` of `rows` rows of `k` `f32` values into q8_0, q4_0, q4_1, a K-quant
    /// (q4_k, q6_k, q2_k), nf4 or an affine integer format (a matrix), byte for byte as the
    /// reference quantizes.
    Quantize {
        /// The format.
        format: WeightFormat,
        /// Rows (the product of the leading dims) for nf4 and the affine formats, which
        /// lay a matrix out as a whole; `None` for the block formats and K-quants, whose
        /// rows are counted at run time (the leading dims may be dynamic).
        rows: Option<usize>,
        /// Values per row.
        k: usize,
    },
    /// `llm.cast` between element types a device holds in 32 bits: floats round to the
    /// target's precision (values stay `f32`-held), floats truncate to `i8`/`i32`
    /// (saturating), integers wrap to the target's width.
    Cast {
        /// The operand's element type.
        from: DType,
        /// The result's element type.
        to: DType,
    },
    /// `llm.append_kv`: each token's key and value rows (`kv_heads * d` values) written to
    /// its slot of the cache's `layer`, rounded to the cache's storage.
    KvAppend {
        /// The cache layer.
        layer: usize,
        /// Values per slot.
        row: usize,
        /// How the written values are rounded.
        rounding: KvRounding,
    },
    /// `llm.lookup_kv`: a sequence's keys and values of the cache's `layer`, in position
    /// order, through its block table.
    KvLookup {
        /// The cache layer.
        layer: usize,
        /// Values per slot.
        row: usize,
        /// How the cache's storage rounds its values (a lookup reads them as held).
        rounding: KvRounding,
    },
    /// `llm.matmul` in general: `x [.., m, k]` against a rhs of dims known only at run
    /// time, `[k, n]` or (`transposed`) `[n, k]`, shared by every batch or with the same
    /// batch dims as `x`. Each output is one sum in order of `k`.
    BatchedMatmul {
        /// The rhs is `[.., n, k]`.
        transposed: bool,
    },
    /// `llm.sharded_linear` over an in-process mesh: every device's `[.., k]` input shard
    /// by its `[n, k]` f32 weight shard, through the contraction `local` (whose code it
    /// shares); the result is partial (combined by `reduction`) over the axes that split K.
    ShardedLinear {
        /// The per-device contraction.
        local: Contraction,
        /// How the result's partial values combine (the result type's).
        reduction: Reduction,
    },
    /// `llm.all_reduce` of an f32 partial value over mesh `axes`: each device's group of
    /// shards folded in piece order, pair by pair, by the generated [`Kernel::Fold`] of
    /// the reduction (its code, `Kernel::code`).
    AllReduce {
        /// The mesh axes reduced over.
        axes: Vec<String>,
        /// How the partial values combine (sum, max or min).
        reduction: Reduction,
    },
    /// `llm.reduce_scatter` of an f32 partial value over mesh `axes` along `dim`: folded
    /// as by [`Kernel::AllReduce`], each device keeping its piece.
    ReduceScatter {
        /// The mesh axes reduced over.
        axes: Vec<String>,
        /// The dim the result is split along.
        dim: usize,
        /// How the partial values combine.
        reduction: Reduction,
    },
    /// Two f32 buffers of one length combined element by element by a reduction, as the
    /// reference folds a collective's partial values: a sum, or a maximum or minimum in
    /// which a NaN loses to a number (as Rust's `f32::max`). Equal values give the first
    /// operand, so `+0` and `-0` give the first; Rust leaves that case unspecified.
    Fold(Reduction),
    /// Data movement.
    Move(Movement),
    /// `llm.transpose` of any rank, of any element type: a strided view of the input, laid
    /// out by the reference's `permute_layout`.
    Transpose {
        /// The permutation.
        perm: Vec<usize>,
    },
    /// `llm.slice` of any dims, with any steps, of any element type (the slices
    /// [`Movement::Columns`] does not take): a strided view of the input, laid out by the
    /// reference's `slice_layout`.
    Slice {
        /// The first index taken along each dim.
        starts: Vec<i64>,
        /// The distance between indices taken along each dim.
        steps: Vec<i64>,
    },
    /// Values entering, leaving or gathered across an in-process mesh.
    Mesh(MeshMove),
}

/// Data movement of sharded values over an in-process mesh (no arithmetic): on the CPU,
/// copies of each device's shard (the GPU keeps sharded values on the host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshMove {
    /// `llm.shard`: each device's box of the value, as the result type splits it.
    Shard {
        /// The mesh's axes and sizes.
        mesh: Vec<(String, u64)>,
        /// Per dim, the axes it is split over.
        split: Vec<Vec<String>>,
        /// How the value's partial results combine later (the result type's).
        reduction: Reduction,
    },
    /// `llm.unshard` of a replicated value: device 0's shard, checked against the others.
    Unshard,
    /// `llm.all_gather` along `dim` over mesh `axes`.
    AllGather {
        /// The mesh axes gathered over.
        axes: Vec<String>,
        /// The dim the shards are concatenated along.
        dim: usize,
    },
}

impl Kernel {
    /// A short name that identifies the kernel's code (shapes included).
    pub fn name(&self) -> String {
        match self {
            Kernel::Contraction(c) => format!(
                "{}matvec_{}{}_{}x{}{}{}",
                if c.norm_eps_bits.is_some() {
                    "rms_norm_"
                } else {
                    ""
                },
                if c.q8_0_input { "q8_0_by_" } else { "" },
                c.weight.name(),
                c.n,
                c.k,
                if c.block_panels { "_panels" } else { "" },
                if c.residual { "_residual" } else { "" }
            ),
            Kernel::Elementwise(body) => format!("elementwise_{}", body_name(body)),
            Kernel::Broadcast(body) => format!("broadcast_{}", body_name(body)),
            Kernel::RmsNorm { d, .. } => format!("rms_norm_{d}"),
            Kernel::Softmax { n, inner } => format!("softmax_{n}{}", stride_suffix(*inner)),
            Kernel::Argmax { n, inner, .. } => format!("argmax_{n}{}", stride_suffix(*inner)),
            Kernel::TopK { n, k, .. } => format!("top{k}_of_{n}"),
            Kernel::ExpertContraction { expert, per_slot } => format!(
                "experts_{}{}",
                Kernel::Contraction(*expert).name(),
                if *per_slot { "_per_slot" } else { "" }
            ),
            Kernel::Dequantize { weight, rows, k } => {
                format!("dequantize_{}_{rows}x{k}", weight.name())
            }
            Kernel::LayerNorm { d, .. } => format!("layer_norm_{d}"),
            Kernel::Rope {
                heads, d, rotary, ..
            } => format!("rope_{heads}x{d}_{rotary}"),
            Kernel::Attention {
                heads,
                kv_heads,
                d,
                source,
                sinks,
                ..
            } => format!(
                "attention_{heads}x{d}_kv{kv_heads}{}{}",
                if source.masked() { "_masked" } else { "" },
                sinks_suffix(*sinks)
            ),
            Kernel::Cast { from, to } => format!("cast_{}_{}", from.name(), to.name()),
            Kernel::Quantize { format, rows, k } => match rows {
                Some(rows) => format!("quantize_{}_{rows}x{k}", format.name()),
                None => format!("quantize_{}_rows_of_{k}", format.name()),
            },
            Kernel::BatchedMatmul { transposed } => {
                format!("batched_matmul{}", if *transposed { "_t" } else { "" })
            }
            Kernel::KvAppend { row, .. } => format!("kv_append_{row}"),
            Kernel::KvLookup { row, .. } => format!("kv_lookup_{row}"),
            Kernel::ShardedLinear { local, .. } => {
                format!("sharded_linear_{}x{}", local.n, local.k)
            }
            Kernel::AllReduce { axes, reduction } => {
                format!("all_reduce_{}_{}", reduction.name(), axes.join("_"))
            }
            Kernel::ReduceScatter {
                axes,
                dim,
                reduction,
            } => format!(
                "reduce_scatter_{}_{}_dim{dim}",
                reduction.name(),
                axes.join("_")
            ),
            Kernel::Fold(reduction) => format!("fold_{}", reduction.name()),
            Kernel::Move(m) => format!("{m:?}"),
            Kernel::Slice { .. } => "slice".to_string(),
            Kernel::Transpose { .. } => "transpose".to_string(),
            Kernel::Mesh(MeshMove::Shard { split, .. }) => {
                // Per dim, its axes (`-` for a whole dim): `shard_tp_-`.
                let dims: Vec<String> = split
                    .iter()
                    .map(|axes| match axes.as_slice() {
                        [] => "-".to_string(),
                        axes => axes.join("+"),
                    })
                    .collect();
                format!("shard_{}", dims.join("_"))
            }
            Kernel::Mesh(MeshMove::Unshard) => "unshard".to_string(),
            Kernel::Mesh(MeshMove::AllGather { axes, dim }) => {
                format!("all_gather_{}_dim{dim}", axes.join("_"))
            }
        }
    }

    /// The kernel with what does not change its generated code cleared (the attention's
    /// source, but for a mask and the 16-bit rows of an f16 or bf16 cache), so that ops
    /// sharing code share one compiled function; `None` for data movement and the KV
    /// cache's copies, which have no generated code, and for a contraction over a
    /// `[k, n]` weight, which has none until the weight is repacked.
    pub fn code(&self) -> Option<Kernel> {
        match self {
            // A [k, n] weight must be repacked first (it becomes `F32Panels`).
            Kernel::Move(_)
            | Kernel::Slice { .. }
            | Kernel::Transpose { .. }
            | Kernel::Mesh(_)
            | Kernel::KvAppend { .. }
            | Kernel::KvLookup { .. }
            | Kernel::TopK { .. } => None,
            Kernel::AllReduce { reduction, .. } | Kernel::ReduceScatter { reduction, .. } => {
                Some(Kernel::Fold(*reduction))
            }
            Kernel::Contraction(c) if c.weight == WeightFormat::F32KN => None,
            Kernel::Contraction(c)
            | Kernel::ShardedLinear { local: c, .. }
            | Kernel::ExpertContraction { expert: c, .. } => {
                Some(Kernel::Contraction(Contraction {
                    transpose_at_pack: false,
                    ..*c
                }))
            }
            Kernel::Attention {
                heads,
                kv_heads,
                d,
                scoring,
                source,
                sinks,
            } => Some(Kernel::Attention {
                heads: *heads,
                kv_heads: *kv_heads,
                d: *d,
                scoring: *scoring,
                sinks: *sinks,
                source: match source {
                    // The rows a kernel reads stay in its key: a 16-bit or block-format
                    // cache's.
                    AttentionSource::Paged { rounding, .. }
                        if rounding.element() != KvElement::F32 =>
                    {
                        AttentionSource::Paged {
                            layer: 0,
                            window: None,
                            append: false,
                            rounding: *rounding,
                        }
                    }
                    _ => AttentionSource::Contiguous {
                        causal: false,
                        window: None,
                        masked: source.masked(),
                    },
                },
            }),
            other => Some(other.clone()),
        }
    }
}

/// The name suffix of an attention kernel (or shader) that takes attention sinks.
pub(crate) fn sinks_suffix(sinks: bool) -> &'static str {
    if sinks { "_sinks" } else { "" }
}

/// The name suffix of a row reduction whose values are `inner` apart.
fn stride_suffix(inner: usize) -> String {
    if inner == 1 {
        String::new()
    } else {
        format!("_stride{inner}")
    }
}

/// A name for a scalar body: its ops in order.
fn body_name(body: &ScalarBody) -> String {
    let steps = body
        .steps
        .iter()
        .map(|s| match s {
            ScalarStep::Unary(op, _) | ScalarStep::Binary(op, _, _) => {
                op.trim_start_matches("llm.")
            }
            ScalarStep::Constant(_) => "const",
        })
        .collect::<Vec<_>>()
        .join("_");
    match body.dtype {
        DType::F32 => steps,
        narrow => format!("{steps}_{}", narrow.name()),
    }
}

/// The tensor type of operand `i`, when it is an `f32` tensor.
fn f32_operand(check: &OpCheck, i: usize) -> Option<TensorType> {
    check.tensor(i).ok().filter(|t| t.dtype() == DType::F32)
}

/// The static `[n, k]` of a rank-2 weight type.
fn static_matrix(shape: &[Option<u64>]) -> Option<(usize, usize)> {
    match shape {
        [Some(n), Some(k)] => Some((*n as usize, *k as usize)),
        _ => None,
    }
}

/// Whether result 0 is an `f32` tensor.
fn f32_result(check: &OpCheck) -> bool {
    check
        .result_tensor(0)
        .is_ok_and(|t| t.dtype() == DType::F32)
}

/// The kernel `op` lowers to, or `None` when it runs through its reference semantics.
pub fn select(ctx: &Context, op: Ptr<Operation>) -> Option<Kernel> {
    let name = Operation::get_opid(op, ctx).to_string();
    let check = OpCheck::for_eval(ctx, op);
    if check.num_results() == 0 {
        return None;
    }
    let eps_bits = || (check.float("eps").unwrap_or(1e-5) as f32).to_bits();
    match name.as_str() {
        "llm.matmul" | "llm.rms_norm_matmul" => {
            let rhs = if name == "llm.matmul" { 1 } else { 2 };
            let x = f32_operand(&check, 0)?;
            let w = f32_operand(&check, rhs)?;
            let general = || {
                // Any other f32 matmul: a batched rhs, or one with dynamic dims.
                let matmul = name == "llm.matmul" && x.rank() >= 2 && w.rank() >= 2;
                (matmul && f32_result(&check)).then(|| Kernel::BatchedMatmul {
                    transposed: check.flag("transpose_rhs", false),
                })
            };
            let Some((rows, cols)) = static_matrix(w.shape()) else {
                return general();
            };
            let transposed = check.flag("transpose_rhs", false);
            // A [k, n] rhs is read through a transposed copy, so only a constant one lowers.
            let (n, k, weight) = if transposed {
                (rows, cols, WeightFormat::F32)
            } else {
                (cols, rows, WeightFormat::F32KN)
            };
            let k_ok = x.shape().last() == Some(&Some(k as u64));
            let norm_ok = name == "llm.matmul"
                || f32_operand(&check, 1).is_some_and(|g| g.shape() == [Some(k as u64)]);
            // An empty contraction (K = 0) is left to the reference.
            (k > 0 && k_ok && norm_ok && x.rank() >= 2 && f32_result(&check)).then(|| {
                Kernel::Contraction(Contraction {
                    norm_eps_bits: (name == "llm.rms_norm_matmul").then(eps_bits),
                    ..Contraction::plain(k, n, weight)
                })
            })
        }
        "llm.sharded_linear" => {
            let (x, w, y) = (
                check.sharded(0).ok()?,
                check.sharded(1).ok()?,
                check.result_sharded(0).ok()?,
            );
            let f32s = [x.dtype(), w.dtype(), y.dtype()] == [DType::F32; 3];
            let local = w.local_shape();
            let (n, k) = match local[..] {
                [Some(n), Some(k)] => (n as usize, k as usize),
                _ => return None,
            };
            let k_ok = x.local_shape().last() == Some(&Some(k as u64));
            (f32s && k_ok && n > 0 && k > 0).then_some(Kernel::ShardedLinear {
                local: Contraction::plain(k, n, WeightFormat::F32),
                reduction: y.reduction(),
            })
        }
        "llm.shard" => {
            let y = check.result_sharded(0).ok()?;
            Some(Kernel::Mesh(MeshMove::Shard {
                mesh: y.mesh().to_vec(),
                split: y.split().to_vec(),
                reduction: y.reduction(),
            }))
        }
        "llm.unshard" => Some(Kernel::Mesh(MeshMove::Unshard)),
        "llm.all_gather" => {
            let rank = check.sharded(0).ok()?.shape().len() as i64;
            let axes = check.param("mesh_axes")?.as_word_list()?;
            let dim = check.int("dim").unwrap_or(0);
            let dim = usize::try_from(if dim < 0 { dim + rank } else { dim }).ok()?;
            Some(Kernel::Mesh(MeshMove::AllGather { axes, dim }))
        }
        "llm.all_reduce" | "llm.reduce_scatter" => {
            let x = check.sharded(0).ok()?;
            let axes = check.param("mesh_axes")?.as_word_list()?;
            if x.dtype() != DType::F32 {
                return None;
            }
            let reduction = x.reduction();
            Some(if name == "llm.all_reduce" {
                Kernel::AllReduce { axes, reduction }
            } else {
                let rank = x.shape().len() as i64;
                let dim = check.int("dim").unwrap_or(0);
                let dim = usize::try_from(if dim < 0 { dim + rank } else { dim }).ok()?;
                Kernel::ReduceScatter {
                    axes,
                    dim,
                    reduction,
                }
            })
        }
        "llm.quantized_matmul" => {
            let w = check.quantized(1).ok()?;
            let (n, k) = static_matrix(w.shape())?;
            let weight = WeightFormat::of(w.format())?;
            // Activations in q8_0 meet the GGUF block formats' weights run by run (each run
            // of the weight's lies inside a block of x).
            let q8_0_input = check.is_quantized(0);
            let x_shape = if q8_0_input {
                let x = check.quantized(0).ok()?;
                let blocks_meet = w.format().meets_q8_0_blocks();
                (*x.format() == QuantFormat::Q8_0 && blocks_meet).then(|| x.shape().to_vec())?
            } else {
                f32_operand(&check, 0)?.shape().to_vec()
            };
            // Row-blocked formats hold whole blocks per row; the whole-matrix ones need
            // whole bytes per row and whole groups along their axis.
            let layout_ok = match weight {
                WeightFormat::Nf4 { block, .. } => k % 2 == 0 && block > 0,
                WeightFormat::Affine {
                    bits, group, axis, ..
                } => {
                    let along = if axis == 0 { n } else { k };
                    (k * usize::from(bits)).is_multiple_of(8)
                        && group > 0
                        && along.is_multiple_of(group as usize)
                }
                other => other.block().is_some_and(|b| k.is_multiple_of(b)),
            };
            let k_ok = x_shape.last() == Some(&Some(k as u64)) && layout_ok;
            (k_ok && f32_result(&check)).then_some(Kernel::Contraction(Contraction {
                q8_0_input,
                ..Contraction::plain(k, n, weight)
            }))
        }
        "llm.rms_norm" => {
            let x = f32_operand(&check, 0)?;
            let d = (*x.shape().last()?)? as usize;
            (d > 0 && f32_result(&check) && f32_operand(&check, 1).is_some()).then(|| {
                Kernel::RmsNorm {
                    d,
                    eps_bits: eps_bits(),
                }
            })
        }
        "llm.softmax" => {
            let x = f32_operand(&check, 0)?;
            let (n, inner) = axis_rows(&check, &x)?;
            (n > 0 && f32_result(&check)).then_some(Kernel::Softmax { n, inner })
        }
        "llm.argmax" => {
            let x = f32_operand(&check, 0)?;
            let (n, inner) = axis_rows(&check, &x)?;
            let index = check.result_tensor(0).ok()?.dtype();
            let int_result = matches!(index, DType::I32 | DType::I64);
            (n > 0 && int_result).then_some(Kernel::Argmax { n, inner, index })
        }
        "llm.topk" => {
            let x = f32_operand(&check, 0)?;
            let n = (*x.shape().last()?)? as usize;
            let k = usize::try_from(check.int("k")?).ok()?;
            let index = check.result_tensor(1).ok()?.dtype();
            let int_result = matches!(index, DType::I32 | DType::I64);
            let f32_values = check.result_tensor(0).ok()?.dtype() == DType::F32;
            (k > 0 && k <= n && int_result && f32_values).then_some(Kernel::TopK { n, k, index })
        }
        "llm.expert_matmul" => expert_contraction(&check),
        "llm.dequantize" => {
            let q = check.quantized(0).ok()?;
            let weight = WeightFormat::of(q.format())?;
            let dims: Option<Vec<usize>> =
                q.shape().iter().map(|d| d.map(|d| d as usize)).collect();
            let dims = dims?;
            let (&k, lead) = dims.split_last()?;
            let rows: usize = lead.iter().product();
            let whole = match weight {
                WeightFormat::Nf4 { .. } => k % 2 == 0,
                WeightFormat::Affine { bits, axis, .. } => {
                    (k * usize::from(bits)).is_multiple_of(8) && dims.len() == 2 && axis < 2
                }
                other => other.block().is_some_and(|b| k.is_multiple_of(b)),
            };
            (whole && f32_result(&check)).then_some(Kernel::Dequantize { weight, rows, k })
        }
        "llm.quantize" => {
            let x = f32_operand(&check, 0)?;
            let (&k, lead) = x.shape().split_last()?;
            let k = k? as usize;
            // The product of the leading dims, when they are all static.
            let static_rows: Option<usize> = lead.iter().map(|d| d.map(|d| d as usize)).product();
            let format = WeightFormat::of(check.result_quantized(0).ok()?.format())?;
            let rows = match format {
                // Blocks along each row: any number of rows, counted at run time.
                WeightFormat::Q8_0
                | WeightFormat::Q4_0
                | WeightFormat::Q4_1
                | WeightFormat::Q4K
                | WeightFormat::Q6K
                | WeightFormat::Q2K => {
                    if !format.block().is_some_and(|b| k.is_multiple_of(b)) {
                        return None;
                    }
                    None
                }
                WeightFormat::Nf4 { block, .. } => {
                    if block == 0 || !k.is_multiple_of(block as usize) {
                        return None;
                    }
                    Some(static_rows?)
                }
                // Groups of a matrix, along either dim, of whole bytes of codes.
                WeightFormat::Affine {
                    bits, group, axis, ..
                } => {
                    let rows = static_rows?;
                    let along = if axis == 0 { rows } else { k };
                    let whole = lead.len() == 1
                        && group > 0
                        && along.is_multiple_of(group as usize)
                        && (k * usize::from(bits)).is_multiple_of(8);
                    if !whole {
                        return None;
                    }
                    Some(rows)
                }
                _ => return None,
            };
            (k > 0).then_some(Kernel::Quantize { format, rows, k })
        }
        "llm.cast" => {
            let (from, to) = (
                check.tensor(0).ok()?.dtype(),
                check.result_tensor(0).ok()?.dtype(),
            );
            Some(Kernel::Cast { from, to })
        }
        "llm.append_kv" | "llm.lookup_kv" => {
            let cache = check.kv_cache(0).ok()?;
            let p = cache.params();
            let layer = check.int("layer").unwrap_or(0);
            let floats = name == "llm.append_kv" || f32_result(&check);
            (floats && layer >= 0 && (layer as u64) < p.layers).then(|| {
                let (layer, row) = (layer as usize, (p.kv_heads * p.head_dim) as usize);
                let rounding = KvRounding::of(&p.storage);
                if name == "llm.append_kv" {
                    Kernel::KvAppend {
                        layer,
                        row,
                        rounding,
                    }
                } else {
                    Kernel::KvLookup {
                        layer,
                        row,
                        rounding,
                    }
                }
            })
        }
        "llm.transpose" => {
            let x = check.tensor(0).ok()?;
            let perm = check.param("perm")?.as_int_list()?;
            let rank = x.rank();
            if perm.len() != rank {
                return None;
            }
            let perm = perm
                .iter()
                .map(|&p| usize::try_from(p).ok())
                .collect::<Option<_>>()?;
            Some(Kernel::Transpose { perm })
        }
        "llm.concat" => {
            let x = check.tensor(0).ok()?;
            let rank = x.rank();
            let axis = check.int("axis").unwrap_or(0);
            let axis = usize::try_from(if axis < 0 { axis + rank as i64 } else { axis }).ok()?;
            let same_type = (0..check.num_operands())
                .all(|i| check.tensor(i).is_ok_and(|t| t.dtype() == x.dtype()));
            (axis < rank && same_type).then_some(Kernel::Move(Movement::Concat {
                axis,
                inputs: check.num_operands(),
            }))
        }
        "llm.layer_norm" => {
            let x = f32_operand(&check, 0)?;
            let d = (*x.shape().last()?)? as usize;
            let params_ok = f32_operand(&check, 1).is_some() && f32_operand(&check, 2).is_some();
            (d > 0 && params_ok && f32_result(&check)).then(|| Kernel::LayerNorm {
                d,
                eps_bits: eps_bits(),
            })
        }
        "llm.rope" => {
            let x = f32_operand(&check, 0)?;
            let [.., Some(heads), Some(d)] = x.shape() else {
                return None;
            };
            let (heads, d) = (*heads as usize, *d as usize);
            let rotary = check.int("rotary_dim").map_or(d, |v| v as usize);
            let half =
                matches!(check.param("layout"), Some(ParamValue::Word(ref w)) if w == "half");
            (f32_result(&check) && rotary <= d && rotary.is_multiple_of(2)).then(|| Kernel::Rope {
                heads,
                d,
                rotary,
                half,
                theta_bits: (check.float("theta").unwrap_or(10000.0) as f32).to_bits(),
                scaling_bits: (check.float("scaling").unwrap_or(1.0) as f32).to_bits(),
                mscale_bits: (check.float("mscale").unwrap_or(1.0) as f32).to_bits(),
            })
        }
        "llm.paged_attention" | "llm.append_attention" => {
            let q = f32_operand(&check, 0)?;
            let cache = check.kv_cache(1).ok()?;
            let [_, _, Some(heads), Some(d)] = q.shape() else {
                return None;
            };
            let append = name == "llm.append_attention";
            let source = AttentionSource::Paged {
                layer: check.int("layer")? as usize,
                window: check.int("window").map(|w| w as usize),
                append,
                rounding: KvRounding::of(&cache.params().storage),
            };
            // The sinks, where the op has them, follow its other operands.
            let at = source.operands();
            let sinks_ok = check.num_operands() == at || f32_operand(&check, at).is_some();
            attention(&check, *heads as usize, *d as usize, source).filter(|_| sinks_ok)
        }
        "llm.attention" => {
            let q = f32_operand(&check, 0)?;
            let v = f32_operand(&check, 2)?;
            let [.., Some(heads), Some(d)] = q.shape() else {
                return None;
            };
            let same_dims = v.shape().last() == Some(&Some(*d));
            let masked = check.num_operands() == 4;
            let source = AttentionSource::Contiguous {
                causal: check.flag("causal", false),
                window: check.int("window").map(|w| w as usize),
                masked,
            };
            let mask_ok = !masked || f32_operand(&check, 3).is_some();
            attention(&check, *heads as usize, *d as usize, source)
                .filter(|_| same_dims && mask_ok && f32_operand(&check, 1).is_some())
        }
        "llm.reshape" => {
            let x = check.tensor(0).ok()?;
            let r = check.result_tensor(0).ok()?;
            (x.dtype() == r.dtype()).then_some(Kernel::Move(Movement::Reshape))
        }
        "llm.slice" => columns(&check).or_else(|| strided_slice(&check)),
        "llm.embedding" => {
            let (shape, table) = match (check.tensor(0), check.quantized(0)) {
                (Ok(t), _) if t.dtype().is_float() => (t.shape().to_vec(), WeightFormat::F32),
                (_, Ok(q)) => (q.shape().to_vec(), WeightFormat::of(q.format())?),
                _ => return None,
            };
            let [Some(vocab), Some(dim)] = shape[..] else {
                return None;
            };
            let (vocab, dim) = (vocab as usize, dim as usize);
            let layout_ok = match table {
                WeightFormat::Nf4 { .. } => dim % 2 == 0,
                WeightFormat::Affine { bits, .. } => (dim * usize::from(bits)).is_multiple_of(8),
                other => other.block().is_some_and(|b| dim.is_multiple_of(b)),
            };
            (layout_ok && f32_result(&check)).then_some(Kernel::Move(Movement::Rows {
                dim,
                vocab,
                table,
                panels: false,
            }))
        }
        _ => elementwise(ctx, op, &check, &name),
    }
}

/// The kernel of an `llm.expert_matmul` of `f32` activations and results whose experts
/// are static `[E, N, K]` matrices in a row-major format: `f32`, or a quantized one whose
/// rows are whole blocks (so that each expert's rows lie by themselves).
fn expert_contraction(check: &OpCheck) -> Option<Kernel> {
    let x = f32_operand(check, 0)?;
    let (shape, weight) = if check.is_quantized(1) {
        let w = check.quantized(1).ok()?;
        (w.shape().to_vec(), WeightFormat::of(w.format())?)
    } else {
        (f32_operand(check, 1)?.shape().to_vec(), WeightFormat::F32)
    };
    let [Some(_), Some(n), Some(k)] = shape[..] else {
        return None;
    };
    let (n, k) = (n as usize, k as usize);
    let rows_whole = weight.block().is_some_and(|b| k.is_multiple_of(b));
    let k_ok = x.shape().last() == Some(&Some(k as u64)) && n > 0 && k > 0;
    (rows_whole && k_ok && f32_result(check)).then_some(Kernel::ExpertContraction {
        expert: Contraction::plain(k, n, weight),
        per_slot: x.rank() == 3,
    })
}

/// The row length and stride of a reduction along the op's `axis` (default: the last) of
/// `x`: both static.
fn axis_rows(check: &OpCheck, x: &TensorType) -> Option<(usize, usize)> {
    let rank = x.rank() as i64;
    let axis = check.int("axis").unwrap_or(-1);
    let axis = usize::try_from(if axis < 0 { axis + rank } else { axis }).ok()?;
    let n = (*x.shape().get(axis)?)? as usize;
    let mut inner = 1;
    for d in &x.shape()[axis + 1..] {
        inner *= (*d)? as usize;
    }
    Some((n, inner))
}

/// The attention kernel of an op with `heads` query heads of size `d`.
fn attention(check: &OpCheck, heads: usize, d: usize, source: AttentionSource) -> Option<Kernel> {
    let kv_heads = check.int("kv_heads")? as usize;
    (f32_result(check) && kv_heads > 0 && heads > 0 && heads.is_multiple_of(kv_heads) && d > 0)
        .then(|| Kernel::Attention {
            heads,
            kv_heads,
            d,
            scoring: Scoring::from_params(check.float("scale"), check.float("softcap"), d),
            sinks: check.num_operands() > source.operands(),
            source,
        })
}

/// A slice that takes a static range of the last dim and keeps every other dim whole.
fn columns(check: &OpCheck) -> Option<Kernel> {
    let x = f32_operand(check, 0)?;
    let r = check.result_tensor(0).ok()?;
    let starts = check.param("starts")?.as_int_list()?;
    let unit_steps = check
        .param("steps")
        .and_then(|p| p.as_int_list())
        .is_none_or(|s| s.iter().all(|&v| v == 1));
    let rank = x.rank();
    let (Some(Some(width)), Some(Some(len))) = (x.shape().last(), r.shape().last()) else {
        return None;
    };
    let whole = (0..rank - 1).all(|i| starts[i] == 0 && x.shape()[i] == r.shape()[i]);
    let offset = *starts.last()? as usize;
    (unit_steps && whole && r.dtype() == DType::F32 && offset + *len as usize <= *width as usize)
        .then_some(Kernel::Move(Movement::Columns {
            width: *width as usize,
            offset,
            len: *len as usize,
        }))
}

/// A slice [`columns`] does not take, of a tensor of any element type.
fn strided_slice(check: &OpCheck) -> Option<Kernel> {
    let x = check.tensor(0).ok()?;
    let rank = x.rank();
    let starts = check.param("starts")?.as_int_list()?;
    let steps = check
        .param("steps")
        .map_or(Some(vec![1; rank]), |p| p.as_int_list())?;
    (starts.len() == rank && steps.len() == rank).then_some(Kernel::Slice { starts, steps })
}

/// The elementwise kernel of a unary, binary or fused op over `f32` operands of one shape.
fn elementwise(ctx: &Context, op: Ptr<Operation>, check: &OpCheck, name: &str) -> Option<Kernel> {
    // Float values (f16 and bf16 ones held as f32, every step rounded to their type) of
    // the result's element type.
    let result = check.result_tensor(0).ok()?;
    let dtype = result.dtype();
    if !dtype.is_float() {
        return None;
    }
    // Operands of the result's shape, or broadcast to it numpy-style: right-aligned, each
    // dim 1 or declared as the result's (a dynamic one too: a mixture's `[?, 1]` gate
    // scaling `[?, dim]` rows; the kernel lays the broadcast out from the run-time shapes,
    // and shapes that do not broadcast there run the reference semantics).
    let mut broadcast = false;
    for i in 0..check.num_operands() {
        let operand = check.tensor(i).ok().filter(|t| t.dtype() == dtype)?;
        let shape = operand.shape().to_vec();
        if shape != result.shape() {
            let rank = result.rank();
            let fits = shape.len() <= rank
                && shape.iter().enumerate().all(|(d, dim)| {
                    let out = result.shape()[d + rank - shape.len()];
                    *dim == Some(1) || *dim == out
                });
            if !fits {
                return None;
            }
            broadcast = true;
        }
    }
    let body = if name == "llm.fused" {
        ScalarBody::of(ctx, op).ok()?
    } else {
        let step = match check.num_operands() {
            1 => ScalarStep::Unary(unary_name(name)?, 0),
            2 => ScalarStep::Binary(binary_name(name)?, 0, 1),
            _ => return None,
        };
        ScalarBody {
            args: check.num_operands(),
            result: check.num_operands(),
            steps: vec![step],
            dtype,
        }
    };
    Some(if broadcast {
        Kernel::Broadcast(body)
    } else {
        Kernel::Elementwise(body)
    })
}

/// The canonical `'static` name of unary elementwise op `name`.
fn unary_name(name: &str) -> Option<&'static str> {
    llm_ir::interp::eval::elementwise::UNARY
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, _)| *n)
}

/// The canonical `'static` name of binary elementwise op `name`.
fn binary_name(name: &str) -> Option<&'static str> {
    llm_ir::interp::eval::elementwise::BINARY
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dims of 1 vanish and dims the operands step through alike merge: a rank-6 bias
    /// broadcast becomes two dims; a scalar operand has stride 0 everywhere.
    #[test]
    fn broadcast_layouts_merge_dims() {
        let x = [2usize, 3, 1, 4, 5, 6];
        let bias = [1usize, 1, 1, 1, 5, 6];
        let layout = broadcast_layout(&[&x, &bias, &[1]]).expect("broadcasts");
        assert_eq!(layout.shape, x);
        assert_eq!(layout.dims, [1, 1, 24, 30]);
        assert_eq!(
            layout.strides,
            vec![[0, 0, 30, 1], [0, 0, 0, 1], [0, 0, 0, 0]]
        );
        // A per-row scale in the middle keeps its dims apart.
        let scale = [2usize, 3, 1, 4, 1, 1];
        let layout = broadcast_layout(&[&x, &scale]).expect("broadcasts");
        assert_eq!(layout.dims, [1, 1, 24, 30]);
        assert_eq!(layout.strides, vec![[0, 0, 30, 1], [0, 0, 1, 0]]);
        assert!(layout.outer.is_empty());
        // Five dims that cannot merge: the first is left to the caller's loop.
        let odd = [2usize, 1, 4, 1, 6];
        let layout = broadcast_layout(&[&[2usize, 3, 4, 5, 6][..], &odd]).expect("broadcasts");
        assert_eq!(layout.dims, [3, 4, 5, 6]);
        assert_eq!(layout.strides, vec![[120, 30, 6, 1], [0, 6, 0, 1]]);
        assert_eq!(layout.outer, [2]);
        assert_eq!(layout.outer_strides, vec![vec![360], vec![24]]);
    }

    #[test]
    fn panel_rows_unpack_what_was_packed() {
        // Packed on one to three threads.
        for (n, k) in [
            (1, 1),
            (4, 8),
            (5, 13),
            (9, 20),
            (12, 3),
            (7, 64),
            (1029, 1100),
        ] {
            let w: Vec<f32> = (0..n * k).map(|i| i as f32).collect();
            let packed = pack_panels(&w, n, k, 1 + n % 3);
            assert_eq!(packed.len(), w.len());
            let mut row = vec![0.0; k];
            for r in 0..n {
                panel_row(&packed, n, k, r, &mut row);
                assert_eq!(row, w[r * k..(r + 1) * k], "row {r} of {n}x{k}");
            }
        }
    }

    /// Block panels put block `b` of row `4p + r` at `(4 * b + r) * block_bytes` of panel
    /// `p`, and leave the last `n % 4` rows where they were.
    #[test]
    fn block_panels_interleave_the_blocks_of_four_rows() {
        for (n, blocks, block_bytes) in [(1, 3, 18), (4, 1, 34), (5, 2, 18), (11, 4, 34)] {
            let row_bytes = blocks * block_bytes;
            let bytes: Vec<u8> = (0..n * row_bytes).map(|i| (i * 7 % 251) as u8).collect();
            let packed = pack_block_panels(&bytes, n, row_bytes, block_bytes);
            assert_eq!(packed.len(), bytes.len());
            for row in 0..n {
                for b in 0..blocks {
                    let at = if row < n - n % PANEL_ROWS {
                        let (p, r) = (row / PANEL_ROWS, row % PANEL_ROWS);
                        p * PANEL_ROWS * row_bytes + (PANEL_ROWS * b + r) * block_bytes
                    } else {
                        row * row_bytes + b * block_bytes
                    };
                    let src = row * row_bytes + b * block_bytes;
                    assert_eq!(
                        packed[at..at + block_bytes],
                        bytes[src..src + block_bytes],
                        "row {row} block {b} of {n}x{blocks}"
                    );
                }
                // And a row read back out of the panels is the row.
                let mut out = vec![0; row_bytes];
                block_panel_row(&packed, n, (row_bytes, block_bytes), row, &mut out);
                assert_eq!(out, bytes[row * row_bytes..(row + 1) * row_bytes]);
            }
        }
    }

    /// A 16-bit weight's panels are the f32 panels' layout of its 2-byte values (packed
    /// from parts as from their stacking), and each row reads back as it was; a block
    /// format's are its block panels.
    #[test]
    fn weight_panels_of_sixteen_bit_and_block_formats() {
        for (n, k) in [(1, 5), (4, 8), (6, 13), (9, 20), (13, 100)] {
            let values: Vec<[u8; 2]> = (0..n * k)
                .map(|i| [i as u8, (i >> 8) as u8 ^ 0x5a])
                .collect();
            let bytes = values.as_flattened();
            let packed = pack_weight_panels(WeightFormat::PackedBF16, &[bytes], [n, k], 2);
            assert_eq!(packed, pack_panels(&values, n, k, 1).as_flattened());
            // From parts (merged siblings) as from their stacking.
            let cut = 2 * k * (n / 3);
            let parts = [&bytes[..cut], &bytes[cut..]];
            assert_eq!(
                pack_weight_panels(WeightFormat::PackedF16, &parts, [n, k], 3),
                packed
            );
            let mut row = vec![0; 2 * k];
            for r in 0..n {
                weight_panel_row(WeightFormat::PackedF16, &packed, [n, k], r, &mut row);
                assert_eq!(row, bytes[2 * k * r..2 * k * (r + 1)], "row {r} of {n}x{k}");
            }
        }
        let (n, k) = (5, 64);
        let bytes: Vec<u8> = (0..n * 68).map(|i| (i * 13 % 251) as u8).collect();
        let packed = pack_weight_panels(WeightFormat::Q8_0, &[&bytes], [n, k], 1);
        assert_eq!(packed, pack_block_panels(&bytes, n, 68, 34));
        let mut row = vec![0; 68];
        weight_panel_row(WeightFormat::Q8_0, &packed, [n, k], 2, &mut row);
        assert_eq!(row, bytes[136..204]);
    }

    /// Packing the parts of a stacked matrix is packing the stacked matrix, whether a
    /// panel's rows lie in one part or two (and on one thread or three).
    #[test]
    fn stacked_parts_pack_as_their_stacking() {
        for (rows, k) in [
            (vec![4, 8], 16),
            (vec![3, 6, 2], 13),
            (vec![1, 1, 1, 1, 1], 9),
            (vec![172, 172], 64),
            (vec![5], 7),
        ] {
            let n: usize = rows.iter().sum();
            let w: Vec<f32> = (0..n * k).map(|i| i as f32 * 0.5).collect();
            let mut parts = Vec::new();
            let mut at = 0;
            for r in &rows {
                parts.push(&w[at * k..(at + r) * k]);
                at += r;
            }
            for threads in [1, 3] {
                assert_eq!(
                    pack_stacked_panels(&parts, n, k, threads),
                    pack_panels(&w, n, k, 1),
                    "{rows:?} x {k} on {threads} threads"
                );
            }
        }
    }
}
