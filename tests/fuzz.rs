//! A bounded fuzz test of the front end: random and mutated IR through parse + verify.
//!
//! Inputs are the filetests and examples, mutated by deleting, duplicating, swapping and
//! inserting text and tokens, plus random token soup. For every input `llm-opt`'s pipeline
//! must return output or a diagnostic without panicking, and any output must be a
//! print -> parse -> print fixed point. The time budget is `LLMC_FUZZ_SECONDS` (default 10);
//! the seed is `LLMC_FUZZ_SEED` (default fixed), so a failure reproduces.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
    time::{Duration, Instant},
};

use llm_runtime::sampler::XorShift;
use llmc::pipeline::{self, OptArgs};

/// A number below `n` (0 when `n` is 0).
fn below(rng: &mut XorShift, n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (rng.next_u64() % n as u64) as usize
    }
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "<",
    ">",
    "(",
    ")",
    "[",
    "]",
    ",",
    ":",
    ";",
    "=",
    "?",
    "x",
    "\"",
    "^",
    "@",
    "!",
    "0",
    "1",
    "-1",
    "4",
    "1.5",
    "1e-5",
    "1e999",
    "99999999999999999999",
    "-0.0",
    "f32",
    "i8",
    "llm.silu",
    "llm.matmul",
    "llm.tensor",
    "llm.paged_kv_cache",
    "llm.quantized_tensor",
    "llm.sharded_tensor",
    "llm.append_kv",
    "llm.return",
    "q4_k",
    "nf4",
    "int4",
    "partial",
    "split",
    "mesh",
    "tp",
    "layer",
    "kv_heads",
    "window",
    "builtin.func",
    "builtin.module",
    "v0",
    "\u{0}",
    "é",
    "\n",
    " ",
    "//",
    "llm",
    ".",
];

fn corpus() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "plir")
                && let Ok(text) = std::fs::read_to_string(&path)
            {
                out.push(text);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    walk(&root.join("tests/filetests"), &mut out);
    walk(&root.join("examples"), &mut out);
    out
}

fn mutate(rng: &mut XorShift, text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..1 + below(rng, 4) {
        let len = chars.len();
        let at = below(rng, len + 1);
        let span = 1 + below(rng, 12);
        match below(rng, 6) {
            0 if len > 0 => {
                let end = (at + span).min(len);
                chars.drain(at.min(len)..end);
            }
            1 if len > 0 => {
                let end = (at + span).min(len);
                let copy: Vec<char> = chars[at.min(len)..end].to_vec();
                let to = below(rng, len + 1);
                chars.splice(to..to, copy);
            }
            2 if len > 1 => {
                let (a, b) = (below(rng, len), below(rng, len));
                chars.swap(a, b);
            }
            3 => chars.truncate(at),
            _ => {
                let token = TOKENS[below(rng, TOKENS.len())];
                chars.splice(at..at, token.chars());
            }
        }
    }
    chars.into_iter().collect()
}

fn soup(rng: &mut XorShift) -> String {
    (0..below(rng, 40))
        .map(|_| TOKENS[below(rng, TOKENS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn front_end_never_panics() {
    let seconds: u64 = std::env::var("LLMC_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("LLMC_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED);
    let mut rng = XorShift::new(seed | 1);
    let corpus = corpus();
    assert!(
        !corpus.is_empty(),
        "no .plir files found for the fuzz corpus"
    );
    let args = OptArgs::from_run_line("--emit=ir").expect("valid arguments");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut runs, mut accepted) = (0u64, 0u64);
    while Instant::now() < deadline {
        let input = if below(&mut rng, 10) == 0 {
            soup(&mut rng)
        } else {
            let pick = below(&mut rng, corpus.len());
            mutate(&mut rng, &corpus[pick])
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            let first = pipeline::run(&args, &input).map(|o| o.text);
            if let Ok(printed) = &first {
                let again = pipeline::run(&args, printed).map(|o| o.text);
                assert_eq!(again.as_ref(), Ok(printed), "output is not a fixed point");
            }
            first.is_ok()
        }));
        match result {
            Ok(ok) => accepted += u64::from(ok),
            Err(_) => {
                let dump = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failure.plir");
                let _ = std::fs::write(&dump, &input);
                panic!(
                    "the front end panicked on input saved to {} (seed {seed}, run {runs})",
                    dump.display()
                );
            }
        }
        runs += 1;
    }
    println!("fuzz: {runs} inputs in {seconds}s, {accepted} accepted");
    assert!(runs > 0);
}
