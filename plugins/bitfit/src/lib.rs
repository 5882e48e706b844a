//! BitFit as a Whetstone plugin: only the bias terms of the base model train.
//!
//! Ben Zaken, Ravfogel and Goldberg 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
//! Transformer-based Masked Language-models". Every affine map of the model keeps its form,
//! `y = W x + b`, with `W` frozen and only `b` trained (the query/key/value, attention-output
//! and feed-forward biases and the LayerNorm shifts `β`: 0.08 % of BERT-base's parameters). The
//! method wraps no module and adds no parameter: it names the base parameters that train
//! through [`PeftMethod::trainable_base_params`], and the host trains and saves them under their
//! own names (`base_model.model.<module>.bias`), as PEFT saves `modules_to_save`.
//!
//! Configuration (PEFT has no BitFit; the fields are those PEFT's other methods use for the
//! same choices):
//!
//! - `target_modules` (default: every module with a bias), `exclude_modules`,
//!   `layers_to_transform`, `layers_pattern`: which modules' biases train, with PEFT's matching
//!   rules (`whetstone_sdk::targets`) applied to the module that owns each bias;
//! - `modules_to_save`: base modules trained whole; for sequence classification the head
//!   (`classifier`, `score`) is added, as PEFT does, since it starts untrained.
//!
//! A model without biases (Llama-family models such as SmolLM2) is refused with a message
//! pointing to LN tuning or LoRA.

mod config;
mod select;

use std::sync::Mutex;

use whetstone_sdk::prelude::*;

pub use config::BitFitConfig;
pub use select::{module_of, saves_module, select, Selection};

/// The BitFit method.
pub struct BitFit {
    cfg: BitFitConfig,
    architecture: String,
    /// Classification heads PEFT adds to `modules_to_save` for sequence classification.
    head_modules: Vec<String>,
    /// Whether what trains has been logged (the host asks again after every step).
    logged: Mutex<bool>,
}

/// Number of values in base parameter `name`.
fn values_of(name: &str) -> Result<usize> {
    Ok(whet_host::base_param(name)?.shape()?.iter().product())
}

/// Number of values in all of `names`.
fn count_values(names: &[String]) -> Result<usize> {
    names.iter().map(|n| values_of(n)).sum()
}

impl BitFit {
    /// Logs, once, how many bias vectors and values train.
    fn log_selection(&self, selection: &Selection) -> Result<()> {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if *logged {
            return Ok(());
        }
        *logged = true;
        let bias_values = count_values(&selection.biases)?;
        let mut message = format!(
            "BitFit trains {} bias vectors ({bias_values} values)",
            selection.biases.len()
        );
        if !selection.saved.is_empty() {
            let mut modules: Vec<&str> = selection.saved.iter().map(|n| module_of(n)).collect();
            modules.dedup();
            message.push_str(&format!(
                " and {} values of modules_to_save ({})",
                count_values(&selection.saved)?,
                modules.join(", ")
            ));
        }
        whet_host::log(Level::Info, &message);
        Ok(())
    }
}

impl PeftMethod for BitFit {
    type Config = BitFitConfig;

    fn new(cfg: BitFitConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(BitFit {
            cfg,
            architecture: String::new(),
            head_modules: Vec::new(),
            logged: Mutex::new(false),
        })
    }

    fn config_fields() -> Vec<ConfigField> {
        config::fields()
    }

    fn init_model(&mut self, model: &ModelInfo) -> Result<()> {
        self.architecture = model.architecture.clone();
        if model.task == "sequence-classification" {
            self.head_modules = vec!["classifier".into(), "score".into()];
        }
        Ok(())
    }

    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>> {
        let selection = select(&self.cfg, &self.head_modules, names, &self.architecture)?;
        self.log_selection(&selection)?;
        Ok(selection.names(names))
    }
}

whetstone_sdk::register_method!(BitFit);
