//! The [`Loss`] trait: a training objective computed from host tensors.

use serde::de::DeserializeOwned;

use crate::types::ConfigField;
use crate::{Result, Tensor};

/// A loss function. The host hands it the model's logits, the labels and the loss mask (and a
/// teacher's logits when the recipe configures a teacher); it returns a scalar tensor.
pub trait Loss: Send + 'static {
    /// The loss's configuration.
    type Config: DeserializeOwned;

    /// A loss from its configuration.
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

    /// The scalar loss. Classification: logits `[batch, classes]`, labels and mask `[batch]`.
    /// Causal LM: logits `[batch, seq - 1, vocab]`, labels and mask `[batch, seq - 1]`, already
    /// shifted by the host (the label at `t` is the token the logits at `t` predict). Labels are
    /// `u32` ids, 0 where the mask is 0 (prompt, padding); the mask is `f32`, 1 where the position
    /// counts. `teacher_logits` has the logits' shape and no gradient.
    fn compute(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        mask: &Tensor,
        teacher_logits: Option<&Tensor>,
    ) -> Result<Tensor>;
}
