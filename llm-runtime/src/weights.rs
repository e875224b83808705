//! Named weights of a model, and the error type of every model-file loader.

use std::{borrow::Cow, collections::HashMap, rc::Rc};

use llm_ir::{
    dtype::DType,
    interp::{QTensor, Tensor, Value, WeightStore, quant},
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

/// The value of a tensor of `shape` whose elements are the little-endian `dtype`s in
/// `data`: a matrix of 16-bit floats (f16 or bf16), or a mixture's stacked matrices,
/// stays 16-bit, an `llm.quantized_tensor` of that format that the model multiplies as it
/// multiplies the quantized ones (half the memory of `f32`); vectors and `f32` tensors are
/// float tensors.
pub fn stored_floats(shape: Vec<usize>, dtype: DType, data: &[u8]) -> Value {
    let format = match dtype {
        DType::F16 => Some(QuantFormat::F16),
        DType::BF16 => Some(QuantFormat::BF16),
        _ => None,
    };
    match format {
        Some(format) if matches!(shape.len(), 2 | 3) => Value::Quantized(QTensor {
            shape,
            format,
            bytes: data.to_vec(),
        }),
        _ => Value::Tensor(Tensor::from_f32(shape, dtype, floats_le(dtype, data))),
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

    /// Moves weight `from` to the name `to`, if there is one.
    pub(crate) fn rename(&mut self, from: &str, to: impl Into<String>) {
        if let Some(value) = self.tensors.remove(from) {
            self.tensors.insert(to.into(), value);
        }
    }

    /// Gives weight `name` the shape `shape`: as many values, and for a weight quantized in
    /// blocks the same last dim (so that its rows stay whole). The weight is left as it
    /// was where it cannot.
    pub(crate) fn reshape(&mut self, name: &str, shape: Vec<usize>) -> Result<(), String> {
        let held = self
            .weight_shape(name)
            .ok_or_else(|| format!("no tensor `{name}` to reshape"))?;
        // (A shape from a configuration may be too large to count: its dims other than 0
        // must multiply without overflow.)
        let count = |s: &[usize]| {
            let mut nonzero = s.iter().filter(|&&d| d != 0);
            let n = nonzero.try_fold(1usize, |n, &d| n.checked_mul(d))?;
            Some(if s.contains(&0) { 0 } else { n })
        };
        let rows_kept = match self.tensors.get(name).map(|v| &**v) {
            Some(Value::Quantized(q)) => {
                matches!(q.format, QuantFormat::F16 | QuantFormat::BF16)
                    || held.last() == shape.last()
            }
            _ => true,
        };
        if count(&held) != count(&shape) || !rows_kept {
            return Err(format!("weight `{name}` {held:?} cannot be {shape:?}"));
        }
        let value = self
            .tensors
            .remove(name)
            .expect("a tensor, as its shape says");
        let mut value = Rc::unwrap_or_clone(value);
        match &mut value {
            Value::Tensor(t) => t.shape = shape,
            Value::Quantized(q) => q.shape = shape,
            _ => unreachable!("weight_shape gives tensors' shapes only"),
        }
        self.insert(name, value);
        Ok(())
    }

    /// Takes weight `name` out.
    pub(crate) fn remove(&mut self, name: &str) -> Option<Rc<Value>> {
        self.tensors.remove(name)
    }

    /// The shape of weight `name`.
    pub fn weight_shape(&self, name: &str) -> Option<Vec<usize>> {
        match &**self.tensors.get(name)? {
            Value::Tensor(t) => Some(t.shape.clone()),
            Value::Quantized(q) => Some(q.shape.clone()),
            _ => None,
        }
    }

    /// Quantizes every `f32` or 16-bit matrix (the projections, the feed-forward matrices
    /// and the embedding/classifier table) to `format`, as a model file stored in that
    /// format would hold them: as llama.cpp quantizes, a matrix whose rows do not split
    /// into the super-blocks of a 256-value format takes the format it falls back to
    /// ([`QuantFormat::row_fallback`]) where its rows split into that one's blocks, and
    /// `f16` otherwise; a matrix whose rows do not split into the blocks of another format
    /// stays as it is (llama.cpp refuses it). A mixture's stacked experts
    /// (`[E, N, K]`) are quantized as the `E * N` rows they are, in a row-blocked format
    /// only (nf4 and the affine formats leave them as they are); their routers are not
    /// quantized. Returns how many were converted. Norm weights (vectors, and the
    /// `[heads, head_dim]` matrices of per-head q/k norms) and biases (gpt-oss's experts'
    /// `[experts, width]` stacks of them) stay as they are, as llama.cpp keeps them.
    pub fn quantize_matrices(&mut self, format: &QuantFormat) -> usize {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut converted = 0;
        for (name, value) in &mut self.tensors {
            // Routers and shared experts' gates stay as they are, as llama.cpp keeps them:
            // a rounded router logit can change the experts a token runs.
            if name.ends_with(crate::model::ROUTER)
                || name.ends_with(crate::model::SHARED_GATE)
                || name.ends_with("norm.weight")
                || name.ends_with(".bias")
            {
                continue;
            }
            let shape = match &**value {
                Value::Tensor(t) if t.dtype == DType::F32 => t.shape.clone(),
                Value::Quantized(q) if matches!(q.format, QuantFormat::F16 | QuantFormat::BF16) => {
                    q.shape.clone()
                }
                _ => continue,
            };
            // Matrices, and the stacked matrices of a mixture's experts.
            if !matches!(shape.len(), 2 | 3) {
                continue;
            }
            let dims: Vec<Option<u64>> = shape.iter().map(|&d| Some(d as u64)).collect();
            let fits = |f: &QuantFormat| f.validate_shape(&dims).is_ok();
            // llama.cpp's choice: the format, its fallback, and f16 where a fallback's
            // blocks do not fit either.
            let fallback = format.row_fallback();
            let f16 = fallback.as_ref().map(|_| QuantFormat::F16);
            let candidates = [Some(format.clone()), fallback, f16];
            let Some(stored) = candidates.into_iter().flatten().find(fits) else {
                continue;
            };
            // Stacked experts in a row-blocked format only: each expert's rows by
            // themselves, as the expert kernels read them (nf4's and the affine formats'
            // codes and scales span the whole tensor).
            if shape.len() == 3 && stored.gguf_block_bytes().is_none() {
                continue;
            }
            let values = match &**value {
                Value::Tensor(t) => match t.floats() {
                    Ok(values) => Cow::Borrowed(values),
                    Err(_) => continue,
                },
                Value::Quantized(q) => Cow::Owned(quant::dequantize(&q.format, &q.shape, &q.bytes)),
                _ => continue,
            };
            let (k, rows) = (
                shape[shape.len() - 1],
                values.len() / shape[shape.len() - 1].max(1),
            );
            let bytes = quantize_rows(&stored, [rows, k], &values, threads);
            *value = Rc::new(Value::Quantized(QTensor {
                shape,
                format: stored,
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

    /// Replaces the fused matrix `fused` (a checkpoint's `qkv_proj` or `gate_up_proj`)
    /// by its parts, consecutive runs of its rows: `(name, rows)` each, in order. Float
    /// matrices are cut between rows, and so are quantized ones in the block formats,
    /// whose rows are stored apart; a float vector (a fused bias) is cut into runs of its
    /// values; a stack of matrices `[n, rows, k]` (a mixture's experts, each fusing its
    /// gate and up projections) is cut the same way in each matrix, each part a stack of
    /// `n`. Nothing happens when there is no `fused`. Parts that do not add up to the
    /// rows, or a format stored as a whole, are errors naming the weight.
    pub fn split_rows(&mut self, fused: &str, parts: &[(String, usize)]) -> Result<(), String> {
        // (Sizes from a configuration may not add up without overflow: no weight has
        // that many rows.)
        let total = parts
            .iter()
            .try_fold(0usize, |sum, (_, rows)| sum.checked_add(*rows))
            .unwrap_or(usize::MAX);
        let runs = || {
            let mut first = 0;
            parts
                .iter()
                .map(|(name, rows)| {
                    first += rows;
                    (name.clone(), (first - rows..first).collect())
                })
                .collect()
        };
        let sizes: Vec<usize> = parts.iter().map(|(_, rows)| *rows).collect();
        self.select_rows(fused, total, runs, |shape| {
            format!(
                "weight `{fused}` has shape {shape:?}, expected {total} rows in parts of {sizes:?}"
            )
        })
    }

    /// Replaces the weight `fused` by `even` and `odd`, its even and its odd rows (each
    /// matrix's, for a stack of them): gpt-oss's experts store each gate projection's
    /// row beside the up projection's. The weights [`Weights::split_rows`] cuts; nothing
    /// happens when there is no `fused`, and an odd number of rows is an error naming it.
    pub fn deinterleave_rows(&mut self, fused: &str, [even, odd]: [&str; 2]) -> Result<(), String> {
        let rows = match self.weight_shape(fused).as_deref() {
            Some(&[rows] | &[rows, _] | &[_, rows, _]) => rows,
            _ => 0,
        };
        let parts = || {
            [(even.to_string(), 0), (odd.to_string(), 1)]
                .map(|(name, first)| (name, (first..rows).step_by(2).collect()))
                .to_vec()
        };
        // An odd count is no count of pairs.
        let pairs = if rows % 2 == 0 { rows } else { usize::MAX };
        self.select_rows(fused, pairs, parts, |shape| {
            format!("weight `{fused}` has shape {shape:?}, not pairs of rows")
        })
    }

    /// Replaces the weight `fused` by the parts `parts` gives, each the rows of the listed
    /// indices, in order (of each stacked matrix, for a stack; of its values, for a float
    /// vector), when it has `rows` rows (the parts are listed only then): the shared work
    /// of [`Weights::split_rows`] and
    /// [`Weights::deinterleave_rows`]. Nothing happens when there is no `fused`; a format
    /// stored as a whole is an error naming the weight, and a weight of other rows the
    /// error `mismatch` makes of its shape.
    fn select_rows(
        &mut self,
        fused: &str,
        rows: usize,
        parts: impl FnOnce() -> Vec<(String, Vec<usize>)>,
        mismatch: impl Fn(&[usize]) -> String,
    ) -> Result<(), String> {
        let Some(value) = self.tensors.get(fused).cloned() else {
            return Ok(());
        };
        let shape = match &*value {
            Value::Tensor(t) => t.shape.clone(),
            Value::Quantized(q)
                if !matches!(
                    q.format,
                    QuantFormat::Nf4 { .. } | QuantFormat::Affine { .. }
                ) =>
            {
                q.shape.clone()
            }
            _ => {
                return Err(format!(
                    "weight `{fused}` is not a matrix of separable rows"
                ));
            }
        };
        let vector = shape.len() == 1 && matches!(&*value, Value::Tensor(_));
        // The matrices stacked (1 but for a stack) and the rows and row length of each.
        let (stacked, held, k) = match shape[..] {
            [rows] if vector => (1, rows, 1),
            [rows, k] => (1, rows, k),
            [n, rows, k] => (n, rows, k),
            _ => (0, 0, 0),
        };
        if stacked == 0 || held != rows {
            return Err(mismatch(&shape));
        }
        // The rows `picked` of each stacked matrix of `data`, joined, where a row is
        // `items` of `data` (floats, or a quantized row's bytes).
        fn pick<T: Copy>(data: &[T], rows: usize, items: usize, picked: &[usize]) -> Vec<T> {
            if rows * items == 0 {
                return Vec::new();
            }
            data.chunks(rows * items)
                .flat_map(|matrix| {
                    picked
                        .iter()
                        .flat_map(move |&r| &matrix[r * items..][..items])
                })
                .copied()
                .collect()
        }
        for (name, picked) in parts() {
            let part_shape = match shape.len() {
                1 => vec![picked.len()],
                2 => vec![picked.len(), k],
                _ => vec![stacked, picked.len(), k],
            };
            let part = match &*value {
                Value::Tensor(t) => {
                    let values = pick(t.floats()?, rows, k, &picked);
                    Value::Tensor(Tensor::from_f32(part_shape, t.dtype, values))
                }
                Value::Quantized(q) => {
                    let row_bytes = quant::storage_bytes(&q.format, &[1, k]);
                    Value::Quantized(QTensor {
                        shape: part_shape,
                        format: q.format.clone(),
                        bytes: pick(&q.bytes, rows, row_bytes, &picked),
                    })
                }
                _ => unreachable!("checked above"),
            };
            self.insert(name, part);
        }
        self.tensors.remove(fused);
        Ok(())
    }

    /// Transposes the matrix `name` (a float one, or one of 16-bit floats kept as their
    /// bits; a block-quantized one becomes f32), as GPT-2's `Conv1D` layers store theirs
    /// `[in, out]`, or each matrix of the stack `name` (`[n, rows, cols]`: DBRX's experts'
    /// down projections, DeepSeek's heads' key projections); an error names a weight that
    /// is none of those.
    pub fn transpose_matrix(&mut self, name: &str) -> Result<(), String> {
        let Some(value) = self.tensors.get(name).cloned() else {
            return Err(format!("no weight `{name}` to transpose"));
        };
        // Each `[rows, cols]` matrix of the stack `values` as `[cols, rows]`.
        fn transposed<T: Copy>(rows: usize, cols: usize, values: &[T]) -> Vec<T> {
            if rows * cols == 0 {
                return Vec::new();
            }
            values
                .chunks(rows * cols)
                .flat_map(|m| (0..cols).flat_map(move |c| (0..rows).map(move |r| m[r * cols + c])))
                .collect()
        }
        // A matrix, or a stack of them: its shape with the last two dims swapped.
        let turned_shape = |shape: &[usize]| match shape {
            [rows, cols] => Some((*rows, *cols, vec![*cols, *rows])),
            [n, rows, cols] => Some((*rows, *cols, vec![*n, *cols, *rows])),
            _ => None,
        };
        let value = match &*value {
            Value::Tensor(t) if let Some((rows, cols, shape)) = turned_shape(&t.shape) => {
                let turned = transposed(rows, cols, t.floats()?);
                Value::Tensor(Tensor::from_f32(shape, t.dtype, turned))
            }
            Value::Quantized(q)
                if matches!(q.format, QuantFormat::F16 | QuantFormat::BF16)
                    && let Some((rows, cols, shape)) = turned_shape(&q.shape) =>
            {
                let halves: Vec<[u8; 2]> = q.bytes.chunks_exact(2).map(|b| [b[0], b[1]]).collect();
                Value::Quantized(QTensor {
                    shape,
                    format: q.format.clone(),
                    bytes: transposed(rows, cols, &halves).concat(),
                })
            }
            // A block format's rows cannot be turned as they are stored: as f32.
            Value::Quantized(q) if let Some((rows, cols, shape)) = turned_shape(&q.shape) => {
                let floats = quant::dequantize(&q.format, &q.shape, &q.bytes);
                Value::Tensor(Tensor::from_f32(
                    shape,
                    DType::F32,
                    transposed(rows, cols, &floats),
                ))
            }
            _ => {
                return Err(format!(
                    "weight `{name}` is not a float matrix to transpose"
                ));
            }
        };
        self.insert(name, value);
        Ok(())
    }

    /// Replaces the weights `parts` (float matrices or vectors of one element type, or
    /// matrices of one block format, all of one row length) by `into`, their rows in
    /// order: [`Weights::split_rows`]'s inverse. A missing part or parts that differ are
    /// errors naming them.
    pub fn concat_rows(&mut self, parts: &[String], into: &str) -> Result<(), String> {
        let values = parts
            .iter()
            .map(|name| {
                self.tensors
                    .get(name)
                    .cloned()
                    .ok_or_else(|| format!("no weight `{name}` to join into `{into}`"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Some(first) = values.first() else {
            return Err(format!("no weights to join into `{into}`"));
        };
        let mismatch = || format!("the weights joined into `{into}` differ in type or row length");
        let rank = |v: &Value| match v {
            Value::Tensor(t) => t.shape.len(),
            Value::Quantized(q) => q.shape.len(),
            _ => 0,
        };
        if values.iter().any(|v| rank(v) == 0) {
            return Err(format!("a weight joined into `{into}` has no rows"));
        }
        let joined = match &**first {
            Value::Tensor(t) => {
                let mut floats = Vec::new();
                for v in &values {
                    match &**v {
                        Value::Tensor(p) if p.dtype == t.dtype && p.shape[1..] == t.shape[1..] => {
                            floats.extend_from_slice(p.floats()?);
                        }
                        _ => return Err(mismatch()),
                    }
                }
                let mut shape = t.shape.clone();
                shape[0] = floats.len() / shape[1..].iter().product::<usize>().max(1);
                Value::Tensor(Tensor::from_f32(shape, t.dtype, floats))
            }
            Value::Quantized(q)
                if !matches!(
                    q.format,
                    QuantFormat::Nf4 { .. } | QuantFormat::Affine { .. }
                ) =>
            {
                let (mut bytes, mut rows) = (Vec::new(), 0);
                for v in &values {
                    match &**v {
                        Value::Quantized(p)
                            if p.format == q.format && p.shape[1..] == q.shape[1..] =>
                        {
                            bytes.extend_from_slice(&p.bytes);
                            rows += p.shape[0];
                        }
                        _ => return Err(mismatch()),
                    }
                }
                let mut shape = q.shape.clone();
                shape[0] = rows;
                Value::Quantized(QTensor {
                    shape,
                    format: q.format.clone(),
                    bytes,
                })
            }
            _ => return Err(mismatch()),
        };
        for name in parts {
            self.tensors.remove(name);
        }
        self.insert(into, joined);
        Ok(())
    }

    /// Stacks weights `parts`, of one shape and type, into weight `into`, of their shape
    /// with the number of parts before it (the stacked matrices of a mixture's experts),
    /// replacing them.
    pub fn stack(&mut self, parts: &[String], into: &str) -> Result<(), String> {
        let mut shape = None;
        for part in parts {
            let found = self
                .weight_shape(part)
                .ok_or_else(|| format!("no weight `{part}` to stack into `{into}`"))?;
            match &shape {
                None => shape = Some(found),
                Some(first) if *first != found => {
                    return Err(format!(
                        "weight `{part}` is {found:?}, the others stacked into `{into}` {first:?}"
                    ));
                }
                Some(_) => {}
            }
        }
        self.concat_rows(parts, into)?;
        let stacked: Vec<usize> = std::iter::once(parts.len())
            .chain(shape.unwrap_or_default())
            .collect();
        self.reshape(into, stacked)
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

    use super::{Weights, quantize_rows};
    use llm_ir::interp::{QTensor, Tensor, Value, WeightStore};

    /// Stacked weights keep their type and gain a leading dim (16-bit ones stay 16 bits,
    /// as a GGUF file's stacked experts are read too); parts of different shapes, or a
    /// missing part, are refused by name.
    #[test]
    fn stacked_parts_keep_their_type() {
        let bytes: Vec<u8> = (0..12u8)
            .flat_map(|i| half::f16::from_f32(f32::from(i)).to_le_bytes())
            .collect();
        let stored = super::stored_floats(vec![2, 3, 2], DType::F16, &bytes);
        assert!(
            matches!(&stored, Value::Quantized(q) if q.format == QuantFormat::F16 && q.shape == [2, 3, 2])
        );
        let mut weights = Weights::default();
        weights.insert(
            "a",
            super::stored_floats(vec![3, 2], DType::F16, &bytes[..12]),
        );
        weights.insert(
            "b",
            super::stored_floats(vec![3, 2], DType::F16, &bytes[12..]),
        );
        weights
            .stack(&["a".into(), "b".into()], "ab")
            .expect("stacks");
        assert_eq!(weights.weight("ab").as_deref(), Some(&stored));
        assert!(weights.weight("a").is_none());
        let zeros = |shape: Vec<usize>| {
            let n = shape.iter().product();
            Value::Tensor(Tensor::from_f32(shape, DType::F32, vec![0.0; n]))
        };
        weights.insert("c", zeros(vec![2, 2]));
        weights.insert("d", zeros(vec![3, 2]));
        let uneven = weights.stack(&["c".into(), "d".into()], "cd").unwrap_err();
        assert!(uneven.contains("`d` is [3, 2]"), "{uneven}");
        let missing = weights.stack(&["c".into(), "e".into()], "ce").unwrap_err();
        assert!(missing.contains("no weight `e`"), "{missing}");
        // A reshape keeps the values (and a quantized weight's last dim); one that cannot
        // leaves the weight.
        weights.insert("v", zeros(vec![4]));
        weights.reshape("v", vec![1, 4]).expect("a row");
        assert_eq!(weights.weight_shape("v"), Some(vec![1, 4]));
        assert!(weights.reshape("v", vec![1, 5]).is_err());
        assert_eq!(weights.weight_shape("v"), Some(vec![1, 4]));
        weights
            .reshape("v", vec![2, 2])
            .expect("float values take any shape");
        // 16-bit floats are stored value by value: any shape (gpt-oss's interleaved
        // biases become stacks of one-value rows); a block format's rows stay whole.
        weights.reshape("ab", vec![2, 6]).expect("16-bit values");
        assert_eq!(weights.weight_shape("ab"), Some(vec![2, 6]));
        let blocks = QTensor {
            shape: vec![1, 32],
            format: QuantFormat::Q8_0,
            bytes: vec![0; 34],
        };
        weights.insert("q", Value::Quantized(blocks));
        assert!(
            weights.reshape("q", vec![2, 16]).is_err(),
            "q8_0 rows stay whole"
        );
        assert_eq!(weights.weight_shape("q"), Some(vec![1, 32]));
        // Vectors stack into a matrix (StableLM 2 12B's per-head norm weights).
        weights.insert("h0", zeros(vec![3]));
        weights.insert("h1", zeros(vec![3]));
        weights
            .stack(&["h0".into(), "h1".into()], "h")
            .expect("stacks");
        assert_eq!(weights.weight_shape("h"), Some(vec![2, 3]));
    }

    /// A fused vector (Phi-2's q, k and v biases) splits into runs of its values, and a
    /// split whose parts do not add up is an error naming it.
    #[test]
    fn fused_vectors_split_into_runs() {
        let mut weights = Weights::default();
        let fused = Tensor::from_f32(vec![5], DType::F32, vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        weights.insert("qkv", Value::Tensor(fused.clone()));
        let parts = [
            ("q".to_string(), 3),
            ("k".to_string(), 1),
            ("v".to_string(), 1),
        ];
        weights.split_rows("qkv", &parts).expect("splits");
        let floats = |name: &str| match weights.weight(name).as_deref() {
            Some(Value::Tensor(t)) => (t.shape.clone(), t.floats().expect("floats").to_vec()),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(floats("q"), (vec![3], vec![1.0, 2.0, 3.0]));
        assert_eq!(floats("v"), (vec![1], vec![5.0]));
        assert!(weights.weight("qkv").is_none());
        weights.insert("qkv", Value::Tensor(fused));
        let err = weights.split_rows("qkv", &parts[..2]).expect_err("4 of 5");
        assert!(err.contains("weight `qkv` has shape [5]"), "{err}");
    }

    /// A stack of `shape` holding 0, 1, 2, ... as f32 and as bf16 (the values exact in
    /// both).
    fn counting_stacks(shape: &[usize]) -> [Value; 2] {
        let values: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|v| v as f32)
            .collect();
        let bits: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        [
            Value::Tensor(Tensor::from_f32(shape.to_vec(), DType::F32, values)),
            super::stored_floats(shape.to_vec(), DType::BF16, &bits),
        ]
    }

    /// Weight `name`'s shape and values as f32.
    fn shape_and_floats(weights: &Weights, name: &str) -> (Vec<usize>, Vec<f32>) {
        let value = weights.weight(name).expect("a part");
        let shape = weights.weight_shape(name).expect("a shape");
        let floats = match &*value {
            Value::Tensor(t) => t.floats().expect("floats").to_vec(),
            Value::Quantized(q) => quant::dequantize(&q.format, &q.shape, &q.bytes),
            other => panic!("{other:?}"),
        };
        (shape, floats)
    }

    /// A stack of fused matrices (Granite-MoE's experts' gate and up projections,
    /// `[experts, 2 * hidden, dim]`) splits in each matrix: each part a stack of its rows
    /// of every matrix, float or 16-bit.
    #[test]
    fn stacked_matrices_split_in_each_matrix() {
        // Two matrices of three rows of two: values 0..12.
        let parts = [("gate".to_string(), 1), ("up".to_string(), 2)];
        for fused in counting_stacks(&[2, 3, 2]) {
            let mut weights = Weights::default();
            weights.insert("w13", fused.clone());
            weights.split_rows("w13", &parts).expect("splits");
            let floats = |name: &str| shape_and_floats(&weights, name);
            assert_eq!(floats("gate"), (vec![2, 1, 2], vec![0.0, 1.0, 6.0, 7.0]));
            assert_eq!(
                floats("up"),
                (
                    vec![2, 2, 2],
                    vec![2.0, 3.0, 4.0, 5.0, 8.0, 9.0, 10.0, 11.0]
                )
            );
            assert!(weights.weight("w13").is_none());
            weights.insert("w13", fused);
            let err = weights.split_rows("w13", &parts[..1]).expect_err("1 of 3");
            assert!(err.contains("weight `w13` has shape [2, 3, 2]"), "{err}");
        }
    }

    /// gpt-oss's interleaved gate and up rows come apart in each stacked matrix, float,
    /// 16-bit and block-quantized alike; an odd count of rows is refused.
    #[test]
    fn interleaved_rows_come_apart() {
        // Two matrices of four rows of two: values 0..16.
        for fused in counting_stacks(&[2, 4, 2]) {
            let mut weights = Weights::default();
            weights.insert("w13", fused);
            weights
                .deinterleave_rows("w13", ["gate", "up"])
                .expect("pairs");
            let floats = |name: &str| shape_and_floats(&weights, name).1;
            assert_eq!(weights.weight_shape("gate"), Some(vec![2, 2, 2]));
            assert_eq!(floats("gate"), [0.0, 1.0, 4.0, 5.0, 8.0, 9.0, 12.0, 13.0]);
            assert_eq!(floats("up"), [2.0, 3.0, 6.0, 7.0, 10.0, 11.0, 14.0, 15.0]);
            assert!(weights.weight("w13").is_none());
        }
        // Rows of q8_0 blocks (34 bytes each, told apart by their first byte).
        let rows: Vec<u8> = (0..4u8)
            .flat_map(|r| [vec![r], vec![0; 33]].concat())
            .collect();
        let mut weights = Weights::default();
        let stack = QTensor {
            shape: vec![1, 4, 32],
            format: QuantFormat::Q8_0,
            bytes: rows,
        };
        weights.insert("q", Value::Quantized(stack));
        weights.deinterleave_rows("q", ["qe", "qo"]).expect("pairs");
        let firsts = |name: &str| match &*weights.weight(name).expect("a part") {
            Value::Quantized(q) => q.bytes.chunks(34).map(|row| row[0]).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!((firsts("qe"), firsts("qo")), (vec![0, 2], vec![1, 3]));
        weights.insert(
            "odd",
            Value::Tensor(Tensor::from_f32(vec![3, 2], DType::F32, vec![0.0; 6])),
        );
        let err = weights
            .deinterleave_rows("odd", ["a", "b"])
            .expect_err("3 rows");
        assert!(
            err.contains("`odd` has shape [3, 2], not pairs of rows"),
            "{err}"
        );
        assert!(weights.deinterleave_rows("absent", ["a", "b"]).is_ok());
    }

    /// A matrix is quantized, a per-head norm's `[heads, head_dim]` weights are not.
    #[test]
    fn per_head_norm_weights_stay_as_they_are() {
        let mut weights = Weights::default();
        let ones = |shape: Vec<usize>| {
            let n = shape.iter().product();
            Value::Tensor(Tensor::from_f32(shape, DType::F32, vec![1.0; n]))
        };
        weights.insert("layers.0.attention.wq.weight", ones(vec![4, 32]));
        weights.insert("layers.0.attention.q_norm.weight", ones(vec![4, 32]));
        assert_eq!(weights.quantize_matrices(&QuantFormat::Q8_0), 1);
        let kept = weights.weight("layers.0.attention.q_norm.weight");
        assert!(matches!(kept.as_deref(), Some(Value::Tensor(_))));
    }

    /// Matrices without elements (a checkpoint's tensor of a zero dim) split and transpose
    /// into matrices without elements, without a panic.
    #[test]
    fn empty_matrices_split_and_transpose() {
        let mut weights = Weights::default();
        let empty = |shape: Vec<usize>| Value::Tensor(Tensor::from_f32(shape, DType::F32, vec![]));
        weights.insert("rows", empty(vec![2, 0]));
        weights.insert("stack", empty(vec![2, 4, 0]));
        let halves = [("a".to_string(), 1), ("b".to_string(), 1)];
        weights.split_rows("rows", &halves).expect("splits");
        assert_eq!(weights.weight_shape("b"), Some(vec![1, 0]));
        let quarters = [("c".to_string(), 2), ("d".to_string(), 2)];
        weights.split_rows("stack", &quarters).expect("splits");
        assert_eq!(weights.weight_shape("d"), Some(vec![2, 2, 0]));
        weights.transpose_matrix("d").expect("transposes");
        assert_eq!(weights.weight_shape("d"), Some(vec![2, 0, 2]));
        // A shape too large to count is refused, not wrapped, wherever its zero is.
        assert!(weights.reshape("c", vec![usize::MAX, 4, 0]).is_err());
        assert!(weights.reshape("c", vec![0, usize::MAX, 4]).is_err());
    }

    /// A stack of block-quantized matrices turns as its f32 values (DeepSeek's heads' key
    /// projections in a quantized file's `attn_kv_b`).
    #[test]
    fn block_quantized_stacks_transpose_as_f32() {
        let values: Vec<f32> = (0..128).map(|v| (v as f32 - 64.0) / 8.0).collect();
        let shape = vec![2, 2, 32];
        let bytes = quant::quantize(&QuantFormat::Q8_0, &shape, &values);
        let stored = quant::dequantize(&QuantFormat::Q8_0, &shape, &bytes);
        let mut weights = Weights::default();
        let q = QTensor {
            shape,
            format: QuantFormat::Q8_0,
            bytes,
        };
        weights.insert("k", Value::Quantized(q));
        weights.transpose_matrix("k").expect("turns");
        let (shape, turned) = shape_and_floats(&weights, "k");
        assert_eq!(shape, [2, 32, 2]);
        for m in 0..2 {
            for r in 0..2 {
                for c in 0..32 {
                    assert_eq!(turned[(m * 32 + c) * 2 + r], stored[(m * 2 + r) * 32 + c]);
                }
            }
        }
    }

    /// A float matrix and one of 16-bit floats kept as their bits transpose alike; a
    /// vector is refused, by name.
    #[test]
    fn matrices_transpose() {
        let values: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let bits: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let mut weights = Weights::default();
        weights.insert(
            "f32",
            Value::Tensor(Tensor::from_f32(vec![2, 3], DType::F32, values)),
        );
        weights.insert("f16", super::stored_floats(vec![2, 3], DType::F16, &bits));
        weights.insert(
            "v",
            Value::Tensor(Tensor::from_f32(vec![3], DType::F32, vec![0.0; 3])),
        );
        for name in ["f32", "f16"] {
            weights.transpose_matrix(name).expect("transposes");
            let t = weights.weight(name).expect("there");
            let floats = match &*t {
                Value::Tensor(t) => (t.shape.clone(), t.floats().expect("floats").to_vec()),
                Value::Quantized(q) => (
                    q.shape.clone(),
                    quant::dequantize(&q.format, &q.shape, &q.bytes),
                ),
                other => panic!("{name}: {other:?}"),
            };
            assert_eq!(
                floats,
                (vec![3, 2], vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]),
                "{name}"
            );
        }
        let err = weights.transpose_matrix("v").expect_err("a vector");
        assert!(err.contains("weight `v` is not a float matrix"), "{err}");
        // A stack of two `[2, 3]` matrices: each transposed in its place.
        let stacked: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let stack = Tensor::from_f32(vec![2, 2, 3], DType::F32, stacked);
        weights.insert("stack", Value::Tensor(stack));
        weights.transpose_matrix("stack").expect("transposes");
        match weights.weight("stack").as_deref() {
            Some(Value::Tensor(t)) => assert_eq!(
                (t.shape.as_slice(), t.floats().expect("floats")),
                (
                    [2, 3, 2].as_slice(),
                    [0.0, 3.0, 1.0, 4.0, 2.0, 5.0, 6.0, 9.0, 7.0, 10.0, 8.0, 11.0].as_slice()
                )
            ),
            other => panic!("{other:?}"),
        }
    }

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

    /// Matrices whose rows are not whole super-blocks take llama.cpp's fallback format
    /// (every one of a super-block format; a block format has none), those whose rows are
    /// not whole blocks of that either f16 (and stay `f32` under a block format), and
    /// vectors are never quantized.
    #[test]
    fn rows_that_are_not_whole_super_blocks_take_the_fallback_format() {
        let matrix = |rows: usize, k: usize| {
            let values: Vec<f32> = (0..rows * k).map(|i| (i % 13) as f32 - 6.0).collect();
            Value::Tensor(Tensor::from_f32(vec![rows, k], DType::F32, values))
        };
        let f16 = Some(QuantFormat::F16);
        for (format, fallback, neither) in [
            (QuantFormat::Q2K, QuantFormat::Iq4Nl, f16.clone()),
            (QuantFormat::Q3K, QuantFormat::Iq4Nl, f16.clone()),
            (QuantFormat::Q4K, QuantFormat::Q5_0, f16.clone()),
            (QuantFormat::Q5K, QuantFormat::Q5_1, f16.clone()),
            (QuantFormat::Q6K, QuantFormat::Q8_0, f16.clone()),
            (QuantFormat::Iq4Xs, QuantFormat::Iq4Nl, f16.clone()),
            (QuantFormat::Iq3Xxs, QuantFormat::Iq4Nl, f16.clone()),
            (QuantFormat::Iq3S, QuantFormat::Iq4Nl, f16.clone()),
            (QuantFormat::Iq2Xxs, QuantFormat::Iq4Nl, f16.clone()),
            (QuantFormat::Iq2Xs, QuantFormat::Iq4Nl, f16.clone()),
            (QuantFormat::Iq2S, QuantFormat::Iq4Nl, f16.clone()),
            (QuantFormat::Iq1S, QuantFormat::Iq4Nl, f16.clone()),
            (QuantFormat::Iq1M, QuantFormat::Iq4Nl, f16.clone()),
            (QuantFormat::Tq1_0, QuantFormat::Q4_0, f16.clone()),
            (QuantFormat::Tq2_0, QuantFormat::Q4_0, f16.clone()),
            (QuantFormat::Q4_0, QuantFormat::Q4_0, None),
            (QuantFormat::Mxfp4, QuantFormat::Mxfp4, None),
        ] {
            let mut w = Weights::default();
            w.insert("whole", matrix(3, 512));
            w.insert("blocks_of_32", matrix(3, 288));
            w.insert("neither", matrix(3, 100));
            w.insert(
                "vector",
                Value::Tensor(Tensor::from_f32(vec![288], DType::F32, vec![1.0; 288])),
            );
            let converted = if neither.is_some() { 3 } else { 2 };
            assert_eq!(w.quantize_matrices(&format), converted, "{format}");
            let stored = |name: &str| match w.weight(name).as_deref() {
                Some(Value::Quantized(q)) => Some(q.format.clone()),
                _ => None,
            };
            assert_eq!(stored("whole"), Some(format.clone()));
            assert_eq!(stored("blocks_of_32"), Some(fallback), "{format}");
            assert_eq!(stored("neither"), neither, "{format}");
            assert_eq!(stored("vector"), None, "{format}");
        }
    }

    /// A fused matrix splits into runs of its rows: float ones into the rows' values,
    /// quantized ones into the bytes the parts quantized alone have; wrong row counts and
    /// vectors are refused.
    #[test]
    fn fused_matrices_split_into_their_rows() {
        let (rows, k) = (6, 256);
        let values: Vec<f32> = (0..rows * k).map(|i| (i % 17) as f32 - 8.0).collect();
        let parts = |names: &[(&str, usize)]| -> Vec<(String, usize)> {
            names.iter().map(|&(n, r)| (n.to_string(), r)).collect()
        };
        let split = parts(&[("a", 1), ("b", 2), ("c", 3)]);
        let mut w = Weights::default();
        w.insert(
            "f",
            Value::Tensor(Tensor::from_f32(vec![rows, k], DType::BF16, values.clone())),
        );
        w.split_rows("f", &split).expect("splits");
        assert!(w.weight("f").is_none());
        match w.weight("c").as_deref() {
            Some(Value::Tensor(t)) => {
                assert_eq!((t.shape.clone(), t.dtype), (vec![3, k], DType::BF16));
                assert_eq!(t.floats().expect("floats"), &values[3 * k..]);
            }
            other => panic!("{other:?}"),
        }
        // Block-quantized rows, and 16-bit ones (a bf16 checkpoint's fused matrix).
        for format in [QuantFormat::Q4K, QuantFormat::BF16] {
            let quantized = |from: usize, to: usize| {
                quant::quantize(&format, &[to - from, k], &values[from * k..to * k])
            };
            w.insert(
                "q",
                Value::Quantized(QTensor {
                    shape: vec![rows, k],
                    format: format.clone(),
                    bytes: quantized(0, rows),
                }),
            );
            w.split_rows("q", &split).expect("splits");
            match w.weight("b").as_deref() {
                Some(Value::Quantized(q)) => {
                    assert!(q.shape == [2, k] && q.bytes == quantized(1, 3), "{format}")
                }
                other => panic!("{other:?}"),
            }
        }
        w.insert(
            "g",
            Value::Tensor(Tensor::from_f32(vec![rows, k], DType::F32, values)),
        );
        let err = w
            .split_rows("g", &parts(&[("x", 2), ("y", 2)]))
            .expect_err("4 of 6 rows");
        assert!(
            err.contains("weight `g` has shape [6, 256], expected 4 rows"),
            "{err}"
        );
        assert_eq!(w.split_rows("absent", &split), Ok(()));
        // A vector is no matrix: an error, not an index out of bounds.
        let row = quant::quantize(&QuantFormat::Q8_0, &[k], &vec![1.0; k]);
        w.insert(
            "v",
            Value::Quantized(QTensor {
                shape: vec![k],
                format: QuantFormat::Q8_0,
                bytes: row,
            }),
        );
        let err = w.split_rows("v", &split).expect_err("rank 1");
        assert!(err.contains("weight `v` has shape [256]"), "{err}");
    }
}
