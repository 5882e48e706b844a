//! Fused RMSNorm `y = x · r · w` with `r = 1 / sqrt(mean(x²) + eps)` per row of width `d`.
//!
//! Backward, with `a = g ⊙ w`: `dx = r · a - x · r³ · (Σ a ⊙ x) / d` and `dw = Σ_rows g ⊙ x · r`.
//! The weight gradient is computed only when the weight is tracked (trainable), the input
//! gradient only when the input is. Statistics are accumulated in f64.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{column_sums, contiguous, min_rows, supports, with_slice, Real};

/// The fused RMSNorm op.
struct RmsNorm {
    eps: f64,
}

/// `1 / sqrt(mean(x²) + eps)` of a row.
fn inv_rms<T: Real>(row: &[T], eps: f64) -> f64 {
    let sq: f64 = row.iter().map(|&v| v.to_f64() * v.to_f64()).sum();
    1.0 / (sq / row.len() as f64 + eps).sqrt()
}

fn forward<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(min_rows(d))
        .for_each(|(o, row)| {
            let r = inv_rms(row, eps);
            for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
                *o = T::from_f64(v.to_f64() * r * w.to_f64());
            }
        });
    out
}

/// `(dx, dw)`, each computed only when asked for.
fn backward<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    eps: f64,
    want_dx: bool,
    want_dw: bool,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let d = w.len();
    let inv: Vec<f64> = x
        .par_chunks(d)
        .with_min_len(min_rows(d))
        .map(|row| inv_rms(row, eps))
        .collect();
    let dx = want_dx.then(|| {
        let mut out = vec![T::from_f64(0.0); x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .zip(inv.par_iter())
            .with_min_len(min_rows(d))
            .for_each(|((o, (x, g)), &r)| {
                let ax: f64 = x
                    .iter()
                    .zip(g)
                    .zip(w)
                    .map(|((&x, &g), &w)| g.to_f64() * w.to_f64() * x.to_f64())
                    .sum();
                let c = r * r * r * ax / d as f64;
                for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
                    *o = T::from_f64(r * g.to_f64() * w.to_f64() - x.to_f64() * c);
                }
            });
        out
    });
    let dw = want_dw.then(|| column_sums(x, g, &inv, d, |x, g, r| g * x * r));
    (dx, dw)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(forward(
                contiguous::<f32>(s1, l1, "rms_norm")?,
                contiguous::<f32>(s2, l2, "rms_norm")?,
                self.eps,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(forward(
                contiguous::<f64>(s1, l1, "rms_norm")?,
                contiguous::<f64>(s2, l2, "rms_norm")?,
                self.eps,
            )),
            _ => candle_core::bail!(
                "rms_norm: the fused kernel takes f32 or f64 input and weight of the same dtype, \
                 got {:?} and {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_dx, want_dw) = (x.track_op(), w.track_op());
        fn run<T: Real>(
            op: &RmsNorm,
            x: &Tensor,
            w: &Tensor,
            g: &Tensor,
            want: (bool, bool),
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            let g = g.to_dtype(T::DTYPE)?;
            let (dx, dw) = with_slice::<T, _>(x, "rms_norm backward", |xs| {
                with_slice::<T, _>(w, "rms_norm backward", |ws| {
                    with_slice::<T, _>(&g, "rms_norm backward", |gs| {
                        Ok(backward(xs, ws, gs, op.eps, want.0, want.1))
                    })
                })
            })?;
            let dx = dx
                .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
                .transpose()?;
            let dw = dw
                .map(|v| Tensor::from_vec(v, w.shape(), w.device()))
                .transpose()?;
            Ok((dx, dw))
        }
        match x.dtype() {
            DType::F32 => run::<f32>(self, x, w, g, (want_dx, want_dw)),
            DType::F64 => run::<f64>(self, x, w, g, (want_dx, want_dw)),
            other => candle_core::bail!("rms_norm backward: unsupported dtype {other:?}"),
        }
    }
}

/// RMSNorm over the last dimension of an f32/f64 CPU tensor `x` `[..., d]` with `weight` `[d]`
/// of the same dtype; differentiable in `x` and, when it is trainable, in `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !supports(&[x, weight]) {
        candle_core::bail!(
            "fused rms_norm needs f32/f64 CPU tensors of one dtype, got {:?} and {:?} on {:?}",
            x.dtype(),
            weight.dtype(),
            x.device().location()
        );
    }
    let layout_d = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [layout_d] || layout_d == 0 {
        candle_core::bail!(
            "rms_norm: weight has shape {:?}, expected [{layout_d}] (the input's last dimension)",
            weight.dims()
        );
    }
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let op = RmsNorm { eps };
    if x.track_op() || weight.track_op() {
        x.apply_op2(&weight, op)
    } else {
        x.apply_op2_no_bwd(&weight, &op)
    }
}
