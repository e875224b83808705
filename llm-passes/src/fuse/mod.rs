//! `fuse`: rewrites that merge ops into larger kernels.
//!
//! - `matmul(x, dequantize(w), transpose_rhs)` becomes `quantized_matmul(x, w)`.
//! - Matmuls sharing their input (attention's q/k/v, SwiGLU's gate/up) become one matmul
//!   against the concatenated weights, followed by slices.
//! - `rms_norm` feeding a matmul becomes the matmul's prologue (`llm.rms_norm_matmul`).
//! - Chains of elementwise ops become one `llm.fused` op with a scalar body.
//! - `append_kv` feeding `paged_attention` becomes `llm.append_attention`.
//!
//! Every rewrite keeps the arithmetic and its order, so results are bit-identical.

mod append_attention;
mod elementwise;
mod matmul;

use pliron::{
    context::{Context, Ptr},
    operation::Operation,
};

use crate::{
    driver::{self, Pattern},
    pass::{Pass, PassError, PassInfo, PassOptions, Scope},
};

/// The registry entry.
pub const INFO: PassInfo = PassInfo {
    name: "fuse",
    summary: "fuse dequantize+matmul, sibling matmuls, rms_norm prologues, elementwise chains and append_kv+paged_attention",
    options: &[],
    scope: Scope::Any,
    create: |_: &PassOptions| Box::new(Fuse),
};

/// Every fusion pattern.
pub fn patterns() -> Vec<Box<dyn Pattern>> {
    vec![
        Box::new(matmul::DequantizeMatmul),
        Box::new(matmul::MergeSiblingMatmuls),
        Box::new(matmul::RmsNormMatmul),
        Box::new(elementwise::FuseElementwise),
        Box::new(append_attention::AppendAttention),
    ]
}

/// The fusion pass.
pub struct Fuse;

impl Pass for Fuse {
    fn run(&mut self, ctx: &mut Context, root: Ptr<Operation>) -> Result<bool, PassError> {
        driver::apply_greedily(ctx, root, &patterns())
    }
}
