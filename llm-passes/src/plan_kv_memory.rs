//! `plan-kv-memory`: sizes the paged KV cache.
//!
//! From the module's cache type, a memory budget and the device's largest buffer binding, it
//! chooses the block size and block count, fills them into the cache type everywhere, splits
//! the pool into buffers no larger than `max-binding-size`, and records the plan as an
//! `llm.kv_plan` op at the top of the module.
//!
//! # Block size
//!
//! `block-size=auto` picks 16 positions, vLLM's default: a sequence wastes on average half a
//! block (here 8 positions) in its last, partly filled block, block tables stay short
//! (`max_seq_len / 16` entries), and one block of one head (`16 x head_dim` values) is a
//! natural unit of work for a paged-attention kernel. Auto halves the size while one block
//! would exceed `max-binding-size`, and lowers it to the next power of two at or above
//! `max-seq-len` for very short sequences. An explicit `block-size=N` is used as given.

use llm_ir::{
    interp::KvElement,
    ops::{self, KvPlanOp},
    params::ParamValue,
    types::{KvCacheParams, PagedKvCacheType},
};
use pliron::{
    builtin::{
        attributes::TypeAttr,
        op_interfaces::SingleBlockRegionInterface,
        ops::{FuncOp, ModuleOp},
        type_interfaces::FunctionTypeInterface,
        types::FunctionType,
    },
    context::{Context, Ptr},
    op::Op,
    operation::Operation,
    r#type::{TypeHandle, Typed, TypedHandle},
};

use crate::{
    ir,
    pass::{OptionInfo, OptionKind, Pass, PassError, PassInfo, PassOptions, Scope},
};

/// The registry entry.
pub const INFO: PassInfo = PassInfo {
    name: "plan-kv-memory",
    summary: "choose the KV cache's block size and count for a memory budget and device limits",
    options: &[
        OptionInfo {
            name: "budget",
            kind: OptionKind::Bytes,
            default: "1GiB",
            help: "bytes available for the KV pool",
        },
        OptionInfo {
            name: "max-binding-size",
            kind: OptionKind::Bytes,
            default: "128MiB",
            help: "largest buffer one binding may hold",
        },
        OptionInfo {
            name: "block-size",
            kind: OptionKind::AutoOrInt,
            default: "auto",
            help: "positions per block",
        },
        OptionInfo {
            name: "max-seq-len",
            kind: OptionKind::Int,
            default: "0",
            help: "longest sequence the pool must hold (0: no requirement)",
        },
    ],
    scope: Scope::Module,
    create: |o: &PassOptions| {
        Box::new(PlanKvMemory {
            budget: o.int("budget"),
            max_binding: o.int("max-binding-size"),
            block_size: o.auto_or_int("block-size"),
            max_seq_len: o.int("max-seq-len"),
        })
    },
};

/// The pass, with its options.
pub struct PlanKvMemory {
    /// Bytes available for the pool.
    pub budget: u64,
    /// Largest buffer binding.
    pub max_binding: u64,
    /// Positions per block (`None`: choose).
    pub block_size: Option<u64>,
    /// Longest sequence to hold (0: none).
    pub max_seq_len: u64,
}

/// Bytes of one block of `block_size` positions of a cache with parameters `cache`, as
/// every backend's pool holds its values (`docs/lowering.md`, "KV storage"): in
/// [`KvElement`]s, 2 bytes a value for f16 and bf16, a block format's blocks padded to
/// whole words (36 bytes for 32 q8_0 values), 4 bytes for f32 and for nf4 and affine
/// storage's round-tripped values. Counting those formats' own size would plan more
/// blocks than fit.
pub fn bytes_per_block(cache: &KvCacheParams, block_size: u64) -> u64 {
    let values = block_size * cache.kv_heads * cache.head_dim;
    cache.layers * 2 * KvElement::of(&cache.storage).bytes(values as usize) as u64
}

/// Every type handle of a value or function signature in the module that is a KV cache.
fn cache_types(ctx: &Context, module: Ptr<Operation>) -> Vec<TypeHandle> {
    let mut found: Vec<TypeHandle> = Vec::new();
    let mut note = |ty: TypeHandle| {
        if TypedHandle::<PagedKvCacheType>::from_handle(ty, ctx).is_ok() && !found.contains(&ty) {
            found.push(ty);
        }
    };
    for block in ir::nested_blocks(ctx, module) {
        for arg in block.deref(ctx).arguments() {
            note(arg.get_type(ctx));
        }
    }
    for op in ir::nested_ops(ctx, module) {
        for r in ir::results(ctx, op) {
            note(r.get_type(ctx));
        }
    }
    found
}

impl PlanKvMemory {
    fn choose_block_size(&self, cache: &PagedKvCacheType) -> Result<u64, String> {
        if let Some(n) = self.block_size {
            return Ok(n);
        }
        let mut bs = 16;
        if self.max_seq_len > 0 && self.max_seq_len < bs {
            bs = self.max_seq_len.next_power_of_two();
        }
        while bs > 1 && bytes_per_block(&cache.params(), bs) > self.max_binding {
            bs /= 2;
        }
        Ok(bs)
    }
}

impl Pass for PlanKvMemory {
    fn run(&mut self, ctx: &mut Context, root: Ptr<Operation>) -> Result<bool, PassError> {
        let module = Operation::get_op::<ModuleOp>(root, ctx)
            .ok_or_else(|| PassError::new("plan-kv-memory runs on a module"))?;
        let types = cache_types(ctx, root);
        let Some(&old) = types.first() else {
            return Ok(false);
        };
        let cache = TypedHandle::<PagedKvCacheType>::from_handle(old, ctx)
            .map_err(|_| PassError::new("not a cache"))?
            .deref(ctx)
            .clone();
        if types.iter().any(|&t| {
            let other =
                TypedHandle::<PagedKvCacheType>::from_handle(t, ctx).map(|t| t.deref(ctx).params());
            other.ok().map(|mut p| {
                p.blocks = cache.blocks();
                p.block_size = cache.block_size();
                p
            }) != Some(cache.params())
        }) {
            return Err(PassError::new(format!(
                "plan-kv-memory plans one KV cache, but the module uses {} different ones",
                types.len()
            )));
        }
        let block_size = self.choose_block_size(&cache).map_err(PassError::new)?;
        let per_block = bytes_per_block(&cache.params(), block_size);
        if per_block > self.max_binding {
            return Err(PassError::new(format!(
                "one block of {block_size} positions takes {per_block} bytes, more than max-binding-size = {}",
                self.max_binding
            )));
        }
        let blocks = self.budget / per_block;
        if blocks == 0 {
            return Err(PassError::new(format!(
                "the budget of {} bytes cannot hold one block of {per_block} bytes",
                self.budget
            )));
        }
        let needed = self.max_seq_len.div_ceil(block_size);
        if blocks < needed {
            return Err(PassError::new(format!(
                "the budget of {} bytes holds {blocks} blocks, fewer than the {needed} a sequence of {} positions needs",
                self.budget, self.max_seq_len
            )));
        }
        let per_buffer = self.max_binding / per_block;
        let mut buffers = vec![per_buffer; (blocks / per_buffer) as usize];
        if !blocks.is_multiple_of(per_buffer) {
            buffers.push(blocks % per_buffer);
        }
        for &ty in &types {
            let Ok(t) = TypedHandle::<PagedKvCacheType>::from_handle(ty, ctx) else {
                continue;
            };
            let mut params = t.deref(ctx).params();
            params.block_size = block_size;
            params.blocks = Some(blocks);
            let new: TypeHandle = PagedKvCacheType::get(ctx, params).into();
            retype(ctx, module, ty, new);
        }
        let body = module.get_body(ctx, 0);
        for op in ir::block_ops(ctx, body) {
            if ir::name(ctx, op) == "llm.kv_plan" {
                Operation::erase(op, ctx);
            }
        }
        let int = |v: u64| ParamValue::Int(v as i64);
        let plan: KvPlanOp = ops::build(
            ctx,
            vec![],
            vec![],
            vec![
                ("block_size", int(block_size)),
                ("blocks", int(blocks)),
                ("bytes_per_block", int(per_block)),
                ("tokens", int(blocks * block_size)),
                ("budget", int(self.budget)),
                ("max_binding_size", int(self.max_binding)),
                (
                    "buffers",
                    ParamValue::List(buffers.into_iter().map(int).collect()),
                ),
            ],
        );
        match ir::block_ops(ctx, body).first() {
            Some(&first) => plan.get_operation().insert_before(ctx, first),
            None => plan.get_operation().insert_at_back(body, ctx),
        }
        Ok(true)
    }
}

/// Replaces type `old` by `new` in every value and function signature of the module.
fn retype(ctx: &Context, module: ModuleOp, old: TypeHandle, new: TypeHandle) {
    let root = module.get_operation();
    for block in ir::nested_blocks(ctx, root) {
        let args: Vec<_> = block.deref(ctx).arguments().collect();
        for arg in args {
            if arg.get_type(ctx) == old {
                arg.set_type(ctx, new);
            }
        }
    }
    for op in ir::nested_ops(ctx, root) {
        for r in ir::results(ctx, op) {
            if r.get_type(ctx) == old {
                r.set_type(ctx, new);
            }
        }
        if let Some(func) = Operation::get_op::<FuncOp>(op, ctx)
            && let Ok(fty) = TypedHandle::<FunctionType>::from_handle(func.get_type(ctx), ctx)
        {
            let swap = |tys: Vec<TypeHandle>| {
                tys.into_iter()
                    .map(|t| if t == old { new } else { t })
                    .collect()
            };
            let (args, results) = {
                let f = fty.deref(ctx);
                (swap(f.arg_types()), swap(f.res_types()))
            };
            let updated = FunctionType::get(ctx, args, results);
            func.set_attr_builtin_func_type(ctx, TypeAttr::new(updated.into()));
        }
    }
}
