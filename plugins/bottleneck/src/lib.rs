//! Bottleneck adapters as a Whetstone plugin, configured with AdapterHub's (`adapters` library)
//! field names.
//!
//! Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP": a small bottleneck MLP
//! after the attention block's output projection and after the feed-forward block's output
//! projection of every transformer block. Pfeiffer et al. 2021, "AdapterFusion:
//! Non-Destructive Task Composition for Transfer Learning": one adapter per block, after the
//! feed-forward output projection. On the output `h` `[..., d]` of the projection it adapts:
//!
//! `h' = h + scaling · dropout(up(act(down(h))))`, with `down` `[d → d / reduction_factor]` and
//! `up` `[d / reduction_factor → d]` (`h' = scaling · dropout(up(act(down(h))))` with
//! `residual: false`).
//!
//! The adapter reads the projection's result before the block's own dropout, residual and
//! LayerNorm (AdapterHub's `original_ln_before: false`, `original_ln_after: true`,
//! `residual_before_ln: true`); AdapterHub's Pfeiffer configuration moves the block's residual
//! and LayerNorm before the adapter (`original_ln_before: true`), which this plugin does not
//! reproduce. The placement comes from Hugging Face module names (see [`placement`]), or from
//! an explicit `target_modules`. The adapter width `d` is the adapted module's
//! `out_features` (the host gives methods no per-placement hidden size).
//!
//! PEFT has no bottleneck adapters, so the saved layout is this plugin's own, plain and
//! documented: under each adapted module, `adapter_down.weight` `[bottleneck, d]`,
//! `adapter_down.bias` `[bottleneck]`, `adapter_up.weight` `[d, bottleneck]` and
//! `adapter_up.bias` `[d]` (PyTorch's `nn.Linear` layout), e.g.
//! `base_model.model.encoder.layer.0.output.dense.adapter_down.weight`. The adapter is
//! non-linear, so it cannot be merged into the base weights.
//!
//! Initialisation (`init_weights`): `"mam_adapter"` (the default here) draws the
//! down-projection as `nn.Linear` does (Kaiming-uniform, `a = √5`) and zeroes the
//! up-projection and both biases, so training starts exactly at the base model; AdapterHub's
//! default `"bert"` draws both projections from `N(0, 0.02)`.

mod activation;
mod config;
pub mod placement;

use std::collections::HashSet;
use std::sync::Mutex;

use whetstone_sdk::prelude::*;

pub use activation::NonLinearity;
pub use config::{BottleneckConfig, InitWeights, Variant};

/// The bottleneck adapter method.
pub struct Bottleneck {
    cfg: BottleneckConfig,
    activation: NonLinearity,
    /// Where adapters go when `target_modules` is not given.
    placement: Option<ModuleSelector>,
    /// Classification heads trained whole for sequence classification.
    head_modules: Vec<String>,
    wrapped: Mutex<HashSet<String>>,
}

impl Bottleneck {
    /// Whether base parameter `name` belongs to a module listed in `modules_to_save` (or a
    /// classification head).
    fn saves_module(&self, name: &str) -> bool {
        let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or(name);
        self.cfg
            .modules_to_save
            .iter()
            .flatten()
            .chain(self.head_modules.iter())
            .any(|m| module == m || module.ends_with(&format!(".{m}")))
    }

    fn is_wrapped(&self, module: &str) -> bool {
        self.wrapped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(module)
    }
}

impl PeftMethod for Bottleneck {
    type Config = BottleneckConfig;

    fn new(cfg: BottleneckConfig) -> Result<Self> {
        cfg.validate()?;
        let (attention, ffn) = cfg.placements()?;
        Ok(Bottleneck {
            activation: cfg.activation()?,
            placement: placement::default_selector(attention, ffn),
            cfg,
            head_modules: Vec::new(),
            wrapped: Mutex::new(HashSet::new()),
        })
    }

    fn config_fields() -> Vec<ConfigField> {
        config::fields()
    }

    fn init_model(&mut self, model: &ModelInfo) -> Result<()> {
        if model.task == "sequence-classification" {
            self.head_modules = vec!["classifier".into(), "score".into()];
        }
        Ok(())
    }

    fn select_linear(&self, linear: &LinearInfo) -> Result<bool> {
        if self.head_modules.contains(&linear.name) {
            return Ok(false);
        }
        if linear
            .layer_index
            .is_some_and(|i| self.cfg.leave_out.contains(&i))
        {
            return Ok(false);
        }
        self.cfg.targets.matches(linear, self.placement.as_ref())
    }

    fn init_linear(&self, layer: &mut Linear) -> Result<()> {
        let d = layer.out_features();
        let bottleneck = self.cfg.bottleneck(d);
        let (down, up) = match self.cfg.init_weights {
            InitWeights::MamAdapter => (Init::kaiming_uniform(), Init::Zeros),
            InitWeights::Bert => {
                let normal = Init::Normal {
                    mean: 0.0,
                    std: 0.02,
                };
                (normal, normal)
            }
        };
        layer.add_param("adapter_down.weight", &[bottleneck, d], down)?;
        layer.add_param("adapter_down.bias", &[bottleneck], Init::Zeros)?;
        layer.add_param("adapter_up.weight", &[d, bottleneck], up)?;
        layer.add_param("adapter_up.bias", &[d], Init::Zeros)?;
        self.wrapped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(layer.name().to_string());
        Ok(())
    }

    fn forward_linear(&self, layer: &Linear, _x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        if !self.is_wrapped(layer.name()) {
            return Err(Error::msg(format!(
                "`{}` has no bottleneck adapter",
                layer.name()
            )));
        }
        let down = base_out
            .matmul_t(layer.param("adapter_down.weight")?)?
            .add(layer.param("adapter_down.bias")?)?;
        let mut h = self
            .activation
            .apply(&down)?
            .matmul_t(layer.param("adapter_up.weight")?)?
            .add(layer.param("adapter_up.bias")?)?;
        if self.cfg.scaling != 1.0 {
            h = h.scale(self.cfg.scaling)?;
        }
        let h = layer.dropout(&h, self.cfg.dropout)?;
        if self.cfg.residual {
            base_out.add(h)
        } else {
            Ok(h)
        }
    }

    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>> {
        Ok(names
            .iter()
            .filter(|n| self.saves_module(n))
            .cloned()
            .collect())
    }
}

whetstone_sdk::register_method!(Bottleneck);
