//! Fused CPU kernels with hand-written backward passes for the hot operations of training.
//!
//! The composed versions in [`super::composed`] are built from candle primitives: each step
//! allocates a full-size temporary and candle's autograd walks every one of them again in the
//! backward pass. On the `[tokens, vocab]` logits of a causal LM (e.g. `[1024, 49152]`, 200 MB in
//! f32) that costs far more than the matrix products. The kernels of this module do the whole
//! operation in one pass per row (rows in parallel with rayon) and compute the gradient in one
//! more pass, as candle custom ops whose `bwd` is proven by finite-difference tests
//! (`host/tests/gradients.rs`).
//!
//! They run on CPU tensors of dtype f32 or f64 ([`supports`]); the public functions of
//! [`crate::ops`] dispatch here when that holds and to the composed path otherwise (CUDA, Metal,
//! half precision).

mod attention;
mod cross_entropy;
mod dropout;
mod gelu;
mod layer_norm;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;
mod vector_math;

pub use attention::{attention, supports_fused_attention};
pub use cross_entropy::{
    causal_lm_loss, cross_entropy, loss_sum_and_grad, loss_sum_and_grad_owned,
};
pub use dropout::dropout;
pub use gelu::gelu;
pub use layer_norm::layer_norm;
pub use rms_norm::rms_norm;
pub use rope::{rope, HeadLayout};
pub use softmax::{attention_softmax, softmax_last_dim, supports_attention};
pub use swiglu::{
    residual_swiglu_projection, supports_residual_swiglu_projection, supports_swiglu_projection,
    swiglu, swiglu_projection,
};

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, WithDType};
use rayon::prelude::*;
use vector_math::vectorized;

/// Whether the fused kernels handle every tensor of `ts`: all on the CPU, all f32 or all f64.
pub fn supports(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else {
        return false;
    };
    let dtype = first.dtype();
    matches!(dtype, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dtype)
}

/// `out += r` element-wise over f32 slices of one length (a residual sum into a product's
/// output buffer), in parallel chunks run as vector code.
pub(crate) fn add_in_place(out: &mut [f32], r: &[f32]) {
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK)
        .zip(r.par_chunks(CHUNK))
        .for_each(|(o, r)| {
            vectorized(
                #[inline(always)]
                || o.iter_mut().zip(r).for_each(|(o, &r)| *o += r),
            )
        });
}

/// Minimum number of elements a rayon task works on, so that small rows are batched together.
const MIN_TASK_ELEMS: usize = 16 * 1024;

/// Rows per rayon task for rows of `width` elements.
fn min_rows(width: usize) -> usize {
    MIN_TASK_ELEMS.div_ceil(width.max(1))
}

/// Column sums over rows of `f(x, g, row_stats)` into a `[d]` vector (the weight and bias
/// gradients of the row-wise norms), accumulated in f64.
fn column_sums<T: Real, S: Copy + Sync>(
    x: &[T],
    g: &[T],
    stats: &[S],
    d: usize,
    f: impl Fn(f64, f64, S) -> f64 + Sync,
) -> Vec<T> {
    x.par_chunks(d)
        .zip(g.par_chunks(d))
        .zip(stats.par_iter())
        .with_min_len(min_rows(d))
        .fold(
            || vec![0.0f64; d],
            |mut acc, ((x, g), &s)| {
                for ((a, &x), &g) in acc.iter_mut().zip(x).zip(g) {
                    *a += f(x.to_f64(), g.to_f64(), s);
                }
                acc
            },
        )
        .reduce(
            || vec![0.0f64; d],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            },
        )
        .into_iter()
        .map(T::from_f64)
        .collect()
}

/// The float types the kernels are written for (f32, f64).
trait Real: WithDType {
    /// `e^self`.
    fn exp(self) -> Self;

    /// Whether `self` is NaN.
    fn is_nan(self) -> bool;

    /// `self` when `keep`, otherwise `+0`, without a branch (a bit mask).
    fn or_zero(self, keep: bool) -> Self;
}

impl Real for f32 {
    /// [`vector_math::exp`]: branch-free, so loops over it become vector code.
    #[inline(always)]
    fn exp(self) -> Self {
        vector_math::exp(self)
    }

    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }

    #[inline(always)]
    fn or_zero(self, keep: bool) -> Self {
        f32::from_bits(self.to_bits() & u32::from(keep).wrapping_neg())
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }

    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }

    #[inline(always)]
    fn or_zero(self, keep: bool) -> Self {
        f64::from_bits(self.to_bits() & u64::from(keep).wrapping_neg())
    }
}

/// The elements of `storage` described by `layout`, which must be contiguous.
fn contiguous<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("{op}: the kernel needs a contiguous input"))
    })?;
    Ok(&data[start..end])
}

/// Runs `f` on the elements of the CPU tensor `t` (made contiguous first).
fn with_slice<T: WithDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{op}: the fused kernel runs on CPU tensors only");
    };
    f(contiguous(cpu, layout, op)?)
}

/// The scalar upstream gradient `grad` as f64.
fn scalar(grad: &Tensor) -> candle_core::Result<f64> {
    grad.to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .first()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("empty upstream gradient".into()))
}

/// The last dimension of a `[..., d]` layout; an error for a scalar or an empty last dimension.
fn last_dim(layout: &Layout, op: &str) -> candle_core::Result<usize> {
    match layout.shape().dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!(
            "{op}: input of shape {:?} has no last dimension to work on",
            layout.shape().dims()
        ),
    }
}
