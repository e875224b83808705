//! The greedy pattern rewrite driver.
//!
//! Patterns are tried on a worklist of ops, highest benefit first. A pattern matches and
//! rewrites in one call, so a match is always checked against the current IR, never a stale
//! one. Whenever a rewrite changes the IR, the ops it created, the users of values it
//! replaced and the producers of operands of ops it erased go back on the worklist. The
//! driver also erases ops whose results are unused, as MLIR's does. It stops at a fixpoint (an empty worklist), or fails with an error when it exceeds
//! its rewrite budget, which would mean patterns undo each other.

use std::collections::{HashSet, VecDeque};

use pliron::{
    context::{Context, Ptr},
    operation::Operation,
    value::Value,
};

use crate::{ir, pass::PassError};

/// Records IR edits so the driver knows what to revisit.
pub struct Rewriter<'a> {
    /// The context being edited.
    pub ctx: &'a mut Context,
    touched: Vec<Ptr<Operation>>,
    erased: HashSet<Ptr<Operation>>,
}

impl<'a> Rewriter<'a> {
    /// A rewriter over `ctx`.
    pub fn new(ctx: &'a mut Context) -> Self {
        Rewriter {
            ctx,
            touched: Vec::new(),
            erased: HashSet::new(),
        }
    }

    /// Inserts the freshly built `op` just before `anchor`.
    pub fn insert_before(&mut self, anchor: Ptr<Operation>, op: Ptr<Operation>) {
        op.insert_before(self.ctx, anchor);
        self.touched.push(op);
    }

    /// Makes every use of `from` use `to` instead.
    pub fn replace_uses(&mut self, from: Value, to: Value) {
        let users = ir::users(self.ctx, from);
        from.replace_all_uses_with(self.ctx, &to);
        self.touched.extend(users);
        if let Some(p) = ir::producer(to) {
            self.touched.push(p);
        }
    }

    /// Replaces the results of `op` by `values`, then erases `op`.
    pub fn replace_op(&mut self, op: Ptr<Operation>, values: &[Value]) {
        for (r, v) in ir::results(self.ctx, op).into_iter().zip(values) {
            self.replace_uses(r, *v);
        }
        self.erase(op);
    }

    /// Erases `op`, whose results must be unused.
    pub fn erase(&mut self, op: Ptr<Operation>) {
        for v in ir::operands(self.ctx, op) {
            if let Some(p) = ir::producer(v) {
                self.touched.push(p);
            }
        }
        Operation::erase(op, self.ctx);
        self.erased.insert(op);
    }

    /// Whether `op` was erased.
    pub fn is_erased(&self, op: Ptr<Operation>) -> bool {
        self.erased.contains(&op)
    }
}

/// A rewrite rule.
pub trait Pattern {
    /// A name for diagnostics.
    fn name(&self) -> &'static str;

    /// The op name this pattern is rooted at (`None`: any op).
    fn root(&self) -> Option<&'static str>;

    /// Patterns with a higher benefit are tried first.
    fn benefit(&self) -> u32 {
        1
    }

    /// Matches at `op` and, if it matches, rewrites. Returns whether the IR changed.
    fn apply(&self, rw: &mut Rewriter, op: Ptr<Operation>) -> Result<bool, PassError>;
}

/// Whether `op` has results and none is used.
fn is_dead(ctx: &Context, op: Ptr<Operation>) -> bool {
    op.deref(ctx).get_num_results() > 0 && !ir::has_uses(ctx, op)
}

/// Applies `patterns` under `root` until nothing matches; returns whether anything changed.
pub fn apply_greedily(
    ctx: &mut Context,
    root: Ptr<Operation>,
    patterns: &[Box<dyn Pattern>],
) -> Result<bool, PassError> {
    let mut order: Vec<&dyn Pattern> = patterns.iter().map(|p| p.as_ref()).collect();
    order.sort_by_key(|p| std::cmp::Reverse(p.benefit()));
    let initial = ir::nested_ops(ctx, root);
    let budget = 100 + 20 * initial.len();
    let mut queued: HashSet<Ptr<Operation>> = initial.iter().copied().collect();
    let mut worklist: VecDeque<Ptr<Operation>> = initial.into();
    let mut rw = Rewriter::new(ctx);
    let mut rewrites = 0usize;
    while let Some(op) = worklist.pop_front() {
        queued.remove(&op);
        if rw.is_erased(op) {
            continue;
        }
        let op_name = ir::name(rw.ctx, op);
        // Trivially dead ops go first (every llm op is pure).
        if op_name.starts_with("llm.") && is_dead(rw.ctx, op) {
            rw.erase(op);
            rewrites += 1;
            for t in std::mem::take(&mut rw.touched) {
                if !rw.is_erased(t) && queued.insert(t) {
                    worklist.push_back(t);
                }
            }
            continue;
        }
        for pattern in &order {
            if pattern.root().is_some_and(|r| r != op_name) {
                continue;
            }
            if pattern.apply(&mut rw, op)? {
                rewrites += 1;
                if rewrites > budget {
                    return Err(PassError::new(format!(
                        "the rewrite driver did not converge: more than {budget} rewrites (last: {})",
                        pattern.name()
                    )));
                }
                for t in std::mem::take(&mut rw.touched) {
                    if !rw.is_erased(t) && queued.insert(t) {
                        worklist.push_back(t);
                    }
                }
                if !rw.is_erased(op) && queued.insert(op) {
                    worklist.push_back(op);
                }
                break;
            }
        }
    }
    Ok(rewrites > 0)
}
