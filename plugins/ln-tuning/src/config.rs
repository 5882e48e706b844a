//! PEFT's `LNTuningConfig`: `target_modules`, `exclude_modules`, `modules_to_save`, PEFT's
//! bookkeeping fields accepted, anything else refused by name.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use whetstone_sdk::config::reject_unsupported;
use whetstone_sdk::targets::ModuleSelector;
use whetstone_sdk::{ConfigField, Error, Result};

/// The configuration, with PEFT's field names and defaults.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LnTuningConfig {
    /// Modules whose parameters train: a list of names (exact or dotted suffix) or one regex
    /// over the whole name; `None` uses PEFT's default for the model type.
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    /// Modules never trained.
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// Base modules trained whole and saved (the classification head is added for sequence
    /// classification, as PEFT does).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field: PEFT bookkeeping is accepted, anything else is refused by name in
    /// [`LnTuningConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// The fields of PEFT's `LNTuningConfig` (besides its bookkeeping).
const FIELDS: &[&str] = &["target_modules", "exclude_modules", "modules_to_save"];

impl LnTuningConfig {
    /// Refuses fields PEFT's `LNTuningConfig` does not have, naming them.
    pub fn validate(&self) -> Result<()> {
        for field in ["layers_to_transform", "layers_pattern"] {
            if let Some(value) = self.other.get(field) {
                return Err(Error::config(format!(
                    "unsupported LN tuning field `{field}` = {value} (PEFT's LNTuningConfig has \
                     no such field: select layers with a target_modules regex)"
                )));
            }
        }
        reject_unsupported("LN tuning", &self.other, &[], FIELDS)
    }
}

/// The documented fields.
pub fn fields() -> Vec<ConfigField> {
    vec![
        ConfigField::new(
            "target_modules",
            "list of names or regex string",
            "per model type (llama: input_layernorm, post_attention_layernorm, norm; bert: LayerNorm)",
            "modules whose parameters (norm weight and bias) train",
        ),
        ConfigField::new(
            "exclude_modules",
            "list of names or regex string",
            "null",
            "modules never trained",
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

    fn parse(json: &str) -> LnTuningConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn peft_fields_and_bookkeeping_are_accepted() {
        let c = parse(
            r#"{"peft_type": "LN_TUNING", "task_type": "CAUSAL_LM", "revision": null,
                "target_modules": ["input_layernorm"], "exclude_modules": ".*\\.0\\..*",
                "modules_to_save": ["score"]}"#,
        );
        c.validate().unwrap();
        assert!(matches!(c.target_modules, Some(ModuleSelector::List(_))));
        assert!(matches!(c.exclude_modules, Some(ModuleSelector::Regex(_))));
        parse("{}").validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let err = parse(r#"{"layers_to_transform": [0]}"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`layers_to_transform`") && err.contains("regex"),
            "{err}"
        );
        let err = parse(r#"{"r": 8}"#).validate().unwrap_err().to_string();
        assert!(err.contains("`r`"), "{err}");
    }

    #[test]
    fn the_accepted_fields_are_the_documented_ones() {
        let documented: Vec<String> = fields().into_iter().map(|f| f.name).collect();
        assert_eq!(documented, FIELDS);
    }
}
