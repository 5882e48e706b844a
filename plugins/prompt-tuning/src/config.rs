//! PEFT's `PromptTuningConfig`: the fields prompt tuning reads, their defaults, checks against
//! the base model, and clear errors for what this plugin does not implement.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use whetstone_sdk::config::reject_switched_on;
use whetstone_sdk::{ConfigField, Error, ModelInfo, Result};

/// PEFT's `prompt_tuning_init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptTuningInit {
    /// `"RANDOM"`: `nn.Embedding`'s default, every value drawn from N(0, 1).
    #[default]
    Random,
    /// `"TEXT"`: the base model's embeddings of the tokenized `prompt_tuning_init_text`,
    /// repeated or truncated to the number of virtual tokens.
    Text,
    /// `"SAMPLE_VOCAB"`: the base model's embeddings of tokens drawn uniformly from the
    /// vocabulary.
    SampleVocab,
}

impl<'de> Deserialize<'de> for PromptTuningInit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "RANDOM" => Ok(PromptTuningInit::Random),
            "TEXT" => Ok(PromptTuningInit::Text),
            "SAMPLE_VOCAB" => Ok(PromptTuningInit::SampleVocab),
            other => Err(serde::de::Error::custom(format!(
                "prompt_tuning_init = {other:?} is not one of \"RANDOM\", \"TEXT\", \"SAMPLE_VOCAB\""
            ))),
        }
    }
}

/// The configuration, with PEFT's field names and defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptTuningConfig {
    /// Virtual tokens prepended to every input (required, as in PEFT).
    pub num_virtual_tokens: Option<usize>,
    /// Width of a virtual token; the model's hidden size when absent (PEFT fills it in).
    #[serde(default)]
    pub token_dim: Option<usize>,
    /// 1 for decoder-only models and encoders (2 is PEFT's encoder-decoder setting).
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    /// How the virtual tokens start.
    #[serde(default)]
    pub prompt_tuning_init: PromptTuningInit,
    /// The text of `"TEXT"` init (the host tokenizes it into `prompt_tuning_init_token_ids`).
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    /// The token ids of `prompt_tuning_init_text`, added by the host (special tokens included,
    /// as PEFT's `tokenizer(text)["input_ids"]`).
    #[serde(default)]
    pub prompt_tuning_init_token_ids: Option<Vec<u32>>,
    /// The tokenizer of `"TEXT"` init: bookkeeping here (the host tokenizes with the model's own
    /// tokenizer), but required with `"TEXT"` as PEFT requires it, so that the saved adapter
    /// loads in Python.
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    /// A loaded adapter: the parameter's value comes from the file, so no init runs (as in
    /// PEFT, which skips `TEXT` and `SAMPLE_VOCAB` init in inference mode).
    #[serde(default)]
    pub inference_mode: bool,
    /// Base modules trained whole and saved with the adapter.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Every other field: PEFT bookkeeping is accepted, unsupported features are refused by
    /// name in [`PromptTuningConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Filled in by PEFT from the model config; prompt tuning's shape does not depend on them.
const FROM_MODEL: &[&str] = &["num_attention_heads", "num_layers"];

impl PromptTuningConfig {
    /// Refuses values prompt tuning cannot honour, naming the field.
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
        if self.token_dim == Some(0) {
            return Err(Error::config("token_dim must be at least 1"));
        }
        if self.prompt_tuning_init == PromptTuningInit::Text
            && !self.inference_mode
            && self.prompt_tuning_init_token_ids.is_none()
        {
            return Err(Error::config(if self.prompt_tuning_init_text.is_none() {
                "prompt_tuning_init = \"TEXT\" needs prompt_tuning_init_text"
            } else {
                "prompt_tuning_init = \"TEXT\": the host did not tokenize prompt_tuning_init_text \
                 into prompt_tuning_init_token_ids (a list of token ids); give them yourself or \
                 use a host that tokenizes it"
            }));
        }
        if self.prompt_tuning_init == PromptTuningInit::Text
            && self
                .tokenizer_name_or_path
                .as_deref()
                .unwrap_or("")
                .is_empty()
        {
            return Err(Error::config(
                "prompt_tuning_init = \"TEXT\" needs tokenizer_name_or_path (the base model's \
                 Hugging Face name): the host tokenizes with the model's own tokenizer, but PEFT \
                 refuses to load a TEXT adapter without it",
            ));
        }
        if self
            .prompt_tuning_init_token_ids
            .as_ref()
            .is_some_and(|ids| ids.is_empty())
            && self.prompt_tuning_init == PromptTuningInit::Text
        {
            return Err(Error::config(
                "prompt_tuning_init_token_ids is empty: prompt_tuning_init_text gave no tokens",
            ));
        }
        reject_switched_on(
            "prompt tuning",
            &self.other,
            FROM_MODEL,
            &[(
                "tokenizer_kwargs",
                " (the host tokenizes prompt_tuning_init_text with the model's own tokenizer)",
            )],
        )
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
            "prompt_tuning_init",
            "\"RANDOM\" | \"TEXT\" | \"SAMPLE_VOCAB\"",
            "\"RANDOM\"",
            "RANDOM: N(0, 1); TEXT: embeddings of prompt_tuning_init_text (repeated or cut to \
             num_virtual_tokens); SAMPLE_VOCAB: embeddings of random vocabulary tokens",
        ),
        ConfigField::new(
            "prompt_tuning_init_text",
            "string",
            "null",
            "the text of TEXT init, tokenized by the host with the model's tokenizer",
        ),
        ConfigField::new(
            "prompt_tuning_init_token_ids",
            "list of ints",
            "added by the host",
            "the token ids of prompt_tuning_init_text (special tokens included)",
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
            "tokenizer_name_or_path",
            "string",
            "null",
            "required with TEXT, as PEFT requires it (the host tokenizes with the model's own \
             tokenizer)",
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

    fn parse(json: &str) -> PromptTuningConfig {
        serde_json::from_str(json).unwrap()
    }

    fn model() -> ModelInfo {
        ModelInfo {
            architecture: "LlamaForCausalLM".into(),
            hidden_size: 32,
            ..ModelInfo::default()
        }
    }

    #[test]
    fn defaults_follow_peft() {
        let c = parse(r#"{"num_virtual_tokens": 4}"#);
        c.validate().unwrap();
        assert_eq!(c.prompt_tuning_init, PromptTuningInit::Random);
        assert_eq!(
            (c.virtual_tokens(), c.token_dim_for(&model()).unwrap()),
            (4, 32)
        );
        let err = parse("{}").validate().unwrap_err().to_string();
        assert!(err.contains("num_virtual_tokens"), "{err}");
    }

    #[test]
    fn peft_saved_config_is_accepted() {
        let c = parse(
            r#"{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 8,
                "token_dim": 32, "num_transformer_submodules": 1, "num_attention_heads": 4,
                "num_layers": 2, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi",
                "tokenizer_name_or_path": "x", "tokenizer_kwargs": null, "inference_mode": true,
                "base_model_name_or_path": "m", "revision": null, "modules_to_save": null,
                "auto_mapping": null, "peft_version": "0.17.0"}"#,
        );
        // A loaded adapter needs no token ids: its value comes from the file.
        c.validate().unwrap();
        assert!(c.token_dim_for(&model()).is_ok());
        let wide = parse(r#"{"num_virtual_tokens": 8, "token_dim": 64}"#);
        let err = wide.token_dim_for(&model()).unwrap_err().to_string();
        assert!(
            err.contains("token_dim = 64") && err.contains("32"),
            "{err}"
        );
    }

    #[test]
    fn text_init_needs_token_ids_and_unsupported_fields_are_named() {
        let text = parse(
            r#"{"num_virtual_tokens": 8, "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": "Classify", "tokenizer_name_or_path": "m"}"#,
        );
        let err = text.validate().unwrap_err().to_string();
        assert!(err.contains("prompt_tuning_init_token_ids"), "{err}");
        let ok = parse(
            r#"{"num_virtual_tokens": 8, "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": "Classify", "prompt_tuning_init_token_ids": [5, 6],
                "tokenizer_name_or_path": "m"}"#,
        );
        ok.validate().unwrap();
        let anonymous = parse(
            r#"{"num_virtual_tokens": 8, "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": "Classify", "prompt_tuning_init_token_ids": [5, 6]}"#,
        );
        let err = anonymous.validate().unwrap_err().to_string();
        assert!(err.contains("tokenizer_name_or_path"), "{err}");
        let seq2seq = parse(r#"{"num_virtual_tokens": 8, "num_transformer_submodules": 2}"#);
        let err = seq2seq.validate().unwrap_err().to_string();
        assert!(err.contains("encoder-decoder"), "{err}");
        let kwargs = parse(r#"{"num_virtual_tokens": 8, "tokenizer_kwargs": {"a": 1}}"#);
        let err = kwargs.validate().unwrap_err().to_string();
        assert!(err.contains("tokenizer_kwargs"), "{err}");
        let bad: std::result::Result<PromptTuningConfig, _> =
            serde_json::from_str(r#"{"num_virtual_tokens": 8, "prompt_tuning_init": "random"}"#);
        assert!(bad.unwrap_err().to_string().contains("\"random\""));
    }
}
