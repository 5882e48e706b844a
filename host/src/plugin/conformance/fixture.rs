//! What the conformance checks run on: a tiny random Llama with fixed seeds, a padded batch,
//! and small helpers (attaching, perturbing, reading logits, comparing).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::llama::{Llama, LlamaConfig};
use crate::model::{Mode, Model};
use crate::ops::IGNORE_INDEX;
use crate::plugin::method::MethodAdapter;
use crate::plugin::Plugin;
use crate::{Error, Result};

/// Seed of the tiny model's weights (every instance of a check uses the same base model).
pub const MODEL_SEED: u64 = 0x5eed;
/// Seed the plugin's parameters are initialised from.
pub const INIT_SEED: u64 = 17;
/// Seed of the perturbation that makes zero-initialised factors non-zero.
pub const PERTURB_SEED: u64 = 23;
/// Half-width of the uniform perturbation added to every plugin parameter.
pub const PERTURB_SCALE: f64 = 0.05;
/// Seed of the training-mode randomness (dropout) of step `i` is this plus `i`.
pub const TRAIN_SEED: u64 = 101;

/// Sequence length and batch size of the batch.
const SEQ: usize = 6;
const BATCH: usize = 2;
/// Padded positions at the end of the second row.
const PADDED: usize = 2;

/// The tiny Llama: 2 layers, grouped-query attention, q/k/v biases (as Qwen2), an untied head.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        vocab_size: 50,
        tie_word_embeddings: false,
        attention_bias: true,
    }
}

/// A fresh tiny model (always the same weights).
pub fn model() -> Result<Llama> {
    Llama::random(&tiny_config(), &Device::Cpu, MODEL_SEED)
}

/// A batch of two sequences, the second right-padded.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Token ids `[batch, seq]` (u32).
    pub ids: Tensor,
    /// `[batch, seq]` (u32): 1 for tokens, 0 for padding.
    pub mask: Tensor,
    /// Next-token labels `[batch, seq]` (i64), padding ignored.
    pub labels: Tensor,
}

impl Inputs {
    /// The fixed batch.
    pub fn new() -> Result<Inputs> {
        let vocab = tiny_config().vocab_size as u32;
        let ids: Vec<u32> = (0..BATCH * SEQ)
            .map(|i| (i as u32 * 7 + 3) % vocab)
            .collect();
        let mask: Vec<u32> = (0..BATCH * SEQ)
            .map(|i| u32::from(i < BATCH * SEQ - PADDED))
            .collect();
        let labels: Vec<i64> = ids
            .iter()
            .zip(&mask)
            .map(|(&id, &m)| if m == 1 { id as i64 } else { IGNORE_INDEX })
            .collect();
        let dev = Device::Cpu;
        Ok(Inputs {
            ids: Tensor::from_vec(ids, (BATCH, SEQ), &dev)?,
            mask: Tensor::from_vec(mask, (BATCH, SEQ), &dev)?,
            labels: Tensor::from_vec(labels, (BATCH, SEQ), &dev)?,
        })
    }

    /// The logits shape a causal LM must produce.
    pub fn logits_shape(&self) -> Vec<usize> {
        vec![BATCH, SEQ, tiny_config().vocab_size]
    }
}

/// A model with a method attached.
pub struct Subject {
    /// The model (its linears carry the adapter's hooks).
    pub model: Llama,
    /// The attached method.
    pub adapter: Arc<MethodAdapter>,
}

/// Attaches `plugin` (configured by `config`, initialised from `seed`) to a fresh tiny model.
pub fn attach(plugin: &Plugin, config: &serde_json::Value, seed: u64) -> Result<Subject> {
    let model = model()?;
    let adapter = MethodAdapter::attach(&model, plugin.clone(), "default", config.clone(), seed)?;
    Ok(Subject { model, adapter })
}

impl Subject {
    /// Logits of the batch in `mode` (hooks included).
    pub fn logits(&self, inputs: &Inputs, mode: Mode) -> Result<Tensor> {
        self.model.forward(&inputs.ids, &inputs.mask, mode)
    }

    /// The training loss of the batch (dropout reseeded with `seed`).
    pub fn loss(&self, inputs: &Inputs, seed: u64) -> Result<Tensor> {
        self.model.reseed(seed);
        self.model.forward_context().reseed(seed);
        let logits = self.logits(inputs, Mode::Train)?;
        self.model.loss(&logits, &inputs.labels)
    }

    /// Adds a small seeded uniform perturbation to every parameter the plugin created, so that
    /// zero-initialised factors (LoRA's B) neither block gradients nor make the merge trivial.
    pub fn perturb(&self) -> Result<()> {
        let mut rng = StdRng::seed_from_u64(PERTURB_SEED);
        for p in self.adapter.params() {
            let current = p.tensor();
            let noise: Vec<f32> = (0..current.elem_count())
                .map(|_| rng.random_range(-PERTURB_SCALE..PERTURB_SCALE) as f32)
                .collect();
            let noise = Tensor::from_vec(noise, current.dims(), current.device())?
                .to_dtype(current.dtype())?;
            p.set_value(&(current + noise)?.detach())?;
        }
        Ok(())
    }
}

/// The values of `t` as f32, flattened.
pub fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// The largest `|a - b|` (infinite when shapes differ or a value is not finite).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x as f64 - *y as f64).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}

/// The Euclidean norm of a tensor.
pub fn norm(t: &Tensor) -> Result<f64> {
    let v = t
        .to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(v.sqrt())
}

/// A scalar loss as f32.
pub fn scalar(t: &Tensor) -> Result<f32> {
    t.to_dtype(DType::F32)?
        .to_scalar::<f32>()
        .map_err(Error::from)
}
