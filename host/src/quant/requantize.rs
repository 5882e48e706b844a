//! Re-quantizing a model's linear weights in place (a merged model, before it is written in a
//! quantized format), and the logit error that brings (`whet merge --requantize FORMAT`).

use std::sync::Arc;

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use super::{holds_quantized, QuantError, QuantFormat, QuantizedMatrix};
use crate::model::Model;
use crate::Result;

/// Replaces every linear weight of `model` that QLoRA would hold quantized by its `format`
/// blocks (dequantized on use, as during QLoRA training). Weights the format cannot block stay
/// f32 (with a warning). Returns how many were quantized.
pub fn requantize_linears(model: &dyn Model, format: QuantFormat) -> Result<usize> {
    let mut count = 0;
    for linear in model.linears() {
        if !holds_quantized(linear) {
            continue;
        }
        let weight = linear.weight();
        match QuantizedMatrix::quantize(&weight.tensor(), format) {
            Ok(matrix) => {
                weight.set_quantized(Arc::new(matrix))?;
                count += 1;
            }
            Err(QuantError::Shape(why)) => {
                tracing::warn!(tensor = weight.name(), "kept in f32: {why}");
            }
            Err(e) => {
                return Err(crate::Error::config(format!(
                    "cannot quantize `{}` to {format}: {e}",
                    weight.name()
                )))
            }
        }
    }
    Ok(count)
}

/// How far one set of logits is from a reference, over every position (row of the last
/// dimension).
#[derive(Debug, Clone, Serialize)]
pub struct LogitError {
    /// Rows compared.
    pub positions: usize,
    /// Largest `|Δ logit|`.
    pub max_abs: f64,
    /// Mean `|Δ logit|`.
    pub mean_abs: f64,
    /// Largest `|logit|` of the reference, the scale of the above.
    pub reference_max_abs: f64,
    /// Share of rows whose highest logit is at the same index.
    pub top1_agreement: f64,
}

/// Compares `other` with `reference` (same shape, `[..., classes]`).
pub fn logit_error(reference: &Tensor, other: &Tensor) -> Result<LogitError> {
    if reference.dims() != other.dims() {
        return Err(crate::Error::config(format!(
            "logits of shape {:?} and {:?} cannot be compared",
            reference.dims(),
            other.dims()
        )));
    }
    let classes = reference.dim(D::Minus1)?;
    let a = reference.to_dtype(DType::F64)?.reshape(((), classes))?;
    let b = other.to_dtype(DType::F64)?.reshape(((), classes))?;
    let positions = a.dim(0)?;
    let diff = (&a - &b)?.abs()?;
    let same = a
        .argmax(D::Minus1)?
        .eq(&b.argmax(D::Minus1)?)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(LogitError {
        positions,
        max_abs: diff.max_all()?.to_scalar::<f64>()?,
        mean_abs: diff.mean_all()?.to_scalar::<f64>()?,
        reference_max_abs: a.abs()?.max_all()?.to_scalar::<f64>()?,
        top1_agreement: same / positions.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn logit_error_counts_differences_and_agreement() {
        let d = Device::Cpu;
        let a = Tensor::new(&[[1.0f32, 2.0, 0.0], [0.5, 0.0, 0.1]], &d).unwrap();
        let b = Tensor::new(&[[1.0f32, 1.5, 0.0], [0.5, 0.9, 0.1]], &d).unwrap();
        let e = logit_error(&a, &b).unwrap();
        assert_eq!(e.positions, 2);
        assert!((e.max_abs - 0.9).abs() < 1e-6);
        assert!((e.mean_abs - 1.4 / 6.0).abs() < 1e-6);
        assert_eq!(e.top1_agreement, 0.5);
        assert_eq!(e.reference_max_abs, 2.0);
        assert!(logit_error(&a, &b.narrow(0, 0, 1).unwrap()).is_err());
    }
}
