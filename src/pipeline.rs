//! The `llm-opt` pipeline: parse, verify, run passes, emit.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use llm_ir::{
    params::ParamValue,
    text::{self, Diagnostic},
};
use llm_passes::{Pipeline, RunConfig, ir};
use pliron::{
    builtin::{op_interfaces::SingleBlockRegionInterface, ops::ModuleOp},
    context::Context,
};

/// What `llm-opt` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Emit {
    /// The verified IR in the `llm` textual syntax.
    Ir,
    /// The memory plans recorded by `plan-kv-memory` and `plan-buffers`.
    MemoryPlan,
    /// The Cranelift IR of the CPU kernels of every function (pinned x86-64 features).
    Clif,
    /// The WGSL compute shaders of every function (planned for WebGPU's default limits).
    Wgsl,
}

impl Emit {
    /// The name used in snapshot file suffixes (`basic@ir.snap`).
    pub fn name(self) -> &'static str {
        match self {
            Emit::Ir => "ir",
            Emit::MemoryPlan => "memory-plan",
            Emit::Clif => "clif",
            Emit::Wgsl => "wgsl",
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
    /// A pass pipeline, for example `canonicalize,fuse,plan-kv-memory{budget=64MiB}`.
    #[arg(long)]
    pub passes: Option<String>,
    /// Print every registered pass and pipeline, then exit.
    #[arg(long)]
    pub list_passes: bool,
    /// Verify the IR after every pass.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub verify_each: bool,
    /// Print the IR (to stderr) after every pass.
    #[arg(long)]
    pub print_ir_after_all: bool,
    /// Print the IR (to stderr) after the named pass; may repeat.
    #[arg(long)]
    pub print_ir_after: Vec<String>,
    /// Print the time of every pass (to stderr).
    #[arg(long)]
    pub timing: bool,
}

impl OptArgs {
    /// Parses the arguments of a filetest `RUN:` line (without the program name).
    pub fn from_run_line(line: &str) -> Result<OptArgs, String> {
        let words = std::iter::once("llm-opt").chain(line.split_whitespace());
        OptArgs::try_parse_from(words).map_err(|e| e.to_string())
    }
}

/// What a run produces: the emitted text, and the log (IR dumps, timings) for stderr.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    /// The requested output.
    pub text: String,
    /// Instrumentation output.
    pub log: String,
}

/// Runs the pipeline on `source`, returning the output or the first diagnostic.
pub fn run(args: &OptArgs, source: &str) -> Result<Output, Diagnostic> {
    let pipeline = match &args.passes {
        Some(text) => Some(Pipeline::parse(text).map_err(|message| Diagnostic {
            line: 1,
            column: 1,
            message: format!("bad --passes: {message}"),
        })?),
        None => None,
    };
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, source)?;
    let mut log = String::new();
    if let Some(pipeline) = pipeline {
        let config = RunConfig {
            verify_each: args.verify_each,
            print_after_all: args.print_ir_after_all,
            print_after: args.print_ir_after.clone(),
        };
        let report = pipeline.run(&mut ctx, module, &config).map_err(|e| {
            let (line, column) = e.location.unwrap_or((0, 0));
            Diagnostic {
                line,
                column,
                message: e.message,
            }
        })?;
        log.push_str(&report.dumps);
        if args.timing {
            log.push_str(&report.timing_table());
        }
        if !args.verify_each {
            pliron::operation::verify_operation(pliron::op::Op::get_operation(&module), &ctx)
                .map_err(|e| Diagnostic::from_pliron(&e))?;
        }
    }
    let text = match args.emit {
        Emit::Ir => text::print_module(&ctx, module),
        Emit::MemoryPlan => memory_plan(&ctx, module),
        Emit::Clif => llm_lower::cpu::emit_clif(&ctx, module).map_err(|e| Diagnostic {
            line: 1,
            column: 1,
            message: format!("cpu backend: {e}"),
        })?,
        Emit::Wgsl => llm_lower::gpu::emit_wgsl(&ctx, module).map_err(|e| Diagnostic {
            line: 1,
            column: 1,
            message: format!("gpu backend: {e}"),
        })?,
    };
    Ok(Output { text, log })
}

/// The plan records of `module`, as text.
fn memory_plan(ctx: &Context, module: ModuleOp) -> String {
    let body = module.get_body(ctx, 0);
    let mut out = String::new();
    let int = |op, key: &str| match ir::param(ctx, op, key) {
        Some(ParamValue::Int(v)) => v,
        _ => 0,
    };
    for op in ir::block_ops(ctx, body) {
        match ir::name(ctx, op).as_str() {
            "llm.kv_plan" => {
                let buffers = ir::param(ctx, op, "buffers")
                    .and_then(|p| p.as_int_list())
                    .unwrap_or_default();
                let used = int(op, "blocks") * int(op, "bytes_per_block");
                out.push_str(&format!(
                    "kv-cache plan\n  block size:      {} positions\n  blocks:          {} ({} positions)\n  bytes per block: {}\n  pool:            {} of {} budget bytes\n  buffers:         {} ({:?} blocks; max binding {} bytes)\n  layout:          [blocks][layers][k, v][block_size][kv_heads][head_dim]\n",
                    int(op, "block_size"),
                    int(op, "blocks"),
                    int(op, "tokens"),
                    int(op, "bytes_per_block"),
                    used,
                    int(op, "budget"),
                    buffers.len(),
                    buffers,
                    int(op, "max_binding_size"),
                ));
            }
            "llm.buffer_plan" => {
                let func = match ir::param(ctx, op, "func") {
                    Some(ParamValue::Str(s)) => s,
                    _ => String::new(),
                };
                let (arena, naive) = (int(op, "arena_bytes"), int(op, "naive_bytes"));
                let values = ir::param(ctx, op, "sizes")
                    .and_then(|p| p.as_int_list())
                    .map_or(0, |v| v.len());
                let saved = if naive > 0 {
                    100.0 * (naive - arena) as f64 / naive as f64
                } else {
                    0.0
                };
                out.push_str(&format!(
                    "buffer plan @{func}\n  values:          {values}\n  arena (peak):    {arena} bytes\n  naive sum:       {naive} bytes ({saved:.1}% saved)\n  dynamic dims as: {}\n",
                    int(op, "dynamic_dim")
                ));
            }
            _ => {}
        }
    }
    if out.is_empty() {
        out.push_str("no memory plan (run plan-kv-memory or plan-buffers)\n");
    }
    out
}
