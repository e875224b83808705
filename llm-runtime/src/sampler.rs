//! Choosing the next token: greedy, temperature, top-k and top-p sampling with a seed.
//!
//! The random number generator and the sampling procedures are llama2.c's (`run.c`), so a
//! run with the same seed, temperature and top-p picks the same tokens as run.c.

/// Sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// 0 picks the most likely token (the first on ties); otherwise logits are divided by it.
    pub temperature: f32,
    /// Nucleus sampling threshold; values outside (0, 1) disable it.
    pub top_p: f32,
    /// Keep only the `k` most likely tokens before top-p (0 disables it).
    pub top_k: usize,
    /// Seed of the random number generator.
    pub seed: u64,
}

/// llama2.c's xorshift* random number generator.
#[derive(Debug, Clone)]
pub struct XorShift {
    state: u64,
}

impl XorShift {
    /// A generator with `seed` (a zero seed stays zero forever, as in run.c).
    pub fn new(seed: u64) -> XorShift {
        XorShift { state: seed }
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The next 32 bits (run.c's `random_u32`).
    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// A float in `[0, 1)` (run.c's `random_f32`).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / 16_777_216.0
    }
}

/// A seeded sampler.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    rng: XorShift,
}

/// Index of the largest value; the first one wins on ties.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

impl Sampler {
    /// A sampler with `config`.
    pub fn new(config: SamplerConfig) -> Sampler {
        let rng = XorShift::new(config.seed);
        Sampler { config, rng }
    }

    /// Picks the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> usize {
        if self.config.temperature == 0.0 {
            return argmax(logits);
        }
        let mut probs: Vec<f32> = logits
            .iter()
            .map(|&l| l / self.config.temperature)
            .collect();
        softmax(&mut probs);
        if self.config.top_k > 0 && self.config.top_k < probs.len() {
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
            for &i in &order[self.config.top_k..] {
                probs[i] = 0.0;
            }
            let sum: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        let coin = self.rng.next_f32();
        let top_p = self.config.top_p;
        if top_p <= 0.0 || top_p >= 1.0 {
            sample_mult(&probs, coin)
        } else {
            sample_top_p(&probs, top_p, coin)
        }
    }
}

/// In-place softmax in run.c's order (max, exp and sum, divide).
pub(crate) fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

fn sample_mult(probs: &[f32], coin: f32) -> usize {
    let mut cdf = 0f32;
    for (i, &p) in probs.iter().enumerate() {
        cdf += p;
        if coin < cdf {
            return i;
        }
    }
    probs.len() - 1
}

fn sample_top_p(probs: &[f32], top_p: f32, coin: f32) -> usize {
    let cutoff = (1.0 - top_p) / (probs.len() - 1).max(1) as f32;
    let mut candidates: Vec<(usize, f32)> = probs
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, p)| p >= cutoff)
        .collect();
    if candidates.is_empty() {
        return argmax(probs);
    }
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut cumulative = 0f32;
    let mut last = candidates.len() - 1;
    for (i, &(_, p)) in candidates.iter().enumerate() {
        cumulative += p;
        if cumulative > top_p {
            last = i;
            break;
        }
    }
    let r = coin * cumulative;
    let mut cdf = 0f32;
    for &(index, p) in &candidates[..=last] {
        cdf += p;
        if r < cdf {
            return index;
        }
    }
    candidates[last].0
}
