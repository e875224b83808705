//! Numeric tests of the reference interpreter: every op against hand-computed or
//! independently computed values.

use llm_ir::{
    dtype::DType,
    interp::{
        self, Interpreter, KvCache, KvValues, NoWeights, Sharded, Tensor, Value, value::round_float,
    },
    text,
    types::{KvCacheParams, KvStorage, Reduction},
};
use pliron::context::Context;

/// Runs `@f` of a module whose function has the given signature and body.
fn run(
    args: &[(&str, &str)],
    results: &[&str],
    body: &str,
    inputs: Vec<Value>,
) -> Result<Vec<Value>, String> {
    let decl: Vec<String> = args.iter().map(|(n, t)| format!("{n}: {t}")).collect();
    let types: Vec<&str> = args.iter().map(|(_, t)| *t).collect();
    let ir = format!(
        "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({}) -> ({})> {{\n      ^body({}):\n{body}\n    }}\n}}\n",
        types.join(", "),
        results.join(", "),
        decl.join(", ")
    );
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, &ir).map_err(|d| d.render("<test>"))?;
    let f = interp::find_func(&ctx, module, "f").ok_or("no @f")?;
    Interpreter::new(&ctx, &NoWeights)
        .run(f, inputs)
        .map_err(|e| e.to_string())
}

fn f32s(shape: &[usize], v: &[f32]) -> Value {
    Value::Tensor(Tensor::from_f32(shape.to_vec(), DType::F32, v.to_vec()))
}

fn i32s(shape: &[usize], v: &[i64]) -> Value {
    Value::Tensor(Tensor::from_i64(shape.to_vec(), DType::I32, v.to_vec()))
}

fn floats(v: &Value) -> Vec<f32> {
    v.tensor()
        .expect("tensor")
        .floats()
        .expect("floats")
        .to_vec()
}

fn assert_close(found: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(
        found.len(),
        expected.len(),
        "lengths: {found:?} vs {expected:?}"
    );
    for (i, (a, b)) in found.iter().zip(expected).enumerate() {
        assert!(
            (a - b).abs() <= tol,
            "element {i}: {a} vs {b} (found {found:?})"
        );
    }
}

/// A deterministic pseudo-random sequence in [-1, 1).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

const T2X3: &str = "llm.tensor <2x3xf32>";

#[test]
fn binary_ops_broadcast() {
    let out = run(
        &[("a", T2X3), ("b", "llm.tensor <3xf32>"), ("c", "llm.tensor <2x1xf32>")],
        &[T2X3, T2X3, T2X3, T2X3],
        "        s = llm.add a, b : llm.tensor <2x3xf32>;\n        d = llm.sub a, c : llm.tensor <2x3xf32>;\n        m = llm.mul b, c : llm.tensor <2x3xf32>;\n        q = llm.div a, b : llm.tensor <2x3xf32>;\n        llm.return s, d, m, q",
        vec![f32s(&[2, 3], &[1., 2., 3., 4., 5., 6.]), f32s(&[3], &[10., 20., 40.]), f32s(&[2, 1], &[1., 2.])],
    )
    .expect("runs");
    assert_close(&floats(&out[0]), &[11., 22., 43., 14., 25., 46.], 0.0);
    assert_close(&floats(&out[1]), &[0., 1., 2., 2., 3., 4.], 0.0);
    assert_close(&floats(&out[2]), &[10., 20., 40., 20., 40., 80.], 0.0);
    assert_close(&floats(&out[3]), &[0.1, 0.1, 0.075, 0.4, 0.25, 0.15], 1e-7);
}

/// `llm.maximum` and `llm.minimum` broadcast, propagate NaNs (as PyTorch's `maximum`
/// does, unlike `f32::max`), order `-0` below `+0`, and take integers too.
#[test]
fn maximum_and_minimum() {
    let out = run(
        &[("a", "llm.tensor <4xf32>"), ("b", "llm.tensor <1xf32>"), ("z", "llm.tensor <4xf32>")],
        &["llm.tensor <4xf32>", "llm.tensor <4xf32>", "llm.tensor <4xf32>", "llm.tensor <4xf32>"],
        "        x = llm.maximum a, b : llm.tensor <4xf32>;\n        n = llm.minimum a, b : llm.tensor <4xf32>;\n        zx = llm.maximum z, a : llm.tensor <4xf32>;\n        zn = llm.minimum z, a : llm.tensor <4xf32>;\n        llm.return x, n, zx, zn",
        vec![f32s(&[4], &[-2.0, f32::NAN, 3.0, 0.0]), f32s(&[1], &[0.5]), f32s(&[4], &[-0.0, 1.0, 3.0, -0.0])],
    )
    .expect("runs");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&floats(&out[0])), bits(&[0.5, f32::NAN, 3.0, 0.5]));
    assert_eq!(bits(&floats(&out[1])), bits(&[-2.0, f32::NAN, 0.5, 0.0]));
    // Against `a` (-2, NaN, 3, +0), z's -0 loses the maximum to +0 and wins the minimum.
    assert_eq!(bits(&floats(&out[2])), bits(&[-0.0, f32::NAN, 3.0, 0.0]));
    assert_eq!(bits(&floats(&out[3])), bits(&[-2.0, f32::NAN, 3.0, -0.0]));
    let ints = run(
        &[("a", "llm.tensor <3xi32>"), ("b", "llm.tensor <3xi32>")],
        &["llm.tensor <3xi32>"],
        "        x = llm.maximum a, b : llm.tensor <3xi32>;\n        llm.return x",
        vec![i32s(&[3], &[-7, 4, 0]), i32s(&[3], &[2, -4, 0])],
    )
    .expect("runs");
    assert_eq!(
        ints[0].tensor().expect("a tensor").ints().expect("ints"),
        [2, 4, 0]
    );
}

#[test]
fn integer_division_by_zero_is_an_error() {
    let err = run(
        &[("a", "llm.tensor <2xi32>")],
        &["llm.tensor <2xi32>"],
        "        q = llm.div a, a : llm.tensor <2xi32>;\n        llm.return q",
        vec![i32s(&[2], &[7, 0])],
    )
    .expect_err("division by zero");
    assert!(err.contains("integer division by zero"), "{err}");
}

#[test]
fn unary_ops() {
    let x = [-1.5f32, 0.0, 0.5, 2.0];
    let ops = [
        "exp", "neg", "tanh", "sigmoid", "silu", "gelu", "erf", "relu",
    ];
    let body: Vec<String> = ops
        .iter()
        .map(|o| format!("        {o} = llm.{o} x : llm.tensor <4xf32>;"))
        .collect();
    let out = run(
        &[("x", "llm.tensor <4xf32>")],
        &["llm.tensor <4xf32>"; 8],
        &format!("{}\n        llm.return {}", body.join("\n"), ops.join(", ")),
        vec![f32s(&[4], &x)],
    )
    .expect("runs");
    let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
    let gelu = |v: f32| {
        0.5 * v * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
    };
    let expect: [Vec<f32>; 8] = [
        x.iter().map(|v| v.exp()).collect(),
        x.iter().map(|v| -v).collect(),
        x.iter().map(|v| v.tanh()).collect(),
        x.iter().map(|&v| sig(v)).collect(),
        x.iter().map(|&v| v * sig(v)).collect(),
        x.iter().map(|&v| gelu(v)).collect(),
        // erf's values (Abramowitz and Stegun's table 7.1), rounded to f32.
        vec![-0.966_105_15, 0.0, 0.520_499_9, 0.995_322_3],
        vec![0.0, 0.0, 0.5, 2.0],
    ];
    for (i, e) in expect.iter().enumerate() {
        assert_close(&floats(&out[i]), e, 1e-6);
    }
    // Known values.
    assert_close(&floats(&out[3])[1..2], &[0.5], 0.0);
    assert_close(&floats(&out[5])[3..4], &[1.954_597_7], 1e-5);
    let roots = run(
        &[("x", "llm.tensor <2xf32>")],
        &["llm.tensor <2xf32>", "llm.tensor <2xf32>"],
        "        s = llm.sqrt x : llm.tensor <2xf32>;\n        r = llm.rsqrt x : llm.tensor <2xf32>;\n        llm.return s, r",
        vec![f32s(&[2], &[4.0, 0.25])],
    )
    .expect("runs");
    assert_close(&floats(&roots[0]), &[2.0, 0.5], 0.0);
    assert_close(&floats(&roots[1]), &[0.5, 2.0], 0.0);
}

#[test]
fn half_precision_results_are_rounded() {
    let out = run(
        &[("a", "llm.tensor <2xf32>")],
        &["llm.tensor <2xf16>", "llm.tensor <2xbf16>"],
        "        h = llm.cast a : llm.tensor <2xf16>;\n        b = llm.cast a : llm.tensor <2xbf16>;\n        llm.return h, b",
        vec![f32s(&[2], &[1.0 + 1.0 / 4096.0, 5.001])],
    )
    .expect("runs");
    assert_eq!(floats(&out[0]), vec![1.0, 5.0]);
    assert_eq!(floats(&out[1]), vec![1.0, 5.0]);
}

#[test]
fn matmul_plain_transposed_and_batched() {
    let out = run(
        &[("a", T2X3), ("b", "llm.tensor <3x2xf32>"), ("bt", "llm.tensor <2x3xf32>"), ("x", "llm.tensor <2x1x3xf32>")],
        &["llm.tensor <2x2xf32>", "llm.tensor <2x2xf32>", "llm.tensor <2x1x2xf32>"],
        "        p = llm.matmul a, b : llm.tensor <2x2xf32>;\n        t = llm.matmul a, bt {transpose_rhs = true} : llm.tensor <2x2xf32>;\n        q = llm.matmul x, b : llm.tensor <2x1x2xf32>;\n        llm.return p, t, q",
        vec![
            f32s(&[2, 3], &[1., 2., 3., 4., 5., 6.]),
            f32s(&[3, 2], &[7., 8., 9., 10., 11., 12.]),
            f32s(&[2, 3], &[7., 9., 11., 8., 10., 12.]),
            f32s(&[2, 1, 3], &[1., 0., 0., 0., 0., 1.]),
        ],
    )
    .expect("runs");
    assert_close(&floats(&out[0]), &[58., 64., 139., 154.], 0.0);
    assert_close(&floats(&out[1]), &[58., 64., 139., 154.], 0.0);
    assert_close(&floats(&out[2]), &[7., 8., 11., 12.], 0.0);
}

#[test]
fn embedding_gathers_rows_and_rejects_bad_ids() {
    let table = f32s(&[3, 2], &[0., 1., 10., 11., 20., 21.]);
    let body = "        e = llm.embedding t, ids : llm.tensor <2x2xf32>;\n        llm.return e";
    let args = [("t", "llm.tensor <3x2xf32>"), ("ids", "llm.tensor <2xi32>")];
    let out = run(
        &args,
        &["llm.tensor <2x2xf32>"],
        body,
        vec![table.clone(), i32s(&[2], &[2, 0])],
    )
    .expect("runs");
    assert_close(&floats(&out[0]), &[20., 21., 0., 1.], 0.0);
    let err = run(
        &args,
        &["llm.tensor <2x2xf32>"],
        body,
        vec![table, i32s(&[2], &[3, 0])],
    )
    .expect_err("bad id");
    assert!(err.contains("token id 3 is out of range"), "{err}");
}

#[test]
fn norms_and_softmax() {
    let out = run(
        &[("x", "llm.tensor <1x2xf32>"), ("w", "llm.tensor <2xf32>"), ("y", "llm.tensor <3xf32>"), ("one", "llm.tensor <3xf32>"), ("zero", "llm.tensor <3xf32>")],
        &["llm.tensor <1x2xf32>", "llm.tensor <3xf32>", "llm.tensor <3xf32>"],
        "        r = llm.rms_norm x, w {eps = 1e-12} : llm.tensor <1x2xf32>;\n        l = llm.layer_norm y, one, zero {eps = 1e-12} : llm.tensor <3xf32>;\n        s = llm.softmax y : llm.tensor <3xf32>;\n        llm.return r, l, s",
        vec![f32s(&[1, 2], &[3., 4.]), f32s(&[2], &[1., 2.]), f32s(&[3], &[1., 2., 3.]), f32s(&[3], &[1.; 3]), f32s(&[3], &[0.; 3])],
    )
    .expect("runs");
    let rms = (12.5f32).sqrt();
    assert_close(&floats(&out[0]), &[3. / rms, 8. / rms], 1e-6);
    let sd = (2.0f32 / 3.0).sqrt();
    assert_close(&floats(&out[1]), &[-1. / sd, 0., 1. / sd], 1e-5);
    let z = 1f32.exp() + 2f32.exp() + 3f32.exp();
    assert_close(
        &floats(&out[2]),
        &[1f32.exp() / z, 2f32.exp() / z, 3f32.exp() / z],
        1e-6,
    );
    let cols = run(
        &[("x", "llm.tensor <2x2xf32>")],
        &["llm.tensor <2x2xf32>"],
        "        s = llm.softmax x {axis = 0} : llm.tensor <2x2xf32>;\n        llm.return s",
        vec![f32s(&[2, 2], &[0., 5., 0., 5.])],
    )
    .expect("runs");
    assert_close(&floats(&cols[0]), &[0.5, 0.5, 0.5, 0.5], 0.0);
}

#[test]
fn rope_rotates_pairs_by_position() {
    let out = run(
        &[("x", "llm.tensor <2x1x4xf32>"), ("p", "llm.tensor <2xi32>")],
        &["llm.tensor <2x1x4xf32>", "llm.tensor <2x1x4xf32>"],
        "        a = llm.rope x, p {theta = 100.0} : llm.tensor <2x1x4xf32>;\n        b = llm.rope x, p {theta = 100.0, layout = half} : llm.tensor <2x1x4xf32>;\n        llm.return a, b",
        vec![f32s(&[2, 1, 4], &[1., 0., 1., 0., 1., 0., 1., 0.]), i32s(&[2], &[0, 1])],
    )
    .expect("runs");
    // Pair 0 turns by p radians, pair 1 by p / 100^(2/4) = p / 10.
    let (c1, s1, c2, s2) = (1f32.cos(), 1f32.sin(), 0.1f32.cos(), 0.1f32.sin());
    assert_close(&floats(&out[0]), &[1., 0., 1., 0., c1, s1, c2, s2], 1e-6);
    // Half layout pairs (0, 2) (angle p) and (1, 3) (angle p / 10, but both are zero).
    assert_close(
        &floats(&out[1]),
        &[1., 0., 1., 0., c1 - s1, 0., s1 + c1, 0.],
        1e-6,
    );
}

/// Frequency factors divide each pair's frequency: pair 1's factor of 4 turns it by
/// p / 40 instead of p / 10, and factors of 1 change no bit.
#[test]
fn rope_frequency_factors_divide_the_frequencies() {
    let out = run(
        &[
            ("x", "llm.tensor <2x1x4xf32>"),
            ("p", "llm.tensor <2xi32>"),
            ("f", "llm.tensor <2xf32>"),
            ("ones", "llm.tensor <2xf32>"),
        ],
        &[
            "llm.tensor <2x1x4xf32>",
            "llm.tensor <2x1x4xf32>",
            "llm.tensor <2x1x4xf32>",
        ],
        "        a = llm.rope x, p, f {theta = 100.0} : llm.tensor <2x1x4xf32>;\n        b = llm.rope x, p, ones {theta = 100.0} : llm.tensor <2x1x4xf32>;\n        c = llm.rope x, p {theta = 100.0} : llm.tensor <2x1x4xf32>;\n        llm.return a, b, c",
        vec![
            f32s(&[2, 1, 4], &[1., 0., 1., 0., 1., 0., 1., 0.]),
            i32s(&[2], &[0, 3]),
            f32s(&[2], &[1., 4.]),
            f32s(&[2], &[1., 1.]),
        ],
    )
    .expect("runs");
    let (c1, s1, c2, s2) = (3f32.cos(), 3f32.sin(), 0.075f32.cos(), 0.075f32.sin());
    assert_close(&floats(&out[0]), &[1., 0., 1., 0., c1, s1, c2, s2], 1e-6);
    assert_eq!(floats(&out[1]), floats(&out[2]));
}

/// `mscale` scales each rotated pair's sine and cosine, so the rotated features grow by
/// it while the features past `rotary_dim` pass through as they are.
#[test]
fn rope_mscale_scales_the_rotated_features_only() {
    let out = run(
        &[("x", "llm.tensor <1x1x6xf32>"), ("p", "llm.tensor <1xi32>")],
        &["llm.tensor <1x1x6xf32>"],
        "        a = llm.rope x, p {theta = 100.0, rotary_dim = 4, mscale = 1.5} : llm.tensor <1x1x6xf32>;\n        llm.return a",
        vec![f32s(&[1, 1, 6], &[1., 2., 3., 4., 5., 6.]), i32s(&[1], &[2])],
    )
    .expect("runs");
    // Pair 0 turns by 2 radians, pair 1 by 2 / 100^(2/4) = 0.2.
    let (c0, s0) = (2f32.cos() * 1.5, 2f32.sin() * 1.5);
    let (c1, s1) = (0.2f32.cos() * 1.5, 0.2f32.sin() * 1.5);
    let expected = [
        c0 - 2. * s0,
        s0 + 2. * c0,
        3. * c1 - 4. * s1,
        3. * s1 + 4. * c1,
        5.,
        6.,
    ];
    assert_close(&floats(&out[0]), &expected, 1e-6);
}

#[test]
fn attention_by_hand() {
    // One query against two keys with head dim 1 and scale 1: p = softmax([0, 1]).
    let q = f32s(&[1, 1, 1], &[1.]);
    let k = f32s(&[2, 1, 1], &[0., 1.]);
    let v = f32s(&[2, 1, 1], &[10., 20.]);
    let args = [
        ("q", "llm.tensor <1x1x1xf32>"),
        ("k", "llm.tensor <2x1x1xf32>"),
        ("v", "llm.tensor <2x1x1xf32>"),
    ];
    let body = |params: &str| {
        format!(
            "        o = llm.attention q, k, v {{{params}}} : llm.tensor <1x1x1xf32>;\n        llm.return o"
        )
    };
    let full = run(
        &args,
        &["llm.tensor <1x1x1xf32>"],
        &body("kv_heads = 1, scale = 1.0"),
        vec![q.clone(), k.clone(), v.clone()],
    )
    .expect("runs");
    let p1 = 1f32.exp() / (1.0 + 1f32.exp());
    assert_close(&floats(&full[0]), &[10. * (1. - p1) + 20. * p1], 1e-5);
    // A window of 1 sees only the query's own position (the last key).
    let windowed = run(
        &args,
        &["llm.tensor <1x1x1xf32>"],
        &body("kv_heads = 1, scale = 1.0, causal = true, window = 1"),
        vec![q.clone(), k.clone(), v.clone()],
    )
    .expect("runs");
    assert_close(&floats(&windowed[0]), &[20.], 0.0);
    // Soft-capped at 0.5, the scores [0, 3] (scale 3) become [0, 0.5 tanh(6)].
    let capped = run(
        &args,
        &["llm.tensor <1x1x1xf32>"],
        &body("kv_heads = 1, scale = 3.0, softcap = 0.5"),
        vec![q, k, v],
    )
    .expect("runs");
    let s1 = 0.5 * 6f32.tanh();
    let p1 = s1.exp() / (1.0 + s1.exp());
    assert_close(&floats(&capped[0]), &[10. * (1. - p1) + 20. * p1], 1e-5);
}

#[test]
fn causal_gqa_attention_matches_a_direct_computation() {
    let (t, h, kvh, d) = (3usize, 4usize, 2usize, 4usize);
    let (q, k, v) = (
        random(t * h * d, 1),
        random(t * kvh * d, 2),
        random(t * kvh * d, 3),
    );
    let out = run(
        &[("q", "llm.tensor <3x4x4xf32>"), ("k", "llm.tensor <3x2x4xf32>"), ("v", "llm.tensor <3x2x4xf32>")],
        &["llm.tensor <3x4x4xf32>"],
        "        o = llm.attention q, k, v {kv_heads = 2, causal = true} : llm.tensor <3x4x4xf32>;\n        llm.return o",
        vec![f32s(&[t, h, d], &q), f32s(&[t, kvh, d], &k), f32s(&[t, kvh, d], &v)],
    )
    .expect("runs");
    let mut expected = Vec::new();
    for i in 0..t {
        for head in 0..h {
            let kv = head / (h / kvh);
            let scores: Vec<f64> = (0..=i)
                .map(|j| {
                    (0..d)
                        .map(|x| {
                            f64::from(q[(i * h + head) * d + x])
                                * f64::from(k[(j * kvh + kv) * d + x])
                        })
                        .sum::<f64>()
                        / (d as f64).sqrt()
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for x in 0..d {
                let o: f64 = (0..=i)
                    .map(|j| (scores[j] - max).exp() / z * f64::from(v[(j * kvh + kv) * d + x]))
                    .sum();
                expected.push(o as f32);
            }
        }
    }
    assert_close(&floats(&out[0]), &expected, 1e-5);
}

fn cache(blocks: usize, block_size: u64, window: Option<u64>) -> KvCache {
    float_cache(DType::F32, blocks, block_size, window)
}

/// A zeroed pool of 2 layers of 2 KV heads of 4, stored as `dtype`.
fn float_cache(dtype: DType, blocks: usize, block_size: u64, window: Option<u64>) -> KvCache {
    let params = KvCacheParams {
        layers: 2,
        kv_heads: 2,
        head_dim: 4,
        block_size,
        blocks: None,
        storage: KvStorage::Float(dtype),
        window,
    };
    KvCache::new(params, blocks)
}

const CACHE_T: &str = "llm.paged_kv_cache <layers = 2, kv_heads = 2, head_dim = 4, block_size = 2, blocks = ?, dtype = f32>";

#[test]
fn append_kv_writes_the_given_slots_of_the_given_layer() {
    let k = random(3 * 8, 4);
    let v = random(3 * 8, 5);
    let out = run(
        &[("c", CACHE_T), ("k", "llm.tensor <3x2x4xf32>"), ("v", "llm.tensor <3x2x4xf32>"), ("s", "llm.tensor <3xi32>")],
        &[CACHE_T],
        "        c1 = llm.append_kv c, k, v, s {layer = 1} : llm.paged_kv_cache <layers = 2, kv_heads = 2, head_dim = 4, block_size = 2, blocks = ?, dtype = f32>;\n        llm.return c1",
        vec![Value::Cache(cache(4, 2, None)), f32s(&[3, 2, 4], &k), f32s(&[3, 2, 4], &v), i32s(&[3], &[5, 0, 2])],
    )
    .expect("runs");
    let c = out[0].cache().expect("cache");
    let (ck, cv) = (c.k.floats(), c.v.floats());
    for (n, slot) in [5usize, 0, 2].into_iter().enumerate() {
        let at = c.slot_offset(1, slot);
        assert_eq!(&ck[at..at + 8], &k[n * 8..n * 8 + 8]);
        assert_eq!(&cv[at..at + 8], &v[n * 8..n * 8 + 8]);
    }
    // Layer 0 and unwritten slots stay zero.
    assert!(ck[..c.slot_offset(1, 0)].iter().all(|&x| x == 0.0));
    assert!(
        ck[c.slot_offset(1, 1)..c.slot_offset(1, 2)]
            .iter()
            .all(|&x| x == 0.0)
    );
}

/// An f16 or bf16 cache keeps 16 bits per element: appends round each key and value to the
/// storage type, and paged attention reads the rounded values back.
#[test]
fn sixteen_bit_caches_hold_rounded_halves() {
    let (t, h, kvh, d) = (3usize, 2usize, 2usize, 4usize);
    let (q, k, v) = (
        random(t * h * d, 21),
        random(t * kvh * d, 22),
        random(t * kvh * d, 23),
    );
    for dtype in [DType::F16, DType::BF16] {
        let ty = format!(
            "llm.paged_kv_cache <layers = 2, kv_heads = 2, head_dim = 4, block_size = 2, blocks = ?, dtype = {dtype}>"
        );
        let out = run(
            &[("c", &ty), ("k", "llm.tensor <3x2x4xf32>"), ("v", "llm.tensor <3x2x4xf32>"), ("s", "llm.tensor <3xi32>"), ("q", "llm.tensor <1x3x2x4xf32>"), ("tables", "llm.tensor <1x2xi32>"), ("lens", "llm.tensor <1xi32>")],
            &["llm.tensor <1x3x2x4xf32>", &ty],
            &format!("        c1 = llm.append_kv c, k, v, s {{layer = 0}} : {ty};\n        o = llm.paged_attention q, c1, tables, lens {{layer = 0, kv_heads = 2}} : llm.tensor <1x3x2x4xf32>;\n        llm.return o, c1"),
            vec![Value::Cache(float_cache(dtype, 2, 2, None)), f32s(&[t, kvh, d], &k), f32s(&[t, kvh, d], &v), i32s(&[t], &[2, 3, 0]), f32s(&[1, t, h, d], &q), i32s(&[1, 2], &[1, 0]), i32s(&[1], &[3])],
        )
        .expect("runs");
        let cache = out[1].cache().expect("cache");
        assert_eq!(
            cache.k.bytes().len(),
            2 * cache.k.len(),
            "{dtype}: 16 bits each"
        );
        let round = |x: &[f32]| x.iter().map(|&x| round_float(dtype, x)).collect::<Vec<_>>();
        let (kr, vr) = (round(&k), round(&v));
        assert_eq!(cache.rows(&cache.k, 0, &[2, 3, 0]), kr, "{dtype} keys");
        assert_eq!(cache.rows(&cache.v, 0, &[2, 3, 0]), vr, "{dtype} values");
        let contiguous = causal_attention([t, h, kvh, d], &q, &kr, &vr);
        assert_close(&floats(&out[0]), &contiguous, 1e-6);
    }
}

#[test]
fn paged_attention_equals_contiguous_attention_and_reads_only_its_blocks() {
    // A sequence of 5 positions in blocks [3, 1, 0] of size 2; block 2 belongs to someone else.
    let (t, h, kvh, d) = (5usize, 4usize, 2usize, 4usize);
    let (q, k, v) = (
        random(t * h * d, 6),
        random(t * kvh * d, 7),
        random(t * kvh * d, 8),
    );
    let table = [3i64, 1, 0];
    let slots: Vec<i64> = (0..t as i64)
        .map(|p| table[(p / 2) as usize] * 2 + p % 2)
        .collect();
    let mut pool = cache(4, 2, None);
    pool.k = KvValues::F32(vec![1e6; pool.k.len()]);
    pool.v = pool.k.clone();
    let cache_ty = CACHE_T;
    let paged = run(
        &[("c", cache_ty), ("k", "llm.tensor <5x2x4xf32>"), ("v", "llm.tensor <5x2x4xf32>"), ("s", "llm.tensor <5xi32>"), ("q", "llm.tensor <1x5x4x4xf32>"), ("tables", "llm.tensor <1x3xi32>"), ("lens", "llm.tensor <1xi32>")],
        &["llm.tensor <1x5x4x4xf32>"],
        &format!("        c1 = llm.append_kv c, k, v, s {{layer = 0}} : {cache_ty};\n        o = llm.paged_attention q, c1, tables, lens {{layer = 0, kv_heads = 2}} : llm.tensor <1x5x4x4xf32>;\n        llm.return o"),
        vec![Value::Cache(pool), f32s(&[t, kvh, d], &k), f32s(&[t, kvh, d], &v), i32s(&[t], &slots), f32s(&[1, t, h, d], &q), i32s(&[1, 3], &table), i32s(&[1], &[5])],
    )
    .expect("runs");
    let contiguous = causal_attention([t, h, kvh, d], &q, &k, &v);
    assert_close(&floats(&paged[0]), &contiguous, 1e-6);
}

/// Attention sinks: each head's weights are `exp(s_j) / (exp(sink) + sum_i exp(s_i))`,
/// computed here by hand for the last of three positions (4 query heads over 2 KV heads
/// of 4; sinks that dominate, vanish and fall between).
#[test]
fn paged_attention_with_sinks_gives_weight_to_no_value() {
    let (t, h, kvh, d) = (3usize, 4usize, 2usize, 4usize);
    let (q, k, v) = (
        random(h * d, 30),
        random(t * kvh * d, 31),
        random(t * kvh * d, 32),
    );
    let sinks = [6.0f32, -30.0, 0.0, 0.4];
    let out = run(
        &[("c", CACHE_T), ("k", "llm.tensor <3x2x4xf32>"), ("v", "llm.tensor <3x2x4xf32>"), ("s", "llm.tensor <3xi32>"), ("q", "llm.tensor <1x1x4x4xf32>"), ("tables", "llm.tensor <1x2xi32>"), ("lens", "llm.tensor <1xi32>"), ("z", "llm.tensor <4xf32>")],
        &["llm.tensor <1x1x4x4xf32>"],
        &format!("        c1 = llm.append_kv c, k, v, s {{layer = 0}} : {CACHE_T};\n        o = llm.paged_attention q, c1, tables, lens, z {{layer = 0, kv_heads = 2}} : llm.tensor <1x1x4x4xf32>;\n        llm.return o"),
        vec![Value::Cache(cache(2, 2, None)), f32s(&[t, kvh, d], &k), f32s(&[t, kvh, d], &v), i32s(&[t], &[2, 3, 0]), f32s(&[1, 1, h, d], &q), i32s(&[1, 2], &[1, 0]), i32s(&[1], &[3]), f32s(&[h], &sinks)],
    )
    .expect("runs");
    let mut want = Vec::new();
    for (head, &sink) in sinks.iter().enumerate() {
        let row = |x: &[f32], j: usize| x[(j * kvh + head / 2) * d..][..d].to_vec();
        let scores: Vec<f64> = (0..t)
            .map(|j| {
                let dot: f64 = (0..d)
                    .map(|i| f64::from(q[head * d + i] * row(&k, j)[i]))
                    .sum();
                (dot / 2.0).exp()
            })
            .collect();
        let total = f64::from(sink).exp() + scores.iter().sum::<f64>();
        want.extend((0..d).map(|i| {
            let sum: f64 = (0..t).map(|j| scores[j] * f64::from(row(&v, j)[i])).sum();
            (sum / total) as f32
        }));
    }
    assert_close(&floats(&out[0]), &want, 1e-6);
    // The dominant sink leaves little weight to the values, the vanishing one all of it.
    let norm = |head: usize| {
        out[0].tensor().expect("t").floats().expect("f")[head * d..][..d]
            .iter()
            .map(|x| x.abs())
            .sum::<f32>()
    };
    assert!(norm(0) < 0.05 * norm(1), "{} vs {}", norm(0), norm(1));
}

/// The causal `llm.attention` of `t` query rows of `h` heads of `d` over the keys `k` and
/// values `v` of `kvh` heads.
fn causal_attention([t, h, kvh, d]: [usize; 4], q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
    let (qt, kt) = (
        format!("llm.tensor <{t}x{h}x{d}xf32>"),
        format!("llm.tensor <{t}x{kvh}x{d}xf32>"),
    );
    let out = run(
        &[("q", &qt), ("k", &kt), ("v", &kt)],
        &[&qt],
        &format!("        o = llm.attention q, k, v {{kv_heads = {kvh}, causal = true}} : {qt};\n        llm.return o"),
        vec![f32s(&[t, h, d], q), f32s(&[t, kvh, d], k), f32s(&[t, kvh, d], v)],
    )
    .expect("runs");
    floats(&out[0])
}

#[test]
fn paged_attention_honours_sliding_windows_and_lookup_kv_gathers() {
    let (t, h, kvh, d) = (4usize, 2usize, 2usize, 4usize);
    let (q, k, v) = (
        random(t * h * d, 9),
        random(t * kvh * d, 10),
        random(t * kvh * d, 11),
    );
    let ty = "llm.paged_kv_cache <layers = 2, kv_heads = 2, head_dim = 4, block_size = 2, blocks = ?, dtype = f32, window = 2>";
    let out = run(
        &[("c", ty), ("k", "llm.tensor <4x2x4xf32>"), ("v", "llm.tensor <4x2x4xf32>"), ("s", "llm.tensor <4xi32>"), ("q", "llm.tensor <1x4x2x4xf32>"), ("tables", "llm.tensor <1x2xi32>"), ("lens", "llm.tensor <1xi32>"), ("table", "llm.tensor <2xi32>"), ("len", "llm.tensor <i32>")],
        &["llm.tensor <1x4x2x4xf32>", "llm.tensor <4x2x4xf32>"],
        &format!("        c1 = llm.append_kv c, k, v, s {{layer = 0}} : {ty};\n        o = llm.paged_attention q, c1, tables, lens {{layer = 0, kv_heads = 2, window = 2}} : llm.tensor <1x4x2x4xf32>;\n        kk, vv = llm.lookup_kv c1, table, len {{layer = 0}} : llm.tensor <4x2x4xf32>, llm.tensor <4x2x4xf32>;\n        llm.return o, kk"),
        vec![
            Value::Cache(cache(2, 2, Some(2))),
            f32s(&[t, kvh, d], &k),
            f32s(&[t, kvh, d], &v),
            i32s(&[t], &[2, 3, 0, 1]),
            f32s(&[1, t, h, d], &q),
            i32s(&[1, 2], &[1, 0]),
            i32s(&[1], &[4]),
            i32s(&[2], &[1, 0]),
            Value::Tensor(Tensor::from_i64(vec![], DType::I32, vec![4])),
        ],
    )
    .expect("runs");
    let contiguous = run(
        &[("q", "llm.tensor <4x2x4xf32>"), ("k", "llm.tensor <4x2x4xf32>"), ("v", "llm.tensor <4x2x4xf32>")],
        &["llm.tensor <4x2x4xf32>"],
        "        o = llm.attention q, k, v {kv_heads = 2, causal = true, window = 2} : llm.tensor <4x2x4xf32>;\n        llm.return o",
        vec![f32s(&[t, h, d], &q), f32s(&[t, kvh, d], &k), f32s(&[t, kvh, d], &v)],
    )
    .expect("runs");
    assert_close(&floats(&out[0]), &floats(&contiguous[0]), 1e-6);
    assert_eq!(floats(&out[1]), k);
}

#[test]
fn quantized_matmul_is_matmul_with_the_dequantized_weight() {
    let (x, w) = (random(2 * 64, 12), random(3 * 64, 13));
    let out = run(
        &[("x", "llm.tensor <2x64xf32>"), ("w", "llm.tensor <3x64xf32>")],
        &["llm.tensor <2x3xf32>", "llm.tensor <2x3xf32>"],
        "        q = llm.quantize w : llm.quantized_tensor <3x64, q8_0>;\n        y = llm.quantized_matmul x, q : llm.tensor <2x3xf32>;\n        d = llm.dequantize q : llm.tensor <3x64xf32>;\n        z = llm.matmul x, d {transpose_rhs = true} : llm.tensor <2x3xf32>;\n        llm.return y, z",
        vec![f32s(&[2, 64], &x), f32s(&[3, 64], &w)],
    )
    .expect("runs");
    assert_eq!(floats(&out[0]), floats(&out[1]));
}

#[test]
fn shape_ops() {
    let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
    let out = run(
        &[("x", "llm.tensor <2x3x2xf32>"), ("y", "llm.tensor <1x3x2xf32>")],
        &["llm.tensor <6x2xf32>", "llm.tensor <3x2x2xf32>", "llm.tensor <1x2x1xf32>", "llm.tensor <3x3x2xf32>", "llm.tensor <2x3x2xi32>", "llm.tensor <2x3xi64>"],
        "        r = llm.reshape x : llm.tensor <6x2xf32>;\n        t = llm.transpose x {perm = [1, 0, 2]} : llm.tensor <3x2x2xf32>;\n        s = llm.slice x {starts = [1, 0, 1], steps = [1, 2, 1]} : llm.tensor <1x2x1xf32>;\n        c = llm.concat x, y {axis = 0} : llm.tensor <3x3x2xf32>;\n        i = llm.cast x : llm.tensor <2x3x2xi32>;\n        a = llm.argmax x {axis = 2} : llm.tensor <2x3xi64>;\n        llm.return r, t, s, c, i, a",
        vec![f32s(&[2, 3, 2], &x), f32s(&[1, 3, 2], &[-1.; 6])],
    )
    .expect("runs");
    assert_eq!(floats(&out[0]), x);
    assert_eq!(
        floats(&out[1]),
        vec![0., 1., 6., 7., 2., 3., 8., 9., 4., 5., 10., 11.]
    );
    assert_eq!(floats(&out[2]), vec![7., 11.]);
    assert_eq!(floats(&out[3])[12..], [-1.; 6]);
    assert_eq!(
        out[4].tensor().expect("t").ints().expect("ints"),
        (0..12).collect::<Vec<i64>>()
    );
    assert_eq!(
        out[5].tensor().expect("t").ints().expect("ints"),
        vec![1; 6]
    );
}

#[test]
fn argmax_takes_the_first_maximum() {
    let out = run(
        &[("x", "llm.tensor <4xf32>")],
        &["llm.tensor <i32>"],
        "        a = llm.argmax x : llm.tensor <i32>;\n        llm.return a",
        vec![f32s(&[4], &[1., 3., 3., 2.])],
    )
    .expect("runs");
    assert_eq!(out[0].tensor().expect("t").ints().expect("ints"), [1]);
}

#[test]
fn topk_takes_the_largest_first_and_the_lower_index_on_ties() {
    let x = [1., 3., f32::NAN, 3., -2., f32::NAN, 0.5, 7., 7., 1.];
    let out = run(
        &[("x", "llm.tensor <2x5xf32>")],
        &["llm.tensor <2x3xf32>", "llm.tensor <2x3xi64>"],
        "        v, i = llm.topk x {k = 3} : llm.tensor <2x3xf32>, llm.tensor <2x3xi64>;\n        llm.return v, i",
        vec![f32s(&[2, 5], &x)],
    )
    .expect("runs");
    // Row 0: the two 3s in index order, then 1 (the NaN never wins against a number
    // before it). Row 1: the NaN comes first, and nothing is greater than it, so it leads; then the 7s.
    let values = floats(&out[0]);
    assert_eq!(values[..3], [3., 3., 1.]);
    assert!(values[3].is_nan() && values[4..] == [7., 7.]);
    assert_eq!(
        out[1].tensor().expect("t").ints().expect("ints"),
        [1, 3, 0, 0, 2, 3]
    );
    let too_many = run(
        &[("x", "llm.tensor <?xf32>")],
        &["llm.tensor <?xi32>"],
        "        v, i = llm.topk x {k = 3} : llm.tensor <?xf32>, llm.tensor <?xi32>;\n        llm.return i",
        vec![f32s(&[2], &[1., 2.])],
    );
    assert!(too_many.expect_err("k > n").contains("k = 3"));
}

/// `llm.expert_matmul` against each slot's own matmul with its expert's dequantized matrix,
/// for a shared and a per-slot input, float and quantized experts; an id out of range is an
/// error.
#[test]
fn expert_matmul_multiplies_each_slot_by_its_expert() {
    let (t, s, e, n, k) = (3, 2, 4, 5, 32);
    let x = random(t * k, 31);
    let xs = random(t * s * k, 32);
    let w = random(e * n * k, 33);
    let ids = [2, 0, 3, 3, 1, 2];
    let out = run(
        &[
            ("x", "llm.tensor <3x32xf32>"),
            ("xs", "llm.tensor <3x2x32xf32>"),
            ("w", "llm.tensor <4x5x32xf32>"),
            ("ids", "llm.tensor <3x2xi32>"),
        ],
        &["llm.tensor <3x2x5xf32>"; 4],
        "        y = llm.expert_matmul x, w, ids : llm.tensor <3x2x5xf32>;
        z = llm.expert_matmul xs, w, ids : llm.tensor <3x2x5xf32>;
        q = llm.quantize w : llm.quantized_tensor <4x5x32, q4_0>;
        d = llm.dequantize q : llm.tensor <4x5x32xf32>;
        yq = llm.expert_matmul x, q, ids : llm.tensor <3x2x5xf32>;
        yd = llm.expert_matmul x, d, ids : llm.tensor <3x2x5xf32>;
        llm.return y, z, yq, yd",
        vec![
            f32s(&[t, k], &x),
            f32s(&[t, s, k], &xs),
            f32s(&[e, n, k], &w),
            i32s(&[t, s], &ids),
        ],
    )
    .expect("runs");
    let expected = |input: &[f32], per_slot: bool| -> Vec<f32> {
        let mut out = Vec::new();
        for (slot, &id) in ids.iter().enumerate() {
            let row = if per_slot { slot } else { slot / s };
            let xr = &input[row * k..(row + 1) * k];
            for j in 0..n {
                let wr = &w[(id as usize * n + j) * k..][..k];
                out.push(xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>());
            }
        }
        out
    };
    assert_close(&floats(&out[0]), &expected(&x, false), 1e-5);
    assert_close(&floats(&out[1]), &expected(&xs, true), 1e-5);
    // Quantized experts mean their dequantized values, bit for bit.
    assert_eq!(floats(&out[2]), floats(&out[3]));
    let bad = run(
        &[
            ("x", "llm.tensor <1x32xf32>"),
            ("w", "llm.tensor <4x5x32xf32>"),
            ("ids", "llm.tensor <1x1xi32>"),
        ],
        &["llm.tensor <1x1x5xf32>"],
        "        y = llm.expert_matmul x, w, ids : llm.tensor <1x1x5xf32>;\n        llm.return y",
        vec![
            f32s(&[1, k], &x[..k]),
            f32s(&[e, n, k], &w),
            i32s(&[1, 1], &[4]),
        ],
    );
    assert!(bad.expect_err("id 4 of 4").contains("expert id 4"));
}

#[test]
fn tensor_parallel_mlp_equals_the_unsharded_computation() {
    let (x, up, down) = (random(4 * 8, 14), random(16 * 8, 15), random(8 * 16, 16));
    let mesh = "mesh = [tp = 2]";
    let sharded = run(
        &[("x", "llm.tensor <4x8xf32>"), ("up", "llm.tensor <16x8xf32>"), ("down", "llm.tensor <8x16xf32>")],
        &["llm.tensor <4x8xf32>"],
        &format!(
            "        xs = llm.shard x : llm.sharded_tensor <4x8xf32, {mesh}, split = [[], []]>;\n        us = llm.shard up : llm.sharded_tensor <16x8xf32, {mesh}, split = [[tp], []]>;\n        ds = llm.shard down : llm.sharded_tensor <8x16xf32, {mesh}, split = [[], [tp]]>;\n        h = llm.sharded_linear xs, us : llm.sharded_tensor <4x16xf32, {mesh}, split = [[], [tp]]>;\n        y = llm.sharded_linear h, ds : llm.sharded_tensor <4x8xf32, {mesh}, split = [[], []], partial = sum [tp]>;\n        r = llm.all_reduce y {{mesh_axes = [tp]}} : llm.sharded_tensor <4x8xf32, {mesh}, split = [[], []]>;\n        o = llm.unshard r : llm.tensor <4x8xf32>;\n        llm.return o"
        ),
        vec![f32s(&[4, 8], &x), f32s(&[16, 8], &up), f32s(&[8, 16], &down)],
    )
    .expect("runs");
    let plain = run(
        &[("x", "llm.tensor <4x8xf32>"), ("up", "llm.tensor <16x8xf32>"), ("down", "llm.tensor <8x16xf32>")],
        &["llm.tensor <4x8xf32>"],
        "        h = llm.matmul x, up {transpose_rhs = true} : llm.tensor <4x16xf32>;\n        o = llm.matmul h, down {transpose_rhs = true} : llm.tensor <4x8xf32>;\n        llm.return o",
        vec![f32s(&[4, 8], &x), f32s(&[16, 8], &up), f32s(&[8, 16], &down)],
    )
    .expect("runs");
    assert_close(&floats(&sharded[0]), &floats(&plain[0]), 1e-5);
}

#[test]
fn reduce_scatter_then_all_gather_equals_all_reduce() {
    // Four devices on a 2x2 mesh; values partial over tp.
    let mesh = vec![("dp".to_string(), 2), ("tp".to_string(), 2)];
    let shards: Vec<Tensor> = (0..4)
        .map(|d| Tensor::from_f32(vec![4, 2], DType::F32, random(8, 20 + d)))
        .collect();
    let input = Sharded {
        shape: vec![4, 2],
        mesh,
        split: vec![vec![], vec![]],
        partial: vec!["tp".into()],
        reduction: Reduction::Sum,
        shards,
    };
    let ty = |split: &str, partial: &str| {
        format!("llm.sharded_tensor <4x2xf32, mesh = [dp = 2, tp = 2], split = {split}{partial}>")
    };
    let out = run(
        &[("x", &ty("[[], []]", ", partial = sum [tp]"))],
        &[&ty("[[], []]", ""), &ty("[[], []]", "")],
        &format!(
            "        s = llm.reduce_scatter x {{dim = 0, mesh_axes = [tp]}} : {};\n        g = llm.all_gather s {{dim = 0, mesh_axes = [tp]}} : {};\n        r = llm.all_reduce x {{mesh_axes = [tp]}} : {};\n        llm.return g, r",
            ty("[[tp], []]", ""),
            ty("[[], []]", ""),
            ty("[[], []]", "")
        ),
        vec![Value::Sharded(input.clone())],
    )
    .expect("runs");
    let (g, r) = (
        out[0].sharded().expect("sharded"),
        out[1].sharded().expect("sharded"),
    );
    for d in 0..4 {
        let peer = d ^ 1; // Same dp coordinate, other tp coordinate.
        let sum: Vec<f32> = input.shards[d]
            .floats()
            .unwrap()
            .iter()
            .zip(input.shards[peer].floats().unwrap())
            .map(|(a, b)| a + b)
            .collect();
        assert_close(r.shards[d].floats().unwrap(), &sum, 0.0);
        assert_close(g.shards[d].floats().unwrap(), &sum, 0.0);
    }
}

#[test]
fn quantized_kv_storage_and_tables_work_in_every_format() {
    // An int8 cache: values come back within one quantization step.
    let ty = "llm.paged_kv_cache <layers = 1, kv_heads = 1, head_dim = 4, block_size = 2, blocks = ?, dtype = int8 {group_size = 4, symmetric = true, axis = 3, scale = f32}>";
    let params = KvCacheParams {
        layers: 1,
        kv_heads: 1,
        head_dim: 4,
        block_size: 2,
        blocks: None,
        storage: KvStorage::Quantized(llm_ir::types::QuantFormat::Affine {
            bits: 8,
            group_size: 4,
            symmetric: true,
            axis: 3,
            scale: DType::F32,
        }),
        window: None,
    };
    let out = run(
        &[("c", ty), ("k", "llm.tensor <1x1x4xf32>"), ("s", "llm.tensor <1xi32>"), ("t", "llm.tensor <1xi32>"), ("n", "llm.tensor <i32>")],
        &["llm.tensor <1x1x4xf32>"],
        &format!("        c1 = llm.append_kv c, k, k, s {{layer = 0}} : {ty};\n        kk, vv = llm.lookup_kv c1, t, n {{layer = 0}} : llm.tensor <1x1x4xf32>, llm.tensor <1x1x4xf32>;\n        llm.return kk"),
        vec![Value::Cache(KvCache::new(params, 1)), f32s(&[1, 1, 4], &[1.0, -0.5, 0.25, 0.0]), i32s(&[1], &[0]), i32s(&[1], &[0]), Value::Tensor(Tensor::from_i64(vec![], DType::I32, vec![1]))],
    )
    .expect("runs");
    assert_close(&floats(&out[0]), &[1.0, -0.5, 0.25, 0.0], 1.0 / 127.0);
    // Embedding rows from nf4 and int4 tables equal the rows of the dequantized table.
    let table = random(4 * 64, 30);
    for fmt in ["nf4", "int4 {group_size = 32, axis = 1}", "q8_0"] {
        let out = run(
            &[("w", "llm.tensor <4x64xf32>"), ("ids", "llm.tensor <2xi32>")],
            &["llm.tensor <2x64xf32>", "llm.tensor <4x64xf32>"],
            &format!("        q = llm.quantize w : llm.quantized_tensor <4x64, {fmt}>;\n        e = llm.embedding q, ids : llm.tensor <2x64xf32>;\n        d = llm.dequantize q : llm.tensor <4x64xf32>;\n        llm.return e, d"),
            vec![f32s(&[4, 64], &table), i32s(&[2], &[3, 1])],
        )
        .expect("runs");
        let d = floats(&out[1]);
        let expected: Vec<f32> = d[192..256].iter().chain(&d[64..128]).copied().collect();
        assert_eq!(floats(&out[0]), expected, "{fmt}");
    }
}

#[test]
fn run_time_shape_mismatches_are_errors_not_panics() {
    let err = run(
        &[("x", "llm.tensor <2x?xf32>")],
        &[],
        "        q = llm.quantize x : llm.quantized_tensor <2x?, q4_0>;\n        llm.return",
        vec![f32s(&[2, 5], &[0.0; 10])],
    )
    .expect_err("5 is not a multiple of 32");
    assert!(err.contains("not a multiple of 32"), "{err}");
    let err = run(
        &[("x", "llm.tensor <1x?xf32>"), ("w", "llm.tensor <?xf32>")],
        &["llm.tensor <1x?xf32>"],
        "        y = llm.rms_norm x, w {eps = 1e-5} : llm.tensor <1x?xf32>;\n        llm.return y",
        vec![f32s(&[1, 4], &[1.0; 4]), f32s(&[3], &[1.0; 3])],
    )
    .expect_err("weight length");
    assert!(
        err.contains("the weight has 3 elements for rows of 4"),
        "{err}"
    );
    // Non-causal attention may have fewer keys than queries.
    let out = run(
        &[("q", "llm.tensor <3x1x2xf32>"), ("k", "llm.tensor <1x1x2xf32>")],
        &["llm.tensor <3x1x2xf32>"],
        "        o = llm.attention q, k, k {kv_heads = 1} : llm.tensor <3x1x2xf32>;\n        llm.return o",
        vec![f32s(&[3, 1, 2], &[1.0; 6]), f32s(&[1, 1, 2], &[2.0, 3.0])],
    )
    .expect("runs");
    assert_eq!(floats(&out[0]), vec![2.0, 3.0, 2.0, 3.0, 2.0, 3.0]);
}

#[test]
fn fused_ops_equal_the_ops_they_replace() {
    let (g, u) = (random(2 * 8, 40), random(2 * 8, 41));
    let out = run(
        &[("g", "llm.tensor <2x8xf32>"), ("u", "llm.tensor <2x8xf32>"), ("b", "llm.tensor <8xf32>")],
        &["llm.tensor <2x8xf32>", "llm.tensor <2x8xf32>"],
        "        f = llm.fused g, u, b : llm.tensor <2x8xf32> {\n          ^s(x: llm.tensor <f32>, y: llm.tensor <f32>, z: llm.tensor <f32>):\n            a = llm.silu x : llm.tensor <f32>;\n            m = llm.mul a, y : llm.tensor <f32>;\n            r = llm.add m, z : llm.tensor <f32>;\n            llm.yield r\n        };\n        a2 = llm.silu g : llm.tensor <2x8xf32>;\n        m2 = llm.mul a2, u : llm.tensor <2x8xf32>;\n        r2 = llm.add m2, b : llm.tensor <2x8xf32>;\n        llm.return f, r2",
        vec![f32s(&[2, 8], &g), f32s(&[2, 8], &u), f32s(&[8], &random(8, 42))],
    )
    .expect("runs");
    assert_eq!(floats(&out[0]), floats(&out[1]));
    let (x, n, w) = (random(3 * 8, 43), random(8, 44), random(5 * 8, 45));
    let out = run(
        &[("x", "llm.tensor <3x8xf32>"), ("n", "llm.tensor <8xf32>"), ("w", "llm.tensor <5x8xf32>")],
        &["llm.tensor <3x5xf32>", "llm.tensor <3x5xf32>"],
        "        a = llm.rms_norm_matmul x, n, w {eps = 1e-5, transpose_rhs = true} : llm.tensor <3x5xf32>;\n        h = llm.rms_norm x, n {eps = 1e-5} : llm.tensor <3x8xf32>;\n        b = llm.matmul h, w {transpose_rhs = true} : llm.tensor <3x5xf32>;\n        llm.return a, b",
        vec![f32s(&[3, 8], &x), f32s(&[8], &n), f32s(&[5, 8], &w)],
    )
    .expect("runs");
    assert_eq!(floats(&out[0]), floats(&out[1]));
}

/// A weight store that counts its lookups.
struct CountingWeights(std::cell::Cell<usize>);

impl interp::WeightStore for CountingWeights {
    fn weight(&self, name: &str) -> Option<std::rc::Rc<Value>> {
        self.0.set(self.0.get() + 1);
        let fill = if name == "a" { 1.0 } else { 2.0 };
        Some(std::rc::Rc::new(f32s(&[2, 2], &[fill; 4])))
    }
}

#[test]
fn hoisted_weight_values_are_evaluated_once_and_give_the_same_results() {
    let ir = "builtin.module @m {\n  ^entry():\n    builtin.func @f: builtin.function <(llm.tensor <4x2xf32>) -> (llm.tensor <4x2xf32>)> {\n      ^body(x: llm.tensor <4x2xf32>):\n        a = llm.weight {name = \"a\"} : llm.tensor <2x2xf32>;\n        b = llm.weight {name = \"b\"} : llm.tensor <2x2xf32>;\n        c = llm.concat a, b {axis = 0} : llm.tensor <4x2xf32>;\n        y = llm.mul c, x : llm.tensor <4x2xf32>;\n        llm.return y\n    }\n}\n";
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, ir).expect("parses");
    let f = interp::find_func(&ctx, module, "f").expect("@f");
    let weights = CountingWeights(std::cell::Cell::new(0));
    let interpreter = Interpreter::new(&ctx, &weights);
    let x = || f32s(&[4, 2], &[1., 2., 3., 4., 5., 6., 7., 8.]);
    let plain = interpreter.run(f, vec![x()]).expect("runs");
    assert_eq!(weights.0.get(), 2, "a plain run looks up both weights");
    let hoisted = interpreter.hoist(f).expect("hoists");
    assert_eq!(weights.0.get(), 4, "hoisting looks them up once more");
    for _ in 0..3 {
        let out = interpreter
            .run_hoisted(f, vec![x()], &hoisted)
            .expect("runs");
        assert_eq!(floats(&out[0]), floats(&plain[0]));
    }
    assert_eq!(weights.0.get(), 4, "hoisted runs evaluate no weight op");
    assert_eq!(floats(&plain[0]), [1., 2., 3., 4., 10., 12., 14., 16.]);
}

/// Rows that a concat along dim 0 stacks stay their parts until the whole is read (a
/// backend repacking them reads the parts); a concat along dim 1 is evaluated.
#[test]
fn stacked_weight_rows_are_kept_as_their_parts() {
    use pliron::linked_list::ContainsLinkedList;
    let ir = "builtin.module @m {\n  ^entry():\n    builtin.func @f: builtin.function <(llm.tensor <4x2xf32>, llm.tensor <2x4xf32>) -> (llm.tensor <4x2xf32>, llm.tensor <2x4xf32>)> {\n      ^body(x: llm.tensor <4x2xf32>, z: llm.tensor <2x4xf32>):\n        a = llm.weight {name = \"a\"} : llm.tensor <2x2xf32>;\n        b = llm.weight {name = \"b\"} : llm.tensor <2x2xf32>;\n        c = llm.concat a, b {axis = 0} : llm.tensor <4x2xf32>;\n        d = llm.concat a, b {axis = 1} : llm.tensor <2x4xf32>;\n        y = llm.mul c, x : llm.tensor <4x2xf32>;\n        w = llm.mul d, z : llm.tensor <2x4xf32>;\n        llm.return y, w\n    }\n}\n";
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, ir).expect("parses");
    let f = interp::find_func(&ctx, module, "f").expect("@f");
    let weights = CountingWeights(std::cell::Cell::new(0));
    let hoisted = Interpreter::new(&ctx, &weights).hoist(f).expect("hoists");
    let ops: Vec<_> = f.get_entry_block(&ctx).deref(&ctx).iter(&ctx).collect();
    let result = |i: usize| ops[i].deref(&ctx).get_result(0);
    let (rows, columns) = (result(2), result(3));
    let parts = hoisted.stacked_rows(rows).expect("kept as parts");
    assert_eq!(parts.len(), 2);
    assert_eq!(floats(&parts[0]), [1.0; 4]);
    assert_eq!(floats(&parts[1]), [2.0; 4]);
    assert!(
        hoisted.stacked_rows(columns).is_none(),
        "dim 1 is evaluated"
    );
    assert_eq!(
        floats(hoisted.value(columns).unwrap()),
        [1., 1., 2., 2., 1., 1., 2., 2.]
    );
    let whole = hoisted.value(rows).expect("stacked on demand");
    assert_eq!(floats(whole), [1., 1., 1., 1., 2., 2., 2., 2.]);
    assert!(
        std::rc::Rc::ptr_eq(whole, hoisted.value(rows).unwrap()),
        "stacked once"
    );
}

/// 16-bit values stored as `f16` tensors, `a` above `b`.
struct SixteenBitWeights;

impl interp::WeightStore for SixteenBitWeights {
    fn weight(&self, name: &str) -> Option<std::rc::Rc<Value>> {
        let rows = if name == "a" { 1 } else { 2 };
        let values: Vec<f32> = (0..rows * 32)
            .map(|i| (i as f32 + 0.5) * if name == "a" { 1.0 } else { -1.0 })
            .collect();
        Some(std::rc::Rc::new(Value::Quantized(interp::QTensor {
            shape: vec![rows, 32],
            format: llm_ir::types::QuantFormat::F16,
            bytes: interp::quant::quantize(&llm_ir::types::QuantFormat::F16, &[rows, 32], &values),
        })))
    }
}

/// Quantized matrices of one GGUF format concatenate along dim 0 as their bytes in turn
/// (what `fuse` makes of 16-bit siblings): evaluated, the rows dequantize to the parts'
/// rows; hoisted, they stay their parts until the whole is read.
#[test]
fn quantized_rows_stack_as_their_bytes() {
    use pliron::linked_list::ContainsLinkedList;
    let ir = "builtin.module @m {\n  ^entry():\n    builtin.func @f: builtin.function <(llm.tensor <1x32xf32>) -> (llm.tensor <3x32xf32>, llm.tensor <1x3xf32>)> {\n      ^body(x: llm.tensor <1x32xf32>):\n        a = llm.weight {name = \"a\"} : llm.quantized_tensor <1x32, f16>;\n        b = llm.weight {name = \"b\"} : llm.quantized_tensor <2x32, f16>;\n        c = llm.concat a, b {axis = 0} : llm.quantized_tensor <3x32, f16>;\n        d = llm.dequantize c : llm.tensor <3x32xf32>;\n        y = llm.quantized_matmul x, c : llm.tensor <1x3xf32>;\n        llm.return d, y\n    }\n}\n";
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, ir).expect("parses");
    let f = interp::find_func(&ctx, module, "f").expect("@f");
    let x = f32s(&[1, 32], &[1.0; 32]);
    let out = Interpreter::new(&ctx, &SixteenBitWeights)
        .run(f, vec![x])
        .expect("runs");
    let want: Vec<f32> = (0..32)
        .map(|i| i as f32 + 0.5)
        .chain((0..64).map(|i| -(i as f32 + 0.5)))
        .collect();
    assert_eq!(floats(&out[0]), want);
    // Each row's sum: 32 * 16, then -(32 * 16), -(32 * 48).
    assert_eq!(floats(&out[1]), [512.0, -512.0, -1536.0]);
    let hoisted = Interpreter::new(&ctx, &SixteenBitWeights)
        .hoist(f)
        .expect("hoists");
    let ops: Vec<_> = f.get_entry_block(&ctx).deref(&ctx).iter(&ctx).collect();
    let stacked = ops[2].deref(&ctx).get_result(0);
    let parts = hoisted.stacked_rows(stacked).expect("kept as parts");
    assert_eq!(parts.len(), 2);
    let whole = hoisted.value(stacked).expect("stacked on demand");
    let bytes = |v: &Value| v.quantized().expect("quantized").bytes.clone();
    assert_eq!(bytes(whole), [bytes(&parts[0]), bytes(&parts[1])].concat());
    assert_eq!(whole.quantized().unwrap().shape, [3, 32]);
}
