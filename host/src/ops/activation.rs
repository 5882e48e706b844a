//! Activation functions with candle backward.

use candle_core::Tensor;

/// SiLU (swish): `x · σ(x)`.
pub fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.silu()
}

/// SwiGLU feed-forward gate: `silu(gate) ⊙ up` (Llama MLP).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.silu()?.mul(up)
}

/// GELU, exact erf form (BERT's `hidden_act = "gelu"`).
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    x.gelu_erf()
}

/// GELU, tanh approximation (`hidden_act = "gelu_new"` / `"gelu_pytorch_tanh"`).
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    x.gelu()
}
