//! Fused GELU, exact erf form (BERT's `hidden_act = "gelu"`): `y = x · Φ(x)` with
//! `Φ(x) = (1 + erf(x / √2)) / 2`.
//!
//! Backward: `dx = g · (Φ(x) + x · φ(x))`, `φ(x) = e^{−x²/2} / √(2π)`, in one pass. candle's own
//! `gelu_erf` backward is a dozen full-size temporaries (squares, exponentials, scalings, the
//! erf, sums); on MiniLM's `[tokens, 1536]` activations those dominated the elementwise time.
//!
//! In f32 the erf and the exponential are [`super::vector_math`]'s branch-free forms, run as
//! vector code (erf within 5e-7; PyTorch's CPU GELU uses an approximation of the same order). In
//! f64 the erf is candle's (`candle_core::cpu::erf`), so values equal candle's forward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::vector_math::{self, vectorized};
use super::{contiguous, min_rows, supports, with_slice, Real};

/// Elements per rayon task.
const CHUNK: usize = 4096;

/// `1 / √(2π)`.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `Φ(x)` in f64, with candle's erf.
fn cdf(x: f64) -> f64 {
    0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// `Φ(x)` in f32 with the vectorizable erf.
#[inline(always)]
fn cdf_f32(x: f32) -> f32 {
    0.5 * (1.0 + vector_math::erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `x · Φ(x)` over f32 elements.
fn forward_f32(x: &[f32]) -> Vec<f32> {
    map(
        x,
        None,
        #[inline(always)]
        |x, _| x * cdf_f32(x),
    )
}

/// `g · (Φ(x) + x · φ(x))` over f32 elements.
fn backward_f32(x: &[f32], g: &[f32]) -> Vec<f32> {
    const C: f32 = INV_SQRT_2PI as f32;
    map(
        x,
        Some(g),
        #[inline(always)]
        |x, g| g * (cdf_f32(x) + x * C * vector_math::exp(-0.5 * x * x)),
    )
}

/// Applies `f` to every element of `x` (and of `g`, when given) in parallel, as vector code
/// where the CPU has it.
fn map<T: Real>(x: &[T], g: Option<&[T]>, f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    match g {
        Some(g) => out
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .with_min_len(min_rows(CHUNK))
            .for_each(|(o, (x, g))| {
                vectorized(
                    #[inline(always)]
                    || {
                        for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                            *o = f(x, g);
                        }
                    },
                )
            }),
        None => out
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .with_min_len(min_rows(CHUNK))
            .for_each(|(o, x)| {
                vectorized(
                    #[inline(always)]
                    || {
                        for (o, &x) in o.iter_mut().zip(x) {
                            *o = f(x, x);
                        }
                    },
                )
            }),
    }
    out
}

/// The fused op.
struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage = match s {
            CpuStorage::F32(_) => CpuStorage::F32(forward_f32(contiguous(s, l, "gelu")?)),
            CpuStorage::F64(_) => {
                let x = contiguous::<f64>(s, l, "gelu")?;
                CpuStorage::F64(map(x, None, |x, _| x * cdf(x)))
            }
            other => candle_core::bail!(
                "gelu: the fused kernel takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((storage, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        /// Runs `f` on the elements of `x` and of `g` (as `x`'s dtype).
        fn with_pair<T: Real>(
            x: &Tensor,
            g: &Tensor,
            f: impl FnOnce(&[T], &[T]) -> Vec<T>,
        ) -> candle_core::Result<Tensor> {
            let g = g.to_dtype(T::DTYPE)?;
            let dx = with_slice::<T, _>(x, "gelu backward", |xs| {
                with_slice::<T, _>(&g, "gelu backward", |gs| Ok(f(xs, gs)))
            })?;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        Ok(Some(match x.dtype() {
            DType::F32 => with_pair::<f32>(x, g, backward_f32)?,
            DType::F64 => with_pair::<f64>(x, g, |xs, gs| {
                map(xs, Some(gs), |x, g| {
                    g * (cdf(x) + x * INV_SQRT_2PI * (-0.5 * x * x).exp())
                })
            })?,
            other => candle_core::bail!("gelu backward: unsupported dtype {other:?}"),
        }))
    }
}

/// GELU (erf form) of an f32/f64 CPU tensor, differentiable.
pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    if !supports(&[x]) {
        candle_core::bail!(
            "fused gelu needs an f32/f64 CPU tensor, got {:?} on {:?}",
            x.dtype(),
            x.device().location()
        );
    }
    let x = x.contiguous()?;
    if x.track_op() {
        x.apply_op1(Gelu)
    } else {
        x.apply_op1_no_bwd(&Gelu)
    }
}
