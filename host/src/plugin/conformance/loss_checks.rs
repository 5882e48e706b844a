//! The conformance checks of loss plugins, on fixed random logits (and teacher logits) for a
//! 3-class classifier and for the tiny Llama's vocabulary, with ignored (`-100`) positions:
//!
//! - **value**: a finite scalar for both tasks;
//! - **gradients**: the gradient with respect to the logits is finite and non-zero, and exactly
//!   zero at every position that does not count (the host's mask: ignored labels, and the last
//!   position of a causal LM, which predicts nothing);
//! - **native-wasm** (across builds): the same values and gradients, bit for bit.

use std::sync::Arc;

use candle_core::{Device, Tensor, Var};

use super::fixture;
use super::{Outcome, TRANSPORT_TOLERANCE};
use crate::model::TaskKind;
use crate::ops::IGNORE_INDEX;
use crate::plugin::loss::LossAdapter;
use crate::plugin::Plugin;
use crate::Result;

/// Classes of the classifier batch.
const CLASSES: usize = 3;
/// Labels of the classifier batch.
const CLASSIFIER_LABELS: [i64; 6] = [0, 2, 1, 1, 0, 2];
/// Labels `[2, 5]` of the causal-LM batch (`-100`: ignored, as a prompt or padding).
const LM_LABELS: [[i64; 5]; 2] = [[7, -100, -100, 4, 9], [1, 3, 2, -100, -100]];
/// Seed of the random logits.
const LOGITS_SEED: u64 = 31;

/// The batches every build is checked on.
pub struct LossInputs {
    classifier: Batch,
    lm: Batch,
}

/// One batch: logits, teacher logits and labels.
struct Batch {
    task: TaskKind,
    logits: Tensor,
    teacher: Tensor,
    labels: Tensor,
    /// Per logits row (all but the last dim), whether it counts in the loss.
    counts: Vec<bool>,
}

impl LossInputs {
    /// The fixed batches.
    pub fn new() -> Result<LossInputs> {
        let dev = Device::Cpu;
        let vocab = fixture::tiny_config().vocab_size;
        let random = |shape: &[usize], seed: u64| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            // A small deterministic generator: the same logits on every machine.
            let mut state = seed;
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
                })
                .collect();
            Ok(Tensor::from_vec(values, shape, &dev)?)
        };
        let rows = CLASSIFIER_LABELS.len();
        let (batch, seq) = (LM_LABELS.len(), LM_LABELS[0].len());
        // Position t of a causal LM predicts label t + 1: it counts when that label does.
        let lm_counts = LM_LABELS
            .iter()
            .flat_map(|row| (0..seq).map(move |t| t + 1 < seq && row[t + 1] != IGNORE_INDEX))
            .collect();
        Ok(LossInputs {
            classifier: Batch {
                task: TaskKind::SequenceClassification {
                    num_labels: CLASSES,
                },
                logits: random(&[rows, CLASSES], LOGITS_SEED)?,
                teacher: random(&[rows, CLASSES], LOGITS_SEED + 1)?,
                labels: Tensor::new(&CLASSIFIER_LABELS, &dev)?,
                counts: vec![true; rows],
            },
            lm: Batch {
                task: TaskKind::CausalLm,
                logits: random(&[batch, seq, vocab], LOGITS_SEED + 2)?,
                teacher: random(&[batch, seq, vocab], LOGITS_SEED + 3)?,
                labels: Tensor::new(&LM_LABELS, &dev)?,
                counts: lm_counts,
            },
        })
    }

    fn batches(&self) -> [(&'static str, &Batch); 2] {
        [("classifier", &self.classifier), ("causal LM", &self.lm)]
    }
}

/// Attaches `plugin`'s loss, configured by `config`, for the tiny Llama.
pub fn attach(plugin: &Plugin, config: &serde_json::Value) -> Result<Arc<LossAdapter>> {
    let model = fixture::model()?;
    LossAdapter::attach(&model, plugin.clone(), config.clone())
}

/// What one build computes: each batch's loss and its gradient with respect to the logits.
#[derive(Debug, Clone)]
pub struct LossTrace {
    losses: Vec<f32>,
    gradients: Vec<Vec<f32>>,
}

/// The loss and logits gradient of every batch.
pub fn trace(loss: &LossAdapter, inputs: &LossInputs) -> Result<LossTrace> {
    let mut trace = LossTrace {
        losses: Vec::new(),
        gradients: Vec::new(),
    };
    for (_, b) in inputs.batches() {
        let logits = Var::from_tensor(&b.logits)?;
        let value = loss.loss_for(b.task, logits.as_tensor(), &b.labels, Some(&b.teacher))?;
        trace.losses.push(fixture::scalar(&value)?);
        let grads = value.backward()?;
        let grad = match grads.get(logits.as_tensor()) {
            Some(g) => fixture::values(g)?,
            None => vec![0.0; b.logits.elem_count()],
        };
        trace.gradients.push(grad);
    }
    Ok(trace)
}

/// **value**: a finite loss for both batches.
pub fn value(trace: &LossTrace) -> Outcome {
    let shown: Vec<String> = trace.losses.iter().map(|l| format!("{l:.6}")).collect();
    let message = format!("classifier {}, causal LM {}", shown[0], shown[1]);
    if trace.losses.iter().all(|l| l.is_finite()) {
        Outcome::pass(f64::from(trace.losses[0]), message)
    } else {
        Outcome::fail(f64::NAN, format!("a loss is not finite: {message}"))
    }
}

/// **gradients**: finite and non-zero where positions count, exactly zero where they do not.
pub fn gradients(trace: &LossTrace, inputs: &LossInputs) -> Outcome {
    let mut total = 0.0f64;
    for ((name, b), grad) in inputs.batches().iter().zip(&trace.gradients) {
        let width = b.logits.dims().last().copied().unwrap_or(1).max(1);
        if let Some(i) = grad.iter().position(|g| !g.is_finite()) {
            return Outcome::fail(
                f64::NAN,
                format!("{name}: gradient entry {i} is not finite"),
            );
        }
        for (row, (chunk, &counts)) in grad.chunks(width).zip(&b.counts).enumerate() {
            let norm = chunk
                .iter()
                .map(|g| f64::from(*g).powi(2))
                .sum::<f64>()
                .sqrt();
            if !counts && norm != 0.0 {
                return Outcome::fail(
                    norm,
                    format!(
                        "{name}: logits row {row} does not count (ignored label or nothing to \
                         predict) but has a gradient of norm {norm:.3e}"
                    ),
                );
            }
            total += norm * norm;
        }
    }
    let total = total.sqrt();
    if total > 0.0 {
        Outcome::pass(
            total,
            "finite, non-zero on counted positions, zero on the others",
        )
    } else {
        Outcome::fail(0.0, "the loss has no gradient with respect to the logits")
    }
}

/// **native-wasm**: both builds compute the same losses and gradients.
pub fn compare(native: &LossTrace, wasm: &LossTrace) -> Outcome {
    let losses = fixture::max_abs_diff(&native.losses, &wasm.losses);
    let gradients = native
        .gradients
        .iter()
        .zip(&wasm.gradients)
        .map(|(a, b)| fixture::max_abs_diff(a, b))
        .fold(0.0, f64::max);
    let diff = losses.max(gradients);
    let message = format!("max |Δloss| {losses:.3e}, max |Δgradient| {gradients:.3e}");
    if diff <= TRANSPORT_TOLERANCE {
        Outcome::pass(diff, message)
    } else {
        Outcome::fail(diff, message)
    }
}
