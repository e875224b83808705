"""Writes the Gemma 2 and Gemma 3 reference checkpoints that `tests/gemma.rs` loads.

Each is a small random model saved by Hugging Face `transformers` (bfloat16 weights, as
Gemma's checkpoints are) with the logits `transformers` computes for it: an independent
implementation of the architecture to check the builder against. Run with `torch` and
`transformers` (5.x) installed, from this directory:

    python make_gemma_references.py

It writes `gemma2-tiny/` and `gemma3-tiny/`, each holding `config.json`,
`generation_config.json`, `model.safetensors` and `reference.json`: seeded random token
ids (`ids`; the first `prompt_len` of them a prompt, the rest fed one at a time) and the
logits of every position of one forward pass over them (`logits`, rounded to 7
significant digits).
"""

import json
import os

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

SEQUENCE = 28
PROMPT_LEN = 6


def randomize(model, seed):
    """Weights of a scale that makes every part of the architecture matter: norm weights
    (Gemma's offsets from 1) in [-0.5, 0.5], embeddings of standard deviation 0.5,
    projections of variance 1 / fan-in (q and k 2.25 times that, for pronounced
    attention)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                std = p.shape[1] ** -0.5
                if "q_proj" in name or "k_proj" in name:
                    std *= 1.5
                p.copy_(torch.randn(p.shape, generator=g) * std)


def write(name, model_class, config, seed):
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomize(model, seed)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    model.to(torch.bfloat16).save_pretrained(out)
    model = model_class.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tokens = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(3, config.vocab_size, (1, SEQUENCE), generator=tokens)
    with torch.no_grad():
        logits = model(ids).logits[0]
    top = logits.topk(2, dim=-1).values
    margin = (top[:, 0] - top[:, 1]).min().item()
    reference = {
        "ids": ids[0].tolist(),
        "prompt_len": PROMPT_LEN,
        "logits": [[float(f"{v:.7g}") for v in row] for row in logits.tolist()],
    }
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(reference, f)
    print(f"{name}: ids {reference['ids']}, smallest top-2 margin {margin:.4f}")


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


if __name__ == "__main__":
    main()
