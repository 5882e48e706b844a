//! PEFT's `IA3Config`: the fields (IA)³ reads, their defaults, and clear errors for the fields
//! this plugin does not implement.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value;
use whetstone_sdk::config::{is_off, reject_switched_on};
use whetstone_sdk::targets::{ModuleSelector, TargetSpec};
use whetstone_sdk::{ConfigField, Error, Result};

fn yes() -> bool {
    true
}

/// The configuration, with PEFT's field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct Ia3Config {
    /// Which modules to wrap; `None` uses PEFT's default for the model type.
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    /// Modules never wrapped.
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// Wrapped modules whose input (not output) is scaled; `None` uses PEFT's default for the
    /// model type. A list matches a module whose name ends with one of the strings (PEFT's
    /// plain `str.endswith`, no dot boundary); a string is a regular expression over the whole
    /// name.
    #[serde(default)]
    pub feedforward_modules: Option<ModuleSelector>,
    /// GPT-2 `Conv1D` weight layout; refused when true.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Base modules trained whole and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: the vectors start at ones (the adapter starts as the identity); `false`: standard
    /// normal samples, as PEFT's `torch.randn` (for tests, not training).
    #[serde(default = "yes")]
    pub init_ia3_weights: bool,
    /// Every other field: PEFT bookkeeping is accepted, anything else is refused by name in
    /// [`Ia3Config::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl Ia3Config {
    /// Refuses values (IA)³ cannot honour, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.fan_in_fan_out {
            return Err(Error::config(
                "fan_in_fan_out = true is for GPT-2 style Conv1D weights stored [in, out]; \
                 the host's linear modules store [out, in] (set it to false)",
            ));
        }
        if let (Some(ModuleSelector::List(ff)), Some(ModuleSelector::List(targets))) =
            (&self.feedforward_modules, &self.target_modules)
        {
            let targets: BTreeSet<&String> = targets.iter().collect();
            let extra: Vec<&str> = ff
                .iter()
                .filter(|f| !targets.contains(f))
                .map(String::as_str)
                .collect();
            if !extra.is_empty() {
                return Err(Error::config(format!(
                    "feedforward_modules should be a subset of target_modules: {} not in \
                     target_modules",
                    extra.join(", ")
                )));
            }
        }
        // Checked before `reject_switched_on`, which takes a number 0 for off:
        // `layers_to_transform = 0` asks for block 0.
        for field in ["layers_to_transform", "layers_pattern"] {
            if let Some(value) = self
                .other
                .get(field)
                .filter(|v| v.is_number() || !is_off(v))
            {
                return Err(Error::config(format!(
                    "unsupported IA3 field `{field}` = {value} (PEFT's IA3Config has no such \
                     field: select layers with a target_modules regex)"
                )));
            }
        }
        reject_switched_on("IA3", &self.other, &[], &[])
    }

    /// `target_modules` and `exclude_modules` as the SDK's PEFT matcher takes them.
    pub fn target_spec(&self) -> TargetSpec {
        TargetSpec {
            target_modules: self.target_modules.clone(),
            exclude_modules: self.exclude_modules.clone(),
            ..TargetSpec::default()
        }
    }
}

/// Whether module `key` is feedforward under `feedforward_modules` (PEFT's
/// `_check_target_module_feedforward`): a regex must match the whole name, a list entry needs
/// only to end the name.
pub fn is_feedforward(feedforward: &ModuleSelector, key: &str) -> Result<bool> {
    match feedforward {
        // Grouped so that the string `all-linear` stays a plain regex here, as in PEFT.
        ModuleSelector::Regex(pattern) => {
            ModuleSelector::Regex(format!("(?:{pattern})")).matches(key)
        }
        ModuleSelector::List(names) => Ok(names.iter().any(|n| key.ends_with(n.as_str()))),
    }
}

/// The documented fields.
pub fn fields() -> Vec<ConfigField> {
    vec![
        ConfigField::new(
            "target_modules",
            "list of names, regex string or \"all-linear\"",
            "per model type (llama: k_proj, v_proj, down_proj; bert: key, value, output.dense)",
            "modules to wrap",
        ),
        ConfigField::new(
            "exclude_modules",
            "list of names or regex string",
            "null",
            "modules never wrapped",
        ),
        ConfigField::new(
            "feedforward_modules",
            "list of name endings or regex string",
            "per model type (llama: down_proj; bert: output.dense)",
            "wrapped modules whose input is scaled (l [1, in]); the others scale their output \
             (l [out, 1]); a list must be a subset of target_modules",
        ),
        ConfigField::new(
            "fan_in_fan_out",
            "bool",
            "false",
            "Conv1D weight layout; only false is supported",
        ),
        ConfigField::new(
            "modules_to_save",
            "list of names",
            "null (classification heads for sequence classification)",
            "base modules trained whole and saved",
        ),
        ConfigField::new(
            "init_ia3_weights",
            "bool",
            "true",
            "true: vectors start at ones (identity); false: standard normal (for tests)",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Ia3Config {
        serde_json::from_str(json).unwrap()
    }

    fn list(names: &[&str]) -> ModuleSelector {
        ModuleSelector::List(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn defaults_follow_peft() {
        let c = parse("{}");
        c.validate().unwrap();
        assert!(c.target_modules.is_none() && c.feedforward_modules.is_none());
        assert!(c.init_ia3_weights && !c.fan_in_fan_out && c.modules_to_save.is_none());
        let t = parse(
            r#"{"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules":
                ["down_proj"], "exclude_modules": "x", "init_ia3_weights": false}"#,
        );
        t.validate().unwrap();
        assert!(!t.init_ia3_weights);
        assert!(t.target_spec().exclude_modules.is_some());
    }

    #[test]
    fn feedforward_must_be_a_subset_of_listed_targets() {
        let bad = parse(r#"{"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}"#);
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("subset") && err.contains("down_proj"), "{err}");
        // PEFT checks only when both are lists.
        parse(r#"{"target_modules": ".*proj", "feedforward_modules": ["down_proj"]}"#)
            .validate()
            .unwrap();
        parse(r#"{"feedforward_modules": ["down_proj"]}"#)
            .validate()
            .unwrap();
    }

    #[test]
    fn peft_bookkeeping_is_accepted_and_unsupported_fields_named() {
        let ok = parse(
            r#"{"peft_type": "IA3", "task_type": "CAUSAL_LM", "auto_mapping": null,
                "peft_version": "0.21.2", "base_model_name_or_path": null, "revision": null,
                "inference_mode": false, "fan_in_fan_out": false, "modules_to_save": null}"#,
        );
        ok.validate().unwrap();
        let fan = parse(r#"{"fan_in_fan_out": true}"#);
        let err = fan.validate().unwrap_err().to_string();
        assert!(err.contains("fan_in_fan_out"), "{err}");
        let layers = parse(r#"{"layers_to_transform": [0]}"#);
        let err = layers.validate().unwrap_err().to_string();
        assert!(err.contains("layers_to_transform"), "{err}");
        // Block 0 is a choice, not "off".
        let first = parse(r#"{"layers_to_transform": 0}"#);
        let err = first.validate().unwrap_err().to_string();
        assert!(
            err.contains("layers_to_transform") && err.contains("regex"),
            "{err}"
        );
        parse(r#"{"layers_to_transform": null, "layers_pattern": null, "use_dora": false}"#)
            .validate()
            .unwrap();
        let odd = parse(r#"{"r": 8}"#);
        assert!(odd.validate().unwrap_err().to_string().contains("`r`"));
    }

    #[test]
    fn feedforward_matching_is_peft_endswith_or_full_regex() {
        let ff = list(&["output.dense"]);
        assert!(is_feedforward(&ff, "encoder.layer.0.output.dense").unwrap());
        assert!(is_feedforward(&ff, "encoder.layer.0.attention.output.dense").unwrap());
        assert!(!is_feedforward(&ff, "encoder.layer.0.intermediate.dense").unwrap());
        // No dot boundary, as PEFT's `str.endswith`.
        assert!(is_feedforward(&list(&["proj"]), "model.layers.0.mlp.down_proj").unwrap());
        let re = ModuleSelector::Regex(r".*\.down_proj".into());
        assert!(is_feedforward(&re, "model.layers.1.mlp.down_proj").unwrap());
        assert!(!is_feedforward(&re, "model.layers.1.mlp.down_proj.x").unwrap());
        let all = ModuleSelector::Regex("all-linear".into());
        assert!(!is_feedforward(&all, "model.layers.1.mlp.down_proj").unwrap());
    }
}
