//! Activation functions with candle backward.

use candle_core::Tensor;

/// SiLU (swish): `x · σ(x)`.
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.silu()
}

/// SwiGLU feed-forward gate: `silu(gate) ⊙ up` (Llama MLP): the fused kernel for f32/f64 CPU
/// tensors of one shape, candle primitives elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if super::fused::supports(&[gate, up]) && gate.dims() == up.dims() {
        super::fused::swiglu(gate, up)
    } else {
        super::composed::swiglu(gate, up)
    }
}

/// GELU, exact erf form (BERT's `hidden_act = "gelu"`): the fused kernel for f32/f64 CPU
/// tensors, candle's `gelu_erf` elsewhere.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    if super::fused::supports(&[x]) {
        super::fused::gelu(x)
    } else {
        x.gelu_erf()
    }
}

/// GELU, tanh approximation (`hidden_act = "gelu_new"` / `"gelu_pytorch_tanh"`).
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    x.gelu()
}
