//! `llm-run`: compile and execute `llm` models.
//!
//! - `llm-run generate --model M --tokenizer T --prompt TEXT`: generate text as llama2.c's
//!   `run.c` does (same stdout, same sampler).
//! - `llm-run import --model M`: print the model's IR.
//! - `llm-run exec FILE --func NAME [--input NAME=FILE.npy ...]`: run one function.
//!
//! Errors are printed as `llm-run: error: ...` with exit status 1.

use std::{
    collections::HashMap,
    io::Write,
    path::PathBuf,
    process::ExitCode,
    time::{SystemTime, UNIX_EPOCH},
};

use clap::{Parser, Subcommand, ValueEnum};
use llm_ir::text;
use llm_runtime::{
    generate::Model, model, model_file, sampler::SamplerConfig, tokenizer::Tokenizer,
};
use llmc::exec;
use pliron::context::Context;

#[derive(Parser)]
#[command(name = "llm-run", version, about = "Compile and execute llm models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Execution backends.
#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    /// The reference interpreter.
    Interp,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (stdout is exactly what llama2.c's run.c prints).
    Generate {
        /// llama2.c checkpoint (.bin).
        #[arg(long)]
        model: PathBuf,
        /// llama2.c tokenizer (tokenizer.bin); by default the vocabulary embedded in a GGUF model.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The prompt.
        #[arg(long, default_value = "")]
        prompt: String,
        /// Positions to run, prompt included (run.c's -n); 0 means the model's sequence length.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
        /// Sampling temperature; 0 is greedy.
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// Top-p (nucleus) threshold; values outside (0, 1) disable it.
        #[arg(long, default_value_t = 0.9)]
        top_p: f32,
        /// Keep only the k most likely tokens (0 disables it).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Random seed (default: the current time).
        #[arg(long)]
        seed: Option<u64>,
        /// Execution backend.
        #[arg(long, value_enum, default_value = "interp")]
        backend: Backend,
        /// Print timings as one JSON object on stderr.
        #[arg(long)]
        stats: bool,
        /// The pass pipeline applied to the model before it runs (`""` for none).
        #[arg(long, default_value = "default")]
        passes: String,
    },
    /// Print the IR of a model.
    Import {
        /// llama2.c checkpoint (.bin).
        #[arg(long)]
        model: PathBuf,
    },
    /// Run one function of an IR file.
    Exec {
        /// The IR file.
        file: PathBuf,
        /// The function to run.
        #[arg(long)]
        func: String,
        /// An input: NAME=FILE.npy (arguments without one get seeded random data).
        #[arg(long = "input", value_parser = parse_input)]
        inputs: Vec<(String, PathBuf)>,
        /// Seed of the random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A llama2.c checkpoint whose weights `llm.weight` resolves to.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Save tensor results as result<i>.npy in this directory.
        #[arg(long)]
        output_dir: Option<PathBuf>,
    },
}

fn parse_input(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = text.split_once('=').ok_or("expected NAME=FILE.npy")?;
    Ok((name.to_string(), PathBuf::from(path)))
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("llm-run: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Generate {
            model,
            tokenizer,
            prompt,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            backend,
            stats,
            passes,
        } => {
            let Backend::Interp = backend;
            let loaded = model_file::load(&model).map_err(|e| e.to_string())?;
            let tokenizer = match (tokenizer, loaded.tokenizer) {
                (Some(path), _) => {
                    Tokenizer::load(&path, loaded.config.vocab).map_err(|e| e.to_string())?
                }
                (None, Some(embedded)) => embedded,
                (None, None) => {
                    return Err(format!(
                        "{} has no vocabulary; pass --tokenizer",
                        model.display()
                    ));
                }
            };
            let compiled = Model::compile(loaded.config, loaded.weights, &passes)?;
            // As in run.c, no seed (or 0, which would stall the generator) means the clock.
            let seed = seed.filter(|&s| s != 0).unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_secs().max(1))
            });
            let sampler = SamplerConfig {
                temperature,
                top_p,
                top_k,
                seed,
            };
            let out = compiled.generate(&tokenizer, &prompt, max_tokens, sampler)?;
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&out.text)
                .and_then(|()| stdout.flush())
                .map_err(|e| format!("cannot write: {e}"))?;
            if stats {
                eprintln!("{}", out.stats.to_json("interp"));
            }
            Ok(())
        }
        Command::Import { model: path } => {
            let loaded = model_file::load(&path).map_err(|e| e.to_string())?;
            let source = model::build_ir(&loaded.config, &loaded.weights)?;
            let mut ctx = Context::new();
            let module = text::parse_module(&mut ctx, &source)
                .map_err(|d| format!("model IR: {}", d.render("<model>")))?;
            print!("{}", text::print_module(&ctx, module));
            Ok(())
        }
        Command::Exec {
            file,
            func,
            inputs,
            seed,
            model,
            output_dir,
        } => {
            let name = file.display().to_string();
            let bytes = std::fs::read(&file).map_err(|e| format!("{name}: cannot read: {e}"))?;
            let source = text::decode_utf8(&bytes).map_err(|d| d.render(&name))?;
            let weights = model
                .map(|m| model_file::load(&m).map(|l| l.weights))
                .transpose()
                .map_err(|e| e.to_string())?;
            let inputs: HashMap<String, PathBuf> = inputs.into_iter().collect();
            let results = exec::exec(
                &name,
                source,
                &func,
                &inputs,
                seed,
                weights.as_ref().map(|w| w as _),
            )?;
            for (i, value) in results.iter().enumerate() {
                println!("result #{i}: {}", exec::describe(value));
            }
            if let Some(dir) = output_dir {
                for path in exec::save_results(&dir, &results)? {
                    println!("wrote {}", path.display());
                }
            }
            Ok(())
        }
    }
}
