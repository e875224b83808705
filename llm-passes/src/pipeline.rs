//! Textual pass pipelines and their instrumented execution.
//!
//! ```text
//! pipeline := item (',' item)*
//! item     := NAME ('{' option ((',' | ' ') option)* '}')?    a pass, or a named pipeline
//!           | 'builtin.func' '(' pipeline ')'                 run on each function
//! option   := NAME '=' VALUE
//! ```
//!
//! For example `canonicalize,builtin.func(cse,dce),plan-kv-memory{budget=64MiB}`. The same
//! pipeline is built from Rust with [`Pipeline::parse`] or [`Pipeline::new`].

use std::time::{Duration, Instant};

use llm_ir::text;
use pliron::{
    builtin::{
        op_interfaces::SingleBlockRegionInterface,
        ops::{FuncOp, ModuleOp},
    },
    context::Context,
    linked_list::ContainsLinkedList,
    op::Op,
    operation::{self, Operation},
};

use crate::pass::{PIPELINES, PassError, PassInfo, PassOptions, Scope, lookup};

/// One step of a pipeline.
pub enum Item {
    /// A pass with its options.
    Pass {
        /// The registry entry.
        info: &'static PassInfo,
        /// The resolved options.
        options: PassOptions,
    },
    /// A pipeline run on each `builtin.func` of the module.
    OnFunctions(Vec<Item>),
}

/// A sequence of passes.
pub struct Pipeline {
    items: Vec<Item>,
}

/// How a pipeline run is instrumented.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Verify the module after every pass (on by default).
    pub verify_each: bool,
    /// Print the module after every pass.
    pub print_after_all: bool,
    /// Print the module after these passes.
    pub print_after: Vec<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            verify_each: true,
            print_after_all: false,
            print_after: vec![],
        }
    }
}

/// What a run did: IR dumps and the time of each pass.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The requested IR dumps, each with a header line.
    pub dumps: String,
    /// Wall time of each pass run, in order.
    pub timings: Vec<(String, Duration)>,
}

impl Report {
    /// The timings as a table, MLIR `--timing` style.
    pub fn timing_table(&self) -> String {
        let total: Duration = self.timings.iter().map(|(_, d)| *d).sum();
        let mut out = format!(
            "===- Pass execution timing report -===\n  Total: {:.3} ms\n",
            total.as_secs_f64() * 1e3
        );
        for (name, d) in &self.timings {
            out.push_str(&format!("  {:>9.3} ms  {name}\n", d.as_secs_f64() * 1e3));
        }
        out
    }
}

struct Cursor<'a> {
    text: &'a str,
    at: usize,
    /// Option values the compilation target supplies.
    target: &'a [TargetOption],
}

/// An option value a compilation target supplies to a pass where the pipeline text gives
/// none: for example the device's largest storage binding as `plan-kv-memory`'s
/// `max-binding-size` when compiling for a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetOption {
    /// The pass.
    pub pass: &'static str,
    /// Its option.
    pub option: &'static str,
    /// The value, as the pipeline text would write it.
    pub value: String,
}

impl Cursor<'_> {
    fn skip_ws(&mut self) {
        self.at = self.text.len() - self.text[self.at..].trim_start().len();
    }

    fn eat(&mut self, c: char) -> bool {
        self.skip_ws();
        if self.text[self.at..].starts_with(c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn word(&mut self) -> String {
        self.skip_ws();
        let len = self.text[self.at..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            .unwrap_or(self.text.len() - self.at);
        let w = self.text[self.at..self.at + len].to_string();
        self.at += len;
        w
    }

    fn error(&self, msg: impl std::fmt::Display) -> String {
        format!(
            "{msg} at offset {} of the pipeline `{}`",
            self.at, self.text
        )
    }
}

impl Pipeline {
    /// A pipeline of the given items.
    pub fn new(items: Vec<Item>) -> Pipeline {
        Pipeline { items }
    }

    /// Parses a textual pipeline.
    pub fn parse(text: &str) -> Result<Pipeline, String> {
        Pipeline::parse_for_target(text, &[])
    }

    /// Parses a textual pipeline for a target that supplies option values: a `target`
    /// entry applies where the text does not set that option itself.
    pub fn parse_for_target(text: &str, target: &[TargetOption]) -> Result<Pipeline, String> {
        let mut c = Cursor {
            text,
            at: 0,
            target,
        };
        let items = parse_items(&mut c, 0, false)?;
        c.skip_ws();
        if c.at != text.len() {
            return Err(c.error(format!("unexpected `{}`", &text[c.at..])));
        }
        Ok(Pipeline { items })
    }

    /// Runs the pipeline on `module`.
    pub fn run(
        &self,
        ctx: &mut Context,
        module: ModuleOp,
        config: &RunConfig,
    ) -> Result<Report, PassError> {
        let mut report = Report::default();
        run_items(
            &self.items,
            ctx,
            module,
            module.get_operation(),
            config,
            &mut report,
        )?;
        Ok(report)
    }
}

fn parse_items(c: &mut Cursor, depth: usize, nested: bool) -> Result<Vec<Item>, String> {
    if depth > 8 {
        return Err(c.error("pipelines nest too deeply"));
    }
    let mut items = Vec::new();
    loop {
        let start = c.at;
        let name = c.word();
        if name.is_empty() {
            return Err(c.error("expected a pass name"));
        }
        if name == "builtin.func" {
            if nested {
                return Err(c.error("builtin.func pipelines cannot nest"));
            }
            if !c.eat('(') {
                return Err(c.error("expected `(` after builtin.func"));
            }
            let inner = parse_items(c, depth + 1, true)?;
            if !c.eat(')') {
                return Err(c.error("expected `)` to close builtin.func(...)"));
            }
            items.push(Item::OnFunctions(inner));
        } else if let Some((_, text, _)) = PIPELINES.iter().find(|(n, _, _)| *n == name) {
            let mut inner = Cursor {
                text,
                at: 0,
                target: c.target,
            };
            items.extend(parse_items(&mut inner, depth + 1, nested)?);
        } else if let Some(info) = lookup(&name) {
            if nested && info.scope == Scope::Module {
                c.at = start;
                return Err(c.error(format!(
                    "pass `{name}` runs on a whole module, not inside builtin.func(...)"
                )));
            }
            // The target's values first: the text's own, later, win.
            let mut given: Vec<(String, String)> = c
                .target
                .iter()
                .filter(|t| t.pass == name)
                .map(|t| (t.option.to_string(), t.value.clone()))
                .collect();
            if c.eat('{') {
                loop {
                    let key = c.word();
                    if key.is_empty() || !c.eat('=') {
                        return Err(c.error(format!(
                            "expected `option=value` in the options of `{name}`"
                        )));
                    }
                    let value = c.word();
                    if value.is_empty() {
                        return Err(
                            c.error(format!("expected a value for option `{key}` of `{name}`"))
                        );
                    }
                    given.push((key, value));
                    c.skip_ws();
                    if c.eat('}') {
                        break;
                    }
                    c.eat(',');
                }
            }
            let options =
                PassOptions::resolve(&name, info.options, &given).map_err(|e| c.error(e))?;
            items.push(Item::Pass { info, options });
        } else {
            c.at = start;
            let known: Vec<&str> = crate::pass::PASSES
                .iter()
                .map(|p| p.name)
                .chain(PIPELINES.iter().map(|p| p.0))
                .collect();
            return Err(c.error(format!(
                "unknown pass `{name}` (known: {})",
                known.join(", ")
            )));
        }
        if !c.eat(',') {
            return Ok(items);
        }
    }
}

fn functions(ctx: &Context, module: ModuleOp) -> Vec<FuncOp> {
    let body = module.get_body(ctx, 0);
    let ops: Vec<_> = body.deref(ctx).iter(ctx).collect();
    ops.into_iter()
        .filter_map(|op| Operation::get_op::<FuncOp>(op, ctx))
        .collect()
}

fn run_items(
    items: &[Item],
    ctx: &mut Context,
    module: ModuleOp,
    root: pliron::context::Ptr<Operation>,
    config: &RunConfig,
    report: &mut Report,
) -> Result<(), PassError> {
    for item in items {
        match item {
            Item::OnFunctions(inner) => {
                for func in functions(ctx, module) {
                    run_items(inner, ctx, module, func.get_operation(), config, report)?;
                }
            }
            Item::Pass { info, options } => {
                let start = Instant::now();
                let mut pass = (info.create)(options);
                pass.run(ctx, root)?;
                report
                    .timings
                    .push((info.name.to_string(), start.elapsed()));
                if config.verify_each {
                    operation::verify_operation(module.get_operation(), ctx).map_err(|e| {
                        let d = text::Diagnostic::from_pliron(&e);
                        PassError {
                            location: Some((d.line, d.column)),
                            message: format!("after pass `{}`: {}", info.name, d.message),
                        }
                    })?;
                }
                if config.print_after_all || config.print_after.iter().any(|n| n == info.name) {
                    report.dumps.push_str(&format!(
                        "// -----// IR Dump After {} //----- //\n",
                        info.name
                    ));
                    report.dumps.push_str(&text::print_module(ctx, module));
                }
            }
        }
    }
    Ok(())
}
