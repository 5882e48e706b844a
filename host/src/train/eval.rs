//! Evaluation on held-out examples: mean loss, plus accuracy (classification, by argmax) or
//! perplexity (language modelling, `exp` of the mean loss per predicted token).
//!
//! The model runs in [`Mode::Eval`] (no dropout). Each batch's graph is dropped as soon as its
//! loss is read, so no gradient or activation outlives the batch.

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::{collate, BatchOrder, Example, ExampleLabels};
use crate::model::{Batch, Mode, Model, TaskKind};
use crate::ops::IGNORE_INDEX;
use crate::{Error, Result};

/// Figures of one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Mean loss: per example for classification, per predicted token for language modelling.
    pub loss: f64,
    /// Share of examples whose argmax class equals the label (classification only).
    pub accuracy: Option<f64>,
    /// `exp(loss)` (language modelling only).
    pub perplexity: Option<f64>,
    /// Number of examples evaluated.
    pub examples: usize,
}

/// The weight of an example in the mean loss: 1 for a class label, the number of predicted
/// (non-ignored, shifted) tokens for token labels.
fn weight(example: &Example) -> usize {
    match &example.labels {
        ExampleLabels::Class(_) => 1,
        ExampleLabels::Tokens(labels) => labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count(),
    }
}

/// Evaluates `model` on `examples` in batches of `batch_size`, padding with `pad_id`.
pub fn evaluate(
    model: &dyn Model,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<EvalMetrics> {
    if examples.is_empty() {
        return Err(Error::config("no validation examples to evaluate"));
    }
    let mut acc = Accumulator::default();
    for indices in BatchOrder::sequential(examples.len(), batch_size)?.batches(0) {
        let chunk: Vec<&Example> = indices.iter().map(|&i| &examples[i]).collect();
        let weight = chunk.iter().map(|e| weight(e)).sum();
        let batch = collate(&chunk, pad_id, device)?;
        acc.add(model, &batch, weight)?;
    }
    acc.finish(model.task())
}

/// Running sums over evaluated batches.
#[derive(Debug, Default)]
struct Accumulator {
    weighted_loss: f64,
    weight: usize,
    correct: usize,
    examples: usize,
}

impl Accumulator {
    fn add(&mut self, model: &dyn Model, batch: &Batch, weight: usize) -> Result<()> {
        let logits = model
            .forward(&batch.input_ids, &batch.attention_mask, Mode::Eval)?
            .detach();
        let loss = model
            .loss(&logits, &batch.labels)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        self.weighted_loss += loss * weight as f64;
        self.weight += weight;
        self.examples += batch.input_ids.dim(0)?;
        if let TaskKind::SequenceClassification { .. } = model.task() {
            self.correct += count_correct(&logits, &batch.labels)?;
        }
        Ok(())
    }

    fn finish(self, task: TaskKind) -> Result<EvalMetrics> {
        if self.weight == 0 {
            return Err(Error::config(
                "the validation examples have no token to predict (all labels are masked)",
            ));
        }
        let loss = self.weighted_loss / self.weight as f64;
        Ok(match task {
            TaskKind::CausalLm => EvalMetrics {
                loss,
                accuracy: None,
                perplexity: Some(loss.exp()),
                examples: self.examples,
            },
            TaskKind::SequenceClassification { .. } => EvalMetrics {
                loss,
                accuracy: Some(self.correct as f64 / self.examples as f64),
                perplexity: None,
                examples: self.examples,
            },
        })
    }
}

/// Number of rows of `logits` `[b, classes]` whose argmax equals `labels` `[b]`.
fn count_correct(logits: &Tensor, labels: &Tensor) -> Result<usize> {
    let predicted = logits
        .argmax(D::Minus1)?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?;
    let labels = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    Ok(predicted
        .iter()
        .zip(&labels)
        .filter(|(p, l)| p == l)
        .count())
}
