//! Device-generic reference implementations built from differentiable candle primitives.
//!
//! They run on every device and dtype; [`crate::ops`] uses them where the fused CPU kernels of
//! [`super::fused`] do not apply (CUDA, Metal, half precision), and the tests compare the fused
//! kernels against them.

use candle_core::{DType, Tensor, D};

use super::IGNORE_INDEX;

/// RMSNorm: `x / sqrt(mean(x²) + eps) * weight` over the last dimension (Llama).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (mean_sq + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(weight)
}

/// LayerNorm: `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension (BERT).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    centered
        .broadcast_mul(&inv)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// SwiGLU feed-forward gate: `silu(gate) ⊙ up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.silu()?.mul(up)
}

/// Rotary embedding `x · cos + rotate_half(x) · sin` with `cos`, `sin` of shape
/// `[seq, head_dim]` and `x` `[batch, heads, seq, head_dim]`; `rotate_half([a, b]) = [-b, a]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let a = x.narrow(D::Minus1, 0, half)?;
    let b = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&b.neg()?, &a], D::Minus1)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}

/// `softmax(scores · scale + bias)` over the last dimension, `bias` broadcastable to `scores`.
pub fn attention_softmax(
    scores: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let scores = (scores * scale)?;
    let scores = match bias {
        Some(bias) => scores.broadcast_add(bias)?,
        None => scores,
    };
    softmax_last_dim(&scores)
}

/// Softmax over the last dimension (max-shifted).
pub fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(xs, D::Minus1)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    candle_nn::ops::log_softmax(xs, D::Minus1)
}

/// Mean cross-entropy of `logits` `[n, classes]` against `targets` `[n]`, ignoring targets
/// equal to [`IGNORE_INDEX`]. With no valid target the loss is 0 (and has a zero gradient).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let targets = targets.to_dtype(DType::I64)?;
    let valid = targets.ne(IGNORE_INDEX)?;
    let count = valid.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    let safe_targets = valid
        .where_cond(&targets, &targets.zeros_like()?)?
        .to_dtype(DType::U32)?;
    let log_probs = log_softmax_last_dim(logits)?;
    let picked = log_probs
        .gather(&safe_targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let weights = valid.to_dtype(picked.dtype())?;
    picked.mul(&weights)?.sum_all()?.neg()? / f64::from(count.max(1.0))
}

/// Next-token loss of a causal LM: `logits` `[b, s, vocab]` at position `t` predict `labels`
/// `[b, s]` at `t + 1`.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        candle_core::bail!("causal LM loss needs sequences of at least 2 tokens, got {s}");
    }
    let logits = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let labels = labels.narrow(1, 1, s - 1)?.reshape(b * (s - 1))?;
    cross_entropy(&logits, &labels)
}
