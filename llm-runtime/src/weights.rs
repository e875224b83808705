//! Named weights of a model, and the error type of every model-file loader.

use std::{collections::HashMap, rc::Rc};

use llm_ir::{
    dtype::DType,
    interp::{QTensor, Value, WeightStore, quant},
    types::QuantFormat,
};

/// An error in a model file, naming the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The file.
    pub file: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file, self.message)
    }
}

impl std::error::Error for LoadError {}

/// The builder's name for a tensor named `name` in a file format whose names are given by
/// `globals` (pairs of the format's name and ours), the per-layer prefix `layer_prefix`
/// (followed by the layer number and a dot) and `parts` (pairs for the per-layer tensors);
/// `None` for a tensor that is not part of a Llama model.
pub fn builder_name(
    name: &str,
    globals: &[(&str, &str)],
    layer_prefix: &str,
    parts: &[(&str, &str)],
) -> Option<String> {
    if let Some((_, ours)) = globals.iter().find(|(theirs, _)| *theirs == name) {
        return Some(ours.to_string());
    }
    let (layer, part) = name.strip_prefix(layer_prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, ours) = parts.iter().find(|(theirs, _)| *theirs == part)?;
    Some(format!("layers.{layer}.{ours}"))
}

/// Decodes little-endian floats stored as `dtype` (`f16` or `bf16`; any other dtype is
/// read as `f32`), as model files and `.npy` arrays store them.
pub fn floats_le(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    }
}

/// Named weights held in memory.
#[derive(Debug, Default, Clone)]
pub struct Weights {
    tensors: HashMap<String, Rc<Value>>,
}

impl Weights {
    /// Adds a tensor.
    pub fn insert(&mut self, name: impl Into<String>, value: Value) {
        self.tensors.insert(name.into(), Rc::new(value));
    }

    /// The shape of weight `name`.
    pub fn weight_shape(&self, name: &str) -> Option<Vec<usize>> {
        match &**self.tensors.get(name)? {
            Value::Tensor(t) => Some(t.shape.clone()),
            Value::Quantized(q) => Some(q.shape.clone()),
            _ => None,
        }
    }

    /// Quantizes every `f32` matrix whose rows split into `format`'s blocks (the
    /// projections, the feed-forward matrices and the embedding/classifier table) to
    /// `format`, as a model file stored in that format would hold them; returns how many
    /// were converted. Norm weights (vectors) stay `f32`.
    pub fn quantize_matrices(&mut self, format: &QuantFormat) -> usize {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut converted = 0;
        for value in self.tensors.values_mut() {
            let Value::Tensor(t) = &**value else {
                continue;
            };
            let dims: Vec<Option<u64>> = t.shape.iter().map(|&d| Some(d as u64)).collect();
            if t.shape.len() != 2 || t.dtype != DType::F32 || format.validate_shape(&dims).is_err()
            {
                continue;
            }
            let Ok(values) = t.floats() else {
                continue;
            };
            let bytes = quantize_rows(format, [t.shape[0], t.shape[1]], values, threads);
            *value = Rc::new(Value::Quantized(QTensor {
                shape: t.shape.clone(),
                format: format.clone(),
                bytes,
            }));
            converted += 1;
        }
        converted
    }

    /// Bytes the weights take in memory (as stored: quantized bytes, or 4 bytes per
    /// float).
    pub fn bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|v| match &**v {
                Value::Tensor(t) => 4 * t.len(),
                Value::Quantized(q) => q.bytes.len(),
                _ => 0,
            })
            .sum()
    }

    /// The names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// `format`'s bytes of a `[rows, k]` matrix, quantized by up to `threads` threads: the
/// block formats' rows are independent, so each thread quantizes a run of whole rows, one
/// row at a time, into its part of the output (the K-quants' scale searches make
/// quantizing at load the slow part of loading). The output is allocated here, and the
/// threads allocate only a row's bytes at a time: large blocks freed in a thread's own
/// allocator arena stayed resident (9 MiB on the 110M shape, q4_0). nf4 and the affine
/// formats lay the matrix out as a whole, in one piece.
fn quantize_rows(
    format: &QuantFormat,
    [rows, k]: [usize; 2],
    values: &[f32],
    threads: usize,
) -> Vec<u8> {
    let whole = matches!(format, QuantFormat::Nf4 { .. } | QuantFormat::Affine { .. });
    let per_thread = rows.div_ceil(threads.max(1)).max(1);
    if whole || per_thread >= rows {
        return quant::quantize(format, &[rows, k], values);
    }
    let row_bytes = quant::storage_bytes(format, &[1, k]);
    let mut out = vec![0u8; rows * row_bytes];
    std::thread::scope(|scope| {
        let runs = values
            .chunks(per_thread * k)
            .zip(out.chunks_mut(per_thread * row_bytes));
        for (values, out) in runs {
            scope.spawn(move || {
                for (row, dest) in values.chunks(k).zip(out.chunks_mut(row_bytes)) {
                    dest.copy_from_slice(&quant::quantize(format, &[1, k], row));
                }
            });
        }
    });
    out
}

impl WeightStore for Weights {
    fn weight(&self, name: &str) -> Option<Rc<Value>> {
        self.tensors.get(name).cloned()
    }
}

impl Weights {
    /// The `llm` type of weight `name` as IR text (`llm.tensor <64x64xf32>`,
    /// `llm.quantized_tensor <64x256, q4_k>`).
    pub fn ir_type(&self, name: &str) -> Option<String> {
        let dims = |shape: &[usize]| {
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join("x")
        };
        match &**self.tensors.get(name)? {
            Value::Tensor(t) => Some(format!("llm.tensor <{}x{}>", dims(&t.shape), t.dtype)),
            Value::Quantized(q) => Some(format!(
                "llm.quantized_tensor <{}, {}>",
                dims(&q.shape),
                q.format
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use llm_ir::{dtype::DType, interp::quant, types::QuantFormat};

    use super::quantize_rows;

    /// Rows split over threads (counts that do not divide the rows included) give the
    /// bytes of the whole matrix quantized at once, in every kind of format.
    #[test]
    fn rows_quantized_on_threads_are_the_whole_matrix() {
        let (rows, k) = (7, 512);
        let values: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i / 64) as f32))
            .collect();
        let nf4 = QuantFormat::Nf4 {
            block_size: 64,
            scale: DType::F16,
        };
        for format in [QuantFormat::Q8_0, QuantFormat::Q4K, QuantFormat::Q2K, nf4] {
            let whole = quant::quantize(&format, &[rows, k], &values);
            for threads in [1, 2, 3, 8] {
                let parts = quantize_rows(&format, [rows, k], &values, threads);
                assert!(parts == whole, "{format:?} on {threads} threads");
            }
        }
    }
}
