//! Kernel selection for a whole function, shared by the backends: which ops run which
//! kernel family ([`kernel::select`]), which ops are fused into another's kernel (a
//! residual `add` into the contraction that produces its operand), and which ops run
//! each call at all (weight-derived ones are evaluated once, at load).

use std::collections::HashMap;

use pliron::{
    context::{Context, Ptr},
    operation::Operation,
    value::Value as IrValue,
};

use crate::kernel::{self, Contraction, Kernel, WeightFormat};

/// The kernel chosen for one op.
#[derive(Debug, Clone, PartialEq)]
pub struct Chosen {
    /// The kernel.
    pub kernel: Kernel,
    /// Its code's index in [`Selection::kernels`] (none for data movement).
    pub index: Option<usize>,
    /// The index of the RMS-norm kernel of a contraction with an RMS-norm prologue (a
    /// backend that does not fuse the prologue runs it first).
    pub prologue: Option<usize>,
}

/// The kernels of a function's ops: the distinct generated functions, and per op its
/// kernel.
pub struct Selection {
    /// Distinct kernel codes ([`Kernel::code`]), in first-use order.
    pub kernels: Vec<Kernel>,
    /// Per op: its kernel, or `None` for reference semantics (or a fused op).
    pub per_op: Vec<Option<Chosen>>,
    /// Per op: for an `llm.add` fused into a contraction as its residual epilogue, the
    /// contraction's op index.
    pub fused_into: Vec<Option<usize>>,
    /// Per op: for a contraction with a residual epilogue, what it adds and produces.
    pub epilogues: Vec<Option<Epilogue>>,
}

/// A contraction's residual epilogue: the residual operand, and the sum (the fused add's
/// result), which the contraction produces instead of its own result.
pub type Epilogue = (IrValue, IrValue);

impl Selection {
    /// Ops that run in kernels (fused ones included).
    pub fn kernel_ops(&self) -> usize {
        self.per_op.iter().flatten().count() + self.fused_ops()
    }

    /// Ops fused into another op's kernel.
    pub fn fused_ops(&self) -> usize {
        self.fused_into.iter().flatten().count()
    }

    /// The ops of `ops` (those the selection was made for) that run through their
    /// reference semantics, counted by name in first-seen order.
    pub fn reference_ops(&self, ctx: &Context, ops: &[Ptr<Operation>]) -> Vec<(String, usize)> {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for (i, &op) in ops.iter().enumerate() {
            let name = Operation::get_opid(op, ctx).to_string();
            if self.per_op[i].is_some() || self.fused_into[i].is_some() || name == "llm.return" {
                continue;
            }
            match counts.iter_mut().find(|(n, _)| *n == name) {
                Some((_, count)) => *count += 1,
                None => counts.push((name, 1)),
            }
        }
        counts
    }
}

/// The ops of `ops` that run on each call: all but those whose results are all
/// `weight_derived` (evaluated once at load).
pub fn live_ops(
    ctx: &Context,
    ops: &[Ptr<Operation>],
    weight_derived: impl Fn(IrValue) -> bool,
) -> Vec<Ptr<Operation>> {
    ops.iter()
        .copied()
        .filter(|&op| {
            let results: Vec<IrValue> = op.deref(ctx).results().collect();
            results.is_empty() || !results.iter().all(|&r| weight_derived(r))
        })
        .collect()
}

/// The operand of a contraction op that holds its weight matrix.
pub fn weight_operand(kernel: &Contraction) -> usize {
    if kernel.norm_eps_bits.is_some() { 2 } else { 1 }
}

/// Selects kernels for every op of `ops` among those the backend `supports`. Contractions
/// whose f32 weight `is_constant` read it in the CPU's panel layout; those of q8_0
/// activations whose weight of 32-value blocks, and those whose 16-bit weight, is constant and read
/// by quantized matmuls (and embeddings) only read it in block panels (the weight is
/// repacked once, at compile time; the GPU reads its row-major upload whatever the flag
/// says); and an add whose operand is a contraction's only use becomes that contraction's
/// epilogue.
pub fn select_all(
    ctx: &Context,
    ops: &[Ptr<Operation>],
    is_constant: impl Fn(IrValue) -> bool,
    supports: impl Fn(&Kernel) -> bool,
) -> Selection {
    let mut chosen: Vec<Option<Kernel>> = ops
        .iter()
        .map(|&op| {
            let mut k = kernel::select(ctx, op).filter(&supports)?;
            // A constant weight of 32-value blocks (q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl) that only
            // quantized matmuls and embeddings read is repacked into block panels for those of q8_0 activations, and a 16-bit
            // one into panels for any (the embeddings gather from the panels, so no
            // row-major copy stays alive).
            if let Kernel::Contraction(c) = &mut k
                && ((c.q8_0_input && c.weight.has_block_panels()) || c.weight.is_sixteen_bit())
            {
                let w = op.deref(ctx).get_operand(weight_operand(c));
                c.block_panels = is_constant(w) && read_as_weight_or_table(ctx, ops, w);
            }
            if let Kernel::Contraction(c) = &mut k
                && matches!(c.weight, WeightFormat::F32 | WeightFormat::F32KN)
            {
                let constant = is_constant(op.deref(ctx).get_operand(weight_operand(c)));
                if constant {
                    c.transpose_at_pack = c.weight == WeightFormat::F32KN;
                    c.weight = WeightFormat::F32Panels;
                } else if c.weight == WeightFormat::F32KN {
                    // A [k, n] weight computed at run time: the general matmul, where the
                    // backend has one.
                    return Some(Kernel::BatchedMatmul { transposed: false }).filter(&supports);
                }
            }
            Some(k)
        })
        .collect();
    let (fused_into, epilogues) = fuse_residuals(ctx, ops, &mut chosen);
    let mut kernels: Vec<Kernel> = Vec::new();
    let mut index_of = |k: &Kernel| {
        let code = k.code()?;
        Some(match kernels.iter().position(|x| *x == code) {
            Some(i) => i,
            None => {
                kernels.push(code);
                kernels.len() - 1
            }
        })
    };
    let per_op = chosen
        .into_iter()
        .zip(&fused_into)
        .map(|(k, fused)| {
            let k = k.filter(|_| fused.is_none())?;
            let prologue = match &k {
                Kernel::Contraction(Contraction {
                    k: d,
                    norm_eps_bits: Some(eps_bits),
                    ..
                }) => index_of(&Kernel::RmsNorm {
                    d: *d,
                    eps_bits: *eps_bits,
                }),
                _ => None,
            };
            Some(Chosen {
                index: index_of(&k),
                kernel: k,
                prologue,
            })
        })
        .collect();
    Selection {
        kernels,
        per_op,
        fused_into,
        epilogues,
    }
}

/// Whether every op of `ops` that reads `w` is an `llm.quantized_matmul` reading it as its
/// weight or an `llm.embedding` reading it as its table (once).
fn read_as_weight_or_table(ctx: &Context, ops: &[Ptr<Operation>], w: IrValue) -> bool {
    ops.iter().all(|&op| {
        let o = op.deref(ctx);
        let reads = o.operands().filter(|&v| v == w).count();
        let at = match Operation::get_opid(op, ctx).to_string().as_str() {
            "llm.quantized_matmul" => 1,
            "llm.embedding" => 0,
            _ => return reads == 0,
        };
        reads == 0 || (reads == 1 && o.get_operand(at) == w)
    })
}

/// Fuses `z = llm.add(a, b)` into the contraction that produces `a` (or `b`) when that
/// product has no other use and the other operand exists before the contraction runs:
/// the contraction adds it as an epilogue and produces `z`.
fn fuse_residuals(
    ctx: &Context,
    ops: &[Ptr<Operation>],
    chosen: &mut [Option<Kernel>],
) -> (Vec<Option<usize>>, Vec<Option<Epilogue>>) {
    let mut defined_by: HashMap<IrValue, usize> = HashMap::new();
    let mut uses: HashMap<IrValue, usize> = HashMap::new();
    for (i, &op) in ops.iter().enumerate() {
        let o = op.deref(ctx);
        defined_by.extend(o.results().map(|r| (r, i)));
        for v in o.operands() {
            *uses.entry(v).or_default() += 1;
        }
    }
    let mut fused_into = vec![None; ops.len()];
    let mut epilogues = vec![None; ops.len()];
    for (i, &op) in ops.iter().enumerate() {
        let is_add = Operation::get_opid(op, ctx).to_string() == "llm.add"
            && matches!(chosen[i], Some(Kernel::Elementwise(_)));
        if !is_add {
            continue;
        }
        let o = op.deref(ctx);
        let (a, b) = (o.get_operand(0), o.get_operand(1));
        for (product, other) in [(a, b), (b, a)] {
            let Some(&j) = defined_by.get(&product) else {
                continue;
            };
            let fusable = matches!(&chosen[j], Some(Kernel::Contraction(c)) if !c.residual)
                && uses.get(&product) == Some(&1)
                && defined_by.get(&other).is_none_or(|&d| d < j);
            if fusable {
                if let Some(Kernel::Contraction(c)) = &mut chosen[j] {
                    c.residual = true;
                }
                fused_into[i] = Some(j);
                epilogues[j] = Some((other, o.get_result(0)));
                break;
            }
        }
    }
    (fused_into, epilogues)
}
