//! Semantics of `llm.attention`, `llm.paged_attention` and `llm.rope`.

use std::rc::Rc;

use super::{Eval, Outputs, norm::softmax_in_place, one};
use crate::interp::value::{KvCache, Tensor, Value};

/// How scores are scaled: by the `scale` parameter, or divided by `sqrt(head_dim)` as
/// llama2.c does when it is absent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// Multiply by the factor.
    Times(f32),
    /// Divide by the factor (`sqrt(head_dim)`).
    DivSqrt(f32),
}

impl Scale {
    /// The scaling of an op whose `scale` parameter is `param`, for heads of `head_dim`.
    pub fn from_param(param: Option<f64>, head_dim: usize) -> Scale {
        match param {
            Some(s) => Scale::Times(s as f32),
            None => Scale::DivSqrt((head_dim as f32).sqrt()),
        }
    }

    /// The factor a kernel multiplies scores by: the reciprocal in place of a division.
    pub fn factor(self) -> f32 {
        match self {
            Scale::Times(s) => s,
            Scale::DivSqrt(r) => 1.0 / r,
        }
    }

    /// The scaled score.
    pub fn apply(self, dot: f32) -> f32 {
        match self {
            Scale::Times(s) => dot * s,
            Scale::DivSqrt(r) => dot / r,
        }
    }
}

/// How a query-key dot product becomes a score: scaled ([`Scale`]), then soft-capped to
/// `cap * tanh(s / cap)` where the op has `softcap = cap` (Gemma 2's attention).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring {
    /// The scaling.
    pub scale: Scale,
    /// The soft-cap, if any.
    pub softcap: Option<f32>,
}

impl Scoring {
    /// The scoring of an op whose `scale` and `softcap` parameters are `scale` and
    /// `softcap`, for heads of `head_dim`.
    pub fn from_params(scale: Option<f64>, softcap: Option<f64>, head_dim: usize) -> Scoring {
        Scoring {
            scale: Scale::from_param(scale, head_dim),
            softcap: softcap.map(|c| c as f32),
        }
    }

    fn of(e: &Eval, head_dim: usize) -> Scoring {
        Scoring::from_params(e.float("scale"), e.float("softcap"), head_dim)
    }

    /// The score of a dot product.
    pub fn apply(self, dot: f32) -> f32 {
        let s = self.scale.apply(dot);
        match self.softcap {
            Some(cap) => cap * (s / cap).tanh(),
            None => s,
        }
    }
}

/// Attention of one query row over keys/values `j` in `visible`; `bias(j)` is added to the
/// score, and a `sink` score (an attention sink) joins the softmax without a value.
/// Accumulates in `f32` in order of `j` (llama2.c's order).
#[expect(
    clippy::too_many_arguments,
    reason = "one row's inputs: the query, its keys and values, and how scores are made"
)]
fn attend<'a>(
    q: &[f32],
    visible: std::ops::Range<usize>,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    bias: impl Fn(usize) -> f32,
    scoring: Scoring,
    sink: Option<f32>,
    value_dim: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; value_dim];
    if visible.is_empty() {
        return out;
    }
    let mut scores: Vec<f32> = visible
        .clone()
        .map(|j| {
            let k = key(j);
            let mut dot = 0f32;
            for (a, b) in q.iter().zip(k) {
                dot += a * b;
            }
            scoring.apply(dot) + bias(j)
        })
        .collect();
    match sink {
        Some(sink) => {
            // The sink is one more score whose weight is dropped after the softmax.
            scores.push(sink);
            softmax_in_place(&mut scores);
            scores.pop();
        }
        None => softmax_in_place(&mut scores),
    }
    for (p, j) in scores.iter().zip(visible) {
        let v = value(j);
        for (o, x) in out.iter_mut().zip(v) {
            *o += p * x;
        }
    }
    out
}

/// The positions `0..=p` that position `p` may see under an optional sliding window.
fn window_range(p: usize, window: Option<usize>) -> std::ops::Range<usize> {
    let start = window.map_or(0, |w| (p + 1).saturating_sub(w));
    start..p + 1
}

fn window(e: &Eval) -> Option<usize> {
    e.op.int("window").map(|w| w as usize)
}

/// `llm.attention`.
pub fn attention(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let (q, k, v) = (
        inputs[0].tensor()?,
        inputs[1].tensor()?,
        inputs[2].tensor()?,
    );
    let mask = inputs.get(3).map(|m| m.tensor()).transpose()?;
    let r = q.shape.len();
    let (tq, h, d) = (q.shape[r - 3], q.shape[r - 2], q.shape[r - 1]);
    let (tk, kvh, dv) = (k.shape[r - 3], k.shape[r - 2], v.shape[r - 1]);
    if k.shape[..r - 1] != v.shape[..r - 1]
        || k.shape[r - 1] != d
        || q.shape[..r - 3] != k.shape[..r - 3]
    {
        return Err(format!(
            "q {:?}, k {:?} and v {:?} do not fit together at run time",
            q.shape, k.shape, v.shape
        ));
    }
    if let Some(m) = mask
        && m.shape != [tq, tk]
    {
        return Err(format!(
            "the mask has shape {:?}, expected [{tq}, {tk}]",
            m.shape
        ));
    }
    if kvh == 0 || h % kvh != 0 || tk < tq && e.flag("causal", false) {
        return Err(format!(
            "cannot attend {tq} queries with {h} heads to {tk} keys with {kvh} heads"
        ));
    }
    let batch: usize = q.shape[..r - 3].iter().product();
    let (qd, kd, vd) = (q.floats()?, k.floats()?, v.floats()?);
    let md = mask.map(|m| m.floats()).transpose()?;
    let (causal, win, scoring) = (e.flag("causal", false), window(e), Scoring::of(e, d));
    let group = h / kvh;
    let mut out = Vec::with_capacity(batch * tq * h * dv);
    for b in 0..batch {
        for i in 0..tq {
            let pos = (tk + i).saturating_sub(tq);
            let visible = if causal {
                window_range(pos, win)
            } else {
                let start = win.map_or(0, |w| (pos + 1).saturating_sub(w));
                start..tk
            };
            for head in 0..h {
                let kv = head / group;
                let qrow = &qd[((b * tq + i) * h + head) * d..][..d];
                let row = attend(
                    qrow,
                    visible.clone(),
                    |j| &kd[((b * tk + j) * kvh + kv) * d..][..d],
                    |j| &vd[((b * tk + j) * kvh + kv) * dv..][..dv],
                    |j| md.map_or(0.0, |m| m[i * tk + j]),
                    scoring,
                    None,
                    dv,
                );
                out.extend(row);
            }
        }
    }
    let mut shape = q.shape[..r - 1].to_vec();
    shape.push(dv);
    one(Tensor::from_f32(shape, e.result_dtype(0)?, out))
}

/// The flat cache slot of position `pos` of a sequence with block table `table`.
pub fn slot_of(cache: &KvCache, table: &[i64], pos: usize) -> Result<usize, String> {
    let bs = cache.params.block_size as usize;
    let Some(&block) = table.get(pos / bs) else {
        return Err(format!(
            "position {pos} needs block-table entry {}, but the table has {} entries",
            pos / bs,
            table.len()
        ));
    };
    if block < 0 || block as usize >= cache.blocks {
        return Err(format!(
            "block {block} is out of range for a pool of {} blocks",
            cache.blocks
        ));
    }
    Ok(block as usize * bs + pos % bs)
}

/// `llm.paged_attention`.
pub fn paged_attention(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let (q, cache) = (inputs[0].tensor()?, inputs[1].cache()?);
    let sinks = inputs.get(4).map(|s| s.tensor()).transpose()?;
    one(paged_attend(
        e,
        q,
        cache,
        [inputs[2].tensor()?, inputs[3].tensor()?],
        sinks,
    )?)
}

/// Walks the query rows of a paged batch: `b` sequences of `t` new tokens each, with block
/// tables `tables` (`[b, M]`) and context lengths `lens` (`[b]`). For query row
/// `s * t + i` (token `i` of sequence `s`, at position `lens[s] - t + i`), `visit` gets the
/// row and the cache slots of the positions it sees, in order (the last `window` when
/// given). Table entries are checked against the pool. Shared by every paged-attention
/// implementation, so they agree on what each query sees.
pub fn for_each_paged_row(
    cache: &KvCache,
    [b, t]: [usize; 2],
    tables: &Tensor,
    lens: &Tensor,
    window: Option<usize>,
    mut visit: impl FnMut(usize, &[usize]) -> Result<(), String>,
) -> Result<(), String> {
    let width = tables.shape.get(1).copied().unwrap_or(0);
    if tables.shape != [b, width] || lens.shape != [b] {
        return Err(format!(
            "{b} sequences need block tables [{b}, M] and context lengths [{b}], found {:?} and {:?}",
            tables.shape, lens.shape
        ));
    }
    let (td, ld) = (tables.ints()?, lens.ints()?);
    let mut slots = Vec::new();
    for s in 0..b {
        let len = ld[s];
        if len < t as i64 {
            return Err(format!(
                "sequence {s} has context length {len}, fewer than its {t} new tokens"
            ));
        }
        let table = &td[s * width..(s + 1) * width];
        for i in 0..t {
            let pos = len as usize - t + i;
            slots.clear();
            let range = window_range(pos, window);
            slots.reserve(range.len());
            for j in range {
                slots.push(slot_of(cache, table, j)?);
            }
            visit(s * t + i, &slots)?;
        }
    }
    Ok(())
}

/// Paged attention of `q` over `cache` through `[block_tables, context_lens]`, with
/// optional attention `sinks` (`[heads]`); the parameters come from `e`.
pub fn paged_attend(
    e: &Eval,
    q: &Tensor,
    cache: &KvCache,
    [tables, lens]: [&Tensor; 2],
    sinks: Option<&Tensor>,
) -> Result<Tensor, String> {
    let (b, t, h, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let kvh = cache.params.kv_heads as usize;
    let layer = e.int("layer", 0) as usize;
    if d != cache.params.head_dim as usize || kvh == 0 || h % kvh != 0 {
        return Err(format!(
            "queries {:?} do not fit the cache's {kvh} heads of {}",
            q.shape, cache.params.head_dim
        ));
    }
    let sinks = sinks.map(|s| s.floats()).transpose()?;
    if let Some(s) = sinks
        && s.len() != h
    {
        return Err(format!("{} attention sinks for {h} heads", s.len()));
    }
    let qd = q.floats()?;
    let (scoring, group) = (Scoring::of(e, d), h / kvh);
    let mut out = Vec::with_capacity(q.len());
    let row_len = kvh * d;
    for_each_paged_row(cache, [b, t], tables, lens, window(e), |row, slots| {
        let (keys, values) = (
            cache.rows(&cache.k, layer, slots),
            cache.rows(&cache.v, layer, slots),
        );
        for head in 0..h {
            let at = |j: usize| j * row_len + (head / group) * d;
            let qrow = &qd[(row * h + head) * d..][..d];
            out.extend(attend(
                qrow,
                0..slots.len(),
                |j| &keys[at(j)..][..d],
                |j| &values[at(j)..][..d],
                |_| 0.0,
                scoring,
                sinks.map(|s| s[head]),
                d,
            ));
        }
        Ok(())
    })?;
    Ok(Tensor::from_f32(q.shape.clone(), e.result_dtype(0)?, out))
}

/// How `llm.rope` computes its angles: the frequencies' base, the position scaling, the
/// rotated values per head, each pair's frequency factor (`freq_factors`; empty for
/// none, every factor 1) and the magnitude its sines and cosines are scaled by (`mscale`).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeAngles {
    /// The base of the frequencies.
    pub theta: f32,
    /// Positions are divided by it.
    pub scaling: f32,
    /// Rotated values per head.
    pub rotary: usize,
    /// Pair `i`'s frequency is divided by `factors[i]` (none when empty).
    pub factors: Vec<f32>,
    /// Sines and cosines are multiplied by it (YaRN's and LongRoPE's attention factor; 1
    /// for none).
    pub mscale: f32,
}

impl RopeAngles {
    /// The angles of a rope with base `theta`, position scaling `scaling` and `rotary`
    /// rotated values per head, whose pair frequencies are divided by `factors` (none when
    /// empty) and whose sines and cosines are scaled by `mscale`.
    ///
    /// # Errors
    ///
    /// If `factors` is neither empty nor one per pair.
    pub fn new(
        theta: f32,
        scaling: f32,
        rotary: usize,
        factors: &[f32],
        mscale: f32,
    ) -> Result<RopeAngles, String> {
        if !factors.is_empty() && factors.len() != rotary / 2 {
            return Err(format!(
                "{} frequency factors for {} pairs",
                factors.len(),
                rotary / 2
            ));
        }
        Ok(RopeAngles {
            theta,
            scaling,
            rotary,
            factors: factors.to_vec(),
            mscale,
        })
    }

    /// The sine and cosine of pair `i`'s rotation at position `p`, each times `mscale`:
    /// the angle is `(p / scaling) * (theta^(-2i / rotary) / factor_i)` in `f32`.
    pub fn sin_cos(&self, p: i64, i: usize) -> (f32, f32) {
        let mut freq = 1.0 / self.theta.powf((2 * i) as f32 / self.rotary as f32);
        if let Some(f) = self.factors.get(i) {
            freq /= f;
        }
        let angle = (p as f32 / self.scaling) * freq;
        (angle.sin() * self.mscale, angle.cos() * self.mscale)
    }

    /// The cosines and sines of every pair's rotation at each of `positions`, token-major
    /// with `rotary / 2` per token: the tables the backends hand their rope kernels,
    /// computed exactly as `llm.rope` computes each angle.
    pub fn tables(&self, positions: &[i64]) -> (Vec<f32>, Vec<f32>) {
        let pairs = self.rotary / 2;
        let mut cos = Vec::with_capacity(positions.len() * pairs);
        let mut sin = Vec::with_capacity(positions.len() * pairs);
        for &p in positions {
            for i in 0..pairs {
                let (s, c) = self.sin_cos(p, i);
                sin.push(s);
                cos.push(c);
            }
        }
        (cos, sin)
    }
}

/// `llm.rope`.
pub fn rope(e: &Eval, inputs: Vec<Rc<Value>>) -> Outputs {
    let (x, pos) = (inputs[0].tensor()?, inputs[1].tensor()?);
    let r = x.shape.len();
    let (h, d) = (x.shape[r - 2], x.shape[r - 1]);
    let rotary = e.op.int("rotary_dim").map_or(d, |v| v as usize);
    let factors = match inputs.get(2) {
        Some(f) => f.tensor()?.floats()?,
        None => &[],
    };
    let angles = RopeAngles::new(
        e.float("theta").unwrap_or(10000.0) as f32,
        e.float("scaling").unwrap_or(1.0) as f32,
        rotary,
        factors,
        e.float("mscale").unwrap_or(1.0) as f32,
    )?;
    let half_layout =
        matches!(e.param("layout"), Some(crate::params::ParamValue::Word(ref w)) if w == "half");
    if pos.shape[..] != x.shape[..r - 2] || rotary > d {
        return Err(format!(
            "positions {:?} do not match the tokens of {:?}",
            pos.shape, x.shape
        ));
    }
    let mut out = x.floats()?.to_vec();
    for (token, &p) in pos.ints()?.iter().enumerate() {
        for head in 0..h {
            let base = (token * h + head) * d;
            for i in 0..rotary / 2 {
                let (sin, cos) = angles.sin_cos(p, i);
                let (ia, ib) = if half_layout {
                    (i, i + rotary / 2)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (a, b) = (out[base + ia], out[base + ib]);
                out[base + ia] = a * cos - b * sin;
                out[base + ib] = a * sin + b * cos;
            }
        }
    }
    one(Tensor::from_f32(x.shape.clone(), e.result_dtype(0)?, out))
}
