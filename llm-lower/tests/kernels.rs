//! Every CPU kernel against the reference interpreter, on random shapes (odd sizes
//! included, so the vector tails run) and random values.

use std::rc::Rc;

use llm_ir::{
    dtype::DType,
    interp::{self, Hoisted, Interpreter, NoWeights, QTensor, Tensor, Value, WeightStore, quant},
    text,
    types::QuantFormat,
};
use llm_lower::cpu::{Options, Program, Target};
use pliron::context::Context;
use proptest::prelude::*;

/// Seeded uniform values in [-scale, scale).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64, scale: f32) -> Value {
    let n = shape.iter().product();
    Value::Tensor(Tensor::from_f32(
        shape.to_vec(),
        DType::F32,
        values(seed, n, scale),
    ))
}

fn ty(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    format!("llm.tensor <{}xf32>", dims.join("x"))
}

/// A weight store over named values.
struct Store(Vec<(String, Rc<Value>)>);

impl WeightStore for Store {
    fn weight(&self, name: &str) -> Option<Rc<Value>> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| Rc::clone(v))
    }
}

/// Runs `@f` of `ir` on `args` with the interpreter and with the CPU backend (1 and 2
/// threads) and checks that every float agrees within `tol` (relative to max(1, |ref|)).
fn agree(ir: &str, args: Vec<Value>, tol: f32) -> Result<(), TestCaseError> {
    agree_with(ir, args, &Store(Vec::new()), tol)
}

/// [`agree`] with `llm.weight`s resolved in `weights` (hoisted, as a model runs them).
fn agree_with(ir: &str, args: Vec<Value>, weights: &Store, tol: f32) -> Result<(), TestCaseError> {
    let mut ctx = Context::new();
    let module =
        text::parse_module(&mut ctx, ir).map_err(|d| TestCaseError::fail(d.render("t")))?;
    let func = interp::find_func(&ctx, module, "f").expect("@f");
    let interpreter = Interpreter::new(&ctx, weights);
    let want = interpreter
        .run(func, args.clone())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let hoisted = interpreter
        .hoist(func)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for threads in [1, 2] {
        let options = Options {
            target: Target::Host,
            threads,
        };
        let program = Program::build(&ctx, func, &hoisted, &options)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(program.stats().kernel_ops > 0, "nothing was lowered: {ir}");
        let got = program
            .run(&ctx, weights, args.clone())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (g, w) in got.iter().zip(&want) {
            let (g, w) = (g.tensor().unwrap(), w.tensor().unwrap());
            prop_assert_eq!(&g.shape, &w.shape);
            for (i, (a, b)) in g
                .floats()
                .unwrap()
                .iter()
                .zip(w.floats().unwrap())
                .enumerate()
            {
                prop_assert!(
                    (a - b).abs() <= tol * b.abs().max(1.0),
                    "element {i}: {a} vs {b} (threads {threads})\n{ir}"
                );
            }
        }
    }
    Ok(())
}

fn func(args: &[(String, String)], result: &str, body: &str) -> String {
    let sig: Vec<&str> = args.iter().map(|(_, t)| t.as_str()).collect();
    let params: Vec<String> = args.iter().map(|(n, t)| format!("{n}: {t}")).collect();
    format!(
        "builtin.module @m {{\n  ^entry():\n    builtin.func @f: builtin.function <({}) -> ({result})> {{\n      ^body({}):\n        {body}\n        llm.return y\n    }}\n}}\n",
        sig.join(", "),
        params.join(", ")
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn matmul_transposed(m in 1usize..6, n in 1usize..40, k in 1usize..70, seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[m, k])), ("w".into(), ty(&[n, k]))],
            &ty(&[m, n]),
            &format!("y = llm.matmul x, w {{transpose_rhs = true}} : {};", ty(&[m, n])),
        );
        agree(&ir, vec![tensor(&[m, k], seed, 1.0), tensor(&[n, k], seed + 1, 1.0)], 1e-5)?;
    }

    /// A constant weight is repacked into panels; odd row counts leave row-major tails.
    #[test]
    fn matmul_constant_weight_in_panels(m in 1usize..4, n in 1usize..40, k in 1usize..70, norm in any::<bool>(), seed: u64) {
        let (op, extra, params) = if norm {
            ("rms_norm_matmul", "x, g, w", "eps = 1e-5, transpose_rhs = true")
        } else {
            ("matmul", "x, w", "transpose_rhs = true")
        };
        let body = format!(
            "w = llm.weight {{name = \"w\"}} : {};\n        g = llm.weight {{name = \"g\"}} : {};\n        y = llm.{op} {extra} {{{params}}} : {};",
            ty(&[n, k]), ty(&[k]), ty(&[m, n])
        );
        let ir = func(&[("x".into(), ty(&[m, k]))], &ty(&[m, n]), &body);
        let store = Store(vec![
            ("w".into(), Rc::new(tensor(&[n, k], seed + 1, 1.0))),
            ("g".into(), Rc::new(tensor(&[k], seed + 2, 1.0))),
        ]);
        agree_with(&ir, vec![tensor(&[m, k], seed, 1.0)], &store, 1e-5)?;
    }

    #[test]
    fn matmul_batched_lhs(b in 1usize..3, m in 1usize..4, n in 1usize..20, k in 1usize..40, seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[b, m, k])), ("w".into(), ty(&[n, k]))],
            &ty(&[b, m, n]),
            &format!("y = llm.matmul x, w {{transpose_rhs = true}} : {};", ty(&[b, m, n])),
        );
        agree(&ir, vec![tensor(&[b, m, k], seed, 1.0), tensor(&[n, k], seed + 1, 1.0)], 1e-5)?;
    }

    #[test]
    fn rms_norm_matmul(m in 1usize..4, n in 1usize..30, k in 1usize..50, seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[m, k])), ("g".into(), ty(&[k])), ("w".into(), ty(&[n, k]))],
            &ty(&[m, n]),
            &format!("y = llm.rms_norm_matmul x, g, w {{eps = 1e-5, transpose_rhs = true}} : {};", ty(&[m, n])),
        );
        let args = vec![tensor(&[m, k], seed, 2.0), tensor(&[k], seed + 1, 1.0), tensor(&[n, k], seed + 2, 1.0)];
        agree(&ir, args, 1e-5)?;
    }

    #[test]
    fn quantized_matmul(m in 1usize..4, n in 1usize..20, blocks in 1usize..4, q4 in any::<bool>(), seed: u64) {
        let k = 32 * blocks;
        let (format, name) = if q4 { (QuantFormat::Q4_0, "q4_0") } else { (QuantFormat::Q8_0, "q8_0") };
        let ir = func(
            &[("x".into(), ty(&[m, k])), ("w".into(), format!("llm.quantized_tensor <{n}x{k}, {name}>"))],
            &ty(&[m, n]),
            &format!("y = llm.quantized_matmul x, w : {};", ty(&[m, n])),
        );
        let w = values(seed + 1, n * k, 1.0);
        let q = QTensor { shape: vec![n, k], format: format.clone(), bytes: quant::quantize(&format, &[n, k], &w) };
        agree(&ir, vec![tensor(&[m, k], seed, 1.0), Value::Quantized(q)], 1e-5)?;
    }

    #[test]
    fn rms_norm(m in 1usize..4, d in 1usize..70, seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[m, d])), ("g".into(), ty(&[d]))],
            &ty(&[m, d]),
            &format!("y = llm.rms_norm x, g {{eps = 1e-5}} : {};", ty(&[m, d])),
        );
        agree(&ir, vec![tensor(&[m, d], seed, 3.0), tensor(&[d], seed + 1, 1.0)], 1e-5)?;
    }

    #[test]
    fn unary(n in 1usize..40, op in prop::sample::select(vec!["exp", "neg", "sqrt", "rsqrt", "tanh", "sigmoid", "silu", "gelu"]), seed: u64) {
        let ir = func(
            &[("x".into(), ty(&[n]))],
            &ty(&[n]),
            &format!("y = llm.{op} x : {};", ty(&[n])),
        );
        let x = match op {
            // Positive inputs for the roots.
            "sqrt" | "rsqrt" => Value::Tensor(Tensor::from_f32(vec![n], DType::F32, values(seed, n, 4.0).iter().map(|v| v.abs() + 0.01).collect())),
            _ => tensor(&[n], seed, 10.0),
        };
        agree(&ir, vec![x], 2e-6)?;
    }

    #[test]
    fn binary(rows in 1usize..4, n in 1usize..40, op in prop::sample::select(vec!["add", "sub", "mul", "div"]), seed: u64) {
        let ir = func(
            &[("a".into(), ty(&[rows, n])), ("b".into(), ty(&[rows, n]))],
            &ty(&[rows, n]),
            &format!("y = llm.{op} a, b : {};", ty(&[rows, n])),
        );
        agree(&ir, vec![tensor(&[rows, n], seed, 5.0), tensor(&[rows, n], seed + 1, 5.0)], 1e-6)?;
    }

    #[test]
    fn fused_swiglu(n in 1usize..50, seed: u64) {
        let t = ty(&[n]);
        let body = format!(
            "y = llm.fused a, b : {t}\n        {{\n          ^bb0(p: llm.tensor <f32>, q: llm.tensor <f32>):\n            s = llm.silu p : llm.tensor <f32>;\n            c = llm.constant {{value = 0.5}} : llm.tensor <f32>;\n            h = llm.mul s, c : llm.tensor <f32>;\n            r = llm.mul h, q : llm.tensor <f32>;\n            llm.yield r\n        }};"
        );
        let ir = func(&[("a".into(), t.clone()), ("b".into(), t.clone())], &t, &body);
        agree(&ir, vec![tensor(&[n], seed, 6.0), tensor(&[n], seed + 1, 2.0)], 2e-6)?;
    }
}

/// A broadcast only known at run time falls back to the reference semantics.
#[test]
fn runtime_broadcast_falls_back() {
    let t = "llm.tensor <?x4xf32>";
    let ir = func(
        &[("a".into(), t.into()), ("b".into(), t.into())],
        t,
        &format!("y = llm.add a, b : {t};"),
    );
    agree(
        &ir,
        vec![tensor(&[3, 4], 1, 1.0), tensor(&[1, 4], 2, 1.0)],
        0.0,
    )
    .unwrap();
}

/// Arguments of the wrong shape are rejected before any kernel runs.
#[test]
fn wrong_shapes_are_rejected() {
    let ir = func(
        &[("x".into(), ty(&[2, 8])), ("w".into(), ty(&[4, 8]))],
        &ty(&[2, 4]),
        &format!(
            "y = llm.matmul x, w {{transpose_rhs = true}} : {};",
            ty(&[2, 4])
        ),
    );
    let mut ctx = Context::new();
    let module = text::parse_module(&mut ctx, &ir).unwrap();
    let func = interp::find_func(&ctx, module, "f").unwrap();
    let program = Program::build(&ctx, func, &Hoisted::default(), &Options::default()).unwrap();
    let err = program
        .run(
            &ctx,
            &NoWeights,
            vec![tensor(&[2, 8], 1, 1.0), tensor(&[4, 7], 2, 1.0)],
        )
        .unwrap_err();
    assert!(err.to_string().contains("argument #1"), "{err}");
}
