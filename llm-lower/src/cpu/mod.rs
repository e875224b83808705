//! The CPU backend: [`kernel`](crate::kernel) families generated as Cranelift IR, JIT
//! compiled, and called by a [`Program`] that runs a whole function.
//!
//! See `docs/lowering.md` for the kernels' loop shapes and which ops still run through
//! their reference semantics.

pub mod attention;
pub mod calls;
pub mod codegen;
pub mod convert;
pub mod dequant;
pub mod emit;
mod experts;
pub mod fp4;
pub mod jit;
pub mod kq8dot;
pub mod kquant;
pub mod kquantize;
#[cfg(target_arch = "x86_64")]
mod kv_blocks;
pub mod lattice;
pub mod plan;
pub mod pool;
pub mod program;
pub mod q8dot;
pub mod quantize;
pub mod tables;
pub mod ternary;
pub mod ukernel;
pub mod workers;

use pliron::{
    builtin::{op_interfaces::SymbolOpInterface, ops::ModuleOp},
    context::Context,
    linked_list::ContainsLinkedList,
};

pub use jit::{JitError, Target};

use crate::kernel::{Kernel, Movement};
pub use program::{Compiler, LoweringStats, Options, Program};

/// Whether the CPU backend runs `kernel`: every family, its contractions, embeddings and
/// dequantizations in every quantized format (decoded in registers, [`dequant`]); `F16`
/// weights are a GPU storage that CPU selection never produces. Data movement (reshapes,
/// slices, gathers, transposes, concatenations, the KV cache's appends and lookups) runs
/// as host copies, everything else as generated code.
pub fn supports(kernel: &Kernel) -> bool {
    match kernel {
        Kernel::Move(Movement::Rows { table, .. }) => dequant::decodes(*table),
        Kernel::Contraction(c) => dequant::decodes(c.weight),
        Kernel::Dequantize { weight, .. } => dequant::decodes(*weight),
        _ => true,
    }
}

/// The CLIF of every kernel of every function in `module`, generated for the pinned x86-64
/// feature set so that the text does not depend on the machine (`llm-opt --emit=clif`).
/// Each function starts with a comment that lists the ops still run through their
/// reference semantics.
pub fn emit_clif(ctx: &Context, module: ModuleOp) -> Result<String, JitError> {
    let mut out = String::new();
    for func in crate::layout::functions(ctx, module) {
        let all: Vec<_> = func.get_entry_block(ctx).deref(ctx).iter(ctx).collect();
        let constant = llm_ir::interp::weight_derived(ctx, &all);
        // Weight-derived ops run once, when a runtime loads the model.
        let ops = crate::selection::live_ops(ctx, &all, |r| constant.contains(&r));
        let selection =
            crate::selection::select_all(ctx, &ops, |v| constant.contains(&v), supports);
        let listed: Vec<String> = selection
            .reference_ops(ctx, &ops)
            .iter()
            .map(|(n, c)| format!("{n} x{c}"))
            .collect();
        out.push_str(&format!(
            "; @{}: {} kernel(s) for {} op(s); {} op(s) evaluated once at load; reference semantics: {}\n",
            func.get_symbol_name(ctx),
            selection.kernels.len(),
            selection.kernel_ops(),
            all.len() - ops.len(),
            if listed.is_empty() {
                "none".to_string()
            } else {
                listed.join(", ")
            }
        ));
        let mut listings = Vec::new();
        jit::compile(
            &selection.kernels,
            Target::PinnedX86,
            true,
            Some(&mut listings),
        )?;
        for listing in listings {
            out.push_str(&format!("; {}\n{}\n", listing.name, listing.clif));
        }
    }
    Ok(out)
}
