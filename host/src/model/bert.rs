//! The BERT family encoder (BERT, all-MiniLM, RoBERTa-style naming) with a sequence
//! classification head over mean or `[CLS]` pooling.
//!
//! Parameter names are exactly Hugging Face's (`encoder.layer.3.attention.self.query.weight`);
//! checkpoint names with a `bert.` or `roberta.` prefix are accepted, `pooler.*` and masked-LM
//! heads are ignored. Every linear goes through [`ops::Linear`], so frozen weights never get a
//! gradient; dropout is active only in [`Mode::Train`] and draws from a seeded RNG.
//!
//! Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
//! Understanding", 2019; Reimers & Gurevych, "Sentence-BERT", 2019 (mean pooling).

mod build;
mod config;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::hf;
use super::hooks::ForwardContext;
use super::load::{LoadedModel, ModelSpec, Pooling, TaskSpec};
use super::prompt::{self, AttentionShape, Prompted};
use super::{Mode, Model, TaskKind};
use crate::ops::{self, Linear};
use crate::params::ParamStore;
use crate::quant::{QuantFormat, QuantizeSpec};
use crate::{Error, Result};
use build::{canonical_name, normal_vec, Builder, Checkpoint, Embeddings, Layer, RandomInit};
use config::Activation;

pub use config::BertConfig;

/// A BERT encoder with a sequence-classification head:
/// `logits = classifier(dropout(pool(encoder(ids))))`.
pub struct BertForSequenceClassification {
    config: BertConfig,
    activation: Activation,
    embeddings: Embeddings,
    layers: Vec<Layer>,
    classifier: Linear,
    pooling: Pooling,
    num_labels: usize,
    store: ParamStore,
    rng: Mutex<StdRng>,
    ctx: std::sync::Arc<ForwardContext>,
    checkpoint_prefix: String,
}

impl BertForSequenceClassification {
    /// A model with random weights (Hugging Face's initialisation, seeded), for tests.
    pub fn random(
        config: &BertConfig,
        num_labels: usize,
        pooling: Pooling,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        config.validate().map_err(Error::config)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut init = RandomInit {
            rng: &mut rng,
            std: config.initializer_range,
            device,
        };
        let mut builder = Builder {
            store: ParamStore::new(),
            source: &mut init,
            quantize: None,
        };
        let (embeddings, layers) = builder.encoder(config)?;
        let classifier = builder.linear("classifier", num_labels, config.hidden_size)?;
        let store = builder.store;
        Self::assemble(
            config.clone(),
            embeddings,
            layers,
            classifier,
            store,
            pooling,
            num_labels,
            rng,
        )
    }

    /// Builds the model from checkpoint tensors (names as in the file). The `classifier` head
    /// is loaded when the checkpoint has one of the right shape, otherwise initialised with
    /// normal(0, `initializer_range`) weights and zero bias from `seed`.
    pub fn from_tensors(
        config: &BertConfig,
        tensors: HashMap<String, Tensor>,
        dir: &Path,
        num_labels: usize,
        pooling: Pooling,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        Self::from_tensors_quantized(
            config, tensors, dir, num_labels, pooling, device, seed, None,
        )
    }

    /// [`BertForSequenceClassification::from_tensors`] with the encoder's linear weights
    /// quantized to `quantize` as they are read (QLoRA); embeddings, norms, biases and the
    /// head stay f32.
    #[allow(clippy::too_many_arguments)]
    pub fn from_tensors_quantized(
        config: &BertConfig,
        tensors: HashMap<String, Tensor>,
        dir: &Path,
        num_labels: usize,
        pooling: Pooling,
        device: &Device,
        seed: u64,
        quantize: Option<QuantFormat>,
    ) -> Result<Self> {
        config
            .validate()
            .map_err(|msg| Error::bad_file(dir.join("config.json"), msg))?;
        if num_labels == 0 {
            return Err(Error::config("num_labels must be at least 1"));
        }
        let checkpoint_prefix = ["bert.", "roberta."]
            .into_iter()
            .find(|p| tensors.keys().any(|k| k.starts_with(p)))
            .unwrap_or("")
            .to_string();
        let mut tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .filter_map(|(name, t)| canonical_name(&name).map(|n| (n, t)))
            .collect();
        let head_shape = [num_labels, config.hidden_size];
        let head = match (
            tensors.remove("classifier.weight"),
            tensors.remove("classifier.bias"),
        ) {
            (Some(w), Some(b)) if w.dims() == head_shape && b.dims() == [num_labels] => {
                Some((w, b))
            }
            _ => None,
        };
        let mut checkpoint = Checkpoint {
            tensors: &mut tensors,
            dir,
        };
        let mut builder = Builder {
            store: ParamStore::new(),
            source: &mut checkpoint,
            quantize,
        };
        let (embeddings, layers) = builder.encoder(config)?;
        let mut store = builder.store;
        let mut rng = StdRng::seed_from_u64(seed);
        let (w, b) = match head {
            Some((w, b)) => (
                w.to_dtype(DType::F32)?.to_device(device)?,
                b.to_dtype(DType::F32)?.to_device(device)?,
            ),
            None => (
                Tensor::from_vec(
                    normal_vec(
                        &mut rng,
                        num_labels * config.hidden_size,
                        config.initializer_range,
                    ),
                    &head_shape,
                    device,
                )?,
                Tensor::zeros(num_labels, DType::F32, device)?,
            ),
        };
        let classifier = Linear::new(
            "classifier",
            store.insert("classifier.weight", w),
            Some(store.insert("classifier.bias", b)),
        );
        let mut model = Self::assemble(
            config.clone(),
            embeddings,
            layers,
            classifier,
            store,
            pooling,
            num_labels,
            rng,
        )?;
        model.checkpoint_prefix = checkpoint_prefix;
        Ok(model)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: BertConfig,
        embeddings: Embeddings,
        layers: Vec<Layer>,
        classifier: Linear,
        store: ParamStore,
        pooling: Pooling,
        num_labels: usize,
        rng: StdRng,
    ) -> Result<Self> {
        let activation = Activation::parse(&config.hidden_act).map_err(Error::config)?;
        Ok(Self {
            config,
            activation,
            embeddings,
            layers,
            classifier,
            pooling,
            num_labels,
            store,
            rng: Mutex::new(rng),
            ctx: Default::default(),
            checkpoint_prefix: String::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The pooling of the classification head.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Dropout (a no-op outside training or for `p = 0`), drawing from the model's seeded RNG.
    fn dropout(&self, x: &Tensor, p: f32, mode: Mode) -> Result<Tensor> {
        if mode != Mode::Train || p <= 0.0 {
            return Ok(x.clone());
        }
        let mut rng = match self.rng.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        Ok(ops::dropout(x, p, &mut *rng)?)
    }

    /// Position ids `[batch, seq]`: `offset..offset + seq`, or RoBERTa's padding-aware
    /// numbering shifted by `offset` (the length of a method's attention prefix, which counts as
    /// cached positions, as in Hugging Face).
    fn position_ids(&self, attention_mask: &Tensor, offset: usize) -> Result<Tensor> {
        let (batch, seq) = attention_mask.dims2()?;
        let first = self.config.position_offset();
        if seq + offset + first > self.config.max_position_embeddings {
            return Err(Error::config(format!(
                "sequence of {} positions (with the method's virtual tokens and prefix) is longer \
                 than the model's {} positions; truncate the input",
                seq + offset,
                self.config.max_sequence_length()
            )));
        }
        let device = attention_mask.device();
        if !self.config.roberta_positions() {
            let ids: Vec<u32> = (offset as u32..(offset + seq) as u32).collect();
            return Ok(Tensor::from_vec(ids, (1, seq), device)?
                .broadcast_as((batch, seq))?
                .contiguous()?);
        }
        let pad = first as u32 - 1;
        let shift = offset as u32;
        let mask = attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let ids: Vec<u32> = mask
            .iter()
            .flat_map(|row| {
                let mut count = 0u32;
                row.iter()
                    .map(|&m| {
                        count += u32::from(m != 0);
                        if m != 0 {
                            count + shift + pad
                        } else {
                            pad
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(Tensor::from_vec(ids, (batch, seq), device)?)
    }

    /// Self-attention of layer `index` with the additive padding `bias` `[b, 1, s, prefix + s]`
    /// and a method's key/value prefix, if any.
    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        x: &Tensor,
        bias: &Tensor,
        mode: Mode,
        prompted: Option<&Prompted>,
    ) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let d = h / heads;
        let split = |t: Tensor| t.reshape((b, s, heads, d))?.transpose(1, 2)?.contiguous();
        let q = split(layer.query.forward(x)?)?;
        let k = split(layer.key.forward(x)?)?;
        let v = split(layer.value.forward(x)?)?;
        let (k, v) = match prompted {
            Some(p) => p.prepend(index, k, v)?,
            None => (k, v),
        };
        let scores = ops::matmul(&q, &k.t()?)?;
        let probs = ops::attention_softmax(&scores, 1.0 / (d as f64).sqrt(), Some(bias))?;
        let probs = self.dropout(&probs, self.config.attention_probs_dropout_prob, mode)?;
        let ctx = ops::matmul(&probs, &v)?
            .transpose(1, 2)?
            .reshape((b, s, h))?;
        Ok(ctx)
    }

    /// The last hidden states `[batch, seq, hidden]` for `input_ids` and `attention_mask`
    /// (`[batch, seq]`, u32, 1 = real token).
    pub fn encode(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        if attention_mask.dims() != [batch, seq] {
            return Err(Error::config(format!(
                "attention_mask has shape {:?}, input_ids {:?}",
                attention_mask.dims(),
                input_ids.dims()
            )));
        }
        let c = &self.config;
        let e = &self.embeddings;
        let words = ops::embedding(&e.word.tensor(), &input_ids.to_dtype(DType::U32)?)?;
        let prompted = match self.ctx.model_hook() {
            None => None,
            Some(hook) => {
                let info = self.model_info();
                let shape = AttentionShape {
                    layers: self.layers.len(),
                    kv_heads: info.num_key_value_heads,
                    head_dim: info.head_dim,
                };
                Some(prompt::apply(
                    hook.as_ref(),
                    words.clone(),
                    attention_mask,
                    shape,
                )?)
            }
        };
        let (words, mask, prefix) = match &prompted {
            Some(p) => (p.embeddings.clone(), p.mask.clone(), p.prefix_len()),
            None => (words, attention_mask.clone(), 0),
        };
        let len = words.dim(1)?;
        let token_mask = mask.narrow(1, prefix, len)?;
        let positions = ops::embedding(
            &e.position.tensor(),
            &self.position_ids(&token_mask, prefix)?,
        )?;
        let token_type = e.token_type.tensor().narrow(0, 0, 1)?; // single segment: type 0
        let x = words.add(&positions)?.broadcast_add(&token_type)?;
        let mut x = self.dropout(&e.norm.forward(&x)?, c.hidden_dropout_prob, mode)?;
        let bias = ops::attention_bias(&mask, len, false, x.dtype())?;
        for (index, layer) in self.layers.iter().enumerate() {
            let ctx = self.attention(layer, index, &x, &bias, mode, prompted.as_ref())?;
            let attn = self.dropout(&layer.attn_out.forward(&ctx)?, c.hidden_dropout_prob, mode)?;
            let h = layer.attn_norm.forward(&attn.add(&x)?)?;
            let ff = self.activation.apply(&layer.intermediate.forward(&h)?)?;
            let ff = self.dropout(&layer.output.forward(&ff)?, c.hidden_dropout_prob, mode)?;
            x = layer.out_norm.forward(&ff.add(&h)?)?;
        }
        match &prompted {
            Some(p) => p.strip_virtual(x),
            None => Ok(x),
        }
    }

    /// Pools hidden states `[b, s, h]` into `[b, h]` with the model's pooling.
    fn pool(&self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        Ok(match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let mask = attention_mask
                    .to_dtype(hidden.dtype())?
                    .unsqueeze(D::Minus1)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                let counts = mask.sum(1)?.clamp(1e-9, f64::INFINITY)?;
                summed.broadcast_div(&counts)?
            }
        })
    }

    /// The pooled sentence embedding `[batch, hidden]` (evaluation mode, not normalised).
    pub fn embed(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let hidden = self.encode(input_ids, attention_mask, Mode::Eval)?;
        self.pool(&hidden, attention_mask)
    }
}

impl super::SentenceEncoder for BertForSequenceClassification {
    fn embed(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        BertForSequenceClassification::embed(self, input_ids, attention_mask)
    }

    fn embedding_dim(&self) -> usize {
        self.config().hidden_size
    }
}

impl Model for BertForSequenceClassification {
    fn reseed(&self, seed: u64) {
        let mut rng = match self.rng.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *rng = StdRng::seed_from_u64(seed);
    }

    fn architecture(&self) -> &str {
        "BertForSequenceClassification"
    }

    fn as_encoder(&self) -> Option<&dyn super::SentenceEncoder> {
        Some(self)
    }

    fn task(&self) -> TaskKind {
        TaskKind::SequenceClassification {
            num_labels: self.num_labels,
        }
    }

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, mode: Mode) -> Result<Tensor> {
        self.ctx.set_mode(mode);
        let hidden = self.encode(input_ids, attention_mask, mode)?;
        let pooled = self.pool(&hidden, attention_mask)?;
        let pooled = self.dropout(&pooled, self.config.hidden_dropout_prob, mode)?;
        Ok(self.classifier.forward(&pooled)?)
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut all = Vec::with_capacity(self.layers.len() * 6 + 1);
        for l in &self.layers {
            all.extend([
                &l.query,
                &l.key,
                &l.value,
                &l.attn_out,
                &l.intermediate,
                &l.output,
            ]);
        }
        all.push(&self.classifier);
        all
    }

    fn forward_context(&self) -> std::sync::Arc<ForwardContext> {
        self.ctx.clone()
    }

    fn model_info(&self) -> whetstone_sdk::ModelInfo {
        let c = &self.config;
        whetstone_sdk::ModelInfo {
            architecture: self.architecture().to_string(),
            task: "sequence-classification".into(),
            hidden_size: c.hidden_size,
            num_layers: self.layers.len(),
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_attention_heads,
            head_dim: c.hidden_size / c.num_attention_heads.max(1),
            vocab_size: c.vocab_size,
        }
    }

    fn checkpoint_name(&self, name: &str) -> String {
        if name.starts_with("classifier") {
            name.to_string()
        } else {
            format!("{}{name}", self.checkpoint_prefix)
        }
    }
}

/// Loads a BERT-family Hugging Face directory (`config.json`, `model.safetensors`,
/// `tokenizer.json`) as a sequence classifier described by `spec`; `seed` initialises a new
/// classification head and seeds dropout.
pub fn load_hf_dir(
    dir: &Path,
    spec: &ModelSpec,
    device: &Device,
    seed: u64,
) -> Result<LoadedModel> {
    if spec.task != TaskSpec::Classification {
        return Err(Error::config(format!(
            "{} is a BERT-family encoder: set `task = \"classification\"` in the [model] section",
            dir.display()
        )));
    }
    let config_path = dir.join("config.json");
    let raw = hf::read_config(dir)?;
    let mut config = BertConfig::from_json(&raw, &config_path)?;
    if let Some(p) = spec.dropout {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::config(format!(
                "model.dropout = {p} must be in [0, 1)"
            )));
        }
        config.hidden_dropout_prob = p;
    }
    if spec.quantize == Some(QuantizeSpec::Keep) {
        return Err(QuantizeSpec::keep_refused(dir));
    }
    let tensors = hf::load_weights(dir, device)?;
    let model = BertForSequenceClassification::from_tensors_quantized(
        &config,
        tensors,
        dir,
        spec.num_labels,
        spec.pooling,
        device,
        seed,
        spec.quantize.and_then(QuantizeSpec::target),
    )?;
    let tokenizer = hf::load_tokenizer(dir)?;
    let mut special = hf::special_tokens_from_dir(dir, &tokenizer)?;
    if let Some(pad) = config.pad_token_id {
        special.pad = pad;
    }
    special.add_bos = false; // the tokenizer's post-processor adds [CLS] … [SEP]
    Ok(LoadedModel {
        max_positions: config.max_sequence_length(),
        model: Box::new(model),
        tokenizer,
        special,
        chat_template: hf::chat_template_from_dir(dir)?,
        source: dir.to_path_buf(),
    })
}
