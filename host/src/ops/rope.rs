//! Rotary position embeddings in Hugging Face's "rotate half" layout.

use candle_core::{DType, Device, Tensor, D};

use super::composed;
use super::fused::{self, HeadLayout};

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

    /// The `[seq, head_dim]` cos/sin rows of positions `offset..offset+seq`.
    fn rows(&self, offset: usize, seq: usize) -> candle_core::Result<(Tensor, Tensor)> {
        if offset + seq > self.cos.dim(0)? {
            candle_core::bail!(
                "position {} is beyond the rotary table ({} positions)",
                offset + seq,
                self.cos.dim(0)?
            );
        }
        Ok((
            self.cos.narrow(0, offset, seq)?,
            self.sin.narrow(0, offset, seq)?,
        ))
    }

    /// Applies the rotation to `x` `[batch, heads, seq, head_dim]` at positions
    /// `offset..offset+seq`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        let (cos, sin) = self.rows(offset, x.dim(2)?)?;
        rope(x, &cos, &sin)
    }

    /// Applies the rotation to a projection's output viewed per head, `x`
    /// `[batch, seq, heads, head_dim]`, and returns it as attention multiplies it,
    /// `[batch, heads, seq, head_dim]`. On the CPU the transpose is part of the fused kernel.
    pub fn apply_to_heads(&self, x: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        let (cos, sin) = self.rows(offset, x.dim(1)?)?;
        if fused::supports(&[x, &cos, &sin]) {
            fused::rope(x, &cos, &sin, HeadLayout::SeqFirst)
        } else {
            composed::rope(&x.transpose(1, 2)?.contiguous()?, &cos, &sin)
        }
    }
}

/// `x · cos + rotate_half(x) · sin` with `cos`, `sin` of shape `[seq, head_dim]` and `x`
/// `[batch, heads, seq, head_dim]`; `rotate_half([a, b]) = [-b, a]`. The fused kernel for
/// f32/f64 CPU tensors of one dtype, candle primitives elsewhere.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    if fused::supports(&[x, cos, sin]) && x.rank() == 4 {
        fused::rope(x, cos, sin, HeadLayout::HeadsFirst)
    } else {
        composed::rope(x, cos, sin)
    }
}
