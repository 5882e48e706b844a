//! Fused SwiGLU gate `y = silu(g) ⊙ u` with `silu(g) = g · σ(g)` (Llama's MLP).
//!
//! Backward, for an upstream gradient `γ`: `du = γ ⊙ silu(g)` and
//! `dg = γ ⊙ u ⊙ σ(g) ⊙ (1 + g ⊙ (1 − σ(g)))`, each computed only when its input is tracked.
//! The composed `gate.silu()?.mul(up)` keeps the `silu(g)` temporary alive for the backward pass
//! and walks two ops; this is one pass forward and one backward over the two inputs.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, min_rows, supports, vectorized, with_slice, Real};

/// Elements per rayon task (the rows of an MLP activation are its rows; any split works).
const CHUNK: usize = 4096;

/// `σ(g)`, in the tensor's own precision (f32 `exp` is several times faster than f64's).
#[inline(always)]
fn sigmoid<T: Real>(g: T) -> T {
    let one = T::from_f64(1.0);
    one / (one + (T::from_f64(0.0) - g).exp())
}

/// The fused op.
struct SwiGlu;

fn forward<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); g.len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .with_min_len(min_rows(CHUNK))
        .for_each(|(o, (g, u))| {
            vectorized(
                #[inline(always)]
                || {
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        *o = g * sigmoid(g) * u;
                    }
                },
            )
        });
    out
}

/// `dg` of one element (`γ ⊙ u ⊙ σ(g) ⊙ (1 + g ⊙ (1 − σ(g)))`), given `s = σ(g)`.
#[inline(always)]
fn gate_grad<T: Real>(g: T, u: T, gr: T, s: T) -> T {
    let one = T::from_f64(1.0);
    gr * u * s * (one + g * (one - s))
}

/// `(dg, du)`, each only when asked for; both in one pass when both are.
fn backward<T: Real>(
    g: &[T],
    u: &[T],
    grad: &[T],
    (want_dg, want_du): (bool, bool),
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let zero = T::from_f64(0.0);
    let inputs = || {
        g.par_chunks(CHUNK)
            .zip(u.par_chunks(CHUNK))
            .zip(grad.par_chunks(CHUNK))
    };
    let one_output = |f: &(dyn Fn(T, T, T) -> T + Sync)| {
        let mut out = vec![zero; g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(inputs())
            .with_min_len(min_rows(CHUNK))
            .for_each(|(o, ((g, u), gr))| {
                for (((o, &g), &u), &gr) in o.iter_mut().zip(g).zip(u).zip(gr) {
                    *o = f(g, u, gr);
                }
            });
        out
    };
    match (want_dg, want_du) {
        (true, true) => {
            let (mut dg, mut du) = (vec![zero; g.len()], vec![zero; g.len()]);
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(inputs())
                .with_min_len(min_rows(CHUNK))
                .for_each(|((dg, du), ((g, u), gr))| {
                    vectorized(
                        #[inline(always)]
                        || {
                            for ((((dg, du), &g), &u), &gr) in
                                dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(gr)
                            {
                                let s = sigmoid(g);
                                *dg = gate_grad(g, u, gr, s);
                                *du = gr * g * s;
                            }
                        },
                    )
                });
            (Some(dg), Some(du))
        }
        (true, false) => (
            Some(one_output(&|g, u, gr| gate_grad(g, u, gr, sigmoid(g)))),
            None,
        ),
        (false, true) => (None, Some(one_output(&|g, _, gr| gr * g * sigmoid(g)))),
        (false, false) => (None, None),
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
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
                contiguous::<f32>(s1, l1, "swiglu")?,
                contiguous::<f32>(s2, l2, "swiglu")?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(forward(
                contiguous::<f64>(s1, l1, "swiglu")?,
                contiguous::<f64>(s2, l2, "swiglu")?,
            )),
            _ => candle_core::bail!(
                "swiglu: the fused kernel takes f32 or f64 inputs of one dtype, got {:?} and {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let want = (gate.track_op(), up.track_op());
        fn run<T: Real>(
            gate: &Tensor,
            up: &Tensor,
            grad: &Tensor,
            want: (bool, bool),
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            let grad = grad.to_dtype(T::DTYPE)?;
            let (dg, du) = with_slice::<T, _>(gate, "swiglu backward", |g| {
                with_slice::<T, _>(up, "swiglu backward", |u| {
                    with_slice::<T, _>(&grad, "swiglu backward", |gr| Ok(backward(g, u, gr, want)))
                })
            })?;
            let to_tensor = |v: Vec<T>| Tensor::from_vec(v, gate.shape(), gate.device());
            Ok((
                dg.map(to_tensor).transpose()?,
                du.map(to_tensor).transpose()?,
            ))
        }
        match gate.dtype() {
            DType::F32 => run::<f32>(gate, up, grad, want),
            DType::F64 => run::<f64>(gate, up, grad, want),
            other => candle_core::bail!("swiglu backward: unsupported dtype {other:?}"),
        }
    }
}

/// `silu(gate) ⊙ up` for f32/f64 CPU tensors of one shape and dtype; differentiable in both.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if !supports(&[gate, up]) {
        candle_core::bail!(
            "fused swiglu needs f32/f64 CPU tensors of one dtype, got {:?} and {:?} on {:?}",
            gate.dtype(),
            up.dtype(),
            gate.device().location()
        );
    }
    if gate.dims() != up.dims() {
        candle_core::bail!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        );
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    if gate.track_op() || up.track_op() {
        gate.apply_op2(&up, SwiGlu)
    } else {
        gate.apply_op2_no_bwd(&up, &SwiGlu)
    }
}

/// `swiglu(gate, up) · Wᵀ` for a frozen `W` `[out, in]`: Llama's MLP output projection with
/// its gate folded in. The `[rows, in]` gate output lives only inside the forward pass, so the
/// graph keeps no tensor for it (the composed pair keeps it as the projection's input: 6.3 MB
/// a layer for SmolLM2 at batch 8 × 128); the backward pass needs only `gate`, `up` and `W`.
struct SwiGluProjection {
    weight: Tensor,
}

impl CustomOp2 for SwiGluProjection {
    fn name(&self) -> &'static str {
        "fused-swiglu-projection"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = "swiglu projection";
        let (rows, k) = l1.shape().dims2()?;
        let s = forward(
            contiguous::<f32>(s1, l1, name)?,
            contiguous::<f32>(s2, l2, name)?,
        );
        let n = self.weight.dim(0)?;
        let out = crate::ops::matmul::rows_times_weight_t(&s, rows, k, &self.weight).ok_or_else(
            || candle_core::Error::Msg(format!("{name}: OpenBLAS did not take the product")),
        )?;
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d_swiglu = crate::ops::matmul(&grad.contiguous()?, &self.weight)?;
        SwiGlu.bwd(gate, up, y, &d_swiglu)
    }
}

/// Whether [`swiglu_projection`] takes these operands: f32 CPU `gate` and `up` of one shape
/// `[..., in]`, a 2-D weight `[out, in]`, and OpenBLAS loaded.
pub fn supports_swiglu_projection(gate: &Tensor, up: &Tensor, weight: &Tensor) -> bool {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    f32_cpu(gate)
        && f32_cpu(up)
        && f32_cpu(weight)
        && gate.dims() == up.dims()
        && gate.rank() >= 1
        && matches!(weight.dims(), [_, k] if gate.dims().last() == Some(k))
        && crate::ops::blas::backend().is_some()
}

/// `residual + swiglu(gate, up) · Wᵀ`: [`SwiGluProjection`] with the residual sum of Llama's
/// MLP block folded in, so the graph keeps no `[rows, out]` tensor for the projection's output
/// either (2.4 MB a layer for SmolLM2 at batch 8 × 128). The residual's gradient is the
/// upstream gradient itself.
struct ResidualSwiGluProjection(SwiGluProjection);

impl CustomOp3 for ResidualSwiGluProjection {
    fn name(&self) -> &'static str {
        "fused-residual-swiglu-projection"
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
        let name = "residual swiglu projection";
        let (storage, shape) = self.0.cpu_fwd(s2, l2, s3, l3)?;
        let CpuStorage::F32(mut out) = storage else {
            candle_core::bail!("{name}: the projection is not f32");
        };
        let residual = contiguous::<f32>(s1, l1, name)?;
        if residual.len() != out.len() {
            candle_core::bail!(
                "{name}: residual {:?} does not match the output {:?}",
                l1.shape().dims(),
                shape.dims()
            );
        }
        super::add_in_place(&mut out, residual);
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        _residual: &Tensor,
        gate: &Tensor,
        up: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (d_gate, d_up) = self.0.bwd(gate, up, y, grad)?;
        Ok((Some(grad.clone()), d_gate, d_up))
    }
}

/// `swiglu(gate, up) · Wᵀ` for a frozen weight `[out, in]` and `gate`, `up` `[..., in]`,
/// differentiable in `gate` and `up`; see [`SwiGluProjection`]. Errors unless
/// [`supports_swiglu_projection`].
pub fn swiglu_projection(
    gate: &Tensor,
    up: &Tensor,
    weight: &Tensor,
) -> candle_core::Result<Tensor> {
    projection(None, gate, up, weight)
}

/// Whether `residual` is an f32 CPU tensor of the projection's output shape `out_dims`.
fn residual_fits(residual: &Tensor, out_dims: &[usize]) -> bool {
    residual.dtype() == DType::F32 && residual.device().is_cpu() && residual.dims() == out_dims
}

/// Whether [`residual_swiglu_projection`] takes these operands: [`supports_swiglu_projection`]
/// and an f32 CPU `residual` `[..., out]` with the leading dims of `gate`.
pub fn supports_residual_swiglu_projection(
    residual: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    weight: &Tensor,
) -> bool {
    if !supports_swiglu_projection(gate, up, weight) {
        return false;
    }
    let mut out_dims = gate.dims().to_vec();
    if let (Some(last), Some(&n)) = (out_dims.last_mut(), weight.dims().first()) {
        *last = n;
    }
    residual_fits(residual, &out_dims)
}

/// `residual + swiglu(gate, up) · Wᵀ` (`residual` `[..., out]`), differentiable in all three;
/// see [`ResidualSwiGluProjection`]. Errors unless [`supports_residual_swiglu_projection`].
pub fn residual_swiglu_projection(
    residual: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    weight: &Tensor,
) -> candle_core::Result<Tensor> {
    projection(Some(residual), gate, up, weight)
}

/// [`swiglu_projection`], plus `residual` when given.
fn projection(
    residual: Option<&Tensor>,
    gate: &Tensor,
    up: &Tensor,
    weight: &Tensor,
) -> candle_core::Result<Tensor> {
    if !supports_swiglu_projection(gate, up, weight) {
        candle_core::bail!(
            "fused swiglu projection needs f32 CPU gate and up of one shape [..., in], a weight \
             [out, in] and OpenBLAS; got {:?}, {:?} and {:?}",
            gate.dims(),
            up.dims(),
            weight.dims()
        );
    }
    let dims = gate.dims().to_vec();
    let k = dims[dims.len() - 1];
    let rows = gate.elem_count() / k.max(1);
    let n = weight.dim(0)?;
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = n;
    let gate = gate.reshape((rows, k))?.contiguous()?;
    let up = up.reshape((rows, k))?.contiguous()?;
    let weight = weight.contiguous()?;
    let y = match residual {
        None => gate.apply_op2(&up, SwiGluProjection { weight })?,
        Some(residual) => {
            if !residual_fits(residual, &out_dims) {
                candle_core::bail!(
                    "fused residual swiglu projection needs an f32 CPU residual of shape {:?}, \
                     got {:?} ({:?})",
                    out_dims,
                    residual.dims(),
                    residual.dtype()
                );
            }
            residual.reshape((rows, n))?.contiguous()?.apply_op3(
                &gate,
                &up,
                ResidualSwiGluProjection(SwiGluProjection { weight }),
            )?
        }
    };
    y.reshape(out_dims)
}
