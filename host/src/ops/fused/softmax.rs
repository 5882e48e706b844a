//! Fused softmax over the last dimension: one max-shifted pass per row forward, and
//! `dx = y ⊙ (g - Σ g ⊙ y)` per row backward. A row whose entries are all `-inf` is the limit of
//! equal entries (uniform).
//!
//! [`attention_softmax`] is the same kernel for attention scores: `softmax(x · scale + bias)`
//! with the scale and the (constant) mask bias applied in the same pass, so neither the scaled
//! nor the biased `[batch, heads, q, k]` scores exist as tensors; its backward is
//! `dx = scale · y ⊙ (g - Σ g ⊙ y)`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, last_dim, min_rows, supports, with_slice, Real};

/// The fused softmax op: `softmax(x · scale + bias)` over the last dimension.
struct Softmax {
    scale: f64,
    /// `[1 or batch, 1, q, k]`, contiguous, of the input's dtype; broadcast over the heads.
    bias: Option<Tensor>,
}

/// A bias broadcast over the rows of `[batch, heads, q, k]` scores.
#[derive(Clone, Copy)]
struct RowBias<'a, T> {
    data: &'a [T],
    /// Query rows per batch entry (`heads · q`).
    rows_per_batch: usize,
    /// Query rows of the bias (`q`).
    q: usize,
    /// Whether the bias has one entry per batch entry (otherwise one for all).
    per_batch: bool,
}

impl<T> RowBias<'_, T> {
    /// The bias row of score row `r`.
    fn row(&self, r: usize, d: usize) -> &[T] {
        let b = if self.per_batch {
            r / self.rows_per_batch
        } else {
            0
        };
        let i = b * self.q + r % self.q;
        &self.data[i * d..(i + 1) * d]
    }
}

/// Softmax of every row of width `d` of `x · scale + bias`.
fn forward<T: Real>(x: &[T], d: usize, scale: T, bias: Option<RowBias<'_, T>>) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    let one = T::from_f64(1.0);
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .with_min_len(min_rows(d))
        .for_each(|(r, (o, row))| {
            // The logits, written into the output first.
            match bias {
                Some(bias) => {
                    for ((o, &v), &b) in o.iter_mut().zip(row).zip(bias.row(r, d)) {
                        *o = v * scale + b;
                    }
                }
                None if scale == one => o.copy_from_slice(row),
                None => o.iter_mut().zip(row).for_each(|(o, &v)| *o = v * scale),
            }
            let max = o.iter().fold(neg_inf, |m, &v| if v > m { v } else { m });
            if max == neg_inf {
                // All `-inf` (uniform), unless NaNs hid the real maximum (NaN row).
                let nan = o.iter().any(|v| v.is_nan());
                o.fill(T::from_f64(if nan { f64::NAN } else { 1.0 / d as f64 }));
                return;
            }
            let mut sum = 0.0f64;
            for o in o.iter_mut() {
                *o = (*o - max).exp();
                sum += o.to_f64();
            }
            let inv = T::from_f64(1.0 / sum);
            o.iter_mut().for_each(|o| *o *= inv);
        });
    out
}

/// `scale · y ⊙ (g - Σ g ⊙ y)` for every row of width `d`.
fn backward<T: Real>(y: &[T], g: &[T], d: usize, scale: T) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); y.len()];
    out.par_chunks_mut(d)
        .zip(y.par_chunks(d).zip(g.par_chunks(d)))
        .with_min_len(min_rows(d))
        .for_each(|(o, (y, g))| {
            let dot: f64 = y.iter().zip(g).map(|(&y, &g)| (y * g).to_f64()).sum();
            let dot = T::from_f64(dot);
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = y * (g - dot) * scale;
            }
        });
    out
}

impl Softmax {
    /// Runs the forward kernel on the contiguous rows `x` of a tensor of shape `dims`.
    fn run<T: Real>(&self, x: &[T], dims: &[usize]) -> candle_core::Result<Vec<T>> {
        let d = dims.last().copied().unwrap_or(1);
        let scale = T::from_f64(self.scale);
        let Some(bias) = &self.bias else {
            return Ok(forward(x, d, scale, None));
        };
        let (q, rows_per_batch) = match dims {
            [_, h, q, _] => (*q, h * q),
            _ => candle_core::bail!("attention softmax: scores of shape {dims:?} are not 4-D"),
        };
        with_slice::<T, _>(bias, "attention softmax", |data| {
            let rows = RowBias {
                data,
                rows_per_batch,
                q,
                per_batch: bias.dim(0)? > 1,
            };
            Ok(forward(x, d, scale, Some(rows)))
        })
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        last_dim(l, "softmax")?;
        let dims = l.dims();
        let storage = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.run(contiguous(s, l, "softmax")?, dims)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.run(contiguous(s, l, "softmax")?, dims)?),
            other => candle_core::bail!(
                "softmax: the fused kernel takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((storage, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let d = x.dim(candle_core::D::Minus1)?;
        fn run<T: Real>(
            y: &Tensor,
            g: &Tensor,
            d: usize,
            scale: f64,
        ) -> candle_core::Result<Tensor> {
            let out = with_slice::<T, _>(y, "softmax backward", |ys| {
                with_slice::<T, _>(g, "softmax backward", |gs| {
                    Ok(backward(ys, gs, d, T::from_f64(scale)))
                })
            })?;
            Tensor::from_vec(out, y.shape(), y.device())
        }
        let dx = match y.dtype() {
            DType::F32 => run::<f32>(y, &g.to_dtype(DType::F32)?, d, self.scale)?,
            DType::F64 => run::<f64>(y, &g.to_dtype(DType::F64)?, d, self.scale)?,
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
    apply(
        xs,
        Softmax {
            scale: 1.0,
            bias: None,
        },
    )
}

/// `softmax(scores · scale + bias)` over the last dimension of attention scores
/// `[batch, heads, q, k]` (f32/f64 on the CPU), with an optional constant `bias` of shape
/// `[batch or 1, 1, q, k]` and the scores' dtype (see [`crate::ops::attention_bias`]).
/// Differentiable in `scores`; the bias gets no gradient.
pub fn attention_softmax(
    scores: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    if !supports_attention(scores, bias) {
        candle_core::bail!(
            "fused attention softmax needs 4-D f32/f64 CPU scores [b, h, q, k] and a bias \
             [b or 1, 1, q, k] of their dtype, got {:?} and {:?}",
            scores.dims(),
            bias.map(|b| b.dims().to_vec())
        );
    }
    let bias = bias.map(Tensor::contiguous).transpose()?;
    apply(scores, Softmax { scale, bias })
}

/// Whether [`attention_softmax`] takes these scores and this bias.
pub fn supports_attention(scores: &Tensor, bias: Option<&Tensor>) -> bool {
    let [b, _, q, k] = scores.dims() else {
        return false;
    };
    match bias {
        None => supports(&[scores]) && k > &0,
        Some(bias) => {
            supports(&[scores, bias])
                && k > &0
                && matches!(bias.dims(), [bb, 1, bq, bk] if (*bb == 1 || bb == b) && bq == q && bk == k)
        }
    }
}

/// Applies the op to `xs` (made contiguous), recording its backward when `xs` is tracked.
fn apply(xs: &Tensor, op: Softmax) -> candle_core::Result<Tensor> {
    let xs = xs.contiguous()?;
    if xs.track_op() {
        xs.apply_op1(op)
    } else {
        xs.apply_op1_no_bwd(&op)
    }
}
