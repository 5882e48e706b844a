//! The model architectures the host owns, with module and parameter names exactly as Hugging
//! Face names them (so PEFT's `target_modules` and adapter keys apply unchanged).

pub mod bert;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod hooks;
pub mod llama;
pub mod load;
pub mod prompt;
pub mod tokenizer;

use candle_core::Tensor;

use crate::ops::Linear;
use crate::params::ParamStore;
use crate::Result;
use hooks::ForwardContext;

/// What a model's forward produces and how its loss is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// Next-token prediction: logits `[batch, seq, vocab]`.
    CausalLm,
    /// Sequence classification: logits `[batch, num_labels]`.
    SequenceClassification {
        /// Number of classes.
        num_labels: usize,
    },
}

/// One batch of tokenized, padded examples on the model's device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids `[batch, seq]` (u32).
    pub input_ids: Tensor,
    /// `[batch, seq]` (u32): 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Causal LM: `[batch, seq]` (i64), the input ids with positions excluded from the loss set to
    /// [`crate::ops::IGNORE_INDEX`]. Classification: `[batch]` (i64) class ids.
    pub labels: Tensor,
    /// Number of real (non-padding) tokens, for throughput figures.
    pub num_tokens: usize,
}

/// Whether dropout and other training-only behaviour are active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Training: dropout active.
    Train,
    /// Evaluation / inference: deterministic.
    Eval,
}

/// An encoder that turns token sequences into one vector each (sentence embeddings).
pub trait SentenceEncoder {
    /// The pooled embedding `[batch, hidden]` of `input_ids` with `attention_mask` (`[batch,
    /// seq]`, u32, 1 = real token), computed in evaluation mode (no dropout) and not normalised.
    fn embed(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor>;

    /// The embedding's width.
    fn embedding_dim(&self) -> usize;
}

/// A model the trainer can fine-tune.
pub trait Model: Send + Sync {
    /// Architecture name as in `config.json` (`LlamaForCausalLM`, `BertForSequenceClassification`).
    fn architecture(&self) -> &str;

    /// What the forward produces.
    fn task(&self) -> TaskKind;

    /// All parameters, under their Hugging Face names.
    fn params(&self) -> &ParamStore;

    /// Logits for a batch (see [`TaskKind`] for the shape).
    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, mode: Mode) -> Result<Tensor>;

    /// The linear modules a PEFT method may wrap (every projection of every block, and a
    /// classification head; a language-model head is left out, as PEFT's `all-linear` does).
    fn linears(&self) -> Vec<&Linear>;

    /// The names of the linear modules (candidates for PEFT's `target_modules`).
    fn linear_module_names(&self) -> Vec<String> {
        self.linears().iter().map(|l| l.name.clone()).collect()
    }

    /// The state PEFT hooks read during a forward (mode, step, seeded generator). A model's
    /// forward sets its mode.
    fn forward_context(&self) -> std::sync::Arc<ForwardContext>;

    /// The model's shape, as plugins see it.
    fn model_info(&self) -> whetstone_sdk::ModelInfo;

    /// A module or parameter name as the original checkpoint spells it (the encoder of a
    /// `BertForSequenceClassification` checkpoint sits under `bert.`, its head does not). PEFT
    /// adapter keys use these names.
    fn checkpoint_name(&self, name: &str) -> String {
        name.to_string()
    }

    /// The model's configuration as a Hugging Face `config.json`, for writing the model out
    /// when its source has none (a GGUF file); `None` when the architecture does not say.
    fn hf_config(&self) -> Option<serde_json::Value> {
        None
    }

    /// The incremental (KV-cached) decoding interface, for models that generate text.
    fn as_causal_lm(&self) -> Option<&dyn generate::CausalLm> {
        None
    }

    /// The sentence-embedding interface, for encoder models.
    fn as_encoder(&self) -> Option<&dyn SentenceEncoder> {
        None
    }

    /// Reseeds the model's training-time randomness (dropout). The trainer calls it before every
    /// step with a seed derived from the run's seed and the step, so the masks of a step do not
    /// depend on how many steps this process has run: a resumed run draws the same masks as an
    /// uninterrupted one. Models without randomness ignore it.
    fn reseed(&self, _seed: u64) {}

    /// Whether the model checkpoints its blocks when its forward context asks
    /// ([`hooks::ForwardContext::set_checkpointing`]); such a model's callers merge
    /// [`hooks::ForwardContext::checkpoint_grads`] after each backward pass.
    fn supports_checkpointing(&self) -> bool {
        false
    }

    /// The training loss of a batch straight from `input_ids`, computed without materialising
    /// the logits (see [`crate::ops::linear_cross_entropy`]), equal in value and gradients to
    /// [`Model::forward`] followed by [`Model::loss`]; `None` when the model has no such path
    /// (the caller then takes the logits).
    fn forward_loss(
        &self,
        _input_ids: &Tensor,
        _attention_mask: &Tensor,
        _labels: &Tensor,
        _mode: Mode,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The loss of a batch: cross-entropy over classes, or next-token cross-entropy over the
    /// unmasked label positions.
    fn loss(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        Ok(match self.task() {
            TaskKind::CausalLm => crate::ops::causal_lm_loss(logits, labels)?,
            TaskKind::SequenceClassification { .. } => crate::ops::cross_entropy(logits, labels)?,
        })
    }
}
