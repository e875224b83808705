//! The paged KV pool in device memory: one key and one value buffer per layer, named by
//! the [`KvCache`] values a program returns ([`KvCache::resident`]), copied block by block
//! on the device and read back on request. The buffers hold the bytes the host's
//! [`KvValues`] hold ([`KvElement`]s: an f16 or bf16 cache's 16 bits, two to a shader's
//! `u32`, half an f32 pool's memory; a block format's blocks, each padded to whole words;
//! `f32` otherwise), so crossing between host and device copies them as they are.

use std::sync::Arc;

use llm_ir::{
    interp::{KvCache, KvElement, KvValues, Resident},
    types::KvCacheParams,
};

use super::device::Gpu;

/// A paged KV pool in device memory: one key and one value buffer per layer.
pub(super) struct Pool {
    /// The cache type's parameters.
    pub params: KvCacheParams,
    /// Blocks in the pool.
    pub blocks: usize,
    /// Keys, per layer.
    pub k: Vec<wgpu::Buffer>,
    /// Values, per layer.
    pub v: Vec<wgpu::Buffer>,
    /// The device that holds it (a cache cannot move between devices).
    pub gpu: Arc<Gpu>,
}

impl Pool {
    /// The device pool of cache `c` on `gpu`: the one it names, or a new one holding its
    /// data.
    pub fn of(c: KvCache, gpu: &Arc<Gpu>) -> Result<Arc<Pool>, String> {
        if let Some(Resident(any)) = &c.resident {
            let pool = Arc::clone(any)
                .downcast::<Pool>()
                .map_err(|_| "the KV cache lives in another backend's memory".to_string())?;
            if !Arc::ptr_eq(&pool.gpu, gpu) {
                return Err("the KV cache lives on another GPU device".into());
            }
            return Ok(pool);
        }
        let element = KvElement::of(&c.params.storage);
        if c.k.element() != element || c.v.element() != element {
            return Err("the cache's storage does not match its type".into());
        }
        let per_layer = element.bytes(c.slot_offset(1, 0));
        // Buffers are whole words (a 16-bit pool of an odd count ends in half of one).
        let bytes = per_layer.next_multiple_of(4) as u64;
        let limit = gpu.limits().max_binding_bytes;
        if bytes > limit {
            return Err(format!(
                "one layer of the KV pool takes {bytes} bytes, over the device's {limit}-byte binding limit; use fewer blocks"
            ));
        }
        let layers = c.params.layers as usize;
        let upload = |data: &KvValues, which: &str| -> Vec<wgpu::Buffer> {
            (0..layers)
                .map(|l| {
                    let label = format!("kv {which} layer {l}");
                    match data.bytes().get(l * per_layer..(l + 1) * per_layer) {
                        Some(part) if part.iter().any(|&b| b != 0) => gpu.upload(&label, part),
                        _ => gpu.storage(&label, bytes),
                    }
                })
                .collect()
        };
        Ok(Arc::new(Pool {
            k: upload(&c.k, "k"),
            v: upload(&c.v, "v"),
            params: c.params,
            blocks: c.blocks,
            gpu: Arc::clone(gpu),
        }))
    }

    /// A host cache with this pool's parameters and no data: what the reference's index
    /// checks (`for_each_paged_row`, `slot_of`) need.
    pub fn shape_only(&self) -> KvCache {
        KvCache {
            params: self.params.clone(),
            blocks: self.blocks,
            k: KvValues::zeros(&self.params.storage, 0),
            v: KvValues::zeros(&self.params.storage, 0),
            resident: None,
        }
    }

    /// The cache value that names this pool.
    pub fn cache(self: &Arc<Pool>) -> KvCache {
        KvCache {
            params: self.params.clone(),
            blocks: self.blocks,
            k: KvValues::zeros(&self.params.storage, 0),
            v: KvValues::zeros(&self.params.storage, 0),
            resident: Some(Resident(Arc::clone(self) as Arc<_>)),
        }
    }
}

/// Copies block `from` of every layer of a device-resident cache to block `to` (the
/// copy-on-write of a shared prefix block).
pub fn copy_block(cache: &KvCache, from: usize, to: usize) -> Result<(), String> {
    let Some(Resident(any)) = &cache.resident else {
        return Err("the cache is not in device memory".into());
    };
    let pool = Arc::clone(any)
        .downcast::<Pool>()
        .map_err(|_| "the KV cache lives in another backend's memory".to_string())?;
    if from >= pool.blocks || to >= pool.blocks {
        return Err(format!(
            "block {from} or {to} is outside a pool of {} blocks",
            pool.blocks
        ));
    }
    let gpu = &pool.gpu;
    let p = &cache.params;
    let values = p.block_size * p.kv_heads * p.head_dim;
    let block = KvElement::of(&p.storage).bytes(values as usize) as u64;
    if !block.is_multiple_of(4) {
        // Buffer copies move whole words; such a block starts or ends inside one.
        return Err(format!(
            "a block of {block} bytes is not whole 4-byte words: the GPU cannot copy it (a 16-bit pool needs an even block size or an even kv_heads * head_dim)"
        ));
    }
    // WebGPU copies never have the same buffer at both ends: go through a scratch block.
    let scratch = gpu.storage("block copy", block);
    let mut encoder = gpu.device().create_command_encoder(&Default::default());
    for buffer in pool.k.iter().chain(&pool.v) {
        encoder.copy_buffer_to_buffer(buffer, from as u64 * block, &scratch, 0, block);
        encoder.copy_buffer_to_buffer(&scratch, 0, buffer, to as u64 * block, block);
    }
    gpu.submit_and_read(encoder, &[])
        .map(|_| ())
        .map_err(|e| e.0)
}

/// A host copy of a cache that lives in device memory (for tests and inspection); a
/// host cache is returned as is.
pub fn read_cache(cache: &KvCache) -> Result<KvCache, String> {
    match &cache.resident {
        None => Ok(cache.clone()),
        Some(Resident(any)) => {
            let pool = Arc::clone(any)
                .downcast::<Pool>()
                .map_err(|_| "the KV cache lives in another backend's memory".to_string())?;
            read_pool(&pool)
        }
    }
}

/// Reads every layer of `pool` back.
pub(super) fn read_pool(pool: &Pool) -> Result<KvCache, String> {
    let mut cache = KvCache::new(pool.params.clone(), pool.blocks);
    let storage = &pool.params.storage;
    let per_layer = KvElement::of(storage).bytes(cache.slot_offset(1, 0)) as u64;
    let reads: Vec<(&wgpu::Buffer, u64)> = pool
        .k
        .iter()
        .chain(&pool.v)
        .map(|b| (b, per_layer))
        .collect();
    let encoder = pool
        .gpu
        .device()
        .create_command_encoder(&Default::default());
    let layers = pool.gpu.submit_and_read(encoder, &reads).map_err(|e| e.0)?;
    let (k, v) = layers.split_at(pool.k.len());
    cache.k = KvValues::from_bytes(storage, &k.concat());
    cache.v = KvValues::from_bytes(storage, &v.concat());
    Ok(cache)
}
