//! PEFT's `LoHaConfig`: the fields LoHa reads, their defaults, and clear errors for the PEFT
//! fields this plugin does not implement.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use whetstone_sdk::config::reject_switched_on;
use whetstone_sdk::targets::{pattern_value, TargetSpec};
use whetstone_sdk::{ConfigField, Error, Result};

fn default_r() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

fn default_true() -> bool {
    true
}

/// The configuration, with PEFT's field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct LoHaConfig {
    /// Rank of each of the two low-rank factors.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator: `scaling = alpha / r`.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Probability of dropping each output row of `ΔW` while training (the kept rows are
    /// rescaled by the inverse of the kept fraction).
    #[serde(default)]
    pub rank_dropout: f64,
    /// Probability of skipping the whole update of a module in a training forward.
    #[serde(default)]
    pub module_dropout: f64,
    /// FedPara's "Proposition 3" for convolutions; PEFT ignores it on linear modules, the only
    /// modules Whetstone wraps.
    #[serde(default)]
    pub use_effective_conv2d: bool,
    /// Which modules to wrap.
    #[serde(flatten)]
    pub targets: TargetSpec,
    /// Per-module rank overrides.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// `true`: PEFT's scheme (`hada_w2_b` zero, so `ΔW = 0` at start); `false`: every factor
    /// random, for tests.
    #[serde(default = "default_true")]
    pub init_weights: bool,
    /// Base modules trained whole and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field: PEFT bookkeeping is accepted, unsupported features are refused by
    /// name in [`LoHaConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

fn check_probability(field: &str, p: f64) -> Result<()> {
    if (0.0..1.0).contains(&p) {
        Ok(())
    } else {
        Err(Error::config(format!("{field} = {p} must be in [0, 1)")))
    }
}

impl LoHaConfig {
    /// Refuses values LoHa cannot honour, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("r must be at least 1"));
        }
        check_probability("rank_dropout", self.rank_dropout)?;
        check_probability("module_dropout", self.module_dropout)?;
        if self.targets.layers_pattern.is_some() && self.targets.layers_to_transform.is_none() {
            return Err(Error::config(
                "layers_pattern is set but layers_to_transform is not (PEFT requires both)",
            ));
        }
        reject_switched_on("LoHa", &self.other, &[], &[])
    }

    /// Rank and alpha of `module`, after `rank_pattern` / `alpha_pattern`.
    pub fn rank_and_alpha(&self, module: &str) -> Result<(usize, f64)> {
        let r = pattern_value(&self.rank_pattern, module)?.unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, module)?.unwrap_or(self.alpha);
        if r == 0 {
            return Err(Error::config(format!(
                "rank_pattern gives `{module}` rank 0"
            )));
        }
        Ok((r, alpha))
    }
}

/// The documented fields.
pub fn fields() -> Vec<ConfigField> {
    vec![
        ConfigField::new("r", "int", "8", "rank of each Hadamard factor"),
        ConfigField::new(
            "alpha",
            "float",
            "8",
            "scaling numerator: scaling = alpha / r",
        ),
        ConfigField::new(
            "rank_dropout",
            "float",
            "0.0",
            "training only: drop output rows of ΔW, rescale the rest by 1 / kept fraction",
        ),
        ConfigField::new(
            "module_dropout",
            "float",
            "0.0",
            "training only: probability of skipping a module's update in a forward",
        ),
        ConfigField::new(
            "use_effective_conv2d",
            "bool",
            "false",
            "convolutions only; no effect on linear modules",
        ),
        ConfigField::new(
            "target_modules",
            "list of names, regex string or \"all-linear\"",
            "per model type (q/v projections)",
            "modules to wrap",
        ),
        ConfigField::new(
            "exclude_modules",
            "list of names or regex string",
            "null",
            "modules never wrapped",
        ),
        ConfigField::new(
            "layers_to_transform",
            "int or list of ints",
            "null",
            "only wrap modules in these blocks",
        ),
        ConfigField::new(
            "layers_pattern",
            "string or list",
            "null",
            "the block container name (layers, layer, h)",
        ),
        ConfigField::new("rank_pattern", "map regex → int", "{}", "per-module rank"),
        ConfigField::new(
            "alpha_pattern",
            "map regex → float",
            "{}",
            "per-module alpha",
        ),
        ConfigField::new(
            "init_weights",
            "bool",
            "true",
            "true: hada_w2_b zero (ΔW = 0 at start); false: all factors random (tests)",
        ),
        ConfigField::new(
            "modules_to_save",
            "list of names",
            "null (classification heads for sequence classification)",
            "base modules trained whole and saved",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> LoHaConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_follow_peft() {
        let d = parse("{}");
        d.validate().unwrap();
        assert_eq!((d.r, d.alpha), (8, 8.0));
        assert_eq!((d.rank_dropout, d.module_dropout), (0.0, 0.0));
        assert!(d.init_weights && !d.use_effective_conv2d);
        assert!(d.modules_to_save.is_none() && d.targets.target_modules.is_none());
    }

    #[test]
    fn patterns_override_rank_and_alpha() {
        let c = parse(
            r#"{"r": 16, "alpha": 32, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 2}}"#,
        );
        c.validate().unwrap();
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.q_proj").unwrap(),
            (4, 32.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.v_proj").unwrap(),
            (16, 2.0)
        );
        let zero = parse(r#"{"rank_pattern": {"q_proj": 0}}"#);
        assert!(zero.rank_and_alpha("a.q_proj").is_err());
    }

    #[test]
    fn a_peft_saved_config_is_accepted() {
        let c = parse(
            r#"{"task_type": null, "peft_type": "LOHA", "auto_mapping": null,
                "peft_version": "0.21.2", "base_model_name_or_path": null, "revision": null,
                "inference_mode": false, "rank_pattern": {}, "alpha_pattern": {}, "r": 4,
                "alpha": 8, "rank_dropout": 0.0, "module_dropout": 0.0,
                "use_effective_conv2d": false, "target_modules": ["q_proj", "v_proj"],
                "exclude_modules": null, "init_weights": true, "layers_to_transform": null,
                "layers_pattern": null, "modules_to_save": null}"#,
        );
        c.validate().unwrap();
        assert_eq!((c.r, c.alpha), (4, 8.0));
    }

    #[test]
    fn bad_values_and_unknown_features_are_named() {
        let err = |json: &str| parse(json).validate().unwrap_err().to_string();
        assert!(err(r#"{"r": 0}"#).contains('r'));
        assert!(err(r#"{"rank_dropout": 1.0}"#).contains("rank_dropout"));
        assert!(err(r#"{"module_dropout": -0.1}"#).contains("module_dropout"));
        assert!(err(r#"{"layers_pattern": "layers"}"#).contains("layers_to_transform"));
        assert!(err(r#"{"use_dora": true}"#).contains("use_dora"));
        let bad: std::result::Result<LoHaConfig, _> =
            serde_json::from_str(r#"{"init_weights": "lycoris"}"#);
        assert!(bad.is_err());
    }
}
