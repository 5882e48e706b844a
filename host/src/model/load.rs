//! Loading a model from a path: a GGUF file (Llama family) or a Hugging Face directory
//! (`config.json` + safetensors + `tokenizer.json`), dispatched on the file type and the
//! `architectures` / `model_type` fields.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Model;

/// How a sequence-classification head pools the encoder's token states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over real (non-padding) tokens (sentence-transformers' default).
    #[default]
    Mean,
    /// The first (`[CLS]`) token's state.
    Cls,
}

/// The task head to put on the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskSpec {
    /// Causal language modelling (Llama family).
    #[default]
    CausalLm,
    /// Sequence classification (BERT family): a `classifier` linear over the pooled state.
    Classification,
}

/// The `[model]` section of a recipe: what to load and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A `.gguf` file or a Hugging Face model directory. `asset:NAME` refers to a fetched asset
    /// (`asset:smollm2-135m-instruct`, `asset:all-minilm-l6-v2`).
    pub path: String,
    /// The head: `causal-lm` or `classification`.
    #[serde(default)]
    pub task: TaskSpec,
    /// Number of classes for `classification`.
    #[serde(default = "default_num_labels")]
    pub num_labels: usize,
    /// Pooling for `classification`: `mean` (default) or `cls`.
    #[serde(default)]
    pub pooling: Pooling,
    /// Dropout probability used in training mode for encoder models; `None` keeps the value of
    /// `config.json` (`hidden_dropout_prob`).
    #[serde(default)]
    pub dropout: Option<f32>,
}

fn default_num_labels() -> usize {
    2
}

/// Special token ids a tokenizer/model pair uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence, when the model uses one.
    pub bos: Option<u32>,
    /// End of sequence / end of turn.
    pub eos: Option<u32>,
    /// Padding id.
    pub pad: u32,
    /// Whether the BOS token is prepended when encoding.
    pub add_bos: bool,
}

/// A loaded model with everything needed to feed it text.
pub struct LoadedModel {
    /// The model.
    pub model: Box<dyn Model>,
    /// Its tokenizer (padding and truncation turned off; the host pads and truncates).
    pub tokenizer: tokenizers::Tokenizer,
    /// Special token ids.
    pub special: SpecialTokens,
    /// The model's own Jinja chat template, when it ships one.
    pub chat_template: Option<String>,
    /// Maximum number of positions the model supports.
    pub max_positions: usize,
    /// Where it was loaded from.
    pub source: PathBuf,
}
