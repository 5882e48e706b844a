//! Cross-entropy losses with Hugging Face's ignore index.

use candle_core::{DType, Tensor, D};

/// Label value excluded from the loss (Hugging Face's `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy of `logits` `[n, classes]` against `targets` `[n]` (i64), ignoring targets
/// equal to [`IGNORE_INDEX`]. With no valid target the loss is 0 (and has a zero gradient).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let targets = targets.to_dtype(DType::I64)?;
    let valid = targets.ne(IGNORE_INDEX)?;
    let count = valid.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    let safe_targets = valid
        .where_cond(&targets, &targets.zeros_like()?)?
        .to_dtype(DType::U32)?;
    let log_probs = super::log_softmax_last_dim(logits)?;
    let picked = log_probs
        .gather(&safe_targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let weights = valid.to_dtype(picked.dtype())?;
    picked.mul(&weights)?.sum_all()?.neg()? / f64::from(count.max(1.0))
}

/// Next-token loss of a causal LM: `logits` `[b, s, vocab]` at position `t` predict `labels`
/// `[b, s]` at `t + 1` (labels are the input ids with prompt and padding set to -100).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        candle_core::bail!("causal LM loss needs sequences of at least 2 tokens, got {s}");
    }
    let logits = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let labels = labels.narrow(1, 1, s - 1)?.reshape(b * (s - 1))?;
    cross_entropy(&logits, &labels)
}
