//! Helpers shared by the integration tests of model files: the fuzz loop that mutates a
//! file's bytes and checks that reading them never panics, and the ops a compiled model
//! leaves to the reference semantics.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    time::{Duration, Instant},
};

use llm_runtime::{
    generate::{Backend, Model, Step},
    sampler::XorShift,
};

/// The ops (name and count) `model`, compiled for `backend`, leaves to the reference
/// semantics in `step`'s function: none for the interpreter, which is that semantics.
pub fn reference_ops(model: &Model, backend: &Backend, step: Step) -> Vec<(String, usize)> {
    match backend {
        Backend::Gpu(_) => model
            .gpu_lowering(step)
            .expect("stats")
            .reference_ops
            .clone(),
        Backend::Cpu { .. } => model.lowering(step).expect("stats").reference_ops.clone(),
        Backend::Interp => Vec::new(),
    }
}

/// Seconds a fuzz test runs: `LLMC_FUZZ_SECONDS`, or 5.
fn fuzz_seconds() -> u64 {
    std::env::var("LLMC_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

/// Mutates copies of `originals` in turn for the fuzz time (one to eight changes each,
/// concentrated on the first 64 KiB, where a file's structure lives: a random byte, a
/// flipped top bit, a truncation, an `0xFF`), and checks that `read` (given the index of
/// the original and the mutated copy) returns, an error or not, without panicking;
/// returns the number of runs.
pub fn mutated_copies_never_panic(
    originals: &[Vec<u8>],
    seed: u64,
    read: impl Fn(usize, &[u8]),
) -> usize {
    let mut rng = XorShift::new(seed);
    let deadline = Instant::now() + Duration::from_secs(fuzz_seconds());
    let mut runs = 0;
    while Instant::now() < deadline {
        let which = runs % originals.len();
        let mut data = originals[which].clone();
        for _ in 0..1 + rng.next_u64() % 8 {
            let at = (rng.next_u64() as usize) % data.len().min(1 << 16);
            match rng.next_u64() % 4 {
                0 => data[at] = rng.next_u64() as u8,
                1 => data[at] ^= 0x80,
                2 => data.truncate(at.max(1)),
                _ => data[at] = 0xFF,
            }
            if data.len() <= at {
                break;
            }
        }
        let result = catch_unwind(AssertUnwindSafe(|| read(which, &data)));
        assert!(
            result.is_ok(),
            "reading a mutated file panicked (run {runs})"
        );
        runs += 1;
    }
    runs
}
