//! The `llm-opt` pipeline: parse, verify, transform, emit.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use llm_ir::text::{self, Diagnostic};
use pliron::context::Context;

/// What `llm-opt` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Emit {
    /// The verified IR in the `llm` textual syntax.
    Ir,
}

impl Emit {
    /// The name used in snapshot file suffixes (`basic@ir.snap`).
    pub fn name(self) -> &'static str {
        match self {
            Emit::Ir => "ir",
        }
    }
}

/// Command-line options of `llm-opt`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "llm-opt",
    version,
    about = "Parse, verify, transform and print llm IR"
)]
pub struct OptArgs {
    /// Input file; `-` or nothing reads standard input.
    pub input: Option<PathBuf>,
    /// What to print.
    #[arg(long, value_enum, default_value = "ir")]
    pub emit: Emit,
    /// Output file (written only when the whole run succeeds); standard output by default.
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
}

impl OptArgs {
    /// Parses the arguments of a filetest `RUN:` line (without the program name).
    pub fn from_run_line(line: &str) -> Result<OptArgs, String> {
        let words = std::iter::once("llm-opt").chain(line.split_whitespace());
        OptArgs::try_parse_from(words).map_err(|e| e.to_string())
    }
}

/// Runs the pipeline on `source`, returning the text to emit or the first diagnostic.
pub fn run(args: &OptArgs, source: &str) -> Result<String, Diagnostic> {
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, source)?;
    match args.emit {
        Emit::Ir => Ok(text::print_module(&ctx, module)),
    }
}
