//! llmc: the shared core of the `llm-opt` and `llm-run` tools.
//!
//! The command-line binaries are thin: they parse arguments with clap and call into this
//! crate. [`pipeline::run`] is the one function behind `llm-opt` and the filetest runner, so
//! a single-case filetest reproduces exactly with `llm-opt <RUN arguments> FILE`; [`exec`] backs
//! `llm-run exec`.

pub mod exec;
pub mod pipeline;
pub mod serve;

// The dialect registers itself with pliron through linkme; referencing the crate links it.
pub use llm_ir;
