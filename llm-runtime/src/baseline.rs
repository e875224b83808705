//! A plain-Rust forward pass: the loops a careful C or Rust programmer writes (llama2.c's
//! `run.c`, one output row at a time, contiguous KV cache), with the matrix-vector dot
//! product written with eight accumulators and compiled for AVX2 and FMA when the CPU has
//! them (as `gcc -Ofast -march=native` vectorizes run.c). It is the yardstick the compiled
//! backends are measured against; it produces the same tokens as the reference run, with
//! logits that differ only by the summation order.

use llm_ir::{
    interp::{Value, WeightStore, quant},
    types::QuantFormat,
};

use crate::{model::ModelConfig, weights::Weights};

/// A dot product in `f32`, accumulated in order (as `run.c` does).
fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (x, y) in a.iter().zip(b) {
        acc += x * y;
    }
    acc
}

/// A dot product over eight interleaved accumulators with fused multiply-adds, which
/// the compiler turns into one 256-bit FMA per eight elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        sum = x.mul_add(*y, sum);
    }
    sum
}

/// `out[i] = dot(w[i], x)` for a row-major `[n, k]` matrix.
fn matvec(out: &mut [f32], w: &[f32], x: &[f32], avx2: bool) {
    let k = x.len();
    for (i, o) in out.iter_mut().enumerate() {
        let row = &w[i * k..(i + 1) * k];
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            #[allow(
                unsafe_code,
                reason = "calling a target_feature function after checking the CPU has the features"
            )]
            // SAFETY: `avx2` is true only when the CPU supports AVX2 and FMA.
            {
                *o = unsafe { dot_avx2(row, x) };
            }
            continue;
        }
        *o = dot_scalar(row, x);
    }
}

fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let mut ss = 0f32;
    for v in x {
        ss += v * v;
    }
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = g * (inv * v);
    }
}

struct Layer {
    att_norm: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    ffn_norm: Vec<f32>,
    w1: Vec<f32>,
    w2: Vec<f32>,
    w3: Vec<f32>,
}

/// The baseline model: f32 weights and a contiguous `[layers][seq_len][kv_dim]` cache.
pub struct Baseline {
    c: ModelConfig,
    embed: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    classifier: Option<Vec<f32>>,
    key_cache: Vec<f32>,
    value_cache: Vec<f32>,
    avx2: bool,
}

fn f32_weight(w: &Weights, name: &str) -> Result<Vec<f32>, String> {
    match w.weight(name).as_deref() {
        Some(Value::Tensor(t)) => Ok(t.floats()?.to_vec()),
        // A 16-bit matrix, kept at 16 bits by its loader: widened here.
        Some(Value::Quantized(q)) if matches!(q.format, QuantFormat::F16 | QuantFormat::BF16) => {
            Ok(quant::dequantize(&q.format, &q.shape, &q.bytes))
        }
        _ => Err(format!("the baseline needs f32 weight `{name}`")),
    }
}

impl Baseline {
    /// Builds the baseline over f32 weights of a model with llama2.c's RoPE.
    pub fn new(c: &ModelConfig, w: &Weights) -> Result<Baseline, String> {
        // Every setting but the sizes, RoPE's base, the epsilon and the classifier's tie
        // as llama2.c has it.
        let llama2c = ModelConfig {
            rope_theta: c.rope_theta,
            norm_eps: c.norm_eps,
            tied_classifier: c.tied_classifier,
            ..ModelConfig::llama2c(
                c.dim,
                c.hidden_dim,
                c.layers,
                c.heads,
                c.kv_heads,
                c.vocab,
                c.seq_len,
            )
        };
        if *c != llama2c {
            return Err(
                "the baseline computes llama2.c's model only: interleaved, unscaled RoPE over whole heads, RMSNorms before each block, SwiGLU, no biases, windows, extra norms, scales or soft-caps"
                    .into(),
            );
        }
        let layers = (0..c.layers)
            .map(|l| {
                let g = |n: &str| f32_weight(w, &format!("layers.{l}.{n}"));
                Ok(Layer {
                    att_norm: g("attention_norm.weight")?,
                    wq: g("attention.wq.weight")?,
                    wk: g("attention.wk.weight")?,
                    wv: g("attention.wv.weight")?,
                    wo: g("attention.wo.weight")?,
                    ffn_norm: g("ffn_norm.weight")?,
                    w1: g("feed_forward.w1.weight")?,
                    w2: g("feed_forward.w2.weight")?,
                    w3: g("feed_forward.w3.weight")?,
                })
            })
            .collect::<Result<_, String>>()?;
        let cache = c.layers * c.seq_len * c.kv_dim();
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        Ok(Baseline {
            c: c.clone(),
            embed: f32_weight(w, "tok_embeddings.weight")?,
            layers,
            norm: f32_weight(w, "norm.weight")?,
            classifier: if c.tied_classifier {
                None
            } else {
                Some(f32_weight(w, "output.weight")?)
            },
            key_cache: vec![0.0; cache],
            value_cache: vec![0.0; cache],
            avx2,
        })
    }

    /// Runs token `token` at position `pos`; returns the logits.
    pub fn forward(&mut self, token: u32, pos: usize) -> Vec<f32> {
        let c = &self.c;
        let (d, hd, kvd, head) = (c.dim, c.hidden_dim, c.kv_dim(), c.head_dim());
        let group = c.heads / c.kv_heads;
        let eps = c.norm_eps as f32;
        let mut x = self.embed[token as usize * d..(token as usize + 1) * d].to_vec();
        let (mut xb, mut q, mut k, mut v) = (
            vec![0f32; d],
            vec![0f32; d],
            vec![0f32; kvd],
            vec![0f32; kvd],
        );
        let (mut hb, mut hb2, mut att) = (vec![0f32; hd], vec![0f32; hd], vec![0f32; c.seq_len]);
        let mut xb2 = vec![0f32; d];
        for (l, layer) in self.layers.iter().enumerate() {
            rmsnorm(&mut xb, &x, &layer.att_norm, eps);
            matvec(&mut q, &layer.wq, &xb, self.avx2);
            matvec(&mut k, &layer.wk, &xb, self.avx2);
            matvec(&mut v, &layer.wv, &xb, self.avx2);
            for i in (0..d).step_by(2) {
                let freq = 1.0 / (c.rope_theta as f32).powf((i % head) as f32 / head as f32);
                let (sin, cos) = (pos as f32 * freq).sin_cos();
                let rotate = |v: &mut [f32]| {
                    let (a, b) = (v[i], v[i + 1]);
                    v[i] = a * cos - b * sin;
                    v[i + 1] = a * sin + b * cos;
                };
                rotate(&mut q);
                if i < kvd {
                    rotate(&mut k);
                }
            }
            let base = l * c.seq_len * kvd;
            self.key_cache[base + pos * kvd..base + (pos + 1) * kvd].copy_from_slice(&k);
            self.value_cache[base + pos * kvd..base + (pos + 1) * kvd].copy_from_slice(&v);
            for h in 0..c.heads {
                let qh = &q[h * head..(h + 1) * head];
                let kv_off = (h / group) * head;
                for (t, score) in att[..=pos].iter_mut().enumerate() {
                    let kt = &self.key_cache[base + t * kvd + kv_off..][..head];
                    *score = dot_scalar(qh, kt) / (head as f32).sqrt();
                }
                crate::sampler::softmax(&mut att[..=pos]);
                let out = &mut xb[h * head..(h + 1) * head];
                out.iter_mut().for_each(|o| *o = 0.0);
                for (t, &a) in att[..=pos].iter().enumerate() {
                    let vt = &self.value_cache[base + t * kvd + kv_off..][..head];
                    for (o, val) in out.iter_mut().zip(vt) {
                        *o += a * val;
                    }
                }
            }
            matvec(&mut xb2, &layer.wo, &xb, self.avx2);
            x.iter_mut().zip(&xb2).for_each(|(a, b)| *a += b);
            rmsnorm(&mut xb, &x, &layer.ffn_norm, eps);
            matvec(&mut hb, &layer.w1, &xb, self.avx2);
            matvec(&mut hb2, &layer.w3, &xb, self.avx2);
            for (a, b) in hb.iter_mut().zip(&hb2) {
                *a = *a * (1.0 / (1.0 + (-*a).exp())) * b;
            }
            matvec(&mut xb, &layer.w2, &hb, self.avx2);
            x.iter_mut().zip(&xb).for_each(|(a, b)| *a += b);
        }
        let mut normed = vec![0f32; d];
        rmsnorm(&mut normed, &x, &self.norm, eps);
        let mut logits = vec![0f32; c.vocab];
        matvec(
            &mut logits,
            self.classifier.as_deref().unwrap_or(&self.embed),
            &normed,
            self.avx2,
        );
        logits
    }
}
