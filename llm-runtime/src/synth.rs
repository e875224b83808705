//! Synthetic llama2.c checkpoints: a model of a given shape with seeded random weights, for
//! benchmarking shapes whose real weights are not at hand (the TinyStories 15M and 110M);
//! and a mixture-of-experts variant of a model ([`with_experts`]).

use std::{io::Write, path::Path};

use llm_ir::{
    dtype::DType,
    interp::{Tensor, Value, WeightStore},
};

use crate::{
    model::{
        EXPERT_DOWNS, EXPERT_GATES, EXPERT_UPS, ExpertGlu, ExpertScoring, Experts, ModelConfig,
        ROUTER,
    },
    sampler::XorShift,
    weights::Weights,
};

/// A named model shape.
pub fn shape(name: &str) -> Option<ModelConfig> {
    let c = ModelConfig::llama2c;
    match name {
        "260K" => Some(c(64, 172, 5, 8, 4, 512, 512)),
        "15M" => Some(c(288, 768, 6, 6, 6, 32000, 256)),
        "42M" => Some(c(512, 1376, 8, 8, 8, 32000, 1024)),
        "110M" => Some(c(768, 2048, 12, 12, 12, 32000, 1024)),
        _ => None,
    }
}

/// Writes a llama2.c checkpoint of shape `c` with weights drawn from `seed` (non-zero):
/// matrices uniform in `±1/sqrt(fan_in)`, norm weights 1, so activations stay in a sane
/// range. The file appears whole or not at all: it is written beside `path` and renamed.
pub fn write(path: &Path, c: &ModelConfig, seed: u64) -> std::io::Result<()> {
    if seed == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the seed must not be 0 (xorshift never leaves a zero state)",
        ));
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.synth.tmp"));
    let written = std::fs::File::create(&tmp)
        .and_then(|f| write_weights(std::io::BufWriter::new(f), c, seed))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The model `c` over `weights` with each layer's feed-forward block replaced by `count`
/// experts of `c.hidden_dim / per_token` (renormalized, `per_token` a token: as many
/// multiply-adds a token as the dense block), their matrices and routers drawn from `seed`
/// (non-zero) as [`write()`] draws a model's; the other weights are `weights`'.
pub fn with_experts(
    c: &ModelConfig,
    weights: &Weights,
    (count, per_token): (usize, usize),
    seed: u64,
) -> (ModelConfig, Weights) {
    let hidden = c.hidden_dim / per_token.max(1);
    let config = ModelConfig {
        experts: Some(Experts {
            count,
            per_token,
            hidden,
            normalize: true,
            layers: vec![true; c.layers],
            shared: None,
            scoring: ExpertScoring::Softmax,
            groups: None,
            scale: 1.0,
            biases: false,
            glu: ExpertGlu::Gated,
        }),
        ..c.clone()
    };
    let mut out = Weights::default();
    for name in weights.names() {
        if let Some(value) = weights
            .weight(name)
            .filter(|_| !name.contains(".feed_forward."))
        {
            out.insert(name, (*value).clone());
        }
    }
    let mut rng = XorShift::new(seed);
    let mut random = |shape: Vec<usize>, fan_in: usize| {
        let scale = 1.0 / (fan_in as f32).sqrt();
        let n = shape.iter().product();
        let values = (0..n)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
            .collect();
        Value::Tensor(Tensor::from_f32(shape, DType::F32, values))
    };
    let d = c.dim;
    for l in 0..c.layers {
        let p = format!("layers.{l}.");
        out.insert(format!("{p}{ROUTER}"), random(vec![count, d], d));
        out.insert(
            format!("{p}{EXPERT_GATES}"),
            random(vec![count, hidden, d], d),
        );
        out.insert(
            format!("{p}{EXPERT_UPS}"),
            random(vec![count, hidden, d], d),
        );
        out.insert(
            format!("{p}{EXPERT_DOWNS}"),
            random(vec![count, d, hidden], hidden),
        );
    }
    (config, out)
}

fn write_weights(
    mut out: std::io::BufWriter<std::fs::File>,
    c: &ModelConfig,
    seed: u64,
) -> std::io::Result<()> {
    let vocab = if c.tied_classifier {
        c.vocab as i32
    } else {
        -(c.vocab as i32)
    };
    for v in [
        c.dim as i32,
        c.hidden_dim as i32,
        c.layers as i32,
        c.heads as i32,
        c.kv_heads as i32,
        vocab,
        c.seq_len as i32,
    ] {
        out.write_all(&v.to_le_bytes())?;
    }
    let mut rng = XorShift::new(seed);
    let mut random = |out: &mut std::io::BufWriter<std::fs::File>,
                      n: usize,
                      fan_in: usize|
     -> std::io::Result<()> {
        let scale = 1.0 / (fan_in as f32).sqrt();
        for _ in 0..n {
            out.write_all(&((rng.next_f32() * 2.0 - 1.0) * scale).to_le_bytes())?;
        }
        Ok(())
    };
    let ones = |out: &mut std::io::BufWriter<std::fs::File>, n: usize| -> std::io::Result<()> {
        for _ in 0..n {
            out.write_all(&1f32.to_le_bytes())?;
        }
        Ok(())
    };
    let (d, h, l, kv) = (c.dim, c.hidden_dim, c.layers, c.kv_dim());
    random(&mut out, c.vocab * d, d)?;
    ones(&mut out, l * d)?;
    random(&mut out, l * d * d, d)?;
    random(&mut out, l * kv * d, d)?;
    random(&mut out, l * kv * d, d)?;
    random(&mut out, l * d * d, d)?;
    ones(&mut out, l * d)?;
    random(&mut out, l * h * d, d)?;
    random(&mut out, l * d * h, h)?;
    random(&mut out, l * h * d, d)?;
    ones(&mut out, d)?;
    // The legacy RoPE tables, which loaders skip.
    out.write_all(&vec![0u8; c.seq_len * c.head_dim() * 4])?;
    if !c.tied_classifier {
        random(&mut out, c.vocab * d, d)?;
    }
    out.flush()
}
