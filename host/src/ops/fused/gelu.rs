//! Fused GELU, exact erf form (BERT's `hidden_act = "gelu"`): `y = x · Φ(x)` with
//! `Φ(x) = (1 + erf(x / √2)) / 2`.
//!
//! Backward: `dx = g · (Φ(x) + x · φ(x))`, `φ(x) = e^{−x²/2} / √(2π)`, in one pass. candle's own
//! `gelu_erf` backward is a dozen full-size temporaries (squares, exponentials, scalings, the
//! erf, sums); on MiniLM's `[tokens, 1536]` activations those dominated the elementwise time.
//! The erf is candle's (`candle_core::cpu::erf`), so values equal candle's forward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, min_rows, supports, with_slice, Real};

/// Elements per rayon task.
const CHUNK: usize = 4096;

/// `1 / √(2π)`.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `Φ(x)`.
fn cdf<T: Real>(x: T) -> T {
    let half = T::from_f64(0.5);
    half * (T::from_f64(1.0) + (x * T::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// Applies `f` to every element of `x` (and of `g`, when given) in parallel.
fn map<T: Real>(x: &[T], g: Option<&[T]>, f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    match g {
        Some(g) => out
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .with_min_len(min_rows(CHUNK))
            .for_each(|(o, (x, g))| {
                for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                    *o = f(x, g);
                }
            }),
        None => out
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .with_min_len(min_rows(CHUNK))
            .for_each(|(o, x)| {
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = f(x, x);
                }
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
        fn run<T: Real>(x: &[T]) -> Vec<T> {
            map(x, None, |x, _| x * cdf(x))
        }
        let storage = match s {
            CpuStorage::F32(_) => CpuStorage::F32(run(contiguous::<f32>(s, l, "gelu")?)),
            CpuStorage::F64(_) => CpuStorage::F64(run(contiguous::<f64>(s, l, "gelu")?)),
            other => candle_core::bail!(
                "gelu: the fused kernel takes f32 or f64, got {:?}",
                other.dtype()
            ),
        };
        Ok((storage, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        fn run<T: Real>(x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
            let g = g.to_dtype(T::DTYPE)?;
            let dx = with_slice::<T, _>(x, "gelu backward", |xs| {
                with_slice::<T, _>(&g, "gelu backward", |gs| {
                    let (half, c) = (T::from_f64(-0.5), T::from_f64(INV_SQRT_2PI));
                    Ok(map(xs, Some(gs), |x, g| {
                        g * (cdf(x) + x * c * (half * x * x).exp())
                    }))
                })
            })?;
            Tensor::from_vec(dx, x.shape(), x.device())
        }
        Ok(Some(match x.dtype() {
            DType::F32 => run::<f32>(x, g)?,
            DType::F64 => run::<f64>(x, g)?,
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
