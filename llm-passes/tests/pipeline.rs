//! The pass infrastructure: textual pipelines, options, verification after each pass, and
//! the rewrite driver's budget.

use llm_ir::text;
use llm_passes::{
    Pipeline, RunConfig,
    driver::{self, Pattern, Rewriter},
    pass::{PassError, PassOptions, lookup},
    pipeline::Item,
};
use pliron::{
    builtin::{op_interfaces::SingleBlockRegionInterface, ops::ModuleOp},
    context::{Context, Ptr},
    op::Op,
    operation::Operation,
};

const IR: &str = "builtin.module @m {\n  ^entry():\n    builtin.func @f: builtin.function <(llm.tensor <4xf32>) -> (llm.tensor <4xf32>)> {\n      ^body(x: llm.tensor <4xf32>):\n        a = llm.silu x : llm.tensor <4xf32>;\n        b = llm.silu x : llm.tensor <4xf32>;\n        c = llm.add a, b : llm.tensor <4xf32>;\n        d = llm.exp x : llm.tensor <4xf32>;\n        llm.return c\n    }\n}\n";

fn parse(ctx: &mut Context) -> ModuleOp {
    text::parse_module(ctx, IR).expect("test IR parses")
}

#[test]
fn pipelines_parse_with_options_nesting_and_named_pipelines() {
    for text in [
        "canonicalize",
        "cse,dce",
        "builtin.func(cse, dce), canonicalize",
        "default",
        "plan-kv-memory{budget=64MiB max-binding-size=1GiB, block-size=auto}",
        "plan-buffers{dynamic-dim=8}",
    ] {
        Pipeline::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    }
}

#[test]
fn bad_pipelines_name_the_offending_text() {
    let cases = [
        ("cse,frobnicate", "unknown pass `frobnicate`"),
        ("cse{x=1}", "pass `cse` has no option `x`"),
        ("plan-kv-memory{budget=12XB}", "unknown size unit `XB`"),
        (
            "plan-kv-memory{block-size=0}",
            "expected `auto` or a positive integer",
        ),
        ("builtin.func(plan-buffers)", "runs on a whole module"),
        ("builtin.func(builtin.func(cse))", "cannot nest"),
        ("builtin.func(cse", "expected `)`"),
        ("cse,", "expected a pass name"),
        ("cse dce", "unexpected `dce`"),
        // A multi-byte space (U+00A0) must not split a character.
        ("cse,\u{a0}\u{a0}é", "expected a pass name"),
    ];
    for (text, expected) in cases {
        let err = Pipeline::parse(text)
            .err()
            .unwrap_or_else(|| panic!("{text} should not parse"));
        assert!(
            err.contains(expected),
            "{text}: expected `{expected}` in `{err}`"
        );
        assert!(
            err.contains(&format!("`{text}`")),
            "{text}: the error quotes the pipeline: {err}"
        );
    }
}

#[test]
fn the_same_pipeline_builds_from_rust() {
    let item = |name: &str| {
        let info = lookup(name).expect("registered");
        Item::Pass {
            info,
            options: PassOptions::resolve(name, info.options, &[]).expect("defaults"),
        }
    };
    let pipeline = Pipeline::new(vec![Item::OnFunctions(vec![item("cse"), item("dce")])]);
    let mut ctx = Context::new();
    let module = parse(&mut ctx);
    let report = pipeline
        .run(
            &mut ctx,
            module,
            &RunConfig {
                print_after: vec!["cse".into()],
                ..RunConfig::default()
            },
        )
        .expect("runs");
    assert_eq!(
        report
            .timings
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>(),
        ["cse", "dce"]
    );
    assert!(
        report
            .dumps
            .starts_with("// -----// IR Dump After cse //----- //\n")
    );
    let printed = text::print_module(&ctx, module);
    assert_eq!(printed.matches("llm.silu").count(), 1, "{printed}");
    assert!(!printed.contains("llm.exp"), "{printed}");
}

/// A pattern that always rewrites `llm.silu` into a fresh copy of itself: never converges.
struct Flip;

impl Pattern for Flip {
    fn name(&self) -> &'static str {
        "flip"
    }

    fn root(&self) -> Option<&'static str> {
        Some("llm.silu")
    }

    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError> {
        let x = llm_passes::ir::operand(rw.ctx, op, 0);
        let ty = pliron::r#type::Typed::get_type(&llm_passes::ir::result(rw.ctx, op, 0), rw.ctx);
        let copy: llm_ir::ops::SiluOp = llm_ir::ops::build(rw.ctx, vec![x], vec![ty], vec![]);
        let copy = copy.get_operation();
        rw.insert_before(op, copy);
        rw.replace_op(op, &[llm_passes::ir::result(rw.ctx, copy, 0)]);
        Ok(true)
    }
}

#[test]
fn a_driver_that_does_not_converge_reports_an_error() {
    let mut ctx = Context::new();
    let module = parse(&mut ctx);
    let patterns: Vec<Box<dyn Pattern>> = vec![Box::new(Flip)];
    let err = driver::apply_greedily(&mut ctx, module.get_operation(), &patterns)
        .expect_err("no fixpoint");
    assert!(
        err.message.contains("did not converge") && err.message.contains("flip"),
        "{}",
        err.message
    );
}

#[test]
fn verification_after_each_pass_catches_broken_ir() {
    // Break the IR behind the pipeline's back, then run a pass: the check after it fails.
    let mut ctx = Context::new();
    let module = parse(&mut ctx);
    let body = module.get_body(&ctx, 0);
    let func = llm_passes::ir::block_ops(&ctx, body)[0];
    let ret = *llm_passes::ir::nested_ops(&ctx, func)
        .last()
        .expect("return");
    Operation::erase(ret, &mut ctx);
    let pipeline = Pipeline::parse("cse").expect("pipeline");
    let err = pipeline
        .run(&mut ctx, module, &RunConfig::default())
        .expect_err("invalid IR");
    assert!(
        err.message.starts_with("after pass `cse`:"),
        "{}",
        err.message
    );
    let unchecked = RunConfig {
        verify_each: false,
        ..RunConfig::default()
    };
    pipeline
        .run(&mut ctx, module, &unchecked)
        .expect("without verification the run finishes");
}

/// A target's option values (a GPU's largest binding for `plan-kv-memory`) apply where
/// the pipeline text sets none, also through named pipelines, and the text's own win.
#[test]
fn target_options_fill_in_what_the_text_leaves_out() {
    const CACHE_IR: &str = "builtin.module @m {\n  ^entry():\n    builtin.func @f: builtin.function <(llm.paged_kv_cache <layers = 2, kv_heads = 2, head_dim = 64, block_size = 16, blocks = ?, dtype = f32>) -> (llm.paged_kv_cache <layers = 2, kv_heads = 2, head_dim = 64, block_size = 16, blocks = ?, dtype = f32>)> {\n      ^body(c: llm.paged_kv_cache <layers = 2, kv_heads = 2, head_dim = 64, block_size = 16, blocks = ?, dtype = f32>):\n        llm.return c\n    }\n}\n";
    let target = [llm_passes::TargetOption {
        pass: "plan-kv-memory",
        option: "max-binding-size",
        value: "65536".into(),
    }];
    let plan_of = |pipeline: &str| {
        let mut ctx = Context::new();
        let module = text::parse_module(&mut ctx, CACHE_IR).expect("parses");
        Pipeline::parse_for_target(pipeline, &target)
            .expect("pipeline parses")
            .run(&mut ctx, module, &RunConfig::default())
            .expect("runs");
        text::print_module(&ctx, module)
    };
    assert!(
        plan_of("default,plan-kv-memory{budget=1MiB}").contains("max_binding_size = 65536"),
        "the target's binding limit applies"
    );
    assert!(
        plan_of("plan-kv-memory{budget=1MiB, max-binding-size=1MiB}")
            .contains("max_binding_size = 1048576"),
        "the text's own value wins"
    );
}
