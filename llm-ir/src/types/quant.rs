//! `llm.quantized_tensor` and the quantization formats it can hold.
//!
//! The GGUF block formats are stored exactly as llama.cpp lays them out, one block after
//! another along the last (contiguous) dim:
//!
//! | format | elements per block | bytes per block | block layout |
//! |---|---|---|---|
//! | `q8_0` | 32 | 34 | f16 scale, 32 x i8 |
//! | `q4_0` | 32 | 18 | f16 scale, 16 bytes of 4-bit values (offset 8) |
//! | `q4_1` | 32 | 20 | f16 scale, f16 min, 16 bytes of 4-bit values |
//! | `q5_0` | 32 | 22 | f16 scale, 4 bytes of fifth bits, 16 bytes of 4-bit values (offset 16) |
//! | `q5_1` | 32 | 24 | f16 scale, f16 min, 4 bytes of fifth bits, 16 bytes of 4-bit values |
//! | `q4_k` | 256 | 144 | f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit values |
//! | `q6_k` | 256 | 210 | 128 bytes low 4 bits, 64 bytes high 2 bits, 16 x i8 scales, f16 d |
//! | `q2_k` | 256 | 84 | 16 bytes of 4-bit scales/mins, 64 bytes of 2-bit values, f16 d, f16 dmin |
//! | `q3_k` | 256 | 110 | 32 bytes of high bits, 64 bytes of 2-bit values, 12 bytes of 6-bit scales, f16 d |
//! | `q5_k` | 256 | 176 | f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 32 bytes of high bits, 128 bytes of 4-bit values |
//! | `iq4_nl` | 32 | 18 | f16 scale, 16 bytes of 4-bit indices into [`IQ4_NL_LEVELS`] |
//! | `iq4_xs` | 256 | 136 | f16 d, 16 bits of sub-block scales' high bit pairs, 4 bytes of their low nibbles, 128 bytes of 4-bit indices into [`IQ4_NL_LEVELS`] |
//! | `iq3_xxs` | 256 | 98 | f16 d, 64 indices into [`IQ3XXS_GRID`](super::IQ3XXS_GRID) (groups of 4), per sub-block of 32 a 32-bit word of four 7-bit sign codes and a 4-bit scale |
//! | `iq3_s` | 256 | 110 | f16 d, 64 low bytes of indices into [`IQ3S_GRID`](super::IQ3S_GRID), 8 bytes of their ninth bits, 32 bytes of signs, 4 bytes of 4-bit sub-block scales |
//! | `iq2_xxs` | 256 | 66 | f16 d, per sub-block of 32 four indices into [`IQ2XXS_GRID`](super::IQ2XXS_GRID) (groups of 8) and a 32-bit word of four 7-bit sign codes and a 4-bit scale |
//! | `iq2_xs` | 256 | 74 | f16 d, 32 16-bit words of a 9-bit index into [`IQ2XS_GRID`](super::IQ2XS_GRID) and a 7-bit sign code, 8 bytes of 4-bit scales (one per 16 values) |
//! | `iq2_s` | 256 | 82 | f16 d, 32 low bytes of indices into [`IQ2S_GRID`](super::IQ2S_GRID), 32 bytes of signs, 8 bytes of the indices' high bit pairs, 8 bytes of 4-bit scales (one per 16 values) |
//! | `iq1_s` | 256 | 50 | f16 d, 32 low bytes of 11-bit indices into [`IQ1S_GRID`](super::IQ1S_GRID) (groups of 8 signed values), per sub-block of 32 a 16-bit word of the indices' high bits, a 3-bit scale and a delta sign |
//! | `iq1_m` | 256 | 56 | 32 low bytes of indices into [`IQ1S_GRID`](super::IQ1S_GRID), 16 bytes of their high bits and delta signs (a nibble a group), 8 bytes of 3-bit scales (one per 16 values) with the f16 d in their words' top nibbles |
//! | `tq1_0` | 256 | 54 | 48 bytes of five trits each and 4 of four (base 3, scaled to a byte), f16 d |
//! | `tq2_0` | 256 | 66 | 64 bytes of 2-bit trits plus one, f16 d |
//! | `q1_0` | 128 | 18 | f16 d, 16 bytes of sign bits (set: `d`, clear: `-d`) |
//! | `mxfp4` | 32 | 17 | an E8M0 scale byte, 16 bytes of 4-bit indices into [`FP4_LEVELS`](crate::interp::fp4::FP4_LEVELS) |
//! | `nvfp4` | 64 | 36 | four UE4M3 scale bytes (one per 16 values), 32 bytes of 4-bit indices into [`FP4_LEVELS`](crate::interp::fp4::FP4_LEVELS) |
//! | `f16` | 1 | 2 | an IEEE half |
//! | `bf16` | 1 | 2 | a bfloat16 (the top half of an f32) |
//!
//! `f16` and `bf16` are GGUF's F16 and BF16 tensors seen as a storage format: a model's
//! 16-bit matrices stay 16-bit in memory and meet `llm.quantized_matmul` as the block
//! formats do, widened as they are read (`dequantize` is exact; `quantize` rounds to
//! nearest even, as `llm.cast` does).
//!
//! `nf4` is the 4-bit NormalFloat format (QLoRA): blocks of `block_size` values along the last
//! dim, each with one absmax scale of dtype `scale`. The affine formats `int2`, `int4` and `int8`
//! quantize groups of `group_size` consecutive values along `axis`, symmetric (scale only) or
//! asymmetric (scale and zero point), with scales stored as `scale`.

use pliron::{
    common_traits::Verify,
    context::Context,
    derive::pliron_type,
    location::Location,
    parsable::{IntoParseResult, Parsable, ParseResult, StateStream, StreamLocation},
    printable::{self, Printable},
    result::Result,
    r#type::{Type, TypedHandle},
    verify_error_noloc,
};

use crate::{
    dtype::DType,
    params::{self, ParamValue},
    syntax::{self, Dim, PResult},
};

/// The 16 signed levels of GGUF's IQ4_NL, ascending: a value is its block's scale times
/// the level its nibble indexes (ggml's `kvalues_iq4nl`).
pub const IQ4_NL_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// An exact storage format of quantized values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// GGUF Q8_0.
    Q8_0,
    /// GGUF Q4_0.
    Q4_0,
    /// GGUF Q4_1.
    Q4_1,
    /// GGUF Q5_0.
    Q5_0,
    /// GGUF Q5_1.
    Q5_1,
    /// GGUF Q4_K.
    Q4K,
    /// GGUF Q6_K.
    Q6K,
    /// GGUF Q2_K.
    Q2K,
    /// GGUF Q3_K.
    Q3K,
    /// GGUF Q5_K.
    Q5K,
    /// GGUF IQ4_NL: blocks of 32, an f16 scale and 16 bytes of nibbles that index a fixed
    /// non-linear table of 16 signed levels ([`IQ4_NL_LEVELS`]).
    Iq4Nl,
    /// GGUF IQ4_XS: super-blocks of 256, an f16 scale `d` and eight 6-bit sub-block scales
    /// `ls` (value `d * (ls - 32) * level`), with IQ4_NL's nibbles and levels in each
    /// sub-block of 32.
    Iq4Xs,
    /// GGUF IQ3_XXS: super-blocks of 256, an f16 scale `d` and eight sub-blocks of 32, each
    /// with a 4-bit scale and eight groups of four values whose magnitudes are one entry
    /// of a 256-entry grid ([`IQ3XXS_GRID`](super::IQ3XXS_GRID)), with signs (3.06 bits a value).
    Iq3Xxs,
    /// GGUF IQ3_S: IQ3_XXS's layout with a 512-entry grid ([`IQ3S_GRID`](super::IQ3S_GRID)) and a sign bit
    /// for every value (3.44 bits a value).
    Iq3S,
    /// GGUF IQ2_XXS: super-blocks of 256, an f16 scale `d` and eight sub-blocks of 32, each
    /// with a 4-bit scale and four groups of eight values whose magnitudes are one entry
    /// of a 256-entry grid ([`IQ2XXS_GRID`](super::IQ2XXS_GRID)), with signs (2.06 bits a
    /// value).
    Iq2Xxs,
    /// GGUF IQ2_XS: groups of eight from a 512-entry grid
    /// ([`IQ2XS_GRID`](super::IQ2XS_GRID)) and a 4-bit scale for every 16 values (2.31 bits
    /// a value).
    Iq2Xs,
    /// GGUF IQ2_S: groups of eight from a 1024-entry grid ([`IQ2S_GRID`](super::IQ2S_GRID)),
    /// a sign bit for every value and a 4-bit scale for every 16 (2.56 bits a value).
    Iq2S,
    /// GGUF IQ1_S: super-blocks of 256, an f16 scale `d` and eight sub-blocks of 32, each
    /// with a 3-bit scale, a shared shift (`delta`, ±1/8) and four groups of eight values
    /// that are one entry of a 2048-entry grid of -1, 0 and 1
    /// ([`IQ1S_GRID`](super::IQ1S_GRID)) (1.56 bits a value).
    Iq1S,
    /// GGUF IQ1_M: IQ1_S's grid, with a 3-bit scale for every 16 values and a shift for
    /// every group of eight; `d` is split across the scales' words (1.75 bits a value).
    Iq1M,
    /// GGUF TQ1_0: super-blocks of 256 ternary values `d * t` (`t` in {-1, 0, 1}), five
    /// trits a byte (1.69 bits a value), an f16 scale `d`.
    Tq1_0,
    /// GGUF TQ2_0: TQ1_0's values as 2-bit codes (2.06 bits a value).
    Tq2_0,
    /// GGUF Q1_0: blocks of 128 values `±d`, an f16 scale `d` and a sign bit a value
    /// (1.125 bits a value).
    Q1_0,
    /// GGUF MXFP4 (OCP microscaling): blocks of 32 four-bit floats (E2M1) under a
    /// power-of-two scale (an E8M0 byte), 4.25 bits a value.
    Mxfp4,
    /// GGUF NVFP4: blocks of 64 four-bit floats (E2M1), each 16 under an 8-bit float
    /// scale (UE4M3), 4.5 bits a value.
    Nvfp4,
    /// IEEE half-precision floats (GGUF F16).
    F16,
    /// bfloat16 floats (GGUF BF16).
    BF16,
    /// 4-bit NormalFloat with one absmax scale per block.
    Nf4 {
        /// Values per block (even).
        block_size: u64,
        /// Storage type of the scales (a float type).
        scale: DType,
    },
    /// Affine integer quantization with `bits` in {2, 4, 8}.
    Affine {
        /// Bits per value: 2, 4 or 8.
        bits: u8,
        /// Values per group.
        group_size: u64,
        /// Scale only (`true`) or scale and zero point (`false`).
        symmetric: bool,
        /// The dim along which groups run.
        axis: u64,
        /// Storage type of scales (and zero points).
        scale: DType,
    },
}

impl QuantFormat {
    /// The format's name as written in the text (`q4_k`, `nf4`, `int4`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q4_1 => "q4_1",
            QuantFormat::Q5_0 => "q5_0",
            QuantFormat::Q5_1 => "q5_1",
            QuantFormat::Q4K => "q4_k",
            QuantFormat::Q6K => "q6_k",
            QuantFormat::Q2K => "q2_k",
            QuantFormat::Q3K => "q3_k",
            QuantFormat::Q5K => "q5_k",
            QuantFormat::Iq4Nl => "iq4_nl",
            QuantFormat::Iq4Xs => "iq4_xs",
            QuantFormat::Iq3Xxs => "iq3_xxs",
            QuantFormat::Iq3S => "iq3_s",
            QuantFormat::Iq2Xxs => "iq2_xxs",
            QuantFormat::Iq2Xs => "iq2_xs",
            QuantFormat::Iq2S => "iq2_s",
            QuantFormat::Iq1S => "iq1_s",
            QuantFormat::Iq1M => "iq1_m",
            QuantFormat::Tq1_0 => "tq1_0",
            QuantFormat::Tq2_0 => "tq2_0",
            QuantFormat::Q1_0 => "q1_0",
            QuantFormat::Mxfp4 => "mxfp4",
            QuantFormat::Nvfp4 => "nvfp4",
            QuantFormat::F16 => "f16",
            QuantFormat::BF16 => "bf16",
            QuantFormat::Nf4 { .. } => "nf4",
            QuantFormat::Affine { bits: 2, .. } => "int2",
            QuantFormat::Affine { bits: 4, .. } => "int4",
            QuantFormat::Affine { .. } => "int8",
        }
    }

    /// Number of consecutive values that share one block or group.
    pub fn block_elems(&self) -> u64 {
        match self {
            QuantFormat::Q8_0
            | QuantFormat::Q4_0
            | QuantFormat::Q4_1
            | QuantFormat::Q5_0
            | QuantFormat::Q5_1
            | QuantFormat::Iq4Nl
            | QuantFormat::Mxfp4 => 32,
            QuantFormat::Nvfp4 => 64,
            QuantFormat::Q1_0 => 128,
            QuantFormat::Q4K
            | QuantFormat::Q6K
            | QuantFormat::Q2K
            | QuantFormat::Q3K
            | QuantFormat::Q5K
            | QuantFormat::Iq4Xs
            | QuantFormat::Iq3Xxs
            | QuantFormat::Iq3S
            | QuantFormat::Iq2Xxs
            | QuantFormat::Iq2Xs
            | QuantFormat::Iq2S
            | QuantFormat::Iq1S
            | QuantFormat::Iq1M
            | QuantFormat::Tq1_0
            | QuantFormat::Tq2_0 => 256,
            QuantFormat::F16 | QuantFormat::BF16 => 1,
            QuantFormat::Nf4 { block_size, .. } => *block_size,
            QuantFormat::Affine { group_size, .. } => *group_size,
        }
    }

    /// Whether a matmul weight of this format can meet q8_0 activations block by block:
    /// the GGUF block formats, whose blocks (32, 64, 128 or 256 values) are whole q8_0
    /// blocks, each run of values under one scale inside one (not GGUF's 16-bit floats).
    pub fn meets_q8_0_blocks(&self) -> bool {
        self.gguf_block_bytes().is_some() && self.block_elems().is_multiple_of(32)
    }

    /// Bytes of one GGUF block, for the GGUF formats.
    pub fn gguf_block_bytes(&self) -> Option<u64> {
        match self {
            QuantFormat::Q8_0 => Some(34),
            QuantFormat::Q4_0 => Some(18),
            QuantFormat::Q4_1 => Some(20),
            QuantFormat::Q5_0 => Some(22),
            QuantFormat::Q5_1 => Some(24),
            QuantFormat::Q4K => Some(144),
            QuantFormat::Q6K => Some(210),
            QuantFormat::Q2K => Some(84),
            QuantFormat::Q3K => Some(110),
            QuantFormat::Q5K => Some(176),
            QuantFormat::Iq4Nl => Some(18),
            QuantFormat::Iq4Xs => Some(136),
            QuantFormat::Iq3Xxs => Some(98),
            QuantFormat::Iq3S => Some(110),
            QuantFormat::Iq2Xxs => Some(66),
            QuantFormat::Iq2Xs => Some(74),
            QuantFormat::Iq2S => Some(82),
            QuantFormat::Iq1S => Some(50),
            QuantFormat::Iq1M => Some(56),
            QuantFormat::Tq1_0 => Some(54),
            QuantFormat::Tq2_0 => Some(66),
            QuantFormat::Mxfp4 => Some(17),
            QuantFormat::Q1_0 => Some(18),
            QuantFormat::Nvfp4 => Some(36),
            QuantFormat::F16 | QuantFormat::BF16 => Some(2),
            _ => None,
        }
    }

    /// The format llama.cpp's quantizer stores a matrix in instead of this one when the
    /// matrix's rows are not whole super-blocks of 256 (`llama_tensor_get_type`'s
    /// fallback): q2_k, q3_k, iq4_xs and the lattice formats (iq3_xxs, iq3_s, iq2_xxs,
    /// iq2_xs, iq2_s, iq1_s, iq1_m) fall back to iq4_nl, q4_k to q5_0, q5_k to q5_1,
    /// q6_k to q8_0 and the ternary tq1_0 and tq2_0 to q4_0, all of blocks of 32 (and where a matrix's rows are not whole
    /// blocks of those either, llama.cpp stores it as f16); `None` for the other formats.
    pub fn row_fallback(&self) -> Option<QuantFormat> {
        Some(match self {
            QuantFormat::Q2K
            | QuantFormat::Q3K
            | QuantFormat::Iq4Xs
            | QuantFormat::Iq3Xxs
            | QuantFormat::Iq3S
            | QuantFormat::Iq2Xxs
            | QuantFormat::Iq2Xs
            | QuantFormat::Iq2S
            | QuantFormat::Iq1S
            | QuantFormat::Iq1M => QuantFormat::Iq4Nl,
            QuantFormat::Q4K => QuantFormat::Q5_0,
            QuantFormat::Q5K => QuantFormat::Q5_1,
            QuantFormat::Q6K => QuantFormat::Q8_0,
            QuantFormat::Tq1_0 | QuantFormat::Tq2_0 => QuantFormat::Q4_0,
            _ => return None,
        })
    }

    /// The dim of a rank-`rank` tensor along which blocks or groups run.
    pub fn block_axis(&self, rank: usize) -> u64 {
        match self {
            QuantFormat::Affine { axis, .. } => *axis,
            _ => rank.saturating_sub(1) as u64,
        }
    }

    /// Checks the format's own parameters.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            QuantFormat::Nf4 { block_size, scale } => {
                if *block_size == 0 || block_size % 2 != 0 {
                    return Err(format!(
                        "nf4 block_size must be even and positive, found {block_size}"
                    ));
                }
                if !scale.is_float() {
                    return Err(format!("nf4 scale must be a float type, found {scale}"));
                }
            }
            QuantFormat::Affine {
                bits,
                group_size,
                scale,
                ..
            } => {
                let per_byte = 8 / u64::from(*bits);
                if *group_size == 0 || group_size % per_byte != 0 {
                    return Err(format!(
                        "{} group_size must be a positive multiple of {per_byte}, found {group_size}",
                        self.name()
                    ));
                }
                if !scale.is_float() {
                    return Err(format!(
                        "{} scale must be a float type, found {scale}",
                        self.name()
                    ));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks that this format can quantize a tensor of shape `shape`.
    pub fn validate_shape(&self, shape: &[Dim]) -> std::result::Result<(), String> {
        if shape.is_empty() {
            return Err("a quantized tensor must have rank at least 1".into());
        }
        let axis = self.block_axis(shape.len());
        let Some(dim) = shape.get(axis as usize) else {
            return Err(format!(
                "{} axis {axis} is out of range for rank {}",
                self.name(),
                shape.len()
            ));
        };
        let block = self.block_elems();
        match dim {
            Some(n) if n % block != 0 => Err(format!(
                "{} groups {block} values along dim {axis}, but that dim is {n}, not a multiple of {block}",
                self.name()
            )),
            _ => Ok(()),
        }
    }

    /// Parses a format name and, for `nf4` and `intN`, its parameter block.
    pub fn parse_text(s: &mut StateStream) -> PResult<QuantFormat> {
        let (name, loc) = syntax::ident(s, "a quantization format")?;
        Self::parse_after_name(s, name, loc)
    }

    /// Parses the rest of a format whose name (at `loc`) was already read.
    pub(crate) fn parse_after_name(
        s: &mut StateStream,
        name: String,
        loc: Location,
    ) -> PResult<QuantFormat> {
        let format = match name.as_str() {
            "q8_0" => QuantFormat::Q8_0,
            "q4_0" => QuantFormat::Q4_0,
            "q4_1" => QuantFormat::Q4_1,
            "q5_0" => QuantFormat::Q5_0,
            "q5_1" => QuantFormat::Q5_1,
            "q4_k" => QuantFormat::Q4K,
            "q6_k" => QuantFormat::Q6K,
            "q2_k" => QuantFormat::Q2K,
            "q3_k" => QuantFormat::Q3K,
            "q5_k" => QuantFormat::Q5K,
            "iq4_nl" => QuantFormat::Iq4Nl,
            "iq4_xs" => QuantFormat::Iq4Xs,
            "iq3_xxs" => QuantFormat::Iq3Xxs,
            "iq3_s" => QuantFormat::Iq3S,
            "iq2_xxs" => QuantFormat::Iq2Xxs,
            "iq2_xs" => QuantFormat::Iq2Xs,
            "iq2_s" => QuantFormat::Iq2S,
            "iq1_s" => QuantFormat::Iq1S,
            "iq1_m" => QuantFormat::Iq1M,
            "tq1_0" => QuantFormat::Tq1_0,
            "tq2_0" => QuantFormat::Tq2_0,
            "mxfp4" => QuantFormat::Mxfp4,
            "q1_0" => QuantFormat::Q1_0,
            "nvfp4" => QuantFormat::Nvfp4,
            "f16" => QuantFormat::F16,
            "bf16" => QuantFormat::BF16,
            "nf4" | "int2" | "int4" | "int8" => {
                let params = params::parse_param_block(s)?;
                let fields = FormatFields {
                    name: &name,
                    params: &params,
                    loc: &loc,
                };
                if name == "nf4" {
                    fields.only(&["block_size", "scale"])?;
                    QuantFormat::Nf4 {
                        block_size: fields.size("block_size", Some(64))?,
                        scale: fields.dtype("scale", DType::F32)?,
                    }
                } else {
                    fields.only(&["group_size", "symmetric", "axis", "scale"])?;
                    QuantFormat::Affine {
                        bits: name[3..].parse().unwrap_or(8),
                        group_size: fields.size("group_size", None)?,
                        symmetric: fields.boolean("symmetric", true)?,
                        axis: fields.size("axis", None)?,
                        scale: fields.dtype("scale", DType::F16)?,
                    }
                }
            }
            _ => {
                return syntax::error_at(
                    loc,
                    format!(
                        "unknown quantization format `{name}` (expected q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl, iq4_xs, iq3_xxs, iq3_s, iq2_xxs, iq2_xs, iq2_s, iq1_s, iq1_m, tq1_0, tq2_0, q1_0, mxfp4, nvfp4, f16, bf16, nf4, int2, int4 or int8)"
                    ),
                );
            }
        };
        if let Err(msg) = format.validate() {
            return syntax::error_at(loc, msg);
        }
        Ok(format)
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuantFormat::Nf4 { block_size, scale } => {
                write!(f, "nf4 {{block_size = {block_size}, scale = {scale}}}")
            }
            QuantFormat::Affine {
                group_size,
                symmetric,
                axis,
                scale,
                ..
            } => write!(
                f,
                "{} {{group_size = {group_size}, symmetric = {symmetric}, axis = {axis}, scale = {scale}}}",
                self.name()
            ),
            _ => f.write_str(self.name()),
        }
    }
}

/// Reads the `{...}` fields of a parameterised format with defaults and located errors.
struct FormatFields<'p> {
    name: &'p str,
    params: &'p [params::ParsedParam],
    loc: &'p Location,
}

impl FormatFields<'_> {
    fn only(&self, allowed: &[&str]) -> PResult<()> {
        for (key, _, loc) in self.params {
            if !allowed.contains(&key.as_str()) {
                return syntax::error_at(
                    loc.clone(),
                    format!(
                        "{} has no field `{key}` (fields: {})",
                        self.name,
                        allowed.join(", ")
                    ),
                );
            }
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<(&ParamValue, &Location)> {
        self.params
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, v, l)| (v, l))
    }

    fn size(&self, key: &str, default: Option<u64>) -> PResult<u64> {
        match (self.get(key), default) {
            (Some((ParamValue::Int(v), _)), _) if *v >= 0 => Ok(*v as u64),
            (Some((v, loc)), _) => syntax::error_at(
                loc.clone(),
                format!(
                    "{} field `{key}` expects a non-negative integer, found `{v}`",
                    self.name
                ),
            ),
            (None, Some(d)) => Ok(d),
            (None, None) => syntax::error_at(
                self.loc.clone(),
                format!("{} needs the field `{key}`", self.name),
            ),
        }
    }

    fn boolean(&self, key: &str, default: bool) -> PResult<bool> {
        match self.get(key) {
            Some((ParamValue::Bool(b), _)) => Ok(*b),
            Some((v, loc)) => syntax::error_at(
                loc.clone(),
                format!(
                    "{} field `{key}` expects true or false, found `{v}`",
                    self.name
                ),
            ),
            None => Ok(default),
        }
    }

    fn dtype(&self, key: &str, default: DType) -> PResult<DType> {
        match self.get(key) {
            Some((ParamValue::Word(w), loc)) => match DType::from_name(w) {
                Some(d) => Ok(d),
                None => syntax::error_at(loc.clone(), format!("unknown element type `{w}`")),
            },
            Some((v, loc)) => syntax::error_at(
                loc.clone(),
                format!(
                    "{} field `{key}` expects an element type, found `{v}`",
                    self.name
                ),
            ),
            None => Ok(default),
        }
    }
}

/// A tensor of logical shape `shape` stored in quantization format `format`:
/// `llm.quantized_tensor <4096x4096, q4_k>`.
#[pliron_type(name = "llm.quantized_tensor")]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuantizedTensorType {
    shape: Vec<Dim>,
    format: QuantFormat,
}

impl QuantizedTensorType {
    /// Gets (creating if needed) the uniqued type. Call [`QuantizedTensorType::validate`] or
    /// verify the IR to check it.
    pub fn get(ctx: &Context, shape: Vec<Dim>, format: QuantFormat) -> TypedHandle<Self> {
        Type::instantiate(QuantizedTensorType { shape, format }, ctx)
    }

    /// The logical shape.
    pub fn shape(&self) -> &[Dim] {
        &self.shape
    }

    /// The storage format.
    pub fn format(&self) -> &QuantFormat {
        &self.format
    }

    /// Checks the format and that the shape is divisible into its blocks.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.format.validate()?;
        self.format.validate_shape(&self.shape)
    }
}

impl Verify for QuantizedTensorType {
    fn verify(&self, _: &Context) -> Result<()> {
        self.validate()
            .map_err(|msg| verify_error_noloc!("llm.quantized_tensor: {msg}"))
    }
}

impl Printable for QuantizedTensorType {
    fn fmt(
        &self,
        _: &Context,
        _: &printable::State,
        f: &mut core::fmt::Formatter<'_>,
    ) -> core::fmt::Result {
        write!(f, "<{}, {}>", syntax::print_dims(&self.shape), self.format)
    }
}

impl Parsable for QuantizedTensorType {
    type Arg = ();
    type Parsed = TypedHandle<Self>;

    fn parse<'a>(s: &mut StateStream<'a>, _: ()) -> ParseResult<'a, Self::Parsed> {
        let parsed = (|| {
            syntax::expect(s, '<', "to open a quantized tensor type")?;
            syntax::skip_ws(s);
            let loc = s.loc();
            let (shape, _) = syntax::shape(s, false)?;
            syntax::expect(s, ',', "after the shape of a quantized tensor")?;
            let format = QuantFormat::parse_text(s)?;
            syntax::expect(s, '>', "to close a quantized tensor type")?;
            let ty = QuantizedTensorType { shape, format };
            if let Err(msg) = ty.validate() {
                return syntax::error_at(loc, format!("llm.quantized_tensor: {msg}"));
            }
            Ok(ty)
        })();
        match parsed {
            Ok(ty) => Ok(Type::instantiate(ty, s.state.ctx)).into_parse_result(),
            Err(e) => Err(e),
        }
    }
}
