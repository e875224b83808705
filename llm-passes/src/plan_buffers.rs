//! `plan-buffers`: liveness-based arena allocation of each function's intermediates.
//!
//! Every tensor (or quantized tensor: quantized activations) an op of a function's body
//! produces gets an offset in one arena, except
//! weights (views of the weight store) and values computed from weights and constants alone
//! (computed once at load). A value lives from its defining op to its last
//! use (to the end when returned). Elementwise and fused ops write in place over an operand
//! of the same size that dies at that op. Buffers are placed largest first at the lowest
//! 64-byte-aligned offset that does not overlap a buffer whose lifetime intersects, and the
//! plan records the arena's peak next to the naive sum of all sizes. Dynamic dims count as
//! the `dynamic-dim` option.

use std::collections::{HashMap, HashSet};

use llm_ir::{
    interp::quant::storage_bytes,
    ops::{self, BufferPlanOp},
    params::ParamValue,
};
use pliron::{
    builtin::{
        op_interfaces::{SingleBlockRegionInterface, SymbolOpInterface},
        ops::{FuncOp, ModuleOp},
    },
    context::{Context, Ptr},
    op::Op,
    operation::Operation,
    value::Value,
};

use crate::{
    ir,
    pass::{OptionInfo, OptionKind, Pass, PassError, PassInfo, PassOptions, Scope},
};

/// The registry entry.
pub const INFO: PassInfo = PassInfo {
    name: "plan-buffers",
    summary: "assign arena offsets to each function's intermediate tensors by liveness",
    options: &[OptionInfo {
        name: "dynamic-dim",
        kind: OptionKind::Int,
        default: "1",
        help: "size assumed for dynamic dims",
    }],
    scope: Scope::Module,
    create: |o: &PassOptions| {
        Box::new(PlanBuffers {
            dynamic_dim: o.int("dynamic-dim"),
        })
    },
};

/// Offsets are multiples of this many bytes.
pub const ALIGNMENT: u64 = 64;

/// Whether op `name` may write its result over a dying operand of the same size.
fn in_place(name: &str) -> bool {
    ops::is_elementwise(name) || name == "llm.fused" || name == "llm.rope"
}

/// The pass, with its option.
pub struct PlanBuffers {
    /// Size assumed for dynamic dims.
    pub dynamic_dim: u64,
}

/// The plan of one function.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferPlan {
    /// Offset of each planned value.
    pub offsets: Vec<u64>,
    /// Size of each planned value.
    pub sizes: Vec<u64>,
    /// Bytes of the arena.
    pub arena_bytes: u64,
    /// Sum of all sizes.
    pub naive_bytes: u64,
}

/// Plans the intermediates of `func`.
pub fn plan_function(ctx: &Context, func: FuncOp, dynamic_dim: u64) -> BufferPlan {
    let body = func.get_entry_block(ctx);
    let ops = ir::block_ops(ctx, body);
    let end = ops.len();
    let mut values: Vec<(Value, u64, usize)> = Vec::new();
    // Values computed from weights and constants alone (a concatenated weight, say) are the
    // same every step: a runtime computes them once at load, so they take no arena space.
    let mut from_weights: HashSet<Value> = HashSet::new();
    for (i, &op) in ops.iter().enumerate() {
        let operands = ir::operands(ctx, op);
        let name = ir::name(ctx, op);
        if name == "llm.weight"
            || name == "llm.constant"
            || (!operands.is_empty() && operands.iter().all(|o| from_weights.contains(o)))
        {
            from_weights.extend(ir::results(ctx, op));
            continue;
        }
        for r in ir::results(ctx, op) {
            if let Some(bytes) = value_bytes(ctx, r, dynamic_dim) {
                values.push((r, bytes, i));
            }
        }
    }
    let index_of: HashMap<Ptr<Operation>, usize> =
        ops.iter().enumerate().map(|(i, &o)| (o, i)).collect();
    let last_use = |v: Value| {
        ir::users(ctx, v)
            .iter()
            .map(|u| {
                if ir::name(ctx, *u) == "llm.return" {
                    end
                } else {
                    index_of.get(u).copied().unwrap_or(end)
                }
            })
            .max()
            .unwrap_or(0)
    };
    // Buffers: (size, start, end), and for each value the buffer it lives in.
    let mut buffers: Vec<(u64, usize, usize)> = Vec::new();
    let mut buffer_of: HashMap<Value, usize> = HashMap::new();
    for &(v, size, def) in &values {
        let op = ops[def];
        let reuse = in_place(&ir::name(ctx, op)).then(|| {
            ir::operands(ctx, op).into_iter().find_map(|o| {
                let b = *buffer_of.get(&o)?;
                (buffers[b].0 == size && buffers[b].2 == def && last_use(o) == def).then_some(b)
            })
        });
        let last = last_use(v).max(def);
        match reuse.flatten() {
            Some(b) => {
                buffers[b].2 = last;
                buffer_of.insert(v, b);
            }
            None => {
                buffers.push((size, def, last));
                buffer_of.insert(v, buffers.len() - 1);
            }
        }
    }
    let (offset_of, arena_bytes) = place_buffers(&buffers);
    let offsets: Vec<u64> = values
        .iter()
        .map(|(v, _, _)| offset_of[buffer_of[v]])
        .collect();
    let sizes: Vec<u64> = values.iter().map(|(_, s, _)| *s).collect();
    BufferPlan {
        naive_bytes: sizes.iter().sum(),
        offsets,
        sizes,
        arena_bytes,
    }
}

/// Places buffers of `(bytes, first use, last use)` (uses are op indices, inclusive) in
/// one arena so that buffers whose uses overlap do not: largest first (then earliest),
/// each at the lowest [`ALIGNMENT`]-aligned offset clear of those already placed that
/// overlap it. Returns each buffer's offset and the arena's size (the peak).
pub fn place_buffers(buffers: &[(u64, usize, usize)]) -> (Vec<u64>, u64) {
    let mut order: Vec<usize> = (0..buffers.len()).collect();
    order.sort_by_key(|&b| (std::cmp::Reverse(buffers[b].0), buffers[b].1));
    let mut placed: Vec<(u64, u64, usize, usize)> = Vec::new();
    let mut offset_of = vec![0u64; buffers.len()];
    for b in order {
        let (size, start, stop) = buffers[b];
        let mut conflicts: Vec<(u64, u64)> = placed
            .iter()
            .filter(|(_, _, s, e)| *s <= stop && start <= *e)
            .map(|(o, sz, _, _)| (*o, *sz))
            .collect();
        conflicts.sort_unstable();
        let mut offset = 0u64;
        for (o, sz) in conflicts {
            if offset + size <= o {
                break;
            }
            offset = offset.max((o + sz).div_ceil(ALIGNMENT) * ALIGNMENT);
        }
        offset_of[b] = offset;
        placed.push((offset, size, start, stop));
    }
    let arena_bytes = placed.iter().map(|(o, s, _, _)| o + s).max().unwrap_or(0);
    (offset_of, arena_bytes)
}

impl Pass for PlanBuffers {
    fn run(&mut self, ctx: &mut Context, root: Ptr<Operation>) -> Result<bool, PassError> {
        let module = Operation::get_op::<ModuleOp>(root, ctx)
            .ok_or_else(|| PassError::new("plan-buffers runs on a module"))?;
        let body = module.get_body(ctx, 0);
        let funcs: Vec<FuncOp> = ir::block_ops(ctx, body)
            .into_iter()
            .filter_map(|op| Operation::get_op::<FuncOp>(op, ctx))
            .collect();
        for op in ir::block_ops(ctx, body) {
            if ir::name(ctx, op) == "llm.buffer_plan" {
                Operation::erase(op, ctx);
            }
        }
        for func in funcs {
            let plan = plan_function(ctx, func, self.dynamic_dim);
            let ints = |v: &[u64]| {
                ParamValue::List(v.iter().map(|&x| ParamValue::Int(x as i64)).collect())
            };
            let name = func.get_symbol_name(ctx).to_string();
            let record: BufferPlanOp = ops::build(
                ctx,
                vec![],
                vec![],
                vec![
                    ("func", ParamValue::Str(name)),
                    ("arena_bytes", ParamValue::Int(plan.arena_bytes as i64)),
                    ("naive_bytes", ParamValue::Int(plan.naive_bytes as i64)),
                    ("dynamic_dim", ParamValue::Int(self.dynamic_dim as i64)),
                    ("offsets", ints(&plan.offsets)),
                    ("sizes", ints(&plan.sizes)),
                ],
            );
            record
                .get_operation()
                .insert_before(ctx, func.get_operation());
        }
        Ok(true)
    }
}

/// The bytes of a tensor or quantized tensor value (quantized activations are
/// intermediates too), dynamic dims counted as `dynamic_dim`; `None` for other values.
fn value_bytes(ctx: &Context, v: Value, dynamic_dim: u64) -> Option<u64> {
    if let Some(t) = ir::tensor_type(ctx, v) {
        let elems: u64 = t.shape().iter().map(|d| d.unwrap_or(dynamic_dim)).product();
        return Some(elems * t.dtype().size_bytes() as u64);
    }
    let q = ir::quantized_type(ctx, v)?;
    let shape: Vec<usize> = q
        .shape()
        .iter()
        .map(|d| d.unwrap_or(dynamic_dim) as usize)
        .collect();
    Some(storage_bytes(q.format(), &shape) as u64)
}
