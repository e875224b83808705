//! Runtime values of the reference interpreter.

use half::{bf16, f16};

use super::KvValues;
use crate::{
    dtype::DType,
    types::{KvCacheParams, QuantFormat, Reduction},
};

/// The elements of a tensor: floats are held as `f32` (already rounded to the storage type
/// for f16 and bf16), integers as `i64` (already wrapped to the storage width).
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// Elements of a float tensor.
    Float(Vec<f32>),
    /// Elements of an integer tensor.
    Int(Vec<i64>),
}

/// A dense tensor: shape, element type and row-major elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The dims.
    pub shape: Vec<usize>,
    /// The element type.
    pub dtype: DType,
    /// The elements.
    pub data: Data,
}

/// Rounds `x` to what a value of type `dtype` can store.
pub fn round_float(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Wraps `x` to what an integer of type `dtype` can store.
pub fn wrap_int(dtype: DType, x: i64) -> i64 {
    match dtype {
        DType::I8 => x as i8 as i64,
        DType::I32 => x as i32 as i64,
        _ => x,
    }
}

impl Tensor {
    /// A float tensor; values are rounded to `dtype`.
    pub fn from_f32(shape: Vec<usize>, dtype: DType, mut values: Vec<f32>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        if dtype != DType::F32 {
            values.iter_mut().for_each(|v| *v = round_float(dtype, *v));
        }
        Tensor {
            shape,
            dtype,
            data: Data::Float(values),
        }
    }

    /// An integer tensor; values are wrapped to `dtype`.
    pub fn from_i64(shape: Vec<usize>, dtype: DType, mut values: Vec<i64>) -> Tensor {
        debug_assert_eq!(shape.iter().product::<usize>(), values.len());
        values.iter_mut().for_each(|v| *v = wrap_int(dtype, *v));
        Tensor {
            shape,
            dtype,
            data: Data::Int(values),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The float elements, or an error for an integer tensor.
    pub fn floats(&self) -> Result<&[f32], String> {
        match &self.data {
            Data::Float(v) => Ok(v),
            Data::Int(_) => Err(format!("expected a float tensor, found {}", self.dtype)),
        }
    }

    /// The integer elements, or an error for a float tensor.
    pub fn ints(&self) -> Result<&[i64], String> {
        match &self.data {
            Data::Int(v) => Ok(v),
            Data::Float(_) => Err(format!("expected an integer tensor, found {}", self.dtype)),
        }
    }

    /// Every element as `f64` (for comparisons and conversions).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            Data::Float(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Data::Int(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }
}

/// A quantized tensor: logical shape, format and the exact stored bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct QTensor {
    /// Logical dims.
    pub shape: Vec<usize>,
    /// Storage format.
    pub format: QuantFormat,
    /// The bytes, laid out as [`super::quant`] describes.
    pub bytes: Vec<u8>,
}

/// The paged KV block pool.
///
/// K and V are each `[layers][blocks][block_size][kv_heads][head_dim]`, held as
/// [`KvValues`]: the 16 bits of f16/bf16 storage, a GGUF block format's blocks (padded to
/// whole words), or `f32` values (f32 storage, or a quantize and dequantize round trip
/// along `head_dim` for nf4 and affine storage).
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache {
    /// The cache type's parameters.
    pub params: KvCacheParams,
    /// Number of blocks in the pool.
    pub blocks: usize,
    /// Keys.
    pub k: KvValues,
    /// Values.
    pub v: KvValues,
    /// Set when a backend keeps the pool in device memory: `k` and `v` are then empty and
    /// only that backend reads or writes the data.
    pub resident: Option<Resident>,
}

/// A KV pool held by a backend in device memory (a GPU backend's buffers), shared by the
/// clones of the [`KvCache`] that names it and freed with the last of them.
#[derive(Clone)]
pub struct Resident(pub std::sync::Arc<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resident(device memory)")
    }
}

impl PartialEq for Resident {
    fn eq(&self, other: &Resident) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl KvCache {
    /// An all-zero pool of `blocks` blocks.
    pub fn new(params: KvCacheParams, blocks: usize) -> KvCache {
        let len = params.layers as usize
            * blocks
            * params.block_size as usize
            * params.kv_heads as usize
            * params.head_dim as usize;
        KvCache {
            k: KvValues::zeros(&params.storage, len),
            v: KvValues::zeros(&params.storage, len),
            params,
            blocks,
            resident: None,
        }
    }

    /// Fails when the pool lives in a backend's device memory ([`KvCache::resident`]),
    /// where the host cannot read it.
    pub fn check_host(&self) -> Result<(), String> {
        match self.resident {
            None => Ok(()),
            Some(_) => Err(
                "the KV cache lives in GPU memory; only the backend that holds it can use it"
                    .into(),
            ),
        }
    }

    /// Elements of one token slot (all KV heads of one position).
    pub fn slot_len(&self) -> usize {
        (self.params.kv_heads * self.params.head_dim) as usize
    }

    /// Index of the first element of flat `slot` in `layer`.
    pub fn slot_offset(&self, layer: usize, slot: usize) -> usize {
        (layer * self.blocks * self.params.block_size as usize + slot) * self.slot_len()
    }

    /// Number of token slots per layer.
    pub fn slots(&self) -> usize {
        self.blocks * self.params.block_size as usize
    }

    /// The rows (all KV heads) of `layer` at `slots` (each below [`KvCache::slots`]),
    /// read from `data` (this cache's keys or values) as `f32`, one after another.
    pub fn rows(&self, data: &KvValues, layer: usize, slots: &[usize]) -> Vec<f32> {
        let row = self.slot_len();
        let mut out = vec![0.0; slots.len() * row];
        for (&slot, dest) in slots.iter().zip(out.chunks_exact_mut(row.max(1))) {
            data.read(self.slot_offset(layer, slot), dest);
        }
        out
    }
}

/// A tensor distributed over a device mesh: one local shard per device, devices numbered
/// row-major over the mesh axes. The interpreter's shards are host [`Tensor`]s; a
/// backend that keeps shards elsewhere (a GPU's buffers) names its own shard type `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sharded<T = Tensor> {
    /// Global shape.
    pub shape: Vec<usize>,
    /// Mesh axes and sizes.
    pub mesh: Vec<(String, u64)>,
    /// For each dim, the axes it is split over.
    pub split: Vec<Vec<String>>,
    /// Axes over which shards hold partial values.
    pub partial: Vec<String>,
    /// How partial values combine.
    pub reduction: Reduction,
    /// The local shard of each device.
    pub shards: Vec<T>,
}

impl<T> Sharded<T> {
    /// The same distribution with other shards (one per device, in device order).
    pub fn with_shards<U>(&self, shards: Vec<U>) -> Sharded<U> {
        Sharded {
            shape: self.shape.clone(),
            mesh: self.mesh.clone(),
            split: self.split.clone(),
            partial: self.partial.clone(),
            reduction: self.reduction,
            shards,
        }
    }
}

/// A value of the interpreter.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// An `llm.tensor`.
    Tensor(Tensor),
    /// An `llm.quantized_tensor`.
    Quantized(QTensor),
    /// An `llm.paged_kv_cache`.
    Cache(KvCache),
    /// An `llm.sharded_tensor`.
    Sharded(Sharded),
}

impl Value {
    /// The tensor, or an error naming what was found.
    pub fn tensor(&self) -> Result<&Tensor, String> {
        match self {
            Value::Tensor(t) => Ok(t),
            other => Err(format!("expected a tensor, found {}", other.kind())),
        }
    }

    /// The quantized tensor, or an error.
    pub fn quantized(&self) -> Result<&QTensor, String> {
        match self {
            Value::Quantized(q) => Ok(q),
            other => Err(format!(
                "expected a quantized tensor, found {}",
                other.kind()
            )),
        }
    }

    /// The sharded tensor, or an error.
    pub fn sharded(&self) -> Result<&Sharded, String> {
        match self {
            Value::Sharded(s) => Ok(s),
            other => Err(format!("expected a sharded tensor, found {}", other.kind())),
        }
    }

    /// The KV cache, or an error.
    pub fn cache(&self) -> Result<&KvCache, String> {
        match self {
            Value::Cache(c) => c.check_host().map(|()| c),
            other => Err(format!("expected a KV cache, found {}", other.kind())),
        }
    }

    /// A short name of the value's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Tensor(_) => "a tensor",
            Value::Quantized(_) => "a quantized tensor",
            Value::Cache(_) => "a KV cache",
            Value::Sharded(_) => "a sharded tensor",
        }
    }
}
