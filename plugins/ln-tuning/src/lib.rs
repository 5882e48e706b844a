//! LayerNorm tuning as a Whetstone plugin, with Hugging Face PEFT's `LNTuningConfig`.
//!
//! Zhao, Tu, Wei, Mei and Xie 2024, "Tuning LayerNorm in Attention: Towards Efficient
//! Multi-Modal LLM Finetuning": only the normalisation layers train. A LayerNorm
//! `y = γ ⊙ (x − μ) / sqrt(σ² + ε) + β` trains its scale `γ` and shift `β`; an RMSNorm
//! `y = γ ⊙ x / sqrt(mean(x²) + ε)` (Llama) trains `γ`. Everything else stays frozen, so the
//! trained values are a few per hidden unit and layer.
//!
//! The method wraps no module and adds no parameter: it names the base parameters that train
//! through [`PeftMethod::trainable_base_params`] — every parameter of each module that
//! `target_modules` selects and `exclude_modules` does not (PEFT's matching rules, on the module
//! owning the parameter), plus `modules_to_save` and, for sequence classification, the head
//! (`classifier`, `score`), as PEFT adds it.
//!
//! Default `target_modules` are PEFT's per model type (llama, mistral, gemma:
//! `input_layernorm`, `post_attention_layernorm`, `norm`; qwen2: `post_attention_layernorm`).
//! PEFT has no default for BERT; Whetstone uses `LayerNorm` there (see
//! [`default_targets`]).
//!
//! **The saved adapter.** PEFT's `LNTuningLayer` keeps a trainable deep copy of each targeted
//! module and saves it under `ln_tuning_layers`
//! (`base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight`). Whetstone trains
//! the norm parameters in place, and the host writes and reads them under those same keys, so
//! adapters move both ways between Whetstone and Python PEFT; a head listed in
//! `modules_to_save` is saved as PEFT saves modules to save.

mod config;
mod defaults;
mod select;

use std::sync::Mutex;

use whetstone_sdk::prelude::*;

pub use config::LnTuningConfig;
pub use defaults::default_targets;
pub use select::{module_of, saves_module, select, Selection};

/// The LN tuning method.
pub struct LnTuning {
    cfg: LnTuningConfig,
    architecture: String,
    /// `target_modules` when the config has none: PEFT's default for the model type.
    default_targets: Option<ModuleSelector>,
    /// Classification heads PEFT adds to `modules_to_save` for sequence classification.
    head_modules: Vec<String>,
    /// Whether what trains has been logged (the host asks again after every step).
    logged: Mutex<bool>,
}

/// Number of values in all of base parameters `names`.
fn count_values(names: &[String]) -> Result<usize> {
    names
        .iter()
        .map(|n| Ok(whet_host::base_param(n)?.shape()?.iter().product::<usize>()))
        .sum()
}

impl LnTuning {
    /// Logs, once, which modules and how many values train.
    fn log_selection(&self, selection: &Selection) -> Result<()> {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if *logged {
            return Ok(());
        }
        *logged = true;
        let modules = selection.modules();
        let mut shown: Vec<&str> = modules.iter().take(4).copied().collect();
        if modules.len() > shown.len() {
            shown.push("...");
        }
        let mut message = format!(
            "LN tuning trains {} modules, {} tensors ({} values): {}",
            modules.len(),
            selection.tuned.len(),
            count_values(&selection.tuned)?,
            shown.join(", ")
        );
        if !selection.saved.is_empty() {
            message.push_str(&format!(
                "; modules_to_save: {} values",
                count_values(&selection.saved)?
            ));
        }
        whet_host::log(Level::Info, &message);
        Ok(())
    }
}

impl PeftMethod for LnTuning {
    type Config = LnTuningConfig;

    fn new(cfg: LnTuningConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(LnTuning {
            cfg,
            architecture: String::new(),
            default_targets: None,
            head_modules: Vec::new(),
            logged: Mutex::new(false),
        })
    }

    fn config_fields() -> Vec<ConfigField> {
        config::fields()
    }

    fn init_model(&mut self, model: &ModelInfo) -> Result<()> {
        self.architecture = model.architecture.clone();
        self.default_targets = default_targets(&model.architecture);
        if model.task == "sequence-classification" {
            self.head_modules = vec!["classifier".into(), "score".into()];
        }
        Ok(())
    }

    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>> {
        let selection = select(
            &self.cfg,
            self.default_targets.as_ref(),
            &self.head_modules,
            names,
            &self.architecture,
        )?;
        self.log_selection(&selection)?;
        Ok(selection.names(names))
    }
}

whetstone_sdk::register_method!(LnTuning);
