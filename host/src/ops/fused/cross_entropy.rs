//! Fused cross-entropy over `[..., classes]` logits with Hugging Face's ignore index.
//!
//! Forward: one pass per row computes the row's log-sum-exp (max-shifted) and
//! `lse - logit[target]`; the loss is the mean over the rows whose target is not
//! [`IGNORE_INDEX`] (0 when there is none). The per-row log-sum-exps (`n` numbers) are kept for
//! the backward pass, which writes `(softmax(row) - onehot(target)) · grad / count` for valid
//! rows and 0 for ignored rows in one more pass. A row whose logits are all `-inf` is the limit
//! of equal logits: uniform probabilities, loss `ln(classes)`. NaN logits give a NaN loss.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, last_dim, min_rows, scalar, supports, vectorized, with_slice, Real};
use crate::ops::IGNORE_INDEX;

/// The fused cross-entropy op; `lse` caches the per-row log-sum-exps of the forward pass.
#[derive(Default)]
struct CrossEntropy {
    lse: OnceLock<Vec<Lse>>,
}

/// A row's log-sum-exp kept as `max + log_sum` with `log_sum = ln Σ exp(x - max)`: the two
/// parts are not added, so that huge logits (e.g. `-1e30`) do not absorb `log_sum`.
#[derive(Clone, Copy)]
struct Lse {
    /// The row's largest entry, `-inf` when every entry is `-inf` (or for an ignored row).
    max: f64,
    /// `ln Σ exp(x - max)`.
    log_sum: f64,
}

/// Elements whose exponentials [`logsumexp`] computes at once.
const EXP_BLOCK: usize = 256;

/// Log-sum-exp of a row.
fn logsumexp<T: Real>(row: &[T]) -> Lse {
    let neg_inf = T::from_f64(f64::NEG_INFINITY);
    let max = row.iter().fold(neg_inf, |m, &v| if v > m { v } else { m });
    if max == neg_inf {
        // All `-inf`, unless NaNs (which the comparisons skip) hid the real maximum.
        let nan = row.iter().any(|v| v.is_nan());
        return Lse {
            max: if nan { f64::NAN } else { f64::NEG_INFINITY },
            log_sum: 0.0,
        };
    }
    // Exponentials a block at a time as vector code, each block summed in f64.
    let mut sum = 0.0f64;
    let mut block = [T::from_f64(0.0); EXP_BLOCK];
    for chunk in row.chunks(EXP_BLOCK) {
        let block = &mut block[..chunk.len()];
        vectorized(
            #[inline(always)]
            || {
                for (e, &v) in block.iter_mut().zip(chunk) {
                    *e = (v - max).exp();
                }
            },
        );
        sum += block.iter().map(|e| e.to_f64()).sum::<f64>();
    }
    Lse {
        max: max.to_f64(),
        log_sum: sum.ln(),
    }
}

/// Checks `target` against `classes`; `Ok(None)` for an ignored row.
fn target_index(target: i64, row: usize, classes: usize) -> candle_core::Result<Option<usize>> {
    if target == IGNORE_INDEX {
        return Ok(None);
    }
    match usize::try_from(target) {
        Ok(t) if t < classes => Ok(Some(t)),
        _ => candle_core::bail!(
            "cross-entropy: target {target} of row {row} is outside 0..{classes} (and is not the \
             ignore index {IGNORE_INDEX})"
        ),
    }
}

/// Per-row loss and log-sum-exp (loss 0 for ignored rows).
fn row_stats<T: Real>(
    logits: &[T],
    targets: &[i64],
    classes: usize,
) -> candle_core::Result<Vec<(f64, Lse)>> {
    logits
        .par_chunks(classes)
        .zip(targets.par_iter())
        .enumerate()
        .with_min_len(min_rows(classes))
        .map(|(i, (row, &target))| {
            let Some(t) = target_index(target, i, classes)? else {
                return Ok((
                    0.0,
                    Lse {
                        max: f64::NEG_INFINITY,
                        log_sum: 0.0,
                    },
                ));
            };
            let lse = logsumexp(row);
            let loss = if lse.max == f64::NEG_INFINITY {
                (classes as f64).ln()
            } else {
                // Both are entries of the row: their difference is exact.
                (lse.max - row[t].to_f64()) + lse.log_sum
            };
            Ok((loss, lse))
        })
        .collect()
}

/// Number of rows whose target is not ignored.
fn valid_count(targets: &[i64]) -> usize {
    targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
}

/// `d logits` for upstream gradient `scale = grad / count`.
fn grad_kernel<T: Real>(
    logits: &[T],
    targets: &[i64],
    lse: &[Lse],
    classes: usize,
    scale: f64,
) -> Vec<T> {
    let mut out = logits.to_vec();
    grad_in_place(&mut out, targets, lse, classes, scale);
    out
}

/// Turns the logits `[n, classes]` in `values` into the gradient of `scale ·` the summed loss,
/// row by row (0 on ignored rows).
fn grad_in_place<T: Real>(
    values: &mut [T],
    targets: &[i64],
    lse: &[Lse],
    classes: usize,
    scale: f64,
) {
    values
        .par_chunks_mut(classes)
        .zip(targets.par_iter().zip(lse.par_iter()))
        .with_min_len(min_rows(classes))
        .for_each(|(row, (&target, &lse))| {
            // Targets were validated by the forward pass.
            let t = match usize::try_from(target) {
                Ok(t) if t < classes => t,
                _ => {
                    row.fill(T::from_f64(0.0));
                    return;
                }
            };
            if lse.max == f64::NEG_INFINITY {
                row.fill(T::from_f64(scale / classes as f64));
            } else {
                let (max, log_sum) = (T::from_f64(lse.max), T::from_f64(lse.log_sum));
                let s = T::from_f64(scale);
                vectorized(
                    #[inline(always)]
                    || {
                        for v in row.iter_mut() {
                            *v = ((*v - max) - log_sum).exp() * s;
                        }
                    },
                );
            }
            row[t] -= T::from_f64(scale);
        });
}

/// The targets of the forward pass as i64 (from i64 or u32 storage).
fn targets_of(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Vec<i64>> {
    match storage {
        CpuStorage::I64(_) => Ok(contiguous::<i64>(storage, layout, "cross-entropy")?.to_vec()),
        CpuStorage::U32(_) => Ok(contiguous::<u32>(storage, layout, "cross-entropy")?
            .iter()
            .map(|&t| i64::from(t))
            .collect()),
        other => candle_core::bail!(
            "cross-entropy: targets must be i64 or u32, got {:?}",
            other.dtype()
        ),
    }
}

impl CrossEntropy {
    /// Mean loss over valid rows; caches the log-sum-exps.
    fn forward<T: Real>(
        &self,
        logits: &[T],
        targets: &[i64],
        classes: usize,
    ) -> candle_core::Result<f64> {
        let stats = row_stats(logits, targets, classes)?;
        let count = valid_count(targets);
        let total: f64 = stats.iter().map(|(loss, _)| loss).sum();
        let _ = self
            .lse
            .set(stats.into_iter().map(|(_, lse)| lse).collect());
        Ok(if count == 0 {
            0.0
        } else {
            total / count as f64
        })
    }

    /// `d logits` as a tensor shaped like `logits`.
    fn backward<T: Real>(
        &self,
        logits: &Tensor,
        targets: &[i64],
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let classes = logits.dim(candle_core::D::Minus1)?;
        let grad = with_slice::<T, _>(logits, "cross-entropy backward", |x| {
            let recomputed: Vec<Lse>;
            let lse = match self.lse.get() {
                Some(lse) => lse.as_slice(),
                None => {
                    recomputed = row_stats(x, targets, classes)?
                        .into_iter()
                        .map(|(_, lse)| lse)
                        .collect();
                    &recomputed
                }
            };
            Ok(grad_kernel(x, targets, lse, classes, scale))
        })?;
        Tensor::from_vec(grad, logits.shape(), logits.device())
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let classes = last_dim(l1, "cross-entropy")?;
        let n = l1.shape().elem_count() / classes;
        let targets = targets_of(s2, l2)?;
        if targets.len() != n {
            candle_core::bail!(
                "cross-entropy: {n} rows of logits but {} targets",
                targets.len()
            );
        }
        let storage = match s1 {
            CpuStorage::F32(_) => {
                let loss = self.forward(
                    contiguous::<f32>(s1, l1, "cross-entropy")?,
                    &targets,
                    classes,
                )?;
                CpuStorage::F32(vec![loss as f32])
            }
            CpuStorage::F64(_) => {
                let loss = self.forward(
                    contiguous::<f64>(s1, l1, "cross-entropy")?,
                    &targets,
                    classes,
                )?;
                CpuStorage::F64(vec![loss])
            }
            other => candle_core::bail!(
                "cross-entropy: the fused kernel takes f32 or f64 logits, got {:?}",
                other.dtype()
            ),
        };
        Ok((storage, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let targets = targets.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let count = valid_count(&targets);
        if count == 0 {
            return Ok((Some(logits.zeros_like()?), None));
        }
        let scale = scalar(grad)? / count as f64;
        let d = match logits.dtype() {
            DType::F32 => self.backward::<f32>(logits, &targets, scale)?,
            DType::F64 => self.backward::<f64>(logits, &targets, scale)?,
            other => candle_core::bail!("cross-entropy backward: unsupported dtype {other:?}"),
        };
        Ok((Some(d), None))
    }
}

/// The summed loss of the rows of `logits` `[n, classes]` (f32/f64, CPU) whose target is not
/// ignored, and the gradient of `scale ·` that sum with respect to the logits (0 on ignored
/// rows), computed directly: no autograd node, for callers that apply the chain rule themselves
/// (the chunked causal-LM loss, [`crate::ops::linear_cross_entropy`]).
pub fn loss_sum_and_grad(
    logits: &Tensor,
    targets: &[i64],
    scale: f64,
) -> candle_core::Result<(f64, Tensor)> {
    match logits.dtype() {
        DType::F32 => loss_sum_and_grad_as::<f32>(logits, targets, scale),
        DType::F64 => loss_sum_and_grad_as::<f64>(logits, targets, scale),
        other => candle_core::bail!(
            "cross-entropy: the fused kernel takes f32 or f64 logits, got {other:?}"
        ),
    }
}

fn loss_sum_and_grad_as<T: Real>(
    logits: &Tensor,
    targets: &[i64],
    scale: f64,
) -> candle_core::Result<(f64, Tensor)> {
    let (n, classes) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!(
            "cross-entropy: {n} rows of logits but {} targets",
            targets.len()
        );
    }
    let (total, grad) = with_slice::<T, _>(logits, "cross-entropy", |x| {
        let stats = row_stats(x, targets, classes)?;
        let total: f64 = stats.iter().map(|(loss, _)| loss).sum();
        let lse: Vec<Lse> = stats.into_iter().map(|(_, lse)| lse).collect();
        Ok((total, grad_kernel(x, targets, &lse, classes, scale)))
    })?;
    Ok((
        total,
        Tensor::from_vec(grad, (n, classes), logits.device())?,
    ))
}

/// [`loss_sum_and_grad`] on f32 logits `[targets.len(), classes]` in an owned buffer, which
/// becomes the gradient: one logits-sized buffer instead of two (128 MB less at the chunked
/// loss's 32 M-element chunks).
pub fn loss_sum_and_grad_owned(
    mut logits: Vec<f32>,
    classes: usize,
    targets: &[i64],
    scale: f64,
    device: &candle_core::Device,
) -> candle_core::Result<(f64, Tensor)> {
    let n = targets.len();
    if classes == 0 || logits.len() != n * classes {
        candle_core::bail!(
            "cross-entropy: {} logits are not {n} rows of {classes} classes",
            logits.len()
        );
    }
    let stats = row_stats(&logits, targets, classes)?;
    let total: f64 = stats.iter().map(|(loss, _)| loss).sum();
    let lse: Vec<Lse> = stats.into_iter().map(|(_, lse)| lse).collect();
    grad_in_place(&mut logits, targets, &lse, classes, scale);
    Ok((total, Tensor::from_vec(logits, (n, classes), device)?))
}

/// Mean cross-entropy of `logits` `[n, classes]` (f32/f64, CPU) against `targets` `[n]` (any
/// integer dtype), ignoring targets equal to [`IGNORE_INDEX`]; 0 (with a zero gradient) when no
/// target is valid. Errors on non-CPU or half-precision logits and on out-of-range targets.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if !supports(&[logits]) || !targets.device().is_cpu() {
        candle_core::bail!(
            "fused cross-entropy needs f32/f64 CPU tensors, got {:?} logits on {:?}",
            logits.dtype(),
            logits.device().location()
        );
    }
    let (n, _) = logits.dims2()?;
    if targets.dims() != [n] {
        candle_core::bail!(
            "cross-entropy: targets have shape {:?}, expected [{n}] to match the logits",
            targets.dims()
        );
    }
    apply(logits, targets)
}

/// Applies the op to `logits` `[..., classes]` and `targets` with one entry per row. Taking the
/// logits in any rank spares a reshape node, whose backward would cost candle one more
/// zero-fill and addition of a logits-sized gradient.
fn apply(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let classes = logits.dim(candle_core::D::Minus1)?;
    if classes == 0 {
        candle_core::bail!("cross-entropy: logits have no classes");
    }
    if targets.elem_count() * classes != logits.elem_count() {
        candle_core::bail!(
            "cross-entropy: {} targets for logits of shape {:?}",
            targets.elem_count(),
            logits.dims()
        );
    }
    let targets = match targets.dtype() {
        DType::I64 | DType::U32 => targets.clone(),
        _ => targets.to_dtype(DType::I64)?,
    };
    let targets = targets.contiguous()?;
    let logits = logits.contiguous()?;
    if logits.track_op() {
        logits.apply_op2(&targets, CrossEntropy::default())
    } else {
        logits.apply_op2_no_bwd(&targets, &CrossEntropy::default())
    }
}

/// Next-token loss of a causal LM on the CPU: `logits` `[b, s, vocab]` at position `t` predict
/// `labels` `[b, s]` at `t + 1`. Instead of slicing (and copying) the logits, the labels are
/// shifted left with [`IGNORE_INDEX`] in the last position, which selects the same terms.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        candle_core::bail!("causal LM loss needs sequences of at least 2 tokens, got {s}");
    }
    if labels.dims() != [b, s] {
        candle_core::bail!(
            "causal LM loss: labels have shape {:?}, expected [{b}, {s}] like the logits",
            labels.dims()
        );
    }
    let rows = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let shifted: Vec<i64> = rows
        .iter()
        .flat_map(|row| {
            row[1..]
                .iter()
                .copied()
                .chain(std::iter::once(IGNORE_INDEX))
        })
        .collect();
    if v == 0 || !supports(&[logits]) || !labels.device().is_cpu() {
        candle_core::bail!(
            "fused causal LM loss needs f32/f64 CPU logits with a vocabulary, got {:?} of shape \
             {:?} on {:?}",
            logits.dtype(),
            logits.dims(),
            logits.device().location()
        );
    }
    let targets = Tensor::from_vec(shifted, b * s, logits.device())?;
    apply(logits, &targets)
}
