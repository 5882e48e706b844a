//! VeRA as a Whetstone plugin, with Hugging Face PEFT's configuration and formulas.
//!
//! Kopiczko, Blankevoort and Asano 2024, "VeRA: Vector-based Random Matrix Adaptation": every
//! wrapped linear layer `W` shares one pair of frozen random matrices, `vera_A` `[r, max_in]`
//! and `vera_B` `[max_out, r]` (sized for the largest wrapped module and sliced per module,
//! `A = vera_A[:, :in]`, `B = vera_B[:out, :]`), and trains only two vectors per module,
//! `vera_lambda_d` `[r]` and `vera_lambda_b` `[out]`:
//!
//! `y = W x + λ_b ⊙ (B · (λ_d ⊙ (A · dropout(x))))`, so `ΔW = diag(λ_b) · B · diag(λ_d) · A`.
//!
//! `λ_b` starts at zero and `λ_d` at `d_initial` (0.1), so training starts from the base model.
//! Parameters are saved as PEFT names them (`<module>.vera_lambda_b`,
//! `<module>.vera_lambda_d`). VeRA is mergeable ([`Vera::delta_weight`]).
//!
//! # Projections, and interchange with PEFT
//!
//! The projections are not parameters: the plugin generates them itself, once per method
//! instance, from `projection_prng_key` with a small integer generator (SplitMix64, see
//! [`projection`]) and PEFT's Kaiming-uniform bounds (`±sqrt(6 / fan_in)`), and hands them to
//! the host as constants. The native and wasm builds therefore compute identical matrices, and
//! an adapter reloaded with the same configuration on the same model regenerates exactly the
//! projections it was trained with. The adapter file holds only the vectors; whatever
//! `save_projection` says, `vera_A` / `vera_B` are never written (the plugin contract has no
//! frozen, non-trained parameter to carry them).
//!
//! PEFT draws its projections from torch's generator, which cannot be reproduced here, so
//! **Whetstone's VeRA adapters and PEFT's are not interchangeable**: the vectors are only
//! meaningful with the projections they were trained with, and those are carried by neither
//! side's files in a form the other reads. Concretely, PEFT refuses a Whetstone adapter whose
//! config keeps `save_projection: true` (no `base_model.vera_A` in the file), or, with
//! `save_projection: false`, regenerates different projections from torch's generator; a PEFT
//! file with `base_model.vera_A` / `base_model.vera_B` is refused by Whetstone's loader as
//! keys that match no parameter.

mod config;
pub mod projection;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use whetstone_sdk::prelude::*;
use whetstone_sdk::targets::default_targets;

pub use config::{Bias, VeraConfig};
use projection::Projections;

/// The VeRA method.
pub struct Vera {
    cfg: VeraConfig,
    default_targets: Option<ModuleSelector>,
    /// Classification heads PEFT adds to `modules_to_save` for sequence classification.
    head_modules: Vec<String>,
    /// `(in, out)` of each wrapped module.
    wrapped: Mutex<HashMap<String, (usize, usize)>>,
    /// The shared projections, created on first use (once every module is known, since their
    /// size is the largest module's) and kept for the instance's lifetime.
    projections: Mutex<Option<Projections>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vera {
    /// Runs `f` on the shared projections, generating them on the first call.
    fn with_projections<T>(&self, f: impl FnOnce(&Projections) -> Result<T>) -> Result<T> {
        let mut guard = lock(&self.projections);
        if guard.is_none() {
            let (max_in, max_out) = lock(&self.wrapped)
                .values()
                .fold((0, 0), |(i, o), &(mi, mo)| (i.max(mi), o.max(mo)));
            if max_in == 0 || max_out == 0 {
                return Err(Error::msg("VeRA wraps no module: no projections to build"));
            }
            *guard = Some(Projections::new(
                self.cfg.projection_prng_key,
                self.cfg.r,
                max_in,
                max_out,
            )?);
        }
        match guard.as_ref() {
            Some(p) => f(p),
            None => Err(Error::msg("VeRA projections are missing")),
        }
    }

    /// The slices `Aᵀ` `[in, r]` and `B` `[out, r]` of `layer`.
    fn slices(&self, layer: &Linear) -> Result<(Tensor, Tensor)> {
        if !lock(&self.wrapped).contains_key(layer.name()) {
            return Err(Error::msg(format!(
                "`{}` is not wrapped by VeRA",
                layer.name()
            )));
        }
        self.with_projections(|p| p.slices(layer.in_features(), layer.out_features()))
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

impl PeftMethod for Vera {
    type Config = VeraConfig;

    fn new(cfg: VeraConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Vera {
            cfg,
            default_targets: None,
            head_modules: Vec::new(),
            wrapped: Mutex::new(HashMap::new()),
            projections: Mutex::new(None),
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
        if lock(&self.projections).is_some() {
            return Err(Error::msg(format!(
                "`{}` is wrapped after the shared projections were built",
                layer.name()
            )));
        }
        let (init_b, init_d) = if self.cfg.init_weights {
            (Init::Zeros, Init::Constant(self.cfg.d_initial))
        } else {
            (
                Init::Ones,
                Init::Normal {
                    mean: 0.0,
                    std: 1.0,
                },
            )
        };
        layer.add_param("vera_lambda_b", &[layer.out_features()], init_b)?;
        layer.add_param("vera_lambda_d", &[self.cfg.r], init_d)?;
        lock(&self.wrapped).insert(
            layer.name().to_string(),
            (layer.in_features(), layer.out_features()),
        );
        Ok(())
    }

    fn forward_linear(&self, layer: &Linear, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        let (a_t, b) = self.slices(layer)?;
        let h = layer
            .dropout(x, self.cfg.vera_dropout)?
            .matmul(&a_t)?
            .mul(layer.param("vera_lambda_d")?)?
            .matmul_t(&b)?
            .mul(layer.param("vera_lambda_b")?)?;
        base_out.add(h)
    }

    /// `ΔW = (λ_b ⊙ B) · (λ_d ⊙ A)` `[out, in]`, as PEFT's `get_delta_weight`.
    fn delta_weight(&self, layer: &Linear) -> Result<Option<Tensor>> {
        let (a_t, b) = self.slices(layer)?;
        let lambda_b = layer.param("vera_lambda_b")?.unsqueeze(1)?;
        let lambda_d = layer.param("vera_lambda_d")?.unsqueeze(0)?;
        let scaled_b = b.mul(lambda_b)?;
        let scaled_a_t = a_t.mul(lambda_d)?;
        Ok(Some(scaled_b.matmul_t(scaled_a_t)?))
    }

    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>> {
        let wrapped = lock(&self.wrapped);
        let bias_of_wrapped = |n: &str| {
            n.strip_suffix(".bias")
                .is_some_and(|m| wrapped.contains_key(m))
        };
        Ok(names
            .iter()
            .filter(|n| {
                self.saves_module(n)
                    || match self.cfg.bias {
                        Bias::None => false,
                        Bias::All => n.ends_with(".bias"),
                        Bias::VeraOnly => bias_of_wrapped(n),
                    }
            })
            .cloned()
            .collect())
    }
}

whetstone_sdk::register_method!(Vera);
