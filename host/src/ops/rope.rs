//! Rotary position embeddings in Hugging Face's "rotate half" layout.

use candle_core::{DType, Device, Tensor, D};

/// Precomputed cos/sin tables for rotary embeddings.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Tables for `head_dim` and up to `max_positions`, base `theta` (Llama: 10000, SmolLM2: 1e5).
    pub fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        let mut angles = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            angles.extend(inv_freq.iter().map(|f| pos as f64 * f));
        }
        let angles = Tensor::from_vec(angles, (max_positions, half), device)?;
        let angles = Tensor::cat(&[&angles, &angles], D::Minus1)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    /// Applies the rotation to `x` `[batch, heads, seq, head_dim]` at positions
    /// `offset..offset+seq`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        let seq = x.dim(2)?;
        if offset + seq > self.cos.dim(0)? {
            candle_core::bail!(
                "position {} is beyond the rotary table ({} positions)",
                offset + seq,
                self.cos.dim(0)?
            );
        }
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        rope(x, &cos, &sin)
    }
}

/// `x · cos + rotate_half(x) · sin` with `cos`, `sin` of shape `[seq, head_dim]` and `x`
/// `[batch, heads, seq, head_dim]`; `rotate_half([a, b]) = [-b, a]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let a = x.narrow(D::Minus1, 0, half)?;
    let b = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&b.neg()?, &a], D::Minus1)?;
    x.broadcast_mul(cos)?.add(&rotated.broadcast_mul(sin)?)
}
