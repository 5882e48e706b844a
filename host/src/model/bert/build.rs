//! The parts of a BERT encoder (embeddings, layers, LayerNorm) and how they are built from
//! Hugging Face checkpoint tensors or from a seeded random initialisation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

use super::config::BertConfig;
use crate::ops::{self, Linear};
use crate::params::{Param, ParamStore};
use crate::quant::{QuantError, QuantFormat, QuantizedMatrix};
use crate::{Error, Result};

/// A LayerNorm over shared weight and bias params.
#[derive(Debug, Clone)]
pub(super) struct LayerNorm {
    pub(super) weight: Arc<Param>,
    pub(super) bias: Arc<Param>,
    pub(super) eps: f64,
}

impl LayerNorm {
    pub(super) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::layer_norm(x, &self.weight.tensor(), &self.bias.tensor(), self.eps)
    }
}

/// One encoder layer.
#[derive(Debug, Clone)]
pub(super) struct Layer {
    pub(super) query: Linear,
    pub(super) key: Linear,
    pub(super) value: Linear,
    pub(super) attn_out: Linear,
    pub(super) attn_norm: LayerNorm,
    pub(super) intermediate: Linear,
    pub(super) output: Linear,
    pub(super) out_norm: LayerNorm,
}

/// The embedding tables.
#[derive(Debug, Clone)]
pub(super) struct Embeddings {
    pub(super) word: Arc<Param>,
    pub(super) position: Arc<Param>,
    pub(super) token_type: Arc<Param>,
    pub(super) norm: LayerNorm,
}

/// Where parameter values come from while the model is built.
pub(super) trait Source {
    /// The value of `name` with the given shape.
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;
}

/// Values from checkpoint tensors (prefixes already stripped).
pub(super) struct Checkpoint<'a> {
    pub(super) tensors: &'a mut HashMap<String, Tensor>,
    pub(super) dir: &'a Path,
}

impl Source for Checkpoint<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.remove(name).ok_or_else(|| {
            Error::bad_file(
                self.dir,
                format!("the checkpoint has no tensor `{name}` (is this a BERT model?)"),
            )
        })?;
        if t.dims() != shape {
            return Err(Error::bad_file(
                self.dir,
                format!(
                    "tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// Random values, initialised like Hugging Face (normal(0, std) weights and embeddings, unit
/// LayerNorm weights, zero biases).
pub(super) struct RandomInit<'a> {
    pub(super) rng: &'a mut StdRng,
    pub(super) std: f64,
    pub(super) device: &'a Device,
}

impl Source for RandomInit<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if name.ends_with(".bias") {
            return Ok(Tensor::zeros(shape, DType::F32, self.device)?);
        }
        if name.contains("LayerNorm") {
            return Ok(Tensor::ones(shape, DType::F32, self.device)?);
        }
        Ok(Tensor::from_vec(
            normal_vec(self.rng, n, self.std),
            shape,
            self.device,
        )?)
    }
}

/// `n` samples of normal(0, std) (Box–Muller; candle's CPU RNG cannot be seeded).
pub(super) fn normal_vec(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
            let u2: f64 = rng.random::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect()
}

/// Builds the parameter store and layers of an encoder from a value source.
pub(super) struct Builder<'a> {
    pub(super) store: ParamStore,
    pub(super) source: &'a mut dyn Source,
    /// Quantize the encoder's linear weights to this format as they are read (QLoRA).
    pub(super) quantize: Option<QuantFormat>,
}

impl Builder<'_> {
    fn param(&mut self, name: &str, shape: &[usize]) -> Result<Arc<Param>> {
        let value = self.source.tensor(name, shape)?;
        Ok(self.store.insert(name, value))
    }

    pub(super) fn linear(&mut self, module: &str, out: usize, inp: usize) -> Result<Linear> {
        let weight = self.param(&format!("{module}.weight"), &[out, inp])?;
        let bias = self.param(&format!("{module}.bias"), &[out])?;
        Ok(Linear::new(module, weight, Some(bias)))
    }

    /// A linear of the encoder: its weight quantized when the builder quantizes (a weight whose
    /// shape the format cannot block stays f32, with a warning), its bias f32.
    fn encoder_linear(&mut self, module: &str, out: usize, inp: usize) -> Result<Linear> {
        let Some(format) = self.quantize else {
            return self.linear(module, out, inp);
        };
        let name = format!("{module}.weight");
        let dense = self.source.tensor(&name, &[out, inp])?;
        let weight = match QuantizedMatrix::quantize(&dense, format) {
            Ok(matrix) => self.store.insert_quantized(&name, Arc::new(matrix)),
            Err(QuantError::Shape(why)) => {
                tracing::warn!(tensor = name.as_str(), "kept in f32: {why}");
                self.store.insert(&name, dense)
            }
            Err(e) => {
                return Err(Error::config(format!(
                    "cannot quantize `{name}` to {format}: {e}"
                )))
            }
        };
        let bias = self.param(&format!("{module}.bias"), &[out])?;
        Ok(Linear::new(module, weight, Some(bias)))
    }

    fn layer_norm(&mut self, module: &str, size: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.param(&format!("{module}.weight"), &[size])?,
            bias: self.param(&format!("{module}.bias"), &[size])?,
            eps,
        })
    }

    pub(super) fn encoder(&mut self, c: &BertConfig) -> Result<(Embeddings, Vec<Layer>)> {
        let h = c.hidden_size;
        let embeddings = Embeddings {
            word: self.param("embeddings.word_embeddings.weight", &[c.vocab_size, h])?,
            position: self.param(
                "embeddings.position_embeddings.weight",
                &[c.max_position_embeddings, h],
            )?,
            token_type: self.param(
                "embeddings.token_type_embeddings.weight",
                &[c.type_vocab_size.max(1), h],
            )?,
            norm: self.layer_norm("embeddings.LayerNorm", h, c.layer_norm_eps)?,
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            layers.push(Layer {
                query: self.encoder_linear(&format!("{p}.attention.self.query"), h, h)?,
                key: self.encoder_linear(&format!("{p}.attention.self.key"), h, h)?,
                value: self.encoder_linear(&format!("{p}.attention.self.value"), h, h)?,
                attn_out: self.encoder_linear(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: self.layer_norm(
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                    c.layer_norm_eps,
                )?,
                intermediate: self.encoder_linear(
                    &format!("{p}.intermediate.dense"),
                    c.intermediate_size,
                    h,
                )?,
                output: self.encoder_linear(
                    &format!("{p}.output.dense"),
                    h,
                    c.intermediate_size,
                )?,
                out_norm: self.layer_norm(&format!("{p}.output.LayerNorm"), h, c.layer_norm_eps)?,
            });
        }
        Ok((embeddings, layers))
    }
}

/// Checkpoint name → our name: strips `bert.` / `roberta.`; `None` for tensors the encoder does
/// not use (`pooler.*`, masked-LM heads, the `position_ids` buffer).
pub(super) fn canonical_name(name: &str) -> Option<String> {
    let name = name
        .strip_prefix("bert.")
        .or_else(|| name.strip_prefix("roberta."))
        .unwrap_or(name);
    let unused = name.starts_with("pooler.")
        || name.starts_with("cls.")
        || name.starts_with("lm_head.")
        || name.ends_with("position_ids");
    (!unused).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn checkpoint_prefixes_and_unused_tensors() {
        assert_eq!(
            canonical_name("bert.embeddings.word_embeddings.weight").as_deref(),
            Some("embeddings.word_embeddings.weight")
        );
        assert_eq!(
            canonical_name("roberta.encoder.layer.0.output.dense.bias").as_deref(),
            Some("encoder.layer.0.output.dense.bias")
        );
        assert_eq!(
            canonical_name("classifier.weight").as_deref(),
            Some("classifier.weight")
        );
        assert_eq!(canonical_name("bert.pooler.dense.weight"), None);
        assert_eq!(canonical_name("embeddings.position_ids"), None);
    }

    #[test]
    fn normal_init_has_the_requested_spread() {
        let v = normal_vec(&mut StdRng::seed_from_u64(0), 20000, 0.02);
        let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len() as f64;
        let var = v
            .iter()
            .map(|x| (f64::from(*x) - mean).powi(2))
            .sum::<f64>()
            / v.len() as f64;
        assert!(mean.abs() < 1e-3 && (var.sqrt() - 0.02).abs() < 1e-3);
    }
}
