//! GGUF import: the real files load, malformed copies are rejected with errors that name
//! the key or tensor, and mutated files never make the loader panic.

mod common;

use std::path::{Path, PathBuf};

use llm_ir::{dtype::DType, interp::Value, types::QuantFormat};
use llm_runtime::{gguf, llama2c};

fn shared(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/models")
        .join(file)
}

#[test]
fn stories260k_gguf_equals_the_llama2c_checkpoint() {
    let g = gguf::load(&shared("stories260K.gguf")).expect("loads");
    let (config, weights) = llama2c::load(&shared("stories260K.bin")).expect("loads");
    assert_eq!(
        (
            g.config.dim,
            g.config.layers,
            g.config.heads,
            g.config.kv_heads,
            g.config.vocab
        ),
        (64, 5, 8, 4, 512)
    );
    assert_eq!(g.config.norm_eps as f32, 1e-5);
    for name in weights.names() {
        use llm_ir::interp::WeightStore;
        assert_eq!(g.weights.weight(name), weights.weight(name), "{name}");
    }
    // GGUF stores the classifier separately (equal to the embedding).
    assert!(!g.config.tied_classifier && config.tied_classifier);
    let tok = g.tokenizer.expect("embedded vocabulary");
    assert_eq!(
        tok.encode("Once upon a time", true, false),
        vec![1, 403, 407, 261, 378]
    );
}

#[test]
fn the_tiny_random_model_loads_with_f16_weights_and_its_vocabulary() {
    let g = gguf::load(&shared("llama-2-tiny-random.gguf")).expect("loads");
    assert_eq!(
        (
            g.config.dim,
            g.config.layers,
            g.config.heads,
            g.config.vocab
        ),
        (8, 1, 2, 32000)
    );
    use llm_ir::interp::WeightStore;
    // Matrices keep their 16 bits (2 bytes a weight); the file stores its norms as F32.
    match g.weights.weight("layers.0.attention.wq.weight").as_deref() {
        Some(Value::Quantized(q)) => {
            assert_eq!(
                (q.format.clone(), q.bytes.len()),
                (QuantFormat::F16, 2 * 8 * 8)
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    match g
        .weights
        .weight("layers.0.attention_norm.weight")
        .as_deref()
    {
        Some(Value::Tensor(t)) => assert_eq!((t.dtype, t.shape.as_slice()), (DType::F32, &[8][..])),
        other => panic!("unexpected {other:?}"),
    }
    let tok = g.tokenizer.expect("embedded vocabulary");
    assert_eq!(tok.vocab(), 32000);
    assert_eq!(tok.encode("Hello world", true, false), vec![1, 15043, 3186]);
    assert_eq!(
        tok.stop_tokens(),
        vec![1, 2],
        "BOS and the file's EOS end a generation"
    );
}

/// The vocabulary's BOS and EOS come from the file's metadata: prompts begin with its BOS,
/// a piece's leading space is dropped after it, and generation stops at either; an id
/// outside the vocabulary is an error naming the key.
#[test]
fn bos_and_eos_come_from_the_file() {
    let bytes = std::fs::read(shared("llama-2-tiny-random.gguf")).expect("file");
    let with = |ids: [(&str, u32); 2]| {
        let mut data = bytes.clone();
        for (key, id) in ids {
            set_u32(&mut data, key, id);
        }
        data
    };
    let (bos, eos) = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id");
    let g = gguf::read(&with([(bos, 3), (eos, 4)])).expect("loads");
    let tok = g.tokenizer.expect("embedded vocabulary");
    assert_eq!(
        tok.encode("Hello world", true, true),
        vec![3, 15043, 3186, 4]
    );
    assert_eq!(tok.stop_tokens(), vec![3, 4]);
    // "▁Hello" after BOS prints without its space, after another token with it.
    assert_eq!(tok.decode(3, 15043), b"Hello");
    assert_eq!(tok.decode(1, 15043), b" Hello");
    let err = gguf::read(&with([(bos, 32000), (eos, 2)]))
        .err()
        .expect("an id outside the vocabulary");
    assert!(
        err.contains("tokenizer.ggml.bos_token_id = 32000 is not a token"),
        "{err}"
    );
}

/// Sets the u32 metadata value of `key` in the GGUF bytes `data` (the value, type 4,
/// follows its key).
fn set_u32(data: &mut [u8], key: &str, value: u32) {
    let at = data
        .windows(key.len())
        .position(|w| w == key.as_bytes())
        .expect("the key is in the file")
        + key.len();
    assert_eq!(data[at..at + 4], 4u32.to_le_bytes(), "{key} is a u32");
    data[at + 4..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// A `llama` file that rotates part of each head is refused, as llama.cpp refuses it (its
/// converter reorders llama's q and k rows for whole heads), not computed with whole-head
/// RoPE.
#[test]
fn partial_rope_is_refused_in_llama_files() {
    let mut data = std::fs::read(shared("stories260K.gguf")).expect("file");
    set_u32(&mut data, "llama.rope.dimension_count", 4);
    let err = gguf::read(&data).err().expect("partial RoPE");
    assert!(
        err.contains("llama.rope.dimension_count is 4: RoPE over part of a head of 8"),
        "{err}"
    );
}

#[test]
fn malformed_files_name_what_is_wrong() {
    let bytes = std::fs::read(shared("stories260K.gguf")).expect("file");
    // A tensor of a type the loader does not read (its info: name, dim count, dims, type).
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor info")
        + name.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
    let type_at = at + 4 + 8 * dims;
    let mut q8_1 = bytes.clone();
    q8_1[type_at..type_at + 4].copy_from_slice(&9u32.to_le_bytes());
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            q8_1,
            "tensor `token_embd.weight` has unsupported ggml type 9 (Q8_1)",
        ),
        (b"GGML....".to_vec(), "bad magic"),
        (
            [&bytes[..4], &1u32.to_le_bytes()[..], &bytes[8..]].concat(),
            "unsupported GGUF version 1",
        ),
        (bytes[..100].to_vec(), "byte offset"),
        (bytes[..5000].to_vec(), "byte offset"),
        (
            bytes[..bytes.len() - 1000].to_vec(),
            "runs past the end of the file",
        ),
        (
            [&bytes[..8], &u64::MAX.to_le_bytes()[..], &bytes[16..]].concat(),
            "claims",
        ),
    ];
    for (data, expected) in cases {
        let err = gguf::read(&data)
            .err()
            .unwrap_or_else(|| panic!("accepted a file that should fail with `{expected}`"));
        assert!(err.contains(expected), "expected `{expected}` in `{err}`");
    }
    let err = gguf::load(Path::new("/nonexistent/m.gguf"))
        .err()
        .expect("missing file");
    assert!(
        err.to_string()
            .starts_with("/nonexistent/m.gguf: cannot read"),
        "{err}"
    );
}

/// `tests/data/quant-mix.gguf` (see [`quant_mixes_load_in_their_stored_types_and_run_in_generated_code`]).
fn quant_mix() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/quant-mix.gguf")
}

/// The parts of `quant-mix.gguf` split in three files by the `gguf` package's writer
/// (`make_split_gguf.py`).
fn split_parts() -> Vec<PathBuf> {
    (1..=3)
        .map(|n| quant_mix().with_file_name(format!("quant-mix-split-{n:05}-of-00003.gguf")))
        .collect()
}

/// A model split across files (as llama.cpp's converters and `gguf-split` write them) loads
/// from its first part exactly as the single file: the same configuration and weights.
#[test]
fn split_models_load_as_their_single_file() {
    use llm_ir::interp::WeightStore;

    let whole = gguf::load(&quant_mix()).expect("loads");
    let split = gguf::load(&split_parts()[0]).expect("loads");
    assert_eq!(split.config, whole.config);
    let mut names = split.weights.names();
    names.sort();
    let mut expected = whole.weights.names();
    expected.sort();
    assert_eq!(names, expected);
    for name in names {
        assert!(
            split.weights.weight(name) == whole.weights.weight(name),
            "{name}"
        );
    }
}

/// A part other than the first, a first part without its siblings or renamed, parts out
/// of order or missing from the count, a wrong `split.tensors.count` and a tensor in two
/// parts are errors that name the file (or part) and what to do.
#[test]
fn split_models_refuse_wrong_parts() {
    let parts = split_parts();
    let err = gguf::load(&parts[1])
        .err()
        .expect("second part")
        .to_string();
    assert!(
        err.contains("quant-mix-split-00002-of-00003.gguf: part 2 of a model split in 3 files: load its first part, quant-mix-split-00001-of-00003.gguf"),
        "{err}"
    );
    // The first part alone in a folder, and renamed.
    let dir = std::env::temp_dir().join(format!("llmc-split-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let load_copy = |name: &str| {
        let copy = dir.join(name);
        std::fs::copy(&parts[0], &copy).expect("copy");
        gguf::load(&copy).err().expect("refused").to_string()
    };
    let alone = load_copy("quant-mix-split-00001-of-00003.gguf");
    let renamed = load_copy("first.gguf");
    std::fs::remove_dir_all(&dir).expect("clean up");
    assert!(
        alone.contains("quant-mix-split-00002-of-00003.gguf: cannot read"),
        "{alone}"
    );
    assert!(
        renamed.contains("first.gguf: part 1 of a model split in 3 files, but not named `PREFIX-00001-of-00003.gguf`"),
        "{renamed}"
    );
    let bytes: Vec<Vec<u8>> = parts
        .iter()
        .map(|p| std::fs::read(p).expect("part"))
        .collect();
    let err = gguf::read(&bytes[0]).err().expect("read alone");
    assert!(
        err.contains("part 1 of a model split in 3 files: load its first part by its file name, beside the other 2"),
        "{err}"
    );
    let read = |parts: [&[u8]; 3]| gguf::read_parts(&parts, &mut |_| {}).err();
    assert_eq!(
        read([&bytes[0], &bytes[2], &bytes[1]]),
        Some((
            1,
            "part 3 of a model split in 3 files, read as part 2 of 3".into()
        ))
    );
    assert_eq!(
        read([&bytes[0], &bytes[1], &bytes[1]]).map(|e| e.0),
        Some(2)
    );
    assert_eq!(
        gguf::read_parts(&[&bytes[0], &bytes[1]], &mut |_| {}).err(),
        Some((
            0,
            "part 1 of a model split in 3 files, read as part 1 of 2".into()
        ))
    );
    assert_eq!(
        gguf::read_parts(&[], &mut |_| {}).err(),
        Some((0, "no GGUF file to read".into()))
    );
    // `split.tensors.count` (an i32 after its key and type) one short.
    let mut short = bytes[0].clone();
    let key = b"split.tensors.count";
    let at = short
        .windows(key.len())
        .position(|w| w == key)
        .expect("the key")
        + key.len()
        + 4;
    short[at..at + 4].copy_from_slice(&29i32.to_le_bytes());
    assert_eq!(
        read([&short, &bytes[1], &bytes[2]]),
        Some((
            0,
            "split.tensors.count = 29, but the 3 parts hold 30 tensors".into()
        ))
    );
    // Part 2's first layer-1 norm renamed as layer 0's, which part 1 holds.
    let mut twice = bytes[1].clone();
    let at = twice
        .windows(15)
        .position(|w| w == b"blk.1.attn_norm")
        .expect("a layer-1 norm in part 2");
    twice[at + 4] = b'0';
    assert_eq!(
        read([&bytes[0], &twice, &bytes[2]]),
        Some((1, "tensor `blk.0.attn_norm.weight` appears twice".into()))
    );
}

#[test]
fn mutated_files_never_panic() {
    let originals = [
        std::fs::read(shared("stories260K.gguf")).expect("file"),
        std::fs::read(shared("llama-2-tiny-random.gguf")).expect("file"),
        std::fs::read(quant_mix()).expect("file"),
    ];
    let runs = common::mutated_copies_never_panic(&originals, 0x6767, |_, data| {
        let _ = gguf::read(data);
    });
    assert!(runs > 0);
}

/// Each part of a split model, mutated in turn, read with the others never panics.
#[test]
fn mutated_split_parts_never_panic() {
    let parts: Vec<Vec<u8>> = split_parts()
        .iter()
        .map(|p| std::fs::read(p).expect("part"))
        .collect();
    let runs = common::mutated_copies_never_panic(&parts, 0x5917, |which, data| {
        let mut all: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
        all[which] = data;
        let _ = gguf::read_parts(&all, &mut |_| {});
    });
    assert!(runs > 0);
}

/// A GGUF file whose matrices mix the ggml types as llama.cpp's Q2_K, Q4_K_S, Q5_K_M,
/// IQ4_XS, IQ3_XXS and IQ3_M files do, with the Q5_0, Q5_1 and IQ4_NL they fall back to
/// (`tests/data/quant-mix.gguf`, written by the `gguf` Python package's writer and
/// quantizer, `make_quant_mix_gguf.py`) loads with every matrix in its stored type, and the
/// CPU backend (and the GPU where there is one) computes the interpreter's logits in
/// generated code, no op left to the reference semantics.
#[test]
fn quant_mixes_load_in_their_stored_types_and_run_in_generated_code() {
    use llm_ir::interp::WeightStore;
    use llm_runtime::generate::{Backend, Model, Step};

    let g = gguf::load(&quant_mix()).expect("loads");
    let format = |name: &str| match g.weights.weight(name).as_deref() {
        Some(Value::Quantized(q)) => q.format.clone(),
        other => panic!("{name}: {other:?}"),
    };
    for (name, stored) in [
        ("tok_embeddings.weight", QuantFormat::Iq1M),
        ("layers.0.attention.wk.weight", QuantFormat::Q5_0),
        ("layers.0.attention.wv.weight", QuantFormat::Q5K),
        ("layers.0.attention.wq.weight", QuantFormat::Q4K),
        ("layers.0.feed_forward.w2.weight", QuantFormat::Iq1S),
        ("layers.0.feed_forward.w3.weight", QuantFormat::Iq3S),
        ("layers.0.feed_forward.w1.weight", QuantFormat::Iq2S),
        ("layers.0.attention.wo.weight", QuantFormat::Iq2Xxs),
        ("layers.1.attention.wq.weight", QuantFormat::Iq4Xs),
        ("layers.1.attention.wo.weight", QuantFormat::Iq3Xxs),
        ("layers.1.feed_forward.w1.weight", QuantFormat::Q2K),
        ("layers.1.attention.wk.weight", QuantFormat::Iq4Nl),
        ("layers.1.attention.wv.weight", QuantFormat::Q3K),
        ("layers.1.feed_forward.w2.weight", QuantFormat::Iq2Xs),
        ("layers.1.feed_forward.w3.weight", QuantFormat::Q5_1),
        ("layers.2.attention.wq.weight", QuantFormat::Tq1_0),
        ("layers.2.attention.wk.weight", QuantFormat::Tq1_0),
        ("layers.2.attention.wv.weight", QuantFormat::Nvfp4),
        ("layers.2.attention.wo.weight", QuantFormat::Mxfp4),
        ("layers.2.feed_forward.w1.weight", QuantFormat::Q1_0),
        ("layers.2.feed_forward.w3.weight", QuantFormat::Tq2_0),
        ("layers.2.feed_forward.w2.weight", QuantFormat::Tq2_0),
        ("output.weight", QuantFormat::Q6K),
    ] {
        assert_eq!(format(name), stored, "{name}");
    }
    let prompt = [1, 40, 7, 200, 93, 5];
    let logits = |backend: &Backend, passes: &str| {
        let model = Model::compile_on(backend, g.config.clone(), g.weights.clone(), passes)
            .expect("compiles");
        let (prefill, cache) = model
            .forward(Step::Prefill, &prompt, 0, model.new_cache(1))
            .expect("prefill");
        let (decode, _) = model
            .forward(Step::Decode, &[17], prompt.len(), cache)
            .expect("decode");
        for step in [Step::Prefill, Step::Decode] {
            let reference_ops = common::reference_ops(&model, backend, step);
            assert!(
                reference_ops.is_empty(),
                "{backend:?} {step:?} left ops to the reference semantics"
            );
        }
        prefill
            .into_iter()
            .chain(decode)
            .flatten()
            .collect::<Vec<f32>>()
    };
    let mut backends = vec![Backend::Cpu { threads: 2 }];
    if llm_lower::gpu::test_device(&Default::default()).is_some() {
        backends.push(Backend::Gpu(Default::default()));
    }
    // Also with q8_0 activations, `llm-run`'s CPU pipeline (the integer kernels). The
    // backends agree within 1e-4 of the scale (measured 8.4e-7 on the CPU and 1.1e-6 on
    // lavapipe with f32 activations, 3.8e-7 on lavapipe with q8_0 ones), except the CPU's
    // integer kernels, within 5e-2, as `tests/e2e.rs` allows q8_0 activations: rounding an
    // activation to its q8_0 block is a step function, so a last-bit difference upstream
    // (the kernels add in another order than the interpreter) can move a code by a step,
    // 1/127 of its block's largest value, which later layers carry on (measured 1.2e-2,
    // with the IQ1 kernels replaced by the generated decoders too, so one of the other
    // formats' kernels moves one; 6.1e-7 with the generated decoders for every format,
    // which move none: the kernels agree with the dequantized product to 1e-6 in
    // `kq8dot`'s unit test and with the interpreter in `llm-lower/tests/kernels.rs`).
    for passes in ["default", "default,quantize-activations"] {
        let reference = logits(&Backend::Interp, passes);
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale.is_finite() && scale > 0.1, "logits of scale {scale}");
        for backend in &backends {
            let integer_kernels = matches!(backend, Backend::Cpu { .. }) && passes != "default";
            let tolerance = if integer_kernels { 5e-2 } else { 1e-4 };
            let got = logits(backend, passes);
            let err = got
                .iter()
                .zip(&reference)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= tolerance * scale,
                "{backend:?} {passes}: logits differ by {err} (scale {scale})"
            );
            println!(
                "{backend:?} {passes}: largest logit difference {:e} of the scale",
                err / scale
            );
        }
    }
}
