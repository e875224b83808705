"""A small Llama GGUF file whose matrices mix the ggml types as llama.cpp's quantized files
do (its Q2_K files hold Q3_K tensors, Q4_K_S files Q5_K ones, Q5_K_M files Q5_K and Q6_K,
and rows that are not whole super-blocks fall back to Q5_0, Q5_1 or Q8_0, or in IQ4_XS
files to IQ4_NL), written by the `gguf` Python package's own writer (no llmc code
involved).

The K-quant, IQ4_NL, IQ4_XS, IQ3, IQ2, IQ1, ternary (TQ1_0, TQ2_0), Q1_0 and NVFP4 blocks are random
and valid (random bytes with each block's f16 scales set so that weights stay below about
0.1; IQ1_M's `d` split across the top nibbles of its four scale words; NVFP4's four UE4M3
scale bytes small, up to 2^-6 * 1.875); the Q5_0, Q5_1 and MXFP4 matrices are seeded
weights that the package quantizes. Norms are F32 near one.

    python3 -m venv /tmp/gguf && /tmp/gguf/bin/pip install gguf==0.19.0 numpy
    /tmp/gguf/bin/python make_quant_mix_gguf.py   # writes quant-mix.gguf beside this file
"""

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import quantize

DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 256, 3, 4, 2, 256

# Where IQ1_M's four 16-bit scale words start: its `d` is their top nibbles.
IQ1_M_SCALES = 48

# Block bytes, the offsets of the f16 scales to set (IQ1_M has none whole: its `d` is
# split), and the largest |weight| per unit of scale (so that scales of 0.1 / that keep
# weights near 0.1).
BLOCKS = {
    T.Q2_K: (84, [80, 82], 45),
    T.Q3_K: (110, [108], 128),
    T.Q4_K: (144, [0, 2], 945),
    T.Q5_K: (176, [0, 2], 1953),
    T.Q6_K: (210, [208], 4096),
    T.IQ4_NL: (18, [0], 127),
    T.IQ4_XS: (136, [0], 32 * 127),
    T.IQ3_XXS: (98, [0], 481),
    T.IQ3_S: (110, [0], 465),
    T.IQ2_XXS: (66, [0], 167),
    T.IQ2_XS: (74, [0], 167),
    T.IQ2_S: (82, [0], 167),
    T.IQ1_S: (50, [0], 17),
    T.IQ1_M: (56, [], 17),
    T.TQ1_0: (54, [52], 1),
    T.TQ2_0: (66, [64], 2),
    T.NVFP4: (36, [], 12),
    T.Q1_0: (18, [0], 1),
}

# Each matrix's type: layer 0 as a Q4_K_S/Q5_K_M file writes it (its feed-forward up
# projection as an IQ3_M file, its gate as an IQ2_M file, its attention output as an
# IQ2_XXS file, its down projection as an IQ1_S file), layer 1 as a Q2_K file (its query as an IQ4_XS file, its attention output
# as an IQ3_XXS file, its down projection as an IQ2_XS file), with three of llama.cpp's
# fallback types, and layer 2 as the ternary files of a ternary model (TriLM) write it (its
# query and key as a TQ1_0 file, its feed-forward up and down projections as a TQ2_0
# file), with its value projection as an NVFP4 file, its attention output in MXFP4 (the
# type of gpt-oss's experts) and its feed-forward gate as a Q1_0 file (a 1-bit model's).
LAYER_TYPES = [
    {"attn_q": T.Q4_K, "attn_k": T.Q5_0, "attn_v": T.Q5_K, "attn_output": T.IQ2_XXS,
     "ffn_gate": T.IQ2_S, "ffn_up": T.IQ3_S, "ffn_down": T.IQ1_S},
    {"attn_q": T.IQ4_XS, "attn_k": T.IQ4_NL, "attn_v": T.Q3_K, "attn_output": T.IQ3_XXS,
     "ffn_gate": T.Q2_K, "ffn_up": T.Q5_1, "ffn_down": T.IQ2_XS},
    {"attn_q": T.TQ1_0, "attn_k": T.TQ1_0, "attn_v": T.NVFP4, "attn_output": T.MXFP4,
     "ffn_gate": T.Q1_0, "ffn_up": T.TQ2_0, "ffn_down": T.TQ2_0},
]


def blocks(rng, qtype, rows, cols):
    if qtype not in BLOCKS:
        weights = (0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
        return quantize(weights, qtype)
    block_bytes, scales, reach = BLOCKS[qtype]
    n = rows * cols // {T.IQ4_NL: 32, T.NVFP4: 64, T.Q1_0: 128}.get(qtype, 256)
    data = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    if qtype == T.NVFP4:
        data[:, :4] = rng.integers(0x04, 0x10, size=(n, 4), dtype=np.uint8)
    if qtype == T.IQ1_M:
        d = (rng.uniform(0.25, 1.0, size=n) * 0.1 / reach).astype(np.float16)
        words = data[:, IQ1_M_SCALES : IQ1_M_SCALES + 8].copy().view("<u2")
        for k in range(4):
            nibble = (d.view(np.uint16) >> (4 * k)) & 0xF
            words[:, k] = (words[:, k] & 0x0FFF) | (nibble << 12)
        data[:, IQ1_M_SCALES : IQ1_M_SCALES + 8] = words.view(np.uint8)
    for at in scales:
        d = (rng.uniform(0.25, 1.0, size=n) * 0.1 / reach).astype(np.float16)
        data[:, at : at + 2] = d.view(np.uint8).reshape(n, 2)
    return data.reshape(rows, -1)


def main():
    rng = np.random.default_rng(11)
    path = Path(__file__).parent / "quant-mix.gguf"
    w = GGUFWriter(path, "llama")
    w.add_context_length(64)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    # The token embedding as an IQ1_M file's (a gather of IQ1_M rows).
    w.add_tensor("token_embd.weight", blocks(rng, T.IQ1_M, VOCAB, DIM), raw_dtype=T.IQ1_M)
    norm = lambda: (1 + 0.1 * rng.standard_normal(DIM)).astype(np.float32)
    head_dim = DIM // HEADS
    shapes = {
        "attn_q": (DIM, DIM), "attn_k": (KV_HEADS * head_dim, DIM),
        "attn_v": (KV_HEADS * head_dim, DIM), "attn_output": (DIM, DIM),
        "ffn_gate": (HIDDEN, DIM), "ffn_up": (HIDDEN, DIM), "ffn_down": (DIM, HIDDEN),
    }
    for layer, types in enumerate(LAYER_TYPES):
        w.add_tensor(f"blk.{layer}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{layer}.ffn_norm.weight", norm())
        for name, qtype in types.items():
            rows, cols = shapes[name]
            w.add_tensor(f"blk.{layer}.{name}.weight", blocks(rng, qtype, rows, cols), raw_dtype=qtype)
    w.add_tensor("output_norm.weight", norm())
    w.add_tensor("output.weight", blocks(rng, T.Q6_K, VOCAB, DIM), raw_dtype=T.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
