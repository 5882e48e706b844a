//! LoRA and DoRA as a Whetstone plugin, with Hugging Face PEFT's configuration and formulas.
//!
//! Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": a frozen linear layer
//! `W` gets a trainable low-rank update, `y = W x + B A dropout(x) · scaling` with `A` `[r, in]`,
//! `B` `[out, r]` (zero at start, so training starts from the base model) and
//! `scaling = lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA (Kalajdzievski 2023, "A Rank
//! Stabilization Scaling Factor for Fine-Tuning with LoRA"). Parameters are saved as PEFT names
//! them (`<module>.lora_A.weight`, `<module>.lora_B.weight`), so adapters move both ways
//! between Whetstone and Python.
//!
//! With `use_dora: true` (PEFT's switch; the adapter stays `peft_type: LORA`), the update is
//! DoRA — Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation": the adapted weight is
//! a trainable magnitude `m` `[out]` times a unit direction,
//! `W' = m · (W + s·B·A) / ‖W + s·B·A‖` (norm per output row, treated as a constant for
//! autograd as in the paper's §4.3), so
//! `y = W x + b + (m/‖·‖ − 1) · W x + (m/‖·‖) · B A dropout(x) · s`. `m` starts at the row
//! norms of the initial `W + s·B·A` (`‖W‖` with `B = 0`) and is saved as PEFT saves it,
//! `<module>.lora_magnitude_vector`. Merging folds in `ΔW = W' − W`.

mod config;
mod dora;

use std::collections::HashMap;
use std::sync::Mutex;

use whetstone_sdk::prelude::*;
use whetstone_sdk::targets::default_targets;

pub use config::{Bias, InitLoraWeights, LoraConfig};

/// The LoRA method (DoRA with `use_dora`).
pub struct Lora {
    cfg: LoraConfig,
    default_targets: Option<ModuleSelector>,
    /// Classification heads PEFT adds to `modules_to_save` for sequence classification.
    head_modules: Vec<String>,
    /// Scaling of each wrapped module (rank and alpha may differ per module).
    scaling: Mutex<HashMap<String, f64>>,
    wrapped: Mutex<Vec<String>>,
}

impl Lora {
    fn scaling_of(&self, module: &str) -> Result<f64> {
        let map = self.scaling.lock().unwrap_or_else(|p| p.into_inner());
        map.get(module)
            .copied()
            .ok_or_else(|| Error::msg(format!("`{module}` is not wrapped by LoRA")))
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

impl PeftMethod for Lora {
    type Config = LoraConfig;

    fn new(cfg: LoraConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Lora {
            cfg,
            default_targets: None,
            head_modules: Vec::new(),
            scaling: Mutex::new(HashMap::new()),
            wrapped: Mutex::new(Vec::new()),
        })
    }

    fn config_fields() -> Vec<ConfigField> {
        config::fields()
    }

    fn init_model(&mut self, model: &ModelInfo) -> Result<()> {
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
        let scaling = if self.cfg.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        let (init_a, init_b) = match self.cfg.init_lora_weights {
            InitLoraWeights::Default => (Init::kaiming_uniform(), Init::Zeros),
            InitLoraWeights::Gaussian => (
                Init::Normal {
                    mean: 0.0,
                    std: 1.0 / r as f64,
                },
                Init::Zeros,
            ),
            InitLoraWeights::Random => (Init::kaiming_uniform(), Init::kaiming_uniform()),
        };
        layer.add_param("lora_A.weight", &[r, layer.in_features()], init_a)?;
        layer.add_param("lora_B.weight", &[layer.out_features(), r], init_b)?;
        if self.cfg.use_dora {
            dora::add_magnitude(layer, scaling)?;
        }
        let name = layer.name().to_string();
        self.scaling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), scaling);
        self.wrapped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(name);
        Ok(())
    }

    fn forward_linear(&self, layer: &Linear, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        let scaling = self.scaling_of(layer.name())?;
        if self.cfg.use_dora {
            return dora::forward(layer, x, base_out, scaling, self.cfg.lora_dropout);
        }
        // The scaling multiplies the rank-r activations `A x`, not the full-width `B A x`:
        // the same product, one pass over `[tokens, r]` instead of `[tokens, out]`, and one
        // full-width tensor fewer kept for the backward pass.
        let h = layer
            .dropout(x, self.cfg.lora_dropout)?
            .matmul_t(layer.param("lora_A.weight")?)?
            .scale(scaling)?;
        base_out.add(h.matmul_t(layer.param("lora_B.weight")?)?)
    }

    fn delta_weight(&self, layer: &Linear) -> Result<Option<Tensor>> {
        let scaling = self.scaling_of(layer.name())?;
        if self.cfg.use_dora {
            return dora::delta_weight(layer, scaling).map(Some);
        }
        let b = layer.param("lora_B.weight")?;
        let a = layer.param("lora_A.weight")?;
        Ok(Some(b.matmul(a)?.scale(scaling)?))
    }

    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>> {
        let wrapped = self.wrapped.lock().unwrap_or_else(|p| p.into_inner());
        let bias_of_wrapped = |n: &str| {
            n.strip_suffix(".bias")
                .is_some_and(|m| wrapped.iter().any(|w| w == m))
        };
        Ok(names
            .iter()
            .filter(|n| {
                self.saves_module(n)
                    || match self.cfg.bias {
                        Bias::None => false,
                        Bias::All => n.ends_with(".bias"),
                        Bias::LoraOnly => bias_of_wrapped(n),
                    }
            })
            .cloned()
            .collect())
    }
}

whetstone_sdk::register_method!(Lora);
