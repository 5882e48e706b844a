//! (IA)³ as a Whetstone plugin, with Hugging Face PEFT's configuration and formulas.
//!
//! Liu, Tam, Muqeeth, Mohta, Huang, Bansal and Raffel 2022, "Few-Shot Parameter-Efficient
//! Fine-Tuning is Better and Cheaper than In-Context Learning" (Infused Adapter by Inhibiting
//! and Amplifying Inner Activations). Each wrapped linear layer `y = W x + b` gets one trainable
//! vector `l`, initialised to ones so training starts from the base model:
//!
//! - an ordinary module (attention keys and values) rescales its output, bias included:
//!   `y = l ⊙ (W x + b)`, with `l` stored `[out, 1]`;
//! - a feedforward module (`feedforward_modules`, the second MLP projection) rescales its
//!   input: `y = W (l ⊙ x) + b`, with `l` stored `[1, in]`.
//!
//! Merging multiplies the weight by `l` (`W ⊙ l`, by rows or by columns), so the update is
//! `ΔW = W ⊙ (l − 1)`. PEFT also multiplies the bias of an ordinary module by `l`; the merge
//! contract carries only `ΔW`, so such a module (an ordinary module with a bias, e.g. BERT's
//! `key`/`value` or Qwen2-style `k_proj`/`v_proj`) cannot be merged, and
//! [`delta_weight`](PeftMethod::delta_weight) says so instead of giving a wrong result.
//! Feedforward modules and bias-free modules merge exactly.
//!
//! The configuration is PEFT's `IA3Config` (`target_modules`, `exclude_modules`,
//! `feedforward_modules`, `fan_in_fan_out`, `modules_to_save`, `init_ia3_weights`) with PEFT's
//! defaults per model type (llama: `k_proj`, `v_proj`, `down_proj`, feedforward `down_proj`;
//! bert: `key`, `value`, `output.dense`, feedforward `output.dense`). The vectors are saved as
//! PEFT names them, `<module>.ia3_l`, in PEFT's shapes, so adapters move both ways between
//! Whetstone and Python.

mod config;
mod defaults;

use std::collections::HashMap;
use std::sync::Mutex;

use whetstone_sdk::prelude::*;

pub use config::{is_feedforward, Ia3Config};

/// The parameter name PEFT saves the vector under (`<module>.ia3_l`).
pub const PARAM: &str = "ia3_l";

/// How a wrapped module applies its vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Scales the input; `l` is `[1, in]`.
    Feedforward,
    /// Scales the output, bias included; `l` is `[out, 1]`.
    Output {
        /// Whether the base module has a bias (which merging would have to scale too).
        has_bias: bool,
    },
}

/// The (IA)³ method.
pub struct Ia3 {
    cfg: Ia3Config,
    /// `target_modules`, or PEFT's default for the model type.
    targets: TargetSpec,
    /// `feedforward_modules`, or PEFT's default for the model type.
    feedforward: ModuleSelector,
    /// Classification heads PEFT adds to `modules_to_save` for sequence classification.
    head_modules: Vec<String>,
    /// Every wrapped module and how it applies its vector.
    wrapped: Mutex<HashMap<String, Kind>>,
}

impl Ia3 {
    fn kind_of(&self, module: &str) -> Result<Kind> {
        let map = self.wrapped.lock().unwrap_or_else(|p| p.into_inner());
        map.get(module)
            .copied()
            .ok_or_else(|| Error::msg(format!("`{module}` is not wrapped by IA3")))
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

impl PeftMethod for Ia3 {
    type Config = Ia3Config;

    fn new(cfg: Ia3Config) -> Result<Self> {
        cfg.validate()?;
        Ok(Ia3 {
            targets: cfg.target_spec(),
            feedforward: ModuleSelector::List(Vec::new()),
            cfg,
            head_modules: Vec::new(),
            wrapped: Mutex::new(HashMap::new()),
        })
    }

    fn config_fields() -> Vec<ConfigField> {
        config::fields()
    }

    fn init_model(&mut self, model: &ModelInfo) -> Result<()> {
        let arch = &model.architecture;
        if self.targets.target_modules.is_none() {
            self.targets.target_modules = Some(defaults::targets(arch).ok_or_else(|| {
                Error::config(format!(
                    "target_modules is not set and PEFT has no IA3 default for `{arch}`; list \
                     module names (e.g. [\"k_proj\", \"v_proj\", \"down_proj\"])"
                ))
            })?);
        }
        self.feedforward = match &self.cfg.feedforward_modules {
            Some(ff) => ff.clone(),
            None => defaults::feedforward(arch).ok_or_else(|| {
                Error::config(format!(
                    "feedforward_modules is not set and PEFT has no IA3 default for `{arch}`; \
                     list the wrapped modules whose input is scaled (e.g. [\"down_proj\"]), or \
                     [] for none"
                ))
            })?,
        };
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
        self.targets.matches(linear, None)
    }

    fn init_linear(&self, layer: &mut Linear) -> Result<()> {
        let (kind, shape) = if is_feedforward(&self.feedforward, layer.name())? {
            (Kind::Feedforward, [1, layer.in_features()])
        } else {
            let has_bias = layer.info().has_bias;
            (Kind::Output { has_bias }, [layer.out_features(), 1])
        };
        let init = if self.cfg.init_ia3_weights {
            Init::Ones
        } else {
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            }
        };
        layer.add_param(PARAM, &shape, init)?;
        self.wrapped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(layer.name().to_string(), kind);
        Ok(())
    }

    fn forward_linear(&self, layer: &Linear, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        let l = layer.param(PARAM)?.reshape(&[-1])?;
        match self.kind_of(layer.name())? {
            Kind::Feedforward => {
                let out = x.mul(&l)?.matmul_t(layer.base_weight()?)?;
                match layer.base_bias()? {
                    Some(b) => out.add(b),
                    None => Ok(out),
                }
            }
            Kind::Output { .. } => base_out.mul(&l),
        }
    }

    fn delta_weight(&self, layer: &Linear) -> Result<Option<Tensor>> {
        if let Kind::Output { has_bias: true } = self.kind_of(layer.name())? {
            return Err(Error::msg(format!(
                "IA3 scales the bias of `{}` as well as its weight (PEFT merges b ⊙ l), and a \
                 merge can only add ΔW to the weight: this adapter cannot be merged exactly. \
                 Keep it unmerged, or target modules without a bias (or feedforward modules) \
                 when a merge is needed",
                layer.name()
            )));
        }
        // `l` is [out, 1] or [1, in]: it scales W by rows or by columns.
        let l = layer.param(PARAM)?;
        let w = layer.base_weight()?;
        Ok(Some(w.mul(l.add_scalar(-1.0)?)?))
    }

    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>> {
        Ok(names
            .iter()
            .filter(|n| self.saves_module(n))
            .cloned()
            .collect())
    }
}

whetstone_sdk::register_method!(Ia3);
