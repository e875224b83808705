//! The Llama-family model builder: the `llm` IR of a model's forward step.
//!
//! The module has two functions with one signature; each takes `N` new tokens and returns
//! their logits and the updated KV cache:
//!
//! ```text
//! (tokens: [N] i32, positions: [N] i32, slots: [N] i32,
//!  block_tables: [B, M] i32, context_lens: [B] i32, cache) -> (logits: [N, vocab] f32, cache)
//! ```
//!
//! `@prefill` runs `N` tokens of one sequence (`B = 1`, typically a whole prompt);
//! `@decode` runs one token for each of `B = N` sequences. `slots[i]` is the cache slot
//! (`block * block_size + offset`) where token `i`'s keys and values go. Each layer is RMSNorm, grouped-query attention with
//! interleaved RoPE over the paged cache (`llm.append_kv` then `llm.paged_attention`), a
//! residual add, RMSNorm, a SwiGLU feed-forward block and a second residual add; a final
//! RMSNorm and the classifier (tied to the embedding unless the model has its own) give the
//! logits; Qwen2-style models add biases after the attention's projections
//! ([`AttentionBias`]), Qwen3-style ones normalize each head's queries and keys
//! ([`ModelConfig::qk_norm`]; OLMo 2 the whole projections, and its blocks' outputs
//! instead of their inputs: [`ModelConfig::pre_norms`]) and may have heads of their own width
//! ([`ModelConfig::explicit_head_dim`]), and Gemma-style ones gate with GELU
//! ([`Activation`]) and scale the embeddings ([`ModelConfig::scale_embeddings`]); Gemma 2
//! and 3 add sandwich norms ([`ModelConfig::post_norms`]), their own query scale,
//! soft-capped attention scores and logits (`llm.paged_attention`'s `softcap`, and
//! `llm.tanh` between two multiplications) and local layers among global ones
//! ([`LocalAttention`]: a `window` on those layers' paged attention, and their own RoPE
//! base); Granite scales the embeddings, the residual branches, the scores and the logits,
//! SmolLM3 leaves RoPE out of some layers ([`ModelConfig::nope_layers`]), Cohere's
//! norms are LayerNorms ([`Norm`]) with the attention and feed-forward blocks side by
//! side ([`Blocks`]), and the older transformer shapes of Phi-2, StableLM, StarCoder2 and
//! GPT-NeoX add LayerNorms with biases, biases on the feed-forward projections and the
//! classifier, an ungated feed-forward block ([`FeedForward`]) and exact GELU. Mixtures of
//! experts route each token's feed-forward block to a few experts ([`Experts`]), gpt-oss's
//! heads count attention sinks ([`ModelConfig::attention_sinks`]), and DeepSeek's attend
//! through a cached latent ([`LatentAttention`]).
//! Weights are referenced by name with `llm.weight`.
//!
//! Weights keep their stored type: quantized and 16-bit matrices (the `f16`/`bf16` storage
//! formats) are dequantized where a matmul reads them (the `fuse` pass turns
//! `matmul(x, dequantize(w))` into `quantized_matmul`), f16/bf16 vectors are cast to f32;
//! embedding tables are gathered from directly.
//!
//! The builder writes the IR as text and parses it, so what `llm-run import` prints is
//! exactly what runs, and every build goes through the parser and verifier.

use std::fmt::Write as _;

use llm_ir::{
    dtype::DType,
    interp::{KvBlocks, Value, WeightStore},
    types::KvStorage,
};

use crate::weights::Weights;

/// The hyperparameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Model (residual) width.
    pub dim: usize,
    /// Feed-forward hidden width.
    pub hidden_dim: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Maximum sequence length.
    pub seq_len: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// The norms' epsilon (RMSNorm's, or LayerNorm's where [`ModelConfig::norm`] says).
    pub norm_eps: f64,
    /// Whether the classifier reuses the token embedding.
    pub tied_classifier: bool,
    /// RoPE pairs features `(i, i + head_dim / 2)` (Hugging Face's layout) instead of
    /// `(2i, 2i + 1)` (Meta's and llama2.c's).
    pub rope_half: bool,
    /// RoPE's linear position scaling: positions are divided by it (1 for none).
    pub rope_scaling: f64,
    /// RoPE divides each pair's frequency by a factor: the weight
    /// [`ROPE_FREQS`] (`[rotary / 2]`, `llm.rope`'s `freq_factors`; Llama 3's, YaRN's and
    /// LongRoPE's scalings).
    pub rope_freq_factors: bool,
    /// RoPE rotates only the first this many features of each head, the rest passing
    /// through (Phi-4-mini's `partial_rotary_factor`, GGUF's `rope.dimension_count`;
    /// `llm.rope`'s `rotary_dim`); `None` for whole heads.
    pub rotary_dim: Option<usize>,
    /// RoPE's sines and cosines are scaled by it (YaRN's and LongRoPE's attention factor,
    /// `llm.rope`'s `mscale`; 1 for none).
    pub rope_mscale: f64,
    /// Each position attends to at most this many positions, itself included (Mistral's
    /// sliding window: the KV cache type's `window`); `None` for all before it.
    pub sliding_window: Option<usize>,
    /// The attention's projections add biases: the q, k and v projections'
    /// (`layers.N.attention.w{q,k,v}.bias`, Qwen2's) and, with it, the output
    /// projection's (`attention.wo.bias`, a Llama config's `attention_bias`).
    pub attention_bias: AttentionBias,
    /// Elements per head where that is not `dim / heads` (Qwen3's: the q projection is
    /// then `heads * head_dim` wide, and the output projection reads that many).
    pub explicit_head_dim: Option<usize>,
    /// Where queries and keys go through a norm of their own before RoPE.
    pub qk_norm: QkNorm,
    /// The q, k and v projections are clamped to `[-c, c]` (after the whole-projection q/k
    /// norms where there are some): OLMo's, OLMoE's and DBRX's `clip_qkv`.
    pub clip_qkv: Option<f64>,
    /// Each block's input goes through an RMSNorm (`layers.N.attention_norm.weight`,
    /// `ffn_norm.weight`): every family's but OLMo 2's, which normalizes the blocks'
    /// outputs instead ([`ModelConfig::post_norms`]).
    pub pre_norms: bool,
    /// The activation of the feed-forward block (of its gate where it is gated).
    pub activation: Activation,
    /// The feed-forward block's shape: gated (SwiGLU's, GeGLU's) or not.
    pub feed_forward: FeedForward,
    /// The feed-forward block's projections add biases
    /// (`layers.N.feed_forward.w{1,3,2}.bias`; the gate's, `w1`, where it is gated).
    pub ffn_bias: bool,
    /// The classifier adds a bias (`output.bias`, `[vocab]`; Phi-2's).
    pub classifier_bias: bool,
    /// Token embeddings are multiplied by `sqrt(dim)` (in `f32`) before the first layer
    /// (Gemma's).
    pub scale_embeddings: bool,
    /// Output norms: the attention's output and the feed-forward block's each go through
    /// an RMSNorm of their own before their residual add
    /// (`layers.N.post_attention_norm.weight`, `layers.N.post_ffw_norm.weight`; Gemma 2's
    /// and 3's and GLM-4-0414's sandwich norms, and OLMo 2's, which has no input norms).
    pub post_norms: bool,
    /// The attention scores' scale where it is not `1 / sqrt(head_dim)` (Gemma 2's and
    /// 3's `query_pre_attn_scalar ** -0.5`, Granite's `attention_multiplier`):
    /// `llm.paged_attention`'s `scale`.
    pub attention_scale: Option<f64>,
    /// Attention scores are soft-capped, `cap * tanh(score / cap)`, before the softmax
    /// (Gemma 2's `attn_logit_softcapping`): `llm.paged_attention`'s `softcap`.
    pub attention_softcap: Option<f64>,
    /// The logits are soft-capped the same way (Gemma 2's `final_logit_softcapping`).
    pub logit_softcap: Option<f64>,
    /// The layers whose attention takes no RoPE (SmolLM3's NoPE layers, every fourth);
    /// `None` where every layer rotates.
    pub nope_layers: Option<Vec<bool>>,
    /// Token embeddings are multiplied by it before the first layer (Granite's
    /// `embedding_multiplier`).
    pub embedding_scale: Option<f64>,
    /// The attention's and the feed-forward block's outputs are multiplied by it before
    /// their residual adds (Granite's `residual_multiplier`).
    pub residual_scale: Option<f64>,
    /// The logits are multiplied by it (Cohere's `logit_scale`; Granite's is the `f32`
    /// reciprocal of its `logits_scaling`, which divides them).
    pub logit_scale: Option<f64>,
    /// The kind of the blocks' input norms and of the final norm.
    pub norm: Norm,
    /// How each layer's attention and feed-forward blocks meet the residual stream.
    pub blocks: Blocks,
    /// Positions are learned embeddings added to the token embeddings
    /// ([`POSITION_EMBEDDINGS`], `[seq_len, dim]`; GPT-2's), and no layer takes RoPE.
    pub learned_positions: bool,
    /// Local attention in some layers only (Gemma 2's and 3's interleaving); `None` where
    /// every layer attends alike.
    pub local_attention: Option<LocalAttention>,
    /// Mixture-of-experts feed-forward blocks (Mixtral's, Qwen3-MoE's, OLMoE's) in some or
    /// every layer; `None` where every layer's block is dense.
    pub experts: Option<Experts>,
    /// Each attention head's softmax counts a learned sink, a score without a value
    /// (gpt-oss's; [`ATTENTION_SINKS`], `[heads]`, `llm.paged_attention`'s `sinks`).
    pub attention_sinks: bool,
    /// Multi-head latent attention (DeepSeek V2's and V3's) in place of the q, k and v
    /// projections; `None` for those.
    pub latent_attention: Option<LatentAttention>,
}

/// DeepSeek's multi-head latent attention: every head's keys and values are projections
/// of one compressed latent of `kv_rank` values a token ([`LATENT_KV_DOWN`], normalized
/// by [`LATENT_KV_NORM`]; each head's keys by [`LATENT_K_UP`], its values by
/// [`LATENT_V_UP`]), the queries come from the input (`attention.wq`) or from a
/// compressed latent of `q_rank` ([`LATENT_Q_DOWN`], [`LATENT_Q_NORM`], [`LATENT_Q_UP`]).
/// Each head's query and key are `nope` features without RoPE and `rope` with it (the
/// keys' one RoPE key, projected with the latent, shared by every head); its value is
/// `value` wide.
///
/// The cache holds the latent and the RoPE key, `kv_rank + rope` values a token (one KV
/// head, [`ModelConfig::explicit_head_dim`]; RoPE over the last `rope`,
/// [`ModelConfig::rotary_dim`]), not every head's keys and values: each head's no-RoPE
/// query is taken into the latent's space by its key projection, so that its product
/// with a latent is the product of its key with the query, and each head's weighted sum
/// of latents is taken through its value projection after the attention (the
/// "absorbed" form of DeepSeek's paper, as llama.cpp and vLLM decode). The scores' scale
/// stays `nope + rope`'s ([`ModelConfig::attention_scale`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentAttention {
    /// The queries' latent width; `None` where the queries are projected directly.
    pub q_rank: Option<usize>,
    /// The keys' and values' latent width.
    pub kv_rank: usize,
    /// Features of a head's query and key without RoPE.
    pub nope: usize,
    /// Features of a head's query and key with RoPE.
    pub rope: usize,
    /// Features of a head's value.
    pub value: usize,
    /// The latents' RMSNorms' epsilon.
    pub norm_eps: f64,
}

/// The queries' down projection of latent attention, under `layers.N.`: `[q_rank, dim]`.
pub const LATENT_Q_DOWN: &str = "attention.wq_a.weight";

/// The norm of the queries' latent: `[q_rank]`.
pub const LATENT_Q_NORM: &str = "attention.q_a_norm.weight";

/// The queries' up projection: `[heads * (nope + rope), q_rank]`.
pub const LATENT_Q_UP: &str = "attention.wq_b.weight";

/// The keys' and values' down projection, the shared RoPE key after the latent:
/// `[kv_rank + rope, dim]`.
pub const LATENT_KV_DOWN: &str = "attention.wkv_a.weight";

/// The norm of the keys' and values' latent: `[kv_rank]`.
pub const LATENT_KV_NORM: &str = "attention.kv_a_norm.weight";

/// Each head's key projection of the latent, turned (llama.cpp's `attn_k_b`): `[heads,
/// kv_rank, nope]`; a head's no-RoPE query times its transpose is the query in the
/// latent's space.
pub const LATENT_K_UP: &str = "attention.wk_b.weight";

/// Each head's value projection of the latent (llama.cpp's `attn_v_b`): `[heads, value,
/// kv_rank]`; the head's weighted latents times its transpose are its output.
pub const LATENT_V_UP: &str = "attention.wv_b.weight";

/// Feed-forward blocks of routed experts: a router (`layers.N.feed_forward.gate_inp`,
/// [`ROUTER`], `[count, dim]`) scores the experts for each token ([`Experts::scoring`],
/// within [`Experts::groups`]), the `per_token` best run (each a gated block of width
/// `hidden`: [`EXPERT_GATES`], [`EXPERT_UPS`], [`EXPERT_DOWNS`], stacked `[count, ...]`,
/// with [`Experts::biases`] and its [`Experts::glu`]), and their outputs are summed,
/// weighted by the chosen experts' scores (normalized as [`Experts::normalize`] says,
/// times [`Experts::scale`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Experts {
    /// Experts of a layer.
    pub count: usize,
    /// Experts each token runs.
    pub per_token: usize,
    /// Width of an expert's hidden layer.
    pub hidden: usize,
    /// The chosen experts' weights are rescaled to sum to 1 (Mixtral's, and Qwen3-MoE's
    /// `norm_topk_prob`: a softmax over the chosen logits; a sigmoid router's scores divided
    /// by their sum); otherwise they are the probabilities of a softmax over every expert
    /// (OLMoE's), or a sigmoid router's scores as they are.
    pub normalize: bool,
    /// Which layers route (the others have a dense block of `hidden_dim`: Qwen3-MoE's
    /// `mlp_only_layers` and `decoder_sparse_step`).
    pub layers: Vec<bool>,
    /// A shared expert every token runs besides the routed ones (Qwen2-MoE's,
    /// Granite-MoE-Shared's); `None` for none.
    pub shared: Option<SharedExpert>,
    /// How the router's logits become scores.
    pub scoring: ExpertScoring,
    /// Each token's experts are chosen among a few groups of them (DeepSeek's
    /// group-limited routing); `None` for all.
    pub groups: Option<ExpertGroups>,
    /// The chosen experts' weights are multiplied by it (DeepSeek's
    /// `routed_scaling_factor`; 1 for none).
    pub scale: f64,
    /// The router and each expert's three projections add biases (gpt-oss's:
    /// [`ROUTER_BIAS`], [`EXPERT_GATE_BIASES`], [`EXPERT_UP_BIASES`],
    /// [`EXPERT_DOWN_BIASES`]).
    pub biases: bool,
    /// How an expert's gate and up projections meet.
    pub glu: ExpertGlu,
}

/// How a mixture's router scores its experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertScoring {
    /// A softmax: over the chosen experts' logits where [`Experts::normalize`], else over
    /// every expert's, the chosen ones' probabilities weighting them.
    Softmax,
    /// Each logit's sigmoid (DeepSeek V3's), the chosen ones weighting their experts,
    /// divided by their sum where [`Experts::normalize`]; with `selection_bias`, the
    /// experts are chosen by their scores plus [`ROUTER_SELECTION_BIAS`] (`[experts]`, its
    /// `e_score_correction_bias`), which does not enter the weights.
    Sigmoid {
        /// Whether a bias shifts the scores the experts are chosen by.
        selection_bias: bool,
    },
}

/// DeepSeek's group-limited routing: the experts, in order, form `count` groups, each
/// scored by the sum of its `scored_by` highest scores (1: its highest, DeepSeek V2's;
/// 2: V3's), and each token's experts are chosen among the `chosen` best groups only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertGroups {
    /// Groups of experts.
    pub count: usize,
    /// Groups a token's experts are chosen among.
    pub chosen: usize,
    /// Scores summed to score a group.
    pub scored_by: usize,
}

impl ExpertGroups {
    /// The limit `chosen` of `count` groups, scored by their `scored_by` best, puts on a
    /// token's experts: none where it keeps every group (one group, or `chosen` none or
    /// all of them, as a file or config writes for no limit).
    pub fn limiting(count: usize, chosen: usize, scored_by: usize) -> Option<ExpertGroups> {
        (count > 1 && chosen > 0 && chosen < count).then_some(ExpertGroups {
            count,
            chosen,
            scored_by,
        })
    }
}

/// How an expert's gate projection `g` and up projection `u` make its hidden values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertGlu {
    /// `act(g) * u`, the model's activation (Mixtral's SwiGLU).
    Gated,
    /// gpt-oss's clamped SwiGLU: `g' = min(g, limit)`, `u' = clamp(u, -limit, limit)`,
    /// then `(u' + 1) * g' * sigmoid(alpha * g')`.
    ClampedSwiglu {
        /// The sigmoid's gain (`swiglu_alpha`, 1.702).
        alpha: f64,
        /// The clamp (`swiglu_limit`, 7).
        limit: f64,
    },
}

/// A mixture's shared expert: a gated feed-forward block (its matrices under
/// [`SHARED_EXPERT`]) whose output is added to the routed experts' sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedExpert {
    /// Width of its hidden layer.
    pub hidden: usize,
    /// Its output is scaled by the sigmoid of the block input's product with
    /// [`SHARED_GATE`] (Qwen2-MoE's); otherwise it is added as it is (Granite-MoE-Shared's).
    pub gated: bool,
}

impl Experts {
    /// Whether layer `l` routes its tokens to experts.
    pub fn routes(&self, l: usize) -> bool {
        self.layers.get(l).copied().unwrap_or(false)
    }
}

/// The router of a mixture-of-experts layer, under `layers.N.`: `[experts, dim]`.
pub const ROUTER: &str = "feed_forward.gate_inp.weight";

/// The router's bias ([`Experts::biases`]): `[experts]`.
pub const ROUTER_BIAS: &str = "feed_forward.gate_inp.bias";

/// The bias of the scores a sigmoid router chooses by ([`ExpertScoring::Sigmoid`]):
/// `[experts]`.
pub const ROUTER_SELECTION_BIAS: &str = "feed_forward.gate_inp.selection_bias";

/// The experts' gate projections' biases ([`Experts::biases`]): `[experts, hidden]`.
pub const EXPERT_GATE_BIASES: &str = "feed_forward.experts.w1.bias";

/// The experts' up projections' biases ([`Experts::biases`]): `[experts, hidden]`.
pub const EXPERT_UP_BIASES: &str = "feed_forward.experts.w3.bias";

/// The experts' down projections' biases ([`Experts::biases`]): `[experts, dim]`.
pub const EXPERT_DOWN_BIASES: &str = "feed_forward.experts.w2.bias";

/// A layer's attention sinks ([`ModelConfig::attention_sinks`]), under `layers.N.`:
/// `[heads]`.
pub const ATTENTION_SINKS: &str = "attention.sinks";

/// The experts' gate projections, stacked: `[experts, hidden, dim]`.
pub const EXPERT_GATES: &str = "feed_forward.experts.w1.weight";

/// The experts' up projections, stacked: `[experts, hidden, dim]`.
pub const EXPERT_UPS: &str = "feed_forward.experts.w3.weight";

/// The experts' down projections, stacked: `[experts, dim, hidden]`.
pub const EXPERT_DOWNS: &str = "feed_forward.experts.w2.weight";

/// The stem of a shared expert's gated block (`w1`, `w3`, `w2` under it).
pub const SHARED_EXPERT: &str = "feed_forward.shared";

/// The shared expert's gate projection (under [`SHARED_EXPERT`]): `[hidden, dim]`.
pub const SHARED_EXPERT_GATE: &str = "feed_forward.shared.w1.weight";

/// The shared expert's up projection (under [`SHARED_EXPERT`]): `[hidden, dim]`.
pub const SHARED_EXPERT_UP: &str = "feed_forward.shared.w3.weight";

/// The shared expert's down projection (under [`SHARED_EXPERT`]): `[dim, hidden]`.
pub const SHARED_EXPERT_DOWN: &str = "feed_forward.shared.w2.weight";

/// The shared expert's gate: `[1, dim]`.
pub const SHARED_GATE: &str = "feed_forward.shared_gate.weight";

/// Layers that attend locally among layers that attend to every position (Gemma 2
/// alternates them, Gemma 3 has five local layers to a global one). Unlike
/// [`ModelConfig::sliding_window`], the cache keeps every position, as the global layers
/// read them all; a local layer's `llm.paged_attention` has the `window`.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalAttention {
    /// Positions a local layer's query sees, itself included.
    pub window: usize,
    /// Whether each layer is local.
    pub layers: Vec<bool>,
    /// The local layers' RoPE base, unscaled, where it is not the model's (Gemma 3's
    /// `rope_local_base_freq`; the global layers keep the model's base and scaling).
    pub rope_theta: Option<f64>,
}

impl LocalAttention {
    /// Gemma's pattern over `layers` layers ([`LocalAttention::periodic_layers`]), with
    /// a window of `window` and the local layers' RoPE base `rope_theta`.
    pub fn periodic(window: usize, layers: usize, period: usize, rope_theta: Option<f64>) -> Self {
        LocalAttention {
            window,
            layers: LocalAttention::periodic_layers(layers, period),
            rope_theta,
        }
    }

    /// Which of `layers` layers are local in Gemma's pattern: every `period`-th layer
    /// (the last of each period) global, the others local. Gemma 2's period is 2 (even
    /// layers local), Gemma 3's 6 (as llama.cpp's `swa_pattern` and Hugging Face's
    /// `sliding_window_pattern`).
    pub fn periodic_layers(layers: usize, period: usize) -> Vec<bool> {
        (0..layers).map(|l| (l + 1) % period.max(1) != 0).collect()
    }

    /// Which layers are global (not local): Cohere 2's, which take no RoPE.
    pub fn global_layers(&self) -> Vec<bool> {
        self.layers.iter().map(|&local| !local).collect()
    }

    /// Whether layer `l` is local.
    pub fn is_local(&self, l: usize) -> bool {
        self.layers.get(l).copied().unwrap_or(false)
    }
}

/// Where queries and keys are normalized before RoPE (`layers.N.attention.q_norm.weight`
/// and `k_norm.weight`): by RMSNorms, or by LayerNorms of each head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QkNorm {
    /// They are not.
    #[default]
    None,
    /// Each head's on its own, the weights `[head_dim]` (Qwen3's and Gemma 3's).
    Heads,
    /// The whole q and k projections, the weights `[heads * head_dim]` and
    /// `[kv_heads * head_dim]` (OLMo 2's).
    Projections,
    /// A LayerNorm without bias of each head, each head its own weights: `[heads,
    /// head_dim]` and `[kv_heads, head_dim]` (Command R+'s, StableLM 2 12B's), of the
    /// model's `norm_eps`.
    LayerHeads,
}

/// The activation of the feed-forward block: of its gate, `down(act(gate(x)) * up(x))`,
/// or of its up projection where it has no gate, `down(act(up(x)))`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activation {
    /// SiLU: SwiGLU (Llama's).
    #[default]
    Silu,
    /// GELU, tanh approximation (`llm.gelu`): GeGLU (Gemma's), or ungated (Phi-2's,
    /// StarCoder2's).
    GeluTanh,
    /// GELU, exact: `0.5 * x * (1 + erf(x / sqrt(2)))` (`llm.erf`; GPT-NeoX's).
    Gelu,
    /// ReLU, `max(x, 0)` (`llm.relu`; OPT's).
    Relu,
}

/// How a layer's attention and feed-forward blocks meet the residual stream `x`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Blocks {
    /// One after the other: `x += attention(norm(x))`, then `x += feed_forward(ffn_norm(x))`
    /// (Llama's).
    #[default]
    Sequential,
    /// Side by side over one norm, adding into the residual at once:
    /// `x += attention(norm(x)) + feed_forward(norm(x))` (Cohere's, Phi-2's, StableLM 2
    /// 12B's): no `ffn_norm` weights.
    ParallelSharedNorm,
    /// Side by side, each over its own norm of `x`:
    /// `x += attention(norm(x)) + feed_forward(ffn_norm(x))` (GPT-NeoX's).
    Parallel,
}

/// The feed-forward block's shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FeedForward {
    /// `down(act(gate(x)) * up(x))` (`feed_forward.w1`, `w3`, `w2`): Llama's SwiGLU.
    #[default]
    Gated,
    /// `down(act(up(x)))` (`feed_forward.w3`, `w2`): the original transformer's MLP
    /// (Phi-2's `fc1`/`fc2`, StarCoder2's `c_fc`/`c_proj`).
    Ungated,
}

/// The kind of the blocks' input norms and of the final norm (`attention_norm`,
/// `ffn_norm`, `norm`); sandwich and q/k norms are RMSNorms in every family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Norm {
    /// RMSNorm (Llama's).
    #[default]
    Rms,
    /// LayerNorm without bias: centred on the mean (Cohere's).
    Layer,
    /// LayerNorm with a bias, `NAME.bias` beside each `NAME.weight` (Phi-2's,
    /// StableLM's, StarCoder2's).
    BiasedLayer,
    /// LayerNorm without weight or bias (OLMo's): no norm weights at all.
    Unit,
}

/// A model file's head size `head_dim` as [`ModelConfig::explicit_head_dim`]: `None`
/// where it is the width `dim` over the `heads`.
pub fn uneven_head_dim(head_dim: usize, dim: usize, heads: usize) -> Option<usize> {
    (head_dim * heads != dim).then_some(head_dim)
}

/// Which of the attention's projections add a bias.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttentionBias {
    /// The q, k and v projections.
    pub qkv: bool,
    /// The output projection.
    pub output: bool,
}

/// The table of learned position embeddings ([`ModelConfig::learned_positions`]).
pub const POSITION_EMBEDDINGS: &str = "pos_embeddings.weight";

/// The weight holding RoPE's per-pair frequency factors (GGUF's name for it).
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// A layer's norm of the attention's output ([`ModelConfig::post_norms`]), after
/// `layers.N.` (GGUF's name).
pub const POST_ATTENTION_NORM: &str = "post_attention_norm.weight";

/// A layer's norm of the feed-forward block's output ([`ModelConfig::post_norms`]),
/// after `layers.N.` (GGUF's name).
pub const POST_FFW_NORM: &str = "post_ffw_norm.weight";

/// No model yet (every size 0), with llama2.c's settings (interleaved RoPE with base 10000,
/// unscaled, RMSNorm epsilon `1e-5`, SwiGLU, an untied classifier) and none of the other
/// families': what the loaders fill in.
impl Default for ModelConfig {
    fn default() -> ModelConfig {
        ModelConfig {
            dim: 0,
            hidden_dim: 0,
            layers: 0,
            heads: 0,
            kv_heads: 0,
            vocab: 0,
            seq_len: 0,
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            tied_classifier: false,
            rope_half: false,
            rope_scaling: 1.0,
            rope_freq_factors: false,
            rotary_dim: None,
            rope_mscale: 1.0,
            sliding_window: None,
            attention_bias: AttentionBias::default(),
            explicit_head_dim: None,
            qk_norm: QkNorm::None,
            clip_qkv: None,
            pre_norms: true,
            activation: Activation::Silu,
            feed_forward: FeedForward::Gated,
            ffn_bias: false,
            classifier_bias: false,
            scale_embeddings: false,
            post_norms: false,
            attention_scale: None,
            attention_softcap: None,
            logit_softcap: None,
            embedding_scale: None,
            residual_scale: None,
            logit_scale: None,
            norm: Norm::Rms,
            blocks: Blocks::Sequential,
            learned_positions: false,
            nope_layers: None,
            local_attention: None,
            experts: None,
            attention_sinks: false,
            latent_attention: None,
        }
    }
}

impl ModelConfig {
    /// llama2.c's model of these sizes: interleaved RoPE with base 10000, unscaled, RMSNorm
    /// epsilon `1e-5`, SwiGLU, the classifier tied to the embedding, and none of the other
    /// families' settings (window, biases, head width, norms, embedding scale).
    pub fn llama2c(
        dim: usize,
        hidden_dim: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        vocab: usize,
        seq_len: usize,
    ) -> ModelConfig {
        ModelConfig {
            dim,
            hidden_dim,
            layers,
            heads,
            kv_heads,
            vocab,
            seq_len,
            tied_classifier: true,
            ..ModelConfig::default()
        }
    }

    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.explicit_head_dim
            .unwrap_or(self.dim / self.heads.max(1))
    }

    /// The features of each head RoPE rotates ([`ModelConfig::rotary_dim`], else all).
    pub fn rotary(&self) -> usize {
        self.rotary_dim.unwrap_or_else(|| self.head_dim())
    }

    /// Width of the query projection (and of the attention's output).
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim()
    }

    /// Width of the key/value projections.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim()
    }

    /// Checks that the head counts divide the width into even-sized heads.
    pub fn validate(&self) -> Result<(), String> {
        if self.explicit_head_dim == Some(0) {
            return Err("the head size is 0".into());
        }
        if let Some(latent) = &self.latent_attention {
            self.validate_latent(latent)?;
        }
        if self.heads == 0
            || (self.explicit_head_dim.is_none() && !self.dim.is_multiple_of(self.heads))
        {
            return Err(format!(
                "the width {} is not a multiple of the {} heads",
                self.dim, self.heads
            ));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!(
                "the {} heads are not a multiple of the {} KV heads",
                self.heads, self.kv_heads
            ));
        }
        if !self.learned_positions && !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "the head size {} is odd; RoPE needs pairs",
                self.head_dim()
            ));
        }
        if let Some(rotary) = self.rotary_dim
            && (rotary == 0 || !rotary.is_multiple_of(2) || rotary > self.head_dim())
        {
            return Err(format!(
                "RoPE over {rotary} features of heads of {}: it rotates pairs, at most the whole head",
                self.head_dim()
            ));
        }
        let positive = [
            ("attention scale", self.attention_scale),
            ("attention soft-cap", self.attention_softcap),
            ("logit soft-cap", self.logit_softcap),
            ("embedding scale", self.embedding_scale),
            ("residual scale", self.residual_scale),
            ("logit scale", self.logit_scale),
            ("q/k/v clamp", self.clip_qkv),
            ("RoPE attention factor", Some(self.rope_mscale)),
            ("RoPE position scaling", Some(self.rope_scaling)),
        ];
        // The kernels compute in f32: each must stay a positive, normal f32.
        if let Some((what, v)) = positive.into_iter().find_map(|(what, v)| {
            v.filter(|v| !(*v > 0.0 && (*v as f32).is_normal()))
                .map(|v| (what, v))
        }) {
            return Err(format!(
                "the {what} {v} is not a positive (normal f32) number"
            ));
        }
        if let Some(nope) = &self.nope_layers
            && nope.len() != self.layers
        {
            return Err(format!(
                "{} layers are marked with or without RoPE, but the model has {}",
                nope.len(),
                self.layers
            ));
        }
        if let Some(experts) = &self.experts {
            self.validate_experts(experts)?;
        }
        if let Some(local) = &self.local_attention {
            if self.sliding_window.is_some() {
                return Err(
                    "a model attends through a sliding window in every layer or in some, not both"
                        .into(),
                );
            }
            if local.window == 0 {
                return Err("the local attention's window is 0".into());
            }
            if local.layers.len() != self.layers {
                return Err(format!(
                    "the local attention names {} layers, but the model has {}",
                    local.layers.len(),
                    self.layers
                ));
            }
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Checks latent attention's widths: a cache of one KV head of `kv_rank + rope`
    /// features with RoPE over `rope` of them, every width positive, and no biases or q/k
    /// norms of the plain projections.
    fn validate_latent(&self, latent: &LatentAttention) -> Result<(), String> {
        let LatentAttention {
            q_rank,
            kv_rank,
            nope,
            rope,
            value,
            norm_eps,
        } = *latent;
        if !(norm_eps.is_finite() && norm_eps > 0.0) {
            return Err(format!(
                "latent attention's norms' epsilon {norm_eps} is not positive"
            ));
        }
        if [kv_rank, nope, rope, value].contains(&0) || q_rank == Some(0) {
            return Err(format!(
                "latent attention of zero width: {latent:?} (its ranks and widths must be positive)"
            ));
        }
        let cached = kv_rank.checked_add(rope);
        if cached != self.explicit_head_dim || self.rotary_dim != Some(rope) {
            return Err(format!(
                "latent attention caches {kv_rank} + {rope} values with RoPE over {rope}, not {:?} with RoPE over {:?}",
                self.explicit_head_dim, self.rotary_dim
            ));
        }
        if self.kv_heads != 1 {
            return Err(format!(
                "latent attention caches one latent a token (one KV head), not {}",
                self.kv_heads
            ));
        }
        if self.qk_norm != QkNorm::None
            || self.attention_bias != AttentionBias::default()
            || self.clip_qkv.is_some()
        {
            return Err("latent attention takes no q/k norms, biases or clamps".into());
        }
        Ok(())
    }

    /// Checks a mixture-of-experts configuration: each token runs between one and all of
    /// the experts, each of some width, through a gated block (whose biases are the
    /// experts', [`Experts::biases`], not the dense blocks'), and the routing layers are
    /// listed for every layer.
    fn validate_experts(&self, experts: &Experts) -> Result<(), String> {
        if experts.per_token == 0 || experts.per_token > experts.count {
            return Err(format!(
                "each token runs {} of {} experts (the experts used a token, `num_experts_per_tok` or `expert_used_count`, must be 1 to the experts a layer)",
                experts.per_token, experts.count
            ));
        }
        if experts.hidden == 0 {
            return Err("the experts' hidden width is 0".into());
        }
        if experts.shared.is_some_and(|sh| sh.hidden == 0) {
            return Err("the shared expert's width is 0".into());
        }
        if experts.layers.len() != self.layers {
            return Err(format!(
                "{} layers are marked with or without experts, but the model has {}",
                experts.layers.len(),
                self.layers
            ));
        }
        if self.feed_forward != FeedForward::Gated || self.ffn_bias {
            return Err("experts are gated feed-forward blocks without biases".into());
        }
        if let Some(groups) = experts.groups {
            let ExpertGroups {
                count,
                chosen,
                scored_by,
            } = groups;
            let width = experts.count / count.max(1);
            if count == 0
                || !experts.count.is_multiple_of(count)
                || chosen == 0
                || chosen > count
                || scored_by == 0
                || scored_by > width
                || chosen * width < experts.per_token
            {
                return Err(format!(
                    "{} experts in {count} groups, {chosen} kept, each scored by its {scored_by} best, cannot give {} experts a token",
                    experts.count, experts.per_token
                ));
            }
        }
        if !(experts.scale.is_finite() && experts.scale > 0.0) {
            return Err(format!(
                "the experts' weights' scale {} is not positive",
                experts.scale
            ));
        }
        if let ExpertGlu::ClampedSwiglu { alpha, limit } = experts.glu
            && !(alpha.is_finite() && limit > 0.0 && limit.is_finite())
        {
            return Err(format!(
                "the experts' clamped SwiGLU needs a finite gain and a positive, finite limit, found {alpha} and {limit}"
            ));
        }
        Ok(())
    }
}

/// Token positions per KV-cache block used by the builder.
pub const BLOCK_SIZE: usize = 16;

/// Checks that the KV caches of the model `c` can be stored as `kv`: f32; f16 or bf16
/// (half the memory); or a GGUF block format (q8_0, q4_0, q4_1, q4_k, q6_k, q2_k) whose
/// blocks the model's heads fill, held as its blocks' bytes (q8_0 about 0.56 of f16's
/// memory, q4_0 0.31). nf4 and the affine formats are refused: a pool holds their values
/// as f32 (`docs/lowering.md`, "KV storage"), so they would save nothing.
pub fn check_kv_storage(c: &ModelConfig, kv: &KvStorage) -> Result<(), String> {
    match kv {
        KvStorage::Float(DType::F32 | DType::F16 | DType::BF16) => Ok(()),
        KvStorage::Quantized(format) if KvBlocks::of(format).is_some() => {
            let block = format.block_elems() as usize;
            if c.head_dim().is_multiple_of(block) {
                Ok(())
            } else {
                Err(format!(
                    "a {format} KV cache quantizes blocks of {block} values along each head, but the model's heads have {} values; use f32, f16 or bf16",
                    c.head_dim()
                ))
            }
        }
        other => Err(format!(
            "a KV cache of {other} is not supported; use f32, f16, bf16 or a block format (q8_0, q4_0, q4_1, q4_k, q6_k, q2_k)"
        )),
    }
}

/// The textual type of the model's KV cache stored as `kv` (block count left to the
/// runtime).
pub fn cache_type(c: &ModelConfig, kv: &KvStorage) -> String {
    let window = window_param(c);
    format!(
        "llm.paged_kv_cache <layers = {}, kv_heads = {}, head_dim = {}, block_size = {BLOCK_SIZE}, blocks = ?, dtype = {kv}{window}>",
        c.layers,
        c.kv_heads,
        c.head_dim()
    )
}

/// `, window = W` for a model with a sliding window of `W` (the cache type's and paged
/// attention's parameter), nothing otherwise.
fn window_param(c: &ModelConfig) -> String {
    c.sliding_window
        .map_or(String::new(), |w| format!(", window = {w}"))
}

fn float(v: f64) -> String {
    format!("{v:?}")
}

/// The attention weights of a layer of latent attention (under `p`), with their shapes.
fn latent_weight_shapes(
    c: &ModelConfig,
    latent: &LatentAttention,
    p: &str,
) -> Vec<(String, Vec<usize>)> {
    let (d, h, rank) = (c.dim, c.heads, latent.kv_rank);
    let q_width = h * (latent.nope + latent.rope);
    let mut out = match latent.q_rank {
        Some(q_rank) => vec![
            (format!("{p}{LATENT_Q_DOWN}"), vec![q_rank, d]),
            (format!("{p}{LATENT_Q_NORM}"), vec![q_rank]),
            (format!("{p}{LATENT_Q_UP}"), vec![q_width, q_rank]),
        ],
        None => vec![(format!("{p}attention.wq.weight"), vec![q_width, d])],
    };
    out.extend([
        (format!("{p}{LATENT_KV_DOWN}"), vec![rank + latent.rope, d]),
        (format!("{p}{LATENT_KV_NORM}"), vec![rank]),
        (format!("{p}{LATENT_K_UP}"), vec![h, rank, latent.nope]),
        (format!("{p}{LATENT_V_UP}"), vec![h, latent.value, rank]),
        (format!("{p}attention.wo.weight"), vec![d, h * latent.value]),
    ]);
    out
}

/// The weights a model of `c` needs, with their shapes.
pub fn weight_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd, kvd, v, qd) = (c.dim, c.hidden_dim, c.kv_dim(), c.vocab, c.q_dim());
    let mut out = vec![("tok_embeddings.weight".to_string(), vec![v, d])];
    if c.learned_positions {
        out.push((POSITION_EMBEDDINGS.to_string(), vec![c.seq_len, d]));
    }
    for l in 0..c.layers {
        let p = format!("layers.{l}.");
        match &c.latent_attention {
            Some(latent) => out.extend(latent_weight_shapes(c, latent, &p)),
            None => out.extend([
                (format!("{p}attention.wq.weight"), vec![qd, d]),
                (format!("{p}attention.wk.weight"), vec![kvd, d]),
                (format!("{p}attention.wv.weight"), vec![kvd, d]),
                (format!("{p}attention.wo.weight"), vec![d, qd]),
            ]),
        }
        match c.experts.as_ref().filter(|x| x.routes(l)) {
            Some(x) => {
                out.extend([
                    (format!("{p}{ROUTER}"), vec![x.count, d]),
                    (format!("{p}{EXPERT_GATES}"), vec![x.count, x.hidden, d]),
                    (format!("{p}{EXPERT_UPS}"), vec![x.count, x.hidden, d]),
                    (format!("{p}{EXPERT_DOWNS}"), vec![x.count, d, x.hidden]),
                ]);
                if x.scoring
                    == (ExpertScoring::Sigmoid {
                        selection_bias: true,
                    })
                {
                    out.push((format!("{p}{ROUTER_SELECTION_BIAS}"), vec![x.count]));
                }
                if x.biases {
                    out.extend([
                        (format!("{p}{ROUTER_BIAS}"), vec![x.count]),
                        (format!("{p}{EXPERT_GATE_BIASES}"), vec![x.count, x.hidden]),
                        (format!("{p}{EXPERT_UP_BIASES}"), vec![x.count, x.hidden]),
                        (format!("{p}{EXPERT_DOWN_BIASES}"), vec![x.count, d]),
                    ]);
                }
                if let Some(sh) = x.shared {
                    out.extend([
                        (format!("{p}{SHARED_EXPERT_GATE}"), vec![sh.hidden, d]),
                        (format!("{p}{SHARED_EXPERT_UP}"), vec![sh.hidden, d]),
                        (format!("{p}{SHARED_EXPERT_DOWN}"), vec![d, sh.hidden]),
                    ]);
                    if sh.gated {
                        out.push((format!("{p}{SHARED_GATE}"), vec![1, d]));
                    }
                }
            }
            None => out.extend([
                (format!("{p}feed_forward.w2.weight"), vec![d, hd]),
                (format!("{p}feed_forward.w3.weight"), vec![hd, d]),
            ]),
        }
        let gated = c.feed_forward == FeedForward::Gated;
        let dense = !c.experts.as_ref().is_some_and(|x| x.routes(l));
        if gated && dense {
            out.push((format!("{p}feed_forward.w1.weight"), vec![hd, d]));
        }
        if c.ffn_bias {
            out.extend([
                (format!("{p}feed_forward.w2.bias"), vec![d]),
                (format!("{p}feed_forward.w3.bias"), vec![hd]),
            ]);
            if gated {
                out.push((format!("{p}feed_forward.w1.bias"), vec![hd]));
            }
        }
        if c.pre_norms {
            out.extend(norm_weights(c, &format!("{p}attention_norm")));
            if c.blocks != Blocks::ParallelSharedNorm {
                out.extend(norm_weights(c, &format!("{p}ffn_norm")));
            }
        }
        if c.post_norms {
            out.extend([
                (format!("{p}{POST_ATTENTION_NORM}"), vec![d]),
                (format!("{p}{POST_FFW_NORM}"), vec![d]),
            ]);
        }
        let (q_norm, k_norm) = match c.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::Heads => (Some(vec![c.head_dim()]), Some(vec![c.head_dim()])),
            QkNorm::Projections => (Some(vec![qd]), Some(vec![kvd])),
            QkNorm::LayerHeads => (
                Some(vec![c.heads, c.head_dim()]),
                Some(vec![c.kv_heads, c.head_dim()]),
            ),
        };
        out.extend(q_norm.map(|n| (format!("{p}attention.q_norm.weight"), n)));
        out.extend(k_norm.map(|n| (format!("{p}attention.k_norm.weight"), n)));
        if c.attention_bias.qkv {
            out.extend([
                (format!("{p}attention.wq.bias"), vec![qd]),
                (format!("{p}attention.wk.bias"), vec![kvd]),
                (format!("{p}attention.wv.bias"), vec![kvd]),
            ]);
        }
        if c.attention_bias.output {
            out.push((format!("{p}attention.wo.bias"), vec![d]));
        }
        if c.attention_sinks {
            out.push((format!("{p}{ATTENTION_SINKS}"), vec![c.heads]));
        }
    }
    out.extend(norm_weights(c, "norm"));
    if c.rope_freq_factors {
        out.push((ROPE_FREQS.to_string(), vec![c.rotary() / 2]));
    }
    if !c.tied_classifier {
        out.push(("output.weight".to_string(), vec![v, d]));
    }
    if c.classifier_bias {
        out.push(("output.bias".to_string(), vec![v]));
    }
    out
}

/// The weights of the input or final norm `stem` (`layers.N.attention_norm`, ...):
/// `stem.weight`, and `stem.bias` where the norms have biases ([`Norm::BiasedLayer`]).
fn norm_weights(c: &ModelConfig, stem: &str) -> Vec<(String, Vec<usize>)> {
    let weight = (format!("{stem}.weight"), vec![c.dim]);
    match c.norm {
        Norm::Unit => Vec::new(),
        Norm::BiasedLayer => vec![weight, (format!("{stem}.bias"), vec![c.dim])],
        Norm::Rms | Norm::Layer => vec![weight],
    }
}

/// The fused matrices some checkpoints store (Phi-3's), under the builder's names: per
/// layer `attention.wqkv.weight` (the q, k and v rows, in that order) and
/// `feed_forward.w13.weight` (the gate's rows, then the up projection's).
pub const FUSED_QKV: &str = "attention.wqkv.weight";

/// See [`FUSED_QKV`].
pub const FUSED_GATE_UP: &str = "feed_forward.w13.weight";

/// The fused q, k and v biases beside a [`FUSED_QKV`] matrix (Phi-2's GGUF files of its
/// original checkpoint's `Wqkv`).
pub const FUSED_QKV_BIAS: &str = "attention.wqkv.bias";

/// Splits every layer's fused matrices ([`FUSED_QKV`], [`FUSED_GATE_UP`]) and biases
/// ([`FUSED_QKV_BIAS`]) of `weights` into the separate weights the builder reads; a model
/// without them is left as it is.
pub fn split_fused_weights(c: &ModelConfig, weights: &mut Weights) -> Result<(), String> {
    let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.hidden_dim);
    for l in 0..c.layers {
        let p = format!("layers.{l}.");
        let part = |name: &str, rows: usize| (format!("{p}{name}"), rows);
        for (fused, kind) in [(FUSED_QKV, "weight"), (FUSED_QKV_BIAS, "bias")] {
            weights.split_rows(
                &format!("{p}{fused}"),
                &[
                    part(&format!("attention.wq.{kind}"), qd),
                    part(&format!("attention.wk.{kind}"), kvd),
                    part(&format!("attention.wv.{kind}"), kvd),
                ],
            )?;
        }
        weights.split_rows(
            &format!("{p}{FUSED_GATE_UP}"),
            &[
                part("feed_forward.w1.weight", hd),
                part("feed_forward.w3.weight", hd),
            ],
        )?;
    }
    Ok(())
}

/// Checks that `weights` can hold a model of `c`'s layer count: every layer has tensors
/// of its own, so a file that claims more layers than it holds tensors (a lying or
/// corrupted count) is refused before anything walks its layers.
pub fn check_layer_count(c: &ModelConfig, weights: &Weights) -> Result<(), String> {
    let tensors = weights.names().len();
    if c.layers > tensors {
        return Err(format!(
            "the model has {} layers, but its files hold {tensors} tensors",
            c.layers
        ));
    }
    Ok(())
}

/// Checks that `weights` holds every weight of `c` with the right shape.
pub fn check_weights(c: &ModelConfig, weights: &Weights) -> Result<(), String> {
    check_shapes(&weight_shapes(c), weights)
}

/// Checks that `weights` holds each of `shapes` (a name and its shape).
fn check_shapes(shapes: &[(String, Vec<usize>)], weights: &Weights) -> Result<(), String> {
    for (name, shape) in shapes {
        match weights.weight_shape(name) {
            Some(s) if s == *shape => {}
            Some(s) => {
                return Err(format!(
                    "weight `{name}` has shape {s:?}, expected {shape:?}"
                ));
            }
            None => return Err(format!("the model has no weight `{name}`")),
        }
    }
    Ok(())
}

/// Checks that a loaded model of `c` reads every weight of `weights`, besides
/// [`check_weights`]: a file's tensor the configuration has no use for (Command R+'s
/// per-head q/k norms in a model without them, say) would otherwise be dropped and another
/// model computed than the file describes.
///
/// # Errors
///
/// The first weight not read, by name.
pub fn check_every_weight_read(c: &ModelConfig, weights: &Weights) -> Result<(), String> {
    let shapes = weight_shapes(c);
    check_shapes(&shapes, weights)?;
    let read: std::collections::HashSet<String> =
        shapes.into_iter().map(|(name, _)| name).collect();
    match weights
        .names()
        .into_iter()
        .find(|name| !read.contains(*name))
    {
        Some(name) => Err(format!(
            "weight `{name}` is not part of this model's configuration"
        )),
        None => Ok(()),
    }
}

/// The `f32` reciprocal of `s` (as `f64`): how a division by `s` in `f32` becomes the
/// multiplication the builder writes.
pub fn reciprocal(s: f64) -> f64 {
    f64::from(1.0 / s as f32)
}

/// The layers of `layers` that take no RoPE where every `interval`-th does not (the
/// `interval`-th, twice that and so on: SmolLM3's NoPE layers).
pub fn every_nth_layer(layers: usize, interval: usize) -> Vec<bool> {
    (0..layers)
        .map(|l| (l + 1) % interval.max(1) == 0)
        .collect()
}

/// Writes the module `@model` with the functions `@prefill` and `@decode` for `c` over the
/// weights in `weights` (whose stored types the IR declares), with a KV cache of `kv`
/// storage ([`check_kv_storage`]).
pub fn build_ir(c: &ModelConfig, weights: &Weights, kv: &KvStorage) -> Result<String, String> {
    c.validate()?;
    check_weights(c, weights)?;
    check_kv_storage(c, kv)?;
    let mut out = String::new();
    let _ = writeln!(out, "builtin.module @model {{");
    let _ = writeln!(out, "  ^entry():");
    // Ops of a block are separated by `;`.
    out.push_str(forward_func(c, weights, kv, "prefill", "1x?").trim_end());
    out.push_str(";\n");
    out.push_str(&forward_func(c, weights, kv, "decode", "?x1"));
    let _ = writeln!(out, "}}");
    Ok(out)
}

/// Writes the ops of one function body.
struct Emitter<'a> {
    text: String,
    weights: &'a Weights,
}

impl Emitter<'_> {
    fn op(&mut self, text: String) {
        let _ = writeln!(self.text, "        {text};");
    }

    /// Declares weight `name` as value `value` with its stored type.
    fn weight(&mut self, value: &str, name: &str) {
        let ty = self.weights.ir_type(name).unwrap_or_default();
        self.op(format!("{value} = llm.weight {{name = \"{name}\"}} : {ty}"));
    }

    /// Declares weight `name` and returns a value a kernel reads it from as stored: a
    /// quantized weight as it is, a float one as `f32` (cast from 16 bits).
    fn stored_weight(&mut self, value: &str, name: &str) -> String {
        match self.weights.weight(name).as_deref() {
            Some(Value::Quantized(_)) => {
                self.weight(value, name);
                value.to_string()
            }
            _ => self.weight_f32(value, name),
        }
    }

    /// Declares weight `name` and returns a value holding it as f32 (cast or dequantized).
    fn weight_f32(&mut self, value: &str, name: &str) -> String {
        self.weight(value, name);
        let shape = self.weights.weight_shape(name).unwrap_or_default();
        let f32_ty = format!(
            "llm.tensor <{}xf32>",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join("x")
        );
        match self.weights.weight(name).as_deref() {
            Some(Value::Quantized(_)) => {
                self.op(format!("{value}_f32 = llm.dequantize {value} : {f32_ty}"));
                format!("{value}_f32")
            }
            Some(Value::Tensor(t)) if t.dtype != DType::F32 => {
                self.op(format!("{value}_f32 = llm.cast {value} : {f32_ty}"));
                format!("{value}_f32")
            }
            _ => value.to_string(),
        }
    }
}

impl Emitter<'_> {
    /// The value of `product` plus the bias weight `bias` (broadcast over the rows), or
    /// `product` itself without one.
    fn add_bias(&mut self, product: &str, bias: Option<&str>, ty: &str) -> String {
        let Some(name) = bias else {
            return product.to_string();
        };
        let bias = self.weight_f32(&format!("{product}_bias"), name);
        self.op(format!(
            "{product}_biased = llm.add {product}, {bias} : {ty}"
        ));
        format!("{product}_biased")
    }
}

/// How one layer attends: its RoPE's parameters and extra paged-attention parameters.
struct LayerAttention {
    /// `llm.rope`'s parameters.
    rope: String,
    /// The layer's RoPE has its own base ([`LocalAttention::rope_theta`]): no frequency
    /// factors, position scaling or attention factor.
    own_rope: bool,
    /// `, window = W, scale = S, softcap = C` as the model has them.
    params: String,
    /// The layer takes no RoPE ([`ModelConfig::nope_layers`]).
    nope: bool,
}

impl LayerAttention {
    /// How layer `l` of `c` attends.
    fn of(c: &ModelConfig, l: usize) -> LayerAttention {
        let local = c.local_attention.as_ref().filter(|local| local.is_local(l));
        let own_theta = local.and_then(|local| local.rope_theta);
        let layout = if c.rope_half { "half" } else { "interleaved" };
        let theta = own_theta.unwrap_or(c.rope_theta);
        let mut rope = format!("theta = {}, layout = {layout}", float(theta));
        if c.rope_scaling != 1.0 && own_theta.is_none() {
            let _ = write!(rope, ", scaling = {}", float(c.rope_scaling));
        }
        if let Some(rotary) = c.rotary_dim.filter(|&r| r != c.head_dim()) {
            let _ = write!(rope, ", rotary_dim = {rotary}");
        }
        if c.rope_mscale != 1.0 && own_theta.is_none() {
            let _ = write!(rope, ", mscale = {}", float(c.rope_mscale));
        }
        let mut params = match local {
            Some(local) => format!(", window = {}", local.window),
            None => window_param(c),
        };
        if let Some(scale) = c.attention_scale {
            let _ = write!(params, ", scale = {}", float(scale));
        }
        if let Some(cap) = c.attention_softcap {
            let _ = write!(params, ", softcap = {}", float(cap));
        }
        LayerAttention {
            rope,
            own_rope: own_theta.is_some(),
            params,
            nope: c.learned_positions
                || c.nope_layers
                    .as_ref()
                    .is_some_and(|nope| nope.get(l).copied().unwrap_or(false)),
        }
    }
}

impl Emitter<'_> {
    /// `value` through the RMSNorm of weight `norm` where the model has sandwich norms
    /// ([`ModelConfig::post_norms`]), else `value` itself.
    fn post_norm(&mut self, c: &ModelConfig, value: &str, norm: &str, ty: &str) -> String {
        if !c.post_norms {
            return value.to_string();
        }
        let w = self.weight_f32(&format!("{value}_norm_w"), norm);
        self.op(format!(
            "{value}_normed = llm.rms_norm {value}, {w} {{eps = {}}} : {ty}",
            float(c.norm_eps)
        ));
        format!("{value}_normed")
    }

    /// `value` (`[?, dim]`) through the norm `stem` (its weights `stem.weight` and, where
    /// it has one, `stem.bias`) as `result`, of the model's kind ([`ModelConfig::norm`]; a
    /// LayerNorm without bias adds the function's `zero_bias`, one without weight scales by
    /// its `unit_weight`).
    fn input_norm(&mut self, c: &ModelConfig, value: &str, result: &str, stem: &str) -> String {
        let w = match c.norm {
            Norm::Unit => "unit_weight".to_string(),
            _ => self.weight_f32(&format!("{result}_w"), &format!("{stem}.weight")),
        };
        let ty = format!("llm.tensor <?x{}xf32>", c.dim);
        let eps = float(c.norm_eps);
        let bias = match c.norm {
            Norm::Rms => None,
            Norm::Layer | Norm::Unit => Some("zero_bias".to_string()),
            Norm::BiasedLayer => {
                Some(self.weight_f32(&format!("{result}_b"), &format!("{stem}.bias")))
            }
        };
        match bias {
            Some(b) => self.op(format!(
                "{result} = llm.layer_norm {value}, {w}, {b} {{eps = {eps}}} : {ty}"
            )),
            None => self.op(format!(
                "{result} = llm.rms_norm {value}, {w} {{eps = {eps}}} : {ty}"
            )),
        }
        result.to_string()
    }

    /// `input` through the projection `weight` (`[n, k]`, transposed) as `result` of type
    /// `ty`, plus the bias beside it (`.bias` for `.weight`) where `bias`.
    fn projection(
        &mut self,
        input: &str,
        result: &str,
        weight: &str,
        bias: bool,
        ty: &str,
    ) -> String {
        let w = self.weight_f32(&format!("{result}_w"), weight);
        self.op(format!(
            "{result} = llm.matmul {input}, {w} {{transpose_rhs = true}} : {ty}"
        ));
        let bias_name = weight.replace(".weight", ".bias");
        self.add_bias(result, bias.then_some(bias_name.as_str()), ty)
    }

    /// `value` through `activation` as `result`: one op, or exact GELU's
    /// `0.5 * x * (1 + erf(x / sqrt(2)))` of `llm.erf` and arithmetic (the division a
    /// multiplication by the `f32` reciprocal), which the `fuse` pass makes one kernel.
    fn activation(
        &mut self,
        activation: Activation,
        value: &str,
        result: &str,
        ty: &str,
    ) -> String {
        let op = match activation {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu",
            Activation::Relu => "relu",
            Activation::Gelu => {
                let scalar = "llm.tensor <1xf32>";
                let constants = [
                    ("inv_sqrt2", std::f64::consts::FRAC_1_SQRT_2),
                    ("one", 1.0),
                    ("half", 0.5),
                ];
                for (name, v) in constants {
                    self.op(format!(
                        "{result}_{name} = llm.constant {{value = {}}} : {scalar}",
                        float(f64::from(v as f32))
                    ));
                }
                self.op(format!(
                    "{result}_x = llm.mul {value}, {result}_inv_sqrt2 : {ty}"
                ));
                self.op(format!("{result}_erf = llm.erf {result}_x : {ty}"));
                self.op(format!(
                    "{result}_1p = llm.add {result}_erf, {result}_one : {ty}"
                ));
                self.op(format!(
                    "{result}_hx = llm.mul {value}, {result}_half : {ty}"
                ));
                self.op(format!(
                    "{result} = llm.mul {result}_hx, {result}_1p : {ty}"
                ));
                return result.to_string();
            }
        };
        self.op(format!("{result} = llm.{op} {value} : {ty}"));
        result.to_string()
    }

    /// `value` times `scale` (an `f32` constant) where there is one, else `value` itself.
    fn scaled(&mut self, value: &str, scale: Option<f64>, ty: &str) -> String {
        let Some(scale) = scale else {
            return value.to_string();
        };
        self.op(format!(
            "{value}_scale = llm.constant {{value = {}}} : llm.tensor <1xf32>",
            float(scale)
        ));
        self.op(format!(
            "{value}_scaled = llm.mul {value}, {value}_scale : {ty}"
        ));
        format!("{value}_scaled")
    }

    /// `value` clamped to `[-bound, bound]` (PyTorch's `clamp`: a NaN stays NaN), as
    /// `llm.minimum` of `llm.maximum`.
    fn clamped(&mut self, value: &str, bound: f64, ty: &str) -> String {
        let scalar = "llm.tensor <1xf32>";
        self.op(format!(
            "{value}_lo = llm.constant {{value = {}}} : {scalar}",
            float(-bound)
        ));
        self.op(format!(
            "{value}_hi = llm.constant {{value = {}}} : {scalar}",
            float(bound)
        ));
        self.op(format!(
            "{value}_above = llm.maximum {value}, {value}_lo : {ty}"
        ));
        self.op(format!(
            "{value}_clamped = llm.minimum {value}_above, {value}_hi : {ty}"
        ));
        format!("{value}_clamped")
    }

    /// `cap * tanh(value / cap)` (Hugging Face's soft-capping, dividing by `cap` as a
    /// multiplication by its `f32` reciprocal).
    fn soft_cap(&mut self, value: &str, cap: f64, ty: &str) -> String {
        let scalar = "llm.tensor <1xf32>";
        self.op(format!(
            "{value}_inv_cap = llm.constant {{value = {}}} : {scalar}",
            float(reciprocal(cap))
        ));
        self.op(format!(
            "{value}_cap = llm.constant {{value = {}}} : {scalar}",
            float(cap)
        ));
        self.op(format!(
            "{value}_scaled = llm.mul {value}, {value}_inv_cap : {ty}"
        ));
        self.op(format!("{value}_tanh = llm.tanh {value}_scaled : {ty}"));
        self.op(format!(
            "{value}_capped = llm.mul {value}_tanh, {value}_cap : {ty}"
        ));
        format!("{value}_capped")
    }
}

impl Emitter<'_> {
    /// Layer `l`'s dense feed-forward block over `input`: its down projection's value.
    fn dense_feed_forward(&mut self, c: &ModelConfig, input: &str, l: usize) -> String {
        let block = DenseBlock {
            stem: format!("layers.{l}.feed_forward"),
            hidden: c.hidden_dim,
            tag: l.to_string(),
        };
        self.feed_forward_block(c, input, &block)
    }

    /// The feed-forward block `block` over `input` (gated or not as `c` says, the
    /// activation and biases `c`'s): its down projection's value.
    fn feed_forward_block(&mut self, c: &ModelConfig, input: &str, block: &DenseBlock) -> String {
        let (act, hid) = (
            format!("llm.tensor <?x{}xf32>", c.dim),
            format!("llm.tensor <?x{}xf32>", block.hidden),
        );
        let DenseBlock { stem, tag, .. } = block;
        let ffn = |w: &str| format!("{stem}.{w}.weight");
        let up = self.projection(input, &format!("up_{tag}"), &ffn("w3"), c.ffn_bias, &hid);
        let hidden = match c.feed_forward {
            FeedForward::Gated => {
                let gate =
                    self.projection(input, &format!("gate_{tag}"), &ffn("w1"), c.ffn_bias, &hid);
                let act = self.activation(c.activation, &gate, &format!("act_{tag}"), &hid);
                self.op(format!("glu_{tag} = llm.mul {act}, {up} : {hid}"));
                format!("glu_{tag}")
            }
            FeedForward::Ungated => self.activation(c.activation, &up, &format!("act_{tag}"), &hid),
        };
        self.projection(
            &hidden,
            &format!("down_{tag}"),
            &ffn("w2"),
            c.ffn_bias,
            &act,
        )
    }

    /// Layer `l`'s shared expert `expert` over `input` (a gated block under
    /// [`SHARED_EXPERT`]), where it is gated scaled by the sigmoid of `input`'s product
    /// with [`SHARED_GATE`], added to the routed experts' sum `mixed`: the sum's value.
    fn shared_expert(
        &mut self,
        c: &ModelConfig,
        input: &str,
        mixed: &str,
        l: usize,
        expert: SharedExpert,
    ) -> String {
        let p = format!("layers.{l}.");
        let block = DenseBlock {
            stem: format!("{p}{SHARED_EXPERT}"),
            hidden: expert.hidden,
            tag: format!("shared_{l}"),
        };
        let mut shared = self.feed_forward_block(c, input, &block);
        let (act, one) = (
            format!("llm.tensor <?x{}xf32>", c.dim),
            "llm.tensor <?x1xf32>".to_string(),
        );
        if expert.gated {
            let gate = self.weight_f32(&format!("shared_gate_{l}_w"), &format!("{p}{SHARED_GATE}"));
            self.op(format!(
                "shared_logit_{l} = llm.matmul {input}, {gate} {{transpose_rhs = true}} : {one}"
            ));
            self.op(format!(
                "shared_scale_{l} = llm.sigmoid shared_logit_{l} : {one}"
            ));
            self.op(format!(
                "shared_out_{l} = llm.mul {shared}, shared_scale_{l} : {act}"
            ));
            shared = format!("shared_out_{l}");
        }
        self.op(format!("moe_{l} = llm.add {mixed}, {shared} : {act}"));
        format!("moe_{l}")
    }

    /// Layer `l`'s mixture of `experts` over `input`: the router's logits, the chosen
    /// experts (`llm.topk`) and their weights ([`Emitter::routing`]), each
    /// chosen expert's gated block (`llm.expert_matmul`), and the weighted sum of their
    /// outputs (a batched `[1, k] x [k, dim]` product per token). Returns the sum's value.
    fn experts(&mut self, c: &ModelConfig, experts: &Experts, input: &str, l: usize) -> String {
        let (d, k, count, eh) = (c.dim, experts.per_token, experts.count, experts.hidden);
        let t = |shape: String| format!("llm.tensor <{shape}>");
        let p = format!("layers.{l}.");
        let router = self.weight_f32(&format!("router_{l}_w"), &format!("{p}{ROUTER}"));
        let logits_ty = t(format!("?x{count}xf32"));
        self.op(format!(
            "router_{l} = llm.matmul {input}, {router} {{transpose_rhs = true}} : {logits_ty}"
        ));
        let bias = |name: &str| experts.biases.then(|| format!("{p}{name}"));
        let logits = self.add_bias(
            &format!("router_{l}"),
            bias(ROUTER_BIAS).as_deref(),
            &logits_ty,
        );
        let route = self.routing(experts, &logits, l);
        let slots_hid = t(format!("?x{k}x{eh}xf32"));
        let slots_act = t(format!("?x{k}x{d}xf32"));
        // Each chosen expert's product, plus its row of the stacked biases where the
        // experts have them (gathered by the ids as embedding rows).
        let expert_product =
            |e: &mut Self, x: &str, result: &str, [name, bias]: [&str; 2], ty: &str| {
                let w = e.stored_weight(&format!("{result}_w"), &format!("{p}{name}"));
                e.op(format!(
                    "{result} = llm.expert_matmul {x}, {w}, ids_{l} : {ty}"
                ));
                if !experts.biases {
                    return result.to_string();
                }
                let table = e.weight_f32(&format!("{result}_bias_table"), &format!("{p}{bias}"));
                e.op(format!(
                    "{result}_bias = llm.embedding {table}, ids_{l} : {ty}"
                ));
                e.op(format!(
                    "{result}_biased = llm.add {result}, {result}_bias : {ty}"
                ));
                format!("{result}_biased")
            };
        let gate = expert_product(
            self,
            input,
            &format!("egate_{l}"),
            [EXPERT_GATES, EXPERT_GATE_BIASES],
            &slots_hid,
        );
        let up = expert_product(
            self,
            input,
            &format!("eup_{l}"),
            [EXPERT_UPS, EXPERT_UP_BIASES],
            &slots_hid,
        );
        let glu = self.expert_glu(c, experts.glu, [&gate, &up], l, &slots_hid);
        let down = expert_product(
            self,
            &glu,
            &format!("edown_{l}"),
            [EXPERT_DOWNS, EXPERT_DOWN_BIASES],
            &slots_act,
        );
        self.op(format!(
            "route3_{l} = llm.reshape {route} : {}",
            t(format!("?x1x{k}xf32"))
        ));
        self.op(format!(
            "mixed3_{l} = llm.matmul route3_{l}, {down} : {}",
            t(format!("?x1x{d}xf32"))
        ));
        self.op(format!(
            "mixed_{l} = llm.reshape mixed3_{l} : {}",
            t(format!("?x{d}xf32"))
        ));
        match experts.shared {
            Some(shared) => self.shared_expert(c, input, &format!("mixed_{l}"), l, shared),
            None => format!("mixed_{l}"),
        }
    }
}

impl Emitter<'_> {
    /// Layer `l`'s routing of its tokens by the router's `logits`: the chosen experts'
    /// ids (`ids_{l}`) and the value of their weights, as [`Experts::scoring`],
    /// [`Experts::groups`], [`Experts::normalize`] and [`Experts::scale`] say.
    fn routing(&mut self, experts: &Experts, logits: &str, l: usize) -> String {
        let (k, count) = (experts.per_token, experts.count);
        let t = |shape: String| format!("llm.tensor <{shape}>");
        let (logits_ty, top_ty, ids_ty) = (
            t(format!("?x{count}xf32")),
            t(format!("?x{k}xf32")),
            t(format!("?x{k}xi32")),
        );
        let choose = |e: &mut Self, scores: &str, top: &str| {
            let scores = match &experts.groups {
                Some(groups) => e.grouped(scores, count, groups, l),
                None => scores.to_string(),
            };
            e.op(format!(
                "{top}, ids_{l} = llm.topk {scores} {{k = {k}}} : {top_ty}, {ids_ty}"
            ));
        };
        let route = match experts.scoring {
            ExpertScoring::Softmax if experts.normalize => {
                choose(self, logits, &format!("top_{l}"));
                self.op(format!(
                    "route_{l} = llm.softmax top_{l} {{axis = -1}} : {top_ty}"
                ));
                format!("route_{l}")
            }
            ExpertScoring::Softmax => {
                self.op(format!(
                    "probs_{l} = llm.softmax {logits} {{axis = -1}} : {logits_ty}"
                ));
                choose(self, &format!("probs_{l}"), &format!("route_{l}"));
                format!("route_{l}")
            }
            ExpertScoring::Sigmoid { selection_bias } => {
                self.op(format!("probs_{l} = llm.sigmoid {logits} : {logits_ty}"));
                if !selection_bias {
                    choose(self, &format!("probs_{l}"), &format!("route_{l}"));
                } else {
                    // Chosen by the biased scores, weighted by the scores themselves:
                    // the chosen biased scores less the chosen experts' biases.
                    let p = format!("layers.{l}.");
                    let bias = self.weight_f32(
                        &format!("sel_bias_{l}"),
                        &format!("{p}{ROUTER_SELECTION_BIAS}"),
                    );
                    self.op(format!(
                        "choice_{l} = llm.add probs_{l}, {bias} : {logits_ty}"
                    ));
                    choose(self, &format!("choice_{l}"), &format!("top_{l}"));
                    self.op(format!(
                        "sel_table_{l} = llm.reshape {bias} : {}",
                        t(format!("{count}x1xf32"))
                    ));
                    self.op(format!(
                        "sel_rows_{l} = llm.embedding sel_table_{l}, ids_{l} : {}",
                        t(format!("?x{k}x1xf32"))
                    ));
                    self.op(format!("sel_{l} = llm.reshape sel_rows_{l} : {top_ty}"));
                    self.op(format!("route_{l} = llm.sub top_{l}, sel_{l} : {top_ty}"));
                }
                if experts.normalize {
                    // Divided by their sum (and 1e-20, as DeepSeek V3's router adds).
                    let one = t("?x1xf32".into());
                    self.op(format!(
                        "route_ones_{l} = llm.constant {{value = 1.0}} : {}",
                        t(format!("{k}x1xf32"))
                    ));
                    self.op(format!(
                        "route_sum_{l} = llm.matmul route_{l}, route_ones_{l} : {one}"
                    ));
                    self.op(format!(
                        "route_tiny_{l} = llm.constant {{value = 1e-20}} : {}",
                        t("1xf32".into())
                    ));
                    self.op(format!(
                        "route_den_{l} = llm.add route_sum_{l}, route_tiny_{l} : {one}"
                    ));
                    self.op(format!(
                        "route_norm_{l} = llm.div route_{l}, route_den_{l} : {top_ty}"
                    ));
                    format!("route_norm_{l}")
                } else {
                    format!("route_{l}")
                }
            }
        };
        self.scaled(
            &route,
            (experts.scale != 1.0).then_some(experts.scale),
            &top_ty,
        )
    }

    /// `scores` (`[tokens, count]`) with the experts outside each token's chosen groups
    /// pushed 1e30 down, so that no top-k of as many experts as the chosen groups hold
    /// picks them: the experts are `groups.count` groups in order, each scored by the sum
    /// of its `groups.scored_by` highest scores, and the `groups.chosen` highest-scored
    /// groups are kept (a one-hot row of each from an identity table, summed into a mask).
    fn grouped(&mut self, scores: &str, count: usize, groups: &ExpertGroups, l: usize) -> String {
        let t = |shape: String| format!("llm.tensor <{shape}>");
        let ExpertGroups {
            count: g,
            chosen,
            scored_by: s,
        } = *groups;
        let width = count / g;
        self.op(format!(
            "grp_{l} = llm.reshape {scores} : {}",
            t(format!("?x{g}x{width}xf32"))
        ));
        self.op(format!(
            "grp_top_{l}, grp_top_ids_{l} = llm.topk grp_{l} {{k = {s}}} : {}, {}",
            t(format!("?x{g}x{s}xf32")),
            t(format!("?x{g}x{s}xi32"))
        ));
        let group_ty = t(format!("?x{g}x1xf32"));
        self.op(format!(
            "grp_sum0_{l} = llm.slice grp_top_{l} {{starts = [0, 0, 0]}} : {group_ty}"
        ));
        for i in 1..s {
            self.op(format!(
                "grp_part{i}_{l} = llm.slice grp_top_{l} {{starts = [0, 0, {i}]}} : {group_ty}"
            ));
            self.op(format!(
                "grp_sum{i}_{l} = llm.add grp_sum{}_{l}, grp_part{i}_{l} : {group_ty}",
                i - 1
            ));
        }
        self.op(format!(
            "grp_score_{l} = llm.reshape grp_sum{}_{l} : {}",
            s - 1,
            t(format!("?x{g}xf32"))
        ));
        self.op(format!(
            "grp_kept_{l}, grp_ids_{l} = llm.topk grp_score_{l} {{k = {chosen}}} : {}, {}",
            t(format!("?x{chosen}xf32")),
            t(format!("?x{chosen}xi32"))
        ));
        let identity: Vec<String> = (0..g * g)
            .map(|i| if i / g == i % g { "1.0" } else { "0.0" }.to_string())
            .collect();
        self.op(format!(
            "grp_eye_{l} = llm.constant {{value = [{}]}} : {}",
            identity.join(", "),
            t(format!("{g}x{g}xf32"))
        ));
        self.op(format!(
            "grp_hot_{l} = llm.embedding grp_eye_{l}, grp_ids_{l} : {}",
            t(format!("?x{chosen}x{g}xf32"))
        ));
        let mask_ty = t(format!("?x1x{g}xf32"));
        self.op(format!(
            "grp_mask0_{l} = llm.slice grp_hot_{l} {{starts = [0, 0, 0]}} : {mask_ty}"
        ));
        for i in 1..chosen {
            self.op(format!(
                "grp_hot{i}_{l} = llm.slice grp_hot_{l} {{starts = [0, {i}, 0]}} : {mask_ty}"
            ));
            self.op(format!(
                "grp_mask{i}_{l} = llm.add grp_mask{}_{l}, grp_hot{i}_{l} : {mask_ty}",
                i - 1
            ));
        }
        self.op(format!(
            "grp_keep_{l} = llm.reshape grp_mask{}_{l} : {group_ty}",
            chosen - 1
        ));
        self.op(format!(
            "grp_one_{l} = llm.constant {{value = 1.0}} : {}",
            t("1xf32".into())
        ));
        self.op(format!(
            "grp_far_{l} = llm.constant {{value = 1e30}} : {}",
            t("1xf32".into())
        ));
        self.op(format!(
            "grp_out_{l} = llm.sub grp_keep_{l}, grp_one_{l} : {group_ty}"
        ));
        self.op(format!(
            "grp_push_{l} = llm.mul grp_out_{l}, grp_far_{l} : {group_ty}"
        ));
        self.op(format!(
            "grp_masked_{l} = llm.add grp_{l}, grp_push_{l} : {}",
            t(format!("?x{g}x{width}xf32"))
        ));
        self.op(format!(
            "grp_choice_{l} = llm.reshape grp_masked_{l} : {}",
            t(format!("?x{count}xf32"))
        ));
        format!("grp_choice_{l}")
    }

    /// Layer `l`'s queries and its cached key (and value) by latent attention over
    /// `input`, RoPE (of parameters `rope`, frequency factors `factors`) applied to their
    /// RoPE features: the queries `[tokens, heads, kv_rank + rope]`, each head's `nope`
    /// features taken into the latent's space by its key projection ([`LATENT_K_UP`]: the
    /// product with every cached latent is the product of the head's key with the
    /// query), and the key `[tokens, 1, kv_rank + rope]`, the normalized latent and the
    /// rotated RoPE key, which is the value too. Returns the queries' and the key's names.
    fn latent_qkv(
        &mut self,
        c: &ModelConfig,
        latent: &LatentAttention,
        input: &str,
        l: usize,
        (rope, factors): (&str, &str),
    ) -> (String, String) {
        let (h, n, r, rank) = (c.heads, latent.nope, latent.rope, latent.kv_rank);
        let t = |shape: String| format!("llm.tensor <{shape}>");
        let p = format!("layers.{l}.");
        let eps = float(latent.norm_eps);
        let q_ty = t(format!("?x{}xf32", h * (n + r)));
        let q = match latent.q_rank {
            Some(q_rank) => {
                let ty = t(format!("?x{q_rank}xf32"));
                let weight = format!("{p}{LATENT_Q_DOWN}");
                let down = self.projection(input, &format!("qa_{l}"), &weight, false, &ty);
                let norm = self.weight_f32(&format!("qa_norm_{l}"), &format!("{p}{LATENT_Q_NORM}"));
                self.op(format!(
                    "qan_{l} = llm.rms_norm {down}, {norm} {{eps = {eps}}} : {ty}"
                ));
                let up = format!("{p}{LATENT_Q_UP}");
                self.projection(&format!("qan_{l}"), &format!("q_{l}"), &up, false, &q_ty)
            }
            None => {
                let weight = format!("{p}attention.wq.weight");
                self.projection(input, &format!("q_{l}"), &weight, false, &q_ty)
            }
        };
        let heads = |w: usize| t(format!("?x{h}x{w}xf32"));
        self.op(format!("qh_{l} = llm.reshape {q} : {}", heads(n + r)));
        self.op(format!(
            "qn_{l} = llm.slice qh_{l} {{starts = [0, 0, 0]}} : {}",
            heads(n)
        ));
        self.op(format!(
            "qp_{l} = llm.slice qh_{l} {{starts = [0, 0, {n}]}} : {}",
            heads(r)
        ));
        // Each head's no-RoPE query through its key projection: `[heads, tokens, nope]`
        // by the transpose of `[heads, kv_rank, nope]`.
        let by_head = |w: usize| t(format!("{h}x?x{w}xf32"));
        self.op(format!(
            "qnt_{l} = llm.transpose qn_{l} {{perm = [1, 0, 2]}} : {}",
            by_head(n)
        ));
        let keys_up = self.weight_f32(&format!("k_up_{l}"), &format!("{p}{LATENT_K_UP}"));
        self.op(format!(
            "qat_{l} = llm.matmul qnt_{l}, {keys_up} {{transpose_rhs = true}} : {}",
            by_head(rank)
        ));
        self.op(format!(
            "qa_heads_{l} = llm.transpose qat_{l} {{perm = [1, 0, 2]}} : {}",
            heads(rank)
        ));
        let down_ty = t(format!("?x{}xf32", rank + r));
        let weight = format!("{p}{LATENT_KV_DOWN}");
        let down = self.projection(input, &format!("kva_{l}"), &weight, false, &down_ty);
        let latent_ty = t(format!("?x{rank}xf32"));
        self.op(format!(
            "kvl_{l} = llm.slice {down} {{starts = [0, 0]}} : {latent_ty}"
        ));
        self.op(format!(
            "kp_{l} = llm.slice {down} {{starts = [0, {rank}]}} : {}",
            t(format!("?x{r}xf32"))
        ));
        let norm = self.weight_f32(&format!("kv_norm_{l}"), &format!("{p}{LATENT_KV_NORM}"));
        self.op(format!(
            "kvn_{l} = llm.rms_norm kvl_{l}, {norm} {{eps = {eps}}} : {latent_ty}"
        ));
        let one = |w: usize| t(format!("?x1x{w}xf32"));
        self.op(format!("kvn1_{l} = llm.reshape kvn_{l} : {}", one(rank)));
        self.op(format!("kp1_{l} = llm.reshape kp_{l} : {}", one(r)));
        self.op(format!(
            "qpr_{l} = llm.rope qp_{l}, positions{factors} {{{rope}}} : {}",
            heads(r)
        ));
        self.op(format!(
            "kpr_{l} = llm.rope kp1_{l}, positions{factors} {{{rope}}} : {}",
            one(r)
        ));
        self.op(format!(
            "qr_{l} = llm.concat qa_heads_{l}, qpr_{l} {{axis = 2}} : {}",
            heads(rank + r)
        ));
        self.op(format!(
            "kr_{l} = llm.concat kvn1_{l}, kpr_{l} {{axis = 2}} : {}",
            one(rank + r)
        ));
        (format!("qr_{l}"), format!("kr_{l}"))
    }

    /// Layer `l`'s attention output (`att_{l}`, each head's weighted sum of latents) through
    /// each head's value projection ([`LATENT_V_UP`]) under latent attention: the value's
    /// name, `[tokens, heads * value]`.
    fn latent_output(&mut self, c: &ModelConfig, latent: &LatentAttention, l: usize) -> String {
        let (h, hd, v, rank) = (c.heads, c.head_dim(), latent.value, latent.kv_rank);
        let t = |shape: String| format!("llm.tensor <{shape}>");
        let p = format!("layers.{l}.");
        self.op(format!(
            "atth_{l} = llm.reshape att_{l} : {}",
            t(format!("?x{h}x{hd}xf32"))
        ));
        self.op(format!(
            "attl_{l} = llm.slice atth_{l} {{starts = [0, 0, 0]}} : {}",
            t(format!("?x{h}x{rank}xf32"))
        ));
        self.op(format!(
            "attt_{l} = llm.transpose attl_{l} {{perm = [1, 0, 2]}} : {}",
            t(format!("{h}x?x{rank}xf32"))
        ));
        let values_up = self.weight_f32(&format!("v_up_{l}"), &format!("{p}{LATENT_V_UP}"));
        self.op(format!(
            "attvt_{l} = llm.matmul attt_{l}, {values_up} {{transpose_rhs = true}} : {}",
            t(format!("{h}x?x{v}xf32"))
        ));
        self.op(format!(
            "attv_{l} = llm.transpose attvt_{l} {{perm = [1, 0, 2]}} : {}",
            t(format!("?x{h}x{v}xf32"))
        ));
        self.op(format!(
            "attf_{l} = llm.reshape attv_{l} : {}",
            t(format!("?x{}xf32", h * v))
        ));
        format!("attf_{l}")
    }

    /// Layer `l`'s experts' hidden values from their `gate` and `up` projections (of type
    /// `ty`), as `glu` says: the value's name.
    fn expert_glu(
        &mut self,
        c: &ModelConfig,
        glu: ExpertGlu,
        [gate, up]: [&str; 2],
        l: usize,
        ty: &str,
    ) -> String {
        match glu {
            ExpertGlu::Gated => {
                let act = self.activation(c.activation, gate, &format!("eact_{l}"), ty);
                self.op(format!("eglu_{l} = llm.mul {act}, {up} : {ty}"));
            }
            ExpertGlu::ClampedSwiglu { alpha, limit } => {
                let scalar = "llm.tensor <1xf32>";
                for (name, v) in [("limit", limit), ("alpha", alpha), ("one", 1.0)] {
                    self.op(format!(
                        "eglu_{name}_{l} = llm.constant {{value = {}}} : {scalar}",
                        float(v)
                    ));
                }
                self.op(format!(
                    "egate_clamped_{l} = llm.minimum {gate}, eglu_limit_{l} : {ty}"
                ));
                let up = self.clamped(up, limit, ty);
                self.op(format!(
                    "egain_{l} = llm.mul egate_clamped_{l}, eglu_alpha_{l} : {ty}"
                ));
                self.op(format!("esig_{l} = llm.sigmoid egain_{l} : {ty}"));
                self.op(format!(
                    "eact_{l} = llm.mul egate_clamped_{l}, esig_{l} : {ty}"
                ));
                self.op(format!("eup1_{l} = llm.add {up}, eglu_one_{l} : {ty}"));
                self.op(format!("eglu_{l} = llm.mul eup1_{l}, eact_{l} : {ty}"));
            }
        }
        format!("eglu_{l}")
    }
}

/// A dense feed-forward block's weights and values: its weights' stem (`w1`, `w3`, `w2`
/// under it), hidden width, and the tag of its values' names.
struct DenseBlock {
    stem: String,
    hidden: usize,
    tag: String,
}

/// Writes one forward function; `batch` gives the `[B, T]` dims of the attention queries.
fn forward_func(
    c: &ModelConfig,
    weights: &Weights,
    kv: &KvStorage,
    name: &str,
    batch: &str,
) -> String {
    let (d, kvd, v) = (c.dim, c.kv_dim(), c.vocab);
    let (h, kvh, dh) = (c.heads, c.kv_heads, c.head_dim());
    let cache = cache_type(c, kv);
    let t = |shape: &str| format!("llm.tensor <{shape}>");
    let eps = float(c.norm_eps);
    let act = t(&format!("?x{d}xf32"));
    let qact = t(&format!("?x{}xf32", c.q_dim()));
    let kv = t(&format!("?x{kvd}xf32"));
    let mut e = Emitter {
        text: String::new(),
        weights,
    };
    e.weight("embed", "tok_embeddings.weight");
    let global_factors = if c.rope_freq_factors {
        format!(", {}", e.weight_f32("rope_freqs", ROPE_FREQS))
    } else {
        String::new()
    };
    e.op(format!("x0 = llm.embedding embed, tokens : {act}"));
    let mut x = "x0".to_string();
    if c.learned_positions {
        e.weight("pos_embed", POSITION_EMBEDDINGS);
        e.op(format!("p0 = llm.embedding pos_embed, positions : {act}"));
        e.op(format!("x0p = llm.add x0, p0 : {act}"));
        x = "x0p".to_string();
    }
    if matches!(c.norm, Norm::Layer | Norm::Unit) {
        e.op(format!(
            "zero_bias = llm.constant {{value = 0.0}} : {}",
            t(&format!("{d}xf32"))
        ));
    }
    if c.norm == Norm::Unit {
        e.op(format!(
            "unit_weight = llm.constant {{value = 1.0}} : {}",
            t(&format!("{d}xf32"))
        ));
    }
    if c.qk_norm == QkNorm::LayerHeads {
        // The per-head LayerNorms scale by their heads' weights after normalizing.
        let head = t(&format!("{}xf32", c.head_dim()));
        e.op(format!("head_unit = llm.constant {{value = 1.0}} : {head}"));
        e.op(format!("head_zero = llm.constant {{value = 0.0}} : {head}"));
    }
    if c.scale_embeddings {
        x = e.scaled(&x, Some(f64::from((c.dim as f32).sqrt())), &act);
    }
    x = e.scaled(&x, c.embedding_scale, &act);
    let mut cache_name = "cache".to_string();
    for l in 0..c.layers {
        let p = format!("layers.{l}.");
        let layer = LayerAttention::of(c, l);
        let (rope, attention) = (&layer.rope, &layer.params);
        let factors = if layer.own_rope {
            ""
        } else {
            global_factors.as_str()
        };
        let attn_in = if c.pre_norms {
            e.input_norm(c, &x, &format!("h_{l}"), &format!("{p}attention_norm"))
        } else {
            x.clone()
        };
        // Queries, keys and values of the layer's heads, RoPE applied.
        let (qr, kr, vh) = match &c.latent_attention {
            Some(latent) => {
                // The cached key is the value too.
                let (qr, kr) = e.latent_qkv(c, latent, &attn_in, l, (rope, factors));
                (qr, kr.clone(), kr)
            }
            None => {
                let [q, k, v] = [("q", &qact), ("k", &kv), ("v", &kv)].map(|(out, ty)| {
                    let weight = format!("{p}attention.w{out}.weight");
                    let bias = c.attention_bias.qkv;
                    e.projection(&attn_in, &format!("{out}_{l}"), &weight, bias, ty)
                });
                let (qheads, kvheads) = (
                    t(&format!("?x{h}x{dh}xf32")),
                    t(&format!("?x{kvh}x{dh}xf32")),
                );
                let qk_norms = (c.qk_norm != QkNorm::None).then(|| {
                    (
                        e.weight_f32(
                            &format!("q_norm_{l}"),
                            &format!("{p}attention.q_norm.weight"),
                        ),
                        e.weight_f32(
                            &format!("k_norm_{l}"),
                            &format!("{p}attention.k_norm.weight"),
                        ),
                    )
                });
                // The q and k norms over whole projections (OLMo 2's) or over each head.
                let (q, k) = match (&qk_norms, c.qk_norm) {
                    (Some((qn, kn)), QkNorm::Projections) => {
                        e.op(format!(
                            "qn_{l} = llm.rms_norm {q}, {qn} {{eps = {eps}}} : {qact}"
                        ));
                        e.op(format!(
                            "kn_{l} = llm.rms_norm {k}, {kn} {{eps = {eps}}} : {kv}"
                        ));
                        (format!("qn_{l}"), format!("kn_{l}"))
                    }
                    _ => (q, k),
                };
                let [q, k, v] = match c.clip_qkv {
                    Some(bound) => {
                        [(q, &qact), (k, &kv), (v, &kv)].map(|(x, ty)| e.clamped(&x, bound, ty))
                    }
                    None => [q, k, v],
                };
                e.op(format!("qh_{l} = llm.reshape {q} : {qheads}"));
                e.op(format!("kh_{l} = llm.reshape {k} : {kvheads}"));
                let (qh, kh) = match (&qk_norms, c.qk_norm) {
                    (Some((qn, kn)), QkNorm::Heads) => {
                        e.op(format!(
                            "qhn_{l} = llm.rms_norm qh_{l}, {qn} {{eps = {eps}}} : {qheads}"
                        ));
                        e.op(format!(
                            "khn_{l} = llm.rms_norm kh_{l}, {kn} {{eps = {eps}}} : {kvheads}"
                        ));
                        (format!("qhn_{l}"), format!("khn_{l}"))
                    }
                    (Some((qn, kn)), QkNorm::LayerHeads) => {
                        // Normalized, then each head scaled by its row of `[heads, head_dim]`.
                        for (x, w, ty) in [("q", qn, &qheads), ("k", kn, &kvheads)] {
                            e.op(format!(
                            "{x}hl_{l} = llm.layer_norm {x}h_{l}, head_unit, head_zero {{eps = {eps}}} : {ty}"
                        ));
                            e.op(format!("{x}hn_{l} = llm.mul {x}hl_{l}, {w} : {ty}"));
                        }
                        (format!("qhn_{l}"), format!("khn_{l}"))
                    }
                    _ => (format!("qh_{l}"), format!("kh_{l}")),
                };
                e.op(format!("vh_{l} = llm.reshape {v} : {kvheads}"));
                let (qr, kr) = if layer.nope {
                    (qh, kh)
                } else {
                    e.op(format!(
                        "qr_{l} = llm.rope {qh}, positions{factors} {{{rope}}} : {qheads}"
                    ));
                    e.op(format!(
                        "kr_{l} = llm.rope {kh}, positions{factors} {{{rope}}} : {kvheads}"
                    ));
                    (format!("qr_{l}"), format!("kr_{l}"))
                };
                (qr, kr, format!("vh_{l}"))
            }
        };
        let next_cache = format!("cache_{}", l + 1);
        e.op(format!(
            "{next_cache} = llm.append_kv {cache_name}, {kr}, {vh}, slots {{layer = {l}}} : {cache}"
        ));
        cache_name = next_cache;
        let queries = t(&format!("{batch}x{h}x{dh}xf32"));
        e.op(format!("qb_{l} = llm.reshape {qr} : {queries}"));
        let sinks = if c.attention_sinks {
            let sinks = e.weight_f32(&format!("sinks_{l}"), &format!("{p}{ATTENTION_SINKS}"));
            format!(", {sinks}")
        } else {
            String::new()
        };
        e.op(format!(
            "att_{l} = llm.paged_attention qb_{l}, {cache_name}, block_tables, context_lens{sinks} {{layer = {l}, kv_heads = {kvh}{attention}}} : {queries}"
        ));
        let attf = match &c.latent_attention {
            Some(latent) => e.latent_output(c, latent, l),
            None => {
                e.op(format!("attf_{l} = llm.reshape att_{l} : {qact}"));
                format!("attf_{l}")
            }
        };
        let o = e.projection(
            &attf,
            &format!("o_{l}"),
            &format!("{p}attention.wo.weight"),
            c.attention_bias.output,
            &act,
        );
        let o = e.post_norm(c, &o, &format!("{p}{POST_ATTENTION_NORM}"), &act);
        let o = e.scaled(&o, c.residual_scale, &act);
        e.op(format!("xa_{l} = llm.add {x}, {o} : {act}"));
        let ffn_norm = format!("{p}ffn_norm");
        let ffn_in = match c.blocks {
            Blocks::ParallelSharedNorm => attn_in,
            _ if !c.pre_norms => format!("xa_{l}"),
            Blocks::Parallel => e.input_norm(c, &x, &format!("hf_{l}"), &ffn_norm),
            Blocks::Sequential => {
                e.input_norm(c, &format!("xa_{l}"), &format!("hf_{l}"), &ffn_norm)
            }
        };
        let down = match c.experts.as_ref().filter(|x| x.routes(l)) {
            Some(experts) => e.experts(c, experts, &ffn_in, l),
            None => e.dense_feed_forward(c, &ffn_in, l),
        };
        let down = e.post_norm(c, &down, &format!("{p}{POST_FFW_NORM}"), &act);
        let down = e.scaled(&down, c.residual_scale, &act);
        let next = format!("x{}", l + 1);
        e.op(format!("{next} = llm.add xa_{l}, {down} : {act}"));
        x = next;
    }
    e.input_norm(c, &x, "xn", "norm");
    let classifier = if c.tied_classifier {
        let embed = e.weights.weight("tok_embeddings.weight");
        match embed.as_deref() {
            Some(Value::Tensor(t)) if t.dtype == DType::F32 => "embed".to_string(),
            _ => {
                let f32_ty = t(&format!("{v}x{d}xf32"));
                let conv = if matches!(embed.as_deref(), Some(Value::Quantized(_))) {
                    "dequantize"
                } else {
                    "cast"
                };
                e.op(format!("embed_f32 = llm.{conv} embed : {f32_ty}"));
                "embed_f32".to_string()
            }
        }
    } else {
        e.weight_f32("classifier", "output.weight")
    };
    let logits_ty = t(&format!("?x{v}xf32"));
    e.op(format!(
        "logits = llm.matmul xn, {classifier} {{transpose_rhs = true}} : {logits_ty}"
    ));
    let logits = e.add_bias(
        "logits",
        c.classifier_bias.then_some("output.bias"),
        &logits_ty,
    );
    let scaled_logits = e.scaled(&logits, c.logit_scale, &logits_ty);
    let logits = match c.logit_softcap {
        Some(cap) => e.soft_cap(&scaled_logits, cap, &logits_ty),
        None => scaled_logits,
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "    builtin.func @{name}: builtin.function <({}, {}, {}, {}, {}, {cache}) -> ({}, {cache})> {{",
        t("?xi32"),
        t("?xi32"),
        t("?xi32"),
        t("?x?xi32"),
        t("?xi32"),
        t(&format!("?x{v}xf32"))
    );
    let _ = writeln!(
        out,
        "      ^body(tokens: {}, positions: {}, slots: {}, block_tables: {}, context_lens: {}, cache: {cache}):",
        t("?xi32"),
        t("?xi32"),
        t("?xi32"),
        t("?x?xi32"),
        t("?xi32")
    );
    out.push_str(&e.text);
    let _ = writeln!(out, "        llm.return {logits}, {cache_name}");
    let _ = writeln!(out, "    }}");
    out
}
