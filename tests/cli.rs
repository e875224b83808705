//! `llm-opt` as a user runs it: exit status, diagnostics on stderr, stdin, and output files
//! that are written only on success.

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

const GOOD: &str = "builtin.module @m {\n  ^entry():\n    builtin.func @f: builtin.function <(llm.tensor <4xf32>) -> (llm.tensor <4xf32>)> {\n      ^body(x: llm.tensor <4xf32>):\n        y = llm.silu x : llm.tensor <4xf32>;\n        llm.return y\n    }\n}\n";

fn llm_opt(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llm-opt"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("llm-opt starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("llm-opt finishes")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn reads_stdin_and_prints_verified_ir() {
    let out = llm_opt(&[], GOOD.as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("y = llm.silu x : llm.tensor <4xf32>;"));
    let dash = llm_opt(&["-"], GOOD.as_bytes());
    assert_eq!(dash.stdout, out.stdout);
}

#[test]
fn bad_input_is_one_located_error_with_status_1() {
    let cases: &[(&[u8], &str)] = &[
        (b"", "<stdin>:1:1: error: empty input"),
        (b"\n\n   \n", "<stdin>:1:1: error: empty input"),
        (
            b"builtin.module @m {\n  \xff\xfe",
            "<stdin>:2:3: error: input is not valid UTF-8",
        ),
        (
            b"llm.silu x",
            "<stdin>:1:1: error: expected a top-level builtin.module",
        ),
        (
            b"builtin.module @m {",
            "<stdin>:1:20: error: unexpected end of input",
        ),
    ];
    for (input, expected) in cases {
        let out = llm_opt(&[], input);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.starts_with(expected),
            "expected `{expected}`, got `{err}`"
        );
        assert_eq!(err.lines().count(), 1, "one line, no backtrace: {err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn a_missing_file_is_reported_with_its_name() {
    let out = llm_opt(&["/nonexistent/in.plir"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("/nonexistent/in.plir:1:1: error: cannot read the input file")
    );
}

#[test]
fn output_file_is_written_only_on_success() {
    let dir = std::env::temp_dir().join(format!("llm-opt-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = dir.join("good.plir");
    let bad = dir.join("bad.plir");
    let out_path = dir.join("out.plir");
    std::fs::write(&good, GOOD).expect("write input");
    std::fs::write(&bad, GOOD.replace("llm.silu x", "llm.silu x, x")).expect("write input");

    let out = llm_opt(
        &[bad.to_str().unwrap(), "-o", out_path.to_str().unwrap()],
        b"",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bad.plir:5:"), "{}", stderr(&out));
    assert!(!out_path.exists(), "no output after an error");

    let out = llm_opt(
        &[good.to_str().unwrap(), "-o", out_path.to_str().unwrap()],
        b"",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let written = std::fs::read_to_string(&out_path).expect("output written");
    assert!(written.contains("llm.silu"));
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
    std::fs::remove_dir_all(&dir).ok();
}

fn llm_run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_llm-run"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("llm-run runs")
}

#[test]
fn llm_run_exec_runs_a_function_on_random_and_npy_inputs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let file = format!("{root}/tests/filetests/ir/shape.plir");
    let out = llm_run(&["exec", &file, "--func", "f", "--seed", "7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("result #0: tensor<[20, 16] x f32>"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 6, "{text}");
    let again = llm_run(&["exec", &file, "--func", "f", "--seed", "7"]);
    assert_eq!(
        again.stdout, out.stdout,
        "the same seed gives the same inputs"
    );

    // The decode-step example with real weights and inputs from .npy files.
    let dir = std::env::temp_dir().join(format!("llm-run-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let write = |name: &str, shape: Vec<usize>, values: Vec<i64>| {
        let t = llm_ir::interp::Tensor::from_i64(shape, llm_ir::dtype::DType::I32, values);
        let path = dir.join(format!("{name}.npy"));
        std::fs::write(&path, llm_runtime::npy::write(&t)).expect("write npy");
        format!("{name}={}", path.display())
    };
    let inputs = [
        write("tokens", vec![1], vec![42]),
        write("positions", vec![1], vec![0]),
        write("slots", vec![1], vec![0]),
        write("block_tables", vec![1, 1], vec![0]),
        write("context_lens", vec![1], vec![1]),
    ];
    let example = format!("{root}/examples/llama_decode_step.plir");
    let model = format!("{root}/../shared/models/stories260K.bin");
    let outdir = dir.join("out");
    let mut args = vec![
        "exec",
        example.as_str(),
        "--func",
        "decode",
        "--model",
        model.as_str(),
        "--output-dir",
    ];
    let outdir_s = outdir.display().to_string();
    args.push(&outdir_s);
    for input in &inputs {
        args.extend(["--input", input.as_str()]);
    }
    let mut interp_args = args.clone();
    interp_args.extend(["--backend", "interp"]);
    let out = llm_run(&interp_args);
    assert!(out.status.success(), "{}", stderr(&out));
    let logits =
        llm_runtime::npy::read(&std::fs::read(outdir.join("result0.npy")).expect("saved logits"))
            .expect("npy");
    assert_eq!(logits.shape, vec![1, 512]);
    assert!(
        logits
            .floats()
            .expect("floats")
            .iter()
            .all(|x| x.is_finite())
    );

    // The same step on the CPU backend (the default) computes the same logits (to float
    // rounding).
    let cpu_dir = dir.join("cpu").display().to_string();
    let mut cpu_args = args.clone();
    let at = cpu_args
        .iter()
        .position(|a| *a == outdir_s)
        .expect("output dir");
    cpu_args[at] = &cpu_dir;
    cpu_args.extend(["--backend", "cpu", "--threads", "2"]);
    let out = llm_run(&cpu_args);
    assert!(out.status.success(), "{}", stderr(&out));
    let cpu_logits = llm_runtime::npy::read(
        &std::fs::read(dir.join("cpu").join("result0.npy")).expect("saved logits"),
    )
    .expect("npy");
    let err = cpu_logits
        .floats()
        .expect("floats")
        .iter()
        .zip(logits.floats().expect("floats"))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-4, "cpu and interpreter logits differ by {err}");

    let bad = llm_run(&[
        "exec",
        &example,
        "--func",
        "decode",
        "--input",
        "nonsense=x.npy",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let missing_weights = llm_run(&["exec", &example, "--func", "decode"]);
    assert!(
        stderr(&missing_weights).contains("no tensor named"),
        "{}",
        stderr(&missing_weights)
    );
    std::fs::remove_dir_all(&dir).ok();
}
