//! The causal-LM loss straight from the final hidden states, without the `[tokens, vocab]`
//! logits.
//!
//! With SmolLM2's 49152-token vocabulary the logits of a batch of 8 × 128 tokens are 200 MB in
//! f32, and the plain path keeps them, their softmax and their gradient alive through the
//! backward pass: the largest activations of the whole model. [`linear_cross_entropy`] computes
//! the mean cross-entropy of `hidden · weightᵀ` a chunk of rows at a time: each chunk's logits
//! give the chunk's loss and its gradient `(softmax − onehot) / n` at once, which is multiplied
//! straight into `d hidden = g · W` (and `d W += gᵀ · hidden` when the output weight trains), and
//! then freed. Only `d hidden` (`[tokens, hidden]`, 2.4 MB for the batch above) outlives the
//! call. Rows whose label is ignored (prompt, padding) are dropped before the product, so SFT
//! pays for the answer tokens only.
//!
//! The gradients reach autograd through a surrogate with the loss's value and gradient:
//! `L + s − detach(s)` with `s = Σ hidden ⊙ d hidden (+ Σ W ⊙ d W)`. Its value is `L` exactly
//! (`s − detach(s)` is 0) and its gradient with respect to `hidden` (and `W`) is the one computed
//! here, so the backward pass continues into the model as it would from the logits. The
//! floating-point operations are the same as the plain path's (one product forward, one or two
//! backward); they run during the forward call.

use candle_core::{DType, Tensor};

use super::{composed, fused, IGNORE_INDEX};

/// Logits elements per chunk: 8 M (32 MB in f32, turned into their own gradient in place). The
/// loss runs at the end of the forward pass, when every activation is alive, so a chunk adds to
/// the step's peak: on SmolLM2 (batch 8 × 128) 8 M-element chunks gave an 88 MB lower peak RSS
/// than 32 M ones for a 2% slower step.
const CHUNK_ELEMENTS: usize = 8 << 20;

/// Mean cross-entropy of the logits `hidden · weightᵀ` (`hidden` `[n, d]`, `weight`
/// `[vocab, d]`) against `targets` `[n]` (integer ids, [`IGNORE_INDEX`] for rows that do not
/// count), computed chunk by chunk without materialising the `[n, vocab]` logits. Equal in value
/// and gradients to `cross_entropy(hidden.matmul(weightᵀ), targets)`; the gradient with respect
/// to `weight` is computed only when `weight_trains`. 0 (with zero gradients) when no target
/// counts.
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    weight_trains: bool,
) -> candle_core::Result<Tensor> {
    let vocab = weight.dim(0)?.max(1);
    let kernel = Kernel::for_tensor(hidden);
    chunked(
        hidden,
        weight,
        targets,
        weight_trains,
        CHUNK_ELEMENTS / vocab,
        kernel,
    )
}

/// How a chunk's loss and logits gradient are computed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kernel {
    /// The fused CPU kernel (f32/f64 CPU tensors).
    Fused,
    /// Candle primitives (any device and dtype).
    Composed,
}

impl Kernel {
    fn for_tensor(t: &Tensor) -> Kernel {
        if fused::supports(&[t]) {
            Kernel::Fused
        } else {
            Kernel::Composed
        }
    }
}

/// [`linear_cross_entropy`] with `chunk_rows` rows of logits at a time.
fn chunked(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    weight_trains: bool,
    chunk_rows: usize,
    kernel: Kernel,
) -> candle_core::Result<Tensor> {
    let (n, d) = hidden.dims2()?;
    let (vocab, wd) = weight.dims2()?;
    if wd != d {
        candle_core::bail!(
            "linear cross-entropy: hidden states of width {d} but an output weight of shape \
             [{vocab}, {wd}]"
        );
    }
    let all: Vec<i64> = targets.to_dtype(DType::I64)?.to_vec1()?;
    if all.len() != n {
        candle_core::bail!(
            "linear cross-entropy: {n} hidden rows but {} targets",
            all.len()
        );
    }
    if let Some((row, t)) = all
        .iter()
        .enumerate()
        .find(|(_, &t)| t != IGNORE_INDEX && !(0..vocab as i64).contains(&t))
    {
        candle_core::bail!(
            "linear cross-entropy: target {t} of row {row} is outside 0..{vocab} (and is not \
             the ignore index {IGNORE_INDEX})"
        );
    }
    let kept: Vec<u32> = (0..n)
        .filter(|&i| all[i] != IGNORE_INDEX)
        .map(|i| i as u32)
        .collect();
    if kept.is_empty() {
        // Nothing counts: a zero loss that still belongs to the graph (zero gradients).
        // (Multiplying by zeros, not `affine(0, 0)`: candle drops the gradient of the latter.)
        return hidden.mul(&hidden.zeros_like()?)?.sum_all();
    }
    let (hidden, targets) = if kept.len() == n {
        (hidden.clone(), all)
    } else {
        let index = Tensor::new(kept.as_slice(), hidden.device())?;
        let targets = kept.iter().map(|&i| all[i as usize]).collect();
        (hidden.index_select(&index, 0)?, targets)
    };
    let rows = targets.len();
    let scale = 1.0 / rows as f64;
    let chunk = chunk_rows.clamp(1, rows);
    let h = hidden.detach();
    let w = weight.detach();
    let wt = w.t()?;
    let mut loss_sum = 0.0;
    let mut d_hidden = Vec::with_capacity(rows.div_ceil(chunk));
    let mut d_weight: Option<Tensor> = None;
    for start in (0..rows).step_by(chunk) {
        let len = chunk.min(rows - start);
        let h_chunk = h.narrow(0, start, len)?;
        let chunk_targets = &targets[start..start + len];
        let owned = match kernel {
            Kernel::Fused => super::matmul::product_values(&h_chunk, &wt),
            Kernel::Composed => None,
        };
        let (sum, grad) = match owned {
            // The logits buffer becomes their gradient.
            Some(logits) => {
                fused::loss_sum_and_grad_owned(logits, vocab, chunk_targets, scale, h.device())?
            }
            None => {
                let logits = super::matmul(&h_chunk, &wt)?;
                match kernel {
                    Kernel::Fused => fused::loss_sum_and_grad(&logits, chunk_targets, scale)?,
                    Kernel::Composed => composed_loss_sum_and_grad(&logits, chunk_targets, scale)?,
                }
            }
        };
        loss_sum += sum;
        d_hidden.push(super::matmul(&grad, &w)?);
        if weight_trains {
            let dw = super::matmul(&grad.t()?, &h_chunk)?;
            d_weight = Some(match d_weight {
                Some(acc) => (acc + dw)?,
                None => dw,
            });
        }
    }
    let d_hidden = Tensor::cat(&d_hidden, 0)?;
    let mut surrogate = (&hidden * &d_hidden)?.sum_all()?;
    if let Some(dw) = &d_weight {
        surrogate = (surrogate + (weight * dw)?.sum_all()?)?;
    }
    let zero = (&surrogate - surrogate.detach())?;
    zero.affine(1.0, loss_sum * scale)
}

/// The summed loss of a chunk's rows (every target valid) and `scale ·` its gradient with
/// respect to the logits, from candle primitives.
fn composed_loss_sum_and_grad(
    logits: &Tensor,
    targets: &[i64],
    scale: f64,
) -> candle_core::Result<(f64, Tensor)> {
    let (rows, vocab) = logits.dims2()?;
    let device = logits.device();
    let ids: Vec<u32> = targets.iter().map(|&t| t as u32).collect();
    let ids = Tensor::from_vec(ids, (rows, 1), device)?;
    let log_probs = composed::log_softmax_last_dim(logits)?;
    let picked = log_probs.gather(&ids, 1)?;
    let sum = picked.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let classes = Tensor::arange(0u32, vocab as u32, device)?.unsqueeze(0)?;
    let onehot = ids.broadcast_eq(&classes)?.to_dtype(logits.dtype())?;
    let grad = ((log_probs.exp()? - onehot)? * scale)?;
    Ok((-sum, grad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Value and gradients (hidden, weight) of `loss(hidden, weight)`.
    fn value_and_grads(
        hidden: &Var,
        weight: &Var,
        loss: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    ) -> (f64, Tensor, Option<Tensor>) {
        let l = loss(hidden.as_tensor(), weight.as_tensor()).unwrap();
        let grads = l.backward().unwrap();
        (
            l.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(),
            grads.get(hidden.as_tensor()).unwrap().clone(),
            grads.get(weight.as_tensor()).cloned(),
        )
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn every_chunking_and_kernel_equals_the_plain_loss() {
        let d = Device::Cpu;
        let hidden = Var::from_tensor(&Tensor::randn(0f64, 1.0, (7, 5), &d).unwrap()).unwrap();
        let weight = Var::from_tensor(&Tensor::randn(0f64, 1.0, (11, 5), &d).unwrap()).unwrap();
        let targets = Tensor::new(&[3i64, -100, 10, 0, 7, -100, 2], &d).unwrap();
        let (want, want_dh, want_dw) = value_and_grads(&hidden, &weight, |h, w| {
            crate::ops::cross_entropy(&h.matmul(&w.t()?)?, &targets)
        });
        for kernel in [Kernel::Fused, Kernel::Composed] {
            for chunk_rows in [1, 2, 3, 5, 100] {
                for weight_trains in [true, false] {
                    let (got, dh, dw) = value_and_grads(&hidden, &weight, |h, w| {
                        chunked(h, w, &targets, weight_trains, chunk_rows, kernel)
                    });
                    let what =
                        format!("{kernel:?} chunks of {chunk_rows}, W trains {weight_trains}");
                    assert!((got - want).abs() < 1e-12, "{what}: {got} vs {want}");
                    assert!(max_diff(&dh, &want_dh) < 1e-12, "{what}: d hidden");
                    match (weight_trains, dw) {
                        (true, Some(dw)) => {
                            assert!(
                                max_diff(&dw, want_dw.as_ref().unwrap()) < 1e-12,
                                "{what}: dW"
                            )
                        }
                        (false, None) => {}
                        (_, dw) => panic!("{what}: dW is {dw:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn f32_logits_turned_into_their_gradient_in_place_equal_the_composed_loss() {
        // f32 operands take the OpenBLAS path, whose logits buffer becomes the gradient.
        let d = Device::Cpu;
        let hidden = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 5), &d).unwrap()).unwrap();
        let weight = Var::from_tensor(&Tensor::randn(0f32, 1.0, (11, 5), &d).unwrap()).unwrap();
        let targets = Tensor::new(&[3i64, -100, 10, 0, 7, -100, 2], &d).unwrap();
        let owned = crate::ops::matmul::product_values(hidden.as_tensor(), &weight.t().unwrap());
        assert_eq!(owned.is_some(), crate::ops::blas::backend().is_some());
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        for chunk_rows in [1, 3, 100] {
            let run = |kernel| {
                value_and_grads(&hidden, &weight, |h, w| {
                    chunked(h, w, &targets, true, chunk_rows, kernel)
                })
            };
            let (got, dh, dw) = run(Kernel::Fused);
            let (want, want_dh, want_dw) = run(Kernel::Composed);
            assert!(
                (got - want).abs() < 1e-5,
                "chunks of {chunk_rows}: {got} vs {want}"
            );
            assert!(max_diff(&f64s(&dh), &f64s(&want_dh)) < 1e-5);
            assert!(max_diff(&f64s(&dw.unwrap()), &f64s(&want_dw.unwrap())) < 1e-5);
        }
    }

    #[test]
    fn no_counted_row_is_a_zero_loss_and_bad_targets_are_refused() {
        let d = Device::Cpu;
        let hidden = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3), &d).unwrap()).unwrap();
        let weight = Tensor::randn(0f32, 1.0, (4, 3), &d).unwrap();
        let ignored = Tensor::new(&[-100i64, -100], &d).unwrap();
        let loss = linear_cross_entropy(hidden.as_tensor(), &weight, &ignored, false).unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
        let grads = loss.backward().unwrap();
        let dh = grads.get(hidden.as_tensor()).unwrap();
        assert_eq!(
            dh.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let bad = Tensor::new(&[1i64, 4], &d).unwrap();
        let err = linear_cross_entropy(hidden.as_tensor(), &weight, &bad, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("target 4 of row 1"), "{err}");
    }
}
