//! RoPE scalings beyond a linear one, as the loaders read them from GGUF metadata and
//! Hugging Face configs: Llama 3's, YaRN's and LongRoPE's. Each comes down to a factor
//! that divides each pair's frequency (the weight [`ROPE_FREQS`], `llm.rope`'s
//! `freq_factors`) and a magnitude that scales the rotated features
//! ([`ModelConfig::rope_mscale`](crate::model::ModelConfig::rope_mscale), `llm.rope`'s
//! `mscale`), computed here once at load in `f64`.

use std::f64::consts::PI;

use llm_ir::{
    dtype::DType,
    interp::{Tensor, Value},
};

use crate::{model::ROPE_FREQS, weights::Weights};

/// The names of LongRoPE's two factor sets in a GGUF file (Phi-3's long-context models):
/// the long one, then the short one ([`longrope_uses_long`] picks).
pub(crate) const LONGROPE_FACTORS: [&str; 2] =
    ["rope_factors_long.weight", "rope_factors_short.weight"];

/// A RoPE's scaling: what the builder's `llm.rope` takes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RopeScaling {
    /// Positions are divided by it (linear scaling; 1 for none).
    pub linear: f64,
    /// Each pair's frequency is divided by its factor (none when `None`).
    pub factors: Option<Vec<f32>>,
    /// The rotated features are scaled by it (1 for none).
    pub mscale: f64,
}

impl RopeScaling {
    /// No scaling.
    pub const NONE: RopeScaling = RopeScaling {
        linear: 1.0,
        factors: None,
        mscale: 1.0,
    };

    /// Sets the frequency factors as the weight [`ROPE_FREQS`] of `weights`, times the
    /// factors already there (a GGUF file's `rope_freqs.weight`, which ggml divides the
    /// frequencies by before YaRN's blend scales them): whether the model now has any.
    ///
    /// # Errors
    ///
    /// If the weight there is not one `f32` factor a pair.
    pub fn add_factors(&self, weights: &mut Weights) -> Result<bool, String> {
        let Some(factors) = &self.factors else {
            return Ok(weights.weight_shape(ROPE_FREQS).is_some());
        };
        let mut factors = factors.clone();
        if let Some(stored) = weights.remove(ROPE_FREQS) {
            let stored = pair_factors(&stored, ROPE_FREQS, factors.len())?;
            for (f, s) in factors.iter_mut().zip(stored) {
                *f *= s;
            }
        }
        set_factors(weights, factors);
        Ok(true)
    }
}

/// Makes `factors` the frequency factors of the model of `weights`, the weight
/// [`ROPE_FREQS`].
pub(crate) fn set_factors(weights: &mut Weights, factors: Vec<f32>) {
    let shape = vec![factors.len()];
    weights.insert(
        ROPE_FREQS,
        Value::Tensor(Tensor::from_f32(shape, DType::F32, factors)),
    );
}

/// The values of weight `name`, `value`, as the frequency factors of `pairs` rotated pairs
/// ([`checked_factors`]).
///
/// # Errors
///
/// If it is not a vector of `pairs` positive, finite values.
pub(crate) fn pair_factors(value: &Value, name: &str, pairs: usize) -> Result<Vec<f32>, String> {
    let values = match value {
        Value::Tensor(t) if t.shape.len() == 1 => t.floats()?.to_vec(),
        _ => Vec::new(),
    };
    checked_factors(values, &format!("weight `{name}`"), pairs)
}

/// `values` (`what`, for errors) as the frequency factors of `pairs` rotated pairs: one a
/// pair, each positive and finite (a factor of 0 or NaN would make every angle of its
/// pair infinite or NaN).
///
/// # Errors
///
/// If there are not `pairs` of them, or one is not a positive, finite number.
pub(crate) fn checked_factors(
    values: Vec<f32>,
    what: &str,
    pairs: usize,
) -> Result<Vec<f32>, String> {
    if values.len() == pairs && values.iter().all(|v| v.is_finite() && *v > 0.0) {
        Ok(values)
    } else {
        Err(format!(
            "{what} is not {pairs} positive numbers, one a rotated pair"
        ))
    }
}

/// Llama 3's RoPE scaling (`rope_type = llama3`).
pub(crate) struct Llama3Scaling {
    /// How much the low frequencies are slowed.
    pub factor: f64,
    /// Wavelengths above `original_context / low_freq_factor` are slowed by `factor`.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_context / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was first trained for.
    pub original_context: f64,
}

impl Llama3Scaling {
    /// The factor each of the `rotary / 2` frequencies of a RoPE with base `theta` is
    /// divided by: 1 for short wavelengths, `factor` for long ones, and between them the
    /// reciprocal of a blend of `1 / factor` and 1, linear in `original_context /
    /// wavelength` (Hugging Face's `_compute_llama3_parameters`, which GGUF converters
    /// store as `rope_freqs.weight`).
    pub fn factors(&self, theta: f64, rotary: usize) -> Vec<f32> {
        let long = self.original_context / self.low_freq_factor;
        let short = self.original_context / self.high_freq_factor;
        (0..rotary / 2)
            .map(|i| {
                let wavelength = 2.0 * PI / frequency(theta, rotary, i);
                let divisor = if wavelength < short {
                    1.0
                } else if wavelength > long {
                    self.factor
                } else {
                    let smooth = (self.original_context / wavelength - self.low_freq_factor)
                        / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                };
                divisor as f32
            })
            .collect()
    }
}

/// YaRN's RoPE scaling (NTK-by-parts interpolation, `rope_type = yarn`): pairs that turn
/// many times over the original context keep their frequency, pairs that turn less than
/// once have it divided by `factor`, and a linear ramp over the pairs between blends the
/// two; the attention factor ([`Yarn::mscale`]) then scales the rotation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Yarn {
    /// How much longer the context is than the original one.
    factor: f64,
    /// The context length the model was first trained for.
    original_context: f64,
    /// Pairs that turn at least this many times over the original context keep their
    /// frequency (32 by default).
    beta_fast: f64,
    /// Pairs that turn at most this many times are interpolated (1 by default).
    beta_slow: f64,
    /// The ramp's ends are rounded out to whole pairs (llama.cpp always does; Hugging Face
    /// unless `truncate` is false).
    truncate: bool,
}

impl Yarn {
    /// The ramp's fast end where a configuration gives none.
    pub const BETA_FAST: f64 = 32.0;
    /// The ramp's slow end where a configuration gives none.
    pub const BETA_SLOW: f64 = 1.0;

    /// YaRN stretching `original_context` positions by `factor`, its ramp between
    /// `beta_fast` and `beta_slow` ([`Yarn::BETA_FAST`] and [`Yarn::BETA_SLOW`] where not
    /// given), rounded out to whole pairs with `truncate`.
    ///
    /// # Errors
    ///
    /// If `beta_fast` does not exceed `beta_slow` (the ramp would run backwards, which
    /// ggml and Hugging Face compute differently).
    pub fn new(
        factor: f64,
        original_context: f64,
        (beta_fast, beta_slow): (Option<f64>, Option<f64>),
        truncate: bool,
    ) -> Result<Yarn, String> {
        let beta_fast = beta_fast.unwrap_or(Yarn::BETA_FAST);
        let beta_slow = beta_slow.unwrap_or(Yarn::BETA_SLOW);
        if beta_fast <= beta_slow {
            return Err(format!(
                "YaRN's beta_fast ({beta_fast}) must exceed its beta_slow ({beta_slow})"
            ));
        }
        Ok(Yarn {
            factor,
            original_context,
            beta_fast,
            beta_slow,
            truncate,
        })
    }

    /// The factor each of the `rotary / 2` frequencies of a RoPE with base `theta` is
    /// divided by: `1 / (e + (1 - e) / factor)`, where `e`, the share of the original
    /// frequency, is 1 below the ramp, 0 past it and falls linearly along it (ggml's
    /// `rope_yarn` and Hugging Face's `_compute_yarn_parameters`).
    pub fn factors(&self, theta: f64, rotary: usize) -> Vec<f32> {
        let (low, high) = self.ramp(theta, rotary);
        (0..rotary / 2)
            .map(|i| {
                let ramp = ((i as f64 - low) / (high - low).max(0.001)).clamp(0.0, 1.0);
                let kept = 1.0 - ramp;
                (1.0 / (kept + (1.0 - kept) / self.factor)) as f32
            })
            .collect()
    }

    /// The pair indices the ramp runs between: where a pair turns `beta_fast` and
    /// `beta_slow` times over the original context, clamped to the rotated features.
    fn ramp(&self, theta: f64, rotary: usize) -> (f64, f64) {
        let pair = |turns: f64| {
            rotary as f64 * (self.original_context / (turns * 2.0 * PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (pair(self.beta_fast), pair(self.beta_slow));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        (low.max(0.0), high.min(rotary as f64 - 1.0))
    }

    /// YaRN's attention factor where the configuration gives none: `m(mscale) /
    /// m(mscale_all_dim)` with `m(s) = 1 + 0.1 s ln(factor)` (1 for a factor of at most
    /// 1), which is `1 + 0.1 ln(factor)` for the usual `mscale = 1` and no
    /// `mscale_all_dim` (0).
    pub fn mscale(&self, mscale: f64, mscale_all_dim: f64) -> f64 {
        let m = |s: f64| yarn_magnitude(self.factor, 0.1 * s);
        m(mscale) / m(mscale_all_dim)
    }
}

/// YaRN's magnitude at a context `factor` times the original: `1 + coefficient *
/// ln(factor)` (transformers' `yarn_get_mscale` of `mscale = 10 * coefficient`, llama.cpp's
/// `1 + yarn_log_multiplier * ln(factor)`), 1 for a factor of at most 1.
pub(crate) fn yarn_magnitude(factor: f64, coefficient: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        1.0 + coefficient * factor.ln()
    }
}

/// LongRoPE's attention factor where the configuration gives none, for a context
/// `factor` times the original context of `original_context` positions:
/// `sqrt(1 + ln(factor) / ln(original_context))` (1 for a factor of at most 1).
pub(crate) fn longrope_mscale(factor: f64, original_context: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / original_context.ln()).sqrt()
    }
}

/// Which of LongRoPE's two factor sets a model serving `context` positions uses: the
/// long ones when that is more than the original context (llama.cpp's choice by its
/// context size; Hugging Face switches by the length of each sequence instead).
pub(crate) fn longrope_uses_long(context: usize, original_context: f64) -> bool {
    context as f64 > original_context
}

/// The frequency of pair `i` of a RoPE with base `theta` over `rotary` features.
fn frequency(theta: f64, rotary: usize, i: usize) -> f64 {
    theta.powf(-((2 * i) as f64) / rotary as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen3's YaRN (factor 4 over 32,768 positions, base 1,000,000, heads of 128): the
    /// ramp runs from pair 23 to pair 40 (where pairs turn 32 and 1 times over the
    /// original context: 23.6 and 39.7, rounded out), the factors from 1 to 4 along it,
    /// and the attention factor is `1 + 0.1 ln 4`. Expected values worked out from Hugging
    /// Face's formulas.
    #[test]
    fn yarn_ramps_between_the_correction_pairs() {
        let yarn = Yarn::new(4.0, 32768.0, (None, None), true).expect("yarn");
        assert_eq!(yarn.ramp(1e6, 128), (23.0, 40.0));
        let factors = yarn.factors(1e6, 128);
        assert_eq!(factors.len(), 64);
        assert!(factors[..=23].iter().all(|&f| f == 1.0));
        assert!(factors[40..].iter().all(|&f| f == 4.0));
        // Pair 31 is 8/17 along: 1 / (9/17 + (8/17) / 4) = 17/11.
        assert!((factors[31] - 17.0 / 11.0).abs() < 1e-6, "{}", factors[31]);
        assert!(factors.windows(2).all(|w| w[0] <= w[1]));
        assert!((yarn.mscale(1.0, 0.0) - (1.0 + 0.1 * 4f64.ln())).abs() < 1e-12);
        // DeepSeek's `mscale = mscale_all_dim` cancels.
        assert_eq!(yarn.mscale(0.707, 0.707), 1.0);
        // Without truncation the ramp keeps its fractional ends.
        let exact = Yarn {
            truncate: false,
            ..yarn
        };
        let (low, high) = exact.ramp(1e6, 128);
        assert!((23.5..23.7).contains(&low) && (39.6..39.7).contains(&high));
    }

    /// LongRoPE's attention factor and choice of factors.
    #[test]
    fn longrope_scales_by_the_context_ratio() {
        // Phi-3.5-mini: 131,072 positions over 4,096.
        let m = longrope_mscale(32.0, 4096.0);
        assert!((m - (1.0 + 32f64.ln() / 4096f64.ln()).sqrt()).abs() < 1e-12);
        assert!((m - 1.190_238).abs() < 1e-6, "{m}");
        assert_eq!(longrope_mscale(1.0, 4096.0), 1.0);
        assert!(longrope_uses_long(131072, 4096.0));
        assert!(!longrope_uses_long(4096, 4096.0));
    }

    /// Factors multiply those a file already has, and a mis-shaped stored weight is an
    /// error that names it.
    #[test]
    fn factors_compose_with_stored_ones() {
        let scaling = RopeScaling {
            factors: Some(vec![1.0, 2.0]),
            ..RopeScaling::NONE
        };
        let mut weights = Weights::default();
        let stored = |v: Vec<f32>| Value::Tensor(Tensor::from_f32(vec![v.len()], DType::F32, v));
        weights.insert(ROPE_FREQS, stored(vec![3.0, 5.0]));
        assert_eq!(scaling.add_factors(&mut weights), Ok(true));
        let combined = weights.remove(ROPE_FREQS).expect("factors");
        assert_eq!(pair_factors(&combined, ROPE_FREQS, 2), Ok(vec![3.0, 10.0]));
        weights.insert(ROPE_FREQS, stored(vec![1.0; 3]));
        let err = scaling.add_factors(&mut weights).unwrap_err();
        assert!(err.contains(ROPE_FREQS), "{err}");
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            weights.insert(ROPE_FREQS, stored(vec![1.0, bad]));
            let err = scaling.add_factors(&mut weights).unwrap_err();
            assert!(err.contains("positive numbers"), "{bad}: {err}");
        }
        // A ramp that would run backwards is refused.
        let err = Yarn::new(4.0, 64.0, (Some(1.0), Some(2.0)), true).unwrap_err();
        assert!(err.contains("beta_fast"), "{err}");
        assert_eq!(
            RopeScaling::NONE.add_factors(&mut Weights::default()),
            Ok(false)
        );
    }
}
