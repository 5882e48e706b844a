//! The layer-wise configuration: the schedule, what trains besides the blocks, PEFT's
//! bookkeeping fields accepted, anything else refused by name.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use whetstone_sdk::config::reject_unsupported;
use whetstone_sdk::{ConfigField, Error, Result};

/// `schedule`: how many of the top blocks train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// ULMFiT's gradual unfreezing: `last_n_layers` blocks at first, one more every
    /// `unfreeze_every` steps, top down.
    Gradual,
    /// The top `last_n_layers` blocks, for the whole run.
    LastN,
}

fn default_last_n() -> usize {
    1
}

fn yes() -> bool {
    true
}

/// The configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct LayerwiseConfig {
    /// `"gradual"` or `"last_n"` (required).
    pub schedule: ScheduleKind,
    /// Blocks that train (`last_n`), or that train from the start (`gradual`). Default 1.
    #[serde(default = "default_last_n")]
    pub last_n_layers: usize,
    /// Optimizer steps between unfreezing one more block (`gradual` only, required there).
    #[serde(default)]
    pub unfreeze_every: Option<u64>,
    /// Whether the head trains from the start: `classifier` / `score`, or an untied `lm_head`
    /// (a tied LM head is the embedding matrix and trains only with `train_embeddings`).
    #[serde(default = "yes")]
    pub train_head: bool,
    /// Whether the final normalisation after the last block (`model.norm`) trains.
    #[serde(default = "yes")]
    pub train_final_norm: bool,
    /// Whether the embeddings (`model.embed_tokens`, BERT's `embeddings.*`) train.
    #[serde(default)]
    pub train_embeddings: bool,
    /// Base modules trained whole from the start (the host writes the trained modules here when
    /// it saves an adapter, so that a reloaded adapter holds them all).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field: PEFT bookkeeping is accepted, anything else is refused by name in
    /// [`LayerwiseConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// The fields (besides PEFT's bookkeeping).
const FIELDS: &[&str] = &[
    "schedule",
    "last_n_layers",
    "unfreeze_every",
    "train_head",
    "train_final_norm",
    "train_embeddings",
    "modules_to_save",
];

impl LayerwiseConfig {
    /// Refuses inconsistent values and unknown fields, naming them.
    pub fn validate(&self) -> Result<()> {
        match (self.schedule, self.unfreeze_every) {
            (ScheduleKind::Gradual, None) => {
                return Err(Error::config(
                    "schedule = \"gradual\" needs unfreeze_every (optimizer steps between \
                     unfreezing one more block)",
                ))
            }
            (ScheduleKind::Gradual, Some(0)) => {
                return Err(Error::config("unfreeze_every must be at least 1"))
            }
            (ScheduleKind::LastN, Some(n)) => {
                return Err(Error::config(format!(
                    "unfreeze_every = {n} applies only to schedule = \"gradual\"; \
                     schedule = \"last_n\" trains the same blocks for the whole run"
                )))
            }
            _ => {}
        }
        let extras = self.train_head
            || self.train_final_norm
            || self.train_embeddings
            || self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty());
        if self.last_n_layers == 0 && !extras {
            return Err(Error::config(
                "last_n_layers = 0 with train_head, train_final_norm and train_embeddings off \
                 trains nothing at the start",
            ));
        }
        reject_unsupported("layer-wise", &self.other, &[], FIELDS)
    }

    /// Refuses a schedule that asks for more blocks than the model has.
    pub fn validate_for(&self, num_layers: usize) -> Result<()> {
        if num_layers == 0 {
            return Err(Error::config(
                "the model reports no transformer blocks (num_layers = 0)",
            ));
        }
        if self.last_n_layers > num_layers {
            return Err(Error::config(format!(
                "last_n_layers = {} but the model has {num_layers} blocks",
                self.last_n_layers
            )));
        }
        Ok(())
    }
}

/// The documented fields.
pub fn fields() -> Vec<ConfigField> {
    vec![
        ConfigField::new(
            "schedule",
            "\"gradual\" | \"last_n\"",
            "",
            "gradual: ULMFiT's gradual unfreezing, top block first; last_n: a fixed number of top blocks",
        ),
        ConfigField::new(
            "last_n_layers",
            "int",
            "1",
            "blocks that train (last_n), or that train from the start (gradual)",
        ),
        ConfigField::new(
            "unfreeze_every",
            "int",
            "required for gradual",
            "optimizer steps between unfreezing one more block",
        ),
        ConfigField::new(
            "train_head",
            "bool",
            "true",
            "the head (classifier / score, or an untied lm_head) trains from the start",
        ),
        ConfigField::new(
            "train_final_norm",
            "bool",
            "true",
            "the final normalisation (model.norm) trains from the start",
        ),
        ConfigField::new(
            "train_embeddings",
            "bool",
            "false",
            "the embeddings train from the start",
        ),
        ConfigField::new(
            "modules_to_save",
            "list of names",
            "null",
            "base modules trained whole from the start",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> LayerwiseConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_and_valid_schedules() {
        let c = parse(r#"{"schedule": "gradual", "unfreeze_every": 20}"#);
        c.validate().unwrap();
        assert_eq!(c.last_n_layers, 1);
        assert!(c.train_head && c.train_final_norm && !c.train_embeddings);
        let c = parse(r#"{"schedule": "last_n", "last_n_layers": 2, "peft_type": "LAYERWISE"}"#);
        c.validate().unwrap();
        c.validate_for(2).unwrap();
        assert!(c.validate_for(1).unwrap_err().to_string().contains("2"));
    }

    #[test]
    fn inconsistent_or_unknown_fields_are_refused_by_name() {
        let err = |json: &str| parse(json).validate().unwrap_err().to_string();
        assert!(err(r#"{"schedule": "gradual"}"#).contains("unfreeze_every"));
        assert!(err(r#"{"schedule": "gradual", "unfreeze_every": 0}"#).contains("at least 1"));
        assert!(err(r#"{"schedule": "last_n", "unfreeze_every": 3}"#).contains("gradual"));
        assert!(err(r#"{"schedule": "last_n", "lr_decay": 2.6}"#).contains("`lr_decay`"));
        let none = r#"{"schedule": "last_n", "last_n_layers": 0, "train_head": false,
                       "train_final_norm": false}"#;
        assert!(err(none).contains("trains nothing"));
        let bad: std::result::Result<LayerwiseConfig, _> =
            serde_json::from_str(r#"{"schedule": "slanted"}"#);
        assert!(bad.unwrap_err().to_string().contains("slanted"));
        let missing: std::result::Result<LayerwiseConfig, _> = serde_json::from_str("{}");
        assert!(missing.unwrap_err().to_string().contains("schedule"));
    }

    #[test]
    fn the_accepted_fields_are_the_documented_ones() {
        let documented: Vec<String> = fields().into_iter().map(|f| f.name).collect();
        assert_eq!(documented, FIELDS);
    }
}
