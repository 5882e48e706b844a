//! Elastic weight consolidation (EWC) as a Whetstone plugin.
//!
//! Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks" (PNAS
//! 114(13)). After a task A has trained, EWC keeps its weights `θ*_A` and the diagonal of the
//! Fisher information at them,
//!
//! `F_i = E_(x,y)∈A [ (∂ log p(y | x, θ) / ∂θ_i)² ]`,
//!
//! estimated here by the *empirical* Fisher: the mean squared gradient of the loss of
//! `fisher_examples` training examples of A, one example at a time, with their own labels,
//! dropout off. Training on the next task B then minimises
//!
//! `L(θ) = L_B(θ) + λ/2 Σ_i F_i (θ_i − θ*_A,i)²`
//!
//! so weights that mattered for A move little and the others are free. Over more tasks this
//! plugin keeps one penalty, as online EWC does (Schwarz et al. 2018, "Progress & Compress"):
//! `F ← γ F + F_task` and `θ* ←` the weights at the end of the latest task; with two tasks it is
//! exactly EWC.
//!
//! What trains is a set of base parameters chosen by glob patterns (`trainable`), as in partial
//! fine-tuning; those are the parameters consolidated. The plugin uses the host's
//! continual-learning hooks: `task_gradient_examples` asks for the gradient pass after each task,
//! [`Event::TaskGradient`] accumulates squared gradients read with `host::grad`, and
//! [`Event::TaskEnd`] fixes `F` and `θ*`. Outside a continual-learning recipe (no task
//! sequence) there is no earlier task and EWC trains like partial fine-tuning.
//!
//! Configuration (PEFT has no EWC): `ewc_lambda` (λ, default 1000), `fisher_examples` (200),
//! `gamma` (1.0), `trainable` (required).

mod config;

use std::collections::BTreeMap;
use std::sync::Mutex;

use whetstone_sdk::prelude::*;

pub use config::EwcConfig;

/// What EWC holds a consolidated parameter to.
struct Anchor {
    /// The base parameter's name.
    name: String,
    /// The (decayed, summed) diagonal Fisher information.
    fisher: Tensor,
    /// `θ*`: the parameter's value at the end of the latest consolidated task.
    optimum: Tensor,
}

/// The EWC method.
pub struct Ewc {
    cfg: EwcConfig,
    patterns: Vec<glob::Pattern>,
    /// The base parameters that train (known once the host has asked).
    trained: Mutex<Vec<String>>,
    /// Sums of squared gradients of the task being estimated, by parameter.
    squared_sums: BTreeMap<String, Tensor>,
    /// Examples in `squared_sums`.
    examples: usize,
    /// The penalty's anchors (empty before the first task ends).
    anchors: Vec<Anchor>,
}

/// A copy of `t` with its own storage: the optimizer updates parameters in place, so `θ*` must
/// not share the parameter's memory (a detached view would follow every update).
fn snapshot(t: &Tensor) -> Result<Tensor> {
    t.detach()?.scale(1.0)
}

impl Ewc {
    /// Adds the squared gradients of the example just differentiated.
    fn accumulate(&mut self) -> Result<()> {
        let names = self
            .trained
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for name in names {
            let param = whet_host::base_param(&name)?;
            let Some(grad) = whet_host::grad(&param)? else {
                continue;
            };
            let squared = grad.detach()?.sqr()?;
            let sum = match self.squared_sums.remove(&name) {
                Some(acc) => acc.add(&squared)?,
                None => squared,
            };
            self.squared_sums.insert(name, sum);
        }
        self.examples += 1;
        Ok(())
    }

    /// Turns the accumulated squared gradients of task `task` into the penalty's anchors.
    fn consolidate(&mut self, task: u32) -> Result<()> {
        if self.examples == 0 {
            // The host skips the gradient pass after the last task of a sequence.
            whet_host::log(
                Level::Debug,
                &format!("EWC: task {task} ended without a gradient pass; nothing consolidated"),
            );
            return Ok(());
        }
        let sums = std::mem::take(&mut self.squared_sums);
        let mut previous: BTreeMap<String, Tensor> = std::mem::take(&mut self.anchors)
            .into_iter()
            .map(|a| (a.name, a.fisher))
            .collect();
        let mut mass = 0.0f64;
        for (name, sum) in sums {
            let mut fisher = sum.scale(1.0 / self.examples as f64)?;
            if let Some(old) = previous.remove(&name) {
                fisher = old.scale(self.cfg.gamma)?.add(&fisher)?;
            }
            mass += f64::from(fisher.sum_all()?.to_scalar()?);
            let optimum = snapshot(&whet_host::base_param(&name)?)?;
            self.anchors.push(Anchor {
                name,
                fisher,
                optimum,
            });
        }
        whet_host::log(
            Level::Info,
            &format!(
                "EWC: consolidated task {task} from {} examples: {} parameter tensors, total \
                 Fisher information {mass:.4e}",
                self.examples,
                self.anchors.len()
            ),
        );
        self.examples = 0;
        Ok(())
    }
}

impl PeftMethod for Ewc {
    type Config = EwcConfig;

    fn new(cfg: EwcConfig) -> Result<Self> {
        cfg.validate()?;
        let patterns = cfg.patterns()?;
        Ok(Ewc {
            cfg,
            patterns,
            trained: Mutex::new(Vec::new()),
            squared_sums: BTreeMap::new(),
            examples: 0,
            anchors: Vec::new(),
        })
    }

    fn config_fields() -> Vec<ConfigField> {
        config::fields()
    }

    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>> {
        let chosen: Vec<String> = names
            .iter()
            .filter(|n| self.patterns.iter().any(|p| p.matches(n)))
            .cloned()
            .collect();
        for (pattern, text) in self.patterns.iter().zip(&self.cfg.trainable) {
            if !names.iter().any(|n| pattern.matches(n)) {
                return Err(Error::config(format!(
                    "trainable pattern `{text}` matches no base parameter (`whet inspect MODEL \
                     --params` lists the names)"
                )));
            }
        }
        *self.trained.lock().unwrap_or_else(|p| p.into_inner()) = chosen.clone();
        Ok(chosen)
    }

    fn loss_term(&self) -> Result<Option<Tensor>> {
        if self.anchors.is_empty() || self.cfg.ewc_lambda == 0.0 {
            return Ok(None);
        }
        let mut penalty: Option<Tensor> = None;
        for anchor in &self.anchors {
            let theta = whet_host::base_param(&anchor.name)?;
            let term = anchor
                .fisher
                .mul(&theta.sub(&anchor.optimum)?.sqr()?)?
                .sum_all()?;
            penalty = Some(match penalty {
                Some(sum) => sum.add(&term)?,
                None => term,
            });
        }
        penalty
            .map(|p| p.scale(self.cfg.ewc_lambda / 2.0))
            .transpose()
    }

    fn on_event(&mut self, event: &Event) -> Result<()> {
        match *event {
            Event::TaskGradient { .. } => self.accumulate(),
            Event::TaskEnd(task) => self.consolidate(task),
            _ => Ok(()),
        }
    }

    fn task_gradient_examples(&self) -> Result<usize> {
        Ok(if self.cfg.ewc_lambda > 0.0 {
            self.cfg.fisher_examples
        } else {
            0
        })
    }
}

whetstone_sdk::register_method!(Ewc);
