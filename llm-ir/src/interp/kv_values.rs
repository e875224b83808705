//! The elements of a KV pool as the host holds them: 16-bit float storage as its 16 bits,
//! a GGUF block format as its blocks' bytes, everything else as `f32`.

use std::{borrow::Cow, ops::Range};

use half::{
    bf16, f16,
    slice::{HalfBitsSliceExt, HalfFloatSliceExt},
};

use crate::{dtype::DType, interp::quant, types::KvStorage, types::QuantFormat};

/// One of a KV pool's two arrays (its keys or its values), `[layers][blocks][block_size]
/// [kv_heads][head_dim]`, in the width the cache's storage takes on the host.
///
/// f16 and bf16 caches keep each element's 16 bits, half an f32 cache's memory. A cache
/// in a GGUF block format (q8_0, q4_0, q4_1, q4_k, q6_k, q2_k) keeps its blocks' bytes,
/// each block padded to whole 4-byte words ([`KvBlocks`]): q8_0 takes 1.125 bytes a value,
/// q4_0 0.625. f32 caches, and caches in nf4 or an affine format, hold `f32`: the latter's
/// elements are the values of a quantize and dequantize round trip along `head_dim`, not
/// their groups' bytes (`docs/lowering.md`, "KV storage").
#[derive(Debug, Clone, PartialEq)]
pub enum KvValues {
    /// `f32` elements (f32 storage, or nf4/affine storage's round-tripped values).
    F32(Vec<f32>),
    /// The bits of f16 elements.
    F16(Vec<u16>),
    /// The bits of bf16 elements.
    BF16(Vec<u16>),
    /// Blocks of a GGUF block format, one after another along the elements, each padded
    /// with zero bytes to [`KvBlocks::bytes`].
    Blocks(KvBlocks, Vec<u8>),
}

/// A GGUF block format a KV pool holds as its blocks' bytes: each block of
/// [`values`](KvBlocks::values) consecutive elements (along `head_dim`, which the cache
/// type's verifier makes a multiple of it) takes the format's block bytes, padded to a
/// whole number of 4-byte words so that a GPU reads and writes a block as words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvBlocks {
    /// GGUF Q8_0: 34 bytes for 32 values, held in 36.
    Q8_0,
    /// GGUF Q4_0: 18 bytes for 32 values, held in 20.
    Q4_0,
    /// GGUF Q4_1: 20 bytes for 32 values.
    Q4_1,
    /// GGUF Q4_K: 144 bytes for 256 values.
    Q4K,
    /// GGUF Q6_K: 210 bytes for 256 values, held in 212.
    Q6K,
    /// GGUF Q2_K: 84 bytes for 256 values.
    Q2K,
}

impl KvBlocks {
    /// The block format of `format`, if it is one.
    pub fn of(format: &QuantFormat) -> Option<KvBlocks> {
        Some(match format {
            QuantFormat::Q8_0 => KvBlocks::Q8_0,
            QuantFormat::Q4_0 => KvBlocks::Q4_0,
            QuantFormat::Q4_1 => KvBlocks::Q4_1,
            QuantFormat::Q4K => KvBlocks::Q4K,
            QuantFormat::Q6K => KvBlocks::Q6K,
            QuantFormat::Q2K => KvBlocks::Q2K,
            _ => return None,
        })
    }

    /// The quantization format.
    pub fn format(self) -> QuantFormat {
        match self {
            KvBlocks::Q8_0 => QuantFormat::Q8_0,
            KvBlocks::Q4_0 => QuantFormat::Q4_0,
            KvBlocks::Q4_1 => QuantFormat::Q4_1,
            KvBlocks::Q4K => QuantFormat::Q4K,
            KvBlocks::Q6K => QuantFormat::Q6K,
            KvBlocks::Q2K => QuantFormat::Q2K,
        }
    }

    /// Values per block: 32, or the K-quants' 256.
    pub fn values(self) -> usize {
        self.format().block_elems() as usize
    }

    /// The format's bytes per block (GGUF's).
    pub fn packed_bytes(self) -> usize {
        self.format().gguf_block_bytes().unwrap_or(0) as usize
    }

    /// Bytes a block takes in a pool: [`packed_bytes`](KvBlocks::packed_bytes) rounded up
    /// to a multiple of 4.
    pub fn bytes(self) -> usize {
        self.packed_bytes().next_multiple_of(4)
    }
}

/// How a KV pool holds each element, in host and device memory alike: f16 and bf16
/// storage as its 16 bits, a GGUF block format as its padded blocks, every other storage
/// (f32, and nf4/affine storage's round-tripped values) as `f32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvElement {
    /// `f32`.
    F32,
    /// The bits of an f16.
    F16,
    /// The bits of a bf16.
    BF16,
    /// Blocks of a block format.
    Blocks(KvBlocks),
}

impl KvElement {
    /// The element of a pool with `storage`.
    pub fn of(storage: &KvStorage) -> KvElement {
        match storage {
            KvStorage::Float(DType::F16) => KvElement::F16,
            KvStorage::Float(DType::BF16) => KvElement::BF16,
            KvStorage::Quantized(format) => {
                KvBlocks::of(format).map_or(KvElement::F32, KvElement::Blocks)
            }
            KvStorage::Float(_) => KvElement::F32,
        }
    }

    /// The element type's name (`f32`, `f16`, `bf16`, or the block format's).
    pub fn name(self) -> &'static str {
        match self {
            KvElement::F32 => "f32",
            KvElement::F16 => "f16",
            KvElement::BF16 => "bf16",
            KvElement::Blocks(blocks) => blocks.format().name(),
        }
    }

    /// Bytes `elements` elements take (for a block format, a multiple of its
    /// [values](KvBlocks::values) per block, which the cache type's verifier guarantees
    /// for a pool and its rows).
    pub fn bytes(self, elements: usize) -> usize {
        match self {
            KvElement::F32 => 4 * elements,
            KvElement::F16 | KvElement::BF16 => 2 * elements,
            KvElement::Blocks(b) => {
                debug_assert!(elements.is_multiple_of(b.values()), "{elements} values");
                elements / b.values() * b.bytes()
            }
        }
    }
}

impl KvValues {
    /// `len` zeros held as `storage` needs (for a block format, all-zero blocks: a zero
    /// scale, so zeros).
    pub fn zeros(storage: &KvStorage, len: usize) -> KvValues {
        match KvElement::of(storage) {
            KvElement::F16 => KvValues::F16(vec![0; len]),
            KvElement::BF16 => KvValues::BF16(vec![0; len]),
            KvElement::F32 => KvValues::F32(vec![0.0; len]),
            KvElement::Blocks(b) => KvValues::Blocks(b, vec![0; KvElement::Blocks(b).bytes(len)]),
        }
    }

    /// `values` held as `storage` needs (each rounded as [`KvValues::write`] rounds; a
    /// value a float storage represents, such as one a backend read back from this array,
    /// is kept exactly; a block format quantizes the values, whole blocks of them).
    ///
    /// # Panics
    ///
    /// For a block format, if `values` is not whole blocks.
    pub fn from_f32(storage: &KvStorage, values: &[f32]) -> KvValues {
        let mut out = KvValues::zeros(storage, values.len());
        out.write(0, values);
        out
    }

    /// The elements whose [`bytes`](KvValues::bytes) are `bytes`, held as `storage`
    /// needs (a trailing part of an element, or of a block, is ignored).
    pub fn from_bytes(storage: &KvStorage, bytes: &[u8]) -> KvValues {
        let element = KvElement::of(storage);
        let unit = match element {
            KvElement::Blocks(b) => b.bytes(),
            other => other.bytes(1),
        };
        let bytes = &bytes[..bytes.len() - bytes.len() % unit];
        match element {
            KvElement::F16 => KvValues::F16(bytemuck::pod_collect_to_vec(bytes)),
            KvElement::BF16 => KvValues::BF16(bytemuck::pod_collect_to_vec(bytes)),
            KvElement::F32 => KvValues::F32(bytemuck::pod_collect_to_vec(bytes)),
            KvElement::Blocks(b) => KvValues::Blocks(b, bytes.to_vec()),
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            KvValues::F32(v) => v.len(),
            KvValues::F16(bits) | KvValues::BF16(bits) => bits.len(),
            KvValues::Blocks(b, bytes) => bytes.len() / b.bytes() * b.values(),
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
            KvValues::Blocks(b, _) => KvElement::Blocks(*b),
        }
    }

    /// Elements `at..at + out.len()`, as `f32`, into `out` (a block format's blocks
    /// decoded as `llm.dequantize` decodes them).
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
            KvValues::Blocks(b, bytes) => {
                let (values, format) = (b.values(), b.format());
                let mut block = Vec::with_capacity(values);
                let mut e = range.start;
                while e < range.end {
                    let first = e / values * values;
                    let stored = &bytes[first / values * b.bytes()..][..b.packed_bytes()];
                    block.clear();
                    quant::dequantize_gguf_block(&format, stored, &mut block);
                    let end = range.end.min(first + values);
                    out[e - at..end - at].copy_from_slice(&block[e - first..end - first]);
                    e = end;
                }
            }
        }
    }

    /// Every element as `f32`: borrowed from an `f32` array, widened or decoded from the
    /// others.
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
    /// ties to even, as `llm.cast` rounds), or quantized into whole blocks as
    /// `llm.quantize` quantizes them.
    ///
    /// # Panics
    ///
    /// If the range is outside the array (callers check slots against the pool first),
    /// or, for a block format, does not cover whole blocks (the cache type's verifier
    /// makes `head_dim`, the rows callers write, a multiple of a block).
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
            KvValues::Blocks(b, bytes) => {
                let values = b.values();
                assert!(
                    at.is_multiple_of(values) && row.len().is_multiple_of(values),
                    "{}-value blocks written at {at} for {}",
                    values,
                    row.len()
                );
                let packed = quant::quantize(&b.format(), &[row.len()], row);
                let dest = bytes[at / values * b.bytes()..][..row.len() / values * b.bytes()]
                    .chunks_exact_mut(b.bytes());
                for (dest, block) in dest.zip(packed.chunks_exact(b.packed_bytes())) {
                    dest[..block.len()].copy_from_slice(block);
                }
            }
        }
    }

    /// Copies elements `src` to `dest..` (within the array, as `slice::copy_within`; for a
    /// block format, whole blocks).
    pub fn copy_within(&mut self, src: Range<usize>, dest: usize) {
        match self {
            KvValues::F32(v) => v.copy_within(src, dest),
            KvValues::F16(bits) | KvValues::BF16(bits) => bits.copy_within(src, dest),
            KvValues::Blocks(b, bytes) => {
                let byte = |e: usize| {
                    assert!(e.is_multiple_of(b.values()), "a copy splits a block at {e}");
                    e / b.values() * b.bytes()
                };
                bytes.copy_within(byte(src.start)..byte(src.end), byte(dest));
            }
        }
    }

    /// The elements' bytes (little-endian on the hosts the backends run on).
    pub fn bytes(&self) -> &[u8] {
        match self {
            KvValues::F32(v) => bytemuck::cast_slice(v),
            KvValues::F16(bits) | KvValues::BF16(bits) => bytemuck::cast_slice(bits),
            KvValues::Blocks(_, bytes) => bytes,
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
            assert_eq!(values.bytes().len(), values.element().bytes(8));
            values.copy_within(2..6, 4);
            values.read(4, &mut out);
            assert_eq!(out, rounded, "{dtype} after a copy");
            let back = KvValues::from_f32(&storage, &values.floats());
            assert_eq!(KvElement::of(&storage), values.element());
            assert_eq!(KvValues::from_bytes(&storage, values.bytes()), values);
            assert_eq!(back, values, "{dtype} through f32");
        }
    }

    /// A block format's pool holds each block's GGUF bytes padded to whole words, reads
    /// back what `llm.dequantize` gives for `llm.quantize`'s blocks, copies whole blocks
    /// and survives its bytes and its floats.
    #[test]
    fn block_formats_hold_their_padded_blocks() {
        let row: Vec<f32> = (0..512)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        for (format, padded) in [
            (QuantFormat::Q8_0, 36),
            (QuantFormat::Q4_0, 20),
            (QuantFormat::Q4_1, 20),
            (QuantFormat::Q4K, 144),
            (QuantFormat::Q6K, 212),
            (QuantFormat::Q2K, 84),
        ] {
            let storage = KvStorage::Quantized(format.clone());
            let blocks = KvBlocks::of(&format).unwrap();
            assert_eq!((blocks.bytes(), blocks.format()), (padded, format.clone()));
            let values = blocks.values();
            let mut pool = KvValues::zeros(&storage, 4 * 256);
            assert_eq!(pool.bytes().len(), 4 * 256 / values * padded);
            assert_eq!(pool.len(), 4 * 256);
            pool.write(256, &row);
            let want = quant::dequantize(&format, &[512], &quant::quantize(&format, &[512], &row));
            let mut out = vec![0.0; 512];
            pool.read(256, &mut out);
            assert_eq!(out, want, "{format}");
            // A range that starts and ends inside blocks.
            let mut part = vec![0.0; 300];
            pool.read(261, &mut part);
            assert_eq!(part, want[5..305], "{format}");
            // Padding bytes stay zero; the packed bytes are the format's.
            let packed = quant::quantize(&format, &[512], &row);
            let first = 256 / values * padded;
            let stored = &pool.bytes()[first..first + padded];
            assert_eq!(
                stored[..blocks.packed_bytes()],
                packed[..blocks.packed_bytes()]
            );
            assert!(stored[blocks.packed_bytes()..].iter().all(|&b| b == 0));
            pool.copy_within(256..512, 768);
            pool.read(768, &mut out[..256]);
            assert_eq!(out[..256], want[..256], "{format} after a copy");
            assert_eq!(KvValues::from_bytes(&storage, pool.bytes()), pool);
            assert_eq!(pool.element(), KvElement::of(&storage));
            assert_eq!(pool.element().bytes(1024), pool.bytes().len());
        }
        // nf4 and the affine formats keep round-tripped f32 values.
        let nf4 = QuantFormat::Nf4 {
            block_size: 32,
            scale: DType::F16,
        };
        assert_eq!(KvElement::of(&KvStorage::Quantized(nf4)), KvElement::F32);
    }
}
