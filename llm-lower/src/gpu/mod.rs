//! The GPU backend: the kernel families of [`crate::kernel`] as WGSL compute shaders
//! ([`wgsl`]), validated with naga before use, run through wgpu by a [`Program`] that
//! keeps weights and the paged KV pool in device memory.
//!
//! Device limits are compiler inputs ([`Limits`]): a weight larger than one storage binding
//! is split into row parts, kernels that would need more storage buffers or workgroup
//! memory than the device allows run through the reference semantics, and workgroup grids
//! are folded to the device's per-dimension limit.

mod call;
mod device;
mod ieee;
mod pool;
mod probe;
mod program;
mod tensor;
pub mod wgsl;

pub use device::{ATTENTION_CHUNK, Gpu, GpuOptions};
pub use pool::{copy_block, read_cache};
pub use probe::ReadProbe;
pub use program::{Compiler, LoweringStats, Program, Rows};

use std::fmt;

use pliron::{builtin::ops::ModuleOp, context::Context};

use crate::kernel::{AttentionSource, Kernel, KvRounding};

/// An error from the GPU backend (no adapter, a shader the device rejects, a weight that
/// cannot be split to fit the limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuError(pub String);

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GpuError {}

/// The device limits the compiler plans for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes one storage binding may cover.
    pub max_binding_bytes: u64,
    /// Storage buffers one shader may bind.
    pub max_storage_buffers: u32,
    /// Bytes of workgroup memory one shader may declare.
    pub max_workgroup_bytes: u32,
    /// Workgroups per grid dimension.
    pub max_workgroups_per_dim: u32,
}

impl Limits {
    /// The limits of `limits` (a wgpu device's).
    pub fn of(limits: &wgpu::Limits) -> Limits {
        Limits {
            max_binding_bytes: limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size),
            max_storage_buffers: limits.max_storage_buffers_per_shader_stage,
            max_workgroup_bytes: limits.max_compute_workgroup_storage_size,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
        }
    }

    /// WebGPU's default limits (128 MiB bindings, 8 storage buffers per stage): what any
    /// conforming device offers.
    pub fn webgpu() -> Limits {
        Limits::of(&wgpu::Limits::default())
    }

    /// Whether `shader` fits these limits.
    pub fn admit(&self, shader: &wgsl::Shader) -> Result<(), String> {
        let buffers = shader.bindings().len();
        if buffers > self.max_storage_buffers as usize {
            return Err(format!(
                "{} binds {buffers} storage buffers, the device allows {}",
                shader.name(),
                self.max_storage_buffers
            ));
        }
        let bytes = shader.workgroup_bytes();
        if bytes > self.max_workgroup_bytes as usize {
            return Err(format!(
                "{} needs {bytes} bytes of workgroup memory, the device allows {}",
                shader.name(),
                self.max_workgroup_bytes
            ));
        }
        Ok(())
    }
}

/// Whether the GPU backend runs `kernel` on the device: every family, sharded values
/// included (each mesh device's shard is a device tensor), and KV caches of every storage
/// (appends rounded on the device, [`wgsl::kv_appends_on_device`]); the folds of a
/// collective are not selected from ops of their own.
pub fn supports(kernel: &Kernel) -> bool {
    match kernel {
        Kernel::KvAppend { rounding, .. }
        | Kernel::KvLookup { rounding, .. }
        | Kernel::Attention {
            source: AttentionSource::Paged { rounding, .. },
            ..
        } => match rounding {
            KvRounding::Quantized(format) => format.is_some_and(wgsl::kv_appends_on_device),
            _ => true,
        },
        // Only the collectives fold (no op selects a fold of its own).
        Kernel::Fold(_) => false,
        _ => true,
    }
}

/// The test suites' device policy: a device opened with `options`, or `None` (with a
/// note on stderr) when there is no adapter; with `REQUIRE_GPU` set (CI, on lavapipe) a
/// missing adapter is a test failure instead, so GPU tests cannot silently skip there.
pub fn test_device(options: &GpuOptions) -> Option<Gpu> {
    match Gpu::new(options) {
        Ok(gpu) => {
            eprintln!(
                "GPU checks on {} (f16 storage: {}, subgroups: {})",
                gpu.adapter(),
                gpu.has_f16(),
                gpu.has_subgroups()
            );
            Some(gpu)
        }
        Err(e) if std::env::var_os("REQUIRE_GPU").is_some() => {
            panic!("REQUIRE_GPU is set but there is no GPU: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPING the GPU checks: {e}");
            None
        }
    }
}

/// Parses and validates a WGSL `source` with naga (no device needed); the error is naga's
/// report with line and column.
pub fn validate(source: &str) -> Result<(), GpuError> {
    use wgpu::naga;
    let module =
        naga::front::wgsl::parse_str(source).map_err(|e| GpuError(e.emit_to_string(source)))?;
    // Shaders that read f16 storage say so with `enable f16;` (and are only compiled for
    // devices with `shader-f16`).
    let mut capabilities = naga::valid::Capabilities::empty();
    if source.starts_with("enable f16;") {
        capabilities |= naga::valid::Capabilities::SHADER_FLOAT16;
    }
    // Subgroup operations appear only in sources made for devices that have them.
    if source.contains("subgroupAdd(") {
        capabilities |= naga::valid::Capabilities::SUBGROUP;
    }
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities)
        .validate(&module)
        .map_err(|e| GpuError(e.emit_to_string(source)))?;
    Ok(())
}

/// The WGSL shaders of every function in `module`, planned for WebGPU's default limits so
/// that the text does not depend on the machine (`llm-opt --emit=wgsl`): per function a
/// summary line (shader and op counts, ops still run through their reference semantics),
/// then each distinct shader, validated with naga.
pub fn emit_wgsl(ctx: &Context, module: ModuleOp) -> Result<String, GpuError> {
    let mut out = String::new();
    for func in crate::layout::functions(ctx, module) {
        out.push_str(&program::listing(ctx, func, &Limits::webgpu())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use llm_ir::{
        dtype::DType,
        interp::{
            KvBlocks, KvElement,
            eval::{
                attention::{Scale, Scoring},
                fused::{ScalarBody, ScalarStep},
            },
        },
        types::Reduction,
    };

    use super::{
        validate,
        wgsl::{GroupQuantize, Shader},
    };
    use crate::kernel::{Contraction, KvRounding, WeightFormat};

    /// Every shader family, in its variants, passes naga's validation (no device needed).
    #[test]
    fn every_shader_validates() {
        let mut shaders = Vec::new();
        let mut formats = vec![
            WeightFormat::F32,
            WeightFormat::F16,
            WeightFormat::Q8_0,
            WeightFormat::Q4_0,
            WeightFormat::Q4_1,
            WeightFormat::Q5_0,
            WeightFormat::Q5_1,
            WeightFormat::Iq4Nl,
            WeightFormat::Q4K,
            WeightFormat::Q6K,
            WeightFormat::Q2K,
            WeightFormat::Q3K,
            WeightFormat::Q5K,
            WeightFormat::Iq4Xs,
            WeightFormat::Iq3Xxs,
            WeightFormat::Iq3S,
            WeightFormat::Iq2Xxs,
            WeightFormat::Iq2Xs,
            WeightFormat::Iq2S,
            WeightFormat::Iq1S,
            WeightFormat::Iq1M,
            WeightFormat::Tq1_0,
            WeightFormat::Tq2_0,
            WeightFormat::Q1_0,
            WeightFormat::Mxfp4,
            WeightFormat::Nvfp4,
            WeightFormat::PackedF16,
            WeightFormat::PackedBF16,
        ];
        for scale in [DType::F32, DType::F16, DType::BF16] {
            formats.push(WeightFormat::Nf4 { block: 64, scale });
            for (bits, symmetric, axis) in [(8, true, 1), (4, false, 0), (2, true, 0)] {
                formats.push(WeightFormat::Affine {
                    bits,
                    group: 32,
                    symmetric,
                    axis,
                    scale,
                });
            }
        }
        for weight in formats {
            for norm in [None, Some(1e-5f32.to_bits())] {
                for residual in [false, true] {
                    shaders.push(Shader::Contraction(Contraction {
                        norm_eps_bits: norm,
                        residual,
                        ..Contraction::plain(256, 32, weight)
                    }));
                }
            }
        }
        let body = ScalarBody {
            args: 2,
            result: 5,
            steps: vec![
                ScalarStep::Unary("llm.silu", 0),
                ScalarStep::Constant(0.5),
                ScalarStep::Binary("llm.mul", 2, 1),
                ScalarStep::Binary("llm.add", 4, 3),
            ],
            dtype: DType::F32,
        };
        shaders.push(Shader::Elementwise(body.clone()));
        shaders.push(Shader::Strided(body.clone()));
        for dtype in [DType::F16, DType::BF16] {
            shaders.push(Shader::Strided(ScalarBody {
                dtype,
                ..body.clone()
            }));
        }
        for op in llm_ir::interp::eval::elementwise::UNARY {
            shaders.push(Shader::Elementwise(ScalarBody {
                args: 1,
                result: 1,
                steps: vec![ScalarStep::Unary(op.0, 0)],
                dtype: DType::F32,
            }));
        }
        let eps_bits = 1e-6f32.to_bits();
        let nf4 = GroupQuantize {
            format: WeightFormat::Nf4 {
                block: 16,
                scale: DType::BF16,
            },
            rows: 3,
            k: 32,
        };
        // Asymmetric groups along the rows, f16 scales; symmetric along each row, f32.
        let int4_rows = GroupQuantize {
            format: WeightFormat::Affine {
                bits: 4,
                group: 2,
                symmetric: false,
                axis: 0,
                scale: DType::F16,
            },
            rows: 4,
            k: 6,
        };
        let int8 = GroupQuantize {
            format: WeightFormat::Affine {
                bits: 8,
                group: 8,
                symmetric: true,
                axis: 1,
                scale: DType::F32,
            },
            rows: 2,
            k: 16,
        };
        shaders.extend([
            Shader::RmsNorm { d: 70, eps_bits },
            Shader::LayerNorm { d: 70, eps_bits },
            Shader::Softmax { n: 33, inner: 1 },
            Shader::Argmax { n: 33, inner: 1 },
            Shader::Softmax { n: 5, inner: 6 },
            Shader::Argmax { n: 5, inner: 6 },
            Shader::Permute,
            Shader::Place,
            Shader::Fold(Reduction::Sum),
            Shader::Fold(Reduction::Max),
            Shader::Fold(Reduction::Min),
            Shader::Agree,
            Shader::BatchedMatmul { transposed: false },
            Shader::Quantize {
                format: WeightFormat::Q8_0,
            },
            Shader::Quantize {
                format: WeightFormat::Q4_0,
            },
            Shader::Quantize {
                format: WeightFormat::Q4_1,
            },
            Shader::Quantize {
                format: WeightFormat::Q4K,
            },
            Shader::Quantize {
                format: WeightFormat::Q6K,
            },
            Shader::Quantize {
                format: WeightFormat::Q2K,
            },
            Shader::GroupScales(nf4),
            Shader::GroupCodes(nf4),
            Shader::GroupScales(int4_rows),
            Shader::GroupCodes(int4_rows),
            Shader::GroupScales(int8),
            Shader::GroupCodes(int8),
            Shader::Cast {
                from: DType::F32,
                to: DType::F16,
            },
            Shader::Cast {
                from: DType::I64,
                to: DType::BF16,
            },
            Shader::Cast {
                from: DType::F16,
                to: DType::I8,
            },
            Shader::Cast {
                from: DType::BF16,
                to: DType::I64,
            },
            Shader::Cast {
                from: DType::I32,
                to: DType::I8,
            },
            Shader::BatchedMatmul { transposed: true },
            Shader::KvAppend {
                row: 48,
                rounding: KvRounding::Exact,
            },
            Shader::KvAppend {
                row: 48,
                rounding: KvRounding::Float(DType::F16),
            },
            Shader::KvAppend {
                row: 48,
                rounding: KvRounding::Float(DType::BF16),
            },
            Shader::KvAppend {
                row: 64,
                rounding: KvRounding::Quantized(Some(WeightFormat::Q8_0)),
            },
            Shader::KvGather {
                row: 48,
                element: KvElement::F32,
            },
            Shader::KvGather {
                row: 48,
                element: KvElement::F16,
            },
            Shader::KvGather {
                row: 48,
                element: KvElement::BF16,
            },
            Shader::KvAppend {
                row: 64,
                rounding: KvRounding::Quantized(Some(WeightFormat::Q4_0)),
            },
            Shader::KvAppend {
                row: 64,
                rounding: KvRounding::Quantized(Some(WeightFormat::Q4_1)),
            },
            Shader::KvAppend {
                row: 512,
                rounding: KvRounding::Quantized(Some(WeightFormat::Q4K)),
            },
            Shader::KvAppend {
                row: 512,
                rounding: KvRounding::Quantized(Some(WeightFormat::Q6K)),
            },
            Shader::KvAppend {
                row: 512,
                rounding: KvRounding::Quantized(Some(WeightFormat::Q2K)),
            },
            Shader::KvAppend {
                row: 64,
                rounding: KvRounding::Quantized(Some(WeightFormat::Nf4 {
                    block: 32,
                    scale: DType::BF16,
                })),
            },
            Shader::KvAppend {
                row: 64,
                rounding: KvRounding::Quantized(Some(WeightFormat::Affine {
                    bits: 4,
                    group: 16,
                    symmetric: false,
                    axis: 1,
                    scale: DType::F16,
                })),
            },
            Shader::KvAppend {
                row: 64,
                rounding: KvRounding::Quantized(Some(WeightFormat::Affine {
                    bits: 8,
                    group: 64,
                    symmetric: true,
                    axis: 1,
                    scale: DType::F32,
                })),
            },
            Shader::Gather {
                dim: 7,
                vocab: 5,
                table: WeightFormat::F32,
            },
            Shader::Gather {
                dim: 7,
                vocab: 5,
                table: WeightFormat::F16,
            },
            Shader::Columns {
                width: 9,
                offset: 2,
                len: 4,
            },
        ]);
        for half in [false, true] {
            shaders.push(Shader::Rope {
                heads: 3,
                d: 8,
                rotary: 6,
                half,
            });
        }
        let blocks = [
            KvBlocks::Q8_0,
            KvBlocks::Q4_0,
            KvBlocks::Q4_1,
            KvBlocks::Q4K,
            KvBlocks::Q6K,
            KvBlocks::Q2K,
        ]
        .map(KvElement::Blocks);
        for element in blocks {
            shaders.push(Shader::KvGather { row: 512, element });
        }
        let pools = [KvElement::F32, KvElement::F16, KvElement::BF16]
            .into_iter()
            .chain(blocks)
            .map(Some);
        for (paged, masked) in [(None, false), (None, true)]
            .into_iter()
            .chain(pools.map(|p| (p, false)))
        {
            let scorings = [
                (8, Scale::DivSqrt(8f32.sqrt()), None),
                (130, Scale::Times(0.1), Some(50.0)),
            ];
            for (d, scale, softcap) in scorings {
                let scoring = Scoring { scale, softcap };
                for (split, sinks) in [false, true]
                    .into_iter()
                    .flat_map(|s| [(s, false), (s, true)])
                {
                    shaders.push(Shader::Attention {
                        heads: 4,
                        kv_heads: 2,
                        d,
                        scoring,
                        paged,
                        masked,
                        split,
                        sinks,
                    });
                }
                shaders.push(Shader::AttentionCombine { heads: 4, d });
            }
        }
        let tiled: Vec<Shader> = shaders
            .iter()
            .filter_map(|s| match s {
                Shader::Contraction(c) => Some(Shader::TiledContraction(*c)),
                _ => None,
            })
            .collect();
        let gathers: Vec<Shader> = shaders
            .iter()
            .filter_map(|s| match s {
                Shader::Contraction(c) if c.weight.block() != Some(1) => Some(Shader::Gather {
                    dim: c.k,
                    vocab: c.n,
                    table: c.weight,
                }),
                _ => None,
            })
            .collect();
        let dequantize: Vec<Shader> = shaders
            .iter()
            .filter_map(|s| match s {
                Shader::Contraction(c) if c.weight.block() != Some(1) => {
                    Some(Shader::Dequantize(*c))
                }
                _ => None,
            })
            .collect();
        for s in shaders
            .into_iter()
            .chain(tiled)
            .chain(dequantize)
            .chain(gathers)
        {
            for subgroups in [false, true] {
                let source = s.source_for(subgroups);
                if let Err(e) = validate(&source) {
                    panic!("{}:\n{e}\n{source}", s.name());
                }
            }
        }
    }
}
