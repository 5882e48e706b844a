//! BitFit's configuration: PEFT's module-selection field names (`target_modules`,
//! `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`), PEFT's
//! bookkeeping fields accepted, anything else refused by name.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use whetstone_sdk::config::reject_unsupported;
use whetstone_sdk::targets::TargetSpec;
use whetstone_sdk::{ConfigField, Error, Result};

/// The configuration. PEFT has no BitFit; the field names are those PEFT's other methods use for
/// the same choices.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct BitFitConfig {
    /// Whose biases train: `target_modules` (absent: every module with a bias),
    /// `exclude_modules`, `layers_to_transform`, `layers_pattern`, with PEFT's matching rules
    /// applied to the module that owns each bias.
    #[serde(flatten)]
    pub targets: TargetSpec,
    /// Base modules trained whole and saved (the classification head is added for sequence
    /// classification, as PEFT does).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field: PEFT bookkeeping is accepted, anything else is refused by name in
    /// [`BitFitConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// The fields BitFit takes (besides PEFT's bookkeeping).
const FIELDS: &[&str] = &[
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
];

/// What to do instead, for fields of other methods that are easily given to BitFit.
fn hint(field: &str) -> Option<&'static str> {
    match field {
        "bias" => Some("BitFit always trains the biases: select them with target_modules"),
        "r" | "lora_alpha" | "lora_dropout" => Some("a LoRA field: use kind = \"lora\""),
        _ => None,
    }
}

impl BitFitConfig {
    /// Refuses fields BitFit does not know, naming them.
    pub fn validate(&self) -> Result<()> {
        if let Some((field, value, hint)) = self
            .other
            .iter()
            .find_map(|(field, value)| Some((field, value, hint(field)?)))
        {
            return Err(Error::config(format!(
                "unsupported BitFit field `{field}` = {value} ({hint}); the fields are {}",
                FIELDS.join(", ")
            )));
        }
        reject_unsupported("BitFit", &self.other, &[], FIELDS)
    }
}

/// The documented fields.
pub fn fields() -> Vec<ConfigField> {
    vec![
        ConfigField::new(
            "target_modules",
            "list of names or regex string",
            "null (every module with a bias)",
            "only the biases of these modules train (PEFT's matching rules on the owning module)",
        ),
        ConfigField::new(
            "exclude_modules",
            "list of names or regex string",
            "null",
            "modules whose bias never trains",
        ),
        ConfigField::new(
            "layers_to_transform",
            "int or list of ints",
            "null",
            "only biases in these blocks train",
        ),
        ConfigField::new(
            "layers_pattern",
            "string or list",
            "null",
            "the block container name (layers, layer, h)",
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

    fn parse(json: &str) -> BitFitConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn empty_config_and_peft_bookkeeping_are_accepted() {
        let c = parse("{}");
        c.validate().unwrap();
        assert!(c.targets.target_modules.is_none() && c.modules_to_save.is_none());
        let c = parse(
            r#"{"peft_type": "BITFIT", "task_type": "SEQ_CLS", "inference_mode": true,
                "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}"#,
        );
        c.validate().unwrap();
        assert!(c.targets.target_modules.is_some());
        assert_eq!(c.modules_to_save, Some(vec!["classifier".to_string()]));
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let err = parse(r#"{"r": 8}"#).validate().unwrap_err().to_string();
        assert!(err.contains("`r`") && err.contains("lora"), "{err}");
        let err = parse(r#"{"bias": "all"}"#)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("`bias`"), "{err}");
    }

    #[test]
    fn the_accepted_fields_are_the_documented_ones() {
        let documented: Vec<String> = fields().into_iter().map(|f| f.name).collect();
        assert_eq!(documented, FIELDS);
    }
}
