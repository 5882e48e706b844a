//! PEFT's `PromptEncoderConfig`: the fields P-tuning reads, their defaults, checks against the
//! base model, and clear errors for what this plugin does not implement.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use whetstone_sdk::config::reject_switched_on;
use whetstone_sdk::{ConfigField, Error, ModelInfo, Result};

/// PEFT's `encoder_reparameterization_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reparameterization {
    /// `"MLP"`: embedding → Linear → ReLU → Linear → ReLU → Linear.
    #[default]
    Mlp,
}

impl<'de> Deserialize<'de> for Reparameterization {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "MLP" => Ok(Reparameterization::Mlp),
            "LSTM" => Err(serde::de::Error::custom(
                "encoder_reparameterization_type = \"LSTM\" is not supported (the host has no \
                 LSTM); use \"MLP\", PEFT's default",
            )),
            other => Err(serde::de::Error::custom(format!(
                "encoder_reparameterization_type = {other:?} is not one of \"MLP\", \"LSTM\""
            ))),
        }
    }
}

fn default_encoder_num_layers() -> usize {
    2
}

/// The configuration, with PEFT's field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptEncoderConfig {
    /// Virtual tokens prepended to every input (required, as in PEFT).
    pub num_virtual_tokens: Option<usize>,
    /// Width of a virtual token; the model's hidden size when absent (PEFT fills it in).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for decoder-only models and encoders (2 is PEFT's encoder-decoder setting).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// The prompt encoder (only `"MLP"`).
    #[serde(default)]
    pub encoder_reparameterization_type: Reparameterization,
    /// Hidden width of the MLP; `token_dim` when absent (PEFT fills it in).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// LSTM layers; PEFT ignores it for the MLP (always three linear layers).
    #[serde(default = "default_encoder_num_layers")]
    pub encoder_num_layers: usize,
    /// LSTM dropout; PEFT ignores it for the MLP.
    #[serde(default)]
    pub encoder_dropout: f64,
    /// Base modules trained whole and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field: PEFT bookkeeping is accepted, unsupported features are refused by
    /// name in [`PromptEncoderConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Filled in by PEFT from the model config; P-tuning's shape does not depend on them.
const FROM_MODEL: &[&str] = &["num_attention_heads", "num_layers"];

impl PromptEncoderConfig {
    /// Refuses values P-tuning cannot honour, naming the field.
    pub fn validate(&self) -> Result<()> {
        match self.num_virtual_tokens {
            None => {
                return Err(Error::config(
                    "num_virtual_tokens is required (PEFT has no default), e.g. 20",
                ))
            }
            Some(0) => return Err(Error::config("num_virtual_tokens must be at least 1")),
            Some(_) => {}
        }
        if let Some(n) = self.num_transformer_submodules.filter(|&n| n != 1) {
            return Err(Error::config(format!(
                "num_transformer_submodules = {n} is not supported: only decoder-only models and \
                 encoders (1) are, not encoder-decoder models (2)"
            )));
        }
        if self.token_dim == Some(0) || self.encoder_hidden_size == Some(0) {
            return Err(Error::config(
                "token_dim and encoder_hidden_size must be at least 1",
            ));
        }
        if !(0.0..1.0).contains(&self.encoder_dropout) {
            return Err(Error::config(format!(
                "encoder_dropout = {} must be in [0, 1)",
                self.encoder_dropout
            )));
        }
        reject_switched_on("P-tuning", &self.other, FROM_MODEL, &[])
    }

    /// The number of virtual tokens (after [`validate`](Self::validate)).
    pub fn virtual_tokens(&self) -> usize {
        self.num_virtual_tokens.unwrap_or(1)
    }

    /// The width of a virtual token on `model`: its hidden size, which `token_dim` must match
    /// when given.
    pub fn token_dim_for(&self, model: &ModelInfo) -> Result<usize> {
        match self.token_dim {
            Some(d) if d != model.hidden_size => Err(Error::config(format!(
                "token_dim = {d} does not match the model's hidden size {} ({})",
                model.hidden_size, model.architecture
            ))),
            _ => Ok(model.hidden_size),
        }
    }

    /// The MLP's hidden width for tokens `token_dim` wide.
    pub fn hidden_size(&self, token_dim: usize) -> usize {
        self.encoder_hidden_size.unwrap_or(token_dim)
    }
}

/// The documented fields.
pub fn fields() -> Vec<ConfigField> {
    vec![
        ConfigField::new(
            "num_virtual_tokens",
            "int",
            "",
            "virtual tokens prepended to every input",
        ),
        ConfigField::new(
            "encoder_reparameterization_type",
            "\"MLP\"",
            "\"MLP\"",
            "the prompt encoder: embedding → Linear → ReLU → Linear → ReLU → Linear (LSTM is \
             not supported)",
        ),
        ConfigField::new(
            "encoder_hidden_size",
            "int",
            "token_dim",
            "hidden width of the MLP",
        ),
        ConfigField::new(
            "encoder_num_layers",
            "int",
            "2",
            "accepted; PEFT's MLP always has three linear layers",
        ),
        ConfigField::new(
            "encoder_dropout",
            "float",
            "0.0",
            "accepted; PEFT applies it to the LSTM only",
        ),
        ConfigField::new(
            "token_dim",
            "int",
            "the model's hidden size",
            "width of a virtual token (must match the model)",
        ),
        ConfigField::new(
            "num_transformer_submodules",
            "int",
            "1",
            "1 (decoder-only models and encoders); encoder-decoder models are not supported",
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

    fn parse(json: &str) -> PromptEncoderConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_follow_peft() {
        let c = parse(r#"{"num_virtual_tokens": 4}"#);
        c.validate().unwrap();
        assert_eq!(c.encoder_reparameterization_type, Reparameterization::Mlp);
        assert_eq!((c.encoder_num_layers, c.encoder_dropout), (2, 0.0));
        assert_eq!(c.hidden_size(32), 32);
        let model = ModelInfo {
            hidden_size: 32,
            ..ModelInfo::default()
        };
        assert_eq!(c.token_dim_for(&model).unwrap(), 32);
        let wide = parse(r#"{"num_virtual_tokens": 4, "token_dim": 16}"#);
        assert!(wide.token_dim_for(&model).is_err());
        let err = parse("{}").validate().unwrap_err().to_string();
        assert!(err.contains("num_virtual_tokens"), "{err}");
    }

    #[test]
    fn peft_saved_config_is_accepted_and_lstm_refused_by_name() {
        let c = parse(
            r#"{"peft_type": "P_TUNING", "task_type": "SEQ_CLS", "num_virtual_tokens": 20,
                "token_dim": 384, "num_transformer_submodules": 1, "num_attention_heads": 12,
                "num_layers": 6, "encoder_reparameterization_type": "MLP",
                "encoder_hidden_size": 128, "encoder_num_layers": 2, "encoder_dropout": 0.0,
                "inference_mode": true, "modules_to_save": ["classifier"], "revision": null,
                "base_model_name_or_path": "m", "auto_mapping": null, "peft_version": "0.17.0"}"#,
        );
        c.validate().unwrap();
        assert_eq!(c.hidden_size(384), 128);
        let lstm: std::result::Result<PromptEncoderConfig, _> = serde_json::from_str(
            r#"{"num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM"}"#,
        );
        let err = lstm.unwrap_err().to_string();
        assert!(
            err.contains("LSTM") && err.contains("not supported"),
            "{err}"
        );
        let seq2seq = parse(r#"{"num_virtual_tokens": 4, "num_transformer_submodules": 2}"#);
        assert!(seq2seq.validate().is_err());
        let odd = parse(r#"{"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT"}"#);
        let err = odd.validate().unwrap_err().to_string();
        assert!(err.contains("prompt_tuning_init"), "{err}");
    }
}
