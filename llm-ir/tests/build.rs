//! Building `llm` IR from Rust: the verifier applies the same rules as the parser, and built
//! IR prints to text that parses back to the same text.

use llm_ir::{
    dtype::DType,
    ops::{self, MatmulOp, ReturnOp, RmsNormOp, SiluOp, WeightOp},
    params::ParamValue,
    text,
    types::TensorType,
};
use pliron::{
    builtin::{
        op_interfaces::SingleBlockRegionInterface,
        ops::{FuncOp, ModuleOp},
        types::FunctionType,
    },
    context::Context,
    identifier::Identifier,
    irbuild::{
        inserter::{IRInserter, Inserter},
        listener::DummyListener,
    },
    linked_list::ContainsLinkedList,
    op::{Op, verify_op},
    value::Value,
};

/// The single result of `op`.
fn result(ctx: &Context, op: &impl Op) -> Value {
    op.get_operation().deref(ctx).get_result(0)
}

/// Builds `@f(x: ?x64) -> ?x64 = silu(rms_norm(x @ w^T, g))`, with `eps` given as `eps`.
fn build_module(ctx: &mut Context, eps: ParamValue) -> ModuleOp {
    let act = TensorType::get(ctx, vec![None, Some(64)], DType::F32);
    let w_ty = TensorType::get_static(ctx, &[64, 64], DType::F32);
    let g_ty = TensorType::get_static(ctx, &[64], DType::F32);
    let module = ModuleOp::new(ctx, Identifier::try_from("m").unwrap());
    let fty = FunctionType::get(ctx, vec![act.into()], vec![act.into()]);
    let func = FuncOp::new(ctx, Identifier::try_from("f").unwrap(), fty);
    module.append_operation(ctx, func.get_operation(), 0);
    let entry = func.get_entry_block(ctx);
    let x = entry.deref(ctx).get_argument(0);
    let mut ins = IRInserter::<DummyListener>::new_at_block_end(entry);
    let w: WeightOp = ops::build(
        ctx,
        vec![],
        vec![w_ty.into()],
        vec![("name", ParamValue::Str("w".into()))],
    );
    ins.append_op(ctx, &w);
    let g: WeightOp = ops::build(
        ctx,
        vec![],
        vec![g_ty.into()],
        vec![("name", ParamValue::Str("g".into()))],
    );
    ins.append_op(ctx, &g);
    let mm: MatmulOp = ops::build(
        ctx,
        vec![x, result(ctx, &w)],
        vec![act.into()],
        vec![("transpose_rhs", ParamValue::Bool(true))],
    );
    ins.append_op(ctx, &mm);
    let norm: RmsNormOp = ops::build(
        ctx,
        vec![result(ctx, &mm), result(ctx, &g)],
        vec![act.into()],
        vec![("eps", eps)],
    );
    ins.append_op(ctx, &norm);
    let silu: SiluOp = ops::build(ctx, vec![result(ctx, &norm)], vec![act.into()], vec![]);
    ins.append_op(ctx, &silu);
    let ret: ReturnOp = ops::build(ctx, vec![result(ctx, &silu)], vec![], vec![]);
    ins.append_op(ctx, &ret);
    module
}

#[test]
fn built_ir_verifies_and_round_trips() {
    let mut ctx = Context::new();
    let module = build_module(&mut ctx, ParamValue::Float(1e-5));
    verify_op(&module, &ctx).expect("built IR verifies");
    let printed = text::print_module(&ctx, module);
    assert!(
        printed.contains("llm.rms_norm v3, v2 {eps = 1e-5} : llm.tensor <?x64xf32>"),
        "{printed}"
    );
    let mut ctx2 = Context::new();
    let reparsed = text::parse_module(&mut ctx2, &printed).expect("printed IR parses");
    assert_eq!(text::print_module(&ctx2, reparsed), printed);
}

#[test]
fn verifier_rejects_a_parameter_of_the_wrong_kind() {
    let mut ctx = Context::new();
    let module = build_module(&mut ctx, ParamValue::Str("small".into()));
    let err = verify_op(&module, &ctx).expect_err("a string eps is rejected");
    let message = err.err.to_string();
    assert!(
        message.contains("llm.rms_norm: parameter `eps` expects a float, found string"),
        "{message}"
    );
}

#[test]
fn verifier_rejects_a_missing_parameter() {
    let mut ctx = Context::new();
    let module = build_module(&mut ctx, ParamValue::Float(1e-5));
    // Remove `eps` from the rms_norm op.
    let func_body = module.get_body(&ctx, 0);
    let mut found = false;
    for op in func_body.deref(&ctx).iter(&ctx) {
        let Some(func) = pliron::operation::Operation::get_op::<FuncOp>(op, &ctx) else {
            continue;
        };
        for inner in func.get_entry_block(&ctx).deref(&ctx).iter(&ctx) {
            if pliron::operation::Operation::get_op::<RmsNormOp>(inner, &ctx).is_some() {
                inner
                    .deref_mut(&ctx)
                    .attributes
                    .0
                    .remove(&llm_ir::params::param_key("eps"));
                found = true;
            }
        }
    }
    assert!(found);
    let err = verify_op(&module, &ctx).expect_err("missing eps is rejected");
    assert!(
        err.err.to_string().contains("needs the parameter `eps`"),
        "{}",
        err.err
    );
}
