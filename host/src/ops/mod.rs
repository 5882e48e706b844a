//! Differentiable operations used by the host's models.
//!
//! DESIGN.md principle 5: several fast candle ops (`softmax_last_dim`, `rms_norm`, `layer_norm`,
//! `rope`, `QMatMul`) have no backward and silently drop gradients, and candle's matmul backward
//! computes a gradient for frozen weights too. The model code therefore only uses the operations
//! of this module, each covered by a finite-difference gradient test, and multiplies by frozen
//! weights through [`frozen_linear`], whose backward computes only the input gradient.
//!
//! On f32/f64 CPU tensors, RMSNorm, LayerNorm, the last-dimension softmax and the cross-entropy
//! losses run as fused kernels with hand-written backward passes ([`fused`]); elsewhere (CUDA,
//! Metal, half precision) they run as compositions of candle primitives ([`composed`]). Both are
//! proven by finite differences and checked against each other in `host/tests/gradients.rs`.

mod activation;
mod attention;
pub mod blas;
mod checkpoint;
mod chunked_loss;
pub mod composed;
mod dropout;
pub mod fused;
mod linear;
mod loss;
mod matmul;
mod norm;
mod quantized_linear;
mod rope;

pub use activation::{gelu, gelu_tanh, silu, swiglu};
pub use attention::{attention_bias, attention_softmax, repeat_kv, scaled_dot_product_attention};
pub use checkpoint::{checkpoint, CheckpointGrads, Recompute};
pub use chunked_loss::linear_cross_entropy;
pub use dropout::dropout;
pub use linear::{frozen_linear, matmul_rows, Linear};
pub use loss::{causal_lm_loss, cross_entropy, IGNORE_INDEX};
pub use matmul::matmul;
pub use norm::{layer_norm, rms_norm};
pub use quantized_linear::quantized_linear;
pub use rope::{rope, RotaryEmbedding};

/// Softmax over the last dimension: the fused CPU kernel for f32/f64 CPU tensors, the composed
/// (max-shifted) path elsewhere.
pub fn softmax_last_dim(xs: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    if fused::supports(&[xs]) {
        fused::softmax_last_dim(xs)
    } else {
        composed::softmax_last_dim(xs)
    }
}

/// Log-softmax over the last dimension, built from differentiable primitives.
pub fn log_softmax_last_dim(xs: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    composed::log_softmax_last_dim(xs)
}

/// Embedding lookup: rows of `table` `[vocab, hidden]` for `ids` of any shape; the result has
/// shape `ids.shape() + [hidden]`. Differentiable in `table` when it is trainable.
pub fn embedding(
    table: &candle_core::Tensor,
    ids: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let mut dims = ids.dims().to_vec();
    dims.push(table.dim(1)?);
    table.index_select(&ids.flatten_all()?, 0)?.reshape(dims)
}
