//! Fused LayerNorm `y = (x - μ) · r · w + b` with `r = 1 / sqrt(var(x) + eps)` per row of width
//! `d` (biased variance, as PyTorch).
//!
//! Backward, with `x̂ = (x - μ) · r` and `a = g ⊙ w`:
//! `dx = r · (a - mean(a) - x̂ · mean(a ⊙ x̂))`, `dw = Σ_rows g ⊙ x̂`, `db = Σ_rows g`; each is
//! computed only when its tensor is tracked. Statistics are accumulated in f64.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{column_sums, contiguous, min_rows, supports, with_slice, Real};

/// The fused LayerNorm op.
struct LayerNorm {
    eps: f64,
}

/// `(μ, r)` of a row.
fn stats<T: Real>(row: &[T], eps: f64) -> (f64, f64) {
    let d = row.len() as f64;
    let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / d;
    let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

fn forward<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .with_min_len(min_rows(d))
        .for_each(|(o, row)| {
            let (mean, r) = stats(row, eps);
            for (((o, &v), &w), &b) in o.iter_mut().zip(row).zip(w).zip(b) {
                *o = T::from_f64((v.to_f64() - mean) * r * w.to_f64() + b.to_f64());
            }
        });
    out
}

/// Which gradients to compute: `(dx, dw, db)`.
type Wanted = (bool, bool, bool);

/// Gradients `(dx, dw, db)`, each computed only when wanted.
type Grads<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

fn backward<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64, want: Wanted) -> Grads<T> {
    let d = w.len();
    let st: Vec<(f64, f64)> = x
        .par_chunks(d)
        .with_min_len(min_rows(d))
        .map(|row| stats(row, eps))
        .collect();
    let dx = want.0.then(|| {
        let mut out = vec![T::from_f64(0.0); x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .zip(st.par_iter())
            .with_min_len(min_rows(d))
            .for_each(|((o, (x, g)), &(mean, r))| {
                let (mut sum_a, mut sum_ax) = (0.0f64, 0.0f64);
                for ((&x, &g), &w) in x.iter().zip(g).zip(w) {
                    let a = g.to_f64() * w.to_f64();
                    sum_a += a;
                    sum_ax += a * (x.to_f64() - mean) * r;
                }
                let (mean_a, mean_ax) = (sum_a / d as f64, sum_ax / d as f64);
                for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
                    let xhat = (x.to_f64() - mean) * r;
                    *o = T::from_f64(r * (g.to_f64() * w.to_f64() - mean_a - xhat * mean_ax));
                }
            });
        out
    });
    let dw = want
        .1
        .then(|| column_sums(x, g, &st, d, |x, g, (mean, r)| g * (x - mean) * r));
    let db = want.2.then(|| column_sums(x, g, &st, d, |_, g, _| g));
    (dx, dw, db)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        const OP: &str = "layer_norm";
        let storage = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(forward(
                    contiguous::<f32>(s1, l1, OP)?,
                    contiguous::<f32>(s2, l2, OP)?,
                    contiguous::<f32>(s3, l3, OP)?,
                    self.eps,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(forward(
                    contiguous::<f64>(s1, l1, OP)?,
                    contiguous::<f64>(s2, l2, OP)?,
                    contiguous::<f64>(s3, l3, OP)?,
                    self.eps,
                ))
            }
            _ => candle_core::bail!(
                "layer_norm: the fused kernel takes f32 or f64 tensors of one dtype, got {:?}, \
                 {:?} and {:?}",
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            ),
        };
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want = (x.track_op(), w.track_op(), b.track_op());
        fn run<T: Real>(
            eps: f64,
            x: &Tensor,
            w: &Tensor,
            b: &Tensor,
            g: &Tensor,
            want: Wanted,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            const OP: &str = "layer_norm backward";
            let g = g.to_dtype(T::DTYPE)?;
            let (dx, dw, db) = with_slice::<T, _>(x, OP, |xs| {
                with_slice::<T, _>(w, OP, |ws| {
                    with_slice::<T, _>(&g, OP, |gs| Ok(backward(xs, ws, gs, eps, want)))
                })
            })?;
            let to = |v: Option<Vec<T>>, like: &Tensor| {
                v.map(|v| Tensor::from_vec(v, like.shape(), like.device()))
                    .transpose()
            };
            Ok((to(dx, x)?, to(dw, w)?, to(db, b)?))
        }
        match x.dtype() {
            DType::F32 => run::<f32>(self.eps, x, w, b, g, want),
            DType::F64 => run::<f64>(self.eps, x, w, b, g, want),
            other => candle_core::bail!("layer_norm backward: unsupported dtype {other:?}"),
        }
    }
}

/// LayerNorm over the last dimension of an f32/f64 CPU tensor `x` `[..., d]` with `weight` and
/// `bias` `[d]` of the same dtype; differentiable in `x` and in whichever of `weight`, `bias` is
/// trainable.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if !supports(&[x, weight, bias]) {
        candle_core::bail!(
            "fused layer_norm needs f32/f64 CPU tensors of one dtype, got {:?}, {:?} and {:?} on \
             {:?}",
            x.dtype(),
            weight.dtype(),
            bias.dtype(),
            x.device().location()
        );
    }
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] || d == 0 {
        candle_core::bail!(
            "layer_norm: weight {:?} and bias {:?} must both have shape [{d}] (the input's last \
             dimension)",
            weight.dims(),
            bias.dims()
        );
    }
    let (x, weight, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    let op = LayerNorm { eps };
    if x.track_op() || weight.track_op() || bias.track_op() {
        x.apply_op3(&weight, &bias, op)
    } else {
        x.apply_op3_no_bwd(&weight, &bias, &op)
    }
}
