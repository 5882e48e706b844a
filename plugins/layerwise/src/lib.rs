//! Layer-wise fine-tuning with gradual unfreezing, as a Whetstone plugin.
//!
//! Howard and Ruder 2018, "Universal Language Model Fine-tuning for Text Classification"
//! (ULMFiT), §3.2 "Gradual unfreezing": instead of fine-tuning all layers at once, which risks
//! catastrophic forgetting, the model is unfrozen from the top: first the last layer trains,
//! then the next lower one joins, and so on until the whole stack trains. Here the layers are
//! the `L` transformer blocks (`model.layers.N` in Llama, `encoder.layer.N` in BERT); with
//! `schedule = "gradual"` the top
//! `u(s) = min(L, last_n_layers + ⌊s / unfreeze_every⌋)`
//! blocks train once `s` optimizer steps are done, i.e. block `b` trains when
//! `b ≥ L − u(s)`. `schedule = "last_n"` trains the top `last_n_layers` blocks for the whole run
//! (`u(s) = last_n_layers`). The head (`classifier` / `score`, or an untied `lm_head`) and the
//! final norm (`model.norm`) train from the start unless switched off; the embeddings only when
//! switched on. ULMFiT's discriminative learning rates and slanted triangular schedule are not
//! part of this plugin (the host's learning-rate schedule applies to every trained block).
//!
//! The method wraps no module and adds no parameter: it names the base parameters that train
//! through [`PeftMethod::trainable_base_params`], which the host asks at attach and again after
//! every optimizer step (newly named parameters join the optimizer with fresh AdamW moments).
//! The answer is a pure function of the step count the host reports, so a run resumed from a
//! checkpoint trains what the interrupted run did. The host saves the trained blocks under
//! their own names, as PEFT saves `modules_to_save`. PEFT has no such method.

mod config;
mod parts;
mod schedule;

use std::sync::Mutex;

use whetstone_sdk::prelude::*;

pub use config::{LayerwiseConfig, ScheduleKind};
pub use parts::{block_index, part_of, trained, Part};
pub use schedule::Plan;

/// The layer-wise method.
pub struct Layerwise {
    cfg: LayerwiseConfig,
    plan: Option<Plan>,
    /// The number of unfrozen blocks last logged (the host asks after every step; the log says
    /// only what changed).
    logged: Mutex<Option<usize>>,
}

/// Number of values in all of base parameters `names`.
fn count_values(names: &[String]) -> Result<usize> {
    names
        .iter()
        .map(|n| Ok(whet_host::base_param(n)?.shape()?.iter().product::<usize>()))
        .sum()
}

impl Layerwise {
    /// Logs which blocks train when their number changed since the last log.
    fn log_change(&self, plan: &Plan, step: u64, chosen: &[String]) -> Result<()> {
        let unfrozen = plan.unfrozen(step);
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if *logged == Some(unfrozen) {
            return Ok(());
        }
        *logged = Some(unfrozen);
        let blocks = match unfrozen {
            0 => "no block".to_string(),
            1 => format!("block {} of {}", plan.num_layers - 1, plan.num_layers),
            n => format!(
                "blocks {}-{} of {}",
                plan.num_layers - n,
                plan.num_layers - 1,
                plan.num_layers
            ),
        };
        // The parts outside the blocks that train here (a BERT has no final norm).
        let present = |part: Part| chosen.iter().any(|n| part_of(n) == part);
        let mut extras = Vec::new();
        for (part, label) in [
            (Part::Head, "head"),
            (Part::FinalNorm, "final norm"),
            (Part::Embeddings, "embeddings"),
        ] {
            if present(part) {
                extras.push(label);
            }
        }
        if self
            .cfg
            .modules_to_save
            .as_ref()
            .is_some_and(|m| !m.is_empty())
        {
            extras.push("modules_to_save");
        }
        let extras = if extras.is_empty() {
            String::new()
        } else {
            format!(" + {}", extras.join(", "))
        };
        whet_host::log(
            Level::Info,
            &format!(
                "layer-wise: after step {step}, {blocks}{extras} train: {} tensors, {} values",
                chosen.len(),
                count_values(chosen)?
            ),
        );
        Ok(())
    }
}

impl PeftMethod for Layerwise {
    type Config = LayerwiseConfig;

    fn new(cfg: LayerwiseConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Layerwise {
            cfg,
            plan: None,
            logged: Mutex::new(None),
        })
    }

    fn config_fields() -> Vec<ConfigField> {
        config::fields()
    }

    fn init_model(&mut self, model: &ModelInfo) -> Result<()> {
        self.cfg.validate_for(model.num_layers)?;
        self.plan = Some(Plan::new(&self.cfg, model.num_layers));
        Ok(())
    }

    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>> {
        let plan = self
            .plan
            .ok_or_else(|| Error::msg("trainable_base_params was asked before init_model"))?;
        let step = whet_host::step();
        let chosen = trained(&self.cfg, &plan, names, step)?;
        self.log_change(&plan, step, &chosen)?;
        Ok(chosen)
    }
}

whetstone_sdk::register_method!(Layerwise);
