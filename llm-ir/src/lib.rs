//! The `llm` dialect on [pliron]: types, parameters, ops, verifiers and textual syntax.
//!
//! The dialect describes large-language-model inference: ranked tensors, quantized and
//! sharded tensors, a paged KV cache, and the ops a Llama-family model needs (attention over a
//! contiguous or paged cache, RoPE, RMSNorm, SwiGLU, quantized matmul, collectives).
//!
//! Every op prints in one regular syntax:
//!
//! ```text
//! results = llm.op operands {param = value, ...} : result types
//! ```
//!
//! Linking this crate registers the dialect with every new pliron [`Context`]; binaries that
//! parse `llm` IR without naming anything from it must write `use llm_ir as _;`.
//!
//! [`Context`]: pliron::context::Context

#![deny(missing_docs)]

pub mod dtype;
pub mod interp;
pub mod ops;
pub mod params;
pub mod syntax;
pub mod text;
pub mod types;
