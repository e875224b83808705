//! GGUF's ternary formats, TQ1_0 and TQ2_0 (the weights of ternary models such as TriLM
//! and BitNet b1.58): super-blocks of 256 values `d * t` of an f16 scale `d` and trits
//! `t` in {-1, 0, 1}, dequantized exactly as ggml's `dequantize_row_tq1_0` and
//! `dequantize_row_tq2_0` and quantized as its reference quantizers (`d` the largest
//! magnitude, each trit `x / d` rounded to nearest, ties away from zero).
//!
//! - `tq2_0` (66 bytes, 2.06 bits a value): 64 bytes of 2-bit codes `t + 1`, then `d`.
//!   Value `v` is bit pair `(v % 128) / 32` of byte `32 (v / 128) + v % 32`. The code 3
//!   (which the quantizer never writes) decodes as 2, as ggml's does.
//! - `tq1_0` (54 bytes, 1.69 bits a value): 48 bytes of five trits each, 4 bytes of four,
//!   then `d`. A byte holds its trits as a fraction of 243 (`3^5`): the base-3 number of
//!   its trits plus one (`t + 1` in 0..3, the first trit most significant) times 256 / 243,
//!   rounded up, so that trit `n` is the top of `(byte * 3^n) mod 256` read in base 3:
//!   `(((byte * 3^n) mod 256) * 3) >> 8`. The values come in three [`TQ1_0_SECTIONS`]:
//!   the first 160 from bytes 0..32 (value `32 n + m` is trit `n` of byte `m`), the next
//!   80 from bytes 32..48 (`160 + 16 n + m`, trit `n` of byte `32 + m`), the last 16 from
//!   bytes 48..52 (`240 + 4 n + m`, trit `n` of byte `48 + m`, a fifth trit 0 below them).
//!
//! Beside them, the binary Q1_0 (the weights of 1-bit models): blocks of 128 values `±d`,
//! an f16 `d` then 16 bytes of sign bits (value `j` is `d` where bit `j % 8` of byte
//! `2 + j / 8` is set, `-d` where it is clear), dequantized as ggml's `dequantize_row_q1_0`
//! and quantized as its reference (`d` the mean magnitude, summed in order; the bit set for
//! `x >= 0`, so for `-0` too and for no NaN).

use super::quant::f16_at;

/// Bytes of a Q1_0 block.
pub const Q1_0_BYTES: usize = 18;

/// Bytes of a TQ1_0 super-block.
pub const TQ1_0_BYTES: usize = 54;
/// Bytes of a TQ2_0 super-block.
pub const TQ2_0_BYTES: usize = 66;
/// Where a TQ1_0 super-block's f16 `d` is.
pub const TQ1_0_D_AT: usize = 52;
/// Where a TQ2_0 super-block's f16 `d` is.
pub const TQ2_0_D_AT: usize = 64;

/// A run of TQ1_0 bytes that hold consecutive values trit by trit: value
/// `first + width * n + m` is trit `n` (of `trits`) of byte `at + m`, for `m` below
/// `width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TritSection {
    /// The section's first value in the super-block.
    pub first: usize,
    /// Its first byte.
    pub at: usize,
    /// Its bytes (values per trit).
    pub width: usize,
    /// Trits each byte holds (the values are `width * trits`).
    pub trits: usize,
}

/// The three sections of a TQ1_0 super-block, in value order.
pub const TQ1_0_SECTIONS: [TritSection; 3] = [
    TritSection {
        first: 0,
        at: 0,
        width: 32,
        trits: 5,
    },
    TritSection {
        first: 160,
        at: 32,
        width: 16,
        trits: 5,
    },
    TritSection {
        first: 240,
        at: 48,
        width: 4,
        trits: 4,
    },
];

/// Powers of three: trit `n` of a TQ1_0 byte is read after multiplying it by `POW3[n]`.
pub const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// Trit `n` of the TQ1_0 byte `byte`, plus one (0, 1 or 2).
pub fn tq1_0_code(byte: u8, n: usize) -> u8 {
    let shifted = byte.wrapping_mul(POW3[n]);
    ((u16::from(shifted) * 3) >> 8) as u8
}

/// Appends the 256 values of the TQ1_0 super-block `b` to `out`.
pub fn dequantize_tq1_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, TQ1_0_D_AT);
    for s in TQ1_0_SECTIONS {
        for n in 0..s.trits {
            out.extend(
                b[s.at..s.at + s.width]
                    .iter()
                    .map(|&byte| d * f32::from(tq1_0_code(byte, n) as i8 - 1)),
            );
        }
    }
}

/// Appends the 256 values of the TQ2_0 super-block `b` to `out`.
pub fn dequantize_tq2_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, TQ2_0_D_AT);
    for half in b[..64].chunks(32) {
        for l in 0..4 {
            out.extend(
                half.iter()
                    .map(|&byte| d * f32::from(((byte >> (2 * l)) & 3) as i8 - 1)),
            );
        }
    }
}

/// The largest magnitude of `x` as the scale (taken as ggml's `MAX(amax, |v|)` takes it: a
/// NaN replaces it, and the next value replaces the NaN), and each value's trit plus one.
fn codes(x: &[f32]) -> (f32, Vec<u8>) {
    let d = x
        .iter()
        .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    // `x / d` lies in [-1, 1], but where `d` is subnormal `1 / d` is infinite, and where it
    // is NaN so are the products: clamped (NaN to 0), as ggml's `lroundf` leaves undefined.
    let codes = x
        .iter()
        .map(|&v| ((v * id).round().clamp(-1.0, 1.0) as i8 + 1) as u8)
        .collect();
    (d, codes)
}

/// Quantizes 256 values into a TQ1_0 super-block.
pub fn quantize_tq1_0(x: &[f32]) -> Vec<u8> {
    let (d, codes) = codes(x);
    let mut out = vec![0u8; TQ1_0_BYTES];
    for s in TQ1_0_SECTIONS {
        for m in 0..s.width {
            // The trits as a base-3 number of five digits, the first most significant
            // (a fifth trit 0 where the byte holds four).
            let q = (0..5).fold(0u16, |q, n| {
                let t = if n < s.trits {
                    codes[s.first + s.width * n + m]
                } else {
                    0
                };
                3 * q + u16::from(t)
            });
            out[s.at + m] = ((q * 256).div_ceil(243)) as u8;
        }
    }
    out[TQ1_0_D_AT..].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
    out
}

/// Quantizes 256 values into a TQ2_0 super-block.
pub fn quantize_tq2_0(x: &[f32]) -> Vec<u8> {
    let (d, codes) = codes(x);
    let mut out = vec![0u8; TQ2_0_BYTES];
    for (v, &c) in codes.iter().enumerate() {
        out[32 * (v / 128) + v % 32] |= c << (2 * ((v % 128) / 32));
    }
    out[TQ2_0_D_AT..].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
    out
}

/// Appends the 128 values of the Q1_0 block `b` to `out`.
pub fn dequantize_q1_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    out.extend((0..128).map(|j| {
        if b[2 + j / 8] >> (j % 8) & 1 == 1 {
            d
        } else {
            -d
        }
    }));
}

/// Quantizes 128 values into a Q1_0 block.
pub fn quantize_q1_0(x: &[f32]) -> Vec<u8> {
    let d = x.iter().fold(0.0f32, |sum, v| sum + v.abs()) / x.len() as f32;
    let mut out = half::f16::from_f32(d).to_le_bytes().to_vec();
    out.extend(x.chunks(8).map(|eight| {
        (eight.iter().enumerate()).fold(0u8, |byte, (j, &v)| byte | u8::from(v >= 0.0) << j)
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every base-3 number of five digits survives the byte encoding.
    #[test]
    fn every_five_trits_round_trip_through_a_byte() {
        for q in 0..243u16 {
            let byte = ((q * 256).div_ceil(243)) as u8;
            let digits: Vec<u16> = (0..5).map(|n| q / 3u16.pow(4 - n) % 3).collect();
            let read: Vec<u16> = (0..5).map(|n| u16::from(tq1_0_code(byte, n))).collect();
            assert_eq!(read, digits, "{q}");
        }
    }

    /// The sections cover the 256 values and the 52 code bytes once each.
    #[test]
    fn the_sections_tile_the_super_block() {
        let mut next = (0, 0);
        for s in TQ1_0_SECTIONS {
            assert_eq!((s.first, s.at), next);
            next = (s.first + s.width * s.trits, s.at + s.width);
        }
        assert_eq!(next, (256, TQ1_0_D_AT));
    }
}
