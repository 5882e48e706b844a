//! PEFT's `LoraConfig`: the fields LoRA reads, their defaults, and clear errors for the PEFT
//! fields this plugin does not implement.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use whetstone_sdk::config::reject_switched_on;
use whetstone_sdk::targets::{pattern_value, TargetSpec};
use whetstone_sdk::{ConfigField, Error, Result};

/// PEFT's `bias` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bias {
    /// No bias trains.
    #[default]
    None,
    /// Every bias of the model trains.
    All,
    /// The biases of the wrapped modules train.
    LoraOnly,
}

/// PEFT's `init_lora_weights`: `true`, `false` or `"gaussian"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitLoraWeights {
    /// `true`: A Kaiming-uniform, B zero (the adapter starts as the identity).
    #[default]
    Default,
    /// `"gaussian"`: A normal with std `1/r`, B zero.
    Gaussian,
    /// `false`: both random (`nn.Linear`'s default init); for tests, not training.
    Random,
}

impl<'de> Deserialize<'de> for InitLoraWeights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(InitLoraWeights::Default),
            Value::Bool(false) => Ok(InitLoraWeights::Random),
            Value::String(s) if s == "gaussian" => Ok(InitLoraWeights::Gaussian),
            other => Err(serde::de::Error::custom(format!(
                "init_lora_weights = {other} is not supported (use true, false or \"gaussian\")"
            ))),
        }
    }
}

fn default_r() -> usize {
    8
}

fn default_alpha() -> f64 {
    8.0
}

/// The configuration, with PEFT's field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct LoraConfig {
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the LoRA input.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which modules to wrap.
    #[serde(flatten)]
    pub targets: TargetSpec,
    /// Per-module rank overrides.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// rsLoRA scaling `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a trainable magnitude per output row times the normalised adapted weight.
    #[serde(default)]
    pub use_dora: bool,
    /// Which biases train.
    #[serde(default)]
    pub bias: Bias,
    /// How A and B start.
    #[serde(default)]
    pub init_lora_weights: InitLoraWeights,
    /// Base modules trained whole and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field: PEFT bookkeeping is accepted, unsupported features are refused by
    /// name in [`LoraConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Settings of features that are off unless their switch is on (`megatron_config`,
/// `use_qalora`), which PEFT writes with non-empty defaults: they carry no behaviour here.
const SWITCHED_SETTINGS: &[&str] = &["megatron_core", "qalora_group_size"];

impl LoraConfig {
    /// Refuses values LoRA cannot honour, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::config("r must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::config(format!(
                "lora_dropout = {} must be in [0, 1)",
                self.lora_dropout
            )));
        }
        reject_switched_on(
            "LoRA",
            &self.other,
            SWITCHED_SETTINGS,
            &[(
                "fan_in_fan_out",
                " (GPT-2 Conv1D weights are not supported)",
            )],
        )
    }

    /// Rank and alpha of `module`, after `rank_pattern` / `alpha_pattern`.
    pub fn rank_and_alpha(&self, module: &str) -> Result<(usize, f64)> {
        let r = pattern_value(&self.rank_pattern, module)?.unwrap_or(self.r);
        let alpha = pattern_value(&self.alpha_pattern, module)?.unwrap_or(self.lora_alpha);
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
        ConfigField::new("r", "int", "8", "rank of the update"),
        ConfigField::new(
            "lora_alpha",
            "float",
            "8",
            "scaling numerator: scaling = lora_alpha / r",
        ),
        ConfigField::new(
            "lora_dropout",
            "float",
            "0.0",
            "dropout on the LoRA branch's input",
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
            "use_rslora",
            "bool",
            "false",
            "scaling = lora_alpha / sqrt(r) (rsLoRA)",
        ),
        ConfigField::new(
            "use_dora",
            "bool",
            "false",
            "DoRA: W' = m · (W + s·B·A) / ‖W + s·B·A‖ with a trainable magnitude m per output row",
        ),
        ConfigField::new(
            "bias",
            "\"none\" | \"all\" | \"lora_only\"",
            "\"none\"",
            "which biases train",
        ),
        ConfigField::new(
            "init_lora_weights",
            "true | false | \"gaussian\"",
            "true",
            "initialisation of A and B",
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

    fn parse(json: &str) -> LoraConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_and_patterns_follow_peft() {
        let c = parse(r#"{"r": 16, "lora_alpha": 32, "rank_pattern": {"q_proj": 4}}"#);
        c.validate().unwrap();
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.q_proj").unwrap(),
            (4, 32.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.v_proj").unwrap(),
            (16, 32.0)
        );
        let t = parse(
            r#"{"target_modules": ["q_proj"], "layers_to_transform": [0], "exclude_modules": "x"}"#,
        );
        t.validate().unwrap();
        assert!(t.targets.target_modules.is_some() && t.targets.exclude_modules.is_some());
        let d = parse("{}");
        assert_eq!((d.r, d.lora_alpha, d.bias), (8, 8.0, Bias::None));
    }

    #[test]
    fn peft_bookkeeping_is_accepted_and_unsupported_features_named() {
        let ok = parse(
            r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "use_dora": false, "loftq_config": {},
                "megatron_config": null, "megatron_core": "megatron.core", "use_qalora": false,
                "qalora_group_size": 16, "lora_bias": false, "target_parameters": null}"#,
        );
        ok.validate().unwrap();
        let dora = parse(r#"{"use_dora": true, "peft_type": "LORA"}"#);
        dora.validate().unwrap();
        assert!(dora.use_dora && !parse("{}").use_dora);
        let conv = parse(r#"{"fan_in_fan_out": true}"#);
        let err = conv.validate().unwrap_err().to_string();
        assert!(
            err.contains("fan_in_fan_out") && err.contains("Conv1D"),
            "{err}"
        );
        let bad: std::result::Result<LoraConfig, _> =
            serde_json::from_str(r#"{"init_lora_weights": "pissa"}"#);
        assert!(bad.unwrap_err().to_string().contains("pissa"));
    }
}
