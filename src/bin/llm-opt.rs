//! `llm-opt`: parse, verify, transform and print `llm` IR, like `mlir-opt`.
//!
//! Errors are printed as `FILE:LINE:COL: error: MESSAGE` on stderr with exit status 1.

use std::{
    io::{Read, Write},
    path::Path,
    process::ExitCode,
};

use clap::Parser;
use llm_ir::text::{self, Diagnostic};
use llmc::pipeline::{self, OptArgs};

fn main() -> ExitCode {
    let args = OptArgs::parse();
    if args.list_passes {
        print!("{}", llm_passes::pass::describe_passes());
        return ExitCode::SUCCESS;
    }
    let (name, bytes) = match read_input(args.input.as_deref()) {
        Ok(input) => input,
        Err((name, msg)) => {
            return fail(
                &name,
                &Diagnostic {
                    line: 1,
                    column: 1,
                    message: msg,
                },
            );
        }
    };
    let source = match text::decode_utf8(&bytes) {
        Ok(s) => s,
        Err(d) => return fail(&name, &d),
    };
    let output = match pipeline::run(&args, source) {
        Ok(out) => out,
        Err(d) => return fail(&name, &d),
    };
    eprint!("{}", output.log);
    match write_output(args.output.as_deref(), &output.text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("llm-opt: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn fail(name: &str, diagnostic: &Diagnostic) -> ExitCode {
    eprintln!("{}", diagnostic.render(name));
    ExitCode::FAILURE
}

/// Reads the input file or standard input, returning its display name and bytes.
fn read_input(path: Option<&Path>) -> Result<(String, Vec<u8>), (String, String)> {
    match path {
        None => read_stdin(),
        Some(p) if p.as_os_str() == "-" => read_stdin(),
        Some(p) => {
            let name = p.display().to_string();
            match std::fs::read(p) {
                Ok(bytes) => Ok((name, bytes)),
                Err(e) => Err((name, format!("cannot read the input file: {e}"))),
            }
        }
    }
}

fn read_stdin() -> Result<(String, Vec<u8>), (String, String)> {
    let name = "<stdin>".to_string();
    let mut bytes = Vec::new();
    match std::io::stdin().read_to_end(&mut bytes) {
        Ok(_) => Ok((name, bytes)),
        Err(e) => Err((name, format!("cannot read standard input: {e}"))),
    }
}

/// Writes the output atomically (a temporary file renamed into place) or to standard output.
fn write_output(path: Option<&Path>, text: &str) -> Result<(), String> {
    let Some(path) = path else {
        let mut out = std::io::stdout().lock();
        return out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write standard output: {e}"));
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.llm-opt.tmp"));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {}: {e}", path.display())
        })
}
