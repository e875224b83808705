//! Tensors in device memory: how values are laid out for the shaders (`f32`, integers as
//! `i32`, quantized rows as stored, weights that are exactly `f16` as `f16`) and split
//! into row parts that each fit one storage binding.

use half::f16;
use llm_ir::{
    dtype::DType,
    interp::{Tensor, Value},
    types::QuantFormat,
};

use super::device::Gpu;
use crate::kernel::WeightFormat;

/// How one element of a device tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Elem {
    /// `f32`.
    F32,
    /// `f16` or `bf16` values, held (exactly) as `f32`.
    Narrow(DType),
    /// `i32` (integer tensors of any width; values are range-checked on upload).
    I32(DType),
    /// A weight in a packed format: `f16` or quantized rows.
    Packed(WeightFormat),
}

/// Rows `first..first + rows` of a tensor, in one buffer.
#[derive(Clone)]
pub(super) struct Part {
    /// The first row.
    pub first: usize,
    /// Rows held.
    pub rows: usize,
    /// Their buffer.
    pub buffer: wgpu::Buffer,
}

/// A tensor in device memory, in row parts that each fit one binding.
#[derive(Clone)]
pub(super) struct DeviceTensor {
    /// The logical shape.
    pub shape: Vec<usize>,
    /// How elements are stored.
    pub elem: Elem,
    /// Row parts, in order.
    pub parts: Vec<Part>,
}

impl DeviceTensor {
    /// An unsplit tensor of `shape` with `elem` values in `buffer`.
    pub fn unsplit(shape: Vec<usize>, elem: Elem, buffer: wgpu::Buffer) -> DeviceTensor {
        DeviceTensor {
            parts: vec![Part {
                first: 0,
                rows: shape.first().copied().unwrap_or(1),
                buffer,
            }],
            shape,
            elem,
        }
    }

    /// An unsplit `f32` device tensor of `shape` in `buffer`.
    pub fn f32(shape: Vec<usize>, buffer: wgpu::Buffer) -> DeviceTensor {
        DeviceTensor::unsplit(shape, Elem::F32, buffer)
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The one buffer of an unsplit tensor.
    pub fn whole(&self) -> Result<&wgpu::Buffer, String> {
        match self.parts.as_slice() {
            [p] => Ok(&p.buffer),
            _ => Err(format!(
                "a tensor {:?} split in {} parts cannot be bound whole",
                self.shape,
                self.parts.len()
            )),
        }
    }
}

/// The bytes of `value` as a device tensor: `f32` as is, integers as `i32` (checked),
/// quantized rows as stored; `transpose` turns a `[k, n]` matrix into `[n, k]`.
pub(super) fn device_bytes(
    value: &Value,
    transpose: bool,
    half: bool,
) -> Result<(Vec<usize>, Elem, Vec<u8>), String> {
    match value {
        Value::Tensor(t) => tensor_bytes(t, transpose, half),
        // An f16 matrix is already the bits `WeightFormat::F16` reads.
        Value::Quantized(q) if half && q.format == QuantFormat::F16 => Ok((
            q.shape.clone(),
            Elem::Packed(WeightFormat::F16),
            q.bytes.clone(),
        )),
        Value::Quantized(q) => {
            let format = WeightFormat::of(&q.format)
                .ok_or_else(|| format!("{} weights have no GPU kernel", q.format.name()))?;
            Ok((q.shape.clone(), Elem::Packed(format), q.bytes.clone()))
        }
        other => Err(format!("{} has no GPU representation", other.kind())),
    }
}

/// The bytes of tensor `t` as a device tensor ([`device_bytes`]).
pub(super) fn tensor_bytes(
    t: &Tensor,
    transpose: bool,
    half: bool,
) -> Result<(Vec<usize>, Elem, Vec<u8>), String> {
    if !t.dtype.is_float() {
        let ints = t
            .ints()
            .map_err(|_| format!("a {:?} tensor has no GPU representation", t.dtype))?;
        let mut out = Vec::with_capacity(ints.len() * 4);
        for &i in ints {
            let v = i32::try_from(i)
                .map_err(|_| format!("the integer {i} does not fit the GPU's 32 bits"))?;
            out.extend_from_slice(&v.to_le_bytes());
        }
        return Ok((t.shape.clone(), Elem::I32(t.dtype), out));
    }
    // f16 and bf16 values are held as f32 (exactly), and uploaded so.
    let floats = t.floats()?;
    let (shape, data) = match (transpose, t.shape.as_slice()) {
        (true, &[k, n]) => (
            vec![n, k],
            (0..n)
                .flat_map(|j| (0..k).map(move |p| floats[p * n + j]))
                .collect::<Vec<f32>>(),
        ),
        _ => (t.shape.clone(), floats.to_vec()),
    };
    if half {
        let halves: Vec<u8> = data
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        return Ok((shape, Elem::Packed(WeightFormat::F16), halves));
    }
    let elem = match t.dtype {
        DType::F32 => Elem::F32,
        narrow => Elem::Narrow(narrow),
    };
    Ok((shape, elem, bytemuck::cast_slice(&data).to_vec()))
}

/// Whether every value of `value` is an `f32` tensor value exactly representable in `f16`
/// (the weights of a converted f16 model), so that `f16` storage loses nothing.
pub(super) fn exactly_f16(value: &Value) -> bool {
    match value {
        Value::Tensor(t) if matches!(t.dtype, DType::F32 | DType::F16) => {
            t.floats().is_ok_and(|v| {
                v.iter()
                    .all(|&x| f16::from_f32(x).to_f32().to_bits() == x.to_bits())
            })
        }
        Value::Quantized(q) => q.format == QuantFormat::F16,
        _ => false,
    }
}

/// Bytes of one row (the first dim) of a tensor of `shape` stored as `elem`.
pub(super) fn row_bytes(shape: &[usize], elem: Elem) -> usize {
    let inner: usize = shape.iter().skip(1).product();
    match elem {
        Elem::Packed(f) => f.row_bytes(inner),
        _ => 4 * inner,
    }
}

/// Uploads `bytes` in row parts of at most the device's binding limit each; tensors whose
/// rows are not self-contained (vectors, whole-matrix quantized layouts) stay in one part.
pub(super) fn upload_parts(
    gpu: &Gpu,
    label: &str,
    shape: Vec<usize>,
    elem: Elem,
    bytes: &[u8],
) -> Result<DeviceTensor, String> {
    let limit = gpu.limits().max_binding_bytes as usize;
    let rows = shape.first().copied().unwrap_or(1).max(1);
    let splittable = shape.len() >= 2
        && match elem {
            Elem::Packed(f) => f.block().is_some(),
            _ => true,
        };
    if !splittable {
        if bytes.len() > limit {
            return Err(format!(
                "{label}: {} bytes that cannot be split by rows exceed the device's {limit}-byte binding limit",
                bytes.len()
            ));
        }
        return Ok(DeviceTensor::unsplit(shape, elem, gpu.upload(label, bytes)));
    }
    let row = row_bytes(&shape, elem).max(1);
    // Parts are padded to 4 bytes, so a part of `per` rows takes up to `per * row + 3`.
    let per = limit.saturating_sub(3) / row;
    if per == 0 {
        return Err(format!(
            "{label}: one row of {row} bytes exceeds the device's {limit}-byte binding limit"
        ));
    }
    let parts = (0..rows)
        .step_by(per)
        .map(|first| {
            let n = per.min(rows - first);
            Part {
                first,
                rows: n,
                buffer: gpu.upload(label, &bytes[first * row..(first + n) * row]),
            }
        })
        .collect();
    Ok(DeviceTensor { shape, elem, parts })
}
