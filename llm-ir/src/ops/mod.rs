//! The ops of the `llm` dialect, one module per op family.
//!
//! Every op is declared with [`llm_op!`](crate::llm_op), which gives it the dialect's one
//! textual syntax
//!
//! ```text
//! r0, r1 = llm.op a, b, c {param = value, ...} : type0, type1
//! ```
//!
//! (operand types are not repeated: they are known from the operands' definitions), a
//! [`Signature`] that names its operands, results and parameters, and a verifier that first
//! checks the signature and then runs the op's own shape and type rules.
//!
//! Diagnostics name the op, the operand, result or parameter at fault, what was expected and
//! what was found; they are reported at the op's location.

mod attention;
mod base;
mod elementwise;
mod fused;
mod kv;
mod linalg;
mod moe;
mod norm;
mod plan;
mod quant;
mod shape;
mod shard;

pub use attention::{AttentionOp, PagedAttentionOp, RopeOp};
pub use base::{ConstantOp, ReturnOp, WeightOp};
pub use elementwise::{
    AddOp, DivOp, ErfOp, ExpOp, GeluOp, MaximumOp, MinimumOp, MulOp, NegOp, ReluOp, RsqrtOp,
    SigmoidOp, SiluOp, SqrtOp, SubOp, TanhOp,
};
pub use fused::{
    AppendAttentionOp, FusedOp, RmsNormMatmulOp, YieldOp, allowed_in_scalar_body, is_elementwise,
};
pub use kv::{AppendKvOp, LookupKvOp};
pub use linalg::{EmbeddingOp, MatmulOp};
pub use moe::{ExpertMatmulOp, TopkOp};
pub use norm::{LayerNormOp, RmsNormOp, SoftmaxOp};
pub use plan::{BufferPlanOp, KvPlanOp};
pub use quant::{DequantizeOp, QuantizeOp, QuantizedMatmulOp};
pub use shape::{ArgmaxOp, CastOp, ConcatOp, ReshapeOp, SliceOp, TransposeOp};
pub use shard::{AllGatherOp, AllReduceOp, ReduceScatterOp, ShardOp, ShardedLinearOp, UnshardOp};

use std::fmt::Display;

use pliron::{
    context::{Context, Ptr},
    identifier::Identifier,
    irfmt::parsers::{process_parsed_ssa_defs, ssa_opd_parser, type_parser},
    location::Location,
    op::{Op, OpObj},
    operation::Operation,
    parsable::{Parsable, StateStream, StreamLocation},
    printable::{self, Printable},
    region::Region,
    result::Result,
    r#type::{Type, TypeHandle, Typed, TypedHandle},
    value::Value,
    verify_err,
};

use crate::{
    dtype::DType,
    params::{self, ParamAttr, ParamSpec, ParamValue},
    syntax::{self, Dim, PResult},
    types::{PagedKvCacheType, QuantizedTensorType, ShardedTensorType, TensorType},
};

/// The operands an op takes.
#[derive(Debug, Clone, Copy)]
pub enum Operands {
    /// Exactly these operands.
    Fixed(&'static [&'static str]),
    /// These operands, then optionally the trailing ones.
    Optional(&'static [&'static str], &'static [&'static str]),
    /// Any number (at least the given minimum) of operands with this role.
    Variadic(&'static str, usize),
}

impl Operands {
    /// Whether `n` operands are acceptable.
    pub fn accepts(self, n: usize) -> bool {
        match self {
            Operands::Fixed(names) => n == names.len(),
            Operands::Optional(req, opt) => n >= req.len() && n <= req.len() + opt.len(),
            Operands::Variadic(_, min) => n >= min,
        }
    }

    /// Describes the accepted operand counts.
    pub fn describe(self) -> String {
        match self {
            Operands::Fixed(names) => format!("{} operand(s) ({})", names.len(), names.join(", ")),
            Operands::Optional(req, opt) => format!(
                "{} to {} operands ({}, optional {})",
                req.len(),
                req.len() + opt.len(),
                req.join(", "),
                opt.join(", ")
            ),
            Operands::Variadic(name, min) => format!("at least {min} {name} operand(s)"),
        }
    }

    /// The role name of operand `i`.
    pub fn role(self, i: usize) -> String {
        match self {
            Operands::Fixed(names) => names.get(i).map_or("extra".into(), |n| n.to_string()),
            Operands::Optional(req, opt) => req
                .iter()
                .chain(opt)
                .nth(i)
                .map_or("extra".into(), |n| n.to_string()),
            Operands::Variadic(name, _) => name.to_string(),
        }
    }
}

/// The declared interface of an op: operand roles, result names and parameters.
#[derive(Debug, Clone, Copy)]
pub struct Signature {
    /// Operands.
    pub operands: Operands,
    /// Names of the results.
    pub results: &'static [&'static str],
    /// Parameters, in printing order.
    pub params: &'static [ParamSpec],
    /// Number of regions (printed after the result types).
    pub regions: usize,
}

/// An op of the `llm` dialect: its signature and its specific verification rules.
pub trait LlmOp: Op {
    /// The op's signature.
    const SIGNATURE: Signature;

    /// Checks the op's shape, type and parameter rules beyond its signature.
    fn check(c: &OpCheck) -> Result<()>;
}

/// A registered `llm` op: its name and signature.
#[derive(Debug, Clone, Copy)]
pub struct OpDescriptor {
    /// The op's name (`llm.matmul`).
    pub name: &'static str,
    /// The op's signature.
    pub signature: Signature,
    /// The op's reference semantics.
    pub eval: crate::interp::EvalFn,
}

/// Every op declared with [`llm_op!`](crate::llm_op), collected at link time.
#[allow(
    unsafe_code,
    reason = "linkme declares the slice with #[link_section]; no unsafe code is written"
)]
#[linkme::distributed_slice]
pub static LLM_OPS: [OpDescriptor];

/// The registered `llm` ops, sorted by name.
pub fn registered_ops() -> Vec<OpDescriptor> {
    let mut ops: Vec<OpDescriptor> = LLM_OPS.iter().copied().collect();
    ops.sort_by_key(|op| op.name);
    ops
}

/// Declares an `llm` op: the struct, its registration with pliron, its signature, and its
/// printer, parser and verifier.
#[macro_export]
macro_rules! llm_op {
    (
        $(#[$doc:meta])*
        $name:ident = $text:literal,
        operands: $operands:expr,
        results: [$($result:literal),* $(,)?],
        params: [$($spec:expr),* $(,)?],
        $(regions: $regions:literal,)?
        interfaces: [$($iface:path),* $(,)?],
        check: $check:expr,
        eval: $eval:expr $(,)?
    ) => {
        $(#[$doc])*
        #[::pliron::derive::pliron_op(name = $text, interfaces = [$($iface),*])]
        pub struct $name;

        const _: () = {
            #[allow(unsafe_code, reason = "linkme places the entry with #[link_section]; no unsafe code is written")]
            #[::linkme::distributed_slice($crate::ops::LLM_OPS)]
            static REGISTER: $crate::ops::OpDescriptor = $crate::ops::OpDescriptor {
                name: $text,
                signature: <$name as $crate::ops::LlmOp>::SIGNATURE,
                eval: $eval,
            };
        };

        impl $crate::ops::LlmOp for $name {
            const SIGNATURE: $crate::ops::Signature = $crate::ops::Signature {
                operands: $operands,
                results: &[$($result),*],
                params: &[$($spec),*],
                regions: 0 $(+ $regions)?,
            };

            fn check(c: &$crate::ops::OpCheck) -> ::pliron::result::Result<()> {
                let check: fn(&$crate::ops::OpCheck) -> ::pliron::result::Result<()> = $check;
                check(c)
            }
        }

        impl ::pliron::printable::Printable for $name {
            fn fmt(
                &self,
                ctx: &::pliron::context::Context,
                state: &::pliron::printable::State,
                f: &mut ::std::fmt::Formatter<'_>,
            ) -> ::std::fmt::Result {
                $crate::ops::print_op::<Self>(self, ctx, state, f)
            }
        }

        impl ::pliron::parsable::Parsable for $name {
            type Arg = ::std::vec::Vec<(::pliron::identifier::Identifier, ::pliron::location::Location)>;
            type Parsed = ::pliron::op::OpObj;

            fn parse<'a>(
                s: &mut ::pliron::parsable::StateStream<'a>,
                results: Self::Arg,
            ) -> ::pliron::parsable::ParseResult<'a, Self::Parsed> {
                match $crate::ops::parse_op::<Self>(s, results) {
                    Ok(op) => Ok((op, ::pliron::combine::error::Commit::Commit(()))),
                    Err(e) => Err(e),
                }
            }
        }

        impl ::pliron::common_traits::Verify for $name {
            fn verify(&self, ctx: &::pliron::context::Context) -> ::pliron::result::Result<()> {
                $crate::ops::verify_op::<Self>(self, ctx)
            }
        }
    };
}

/// Prints an op in the dialect's syntax.
pub fn print_op<T: LlmOp>(
    op: &T,
    ctx: &Context,
    state: &printable::State,
    f: &mut std::fmt::Formatter<'_>,
) -> std::fmt::Result {
    let opr = op.get_operation().deref(ctx);
    let results: Vec<Value> = opr.results().collect();
    if !results.is_empty() {
        let names: Vec<String> = results.iter().map(|r| r.disp(ctx).to_string()).collect();
        write!(f, "{} = ", names.join(", "))?;
    }
    write!(f, "{}", op.get_opid().disp(ctx))?;
    let operands: Vec<String> = opr.operands().map(|v| v.disp(ctx).to_string()).collect();
    if !operands.is_empty() {
        write!(f, " {}", operands.join(", "))?;
    }
    let present: Vec<(&str, ParamValue)> = T::SIGNATURE
        .params
        .iter()
        .filter_map(|spec| {
            let attr = opr
                .attributes
                .get::<ParamAttr>(&params::param_key(spec.name))?;
            Some((spec.name, attr.0.clone()))
        })
        .collect();
    let block = params::print_param_block(present.iter().map(|(n, v)| (*n, v)));
    if !block.is_empty() {
        write!(f, " {block}")?;
    }
    if !results.is_empty() {
        let types: Vec<String> = results
            .iter()
            .map(|r| r.get_type(ctx).print(ctx, state).to_string())
            .collect();
        write!(f, " : {}", types.join(", "))?;
    }
    for region in opr.regions() {
        write!(f, " {}", region.print(ctx, state))?;
    }
    Ok(())
}

/// Parses the part of an op after its name; `results` are the result names already read.
pub fn parse_op<T: LlmOp>(
    s: &mut StateStream,
    results: Vec<(Identifier, Location)>,
) -> PResult<OpObj> {
    let sig = T::SIGNATURE;
    let name = T::get_opid_static().to_string();
    let loc = s.loc();
    if results.len() != sig.results.len() {
        let at = results.first().map_or(loc.clone(), |r| r.1.clone());
        return syntax::error_at(
            at,
            format!(
                "{name} has {} result(s), but {} name(s) are given",
                sig.results.len(),
                results.len()
            ),
        );
    }
    syntax::skip_ws(s);
    let mut operands = Vec::new();
    if syntax::peek(s).is_some_and(syntax::is_ident_start) {
        loop {
            syntax::skip_ws(s);
            operands.push(syntax::run(s, ssa_opd_parser())?);
            if !syntax::eat(s, ',') {
                break;
            }
        }
    }
    if !sig.operands.accepts(operands.len()) {
        return syntax::error_at(
            loc,
            format!(
                "{name} expects {}, found {}",
                sig.operands.describe(),
                operands.len()
            ),
        );
    }
    let parsed = params::parse_param_block(s)?;
    for (key, value, key_loc) in &parsed {
        let Some(spec) = sig.params.iter().find(|p| p.name == key) else {
            let known: Vec<&str> = sig.params.iter().map(|p| p.name).collect();
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            return syntax::error_at(
                key_loc.clone(),
                format!("{name} has no parameter `{key}` (parameters: {known})"),
            );
        };
        if let Err(msg) = params::check_param(&name, spec, value) {
            return syntax::error_at(key_loc.clone(), msg);
        }
    }
    if let Some(missing) = sig
        .params
        .iter()
        .find(|p| p.required && !parsed.iter().any(|(k, _, _)| k == p.name))
    {
        return syntax::error_here(
            s,
            format!(
                "{name} needs the parameter `{}` ({})",
                missing.name,
                missing.kind.describe()
            ),
        );
    }
    let mut types: Vec<TypeHandle> = Vec::new();
    if !sig.results.is_empty() {
        syntax::expect(s, ':', &format!("before the result type(s) of {name}"))?;
        loop {
            syntax::skip_ws(s);
            types.push(syntax::run(s, type_parser())?);
            if types.len() == sig.results.len() {
                break;
            }
            syntax::expect(
                s,
                ',',
                &format!("between the {} result types of {name}", sig.results.len()),
            )?;
        }
    }
    let ctx = &mut *s.state.ctx;
    let op = Operation::new(ctx, T::get_concrete_op_info(), types, operands, vec![], 0);
    for (key, value, _) in parsed {
        op.deref_mut(ctx)
            .attributes
            .set(params::param_key(&key), ParamAttr(value));
    }
    for _ in 0..sig.regions {
        syntax::skip_ws(s);
        syntax::run(s, Region::parser(op))?;
    }
    process_parsed_ssa_defs(s, &results, op)?;
    Ok(T::wrap_operation(op))
}

/// Verifies an op: its signature, then its own rules.
pub fn verify_op<T: LlmOp>(op: &T, ctx: &Context) -> Result<()> {
    let c = OpCheck::new(ctx, op.get_operation(), T::SIGNATURE);
    let sig = T::SIGNATURE;
    if !sig.operands.accepts(c.num_operands()) {
        return c.err(format!(
            "expects {}, found {}",
            sig.operands.describe(),
            c.num_operands()
        ));
    }
    let regions = c.op.deref(ctx).num_regions();
    if regions != sig.regions {
        return c.err(format!(
            "expects {} region(s), found {regions}",
            sig.regions
        ));
    }
    if c.num_results() != sig.results.len() {
        return c.err(format!(
            "expects {} result(s), found {}",
            sig.results.len(),
            c.num_results()
        ));
    }
    {
        let opr = op.get_operation().deref(ctx);
        for (key, attr) in opr.attributes.0.iter() {
            let key = key.to_string();
            let Some(name) = key.strip_prefix("llm_") else {
                continue;
            };
            let Some(spec) = sig.params.iter().find(|p| p.name == name) else {
                return c.err(format!("has no parameter `{name}`"));
            };
            let Some(param) = attr.downcast_ref::<ParamAttr>() else {
                return c.err(format!("parameter `{name}` is not an llm.param attribute"));
            };
            if let Err(msg) = params::check_param(&c.name, spec, &param.0) {
                return verify_err!(c.loc.clone(), "{msg}");
            }
        }
    }
    for spec in sig.params.iter().filter(|p| p.required) {
        if c.param(spec.name).is_none() {
            return c.err(format!(
                "needs the parameter `{}` ({})",
                spec.name,
                spec.kind.describe()
            ));
        }
    }
    T::check(&c)
}

/// Sets parameter `name` of `op` (for building IR from Rust).
pub fn set_param(ctx: &Context, op: Ptr<Operation>, name: &str, value: ParamValue) {
    op.deref_mut(ctx)
        .attributes
        .set(params::param_key(name), ParamAttr(value));
}

/// Builds an op of type `T` with the given operands, result types and parameters.
///
/// The op is not inserted anywhere; insert it with pliron's inserter or rewriter.
pub fn build<T: LlmOp>(
    ctx: &mut Context,
    operands: Vec<Value>,
    result_types: Vec<TypeHandle>,
    params: Vec<(&str, ParamValue)>,
) -> T {
    let op = Operation::new(
        ctx,
        T::get_concrete_op_info(),
        result_types,
        operands,
        vec![],
        0,
    );
    for (name, value) in params {
        set_param(ctx, op, name, value);
    }
    T::from_operation(op)
}

/// The view of an op that verifiers use: typed access to operands, results and parameters,
/// and errors that name the op and are reported at its location.
pub struct OpCheck<'a> {
    /// The context.
    pub ctx: &'a Context,
    /// The op being checked.
    pub op: Ptr<Operation>,
    /// The op's name (`llm.matmul`).
    pub name: String,
    sig: Signature,
    loc: Location,
}

impl<'a> OpCheck<'a> {
    /// The view the interpreter gives evaluation functions, and lowerings read parameters
    /// through (the op must be an `llm` op).
    pub fn for_eval(ctx: &'a Context, op: Ptr<Operation>) -> Self {
        let name = Operation::get_opid(op, ctx).to_string();
        let sig = LLM_OPS
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.signature)
            .unwrap_or(Signature {
                operands: Operands::Variadic("operand", 0),
                results: &[],
                params: &[],
                regions: 0,
            });
        Self::new(ctx, op, sig)
    }

    fn new(ctx: &'a Context, op: Ptr<Operation>, sig: Signature) -> Self {
        let (name, loc) = {
            let opr = op.deref(ctx);
            (Operation::get_opid(op, ctx).to_string(), opr.loc().clone())
        };
        OpCheck {
            ctx,
            op,
            name,
            sig,
            loc,
        }
    }

    /// A verification error: `<op>: <msg>` at the op's location.
    pub fn err<T>(&self, msg: impl Display) -> Result<T> {
        verify_err!(self.loc.clone(), "{}: {}", self.name, msg)
    }

    /// Number of operands.
    pub fn num_operands(&self) -> usize {
        self.op.deref(self.ctx).get_num_operands()
    }

    /// Number of results.
    pub fn num_results(&self) -> usize {
        self.op.deref(self.ctx).get_num_results()
    }

    /// Operand `i`.
    pub fn operand(&self, i: usize) -> Value {
        self.op.deref(self.ctx).get_operand(i)
    }

    /// Result `i`.
    pub fn result(&self, i: usize) -> Value {
        self.op.deref(self.ctx).get_result(i)
    }

    /// Describes operand `i` for a diagnostic: `operand #1 (rhs)`.
    pub fn operand_desc(&self, i: usize) -> String {
        format!("operand #{i} ({})", self.sig.operands.role(i))
    }

    /// Describes result `i` for a diagnostic: `result #0 (output)`.
    pub fn result_desc(&self, i: usize) -> String {
        format!(
            "result #{i} ({})",
            self.sig.results.get(i).copied().unwrap_or("extra")
        )
    }

    /// The type of operand `i`.
    pub fn operand_type(&self, i: usize) -> TypeHandle {
        self.operand(i).get_type(self.ctx)
    }

    /// The type of result `i`.
    pub fn result_type(&self, i: usize) -> TypeHandle {
        self.result(i).get_type(self.ctx)
    }

    /// Prints a type for a diagnostic.
    pub fn show(&self, ty: TypeHandle) -> String {
        ty.disp(self.ctx).to_string()
    }

    fn typed<T: Type + Clone>(&self, ty: TypeHandle, what: String, expected: &str) -> Result<T> {
        match TypedHandle::<T>::from_handle(ty, self.ctx) {
            Ok(t) => Ok(t.deref(self.ctx).clone()),
            Err(_) => self.err(format!(
                "{what} must be {expected}, found {}",
                self.show(ty)
            )),
        }
    }

    /// Operand `i` as an `llm.tensor`.
    pub fn tensor(&self, i: usize) -> Result<TensorType> {
        self.typed(self.operand_type(i), self.operand_desc(i), "an llm.tensor")
    }

    /// Result `i` as an `llm.tensor`.
    pub fn result_tensor(&self, i: usize) -> Result<TensorType> {
        self.typed(self.result_type(i), self.result_desc(i), "an llm.tensor")
    }

    /// Operand `i` as an `llm.quantized_tensor`.
    pub fn quantized(&self, i: usize) -> Result<QuantizedTensorType> {
        let q: QuantizedTensorType = self.typed(
            self.operand_type(i),
            self.operand_desc(i),
            "an llm.quantized_tensor",
        )?;
        self.valid(q.validate(), &self.operand_desc(i))?;
        Ok(q)
    }

    /// Whether operand `i` is an `llm.quantized_tensor`.
    pub fn is_quantized(&self, i: usize) -> bool {
        self.operand_type(i)
            .deref(self.ctx)
            .is::<QuantizedTensorType>()
    }

    /// Result `i` as an `llm.quantized_tensor`.
    pub fn result_quantized(&self, i: usize) -> Result<QuantizedTensorType> {
        let q: QuantizedTensorType = self.typed(
            self.result_type(i),
            self.result_desc(i),
            "an llm.quantized_tensor",
        )?;
        self.valid(q.validate(), &self.result_desc(i))?;
        Ok(q)
    }

    /// Operand `i` as an `llm.paged_kv_cache`.
    pub fn kv_cache(&self, i: usize) -> Result<PagedKvCacheType> {
        let t: PagedKvCacheType = self.typed(
            self.operand_type(i),
            self.operand_desc(i),
            "an llm.paged_kv_cache",
        )?;
        self.valid(t.validate(), &self.operand_desc(i))?;
        Ok(t)
    }

    /// Result `i` as an `llm.paged_kv_cache`.
    pub fn result_kv_cache(&self, i: usize) -> Result<PagedKvCacheType> {
        let t: PagedKvCacheType = self.typed(
            self.result_type(i),
            self.result_desc(i),
            "an llm.paged_kv_cache",
        )?;
        self.valid(t.validate(), &self.result_desc(i))?;
        Ok(t)
    }

    /// Operand `i` as an `llm.sharded_tensor`.
    pub fn sharded(&self, i: usize) -> Result<ShardedTensorType> {
        let t: ShardedTensorType = self.typed(
            self.operand_type(i),
            self.operand_desc(i),
            "an llm.sharded_tensor",
        )?;
        self.valid(t.validate(), &self.operand_desc(i))?;
        Ok(t)
    }

    /// Result `i` as an `llm.sharded_tensor`.
    pub fn result_sharded(&self, i: usize) -> Result<ShardedTensorType> {
        let t: ShardedTensorType = self.typed(
            self.result_type(i),
            self.result_desc(i),
            "an llm.sharded_tensor",
        )?;
        self.valid(t.validate(), &self.result_desc(i))?;
        Ok(t)
    }

    fn valid(&self, r: std::result::Result<(), String>, what: &str) -> Result<()> {
        r.or_else(|msg| self.err(format!("{what}: invalid type: {msg}")))
    }

    /// Parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<ParamValue> {
        let opr = self.op.deref(self.ctx);
        opr.attributes
            .get::<ParamAttr>(&params::param_key(name))
            .map(|a| a.0.clone())
    }

    /// Integer parameter `name`, if present.
    pub fn int(&self, name: &str) -> Option<i64> {
        match self.param(name)? {
            ParamValue::Int(v) => Some(v),
            _ => None,
        }
    }

    /// Float parameter `name` (integers widen), if present.
    pub fn float(&self, name: &str) -> Option<f64> {
        self.param(name)?.as_number()
    }

    /// Boolean parameter `name`, or `default` when absent.
    pub fn flag(&self, name: &str, default: bool) -> bool {
        match self.param(name) {
            Some(ParamValue::Bool(b)) => b,
            _ => default,
        }
    }

    /// Requires integer parameter `name`, when present, to be at least `min`.
    pub fn int_at_least(&self, name: &str, min: i64) -> Result<Option<i64>> {
        match self.int(name) {
            Some(v) if v < min => self.err(format!(
                "parameter `{name}` must be at least {min}, found {v}"
            )),
            v => Ok(v),
        }
    }

    /// Resolves an axis parameter (negative counts from the end) against `rank`.
    pub fn axis(&self, name: &str, default: i64, rank: usize) -> Result<usize> {
        let axis = self.int(name).unwrap_or(default);
        if rank == 0 {
            return self.err(format!(
                "parameter `{name}` = {axis} names an axis, but the input has rank 0"
            ));
        }
        let resolved = if axis < 0 { axis + rank as i64 } else { axis };
        if resolved < 0 || resolved >= rank as i64 {
            return self.err(format!(
                "parameter `{name}` = {axis} is out of range for rank {rank} (expected -{rank}..{rank})"
            ));
        }
        Ok(resolved as usize)
    }

    /// Requires `ty` to have element type `want`.
    pub fn same_dtype(&self, what: &str, found: DType, want: DType) -> Result<()> {
        if found == want {
            Ok(())
        } else {
            self.err(format!(
                "{what} must have element type {want}, found {found}"
            ))
        }
    }

    /// Requires a float element type.
    pub fn float_dtype(&self, what: &str, found: DType) -> Result<()> {
        if found.is_float() {
            Ok(())
        } else {
            self.err(format!(
                "{what} must have a float element type, found {found}"
            ))
        }
    }

    /// Requires an index (i32 or i64) element type.
    pub fn index_dtype(&self, what: &str, found: DType) -> Result<()> {
        if found.is_index() {
            Ok(())
        } else {
            self.err(format!(
                "{what} must have element type i32 or i64, found {found}"
            ))
        }
    }

    /// Requires rank `want`.
    pub fn rank(&self, what: &str, shape: &[Dim], want: usize) -> Result<()> {
        if shape.len() == want {
            Ok(())
        } else {
            self.err(format!(
                "{what} must have rank {want}, found rank {}",
                shape.len()
            ))
        }
    }

    /// Requires rank at least `min`.
    pub fn min_rank(&self, what: &str, shape: &[Dim], min: usize) -> Result<()> {
        if shape.len() >= min {
            Ok(())
        } else {
            self.err(format!(
                "{what} must have rank at least {min}, found rank {}",
                shape.len()
            ))
        }
    }

    /// Requires dim `found` to be compatible with `want` (equal, or either dynamic).
    pub fn dim(&self, what: &str, found: Dim, want: Dim) -> Result<()> {
        if crate::types::dims_compatible(found, want) {
            Ok(())
        } else {
            self.err(format!(
                "{what} must be {}, found {}",
                show_dim(want),
                show_dim(found)
            ))
        }
    }

    /// Requires the shape `found` to be compatible with `want`.
    pub fn shape(&self, what: &str, found: &[Dim], want: &[Dim]) -> Result<()> {
        if crate::types::shapes_compatible(found, want) {
            Ok(())
        } else {
            self.err(format!(
                "{what} must have shape {}, found {}",
                show_shape(want),
                show_shape(found)
            ))
        }
    }
}

/// Shows a dim for a diagnostic.
pub fn show_dim(d: Dim) -> String {
    d.map_or("?".into(), |n| n.to_string())
}

/// Shows a shape for a diagnostic: `[4, ?, 8]`.
pub fn show_shape(shape: &[Dim]) -> String {
    format!(
        "[{}]",
        shape
            .iter()
            .map(|d| show_dim(*d))
            .collect::<Vec<_>>()
            .join(", ")
    )
}
