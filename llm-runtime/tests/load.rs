//! Bad llama2.c checkpoints and tokenizers are rejected with clear errors, never a panic or
//! a huge allocation.

use std::path::{Path, PathBuf};

use llm_runtime::{llama2c, tokenizer::Tokenizer};

fn shared(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/models")
        .join(file)
}

fn model_bytes() -> Vec<u8> {
    std::fs::read(shared("stories260K.bin")).expect("model file")
}

fn header(values: [i32; 7]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn the_real_model_loads() {
    let (config, weights) = llama2c::parse(&model_bytes()).expect("stories260K parses");
    assert_eq!(
        (
            config.dim,
            config.hidden_dim,
            config.layers,
            config.heads,
            config.kv_heads
        ),
        (64, 172, 5, 8, 4)
    );
    assert_eq!(
        (config.vocab, config.seq_len, config.tied_classifier),
        (512, 512, true)
    );
    assert_eq!(weights.names().len(), 2 + 5 * 9);
}

#[test]
fn truncated_files_are_rejected() {
    let bytes = model_bytes();
    for len in [0, 3, 27, 28, 1000, bytes.len() - 1] {
        let err = llama2c::parse(&bytes[..len]).expect_err("truncated file");
        assert!(err.contains("bytes"), "{len}: {err}");
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 4]);
    let err = llama2c::parse(&longer).expect_err("trailing bytes");
    assert!(
        err.contains("needs 1056540 bytes, but the file has 1056544"),
        "{err}"
    );
}

#[test]
fn absurd_headers_are_rejected_before_allocating() {
    let cases = [
        ([64, 172, 5, 8, 4, 512, 0], "seq_len = 0"),
        ([i32::MAX, 172, 5, 8, 4, 512, 512], "dim = 2147483647"),
        ([64, -1, 5, 8, 4, 512, 512], "hidden_dim = -1"),
        (
            [64, 172, 5, 7, 4, 512, 512],
            "is not a multiple of the 7 heads",
        ),
        (
            [64, 172, 5, 8, 3, 512, 512],
            "are not a multiple of the 3 KV heads",
        ),
        ([64, 172, 5, 8, 4, i32::MIN, 512], "vocab_size"),
        ([1 << 20, 1 << 20, 1 << 20, 1, 1, 1 << 20, 1 << 20], "needs"),
    ];
    for (values, expected) in cases {
        let err = llama2c::parse(&header(values)).expect_err("bad header");
        assert!(
            err.contains(expected),
            "{values:?}: expected `{expected}` in `{err}`"
        );
    }
}

#[test]
fn load_errors_name_the_file() {
    let err = llama2c::load(Path::new("/nonexistent/model.bin")).expect_err("missing file");
    assert!(
        err.to_string()
            .starts_with("/nonexistent/model.bin: cannot read"),
        "{err}"
    );
    let dir = std::env::temp_dir().join(format!("llmc-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("short.bin");
    std::fs::write(&path, &model_bytes()[..100]).expect("write");
    let err = llama2c::load(&path).expect_err("truncated file");
    assert!(
        err.to_string().starts_with(&path.display().to_string()),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_negative_vocab_size_means_an_untied_classifier() {
    let bytes = model_bytes();
    let mut untied = bytes[..28].to_vec();
    untied[20..24].copy_from_slice(&(-512i32).to_le_bytes());
    untied.extend_from_slice(&bytes[28..]);
    untied.extend(std::iter::repeat_n(0u8, 512 * 64 * 4));
    let (config, weights) = llama2c::parse(&untied).expect("untied model parses");
    assert!(!config.tied_classifier);
    assert!(weights.names().contains(&"output.weight"));
}

#[test]
fn bad_tokenizers_are_rejected() {
    let bytes = std::fs::read(shared("tok512.bin")).expect("tokenizer file");
    let tok = Tokenizer::parse(&bytes, 512).expect("tok512 parses");
    assert_eq!(tok.vocab(), 512);
    for len in [0, 2, 4, 100, bytes.len() - 1] {
        let err = Tokenizer::parse(&bytes[..len], 512).expect_err("truncated tokenizer");
        assert!(err.contains("truncated at byte offset"), "{len}: {err}");
    }
    let err = Tokenizer::parse(&bytes, 513).expect_err("more tokens than the file has");
    assert!(err.contains("token 512"), "{err}");
    let mut bad_len = bytes.clone();
    bad_len[8..12].copy_from_slice(&(-5i32).to_le_bytes());
    let err = Tokenizer::parse(&bad_len, 512).expect_err("negative length");
    assert!(
        err.contains("token 0 has length -5 at byte offset 8"),
        "{err}"
    );
}

#[test]
fn tokenizer_encodes_and_decodes_like_run_c() {
    let tok = Tokenizer::load(&shared("tok512.bin"), 512).expect("tokenizer");
    assert_eq!(
        tok.encode("Once upon a time", true, false),
        vec![1, 403, 407, 261, 378]
    );
    assert_eq!(tok.encode("", true, false), vec![1]);
    assert_eq!(tok.encode("", true, true), vec![1, 2]);
    // Code points outside the vocabulary fall back to byte tokens (id = byte + 3), and
    // decoding gives the text back (with the dummy-prefix space).
    let ids = tok.encode("é中", false, false);
    assert!(
        ids.iter().any(|&id| (3..259).contains(&id)),
        "no byte tokens in {ids:?}"
    );
    let raw: Vec<u8> = ids
        .iter()
        .flat_map(|&id| {
            if (3..259).contains(&id) {
                vec![(id - 3) as u8]
            } else {
                tok.piece(id).to_vec()
            }
        })
        .collect();
    assert_eq!(String::from_utf8_lossy(&raw), " é中");
    // Like run.c's safe_printf, a lone non-printable byte prints nothing.
    assert_eq!(tok.decode(0, 0xE4 + 3), b"");
    // The leading space after BOS is dropped; byte tokens decode to their byte.
    assert_eq!(tok.decode(1, 403), b"Once");
    assert_eq!(tok.decode(403, 407), b" upon");
    assert_eq!(tok.decode(0, 13), b"\n");
}

#[test]
fn mutated_checkpoints_and_tokenizers_never_panic() {
    use llm_runtime::sampler::XorShift;
    let model = model_bytes();
    let tokenizer = std::fs::read(shared("tok512.bin")).expect("tokenizer file");
    let mut rng = XorShift::new(0xF00D);
    for run in 0..3000 {
        let (base, header) = if run % 2 == 0 {
            (&model, 28)
        } else {
            (&tokenizer, tokenizer.len())
        };
        let mut data = base.clone();
        for _ in 0..1 + rng.next_u64() % 4 {
            let at = (rng.next_u64() as usize) % header.min(data.len());
            match rng.next_u64() % 3 {
                0 => data[at] = rng.next_u64() as u8,
                1 => data[at] ^= 0x80,
                _ => data.truncate(at.max(1)),
            }
        }
        let result = std::panic::catch_unwind(|| {
            if run % 2 == 0 {
                let _ = llama2c::parse(&data);
            } else {
                let _ = Tokenizer::parse(&data, 512);
            }
        });
        assert!(result.is_ok(), "run {run} panicked");
    }
}
