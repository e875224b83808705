//! `canonicalize`: simplifies the IR with per-op patterns and constant folding, run to a
//! fixpoint by the greedy driver. Patterns are grouped by topic; each states its algebra.

mod arithmetic;
mod collectives;
mod fold;
mod quant;
mod shape;

use pliron::{
    context::{Context, Ptr},
    operation::Operation,
};

use crate::{
    driver::{self, Pattern},
    pass::{Pass, PassError, PassInfo, PassOptions, Scope},
};

/// The registry entry.
pub const INFO: PassInfo = PassInfo {
    name: "canonicalize",
    summary: "simplify with per-op patterns (transposes, reshapes, identities, collectives) and fold small constants",
    options: &[],
    scope: Scope::Any,
    create: |_: &PassOptions| Box::new(Canonicalize),
};

/// Every canonicalization pattern.
pub fn patterns() -> Vec<Box<dyn Pattern>> {
    vec![
        Box::new(shape::TransposeOfTranspose),
        Box::new(shape::IdentityTranspose),
        Box::new(shape::ReshapeOfReshape),
        Box::new(shape::IdentityReshape),
        Box::new(shape::IdentitySlice),
        Box::new(shape::IdentityCast),
        Box::new(arithmetic::NeutralOperand),
        Box::new(quant::DequantizeOfQuantizedConstant),
        Box::new(collectives::AllGatherOfReduceScatter),
        Box::new(fold::FoldConstants),
    ]
}

/// The canonicalization pass.
pub struct Canonicalize;

impl Pass for Canonicalize {
    fn run(&mut self, ctx: &mut Context, root: Ptr<Operation>) -> Result<bool, PassError> {
        driver::apply_greedily(ctx, root, &patterns())
    }
}
