//! Linear layers over frozen or trainable weights.
//!
//! A frozen weight goes through [`FrozenLinear`], a custom op whose backward returns only
//! `dX = dY · W`: no `[out, in]` weight gradient is ever computed or stored for it.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor};

use crate::model::hooks::{HookSlot, LinearHook};
use crate::params::Param;

/// `x · Wᵀ` for a frozen `W` `[out, in]`; `x` is 2-D `[rows, in]` and contiguous.
struct FrozenLinear {
    weight: Tensor,
}

impl FrozenLinear {
    fn bmnk(&self, x: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (rows, k) = x.shape().dims2()?;
        let (n, wk) = self.weight.dims2()?;
        if k != wk {
            candle_core::bail!("frozen linear: input has {k} features, weight expects {wk}");
        }
        Ok((1, rows, n, k))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let bmnk = self.bmnk(x_layout)?;
        let (_, rows, n, k) = bmnk;
        if let (CpuStorage::F32(data), Some((begin, end))) = (x, x_layout.contiguous_offsets()) {
            // OpenBLAS when it is loaded: B = Wᵀ, whose storage is W's.
            let out = super::matmul::rows_times_weight_t(&data[begin..end], rows, k, &self.weight);
            if let Some(out) = out {
                return Ok((CpuStorage::F32(out), Shape::from((rows, n))));
            }
        }
        let (storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*storage else {
            candle_core::bail!("frozen linear: weight is not on the CPU");
        };
        let wt_layout = w_layout.transpose(0, 1)?;
        let out = x.matmul(w, bmnk, x_layout, &wt_layout)?;
        Ok((out, Shape::from((rows, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let bmnk = self.bmnk(x_layout)?;
        let (storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cuda(w) = &*storage else {
            candle_core::bail!("frozen linear: weight is not on the CUDA device");
        };
        let wt_layout = w_layout.transpose(0, 1)?;
        let out = x.matmul(w, bmnk, x_layout, &wt_layout)?;
        Ok((out, Shape::from((bmnk.1, bmnk.2))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(super::matmul(grad, &self.weight)?))
    }
}

/// `r + x · Wᵀ` for a frozen `W` `[out, in]` on f32 CPU rows (OpenBLAS): a residual branch's
/// output projection and the residual sum in one op, so the graph keeps no tensor for the
/// projection's output (the add would keep it as an input).
struct ResidualFrozenLinear {
    weight: Tensor,
}

impl CustomOp2 for ResidualFrozenLinear {
    fn name(&self) -> &'static str {
        "residual-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        r: &CpuStorage,
        r_layout: &Layout,
        x: &CpuStorage,
        x_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let fail = |what: &str| candle_core::Error::Msg(format!("residual frozen linear: {what}"));
        let (rows, k) = x_layout.shape().dims2()?;
        let n = self.weight.dim(0)?;
        let (CpuStorage::F32(r), CpuStorage::F32(x)) = (r, x) else {
            return Err(fail("the inputs are not f32"));
        };
        let (Some((rb, re)), Some((xb, xe))) =
            (r_layout.contiguous_offsets(), x_layout.contiguous_offsets())
        else {
            return Err(fail("the inputs are not contiguous"));
        };
        let mut out = super::matmul::rows_times_weight_t(&x[xb..xe], rows, k, &self.weight)
            .ok_or_else(|| fail("OpenBLAS did not take the product"))?;
        let r = &r[rb..re];
        if r.len() != out.len() {
            return Err(fail("the residual does not match the output"));
        }
        super::fused::add_in_place(&mut out, r);
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        _r: &Tensor,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(super::matmul(grad, &self.weight)?)))
    }
}

/// `x · Wᵀ` for a frozen weight `[out, in]` and `x` of shape `[..., in]`; gradients flow to `x`
/// only. The weight must be contiguous.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let op = FrozenLinear {
        weight: weight.contiguous()?,
    };
    apply_to_rows(x, op, "frozen linear")
}

/// Applies a linear-like op on rows `[n, in]` to `x` of shape `[..., in]`: flattens the leading
/// dims, records the op's backward only when `x` is tracked, and restores the leading dims.
pub(super) fn apply_to_rows<C: CustomOp1 + Send + Sync + 'static>(
    x: &Tensor,
    op: C,
    what: &str,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let in_features = *dims
        .last()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: scalar input")))?;
    let rows = x.elem_count() / in_features.max(1);
    let x2 = x.reshape((rows, in_features))?.contiguous()?;
    let y = if x2.track_op() {
        x2.apply_op1(op)?
    } else {
        x2.apply_op1_no_bwd(&op)?
    };
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = y.dim(1)?;
    y.reshape(out_dims)
}

/// `a · b` for `a` `[..., m, k]` and a matrix or batch `b`. With a 2-D `b` and leading
/// dimensions on `a` (a linear layer over `[batch, seq, in]`), the leading dimensions are
/// folded into the rows: one `[batch · seq, k] · [k, n]` product instead of a batch of small
/// ones over a broadcast copy of `b`, and backward sums no broadcast gradient of `b`.
pub fn matmul_rows(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if b.rank() != 2 {
        return a.broadcast_matmul(b);
    }
    if a.rank() <= 2 {
        return super::matmul(a, b);
    }
    let dims = a.dims();
    let k = dims[dims.len() - 1];
    let rows = a.elem_count() / k.max(1);
    let y = super::matmul(&a.reshape((rows, k))?, b)?;
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = b.dim(1)?;
    y.reshape(out_dims)
}

/// A linear layer `y = x Wᵀ + b` whose weight and bias are shared [`Param`]s, frozen or trainable.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Module name, e.g. `model.layers.0.self_attn.q_proj` (PEFT's `target_modules` match it).
    pub name: String,
    weight: Arc<Param>,
    bias: Option<Arc<Param>>,
    hook: HookSlot,
}

impl Linear {
    /// A linear layer named `name` over `weight` `[out, in]` and an optional `bias` `[out]`.
    pub fn new(name: impl Into<String>, weight: Arc<Param>, bias: Option<Arc<Param>>) -> Self {
        Self {
            name: name.into(),
            weight,
            bias,
            hook: HookSlot::default(),
        }
    }

    /// Installs (or with `None` removes) the PEFT hook that wraps this module's output.
    pub fn set_hook(&self, hook: Option<Arc<dyn LinearHook>>) {
        self.hook.set(hook);
    }

    /// Whether a PEFT hook wraps this module.
    pub fn has_hook(&self) -> bool {
        self.hook.get().is_some()
    }

    /// The module without its hook: `x Wᵀ + b` over the base weights only.
    pub fn forward_base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = if let Some(q) = self.weight.quantized_matrix() {
            super::quantized_linear(x, &q)?
        } else if self.weight.is_trainable() {
            matmul_rows(x, &self.weight.tensor().t()?)?
        } else {
            frozen_linear(x, &self.weight.tensor())?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.tensor()),
            None => Ok(y),
        }
    }

    /// The weight parameter.
    pub fn weight(&self) -> &Arc<Param> {
        &self.weight
    }

    /// The bias parameter, if any.
    pub fn bias(&self) -> Option<&Arc<Param>> {
        self.bias.as_ref()
    }

    /// Input features.
    pub fn in_features(&self) -> candle_core::Result<usize> {
        self.weight_dim(1)
    }

    /// Output features.
    pub fn out_features(&self) -> candle_core::Result<usize> {
        self.weight_dim(0)
    }

    /// A dimension of the weight's shape (read without dequantizing a quantized weight).
    fn weight_dim(&self, i: usize) -> candle_core::Result<usize> {
        self.weight.dims().get(i).copied().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "`{}`: the weight has shape {:?}, not [out, in]",
                self.name,
                self.weight.dims()
            ))
        })
    }

    /// `residual + self(x)`, the end of a residual branch. A plain frozen f32 layer (see
    /// [`Self::forward_swiglu`]) with OpenBLAS loaded runs one op that keeps no tensor for the
    /// layer's output; any other layer runs the layer, then the sum.
    pub fn forward_residual(&self, residual: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
        let weight = self.weight.tensor();
        let fits = self.is_plain_frozen()
            && super::blas::backend().is_some()
            && [residual, x, &weight]
                .iter()
                .all(|t| t.dtype() == candle_core::DType::F32 && t.device().is_cpu())
            && weight.rank() == 2
            && x.dims().last() == weight.dims().get(1)
            && residual.dims().last() == weight.dims().first()
            && residual.dims()[..residual.rank() - 1] == x.dims()[..x.rank() - 1];
        if !fits {
            return residual + self.forward(x)?;
        }
        let dims = residual.dims().to_vec();
        let (n, k) = weight.dims2()?;
        let rows = residual.elem_count() / n.max(1);
        let r = residual.reshape((rows, n))?.contiguous()?;
        let x = x.reshape((rows, k))?.contiguous()?;
        let op = ResidualFrozenLinear {
            weight: weight.contiguous()?,
        };
        r.apply_op2(&x, op)?.reshape(dims)
    }

    /// No hook, no bias, not quantized, not trained: the layer is `x · Wᵀ` over a frozen `W`.
    fn is_plain_frozen(&self) -> bool {
        !self.has_hook()
            && self.bias.is_none()
            && !self.weight.is_trainable()
            && self.weight.quantized_matrix().is_none()
    }

    /// The layer applied to `swiglu(gate, up)` (Llama's MLP output projection). A plain frozen
    /// f32 layer — no hook, no bias, not quantized, not trained — runs the fused
    /// [`super::fused::swiglu_projection`], which keeps no `swiglu(gate, up)` tensor for the
    /// backward pass; any other layer runs the two steps.
    pub fn forward_swiglu(&self, gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
        if self.is_plain_frozen() {
            let weight = self.weight.tensor();
            if super::fused::supports_swiglu_projection(gate, up, &weight) {
                return super::fused::swiglu_projection(gate, up, &weight);
            }
        }
        self.forward(&super::swiglu(gate, up)?)
    }

    /// `residual + self(swiglu(gate, up))` (Llama's MLP block with its residual sum). A plain
    /// frozen f32 layer runs the fused [`super::fused::residual_swiglu_projection`], which keeps
    /// neither the gate output nor the projection's output for the backward pass; any other
    /// layer runs [`Linear::forward_swiglu`] and the sum.
    pub fn forward_swiglu_residual(
        &self,
        residual: &Tensor,
        gate: &Tensor,
        up: &Tensor,
    ) -> candle_core::Result<Tensor> {
        if self.is_plain_frozen() {
            let weight = self.weight.tensor();
            if super::fused::supports_residual_swiglu_projection(residual, gate, up, &weight) {
                return super::fused::residual_swiglu_projection(residual, gate, up, &weight);
            }
        }
        residual + self.forward_swiglu(gate, up)?
    }

    /// Applies the layer to `x` of shape `[..., in]`, through its PEFT hook when one is
    /// installed.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let base = self.forward_base(x)?;
        match self.hook.get() {
            None => Ok(base),
            Some(hook) => hook
                .forward(x, &base)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", self.name))),
        }
    }
}
