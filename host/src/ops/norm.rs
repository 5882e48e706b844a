//! Normalisation layers (RMSNorm, LayerNorm) over the last dimension: the fused CPU kernels
//! ([`super::fused`]) for f32/f64 CPU tensors, the composed path ([`super::composed`]) elsewhere.

use candle_core::Tensor;

use super::{composed, fused};

/// RMSNorm: `x / sqrt(mean(x²) + eps) * weight` over the last dimension (Llama).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if fused::supports(&[x, weight]) {
        fused::rms_norm(x, weight, eps)
    } else {
        composed::rms_norm(x, weight, eps)
    }
}

/// LayerNorm: `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension (BERT).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if fused::supports(&[x, weight, bias]) {
        fused::layer_norm(x, weight, bias, eps)
    } else {
        composed::layer_norm(x, weight, bias, eps)
    }
}
