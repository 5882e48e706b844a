//! Scaled dot-product attention with causal and padding masks, from differentiable primitives.

use candle_core::{DType, Tensor};

/// Value added to masked attention scores: finite, so fully masked (padding) rows stay NaN-free,
/// and small enough in magnitude (BERT's historical -10000) that such rows keep their scores'
/// precision, which keeps their gradient exact (a -1e9 bias rounds the scores away in f32 and
/// makes autograd and finite differences disagree). `exp(-1e4)` is exactly 0 in f32 and f64.
const MASKED: f64 = -1e4;

/// Additive attention bias `[batch, 1, q_len, past + q_len]`: 0 where a query may attend, a large
/// negative number where it may not. `attention_mask` is `[batch, past + q_len]` with 1 for real
/// tokens and 0 for padding; `causal` hides future positions (query `i` sits at `past + i`).
pub fn attention_bias(
    attention_mask: &Tensor,
    q_len: usize,
    causal: bool,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let (batch, k_len) = attention_mask.dims2()?;
    let past = k_len
        .checked_sub(q_len)
        .ok_or_else(|| candle_core::Error::Msg("attention mask shorter than the query".into()))?;
    let keys = attention_mask
        .to_dtype(DType::F32)?
        .reshape((batch, 1, 1, k_len))?;
    let mut allowed = keys.broadcast_as((batch, 1, q_len, k_len))?.contiguous()?;
    if causal {
        let tri: Vec<f32> = (0..q_len)
            .flat_map(|i| (0..k_len).map(move |j| if j <= past + i { 1.0 } else { 0.0 }))
            .collect();
        let tri = Tensor::from_vec(tri, (1, 1, q_len, k_len), attention_mask.device())?;
        allowed = allowed.broadcast_mul(&tri)?;
    }
    // allowed ∈ {0, 1} → bias ∈ {MASKED, 0}
    ((allowed - 1.0)? * -MASKED)?.to_dtype(dtype)
}

/// Repeats each key/value head `n_rep` times for grouped-query attention:
/// `[batch, kv_heads, seq, dim]` → `[batch, kv_heads * n_rep, seq, dim]`.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, h, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, h, n_rep, s, d))?
        .reshape((b, h * n_rep, s, d))
}

/// `softmax(q kᵀ / sqrt(d) + bias) v` for `q` `[b, h, q_len, d]`, `k`, `v` `[b, kv, k_len, d]`
/// and an optional additive `bias` broadcastable to `[b, h, q_len, k_len]`.
///
/// `kv` may divide `h` (grouped-query attention: query head `i` uses key/value head
/// `i / (h / kv)`, as [`repeat_kv`] lays them out). The query heads of a group are then
/// multiplied with their shared key/value head as one `[group · q_len, d]` matrix, so the
/// keys and values are never copied per query head and each product is larger.
///
/// f32 on the CPU with a bias `[b or 1, 1, q_len, k_len]` (or none) runs
/// [`super::fused::attention`], which keeps no `[b, h, q_len, k_len]` tensor for the backward
/// pass and returns a transposed view of a sequence-first `[b, q_len, h, d]` result; other
/// inputs run two products and the attention softmax.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (b, h, q_len, d) = q.dims4()?;
    let (kb, kv, k_len, kd) = k.dims4()?;
    if kb != b || kd != d || kv == 0 || !h.is_multiple_of(kv) || v.dims4()? != (b, kv, k_len, d) {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} do not fit (key/value heads must divide the \
             query heads)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if super::fused::supports_fused_attention(q, k, v, bias) {
        // Sequence-first [b, q, h, d], viewed as [b, h, q, d]: a caller that transposes back
        // to [b, q, h · d] gets it without a copy.
        return super::fused::attention(q, k, v, bias)?.transpose(1, 2);
    }
    let group = h / kv;
    let scale = 1.0 / (d as f64).sqrt();
    // [b, kv, group · q_len, d]: a free view of a contiguous q.
    let qg = q.contiguous()?.reshape((b, kv, group * q_len, d))?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let scores = super::matmul(&qg, &k.t()?)?.reshape((b, h, q_len, k_len))?;
    let probs = attention_softmax(&scores, scale, bias)?.reshape((b, kv, group * q_len, k_len))?;
    super::matmul(&probs, &v)?.reshape((b, h, q_len, d))
}

/// The attention probabilities `softmax(scores · scale + bias)` of scores `[b, h, q, k]` with an
/// optional constant `bias` broadcastable to them (see [`attention_bias`]): one fused pass on
/// the CPU (f32/f64, a bias of shape `[b or 1, 1, q, k]`), candle primitives elsewhere.
pub fn attention_softmax(
    scores: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if super::fused::supports_attention(scores, bias) {
        super::fused::attention_softmax(scores, scale, bias)
    } else {
        super::composed::attention_softmax(scores, scale, bias)
    }
}
