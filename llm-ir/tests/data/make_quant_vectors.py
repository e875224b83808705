"""GGUF block-format vectors beyond ../shared/quant-vectors: q5_0, q5_1, q3_k, q5_k, iq4_nl,
iq4_xs, iq3_xxs, iq3_s, iq2_xxs, iq2_xs, iq2_s, iq1_s, iq1_m, tq1_0, tq2_0, mxfp4, nvfp4.

Made by the `gguf` Python package (llama.cpp's numpy reference of the ggml formats), as
the shared vectors are, for an 8 x 512 matrix: q5_0 and q5_1 quantize seeded inputs (row
0's first 32 zero: an all-zero block) into `blocks` and dequantize them into `dequant`;
q3_k, q5_k, iq4_nl, iq4_xs and the IQ3, IQ2 and IQ1 formats, which the package only
dequantizes, have random valid (super-)blocks (their f16 scales set to small finite values;
IQ1_M's `d` is split across the top nibbles of its four scale words); the ternary tq1_0 and
tq2_0 have both: seeded inputs quantized (`{name}.*`) and random super-blocks of random
code bytes, dequantized (`{name}_any.*`); so has mxfp4, its random blocks' scale bytes
random too (subnormal ones among them); nvfp4, which the package only dequantizes, has
random blocks, their scale bytes random. The ternary and 4-bit float vectors are made last
so that the earlier files keep their bytes:

    python3 -m venv /tmp/gguf && /tmp/gguf/bin/pip install gguf==0.19.0 numpy
    /tmp/gguf/bin/python make_quant_vectors.py   # writes quant-vectors/ beside this file
"""

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

ROWS, COLS = 8, 512
OUT = Path(__file__).parent / "quant-vectors"

# Where IQ1_M's four 16-bit scale words start: its `d` is their top nibbles.
IQ1_M_SCALES = 48

# Format, block bytes and the byte offsets of each block's f16 scales (IQ1_M has none
# whole: `set_iq1_m_d` writes its `d`).
FORMATS = {
    "q3_k": (T.Q3_K, 110, [108]),
    "q5_k": (T.Q5_K, 176, [0, 2]),
    "iq4_nl": (T.IQ4_NL, 18, [0]),
    "iq4_xs": (T.IQ4_XS, 136, [0]),
    "iq3_xxs": (T.IQ3_XXS, 98, [0]),
    "iq3_s": (T.IQ3_S, 110, [0]),
    "iq2_xxs": (T.IQ2_XXS, 66, [0]),
    "iq2_xs": (T.IQ2_XS, 74, [0]),
    "iq2_s": (T.IQ2_S, 82, [0]),
    "iq1_s": (T.IQ1_S, 50, [0]),
    "iq1_m": (T.IQ1_M, 56, []),
}


# Formats the package quantizes.
QUANTIZED = {"q5_0": T.Q5_0, "q5_1": T.Q5_1}

# The ternary formats: quantized, and as random super-blocks (block bytes, where `d` is).
TERNARY = {"tq1_0": (T.TQ1_0, 54, 52), "tq2_0": (T.TQ2_0, 66, 64)}


def qtype_block_size(qtype):
    """Values per block of `qtype`."""
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[qtype][0]


def set_iq1_m_d(data, d):
    """Writes each IQ1_M super-block's f16 `d` (a row of `data`) into the top nibbles of
    its four scale words, nibble `k` of `d` into word `k`."""
    words = data[:, IQ1_M_SCALES : IQ1_M_SCALES + 8].copy().view("<u2")
    bits = d.view(np.uint16)
    for k in range(4):
        words[:, k] = (words[:, k] & 0x0FFF) | (((bits >> (4 * k)) & 0xF) << 12)
    data[:, IQ1_M_SCALES : IQ1_M_SCALES + 8] = words.view(np.uint8)


def main():
    OUT.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    for name, qtype in QUANTIZED.items():
        write_quantized(rng, name, qtype, zero_block=32)
    for name, (qtype, block_bytes, scales) in FORMATS.items():
        write_random_blocks(rng, name, qtype, block_bytes, scales)
    for name, (qtype, block_bytes, d_at) in TERNARY.items():
        write_quantized(rng, name, qtype, zero_block=256)
        write_random_blocks(rng, f"{name}_any", qtype, block_bytes, [d_at])
    write_quantized(rng, "mxfp4", T.MXFP4, zero_block=32)
    write_random_blocks(rng, "mxfp4_any", T.MXFP4, 17, [])
    write_random_blocks(rng, "nvfp4", T.NVFP4, 36, [])


def write_quantized(rng, name, qtype, zero_block):
    """Seeded inputs (row 0's first `zero_block` values zero: an all-zero block), their
    blocks and the blocks dequantized."""
    values = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    values[0, :zero_block] = 0
    blocks = quantize(values, qtype)
    (OUT / f"{name}.input.f32").write_bytes(values.astype("<f4").tobytes())
    (OUT / f"{name}.blocks.bin").write_bytes(blocks.tobytes())
    (OUT / f"{name}.dequant.f32").write_bytes(dequantize(blocks, qtype).astype("<f4").tobytes())
    print(name, blocks.nbytes, "bytes")


def write_random_blocks(rng, name, qtype, block_bytes, scales):
    """Random blocks (the f16 scales at the offsets `scales` small finite values) and
    their dequantization."""
    blocks = ROWS * COLS // qtype_block_size(qtype)
    data = rng.integers(0, 256, size=(blocks, block_bytes), dtype=np.uint8)
    if qtype == T.IQ1_M:
        set_iq1_m_d(data, rng.uniform(1e-3, 1e-1, size=blocks).astype(np.float16))
    for at in scales:
        d = rng.uniform(1e-3, 1e-1, size=blocks).astype(np.float16)
        data[:, at : at + 2] = d.view(np.uint8).reshape(blocks, 2)
    matrix = data.reshape(ROWS, -1)
    values = dequantize(matrix, qtype).astype(np.float32)
    assert values.shape == (ROWS, COLS)
    (OUT / f"{name}.blocks.bin").write_bytes(matrix.tobytes())
    (OUT / f"{name}.dequant.f32").write_bytes(values.astype("<f4").tobytes())
    print(name, matrix.nbytes, "bytes")


if __name__ == "__main__":
    main()
