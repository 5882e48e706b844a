//! One optimizer step: forward and backward over the micro-batches of a step, gradient
//! accumulation, clipping, the learning rate from the schedule and the AdamW update.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};

use super::checkpoint::{self, Checkpoint, TrainerState};
use super::clip::{clip_grad_norm, global_norm};
use super::optim::{AdamW, AdamWConfig};
use super::schedule::Schedule;
use super::teacher::Teacher;
use crate::model::{Batch, Mode, Model};
use crate::params::Param;
use crate::plugin::loss::LossAdapter;
use crate::plugin::method::MethodAdapter;
use crate::recipe::TrainingConfig;
use crate::{Error, Result};

/// Figures of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The step just taken (1-based).
    pub step: usize,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used for the update.
    pub lr: f64,
    /// Real (non-padding) tokens in the step's micro-batches.
    pub tokens: usize,
    /// Seconds spent in forward passes and losses.
    pub forward_s: f64,
    /// Seconds spent in backward passes and gradient accumulation.
    pub backward_s: f64,
    /// Seconds spent clipping and updating.
    pub optimizer_s: f64,
}

impl StepStats {
    /// Training tokens per second over the step.
    pub fn tokens_per_s(&self) -> f64 {
        let total = self.forward_s + self.backward_s + self.optimizer_s;
        if total > 0.0 {
            self.tokens as f64 / total
        } else {
            0.0
        }
    }
}

/// Whether weight decay applies to a parameter: not to biases and normalisation parameters
/// (Hugging Face Trainer's rule).
fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.to_ascii_lowercase().contains("norm"))
}

/// The parts of the training objective beyond the model's own cross-entropy.
#[derive(Debug, Clone, Default)]
pub struct Objective {
    /// A loss plugin that replaces the cross-entropy.
    pub loss: Option<Arc<LossAdapter>>,
    /// The teacher whose logits the loss plugin receives (knowledge distillation).
    pub teacher: Option<Arc<Teacher>>,
}

/// Owns the optimizer and the schedule over a model's trainable parameters.
#[derive(Debug)]
pub struct Trainer {
    /// Every parameter trained so far, in optimizer order (a parameter a schedule froze again
    /// stays here, without a gradient, so checkpoints keep its trained value).
    params: Vec<Arc<Param>>,
    names: Vec<String>,
    optimizer: AdamW,
    schedule: Schedule,
    max_grad_norm: Option<f64>,
    seed: u64,
    method: Option<Arc<MethodAdapter>>,
    objective: Objective,
    /// Use the model's chunked loss path when it has one (`training.chunked_lm_loss`).
    chunked_lm_loss: bool,
}

impl Trainer {
    /// A trainer over the parameters of `model` that are trainable now, for a run of
    /// `total_steps` optimizer steps.
    pub fn new(model: &dyn Model, cfg: &TrainingConfig, total_steps: usize) -> Result<Self> {
        Self::with_method(model, None, cfg, total_steps)
    }

    /// A trainer over the model's trainable parameters and those of an attached PEFT method
    /// plugin, whose loss term it adds at every step.
    pub fn with_method(
        model: &dyn Model,
        method: Option<Arc<MethodAdapter>>,
        cfg: &TrainingConfig,
        total_steps: usize,
    ) -> Result<Self> {
        let mut trainable = model.params().trainable();
        if let Some(m) = &method {
            for p in m.params() {
                if !trainable.iter().any(|t| Arc::ptr_eq(t, &p)) {
                    trainable.push(p);
                }
            }
        }
        if trainable.is_empty() {
            return Err(Error::config(format!(
                "nothing to train: no parameter of the {} model is trainable; use method kind = \"full\" or \
                 list patterns in method.trainable (`whet inspect MODEL` lists names)",
                model.architecture()
            )));
        }
        if cfg.gradient_checkpointing && !model.supports_checkpointing() {
            tracing::warn!(
                architecture = model.architecture(),
                "training.gradient_checkpointing is not supported by this architecture; it trains \
                 with every activation kept"
            );
        }
        model
            .forward_context()
            .set_checkpointing(cfg.gradient_checkpointing);
        let mut names = Vec::with_capacity(trainable.len());
        let mut slots = Vec::with_capacity(trainable.len());
        for param in &trainable {
            let var = param.var().ok_or_else(|| {
                Error::config(format!("`{}` is no longer trainable", param.name()))
            })?;
            names.push(param.name().to_string());
            slots.push((param.name().to_string(), var, decays(param.name())));
        }
        let adam = AdamWConfig {
            weight_decay: cfg.weight_decay,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
        };
        let schedule = Schedule {
            base_lr: cfg.learning_rate,
            warmup_steps: cfg.warmup_steps(total_steps),
            total_steps,
            kind: cfg.lr_scheduler,
        };
        Ok(Self {
            params: trainable,
            names,
            optimizer: AdamW::new(slots, adam)?,
            schedule,
            max_grad_norm: cfg.max_grad_norm,
            seed: cfg.seed,
            method,
            objective: Objective::default(),
            chunked_lm_loss: cfg.chunked_lm_loss,
        })
    }

    /// Optimizer steps taken so far.
    pub fn step(&self) -> usize {
        self.optimizer.step_count()
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The optimizer (its state is what checkpoints save).
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Names of the trained parameters, in optimizer order.
    pub fn param_names(&self) -> &[String] {
        &self.names
    }

    /// Number of scalars trained now.
    pub fn num_trainable(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.is_trainable())
            .map(|p| p.tensor().elem_count())
            .sum()
    }

    /// Asks the method which base parameters train now (called after every step, and before
    /// restoring a checkpoint, so a gradual-unfreezing schedule takes effect): parameters it
    /// unfreezes join the optimizer with fresh moments, parameters it freezes stop getting
    /// gradients. Returns whether the set changed.
    pub fn refresh_trainable(&mut self, model: &dyn Model) -> Result<bool> {
        let Some(method) = self.method.clone() else {
            return Ok(false);
        };
        if !method.refresh_base_params(model)? {
            return Ok(false);
        }
        let mut now = model.params().trainable();
        now.extend(method.params());
        for param in now {
            if self.params.iter().any(|p| Arc::ptr_eq(p, &param)) {
                continue;
            }
            let Some(var) = param.var() else { continue };
            let name = param.name().to_string();
            self.optimizer.add_param(name.clone(), var, decays(&name))?;
            self.names.push(name);
            self.params.push(param);
        }
        for (index, param) in self.params.iter().enumerate() {
            if let Some(var) = param.var() {
                self.optimizer.rebind(index, var)?;
            }
        }
        Ok(true)
    }

    /// Trains with `objective`'s loss plugin (and teacher) instead of the model's cross-entropy.
    pub fn with_objective(mut self, objective: Objective) -> Self {
        self.objective = objective;
        self
    }

    /// The training loss of a batch (forward included): the model's chunked loss when it has
    /// one and no loss plugin needs the logits, else the logits' loss.
    fn batch_loss(&self, model: &dyn Model, batch: &Batch) -> Result<Tensor> {
        if self.chunked_lm_loss && self.objective.loss.is_none() {
            if let Some(loss) = model.forward_loss(
                &batch.input_ids,
                &batch.attention_mask,
                &batch.labels,
                Mode::Train,
            )? {
                return Ok(loss);
            }
        }
        let logits = model.forward(&batch.input_ids, &batch.attention_mask, Mode::Train)?;
        self.data_loss(model, &logits, batch)
    }

    /// The loss of a batch's logits: the loss plugin's when there is one (with the teacher's
    /// logits), else the model's cross-entropy.
    fn data_loss(&self, model: &dyn Model, logits: &Tensor, batch: &Batch) -> Result<Tensor> {
        let Some(loss) = &self.objective.loss else {
            return model.loss(logits, &batch.labels);
        };
        let teacher = self
            .objective
            .teacher
            .as_ref()
            .map(|t| t.logits(batch))
            .transpose()?;
        loss.loss(logits, &batch.labels, teacher.as_ref())
    }

    /// One optimizer step over `micro_batches`: forward in training mode, loss, backward per
    /// micro-batch with gradients summed (each scaled by 1/n), clipping, and the AdamW update at
    /// the scheduled learning rate. A NaN or infinite loss stops with
    /// [`Error::NonFiniteLoss`] before any update.
    pub fn train_step(&mut self, model: &dyn Model, micro_batches: &[Batch]) -> Result<StepStats> {
        if micro_batches.is_empty() {
            return Err(Error::config(
                "a training step needs at least one micro-batch",
            ));
        }
        let step = self.step() + 1;
        // Dropout masks depend only on (seed, step), so a resumed run repeats exactly.
        let step_seed = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64;
        model.reseed(step_seed);
        let ctx = model.forward_context();
        ctx.reseed(step_seed ^ 0x5EED);
        ctx.set_step(step as u64);
        let scale = 1.0 / micro_batches.len() as f64;
        let (mut forward_s, mut backward_s) = (0.0, 0.0);
        let vars: Vec<Option<Var>> = self.params.iter().map(|p| p.var()).collect();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut loss_sum = 0.0;
        let mut tokens = 0;
        // Gradients a failed pass left behind must not reach this step.
        ctx.checkpoint_grads().clear();
        for batch in micro_batches {
            let t0 = Instant::now();
            let mut loss = self.batch_loss(model, batch)?;
            let mut value = scalar_value(&loss)?;
            if !value.is_finite() {
                return Err(Error::NonFiniteLoss { step, value });
            }
            if let Some(method) = &self.method {
                if let Some(term) = method.loss_term()? {
                    let term = term.to_dtype(loss.dtype())?.reshape(())?;
                    let term_value = scalar_value(&term)?;
                    if !term_value.is_finite() {
                        return Err(Error::plugin(
                            method.plugin.id(),
                            "loss-term",
                            format!(
                                "returned {term_value} at step {step} (the data loss was \
                                 {value}); no update was made"
                            ),
                        ));
                    }
                    loss = (loss + term)?;
                    value = scalar_value(&loss)?;
                }
            }
            let t1 = Instant::now();
            let mut store = (loss * scale)?.backward()?;
            ctx.checkpoint_grads().merge_into(&mut store)?;
            for (slot, var) in grads.iter_mut().zip(&vars) {
                let Some(var) = var else { continue };
                if let Some(g) = store.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
            forward_s += (t1 - t0).as_secs_f64();
            backward_s += t1.elapsed().as_secs_f64();
            loss_sum += f64::from(value);
            tokens += batch.num_tokens;
        }
        let t2 = Instant::now();
        let grad_norm = match self.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max)?,
            None => global_norm(&grads)?,
        };
        let lr = self.schedule.lr(step - 1);
        self.optimizer.step_with(&grads, lr)?;
        if let Some(var) = vars.iter().flatten().next() {
            var.device().synchronize()?;
        }
        Ok(StepStats {
            step,
            loss: loss_sum * scale,
            grad_norm,
            lr,
            tokens,
            forward_s,
            backward_s,
            optimizer_s: t2.elapsed().as_secs_f64(),
        })
    }

    /// The trained parameters' current values by name.
    pub fn param_tensors(&self) -> HashMap<String, Tensor> {
        self.names
            .iter()
            .cloned()
            .zip(self.params.iter().map(|p| p.tensor().detach()))
            .collect()
    }

    /// Writes the trained parameters, the optimizer state and `state` to the checkpoint
    /// directory `dir`, atomically.
    pub fn save_checkpoint(&self, dir: &std::path::Path, state: &TrainerState) -> Result<()> {
        checkpoint::save(
            dir,
            &self.param_tensors(),
            &self.optimizer.state_tensors(),
            state,
        )
    }

    /// Restores parameter values and optimizer state from `ckpt`. The checkpoint must hold
    /// exactly the parameters this trainer trains.
    pub fn restore(&mut self, ckpt: &Checkpoint) -> Result<()> {
        for name in ckpt.params.keys() {
            if !self.names.contains(name) {
                return Err(Error::bad_file(
                    &ckpt.dir,
                    format!("checkpoint trains `{name}`, which this run does not train; the method changed since it was written"),
                ));
            }
        }
        for (name, param) in self.names.iter().zip(&self.params) {
            let value = ckpt.params.get(name).ok_or_else(|| {
                Error::bad_file(&ckpt.dir, format!("checkpoint lacks trainable parameter `{name}`; the method changed since it was written"))
            })?;
            let current = param.tensor();
            if value.dims() != current.dims() {
                return Err(Error::bad_file(
                    &ckpt.dir,
                    format!(
                        "`{name}` has shape {:?} in the checkpoint, {:?} in the model",
                        value.dims(),
                        current.dims()
                    ),
                ));
            }
            param.set_value(value)?;
        }
        self.optimizer
            .load_state(&ckpt.optimizer, ckpt.state.step)
            .map_err(|e| Error::bad_file(&ckpt.dir, e.to_string()))
    }
}

/// The value of a scalar loss tensor, as f32.
fn scalar_value(loss: &Tensor) -> Result<f32> {
    Ok(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?)
}
