//! The [`PeftMethod`] trait and the [`Linear`] a method wraps.

use serde::de::DeserializeOwned;

use crate::types::{ConfigField, Event, Init, LinearInfo, ModelInfo};
use crate::{host, Result, Tensor};

/// A PEFT method: creates parameters through the host and transforms the base model's
/// computation at the hook points. Every hook has a default that leaves the model unchanged, so
/// a method implements only what it uses.
///
/// Call order: [`new`](Self::new), [`init_model`](Self::init_model), then for each linear module
/// [`select_linear`](Self::select_linear) and, when selected,
/// [`init_linear`](Self::init_linear); afterwards the forward hooks at every step.
pub trait PeftMethod: Send + 'static {
    /// The method's configuration (PEFT's field names), read from the recipe or
    /// `adapter_config.json`.
    type Config: DeserializeOwned;

    /// A method from its configuration.
    fn new(config: Self::Config) -> Result<Self>
    where
        Self: Sized;

    /// The configuration fields, for `whet plugin list` and the docs.
    fn config_fields() -> Vec<ConfigField>
    where
        Self: Sized,
    {
        Vec::new()
    }

    /// The base model's shape, before any other hook.
    fn init_model(&mut self, _model: &ModelInfo) -> Result<()> {
        Ok(())
    }

    /// Whether to wrap this linear module (default: no).
    fn select_linear(&self, _linear: &LinearInfo) -> Result<bool> {
        Ok(false)
    }

    /// Creates the parameters of a selected linear module.
    fn init_linear(&self, _layer: &mut Linear) -> Result<()> {
        Ok(())
    }

    /// The wrapped module's output from its input `x` `[..., in]` and the frozen base output
    /// `base_out` `[..., out]` (default: `base_out`).
    fn forward_linear(&self, _layer: &Linear, _x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        Ok(base_out.clone())
    }

    /// The change `ΔW` `[out, in]` that merging adds to the base weight, if the method can be
    /// merged (default: not mergeable).
    fn delta_weight(&self, _layer: &Linear) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Transforms the input embeddings `[batch, seq, hidden]` and attention mask `[batch, seq]`
    /// (default: unchanged).
    fn forward_embeddings(
        &self,
        _embeddings: &Tensor,
        _attention_mask: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// Extra keys and values `[batch, kv_heads, prefix_len, head_dim]` for attention layer
    /// `layer` (default: none).
    fn attention_prefix(&self, _layer: usize, _batch: usize) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    /// Which of the base parameters `names` train now (default: none). Called before training
    /// and after every step, so a schedule can unfreeze layers over time.
    fn trainable_base_params(&self, _names: &[String]) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// A differentiable scalar added to the training loss (default: none).
    fn loss_term(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// A lifecycle notification (default: ignored).
    fn on_event(&mut self, _event: &Event) -> Result<()> {
        Ok(())
    }

    /// How many training examples of each finished task of a continual-learning run the
    /// method wants gradients for (default: none). The host then runs forward and backward on
    /// that many examples, one at a time, and sends an [`Event::TaskGradient`] after each, during
    /// which [`crate::host::grad`] reads the gradients (EWC estimates its Fisher information
    /// this way).
    fn task_gradient_examples(&self) -> Result<usize> {
        Ok(0)
    }
}

/// A linear module of the base model that a method wraps.
#[derive(Debug, Clone)]
pub struct Linear {
    info: LinearInfo,
}

impl Linear {
    /// The module described by `info`.
    pub fn new(info: LinearInfo) -> Linear {
        Linear { info }
    }

    /// Hugging Face module name, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Everything the host said about the module.
    pub fn info(&self) -> &LinearInfo {
        &self.info
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.info.in_features
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.info.out_features
    }

    /// The transformer block index, when the module sits in one.
    pub fn layer_index(&self) -> Option<usize> {
        self.info.layer_index
    }

    /// Creates a trainable parameter saved as `<module>.<name>`; PEFT names its LoRA factors
    /// `lora_A.weight` and `lora_B.weight`.
    pub fn add_param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<()> {
        host::add_param(&self.info.name, name, shape, init).map(drop)
    }

    /// The current value of a parameter created with [`add_param`](Self::add_param).
    pub fn param(&self, name: &str) -> Result<Tensor> {
        host::param(&self.info.name, name)
    }

    /// The frozen base weight `[out, in]`.
    pub fn base_weight(&self) -> Result<Tensor> {
        host::base_param(&format!("{}.weight", self.info.name))
    }

    /// The frozen base bias `[out]`, if the module has one.
    pub fn base_bias(&self) -> Result<Option<Tensor>> {
        if self.info.has_bias {
            host::base_param(&format!("{}.bias", self.info.name)).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Dropout with probability `p` while training (identity while evaluating or when `p` is 0).
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            Ok(x.clone())
        } else {
            x.dropout(p)
        }
    }
}
