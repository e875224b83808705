//! The plain-Rust baseline reproduces the golden run, and synthetic models load.

use std::path::{Path, PathBuf};

use llm_runtime::{baseline::Baseline, llama2c, sampler::argmax, synth};

fn shared(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared")
        .join(file)
}

#[test]
fn baseline_matches_the_golden_logits() {
    let (config, weights) = llama2c::load(&shared("models/stories260K.bin")).expect("model");
    let mut b = Baseline::new(&config, &weights).expect("baseline");
    let ids_text = std::fs::read_to_string(shared("golden/little_dog.ids.txt")).expect("ids");
    let ids: Vec<u32> = ids_text
        .lines()
        .find(|l| l.starts_with("ids:"))
        .expect("ids line")[4..]
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    let golden: Vec<f32> = std::fs::read(shared("golden/little_dog.logits.f32"))
        .expect("logits")
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let prompt = 13;
    for pos in 0..ids.len() - 1 {
        let logits = b.forward(ids[pos], pos);
        let row = &golden[pos * 512..(pos + 1) * 512];
        let err = logits
            .iter()
            .zip(row)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err <= 1e-4, "position {pos}: logit error {err}");
        if pos + 1 >= prompt {
            assert_eq!(argmax(&logits) as u32, ids[pos + 1], "position {pos}");
        }
    }
}

#[test]
fn synthetic_models_have_the_requested_shape() {
    let path = std::env::temp_dir().join(format!("llmc-synth-{}.bin", std::process::id()));
    let shape = synth::shape("260K").expect("known shape");
    synth::write(&path, &shape, 7).expect("written");
    let (config, _) = llama2c::load(&path).expect("loads");
    assert_eq!(
        (
            config.dim,
            config.layers,
            config.heads,
            config.kv_heads,
            config.vocab
        ),
        (64, 5, 8, 4, 512)
    );
    let again = std::env::temp_dir().join(format!("llmc-synth-{}-2.bin", std::process::id()));
    synth::write(&again, &shape, 7).expect("written");
    assert_eq!(
        std::fs::read(&path).expect("a"),
        std::fs::read(&again).expect("b"),
        "same seed, same bytes"
    );
    synth::write(&again, &shape, 6).expect("written");
    assert_ne!(
        std::fs::read(&path).expect("a"),
        std::fs::read(&again).expect("b"),
        "neighbouring seeds give different weights"
    );
    let zero = std::env::temp_dir().join(format!("llmc-synth-{}-0.bin", std::process::id()));
    assert!(
        synth::write(&zero, &shape, 0).is_err(),
        "seed 0 is rejected"
    );
    assert!(!zero.exists(), "nothing is left behind");
    std::fs::remove_file(&path).ok();
    std::fs::remove_file(&again).ok();
    assert!(
        synth::shape("15M").is_some()
            && synth::shape("110M").is_some()
            && synth::shape("7B").is_none()
    );
}
