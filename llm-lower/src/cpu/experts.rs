//! Entry points of the mixture-of-experts kernels: `llm.topk` through the reference's
//! routine, and `llm.expert_matmul` through one expert's compiled contraction, called
//! once for each expert some token chose, on the rows routed to it.

use std::rc::Rc;

use llm_ir::{
    dtype::DType,
    interp::{
        Tensor, Value,
        eval::moe::{routed_slots, topk_rows},
    },
};

use super::calls::{Kernels, Outputs, Rows, contract_into, stacked_weight_bytes};
use crate::kernel::Contraction;

/// `llm.topk` of rows of `n` values, keeping `k`, with indices of type `index`.
pub(super) fn top_k(
    kernels: &Kernels,
    [n, k]: [usize; 2],
    index: DType,
    inputs: &[Rc<Value>],
) -> Outputs {
    let x = inputs[0].tensor()?;
    if x.shape.last() != Some(&n) {
        return Err(format!("the input {:?} does not end in {n}", x.shape));
    }
    let (values, indices) = topk_rows(x.floats()?, n, k);
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("ends in n") = k;
    kernels.results([
        Value::Tensor(Tensor::from_f32(shape.clone(), DType::F32, values)),
        Value::Tensor(Tensor::from_i64(shape, index, indices)),
    ])
}

/// `llm.expert_matmul` through `f`, the compiled contraction `c` of one expert: the
/// slots routed to each chosen expert are gathered, multiplied by its matrix in one call
/// (split over the workers as any contraction) and scattered to their places.
pub(super) fn expert_contraction(
    kernels: &Kernels,
    c: &Contraction,
    f: *const u8,
    inputs: &[Rc<Value>],
) -> Result<Tensor, String> {
    let (dims, chosen) = routed_slots(inputs)?;
    if (dims.n, dims.k) != (c.n, c.k) {
        return Err(format!(
            "the experts are {}x{}, the kernel's {}x{}",
            dims.n, dims.k, c.n, c.k
        ));
    }
    let wbytes = stacked_weight_bytes(c, &inputs[1], &[dims.experts])?;
    let expert_bytes = wbytes.len() / dims.experts.max(1);
    let xs = inputs[0].tensor()?.floats()?;
    let mut routed: Vec<Vec<usize>> = vec![Vec::new(); dims.experts];
    for (slot, &expert) in chosen.iter().enumerate() {
        routed[expert].push(slot);
    }
    let (n, k) = (c.n, c.k);
    // Every slot belongs to one expert, so every row of `out` is written.
    let mut out = kernels.pool.for_overwrite(chosen.len() * n);
    let (mut gathered, mut products) = (Vec::new(), Vec::new());
    for (expert, slots) in routed.iter().enumerate() {
        if slots.is_empty() {
            continue;
        }
        gathered.clear();
        for &slot in slots {
            let row = dims.input_row(slot / dims.slots, slot % dims.slots);
            gathered.extend_from_slice(&xs[row * k..(row + 1) * k]);
        }
        products.resize(slots.len() * n, 0.0);
        let matrix = &wbytes[expert * expert_bytes..(expert + 1) * expert_bytes];
        let rows = Rows::of_floats(&gathered, k);
        contract_into(kernels, c, f, (rows, matrix, None), &mut products);
        for (i, &slot) in slots.iter().enumerate() {
            out[slot * n..(slot + 1) * n].copy_from_slice(&products[i * n..(i + 1) * n]);
        }
    }
    Ok(Tensor::from_f32(
        vec![dims.tokens, dims.slots, n],
        DType::F32,
        out,
    ))
}
