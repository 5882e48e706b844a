//! PEFT's `PrefixTuningConfig`: the fields prefix tuning reads, their defaults, checks against
//! the base model, and clear errors for what this plugin does not implement.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use whetstone_sdk::config::reject_switched_on;
use whetstone_sdk::{ConfigField, Error, ModelInfo, Result};

use crate::layout::Layout;

/// PEFT's `init_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitWeights {
    /// `null`: PyTorch's defaults (`nn.Embedding` N(0, 1), `nn.Linear` Kaiming-uniform).
    #[default]
    Random,
    /// `"zero"`: the prefix (or the projection's last layer) starts at zero.
    Zero,
}

impl<'de> Deserialize<'de> for InitWeights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(InitWeights::Random),
            Value::String(s) if s == "zero" => Ok(InitWeights::Zero),
            other => Err(serde::de::Error::custom(format!(
                "init_weights = {other} is not supported (use null or \"zero\")"
            ))),
        }
    }
}

/// The configuration, with PEFT's field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct PrefixTuningConfig {
    /// Prefix positions in front of every attention layer's keys and values (required, as in
    /// PEFT).
    pub num_virtual_tokens: Option<usize>,
    /// Reparameterise the prefix with `Linear → Tanh → Linear`.
    #[serde(default)]
    pub prefix_projection: bool,
    /// Hidden width of the projection; `token_dim` when absent (PEFT fills it in).
    #[serde(default)]
    pub encoder_hidden_size: Option<usize>,
    /// How the prefix starts.
    #[serde(default)]
    pub init_weights: InitWeights,
    /// Key/value width of a layer, `num_key_value_heads · head_dim` (PEFT fills it in so for
    /// grouped-query attention); must match the model when given.
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// Key/value heads (PEFT's `num_attention_heads` after its grouped-query adjustment); must
    /// match the model when given.
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    /// Attention layers; must match the model when given.
    #[serde(default)]
    pub num_layers: Option<usize>,
    /// 1 for decoder-only models and encoders (2 is PEFT's encoder-decoder setting).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// Base modules trained whole and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field: PEFT bookkeeping is accepted, unsupported features are refused by
    /// name in [`PrefixTuningConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl PrefixTuningConfig {
    /// Refuses values prefix tuning cannot honour, naming the field.
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
        if self.encoder_hidden_size == Some(0) {
            return Err(Error::config("encoder_hidden_size must be at least 1"));
        }
        reject_switched_on("prefix tuning", &self.other, &[], &[])
    }

    /// The number of prefix positions (after [`validate`](Self::validate)).
    pub fn virtual_tokens(&self) -> usize {
        self.num_virtual_tokens.unwrap_or(1)
    }

    /// The prefix layout of `model`, checked against `num_layers`, `num_attention_heads` and
    /// `token_dim` when the configuration gives them (a PEFT adapter always does).
    pub fn layout_for(&self, model: &ModelInfo) -> Result<Layout> {
        let layout = Layout {
            layers: model.num_layers,
            kv_heads: model.num_key_value_heads,
            head_dim: model.head_dim,
        };
        if layout.layers == 0 || layout.token_dim() == 0 {
            return Err(Error::config(format!(
                "the {} model reports no attention layers to prefix",
                model.architecture
            )));
        }
        let checks = [
            (
                "num_layers",
                self.num_layers,
                layout.layers,
                "attention layers",
            ),
            (
                "num_attention_heads",
                self.num_attention_heads,
                layout.kv_heads,
                "key/value heads",
            ),
            (
                "token_dim",
                self.token_dim,
                layout.token_dim(),
                "key/value heads × head dim",
            ),
        ];
        for (name, given, want, what) in checks {
            if let Some(v) = given.filter(|&v| v != want) {
                return Err(Error::config(format!(
                    "{name} = {v} does not match the {} model's {want} ({what})",
                    model.architecture
                )));
            }
        }
        Ok(layout)
    }

    /// The projection's hidden width for a layout of key/value width `token_dim`.
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
            "prefix positions in front of every attention layer's keys and values",
        ),
        ConfigField::new(
            "prefix_projection",
            "bool",
            "false",
            "reparameterise the prefix: embedding → Linear → Tanh → Linear",
        ),
        ConfigField::new(
            "encoder_hidden_size",
            "int",
            "token_dim",
            "hidden width of the projection",
        ),
        ConfigField::new(
            "init_weights",
            "null | \"zero\"",
            "null",
            "\"zero\": the prefix (or the projection's last layer) starts at zero",
        ),
        ConfigField::new(
            "token_dim",
            "int",
            "key/value heads × head dim",
            "key/value width of a layer (must match the model)",
        ),
        ConfigField::new(
            "num_attention_heads",
            "int",
            "the model's key/value heads",
            "must match the model",
        ),
        ConfigField::new(
            "num_layers",
            "int",
            "the model's layers",
            "must match the model",
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

    fn parse(json: &str) -> PrefixTuningConfig {
        serde_json::from_str(json).unwrap()
    }

    /// The tiny Llama of the conformance suite: grouped-query attention.
    fn model() -> ModelInfo {
        ModelInfo {
            architecture: "LlamaForCausalLM".into(),
            hidden_size: 32,
            num_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            ..ModelInfo::default()
        }
    }

    #[test]
    fn defaults_follow_peft() {
        let c = parse(r#"{"num_virtual_tokens": 4}"#);
        c.validate().unwrap();
        assert!(!c.prefix_projection);
        assert_eq!(c.init_weights, InitWeights::Random);
        let layout = c.layout_for(&model()).unwrap();
        assert_eq!(
            (layout.token_dim(), c.hidden_size(layout.token_dim())),
            (16, 16)
        );
        let err = parse("{}").validate().unwrap_err().to_string();
        assert!(err.contains("num_virtual_tokens"), "{err}");
    }

    #[test]
    fn peft_saved_config_is_checked_against_the_model() {
        // What PEFT writes for the tiny Llama: token_dim and heads after its GQA adjustment.
        let c = parse(
            r#"{"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5,
                "token_dim": 16, "num_transformer_submodules": 1, "num_attention_heads": 2,
                "num_layers": 2, "encoder_hidden_size": 16, "prefix_projection": false,
                "init_weights": null, "inference_mode": true, "modules_to_save": null,
                "revision": null, "base_model_name_or_path": "m", "auto_mapping": null,
                "peft_version": "0.17.0"}"#,
        );
        c.validate().unwrap();
        c.layout_for(&model()).unwrap();
        // PEFT before its GQA fix wrote the query heads and the hidden size.
        let old = parse(r#"{"num_virtual_tokens": 5, "token_dim": 32, "num_attention_heads": 2}"#);
        let err = old.layout_for(&model()).unwrap_err().to_string();
        assert!(
            err.contains("token_dim = 32") && err.contains("16"),
            "{err}"
        );
        let layers = parse(r#"{"num_virtual_tokens": 5, "num_layers": 3}"#);
        assert!(layers.layout_for(&model()).is_err());
    }

    #[test]
    fn unsupported_fields_and_values_are_named() {
        let bad: std::result::Result<PrefixTuningConfig, _> =
            serde_json::from_str(r#"{"num_virtual_tokens": 4, "init_weights": "gaussian"}"#);
        assert!(bad.unwrap_err().to_string().contains("gaussian"));
        let zero = parse(r#"{"num_virtual_tokens": 4, "init_weights": "zero"}"#);
        assert_eq!(zero.init_weights, InitWeights::Zero);
        let seq2seq = parse(r#"{"num_virtual_tokens": 4, "num_transformer_submodules": 2}"#);
        assert!(seq2seq
            .validate()
            .unwrap_err()
            .to_string()
            .contains("encoder-decoder"));
        let odd = parse(r#"{"num_virtual_tokens": 4, "encoder_reparameterization_type": "MLP"}"#);
        let err = odd.validate().unwrap_err().to_string();
        assert!(err.contains("encoder_reparameterization_type"), "{err}");
    }
}
