//! `llm-run generate` with several prompts, and `llm-run bench`: the serving engine from the
//! command line.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, Instant},
};

use llm_ir::{dtype::DType, types::QuantFormat};
use llm_runtime::{
    engine::{Engine, EngineConfig, Event, RequestParams},
    generate::{Backend, Model, Step},
    model_file,
    sampler::{SamplerConfig, XorShift},
    tokenizer::{BOS, TextCodec, Tokenizer},
};

/// How `llm-run` compiles a model.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// The pass pipeline.
    pub passes: String,
    /// The backend.
    pub backend: Backend,
    /// Quantize the model's f32 matrices to this format when loading.
    pub quantize: Option<QuantFormat>,
    /// The KV cache's element type (f32, f16 or bf16).
    pub kv_dtype: DType,
}

/// Loads a model file and its tokenizer (`tokenizer`, else the file's own vocabulary, if
/// any), and compiles it as `options` say.
pub fn load(
    model: &Path,
    tokenizer: Option<&Path>,
    options: &CompileOptions,
) -> Result<(Model, Option<Box<dyn TextCodec>>), String> {
    let mut loaded = open_model(model)?;
    if let Some(format) = &options.quantize {
        loaded.weights.quantize_matrices(format);
    }
    let tokenizer = match tokenizer {
        Some(path) => Some(Box::new(
            Tokenizer::load(path, loaded.config.vocab).map_err(|e| e.to_string())?,
        ) as Box<dyn TextCodec>),
        None => loaded.tokenizer,
    };
    Ok((
        Model::compile_with_kv(
            &options.backend,
            loaded.config,
            loaded.weights,
            &options.passes,
            options.kv_dtype,
        )?,
        tokenizer,
    ))
}

/// Models at least this large show a progress bar while loading (on a terminal).
const PROGRESS_BYTES: u64 = 64 << 20;

/// One frame of the loading progress bar.
pub fn progress_bar(name: &str, fraction: f64) -> String {
    const WIDTH: usize = 30;
    let fraction = fraction.clamp(0.0, 1.0);
    let filled = (fraction * WIDTH as f64).round() as usize;
    format!(
        "\rloading {name} [{}{}] {:3.0}%",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        fraction * 100.0
    )
}

/// Loads a model, drawing a progress bar on stderr when it is a terminal and the model big.
pub fn open_model(model: &Path) -> Result<model_file::LoadedModel, String> {
    use std::io::{IsTerminal, Write};
    let size = std::fs::metadata(model).map_or(0, |m| m.len());
    let show = std::io::stderr().is_terminal() && (model.is_dir() || size >= PROGRESS_BYTES);
    let name = model.file_name().map_or_else(
        || model.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut draw = |fraction: f64| {
        if show {
            eprint!("{}", progress_bar(&name, fraction));
            let _ = std::io::stderr().flush();
        }
    };
    let loaded = model_file::load_with(model, &mut draw).map_err(|e| e.to_string());
    if show {
        eprintln!("{}", progress_bar(&name, 1.0));
    }
    loaded
}

/// What a batched generation did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchStats {
    /// Requests.
    pub requests: usize,
    /// Tokens sampled in all.
    pub generated_tokens: usize,
    /// Engine steps.
    pub steps: usize,
    /// Wall time.
    pub elapsed_ms: f64,
}

impl BatchStats {
    /// The stats as one JSON object.
    pub fn to_json(&self, backend: &str) -> String {
        let rate = if self.elapsed_ms > 0.0 {
            self.generated_tokens as f64 / (self.elapsed_ms / 1000.0)
        } else {
            0.0
        };
        format!(
            "{{\"backend\": \"{backend}\", \"requests\": {}, \"generated_tokens\": {}, \"steps\": {}, \"elapsed_ms\": {:.3}, \"generated_tok_per_s\": {rate:.3}}}",
            self.requests, self.generated_tokens, self.steps, self.elapsed_ms
        )
    }
}

/// Generates from every prompt in one engine, handing each output to `emit` as run.c would
/// print it (prompt, continuation, newline) in prompt order, each as soon as it and every
/// output before it are finished; returns the run's stats.
pub fn generate_batch(
    model: &Model,
    tokenizer: &dyn TextCodec,
    prompts: &[String],
    steps: usize,
    sampler: SamplerConfig,
    emit: &mut dyn FnMut(Vec<u8>) -> Result<(), String>,
) -> Result<BatchStats, String> {
    let steps = if steps == 0 || steps > model.config().seq_len {
        model.config().seq_len
    } else {
        steps
    };
    let mut engine = Engine::new(model, engine_config(model, prompts.len(), steps));
    let mut texts: HashMap<u64, Vec<u8>> = HashMap::new();
    for (i, p) in prompts.iter().enumerate() {
        let ids = tokenizer.encode(p, true, false);
        // The prompt prints as run.c prints forced tokens.
        let mut text = Vec::new();
        for w in ids.windows(2).take(steps) {
            text.extend(tokenizer.decode(w[0], w[1]));
        }
        let params = RequestParams {
            steps,
            sampler: SamplerConfig {
                seed: sampler.seed.wrapping_add(i as u64),
                ..sampler.clone()
            },
            stop_tokens: tokenizer.stop_tokens(),
        };
        texts.insert(engine.add_request(ids, params), text);
    }
    let start = Instant::now();
    let mut generated_tokens = 0;
    let mut finished = std::collections::HashSet::new();
    let mut next = 0;
    let mut emit_ready = |finished: &std::collections::HashSet<u64>,
                          texts: &mut HashMap<u64, Vec<u8>>,
                          all: bool|
     -> Result<(), String> {
        while next < prompts.len() as u64 && (all || finished.contains(&next)) {
            let mut text = texts.remove(&next).unwrap_or_default();
            text.push(b'\n');
            emit(text)?;
            next += 1;
        }
        Ok(())
    };
    while engine.has_work() {
        for event in engine.step()? {
            match event {
                Event::Token { id, prev, token } => {
                    if let Some(t) = texts.get_mut(&id) {
                        generated_tokens += 1;
                        t.extend(tokenizer.decode(prev, token));
                    }
                }
                Event::Finished { id } => {
                    finished.insert(id);
                }
            }
        }
        emit_ready(&finished, &mut texts, false)?;
    }
    emit_ready(&finished, &mut texts, true)?;
    Ok(BatchStats {
        requests: prompts.len(),
        generated_tokens,
        steps: engine.stats().steps,
        elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

/// A pool big enough for `n` sequences of `steps` positions (plus slack for forks).
fn engine_config(model: &Model, n: usize, steps: usize) -> EngineConfig {
    let per_seq = steps
        .min(model.config().seq_len)
        .div_ceil(llm_runtime::model::BLOCK_SIZE)
        + 1;
    EngineConfig {
        num_blocks: n.max(1) * per_seq,
        max_step_tokens: 4096,
        max_running: n.max(1),
    }
}

/// What `llm-run bench` runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Concurrent requests.
    pub concurrency: usize,
    /// Prompt length in tokens (BOS included).
    pub prompt_len: usize,
    /// Tokens to generate per request.
    pub gen_len: usize,
    /// Seed of the random prompts.
    pub seed: u64,
    /// Leading prompt tokens (BOS included) that every request shares.
    pub shared_prefix: usize,
}

/// What `llm-run bench` measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// The options.
    pub options: BenchOptions,
    /// Wall time.
    pub elapsed: Duration,
    /// Tokens generated in all.
    pub generated: usize,
    /// Time to first token of each request.
    pub ttft: Vec<Duration>,
    /// Gaps between successive tokens of a request, over all requests.
    pub token_latency: Vec<Duration>,
    /// Blocks in the pool and most in use.
    pub blocks: (usize, usize),
    /// The element type the KV cache stores.
    pub kv_dtype: DType,
    /// Share of allocated KV slots holding no token when the most blocks were in use
    /// (negative when sequences share blocks).
    pub empty_at_peak: f64,
    /// Preemptions.
    pub preemptions: usize,
    /// Prompt positions prefilled, and those taken from the prefix cache.
    pub prompt_positions: (usize, usize),
    /// Bytes of the model's weights and of the KV pool.
    pub model_bytes: (usize, usize),
    /// Milliseconds compiling the model, and of those generating and JIT-compiling kernels
    /// and repacking weights.
    pub compile_ms: (f64, f64, f64),
    /// The process's resident memory after the run (Linux only).
    pub memory: Option<ResidentMemory>,
    /// On the GPU backend: the adapter, and the decode step's shaders and dispatches.
    pub gpu: Option<(String, usize, usize)>,
}

/// This process's resident memory, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct ResidentMemory {
    /// The resident set now.
    pub now: u64,
    /// Its peak: during the run when [`ResidentMemory::run_peak`], else since the
    /// process started (loading included).
    pub peak: u64,
    /// The peak was reset when the run began ([`reset_peak`]), so it is the run's.
    pub run_peak: bool,
    /// Of `now`, the anonymous part: the data the process made (the rest is its code,
    /// libraries and other file pages).
    pub data: u64,
}

/// This process's resident memory, from one reading of `/proc/self/status`.
pub fn resident_memory() -> Option<ResidentMemory> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kib: u64 = line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some(ResidentMemory {
        now: field("VmRSS:")?,
        peak: field("VmHWM:")?,
        run_peak: false,
        data: field("RssAnon:")?,
    })
}

/// Resets this process's peak resident set to its current size (Linux's
/// `/proc/self/clear_refs`), so that a later [`resident_memory`] reads the peak since now;
/// false where that is not possible.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.options;
        let secs = self.elapsed.as_secs_f64();
        let (mut ttft, mut lat) = (self.ttft.clone(), self.token_latency.clone());
        ttft.sort_unstable();
        lat.sort_unstable();
        writeln!(
            f,
            "requests:          {} x (prompt {} + generate {} tokens)",
            o.concurrency, o.prompt_len, o.gen_len
        )?;
        writeln!(f, "elapsed:           {secs:.3} s")?;
        writeln!(
            f,
            "compile:           {:.1} ms, of which kernels {:.1} ms, weight packing {:.1} ms",
            self.compile_ms.0, self.compile_ms.1, self.compile_ms.2
        )?;
        if let Some((adapter, shaders, dispatches)) = &self.gpu {
            writeln!(
                f,
                "gpu:               {adapter}; decode step: {shaders} shaders, at most {dispatches} dispatches, one submission"
            )?;
        }
        writeln!(
            f,
            "throughput:        {:.1} generated tok/s ({:.1} tok/s with prompts)",
            self.generated as f64 / secs,
            (self.generated + o.concurrency * o.prompt_len) as f64 / secs
        )?;
        writeln!(
            f,
            "time to first tok: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
            percentile(&ttft, 0.5),
            percentile(&ttft, 0.9),
            percentile(&ttft, 0.99)
        )?;
        writeln!(
            f,
            "per-token latency: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
            percentile(&lat, 0.5),
            percentile(&lat, 0.9),
            percentile(&lat, 0.99)
        )?;
        writeln!(
            f,
            "prompt positions:  {} prefilled, {} from the prefix cache",
            self.prompt_positions.0, self.prompt_positions.1
        )?;
        let empty = if self.empty_at_peak < 0.0 {
            "positions share blocks through the prefix cache".to_string()
        } else {
            format!(
                "{:.1}% of allocated slots empty at peak",
                self.empty_at_peak * 100.0
            )
        };
        writeln!(
            f,
            "kv cache:          {}, peak {} of {} blocks, {empty}, {} preemptions",
            self.kv_dtype, self.blocks.1, self.blocks.0, self.preemptions
        )?;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let (weights, kv) = (self.model_bytes.0 as u64, self.model_bytes.1 as u64);
        write!(
            f,
            "memory:            weights {:.1} MiB + kv pool {:.1} MiB",
            mib(weights),
            mib(kv)
        )?;
        let Some(memory) = self.memory else {
            return writeln!(f);
        };
        let model = (weights + kv).max(1) as f64;
        writeln!(
            f,
            "; resident {:.1} MiB after the run ({:.2}x), peak {:.1} MiB {} ({:.2}x); of it data {:.1} MiB ({:.2}x), code and files {:.1} MiB",
            mib(memory.now),
            memory.now as f64 / model,
            mib(memory.peak),
            if memory.run_peak {
                "during the run"
            } else {
                "since start"
            },
            memory.peak as f64 / model,
            mib(memory.data),
            memory.data as f64 / model,
            mib(memory.now.saturating_sub(memory.data))
        )
    }
}

/// Runs `options.concurrency` requests of random prompts through one engine, greedily, each
/// generating exactly `gen_len` tokens.
pub fn bench(model: &Model, options: BenchOptions) -> Result<BenchReport, String> {
    let vocab = model.config().vocab as u64;
    let steps = options.prompt_len + options.gen_len - 1;
    if options.prompt_len == 0 || options.gen_len == 0 || steps > model.config().seq_len {
        return Err(format!(
            "prompt-len + gen-len must be between 2 and the model's {} positions + 1",
            model.config().seq_len
        ));
    }
    // The peak the report gives is the run's, not loading's.
    let run_peak = reset_peak();
    let config = engine_config(model, options.concurrency, steps);
    // A `plan-kv-memory` plan sizes the pool instead.
    let num_blocks = model.cache_blocks(config.num_blocks);
    let mut engine = Engine::new(model, config);
    let mut rng = XorShift::new(options.seed | 1);
    let shared: Vec<u32> = std::iter::once(BOS)
        .chain((1..options.prompt_len).map(|_| 3 + (rng.next_u64() % (vocab - 3)) as u32))
        .collect();
    for _ in 0..options.concurrency {
        let prompt: Vec<u32> = std::iter::once(BOS)
            .chain((1..options.prompt_len).map(|_| 3 + (rng.next_u64() % (vocab - 3)) as u32))
            .collect();
        let prompt: Vec<u32> = shared[..options.shared_prefix.min(prompt.len())]
            .iter()
            .chain(&prompt[options.shared_prefix.min(prompt.len())..])
            .copied()
            .collect();
        let sampler = SamplerConfig {
            temperature: 0.0,
            top_p: 0.9,
            top_k: 0,
            seed: 1,
        };
        engine.add_request(
            prompt,
            RequestParams {
                steps,
                sampler,
                stop_tokens: Vec::new(),
            },
        );
    }
    let start = Instant::now();
    let mut generated = 0;
    while engine.has_work() {
        generated += engine
            .step()?
            .iter()
            .filter(|e| matches!(e, Event::Token { .. }))
            .count();
    }
    let elapsed = start.elapsed();
    let mut ttft = Vec::new();
    let mut token_latency = Vec::new();
    for (_, times) in engine.finished_times() {
        if let Some(first) = times.first() {
            ttft.push(first.duration_since(start));
        }
        token_latency.extend(times.windows(2).map(|w| w[1].duration_since(w[0])));
    }
    let stats = engine.stats();
    let allocated = stats.peak_blocks * llm_runtime::model::BLOCK_SIZE;
    let empty_at_peak = if allocated > 0 {
        1.0 - stats.tokens_at_peak as f64 / allocated as f64
    } else {
        0.0
    };
    Ok(BenchReport {
        options,
        elapsed,
        generated,
        ttft,
        token_latency,
        blocks: (num_blocks, stats.peak_blocks),
        kv_dtype: model.kv_dtype(),
        empty_at_peak,
        preemptions: stats.preemptions,
        prompt_positions: (stats.prefilled_tokens, stats.cached_prompt_tokens),
        model_bytes: (model.weight_bytes(), num_blocks * model.cache_block_bytes()),
        compile_ms: (model.compile_ms(), model.jit_ms(), model.pack_ms()),
        memory: resident_memory().map(|m| ResidentMemory { run_peak, ..m }),
        gpu: model
            .adapter()
            .zip(model.gpu_lowering(Step::Decode))
            .map(|(name, l)| (name, l.shaders, l.dispatches)),
    })
}

#[cfg(test)]
mod tests {
    use super::progress_bar;

    #[test]
    fn progress_bar_frames() {
        assert_eq!(
            progress_bar("m.gguf", 0.0),
            format!("\rloading m.gguf [{}]   0%", ".".repeat(30))
        );
        assert_eq!(
            progress_bar("m.gguf", 0.5),
            format!(
                "\rloading m.gguf [{}{}]  50%",
                "#".repeat(15),
                ".".repeat(15)
            )
        );
        assert_eq!(
            progress_bar("m.gguf", 2.0),
            format!("\rloading m.gguf [{}] 100%", "#".repeat(30))
        );
    }
}
