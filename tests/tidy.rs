//! Consistency checks over the whole project that the compiler cannot do.
//!
//! - Every registered `llm` op appears in a round-trip filetest (`tests/filetests/ir/*.plir`).
//! - The sorted op inventory is snapshotted, so every added or removed op shows in review.
//! - Every registered pass has a filetest under `tests/filetests/passes/<name>/`.
//! - Every filetest snapshot belongs to a RUN line of an existing input (none is stale).

use std::path::Path;

use llm_ir::ops::registered_ops;

fn round_trip_sources() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests/ir");
    let mut text = String::new();
    for entry in std::fs::read_dir(&dir)
        .expect("tests/filetests/ir exists")
        .flatten()
    {
        if entry.path().extension().is_some_and(|e| e == "plir") {
            text.push_str(&std::fs::read_to_string(entry.path()).expect("readable filetest"));
        }
    }
    text
}

/// Whether `text` uses `op` as an op (followed by a space or the end of a line).
fn uses_op(text: &str, op: &str) -> bool {
    text.lines().any(|line| {
        let line = line.split("//").next().unwrap_or_default();
        line.match_indices(op).any(|(i, _)| {
            let after = line[i + op.len()..].chars().next();
            let before = line[..i].chars().next_back();
            matches!(after, None | Some(' ')) && matches!(before, None | Some(' '))
        })
    })
}

#[test]
fn every_op_has_a_round_trip_filetest() {
    let sources = round_trip_sources();
    let missing: Vec<&str> = registered_ops()
        .iter()
        .map(|op| op.name)
        .filter(|name| !uses_op(&sources, name))
        .collect();
    assert!(
        missing.is_empty(),
        "ops without a round-trip filetest in tests/filetests/ir: {missing:?}"
    );
}

#[test]
fn op_inventory() {
    let inventory: Vec<String> = registered_ops()
        .iter()
        .map(|op| {
            let params: Vec<&str> = op.signature.params.iter().map(|p| p.name).collect();
            format!(
                "{:<22} operands: {:<60} results: {:<10} params: [{}]",
                op.name,
                op.signature.operands.describe(),
                op.signature.results.join(", "),
                params.join(", ")
            )
        })
        .collect();
    insta::assert_snapshot!("op_inventory", inventory.join("\n"));
}

/// The snapshot suffixes the filetest runner writes for a file with these RUN lines.
fn expected_suffixes(source: &str) -> Vec<String> {
    let runs: Vec<&str> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("// RUN:"))
        .collect();
    runs.iter()
        .enumerate()
        .map(|(i, r)| {
            let emit = llmc::pipeline::OptArgs::from_run_line(r)
                .map(|a| a.emit.name())
                .unwrap_or("ir");
            if runs.len() > 1 {
                format!("{emit}-{}", i + 1)
            } else {
                emit.to_string()
            }
        })
        .collect()
}

fn snapshot_dirs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "snapshots") {
                out.push(path);
            } else {
                snapshot_dirs(&path, out);
            }
        }
    }
}

#[test]
fn every_filetest_snapshot_belongs_to_a_run_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut dirs = Vec::new();
    snapshot_dirs(&root.join("tests/filetests"), &mut dirs);
    snapshot_dirs(&root.join("examples"), &mut dirs);
    let mut stale = Vec::new();
    for dir in dirs {
        for entry in std::fs::read_dir(&dir).expect("snapshot dir").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((stem, suffix)) = name.strip_suffix(".snap").and_then(|n| n.split_once('@'))
            else {
                continue;
            };
            let input = dir.parent().expect("parent").join(format!("{stem}.plir"));
            let source = std::fs::read_to_string(&input).unwrap_or_default();
            if !expected_suffixes(&source).iter().any(|s| s == suffix) {
                stale.push(entry.path().display().to_string());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "snapshots without a matching filetest RUN line: {stale:?}"
    );
}

#[test]
fn every_pass_has_a_filetest() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests/passes");
    let missing: Vec<&str> = llm_passes::pass::PASSES
        .iter()
        .map(|p| p.name)
        .filter(|name| {
            let files: Vec<_> = std::fs::read_dir(dir.join(name))
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            !files.iter().any(|f| {
                std::fs::read_to_string(f.path())
                    .is_ok_and(|s| s.lines().any(|l| l.contains("// RUN:") && l.contains(name)))
            })
        })
        .collect();
    assert!(
        missing.is_empty(),
        "passes without a filetest in tests/filetests/passes/<name>/: {missing:?}"
    );
}
