//! WGSL helpers that make a shader compute as the host does, bit for bit, where the result
//! must be the reference's: the quantizers (a quantized KV cache stores what the host
//! would, and a K-quant's scale search compares errors that differ in their last bits).
//!
//! Three freedoms of a GPU's shader compiler break that, and none shows on lavapipe (an
//! LLVM CPU backend, whose arithmetic is IEEE 754's), all on an NVIDIA H100: it may
//! contract `a * b + c` into one fused multiply-add, which rounds once instead of twice;
//! it may reorder operations and turn a strict comparison into `min` or `max` (a scale
//! search's candidates one ulp apart came out the other way, and the minimum of `+0` and
//! `-0` became `-0`); and its division and square root need not be correctly rounded
//! (Vulkan allows 2.5 and 3 ulps: a q4_k cache got other codes than the host's).
//! [`EXACT`] keeps every intermediate apart and the comparisons strict;
//! [`CORRECTLY_ROUNDED`] divides and takes roots in integer arithmetic. (A correction of
//! the device's quotient by its remainder would need a fused `fma`, and lavapipe's is not.)

/// `exact(v)`: `v` through an opaque bit operation (`p.zero` is 0 at run time, a parameter
/// the shader must have), so that no compiler fuses the product `v` into the addition that
/// follows or reassociates the operations around it: every product and sum that feeds
/// another is rounded on its own, in the reference's order (`a * b * c` is written
/// `exact(exact(a * b) * c)`). And `lower(m, v)` and `higher(m, v)`, the reference's strict
/// comparisons (`if (v < m) m = v;`): the first of equal values (`+0`, `-0`) stays, where a
/// compiler that turned the comparison into `min` or `max` would pick either zero.
pub(super) const EXACT: &str =
    "fn exact(v: f32) -> f32 { return bitcast<f32>(bitcast<u32>(v) | p.zero); }
fn lower(m: f32, v: f32) -> f32 { return select(m, exact(v), v < m); }
fn higher(m: f32, v: f32) -> f32 { return select(m, exact(v), v > m); }
";

/// `div_rn(a, b)` and `sqrt_rn(x)`: `a / b` and `sqrt(x)` rounded to nearest, ties to even,
/// as IEEE 754 (and so the host) computes them: the significands' quotient by long
/// division and root digit by digit, in `u32`s, to a guard bit and a sticky remainder.
/// Zero, subnormal, infinite and NaN operands (a negative one for the root), and results
/// that would overflow or be subnormal, take the device's `/` and `sqrt` (which may flush
/// subnormals anyway).
pub(super) const CORRECTLY_ROUNDED: &str =
    "// A 25-bit significand m (24 bits and a guard bit) rounded to 24, ties to even (sticky:
// whether anything below the guard bit was nonzero), at biased exponent e: the float, or
// fallback when it would be subnormal or overflow.
fn rounded_float(sign: u32, m25: u32, sticky: bool, e0: i32, fallback: f32) -> f32 {
    var m = m25 >> 1u;
    if ((m25 & 1u) == 1u && (sticky || (m & 1u) == 1u)) { m = m + 1u; }
    var e = e0;
    if (m == 0x1000000u) { m = m >> 1u; e = e + 1; }
    if (e <= 0 || e >= 255) { return fallback; }
    return bitcast<f32>(sign | (u32(e) << 23u) | (m & 0x7fffffu));
}
fn div_rn(a: f32, b: f32) -> f32 {
    let ua = bitcast<u32>(a);
    let ub = bitcast<u32>(b);
    let ea = i32((ua >> 23u) & 0xffu);
    let eb = i32((ub >> 23u) & 0xffu);
    if (ea == 0 || ea == 255 || eb == 0 || eb == 255) { return a / b; }
    let mb = (ub & 0x7fffffu) | 0x800000u;
    var r = (ua & 0x7fffffu) | 0x800000u;
    // The quotient of the significands lies in (1/2, 2): from r in [mb, 2 mb) its first
    // bit is 1.
    var e = ea - eb + 127;
    if (r < mb) { r = r << 1u; e = e - 1; }
    var m = 0u;
    for (var i = 0; i < 25; i = i + 1) {
        m = m << 1u;
        if (r >= mb) { r = r - mb; m = m | 1u; }
        r = r << 1u;
    }
    return rounded_float((ua ^ ub) & 0x80000000u, m, r != 0u, e, a / b);
}
fn sqrt_rn(x: f32) -> f32 {
    let u = bitcast<u32>(x);
    // With the sign bit: a negative x is above 255 too.
    let ex = i32(u >> 23u);
    if (ex == 0 || ex >= 255) { return sqrt(x); }
    // x = m 2^(ex - 150); the radicand n = m 2^s (s = 26 or 25, making ex - 150 - s even)
    // has 49 or 50 bits, so that its root has 25.
    let m = (u & 0x7fffffu) | 0x800000u;
    let s = select(26, 25, ((ex - 150) & 1) != 0);
    var root = 0u;
    var rem = 0u;
    for (var j = 48; j >= 0; j = j - 2) {
        // The radicand's bits j + 1 and j.
        var pair = 0u;
        if (j + 1 >= s) { pair = pair | (((m >> u32(j + 1 - s)) & 1u) << 1u); }
        if (j >= s) { pair = pair | ((m >> u32(j - s)) & 1u); }
        rem = (rem << 2u) | pair;
        let trial = (root << 2u) | 1u;
        root = root << 1u;
        if (rem >= trial) { rem = rem - trial; root = root | 1u; }
    }
    return rounded_float(0u, root, rem != 0u, 151 + (ex - 150 - s) / 2, sqrt(x));
}
";

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::CORRECTLY_ROUNDED;
    use crate::gpu::{Gpu, GpuOptions, test_device};

    /// For each pair `(a, b)`: `div_rn(a, b)` and `sqrt_rn(a)`.
    fn shader() -> String {
        format!(
            "@group(0) @binding(0) var<storage, read> pairs: array<vec2<f32>>;
@group(0) @binding(1) var<storage, read_write> out: array<vec2<f32>>;
{CORRECTLY_ROUNDED}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {{
    let i = id.x;
    if (i >= arrayLength(&pairs)) {{ return; }}
    out[i] = vec2<f32>(div_rn(pairs[i].x, pairs[i].y), sqrt_rn(pairs[i].x));
}}
"
        )
    }

    fn gpu() -> Option<&'static Gpu> {
        static GPU: std::sync::OnceLock<Option<Gpu>> = std::sync::OnceLock::new();
        GPU.get_or_init(|| test_device(&GpuOptions::default()))
            .as_ref()
    }

    /// The shader's `(quotient, root)` for each pair.
    fn run(gpu: &Gpu, pairs: &[(f32, f32)]) -> Vec<(f32, f32)> {
        let pipeline = gpu.compile("correctly rounded", &shader()).unwrap();
        let flat: Vec<f32> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
        let input = gpu.upload("pairs", bytemuck::cast_slice(&flat));
        let bytes = (flat.len() * 4) as u64;
        let output = gpu.storage("results", bytes);
        let group = gpu.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: input.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: output.as_entire_binding(),
                },
            ],
        });
        let mut encoder = gpu.device().create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(pairs.len().div_ceil(64) as u32, 1, 1);
        }
        let read = gpu.submit_and_read(encoder, &[(&output, bytes)]).unwrap();
        bytemuck::cast_slice::<u8, f32>(&read[0])
            .chunks(2)
            .map(|r| (r[0], r[1]))
            .collect()
    }

    /// Whether two results are the same float (any NaN equals any NaN).
    fn same(got: f32, want: f32) -> bool {
        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan())
    }

    /// The shader's results for `pairs` against the host's `a / b` and `a.sqrt()`.
    fn check(gpu: &Gpu, pairs: &[(f32, f32)]) -> Result<(), String> {
        for (&(a, b), (quotient, root)) in pairs.iter().zip(run(gpu, pairs)) {
            if !same(quotient, a / b) {
                return Err(format!("{a:e} / {b:e}: {quotient:e}, not {:e}", a / b));
            }
            if !same(root, a.sqrt()) {
                return Err(format!("sqrt({a:e}): {root:e}, not {:e}", a.sqrt()));
            }
        }
        Ok(())
    }

    /// A normal float of either sign, whose quotients stay normal.
    fn operand() -> impl Strategy<Value = f32> {
        (any::<bool>(), -60i32..60, 0u32..(1 << 23)).prop_map(|(negative, exponent, mantissa)| {
            let v = f32::from_bits((((exponent + 127) as u32) << 23) | mantissa);
            if negative { -v } else { v }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// Quotients and roots of random significands and exponents are IEEE 754's.
        #[test]
        fn quotients_and_roots_are_correctly_rounded(
            pairs in prop::collection::vec((operand(), operand()), 1..1024),
        ) {
            let Some(gpu) = gpu() else { return Ok(()) };
            check(gpu, &pairs).map_err(TestCaseError::fail)?;
        }
    }

    /// Significands at the ends (a rounding that carries into the exponent, exact
    /// quotients and squares), a quantizer's constants, and the values that take the
    /// device's operations: zeros, infinities, NaNs, negative roots.
    #[test]
    fn edge_values_are_the_hosts() {
        let Some(gpu) = gpu() else { return };
        let below_one = f32::from_bits(1.0f32.to_bits() - 1);
        let pairs = [
            (1.0, below_one),
            (below_one, 1.0),
            (below_one, below_one),
            (f32::MAX / 4.0, 2.0),
            (3.0, 1.5),
            (9.0, 3.0),
            (2.0, 3.0),
            (0.75, 127.0),
            (1.0, 0.1),
            (-7.5, 15.0),
            (0.0, 3.0),
            (-0.0, 3.0),
            (1.0, 0.0),
            (f32::INFINITY, 2.0),
            (2.0, f32::INFINITY),
            (f32::NAN, 1.0),
            (-4.0, 2.0),
        ];
        check(gpu, &pairs).unwrap();
    }
}
