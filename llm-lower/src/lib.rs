//! Lowering of `llm` IR to executable kernels.
//!
//! [`kernel`] is the backend-neutral layer: each op maps to one of a few kernel families
//! (contractions with a dequantizing or normalising prologue, elementwise scalar bodies,
//! row reductions), specialised to the op's static shapes; [`selection`] chooses them for
//! a whole function (and fuses residual adds). [`cpu`] generates those families as
//! Cranelift IR, JIT-compiles them and runs whole functions ([`cpu::Program`]); [`gpu`]
//! generates them as WGSL compute shaders and runs them through wgpu ([`gpu::Program`]).
//! Ops without a kernel yet run through the reference interpreter's semantics, so every
//! verified function runs on every backend.

pub mod cpu;
pub mod gpu;
pub mod kernel;
pub mod layout;
pub mod selection;
