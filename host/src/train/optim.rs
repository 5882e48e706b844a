//! AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
//! Regularization", ICLR 2019), with bias correction, exactly as PyTorch's `torch.optim.AdamW`:
//!
//! ```text
//! θ ← θ − lr·λ·θ                       (decoupled weight decay, only for decayed params)
//! m ← β1·m + (1−β1)·g
//! v ← β2·v + (1−β2)·g²
//! θ ← θ − lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)
//! ```
//!
//! `t` counts the updates of each parameter (as PyTorch keeps `state["step"]` per parameter): a
//! parameter without a gradient in a step is not updated and its count does not advance, and a
//! parameter added later (gradual unfreezing) starts its own count at zero.
//!
//! The state (first and second moments and update count per parameter, and the optimizer's step
//! count) can be exported and restored by parameter name, for checkpoints.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use crate::{Error, Result};

/// Hyper-parameters of [`AdamW`] other than the learning rate (which the schedule sets per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Decoupled weight decay λ.
    pub weight_decay: f64,
    /// Exponential decay of the first moment.
    pub beta1: f64,
    /// Exponential decay of the second moment.
    pub beta2: f64,
    /// Added to the denominator for numerical stability.
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// One parameter the optimizer updates.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
    /// Updates applied to this parameter (Adam's `t`).
    updates: usize,
}

impl Slot {
    fn new(name: String, var: Var, decay: bool) -> Result<Slot> {
        let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
        Ok(Slot {
            name,
            var,
            decay,
            m: zeros.clone(),
            v: zeros,
            updates: 0,
        })
    }
}

/// The AdamW optimizer over a set of named trainable variables.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: usize,
}

impl AdamW {
    /// An optimizer over `(name, variable, decay)` triples; `decay` says whether weight decay
    /// applies to that parameter. Moments start at zero (in f32).
    pub fn new(params: Vec<(String, Var, bool)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var, decay)| Slot::new(name, var, decay))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    /// Adds a parameter (zero moments, no updates yet), e.g. one a gradual-unfreezing schedule
    /// makes trainable mid-run.
    pub fn add_param(&mut self, name: String, var: Var, decay: bool) -> Result<()> {
        if self.slots.iter().any(|s| s.name == name) {
            return Err(Error::config(format!(
                "the optimizer already updates `{name}`"
            )));
        }
        self.slots.push(Slot::new(name, var, decay)?);
        Ok(())
    }

    /// Points parameter `index` at `var` (a parameter frozen and made trainable again is a new
    /// variable; its moments are kept).
    pub fn rebind(&mut self, index: usize, var: Var) -> Result<()> {
        let slot = self.slots.get_mut(index).ok_or_else(|| {
            Error::config(format!("the optimizer has no parameter number {index}"))
        })?;
        if slot.var.dims() != var.dims() {
            return Err(Error::config(format!(
                "cannot rebind `{}` of shape {:?} to a variable of shape {:?}",
                slot.name,
                slot.var.dims(),
                var.dims()
            )));
        }
        slot.var = var;
        Ok(())
    }

    /// Number of updates applied so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The optimizer's hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// The names of the parameters it updates, in order.
    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// Applies one update with learning rate `lr`, reading each parameter's gradient from
    /// `grads`. A parameter without a gradient is left untouched (as PyTorch does), but the step
    /// count still advances.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let owned: Vec<Option<Tensor>> = self
            .slots
            .iter()
            .map(|s| grads.get(s.var.as_tensor()).cloned())
            .collect();
        self.step_with(&owned, lr)
    }

    /// Like [`AdamW::step`] with the gradients given in parameter order (`None`: no gradient).
    pub fn step_with(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.slots.len() {
            return Err(Error::config(format!(
                "optimizer got {} gradients for {} parameters",
                grads.len(),
                self.slots.len()
            )));
        }
        self.step += 1;
        let AdamWConfig {
            weight_decay,
            beta1,
            beta2,
            eps,
        } = self.cfg;
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            let Some(grad) = grad else { continue };
            slot.updates += 1;
            let t = i32::try_from(slot.updates).unwrap_or(i32::MAX);
            let bias1 = 1.0 - beta1.powi(t);
            let bias2 = 1.0 - beta2.powi(t);
            let grad = grad.detach().to_dtype(DType::F32)?;
            let theta = slot.var.as_tensor().detach();
            let dtype = theta.dtype();
            let mut theta = theta.to_dtype(DType::F32)?;
            if slot.decay && weight_decay != 0.0 {
                theta = (&theta * (1.0 - lr * weight_decay))?;
            }
            slot.m = ((&slot.m * beta1)? + (&grad * (1.0 - beta1))?)?;
            slot.v = ((&slot.v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&slot.m / bias1)?;
            let v_hat = (&slot.v / bias2)?;
            let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let next = (theta - (update * lr)?)?.to_dtype(dtype)?;
            slot.var.set(&next)?;
        }
        Ok(())
    }

    /// The optimizer state as named tensors: `exp_avg.<param>` and `exp_avg_sq.<param>`
    /// (PyTorch's names for m and v). The step count is returned separately.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::with_capacity(2 * self.slots.len());
        for slot in &self.slots {
            out.insert(format!("exp_avg.{}", slot.name), slot.m.clone());
            out.insert(format!("exp_avg_sq.{}", slot.name), slot.v.clone());
            if let Ok(t) = Tensor::new(&[slot.updates as f64], slot.m.device()) {
                out.insert(format!("step.{}", slot.name), t);
            }
        }
        out
    }

    /// Restores the state saved by [`AdamW::state_tensors`] and the step count. Every parameter
    /// of this optimizer must have its moments in `state` with the same shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for slot in &mut self.slots {
            let fetch = |key: String| -> Result<Tensor> {
                let t = state.get(&key).ok_or_else(|| {
                    Error::config(format!(
                        "optimizer state has no `{key}`: the checkpoint was written for other trainable parameters"
                    ))
                })?;
                if t.dims() != slot.var.dims() {
                    return Err(Error::config(format!(
                        "optimizer state `{key}` has shape {:?}, parameter has {:?}",
                        t.dims(),
                        slot.var.dims()
                    )));
                }
                Ok(t.to_dtype(DType::F32)?.to_device(slot.var.device())?)
            };
            slot.m = fetch(format!("exp_avg.{}", slot.name))?;
            slot.v = fetch(format!("exp_avg_sq.{}", slot.name))?;
            // Checkpoints written before per-parameter counts had every parameter at `step`.
            slot.updates = match state.get(&format!("step.{}", slot.name)) {
                Some(t) => t
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .first()
                    .map_or(step, |&n| n as usize),
                None => step,
            };
        }
        self.step = step;
        Ok(())
    }
}
