//! Global-norm gradient clipping (as `torch.nn.utils.clip_grad_norm_`).

use candle_core::{DType, Tensor};

use crate::Result;

/// The L2 norm of all gradients taken together (`None` entries are skipped).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads.iter().flatten() {
        sum += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(sum.sqrt())
}

/// Scales all gradients so that their global L2 norm is at most `max_norm`, and returns the norm
/// before clipping. Like PyTorch, the scale is `max_norm / (norm + 1e-6)` and only applied when
/// it is below 1.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let scale = max_norm / (norm + 1e-6);
    if scale < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}
