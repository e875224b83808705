//! Passes over `llm` IR: the registry, textual pipelines, the greedy rewrite driver,
//! canonicalization, CSE, DCE, fusion, activation quantization, f32 computation of f16/bf16 ops, and KV-cache and buffer memory planning.
//!
//! Passes map IR to IR; a [`pipeline::Pipeline`] verifies the module after every pass (by
//! default). Every pass is listed once in [`pass::PASSES`], which `llm-opt --list-passes`
//! prints.

#![deny(missing_docs)]

pub mod canonicalize;
pub mod cse;
pub mod dce;
pub mod driver;
pub mod fuse;
pub mod ir;
pub mod pass;
pub mod pipeline;
pub mod plan_buffers;
pub mod plan_kv_memory;
pub mod quantize_activations;
pub mod widen_floats;

pub use pipeline::{Pipeline, Report, RunConfig, TargetOption};
