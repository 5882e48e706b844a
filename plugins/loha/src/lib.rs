//! LoHa as a Whetstone plugin, with Hugging Face PEFT's configuration and formulas.
//!
//! Hyeon-Woo, Ye-Bin and Oh 2022, "FedPara: Low-Rank Hadamard Product for
//! Communication-Efficient Federated Learning" (ICLR 2022), as LyCORIS and PEFT apply it to
//! fine-tuning: a frozen linear layer `W` `[out, in]` gets the update
//!
//! ```text
//! ΔW = (hada_w1_a · hada_w1_b) ⊙ (hada_w2_a · hada_w2_b) · scaling,   scaling = alpha / r
//! y  = W x + ΔW x
//! ```
//!
//! with `hada_w1_a`, `hada_w2_a` `[out, r]` and `hada_w1_b`, `hada_w2_b` `[r, in]`: the Hadamard
//! product of two rank-`r` matrices reaches rank up to `r²` with `2·r·(in + out)` parameters,
//! as many as LoRA of rank `2r`. PEFT's initialisation (`init_weights = true`): `hada_w1_a`, `hada_w1_b`,
//! `hada_w2_a` Kaiming-uniform (`nn.Linear`'s default), `hada_w2_b` zero, so training starts from
//! the base model. While training, `module_dropout` skips a module's update and `rank_dropout`
//! drops output rows of `ΔW`, both as PEFT does.
//!
//! Parameters are saved under PEFT's names (`<module>.hada_w1_a`, ...), so adapters move both
//! ways between Whetstone and Python; `ΔW` is what merging adds to the base weight.

mod config;
mod dropout;

use std::collections::HashMap;
use std::sync::Mutex;

use whetstone_sdk::prelude::*;
use whetstone_sdk::targets::default_targets;

pub use config::LoHaConfig;

/// PEFT's parameter names, in creation order.
const W1_A: &str = "hada_w1_a";
const W1_B: &str = "hada_w1_b";
const W2_A: &str = "hada_w2_a";
const W2_B: &str = "hada_w2_b";

/// The LoHa method.
pub struct LoHa {
    cfg: LoHaConfig,
    default_targets: Option<ModuleSelector>,
    /// Classification heads PEFT adds to `modules_to_save` for sequence classification.
    head_modules: Vec<String>,
    /// Scaling of each wrapped module (rank and alpha may differ per module).
    scaling: Mutex<HashMap<String, f64>>,
}

impl LoHa {
    fn scaling_of(&self, module: &str) -> Result<f64> {
        let map = self.scaling.lock().unwrap_or_else(|p| p.into_inner());
        map.get(module)
            .copied()
            .ok_or_else(|| Error::msg(format!("`{module}` is not wrapped by LoHa")))
    }

    /// `ΔW` `[out, in]` of `layer`, without dropout.
    fn delta(&self, layer: &Linear) -> Result<Tensor> {
        let scaling = self.scaling_of(layer.name())?;
        let w1 = layer.param(W1_A)?.matmul(layer.param(W1_B)?)?;
        let w2 = layer.param(W2_A)?.matmul(layer.param(W2_B)?)?;
        w1.mul(w2)?.scale(scaling)
    }

    /// Whether base parameter `name` belongs to a module listed in `modules_to_save` (or a
    /// classification head PEFT saves by default).
    fn saves_module(&self, name: &str) -> bool {
        let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or(name);
        self.cfg
            .modules_to_save
            .iter()
            .flatten()
            .chain(self.head_modules.iter())
            .any(|m| module == m || module.ends_with(&format!(".{m}")))
    }
}

impl PeftMethod for LoHa {
    type Config = LoHaConfig;

    fn new(cfg: LoHaConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(LoHa {
            cfg,
            default_targets: None,
            head_modules: Vec::new(),
            scaling: Mutex::new(HashMap::new()),
        })
    }

    fn config_fields() -> Vec<ConfigField> {
        config::fields()
    }

    fn init_model(&mut self, model: &ModelInfo) -> Result<()> {
        // PEFT's LoHa default targets are its LoRA ones.
        self.default_targets = default_targets(&model.architecture);
        if model.task == "sequence-classification" {
            self.head_modules = vec!["classifier".into(), "score".into()];
        }
        Ok(())
    }

    fn select_linear(&self, linear: &LinearInfo) -> Result<bool> {
        if self.head_modules.contains(&linear.name) {
            // A head in modules_to_save trains whole; PEFT never wraps it.
            return Ok(false);
        }
        self.cfg
            .targets
            .matches(linear, self.default_targets.as_ref())
    }

    fn init_linear(&self, layer: &mut Linear) -> Result<()> {
        let (r, alpha) = self.cfg.rank_and_alpha(layer.name())?;
        let (out, inp) = (layer.out_features(), layer.in_features());
        let kaiming = Init::kaiming_uniform();
        let w2_b = if self.cfg.init_weights {
            Init::Zeros
        } else {
            kaiming
        };
        layer.add_param(W1_A, &[out, r], kaiming)?;
        layer.add_param(W1_B, &[r, inp], kaiming)?;
        layer.add_param(W2_A, &[out, r], kaiming)?;
        layer.add_param(W2_B, &[r, inp], w2_b)?;
        self.scaling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(layer.name().to_string(), alpha / r as f64);
        Ok(())
    }

    fn forward_linear(&self, layer: &Linear, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        if !dropout::module_kept(self.cfg.module_dropout)? {
            return Ok(base_out.clone());
        }
        let delta = dropout::rank_dropout(self.delta(layer)?, self.cfg.rank_dropout)?;
        base_out.add(x.matmul_t(delta)?)
    }

    fn delta_weight(&self, layer: &Linear) -> Result<Option<Tensor>> {
        self.delta(layer).map(Some)
    }

    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>> {
        Ok(names
            .iter()
            .filter(|n| self.saves_module(n))
            .cloned()
            .collect())
    }
}

whetstone_sdk::register_method!(LoHa);
