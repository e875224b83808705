//! Consistency checks over the whole project that the compiler cannot do.
//!
//! - Every registered `llm` op appears in a round-trip filetest (`tests/filetests/ir/*.plir`).
//! - The sorted op inventory is snapshotted, so every added or removed op shows in review.

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
