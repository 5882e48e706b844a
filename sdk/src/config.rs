//! Helpers for plugin configurations that read Hugging Face PEFT's JSON: the bookkeeping fields
//! every PEFT config carries, whether a field a plugin does not implement is switched off, and
//! refusing everything else by name.
//!
//! A plugin's config struct typically collects the fields it does not know into a
//! `#[serde(flatten)] other: BTreeMap<String, Value>` and hands them to [`reject_unsupported`]:
//!
//! ```
//! use std::collections::BTreeMap;
//! use serde_json::{json, Value};
//! use whetstone_sdk::config::reject_unsupported;
//!
//! let mut other: BTreeMap<String, Value> = BTreeMap::new();
//! other.insert("peft_type".into(), json!("IA3"));        // bookkeeping: accepted
//! other.insert("fan_in_fan_out".into(), json!(false));  // unsupported but off: accepted
//! assert!(reject_unsupported("IA3", &other, &["fan_in_fan_out"], &["target_modules"]).is_ok());
//! other.insert("fan_in_fan_out".into(), json!(true));
//! let err = reject_unsupported("IA3", &other, &["fan_in_fan_out"], &["target_modules"]);
//! assert!(err.unwrap_err().to_string().contains("fan_in_fan_out"));
//! ```
//!
//! A plugin that accepts every field while it is switched off, so that configurations from newer
//! PEFT versions still load, calls [`reject_switched_on`] instead.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::types::ConfigField;
use crate::{Error, Result};

/// Fields of every PEFT `adapter_config.json` that carry no behaviour for a method.
pub const PEFT_BOOKKEEPING: &[&str] = &[
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
];

/// Whether `value` leaves a feature switched off: `null`, `false`, `0`, an empty list or an
/// empty object.
pub fn is_off(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => true,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Checks the fields of a configuration that the plugin's struct did not take: PEFT's
/// bookkeeping is accepted, fields listed in `accepted_when_off` are accepted while they are
/// switched off ([`is_off`]), and anything else is an error that names the field, the method
/// and the `supported` fields.
pub fn reject_unsupported(
    method: &str,
    other: &BTreeMap<String, Value>,
    accepted_when_off: &[&str],
    supported: &[&str],
) -> Result<()> {
    for (field, value) in other {
        if PEFT_BOOKKEEPING.contains(&field.as_str()) {
            continue;
        }
        if accepted_when_off.contains(&field.as_str()) {
            if is_off(value) {
                continue;
            }
            return Err(Error::config(format!(
                "{method} field `{field}` = {value} is not supported by this plugin; remove it \
                 or switch it off"
            )));
        }
        return Err(Error::config(format!(
            "unknown {method} field `{field}` = {value}; the fields are {}",
            supported.join(", ")
        )));
    }
    Ok(())
}

/// Checks the fields of a configuration that the plugin's struct did not take, accepting any
/// field while it is switched off: PEFT's bookkeeping ([`PEFT_BOOKKEEPING`]) and the fields in
/// `accepted` pass whatever their value, every other field passes while it is off ([`is_off`]),
/// so configurations saved by other PEFT versions, with new fields set to `null`, still load.
/// The first field that is switched on is refused as
/// ``unsupported {method} field `{field}` = {value}{hint}``, where `hint` is that field's entry
/// in `hints` (empty when it has none).
///
/// Unlike [`reject_unsupported`], which accepts only the fields it is given while off, this
/// accepts every field while off.
///
/// ```
/// use std::collections::BTreeMap;
/// use serde_json::{json, Value};
/// use whetstone_sdk::config::reject_switched_on;
///
/// let hints = [("fan_in_fan_out", " (GPT-2 Conv1D weights are not supported)")];
/// let mut other: BTreeMap<String, Value> = BTreeMap::new();
/// other.insert("peft_type".into(), json!("VERA"));
/// other.insert("layers_pattern".into(), json!(null));
/// assert!(reject_switched_on("VeRA", &other, &[], &hints).is_ok());
/// other.insert("fan_in_fan_out".into(), json!(true));
/// let err = reject_switched_on("VeRA", &other, &[], &hints).unwrap_err();
/// assert!(err.to_string().contains("GPT-2 Conv1D"));
/// ```
pub fn reject_switched_on(
    method: &str,
    other: &BTreeMap<String, Value>,
    accepted: &[&str],
    hints: &[(&str, &str)],
) -> Result<()> {
    for (field, value) in other {
        let field = field.as_str();
        if PEFT_BOOKKEEPING.contains(&field) || accepted.contains(&field) || is_off(value) {
            continue;
        }
        let hint = hints
            .iter()
            .find(|(name, _)| *name == field)
            .map_or("", |(_, hint)| hint);
        return Err(Error::config(format!(
            "unsupported {method} field `{field}` = {value}{hint}"
        )));
    }
    Ok(())
}

impl ConfigField {
    /// A documented field: `default` as written in JSON, empty when the field is required.
    pub fn new(name: &str, ty: &str, default: &str, doc: &str) -> ConfigField {
        ConfigField {
            name: name.into(),
            ty: ty.into(),
            default: default.into(),
            doc: doc.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn off_values() {
        for v in [
            json!(null),
            json!(false),
            json!(0),
            json!(0.0),
            json!([]),
            json!({}),
        ] {
            assert!(is_off(&v), "{v}");
        }
        for v in [
            json!(true),
            json!(1),
            json!("x"),
            json!([1]),
            json!({"a": 1}),
        ] {
            assert!(!is_off(&v), "{v}");
        }
    }

    #[test]
    fn unknown_fields_are_named_with_the_supported_ones() {
        let mut other = BTreeMap::new();
        other.insert("task_type".to_string(), json!("SEQ_CLS"));
        assert!(reject_unsupported("EWC", &other, &[], &["ewc_lambda"]).is_ok());
        other.insert("ewc_lamda".to_string(), json!(3));
        let message = reject_unsupported("EWC", &other, &[], &["ewc_lambda"])
            .unwrap_err()
            .to_string();
        assert!(message.contains("`ewc_lamda`"), "{message}");
        assert!(message.contains("ewc_lambda"), "{message}");
    }

    #[test]
    fn switched_on_fields_are_refused_with_their_hint() {
        let hints = [("fan_in_fan_out", " (Conv1D)")];
        let mut other = BTreeMap::new();
        other.insert("task_type".to_string(), json!("CAUSAL_LM"));
        other.insert("megatron_core".to_string(), json!("megatron.core"));
        other.insert("new_in_a_later_peft".to_string(), json!(null));
        other.insert("fan_in_fan_out".to_string(), json!(false));
        assert!(reject_switched_on("LoRA", &other, &["megatron_core"], &hints).is_ok());

        other.insert("fan_in_fan_out".to_string(), json!(true));
        let message = reject_switched_on("LoRA", &other, &["megatron_core"], &hints)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("unsupported LoRA field `fan_in_fan_out` = true (Conv1D)"),
            "{message}"
        );

        other.remove("fan_in_fan_out");
        other.insert("use_dora".to_string(), json!(true));
        let message = reject_switched_on("LoRA", &other, &["megatron_core"], &hints)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("unsupported LoRA field `use_dora` = true")
                && !message.contains("Conv1D"),
            "{message}"
        );
    }
}
