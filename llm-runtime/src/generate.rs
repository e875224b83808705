//! Text generation for one sequence, reproducing llama2.c's `run.c` loop.
//!
//! The prompt is encoded with a BOS token and run through `@prefill` in one call; then each
//! step samples a token from the last logits and runs `@decode` on it. As in run.c, `steps`
//! counts positions including the prompt, generation stops early when the model produces
//! BOS, and the printed text is the decoded prompt (after BOS), the continuation and a
//! newline.

use std::{sync::Arc, time::Instant};

use llm_ir::{
    dtype::DType,
    interp::{self, HoistMemo, Hoisted, Interpreter, KvCache, Tensor, Value},
    params::ParamValue,
    text,
    types::{KvCacheParams, KvStorage},
};
use llm_lower::{cpu, gpu};
use llm_passes::{Pipeline, RunConfig, TargetOption, ir, plan_kv_memory::bytes_per_block};
use pliron::{
    builtin::{
        op_interfaces::SingleBlockRegionInterface,
        ops::{FuncOp, ModuleOp},
    },
    context::Context,
};

use crate::{
    model::{self, BLOCK_SIZE, ModelConfig},
    sampler::{Sampler, SamplerConfig},
    tokenizer::TextCodec,
    weights::Weights,
};

/// Timings and counts of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Tokens in the encoded prompt (BOS included).
    pub prompt_tokens: usize,
    /// Tokens chosen by the sampler.
    pub generated_tokens: usize,
    /// Forward positions run (run.c's loop iterations).
    pub forward_calls: usize,
    /// Building, parsing and verifying the model IR.
    pub compile_ms: f64,
    /// Of `compile_ms`, generating and JIT-compiling kernels (CPU backend; 0 otherwise).
    pub jit_ms: f64,
    /// The prefill call.
    pub prefill_ms: f64,
    /// All decode calls.
    pub decode_ms: f64,
    /// Decode calls.
    pub decode_steps: usize,
    /// Blocks of the sequence's KV pool ([`Model::sequence_blocks`]).
    pub kv_blocks: usize,
}

impl Stats {
    /// Decode throughput in tokens per second.
    pub fn decode_tok_per_s(&self) -> f64 {
        if self.decode_ms > 0.0 {
            self.decode_steps as f64 / (self.decode_ms / 1000.0)
        } else {
            0.0
        }
    }

    /// The stats as one JSON object.
    pub fn to_json(&self, backend: &str) -> String {
        format!(
            "{{\"backend\": \"{backend}\", \"prompt_tokens\": {}, \"generated_tokens\": {}, \"forward_calls\": {}, \"compile_ms\": {:.3}, \"jit_ms\": {:.3}, \"prefill_ms\": {:.3}, \"decode_ms\": {:.3}, \"decode_tok_per_s\": {:.3}, \"kv_blocks\": {}}}",
            self.prompt_tokens,
            self.generated_tokens,
            self.forward_calls,
            self.compile_ms,
            self.jit_ms,
            self.prefill_ms,
            self.decode_ms,
            self.decode_tok_per_s(),
            self.kv_blocks
        )
    }
}

/// The result of a generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Generation {
    /// What run.c prints: the prompt, the continuation, then `\n`.
    pub text: Vec<u8>,
    /// The encoded prompt.
    pub prompt_ids: Vec<u32>,
    /// BOS, the prompt, then every generated token (excluding a final stop token).
    pub ids: Vec<u32>,
    /// Whether generation stopped because the model produced one of the tokenizer's stop
    /// tokens ([`TextCodec::stop_tokens`]; BOS for llama2.c's `tokenizer.bin`).
    pub stopped: bool,
    /// The logits of every forward position, in order ([`Model::generate`]; none from
    /// [`Model::generate_streaming`]).
    pub logits: Vec<Vec<f32>>,
    /// Timings and counts.
    pub stats: Stats,
}

/// Which compiled function a batch runs through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `@prefill`: several tokens of one sequence.
    Prefill,
    /// `@decode`: one token of each of several sequences.
    Decode,
}

impl Step {
    /// The rows a GPU program of this step is shaped for: whole prompts, or one token per
    /// sequence.
    fn gpu_rows(self) -> gpu::Rows {
        match self {
            Step::Prefill => gpu::Rows::Many,
            Step::Decode => gpu::Rows::Few,
        }
    }

    /// The function name.
    pub fn name(self) -> &'static str {
        match self {
            Step::Prefill => "prefill",
            Step::Decode => "decode",
        }
    }
}

/// The inputs of one forward call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Position of each token in its sequence.
    pub positions: Vec<i64>,
    /// KV-cache slot of each token.
    pub slots: Vec<i64>,
    /// Block table of each sequence (padded to the longest).
    pub tables: Vec<Vec<i64>>,
    /// Positions each sequence holds after this call.
    pub context_lens: Vec<i64>,
}

/// Where a model's step functions run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The reference interpreter.
    Interp,
    /// JIT-compiled Cranelift kernels on the CPU, contractions split over `threads`
    /// threads.
    Cpu {
        /// Worker threads (1: the calling thread only).
        threads: usize,
    },
    /// WGSL compute shaders run through wgpu on the best adapter found (a GPU, or a
    /// software adapter such as lavapipe), weights and KV cache in device memory.
    Gpu(gpu::GpuOptions),
}

impl Backend {
    /// The CPU backend on every core of this machine.
    pub fn cpu() -> Backend {
        Backend::Cpu {
            threads: cpu::Options::default().threads,
        }
    }

    /// The name used on the command line and in stats (`interp`, `cpu`, `gpu`).
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Interp => "interp",
            Backend::Cpu { .. } => "cpu",
            Backend::Gpu(_) => "gpu",
        }
    }
}

/// A step function compiled for a backend.
enum Compiled {
    /// Run by the interpreter (over the hoisted values).
    Interp,
    /// A CPU program.
    Cpu(Box<cpu::Program>),
    /// A GPU program.
    Gpu(Box<gpu::Program>),
}

/// What the runtime (and a GPU with `limits`) tells the pass pipeline: `plan-kv-memory`
/// plans blocks of the runtime's [`BLOCK_SIZE`] positions, in buffers no larger than the
/// device's largest storage binding.
pub fn pass_options(limits: Option<gpu::Limits>) -> Vec<TargetOption> {
    let mut options = vec![TargetOption {
        pass: "plan-kv-memory",
        option: "block-size",
        value: BLOCK_SIZE.to_string(),
    }];
    if let Some(limits) = limits {
        options.push(TargetOption {
            pass: "plan-kv-memory",
            option: "max-binding-size",
            value: limits.max_binding_bytes.to_string(),
        });
    }
    options
}

/// The KV pool `plan-kv-memory` planned for `module` (its `llm.kv_plan`), if it ran: the
/// block count, checked against the runtime's block size.
fn planned_blocks(ctx: &Context, module: ModuleOp) -> Result<Option<usize>, RunError> {
    let body = module.get_body(ctx, 0);
    let Some(plan) = ir::block_ops(ctx, body)
        .into_iter()
        .find(|&op| ir::name(ctx, op) == "llm.kv_plan")
    else {
        return Ok(None);
    };
    let int = |key: &str| match ir::param(ctx, plan, key) {
        Some(ParamValue::Int(v)) => Ok(v),
        _ => Err(format!("the KV plan has no `{key}`")),
    };
    if int("block_size")? != BLOCK_SIZE as i64 {
        return Err(format!(
            "plan-kv-memory chose blocks of {} positions; the runtime's hold {BLOCK_SIZE}",
            int("block_size")?
        ));
    }
    Ok(Some(int("blocks")?.max(0) as usize))
}

/// One compiled step function.
struct StepFunction {
    func: FuncOp,
    /// Its weight-derived values, evaluated once (kept only for the interpreter).
    hoisted: Hoisted,
    /// Its compiled program.
    program: Compiled,
}

/// The compiler of a backend, shared by a model's step functions.
enum Compiler {
    Interp,
    Cpu(cpu::Compiler),
    Gpu(gpu::Compiler),
}

/// A compiled model ready to run.
pub struct Model {
    ctx: Context,
    config: ModelConfig,
    weights: Weights,
    backend: Backend,
    /// `@prefill` and `@decode`, indexed by `Step as usize`.
    steps: [StepFunction; 2],
    compile_ms: f64,
    weight_bytes: usize,
    /// The device, on the GPU backend.
    gpu: Option<Arc<gpu::Gpu>>,
    /// The KV pool's block count, when `plan-kv-memory` planned it.
    planned_blocks: Option<usize>,
    /// How the KV cache stores keys and values.
    kv_storage: KvStorage,
}

/// An error while running a model.
pub type RunError = String;

impl Model {
    /// [`Model::compile_on`] the reference interpreter.
    pub fn compile(config: ModelConfig, weights: Weights, passes: &str) -> Result<Model, RunError> {
        Model::compile_on(&Backend::Interp, config, weights, passes)
    }

    /// [`Model::compile_with_kv`] with an f32 KV cache.
    pub fn compile_on(
        backend: &Backend,
        config: ModelConfig,
        weights: Weights,
        passes: &str,
    ) -> Result<Model, RunError> {
        Model::compile_with_kv(
            backend,
            config,
            weights,
            passes,
            KvStorage::Float(DType::F32),
        )
    }

    /// Builds, parses and verifies the IR of `config` over `weights` with a KV cache of
    /// `kv_storage` (f32, f16, bf16 or a block format: [`model::check_kv_storage`]), runs the pass
    /// pipeline `passes` (for example `default`; empty runs none), evaluates the
    /// weight-derived ops once and compiles the step functions for `backend`.
    pub fn compile_with_kv(
        backend: &Backend,
        config: ModelConfig,
        weights: Weights,
        passes: &str,
        kv_storage: KvStorage,
    ) -> Result<Model, RunError> {
        let start = Instant::now();
        let source =
            model::build_ir(&config, &weights, &kv_storage).map_err(|e| format!("model: {e}"))?;
        let mut ctx = Context::new();
        let module = text::parse_module(&mut ctx, &source)
            .map_err(|d| format!("model IR: {}", d.render("<model>")))?;
        // The device comes first: its limits are inputs of the pass pipeline.
        let device = match backend {
            Backend::Gpu(options) => Some(Arc::new(
                gpu::Gpu::new(options).map_err(|e| format!("gpu backend: {e}"))?,
            )),
            _ => None,
        };
        if !passes.trim().is_empty() {
            let target = pass_options(device.as_ref().map(|d| d.limits()));
            let pipeline = Pipeline::parse_for_target(passes, &target)
                .map_err(|e| format!("--passes: {e}"))?;
            pipeline
                .run(&mut ctx, module, &RunConfig::default())
                .map_err(|e| format!("pass pipeline: {e}"))?;
        }
        let planned_blocks = planned_blocks(&ctx, module)?;
        let (steps, gpu) = {
            let interpreter = Interpreter::new(&ctx, &weights);
            // Both steps derive the same matrices (concatenated projections) from the same
            // weights: evaluate them once, and pack them once for the CPU.
            let mut memo = HoistMemo::default();
            let compiler = match backend {
                Backend::Interp => Compiler::Interp,
                Backend::Cpu { threads } => Compiler::Cpu(
                    cpu::Compiler::new(&cpu::Options {
                        threads: *threads,
                        ..cpu::Options::default()
                    })
                    .map_err(|e| format!("cpu backend: {e}"))?,
                ),
                // The device opened above for the pipeline's limits.
                Backend::Gpu(_) => match &device {
                    Some(device) => Compiler::Gpu(gpu::Compiler::new(Arc::clone(device))),
                    None => return Err("gpu backend: no device".to_string()),
                },
            };
            let mut hoist = |step: Step| -> Result<StepFunction, RunError> {
                let func = interp::find_func(&ctx, module, step.name())
                    .ok_or_else(|| format!("the model has no @{}", step.name()))?;
                let hoisted = interpreter
                    .hoist_shared(func, &mut memo)
                    .map_err(|e| format!("@{}: {e}", step.name()))?;
                let program = match &compiler {
                    Compiler::Interp => Compiled::Interp,
                    Compiler::Cpu(c) => Compiled::Cpu(Box::new(
                        c.build(&ctx, func, &hoisted)
                            .map_err(|e| format!("@{}: cpu backend: {e}", step.name()))?,
                    )),
                    Compiler::Gpu(c) => Compiled::Gpu(Box::new(
                        c.build(&ctx, func, &hoisted, step.gpu_rows())
                            .map_err(|e| format!("@{}: gpu backend: {e}", step.name()))?,
                    )),
                };
                Ok(StepFunction {
                    func,
                    // A compiled program holds the hoisted values it reads (weights
                    // repacked or uploaded for its kernels); the originals can go.
                    hoisted: match program {
                        Compiled::Interp => hoisted,
                        _ => Hoisted::default(),
                    },
                    program,
                })
            };
            let steps = [hoist(Step::Prefill)?, hoist(Step::Decode)?];
            let gpu = match &compiler {
                Compiler::Gpu(c) => Some(Arc::clone(c.gpu())),
                _ => None,
            };
            (steps, gpu)
        };
        let weight_bytes = weights.bytes();
        // Compiled programs never read the weight store again (every `llm.weight` was
        // hoisted); dropping it frees the weights the programs replaced with packed copies.
        let weights = match backend {
            Backend::Interp => weights,
            Backend::Cpu { .. } | Backend::Gpu(_) => {
                drop(weights);
                // The weights and the originals of repacked matrices are free now.
                crate::heap::release_free_pages();
                Weights::default()
            }
        };
        let compile_ms = start.elapsed().as_secs_f64() * 1000.0;
        Ok(Model {
            gpu,
            planned_blocks,
            kv_storage,
            ctx,
            config,
            weights,
            backend: backend.clone(),
            steps,
            compile_ms,
            weight_bytes,
        })
    }

    /// Milliseconds spent compiling the model (IR, passes, hoisting, kernels, packing).
    pub fn compile_ms(&self) -> f64 {
        self.compile_ms
    }

    /// Of [`Model::compile_ms`], milliseconds spent generating and JIT-compiling kernels
    /// (on the GPU: validating shaders and creating pipelines).
    pub fn jit_ms(&self) -> f64 {
        self.lowering_total(|p| match p {
            Compiled::Interp => 0.0,
            Compiled::Cpu(p) => p.stats().jit_ms,
            Compiled::Gpu(p) => p.stats().pipeline_ms,
        })
    }

    /// Of [`Model::compile_ms`], milliseconds spent repacking weights for the CPU kernels.
    pub fn pack_ms(&self) -> f64 {
        self.lowering_total(|p| match p {
            Compiled::Cpu(p) => p.stats().pack_ms,
            _ => 0.0,
        })
    }

    /// The sum of `field` over both step functions' programs.
    fn lowering_total(&self, field: fn(&Compiled) -> f64) -> f64 {
        self.steps
            .iter()
            .map(|s| field(&s.program))
            .fold(0.0, |a, b| a + b)
    }

    /// Bytes of the model's weights as loaded.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The backend the model was compiled for.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// How the ops of `step` were lowered on the CPU backend.
    pub fn lowering(&self, step: Step) -> Option<&cpu::LoweringStats> {
        match &self.steps[step as usize].program {
            Compiled::Cpu(p) => Some(p.stats()),
            _ => None,
        }
    }

    /// How the ops of `step` were lowered on the GPU backend.
    pub fn gpu_lowering(&self, step: Step) -> Option<&gpu::LoweringStats> {
        match &self.steps[step as usize].program {
            Compiled::Gpu(p) => Some(p.stats()),
            _ => None,
        }
    }

    /// The GPU adapter the model runs on (`None` off the GPU backend).
    pub fn adapter(&self) -> Option<String> {
        self.gpu.as_ref().map(|g| g.adapter())
    }

    /// Copies block `from` of every layer of `cache` to block `to` (the copy-on-write of
    /// a shared prefix block), where the cache lives: on the host, or in device memory.
    pub fn copy_block(&self, cache: &mut KvCache, from: usize, to: usize) -> Result<(), RunError> {
        if cache.resident.is_some() {
            return gpu::copy_block(cache, from, to);
        }
        let bs = cache.params.block_size as usize * cache.slot_len();
        if (from.max(to) + 1) * cache.params.block_size as usize > cache.slots() {
            return Err(format!(
                "block {from} or {to} is outside a pool of {} blocks",
                cache.blocks
            ));
        }
        for layer in 0..cache.params.layers as usize {
            let src = cache.slot_offset(layer, from * cache.params.block_size as usize);
            let dst = cache.slot_offset(layer, to * cache.params.block_size as usize);
            cache.k.copy_within(src..src + bs, dst);
            cache.v.copy_within(src..src + bs, dst);
        }
        Ok(())
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// How the model's KV cache stores keys and values.
    pub fn kv_storage(&self) -> &KvStorage {
        &self.kv_storage
    }

    /// Blocks of a KV pool for `wanted` blocks: the count `plan-kv-memory` planned (the
    /// step functions' cache type fixes it) or, without a plan, `wanted`.
    pub fn cache_blocks(&self, wanted: usize) -> usize {
        self.planned_blocks.unwrap_or(wanted)
    }

    /// Bytes of one block of the model's KV pool (keys and values of every layer), as
    /// every backend holds it: `plan-kv-memory`'s count.
    pub fn cache_block_bytes(&self) -> usize {
        bytes_per_block(&self.cache_params(), BLOCK_SIZE as u64) as usize
    }

    /// The parameters of the model's KV cache type (block count left open).
    fn cache_params(&self) -> KvCacheParams {
        let c = &self.config;
        KvCacheParams {
            layers: c.layers as u64,
            kv_heads: c.kv_heads as u64,
            head_dim: c.head_dim() as u64,
            block_size: BLOCK_SIZE as u64,
            blocks: None,
            storage: self.kv_storage.clone(),
            window: c.sliding_window.map(|w| w as u64),
        }
    }

    /// A zeroed KV cache of `blocks` blocks of [`BLOCK_SIZE`] positions, of the model's
    /// [`Model::kv_storage`].
    pub fn new_cache(&self, blocks: usize) -> KvCache {
        KvCache::new(self.cache_params(), blocks)
    }

    /// Runs `@prefill` (one sequence) or `@decode` (one token per sequence) on `batch`,
    /// returning one logits row per token and the updated cache.
    pub fn run(
        &self,
        step: Step,
        batch: &Batch,
        cache: KvCache,
    ) -> Result<(Vec<Vec<f32>>, KvCache), RunError> {
        let n = batch.tokens.len();
        let rows = batch.tables.len();
        let width = batch.tables.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let table: Vec<i64> = batch
            .tables
            .iter()
            .flat_map(|t| t.iter().copied().chain(std::iter::repeat(0)).take(width))
            .collect();
        let i32s =
            |v: Vec<i64>, shape: Vec<usize>| Value::Tensor(Tensor::from_i64(shape, DType::I32, v));
        let args = vec![
            i32s(
                batch.tokens.iter().map(|&t| i64::from(t)).collect(),
                vec![n],
            ),
            i32s(batch.positions.clone(), vec![n]),
            i32s(batch.slots.clone(), vec![n]),
            i32s(table, vec![rows, width]),
            i32s(batch.context_lens.clone(), vec![rows]),
            Value::Cache(cache),
        ];
        let func = step.name();
        let compiled = &self.steps[step as usize];
        let mut out = match &compiled.program {
            Compiled::Cpu(program) => program.run(&self.ctx, &self.weights, args),
            Compiled::Gpu(program) => program.run(&self.ctx, &self.weights, args),
            Compiled::Interp => Interpreter::new(&self.ctx, &self.weights).run_hoisted(
                compiled.func,
                args,
                &compiled.hoisted,
            ),
        }
        .map_err(|e| format!("@{func}: {e}"))?;
        let cache = match out.pop() {
            Some(Value::Cache(c)) => c,
            _ => return Err(format!("@{func} did not return a cache")),
        };
        let logits = match out.pop() {
            Some(Value::Tensor(t)) => t,
            _ => return Err(format!("@{func} did not return logits")),
        };
        Ok((
            logits
                .floats()?
                .chunks(self.config.vocab)
                .map(<[f32]>::to_vec)
                .collect(),
            cache,
        ))
    }

    /// Blocks of the KV pool of one sequence of `steps` positions whose calls run at most
    /// `chunk` positions each (the prompt's prefill): one block per [`BLOCK_SIZE`]
    /// positions, or, under a sliding window `W`, a ring of the blocks that the last
    /// `chunk + W - 1` positions fill, when that is fewer ([`Model::forward`]); what
    /// `plan-kv-memory` planned replaces either.
    pub fn sequence_blocks(&self, steps: usize, chunk: usize) -> usize {
        let all = steps.div_ceil(BLOCK_SIZE).max(1);
        let wanted = match self.config.sliding_window {
            Some(w) => all.min((chunk.max(1) + w - 1).div_ceil(BLOCK_SIZE)),
            None => all,
        };
        self.cache_blocks(wanted)
    }

    /// Runs tokens at positions `start..` of the single sequence whose blocks are the
    /// cache's, in order, returning one logits row per token and the updated cache.
    ///
    /// Under a sliding window the blocks are a ring: position `p` goes to slot
    /// `p % (blocks * BLOCK_SIZE)`, overwriting a position no later query sees, as long as
    /// the call's positions and the `W - 1` before them fit in the pool (an error
    /// otherwise; [`Model::sequence_blocks`] sizes it).
    pub fn forward(
        &self,
        step: Step,
        tokens: &[u32],
        start: usize,
        cache: KvCache,
    ) -> Result<(Vec<Vec<f32>>, KvCache), RunError> {
        let n = tokens.len();
        let end = start + n;
        let positions: Vec<i64> = (start..end).map(|p| p as i64).collect();
        let (slots, table) = match self.config.sliding_window {
            Some(w) => {
                let ring = cache.blocks * BLOCK_SIZE;
                if end > ring && n + w - 1 > ring {
                    return Err(format!(
                        "a call of {n} positions under a sliding window of {w} needs {} KV slots, more than the pool's {ring}",
                        n + w - 1
                    ));
                }
                let blocks = cache.blocks as i64;
                let slots = positions.iter().map(|&p| p % ring as i64).collect();
                let table = (0..end.div_ceil(BLOCK_SIZE) as i64)
                    .map(|i| i % blocks)
                    .collect();
                (slots, table)
            }
            None => (positions.clone(), (0..cache.blocks as i64).collect()),
        };
        let batch = Batch {
            tokens: tokens.to_vec(),
            slots,
            positions,
            tables: vec![table],
            context_lens: vec![end as i64],
        };
        self.run(step, &batch, cache)
    }

    /// Generates from `prompt` for at most `steps` positions (0 or more than the model's
    /// sequence length means the sequence length), as run.c does, keeping the logits of
    /// every position ([`Generation::logits`]).
    pub fn generate(
        &self,
        tokenizer: &dyn TextCodec,
        prompt: &str,
        steps: usize,
        sampler: SamplerConfig,
    ) -> Result<Generation, RunError> {
        self.generate_with(tokenizer, prompt, steps, sampler, true, &mut |_| Ok(()))
    }

    /// [`Model::generate`] handing each piece of the text to `on_text` as it is produced
    /// (the prompt's pieces, each generated token's, then the final `\n`: together
    /// [`Generation::text`]), without keeping the logits (a row of the vocabulary's size
    /// per position adds up on long generations): what a command line prints as it goes.
    /// An error from `on_text` ends the generation with that error.
    pub fn generate_streaming(
        &self,
        tokenizer: &dyn TextCodec,
        prompt: &str,
        steps: usize,
        sampler: SamplerConfig,
        on_text: &mut dyn FnMut(&[u8]) -> Result<(), RunError>,
    ) -> Result<Generation, RunError> {
        self.generate_with(tokenizer, prompt, steps, sampler, false, on_text)
    }

    /// The generation loop of [`Model::generate`] and [`Model::generate_streaming`].
    fn generate_with(
        &self,
        tokenizer: &dyn TextCodec,
        prompt: &str,
        steps: usize,
        sampler: SamplerConfig,
        keep_logits: bool,
        on_text: &mut dyn FnMut(&[u8]) -> Result<(), RunError>,
    ) -> Result<Generation, RunError> {
        let steps = if steps == 0 || steps > self.config.seq_len {
            self.config.seq_len
        } else {
            steps
        };
        let prompt_ids = tokenizer.encode(prompt, true, false);
        if let Some(&bad) = prompt_ids
            .iter()
            .find(|&&t| t as usize >= self.config.vocab)
        {
            return Err(format!(
                "the tokenizer produced token {bad}, outside the model's vocabulary of {}",
                self.config.vocab
            ));
        }
        if prompt_ids.is_empty() {
            return Err(
                "the tokenizer produced no tokens (it has no BOS token and the prompt is empty)"
                    .into(),
            );
        }
        let stops = tokenizer.stop_tokens();
        let mut sampler = Sampler::new(sampler);
        let mut g = Generation {
            prompt_ids: prompt_ids.clone(),
            ids: vec![prompt_ids[0]],
            ..Generation::default()
        };
        g.stats.prompt_tokens = prompt_ids.len();
        g.stats.compile_ms = self.compile_ms;
        g.stats.jit_ms = self.jit_ms();
        let prefilled = prompt_ids.len().min(steps);
        g.stats.kv_blocks = self.sequence_blocks(steps, prefilled);
        let start = Instant::now();
        let (mut rows, mut cache) = self.forward(
            Step::Prefill,
            &prompt_ids[..prefilled],
            0,
            self.new_cache(g.stats.kv_blocks),
        )?;
        g.stats.prefill_ms = start.elapsed().as_secs_f64() * 1000.0;
        let mut token = prompt_ids[0];
        let mut pos = 0;
        while pos < steps {
            let logits = if pos < prefilled {
                std::mem::take(&mut rows[pos])
            } else {
                let start = Instant::now();
                let (mut out, next_cache) = self.forward(Step::Decode, &[token], pos, cache)?;
                cache = next_cache;
                g.stats.decode_ms += start.elapsed().as_secs_f64() * 1000.0;
                g.stats.decode_steps += 1;
                out.pop().unwrap_or_default()
            };
            let next = if pos + 1 < prompt_ids.len() {
                prompt_ids[pos + 1]
            } else {
                g.stats.generated_tokens += 1;
                sampler.sample(&logits) as u32
            };
            if keep_logits {
                g.logits.push(logits);
            }
            pos += 1;
            if stops.contains(&next) {
                g.stopped = true;
                break;
            }
            let piece = tokenizer.decode(token, next);
            on_text(&piece)?;
            g.text.extend(piece);
            g.ids.push(next);
            token = next;
        }
        g.stats.forward_calls = pos;
        on_text(b"\n")?;
        g.text.push(b'\n');
        Ok(g)
    }
}
