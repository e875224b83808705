//! Quantization formats: byte-exact against llama.cpp's reference vectors
//! (`../shared/quant-vectors`, and for q5_0, q5_1, q3_k, q5_k, iq4_nl, iq4_xs, the
//! IQ3, IQ2 and IQ1 formats, the ternary tq1_0 and tq2_0 and the 4-bit float mxfp4 and
//! nvfp4 `tests/data/quant-vectors`,
//! both made with the `gguf` Python package), plus round-trip
//! and known-value tests for every format.

use std::path::{Path, PathBuf};

use llm_ir::{
    dtype::DType,
    interp::{
        lattice::{EVEN_SIGNS, IQ1_DELTA},
        quant::{NF4_LEVELS, dequantize, quantize, storage_bytes},
    },
    types::{
        IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, IQ4_NL_LEVELS,
        QuantFormat,
    },
};

/// The vector file `file`: ours (`tests/data/make_quant_vectors.py`) for the formats the
/// shared set lacks.
fn vectors(file: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if [
        "q5_0", "q5_1", "q3_k", "q5_k", "iq4_nl", "iq4_xs", "iq3_xxs", "iq3_s", "iq2_xxs",
        "iq2_xs", "iq2_s", "iq1_s", "iq1_m", "tq1_0", "tq2_0", "mxfp4", "nvfp4",
    ]
    .iter()
    .any(|ours| file.starts_with(ours))
    {
        dir.join("tests/data/quant-vectors").join(file)
    } else {
        dir.join("../../shared/quant-vectors").join(file)
    }
}

fn read_f32(file: &str) -> Vec<f32> {
    let bytes = std::fs::read(vectors(file)).expect("vector file");
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

const SHAPE: [usize; 2] = [8, 512];

fn gguf(name: &str) -> QuantFormat {
    match name {
        "q8_0" => QuantFormat::Q8_0,
        "q4_0" => QuantFormat::Q4_0,
        "q4_1" => QuantFormat::Q4_1,
        "q5_0" => QuantFormat::Q5_0,
        "q5_1" => QuantFormat::Q5_1,
        "q4_k" => QuantFormat::Q4K,
        "q6_k" => QuantFormat::Q6K,
        "q3_k" => QuantFormat::Q3K,
        "q5_k" => QuantFormat::Q5K,
        "iq4_nl" => QuantFormat::Iq4Nl,
        "iq4_xs" => QuantFormat::Iq4Xs,
        "iq3_xxs" => QuantFormat::Iq3Xxs,
        "iq3_s" => QuantFormat::Iq3S,
        "iq2_xxs" => QuantFormat::Iq2Xxs,
        "iq2_xs" => QuantFormat::Iq2Xs,
        "iq2_s" => QuantFormat::Iq2S,
        "iq1_s" => QuantFormat::Iq1S,
        "iq1_m" => QuantFormat::Iq1M,
        "tq1_0" | "tq1_0_any" => QuantFormat::Tq1_0,
        "tq2_0" | "tq2_0_any" => QuantFormat::Tq2_0,
        "mxfp4" | "mxfp4_any" => QuantFormat::Mxfp4,
        "nvfp4" => QuantFormat::Nvfp4,
        _ => QuantFormat::Q2K,
    }
}

fn assert_bits_equal(found: &[f32], expected: &[f32], what: &str) {
    assert_eq!(found.len(), expected.len(), "{what}: length");
    for (i, (a, b)) in found.iter().zip(expected).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: element {i}: {a} vs {b}");
    }
}

#[test]
fn quantizing_matches_llama_cpp_byte_for_byte() {
    for name in [
        "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "tq1_0", "tq2_0", "mxfp4",
    ] {
        let input = read_f32(&format!("{name}.input.f32"));
        let expected = std::fs::read(vectors(&format!("{name}.blocks.bin"))).expect("blocks");
        let found = quantize(&gguf(name), &SHAPE, &input);
        assert_eq!(found.len(), expected.len(), "{name}: byte count");
        let first_diff = found.iter().zip(&expected).position(|(a, b)| a != b);
        assert_eq!(first_diff, None, "{name}: first differing byte");
    }
}

#[test]
fn dequantizing_matches_llama_cpp_exactly() {
    for name in [
        "q8_0",
        "q4_0",
        "q4_1",
        "q5_0",
        "q5_1",
        "q2_k",
        "q3_k",
        "q4_k",
        "q5_k",
        "q6_k",
        "iq4_nl",
        "iq4_xs",
        "iq3_xxs",
        "iq3_s",
        "iq2_xxs",
        "iq2_xs",
        "iq2_s",
        "iq1_s",
        "iq1_m",
        "tq1_0",
        "tq2_0",
        "tq1_0_any",
        "tq2_0_any",
        "mxfp4",
        "mxfp4_any",
        "nvfp4",
    ] {
        let blocks = std::fs::read(vectors(&format!("{name}.blocks.bin"))).expect("blocks");
        let expected = read_f32(&format!("{name}.dequant.f32"));
        assert_eq!(
            storage_bytes(&gguf(name), &SHAPE),
            blocks.len(),
            "{name}: storage size"
        );
        assert_bits_equal(&dequantize(&gguf(name), &SHAPE, &blocks), &expected, name);
    }
}

/// A deterministic spread of values in [-scale, scale].
fn sample(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + 13) % 1000) as f32 / 500.0 - 1.0) * scale)
        .collect()
}

fn max_abs_error(format: &QuantFormat, shape: &[usize], x: &[f32]) -> f32 {
    let bytes = quantize(format, shape, x);
    assert_eq!(
        bytes.len(),
        storage_bytes(format, shape),
        "{}: storage size",
        format.name()
    );
    let y = dequantize(format, shape, &bytes);
    assert_eq!(y.len(), x.len());
    x.iter()
        .zip(&y)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

#[test]
fn every_format_round_trips_within_its_step() {
    let shape = [4, 512];
    let x = sample(2048, 2.0);
    let affine = |bits, symmetric| QuantFormat::Affine {
        bits,
        group_size: 64,
        symmetric,
        axis: 1,
        scale: DType::F32,
    };
    // Bounds: about half a quantization step of each format over values in [-2, 2].
    let cases = [
        (QuantFormat::Q8_0, 2.0 / 127.0),
        (QuantFormat::Q4_0, 2.0 / 8.0 * 1.01),
        (QuantFormat::Q4_1, 4.0 / 15.0 * 0.51),
        (QuantFormat::Q5_0, 2.0 / 16.0 * 1.01),
        (QuantFormat::Q5_1, 4.0 / 31.0 * 0.51),
        (QuantFormat::Q4K, 4.0 / 15.0 * 0.6),
        (QuantFormat::Q6K, 2.0 / 31.0 * 0.6),
        (QuantFormat::Q2K, 4.0 / 3.0 * 0.6),
        // q3_k's codes -4..=3 reach three steps on the side opposite a sub-block's
        // largest magnitude, four on its side: up to a step there.
        (QuantFormat::Q3K, 2.0 / 4.0 * 0.9),
        (QuantFormat::Q5K, 4.0 / 31.0 * 0.6),
        // iq4_nl's levels lie up to 24 apart (of 127 for the largest magnitude): half of
        // that, with room for a fitted scale above 2 / 127.
        (QuantFormat::Iq4Nl, 2.0 / 127.0 * 12.0 * 1.25),
        // iq4_xs: the same levels under sub-block scales rounded to a 32nd of the largest.
        (QuantFormat::Iq4Xs, 2.0 / 127.0 * 12.0 * 1.25),
        // The IQ3 grids hold few groups of four large magnitudes (they favour the small
        // ones of weights near a bell curve), so on these uniform values a group can fall
        // far: measured 0.40 (iq3_s, q3_k's 0.41) and 0.84 (iq3_xxs).
        (QuantFormat::Iq3S, 0.45),
        (QuantFormat::Iq3Xxs, 0.9),
        // The IQ2 grids hold three magnitudes (8, 25, 43) and few groups of eight with
        // several large ones, and iq2_xxs's and iq2_xs's seven stored signs of eight can
        // leave a value the opposite sign: measured 0.69 (iq2_s), 1.26 (iq2_xs) and 1.11
        // (iq2_xxs), for values within [-2, 2].
        (QuantFormat::Iq2S, 0.75),
        (QuantFormat::Iq2Xs, 1.3),
        (QuantFormat::Iq2Xxs, 1.2),
        // IQ1's three levels (-1, 0 and 1, shifted by an eighth) and the 2048 of their
        // 6561 groups of eight on its grid: measured 1.04 for both.
        (QuantFormat::Iq1S, 1.1),
        (QuantFormat::Iq1M, 1.1),
        // The ternary formats' levels are -d, 0 and d for `d` the largest magnitude (2
        // here): half a step is 1, plus `d`'s rounding to f16.
        (QuantFormat::Tq1_0, 1.0 * 1.01),
        (QuantFormat::Tq2_0, 1.0 * 1.01),
        // mxfp4's power-of-two scale can leave its largest level (6 steps of 2^(E - 2)
        // for the largest magnitude's binary exponent E) a quarter of the largest
        // magnitude short: 0.5 here; its gaps are narrower. nvfp4's scale is the largest
        // magnitude over 6, rounded to three mantissa bits (within 1/16): its widest gap
        // (4 to 6 steps of it) is a third of that, half of which is 1/3 of 1, 1.0625 times.
        // q1_0's values are the mean magnitude `d` either way, about 1 for values spread
        // evenly over [-2, 2], so a value lies within max(2 - d, d) of its level: measured
        // 1.022 (the largest magnitude as `d` would give 1.98).
        (QuantFormat::Q1_0, 1.05),
        (QuantFormat::Mxfp4, 0.5 * 1.01),
        (QuantFormat::Nvfp4, 2.0 / 6.0 * 1.0625),
        (
            QuantFormat::Nf4 {
                block_size: 64,
                scale: DType::F32,
            },
            2.0 * 0.17,
        ),
        (affine(8, true), 2.0 / 127.0 * 0.51),
        (affine(8, false), 4.0 / 255.0 * 0.51),
        (affine(4, true), 2.0 / 7.0 * 0.51),
        (affine(4, false), 4.0 / 15.0 * 0.51),
        (affine(2, true), 2.0 * 0.51),
        (affine(2, false), 4.0 / 3.0 * 0.51),
    ];
    for (format, bound) in cases {
        let err = max_abs_error(&format, &shape, &x);
        assert!(err <= bound, "{}: max error {err} above {bound}", format);
    }
}

/// iq4_xs's sub-blocks of different magnitudes (1 to 1/32 of the largest, either sign)
/// each keep their own scale: a sub-block's error stays within half its levels' widest
/// gap (12 of 127 steps of its largest magnitude, with room for the fitted scale) plus
/// what rounding its scale to a 32nd of the super-block's largest costs (half a step of
/// `d`, over the 127 steps a level spans).
#[test]
fn iq4_xs_sub_blocks_keep_scales_of_their_own() {
    let values: Vec<f32> = sample(1024, 1.0)
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let sub = i / 32;
            let sign = if sub % 3 == 1 { -1.0 } else { 1.0 };
            sign * v / (1 << (sub % 6)) as f32
        })
        .collect();
    let format = QuantFormat::Iq4Xs;
    let back = dequantize(&format, &[4, 256], &quantize(&format, &[4, 256], &values));
    for (xs, ys) in values.chunks(256).zip(back.chunks(256)) {
        let amax = |b: &[f32]| b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax(xs) / 127.0 / 32.0 * 1.25;
        for (sub, (x, y)) in xs.chunks(32).zip(ys.chunks(32)).enumerate() {
            let bound = amax(x) / 127.0 * 12.0 * 1.25 + 127.0 * d / 2.0;
            let err = x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= bound, "sub-block {sub}: error {err} above {bound}");
        }
    }
}

#[test]
fn exactly_representable_values_survive() {
    // Multiples of the q8_0 step with 127 * step as the block maximum come back exactly.
    let mut x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
    x[0] = 63.5;
    let q = QuantFormat::Q8_0;
    assert_bits_equal(&dequantize(&q, &[32], &quantize(&q, &[32], &x)), &x, "q8_0");
    // IQ4_NL levels times a power of two are exact: the search's try at step 0 maps the
    // largest magnitude onto the first level, and its least-squares scale is that power.
    let levels: Vec<f32> = IQ4_NL_LEVELS
        .iter()
        .chain(IQ4_NL_LEVELS.iter().rev())
        .map(|&l| f32::from(l) * 0.25)
        .collect();
    let iq4_nl = QuantFormat::Iq4Nl;
    assert_bits_equal(
        &dequantize(&iq4_nl, &[32], &quantize(&iq4_nl, &[32], &levels)),
        &levels,
        "iq4_nl",
    );
    // IQ4_XS: IQ4_NL's exact blocks under sub-block scales `d * l` (`d` a power of two,
    // `l` of either sign, -32 the largest in magnitude): the sub-block searches find the
    // scales and `l = scale / d` comes back; with `d` of either sign.
    for d in [1.0f32 / 64.0, -1.0 / 64.0] {
        let ls = [-32, 31, -7, 1, 13, -1, 20, -31];
        let values: Vec<f32> = ls
            .iter()
            .flat_map(|&l| {
                let levels = IQ4_NL_LEVELS.iter().chain(IQ4_NL_LEVELS.iter().rev());
                levels.map(move |&level| d * (l * i32::from(level)) as f32)
            })
            .collect();
        let iq4_xs = QuantFormat::Iq4Xs;
        assert_bits_equal(
            &dequantize(&iq4_xs, &[256], &quantize(&iq4_xs, &[256], &values)),
            &values,
            "iq4_xs",
        );
    }
    // NF4 levels times a power-of-two absmax are exact.
    let levels: Vec<f32> = NF4_LEVELS
        .iter()
        .chain(NF4_LEVELS.iter().rev())
        .map(|l| l * 4.0)
        .collect();
    let nf4 = QuantFormat::Nf4 {
        block_size: 32,
        scale: DType::F16,
    };
    assert_bits_equal(
        &dequantize(&nf4, &[32], &quantize(&nf4, &[32], &levels)),
        &levels,
        "nf4",
    );
    // Small integers are exact in symmetric int8 with a unit scale.
    let ints: Vec<f32> = (0..16)
        .map(|i| (i as f32) - 8.0)
        .chain([127.0])
        .chain(std::iter::repeat_n(0.0, 15))
        .collect();
    let int8 = QuantFormat::Affine {
        bits: 8,
        group_size: 32,
        symmetric: true,
        axis: 0,
        scale: DType::F32,
    };
    assert_bits_equal(
        &dequantize(&int8, &[32], &quantize(&int8, &[32], &ints)),
        &ints,
        "int8",
    );
}

/// Ternary values under a scale that f16 holds exactly come back bit for bit, in both
/// formats; so do all-zero super-blocks, and the largest magnitude sets the scale
/// whatever its sign.
#[test]
fn ternary_values_survive() {
    let trits = |seed: usize| (0..256).map(move |i| (((i * 7 + seed) * 2654435761usize) >> 7) % 3);
    let small = half::f16::from_f32(1.5e-3).to_f32();
    let mut values: Vec<f32> = trits(1).map(|t| 0.375 * (t as f32 - 1.0)).collect();
    values.extend(trits(2).map(|t| small * (1.0 - t as f32)));
    values.extend([0.0; 256]);
    values.extend(trits(3).map(|t| 6.0 * (t as f32 - 1.0).min(0.0)));
    for format in [QuantFormat::Tq1_0, QuantFormat::Tq2_0] {
        let back = dequantize(&format, &[4, 256], &quantize(&format, &[4, 256], &values));
        assert_bits_equal(&back, &values, format.name());
    }
}

/// 4-bit floats (E2M1: 0, 0.5, 1, 1.5, 2, 3, 4, 6 either way) times the scale their
/// block's largest magnitude 6 s implies come back bit for bit: in mxfp4 for `s` a power
/// of two (subnormal scales included), in nvfp4 for `s` any UE4M3 value the encoder
/// writes (each sub-block of 16 its own).
#[test]
fn four_bit_floats_survive() {
    const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    // (Zero stays +0: the formats' zero levels read back as +0.)
    let e2m1 = |i: usize| {
        let v = E2M1[(i * 5 + i / 8) % 8];
        if i % 3 == 1 { 0.0 - v } else { v }
    };
    let with_largest = |n: usize, s: f32| -> Vec<f32> {
        let mut v: Vec<f32> = (0..n).map(|i| e2m1(i) * s).collect();
        v[n / 2] = -6.0 * s;
        v
    };
    let mxfp4: Vec<f32> = [1.0, 2f32.powi(-20), 2f32.powi(-126), 2f32.powi(100)]
        .iter()
        .flat_map(|&s| with_largest(32, s))
        .collect();
    let format = QuantFormat::Mxfp4;
    let back = dequantize(&format, &[4, 32], &quantize(&format, &[4, 32], &mxfp4));
    assert_bits_equal(&back, &mxfp4, "mxfp4");
    // UE4M3 values: subnormal, normal, the largest of exponent 14 and the largest the
    // encoder writes (0x7E, of exponent 15); and an all-zero sub-block.
    let mut nvfp4: Vec<f32> = [1.0, 0.001_953_125 * 3.0, 1.375, 240.0, 448.0, 2.5, 12.0]
        .iter()
        .flat_map(|&s| with_largest(16, s))
        .collect();
    nvfp4.extend([0.0; 16]);
    let format = QuantFormat::Nvfp4;
    let back = dequantize(&format, &[2, 64], &quantize(&format, &[2, 64], &nvfp4));
    assert_bits_equal(&back, &nvfp4, "nvfp4");
}

/// q1_0 keeps each value's sign under the mean magnitude: values of one magnitude (that f16
/// holds) come back bit for bit; `-0` counts as non-negative, as ggml's `x >= 0` has it.
#[test]
fn binary_values_survive() {
    let format = QuantFormat::Q1_0;
    let values: Vec<f32> = (0..256)
        .map(|i| {
            if (i * 7 + i / 5) % 3 == 0 {
                -0.375
            } else {
                0.375
            }
        })
        .collect();
    let back = dequantize(&format, &[2, 128], &quantize(&format, &[2, 128], &values));
    assert_bits_equal(&back, &values, "q1_0");
    let mut signs = vec![-1.0f32; 128];
    signs[5] = -0.0;
    let bytes = quantize(&format, &[128], &signs);
    assert_eq!(bytes.len(), 18);
    assert_eq!(bytes[2], 1 << 5, "only -0 sets its bit");
    let back = dequantize(&format, &[128], &bytes);
    // The mean magnitude is 127 / 128, rounded to f16.
    let d = half::f16::from_f32(127.0 / 128.0).to_f32();
    assert_eq!((back[5], back[0]), (d, -d));
}

/// The ternary, binary and 4-bit float quantizers take values that are not finite, and
/// subnormal blocks (whose reciprocal scale is infinite), without panicking, in blocks of
/// their size; a subnormal block dequantizes to finite values.
#[test]
fn reference_quantizers_take_any_values() {
    let blocks: [&[f32]; 4] = [
        &[1e-40, -2e-40, 0.0, 3e-45],
        &[f32::INFINITY, 1.0, -1.0, 0.5],
        &[f32::NAN, 1.0, -1.0, 0.25],
        &[1.0, f32::NEG_INFINITY, f32::NAN, -0.0],
    ];
    for format in [
        QuantFormat::Tq1_0,
        QuantFormat::Tq2_0,
        QuantFormat::Q1_0,
        QuantFormat::Mxfp4,
        QuantFormat::Nvfp4,
    ] {
        let n = format.block_elems() as usize;
        for block in blocks {
            let values: Vec<f32> = block.iter().cycle().take(n).copied().collect();
            let bytes = quantize(&format, &[n], &values);
            assert_eq!(bytes.len(), storage_bytes(&format, &[n]), "{format}");
            let back = dequantize(&format, &[n], &bytes);
            if block[0] == 1e-40 {
                assert!(back.iter().all(|v| v.is_finite()), "{format}: {back:?}");
            }
        }
    }
}

#[test]
fn known_q4_0_block() {
    // The largest magnitude is -8, so d = -8 / -8 = 1 and each value x maps to x + 8.
    let x: Vec<f32> = (0..32)
        .map(|i| if i == 0 { -8.0 } else { (i % 8) as f32 - 4.0 })
        .collect();
    let bytes = quantize(&QuantFormat::Q4_0, &[32], &x);
    assert_eq!(&bytes[..2], &half::f16::from_f32(1.0).to_le_bytes());
    // Element 0 (code 0) is the low nibble, element 16 the high nibble.
    assert_eq!(bytes[2], ((x[16] + 8.0) as u8) << 4);
    assert_eq!(dequantize(&QuantFormat::Q4_0, &[32], &bytes), x);
}

#[test]
fn affine_groups_run_along_their_axis() {
    // Axis 0 groups of 2: each column pair shares a scale, so a large value in column 0
    // does not coarsen column 1.
    let x = vec![100.0, 1.0, -100.0, -1.0];
    let format = QuantFormat::Affine {
        bits: 8,
        group_size: 2,
        symmetric: true,
        axis: 0,
        scale: DType::F32,
    };
    let y = dequantize(&format, &[2, 2], &quantize(&format, &[2, 2], &x));
    assert_eq!(y, x);
}

/// `f16` and `bf16` store each value in its two bytes, rounded to nearest even, and widen
/// exactly (infinities, subnormals and signed zeros included), in a tensor of any shape.
#[test]
fn sixteen_bit_formats_store_the_rounded_values() {
    let values = [
        1.0f32 / 3.0,
        -0.0,
        65504.0,
        1e-7,
        f32::INFINITY,
        -2.5e38,
        3.0,
    ];
    let shape = [1, values.len()];
    for format in [QuantFormat::F16, QuantFormat::BF16] {
        let bytes = quantize(&format, &shape, &values);
        assert_eq!(bytes.len(), storage_bytes(&format, &shape));
        let (expected_bytes, widened): (Vec<u8>, Vec<f32>) = match format {
            QuantFormat::F16 => (
                values
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect(),
                values
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_f32())
                    .collect(),
            ),
            _ => (
                values
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
                values
                    .iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect(),
            ),
        };
        assert_eq!(bytes, expected_bytes, "{format}");
        let back: Vec<u32> = dequantize(&format, &shape, &bytes)
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(
            back,
            widened.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "{format}"
        );
    }
}

/// A KV cache of 16-bit floats is written with the float dtype; the storage format is
/// refused there, so that a cache type prints as it parses.
#[test]
fn a_cache_refuses_the_sixteen_bit_formats() {
    use llm_ir::types::{KvCacheParams, KvStorage, PagedKvCacheType};
    let ctx = pliron::context::Context::new();
    for format in [QuantFormat::F16, QuantFormat::BF16] {
        let params = KvCacheParams {
            layers: 1,
            kv_heads: 1,
            head_dim: 8,
            block_size: 16,
            blocks: None,
            storage: KvStorage::Quantized(format),
            window: None,
        };
        let cache = PagedKvCacheType::get(&ctx, params);
        let error = cache.deref(&ctx).validate().expect_err("refused");
        assert!(error.contains("`dtype = f16` or `bf16`"), "{error}");
    }
}

/// A lattice format's layout, as the tests build its super-blocks from values.
struct Lattice {
    grid: Vec<u64>,
    /// Values a grid entry holds.
    width: usize,
    /// Values under one multiplier.
    run_len: usize,
    /// Whether each eight values have an even count of minus signs.
    even_signs: bool,
    /// A run's scale under multiplier `ls` of `d`, as the format defines it.
    scale: fn(f32, u8) -> f32,
    /// The grid's largest magnitude (IQ1's largest value, 1).
    largest: u8,
    /// Where a group's shift (IQ1's signed grid entries, no sign bits) applies: `Some(true)`
    /// per group, `Some(false)` per run.
    shift_per_group: Option<bool>,
    /// The largest multiplier.
    largest_ls: u8,
}

fn lattice(format: &QuantFormat) -> Lattice {
    let widen = |g: &[u32]| g.iter().map(|&e| u64::from(e)).collect();
    let iq2_scale: fn(f32, u8) -> f32 = |d, l| d * (0.5 + f32::from(l)) * 0.25;
    let (grid, width, run_len, even_signs, scale, largest): (_, _, _, _, fn(f32, u8) -> f32, _) =
        match format {
            QuantFormat::Iq3Xxs => (
                widen(&IQ3XXS_GRID),
                4,
                32,
                true,
                |d, l| d * (0.5 + f32::from(l)) * 0.5,
                62,
            ),
            QuantFormat::Iq3S => (
                widen(&IQ3S_GRID),
                4,
                32,
                false,
                |d, l| d * f32::from(1 + 2 * l),
                15,
            ),
            QuantFormat::Iq2Xxs => (IQ2XXS_GRID.to_vec(), 8, 32, true, iq2_scale, 43),
            QuantFormat::Iq2Xs => (IQ2XS_GRID.to_vec(), 8, 16, true, iq2_scale, 43),
            QuantFormat::Iq1S | QuantFormat::Iq1M => (
                IQ1S_GRID.to_vec(),
                8,
                if *format == QuantFormat::Iq1S { 32 } else { 16 },
                false,
                |d, l| d * f32::from(1 + 2 * l),
                1,
            ),
            _ => (IQ2S_GRID.to_vec(), 8, 16, false, iq2_scale, 43),
        };
    let shift_per_group = match format {
        QuantFormat::Iq1S => Some(false),
        QuantFormat::Iq1M => Some(true),
        _ => None,
    };
    Lattice {
        grid,
        width,
        run_len,
        even_signs,
        scale,
        largest,
        shift_per_group,
        largest_ls: if shift_per_group.is_some() { 7 } else { 15 },
    }
}

/// A super-block of the lattice format `format` with `d` a power of two, run multipliers
/// `ls` (the largest among them), the first group of every run an entry that holds the
/// grid's largest magnitude (IQ1's: 1 and -1, so that whichever the shift, a value
/// reaches the largest shifted level) and the other groups, signs and shifts spread over
/// the grid: its values, as the format's definition gives them.
fn lattice_super_block(format: &QuantFormat, d: f32) -> Vec<f32> {
    let l = lattice(format);
    let top = l
        .grid
        .iter()
        .map(|e| e.to_le_bytes())
        .position(|m| {
            let m = &m[..l.width];
            m.contains(&l.largest) && (l.shift_per_group.is_none() || m.contains(&0xFF))
        })
        .expect("an entry with the largest magnitude");
    let ls =
        [15u8, 0, 7, 3, 15, 9, 1, 12, 4, 15, 2, 8, 11, 5, 14, 6].map(|ls| ls % (l.largest_ls + 1));
    let mut values = Vec::with_capacity(256);
    for (run, &multiplier) in ls.iter().enumerate().take(256 / l.run_len) {
        let scale = (l.scale)(d, multiplier);
        if let Some(per_group) = l.shift_per_group {
            for group in 0..l.run_len / 8 {
                let index = if group == 0 {
                    top
                } else {
                    (run * 101 + group * 53) % l.grid.len()
                };
                let spread = if per_group { run + group } else { run };
                let negative = spread * 5 % 3 == 1;
                let delta = if negative { -IQ1_DELTA } else { IQ1_DELTA };
                for q in &l.grid[index].to_le_bytes() {
                    values.push(scale * (f32::from(*q as i8) + delta));
                }
            }
            continue;
        }
        for eight in 0..l.run_len / 8 {
            let code = ((run * 37 + eight * 11) % 128) as u8;
            let signs = if l.even_signs {
                EVEN_SIGNS[usize::from(code)]
            } else {
                code.wrapping_mul(3)
            };
            for j in 0..8 {
                let at = eight * 8 + j;
                let group = at / l.width;
                let index = if group == 0 {
                    top
                } else {
                    (run * 101 + group * 53) % l.grid.len()
                };
                let m = l.grid[index].to_le_bytes()[at % l.width];
                let sign = if signs >> j & 1 == 1 { -1.0 } else { 1.0 };
                values.push(scale * f32::from(m) * sign);
            }
        }
    }
    values
}

/// The lattice quantizer recovers super-blocks the formats represent exactly (whose runs
/// each hold the grid's largest magnitude, so that the first scale candidate is exact).
#[test]
fn lattice_super_blocks_on_the_grid_survive() {
    for (format, d) in [
        (QuantFormat::Iq3Xxs, 1.0f32 / 16.0),
        (QuantFormat::Iq3S, 1.0 / 32.0),
        (QuantFormat::Iq2Xxs, 1.0 / 8.0),
        (QuantFormat::Iq2Xs, 1.0 / 64.0),
        (QuantFormat::Iq2S, 1.0 / 4.0),
        (QuantFormat::Iq1S, 1.0 / 8.0),
        (QuantFormat::Iq1M, 1.0 / 2.0),
    ] {
        let values = lattice_super_block(&format, d);
        let back = dequantize(&format, &[256], &quantize(&format, &[256], &values));
        assert_bits_equal(&back, &values, format.name());
    }
}

/// The lattice formats' error on Gaussian-like weights: the root mean square of the round
/// trip's error, relative to the values', against q3_k's (3.44 bits a value, as iq3_s)
/// and q2_k's (2.63 bits) on the same values: iq3_s within 5% of q3_k, iq3_xxs (3.06
/// bits) between the two. The IQ2 and IQ1 formats, quantized without the importance
/// matrix llama.cpp requires for them, lie beyond q2_k, in the order of their sizes (iq2_s
/// 2.56 bits, iq2_xs 2.31, iq2_xxs 2.06, iq1_m 1.75, iq1_s 1.56), each within a bound over
/// q2_k's measured with a margin (1.25x, 1.52x, 1.72x, 1.96x and 2.17x measured).
#[test]
fn lattice_round_trips_against_the_k_quants() {
    // A sum of four uniforms: near-Gaussian, with tails.
    let uniform = sample(4096 * 4, 1.0);
    let values: Vec<f32> = (0..4096)
        .map(|i| {
            (0..4)
                .map(|k| uniform[(i * 4 + k * 4099) % uniform.len()])
                .sum()
        })
        .collect();
    let shape = [16, 256];
    let relative_rms = |format: &QuantFormat| {
        let back = dequantize(format, &shape, &quantize(format, &shape, &values));
        let err: f32 = values
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b) * (a - b))
            .sum();
        let norm: f32 = values.iter().map(|a| a * a).sum();
        (err / norm).sqrt()
    };
    let q3_k = relative_rms(&QuantFormat::Q3K);
    let iq3_s = relative_rms(&QuantFormat::Iq3S);
    let iq3_xxs = relative_rms(&QuantFormat::Iq3Xxs);
    let q2_k = relative_rms(&QuantFormat::Q2K);
    let iq2_s = relative_rms(&QuantFormat::Iq2S);
    let iq2_xs = relative_rms(&QuantFormat::Iq2Xs);
    let iq2_xxs = relative_rms(&QuantFormat::Iq2Xxs);
    let iq1_m = relative_rms(&QuantFormat::Iq1M);
    let iq1_s = relative_rms(&QuantFormat::Iq1S);
    eprintln!("relative rms error: q3_k {q3_k}, iq3_s {iq3_s}, iq3_xxs {iq3_xxs}, q2_k {q2_k}");
    eprintln!("relative rms error: iq2_s {iq2_s}, iq2_xs {iq2_xs}, iq2_xxs {iq2_xxs}");
    eprintln!("relative rms error: iq1_m {iq1_m}, iq1_s {iq1_s}");
    assert!(iq3_s <= q3_k * 1.05, "iq3_s {iq3_s} against q3_k {q3_k}");
    assert!(
        q3_k < iq3_xxs && iq3_xxs < q2_k,
        "iq3_xxs {iq3_xxs} against q3_k {q3_k}, q2_k {q2_k}"
    );
    assert!(
        q2_k < iq2_s && iq2_s < iq2_xs && iq2_xs < iq2_xxs && iq2_xxs < iq1_m && iq1_m < iq1_s,
        "iq2_s {iq2_s}, iq2_xs {iq2_xs}, iq2_xxs {iq2_xxs}, iq1_m {iq1_m}, iq1_s {iq1_s} against q2_k {q2_k}"
    );
    for (name, rms, bound) in [
        ("iq2_s", iq2_s, 1.3),
        ("iq2_xs", iq2_xs, 1.6),
        ("iq2_xxs", iq2_xxs, 1.8),
        ("iq1_m", iq1_m, 2.1),
        ("iq1_s", iq1_s, 2.3),
    ] {
        assert!(rms <= q2_k * bound, "{name} {rms} against q2_k {q2_k}");
    }
}

/// Values that are not finite (NaN, infinities) leave the lattice quantizers without a panic,
/// every value decodes finite, and the finite values round-trip as well as they do alone:
/// the scales come from the finite values.
#[test]
fn lattice_quantizers_take_values_that_are_not_finite() {
    let mut values = sample(512, 1.0);
    values[3] = f32::NAN;
    values[40] = f32::INFINITY;
    values[300] = f32::NEG_INFINITY;
    for format in [
        QuantFormat::Iq3Xxs,
        QuantFormat::Iq3S,
        QuantFormat::Iq2Xxs,
        QuantFormat::Iq2Xs,
        QuantFormat::Iq2S,
        QuantFormat::Iq1S,
        QuantFormat::Iq1M,
    ] {
        let back = dequantize(&format, &[512], &quantize(&format, &[512], &values));
        assert!(back.iter().all(|v| v.is_finite()), "{format}");
        // Every sub-block, those holding such values too, keeps a scale of its finite
        // values, and every group its entry: their errors stay within the IQ3 formats'
        // bound above for values half as large, 0.45 (measured 0.41 for iq3_xxs and 0.18
        // for iq3_s), and for the IQ2 and IQ1 formats within 0.6, below their round trip's
        // bounds (measured 0.56 for iq2_xxs, 0.53 for iq2_xs, 0.33 for iq2_s, 0.50 for
        // iq1_s and 0.51 for iq1_m).
        let err = values
            .iter()
            .zip(&back)
            .filter(|(a, _)| a.is_finite())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let bound = if format.name().starts_with("iq3") {
            0.45
        } else {
            0.6
        };
        assert!(err < bound, "{format}: {err}");
    }
}
