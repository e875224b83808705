//! The elements of a KV pool as the host holds them: 16-bit float storage as its 16 bits,
//! everything else as `f32`.

use std::{borrow::Cow, ops::Range};

use half::{
    bf16, f16,
    slice::{HalfBitsSliceExt, HalfFloatSliceExt},
};

use crate::{dtype::DType, types::KvStorage};

/// One of a KV pool's two arrays (its keys or its values), `[layers][blocks][block_size]
/// [kv_heads][head_dim]`, in the width the cache's storage takes on the host.
///
/// f16 and bf16 caches keep each element's 16 bits, so they take half an f32 cache's
/// memory. f32 caches, and quantized ones, hold `f32`: a quantized cache's elements are
/// the values of a quantize and dequantize round trip along `head_dim`, not its blocks'
/// bytes (`docs/lowering.md`, "KV storage").
#[derive(Debug, Clone, PartialEq)]
pub enum KvValues {
    /// `f32` elements (f32 storage, or quantized storage's round-tripped values).
    F32(Vec<f32>),
    /// The bits of f16 elements.
    F16(Vec<u16>),
    /// The bits of bf16 elements.
    BF16(Vec<u16>),
}

/// How a KV pool holds each element, in host and device memory alike: f16 and bf16
/// storage as its 16 bits, every other storage (f32, and a quantized cache's
/// round-tripped values) as `f32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvElement {
    /// `f32`.
    F32,
    /// The bits of an f16.
    F16,
    /// The bits of a bf16.
    BF16,
}

impl KvElement {
    /// The element of a pool with `storage`.
    pub fn of(storage: &KvStorage) -> KvElement {
        match storage {
            KvStorage::Float(DType::F16) => KvElement::F16,
            KvStorage::Float(DType::BF16) => KvElement::BF16,
            _ => KvElement::F32,
        }
    }

    /// The element type's name (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            KvElement::F32 => "f32",
            KvElement::F16 => "f16",
            KvElement::BF16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvElement::F32 => 4,
            KvElement::F16 | KvElement::BF16 => 2,
        }
    }
}

impl KvValues {
    /// `len` zeros held as `storage` needs.
    pub fn zeros(storage: &KvStorage, len: usize) -> KvValues {
        match KvElement::of(storage) {
            KvElement::F16 => KvValues::F16(vec![0; len]),
            KvElement::BF16 => KvValues::BF16(vec![0; len]),
            KvElement::F32 => KvValues::F32(vec![0.0; len]),
        }
    }

    /// `values` held as `storage` needs (each rounded as [`KvValues::write`] rounds; a
    /// value the storage represents, such as one a backend read back from this array,
    /// is kept exactly).
    pub fn from_f32(storage: &KvStorage, values: &[f32]) -> KvValues {
        let mut out = KvValues::zeros(storage, values.len());
        out.write(0, values);
        out
    }

    /// The elements whose [`bytes`](KvValues::bytes) are `bytes`, held as `storage`
    /// needs (a trailing part of an element is ignored).
    pub fn from_bytes(storage: &KvStorage, bytes: &[u8]) -> KvValues {
        let whole = bytes.len() - bytes.len() % KvElement::of(storage).bytes();
        let bytes = &bytes[..whole];
        match KvElement::of(storage) {
            KvElement::F16 => KvValues::F16(bytemuck::pod_collect_to_vec(bytes)),
            KvElement::BF16 => KvValues::BF16(bytemuck::pod_collect_to_vec(bytes)),
            KvElement::F32 => KvValues::F32(bytemuck::pod_collect_to_vec(bytes)),
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            KvValues::F32(v) => v.len(),
            KvValues::F16(bits) | KvValues::BF16(bits) => bits.len(),
        }
    }

    /// Whether no element is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How each element is held.
    pub fn element(&self) -> KvElement {
        match self {
            KvValues::F32(_) => KvElement::F32,
            KvValues::F16(_) => KvElement::F16,
            KvValues::BF16(_) => KvElement::BF16,
        }
    }

    /// Elements `at..at + out.len()`, as `f32`, into `out`.
    ///
    /// # Panics
    ///
    /// If the range is outside the array (callers check slots against the pool first).
    pub fn read(&self, at: usize, out: &mut [f32]) {
        let range = at..at + out.len();
        match self {
            KvValues::F32(v) => out.copy_from_slice(&v[range]),
            KvValues::F16(bits) => bits[range]
                .reinterpret_cast::<f16>()
                .convert_to_f32_slice(out),
            KvValues::BF16(bits) => bits[range]
                .reinterpret_cast::<bf16>()
                .convert_to_f32_slice(out),
        }
    }

    /// Every element as `f32`: borrowed from an `f32` array, widened from a 16-bit one.
    pub fn floats(&self) -> Cow<'_, [f32]> {
        match self {
            KvValues::F32(v) => Cow::Borrowed(v),
            _ => {
                let mut out = vec![0.0; self.len()];
                self.read(0, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Writes `row` at elements `at..`, each rounded to the element type (to nearest,
    /// ties to even, as `llm.cast` rounds).
    ///
    /// # Panics
    ///
    /// If the range is outside the array (callers check slots against the pool first).
    pub fn write(&mut self, at: usize, row: &[f32]) {
        let range = at..at + row.len();
        match self {
            KvValues::F32(v) => v[range].copy_from_slice(row),
            KvValues::F16(bits) => bits[range]
                .reinterpret_cast_mut::<f16>()
                .convert_from_f32_slice(row),
            KvValues::BF16(bits) => bits[range]
                .reinterpret_cast_mut::<bf16>()
                .convert_from_f32_slice(row),
        }
    }

    /// Copies elements `src` to `dest..` (within the array, as `slice::copy_within`).
    pub fn copy_within(&mut self, src: Range<usize>, dest: usize) {
        match self {
            KvValues::F32(v) => v.copy_within(src, dest),
            KvValues::F16(bits) | KvValues::BF16(bits) => bits.copy_within(src, dest),
        }
    }

    /// The elements' bytes (little-endian on the hosts the backends run on).
    pub fn bytes(&self) -> &[u8] {
        match self {
            KvValues::F32(v) => bytemuck::cast_slice(v),
            KvValues::F16(bits) | KvValues::BF16(bits) => bytemuck::cast_slice(bits),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 16-bit storage keeps 16 bits per element and rounds what it stores; values it
    /// represents come back exactly, and f32 storage keeps everything.
    #[test]
    fn sixteen_bit_storage_rounds_and_halves_the_bytes() {
        let row = [1.0, -2.5, 1.0 + 1.0 / 4096.0, 65504.0];
        for (dtype, rounded) in [
            (DType::F16, [1.0, -2.5, 1.0, 65504.0]),
            (DType::BF16, [1.0, -2.5, 1.0, 65536.0]),
            (DType::F32, row),
        ] {
            let storage = KvStorage::Float(dtype);
            let mut values = KvValues::zeros(&storage, 8);
            values.write(2, &row);
            let mut out = [0.0; 4];
            values.read(2, &mut out);
            assert_eq!(out, rounded, "{dtype}");
            assert_eq!(values.bytes().len(), 8 * values.element().bytes());
            values.copy_within(2..6, 4);
            values.read(4, &mut out);
            assert_eq!(out, rounded, "{dtype} after a copy");
            let back = KvValues::from_f32(&storage, &values.floats());
            assert_eq!(KvElement::of(&storage), values.element());
            assert_eq!(KvValues::from_bytes(&storage, values.bytes()), values);
            assert_eq!(back, values, "{dtype} through f32");
        }
    }
}
