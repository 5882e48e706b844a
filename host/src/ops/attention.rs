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

/// `softmax(q kᵀ / sqrt(d) + bias) v` for `q` `[b, h, q_len, d]`, `k`, `v` `[b, h, k_len, d]` and
/// an optional additive `bias` broadcastable to `[b, h, q_len, k_len]`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let scale = 1.0 / (q.dim(candle_core::D::Minus1)? as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    super::softmax_last_dim(&scores)?.matmul(v)
}
