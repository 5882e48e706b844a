//! LoKr as a Whetstone plugin, with Hugging Face PEFT's configuration and formulas.
//!
//! A frozen linear layer `W` `[out, in]` gets a Kronecker-product update (Edalati et al. 2022,
//! "KronA: Parameter Efficient Tuning with Kronecker Adapter"; as LyCORIS and PEFT implement it,
//! Yeh et al. 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
//! Evaluation", ICLR 2024):
//!
//! ```text
//! ΔW = kron(w1, w2) · scaling,   scaling = alpha / r
//! y  = W x + ΔW x
//! ```
//!
//! `out = out_l · out_k` and `in = in_m · in_n` are split by PEFT's `factorization(dim,
//! decompose_factor)` (near the square root by default), `w1` is `[out_l, in_m]` and `w2`
//! `[out_k, in_n]`. `w2` is stored whole as `lokr_w2` when `r ≥ max(out_k, in_n) / 2`, else as
//! the rank-`r` product `lokr_w2_a · lokr_w2_b`; `w1` is stored whole as `lokr_w1` unless
//! `decompose_both` and `r < max(out_l, in_m) / 2` make it `lokr_w1_a · lokr_w1_b`. PEFT's
//! initialisation (`init_weights = true`): `w1` (or `lokr_w1_a`) zero, the other factors
//! Kaiming-uniform, so training starts from the base model; `"lycoris"` zeroes `w2` (or
//! `lokr_w2_b`) instead. While training, `module_dropout` skips a module's update and
//! `rank_dropout` drops output rows of `ΔW`, both as PEFT does.
//!
//! Parameters are saved under PEFT's names (`<module>.lokr_w1`, `<module>.lokr_w2_a`, ...), so
//! adapters move both ways between Whetstone and Python; `ΔW` is what merging adds to the base
//! weight.

mod config;
mod dropout;
mod kron;
mod shape;

use std::collections::HashMap;
use std::sync::Mutex;

use whetstone_sdk::prelude::*;
use whetstone_sdk::targets::default_targets;

pub use config::{InitWeights, LoKrConfig};
pub use shape::{factorization, KronShape};

/// The LoKr method.
pub struct LoKr {
    cfg: LoKrConfig,
    default_targets: Option<ModuleSelector>,
    /// Classification heads PEFT adds to `modules_to_save` for sequence classification.
    head_modules: Vec<String>,
    /// Factor layout and scaling of each wrapped module.
    modules: Mutex<HashMap<String, (KronShape, f64)>>,
}

/// One Kronecker factor: whole, or a rank-`r` product `a · b`.
struct Factor {
    whole: &'static str,
    a: &'static str,
    b: &'static str,
}

const W1: Factor = Factor {
    whole: "lokr_w1",
    a: "lokr_w1_a",
    b: "lokr_w1_b",
};

const W2: Factor = Factor {
    whole: "lokr_w2",
    a: "lokr_w2_a",
    b: "lokr_w2_b",
};

impl Factor {
    /// Creates the factor's parameters for `shape` `[rows, cols]`: the whole matrix when `full`
    /// gives its init, else `a` `[rows, r]` and `b` `[r, cols]` with the `low_rank` inits.
    fn create(
        &self,
        layer: &mut Linear,
        shape: [usize; 2],
        full: Option<Init>,
        low_rank: (Init, Init),
        r: usize,
    ) -> Result<()> {
        match full {
            Some(init) => layer.add_param(self.whole, &shape, init),
            None => {
                layer.add_param(self.a, &[shape[0], r], low_rank.0)?;
                layer.add_param(self.b, &[r, shape[1]], low_rank.1)
            }
        }
    }

    /// The factor's value.
    fn value(&self, layer: &Linear, full: bool) -> Result<Tensor> {
        if full {
            layer.param(self.whole)
        } else {
            layer.param(self.a)?.matmul(layer.param(self.b)?)
        }
    }
}

impl LoKr {
    fn module(&self, name: &str) -> Result<(KronShape, f64)> {
        let map = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name)
            .copied()
            .ok_or_else(|| Error::msg(format!("`{name}` is not wrapped by LoKr")))
    }

    /// `ΔW` `[out, in]` of `layer`, without dropout.
    fn delta(&self, layer: &Linear) -> Result<Tensor> {
        let (shape, scaling) = self.module(layer.name())?;
        let w1 = W1.value(layer, shape.full_w1)?;
        let w2 = W2.value(layer, shape.full_w2)?;
        kron::kron(&w1, &w2)?.scale(scaling)
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

impl PeftMethod for LoKr {
    type Config = LoKrConfig;

    fn new(cfg: LoKrConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(LoKr {
            cfg,
            default_targets: None,
            head_modules: Vec::new(),
            modules: Mutex::new(HashMap::new()),
        })
    }

    fn config_fields() -> Vec<ConfigField> {
        config::fields()
    }

    fn init_model(&mut self, model: &ModelInfo) -> Result<()> {
        // PEFT's LoKr default targets are its LoRA ones.
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
        let shape = KronShape::new(
            layer.out_features(),
            layer.in_features(),
            r,
            self.cfg.decompose_both,
            self.cfg.decompose_factor,
        );
        let k = Init::kaiming_uniform();
        let zero = Init::Zeros;
        // (whole w1, w1_a, w1_b, whole w2, w2_a, w2_b), as PEFT's three reset functions.
        let (w1, w1_a, w1_b, w2, w2_a, w2_b) = match self.cfg.init_weights {
            InitWeights::Default => (zero, zero, k, k, k, k),
            InitWeights::Lycoris => (k, k, k, zero, k, zero),
            InitWeights::Random => (k, k, k, k, k, k),
        };
        let full = |whole: bool, init: Init| whole.then_some(init);
        W1.create(layer, shape.w1(), full(shape.full_w1, w1), (w1_a, w1_b), r)?;
        W2.create(layer, shape.w2(), full(shape.full_w2, w2), (w2_a, w2_b), r)?;
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(layer.name().to_string(), (shape, alpha / r as f64));
        Ok(())
    }

    fn forward_linear(&self, layer: &Linear, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        if !dropout::module_kept(self.cfg.module_dropout)? {
            return Ok(base_out.clone());
        }
        let delta = dropout::rank_dropout(
            self.delta(layer)?,
            self.cfg.rank_dropout,
            self.cfg.rank_dropout_scale,
        )?;
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

whetstone_sdk::register_method!(LoKr);
