//! GGUF's 4-bit float formats, MXFP4 and NVFP4: values that are four-bit floats (E2M1:
//! a sign, two exponent bits and one mantissa bit, so 0, 0.5, 1, 1.5, 2, 3, 4 or 6 either
//! way) times a block scale, dequantized exactly as ggml's `dequantize_row_mxfp4` and
//! `dequantize_row_nvfp4` and quantized as its reference quantizers.
//!
//! ggml stores E2M1 doubled, as the integers of [`FP4_LEVELS`] that a value's nibble
//! indexes, and halves each scale to match:
//!
//! - `mxfp4` (OCP microscaling; 17 bytes for 32 values, 4.25 bits a value): an E8M0 byte
//!   `e`, a scale of `2^(e - 127)` ([`e8m0_half`] gives half of it), then 16 bytes of
//!   nibbles, value `j` in the low nibble of byte `j % 16` for `j < 16` and the high one
//!   for the rest. The quantizer takes `e = floor(log2(max |x|)) + 125`, a scale of
//!   `2^(E - 2)` for the largest magnitude's binary exponent `E`, whose largest level
//!   (6 = 12 / 2, so `1.5 * 2^E`) can stop short of the largest magnitude by up to a
//!   quarter of it (`log2` is the platform's `log2f`, as ggml's: near a power of two a
//!   libm that rounds otherwise could pick the neighbouring exponent).
//! - `nvfp4` (36 bytes for 64 values, 4.5 bits a value): four UE4M3 bytes (an unsigned
//!   8-bit float, four exponent bits of bias 7 and three mantissa bits; [`ue4m3_half`]
//!   gives half of it, `0x7F` reading as 0), the scales of the block's four sub-blocks of
//!   16, then 8 bytes of nibbles a sub-block, value `j` in the low nibble of its byte
//!   `j % 8` for `j < 8` and the high one for the rest. The quantizer takes each
//!   sub-block's largest magnitude over 6 rounded to UE4M3 ([`ue4m3_of`]).
//!
//! Both quantizers give each value the level nearest it under the scale (the first of
//! equally near levels, in [`FP4_LEVELS`]' order).

/// The 16 levels of E2M1, doubled: nibble `q` stands for `FP4_LEVELS[q]` times half the
/// block scale (ggml's `kvalues_mxfp4`).
pub const FP4_LEVELS: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Bytes of an MXFP4 block.
pub const MXFP4_BYTES: usize = 17;
/// Bytes of an NVFP4 block.
pub const NVFP4_BYTES: usize = 36;
/// Where an NVFP4 block's nibbles start, after its four scale bytes.
pub const NVFP4_CODES_AT: usize = 4;

/// Half the scale `2^(e - 127)` of the E8M0 byte `e` (subnormal for `e` below 2; ggml's
/// `ggml_e8m0_to_fp32_half`).
pub fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        u32::from(e - 1) << 23
    };
    f32::from_bits(bits)
}

/// Half the value of the UE4M3 byte `x` (ggml's `ggml_ue4m3_to_fp32`): its top bit
/// ignored, `(1 + m / 8) * 2^(e - 7)` of exponent `e` (bits 3..7) and mantissa `m`
/// (bits 0..3), `m * 2^-9` for `e = 0`, and 0 for `0x7F`.
pub fn ue4m3_half(x: u8) -> f32 {
    if x == 0x7F {
        return 0.0;
    }
    let (exp, man) = (i32::from(x >> 3 & 0xF), f32::from(x & 7));
    let raw = if exp == 0 {
        man * 2f32.powi(-9)
    } else {
        (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    };
    raw * 0.5
}

/// The UE4M3 byte of the positive `x` (ggml's `ggml_fp32_to_ue4m3`): 0 for `x` not above
/// zero, the largest finite `0x7E` from 448 up, and otherwise the top three mantissa bits
/// rounded half up (subnormals: `x * 512 + 0.5` truncated, at most 7).
pub fn ue4m3_of(x: f32) -> u8 {
    // Not above zero, NaN included.
    if x.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return 0;
    }
    let x = x.min(448.0);
    let bits = x.to_bits();
    let mut exp = (bits >> 23 & 0xFF) as i32 - 127 + 7;
    if exp <= 0 {
        let man = ((x * 512.0 + 0.5) as i32).min(7);
        return if man < 1 { 0 } else { man as u8 };
    }
    let mut man = (bits >> 20 & 7) + (bits >> 19 & 1);
    if man > 7 {
        man = 0;
        exp += 1;
    }
    if exp >= 15 {
        return 0x7E;
    }
    (exp as u8) << 3 | man as u8
}

/// The index of the level nearest `x` under half-scale `d` (the first of equals).
fn nearest_level(x: f32, d: f32) -> u8 {
    let mut best = (0, (f32::from(FP4_LEVELS[0]) * d - x).abs());
    for (i, &level) in FP4_LEVELS.iter().enumerate().skip(1) {
        let err = (f32::from(level) * d - x).abs();
        if err < best.1 {
            best = (i as u8, err);
        }
    }
    best.0
}

/// The largest magnitude of `x` (NaNs passed over, as ggml's `amax < |v|` does).
fn largest_magnitude(x: &[f32]) -> f32 {
    x.iter()
        .fold(0.0, |amax, v| if amax < v.abs() { v.abs() } else { amax })
}

/// The nibble bytes of `x` (an even count) under half-scale `d`: value `j` in the low
/// nibble of byte `j` for the first half, the high nibble of byte `j - len / 2` for the
/// second.
fn nibble_bytes(x: &[f32], d: f32) -> impl Iterator<Item = u8> + '_ {
    let (low, high) = x.split_at(x.len() / 2);
    low.iter()
        .zip(high)
        .map(move |(&a, &b)| nearest_level(a, d) | nearest_level(b, d) << 4)
}

/// Appends the values of `nibbles` (value `j` in the low nibble of byte `j`, then the
/// high nibbles) under half-scale `d` to `out`.
fn push_levels(nibbles: &[u8], d: f32, out: &mut Vec<f32>) {
    for shift in [0, 4] {
        out.extend(
            nibbles
                .iter()
                .map(|&b| f32::from(FP4_LEVELS[usize::from(b >> shift & 0xF)]) * d),
        );
    }
}

/// Appends the 32 values of the MXFP4 block `b` to `out`.
pub fn dequantize_mxfp4(b: &[u8], out: &mut Vec<f32>) {
    push_levels(&b[1..MXFP4_BYTES], e8m0_half(b[0]), out);
}

/// Appends the 64 values of the NVFP4 block `b` to `out`.
pub fn dequantize_nvfp4(b: &[u8], out: &mut Vec<f32>) {
    for (s, nibbles) in b[NVFP4_CODES_AT..NVFP4_BYTES].chunks(8).enumerate() {
        push_levels(nibbles, ue4m3_half(b[s]), out);
    }
}

/// Quantizes 32 values into an MXFP4 block.
pub fn quantize_mxfp4(x: &[f32]) -> Vec<u8> {
    let amax = largest_magnitude(x);
    // `as` saturates: an infinite largest magnitude takes the largest exponent.
    let e = if amax > 0.0 {
        (amax.log2().floor() - 2.0 + 127.0) as u8
    } else {
        0
    };
    let mut out = vec![e];
    out.extend(nibble_bytes(x, e8m0_half(e)));
    out
}

/// Quantizes 64 values into an NVFP4 block.
pub fn quantize_nvfp4(x: &[f32]) -> Vec<u8> {
    let scales: Vec<u8> = x
        .chunks(16)
        .map(|sub| ue4m3_of(largest_magnitude(sub) / 6.0))
        .collect();
    let mut out = scales.clone();
    for (sub, &scale) in x.chunks(16).zip(&scales) {
        out.extend(nibble_bytes(sub, ue4m3_half(scale)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every UE4M3 byte the encoder writes (exponents up to 14, and `0x7E` for 448 and
    /// beyond) is the encoding of its own value (twice what [`ue4m3_half`] gives).
    #[test]
    fn ue4m3_bytes_round_trip() {
        for x in (1..=0x77u8).chain([0x7E]) {
            assert_eq!(ue4m3_of(2.0 * ue4m3_half(x)), x, "{x:#x}");
        }
        assert_eq!(2.0 * ue4m3_half(0x7E), 448.0);
        assert_eq!(ue4m3_half(0x7F), 0.0);
        assert_eq!(ue4m3_half(0x80 | 0x38), ue4m3_half(0x38));
        assert_eq!(ue4m3_half(0x38), 0.5);
        assert_eq!(ue4m3_of(1e9), 0x7E);
        assert_eq!(ue4m3_of(-1.0), 0);
        assert_eq!(ue4m3_of(f32::NAN), 0);
    }

    /// The encoder rounds half up on the fourth mantissa bit (as ggml's does, not to even),
    /// carries into the exponent, saturates at `0x7E` from exponent 15 on, and rounds
    /// subnormals (below 2^-6) by `x * 512 + 0.5` truncated, at most 7.
    #[test]
    fn ue4m3_rounds_as_ggml() {
        for (x, byte) in [
            (1.0625, 0x39),      // halfway between 1 and 1.125: up, not to even
            (1.0624, 0x38),      // below halfway
            (1.1875, 0x3A),      // halfway between 1.125 and 1.25: up
            (1.9375, 0x40),      // the mantissa carries into the exponent
            (240.0, 0x77),       // the largest of exponent 14
            (247.9, 0x77),       // below halfway to 256
            (248.0, 0x7E),       // halfway: up into exponent 15, saturated
            (0.99 / 64.0, 0x07), // just below 2^-6: 8.42 truncated, at most 7
            (0.001, 0x01),       // 1.012 truncated
            (0.0009, 0x00),      // 0.96 truncated: zero
            (1.0 / 64.0, 0x08),  // 2^-6, the smallest normal
        ] {
            assert_eq!(ue4m3_of(x), byte, "{x}");
        }
    }

    /// E8M0 scales are the powers of two `2^(e - 128)`, subnormal ones included.
    #[test]
    fn e8m0_scales_are_powers_of_two() {
        for e in 0..=255u8 {
            assert_eq!(e8m0_half(e), 2f64.powi(i32::from(e) - 128) as f32, "{e}");
        }
    }
}
