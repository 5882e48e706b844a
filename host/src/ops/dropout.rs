//! Dropout with a seeded RNG (candle's CPU RNG cannot be seeded, so runs would not repeat).
//!
//! On f32/f64 CPU tensors it is [`super::fused::dropout`]: one key drawn from the generator per
//! call, the mask a hash of key and element index (drawn in parallel, recomputed in the backward
//! pass, never stored). Elsewhere (CUDA, Metal, half precision) the mask is drawn element by
//! element from the generator and multiplied in.

use candle_core::Tensor;
use rand::{Rng, RngCore};

/// Zeroes each element with probability `p` and scales the rest by `1/(1-p)`. `p = 0` returns
/// `x` unchanged.
pub fn dropout(x: &Tensor, p: f32, rng: &mut dyn RngCore) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    if super::fused::supports(&[x]) {
        return super::fused::dropout(x, p, rng.next_u64());
    }
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}
