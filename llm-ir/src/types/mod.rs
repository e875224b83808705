//! The types of the `llm` dialect.
//!
//! | type | text |
//! |---|---|
//! | [`TensorType`] | `llm.tensor <4x?xf32>` |
//! | [`QuantizedTensorType`] | `llm.quantized_tensor <4096x4096, q4_k>` |
//! | [`PagedKvCacheType`] | `llm.paged_kv_cache <layers = 2, kv_heads = 4, head_dim = 64, block_size = 16, blocks = ?, dtype = f16>` |
//! | [`ShardedTensorType`] | `llm.sharded_tensor <8x64xf32, mesh = [tp = 2], split = [[], [tp]]>` |
//!
//! Each type validates its parameters in one `validate` function that both the parser (with the
//! location of the type in the text) and pliron's type verifier call.

mod iq_grids;
mod kv_cache;
mod quant;
mod sharded;
mod tensor;

pub use iq_grids::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID};
pub use kv_cache::{KvCacheParams, KvStorage, PagedKvCacheType};
pub use quant::{IQ4_NL_LEVELS, QuantFormat, QuantizedTensorType};
pub use sharded::{MAX_DEVICES, Reduction, ShardedTensorType};
pub use tensor::TensorType;

use crate::syntax::Dim;

/// Whether two dims may describe the same runtime size (either is dynamic, or they are equal).
pub fn dims_compatible(a: Dim, b: Dim) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => x == y,
        _ => true,
    }
}

/// Whether two shapes have the same rank and pairwise compatible dims.
pub fn shapes_compatible(a: &[Dim], b: &[Dim]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| dims_compatible(*x, *y))
}

/// The number of elements of a shape, when every dim is static and the product fits `u64`.
pub fn num_elements(shape: &[Dim]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, d| acc.checked_mul((*d)?))
}
