//! `y = x · Wᵀ` with `W` a frozen [`QuantizedMatrix`] (QLoRA's base weights).
//!
//! Forward: each tile of `W`'s rows is dequantized into a scratch tensor, multiplied with `x`
//! by candle's f32 GEMM, and dropped; only one tile (at most [`crate::quant::TILE_ELEMENTS`]
//! values) exists in f32 at a time. Backward: only the input gradient
//! `dX = dY · W = Σ_tiles dY[:, tile] · W_tile`, dequantizing the tiles again; a quantized weight
//! never gets a gradient and no f32 copy of it outlives the call.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use crate::quant::{QuantError, QuantizedMatrix};

/// The op: the weight it multiplies by.
struct QuantizedLinear {
    weight: Arc<QuantizedMatrix>,
}

fn candle_error(e: QuantError) -> candle_core::Error {
    candle_core::Error::Msg(format!("quantized linear: {e}"))
}

impl CustomOp1 for QuantizedLinear {
    fn name(&self) -> &'static str {
        "quantized-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = layout.shape().dims2()?;
        let (n, wk) = self.weight.dims();
        if k != wk {
            candle_core::bail!("quantized linear: input has {k} features, the weight expects {wk}");
        }
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!(
                "quantized linear: the input must be f32, got {:?}",
                storage.dtype()
            );
        };
        let (begin, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("quantized linear: the input must be contiguous".into())
        })?;
        let x = Tensor::from_slice(&data[begin..end], (rows, k), &Device::Cpu)?;
        let mut out = vec![0f32; rows * n];
        for i in 0..self.weight.num_tiles() {
            let (start, w) = self.weight.tile(i).map_err(candle_error)?;
            let width = w.dim(0)?;
            let y = super::matmul(&x, &w.t()?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (dst, src) in out.chunks_mut(n).zip(y.chunks(width)) {
                dst[start..start + width].copy_from_slice(src);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut dx: Option<Tensor> = None;
        for i in 0..self.weight.num_tiles() {
            let (start, w) = self.weight.tile(i).map_err(candle_error)?;
            let w = w.to_device(grad.device())?.to_dtype(grad.dtype())?;
            let part = grad.narrow(1, start, w.dim(0)?)?.contiguous()?;
            let part = super::matmul(&part, &w)?;
            dx = Some(match dx {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        Ok(dx)
    }
}

/// `x · Wᵀ` for `x` `[..., in]` (f32, CPU) and a quantized `weight` `[out, in]`; differentiable
/// in `x` only.
pub fn quantized_linear(x: &Tensor, weight: &Arc<QuantizedMatrix>) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        candle_core::bail!(
            "quantized base weights compute on the CPU in f32 (got {:?} on {:?}); load the model \
             without `quantize` to use this device",
            x.dtype(),
            x.device().location()
        );
    }
    let op = QuantizedLinear {
        weight: weight.clone(),
    };
    super::linear::apply_to_rows(x, op, "quantized linear")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::QuantFormat;
    use candle_core::quantized::GgmlDType;
    use candle_core::Var;

    /// The quantized product and its input gradient equal those through the dequantized
    /// weight (the same numbers in f32), with several tiles.
    #[test]
    fn forward_and_input_gradient_equal_the_dequantized_product() {
        let d = Device::Cpu;
        // 4096 columns: 256 rows per tile, so 600 rows are 3 tiles.
        let w = Tensor::randn(0f32, 0.05, (600, 4096), &d).unwrap();
        for format in [QuantFormat::Nf4, QuantFormat::Ggml(GgmlDType::Q4_1)] {
            let q = Arc::new(QuantizedMatrix::quantize(&w, format).unwrap());
            assert_eq!(q.num_tiles(), 3);
            let dense = q.dequantize().unwrap();
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4096), &d).unwrap()).unwrap();
            let y = quantized_linear(x.as_tensor(), &q).unwrap();
            let want = x.as_tensor().broadcast_matmul(&dense.t().unwrap()).unwrap();
            assert_eq!(y.dims(), &[2, 3, 600]);
            let diff = |a: &Tensor, b: &Tensor| {
                let scale = b
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                d.to_scalar::<f32>().unwrap() / scale
            };
            assert!(diff(&y, &want) < 1e-5, "{format}: forward");
            // A weighted sum so that every output has its own upstream gradient.
            let up = Tensor::randn(0f32, 1.0, (2, 3, 600), &d).unwrap();
            let g_q = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
            let g_d = (&want * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let (a, b) = (
                g_q.get(x.as_tensor()).unwrap(),
                g_d.get(x.as_tensor()).unwrap(),
            );
            assert!(diff(a, b) < 1e-5, "{format}: input gradient");
        }
    }

    #[test]
    fn wrong_inputs_are_refused() {
        let d = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (4, 64), &d).unwrap();
        let q = Arc::new(QuantizedMatrix::quantize(&w, QuantFormat::Nf4).unwrap());
        let narrow = Tensor::zeros((2, 32), DType::F32, &d).unwrap();
        assert!(quantized_linear(&narrow, &q).is_err());
        let half = Tensor::zeros((2, 64), DType::F16, &d).unwrap();
        let err = quantized_linear(&half, &q).unwrap_err().to_string();
        assert!(err.contains("f32"), "{err}");
    }
}
