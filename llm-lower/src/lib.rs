//! Lowering of `llm` IR to executable kernels.
//!
//! [`kernel`] is the backend-neutral layer: each op maps to one of a few kernel families
//! (contractions with a dequantizing or normalising prologue, elementwise scalar bodies,
//! row reductions), specialised to the op's static shapes. [`cpu`] generates those
//! families as Cranelift IR, JIT-compiles them and runs whole functions
//! ([`cpu::Program`]). Ops without a kernel yet run through the reference interpreter's
//! semantics, so every verified function runs.

pub mod cpu;
pub mod kernel;
