//! The Cranelift JIT: target ISA selection, compilation of a batch of kernels into one
//! code allocation, and CLIF text for `llm-opt --emit=clif`.

#![allow(
    unsafe_code,
    reason = "JIT code is entered through transmuted function pointers"
)]

use cranelift_codegen::{
    ir::{AbiParam, Function, InstBuilder, UserFuncName, types},
    isa::{OwnedTargetIsa, TargetFrontendConfig},
    settings::{self, Configurable},
};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module, default_libcall_names};

use super::{attention, codegen, kq8dot, kquant, lattice, q8dot, ukernel};
use crate::kernel::{Kernel, WeightFormat};

/// Which instruction set the code is generated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The machine this runs on (CPUID decides: SSE4, AVX, AVX2, FMA, ...).
    Host,
    /// A fixed x86-64 feature set (SSE4.2, AVX, AVX2, FMA), so that CLIF and machine code
    /// dumps do not depend on the machine; used by snapshot tests.
    PinnedX86,
}

/// An error while generating or compiling code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitError(pub String);

impl std::fmt::Display for JitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JitError {}

fn fail(what: &str, e: impl std::fmt::Display) -> JitError {
    JitError(format!("{what}: {e}"))
}

/// Builds the target ISA. Kernels are compiled with `opt_level = none`: cranelift.md found
/// that the e-graph optimiser spills hand-blocked loops (2x slower matvec) and the kernels
/// already have the loop shape they need.
pub fn isa(target: Target) -> Result<OwnedTargetIsa, JitError> {
    let mut flags = settings::builder();
    for (k, v) in [
        ("opt_level", "none"),
        ("is_pic", "false"),
        ("use_colocated_libcalls", "false"),
        (
            "enable_verifier",
            if cfg!(debug_assertions) {
                "true"
            } else {
                "false"
            },
        ),
    ] {
        flags.set(k, v).map_err(|e| fail("flag", e))?;
    }
    let builder = match target {
        Target::Host => cranelift_native::builder().map_err(|e| fail("host ISA", e))?,
        Target::PinnedX86 => {
            let mut b = cranelift_codegen::isa::lookup_by_name("x86_64-unknown-linux-gnu")
                .map_err(|e| fail("x86-64 ISA", e))?;
            for f in [
                "has_sse3",
                "has_ssse3",
                "has_sse41",
                "has_sse42",
                "has_avx",
                "has_avx2",
                "has_fma",
            ] {
                b.enable(f).map_err(|e| fail(f, e))?;
            }
            b
        }
    };
    builder
        .finish(settings::Flags::new(flags))
        .map_err(|e| fail("ISA", e))
}

/// Kernels compiled into one JIT code allocation. The code stays mapped while this lives.
pub struct CompiledKernels {
    module: Option<JITModule>,
    entries: Vec<*const u8>,
    /// Whether the kernels call the Rust microkernels.
    tiles: bool,
}

// SAFETY: the finalized code is immutable and the entry points are plain function pointers;
// the module is only touched again by `Drop`, which has `&mut self`.
unsafe impl Send for CompiledKernels {}
// SAFETY: as above; shared references only read `entries`.
unsafe impl Sync for CompiledKernels {}

impl CompiledKernels {
    /// The entry point of kernel `i` (in the order given to [`compile`]).
    pub fn entry(&self, i: usize) -> *const u8 {
        self.entries[i]
    }

    /// Whether the kernels call the Rust microkernels ([`ukernel`]) where they fit.
    pub fn tiles(&self) -> bool {
        self.tiles
    }
}

impl Drop for CompiledKernels {
    fn drop(&mut self) {
        if let Some(module) = self.module.take() {
            // SAFETY: the entry points are private to this value and its users
            // (`program::Program` holds it for as long as it may call them).
            unsafe { module.free_memory() };
        }
    }
}

/// Builds the CLIF function of `kernel` in `func`, using `fctx` as scratch.
fn build(
    func: &mut Function,
    fctx: &mut FunctionBuilderContext,
    kernel: &Kernel,
    tc: TargetFrontendConfig,
    tiles: codegen::Tiles,
) {
    let mut b = FunctionBuilder::new(func, fctx);
    let entry = b.create_block();
    b.append_block_params_for_function_params(entry);
    b.switch_to_block(entry);
    let params = b.block_params(entry).to_vec();
    codegen::emit(&mut b, kernel, &params, tiles);
    b.ins().return_(&[]);
    b.seal_all_blocks();
    b.finalize(tc);
}

/// The generated code of one kernel, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The function's name (`k0_matvec_f32panels_6x20`).
    pub name: String,
    /// Its CLIF, as generated.
    pub clif: String,
    /// Its machine code after register allocation (Cranelift's VCode text).
    pub vcode: String,
}

/// Compiles `kernels` for `target`, calling the Rust microkernels of [`ukernel`] where
/// `microkernels` allows and the target has them; `listings` receives each kernel's code
/// as text when given.
pub fn compile(
    kernels: &[Kernel],
    target: Target,
    microkernels: bool,
    mut listings: Option<&mut Vec<Listing>>,
) -> Result<CompiledKernels, JitError> {
    if let Some(k) = kernels.iter().find(|k| !super::supports(k)) {
        return Err(JitError(format!(
            "the CPU backend has no kernel for {}",
            k.name()
        )));
    }
    let mut builder = JITBuilder::with_isa(isa(target)?, default_libcall_names());
    // Pinned code is never run, so it may name the microkernel whatever this CPU has (the
    // snapshots then show the call); host code only when this CPU can run it. The symbol
    // is registered on every x86-64 host, so that an import always resolves.
    #[cfg(target_arch = "x86_64")]
    builder.symbols([
        (ukernel::PANEL_ROWS_FN, ukernel::panel_rows as *const u8),
        (
            ukernel::F16_PANEL_ROWS,
            ukernel::f16_panel_rows as *const u8,
        ),
        (
            ukernel::BF16_PANEL_ROWS,
            ukernel::bf16_panel_rows as *const u8,
        ),
        (ukernel::Q8_0_ROW, ukernel::q8_0_row as *const u8),
        (ukernel::Q4_0_ROW, ukernel::q4_0_row as *const u8),
        (ukernel::F16_ROW, ukernel::f16_row as *const u8),
        (ukernel::BF16_ROW, ukernel::bf16_row as *const u8),
        (kquant::Q4_K_ROW, kquant::q4_k_row as *const u8),
        (kquant::Q6_K_ROW, kquant::q6_k_row as *const u8),
        (
            attention::ATTENTION_ROW,
            attention::attention_row as *const u8,
        ),
    ]);
    // The q8_0-activation kernels, with VNNI's byte dot products where the CPU has them.
    #[cfg(target_arch = "x86_64")]
    for (format, rows, panels) in q8dot::SYMBOLS {
        if let Some((rows_fn, panels_fn)) = q8dot::entry_points(format) {
            builder.symbol(rows, rows_fn);
            builder.symbol(panels, panels_fn);
        }
    }
    #[cfg(target_arch = "x86_64")]
    for (format, rows) in kq8dot::SYMBOLS {
        if let Some(rows_fn) = kq8dot::entry_point(format) {
            builder.symbol(rows, rows_fn);
        }
    }
    // The lattice formats' grids, which their generated decoders read on every target.
    for (format, symbol) in lattice::GRIDS {
        builder.symbol(symbol, lattice::grid_address(format));
    }
    let use_tiles = microkernels
        && match target {
            Target::Host => ukernel::available(),
            Target::PinnedX86 => cfg!(target_arch = "x86_64"),
        };
    let mut module = JITModule::new(builder);
    let mut import = |name: &str, params: usize| -> Result<Option<FuncId>, JitError> {
        if !use_tiles {
            return Ok(None);
        }
        let mut sig = module.make_signature();
        sig.params
            .extend((0..params).map(|_| AbiParam::new(types::I64)));
        module
            .declare_function(name, Linkage::Import, &sig)
            .map(Some)
            .map_err(|e| fail(name, e))
    };
    let panel_rows = import(ukernel::PANEL_ROWS_FN, 6)?;
    let f16_panel_rows = import(ukernel::F16_PANEL_ROWS, 6)?;
    let bf16_panel_rows = import(ukernel::BF16_PANEL_ROWS, 6)?;
    let q8_0_row = import(ukernel::Q8_0_ROW, 4)?;
    let q4_0_row = import(ukernel::Q4_0_ROW, 4)?;
    let f16_row = import(ukernel::F16_ROW, 4)?;
    let bf16_row = import(ukernel::BF16_ROW, 4)?;
    // Per block format: its q8_0-activation rows kernel, the block-panels kernel where it
    // has one (the formats of 32-value blocks), and the values the kernels take a block
    // (or super-block) at a time, of which K must be a multiple (q1_0, mxfp4 and nvfp4,
    // whose blocks are smaller, go to `kq8dot` in groups of 256).
    let mut by_q8_0 = Vec::with_capacity(q8dot::SYMBOLS.len() + kq8dot::SYMBOLS.len());
    for (format, rows, panels) in q8dot::SYMBOLS {
        by_q8_0.push((format, import(rows, 8)?, import(panels, 8)?, 32));
    }
    for (format, rows) in kq8dot::SYMBOLS {
        by_q8_0.push((format, import(rows, 8)?, None, 256));
    }
    let q4_k_row = import(kquant::Q4_K_ROW, 4)?;
    let q6_k_row = import(kquant::Q6_K_ROW, 4)?;
    let attention_row = import(attention::ATTENTION_ROW, 10)?;
    let mut grids = Vec::with_capacity(lattice::GRIDS.len());
    for (format, symbol) in lattice::GRIDS {
        let id = module
            .declare_data(symbol, Linkage::Import, false, false)
            .map_err(|e| fail(symbol, e))?;
        grids.push((format, id));
    }
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    let mut ids = Vec::with_capacity(kernels.len());
    for (i, kernel) in kernels.iter().enumerate() {
        let mut sig = module.make_signature();
        sig.params
            .extend((0..codegen::param_count(kernel)).map(|_| AbiParam::new(types::I64)));
        let name = format!("k{i}_{}", kernel.name());
        let id = module
            .declare_function(&name, Linkage::Local, &sig)
            .map_err(|e| fail(&name, e))?;
        ctx.func.signature = sig;
        ctx.func.name = UserFuncName::user(0, id.as_u32());
        let mut tiles = codegen::Tiles::default();
        let weight = match kernel {
            Kernel::Contraction(c) => Some(c.weight),
            Kernel::Dequantize { weight, .. } => Some(*weight),
            _ => None,
        };
        if let Some(&(_, grid)) = grids.iter().find(|(f, _)| Some(*f) == weight) {
            tiles.grid = Some(module.declare_data_in_func(grid, &mut ctx.func));
        }
        if let Kernel::Contraction(c) = kernel {
            let mut bring =
                |id: Option<FuncId>| id.map(|id| module.declare_func_in_func(id, &mut ctx.func));
            let by_q8_0_entry = by_q8_0.iter().find(|(format, ..)| *format == c.weight);
            match (c.weight, by_q8_0_entry) {
                (_, Some(&(_, rows, panels, unit))) if c.q8_0_input && c.k.is_multiple_of(unit) => {
                    tiles.q8_0_rows = bring(rows);
                    if c.block_panels {
                        tiles.q8_0_panels = bring(panels);
                    }
                }
                (WeightFormat::F32Panels, _) => {
                    tiles.panel_rows = bring(panel_rows);
                }
                (WeightFormat::Q8_0, _) => tiles.quant_row = bring(q8_0_row),
                (WeightFormat::Q4_0, _) => tiles.quant_row = bring(q4_0_row),
                (WeightFormat::PackedF16, _) => {
                    tiles.quant_row = bring(f16_row);
                    if c.block_panels {
                        tiles.panel_rows = bring(f16_panel_rows);
                    }
                }
                (WeightFormat::PackedBF16, _) => {
                    tiles.quant_row = bring(bf16_row);
                    if c.block_panels {
                        tiles.panel_rows = bring(bf16_panel_rows);
                    }
                }
                (WeightFormat::Q4K, _) => tiles.quant_row = bring(q4_k_row),
                (WeightFormat::Q6K, _) => tiles.quant_row = bring(q6_k_row),
                _ => {}
            }
        }
        if let Kernel::Attention {
            heads, kv_heads, d, ..
        } = kernel
            && attention::row_kernel_runs(use_tiles, *heads, *kv_heads, *d)
        {
            tiles.attention =
                attention_row.map(|id| module.declare_func_in_func(id, &mut ctx.func));
        }
        build(
            &mut ctx.func,
            &mut fctx,
            kernel,
            module.target_config(),
            tiles,
        );
        let clif = listings.is_some().then(|| ctx.func.display().to_string());
        ctx.set_disasm(listings.is_some());
        module
            .define_function(id, &mut ctx)
            .map_err(|e| fail(&name, format!("{e:?}")))?;
        if let (Some(out), Some(clif)) = (listings.as_deref_mut(), clif) {
            let vcode = ctx.compiled_code().and_then(|c| c.vcode.clone());
            out.push(Listing {
                name: name.clone(),
                clif,
                vcode: vcode.unwrap_or_default(),
            });
        }
        module.clear_context(&mut ctx);
        ids.push(id);
    }
    module
        .finalize_definitions()
        .map_err(|e| fail("finalize", e))?;
    let entries = ids
        .into_iter()
        .map(|id| module.get_finalized_function(id))
        .collect();
    Ok(CompiledKernels {
        module: Some(module),
        entries,
        tiles: use_tiles,
    })
}

#[cfg(test)]
mod tests {
    use llm_ir::types::Reduction;

    use super::*;
    use crate::kernel::Contraction;

    /// A collective's fold combines as the reference does (`f32::max`/`min`: a NaN loses
    /// to a number), in the vector loop and the scalar tail alike.
    #[test]
    #[allow(unsafe_code, reason = "calls the compiled fold on checked buffers")]
    fn folds_combine_as_the_reference() {
        let a = [1.0, f32::NAN, -2.0, 3.0, 0.5, f32::NAN, 7.0, -1.0, f32::NAN];
        let b = [2.0, 4.0, f32::NAN, -3.0, 0.5, f32::NAN, -7.0, 1.0, 5.0];
        for reduction in [Reduction::Sum, Reduction::Max, Reduction::Min] {
            let compiled =
                compile(&[Kernel::Fold(reduction)], Target::Host, true, None).expect("compiles");
            // SAFETY: a fold's signature is (a, b, out, len).
            let fold: extern "C" fn(i64, i64, i64, i64) =
                unsafe { std::mem::transmute(compiled.entry(0)) };
            let mut out = [0f32; 9];
            fold(
                a.as_ptr() as i64,
                b.as_ptr() as i64,
                out.as_mut_ptr() as i64,
                a.len() as i64,
            );
            for ((x, y), got) in a.iter().zip(&b).zip(out) {
                let want = match reduction {
                    Reduction::Sum => x + y,
                    Reduction::Max => x.max(*y),
                    Reduction::Min => x.min(*y),
                };
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{reduction:?} of {x} and {y}"
                );
            }
        }
    }

    /// cranelift.md: without the FMA feature a vector `fma` becomes four libcalls (20x
    /// slower). The pinned target must keep it one instruction.
    #[test]
    fn vector_fma_is_an_instruction() {
        let kernel = Kernel::Contraction(Contraction::plain(64, 8, WeightFormat::F32Panels));
        let mut listings = Vec::new();
        compile(&[kernel], Target::PinnedX86, true, Some(&mut listings)).expect("compiles");
        let vcode = &listings[0].vcode;
        assert!(vcode.contains("vfmadd"), "{vcode}");
        assert!(!vcode.contains("FmaF32"), "{vcode}");
    }
}
