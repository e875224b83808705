//! WGSL generation: each kernel family of [`crate::kernel`] as compute shaders.
//!
//! A [`Shader`] is one compute pipeline. [`shaders_for`] maps a [`Kernel`] to the shaders
//! that run it (a paged attention that appends runs a KV-append shader first; a reshape
//! runs none). Every shader has the same outline: binding 0 is a uniform block of
//! [`PARAM_WORDS`] `u32` run-time parameters (row counts, offsets), bindings 1.. are
//! storage buffers in the order [`Shader::bindings`] names them, workgroups are
//! [`WORKGROUP`] invocations, and the workgroup grid is folded into two dimensions
//! (`wid.x + wid.y * nwg.x`) so that no dimension exceeds the device's limit. Static
//! shapes are `const`s; floats are baked in by their bits, so a shader computes exactly
//! what its kernel says.

use std::fmt::Write as _;

use llm_ir::{
    dtype::DType,
    interp::{
        eval::{
            attention::{Scale, Scoring},
            fused::{ScalarBody, ScalarStep},
        },
        fp4::{FP4_LEVELS, NVFP4_CODES_AT},
        iq1::{IQ1_M_HIGH_AT, IQ1_M_SCALES_AT, IQ1_S_WORDS_AT},
        iq2::{IQ2_S_HIGH_AT, IQ2_S_SCALES_AT, IQ2_S_SIGNS_AT, IQ2_XS_SCALES_AT, IQ2_XXS_WORDS_AT},
        iq3::{IQ3_S_HIGH_AT, IQ3_S_SCALES_AT, IQ3_S_SIGNS_AT, IQ3_XXS_WORDS_AT},
        ternary::{POW3, TQ1_0_D_AT, TQ1_0_SECTIONS, TQ2_0_D_AT},
    },
    types::{
        IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, IQ4_NL_LEVELS,
        Reduction,
    },
};

use super::ieee::{CORRECTLY_ROUNDED, EXACT};
use crate::cpu::emit::{ERF_POLY, ERF_SMALL, ERF_TAIL, TANH_POLY, TANH_SMALL};
use crate::kernel::{
    AttentionSource, Contraction, Kernel, KvRounding, MeshMove, Movement, WeightFormat,
    sinks_suffix,
};
use llm_ir::interp::{KvBlocks, KvElement};

/// Invocations per workgroup, in every shader.
pub const WORKGROUP: u32 = 64;

/// `u32` words of a shader's parameter block (but a strided body's, which has
/// [`STRIDED_RANK`] dims and as many strides for each of [`STRIDED_ARGS`] operands: the
/// 64 words every dispatch's block has).
pub const PARAM_WORDS: usize = 16;

/// Dims a [`Shader::Strided`] body walks (after dims of 1 are dropped and dims that step
/// alike merged).
pub const STRIDED_RANK: usize = 8;

/// Outputs of a contraction computed by one workgroup (they share the loads of `x`).
pub const CONTRACTION_ROWS: u32 = 4;

/// Operands a [`Shader::Strided`] body may have (with its result, the 8 storage buffers
/// WebGPU allows a stage).
pub const STRIDED_ARGS: usize = 7;

/// Rows and outputs of a [`Shader::TiledContraction`] tile.
pub const TILE: u32 = 16;

/// Columns of x and of the weight staged per step of a tiled contraction.
const TILE_K: u32 = 32;

/// One compute shader.
#[derive(Debug, Clone, PartialEq)]
pub enum Shader {
    /// `y[m, j] = dot(norm(x[m]), w[j])` for the rows of one weight part, optionally plus a
    /// residual; weights are `f32` rows or q8_0/q4_0 blocks dequantized in the kernel.
    Contraction(Contraction),
    /// The same product as a tiled matrix-matrix shader: a workgroup computes a
    /// [`TILE`] x [`TILE`] block of outputs (16 rows of x against 16 weight rows), staging
    /// tiles of x and of the weight in workgroup memory, so that each weight value is read
    /// once per 16 rows instead of once per row. For prompts; each output is still a sum
    /// over K in one fixed order, whatever the other rows are.
    TiledContraction(Contraction),
    /// The contraction `c` of one expert for each slot of `llm.expert_matmul`, over one
    /// part of the stacked weight (whole experts, `first_expert..first_expert +
    /// part_experts`): slot `m` (a token's `s`-th choice), where the part holds its
    /// expert, reads the expert's rows of the part, and x's row `m` (`per_slot`) or its
    /// token's, `m / slots`. An id outside the experts is the step's fault.
    ExpertContraction {
        /// One expert's contraction.
        c: Contraction,
        /// x has a row per slot.
        per_slot: bool,
    },
    /// The `k` largest of each row of `n` values, largest first, and their indices
    /// (`llm.topk`): one invocation per row, the reference's scan.
    TopK {
        /// Row length.
        n: usize,
        /// Values kept.
        k: usize,
    },
    /// Quantizes rows into a block format (q8_0, q4_0, q4_1, and the K-quants q4_k, q6_k,
    /// q2_k with ggml's scale searches), byte for byte as the reference does: one
    /// invocation per unit of whole blocks that ends on a 4-byte boundary
    /// ([`blocks_per_invocation`]), so no two invocations write one word.
    Quantize {
        /// The format.
        format: WeightFormat,
    },
    /// The first pass of quantizing a `[rows, k]` matrix into nf4 or an affine format: one
    /// invocation per scale group (an nf4 block, an affine group along either dim) writes
    /// the group's scale, rounded to the scale type, and its zero point as two floats of a
    /// scratch buffer.
    GroupScales(GroupQuantize),
    /// The second pass: one invocation per output word assembles its four bytes (codes
    /// packed low bits first, then the scales' bytes, then the zero points), so no two
    /// invocations write one word.
    GroupCodes(GroupQuantize),
    /// A cast between element types held in 32 bits.
    Cast {
        /// The operand's element type.
        from: DType,
        /// The result's element type.
        to: DType,
    },
    /// A scalar body over operands broadcast numpy-style to a result of at most
    /// [`STRIDED_RANK`] simplified dims (at most [`STRIDED_ARGS`] operands): the result's
    /// dims and each operand's strides (0 along its broadcast dims) come as parameters.
    Strided(ScalarBody),
    /// A general matmul, one invocation per output summing over K in order; all dims
    /// are run-time parameters.
    BatchedMatmul {
        /// The rhs is `[.., n, k]`.
        transposed: bool,
    },
    /// A scalar body over operands of the result's shape or broadcast along its leading
    /// dims (operand `a` of `n{a}` elements is read at `i % n{a}`).
    Elementwise(ScalarBody),
    /// RMS norm of rows of `d`.
    RmsNorm {
        /// Row length.
        d: usize,
        /// `epsilon`'s bits.
        eps_bits: u32,
    },
    /// Layer norm of rows of `d`.
    LayerNorm {
        /// Row length.
        d: usize,
        /// `epsilon`'s bits.
        eps_bits: u32,
    },
    /// Softmax of rows of `n`, consecutive values `inner` apart.
    Softmax {
        /// Row length.
        n: usize,
        /// Distance between a row's consecutive values.
        inner: usize,
    },
    /// First maximum of rows of `n`, consecutive values `inner` apart, as `i32`.
    Argmax {
        /// Row length.
        n: usize,
        /// Distance between a row's consecutive values.
        inner: usize,
    },
    /// Every value of a packed tensor as `f32`, one row part at a time (the format's
    /// `weight_at`; `n` is the tensor's row count).
    Dequantize(Contraction),
    /// A strided copy of 4-byte elements: output dims (rank 4, padded), the matching
    /// input strides and the input's first element come as parameters, so one shader
    /// serves every transpose and every box a mesh device takes of a value.
    Permute,
    /// Places rows of `x` at a column offset of wider rows of `y` (one operand of a
    /// concatenation; 4-byte elements).
    Place,
    /// Two mesh devices' f32 partial values combined element by element, as
    /// [`Kernel::Fold`] says: a sum, or a maximum or minimum in which a NaN loses to a
    /// number and equal values give the first operand.
    Fold(Reduction),
    /// Checks that two mesh devices' shards hold the same bits (an `unshard`): a
    /// difference is a fault of the step.
    Agree,
    /// Rotary embedding with per-token cosine and sine tables.
    Rope {
        /// Heads per token.
        heads: usize,
        /// Head size.
        d: usize,
        /// Rotated values per head.
        rotary: usize,
        /// Pairs `(i, i + rotary / 2)` instead of `(2i, 2i + 1)`.
        half: bool,
    },
    /// One workgroup per query row and head: an online softmax over blocks of
    /// [`WORKGROUP`] key positions.
    Attention {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
        /// Head size.
        d: usize,
        /// How dot products become scores (scaling, soft-cap).
        scoring: Scoring,
        /// Keys and values come from a paged cache layer holding these elements, through
        /// block tables (else from contiguous `f32` `[batch, tokens, kv_heads, d]`
        /// tensors).
        paged: Option<KvElement>,
        /// A `[tq, tk]` bias (`mask`) is added to the (scaled, soft-capped) scores
        /// (contiguous only).
        masked: bool,
        /// Split along the context: each workgroup covers one chunk of a row's visible
        /// positions and writes its partial softmax state (maximum, sum, unnormalised
        /// output) for [`Shader::AttentionCombine`].
        split: bool,
        /// Each head's softmax starts from its attention sink (`sinks`, one a head: the
        /// running maximum the sink, the sum 1); a split attention's first chunk does, so
        /// a row of one chunk gets what the unsplit shader computes.
        sinks: bool,
    },
    /// Merges the partial states of a split attention, one workgroup per query row and
    /// head.
    AttentionCombine {
        /// Query heads.
        heads: usize,
        /// Head size.
        d: usize,
    },
    /// Writes the new key and value rows of each token into its cache slot, each value
    /// rounded to the cache's storage and held as [`KvRounding::element`] says: the
    /// bits of an f16 or bf16 in its half of a word, a block format's padded block (one
    /// per invocation), or an `f32` (through an nf4 or affine group and back, one group
    /// per invocation).
    KvAppend {
        /// Floats per slot (`kv_heads * head_dim`).
        row: usize,
        /// How the cache's storage rounds.
        rounding: KvRounding,
    },
    /// A sequence's key and value rows gathered from a cache layer through its block
    /// table (`llm.lookup_kv`), as `f32`.
    KvGather {
        /// Values per slot.
        row: usize,
        /// How the pool holds them.
        element: KvElement,
    },
    /// Rows of a table part selected by `i32` ids (an embedding).
    Gather {
        /// The row length.
        dim: usize,
        /// Rows in the table.
        vocab: usize,
        /// The table's storage: `f32`, `f16` (when it is also an f16 contraction weight),
        /// or a quantized format dequantized row by row.
        table: WeightFormat,
    },
    /// Columns `offset..offset + len` of rows of `width`.
    Columns {
        /// Row length of the input.
        width: usize,
        /// First column taken.
        offset: usize,
        /// Columns taken.
        len: usize,
    },
}

/// How a shader reads or writes a storage binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// The shaders that run `kernel` on the GPU, in dispatch order.
///
/// # Panics
///
/// For a kernel [`super::supports`] refuses that has no shaders: an append to a quantized
/// KV cache.
pub fn shaders_for(kernel: &Kernel) -> Vec<Shader> {
    match kernel {
        // Each device's product is a contraction (the local one).
        Kernel::ShardedLinear { local, .. } => shaders_for(&Kernel::Contraction(*local)),
        Kernel::AllReduce { reduction, .. } => vec![Shader::Fold(*reduction)],
        // The fold, then each device's box of the result.
        Kernel::ReduceScatter { reduction, .. } => vec![Shader::Fold(*reduction), Shader::Permute],
        Kernel::Fold(reduction) => vec![Shader::Fold(*reduction)],
        Kernel::TopK { n, k, .. } => vec![Shader::TopK { n: *n, k: *k }],
        Kernel::ExpertContraction { expert, per_slot } => vec![Shader::ExpertContraction {
            c: Contraction {
                weight: row_major(expert.weight),
                ..*expert
            },
            per_slot: *per_slot,
        }],
        // A strided copy, as a shard's box.
        Kernel::Slice { .. } | Kernel::Transpose { .. } | Kernel::Mesh(MeshMove::Shard { .. }) => {
            vec![Shader::Permute]
        }
        Kernel::Mesh(MeshMove::AllGather { .. }) => vec![Shader::Place],
        // Device 0's shard; each other device's is checked against it.
        Kernel::Mesh(MeshMove::Unshard) => vec![Shader::Agree],
        Kernel::Contraction(c) => {
            let contraction = Shader::Contraction(Contraction {
                weight: row_major(c.weight),
                transpose_at_pack: false,
                q8_0_input: false,
                block_panels: false,
                ..*c
            });
            if !c.q8_0_input {
                return vec![contraction];
            }
            // Quantized activations are dequantized first (the contraction's meaning), by
            // a shader of any number of rows.
            let rows_of_x = Contraction {
                n: 0,
                weight: WeightFormat::Q8_0,
                norm_eps_bits: None,
                residual: false,
                ..*c
            };
            vec![contraction, Shader::Dequantize(rows_of_x)]
        }
        Kernel::Elementwise(body) => vec![Shader::Elementwise(body.clone())],
        // Broadcasts along leading dims take the plain shader, others the strided one.
        Kernel::Broadcast(body) if body.args <= STRIDED_ARGS => vec![
            Shader::Elementwise(body.clone()),
            Shader::Strided(body.clone()),
        ],
        Kernel::Broadcast(body) => vec![Shader::Elementwise(body.clone())],
        Kernel::RmsNorm { d, eps_bits } => vec![Shader::RmsNorm {
            d: *d,
            eps_bits: *eps_bits,
        }],
        Kernel::LayerNorm { d, eps_bits } => vec![Shader::LayerNorm {
            d: *d,
            eps_bits: *eps_bits,
        }],
        Kernel::Softmax { n, inner } => vec![Shader::Softmax {
            n: *n,
            inner: *inner,
        }],
        Kernel::Argmax { n, inner, .. } => vec![Shader::Argmax {
            n: *n,
            inner: *inner,
        }],
        Kernel::Dequantize { weight, rows, k } => {
            vec![Shader::Dequantize(Contraction::plain(*k, *rows, *weight))]
        }
        Kernel::Move(Movement::Concat { .. }) => vec![Shader::Place],
        Kernel::Rope {
            heads,
            d,
            rotary,
            half,
            ..
        } => vec![Shader::Rope {
            heads: *heads,
            d: *d,
            rotary: *rotary,
            half: *half,
        }],
        Kernel::Attention {
            heads,
            kv_heads,
            d,
            scoring,
            source,
            sinks,
        } => {
            let attend = |split: bool| Shader::Attention {
                heads: *heads,
                kv_heads: *kv_heads,
                d: *d,
                scoring: *scoring,
                paged: matches!(source, AttentionSource::Paged { .. }).then(|| source.element()),
                masked: matches!(source, AttentionSource::Contiguous { masked: true, .. }),
                split,
                sinks: *sinks,
            };
            // The whole context in one workgroup, or split in chunks and merged.
            let mut shaders = vec![
                attend(false),
                attend(true),
                Shader::AttentionCombine {
                    heads: *heads,
                    d: *d,
                },
            ];
            if let AttentionSource::Paged {
                append: true,
                rounding,
                ..
            } = source
            {
                shaders.insert(
                    0,
                    Shader::KvAppend {
                        row: kv_heads * d,
                        rounding: *rounding,
                    },
                );
            }
            shaders
        }
        Kernel::Quantize {
            format,
            rows: Some(rows),
            k,
        } if matches!(
            format,
            WeightFormat::Nf4 { .. } | WeightFormat::Affine { .. }
        ) =>
        {
            let g = GroupQuantize {
                format: *format,
                rows: *rows,
                k: *k,
            };
            vec![Shader::GroupScales(g), Shader::GroupCodes(g)]
        }
        Kernel::Quantize { format, .. } => vec![Shader::Quantize { format: *format }],
        Kernel::Cast { from, to } => vec![Shader::Cast {
            from: *from,
            to: *to,
        }],
        Kernel::BatchedMatmul { transposed } => vec![Shader::BatchedMatmul {
            transposed: *transposed,
        }],
        Kernel::KvAppend { row, rounding, .. } => vec![Shader::KvAppend {
            row: *row,
            rounding: *rounding,
        }],
        Kernel::KvLookup { row, rounding, .. } => vec![Shader::KvGather {
            row: *row,
            element: rounding.element(),
        }],
        Kernel::Move(Movement::Reshape) => Vec::new(),
        Kernel::Move(Movement::Columns { width, offset, len }) => vec![Shader::Columns {
            width: *width,
            offset: *offset,
            len: *len,
        }],
        Kernel::Move(Movement::Rows {
            dim, vocab, table, ..
        }) => vec![Shader::Gather {
            dim: *dim,
            vocab: *vocab,
            table: *table,
        }],
    }
}

/// How the GPU reads a weight of `format`: f32 weights row major (a `[k, n]` one is
/// transposed at upload), the others as stored.
fn row_major(format: WeightFormat) -> WeightFormat {
    match format {
        WeightFormat::F32 | WeightFormat::F32Panels | WeightFormat::F32KN => WeightFormat::F32,
        other => other,
    }
}

impl Shader {
    /// A name that identifies the shader's code (shapes included).
    pub fn name(&self) -> String {
        match self {
            Shader::Contraction(c) => Kernel::Contraction(*c).name(),
            Shader::ExpertContraction { c, per_slot } => Kernel::ExpertContraction {
                expert: *c,
                per_slot: *per_slot,
            }
            .name(),
            Shader::TopK { n, k } => Kernel::TopK {
                n: *n,
                k: *k,
                index: DType::I32,
            }
            .name(),
            Shader::TiledContraction(c) => format!("tiled_{}", Kernel::Contraction(*c).name()),
            Shader::Elementwise(body) => Kernel::Elementwise(body.clone()).name(),
            Shader::Strided(body) => Kernel::Broadcast(body.clone()).name(),
            Shader::RmsNorm { d, .. } => format!("rms_norm_{d}"),
            Shader::LayerNorm { d, .. } => format!("layer_norm_{d}"),
            Shader::Softmax { n, inner } => Kernel::Softmax {
                n: *n,
                inner: *inner,
            }
            .name(),
            Shader::Argmax { n, inner } => Kernel::Argmax {
                n: *n,
                inner: *inner,
                index: DType::I32,
            }
            .name(),
            Shader::Dequantize(c) => format!("dequantize_{}_{}x{}", c.weight.name(), c.n, c.k),
            Shader::Permute => "permute".into(),
            Shader::Place => "place".into(),
            Shader::Fold(reduction) => Kernel::Fold(*reduction).name(),
            Shader::Agree => "agree".into(),
            Shader::Rope {
                heads, d, rotary, ..
            } => format!("rope_{heads}x{d}_{rotary}"),
            Shader::Attention {
                heads,
                kv_heads,
                d,
                paged,
                masked,
                split,
                sinks,
                ..
            } => format!(
                "{}attention_{heads}x{d}_kv{kv_heads}{}{}{}",
                match paged {
                    None => String::new(),
                    Some(KvElement::F32) => "paged_".into(),
                    Some(element) => format!("paged_{}_", element.name()),
                },
                if *masked { "_masked" } else { "" },
                if *split { "_split" } else { "" },
                sinks_suffix(*sinks)
            ),
            Shader::AttentionCombine { heads, d } => format!("attention_combine_{heads}x{d}"),
            Shader::Quantize { format } => format!("quantize_{}", format.name()),
            Shader::GroupScales(g) => format!("quantize_scales_{}", g.name()),
            Shader::GroupCodes(g) => format!("quantize_codes_{}", g.name()),
            Shader::Cast { from, to } => Kernel::Cast {
                from: *from,
                to: *to,
            }
            .name(),
            Shader::BatchedMatmul { transposed } => Kernel::BatchedMatmul {
                transposed: *transposed,
            }
            .name(),
            Shader::KvAppend { row, rounding } => {
                let storage = match rounding {
                    KvRounding::Exact => "f32".to_string(),
                    KvRounding::Float(dtype) => dtype.name().to_string(),
                    KvRounding::Quantized(format) => format
                        .and_then(WeightFormat::quant_format)
                        .map_or_else(|| "quantized".to_string(), |q| q.name().to_string()),
                };
                format!("kv_append_{row}_{storage}")
            }
            Shader::KvGather { row, element } => {
                format!("kv_gather_{row}_{}", element.name())
            }
            Shader::Gather { dim, table, .. } => match table {
                WeightFormat::F32 => format!("gather_{dim}"),
                other => format!("gather_{}_{dim}", other.name()),
            },
            Shader::Columns { width, offset, len } => format!("columns_{width}_{offset}_{len}"),
        }
    }

    /// The storage bindings (1, 2, ...) in order: what each holds and how it is accessed.
    pub fn bindings(&self) -> Vec<(&'static str, Access)> {
        use Access::{Read, ReadWrite};
        match self {
            Shader::Contraction(c) | Shader::TiledContraction(c) => {
                let mut b = vec![("x", Read), ("w", Read), ("y", ReadWrite)];
                if c.norm_eps_bits.is_some() {
                    b.push(("g", Read));
                }
                if c.residual {
                    b.push(("res", Read));
                }
                b
            }
            Shader::ExpertContraction { .. } => vec![
                ("x", Read),
                ("w", Read),
                ("y", ReadWrite),
                ("ids", Read),
                ("fault", ReadWrite),
            ],
            Shader::TopK { .. } => vec![("x", Read), ("y", ReadWrite), ("ids", ReadWrite)],
            Shader::Elementwise(body) | Shader::Strided(body) => {
                const ARGS: [&str; 8] = ["a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"];
                let mut b: Vec<_> = ARGS.iter().take(body.args).map(|a| (*a, Read)).collect();
                b.push(("y", ReadWrite));
                b
            }
            Shader::RmsNorm { .. } => vec![("x", Read), ("g", Read), ("y", ReadWrite)],
            Shader::LayerNorm { .. } => {
                vec![("x", Read), ("g", Read), ("b", Read), ("y", ReadWrite)]
            }
            Shader::Softmax { .. } | Shader::Argmax { .. } | Shader::Permute | Shader::Place => {
                vec![("x", Read), ("y", ReadWrite)]
            }
            Shader::Dequantize(_) => vec![("w", Read), ("y", ReadWrite)],
            Shader::Fold(_) => vec![("a", Read), ("b", Read), ("y", ReadWrite)],
            Shader::Agree => vec![("a", Read), ("b", Read), ("fault", ReadWrite)],
            Shader::Rope { .. } => vec![
                ("x", Read),
                ("cos_t", Read),
                ("sin_t", Read),
                ("y", ReadWrite),
            ],
            Shader::Attention {
                paged,
                masked,
                split,
                sinks,
                ..
            } => {
                let mut b = vec![("q", Read), ("kc", Read), ("vc", Read)];
                if paged.is_some() {
                    b.extend([("tables", Read), ("lens", Read)]);
                }
                if *masked {
                    b.push(("mask", Read));
                }
                if *sinks {
                    b.push(("sinks", Read));
                }
                b.push((if *split { "parts" } else { "y" }, ReadWrite));
                b
            }
            Shader::AttentionCombine { .. } => vec![("parts", Read), ("y", ReadWrite)],
            Shader::KvAppend { .. } => vec![
                ("kn", Read),
                ("vn", Read),
                ("slots", Read),
                ("kc", ReadWrite),
                ("vc", ReadWrite),
            ],
            Shader::BatchedMatmul { .. } => vec![("x", Read), ("w", Read), ("y", ReadWrite)],
            // A float cast to i64 reports values beyond 32 bits in `fault`.
            Shader::Cast { from, to } if from.is_float() && *to == DType::I64 => {
                vec![("x", Read), ("y", ReadWrite), ("fault", ReadWrite)]
            }
            Shader::Cast { .. } => vec![("x", Read), ("y", ReadWrite)],
            Shader::Quantize { .. } => vec![("x", Read), ("q", ReadWrite)],
            Shader::GroupScales(_) => vec![("x", Read), ("s", ReadWrite)],
            Shader::GroupCodes(_) => vec![("x", Read), ("s", Read), ("q", ReadWrite)],
            Shader::KvGather { .. } => vec![
                ("kc", Read),
                ("vc", Read),
                ("tables", Read),
                ("ko", ReadWrite),
                ("vo", ReadWrite),
            ],
            Shader::Gather { .. } => vec![("table", Read), ("ids", Read), ("y", ReadWrite)],
            Shader::Columns { .. } => vec![("x", Read), ("y", ReadWrite)],
        }
    }

    /// How the KV pool the shader binds as `kc` and `vc` holds its values (none for a
    /// shader without a pool).
    fn pool_element(&self) -> Option<KvElement> {
        match self {
            Shader::Attention { paged, .. } => *paged,
            Shader::KvAppend { rounding, .. } => Some(rounding.element()),
            Shader::KvGather { element, .. } => Some(*element),
            _ => None,
        }
    }

    /// Bytes of workgroup memory the shader declares.
    pub fn workgroup_bytes(&self) -> usize {
        let w = WORKGROUP as usize * 4;
        match self {
            Shader::Contraction(_) => CONTRACTION_ROWS as usize * w,
            // And the slot's expert.
            Shader::ExpertContraction { .. } => CONTRACTION_ROWS as usize * w + 4,
            // Tiles of x and w, the norm's squares and row scales.
            Shader::TiledContraction(_) => (2 * TILE * TILE_K) as usize * 4 + w + 4 * TILE as usize,
            Shader::RmsNorm { .. } | Shader::LayerNorm { .. } | Shader::Softmax { .. } => w,
            Shader::Argmax { .. } => 2 * w,
            // Scores, key offsets, the query, the reduction and the visible range.
            Shader::Attention { d, .. } => 3 * w + 4 * d + 8,
            _ => 0,
        }
    }

    /// Whether the shader reads `f16` storage (it then needs the `shader-f16` feature).
    pub fn uses_f16(&self) -> bool {
        match self {
            Shader::Contraction(c) | Shader::TiledContraction(c) => c.weight == WeightFormat::F16,
            Shader::Gather { table, .. } => *table == WeightFormat::F16,
            _ => false,
        }
    }

    /// The WGSL source for a device with subgroup operations (when `subgroups`): the
    /// workgroup reductions then reduce within each subgroup first. Shaders without
    /// reductions are the same either way.
    pub fn source_for(&self, subgroups: bool) -> String {
        let source = self.source();
        if subgroups && source.contains(REDUCE) {
            source
                .replace(REDUCE, REDUCE_SUBGROUPS)
                .replace(ENTRY, ENTRY_SUBGROUPS)
        } else {
            source
        }
    }

    /// The portable WGSL source (no subgroup operations).
    pub fn source(&self) -> String {
        let mut s = String::new();
        if self.uses_f16() {
            s.push_str("enable f16;\n");
        }
        let _ = writeln!(s, "// {}", self.name());
        s.push_str(&self.param_block());
        for (i, (name, access)) in self.bindings().into_iter().enumerate() {
            let access = match access {
                Access::Read => "read",
                Access::ReadWrite => "read_write",
            };
            let elem = match (self, name) {
                (Shader::Contraction(c) | Shader::TiledContraction(c), "w")
                    if c.weight == WeightFormat::F16 =>
                {
                    "f16"
                }
                (Shader::Gather { table, .. }, "table") if *table == WeightFormat::F16 => "f16",
                (Shader::Gather { table, .. }, "table") if *table != WeightFormat::F32 => "u32",
                (
                    Shader::Contraction(c)
                    | Shader::TiledContraction(c)
                    | Shader::ExpertContraction { c, .. },
                    "w",
                ) if c.weight != WeightFormat::F32 => "u32",
                (_, "tables" | "lens" | "slots" | "ids") | (Shader::Argmax { .. }, "y") => "i32",
                (Shader::KvAppend { .. }, "kc" | "vc")
                    if matches!(self.pool_element(), Some(KvElement::F16 | KvElement::BF16)) =>
                {
                    "atomic<u32>"
                }
                (_, "kc" | "vc") if self.pool_element().is_some_and(|e| e != KvElement::F32) => {
                    "u32"
                }
                (_, "fault") => "atomic<u32>",
                (Shader::Cast { from, .. }, "x") if !from.is_float() => "i32",
                (Shader::Quantize { .. } | Shader::GroupCodes(_), "q") => "u32",
                (Shader::Cast { to, .. }, "y") if !to.is_float() => "i32",
                // Data movement copies 4-byte elements whatever they hold.
                (Shader::Permute | Shader::Place | Shader::Agree, _)
                | (Shader::Dequantize(_), "w") => "u32",
                _ => "f32",
            };
            let _ = writeln!(
                s,
                "@group(0) @binding({}) var<storage, {access}> {name}: array<{elem}>;",
                i + 1
            );
        }
        let _ = writeln!(s, "const WG: u32 = {WORKGROUP}u;");
        let body = self.body();
        if body.contains("llmc_tanh(") {
            s.push_str(&tanh_helper());
        }
        if body.contains("llmc_erf(") {
            s.push_str(&erf_helper());
        }
        s.push_str(&body);
        s
    }

    /// The uniform parameter block: [`PARAM_WORDS`] named `u32` words (a strided body's
    /// are more).
    fn param_block(&self) -> String {
        let names: &[&str] = match self {
            Shader::Contraction(_) | Shader::TiledContraction(_) => {
                &["rows", "outputs", "first", "part_rows"]
            }
            Shader::ExpertContraction { .. } => &[
                "rows",
                "outputs",
                "first",
                "part_rows",
                "slots",
                "experts",
                "step",
                "first_expert",
                "part_experts",
            ],
            Shader::TopK { .. } => &["rows"],
            Shader::Elementwise(_) => &["len", "n0", "n1", "n2", "n3", "n4", "n5", "n6"],
            Shader::Strided(_) => return strided_params(),
            Shader::RmsNorm { .. }
            | Shader::LayerNorm { .. }
            | Shader::Softmax { .. }
            | Shader::Argmax { .. } => &["rows"],
            Shader::Dequantize(_) => &["part_rows", "first"],
            Shader::Permute => &["d0", "d1", "d2", "d3", "s0", "s1", "s2", "s3", "first"],
            Shader::Place => &["rows", "width", "out_width", "offset"],
            Shader::Fold(_) => &["len"],
            Shader::Agree => &["len", "step"],
            Shader::Rope { .. } => &["tokens"],
            // `zero` as for a quantization: a K-quant pool's decoder keeps its products
            // apart through it.
            Shader::Attention { paged: Some(_), .. } => &[
                "rows", "tokens", "width", "window", "block", "splits", "chunk", "zero",
            ],
            Shader::Attention { paged: None, .. } => &[
                "rows", "tokens", "keys", "window", "causal", "splits", "chunk",
            ],
            Shader::AttentionCombine { .. } => &["rows", "splits"],
            Shader::BatchedMatmul { .. } => &["batch", "m", "k", "n", "rhs_batched"],
            Shader::Cast { .. } => &["len", "step"],
            // `zero` is 0: the K-quant searches keep their products apart through it.
            Shader::Quantize { .. } => &["blocks", "zero"],
            // `zero` as for a quantization (the other pass has no use for it).
            Shader::GroupScales(_) => &["groups", "zero"],
            Shader::GroupCodes(_) => &["words", "zero"],
            // `zero` as for a quantization.
            Shader::KvAppend { .. } => &["tokens", "zero"],
            // `zero` as for a paged attention.
            Shader::KvGather { .. } => &["len", "block", "zero"],
            Shader::Gather { .. } => &["count", "first", "part_rows"],
            Shader::Columns { .. } => &["rows"],
        };
        let mut s = String::from("struct Params {\n");
        for i in 0..PARAM_WORDS {
            match names.get(i) {
                Some(n) => {
                    let _ = writeln!(s, "    {n}: u32,");
                }
                None => {
                    let _ = writeln!(s, "    pad{i}: u32,");
                }
            }
        }
        s.push_str("}\n@group(0) @binding(0) var<uniform> p: Params;\n");
        s
    }

    /// Constants, helpers and the entry point.
    fn body(&self) -> String {
        match self {
            Shader::Contraction(c) => contraction(c, None),
            Shader::ExpertContraction { c, per_slot } => contraction(c, Some(*per_slot)),
            Shader::TopK { n, k } => top_k(*n, *k),
            Shader::TiledContraction(c) => tiled_contraction(c),
            Shader::Elementwise(body) => elementwise(body),
            Shader::Strided(body) => strided(body),
            Shader::RmsNorm { d, eps_bits } => rms_norm(*d, *eps_bits),
            Shader::LayerNorm { d, eps_bits } => layer_norm(*d, *eps_bits),
            Shader::Softmax { n, inner } => softmax(*n, *inner),
            Shader::Argmax { n, inner } => argmax(*n, *inner),
            Shader::Dequantize(c) => dequantize(c),
            Shader::Permute => permute(),
            Shader::Place => place(),
            Shader::Fold(reduction) => fold(*reduction),
            Shader::Agree => agree(),
            Shader::Rope {
                heads,
                d,
                rotary,
                half,
            } => rope(*heads, *d, *rotary, *half),
            Shader::Attention {
                heads,
                kv_heads,
                d,
                scoring,
                paged,
                masked,
                split,
                sinks,
            } => attention(
                [*heads, *kv_heads, *d],
                *scoring,
                (*paged, *masked),
                (*split, *sinks),
            ),
            Shader::AttentionCombine { heads, d } => attention_combine(*heads, *d),
            Shader::BatchedMatmul { transposed } => batched_matmul(*transposed),
            Shader::Cast { from, to } => cast(*from, *to),
            Shader::Quantize { format } => quantize(*format),
            Shader::GroupScales(g) => g.scales(),
            Shader::GroupCodes(g) => g.codes(),
            Shader::KvAppend { row, rounding } => kv_append(*row, *rounding),
            Shader::KvGather { row, element } => kv_gather(*row, *element),
            Shader::Gather { dim, vocab, table } => gather(*dim, *vocab, *table),
            Shader::Columns { width, offset, len } => columns(*width, *offset, *len),
        }
    }
}

/// An `f32` literal with exactly the bits of `v`.
fn float(v: f32) -> String {
    if v.is_finite() && v == v.trunc() && v.abs() < 1e7 {
        format!("{v:.1}")
    } else {
        format!("bitcast<f32>({:#010x}u)", v.to_bits())
    }
}

/// The entry point's signature, with `gi` the folded workgroup index and `t` the
/// invocation's index in its workgroup.
const ENTRY: &str = "@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32) {
    let gi = wid.x + wid.y * nwg.x;
";

/// The entry point with the subgroup builtins, which it keeps in private variables for
/// [`REDUCE_SUBGROUPS`].
const ENTRY_SUBGROUPS: &str = "@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) t: u32, @builtin(subgroup_id) sg: u32,
        @builtin(num_subgroups) nsg: u32, @builtin(subgroup_invocation_id) sgi: u32) {
    subgroup = sg;
    subgroups = nsg;
    lane = sgi;
    let gi = wid.x + wid.y * nwg.x;
";

/// [`REDUCE`] with subgroup operations: each subgroup reduces in registers, one value per
/// subgroup meets in workgroup memory (two barriers instead of seven).
const REDUCE_SUBGROUPS: &str = "var<workgroup> red: array<f32, 64>;
var<private> subgroup: u32;
var<private> subgroups: u32;
var<private> lane: u32;
fn reduce_sum(t: u32, v: f32) -> f32 {
    let s = subgroupAdd(v);
    if (lane == 0u) { red[subgroup] = s; }
    workgroupBarrier();
    var r = 0.0;
    for (var i = 0u; i < subgroups; i = i + 1u) { r = r + red[i]; }
    workgroupBarrier();
    return r;
}
fn reduce_max(t: u32, v: f32) -> f32 {
    let s = subgroupMax(v);
    if (lane == 0u) { red[subgroup] = s; }
    workgroupBarrier();
    var r = red[0];
    for (var i = 1u; i < subgroups; i = i + 1u) { r = max(r, red[i]); }
    workgroupBarrier();
    return r;
}
";

/// Workgroup sum and maximum over the [`WORKGROUP`] invocations (called in uniform
/// control flow; every invocation gets the result).
const REDUCE: &str = "var<workgroup> red: array<f32, 64>;
fn reduce_sum(t: u32, v: f32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s) { red[t] = red[t] + red[t + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}
fn reduce_max(t: u32, v: f32) -> f32 {
    red[t] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s) { red[t] = max(red[t], red[t + s]); }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}
";

/// The most negative finite `f32`: the running maximum before any score (WGSL leaves
/// infinities to the implementation).
const LOWEST: &str = "-3.4028235e38";

/// A contraction's shader ([`Shader::Contraction`]), or with `experts` (whether x has a
/// row per slot) an expert contraction's ([`Shader::ExpertContraction`]): the same
/// loops, over the weight rows and the x row the slot's expert and token give.
fn contraction(c: &Contraction, experts: Option<bool>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "const K: u32 = {}u;", c.k);
    let _ = writeln!(s, "const R: u32 = {CONTRACTION_ROWS}u;");
    s.push_str("var<workgroup> part: array<f32, 256>;\n");
    if experts.is_some() {
        s.push_str("var<workgroup> slot_expert: u32;\nconst NOT_HERE: u32 = 0xffffffffu;\n");
    }
    if c.norm_eps_bits.is_some() {
        s.push_str(REDUCE);
    }
    // q8_0 and q4_0 run a block at a time; the other formats element by element.
    let per_element = !matches!(c.weight, WeightFormat::Q8_0 | WeightFormat::Q4_0);
    s.push_str(&weight_prelude(c, "w", per_element));
    s.push_str(ENTRY);
    s.push_str(
        "    let blocks = (p.part_rows + R - 1u) / R;
    if (gi >= blocks * p.rows) { return; }
    let m = gi / blocks;
    let j0 = (gi % blocks) * R;
",
    );
    match experts {
        // The slot's expert among this weight part's (an id out of range faults), shared
        // through workgroup memory so that a workgroup whose expert another part holds
        // leaves in uniform control flow; its first weight row, and x's row.
        Some(per_slot) => {
            let x_row = if per_slot { "m" } else { "(m / p.slots)" };
            let _ = write!(
                s,
                "    if (t == 0u) {{
        let id = ids[m];
        let bad = id < 0 || u32(id) >= p.experts;
        if (bad && j0 == 0u) {{ atomicMin(&fault[0], p.step); }}
        let here = !bad && u32(id) >= p.first_expert && u32(id) - p.first_expert < p.part_experts;
        slot_expert = select(NOT_HERE, u32(id) - p.first_expert, here);
    }}
    let expert = workgroupUniformLoad(&slot_expert);
    if (expert == NOT_HERE) {{ return; }}
    let wr = expert * p.part_rows + j0;
    let xrow = {x_row} * K;
"
            );
        }
        None => s.push_str("    let wr = j0;\n    let xrow = m * K;\n"),
    }
    match c.norm_eps_bits {
        Some(eps) => {
            let _ = write!(
                s,
                "    var ss = 0.0;
    for (var i = t; i < K; i = i + WG) {{ let v = x[xrow + i]; ss = ss + v * v; }}
    let inv = 1.0 / sqrt(reduce_sum(t, ss) / f32(K) + {});
",
                float(f32::from_bits(eps))
            );
        }
        None => s.push_str("    let inv = 1.0;\n"),
    }
    let xv = if c.norm_eps_bits.is_some() {
        "g[i] * (inv * x[xrow + i])"
    } else {
        "x[xrow + i]"
    };
    s.push_str("    var acc = vec4<f32>(0.0);\n");
    match c.weight {
        WeightFormat::Q8_0 | WeightFormat::Q4_0 => {
            let (block_bytes, quant) = if c.weight == WeightFormat::Q8_0 {
                (
                    34,
                    "f32(bitcast<i32>(byte_at(o + 2u + e) << 24u) >> 24u)".to_string(),
                )
            } else {
                (
                    18,
                    "f32(i32((byte_at(o + 2u + (e & 15u)) >> ((e >> 4u) * 4u)) & 15u) - 8)"
                        .to_string(),
                )
            };
            let _ = write!(
                s,
                "    for (var b = t; b < K / 32u; b = b + WG) {{
        for (var r = 0u; r < R; r = r + 1u) {{
            if (j0 + r >= p.part_rows) {{ break; }}
            let o = (wr + r) * ROW_BYTES + b * {block_bytes}u;
            var sum = 0.0;
            for (var e = 0u; e < 32u; e = e + 1u) {{
                let i = b * 32u + e;
                sum = sum + {quant} * {xv};
            }}
            acc[r] = acc[r] + half_at(o) * sum;
        }}
    }}
"
            );
        }
        _ => {
            let weight = match c.weight {
                WeightFormat::F32 => "w[(wr + r) * K + i]",
                WeightFormat::F16 => "f32(w[(wr + r) * K + i])",
                _ => "weight_at(wr + r, i)",
            };
            let _ = write!(
                s,
                "    for (var i = t; i < K; i = i + WG) {{
        let xi = {xv};
        for (var r = 0u; r < R; r = r + 1u) {{
            if (j0 + r < p.part_rows) {{ acc[r] = acc[r] + xi * {weight}; }}
        }}
    }}
"
            );
        }
    }
    let residual = if c.residual { " + res[at]" } else { "" };
    let _ = write!(
        s,
        "    for (var r = 0u; r < R; r = r + 1u) {{ part[r * WG + t] = acc[r]; }}
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {{
        if (t < s) {{
            for (var r = 0u; r < R; r = r + 1u) {{ part[r * WG + t] = part[r * WG + t] + part[r * WG + t + s]; }}
        }}
        workgroupBarrier();
    }}
    if (t < R && j0 + t < p.part_rows) {{
        let at = m * p.outputs + p.first + j0 + t;
        y[at] = part[t * WG]{residual};
    }}
}}
"
    );
    s
}

/// Byte and half-float access to a packed weight in binding `w` (an `array<u32>`):
/// `half_bits(o)` reads the 16 bits at an even byte `o` in one load. The f16 is decoded
/// with integer operations (WGSL's `unpack2x16float` needs a capability not every device
/// grants).
fn bytes(w: &str) -> String {
    format!(
        "{HALF_VALUE}fn byte_at(o: u32) -> u32 {{ return ({w}[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu; }}
fn half_at(o: u32) -> f32 {{ return half_value(byte_at(o) | (byte_at(o + 1u) << 8u)); }}
fn half_bits(o: u32) -> u32 {{ return ({w}[o >> 2u] >> ((o & 2u) * 8u)) & 0xffffu; }}
"
    )
}

/// The `f32` value of the f16 whose bits are `h` (integer operations only).
const HALF_VALUE: &str = "fn half_value(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let man = h & 0x3ffu;
    if (e == 0u) {
        let v = f32(man) * bitcast<f32>(0x33800000u);
        return select(v, -v, sign != 0u);
    }
    if (e == 31u) { return bitcast<f32>(sign | 0x7f800000u | (man << 13u)); }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (man << 13u));
}
";

/// `key(e)` and `value(e)`: element `e` of the bound keys `kc` and values `vc` as `f32`,
/// for a pool holding `element`s (16-bit ones two to a `u32`, the lower half first; a
/// block format's blocks decoded as the reference decodes them, [`kv_block_readers`]).
fn kv_readers(element: KvElement) -> String {
    let widen = match element {
        KvElement::F32 => {
            return "fn key(e: u32) -> f32 { return kc[e]; }\nfn value(e: u32) -> f32 { return vc[e]; }\n"
                .into();
        }
        KvElement::Blocks(blocks) => return kv_block_readers(blocks),
        KvElement::F16 => {
            format!("{HALF_VALUE}fn widen(h: u32) -> f32 {{ return half_value(h); }}\n")
        }
        KvElement::BF16 => "fn widen(h: u32) -> f32 { return bitcast<f32>(h << 16u); }\n".into(),
    };
    format!(
        "{widen}fn half_of(w: u32, e: u32) -> u32 {{ return (w >> ((e & 1u) * 16u)) & 0xffffu; }}
fn key(e: u32) -> f32 {{ return widen(half_of(kc[e >> 1u], e)); }}
fn value(e: u32) -> f32 {{ return widen(half_of(vc[e >> 1u], e)); }}
"
    )
}

/// A scale of `dtype` stored at byte `o`, as a WGSL function `scale_at`.
fn scale_reader(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "fn scale_at(o: u32) -> f32 { return half_at(o); }\n",
        DType::BF16 => {
            "fn scale_at(o: u32) -> f32 { return bitcast<f32>((byte_at(o) | (byte_at(o + 1u) << 8u)) << 16u); }\n"
        }
        _ => {
            "fn scale_at(o: u32) -> f32 {
    return bitcast<f32>(byte_at(o) | (byte_at(o + 1u) << 8u) | (byte_at(o + 2u) << 16u) | (byte_at(o + 3u) << 24u));
}
"
        }
    }
}

/// `weight_at(row, i)`: the dequantized weight at `row` (of the bound part) and column `i`,
/// for the formats without a block loop of their own (the reference's layouts, element by
/// element). Row-blocked formats address `row * ROW_BYTES`; the whole-matrix ones (nf4,
/// affine) are never split, so `p.first + row` is the matrix row.
fn weight_value(c: &Contraction) -> String {
    let body = match c.weight {
        WeightFormat::Q8_0
        | WeightFormat::Q4_0
        | WeightFormat::Q4_1
        | WeightFormat::Q5_0
        | WeightFormat::Q5_1
        | WeightFormat::Iq4Nl
        | WeightFormat::Mxfp4 => format!(
            "    let o = row * ROW_BYTES + (i / 32u) * {}u;\n    let e = i % 32u;\n{}",
            c.weight.row_bytes(32),
            block_decoder(c.weight).unwrap_or_default()
        ),
        // q1_0: value `e` of a block of 128 is `d` or `-d` by bit `e % 8` of byte
        // `2 + e / 8`.
        WeightFormat::Q1_0 => format!(
            "    let o = row * ROW_BYTES + (i / 128u) * {}u;
    let e = i % 128u;
    let d = half_at(o);
    return select(-d, d, ((byte_at(o + 2u + e / 8u) >> (e % 8u)) & 1u) == 1u);
",
            c.weight.row_bytes(128)
        ),
        // nvfp4: value `e` of a block of 64 is nibble `(e % 16) / 8` of byte `e % 8` of its
        // sub-block's 8, under half the sub-block's UE4M3 scale `x`:
        // `(8 [exp > 0] + man) * 2^(max(exp, 1) - 11)`, or 0 for `0x7F`.
        WeightFormat::Nvfp4 => format!(
            "    let o = row * ROW_BYTES + (i / 64u) * {}u;
    let e = i % 64u;
    let s = e / 16u;
    let q = (byte_at(o + {NVFP4_CODES_AT}u + 8u * s + (e & 7u)) >> (((e >> 3u) & 1u) * 4u)) & 15u;
{}    let x = byte_at(o + s);
    let exp = (x >> 3u) & 15u;
    let significand = f32((x & 7u) + select(0u, 8u, exp > 0u));
    let half = significand * bitcast<f32>((max(exp, 1u) + 116u) << 23u);
    return select(half, 0.0, x == 0x7fu) * level;
",
            c.weight.row_bytes(64),
            nibble_level(FP4_LEVELS)
        ),
        // One 16-bit float (rows start at even bytes).
        WeightFormat::PackedF16 | WeightFormat::PackedBF16 => {
            let value = if c.weight == WeightFormat::PackedF16 {
                "half_value(h)"
            } else {
                "bitcast<f32>(h << 16u)"
            };
            format!(
                "    let o = row * ROW_BYTES + 2u * i;\n    let h = half_bits(o);\n    return {value};\n"
            )
        }
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
        | WeightFormat::Tq2_0 => format!(
            "    let o = row * ROW_BYTES + (i / 256u) * {}u;\n    let e = i % 256u;\n{}",
            c.weight.row_bytes(256),
            kquant_decoder(c.weight, false).unwrap_or_default()
        ),
        WeightFormat::Nf4 { block, scale } => format!(
            "    let at = (p.first + row) * K + i;
    let code = (byte_at(at / 2u) >> ((at & 1u) * 4u)) & 15u;
    var levels = {};
    return levels[code] * scale_at(SCALES + (at / {block}u) * {}u);
",
            nf4_levels(),
            scale.size_bytes()
        ),
        WeightFormat::Affine {
            bits,
            group,
            symmetric,
            axis,
            scale,
        } => {
            let group_of = if axis == 1 {
                format!("(p.first + row) * (K / {group}u) + i / {group}u")
            } else {
                format!("((p.first + row) / {group}u) * K + i")
            };
            let value = if symmetric {
                format!("bitcast<i32>(code << {}u) >> {}u", 32 - bits, 32 - bits)
            } else {
                "i32(code) - i32(byte_at(ZEROS + grp))".to_string()
            };
            format!(
                "    let at = (p.first + row) * K + i;
    let code = (byte_at(at * {bits}u / 8u) >> ((at % {per}u) * {bits}u)) & {mask}u;
    let grp = {group_of};
    return f32({value}) * scale_at(SCALES + grp * {}u);
",
                scale.size_bytes(),
                per = 8 / bits,
                mask = (1u32 << bits) - 1,
            )
        }
        _ => return String::new(),
    };
    let mut s = String::new();
    // Where the whole-matrix layouts keep their scales (after every code) and zero points.
    let (n, k) = (c.n, c.k);
    match c.weight {
        WeightFormat::Nf4 { scale, .. } => {
            let _ = writeln!(s, "const SCALES: u32 = {}u;", (n * k).div_ceil(2));
            s.push_str(scale_reader(scale));
        }
        WeightFormat::Affine {
            bits,
            group,
            axis,
            scale,
            ..
        } => {
            let scales = (n * k * usize::from(bits)).div_ceil(8);
            let groups = if axis == 1 {
                n * (k / group as usize)
            } else {
                n / group as usize * k
            };
            let _ = writeln!(s, "const SCALES: u32 = {scales}u;");
            let _ = writeln!(
                s,
                "const ZEROS: u32 = {}u;",
                scales + groups * scale.size_bytes()
            );
            s.push_str(scale_reader(scale));
        }
        WeightFormat::Iq3Xxs
        | WeightFormat::Iq3S
        | WeightFormat::Iq2Xxs
        | WeightFormat::Iq2Xs
        | WeightFormat::Iq2S
        | WeightFormat::Iq1S
        | WeightFormat::Iq1M => s.push_str(&lattice_grid(c.weight)),
        _ => {}
    }
    let _ = write!(s, "fn weight_at(row: u32, i: u32) -> f32 {{\n{body}}}\n");
    s
}

/// The prelude a contraction over `c`'s weight (in binding `w`) needs: `ROW_BYTES`, byte
/// access and, when `per_element`, the format's `weight_at` for packed weights.
fn weight_prelude(c: &Contraction, w: &str, per_element: bool) -> String {
    let mut s = String::new();
    if !matches!(c.weight, WeightFormat::F32 | WeightFormat::F16) {
        let _ = writeln!(s, "const ROW_BYTES: u32 = {}u;", c.weight.row_bytes(c.k));
        s.push_str(&bytes(w));
        if per_element {
            s.push_str(&weight_value(c));
        }
    }
    s
}

/// `llm.topk` of rows of `n`, keeping `k`: one invocation a row, each slot the first
/// largest value not yet taken (a bit per value marks the taken ones), as the reference
/// scans.
fn top_k(n: usize, k: usize) -> String {
    let words = n.div_ceil(32);
    let mut s = String::new();
    let _ = writeln!(s, "const N: u32 = {n}u;\nconst KEEP: u32 = {k}u;");
    s.push_str(ENTRY);
    let _ = write!(
        s,
        "    let row = gi * WG + t;
    if (row >= p.rows) {{ return; }}
    let base = row * N;
    var taken: array<u32, {words}>;
    for (var r = 0u; r < KEEP; r = r + 1u) {{
        var best = 0u;
        while (((taken[best >> 5u] >> (best & 31u)) & 1u) != 0u) {{ best = best + 1u; }}
        for (var j = best + 1u; j < N; j = j + 1u) {{
            let free = ((taken[j >> 5u] >> (j & 31u)) & 1u) == 0u;
            if (free && x[base + j] > x[base + best]) {{ best = j; }}
        }}
        taken[best >> 5u] = taken[best >> 5u] | (1u << (best & 31u));
        y[row * KEEP + r] = x[base + best];
        ids[row * KEEP + r] = i32(best);
    }}
}}
"
    );
    s
}

fn tiled_contraction(c: &Contraction) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "const K: u32 = {}u;", c.k);
    let _ = writeln!(s, "const T: u32 = {TILE}u;");
    let _ = writeln!(s, "const TK: u32 = {TILE_K}u;");
    let _ = writeln!(s, "var<workgroup> xs: array<f32, {}>;", TILE * TILE_K);
    let _ = writeln!(s, "var<workgroup> ws: array<f32, {}>;", TILE * TILE_K);
    s.push_str("var<workgroup> squares: array<f32, 64>;\nvar<workgroup> scale: array<f32, 16>;\n");
    s.push_str(&weight_prelude(c, "w", true));
    let weight = match c.weight {
        WeightFormat::F32 => "w[jr * K + col]",
        WeightFormat::F16 => "f32(w[jr * K + col])",
        _ => "weight_at(jr, col)",
    };
    let xv = if c.norm_eps_bits.is_some() {
        "g[col] * (scale[r] * x[row * K + col])"
    } else {
        "x[row * K + col]"
    };
    s.push_str(ENTRY);
    s.push_str(
        "    let tiles_n = (p.part_rows + T - 1u) / T;
    if (gi >= tiles_n * ((p.rows + T - 1u) / T)) { return; }
    let m0 = (gi / tiles_n) * T;
    let j0 = (gi % tiles_n) * T;
",
    );
    if let Some(eps) = c.norm_eps_bits {
        // Four invocations per row sum its squares; one per row turns them into a scale.
        let _ = write!(
            s,
            "    var ss = 0.0;
    if (m0 + t / 4u < p.rows) {{
        for (var i = t % 4u; i < K; i = i + 4u) {{ let v = x[(m0 + t / 4u) * K + i]; ss = ss + v * v; }}
    }}
    squares[t] = ss;
    workgroupBarrier();
    if (t < T) {{
        let sum = squares[4u * t] + squares[4u * t + 1u] + squares[4u * t + 2u] + squares[4u * t + 3u];
        scale[t] = 1.0 / sqrt(sum / f32(K) + {});
    }}
    workgroupBarrier();
",
            float(f32::from_bits(eps))
        );
    }
    let residual = if c.residual { " + res[at]" } else { "" };
    let _ = write!(
        s,
        "    let ty = (t / 8u) * 2u;
    let tx = (t % 8u) * 2u;
    var acc = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < K; k0 = k0 + TK) {{
        for (var e = t; e < T * TK; e = e + WG) {{
            let r = e / TK;
            let col = k0 + e % TK;
            let row = m0 + r;
            var xv = 0.0;
            if (row < p.rows && col < K) {{ xv = {xv}; }}
            xs[e] = xv;
            let jr = j0 + r;
            var wv = 0.0;
            if (jr < p.part_rows && col < K) {{ wv = {weight}; }}
            ws[e] = wv;
        }}
        workgroupBarrier();
        for (var c = 0u; c < TK; c = c + 1u) {{
            let a0 = xs[ty * TK + c];
            let a1 = xs[(ty + 1u) * TK + c];
            let b0 = ws[tx * TK + c];
            let b1 = ws[(tx + 1u) * TK + c];
            acc = acc + vec4<f32>(a0 * b0, a0 * b1, a1 * b0, a1 * b1);
        }}
        workgroupBarrier();
    }}
    for (var q = 0u; q < 4u; q = q + 1u) {{
        let row = m0 + ty + q / 2u;
        let col = j0 + tx + q % 2u;
        if (row < p.rows && col < p.part_rows) {{
            let at = row * p.outputs + p.first + col;
            y[at] = acc[q]{residual};
        }}
    }}
}}
"
    );
    s
}

/// The reference's `llm.maximum` (`f` `max`, `bits` `&`) or `llm.minimum` (`min`, `|`) of
/// `v{a}` and `v{b}`, which WGSL's `max` and `min` leave open for a NaN or zeros of two
/// signs: a NaN, recognised by its bits (a compiler may assume that comparisons never
/// meet one), gives NaN, and equal values the bits of both joined (`+0` wins a maximum:
/// its sign bit is clear, `-0` a minimum).
fn extremum(f: &str, bits: &str, a: usize, b: usize) -> String {
    let nan = |v: usize| format!("(bitcast<u32>(v{v}) & 0x7fffffffu) > 0x7f800000u");
    format!(
        "select(select({f}(v{a}, v{b}), bitcast<f32>(bitcast<u32>(v{a}) {bits} bitcast<u32>(v{b})), v{a} == v{b}), bitcast<f32>(0x7fc00000u), {} || {})",
        nan(a),
        nan(b)
    )
}

/// The WGSL expression of one scalar step over earlier values `v0, v1, ...`.
fn step_expr(step: &ScalarStep) -> String {
    match step {
        ScalarStep::Constant(c) => float(*c),
        ScalarStep::Unary(op, a) => {
            let x = format!("v{a}");
            match *op {
                "llm.exp" => format!("exp({x})"),
                "llm.neg" => format!("-{x}"),
                "llm.sqrt" => format!("sqrt({x})"),
                "llm.rsqrt" => format!("1.0 / sqrt({x})"),
                "llm.tanh" => tanh(&x),
                "llm.erf" => format!("llmc_erf({x})"),
                "llm.relu" => format!("select({x}, 0.0, {x} < 0.0)"),
                "llm.sigmoid" => format!("1.0 / (1.0 + exp(-{x}))"),
                "llm.silu" => format!("{x} * (1.0 / (1.0 + exp(-{x})))"),
                "llm.gelu" => format!(
                    "0.5 * {x} * (1.0 + {})",
                    tanh(&format!(
                        "{} * ({x} + 0.044715 * {x} * {x} * {x})",
                        float((2.0f32 / std::f32::consts::PI).sqrt())
                    ))
                ),
                other => unreachable!("no unary op {other} reaches a scalar body"),
            }
        }
        ScalarStep::Binary(op, a, b) => {
            let sym = match *op {
                "llm.add" => "+",
                "llm.sub" => "-",
                "llm.mul" => "*",
                "llm.div" => "/",
                "llm.maximum" => return extremum("max", "&", *a, *b),
                "llm.minimum" => return extremum("min", "|", *a, *b),
                other => unreachable!("no binary op {other} reaches a scalar body"),
            };
            format!("v{a} {sym} v{b}")
        }
    }
}

fn elementwise(body: &ScalarBody) -> String {
    // Operand `a` holds `n{a}` elements: all of them, or (broadcast) the result's last.
    scalar_body_shader(
        body,
        "    let i = gi * WG + t;\n    if (i >= p.len) { return; }\n",
        |a| format!("a{a}[i % p.n{a}]"),
    )
}

fn strided(body: &ScalarBody) -> String {
    let dims: Vec<String> = (0..STRIDED_RANK).map(|i| format!("p.d{i}")).collect();
    let mut head = format!(
        "    let i = gi * WG + t;\n    if (i >= {}) {{ return; }}\n    var r = i;\n",
        dims.join(" * ")
    );
    // Coordinates from the innermost dim out.
    for i in (1..STRIDED_RANK).rev() {
        let _ = writeln!(head, "    let c{i} = r % p.d{i};\n    r = r / p.d{i};");
    }
    head.push_str("    let c0 = r;\n");
    scalar_body_shader(body, &head, |a| {
        let terms: Vec<String> = (0..STRIDED_RANK)
            .map(|i| format!("c{i} * p.s{a}_{i}"))
            .collect();
        format!("a{a}[{}]", terms.join(" + "))
    })
}

/// The parameter block of a [`Shader::Strided`] body: the dims `d0..`, then each
/// operand's strides `s{a}_0..`.
fn strided_params() -> String {
    let mut s = String::from("struct Params {\n");
    for i in 0..STRIDED_RANK {
        let _ = writeln!(s, "    d{i}: u32,");
    }
    for a in 0..STRIDED_ARGS {
        for i in 0..STRIDED_RANK {
            let _ = writeln!(s, "    s{a}_{i}: u32,");
        }
    }
    s.push_str("}\n@group(0) @binding(0) var<uniform> p: Params;\n");
    s
}

/// A shader computing `body` for result element `i`: `head` finds `i` (and returns when
/// it is out of range), `operand(a)` is where operand `a`'s value for `i` is read.
fn scalar_body_shader(body: &ScalarBody, head: &str, operand: impl Fn(usize) -> String) -> String {
    let mut s = String::from(rounding(body.dtype));
    s.push_str(ENTRY);
    s.push_str(head);
    for a in 0..body.args {
        let _ = writeln!(s, "    let v{a} = {};", operand(a));
    }
    body_steps(&mut s, body);
    let _ = writeln!(s, "    y[i] = v{};\n}}", body.result);
    s
}

/// `c0..c3`, the rank-4 coordinates (dims `p.d0..p.d3`) of the flat index `e`.
fn rank4_coords(e: &str) -> String {
    format!(
        "    let c3 = {e} % p.d3;
    let c2 = ({e} / p.d3) % p.d2;
    let c1 = ({e} / (p.d3 * p.d2)) % p.d1;
    let c0 = {e} / (p.d3 * p.d2 * p.d1);
"
    )
}

/// The rounding function values of `dtype` need: `round_f16` or `round_bf16` (none for
/// f32).
fn rounding(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => ROUND_F16,
        DType::BF16 => ROUND_BF16,
        _ => "",
    }
}

/// `expr` rounded to `dtype` by the function [`rounding`] defines (as is for f32).
fn rounded(dtype: DType, expr: &str) -> String {
    match dtype {
        DType::F16 => format!("round_f16({expr})"),
        DType::BF16 => format!("round_bf16({expr})"),
        _ => expr.to_string(),
    }
}

/// The body's steps as `let v{slot} = ...;` lines, each result rounded to the body's
/// element type as a separate op would round it.
fn body_steps(s: &mut String, body: &ScalarBody) {
    for (n, step) in body.steps.iter().enumerate() {
        let expr = rounded(body.dtype, &step_expr(step));
        let _ = writeln!(s, "    let v{} = {expr};", body.args + n);
    }
}

/// The head of a row-reduction shader: one workgroup per row of `n`.
fn row_shader(n: usize) -> String {
    let mut s = format!("const N: u32 = {n}u;\n{REDUCE}{ENTRY}");
    s.push_str("    if (gi >= p.rows) { return; }\n    let row = gi * N;\n");
    s
}

fn rms_norm(d: usize, eps_bits: u32) -> String {
    let mut s = row_shader(d);
    let _ = write!(
        s,
        "    var ss = 0.0;
    for (var i = t; i < N; i = i + WG) {{ let v = x[row + i]; ss = ss + v * v; }}
    let inv = 1.0 / sqrt(reduce_sum(t, ss) / f32(N) + {});
    for (var i = t; i < N; i = i + WG) {{ y[row + i] = g[i] * (inv * x[row + i]); }}
}}
",
        float(f32::from_bits(eps_bits))
    );
    s
}

fn layer_norm(d: usize, eps_bits: u32) -> String {
    let mut s = row_shader(d);
    let _ = write!(
        s,
        "    var sum = 0.0;
    for (var i = t; i < N; i = i + WG) {{ sum = sum + x[row + i]; }}
    let mean = reduce_sum(t, sum) / f32(N);
    var sq = 0.0;
    for (var i = t; i < N; i = i + WG) {{ let c = x[row + i] - mean; sq = sq + c * c; }}
    let inv = 1.0 / sqrt(reduce_sum(t, sq) / f32(N) + {});
    for (var i = t; i < N; i = i + WG) {{ y[row + i] = (x[row + i] - mean) * inv * g[i] + b[i]; }}
}}
",
        float(f32::from_bits(eps_bits))
    );
    s
}

fn softmax(n: usize, inner: usize) -> String {
    let mut s = format!("const N: u32 = {n}u;\nconst INNER: u32 = {inner}u;\n{REDUCE}{ENTRY}");
    let _ = write!(
        s,
        "    if (gi >= p.rows) {{ return; }}
    let row = (gi / INNER) * N * INNER + gi % INNER;
    var hi = {LOWEST};
    for (var i = t; i < N; i = i + WG) {{ hi = max(hi, x[row + i * INNER]); }}
    let top = reduce_max(t, hi);
    var sum = 0.0;
    for (var i = t; i < N; i = i + WG) {{
        let e = exp(x[row + i * INNER] - top);
        y[row + i * INNER] = e;
        sum = sum + e;
    }}
    let total = reduce_sum(t, sum);
    for (var i = t; i < N; i = i + WG) {{ y[row + i * INNER] = y[row + i * INNER] / total; }}
}}
"
    );
    s
}

fn argmax(n: usize, inner: usize) -> String {
    let mut s = format!(
        "const N: u32 = {n}u;
const INNER: u32 = {inner}u;
var<workgroup> best_v: array<f32, 64>;
var<workgroup> best_i: array<u32, 64>;
const NONE: u32 = 0xffffffffu;
{ENTRY}"
    );
    s.push_str(
        "    if (gi >= p.rows) { return; }
    let row = (gi / INNER) * N * INNER + gi % INNER;
    var v = 0.0;
    var at = NONE;
    for (var i = t; i < N; i = i + WG) {
        let c = x[row + i * INNER];
        if (at == NONE || c > v) { v = c; at = i; }
    }
    best_v[t] = v;
    best_i[t] = at;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            let ov = best_v[t + s];
            let oi = best_i[t + s];
            let mi = best_i[t];
            if (oi != NONE && (mi == NONE || ov > best_v[t] || (ov == best_v[t] && oi < mi))) {
                best_v[t] = ov;
                best_i[t] = oi;
            }
        }
        workgroupBarrier();
    }
    if (t == 0u) { y[gi] = i32(select(best_i[0], 0u, best_i[0] == NONE)); }
}
",
    );
    s
}

fn dequantize(c: &Contraction) -> String {
    let mut s = format!("const K: u32 = {}u;\n", c.k);
    s.push_str(&weight_prelude(c, "w", true));
    s.push_str(ENTRY);
    s.push_str(
        "    let e = gi * WG + t;
    if (e >= p.part_rows * K) { return; }
    y[p.first * K + e] = weight_at(e / K, e % K);
}
",
    );
    s
}

fn permute() -> String {
    let mut s = String::from(ENTRY);
    s.push_str("    let e = gi * WG + t;\n    if (e >= p.d0 * p.d1 * p.d2 * p.d3) { return; }\n");
    s.push_str(&rank4_coords("e"));
    s.push_str("    y[e] = x[p.first + c0 * p.s0 + c1 * p.s1 + c2 * p.s2 + c3 * p.s3];\n}\n");
    s
}

/// A fault (`p.step`) where `a` and `b` (4-byte elements, compared as bits) differ.
fn agree() -> String {
    let mut s = String::from(ENTRY);
    s.push_str(
        "    let e = gi * WG + t;
    if (e >= p.len) { return; }
    if (a[e] != b[e]) { atomicMin(&fault[0], p.step); }
}
",
    );
    s
}

/// `y = a . b` element by element. NaNs are recognised by their bits (WGSL lets a
/// compiler assume that comparisons never meet one).
fn fold(reduction: Reduction) -> String {
    let mut s = String::from(
        "fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}
",
    );
    s.push_str(ENTRY);
    s.push_str("    let e = gi * WG + t;\n    if (e >= p.len) { return; }\n    let x = a[e];\n    let z = b[e];\n");
    // The second operand wins where the first is NaN or it is strictly better.
    let combined = match reduction {
        Reduction::Sum => "x + z",
        Reduction::Max => "select(x, z, is_nan(x) || (!is_nan(z) && z > x))",
        Reduction::Min => "select(x, z, is_nan(x) || (!is_nan(z) && z < x))",
    };
    let _ = writeln!(s, "    y[e] = {combined};\n}}");
    s
}

fn place() -> String {
    let mut s = String::from(ENTRY);
    s.push_str(
        "    let e = gi * WG + t;
    if (e >= p.rows * p.width) { return; }
    y[(e / p.width) * p.out_width + p.offset + e % p.width] = x[e];
}
",
    );
    s
}

fn rope(heads: usize, d: usize, rotary: usize, half: bool) -> String {
    let mut s = format!(
        "const H: u32 = {heads}u;\nconst D: u32 = {d}u;\nconst ROT: u32 = {rotary}u;\n{ENTRY}"
    );
    s.push_str(
        "    let e = gi * WG + t;
    if (e >= p.tokens * H * D) { return; }
    let i = e % D;
    let token = e / (H * D);
    let base = e - i;
    if (i >= ROT) { y[e] = x[e]; return; }
",
    );
    if half {
        s.push_str(
            "    let pair = i % (ROT / 2u);
    let a = base + pair;
    let b = a + ROT / 2u;
    let lead = i < ROT / 2u;
",
        );
    } else {
        s.push_str(
            "    let pair = i / 2u;
    let a = base + 2u * pair;
    let b = a + 1u;
    let lead = (i & 1u) == 0u;
",
        );
    }
    s.push_str(
        "    let c = cos_t[token * (ROT / 2u) + pair];
    let sn = sin_t[token * (ROT / 2u) + pair];
    if (lead) { y[e] = x[a] * c - x[b] * sn; } else { y[e] = x[a] * sn + x[b] * c; }
}
",
    );
    s
}

/// `key(e)` and `value(e)` of a pool of `blocks`: element `e` is element `e % values` of
/// block `e / values`, which starts at byte `(e / values) * bytes` ([`KvBlocks::bytes`],
/// the format's block padded to whole words), decoded by the format's block decoder
/// ([`block_codec`]; the K-quants' products kept apart through [`EXACT`], so every value
/// is the host's bit for bit).
fn kv_block_readers(blocks: KvBlocks) -> String {
    let (values, _, _, decode, _) = kv_block_codec(blocks);
    let mut s = format!("{HALF_VALUE}{EXACT}");
    for (name, pool) in [("key", "kc"), ("value", "vc")] {
        let _ = write!(
            s,
            "fn {name}_byte(o: u32) -> u32 {{ return ({pool}[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu; }}
fn {name}_half(o: u32) -> f32 {{ return half_value({name}_byte(o) | ({name}_byte(o + 1u) << 8u)); }}
fn {name}_in(o: u32, e: u32) -> f32 {{
{}}}
fn {name}(e: u32) -> f32 {{ return {name}_in((e / {values}u) * {}u, e % {values}u); }}
",
            decode
                .replace("byte_at(", &format!("{name}_byte("))
                .replace("half_at(", &format!("{name}_half(")),
            blocks.bytes()
        );
    }
    s
}

/// `tanh` of the expression `x`, through [`tanh_helper`]'s `llmc_tanh`.
fn tanh(x: &str) -> String {
    format!("llmc_tanh({x})")
}

/// The WGSL function `llmc_tanh`, the CPU's `tanh` (`cpu::emit::tanh`): an odd polynomial
/// ([`TANH_POLY`]) below |x| = [`TANH_SMALL`], where `1 - 2 / (exp(2x) + 1)` (and WGSL's
/// builtin `tanh`, which some implementations compute so) loses the low bits, that form
/// beyond, its argument clamped to `[-10, 10]` (`tanh` is 1 in f32 beyond; the clamp keeps
/// `exp` finite).
fn tanh_helper() -> String {
    let mut p = float(TANH_POLY[0]);
    for &c in &TANH_POLY[1..] {
        p = format!("({p}) * z + {}", float(c));
    }
    format!(
        "fn llmc_tanh(v: f32) -> f32 {{
    let x = clamp(v, -10.0, 10.0);
    let z = x * x;
    let near = x + x * z * ({p});
    let far = 1.0 - 2.0 / (exp(2.0 * x) + 1.0);
    return select(far, near, abs(x) < {});
}}
",
        float(TANH_SMALL)
    )
}

/// The WGSL function `llmc_erf`, the CPU's `erf` (`cpu::emit::erf`): the odd Taylor
/// polynomial ([`ERF_POLY`]) below |x| = [`ERF_SMALL`], Abramowitz and Stegun's form
/// ([`ERF_TAIL`]) beyond, with the sign put back.
fn erf_helper() -> String {
    let mut p = float(ERF_POLY[0]);
    for &c in &ERF_POLY[1..] {
        p = format!("({p}) * z + {}", float(c));
    }
    let mut q = float(ERF_TAIL[1]);
    for &c in &ERF_TAIL[2..] {
        q = format!("({q}) * t + {}", float(c));
    }
    format!(
        "fn llmc_erf(x: f32) -> f32 {{
    let z = x * x;
    let near = x * ({p});
    let a = abs(x);
    let t = 1.0 / (1.0 + {} * a);
    let far = 1.0 - t * ({q}) * exp(-z);
    return select(select(far, -far, x < 0.0), near, a < {});
}}
",
        float(ERF_TAIL[0]),
        float(ERF_SMALL)
    )
}

/// The softmax state (maximum, sum) a row's head starts from: nothing, or only its
/// attention sink (the maximum the sink's score, the sum its exponential around itself,
/// 1), which a split attention's first chunk alone takes in.
fn softmax_start(sinks: bool, split: bool) -> (String, String) {
    match (sinks, split) {
        (false, _) => (LOWEST.into(), "0.0".into()),
        (true, false) => ("sinks[head]".into(), "1.0".into()),
        (true, true) => (
            format!("select({LOWEST}, sinks[head], part == 0u)"),
            "select(0.0, 1.0, part == 0u)".into(),
        ),
    }
}

fn attention(
    [heads, kv_heads, d]: [usize; 3],
    scoring: Scoring,
    (paged, masked): (Option<KvElement>, bool),
    (split, sinks): (bool, bool),
) -> String {
    let mut scaled = match scoring.scale {
        Scale::Times(f) => format!("qk * {}", float(f)),
        Scale::DivSqrt(r) => format!("qk / {}", float(r)),
    };
    if let Some(cap) = scoring.softcap {
        let capped = tanh(&format!("({scaled}) / {}", float(cap)));
        scaled = format!("{} * {capped}", float(cap));
    }
    if masked {
        // The bias of query `row % tokens` for key `j`.
        scaled.push_str(" + mask[(row % p.tokens) * p.keys + j]");
    }
    let mut s = format!(
        "const H: u32 = {heads}u;
const KVH: u32 = {kv_heads}u;
const D: u32 = {d}u;
const DC: u32 = {}u;
var<workgroup> sc: array<f32, 64>;
var<workgroup> offs: array<u32, 64>;
var<workgroup> qs: array<f32, {d}>;
var<workgroup> range_start: u32;
var<workgroup> range_end: u32;
{REDUCE}",
        d.div_ceil(WORKGROUP as usize).max(1),
    );
    s.push_str(&kv_readers(paged.unwrap_or(KvElement::F32)));
    // Where key position `j` of the row's sequence lives, in elements.
    let (locate, range) = if paged.is_some() {
        (
            "fn key_at(seq: u32, j: u32, kvh: u32) -> u32 {
    let block = u32(tables[seq * p.width + j / p.block]);
    return ((block * p.block + j % p.block) * KVH + kvh) * D;
}
",
            "        let pos = u32(lens[seq]) - p.tokens + row % p.tokens;
        var start = 0u;
        if (p.window > 0u && pos + 1u > p.window) { start = pos + 1u - p.window; }
        range_start = start;
        range_end = pos + 1u;
",
        )
    } else {
        (
            "fn key_at(seq: u32, j: u32, kvh: u32) -> u32 {
    return ((seq * p.keys + j) * KVH + kvh) * D;
}
",
            "        let i = row % p.tokens;
        var pos = 0u;
        if (p.keys + i >= p.tokens) { pos = p.keys + i - p.tokens; }
        var start = 0u;
        if (p.window > 0u && pos + 1u > p.window) { start = pos + 1u - p.window; }
        range_start = start;
        range_end = select(p.keys, pos + 1u, p.causal != 0u);
",
        )
    };
    s.push_str(locate);
    s.push_str(ENTRY);
    // A split workgroup covers chunk `gi % splits` of its row's visible positions.
    let (which, chunk, finish) = if split {
        (
            "    if (gi >= p.rows * H * p.splits) {{ return; }}
    let rh = gi / p.splits;
    let part = gi % p.splits;",
            "        range_start = min(range_end, start + part * p.chunk);
        range_end = min(range_end, start + (part + 1u) * p.chunk);
",
            "    let at = (rh * p.splits + part) * (D + 2u);
    if (t == 0u) {{ parts[at] = m; parts[at + 1u] = l; }}
    for (var c = 0u; c < DC; c = c + 1u) {{
        let i = t + c * WG;
        if (i < D) {{ parts[at + 2u + i] = acc[c]; }}
    }}",
        )
    } else {
        (
            "    if (gi >= p.rows * H) {{ return; }}
    let rh = gi;",
            "",
            "    for (var c = 0u; c < DC; c = c + 1u) {{
        let i = t + c * WG;
        if (i < D) {{ y[qrow + i] = select(0.0, acc[c] / l, l > 0.0); }}
    }}",
        )
    };
    let (m0, l0) = softmax_start(sinks, split);
    let _ = write!(
        s,
        "{which}
    let row = rh / H;
    let head = rh % H;
    let kvh = head / (H / KVH);
    let seq = row / p.tokens;
    let qrow = (row * H + head) * D;
    for (var i = t; i < D; i = i + WG) {{ qs[i] = q[qrow + i]; }}
    if (t == 0u) {{
{range}{chunk}    }}
    let start = workgroupUniformLoad(&range_start);
    let end = workgroupUniformLoad(&range_end);
    var acc: array<f32, DC>;
    var m = {m0};
    var l = {l0};
    for (var j0 = start; j0 < end; j0 = j0 + WG) {{
        let j = j0 + t;
        var score = {LOWEST};
        if (j < end) {{
            let at = key_at(seq, j, kvh);
            offs[t] = at;
            var qk = 0.0;
            for (var i = 0u; i < D; i = i + 1u) {{ qk = qk + qs[i] * key(at + i); }}
            score = {scaled};
        }}
        let top = max(m, reduce_max(t, score));
        var e = 0.0;
        if (j < end) {{ e = exp(score - top); }}
        sc[t] = e;
        let total = reduce_sum(t, e);
        let fix = exp(m - top);
        l = l * fix + total;
        m = top;
        let count = min(WG, end - j0);
        for (var c = 0u; c < DC; c = c + 1u) {{
            let i = t + c * WG;
            if (i < D) {{
                var a = acc[c] * fix;
                for (var jj = 0u; jj < count; jj = jj + 1u) {{ a = a + sc[jj] * value(offs[jj] + i); }}
                acc[c] = a;
            }}
        }}
        workgroupBarrier();
    }}
{finish}
}}
",
    );
    s
}

fn attention_combine(heads: usize, d: usize) -> String {
    let mut s = format!("const H: u32 = {heads}u;\nconst D: u32 = {d}u;\n{ENTRY}");
    let _ = write!(
        s,
        "    if (gi >= p.rows * H) {{ return; }}
    let first = gi * p.splits * (D + 2u);
    var top = {LOWEST};
    for (var c = 0u; c < p.splits; c = c + 1u) {{ top = max(top, parts[first + c * (D + 2u)]); }}
    var total = 0.0;
    for (var c = 0u; c < p.splits; c = c + 1u) {{
        let at = first + c * (D + 2u);
        total = total + parts[at + 1u] * exp(parts[at] - top);
    }}
    for (var i = t; i < D; i = i + WG) {{
        var sum = 0.0;
        for (var c = 0u; c < p.splits; c = c + 1u) {{
            let at = first + c * (D + 2u);
            sum = sum + parts[at + 2u + i] * exp(parts[at] - top);
        }}
        y[gi * D + i] = select(0.0, sum / total, total > 0.0);
    }}
}}
"
    );
    s
}

fn kv_append(row: usize, how: KvRounding) -> String {
    match how.element() {
        KvElement::F32 => {}
        KvElement::Blocks(blocks) => return kv_append_blocks(row, blocks),
        half => return kv_append_halves(row, half),
    }
    let storage = match how {
        KvRounding::Exact => DType::F32,
        KvRounding::Float(dtype) => dtype,
        KvRounding::Quantized(Some(
            format @ (WeightFormat::Nf4 { .. } | WeightFormat::Affine { .. }),
        )) => return kv_append_groups(row, format),
        KvRounding::Quantized(format) => {
            unreachable!("`gpu::supports` keeps {format:?} caches on the host")
        }
    };
    let mut s = format!("{}const ROW: u32 = {row}u;\n{ENTRY}", rounding(storage));
    let _ = write!(
        s,
        "    let e = gi * WG + t;
    if (e >= p.tokens * ROW) {{ return; }}
    let token = e / ROW;
    let at = u32(slots[token]) * ROW + e % ROW;
    kc[at] = {};
    vc[at] = {};
}}
",
        rounded(storage, "kn[e]"),
        rounded(storage, "vn[e]")
    );
    s
}

/// The append of an f16 or bf16 cache, whose pool holds two values a word: each
/// invocation rounds one value of the new keys and one of the new values and puts their
/// bits in their half of a word, clearing the half and then setting it with atomic
/// operations (a word's other half may belong to another slot, written by another
/// invocation at the same time, when rows are odd). Slots are distinct (the block
/// manager hands each position its own); two tokens on one slot would or their bits.
/// A bf16 NaN keeps its sign and top mantissa bits with the quiet bit set, as the host's
/// `half` stores it.
fn kv_append_halves(row: usize, element: KvElement) -> String {
    let (helpers, bits) = match element {
        KvElement::BF16 => (
            ROUND_BF16.to_string(),
            "let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) { return (b >> 16u) | 0x40u; }
    return bitcast<u32>(round_bf16(x)) >> 16u;",
        ),
        _ => (format!("{ROUND_F16}{F16_BITS}"), "return f16_bits(x);"),
    };
    let mut s = format!(
        "{helpers}fn bits(x: f32) -> u32 {{\n    {bits}\n}}\nconst ROW: u32 = {row}u;\n{ENTRY}"
    );
    s.push_str(
        "    let e = gi * WG + t;
    if (e >= p.tokens * ROW) { return; }
    let at = u32(slots[e / ROW]) * ROW + e % ROW;
    let shift = (at & 1u) * 16u;
    let keep = ~(0xffffu << shift);
    atomicAnd(&kc[at >> 1u], keep);
    atomicOr(&kc[at >> 1u], bits(kn[e]) << shift);
    atomicAnd(&vc[at >> 1u], keep);
    atomicOr(&vc[at >> 1u], bits(vn[e]) << shift);
}
",
    );
    s
}

/// The append of a cache held in a block format's blocks along the head (of 32, or the
/// K-quants' 256): each invocation encodes one block of the new keys and of the new
/// values exactly as the quantize shader does ([`block_codec`]) and writes its words, the
/// block padded to [`KvBlocks::bytes`], to the block's place in the pool: the host's
/// bytes. A block is whole words, so no two invocations write one word.
fn kv_append_blocks(row: usize, blocks: KvBlocks) -> String {
    let (values, _, encode, _, helpers) = kv_block_codec(blocks);
    let words = blocks.bytes() / 4;
    let mut s = format!(
        "{ROUND_F16}{F16_BITS}{EXACT}{CORRECTLY_ROUNDED}const ROW: u32 = {row}u;\nconst VALUES: u32 = {values}u;\nconst WORDS: u32 = {words}u;\nvar<private> acc: array<u32, {words}>;\n"
    );
    s.push_str(PUT);
    s.push_str(helpers);
    s.push_str(ENTRY);
    let block = |src: &str, dst: &str| {
        format!(
            "    {{
        let o = 0u;
{}        for (var w = 0u; w < WORDS; w = w + 1u) {{
            {dst}[(to / VALUES) * WORDS + w] = acc[w];
            acc[w] = 0u;
        }}
    }}
",
            format!("    {encode}")
                .replace("x[", &format!("{src}["))
                .replace("\n    ", "\n        ")
        )
    };
    let _ = write!(
        s,
        "    let at = (gi * WG + t) * VALUES;
    if (at >= p.tokens * ROW) {{ return; }}
    let to = u32(slots[at / ROW]) * ROW + at % ROW;
{}{}}}
",
        block("kn", "kc"),
        block("vn", "vc")
    );
    s
}

/// The [`block_codec`] of a KV pool's block format (every one has a codec).
fn kv_block_codec(blocks: KvBlocks) -> (usize, usize, &'static str, String, &'static str) {
    match WeightFormat::of(&blocks.format()).and_then(block_codec) {
        Some(codec) => codec,
        None => unreachable!("every KV block format has a block codec"),
    }
}

/// A block format's values per block, bytes per block, encoder (reading `x[at + i]` into
/// `acc` at byte `o`), decoder (element `e` of the block at byte `o`) and the helpers
/// they need: q8_0, q4_0 and q4_1 ([`block_encoder`], [`block_decoder`]) and the K-quants
/// ([`kquant_encoder`], [`kquant_decoder`] with exact products); `None` for the others.
fn block_codec(format: WeightFormat) -> Option<(usize, usize, &'static str, String, &'static str)> {
    if let Some(((bytes, encode), decode)) = block_encoder(format).zip(block_decoder(format)) {
        return Some((32, bytes, encode, decode, ""));
    }
    let (bytes, encode) = kquant_encoder(format)?;
    Some((
        256,
        bytes,
        encode,
        kquant_decoder(format, true)?,
        KQUANT_HELPERS,
    ))
}

/// The append of a cache quantized in nf4 or an affine format (groups along the head):
/// each invocation quantizes one group of the new keys and of the new values as the
/// reference does ([`group_range`], `code_of`) and writes it back decoded (`decoded`).
fn kv_append_groups(row: usize, format: WeightFormat) -> String {
    let mut s = format!(
        "{ROUND_F16}{ROUND_BF16}{F16_BITS}{EXACT}{CORRECTLY_ROUNDED}const ROW: u32 = {row}u;\nconst GROUP: u32 = {}u;\n",
        values_per_group(format)
    );
    s.push_str(&group_coder(format));
    s.push_str(ENTRY);
    s.push_str(
        "    let at = (gi * WG + t) * GROUP;
    if (at >= p.tokens * ROW) { return; }
    let to = u32(slots[at / ROW]) * ROW + at % ROW;
",
    );
    for (new, cache) in [("kn", "kc"), ("vn", "vc")] {
        let _ = write!(
            s,
            "    {{
{}        for (var i = 0u; i < GROUP; i = i + 1u) {{
            {cache}[to + i] = decoded(code_of({new}[at + i], scale, point), scale, point);
        }}
    }}
",
            group_range(format, &format!("{new}[at + i]")).replace("\n    ", "\n        ")
        );
    }
    s.push_str("}\n");
    s
}

/// Values per scale group of `format`: nf4's block, an affine format's group, a block of
/// the other formats a cache may take on the device (32 for q8_0, q4_0, q4_1; 256 for the
/// K-quants).
fn values_per_group(format: WeightFormat) -> usize {
    match format {
        WeightFormat::Nf4 { block, .. } => block as usize,
        WeightFormat::Affine { group, .. } => group as usize,
        other => other.block().unwrap_or(32),
    }
}

/// Whether appends to a cache quantized in `format` run on the device: the block formats
/// (q8_0, q4_0, q4_1: one block of 32 per invocation; the K-quants: one super-block of
/// 256), nf4 and the affine formats (one group per invocation): all of them.
pub fn kv_appends_on_device(format: WeightFormat) -> bool {
    block_codec(format).is_some()
        || matches!(
            format,
            WeightFormat::Nf4 { .. } | WeightFormat::Affine { .. }
        )
}

/// Values of the new rows each invocation of the append shader for `rounding` writes.
pub fn kv_append_values_per_invocation(rounding: KvRounding) -> usize {
    match rounding {
        KvRounding::Quantized(format) => format.map_or(32, values_per_group),
        _ => 1,
    }
}

/// Rounds an `f32` to the nearest `f16` (ties to even), kept as `f32`.
const ROUND_F16: &str = "fn round_f16(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    let sign = b & 0x80000000u;
    let a = b & 0x7fffffffu;
    if (a >= 0x7f800000u) { return x; }
    if (a >= 0x477ff000u) { return bitcast<f32>(sign | 0x7f800000u); }
    if (a < 0x38800000u) {
        let v = round(bitcast<f32>(a) * 16777216.0) / 16777216.0;
        return bitcast<f32>(sign | bitcast<u32>(v));
    }
    return bitcast<f32>(sign | ((a + 0xfffu + ((a >> 13u) & 1u)) & 0xffffe000u));
}
";

/// Rounds an `f32` to the nearest `bf16` (ties to even), kept as `f32`.
const ROUND_BF16: &str = "fn round_bf16(x: f32) -> f32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) { return x; }
    return bitcast<f32>((b + 0x7fffu + ((b >> 16u) & 1u)) & 0xffff0000u);
}
";

/// The bits of the `f16` nearest an `f32` (ties to even), as the reference stores
/// scales.
const F16_BITS: &str = "fn f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(round_f16(x));
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if (a > 0x7f800000u) { return sign | 0x7e00u; }
    if (a == 0x7f800000u) { return sign | 0x7c00u; }
    if (a < 0x38800000u) { return sign | u32(bitcast<f32>(a) * 16777216.0); }
    return sign | ((((a >> 23u) - 112u) << 10u) | ((a >> 13u) & 0x3ffu));
}
// C's roundf: to nearest, ties away from zero.
fn round_away(v: f32) -> f32 {
    let r = trunc(v);
    return select(r, r + sign(v), abs(v - r) >= 0.5);
}
";

/// `put(o, v)`: ORs byte `v` into byte `o` of the private word array `acc`.
const PUT: &str =
    "fn put(o: u32, v: u32) { acc[o >> 2u] = acc[o >> 2u] | ((v & 0xffu) << ((o & 3u) * 8u)); }\n";

/// The bytes of one block of 32 values in `format` and the WGSL statements that encode the
/// values `x[at]..x[at + 32]` into it at byte `o` (through `put`, byte for byte as the
/// reference quantizes, with `round_away`, `f16_bits`, `exact` and `div_rn`); `None` for
/// the formats without one (only q8_0, q4_0 and q4_1 have one).
fn block_encoder(format: WeightFormat) -> Option<(usize, &'static str)> {
    Some(match format {
        WeightFormat::Q8_0 => (
            34,
            "    var amax = 0.0;
    for (var i = 0u; i < 32u; i = i + 1u) { amax = max(amax, abs(x[at + i])); }
    let d = div_rn(amax, 127.0);
    let id = select(0.0, div_rn(1.0, d), d != 0.0);
    put(o, f16_bits(d));
    put(o + 1u, f16_bits(d) >> 8u);
    for (var i = 0u; i < 32u; i = i + 1u) {
        put(o + 2u + i, u32(i32(round_away(exact(x[at + i] * id)))) & 0xffu);
    }
",
        ),
        WeightFormat::Q4_0 => (
            18,
            "    var amax = 0.0;
    var top = 0.0;
    for (var i = 0u; i < 32u; i = i + 1u) {
        let v = x[at + i];
        if (amax < abs(v)) { amax = abs(v); top = v; }
    }
    let d = div_rn(top, -8.0);
    let id = select(0.0, div_rn(1.0, d), d != 0.0);
    put(o, f16_bits(d));
    put(o + 1u, f16_bits(d) >> 8u);
    for (var i = 0u; i < 16u; i = i + 1u) {
        let lo = u32(clamp(i32(exact(x[at + i] * id) + 8.5), 0, 15));
        let hi = u32(clamp(i32(exact(x[at + i + 16u] * id) + 8.5), 0, 15));
        put(o + 2u + i, lo | (hi << 4u));
    }
",
        ),
        WeightFormat::Q4_1 => (
            20,
            "    var lo = 3.40282347e38;
    var hi = -3.40282347e38;
    // The reference's strict comparisons: the first of equal values (+0, -0) stays.
    for (var i = 0u; i < 32u; i = i + 1u) {
        let v = x[at + i];
        lo = lower(lo, v);
        hi = higher(hi, v);
    }
    let d = div_rn(hi - lo, 15.0);
    let id = select(0.0, div_rn(1.0, d), d != 0.0);
    put(o, f16_bits(d));
    put(o + 1u, f16_bits(d) >> 8u);
    put(o + 2u, f16_bits(lo));
    put(o + 3u, f16_bits(lo) >> 8u);
    for (var i = 0u; i < 16u; i = i + 1u) {
        let a = u32(clamp(i32(exact(exact(x[at + i] - lo) * id) + 0.5), 0, 15));
        let b = u32(clamp(i32(exact(exact(x[at + i + 16u] - lo) * id) + 0.5), 0, 15));
        put(o + 4u + i, a | (b << 4u));
    }
",
        ),
        _ => return None,
    })
}

/// A K-quant encoder's statements, after the line that stages the super-block's 256
/// values (`x[at + i]`) in `xin`, where the encoders and [`KQUANT_HELPERS`] read them.
macro_rules! staged {
    ($body:literal) => {
        concat!(
            "    for (var i = 0u; i < 256u; i = i + 1u) { xin[i] = x[at + i]; }\n",
            $body
        )
    };
}

/// Helpers of the K-quant encoders, ggml's scale searches as the reference writes them,
/// rounded as the reference rounds them: products through `exact`, quotients and roots
/// through `div_rn` and `sqrt_rn` ([`super::ieee`]). `codes` holds a super-block's codes
/// and `aux` a candidate's for one sub-block.
const KQUANT_HELPERS: &str = "var<private> xin: array<f32, 256>;
var<private> codes: array<u32, 256>;
var<private> aux: array<u32, 32>;
// ggml's nearest_int: to nearest, ties to even (|v| below 2^22).
fn nearest_int(v: f32) -> i32 {
    return (bitcast<i32>(exact(v) + 12582912.0) & 0x007fffff) - 0x00400000;
}
// The error d of value v weighted by av + |v|: squared, or absolute when mad.
fn weighted_error(av: f32, v: f32, d: f32, mad: bool) -> f32 {
    return exact(exact(av + abs(v)) * exact(select(d * d, abs(d), mad)));
}
// make_qkx2_quants over the n values at xin[at] (weights av + |x|): codes[base..], and
// (scale, -min).
fn make_qkx2(at: u32, base: u32, n: u32, av: f32, nmax: i32, rmin: f32, rdelta: f32, nstep: i32, mad: bool) -> vec2<f32> {
    var mn = xin[at];
    var mx = xin[at];
    var sum_w = exact(av + abs(xin[at]));
    var sum_x = exact(sum_w * xin[at]);
    for (var i = 1u; i < n; i = i + 1u) {
        let v = xin[at + i];
        mn = lower(mn, v);
        mx = higher(mx, v);
        let w = exact(av + abs(v));
        sum_w = sum_w + w;
        sum_x = sum_x + exact(w * v);
    }
    if (mn > 0.0) { mn = exact(0.0); }
    if (mx == mn) {
        for (var i = 0u; i < n; i = i + 1u) { codes[base + i] = 0u; }
        return vec2<f32>(0.0, -mn);
    }
    var iscale = div_rn(f32(nmax), mx - mn);
    var scale = div_rn(1.0, iscale);
    var best = 0.0;
    for (var i = 0u; i < n; i = i + 1u) {
        let v = xin[at + i];
        let l = clamp(nearest_int(iscale * exact(v - mn)), 0, nmax);
        codes[base + i] = u32(l);
        best = best + weighted_error(av, v, exact(exact(scale * f32(l)) + mn) - v, mad);
    }
    for (var is = 0; is <= nstep; is = is + 1) {
        iscale = div_rn(exact(rmin + exact(rdelta * f32(is))) + f32(nmax), mx - mn);
        var sl = 0.0;
        var sl2 = 0.0;
        var sxl = 0.0;
        for (var i = 0u; i < n; i = i + 1u) {
            let v = xin[at + i];
            let l = clamp(nearest_int(iscale * exact(v - mn)), 0, nmax);
            aux[i] = u32(l);
            let w = exact(av + abs(v));
            let wl = exact(w * f32(l));
            sl = sl + wl;
            sl2 = sl2 + exact(wl * f32(l));
            sxl = sxl + exact(wl * v);
        }
        let det = exact(sum_w * sl2) - exact(sl * sl);
        if (det > 0.0) {
            var this_scale = div_rn(exact(sum_w * sxl) - exact(sum_x * sl), det);
            var this_min = div_rn(exact(sl2 * sum_x) - exact(sl * sxl), det);
            if (this_min > 0.0) {
                this_min = exact(0.0);
                this_scale = div_rn(sxl, sl2);
            }
            var cur = 0.0;
            for (var i = 0u; i < n; i = i + 1u) {
                let v = xin[at + i];
                let d = exact(exact(this_scale * f32(aux[i])) + this_min) - v;
                cur = cur + weighted_error(av, v, d, mad);
            }
            if (cur < best) {
                for (var i = 0u; i < n; i = i + 1u) { codes[base + i] = aux[i]; }
                best = cur;
                scale = this_scale;
                mn = this_min;
            }
        }
    }
    return vec2<f32>(scale, -mn);
}
// Each sub-block of n values through make_qkx2 (weights: the sub-block's root mean
// square, when rms_weights, plus |x|): scales and mins in sub_scales and sub_mins, and
// the largest of each (0 when none is positive).
var<private> sub_scales: array<f32, 16>;
var<private> sub_mins: array<f32, 16>;
fn qkx2_sub_blocks(n: u32, nmax: i32, rmin: f32, nstep: i32, mad: bool, rms_weights: bool) -> vec2<f32> {
    var top = vec2<f32>(0.0, 0.0);
    for (var j = 0u; j < 256u / n; j = j + 1u) {
        var av = 0.0;
        if (rms_weights) {
            var sx2 = 0.0;
            for (var i = 0u; i < n; i = i + 1u) { let v = xin[n * j + i]; sx2 = sx2 + exact(v * v); }
            av = sqrt_rn(div_rn(sx2, f32(n)));
        }
        let r = make_qkx2(n * j, n * j, n, av, nmax, rmin, 0.1, nstep, mad);
        sub_scales[j] = r.x;
        sub_mins[j] = r.y;
        top.x = higher(top.x, r.x);
        top.y = higher(top.y, r.y);
    }
    return top;
}
// make_qx_quants (rmse_type 1) over the 16 values at xin[at], codes offset by 32.
fn qx_code(iscale: f32, v: f32) -> i32 { return clamp(nearest_int(iscale * v), -32, 31); }
fn qx_sums(at: u32, iscale: f32) -> vec2<f32> {
    var lx = 0.0;
    var l2 = 0.0;
    for (var i = 0u; i < 16u; i = i + 1u) {
        let v = xin[at + i];
        let l = f32(qx_code(iscale, v));
        let w = exact(v * v);
        lx = lx + exact(exact(w * v) * l);
        l2 = l2 + exact(exact(w * l) * l);
    }
    return vec2<f32>(lx, l2);
}
fn make_qx(at: u32, base: u32) -> f32 {
    var mx = 0.0;
    var amax = 0.0;
    for (var i = 0u; i < 16u; i = i + 1u) {
        let v = xin[at + i];
        if (abs(v) > amax) { amax = abs(v); mx = v; }
    }
    if (amax < 1e-15) {
        for (var i = 0u; i < 16u; i = i + 1u) { codes[base + i] = 0u; }
        return 0.0;
    }
    var iscale = div_rn(-32.0, mx);
    var sums = qx_sums(at, iscale);
    for (var i = 0u; i < 16u; i = i + 1u) { codes[base + i] = u32(qx_code(iscale, xin[at + i]) + 32); }
    var scale = select(0.0, div_rn(sums.x, sums.y), sums.y != 0.0);
    var best = exact(scale * sums.x);
    for (var is = -9; is <= 9; is = is + 1) {
        if (is == 0) { continue; }
        iscale = div_rn(-(32.0 + exact(0.1 * f32(is))), mx);
        sums = qx_sums(at, iscale);
        if (sums.y > 0.0 && exact(sums.x * sums.x) > exact(best * sums.y)) {
            for (var i = 0u; i < 16u; i = i + 1u) { codes[base + i] = u32(qx_code(iscale, xin[at + i]) + 32); }
            scale = div_rn(sums.x, sums.y);
            best = exact(scale * sums.x);
        }
    }
    return scale;
}
// The f16 bits of v, low byte at o.
fn put_f16(o: u32, v: f32) {
    put(o, f16_bits(v));
    put(o + 1u, f16_bits(v) >> 8u);
}
";

/// The bytes of one K-quant super-block and the WGSL statements that encode the values
/// `x[at]..x[at + 256]` (staged in `xin`) into it at byte `o` of `acc`, byte for byte as
/// the reference quantizes (with [`KQUANT_HELPERS`]); `None` for the other formats.
fn kquant_encoder(format: WeightFormat) -> Option<(usize, &'static str)> {
    Some(match format {
        WeightFormat::Q4K => (
            144,
            staged!(
                "    let top = qkx2_sub_blocks(32u, 15, -1.0, 20, false, true);
    let max_scale = top.x;
    let max_min = top.y;
    let inv_scale = select(0.0, div_rn(63.0, max_scale), max_scale > 0.0);
    let inv_min = select(0.0, div_rn(63.0, max_min), max_min > 0.0);
    var packed: array<u32, 12>;
    for (var j = 0u; j < 8u; j = j + 1u) {
        let ls = u32(min(nearest_int(inv_scale * sub_scales[j]), 63)) & 0xffu;
        let lm = u32(min(nearest_int(inv_min * sub_mins[j]), 63)) & 0xffu;
        if (j < 4u) {
            packed[j] = ls;
            packed[j + 4u] = lm;
        } else {
            packed[j + 4u] = (ls & 0xfu) | ((lm & 0xfu) << 4u);
            packed[j - 4u] = (packed[j - 4u] | ((ls >> 4u) << 6u)) & 0xffu;
            packed[j] = (packed[j] | ((lm >> 4u) << 6u)) & 0xffu;
        }
    }
    let d = round_f16(div_rn(max_scale, 63.0));
    let dmin = round_f16(div_rn(max_min, 63.0));
    for (var j = 0u; j < 8u; j = j + 1u) {
        var sc = packed[j] & 63u;
        var m = packed[j + 4u] & 63u;
        if (j >= 4u) {
            sc = (packed[j + 4u] & 0xfu) | ((packed[j - 4u] >> 6u) << 4u);
            m = (packed[j + 4u] >> 4u) | ((packed[j] >> 6u) << 4u);
        }
        let dl = d * f32(sc);
        if (dl == 0.0) { continue; }
        let ml = exact(dmin * f32(m));
        for (var i = 0u; i < 32u; i = i + 1u) {
            codes[32u * j + i] = u32(clamp(nearest_int(div_rn(xin[32u * j + i] + ml, dl)), 0, 15));
        }
    }
    put_f16(o, div_rn(max_scale, 63.0));
    put_f16(o + 2u, div_rn(max_min, 63.0));
    for (var i = 0u; i < 12u; i = i + 1u) { put(o + 4u + i, packed[i]); }
    for (var j = 0u; j < 4u; j = j + 1u) {
        for (var l = 0u; l < 32u; l = l + 1u) {
            put(o + 16u + 32u * j + l, codes[64u * j + l] | (codes[64u * j + 32u + l] << 4u));
        }
    }
"
            ),
        ),
        WeightFormat::Q6K => (
            210,
            staged!(
                "    var scales: array<f32, 16>;
    var max_scale = 0.0;
    var max_abs = 0.0;
    for (var j = 0u; j < 16u; j = j + 1u) {
        scales[j] = make_qx(16u * j, 16u * j);
        if (abs(scales[j]) > max_abs) { max_abs = abs(scales[j]); max_scale = scales[j]; }
    }
    // An all-zero block stays all zero bytes.
    if (max_abs >= 1e-15) {
        let iscale = div_rn(-128.0, max_scale);
        let d = round_f16(div_rn(1.0, iscale));
        for (var j = 0u; j < 16u; j = j + 1u) {
            // As an i8: the low byte, sign-extended.
            let s = (min(nearest_int(iscale * scales[j]), 127) << 24u) >> 24u;
            put(o + 192u + j, u32(s));
            let dl = d * f32(s);
            if (dl == 0.0) { continue; }
            for (var i = 0u; i < 16u; i = i + 1u) {
                codes[16u * j + i] = u32(clamp(nearest_int(div_rn(xin[16u * j + i], dl)), -32, 31) + 32);
            }
        }
        for (var n = 0u; n < 2u; n = n + 1u) {
            for (var l = 0u; l < 32u; l = l + 1u) {
                let q1 = codes[128u * n + l];
                let q2 = codes[128u * n + l + 32u];
                let q3 = codes[128u * n + l + 64u];
                let q4 = codes[128u * n + l + 96u];
                put(o + 64u * n + l, (q1 & 0xfu) | ((q3 & 0xfu) << 4u));
                put(o + 64u * n + l + 32u, (q2 & 0xfu) | ((q4 & 0xfu) << 4u));
                put(o + 128u + 32u * n + l, (q1 >> 4u) | ((q2 >> 4u) << 2u) | ((q3 >> 4u) << 4u) | ((q4 >> 4u) << 6u));
            }
        }
        put_f16(o + 208u, div_rn(1.0, iscale));
    }
"
            ),
        ),
        WeightFormat::Q2K => (
            84,
            staged!(
                "    let top = qkx2_sub_blocks(16u, 3, -0.5, 15, true, false);
    let max_scale = top.x;
    let max_min = top.y;
    var packed: array<u32, 16>;
    var d = 0.0;
    if (max_scale > 0.0) {
        let iscale = div_rn(15.0, max_scale);
        for (var j = 0u; j < 16u; j = j + 1u) { packed[j] = u32(nearest_int(iscale * sub_scales[j])) & 0xffu; }
        d = div_rn(max_scale, 15.0);
    }
    var dmin = 0.0;
    if (max_min > 0.0) {
        let iscale = div_rn(15.0, max_min);
        for (var j = 0u; j < 16u; j = j + 1u) {
            packed[j] = (packed[j] | (u32(nearest_int(iscale * sub_mins[j])) << 4u)) & 0xffu;
        }
        dmin = div_rn(max_min, 15.0);
    }
    for (var j = 0u; j < 16u; j = j + 1u) {
        let dl = round_f16(d) * f32(packed[j] & 0xfu);
        if (dl == 0.0) { continue; }
        let ml = exact(round_f16(dmin) * f32(packed[j] >> 4u));
        for (var i = 0u; i < 16u; i = i + 1u) {
            codes[16u * j + i] = u32(clamp(nearest_int(div_rn(xin[16u * j + i] + ml, dl)), 0, 3));
        }
    }
    for (var i = 0u; i < 16u; i = i + 1u) { put(o + i, packed[i]); }
    for (var n = 0u; n < 2u; n = n + 1u) {
        for (var l = 0u; l < 32u; l = l + 1u) {
            let c = 128u * n + l;
            put(o + 16u + 32u * n + l, codes[c] | (codes[c + 32u] << 2u) | (codes[c + 64u] << 4u) | (codes[c + 96u] << 6u));
        }
    }
    put_f16(o + 80u, d);
    put_f16(o + 82u, dmin);
"
            ),
        ),
        _ => return None,
    })
}

/// WGSL statements defining `level` (`f32`), the level of `table` the nibble `q` indexes:
/// the 16 signed levels as bytes of four words, looked up by a vector's dynamic index and
/// sign-extended.
fn nibble_level(table: [i8; 16]) -> String {
    let words: Vec<String> = table
        .as_chunks::<4>()
        .0
        .iter()
        .map(|l| format!("{:#010x}u", u32::from_le_bytes(l.map(|v| v as u8))))
        .collect();
    format!(
        "    let levels = vec4<u32>({});
    let level = f32(bitcast<i32>((levels[q >> 2u] >> ((q & 3u) * 8u)) << 24u) >> 24u);
",
        words.join(", ")
    )
}

/// The module-scope `GRID` a lattice format's decoder reads: IQ3's grids as they are
/// (`llm_ir::types::IQ3XXS_GRID`, `IQ3S_GRID`), and the three values of IQ2's (8, 25, 43)
/// and IQ1's (-1, 0, 1) grids as 2-bit levels, entry `i`'s eight in the 16 bits at
/// `16 (i % 2)` of word `i / 2`, read by the emitted `grid_magnitude(i, j)` (IQ2) or
/// `grid_value(i, j)` (IQ1) (a quarter of the 64-bit entries' size: a private array, which
/// each invocation initializes once, so the smaller the better); for the formats of 7-bit
/// sign codes the emitted `even_signs(code)`, a code with its parity bit; for iq1_m the
/// emitted `iq1_m_d(o)`, its super-block scale from the scale words' top nibbles.
fn lattice_grid(format: WeightFormat) -> String {
    // The three values of a grid's bytes, in level order.
    let packed = |grid: &[u64], values: [u8; 3]| -> Vec<u32> {
        let levels = |e: u64| -> u32 {
            (0..8).fold(0, |bits, j| {
                let byte = (e >> (8 * j)) as u8;
                let level = values
                    .iter()
                    .position(|&v| v == byte)
                    .unwrap_or_else(|| unreachable!("{byte} is not a value of {format:?}"));
                bits | (level as u32) << (2 * j)
            })
        };
        grid.chunks(2)
            .map(|pair| levels(pair[0]) | levels(pair[1]) << 16)
            .collect()
    };
    const IQ2_MAGNITUDES: [u8; 3] = [8, 25, 43];
    let grid: Vec<u32> = match format {
        WeightFormat::Iq3Xxs => IQ3XXS_GRID.to_vec(),
        WeightFormat::Iq3S => IQ3S_GRID.to_vec(),
        WeightFormat::Iq2Xxs => packed(&IQ2XXS_GRID, IQ2_MAGNITUDES),
        WeightFormat::Iq2Xs => packed(&IQ2XS_GRID, IQ2_MAGNITUDES),
        WeightFormat::Iq2S => packed(&IQ2S_GRID, IQ2_MAGNITUDES),
        WeightFormat::Iq1S | WeightFormat::Iq1M => packed(&IQ1S_GRID, [0xFF, 0, 1]),
        other => unreachable!("{other:?} has no grid"),
    };
    let entries: Vec<String> = grid.iter().map(|e| format!("{e:#010x}u")).collect();
    let mut s = format!(
        "var<private> GRID: array<u32, {}> = array<u32, {}>({});\n",
        grid.len(),
        grid.len(),
        entries.join(", ")
    );
    match format {
        WeightFormat::Iq2Xxs | WeightFormat::Iq2Xs | WeightFormat::Iq2S => s.push_str(
            "fn grid_magnitude(i: u32, j: u32) -> u32 {
    let level = (GRID[i / 2u] >> (16u * (i % 2u) + 2u * j)) & 3u;
    return 8u + 17u * level + level / 2u;
}
",
        ),
        WeightFormat::Iq1S | WeightFormat::Iq1M => s.push_str(
            "fn grid_value(i: u32, j: u32) -> f32 {
    let level = (GRID[i / 2u] >> (16u * (i % 2u) + 2u * j)) & 3u;
    return f32(i32(level) - 1);
}
",
        ),
        _ => {}
    }
    if matches!(
        format,
        WeightFormat::Iq3Xxs | WeightFormat::Iq2Xxs | WeightFormat::Iq2Xs
    ) {
        // A 7-bit sign code (the low bits of `code`) with the parity bit that makes its
        // count of ones even (`llm_ir::interp::lattice::EVEN_SIGNS`).
        s.push_str(
            "fn even_signs(code: u32) -> u32 {
    let low = code & 127u;
    return low | ((countOneBits(low) & 1u) << 7u);
}
",
        );
    }
    if format == WeightFormat::Iq1M {
        // Nibble `k` of the f16 `d` is the top nibble of scale word `k`.
        let _ = write!(
            s,
            "fn iq1_m_d(o: u32) -> f32 {{
    var bits = 0u;
    for (var k = 0u; k < 4u; k++) {{
        bits = bits | ((byte_at(o + {}u + 2u * k) >> 4u) << (4u * k));
    }}
    return half_value(bits);
}}
",
            IQ1_M_SCALES_AT + 1
        );
    }
    s
}

/// WGSL statements returning element `e` (below 32) of the block in `format` at byte `o`
/// (read with `byte_at` and `half_at`), as the reference decodes it; `None` for the
/// formats without blocks of 32.
fn block_decoder(format: WeightFormat) -> Option<String> {
    Some(match format {
        WeightFormat::Iq4Nl => {
            return Some(format!(
                "    let q = (byte_at(o + 2u + (e & 15u)) >> ((e >> 4u) * 4u)) & 15u;
{}    return half_at(o) * level;
",
                nibble_level(IQ4_NL_LEVELS)
            ));
        }
        // mxfp4: an E8M0 byte `x` whose half scale is `2^(x - 128)`, the bits
        // `(x - 1) << 23` (`0x200000 << x`, subnormal, below 2).
        WeightFormat::Mxfp4 => {
            return Some(format!(
                "    let q = (byte_at(o + 1u + (e & 15u)) >> ((e >> 4u) * 4u)) & 15u;
{}    let x = byte_at(o);
    return bitcast<f32>(select((x - 1u) << 23u, 0x200000u << x, x < 2u)) * level;
",
                nibble_level(FP4_LEVELS)
            ));
        }
        WeightFormat::Q8_0 => {
            "    return half_at(o) * f32(bitcast<i32>(byte_at(o + 2u + e) << 24u) >> 24u);\n"
        }
        WeightFormat::Q4_0 => {
            "    let q = (byte_at(o + 2u + (e & 15u)) >> ((e >> 4u) * 4u)) & 15u;
    return half_at(o) * f32(i32(q) - 8);
"
        }
        WeightFormat::Q4_1 => {
            "    let q = (byte_at(o + 4u + (e & 15u)) >> ((e >> 4u) * 4u)) & 15u;
    return half_at(o) * f32(q) + half_at(o + 2u);
"
        }
        // The fifth bit of value `e` is bit `e` of the 32-bit word after the scales.
        WeightFormat::Q5_0 => {
            "    let q = ((byte_at(o + 6u + (e & 15u)) >> ((e >> 4u) * 4u)) & 15u) | (((byte_at(o + 2u + e / 8u) >> (e % 8u)) & 1u) << 4u);
    return half_at(o) * f32(i32(q) - 16);
"
        }
        WeightFormat::Q5_1 => {
            "    let q = ((byte_at(o + 8u + (e & 15u)) >> ((e >> 4u) * 4u)) & 15u) | (((byte_at(o + 4u + e / 8u) >> (e % 8u)) & 1u) << 4u);
    return half_at(o) * f32(q) + half_at(o + 2u);
"
        }
        _ => return None,
    }.to_string())
}

/// WGSL statements returning element `e` (below 256) of the K-quant super-block at byte
/// `o` (read with `byte_at` and `half_at`), in the reference's order of operations; with
/// `exact`, the products a subtraction follows go through `exact` ([`KQUANT_HELPERS`]),
/// so that the value is the reference's bit for bit (a KV cache's round trip). `None` for
/// the other formats.
fn kquant_decoder(format: WeightFormat, exact: bool) -> Option<String> {
    let kept = |product: &str| {
        if exact {
            format!("exact({product})")
        } else {
            product.to_string()
        }
    };
    Some(match format {
        // q5_k: q4_k's scales, its nibbles 32 bytes later, and value `l` of sub-block `s`'s
        // fifth bit at bit `s` of byte `16 + l`.
        WeightFormat::Q4K | WeightFormat::Q5K => format!(
            "    let pair = e / 64u;
    let high = (e % 64u) / 32u;
    let sub = 2u * pair + high;
    var sc = 0u;
    var mn = 0u;
    if (sub < 4u) {{
        sc = byte_at(o + 4u + sub) & 63u;
        mn = byte_at(o + 8u + sub) & 63u;
    }} else {{
        sc = (byte_at(o + 8u + sub) & 15u) | ((byte_at(o + sub) >> 6u) << 4u);
        mn = (byte_at(o + 8u + sub) >> 4u) | ((byte_at(o + 4u + sub) >> 6u) << 4u);
    }}
    let q = {};
    return {} - {};
",
            if format == WeightFormat::Q5K {
                "((byte_at(o + 48u + 32u * pair + e % 32u) >> (4u * high)) & 15u) | (((byte_at(o + 16u + e % 32u) >> sub) & 1u) << 4u)"
            } else {
                "(byte_at(o + 16u + 32u * pair + e % 32u) >> (4u * high)) & 15u"
            },
            kept("half_at(o) * f32(sc) * f32(q)"),
            kept("half_at(o + 2u) * f32(mn)")
        ),
        // q3_k: a clear high bit subtracts 4 from the 2-bit code; 6-bit scales offset by 32.
        WeightFormat::Q3K => "    let sub = e / 16u;
    let n = e / 128u;
    let quarter = (e % 128u) / 32u;
    let l = e % 32u;
    let low = (byte_at(o + 32u + 32u * n + l) >> (2u * quarter)) & 3u;
    let high = (byte_at(o + l) >> (4u * n + quarter)) & 1u;
    // The low nibble of byte `sub` below 8, the high one of byte `sub - 8` above.
    let low_byte = byte_at(o + 96u + sub % 8u);
    var sc = select(low_byte & 15u, low_byte >> 4u, sub >= 8u);
    sc = sc | (((byte_at(o + 104u + sub % 4u) >> (2u * (sub / 4u))) & 3u) << 4u);
    let q = i32(low) - select(4, 0, high == 1u);
    return half_at(o + 108u) * f32(i32(sc) - 32) * f32(q);
"
        .to_string(),
        WeightFormat::Q6K => "    let n = e / 128u;
    let quarter = (e % 128u) / 32u;
    let l = e % 32u;
    let low = (byte_at(o + 64u * n + l + 32u * (quarter & 1u)) >> (4u * (quarter >> 1u))) & 15u;
    let hi = (byte_at(o + 128u + 32u * n + l) >> (2u * quarter)) & 3u;
    let q = i32(low | (hi << 4u)) - 32;
    let sc = bitcast<i32>(byte_at(o + 192u + 8u * n + l / 16u + 2u * quarter) << 24u) >> 24u;
    return half_at(o + 208u) * f32(sc) * f32(q);
"
        .to_string(),
        // iq4_xs: sub-block `sub`'s 6-bit scale is nibble `sub % 2` of byte `4 + sub / 2`
        // under bit pair `sub % 4` of byte `2 + sub / 4`; its nibbles are iq4_nl's.
        WeightFormat::Iq4Xs => format!(
            "    let sub = e / 32u;
    let l = e % 32u;
    let q = (byte_at(o + 8u + 16u * sub + (l & 15u)) >> ((l >> 4u) * 4u)) & 15u;
    let low = (byte_at(o + 4u + sub / 2u) >> (4u * (sub % 2u))) & 15u;
    let ls = low | (((byte_at(o + 2u + sub / 4u) >> (2u * (sub % 4u))) & 3u) << 4u);
{}    return half_at(o) * f32(i32(ls) - 32) * level;
",
            nibble_level(IQ4_NL_LEVELS)
        ),
        // iq3_xxs: group `l / 4` of sub-block `sub` indexes the grid; run `l / 8`'s 7-bit
        // sign code in the sub-block's word gains a parity bit; the scale is the word's
        // top nibble.
        WeightFormat::Iq3Xxs => format!(
            "    let sub = e / 32u;
    let l = e % 32u;
    let w = o + {IQ3_XXS_WORDS_AT}u + 4u * sub;
    let word = byte_at(w) | (byte_at(w + 1u) << 8u) | (byte_at(w + 2u) << 16u) | (byte_at(w + 3u) << 24u);
    let signs = even_signs(word >> (7u * (l / 8u)));
    let m = (GRID[byte_at(o + 2u + 8u * sub + l / 4u)] >> (8u * (l % 4u))) & 255u;
    let sign = select(1.0, -1.0, ((signs >> (l % 8u)) & 1u) == 1u);
    return half_at(o) * (0.5 + f32(word >> 28u)) * 0.5 * f32(m) * sign;
"
        ),
        // iq3_s: group `g`'s index takes bit `g % 8` of its sub-block's byte of ninth bits;
        // value `e`'s sign is bit `e % 8` of sign byte `e / 8`; the scale a nibble.
        WeightFormat::Iq3S => format!(
            "    let sub = e / 32u;
    let g = e / 4u;
    let index = byte_at(o + 2u + g) | (((byte_at(o + {IQ3_S_HIGH_AT}u + sub) >> (g % 8u)) & 1u) << 8u);
    let m = (GRID[index] >> (8u * (e % 4u))) & 255u;
    let negative = (byte_at(o + {IQ3_S_SIGNS_AT}u + e / 8u) >> (e % 8u)) & 1u;
    let ls = (byte_at(o + {IQ3_S_SCALES_AT}u + sub / 2u) >> (4u * (sub % 2u))) & 15u;
    return half_at(o) * f32(1u + 2u * ls) * f32(m) * select(1.0, -1.0, negative == 1u);
"
        ),
        // iq2_xxs: group `l / 8` of sub-block `sub` indexes the grid;
        // its 7-bit sign code in the sub-block's word gains a parity bit; the scale is the
        // word's top nibble.
        WeightFormat::Iq2Xxs => format!(
            "    let sub = e / 32u;
    let l = e % 32u;
    let w = o + {IQ2_XXS_WORDS_AT}u + 8u * sub;
    let word = byte_at(w) | (byte_at(w + 1u) << 8u) | (byte_at(w + 2u) << 16u) | (byte_at(w + 3u) << 24u);
    let signs = even_signs(word >> (7u * (l / 8u)));
    let m = grid_magnitude(byte_at(o + 2u + 8u * sub + l / 8u), l % 8u);
    let sign = select(1.0, -1.0, ((signs >> (l % 8u)) & 1u) == 1u);
    return half_at(o) * (0.5 + f32(word >> 28u)) * 0.25 * f32(m) * sign;
"
        ),
        // iq2_xs: group `g`'s 16-bit word holds its 9-bit index under its 7-bit sign code
        // (with a parity bit); the scale of each 16 values a nibble.
        WeightFormat::Iq2Xs => format!(
            "    let g = e / 8u;
    let word = byte_at(o + 2u + 2u * g) | (byte_at(o + 3u + 2u * g) << 8u);
    let signs = even_signs(word >> 9u);
    let m = grid_magnitude(word & 511u, e % 8u);
    let sign = select(1.0, -1.0, ((signs >> (e % 8u)) & 1u) == 1u);
    let ls = (byte_at(o + {IQ2_XS_SCALES_AT}u + e / 32u) >> (4u * ((e / 16u) % 2u))) & 15u;
    return half_at(o) * (0.5 + f32(ls)) * 0.25 * f32(m) * sign;
"
        ),
        // iq2_s: group `g`'s index takes bit pair `g % 4` of its sub-block's high byte;
        // value `e`'s sign is bit `e % 8` of sign byte `g`; the scale of each 16 a nibble.
        WeightFormat::Iq2S => format!(
            "    let g = e / 8u;
    let sub = e / 32u;
    let index = byte_at(o + 2u + g) | (((byte_at(o + {IQ2_S_HIGH_AT}u + sub) >> (2u * (g % 4u))) & 3u) << 8u);
    let m = grid_magnitude(index, e % 8u);
    let negative = (byte_at(o + {IQ2_S_SIGNS_AT}u + g) >> (e % 8u)) & 1u;
    let ls = (byte_at(o + {IQ2_S_SCALES_AT}u + sub) >> (4u * ((e / 16u) % 2u))) & 15u;
    return half_at(o) * (0.5 + f32(ls)) * 0.25 * f32(m) * select(1.0, -1.0, negative == 1u);
"
        ),
        // iq1_s: group `g`'s index takes three high bits from its sub-block's word, which
        // also holds the scale and the sign of the shift.
        WeightFormat::Iq1S => format!(
            "    let sub = e / 32u;
    let g = e / 8u;
    let word = byte_at(o + {IQ1_S_WORDS_AT}u + 2u * sub) | (byte_at(o + {IQ1_S_WORDS_AT}u + 1u + 2u * sub) << 8u);
    let index = byte_at(o + 2u + g) | (((word >> (3u * (g % 4u))) & 7u) << 8u);
    let delta = select(0.125, -0.125, (word >> 15u) == 1u);
    return half_at(o) * f32(2u * ((word >> 12u) & 7u) + 1u) * (grid_value(index, e % 8u) + delta);
"
        ),
        // iq1_m: group `g`'s nibble holds its index's high bits and its shift's sign; run
        // `r`'s 3-bit scale is at bit `3 (r % 4)` of scale word `r / 4`.
        WeightFormat::Iq1M => format!(
            "    let g = e / 8u;
    let run = e / 16u;
    let nibble = (byte_at(o + {IQ1_M_HIGH_AT}u + g / 2u) >> (4u * (g % 2u))) & 15u;
    let index = byte_at(o + g) | ((nibble & 7u) << 8u);
    let w = o + {IQ1_M_SCALES_AT}u + 2u * (run / 4u);
    let ls = ((byte_at(w) | (byte_at(w + 1u) << 8u)) >> (3u * (run % 4u))) & 7u;
    let delta = select(0.125, -0.125, (nibble >> 3u) == 1u);
    return iq1_m_d(o) * f32(2u * ls + 1u) * (grid_value(index, e % 8u) + delta);
"
        ),
        // tq2_0: bit pair `(e % 128) / 32` of byte `32 (e / 128) + e % 32`, the trit plus one.
        WeightFormat::Tq2_0 => format!(
            "    let q = (byte_at(o + 32u * (e / 128u) + e % 32u) >> (2u * ((e % 128u) / 32u))) & 3u;
    return half_at(o + {TQ2_0_D_AT}u) * f32(i32(q) - 1);
"
        ),
        // tq1_0: trit `n` of the byte of `e`'s section is the top base-3 digit of the byte
        // times `3^n`, taken modulo 256.
        WeightFormat::Tq1_0 => {
            let mut s = "    var at = 0u;\n    var n = 0u;\n".to_string();
            for (i, t) in TQ1_0_SECTIONS.iter().enumerate() {
                let end = t.first + t.width * t.trits;
                let condition = if i + 1 < TQ1_0_SECTIONS.len() {
                    format!("if (e < {end}u) ")
                } else {
                    String::new()
                };
                let _ = writeln!(
                    s,
                    "    {}{condition}{{ let v = e - {}u; at = {}u + v % {w}u; n = v / {w}u; }}",
                    if i == 0 { "" } else { "else " },
                    t.first,
                    t.at,
                    w = t.width,
                );
            }
            let powers = POW3.map(|p| format!("{p}u")).join(", ");
            let _ = write!(
                s,
                "    var pow3 = array<u32, {}>({powers});
    let t = (((byte_at(o + at) * pow3[n]) & 255u) * 3u) >> 8u;
    return half_at(o + {TQ1_0_D_AT}u) * f32(i32(t) - 1);
",
                POW3.len()
            );
            s
        }
        WeightFormat::Q2K => format!(
            "    let n = e / 128u;
    let shift = ((e % 128u) / 32u) * 2u;
    let half = (e % 32u) / 16u;
    let sc = byte_at(o + n * 8u + shift + half);
    let q = (byte_at(o + 16u + 32u * n + 16u * half + e % 16u) >> shift) & 3u;
    return {} - {};
",
            kept("half_at(o + 80u) * f32(sc & 15u) * f32(q)"),
            kept("half_at(o + 82u) * f32(sc >> 4u)")
        ),
        _ => return None,
    })
}

fn quantize(format: WeightFormat) -> String {
    // Block values and bytes, and the encoder (with its helpers).
    let Some((values, bytes, encode, _, helpers)) = block_codec(format) else {
        unreachable!("`gpu::supports` keeps quantization into {format:?} on the host")
    };
    let per = blocks_per_invocation(format);
    let words = (per * bytes).div_ceil(4);
    let mut s = format!(
        "{ROUND_F16}{F16_BITS}{EXACT}{CORRECTLY_ROUNDED}const WORDS: u32 = {words}u;\nvar<private> acc: array<u32, {words}>;\n"
    );
    s.push_str(PUT);
    s.push_str(helpers);
    s.push_str(ENTRY);
    let _ = write!(
        s,
        "    let unit = gi * WG + t;
    if (unit * {per}u >= p.blocks) {{ return; }}
    for (var b = 0u; b < {per}u; b = b + 1u) {{
        let block = unit * {per}u + b;
        if (block >= p.blocks) {{ break; }}
        let at = block * {values}u;
        let o = b * {bytes}u;
{encode}    }}
    let count = min({per}u, p.blocks - unit * {per}u);
    let used = (count * {bytes}u + 3u) / 4u;
    for (var w = 0u; w < used; w = w + 1u) {{ q[unit * WORDS + w] = acc[w]; }}
}}
"
    );
    s
}

/// Blocks one invocation of a [`Shader::Quantize`] encodes: whole words of output (two
/// blocks where one is not a multiple of 4 bytes: q8_0, q4_0, q6_k), so that no two
/// invocations write one word.
pub fn blocks_per_invocation(format: WeightFormat) -> usize {
    let bytes = format.row_bytes(format.block().unwrap_or(1));
    if bytes.is_multiple_of(4) { 1 } else { 2 }
}

/// A quantization of a whole `[rows, k]` matrix into nf4 or an affine integer format
/// ([`Shader::GroupScales`], [`Shader::GroupCodes`]), byte for byte as the reference
/// lays it out and the CPU's generated quantizer computes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupQuantize {
    /// The format (nf4 or affine).
    pub format: WeightFormat,
    /// Rows.
    pub rows: usize,
    /// Values per row.
    pub k: usize,
}

impl GroupQuantize {
    /// Values.
    fn len(&self) -> usize {
        self.rows * self.k
    }

    /// Bits per code.
    fn bits(&self) -> usize {
        group_params(self.format)
            .1
            .map_or(4, |(bits, _)| usize::from(bits))
    }

    /// Values per scale group.
    fn group(&self) -> usize {
        values_per_group(self.format)
    }

    /// Scale groups.
    pub fn groups(&self) -> usize {
        self.len() / self.group().max(1)
    }

    /// The scales' type.
    fn scale(&self) -> DType {
        group_params(self.format).0
    }

    /// Bytes of the codes.
    fn code_bytes(&self) -> usize {
        (self.len() * self.bits()).div_ceil(8)
    }

    /// Bytes of the whole quantized matrix: codes, scales, and the zero points of an
    /// asymmetric affine format.
    pub fn bytes(&self) -> usize {
        let points = match self.format {
            WeightFormat::Affine {
                symmetric: false, ..
            } => self.groups(),
            _ => 0,
        };
        self.code_bytes() + self.groups() * self.scale().size_bytes() + points
    }

    /// A name for the shaders.
    fn name(&self) -> String {
        format!("{}_{}x{}", self.format.name(), self.rows, self.k)
    }

    /// The constants and helpers both passes share (the bounds come as parameters,
    /// `groups` and `words`, the rest is static): sizes, rounding, and `members(g)`
    /// (a group's first value and the distance between its values) and `group_of(e)`.
    fn common(&self) -> String {
        let (k, group) = (self.k, self.group());
        let along_rows = matches!(self.format, WeightFormat::Affine { axis: 0, .. });
        let mut s = format!(
            "{ROUND_F16}{ROUND_BF16}{F16_BITS}{EXACT}{CORRECTLY_ROUNDED}const N: u32 = {}u;\nconst K: u32 = {k}u;\nconst GROUP: u32 = {group}u;\n",
            self.len(),
        );
        if along_rows {
            // Group (band, c): rows band * GROUP.. of column c.
            s.push_str(
                "fn members(g: u32) -> vec2<u32> { return vec2<u32>((g / K) * GROUP * K + g % K, K); }
fn group_of(e: u32) -> u32 { return (e / K / GROUP) * K + e % K; }
",
            );
        } else {
            s.push_str(
                "fn members(g: u32) -> vec2<u32> { return vec2<u32>(g * GROUP, 1u); }
fn group_of(e: u32) -> u32 { return e / GROUP; }
",
            );
        }
        s
    }

    /// Pass one: each group's scale and zero point into `s`.
    fn scales(&self) -> String {
        let mut s = self.common();
        s.push_str(ENTRY);
        s.push_str(
            "    let g = gi * WG + t;
    if (g >= p.groups) { return; }
    let m = members(g);
",
        );
        s.push_str(&group_range(self.format, "x[m.x + i * m.y]"));
        s.push_str("    s[2u * g] = scale;\n    s[2u * g + 1u] = point;\n}\n");
        s
    }

    /// Pass two: the output words.
    fn codes(&self) -> String {
        let mut s = self.common();
        let bits = self.bits();
        let size = self.scale().size_bytes();
        let scale_bits = match self.scale() {
            DType::F16 => "f16_bits(v)",
            DType::BF16 => "bitcast<u32>(v) >> 16u",
            _ => "bitcast<u32>(v)",
        };
        let _ = write!(
            s,
            "const CODE_BYTES: u32 = {}u;\nconst SCALE_BYTES: u32 = {}u;\nconst TOTAL: u32 = {}u;\n",
            self.code_bytes(),
            self.groups() * size,
            self.bytes()
        );
        s.push_str(&group_coder(self.format));
        s.push_str(
            "fn code(e: u32) -> u32 {
    let g = group_of(e);
    return code_of(x[e], s[2u * g], s[2u * g + 1u]);
}
",
        );
        let _ = write!(
            s,
            "fn byte_at(o: u32) -> u32 {{
    if (o < CODE_BYTES) {{
        var b = 0u;
        for (var j = 0u; j < {per}u; j = j + 1u) {{
            let e = o * {per}u + j;
            if (e < N) {{ b = b | (code(e) << (j * {bits}u)); }}
        }}
        return b;
    }}
    let so = o - CODE_BYTES;
    if (so < SCALE_BYTES) {{
        let v = s[2u * (so / {size}u)];
        return (({scale_bits}) >> (8u * (so % {size}u))) & 0xffu;
    }}
    let zo = so - SCALE_BYTES;
    if (o < TOTAL) {{ return u32(s[2u * zo + 1u]); }}
    return 0u;
}}
",
            per = 8 / bits,
        );
        s.push_str(ENTRY);
        s.push_str(
            "    let w = gi * WG + t;
    if (w >= p.words) { return; }
    var word = 0u;
    for (var i = 0u; i < 4u; i = i + 1u) { word = word | (byte_at(4u * w + i) << (8u * i)); }
    q[w] = word;
}
",
        );
        s
    }
}

/// The scale type and, for an affine format, the bits of a group-quantized format.
fn group_params(format: WeightFormat) -> (DType, Option<(u8, bool)>) {
    match format {
        WeightFormat::Nf4 { scale, .. } => (scale, None),
        WeightFormat::Affine {
            bits,
            symmetric,
            scale,
            ..
        } => (scale, Some((bits, symmetric))),
        other => unreachable!("no group quantizer for {other:?}"),
    }
}

/// WGSL statements that set `scale` and `point` (the zero point as the reference stores
/// it, 0 for nf4 and symmetric groups) from the `GROUP` values `member` (an expression in
/// the loop index `i`), as the reference quantizes a group of nf4 or an affine format.
fn group_range(format: WeightFormat, member: &str) -> String {
    let (scale_type, affine) = group_params(format);
    let round = |e: &str| rounded(scale_type, e);
    let Some((bits, symmetric)) = affine else {
        return format!(
            "    var most = 0.0;
    for (var i = 0u; i < GROUP; i = i + 1u) {{ most = max(most, abs({member})); }}
    let scale = {};
    let point = 0.0;
",
            round("most")
        );
    };
    let levels = (1u32 << bits) as f32;
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let range = format!(
        "    // The reference's strict comparisons: the first of equal values stays.
    var lo = bitcast<f32>(0x7f800000u);
    var hi = -lo;
    for (var i = 0u; i < GROUP; i = i + 1u) {{
        let v = {member};
        lo = lower(lo, v);
        hi = higher(hi, v);
    }}
"
    );
    if symmetric {
        format!(
            "{range}    let scale = {};
    let point = 0.0;
",
            round(&format!("div_rn(max(abs(lo), abs(hi)), {})", float(qmax)))
        )
    } else {
        format!(
            "{range}    // The range includes 0 (a +0).
    let low = select(0.0, lo, lo < 0.0);
    let high = select(0.0, hi, hi > 0.0);
    let scale = {};
    let zero = clamp(round_away(div_rn(-low, scale)), 0.0, {top});
    let point = select(f32(i32(zero)), 0.0, scale == 0.0);
",
            round(&format!("div_rn(high - low, {})", float(levels - 1.0))),
            top = float(levels - 1.0)
        )
    }
}

/// The NormalFloat levels as the elements of a WGSL array.
fn nf4_levels() -> String {
    let levels: Vec<String> = llm_ir::interp::quant::NF4_LEVELS
        .iter()
        .map(|&l| float(l))
        .collect();
    format!("array<f32, 16>({})", levels.join(", "))
}

/// WGSL functions `code_of(v, scale, point)`, the code of value `v` in a group with that
/// scale and zero point ([`group_range`]), and `decoded(code, scale, point)`, the value the
/// reference's dequantization gives for a code, for nf4 or an affine format.
fn group_coder(format: WeightFormat) -> String {
    let Some((bits, symmetric)) = group_params(format).1 else {
        return format!(
            "// The first of the NormalFloat levels nearest to v / scale (level 7, zero, for a zero scale).
fn code_of(v: f32, scale: f32, point: f32) -> u32 {{
    var levels = {levels};
    let q = div_rn(v, scale);
    var best = 0u;
    var distance = abs(q - levels[0]);
    for (var i = 1u; i < 16u; i = i + 1u) {{
        let d = abs(q - levels[i]);
        if (d < distance) {{ best = i; distance = d; }}
    }}
    return select(best, 7u, scale == 0.0);
}}
fn decoded(code: u32, scale: f32, point: f32) -> f32 {{
    var levels = {levels};
    return levels[code] * scale;
}}
",
            levels = nf4_levels()
        );
    };
    let levels = (1u32 << bits) as f32;
    let qmax = ((1i32 << (bits - 1)) - 1) as f32;
    let (clamped, value) = if symmetric {
        (
            format!("clamp(q, {}, {})", float(-qmax), float(qmax)),
            format!("bitcast<i32>(code << {0}u) >> {0}u", 32 - bits),
        )
    } else {
        (
            format!("clamp(q + point, 0.0, {})", float(levels - 1.0)),
            "i32(code) - i32(point)".to_string(),
        )
    };
    format!(
        "// round(v / scale) (0 for a zero scale), offset by the zero point and clamped.
fn code_of(v: f32, scale: f32, point: f32) -> u32 {{
    let q = select(round_away(div_rn(v, scale)), 0.0, scale == 0.0);
    return u32(i32({clamped})) & {mask}u;
}}
fn decoded(code: u32, scale: f32, point: f32) -> f32 {{
    return f32({value}) * scale;
}}
",
        mask = (1u32 << bits) - 1
    )
}

fn cast(from: DType, to: DType) -> String {
    let mut s = String::new();
    let value = if from.is_float() { "x[e]" } else { "f32(x[e])" };
    let expr = match to {
        DType::F16 | DType::BF16 | DType::F32 => {
            s.push_str(rounding(to));
            rounded(to, value)
        }
        // Truncation toward zero, saturating at the target's range (NaN gives 0). NaN is
        // tested on the bits: drivers may fold `x != x` to false (lavapipe does).
        int if from.is_float() => {
            let nan = "(bitcast<u32>(x[e]) & 0x7fffffffu) > 0x7f800000u";
            if int == DType::I8 {
                format!("select(i32(clamp(x[e], -128.0, 127.0)), 0, {nan})")
            } else {
                // 2^31 and above saturate to i32::MAX (the largest f32 below is 2^31 - 128).
                format!(
                    "select(select(i32(max(x[e], -2147483648.0)), 2147483647, x[e] >= 2147483648.0), 0, {nan})"
                )
            }
        }
        DType::I8 => "(x[e] << 24u) >> 24u".to_string(),
        _ => "x[e]".to_string(),
    };
    // The device holds i64 values in 32 bits: a float beyond them is a fault (the step's
    // number, `p.step`; the call reports the lowest as an error); NaN gives 0 and fits.
    let faults = from.is_float() && to == DType::I64;
    if faults {
        s.push_str(
            "fn beyond_32_bits(v: f32) -> bool {
    let nan = (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
    return !nan && !(v >= -2147483648.0 && v < 2147483648.0);
}
",
        );
    }
    s.push_str(ENTRY);
    let _ = writeln!(
        s,
        "    let e = gi * WG + t;\n    if (e >= p.len) {{ return; }}"
    );
    if faults {
        s.push_str("    if (beyond_32_bits(x[e])) { atomicMin(&fault[0], p.step); }\n");
    }
    let _ = writeln!(s, "    y[e] = {expr};\n}}");
    s
}

fn batched_matmul(transposed: bool) -> String {
    let w = if transposed {
        "w[wbase + j * p.k + i]"
    } else {
        "w[wbase + i * p.n + j]"
    };
    let mut s = String::from(ENTRY);
    let _ = write!(
        s,
        "    let e = gi * WG + t;
    if (e >= p.batch * p.m * p.n) {{ return; }}
    let b = e / (p.m * p.n);
    let row = (e / p.n) % p.m;
    let j = e % p.n;
    let xbase = (b * p.m + row) * p.k;
    let wbase = select(0u, b * p.k * p.n, p.rhs_batched != 0u);
    var acc = 0.0;
    for (var i = 0u; i < p.k; i = i + 1u) {{ acc = acc + x[xbase + i] * {w}; }}
    y[e] = acc;
}}
"
    );
    s
}

fn kv_gather(row: usize, element: KvElement) -> String {
    let mut s = format!("{}const ROW: u32 = {row}u;\n{ENTRY}", kv_readers(element));
    s.push_str(
        "    let e = gi * WG + t;
    if (e >= p.len * ROW) { return; }
    let pos = e / ROW;
    let slot = u32(tables[pos / p.block]) * p.block + pos % p.block;
    ko[e] = key(slot * ROW + e % ROW);
    vo[e] = value(slot * ROW + e % ROW);
}
",
    );
    s
}

fn gather(dim: usize, vocab: usize, table: WeightFormat) -> String {
    let row = "(id - p.first) * DIM + e % DIM";
    let read = match table {
        WeightFormat::F32 => format!("table[{row}]"),
        WeightFormat::F16 => format!("f32(table[{row}])"),
        _ => "weight_at(id - p.first, e % DIM)".to_string(),
    };
    let mut s = format!("const DIM: u32 = {dim}u;\n");
    if !matches!(table, WeightFormat::F32 | WeightFormat::F16) {
        // The quantized table is the "weight" of its format's reader.
        let as_weight = Contraction::plain(dim, vocab, table);
        let _ = writeln!(s, "const K: u32 = DIM;");
        s.push_str(&weight_prelude(&as_weight, "table", true));
    }
    s.push_str(ENTRY);
    let _ = write!(
        s,
        "    let e = gi * WG + t;
    if (e >= p.count * DIM) {{ return; }}
    let id = u32(ids[e / DIM]);
    if (id >= p.first && id < p.first + p.part_rows) {{
        y[e] = {read};
    }}
}}
"
    );
    s
}

fn columns(width: usize, offset: usize, len: usize) -> String {
    let mut s = format!(
        "const WIDTH: u32 = {width}u;\nconst OFFSET: u32 = {offset}u;\nconst LEN: u32 = {len}u;\n{ENTRY}"
    );
    s.push_str(
        "    let e = gi * WG + t;
    if (e >= p.rows * LEN) { return; }
    y[e] = x[(e / LEN) * WIDTH + OFFSET + e % LEN];
}
",
    );
    s
}
