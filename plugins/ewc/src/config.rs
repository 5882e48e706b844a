//! The EWC configuration: the penalty's strength, the size of the Fisher estimate, the online
//! decay and which base parameters train; anything else is refused by name.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use whetstone_sdk::config::reject_unsupported;
use whetstone_sdk::{ConfigField, Error, Result};

fn default_lambda() -> f64 {
    1000.0
}

fn default_fisher_examples() -> usize {
    200
}

fn default_gamma() -> f64 {
    1.0
}

/// The configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct EwcConfig {
    /// λ, the strength of the penalty `λ/2 Σ F (θ - θ*)²`.
    #[serde(default = "default_lambda")]
    pub ewc_lambda: f64,
    /// Training examples of a finished task whose squared gradients estimate the Fisher
    /// information (fewer when the task has fewer).
    #[serde(default = "default_fisher_examples")]
    pub fisher_examples: usize,
    /// Online EWC's decay γ of earlier Fisher estimates (`F ← γ F + F_task`); 1 adds them up.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// Glob patterns over base parameter names (`*` also matches dots) choosing what trains and
    /// is consolidated, e.g. `["classifier.*", "encoder.layer.5.*"]`.
    pub trainable: Vec<String>,
    /// Every other field: PEFT bookkeeping is accepted, anything else is refused by name.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

const FIELDS: &[&str] = &["ewc_lambda", "fisher_examples", "gamma", "trainable"];

impl EwcConfig {
    /// Refuses out-of-range values, bad patterns and unknown fields, naming them.
    pub fn validate(&self) -> Result<()> {
        if !(self.ewc_lambda.is_finite() && self.ewc_lambda >= 0.0) {
            return Err(Error::config(format!(
                "ewc_lambda = {} must be a finite number ≥ 0",
                self.ewc_lambda
            )));
        }
        if !(0.0..=1.0).contains(&self.gamma) {
            return Err(Error::config(format!(
                "gamma = {} must be between 0 and 1",
                self.gamma
            )));
        }
        if self.fisher_examples == 0 && self.ewc_lambda > 0.0 {
            return Err(Error::config(
                "fisher_examples = 0 leaves the Fisher information unknown; use at least 1 \
                 (200 is a good start)",
            ));
        }
        if self.trainable.is_empty() {
            return Err(Error::config(
                "trainable is empty: list glob patterns of the base parameters that train, e.g. \
                 [\"classifier.*\", \"encoder.layer.5.*\"] (`whet inspect MODEL --params` lists them)",
            ));
        }
        self.patterns()?;
        reject_unsupported("EWC", &self.other, &[], FIELDS)
    }

    /// The compiled `trainable` patterns.
    pub fn patterns(&self) -> Result<Vec<glob::Pattern>> {
        self.trainable
            .iter()
            .map(|p| {
                glob::Pattern::new(p)
                    .map_err(|e| Error::config(format!("invalid trainable pattern `{p}`: {e}")))
            })
            .collect()
    }
}

/// The documented fields.
pub fn fields() -> Vec<ConfigField> {
    vec![
        ConfigField::new(
            "ewc_lambda",
            "float",
            "1000.0",
            "λ: strength of the penalty λ/2 Σ F (θ - θ*)² that holds earlier tasks' weights",
        ),
        ConfigField::new(
            "fisher_examples",
            "int",
            "200",
            "training examples of each finished task whose squared gradients estimate the \
             diagonal Fisher information",
        ),
        ConfigField::new(
            "gamma",
            "float",
            "1.0",
            "online EWC decay of earlier Fisher estimates (F ← γF + F_task); 1 adds them up",
        ),
        ConfigField::new(
            "trainable",
            "list of glob patterns",
            "",
            "base parameters that train and are consolidated (`*` matches dots too)",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<EwcConfig> {
        let cfg: EwcConfig =
            serde_json::from_str(json).map_err(|e| Error::config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn defaults() {
        let cfg = parse(r#"{"trainable": ["classifier.*"], "task_type": "SEQ_CLS"}"#).unwrap();
        assert_eq!(cfg.ewc_lambda, 1000.0);
        assert_eq!(cfg.fisher_examples, 200);
        assert_eq!(cfg.gamma, 1.0);
    }

    #[test]
    fn bad_values_and_unknown_fields_are_named() {
        for (json, needle) in [
            (r#"{"trainable": []}"#, "trainable is empty"),
            (r#"{"trainable": ["a"], "ewc_lambda": -1}"#, "ewc_lambda"),
            (r#"{"trainable": ["a"], "gamma": 2}"#, "gamma"),
            (
                r#"{"trainable": ["a"], "fisher_examples": 0}"#,
                "fisher_examples",
            ),
            (r#"{"trainable": ["a["]}"#, "invalid trainable pattern"),
            (r#"{"trainable": ["a"], "ewc_lamda": 5}"#, "`ewc_lamda`"),
        ] {
            let message = parse(json).unwrap_err().to_string();
            assert!(message.contains(needle), "{json}: {message}");
        }
    }
}
