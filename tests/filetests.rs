//! The filetest runner: every `tests/filetests/**/*.plir` file is one test.
//!
//! A file holds `// RUN: <llm-opt arguments>` lines, optional `// CHECK...` lines, and one or
//! more cases separated by `// -----`. Each RUN line runs [`llmc::pipeline::run`] (the
//! function behind `llm-opt`) on every case; the outputs, joined with `// -----`, are compared
//! with an insta snapshot next to the file (`snapshots/<stem>@<emit>.snap`). Files under
//! `invalid/` must fail, and their snapshot is the rendered diagnostic. Successful `--emit=ir`
//! output must also be a fixed point: printing its parse gives the same text. And whenever a
//! RUN line runs passes, every function must compute the same results before and after
//! them on seeded random inputs (checked with the reference interpreter), unless the case
//! says `// NO-EXEC: <why>`: floats within 1e-5 (relative to `max(|x|, 1)`), or within
//! `// TOLERANCE: <relative> <why>` for a pass that rounds on purpose (`quantize-activations`).
//!
//! Filter with `cargo test --test filetests -- <substring>`; bless with
//! `INSTA_UPDATE=always cargo test --test filetests` and review the diff.

use std::path::{Path, PathBuf};

use libtest_mimic::{Arguments, Failed, Trial};
use llm_ir::{
    interp::{self, Interpreter, NoWeights, Value},
    text,
};
use llmc::{
    exec,
    pipeline::{self, Emit, OptArgs},
};
use pliron::{
    builtin::{
        op_interfaces::SingleBlockRegionInterface, op_interfaces::SymbolOpInterface, ops::FuncOp,
    },
    context::Context,
    linked_list::ContainsLinkedList,
    operation::Operation,
};

const CASE_SEPARATOR: &str = "// -----";

fn main() {
    let args = Arguments::from_args();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    collect_plir(&manifest.join("tests/filetests"), &mut files);
    collect_plir(&manifest.join("examples"), &mut files);
    files.sort();
    let mut names = std::collections::HashSet::new();
    let trials: Vec<Trial> = files
        .into_iter()
        .map(|path| {
            let root = root_of(&path);
            let rel = path.strip_prefix(&root).unwrap_or(&path).with_extension("");
            let name = rel.to_string_lossy().replace('\\', "/");
            assert!(names.insert(name.clone()), "duplicate filetest name {name}");
            Trial::test(name, move || run_file(&root, &path))
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}

/// The directory test names are relative to: `tests/filetests`, or the package root for
/// files elsewhere (so `examples/x.plir` is the test `examples/x`).
fn root_of(path: &Path) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let filetests = manifest.join("tests/filetests");
    if path.starts_with(&filetests) {
        filetests
    } else {
        manifest.to_path_buf()
    }
}

fn collect_plir(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_plir(&path, out);
        } else if path.extension().is_some_and(|e| e == "plir") {
            out.push(path);
        }
    }
}

/// One case of a file: its text (other cases blanked, so line numbers are the file's) and
/// its CHECK directives.
struct Case {
    text: String,
    checks: Vec<(String, String)>,
}

fn split_cases(source: &str) -> Vec<Case> {
    let lines: Vec<&str> = source.lines().collect();
    let mut bounds = vec![0];
    for (i, line) in lines.iter().enumerate() {
        if line.trim() == CASE_SEPARATOR {
            bounds.push(i + 1);
        }
    }
    bounds.push(lines.len() + 1);
    bounds
        .windows(2)
        .map(|w| {
            let (start, end) = (w[0], w[1].saturating_sub(1).max(w[0]));
            let text = lines
                .iter()
                .enumerate()
                .map(|(i, l)| if i >= start && i < end { *l } else { "" })
                .collect::<Vec<_>>()
                .join("\n");
            let checks = lines[start..end.min(lines.len())]
                .iter()
                .filter_map(|l| {
                    let rest = l.trim().strip_prefix("//")?.trim();
                    let (kind, pattern) = rest.split_once(':')?;
                    kind.starts_with("CHECK")
                        .then(|| (kind.to_string(), pattern.trim().to_string()))
                })
                .collect();
            Case { text, checks }
        })
        .collect()
}

fn run_file(root: &Path, path: &Path) -> Result<(), Failed> {
    let source = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let rel = path
        .strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/");
    let must_fail = rel.starts_with("invalid/");
    let run_lines: Vec<&str> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("// RUN:"))
        .collect();
    if run_lines.is_empty() {
        return Err(format!("{rel}: no `// RUN:` line").into());
    }
    let cases = split_cases(&source);
    for (index, run_line) in run_lines.iter().enumerate() {
        let args =
            OptArgs::from_run_line(run_line).map_err(|e| format!("{rel}: bad RUN line: {e}"))?;
        let mut outputs = Vec::new();
        for (n, case) in cases.iter().enumerate() {
            let output = match (pipeline::run(&args, &case.text), must_fail) {
                (Ok(out), false) => {
                    let out = out.text;
                    if args.emit == Emit::Ir {
                        check_fixed_point(&args, &out)
                            .map_err(|e| format!("{rel} case {n}: {e}"))?;
                    }
                    out
                }
                (Err(d), true) => format!("{}\n", d.render(&rel)),
                (Ok(out), true) => {
                    let out = out.text;
                    return Err(format!(
                        "{rel} case {n}: expected an error, but it succeeded:\n{out}"
                    )
                    .into());
                }
                (Err(d), false) => return Err(format!("{rel} case {n}: {}", d.render(&rel)).into()),
            };
            if args.passes.is_some() && !must_fail {
                check_semantics(&args, &case.text).map_err(|e| format!("{rel} case {n}: {e}"))?;
            }
            apply_checks(&case.checks, &output)
                .map_err(|e| format!("{rel} case {n}, RUN:{run_line}: {e}"))?;
            outputs.push(output);
        }
        let joined = outputs.join(&format!("{CASE_SEPARATOR}\n"));
        let suffix = if run_lines.len() > 1 {
            format!("{}-{}", args.emit.name(), index + 1)
        } else {
            args.emit.name().to_string()
        };
        snapshot(path, &suffix, &joined, run_line)?;
    }
    Ok(())
}

fn check_fixed_point(args: &OptArgs, printed: &str) -> Result<(), String> {
    let reparse = OptArgs {
        passes: None,
        ..args.clone()
    };
    let reprinted = pipeline::run(&reparse, printed)
        .map(|o| o.text)
        .map_err(|d| format!("printed IR does not parse: {}", d.render("<printed>")))?;
    if reprinted != printed {
        return Err(format!(
            "print -> parse -> print is not a fixed point:\n--- first\n{printed}\n--- second\n{reprinted}"
        ));
    }
    Ok(())
}

/// Plain substring CHECK directives: CHECK, CHECK-NEXT, CHECK-NOT, CHECK-LABEL.
fn apply_checks(checks: &[(String, String)], output: &str) -> Result<(), String> {
    let lines: Vec<&str> = output.lines().collect();
    let mut next_line = 0usize;
    let mut pending_not: Vec<&str> = Vec::new();
    let find_from =
        |from: usize, pattern: &str| (from..lines.len()).find(|&i| lines[i].contains(pattern));
    for (kind, pattern) in checks {
        match kind.as_str() {
            "CHECK" | "CHECK-LABEL" => {
                let Some(found) = find_from(next_line, pattern) else {
                    return Err(format!(
                        "{kind}: `{pattern}` not found after line {next_line}"
                    ));
                };
                if let Some(bad) = pending_not
                    .iter()
                    .find(|p| lines[next_line..found].iter().any(|l| l.contains(*p)))
                {
                    return Err(format!("CHECK-NOT: `{bad}` found before `{pattern}`"));
                }
                pending_not.clear();
                next_line = found + 1;
            }
            "CHECK-NEXT" => {
                if !lines
                    .get(next_line)
                    .is_some_and(|l| l.contains(pattern.as_str()))
                {
                    return Err(format!(
                        "CHECK-NEXT: `{pattern}` is not on line {}",
                        next_line + 1
                    ));
                }
                next_line += 1;
            }
            "CHECK-NOT" => pending_not.push(pattern),
            other => return Err(format!("unknown directive `{other}`")),
        }
    }
    if let Some(bad) = pending_not.iter().find(|p| {
        lines[next_line.min(lines.len())..]
            .iter()
            .any(|l| l.contains(*p))
    }) {
        return Err(format!("CHECK-NOT: `{bad}` found"));
    }
    Ok(())
}

fn snapshot(path: &Path, suffix: &str, output: &str, run_line: &str) -> Result<(), Failed> {
    let dir = path.parent().unwrap_or(Path::new(".")).join("snapshots");
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(dir);
    settings.set_prepend_module_to_snapshot(false);
    settings.set_input_file(path);
    settings.set_snapshot_suffix(suffix);
    settings.set_description(format!("llm-opt{run_line}"));
    settings.set_omit_expression(true);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        settings.bind(|| insta::assert_snapshot!(stem.as_str(), output));
    }));
    result.map_err(|_| format!("snapshot mismatch for {} (RUN:{run_line})", path.display()).into())
}

/// Seeds of the random inputs of the semantics check.
const SEMANTIC_SEEDS: [u64; 3] = [1, 2, 3];

/// Runs every function of `source` before and after the RUN line's passes on the same
/// random inputs and requires equal results.
fn check_semantics(args: &OptArgs, source: &str) -> Result<(), String> {
    if source.contains("// NO-EXEC:") {
        return Ok(());
    }
    let tolerance = match source.split_once("// TOLERANCE:") {
        Some((_, rest)) => {
            // The number, then an optional reason.
            let text = rest.split_whitespace().next().unwrap_or("");
            text.parse::<f32>()
                .ok()
                .filter(|t| t.is_finite() && *t >= 0.0)
                .ok_or_else(|| format!("`// TOLERANCE: {text}` is not a non-negative number"))?
        }
        None => 1e-5,
    };
    let ir_args = OptArgs {
        emit: Emit::Ir,
        ..args.clone()
    };
    let after_text = pipeline::run(&ir_args, source)
        .map_err(|d| d.render("<case>"))?
        .text;
    let mut before_ctx = Context::new();
    let before = text::parse_module(&mut before_ctx, source).map_err(|d| d.render("<before>"))?;
    let mut after_ctx = Context::new();
    let after = text::parse_module(&mut after_ctx, &after_text).map_err(|d| d.render("<after>"))?;
    let body = before.get_body(&before_ctx, 0);
    let funcs: Vec<FuncOp> = body
        .deref(&before_ctx)
        .iter(&before_ctx)
        .filter_map(|op| Operation::get_op::<FuncOp>(op, &before_ctx))
        .collect();
    for func in funcs {
        let name = func.get_symbol_name(&before_ctx).to_string();
        let after_func = interp::find_func(&after_ctx, after, &name)
            .ok_or_else(|| format!("the passes removed @{name}"))?;
        for seed in SEMANTIC_SEEDS {
            let run = |ctx: &Context, f: FuncOp| {
                let inputs = exec::random_args(ctx, f, seed)?;
                Interpreter::new(ctx, &NoWeights)
                    .run(f, inputs)
                    .map_err(|e| e.to_string())
            };
            let expected = run(&before_ctx, func).map_err(|e| format!("@{name} does not run on random inputs before the passes ({e}); add `// NO-EXEC: <why>`"))?;
            let found = run(&after_ctx, after_func)
                .map_err(|e| format!("@{name} fails after the passes: {e}"))?;
            if expected.len() != found.len() {
                return Err(format!(
                    "@{name} returns {} values before the passes and {} after",
                    expected.len(),
                    found.len()
                ));
            }
            for (i, (a, b)) in expected.iter().zip(&found).enumerate() {
                if !same_value(a, b, tolerance) {
                    return Err(format!(
                        "@{name} result #{i} changed on random inputs (seed {seed}):\nbefore: {a:?}\nafter:  {b:?}"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Whether two values agree (floats within `tolerance` relative to `max(|x|, 1)`; KV pools
/// of different planned sizes are not compared).
fn same_value(a: &Value, b: &Value, tolerance: f32) -> bool {
    let close = |x: &[f32], y: &[f32]| {
        x.len() == y.len()
            && x.iter().zip(y).all(|(p, q)| {
                p == q
                    || (p - q).abs() <= tolerance * p.abs().max(1.0)
                    || (p.is_nan() && q.is_nan())
            })
    };
    match (a, b) {
        (Value::Tensor(x), Value::Tensor(y)) => {
            x.shape == y.shape
                && x.dtype == y.dtype
                && match (x.floats(), y.floats()) {
                    (Ok(p), Ok(q)) => close(p, q),
                    _ => x.ints().ok() == y.ints().ok(),
                }
        }
        (Value::Cache(x), Value::Cache(y)) => {
            x.blocks != y.blocks
                || (close(&x.k.floats(), &y.k.floats()) && close(&x.v.floats(), &y.v.floats()))
        }
        (Value::Sharded(x), Value::Sharded(y)) => {
            x.shards.len() == y.shards.len()
                && x.shards.iter().zip(&y.shards).all(|(p, q)| {
                    same_value(
                        &Value::Tensor(p.clone()),
                        &Value::Tensor(q.clone()),
                        tolerance,
                    )
                })
        }
        (x, y) => x == y,
    }
}
