//! Semantics of `llm.append_kv` and `llm.lookup_kv`.

use std::rc::Rc;

use super::{Eval, Outputs, attention::slot_of};
use crate::{
    dtype::DType,
    interp::{
        KvValues, quant,
        value::{KvCache, Tensor, Value},
    },
    types::KvStorage,
};

/// Writes `row` (one head row) at element `at` of `dest` as the cache's storage holds it:
/// rounded to its float type, quantized into its blocks (the array holds them), or, for
/// nf4 and the affine formats, quantized and dequantized.
fn store(storage: &KvStorage, row: &[f32], dest: &mut KvValues, at: usize) {
    match storage {
        KvStorage::Quantized(format) if !matches!(dest, KvValues::Blocks(..)) => {
            // One head row in the pool layout [blocks, block_size, kv_heads, head_dim]: groups
            // run along head_dim (axis 3, the last).
            let shape = [1, 1, 1, row.len()];
            let bytes = quant::quantize(format, &shape, row);
            dest.write(at, &quant::dequantize(format, &shape, &bytes));
        }
        _ => dest.write(at, row),
    }
}

/// `llm.append_kv`: writes each row of `k` and `v` to its slot (in place when the cache
/// value is not shared).
pub fn append_kv(e: &Eval, mut inputs: Vec<Rc<Value>>) -> Outputs {
    let slots = inputs.pop().ok_or("missing slots")?;
    let v = inputs.pop().ok_or("missing v")?;
    let k = inputs.pop().ok_or("missing k")?;
    let cache = inputs.pop().ok_or("missing cache")?;
    let cache = append(e, cache, k.tensor()?, v.tensor()?, slots.tensor()?)?;
    Ok(vec![Rc::new(Value::Cache(cache))])
}

/// Takes the cache out of `cache` (in place when nothing else holds it, else a copy) and
/// writes `k` and `v` to `slots` of the op's `layer`.
pub fn append(
    e: &Eval,
    cache: Rc<Value>,
    k: &Tensor,
    v: &Tensor,
    slots: &Tensor,
) -> Result<KvCache, String> {
    let mut cache = match Rc::unwrap_or_clone(cache) {
        Value::Cache(c) => c,
        other => return Err(format!("expected a KV cache, found {}", other.kind())),
    };
    append_rows(&mut cache, e.int("layer", 0) as usize, k, v, slots)?;
    Ok(cache)
}

/// Writes row `n` of `k` and `v` (`[N, kv_heads, head_dim]`) to slot `slots[n]` of `layer`.
pub fn append_rows(
    cache: &mut KvCache,
    layer: usize,
    k: &Tensor,
    v: &Tensor,
    slots: &Tensor,
) -> Result<(), String> {
    let d = cache.params.head_dim as usize;
    let rows = slots.len();
    let want = [rows, cache.params.kv_heads as usize, d];
    if k.shape != want || v.shape != want || layer >= cache.params.layers as usize {
        return Err(format!(
            "{rows} slots need k and v of shape {want:?} in layer < {}, found {:?} and {:?} (layer {layer})",
            cache.params.layers, k.shape, v.shape
        ));
    }
    write_rows(cache, layer, (k.floats()?, v.floats()?), slots.ints()?)
}

/// Writes row `n` of the keys `kd` and values `vd` (rows of the cache's `kv_heads x
/// head_dim`, one per slot) to slot `slots[n]` of `layer`, rounded to the cache's storage:
/// [`append_rows`] on bare rows, checked the same way.
pub fn write_rows(
    cache: &mut KvCache,
    layer: usize,
    (kd, vd): (&[f32], &[f32]),
    slots: &[i64],
) -> Result<(), String> {
    cache.check_host()?;
    let d = cache.params.head_dim as usize;
    let row_len = cache.slot_len();
    if kd.len() != slots.len() * row_len
        || vd.len() != kd.len()
        || layer >= cache.params.layers as usize
    {
        return Err(format!(
            "{} slots need {} keys and values in layer < {}, found {} and {} (layer {layer})",
            slots.len(),
            slots.len() * row_len,
            cache.params.layers,
            kd.len(),
            vd.len()
        ));
    }
    for (n, &slot) in slots.iter().enumerate() {
        if slot < 0 || slot as usize >= cache.slots() {
            return Err(format!(
                "slot {slot} is out of range for a pool of {} slots",
                cache.slots()
            ));
        }
        let at = cache.slot_offset(layer, slot as usize);
        for head in 0..cache.params.kv_heads as usize {
            let (src, dest) = (n * row_len + head * d, at + head * d);
            let storage = &cache.params.storage;
            store(storage, &kd[src..src + d], &mut cache.k, dest);
            store(storage, &vd[src..src + d], &mut cache.v, dest);
        }
    }
    Ok(())
}

/// The rows (all KV heads) of positions `0..len` of `layer` of the sequence with block
/// table `table`, read from `data` (the cache's keys or values) as `f32`.
fn gather(
    cache: &KvCache,
    data: &KvValues,
    layer: usize,
    table: &[i64],
    len: usize,
) -> Result<Vec<f32>, String> {
    let slots = (0..len)
        .map(|pos| slot_of(cache, table, pos))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(cache.rows(data, layer, &slots))
}

/// `llm.lookup_kv`: gathers positions `0..context_len` of one sequence.
pub fn lookup_kv(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let cache = inputs[0].cache()?;
    let layer = e.int("layer", 0) as usize;
    let dtype = e.result_dtype(0)?;
    let [k, v] = lookup(
        cache,
        layer,
        inputs[1].tensor()?,
        inputs[2].tensor()?,
        dtype,
    )?;
    Ok(vec![Rc::new(Value::Tensor(k)), Rc::new(Value::Tensor(v))])
}

/// The keys and values (`[context_len, kv_heads, head_dim]` of `dtype`) of positions
/// `0..context_len` of `layer` of the sequence with block table `table`.
pub fn lookup(
    cache: &KvCache,
    layer: usize,
    table: &Tensor,
    context_len: &Tensor,
    dtype: DType,
) -> Result<[Tensor; 2], String> {
    let (table, len) = (table.ints()?, context_len.ints()?);
    let len = *len.first().ok_or("no context length")?;
    if len < 0 {
        return Err(format!("context length {len} is negative"));
    }
    if layer >= cache.params.layers as usize {
        return Err(format!(
            "layer {layer} is outside a cache of {} layers",
            cache.params.layers
        ));
    }
    let shape = vec![
        len as usize,
        cache.params.kv_heads as usize,
        cache.params.head_dim as usize,
    ];
    let k = gather(cache, &cache.k, layer, table, len as usize)?;
    let v = gather(cache, &cache.v, layer, table, len as usize)?;
    Ok([
        Tensor::from_f32(shape.clone(), dtype, k),
        Tensor::from_f32(shape, dtype, v),
    ])
}
