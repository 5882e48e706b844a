//! DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), as PEFT's
//! `DoraLinearLayer` computes it.
//!
//! The adapted weight is split into a magnitude and a direction,
//! `W' = m · (W + s·B·A) / ‖W + s·B·A‖`, the norm taken per output row (`[out]`, like `m`).
//! The norm is a constant for autograd (the paper's §4.3; PEFT detaches it), so `m` learns the
//! magnitude and `A`, `B` the direction. With the frozen base output `W x + b` given, the
//! forward adds to it
//!
//! `(m/‖·‖ − 1) · W x  +  (m/‖·‖) · B A x · s`,
//!
//! where `W x` is the base output without its bias (the bias is not rescaled). While training
//! with dropout, PEFT recomputes `W x` from the dropped-out input instead, and so does this.

use whetstone_sdk::prelude::*;

/// PEFT's saved name of the magnitude vector `m` (`<module>.lora_magnitude_vector`, no
/// `.weight`).
pub const MAGNITUDE: &str = "lora_magnitude_vector";

/// `‖W + s·B·A‖` per output row `[out]`, without autograd history.
pub fn weight_norm(weight: &Tensor, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    let combined = weight.add(b.detach()?.matmul(a.detach()?)?.scale(scaling)?)?;
    combined.detach()?.norm(&[1], false)
}

/// Creates `m`, initialised as PEFT does to the row norms of `W + s·B·A` with the factors'
/// initial values (`‖W‖` when `B` starts at zero), so the module starts as plain LoRA with the
/// same factors (the base module when `B = 0`). `lora_A.weight` and `lora_B.weight` must exist.
pub fn add_magnitude(layer: &mut Linear, scaling: f64) -> Result<()> {
    let norm = weight_norm(
        &layer.base_weight()?,
        &layer.param("lora_A.weight")?,
        &layer.param("lora_B.weight")?,
        scaling,
    )?;
    layer.add_param(
        MAGNITUDE,
        &[layer.out_features()],
        Init::FromTensor(norm.handle()),
    )
}

/// `m / ‖W + s·B·A‖` `[out]` for `layer`.
fn magnitude_scale(layer: &Linear, a: &Tensor, b: &Tensor, scaling: f64) -> Result<Tensor> {
    let norm = weight_norm(&layer.base_weight()?, a, b, scaling)?;
    layer.param(MAGNITUDE)?.div(norm)
}

/// The DoRA module's output from its input `x` and the frozen base output `base_out`
/// (PEFT's `DoraLinearVariant.forward` and `DoraLinearLayer.forward`).
pub fn forward(
    layer: &Linear,
    x: &Tensor,
    base_out: &Tensor,
    scaling: f64,
    dropout: f64,
) -> Result<Tensor> {
    let a = layer.param("lora_A.weight")?;
    let b = layer.param("lora_B.weight")?;
    let scale = magnitude_scale(layer, &a, &b, scaling)?;
    // PEFT: without active dropout the base result is reused minus its bias; with it, the
    // input is dropped out and the base product recomputed from it.
    let (input, base) = if dropout > 0.0 && whet_host::mode() == Mode::Train {
        let dropped = x.dropout(dropout)?;
        let base = dropped.matmul_t(layer.base_weight()?)?;
        (dropped, base)
    } else {
        let base = match layer.base_bias()? {
            Some(bias) => base_out.sub(bias)?,
            None => base_out.clone(),
        };
        (x.clone(), base)
    };
    let lora = input.matmul_t(a)?.matmul_t(b)?.scale(scaling)?;
    let extra = base.mul(scale.add_scalar(-1.0)?)?.add(lora.mul(&scale)?)?;
    base_out.add(extra)
}

/// `ΔW = (m/‖W + s·B·A‖) · (W + s·B·A) − W` `[out, in]`: PEFT's merged weight minus the base.
pub fn delta_weight(layer: &Linear, scaling: f64) -> Result<Tensor> {
    let a = layer.param("lora_A.weight")?;
    let b = layer.param("lora_B.weight")?;
    let weight = layer.base_weight()?;
    let scale = magnitude_scale(layer, &a, &b, scaling)?.unsqueeze(1)?;
    let adapted = weight.add(b.matmul(a)?.scale(scaling)?)?;
    adapted.mul(scale)?.sub(weight)
}
