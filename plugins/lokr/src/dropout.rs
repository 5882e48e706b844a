//! PEFT's LyCORIS dropouts, active only while training: `module_dropout` skips a module's whole
//! update, `rank_dropout` zeroes output rows of `ΔW`.
//!
//! Both draw from the host's seeded generator through the dropout op: dropout of a tensor of
//! ones gives `0` (dropped) or `1 / (1 - p)` (kept), which clamps to an exact `0`/`1` mask with
//! keep probability `1 - p`, PEFT's `torch.rand(...) > p`.

use whetstone_sdk::prelude::*;

fn training(p: f64) -> bool {
    p > 0.0 && whet_host::mode() == Mode::Train
}

/// Whether the module's update applies in this forward: always while evaluating; while
/// training, with probability `1 - p` (PEFT's `torch.rand(1) > module_dropout`).
pub fn module_kept(p: f64) -> Result<bool> {
    if !training(p) {
        return Ok(true);
    }
    let draw = Tensor::ones(&[1])?.dropout(p)?.to_scalar()?;
    Ok(draw > 0.0)
}

/// `ΔW` `[out, in]` with output rows dropped with probability `p` while training, the 0/1 mask
/// divided by its mean when `rescale` (PEFT's LoKr with `rank_dropout_scale`); `ΔW` unchanged
/// while evaluating or when `p` is 0.
pub fn rank_dropout(delta: Tensor, p: f64, rescale: bool) -> Result<Tensor> {
    if !training(p) {
        return Ok(delta);
    }
    let mask = delta
        .narrow(1, 0, 1)?
        .ones_like()?
        .dropout(p)?
        .clamp(0.0, 1.0)?;
    let mask = if rescale {
        mask.div(mask.mean(&[0, 1], true)?)?
    } else {
        mask
    };
    delta.mul(mask)
}
