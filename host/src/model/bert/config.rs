//! The configuration of a BERT-family encoder, read from `config.json` with `BertConfig`'s
//! defaults, and its feed-forward activation.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;

use crate::ops;
use crate::{Error, Result};

/// The fields of a BERT `config.json` the encoder uses (defaults are `BertConfig`'s).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size.
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Hidden size.
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Number of encoder layers.
    #[serde(default = "defaults::num_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    #[serde(default = "defaults::num_heads")]
    pub num_attention_heads: usize,
    /// Feed-forward size.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Activation of the feed-forward: `gelu` (erf), `gelu_new` / `gelu_pytorch_tanh` (tanh).
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    /// Dropout on embeddings, sub-layer outputs and the pooled state (training only).
    #[serde(default = "defaults::dropout")]
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities (training only).
    #[serde(default = "defaults::dropout")]
    pub attention_probs_dropout_prob: f32,
    /// Number of position embeddings.
    #[serde(default = "defaults::max_positions")]
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "defaults::type_vocab_size")]
    pub type_vocab_size: usize,
    /// Standard deviation of the normal initialisation of new weights.
    #[serde(default = "defaults::initializer_range")]
    pub initializer_range: f64,
    /// LayerNorm epsilon.
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Padding token id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// `bert`, `roberta`, `xlm-roberta`, ... (RoBERTa-style models offset positions by
    /// `pad_token_id + 1`).
    #[serde(default = "defaults::model_type")]
    pub model_type: String,
    /// Only `absolute` is supported.
    #[serde(default = "defaults::position_embedding_type")]
    pub position_embedding_type: String,
}

mod defaults {
    pub fn vocab_size() -> usize {
        30522
    }
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_layers() -> usize {
        12
    }
    pub fn num_heads() -> usize {
        12
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn hidden_act() -> String {
        "gelu".into()
    }
    pub fn dropout() -> f32 {
        0.1
    }
    pub fn max_positions() -> usize {
        512
    }
    pub fn type_vocab_size() -> usize {
        2
    }
    pub fn initializer_range() -> f64 {
        0.02
    }
    pub fn layer_norm_eps() -> f64 {
        1e-12
    }
    pub fn model_type() -> String {
        "bert".into()
    }
    pub fn position_embedding_type() -> String {
        "absolute".into()
    }
}

impl BertConfig {
    /// Parses and validates a `config.json` value; `path` names the file in errors.
    pub fn from_json(value: &serde_json::Value, path: &Path) -> Result<Self> {
        let config: Self = serde_json::from_value(value.clone())
            .map_err(|e| Error::bad_file(path, format!("not a BERT config: {e}")))?;
        config
            .validate()
            .map_err(|msg| Error::bad_file(path, msg))?;
        Ok(config)
    }

    pub(super) fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                self.position_embedding_type
            ));
        }
        Activation::parse(&self.hidden_act)?;
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} = {p} must be in [0, 1)"));
            }
        }
        Ok(())
    }

    /// Whether positions are numbered RoBERTa-style (from `pad_token_id + 1`, padding skipped).
    pub(super) fn roberta_positions(&self) -> bool {
        self.model_type.contains("roberta")
    }

    /// The first position id RoBERTa-style models use.
    pub(super) fn position_offset(&self) -> usize {
        if self.roberta_positions() {
            self.pad_token_id.unwrap_or(1) as usize + 1
        } else {
            0
        }
    }

    /// Longest sequence the position table supports.
    pub fn max_sequence_length(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }
}

/// The feed-forward activation.
#[derive(Debug, Clone, Copy)]
pub(super) enum Activation {
    GeluErf,
    GeluTanh,
}

impl Activation {
    pub(super) fn parse(name: &str) -> std::result::Result<Self, String> {
        match name {
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => Err(format!(
                "hidden_act `{other}` is not supported (use gelu, gelu_new or gelu_pytorch_tanh)"
            )),
        }
    }

    pub(super) fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluErf => ops::gelu(x),
            Self::GeluTanh => ops::gelu_tanh(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let c = BertConfig::from_json(
            &serde_json::json!({"hidden_size": 8, "num_attention_heads": 2}),
            Path::new("c.json"),
        )
        .unwrap();
        assert_eq!(
            (c.vocab_size, c.layer_norm_eps, c.hidden_act.as_str()),
            (30522, 1e-12, "gelu")
        );
        let bad = BertConfig::from_json(
            &serde_json::json!({"hidden_size": 9, "num_attention_heads": 2}),
            Path::new("c.json"),
        );
        assert!(bad.unwrap_err().to_string().contains("c.json"));
        let act = BertConfig::from_json(
            &serde_json::json!({"hidden_act": "swish"}),
            Path::new("c.json"),
        );
        assert!(act.unwrap_err().to_string().contains("hidden_act"));
    }
}
