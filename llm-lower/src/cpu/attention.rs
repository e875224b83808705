//! An AVX2 microkernel for the attention of one query row whose head size is a multiple of
//! 8, called by the generated attention function in place of its 4-lane body where the CPU
//! has AVX2 and FMA (decode over long contexts spends most of its time here).
//!
//! The generated kernel's algorithm (`codegen::emit_attention`), 8 lanes wide: the query
//! heads go through the positions in passes of whole GQA groups, as many groups as fit 8
//! heads (so small heads read each key and value row once, not once per KV head), with an
//! online softmax over blocks of 64 positions (the generated kernel's are 16); the scores of 8
//! positions are summed across lanes together (three rounds of horizontal adds, one
//! 256-bit vector of 8 scores), exponentials are computed 8 lanes at a time with the
//! generated code's polynomial (the heads' rescale factors in one of them, skipped when no
//! head's maximum grew), and the outputs collect a block's values in registers, two heads
//! at a time so that a GQA group reads each value row once per pair. The additions are not
//! in the generated code's order, so results agree with it (and with the reference) to
//! rounding, not bit for bit.
//!
//! Keys and values are f32, the 16 bits of an f16 or bf16 cache, or a q8_0, q4_0 or q4_1
//! cache's blocks, widened 8 lanes at a time as they are loaded (F16C's `vcvtph2ps`; a
//! shift for bf16; for the blocks, 8 codes extended and converted, times the block's f16
//! scale, the product `llm.dequantize` computes, plus q4_1's minimum): a 16-bit cache is
//! read in half the bytes, a q8_0 cache in 9/32, a q4_0 or q4_1 cache in 5/32, and the
//! arithmetic is the same as over f32 rows of those values. A soft-cap (Gemma 2's) turns
//! each block of 8 scaled scores into `cap * tanh(s / cap)` as the generated kernels do.
//!
//! Measured on this repository's 2-core Zen 4 machine (one head group's rows in cache):
//! blocks of 64 positions instead of 32 take 15% off stories260K's heads of 8, and sharing
//! value rows halves the time of Llama-shaped groups of 4 heads of 128. One pass over all
//! 8 of stories260K's heads instead of one per KV head: 3-4% more decode tok/s on one
//! thread, 7% more with 32 sequences.

#![allow(
    unsafe_code,
    reason = "AVX2 intrinsics on pointers checked by the caller"
)]

use llm_ir::interp::{
    KvBlocks, KvElement,
    eval::attention::{Scale, Scoring},
};

use super::emit::{EXP_LN2, EXP_POLY, EXP_RANGE, TANH_POLY, TANH_SMALL};
#[cfg(target_arch = "x86_64")]
use super::kv_blocks::{BlockValues, Q2K, Q4_0, Q4_1, Q4K, Q6K, Q8_0};

/// The symbol generated code imports [`attention_row`] under.
pub const ATTENTION_ROW: &str = "llmc_attention_row";

/// Positions per block of the online softmax (8 vectors of 8 scores).
const BLOCK: usize = 64;

/// The largest query-head group (`heads / kv_heads`) the microkernel keeps scores for on
/// the stack; beyond, the generated kernel runs.
pub const MAX_GROUP: usize = 8;

/// The largest head size the microkernel takes.
pub const MAX_HEAD: usize = 256;

/// Whether [`attention_row`] takes `heads` query heads of `d` over `kv_heads` KV heads:
/// whole groups of at most [`MAX_GROUP`], heads of a multiple of 8 up to [`MAX_HEAD`], and
/// head counts that fit the 16 bits each has in the packed shape.
pub fn fits(heads: usize, kv_heads: usize, d: usize) -> bool {
    kv_heads > 0
        && heads.is_multiple_of(kv_heads)
        && heads < 1 << 16
        && (1..=MAX_GROUP).contains(&(heads / kv_heads))
        && d.is_multiple_of(8)
        && (8..=MAX_HEAD).contains(&d)
}

/// Whether a compiled attention kernel over `heads` query heads of `d` on `kv_heads` KV
/// heads calls [`attention_row`] (which reads every storage's rows as the pool holds
/// them): where the kernels call the Rust microkernels (`tiles`) and the heads
/// [`fit`](fits).
pub fn row_kernel_runs(tiles: bool, heads: usize, kv_heads: usize, d: usize) -> bool {
    tiles && fits(heads, kv_heads, d)
}

/// The code of `element` in [`shape_word`]: 1 for f16, 2 for bf16, 3 for q8_0, 4 for
/// q4_0, 5 for q4_1, 6 for q4_k, 7 for q6_k, 8 for q2_k, 0 for f32.
fn element_code(element: KvElement) -> usize {
    match element {
        KvElement::F32 => 0,
        KvElement::F16 => 1,
        KvElement::BF16 => 2,
        KvElement::Blocks(KvBlocks::Q8_0) => 3,
        KvElement::Blocks(KvBlocks::Q4_0) => 4,
        KvElement::Blocks(KvBlocks::Q4_1) => 5,
        KvElement::Blocks(KvBlocks::Q4K) => 6,
        KvElement::Blocks(KvBlocks::Q6K) => 7,
        KvElement::Blocks(KvBlocks::Q2K) => 8,
    }
}

/// The `shape` word of [`attention_row`] for `heads` query heads of `d` over `kv_heads`
/// KV heads of rows of `element` (bits 48 and up: its code, 1 for f16, 2 for bf16, 3 to 8
/// for q8_0, q4_0, q4_1, q4_k, q6_k and q2_k, 0 for f32 rows).
pub fn shape_word(element: KvElement, heads: usize, kv_heads: usize, d: usize) -> i64 {
    (heads | kv_heads << 16 | d << 32 | element_code(element) << 48) as i64
}

/// The element a `shape` word names.
fn element_of_shape(shape: i64) -> KvElement {
    match shape >> 48 {
        1 => KvElement::F16,
        2 => KvElement::BF16,
        3 => KvElement::Blocks(KvBlocks::Q8_0),
        4 => KvElement::Blocks(KvBlocks::Q4_0),
        5 => KvElement::Blocks(KvBlocks::Q4_1),
        6 => KvElement::Blocks(KvBlocks::Q4K),
        7 => KvElement::Blocks(KvBlocks::Q6K),
        8 => KvElement::Blocks(KvBlocks::Q2K),
        _ => KvElement::F32,
    }
}

/// Attention of the query row at `q` (`heads` heads of `d`) over `count` key/value rows
/// of `kv_heads * d` elements: row `j` is element `offsets[j] / 4` of `k` and `v` (the
/// offsets are those of f32 rows, in bytes), KV head `h` `h * d` elements after it;
/// scores are scaled by the f32 whose bits are `factor`, then soft-capped by the one whose
/// bits are `cap` (none where `cap` is 0); the `heads * d` outputs go to `out`. `shape` is
/// [`shape_word`]. Where `sinks` is not null, head `h`'s softmax also counts an attention
/// sink of score `sinks[h]` and no value.
///
/// # Safety
///
/// `q` points to `heads * d` floats and `out` to as many writable ones; `sinks` is null or
/// points to `heads` floats; every offset is
/// one whose row lies inside `k` and `v`; `offsets` holds `count` (at least 1) entries;
/// `heads`, `kv_heads` and `d` [`fit`](fits) and the element is a [`KvElement`] (for a
/// block format, `d` and every `offsets[j] / 4` a multiple of its 32 values); the CPU
/// has AVX2, FMA and F16C ([`super::ukernel::available`]).
#[cfg(target_arch = "x86_64")]
pub unsafe extern "C" fn attention_row(
    q: *const f32,
    k: *const u8,
    v: *const u8,
    offsets: *const i64,
    count: i64,
    out: *mut f32,
    shape: i64,
    factor: i64,
    cap: i64,
    sinks: *const f32,
) {
    let heads = (shape & 0xffff) as usize;
    let kv_heads = ((shape >> 16) & 0xffff) as usize;
    let d = ((shape >> 32) & 0xffff) as usize;
    let args = RowArgs {
        q,
        k,
        v,
        offsets,
        count,
        out,
        shape: [heads, kv_heads, d],
        scoring: Scoring {
            scale: Scale::Times(f32::from_bits(factor as u32)),
            softcap: (cap != 0).then(|| f32::from_bits(cap as u32)),
        },
        sinks,
    };
    // SAFETY: forwarded from this function's contract.
    unsafe {
        match element_of_shape(shape) {
            KvElement::F16 => attend_row::<F16>(args),
            KvElement::BF16 => attend_row::<BF16>(args),
            KvElement::Blocks(KvBlocks::Q8_0) => attend_row::<Blocks<Q8_0>>(args),
            KvElement::Blocks(KvBlocks::Q4_0) => attend_row::<Blocks<Q4_0>>(args),
            KvElement::Blocks(KvBlocks::Q4_1) => attend_row::<Blocks<Q4_1>>(args),
            KvElement::Blocks(KvBlocks::Q4K) => attend_row::<Blocks<Q4K>>(args),
            KvElement::Blocks(KvBlocks::Q6K) => attend_row::<Blocks<Q6K>>(args),
            KvElement::Blocks(KvBlocks::Q2K) => attend_row::<Blocks<Q2K>>(args),
            KvElement::F32 => attend_row::<F32>(args),
        }
    }
}

/// [`attention_row`]'s arguments, its shape unpacked.
#[cfg(target_arch = "x86_64")]
struct RowArgs {
    q: *const f32,
    k: *const u8,
    v: *const u8,
    offsets: *const i64,
    count: i64,
    out: *mut f32,
    shape: [usize; 3],
    scoring: Scoring,
    sinks: *const f32,
}

/// [`attention_row`] over rows of `E`.
///
/// # Safety
///
/// As [`attention_row`]'s contract.
#[cfg(target_arch = "x86_64")]
unsafe fn attend_row<E: Element>(a: RowArgs) {
    let RowArgs {
        q,
        k,
        v,
        offsets,
        count,
        out,
        shape: [heads, kv_heads, d],
        scoring,
        sinks,
    } = a;
    // SAFETY: forwarded from this function's contract.
    unsafe {
        let offsets = std::slice::from_raw_parts(offsets, count as usize);
        // One zeroed buffer for every pass (each pass writes its scores before reading).
        let mut scores = [[0f32; BLOCK]; MAX_GROUP];
        let group = heads / kv_heads;
        // Whole groups, as many as fit MAX_GROUP heads, go through the positions together:
        // the KV heads of a row share its cache lines (stories260K's heads of 8 read 32
        // bytes of each 128-byte row per KV head).
        let pass = (MAX_GROUP / group) * group;
        for first in (0..heads).step_by(pass) {
            let n = pass.min(heads - first);
            let kv = first / group;
            let sinks = (!sinks.is_null()).then(|| std::slice::from_raw_parts(sinks.add(first), n));
            attend_heads::<E>(
                (d, scoring, group, sinks),
                q.add(first * d),
                (k.add(E::bytes(kv * d)), v.add(E::bytes(kv * d))),
                offsets,
                (&mut scores[..n], out.add(first * d)),
            );
        }
    }
}

/// The element type of key and value rows: the bytes a run of them takes and how 8 of
/// them load as `f32`. Runs start at a head's first element (for q8_0 and q4_0, at a
/// block).
#[cfg(target_arch = "x86_64")]
trait Element {
    /// Bytes of `elements` elements (for q8_0 and q4_0, a multiple of 32).
    fn bytes(elements: usize) -> usize;

    /// Elements `e..e + 8` of the run at `run` (`e` a multiple of 8), as `f32`.
    ///
    /// # Safety
    ///
    /// The 8 elements lie inside the allocation; the CPU has AVX2 and F16C.
    unsafe fn load8(run: *const u8, e: usize) -> std::arch::x86_64::__m256;

    /// The first byte of the row whose `f32` row would start `offset` bytes in.
    ///
    /// # Safety
    ///
    /// The row lies inside the allocation `base` points into.
    #[inline]
    unsafe fn row(base: *const u8, offset: i64) -> *const u8 {
        // SAFETY: the caller's contract.
        unsafe { base.add(Self::bytes(offset as usize / 4)) }
    }
}

/// `f32` rows.
#[cfg(target_arch = "x86_64")]
struct F32;

/// The bits of f16 rows.
#[cfg(target_arch = "x86_64")]
struct F16;

/// The bits of bf16 rows.
#[cfg(target_arch = "x86_64")]
struct BF16;

/// Rows of a block format: its blocks as a pool holds them, each block's values loaded as
/// [`BlockValues`] decodes them.
#[cfg(target_arch = "x86_64")]
struct Blocks<C>(std::marker::PhantomData<C>);

#[cfg(target_arch = "x86_64")]
impl Element for F32 {
    fn bytes(elements: usize) -> usize {
        4 * elements
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(run: *const u8, e: usize) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(run.add(4 * e).cast()) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Element for F16 {
    fn bytes(elements: usize) -> usize {
        2 * elements
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(run: *const u8, e: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(run.add(2 * e).cast())) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Element for BF16 {
    fn bytes(elements: usize) -> usize {
        2 * elements
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(run: *const u8, e: usize) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's contract. A bf16 is the top half of the f32 it stands for.
        unsafe {
            let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(run.add(2 * e).cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16))
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl<C: BlockValues> Element for Blocks<C> {
    fn bytes(elements: usize) -> usize {
        elements / C::FORMAT.values() * C::FORMAT.bytes()
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(run: *const u8, e: usize) -> std::arch::x86_64::__m256 {
        let values = C::FORMAT.values();
        // SAFETY: the caller's contract; the block of element `e` holds it and the 7 after
        // it (8 from a multiple of 8 never straddle a block).
        unsafe { C::values8(run.add(e / values * C::FORMAT.bytes()), e % values) }
    }
}

/// Scores of one query head for a block of positions (one slot per position, at most
/// [`BLOCK`]); [`attention_row`] keeps one per head of a group on its stack.
#[cfg(target_arch = "x86_64")]
type Scores = [f32; BLOCK];

/// The query heads `q` (one row of `d` per entry of `scores`: whole groups of `group`
/// heads, group `g` over the KV head `g` after the one at `k`/`v`) over the rows at
/// `offsets`, into `out`: per block of positions the scores of every head, the
/// online-softmax update, then the values; each head's softmax starts from its sink's
/// score, where there are `sinks`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_heads<E: Element>(
    (d, scoring, group, sinks): (usize, Scoring, usize, Option<&[f32]>),
    q: *const f32,
    (k, v): (*const u8, *const u8),
    offsets: &[i64],
    (scores, out): (&mut [Scores], *mut f32),
) {
    use std::arch::x86_64::*;
    let heads = scores.len();
    let mut softmax = Softmax::new(sinks);
    // SAFETY: every pointer below is inside the rows the caller's contract describes.
    unsafe {
        for h in 0..heads {
            for c in 0..d / 8 {
                _mm256_storeu_ps(out.add(h * d + 8 * c), _mm256_setzero_ps());
            }
        }
        // The bytes of a row this pass reads: its KV heads' keys (or values).
        let row_bytes = E::bytes(d * heads.div_ceil(group));
        prefetch_rows::<E>(k, &offsets[..offsets.len().min(BLOCK)], row_bytes);
        for (i, block) in offsets.chunks(BLOCK).enumerate() {
            // The block's value rows are read after its scores, the next block's key rows
            // after its values: both are fetched while this block's scores are computed.
            prefetch_rows::<E>(v, block, row_bytes);
            let next = offsets.get((i + 1) * BLOCK..).unwrap_or(&[]);
            prefetch_rows::<E>(k, &next[..next.len().min(BLOCK)], row_bytes);
            block_scores::<E>((d, scoring, group), q, k, block, scores);
            let shrinks = softmax.update(block.len(), scores);
            for (h, &shrink) in shrinks.iter().enumerate().take(heads) {
                // exp(0) is exactly 1: nothing to rescale where the maximum stayed.
                if shrink != 1.0 {
                    let by = _mm256_set1_ps(shrink);
                    for c in 0..d / 8 {
                        let o = out.add(h * d + 8 * c);
                        _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), by));
                    }
                }
            }
            block_values::<E>((d, group), v, block, scores, out);
        }
        for (h, total) in softmax.sum.iter().enumerate().take(heads) {
            let inv = _mm256_set1_ps(1.0 / total);
            for c in 0..d / 8 {
                let o = out.add(h * d + 8 * c);
                _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), inv));
            }
        }
    }
}

/// Asks the caches for the `bytes` of each row at `offsets` past `base`, ahead of their
/// use (the rows of a sequence's blocks lie apart in the pool, so the hardware prefetchers
/// lose the stream at each block).
///
/// # Safety
///
/// Prefetches never fault; the addresses are computed inside the rows of the caller's
/// contract.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prefetch_rows<E: Element>(base: *const u8, offsets: &[i64], bytes: usize) {
    use std::arch::x86_64::*;
    for &offset in offsets {
        // SAFETY: the row's bytes lie inside the pool (the contract).
        unsafe {
            let row = E::row(base, offset);
            for line in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(row.add(line).cast());
            }
            _mm_prefetch::<_MM_HINT_T0>(row.add(bytes - 1).cast());
        }
    }
}

/// The scores (scaled, soft-capped where the scoring has a cap) of every head of `q` (one
/// row of `d` per entry of `scores`, each
/// `group` over one KV head) against the key rows of `block`, eight positions at a time:
/// the eight rows' addresses are read once for all heads (past the block's end they repeat its last row, and those scores
/// become the lowest float), and each head's eight dot products are summed across lanes
/// together.
///
/// # Safety
///
/// As [`attention_row`]'s contract, for `block` (not empty) and the heads of `q`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_scores<E: Element>(
    (d, scoring, group): (usize, Scoring, usize),
    q: *const f32,
    k: *const u8,
    block: &[i64],
    scores: &mut [Scores],
) {
    use std::arch::x86_64::*;
    let factors = _mm256_set1_ps(scoring.scale.factor());
    let last = block.len() - 1;
    // Each head's first float in a key row (divisions kept out of the position loop).
    let kv_at: [usize; MAX_GROUP] = std::array::from_fn(|h| (h / group) * d);
    for first in (0..block.len()).step_by(8) {
        // SAFETY: indices are clamped to the block; the rows are the contract's.
        let rows: [*const u8; 8] =
            std::array::from_fn(|p| unsafe { E::row(k, block[(first + p).min(last)]) });
        let valid = (block.len() - first).min(8);
        for (h, head_scores) in scores.iter_mut().enumerate() {
            // SAFETY: head h's query row holds d floats, each key row d at its offset.
            let kv = kv_at[h];
            let products: [__m256; 8] = std::array::from_fn(|p| unsafe {
                let (qh, kh) = (q.add(h * d), rows[p].add(E::bytes(kv)));
                let mut acc = _mm256_mul_ps(_mm256_loadu_ps(qh), E::load8(kh, 0));
                for c in 1..d / 8 {
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(8 * c)), E::load8(kh, 8 * c), acc);
                }
                acc
            });
            let mut s = _mm256_mul_ps(lane_sums(products), factors);
            if let Some(cap) = scoring.softcap {
                s = soft_cap8(s, cap);
            }
            if valid < 8 {
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), lanes);
                s = _mm256_blendv_ps(_mm256_set1_ps(f32::MIN), s, _mm256_castsi256_ps(keep));
            }
            // SAFETY: `first + 8 <= BLOCK`, as `first` is a multiple of 8 below BLOCK.
            unsafe { _mm256_storeu_ps(head_scores.as_mut_ptr().add(first), s) };
        }
    }
}

/// The running maximum and sum of each head's online softmax.
#[cfg(target_arch = "x86_64")]
struct Softmax {
    max: [f32; MAX_GROUP],
    sum: [f32; MAX_GROUP],
}

#[cfg(target_arch = "x86_64")]
impl Softmax {
    /// Every head before any position: nothing seen, or only its attention sink (a score
    /// whose exponential counts in the sum, 1 around itself as the maximum).
    fn new(sinks: Option<&[f32]>) -> Softmax {
        let mut softmax = Softmax {
            max: [f32::MIN; MAX_GROUP],
            sum: [0.0; MAX_GROUP],
        };
        for (h, &sink) in sinks.unwrap_or_default().iter().enumerate() {
            (softmax.max[h], softmax.sum[h]) = (sink, 1.0);
        }
        softmax
    }

    /// Takes in a block of `len` scores per head: each head's scores become their
    /// exponentials around the new maximum, and the result is, per head, the factor
    /// (`exp(old max - new max)`) that rescales what came before: for all heads in one
    /// exponential, and none at all when no maximum grew.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn update(&mut self, len: usize, scores: &mut [Scores]) -> [f32; MAX_GROUP] {
        use std::arch::x86_64::*;
        let vectors = len.div_ceil(8);
        // SAFETY: each reads or writes the 8 floats of one array.
        let load = |eight: &[f32; 8]| unsafe { _mm256_loadu_ps(eight.as_ptr()) };
        let store = |eight: &mut [f32; 8], x| unsafe { _mm256_storeu_ps(eight.as_mut_ptr(), x) };
        let mut diffs = [0f32; MAX_GROUP];
        let mut grew = false;
        for (h, head_scores) in scores.iter().enumerate() {
            let eights = head_scores.as_chunks::<8>().0;
            let mut most = load(&eights[0]);
            for eight in &eights[1..vectors] {
                most = _mm256_max_ps(most, load(eight));
            }
            let m_new = self.max[h].max(horizontal_max(most));
            grew |= m_new > self.max[h];
            diffs[h] = self.max[h] - m_new;
            self.max[h] = m_new;
        }
        let mut shrinks = [1f32; MAX_GROUP];
        if grew {
            store(&mut shrinks, exp8(load(&diffs)));
        }
        for (h, head_scores) in scores.iter_mut().enumerate() {
            let centre = _mm256_set1_ps(self.max[h]);
            let mut total = _mm256_setzero_ps();
            for eight in &mut head_scores.as_chunks_mut::<8>().0[..vectors] {
                let e = exp8(_mm256_sub_ps(load(eight), centre));
                store(eight, e);
                total = _mm256_add_ps(total, e);
            }
            self.sum[h] = self.sum[h].mul_add(shrinks[h], horizontal_sum(total));
        }
        shrinks
    }
}

/// Adds each head's weighted value rows of `block` to its outputs (head `h` reads KV head
/// `h / group` after the one at `v`): two heads of one KV head at a time (when groups
/// are even), which share every load of a value row (a group of GQA heads reads each row
/// once per pair), each in two partial sums per 8 outputs (even and odd positions); the
/// heads of odd groups alone, in four partial sums.
///
/// # Safety
///
/// As [`attention_row`]'s contract, for `block` and the `scores.len()` heads at `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_values<E: Element>(
    (d, group): (usize, usize),
    v: *const u8,
    block: &[i64],
    scores: &[Scores],
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let n = block.len();
    // SAFETY: a row's values (at its offset) hold the KV heads' d floats each, and `at`
    // is a head's first float plus a multiple of 8 below d (the contract).
    let value = |offset: i64, at: usize| unsafe { E::load8(E::row(v, offset), at) };
    // SAFETY: head h's outputs are d floats at `out + h * d`.
    let add_to = |h: usize, chunk: usize, sum: __m256| unsafe {
        let o = out.add(h * d + 8 * chunk);
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), sum));
    };
    let pairs = if group.is_multiple_of(2) {
        scores.len() / 2
    } else {
        0
    };
    let even = n - n % 2;
    for pair in 0..pairs {
        let h = 2 * pair;
        let (s0, s1) = (&scores[h][..n], &scores[h + 1][..n]);
        for chunk in 0..d / 8 {
            // The pair's KV head, hoisted out of the position loop.
            let at = (h / group) * d + 8 * chunk;
            let mut acc = [_mm256_setzero_ps(); 4];
            let positions = block[..even].chunks_exact(2);
            let weights = s0[..even].chunks_exact(2).zip(s1[..even].chunks_exact(2));
            for (rows, (w0, w1)) in positions.zip(weights) {
                let (v0, v1) = (value(rows[0], at), value(rows[1], at));
                acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(w0[0]), v0, acc[0]);
                acc[1] = _mm256_fmadd_ps(_mm256_set1_ps(w0[1]), v1, acc[1]);
                acc[2] = _mm256_fmadd_ps(_mm256_set1_ps(w1[0]), v0, acc[2]);
                acc[3] = _mm256_fmadd_ps(_mm256_set1_ps(w1[1]), v1, acc[3]);
            }
            if n % 2 == 1 {
                let v0 = value(block[n - 1], at);
                acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(s0[n - 1]), v0, acc[0]);
                acc[2] = _mm256_fmadd_ps(_mm256_set1_ps(s1[n - 1]), v0, acc[2]);
            }
            add_to(h, chunk, _mm256_add_ps(acc[0], acc[1]));
            add_to(h + 1, chunk, _mm256_add_ps(acc[2], acc[3]));
        }
    }
    let fours = n - n % 4;
    for (h, head_scores) in scores.iter().enumerate().skip(2 * pairs) {
        let weights = &head_scores[..n];
        for chunk in 0..d / 8 {
            let at = (h / group) * d + 8 * chunk;
            let mut acc = [_mm256_setzero_ps(); 4];
            for (rows, w) in block[..fours]
                .chunks_exact(4)
                .zip(weights[..fours].chunks_exact(4))
            {
                for (u, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(w[u]), value(rows[u], at), *a);
                }
            }
            for (&row, &w) in block[fours..].iter().zip(&weights[fours..]) {
                acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(w), value(row, at), acc[0]);
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            add_to(h, chunk, sum);
        }
    }
}

/// Lane `p` of the result: the sum of the 8 lanes of `v[p]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn lane_sums(v: [std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // Within each 128-bit half: [v0 v1 v2 v3] sums of that half's 4 lanes, then the same
    // for v4..v8; the halves added last.
    let h01 = _mm256_hadd_ps(v[0], v[1]);
    let h23 = _mm256_hadd_ps(v[2], v[3]);
    let h45 = _mm256_hadd_ps(v[4], v[5]);
    let h67 = _mm256_hadd_ps(v[6], v[7]);
    let lo = _mm256_hadd_ps(h01, h23);
    let hi = _mm256_hadd_ps(h45, h67);
    // lo = [v0..v3 low halves | v0..v3 high halves], hi the same for v4..v7.
    let low = _mm256_permute2f128_ps(lo, hi, 0x20);
    let high = _mm256_permute2f128_ps(lo, hi, 0x31);
    _mm256_add_ps(low, high)
}

/// The largest of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn horizontal_max(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    _mm_cvtss_f32(m)
}

/// The sum of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn horizontal_sum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// `cap * tanh(s / cap)` of 8 scores, as the generated kernels compute it: the division a
/// multiplication by the reciprocal, `tanh` as [`emit::tanh`](super::emit::tanh).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn soft_cap8(s: std::arch::x86_64::__m256, cap: f32) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_mul_ps(s, _mm256_set1_ps(1.0 / cap));
    let z = _mm256_mul_ps(x, x);
    let mut p = _mm256_set1_ps(TANH_POLY[0]);
    for &c in &TANH_POLY[1..] {
        p = _mm256_fmadd_ps(p, z, _mm256_set1_ps(c));
    }
    let near = _mm256_fmadd_ps(_mm256_mul_ps(x, z), p, x);
    let (one, two) = (_mm256_set1_ps(1.0), _mm256_set1_ps(2.0));
    let e = exp8(_mm256_mul_ps(x, two));
    let far = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)));
    let magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
    let small = _mm256_cmp_ps::<_CMP_LT_OQ>(magnitude, _mm256_set1_ps(TANH_SMALL));
    _mm256_mul_ps(_mm256_blendv_ps(far, near, small), _mm256_set1_ps(cap))
}

/// `exp` of 8 lanes: the generated kernels' range reduction and polynomial
/// ([`emit::exp`](super::emit::exp)), 8 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let [lo, hi] = EXP_RANGE;
    // The clamp's operands in this order keep a NaN (`maxps`/`minps` return the second
    // operand when either is NaN), as the generated kernels' `exp` does.
    let x = _mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), x));
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(EXP_LN2[0]), x);
    let r = _mm256_fmadd_ps(n, _mm256_set1_ps(EXP_LN2[1]), r);
    let mut y = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let y = _mm256_fmadd_ps(y, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    // 2^n from the exponent bits.
    let bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row kernel takes whole groups of up to 8 heads of a multiple of 8, with head
    /// counts its 16-bit shape fields hold.
    #[test]
    fn shapes_the_row_kernel_takes() {
        assert!(fits(8, 4, 8));
        assert!(fits(16, 2, 256));
        assert!(!fits(9, 4, 8), "a partial group");
        assert!(!fits(8, 4, 12), "heads of 12");
        assert!(!fits(8, 4, 264), "heads over 256");
        assert!(!fits(36, 4, 8), "groups of 9");
        assert!(!fits(1 << 16, 1 << 16, 8), "more heads than 16 bits hold");
        assert!(!fits(8, 0, 8));
    }

    /// f16, bf16 and every block format's rows (heads of 64; of 256 for the K-quants, whose
    /// blocks are 256 values) give the bits the same values give as f32 rows: widening (or
    /// decoding) on load is exact, and the arithmetic is the same.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn narrow_rows_attend_as_their_f32_values() {
        use llm_ir::{
            dtype::DType,
            interp::KvValues,
            types::{KvStorage, QuantFormat},
        };
        if !super::super::ukernel::available() {
            return;
        }
        let (heads, kv, n) = (4usize, 2usize, 70usize);
        let wave =
            |len: usize, f: f32| -> Vec<f32> { (0..len).map(|i| (i as f32 * f).sin()).collect() };
        let run = |d: usize, k: &KvValues, v: &KvValues| {
            let q = wave(heads * d, 0.37);
            // Rows in a shuffled order, as block tables give them.
            let offsets: Vec<i64> = (0..n)
                .map(|j| (4 * ((j * 7) % n) * kv * d) as i64)
                .collect();
            let mut out = vec![0f32; heads * d];
            // SAFETY: every offset's row lies inside k and v; the shape fits.
            unsafe {
                attention_row(
                    q.as_ptr(),
                    k.bytes().as_ptr(),
                    v.bytes().as_ptr(),
                    offsets.as_ptr(),
                    n as i64,
                    out.as_mut_ptr(),
                    shape_word(k.element(), heads, kv, d),
                    0.25f32.to_bits() as i64,
                    0,
                    std::ptr::null(),
                );
            }
            out
        };
        let f32_storage = KvStorage::Float(DType::F32);
        let quantized = KvStorage::Quantized;
        for (storage, d) in [
            (KvStorage::Float(DType::F16), 64),
            (KvStorage::Float(DType::BF16), 64),
            (quantized(QuantFormat::Q8_0), 64),
            (quantized(QuantFormat::Q4_0), 64),
            (quantized(QuantFormat::Q4_1), 64),
            (quantized(QuantFormat::Q4K), 256),
            (quantized(QuantFormat::Q6K), 256),
            (quantized(QuantFormat::Q2K), 256),
        ] {
            let stored = |f: f32| KvValues::from_f32(&storage, &wave(n * kv * d, f));
            let (k, v) = (stored(0.71), stored(0.29));
            let wide = |x: &KvValues| KvValues::from_f32(&f32_storage, &x.floats());
            assert_eq!(run(d, &k, &v), run(d, &wide(&k), &wide(&v)), "{storage}");
        }
    }
}
