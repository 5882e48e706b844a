//! Fused softmax over the last dimension: one max-shifted pass per row forward, and
//! `dx = y ⊙ (g - Σ g ⊙ y)` per row backward. A row whose entries are all `-inf` is the limit of
//! equal entries (uniform).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, last_dim, min_rows, supports, with_slice, Real};

/// The fused softmax op.
struct Softmax;

/// Softmax of every row of width `d`.
fn forward<T: Real>(x: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(min_rows(d))
        .for_each(|(o, row)| {
            let max = row.iter().fold(neg_inf, |m, &v| if v > m { v } else { m });
            if max == neg_inf {
                // All `-inf` (uniform), unless NaNs hid the real maximum (NaN row).
                let nan = row.iter().any(|v| v.is_nan());
                o.fill(T::from_f64(if nan { f64::NAN } else { 1.0 / d as f64 }));
                return;
            }
            let mut sum = 0.0f64;
            for (o, &v) in o.iter_mut().zip(row) {
                *o = (v - max).exp();
                sum += o.to_f64();
            }
            let inv = T::from_f64(1.0 / sum);
            o.iter_mut().for_each(|o| *o *= inv);
        });
    out
}

/// `y ⊙ (g - Σ g ⊙ y)` for every row of width `d`.
fn backward<T: Real>(y: &[T], g: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); y.len()];
    out.par_chunks_mut(d)
        .zip(y.par_chunks(d).zip(g.par_chunks(d)))
        .with_min_len(min_rows(d))
        .for_each(|(o, (y, g))| {
            let dot: f64 = y.iter().zip(g).map(|(&y, &g)| (y * g).to_f64()).sum();
            let dot = T::from_f64(dot);
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = y * (g - dot);
            }
        });
    out
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = last_dim(l, "softmax")?;
        let storage = match s {
            CpuStorage::F32(_) => CpuStorage::F32(forward(contiguous::<f32>(s, l, "softmax")?, d)),
            CpuStorage::F64(_) => CpuStorage::F64(forward(contiguous::<f64>(s, l, "softmax")?, d)),
            other => candle_core::bail!(
                "softmax: the fused kernel takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((storage, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let d = x.dim(candle_core::D::Minus1)?;
        fn run<T: Real>(y: &Tensor, g: &Tensor, d: usize) -> candle_core::Result<Tensor> {
            let out = with_slice::<T, _>(y, "softmax backward", |ys| {
                with_slice::<T, _>(g, "softmax backward", |gs| Ok(backward(ys, gs, d)))
            })?;
            Tensor::from_vec(out, y.shape(), y.device())
        }
        let dx = match y.dtype() {
            DType::F32 => run::<f32>(y, &g.to_dtype(DType::F32)?, d)?,
            DType::F64 => run::<f64>(y, &g.to_dtype(DType::F64)?, d)?,
            other => candle_core::bail!("softmax backward: unsupported dtype {other:?}"),
        };
        Ok(Some(dx))
    }
}

/// Softmax over the last dimension of an f32/f64 CPU tensor, differentiable.
pub fn softmax_last_dim(xs: &Tensor) -> candle_core::Result<Tensor> {
    if !supports(&[xs]) {
        candle_core::bail!(
            "fused softmax needs an f32/f64 CPU tensor, got {:?} on {:?}",
            xs.dtype(),
            xs.device().location()
        );
    }
    if xs.rank() == 0 || xs.dim(candle_core::D::Minus1)? == 0 {
        candle_core::bail!(
            "softmax: input of shape {:?} has no last dimension to normalise",
            xs.dims()
        );
    }
    let xs = xs.contiguous()?;
    if xs.track_op() {
        xs.apply_op1(Softmax)
    } else {
        xs.apply_op1_no_bwd(&Softmax)
    }
}
