//! How much a format changes a model's weights: every linear layer's weight (the ones QLoRA
//! holds quantized) quantized and dequantized again, compared with the f32 original
//! (`whet quantize --to FORMAT`).

use serde::Serialize;

use super::{QuantError, QuantFormat, QuantizedMatrix};
use crate::model::Model;
use crate::Result;

/// The round-trip error of one format over a model's linear weights.
#[derive(Debug, Clone, Serialize)]
pub struct RoundTrip {
    /// The format (`nf4`, `q8_0`, `q4_1`, ...).
    pub format: String,
    /// Linear weights quantized.
    pub matrices: usize,
    /// Weights the format cannot block (they would stay f32).
    pub skipped: usize,
    /// Why the first of them was skipped.
    pub skip_reason: Option<String>,
    /// Values in the quantized matrices.
    pub values: usize,
    /// Mean `|w − dequant(quant(w))|`.
    pub mean_abs_error: f64,
    /// Largest `|w − dequant(quant(w))|`.
    pub max_abs_error: f64,
    /// Mean `|w|`, the scale the error compares with.
    pub mean_abs_weight: f64,
    /// Bits per value the quantized matrices take (blocks and scales).
    pub bits_per_value: f64,
}

/// Quantizes and dequantizes every linear weight of `model` (as [`Model::linears`] lists them)
/// to `format` and measures the error against the f32 weights.
pub fn round_trip(model: &dyn Model, format: QuantFormat) -> Result<RoundTrip> {
    let mut report = RoundTrip {
        format: format.to_string(),
        matrices: 0,
        skipped: 0,
        skip_reason: None,
        values: 0,
        mean_abs_error: 0.0,
        max_abs_error: 0.0,
        mean_abs_weight: 0.0,
        bits_per_value: 0.0,
    };
    let (mut error_sum, mut weight_sum, mut bytes) = (0.0f64, 0.0f64, 0usize);
    for linear in model.linears() {
        if !super::holds_quantized(linear) {
            continue;
        }
        let weight = linear.weight();
        let dense = weight.tensor();
        let matrix = match QuantizedMatrix::quantize(&dense, format) {
            Ok(m) => m,
            Err(QuantError::Shape(why)) => {
                report.skipped += 1;
                report
                    .skip_reason
                    .get_or_insert_with(|| format!("{}: {why}", weight.name()));
                continue;
            }
            Err(e) => {
                return Err(crate::Error::config(format!(
                    "cannot quantize `{}` to {format}: {e}",
                    weight.name()
                )))
            }
        };
        let back = matrix
            .dequantize()
            .map_err(|e| crate::Error::config(format!("{}: {e}", weight.name())))?;
        let diff = (&dense - &back)?.abs()?;
        error_sum += diff
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        let max = diff
            .max_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        report.max_abs_error = report.max_abs_error.max(max);
        weight_sum += dense
            .abs()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        report.values += dense.elem_count();
        report.matrices += 1;
        bytes += matrix.size_in_bytes();
    }
    if report.values > 0 {
        let n = report.values as f64;
        report.mean_abs_error = error_sum / n;
        report.mean_abs_weight = weight_sum / n;
        report.bits_per_value = 8.0 * bytes as f64 / n;
    }
    Ok(report)
}
