//! llmc: the shared core of the `llm-opt` and `llm-run` tools.
//!
//! The command-line binaries are thin: they parse arguments with clap and call
//! [`pipeline::run`], the one function that both they and the filetest runner use, so any
//! filetest reproduces exactly with `llm-opt <RUN arguments> FILE`.

pub mod exec;
pub mod pipeline;

// The dialect registers itself with pliron through linkme; referencing the crate links it.
pub use llm_ir;
