"""Writes the reference checkpoints that `tests/hf.rs` checks the builder against.

Each is a small random model of one architecture the loader reads, saved by Hugging Face
`transformers` (bfloat16 weights, as released checkpoints mostly are), with the logits
`transformers` computes for it: an independent implementation of the architecture. Run
with `torch` and `transformers` (5.x) installed, from this directory:

    python make_references.py

It writes `NAME-tiny/` for each architecture (`llama3`, `mistral`, `qwen2` (and its window
over some layers, `qwen2-window`), `qwen3`,
`phi3`, `gemma`, `gemma2`, `gemma3`), RoPE scaling (`qwen3-yarn`, `phi3-longrope`),
partial rotation (`phi4-mini`), Granite's scales (`granite`), OLMo 2's norms
(`olmo2`), the first OLMo's unit LayerNorms (`olmo`), SmolLM3's NoPE layers (`smollm3`; and its window, `smollm3-window`), Cohere's blocks (`cohere`; Command R+'s q/k norms, `cohere-qk-norm`; Cohere 2's local and NoPE layers, `cohere2`), the
LayerNorm architectures (`phi2`, `stablelm`, `stablelm-parallel`, `stablelm-12b`, `starcoder2`,
`gpt-neox`, `gpt2`, `gpt-bigcode`, `gpt-bigcode-mha`, `gptj`, `falcon`, `falcon-40b`, `falcon-mha`, `opt`) and
Llama's feed-forward biases (`llama-mlp-bias`), GLM's (`glm`, `glm4`), the mixtures of experts (`mixtral`,
`qwen3-moe`, `olmoe`, `qwen2-moe`, `granite-moe`, `granite-moe-shared`, `dbrx`; gpt-oss's, `gpt-oss`,
and its experts in MXFP4 as OpenAI publishes them, `gpt-oss-mxfp4`; DeepSeek's latent attention
and routing, `deepseek-v2` and `deepseek-v3`), or only those named (`python make_references.py qwen3-yarn-tiny`), each holding `config.json`,
`generation_config.json`, `model.safetensors` and `reference.json`: seeded random token
ids (`ids`; the first `prompt_len` of them a prompt, the rest fed one at a time) and the
logits of every position of one forward pass over them (`logits`, rounded to 7
significant digits).
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Cohere2Config,
    Cohere2ForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    DbrxConfig,
    DbrxForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    Glm4Config,
    Glm4ForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    GraniteMoeConfig,
    GraniteMoeForCausalLM,
    GraniteMoeSharedConfig,
    GraniteMoeSharedForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    StableLmConfig,
    StableLmForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
)

SEQUENCE = 28
PROMPT_LEN = 6


def randomize(model, seed, offset_norms):
    """Weights of a scale that makes every part of the architecture matter: norm weights
    (the vectors that are not biases, and Command R+'s per-head q/k norms' `[heads,
    head_dim]` matrices) in [0.5, 1.5] (Gemma's, `offset_norms`, stored as
    offsets from 1), biases of standard deviation 0.5, embeddings (tokens' and GPT-2's
    positions') of standard deviation 0.5,
    projections (and each expert's, stacked) of variance 1 / fan-in (q and k 2.25 times
    that, for pronounced attention; mixture-of-experts routers 16 times, for routing
    that rounding cannot change)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = p.dim() == 1 and name.endswith("weight") or name.endswith(HEAD_NORMS)
            if norm and offset_norms:
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
            elif norm:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith("self_attn.sinks"):
                # gpt-oss's attention sinks, on the scale of the scores.
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
            elif name.endswith(TRANSPOSED_EXPERTS):
                # gpt-oss's experts, stored `[experts, in, out]`: the fan-in is dim -2.
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-2] ** -0.5)
            elif "embed_tokens" in name or name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                std = p.shape[-1] ** -0.5
                if "q_proj" in name or "k_proj" in name:
                    std *= 1.5
                if name.endswith(ROUTERS):
                    std *= 4
                p.copy_(torch.randn(p.shape, generator=g) * std)


def write(name, model_class, config, seed):
    WRITABLE.add(name)
    if ONLY and name not in ONLY:
        return
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomize(model, seed, offset_norms=name.startswith("gemma"))
    with torch.no_grad():
        for module_name, buffer in model.named_buffers():
            if module_name.endswith("e_score_correction_bias"):
                # DeepSeek V3's selection bias, on the scale of the sigmoid scores.
                buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(seed)) * 0.2)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    model.to(torch.bfloat16).save_pretrained(out)
    model = model_class.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    reference_logits(name, model, config, seed, out)


def reference_logits(name, model, config, seed, out):
    """Writes `reference.json` for the checkpoint `out` of `model` (loaded in f32): the
    seeded token ids and the logits of one forward pass over them."""
    model.eval()
    tokens = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(3, config.vocab_size, (1, SEQUENCE), generator=tokens)
    with torch.no_grad():
        logits = model(ids).logits[0]
    top = logits.topk(2, dim=-1).values
    margin = (top[:, 0] - top[:, 1]).min().item()
    routing = f", smallest routing margin {routing_margin(model, ids):.4f}" if is_moe(model) else ""
    reference = {
        "ids": ids[0].tolist(),
        "prompt_len": PROMPT_LEN,
        "logits": [[float(f"{v:.7g}") for v in row] for row in logits.tolist()],
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(reference, f)
    print(f"{name}: ids {reference['ids']}, smallest top-2 margin {margin:.4f}{routing}")


# Per-head q/k norms' weights stored as one `[heads, head_dim]` matrix (Command R+'s).
HEAD_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


# The mixture-of-experts routers (Mixtral's `block_sparse_moe.gate`, Qwen3-MoE's and
# OLMoE's `mlp.gate`, Granite-MoE's `block_sparse_moe.router`, DBRX's `ffn.router.layer`)
# and their weights.
ROUTER_MODULES = ("block_sparse_moe.gate", "mlp.gate", "block_sparse_moe.router", "ffn.router.layer", "mlp.router")
ROUTERS = tuple(f"{m}.weight" for m in ROUTER_MODULES)


# gpt-oss's stacked experts, `[experts, in, out]` (as `x @ W` takes them).
TRANSPOSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

# The four-bit floats (E2M1) an MXFP4 code stands for, by code.
FP4_LEVELS = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4_pack(w):
    """`w` (`[experts, rows, cols]`, cols a multiple of 32) as OpenAI's checkpoints store
    MXFP4 matrices: blocks `[experts, rows, cols / 32, 16]` (value 2j of a group in the
    low nibble of byte j, 2j + 1 in the high one) and E8M0 scales `[experts, rows,
    cols / 32]`, each group's the smallest power of two that brings its largest magnitude
    to 6 or below, each value the nearest level (ties to the lower code)."""
    e, r, c = w.shape
    groups = w.reshape(e, r, c // 32, 32)
    amax = groups.abs().amax(dim=-1).clamp(min=2.0**-100)
    exponent = torch.ceil(torch.log2(amax / 6.0))
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - FP4_LEVELS).abs().argmin(dim=-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def write_gpt_oss_mxfp4(name, config, seed):
    """gpt-oss's checkpoint with its experts' matrices in MXFP4, as OpenAI publishes it:
    the model's experts rounded to MXFP4 (transformers' own decoder,
    `convert_moe_packed_tensors`, must give back the rounded values from the packed
    bytes), the logits of the rounded model, and `model.safetensors` holding each
    expert matrix as `_blocks` and `_scales` (rows the outputs) in place of the float
    stack."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    WRITABLE.add(name)
    if ONLY and name not in ONLY:
        return
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).eval()
    randomize(model, seed, offset_norms=False)
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for proj in ("gate_up_proj", "down_proj"):
                w = getattr(layer.mlp.experts, proj)
                blocks, scales = mxfp4_pack(w.transpose(1, 2))
                decoded = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
                w.copy_(decoded)
                packed[f"model.layers.{i}.mlp.experts.{proj}"] = (blocks, scales)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    # MXFP4's values need at most two mantissa bits: bf16 holds them exactly. The logits
    # are those of this float form, before its experts are packed.
    model.to(torch.bfloat16).save_pretrained(out)
    float_form = GptOssForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    reference_logits(name, float_form, config, seed, out)
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    for stem, (blocks, scales) in packed.items():
        stored = tensors.pop(stem)
        decoded = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert torch.equal(stored.float(), decoded), stem
        tensors[f"{stem}_blocks"] = blocks
        tensors[f"{stem}_scales"] = scales
    save_file(tensors, path, metadata={"format": "pt"})
    # Declared as OpenAI's checkpoints declare it.
    with open(os.path.join(out, "config.json")) as f:
        stored = json.load(f)
    stored["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(stored, f, indent=2, sort_keys=True)


def is_moe(model):
    return any(name.endswith(ROUTERS) for name, _ in model.named_parameters())


def routing_margin(model, ids):
    """The smallest gap, over every routing layer and token, between the router logits
    of the last expert chosen and the first one left out: how far rounding would have to
    move a logit to change the experts a token runs."""
    gaps = []

    # The experts a token runs (DBRX's router, a plain linear layer, does not hold it).
    config = model.config
    top_k = getattr(config, "num_experts_per_tok", None) or config.ffn_config.moe_top_k

    def hook(module, args, output):
        logits = (output[0] if isinstance(output, tuple) else output).float()
        top = logits.topk(top_k + 1, dim=-1).values
        gaps.append((top[:, -2] - top[:, -1]).min().item())

    routers = [m for n, m in model.named_modules() if n.endswith(ROUTER_MODULES)]
    handles = [m.register_forward_hook(hook) for m in routers]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return min(gaps)


def main():
    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    )
    # Gemma 2: heads of 24 (not 64 / 4), a query scale of 20^-0.5, soft-capped attention
    # scores and logits, and a window of 8 on the even layers.
    gemma2 = Gemma2Config(
        **common,
        num_key_value_heads=2,
        head_dim=24,
        query_pre_attn_scalar=20,
        sliding_window=8,
        attn_logit_softcapping=3.0,
        final_logit_softcapping=10.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    write("gemma2-tiny", Gemma2ForCausalLM, gemma2, 2)
    # Gemma 3: six layers, the first five local (a window of 6) and the last global, as
    # its pattern has them; one KV head of 32, q and k norms, the local layers' RoPE of
    # base 10000 and the global one's of base 1e6 scaled by 2.
    gemma3 = Gemma3TextConfig(
        **{**common, "num_hidden_layers": 6},
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=6,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    )
    write("gemma3-tiny", Gemma3ForCausalLM, gemma3, 3)
    # The others: two layers each, heads of 16 unless said.
    small = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    # Llama 3: its RoPE scaling (the long wavelengths slowed), an untied classifier.
    llama3 = LlamaConfig(
        **small,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    write("llama3-tiny", LlamaForCausalLM, llama3, 4)
    # Mistral: a sliding window of 8 in every layer.
    mistral = MistralConfig(**small, sliding_window=8, tie_word_embeddings=False)
    write("mistral-tiny", MistralForCausalLM, mistral, 5)
    # Qwen2: biases on the q, k and v projections, a tied classifier.
    qwen2 = Qwen2Config(**small, tie_word_embeddings=True, use_sliding_window=False)
    write("qwen2-tiny", Qwen2ForCausalLM, qwen2, 6)
    # Qwen2 with its window over some layers: from `max_window_layers` (1) on, the
    # second layer attends over 8 positions, the first to every position.
    qwen2_window = Qwen2Config(
        **small,
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    )
    write("qwen2-window-tiny", Qwen2ForCausalLM, qwen2_window, 49)
    # Qwen3: heads of 32 (not 64 / 4), their queries and keys normalized.
    qwen3 = Qwen3Config(**small, head_dim=32, tie_word_embeddings=True, use_sliding_window=False)
    write("qwen3-tiny", Qwen3ForCausalLM, qwen3, 7)
    # Phi-3: fused q/k/v and gate/up projections, a sliding window of 10.
    phi3 = Phi3Config(**small, sliding_window=10, tie_word_embeddings=False, pad_token_id=0)
    write("phi3-tiny", Phi3ForCausalLM, phi3, 8)
    # Gemma: GeGLU, scaled embeddings, norms scaling by 1 + weight; heads of 16.
    gemma = GemmaConfig(**small, head_dim=16, hidden_activation="gelu_pytorch_tanh")
    write("gemma-tiny", GemmaForCausalLM, gemma, 9)
    # Qwen3 with YaRN: 4 times its original 64 positions, so the ramp runs over pairs 0
    # to 5 of its heads of 32; the attention factor 1 + 0.1 ln 4.
    qwen3_yarn = Qwen3Config(
        **{**small, "max_position_embeddings": 256},
        head_dim=32,
        tie_word_embeddings=True,
        use_sliding_window=False,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    write("qwen3-yarn-tiny", Qwen3ForCausalLM, qwen3_yarn, 10)
    # Phi-3 with LongRoPE (Phi-3.5's scaling): 128 positions over an original 16, so the
    # long factors (the sequence of 28 passes 16) and the attention factor
    # sqrt(1 + ln 8 / ln 16).
    phi3_longrope = Phi3Config(
        **small,
        tie_word_embeddings=False,
        pad_token_id=0,
        original_max_position_embeddings=16,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "long_factor": [1.0, 1.25, 1.6, 2.2, 3.0, 4.5, 6.0, 8.0],
            "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0],
        },
    )
    write("phi3-longrope-tiny", Phi3ForCausalLM, phi3_longrope, 11)
    # Phi-4-mini's settings (Phi3ForCausalLM): RoPE over three quarters of each head (12
    # of 16 features), LongRoPE over them, a tied classifier.
    phi4_mini = Phi3Config(
        **small,
        tie_word_embeddings=True,
        pad_token_id=0,
        original_max_position_embeddings=16,
        partial_rotary_factor=0.75,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "long_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0],
            "short_factor": [1.0, 1.1, 1.2, 1.4, 1.6, 2.0],
        },
    )
    write("phi4-mini-tiny", Phi3ForCausalLM, phi4_mini, 12)
    # Granite: embeddings times 12, each block's output times 0.22 before its residual
    # add, attention scores scaled by 1/32 (not 1/4), logits divided by 8 (Granite 3's
    # settings, with the attention multiplier of heads of 16 over 2).
    granite = GraniteConfig(
        **small,
        tie_word_embeddings=True,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.03125,
        logits_scaling=8.0,
    )
    write("granite-tiny", GraniteForCausalLM, granite, 13)
    # OLMo 2: each block's output normalized before its residual add (no input norms),
    # RMSNorms over the whole q and k projections, an untied classifier.
    olmo2 = Olmo2Config(**small, rms_norm_eps=1e-6, tie_word_embeddings=False)
    write("olmo2-tiny", Olmo2ForCausalLM, olmo2, 14)
    # The first OLMo: LayerNorms of neither weight nor bias; q, k and v clamped to
    # [-2, 2] (`clip_qkv`, OLMo-7B-0424's setting).
    olmo = OlmoConfig(
        **small, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, clip_qkv=2.0
    )
    write("olmo-tiny", OlmoForCausalLM, olmo, 33)
    # SmolLM3: four layers, the fourth without RoPE (its NoPE layers, every fourth).
    smollm3 = SmolLM3Config(
        **{**small, "num_hidden_layers": 4},
        tie_word_embeddings=True,
        use_sliding_window=False,
        pad_token_id=0,
    )
    write("smollm3-tiny", SmolLM3ForCausalLM, smollm3, 15)
    # SmolLM3 with its window (`use_sliding_window`): 6 positions in its NoPE layer, the
    # one `layer_types` marks sliding.
    smollm3_window = SmolLM3Config(
        **{**small, "num_hidden_layers": 4},
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=6,
        pad_token_id=0,
    )
    write("smollm3-window-tiny", SmolLM3ForCausalLM, smollm3_window, 49)
    # Cohere (Command R): LayerNorms without bias, attention and feed-forward blocks in
    # parallel, interleaved RoPE pairs, logits times 0.25; an epsilon of 1e-3, so that
    # reading it matters.
    cohere = CohereConfig(
        **small, tie_word_embeddings=True, logit_scale=0.25, layer_norm_eps=1e-3, pad_token_id=0
    )
    write("cohere-tiny", CohereForCausalLM, cohere, 16)
    # Command R+: Cohere's with a LayerNorm of each query and key head, each head its own
    # weights (`use_qk_norm`, `[heads, head_dim]`).
    cohere_qk_norm = CohereConfig(
        **small,
        tie_word_embeddings=True,
        logit_scale=0.25,
        layer_norm_eps=1e-3,
        pad_token_id=0,
        use_qk_norm=True,
    )
    write("cohere-qk-norm-tiny", CohereForCausalLM, cohere_qk_norm, 44)
    # Cohere 2 (Command R7B, Command A): Cohere's blocks over four layers, the first three
    # attending locally over 8 positions with RoPE, the fourth globally without it.
    cohere2 = Cohere2Config(
        **{**small, "num_hidden_layers": 4},
        tie_word_embeddings=True,
        logit_scale=0.25,
        layer_norm_eps=1e-3,
        pad_token_id=0,
        sliding_window=8,
    )
    write("cohere2-tiny", Cohere2ForCausalLM, cohere2, 48)
    # Phi-2: LayerNorms with biases, attention and an ungated GELU feed-forward block side
    # by side over one norm, biases on every projection and the classifier, RoPE over
    # 0.4 of each head (6 of 16 features), an untied classifier.
    phi2 = PhiConfig(
        **small,
        tie_word_embeddings=False,
        hidden_act="gelu_new",
        layer_norm_eps=1e-5,
        partial_rotary_factor=0.4,
        pad_token_id=0,
    )
    write("phi2-tiny", PhiForCausalLM, phi2, 17)
    # StableLM 2: LayerNorms with biases, SwiGLU, biases on q, k and v, RoPE over a
    # quarter of each head (4 of 16 features).
    stablelm = StableLmConfig(
        **small,
        tie_word_embeddings=False,
        use_qkv_bias=True,
        partial_rotary_factor=0.25,
        layer_norm_eps=1e-5,
    )
    write("stablelm-tiny", StableLmForCausalLM, stablelm, 18)
    # StableLM 2 12B's parallel blocks (`use_parallel_residual`): attention and SwiGLU
    # over one norm.
    stablelm_parallel = StableLmConfig(
        **small,
        tie_word_embeddings=False,
        use_parallel_residual=True,
        partial_rotary_factor=0.25,
        layer_norm_eps=1e-5,
    )
    write("stablelm-parallel-tiny", StableLmForCausalLM, stablelm_parallel, 21)
    # StableLM 2 12B: parallel blocks and a LayerNorm (no bias) of each query and key
    # head, one weight tensor a head (`qk_layernorm`).
    stablelm_12b = StableLmConfig(
        **small,
        tie_word_embeddings=False,
        use_parallel_residual=True,
        qk_layernorm=True,
        partial_rotary_factor=0.25,
        layer_norm_eps=1e-5,
    )
    write("stablelm-12b-tiny", StableLmForCausalLM, stablelm_12b, 45)
    # GPT-NeoX (Pythia's shape): LayerNorms with biases, attention and an ungated
    # exact-GELU feed-forward block side by side, each over its own norm, q, k and v
    # fused per head, biases on every projection, RoPE over a quarter of each head.
    gpt_neox = GPTNeoXConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        hidden_act="gelu",
        rotary_pct=0.25,
        use_parallel_residual=True,
        layer_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    write("gpt-neox-tiny", GPTNeoXForCausalLM, gpt_neox, 22)
    # GPT-2: learned positions, LayerNorms with biases, `Conv1D` matrices, q, k and v
    # fused, GELU's tanh approximation, a tied classifier.
    gpt = dict(
        vocab_size=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        n_inner=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    write("gpt2-tiny", GPT2LMHeadModel, GPT2Config(**gpt), 23)
    # GPT-BigCode (StarCoder's): GPT-2's shape with one KV head, and with as many KV heads
    # as query heads (q, k and v fused per head).
    write("gpt-bigcode-tiny", GPTBigCodeForCausalLM, GPTBigCodeConfig(**gpt), 24)
    mha = GPTBigCodeConfig(**gpt, multi_query=False)
    write("gpt-bigcode-mha-tiny", GPTBigCodeForCausalLM, mha, 25)
    # GPT-J: attention and an ungated GELU block side by side over one norm, RoPE with
    # interleaved pairs over 8 of each head's 16 features, a classifier with a bias.
    gptj = GPTJConfig(**gpt, rotary_dim=8, tie_word_embeddings=False)
    write("gptj-tiny", GPTJForCausalLM, gptj, 26)
    # Falcon 7B's shape: one KV head, q, k and v fused (the query heads', then the key's
    # and the value's), attention and an exact-GELU block side by side over one norm.
    falcon = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    write("falcon-tiny", FalconForCausalLM, FalconConfig(**falcon), 27)
    # Falcon 40B's and 180B's (`new_decoder_architecture`): two KV groups, each its two
    # query heads', key's and value's rows, and the blocks over norms of their own.
    falcon40b = FalconConfig(**falcon, new_decoder_architecture=True, num_kv_heads=2)
    write("falcon-40b-tiny", FalconForCausalLM, falcon40b, 30)
    # Falcon's other settings: a KV head a query head (q, k and v fused per head), the
    # blocks one after the other, biases on every projection.
    falcon_mha = FalconConfig(**falcon, multi_query=False, parallel_attn=False, bias=True)
    write("falcon-mha-tiny", FalconForCausalLM, falcon_mha, 32)
    # OPT: learned positions (the table two rows longer), LayerNorms with biases, an
    # ungated ReLU block, biases on every projection, a tied classifier.
    opt = OPTConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    write("opt-tiny", OPTForCausalLM, opt, 31)
    # StarCoder2: LayerNorms with biases, an ungated GELU feed-forward block, biases on
    # every projection, a sliding window of 10, a tied classifier.
    starcoder2 = Starcoder2Config(
        **small,
        tie_word_embeddings=True,
        use_bias=True,
        norm_epsilon=1e-5,
        sliding_window=10,
        bos_token_id=1,
        eos_token_id=2,
    )
    write("starcoder2-tiny", Starcoder2ForCausalLM, starcoder2, 19)
    # Llama with `mlp_bias`: biases on the gate, up and down projections.
    llama_mlp_bias = LlamaConfig(**small, tie_word_embeddings=True, mlp_bias=True)
    write("llama-mlp-bias-tiny", LlamaForCausalLM, llama_mlp_bias, 20)
    # GLM-4 9B: biases on q, k and v, the gate and up projections fused, RoPE over half
    # of each head (its default) with interleaved pairs.
    glm = GlmConfig(**small, head_dim=16, tie_word_embeddings=False, pad_token_id=0)
    write("glm-tiny", GlmForCausalLM, glm, 46)
    # GLM-4-0414: GLM's with each block's output normalized before its residual add.
    glm4 = Glm4Config(**small, head_dim=16, tie_word_embeddings=False, pad_token_id=0)
    write("glm4-tiny", Glm4ForCausalLM, glm4, 47)
    # Mixtral: four experts a layer, two of them run for each token, their weights
    # renormalized to sum to 1.
    mixtral = MixtralConfig(
        **small, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False
    )
    write("mixtral-tiny", MixtralForCausalLM, mixtral, 34)
    # Qwen3-MoE: eight experts of width 32, two a token, renormalized; its first layer a
    # dense block of `intermediate_size` (`mlp_only_layers`); per-head q and k norms.
    qwen3_moe = Qwen3MoeConfig(
        **small,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        tie_word_embeddings=False,
    )
    write("qwen3-moe-tiny", Qwen3MoeForCausalLM, qwen3_moe, 35)
    # OLMoE: eight experts, three a token, weighted by their probabilities among all
    # eight (not renormalized); RMSNorms over the whole q and k projections; q, k and v
    # clamped to [-1.5, 1.5] after those norms (`clip_qkv`).
    olmoe = OlmoeConfig(
        **small,
        clip_qkv=1.5,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
    )
    write("olmoe-tiny", OlmoeForCausalLM, olmoe, 36)
    # Qwen2-MoE: four experts of width 32, two a token, not renormalized, beside a shared
    # expert of width 48 gated by a sigmoid; q, k and v biases.
    qwen2_moe = Qwen2MoeConfig(
        **small,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
        tie_word_embeddings=False,
    )
    write("qwen2-moe-tiny", Qwen2MoeForCausalLM, qwen2_moe, 37)
    # Granite-MoE: Granite's scales over eight experts of width 32, two a token, weighted
    # by a softmax over the two chosen logits; each expert's gate and up projections
    # stored fused and every expert's stacked (`input_linear`). The scales are milder
    # than `granite`'s, whose large embedding scale and small residual one would leave
    # the experts' outputs little say in the logits.
    granite_scales = dict(
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.0625,
        logits_scaling=2.0,
    )
    granite_moe = GraniteMoeConfig(
        **{**small, "intermediate_size": 32},
        **granite_scales,
        num_local_experts=8,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    write("granite-moe-tiny", GraniteMoeForCausalLM, granite_moe, 42)
    # Granite-MoE-Shared: four experts of width 32, two a token, beside a shared expert of
    # width 48 added without a gate (`shared_mlp`, its gate and up projections fused).
    granite_moe_shared = GraniteMoeSharedConfig(
        **{**small, "intermediate_size": 32},
        **granite_scales,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=48,
        tie_word_embeddings=False,
    )
    write("granite-moe-shared-tiny", GraniteMoeSharedForCausalLM, granite_moe_shared, 41)
    # DBRX: LayerNorms without bias, q, k and v fused in one projection and clamped to
    # [-1.5, 1.5], four experts of width 32, two a token, their probabilities (a softmax
    # over all four) divided by their sum (`moe_normalize_expert_weights` 1); the
    # experts' matrices stacked, the down projections transposed.
    dbrx = DbrxConfig(
        d_model=64,
        n_heads=4,
        n_layers=2,
        max_seq_len=128,
        vocab_size=256,
        attn_config={"clip_qkv": 1.5, "kv_n_heads": 2, "rope_theta": 500000.0},
        # transformers 5 reads RoPE's base from here only, not from `attn_config` (where
        # DBRX's own configs hold it): both say the same.
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ffn_config={
            "ffn_hidden_size": 32,
            "moe_num_experts": 4,
            "moe_top_k": 2,
            "moe_normalize_expert_weights": 1.0,
        },
    )
    write("dbrx-tiny", DbrxForCausalLM, dbrx, 43)
    # gpt-oss: biases on every attention projection, an attention sink a head, a window
    # of 6 over the first layer (`layer_types`), YaRN's RoPE (factor 4 over 32
    # positions, untruncated), four experts of width 32, two a token, weighted by a
    # softmax over their logits, with router and expert biases and a clamped SwiGLU
    # whose limit (1.5, not 7) the values reach.
    gpt_oss = GptOssConfig(
        **{**small, "intermediate_size": 32},
        head_dim=16,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        num_local_experts=4,
        num_experts_per_tok=2,
        swiglu_limit=1.5,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 32,
        },
        tie_word_embeddings=False,
    )
    write("gpt-oss-tiny", GptOssForCausalLM, gpt_oss, 44)
    # DeepSeek V3: latent attention (queries through a latent of 48, keys and values
    # through one of 32; heads of 16 + 24 RoPE features, more RoPE features than the
    # width over the heads (16), as DeepSeek-V3's 64 against 7168 / 128; values of 12),
    # YaRN with `mscale_all_dim` (the scores' scale), a dense first layer, then eight experts of
    # width 32 in four groups, two groups kept (scored by their two best), two experts a
    # token chosen by sigmoid scores plus a selection bias, weighted by the scores
    # normalized and scaled by 2.5, beside a shared expert.
    latent = dict(
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        num_key_value_heads=4,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_shared_experts=1,
        tie_word_embeddings=False,
    )
    deepseek_v3 = DeepseekV3Config(
        **{k: v for k, v in small.items() if k != "num_key_value_heads"},
        **{**latent, "qk_rope_head_dim": 24},
        q_lora_rank=48,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )
    write("deepseek-v3-tiny", DeepseekV3ForCausalLM, deepseek_v3, 46)
    # DeepSeek V2 (V2-Lite's shape: queries projected directly): its experts weighted by
    # their softmax probabilities (not renormalized) times 1.5, chosen within the best of
    # four groups of two, scored by their best (`group_limited_greedy`: with fewer groups
    # kept than experts chosen, the group limit matters).
    deepseek_v2 = DeepseekV2Config(
        **{k: v for k, v in small.items() if k != "num_key_value_heads"},
        **latent,
        q_lora_rank=None,
        n_group=4,
        topk_group=1,
        topk_method="group_limited_greedy",
        routed_scaling_factor=1.5,
    )
    write("deepseek-v2-tiny", DeepseekV2ForCausalLM, deepseek_v2, 47)
    write_gpt_oss_mxfp4("gpt-oss-mxfp4-tiny", gpt_oss, 45)


def gemma3_1b_shape(out):
    """A random model of Gemma 3 1B's shape (bf16, 2.0 GB; transformers' own random
    initialization) at `out`, for `llm-run bench` at a real model's size: the benchmark
    in docs/runtime.md's Numbers."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=32768,
        sliding_window=512,
        query_pre_attn_scalar=256,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    )
    torch.set_default_dtype(torch.bfloat16)
    Gemma3ForCausalLM(config).save_pretrained(out)


# The references to write (`NAME-tiny`), all when empty, and those `main` knows.
ONLY = set()
WRITABLE = set()

if __name__ == "__main__":
    # `python make_references.py --gemma3-1b DIR` writes the 1B-shaped model instead.
    if len(sys.argv) == 3 and sys.argv[1] == "--gemma3-1b":
        gemma3_1b_shape(sys.argv[2])
    else:
        ONLY.update(sys.argv[1:])
        main()
        if ONLY - WRITABLE:
            sys.exit(f"no reference named {sorted(ONLY - WRITABLE)}")
