//! Cross-entropy losses with Hugging Face's ignore index: the fused CPU kernel
//! ([`super::fused`]) on f32/f64 CPU logits, the composed path ([`super::composed`]) elsewhere.

use candle_core::Tensor;

use super::{composed, fused};

/// Label value excluded from the loss (Hugging Face's `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// Mean cross-entropy of `logits` `[n, classes]` against integer `targets` `[n]`, ignoring
/// targets equal to [`IGNORE_INDEX`]. With no valid target the loss is 0 (and has a zero
/// gradient).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if fused::supports(&[logits]) && targets.device().is_cpu() {
        fused::cross_entropy(logits, targets)
    } else {
        composed::cross_entropy(logits, targets)
    }
}

/// Next-token loss of a causal LM: `logits` `[b, s, vocab]` at position `t` predict `labels`
/// `[b, s]` at `t + 1` (labels are the input ids with prompt and padding set to -100).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    if fused::supports(&[logits]) && labels.device().is_cpu() {
        fused::causal_lm_loss(logits, labels)
    } else {
        composed::causal_lm_loss(logits, labels)
    }
}
