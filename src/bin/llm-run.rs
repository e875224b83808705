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
use llm_ir::{
    dtype::DType,
    text,
    types::{KvStorage, QuantFormat},
};
use llm_runtime::{generate::Backend, model, sampler::SamplerConfig, synth};
use llmc::{exec, serve};
use pliron::context::Context;

#[derive(Parser)]
#[command(name = "llm-run", version, about = "Compile and execute llm models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Execution backends.
#[derive(Clone, Copy, ValueEnum)]
enum BackendName {
    /// The reference interpreter.
    Interp,
    /// Cranelift JIT kernels on the CPU.
    Cpu,
    /// WGSL compute shaders through wgpu (a GPU, or a software adapter such as lavapipe).
    Gpu,
}

/// GGUF block formats a model can be quantized to when it loads.
#[derive(Clone, Copy, ValueEnum)]
enum Quantize {
    /// 8-bit, blocks of 32.
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit, blocks of 32.
    #[value(name = "q4_0")]
    Q4_0,
    /// 4-bit with minimum, blocks of 32.
    #[value(name = "q4_1")]
    Q4_1,
    /// 5-bit, blocks of 32.
    #[value(name = "q5_0")]
    Q5_0,
    /// 5-bit with minimum, blocks of 32.
    #[value(name = "q5_1")]
    Q5_1,
    /// 4-bit indices into 16 non-linear levels, blocks of 32.
    #[value(name = "iq4_nl")]
    Iq4Nl,
    /// 4-bit K-quant, super-blocks of 256.
    #[value(name = "q4_k")]
    Q4K,
    /// 6-bit K-quant, super-blocks of 256.
    #[value(name = "q6_k")]
    Q6K,
    /// 2-bit K-quant, super-blocks of 256.
    #[value(name = "q2_k")]
    Q2K,
    /// 3-bit K-quant, super-blocks of 256.
    #[value(name = "q3_k")]
    Q3K,
    /// 5-bit K-quant, super-blocks of 256.
    #[value(name = "q5_k")]
    Q5K,
    /// 4-bit indices into 16 non-linear levels, 6-bit scales per 32 in super-blocks of 256.
    #[value(name = "iq4_xs")]
    Iq4Xs,
    /// Groups of four 3-bit magnitudes from a 256-entry grid, with signs and 4-bit scales
    /// per 32, super-blocks of 256 (3.06 bits a value).
    #[value(name = "iq3_xxs")]
    Iq3Xxs,
    /// Groups of four 3-bit magnitudes from a 512-entry grid, a sign bit a value and
    /// 4-bit scales per 32, super-blocks of 256 (3.44 bits a value).
    #[value(name = "iq3_s")]
    Iq3S,
    /// Groups of eight magnitudes (8, 25 or 43) from a 256-entry grid, with signs and
    /// 4-bit scales per 32, super-blocks of 256 (2.06 bits a value).
    #[value(name = "iq2_xxs")]
    Iq2Xxs,
    /// Groups of eight magnitudes from a 512-entry grid, with signs and 4-bit scales per
    /// 16, super-blocks of 256 (2.31 bits a value).
    #[value(name = "iq2_xs")]
    Iq2Xs,
    /// Groups of eight magnitudes from a 1024-entry grid, a sign bit a value and 4-bit
    /// scales per 16, super-blocks of 256 (2.56 bits a value).
    #[value(name = "iq2_s")]
    Iq2S,
    /// Groups of eight values -1, 0 or 1 from a 2048-entry grid, shifted by ±1/8 per 32,
    /// 3-bit scales per 32, super-blocks of 256 (1.56 bits a value).
    #[value(name = "iq1_s")]
    Iq1S,
    /// Groups of eight values -1, 0 or 1 from a 2048-entry grid, each shifted by ±1/8,
    /// 3-bit scales per 16, super-blocks of 256 (1.75 bits a value).
    #[value(name = "iq1_m")]
    Iq1M,
    /// Ternary values -1, 0 or 1 times the largest magnitude of each 256, five a byte
    /// (1.69 bits a value): for ternary models (TriLM, BitNet b1.58).
    #[value(name = "tq1_0")]
    Tq1_0,
    /// Ternary values as 2-bit codes, an f16 scale per 256 (2.06 bits a value).
    #[value(name = "tq2_0")]
    Tq2_0,
    /// Sign bits under the mean magnitude of each 128 (1.125 bits a value): for 1-bit
    /// models.
    #[value(name = "q1_0")]
    Q1_0,
    /// 4-bit floats (E2M1) under a power-of-two scale per 32 (OCP MX; 4.25 bits a value).
    #[value(name = "mxfp4")]
    Mxfp4,
    /// 4-bit floats (E2M1) under an 8-bit float scale (UE4M3) per 16, blocks of 64 (4.5
    /// bits a value).
    #[value(name = "nvfp4")]
    Nvfp4,
    /// 4-bit NormalFloat, an f16 absmax scale per 64 values.
    #[value(name = "nf4")]
    Nf4,
    /// Symmetric 8-bit integers, an f16 scale per 32 values of a row.
    #[value(name = "int8")]
    Int8,
    /// Symmetric 4-bit integers, an f16 scale per 32 values of a row.
    #[value(name = "int4")]
    Int4,
}

/// `--kv-dtype`: how the KV cache stores keys and values.
#[derive(Clone, Copy, clap::ValueEnum)]
enum KvDtype {
    /// 32-bit floats.
    F32,
    /// IEEE half precision: half the memory (keys and values rounded to it).
    F16,
    /// bfloat16: half the memory, f32's range, 8 bits of precision.
    Bf16,
    /// GGUF q8_0 blocks of 32 values along each head: 0.56 of f16's memory (heads of a
    /// multiple of 32).
    #[value(name = "q8_0")]
    Q8_0,
    /// GGUF q4_0 blocks of 32: 0.31 of f16's memory (heads of a multiple of 32).
    #[value(name = "q4_0")]
    Q4_0,
    /// GGUF q4_1 blocks of 32, with a minimum: 0.31 of f16's memory (heads of a multiple
    /// of 32).
    #[value(name = "q4_1")]
    Q4_1,
    /// GGUF q4_k super-blocks of 256 (heads of a multiple of 256).
    #[value(name = "q4_k")]
    Q4K,
    /// GGUF q6_k super-blocks of 256 (heads of a multiple of 256).
    #[value(name = "q6_k")]
    Q6K,
    /// GGUF q2_k super-blocks of 256 (heads of a multiple of 256).
    #[value(name = "q2_k")]
    Q2K,
}

impl KvDtype {
    fn storage(self) -> KvStorage {
        match self {
            KvDtype::F32 => KvStorage::Float(DType::F32),
            KvDtype::F16 => KvStorage::Float(DType::F16),
            KvDtype::Bf16 => KvStorage::Float(DType::BF16),
            KvDtype::Q8_0 => KvStorage::Quantized(QuantFormat::Q8_0),
            KvDtype::Q4_0 => KvStorage::Quantized(QuantFormat::Q4_0),
            KvDtype::Q4_1 => KvStorage::Quantized(QuantFormat::Q4_1),
            KvDtype::Q4K => KvStorage::Quantized(QuantFormat::Q4K),
            KvDtype::Q6K => KvStorage::Quantized(QuantFormat::Q6K),
            KvDtype::Q2K => KvStorage::Quantized(QuantFormat::Q2K),
        }
    }
}

impl Quantize {
    fn format(self) -> QuantFormat {
        match self {
            Quantize::Q8_0 => QuantFormat::Q8_0,
            Quantize::Q4_0 => QuantFormat::Q4_0,
            Quantize::Q4_1 => QuantFormat::Q4_1,
            Quantize::Q5_0 => QuantFormat::Q5_0,
            Quantize::Q5_1 => QuantFormat::Q5_1,
            Quantize::Iq4Nl => QuantFormat::Iq4Nl,
            Quantize::Q4K => QuantFormat::Q4K,
            Quantize::Q6K => QuantFormat::Q6K,
            Quantize::Q2K => QuantFormat::Q2K,
            Quantize::Q3K => QuantFormat::Q3K,
            Quantize::Q5K => QuantFormat::Q5K,
            Quantize::Iq4Xs => QuantFormat::Iq4Xs,
            Quantize::Iq3Xxs => QuantFormat::Iq3Xxs,
            Quantize::Iq3S => QuantFormat::Iq3S,
            Quantize::Iq2Xxs => QuantFormat::Iq2Xxs,
            Quantize::Iq2Xs => QuantFormat::Iq2Xs,
            Quantize::Iq2S => QuantFormat::Iq2S,
            Quantize::Iq1S => QuantFormat::Iq1S,
            Quantize::Iq1M => QuantFormat::Iq1M,
            Quantize::Tq1_0 => QuantFormat::Tq1_0,
            Quantize::Tq2_0 => QuantFormat::Tq2_0,
            Quantize::Q1_0 => QuantFormat::Q1_0,
            Quantize::Mxfp4 => QuantFormat::Mxfp4,
            Quantize::Nvfp4 => QuantFormat::Nvfp4,
            Quantize::Nf4 => QuantFormat::Nf4 {
                block_size: 64,
                scale: DType::F16,
            },
            Quantize::Int8 | Quantize::Int4 => QuantFormat::Affine {
                bits: if matches!(self, Quantize::Int8) { 8 } else { 4 },
                group_size: 32,
                symmetric: true,
                axis: 1,
                scale: DType::F16,
            },
        }
    }
}

/// How a model is compiled: `--passes`, `--backend`, `--threads`, `--quantize`,
/// `--kv-dtype`.
#[derive(clap::Args)]
struct CompileArgs {
    /// The pass pipeline applied to the model before it runs (`""` for none). By default
    /// `default,quantize-activations` (`default` on the GPU backend): the matmuls of every
    /// GGUF block format (q8_0 to q5_1, iq4_nl, q2_k to q6_k, iq4_xs, the IQ3, IQ2 and IQ1
    /// formats) read q8_0 activations, which the CPU multiplies as integers (as
    /// quantized inference engines do; f32 weights are unaffected); the GPU has no integer
    /// dot products, so there it would only add work. `--passes default` keeps f32
    /// activations.
    #[arg(long)]
    passes: Option<String>,
    #[command(flatten)]
    backend: BackendArgs,
    /// Quantize the model's f32 and 16-bit matrices to this format when loading (a matrix
    /// whose rows are not whole super-blocks of 256 takes the format llama.cpp falls back
    /// to: q5_0 for q4_k, q5_1 for q5_k, q8_0 for q6_k, iq4_nl for q2_k, q3_k, iq4_xs and
    /// the IQ3, IQ2 and IQ1 formats, and f16 where those do not fit either).
    #[arg(long, value_enum)]
    quantize: Option<Quantize>,
    /// Element type of the KV cache: f16 and bf16 take half f32's memory (on the CPU and
    /// on the GPU).
    #[arg(long, value_enum, default_value = "f32")]
    kv_dtype: KvDtype,
}

impl CompileArgs {
    fn options(&self) -> Result<serve::CompileOptions, String> {
        let backend = self.backend.backend()?;
        let passes = match (&self.passes, &backend) {
            (Some(passes), _) => passes.clone(),
            (None, Backend::Gpu(_)) => "default".to_string(),
            (None, _) => "default,quantize-activations".to_string(),
        };
        Ok(serve::CompileOptions {
            passes,
            backend,
            quantize: self.quantize.map(Quantize::format),
            kv_storage: self.kv_dtype.storage(),
        })
    }
}

/// Where a command runs: `--backend` and `--threads`.
#[derive(clap::Args)]
struct BackendArgs {
    /// Execution backend: the JIT-compiled CPU kernels by default; `interp` runs the
    /// reference semantics (the definition of every op, slow), `gpu` the WGSL shaders.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendName,
    /// Threads of the CPU backend (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

impl BackendArgs {
    fn backend(&self) -> Result<Backend, String> {
        match (self.backend, self.threads) {
            (_, Some(0)) => Err("--threads must be at least 1".into()),
            (BackendName::Interp | BackendName::Gpu, Some(_)) => {
                Err("--threads needs --backend cpu".into())
            }
            (BackendName::Gpu, None) => Ok(Backend::Gpu(Default::default())),
            (BackendName::Interp, None) => Ok(Backend::Interp),
            (BackendName::Cpu, Some(threads)) => Ok(Backend::Cpu { threads }),
            (BackendName::Cpu, None) => Ok(Backend::cpu()),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (stdout is exactly what llama2.c's run.c prints).
    Generate {
        /// Model: llama2.c checkpoint, GGUF file or Hugging Face directory.
        #[arg(long)]
        model: PathBuf,
        /// llama2.c tokenizer (tokenizer.bin); by default the model's own (GGUF vocabulary, HF tokenizer.json).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// A prompt; repeat for several sequences, generated together.
        #[arg(long)]
        prompt: Vec<String>,
        /// A file with one prompt per line (generated together).
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// Completions of each prompt (parallel sampling: the prompt is prefilled once;
        /// completion k of prompt i samples with seed + i * n + k), printed one after
        /// another.
        #[arg(long, default_value_t = 1)]
        n: usize,
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
        #[command(flatten)]
        compile: CompileArgs,
        /// Print timings as one JSON object on stderr.
        #[arg(long)]
        stats: bool,
    },
    /// Serve random prompts concurrently and report throughput, latency and KV-cache use.
    Bench {
        /// Model: llama2.c checkpoint, GGUF file or Hugging Face directory.
        #[arg(long)]
        model: PathBuf,
        /// Tokenizer (unused by the benchmark's random prompts; accepted for symmetry).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Concurrent requests.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Prompt tokens per request (BOS included).
        #[arg(long, default_value_t = 16)]
        prompt_len: usize,
        /// Tokens generated per request.
        #[arg(long, default_value_t = 64)]
        gen_len: usize,
        /// Seed of the random prompts.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Leading prompt tokens that all requests share (exercises prefix caching).
        #[arg(long, default_value_t = 0)]
        shared_prefix: usize,
        #[command(flatten)]
        compile: CompileArgs,
    },
    /// Write a llama2.c checkpoint of a named shape (260K, 15M, 42M, 110M) with seeded random weights.
    Synth {
        /// The shape.
        #[arg(long)]
        shape: String,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the weights.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Print the IR of a model.
    Import {
        /// Model: llama2.c checkpoint, GGUF file or Hugging Face directory.
        #[arg(long)]
        model: PathBuf,
        /// Element type of the KV cache.
        #[arg(long, value_enum, default_value = "f32")]
        kv_dtype: KvDtype,
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
        /// A model (llama2.c, GGUF or Hugging Face directory) whose weights `llm.weight` resolves to.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Save tensor results as result0.npy, result1.npy, ... in this directory.
        #[arg(long)]
        output_dir: Option<PathBuf>,
        #[command(flatten)]
        backend: BackendArgs,
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
            prompts,
            n,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            compile,
            stats,
        } => {
            let options = compile.options()?;
            let backend = options.backend.clone();
            let (compiled, tokenizer) = serve::load(&model, tokenizer.as_deref(), &options)?;
            let tokenizer = tokenizer.ok_or_else(|| {
                format!("{} has no vocabulary; pass --tokenizer", model.display())
            })?;
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
            let mut all = prompt;
            if let Some(file) = prompts {
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                all.extend(text.lines().map(str::to_string));
            }
            let mut stdout = std::io::stdout().lock();
            let mut print = |text: &[u8]| {
                stdout
                    .write_all(text)
                    .and_then(|()| stdout.flush())
                    .map_err(|e| format!("cannot write: {e}"))
            };
            if n == 0 {
                return Err("--n must be at least 1".into());
            }
            if all.is_empty() {
                all.push(String::new());
            }
            if all.len() == 1 && n == 1 {
                let out = compiled.generate_streaming(
                    tokenizer.as_ref(),
                    &all[0],
                    max_tokens,
                    sampler,
                    &mut print,
                )?;
                if stats {
                    eprintln!("{}", out.stats.to_json(backend.name()));
                }
            } else {
                let batch_stats = serve::generate_batch(
                    &compiled,
                    tokenizer.as_ref(),
                    (&all, n),
                    max_tokens,
                    sampler,
                    &mut print,
                )?;
                if stats {
                    eprintln!("{}", batch_stats.to_json(backend.name()));
                }
            }
            Ok(())
        }
        Command::Bench {
            model,
            tokenizer,
            concurrency,
            prompt_len,
            gen_len,
            seed,
            shared_prefix,
            compile,
        } => {
            let (compiled, _) = serve::load(&model, tokenizer.as_deref(), &compile.options()?)?;
            let report = serve::bench(
                &compiled,
                serve::BenchOptions {
                    concurrency,
                    prompt_len,
                    gen_len,
                    seed,
                    shared_prefix,
                },
            )?;
            print!("{report}");
            Ok(())
        }
        Command::Synth { shape, out, seed } => {
            let config = synth::shape(&shape)
                .ok_or_else(|| format!("unknown shape `{shape}` (known: 260K, 15M, 42M, 110M)"))?;
            synth::write(&out, &config, seed).map_err(|e| format!("{}: {e}", out.display()))
        }
        Command::Import {
            model: path,
            kv_dtype,
        } => {
            let loaded = serve::open_model(&path)?;
            let source = model::build_ir(&loaded.config, &loaded.weights, &kv_dtype.storage())?;
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
            backend,
        } => {
            let backend = backend.backend()?;
            let name = file.display().to_string();
            let bytes = std::fs::read(&file).map_err(|e| format!("{name}: cannot read: {e}"))?;
            let source = text::decode_utf8(&bytes).map_err(|d| d.render(&name))?;
            let weights = model
                .map(|m| serve::open_model(&m).map(|l| l.weights))
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
                &backend,
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
