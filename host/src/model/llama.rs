//! The Llama family of decoder-only transformers (Llama 2/3, SmolLM2, TinyLlama, Mistral,
//! Qwen2 with its q/k/v biases), written over the host's differentiable ops.
//!
//! Each decoder layer is `x + o_proj(attn(rope(q), rope(k), v))` then
//! `x + down_proj(silu(gate_proj(h)) * up_proj(h))`, both on RMS-normalised inputs
//! (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"). Rotary
//! embeddings use Hugging Face's rotate-half layout, grouped-query attention repeats the key/value
//! heads, and tied models compute the output head with the embedding matrix (one shared
//! [`Param`]). Parameters and modules carry their Hugging Face names.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use serde_json::Value;

use super::generate::{CausalLm, KvCache};
use super::hooks::ForwardContext;
use super::load::LoadedModel;
use super::prompt::{self, AttentionShape, Prompted};
use super::{gguf, hf, tokenizer, Mode, Model, TaskKind};
use crate::ops::{self, Linear, RotaryEmbedding};
use crate::params::{Param, ParamStore};
use crate::quant::{QuantError, QuantFormat, QuantizeSpec, QuantizedMatrix};
use crate::{Error, Result};

/// Rotary tables are precomputed up to this many positions (or the model's own limit when
/// smaller), which bounds their memory for long-context models.
const MAX_ROPE_POSITIONS: usize = 32_768;

/// Hyper-parameters of a Llama-family model, with Hugging Face `config.json` field names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LlamaConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Rotary base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest supported context.
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Whether the output head reuses the input embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have biases (Qwen2).
    #[serde(default)]
    pub attention_bias: bool,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_positions() -> usize {
    2048
}

impl LlamaConfig {
    /// Reads the fields of a Hugging Face `config.json` (`path` is named in errors). Rope
    /// scaling and other unsupported variants are refused with the field's name.
    pub fn from_hf_json(config: &Value, path: &Path) -> Result<Self> {
        for field in ["rope_scaling", "sliding_window_pattern"] {
            if config.get(field).is_some_and(|v| !v.is_null()) {
                return Err(Error::bad_file(
                    path,
                    format!("`{field}` is not supported by the host's Llama implementation"),
                ));
            }
        }
        if let Some(act) = config.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(Error::bad_file(
                    path,
                    format!("hidden_act `{act}` is not supported (Llama uses `silu`)"),
                ));
            }
        }
        if let (Some(head_dim), Some(hidden), Some(heads)) = (
            config.get("head_dim").and_then(Value::as_u64),
            config.get("hidden_size").and_then(Value::as_u64),
            config.get("num_attention_heads").and_then(Value::as_u64),
        ) {
            if heads == 0 || head_dim != hidden / heads {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "head_dim {head_dim} != hidden_size / num_attention_heads is not supported"
                    ),
                ));
            }
        }
        let mut config = config.clone();
        // transformers 5 writes the rotary settings as `rope_parameters`.
        if let Some(rope) = config
            .get("rope_parameters")
            .filter(|v| !v.is_null())
            .cloned()
        {
            let kind = rope.get("rope_type").and_then(Value::as_str);
            if kind.is_some_and(|k| k != "default") {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "`rope_parameters.rope_type` = {kind:?} is not supported by the host's \
                         Llama implementation (only `default`)"
                    ),
                ));
            }
            if let (Some(theta), Some(map)) = (rope.get("rope_theta"), config.as_object_mut()) {
                map.entry("rope_theta").or_insert(theta.clone());
            }
        }
        let mut parsed: Self = serde_json::from_value(config)
            .map_err(|e| Error::bad_file(path, format!("not a Llama config: {e}")))?;
        if parsed.num_key_value_heads == 0 {
            parsed.num_key_value_heads = parsed.num_attention_heads;
        }
        parsed
            .validate()
            .map_err(|message| Error::bad_file(path, message))?;
        Ok(parsed)
    }

    /// Checks that the head counts divide the widths; returns what is wrong otherwise.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if h == 0 || kv == 0 || !self.hidden_size.is_multiple_of(h) || !h.is_multiple_of(kv) {
            return Err(format!(
                "hidden_size {} / num_attention_heads {h} / num_key_value_heads {kv} do not divide evenly",
                self.hidden_size
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head dimension {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// The Hugging Face `config.json` of this configuration (f32 weights). A model with q/k/v
    /// biases is written as Qwen2, which has them without a flag (Llama's `attention_bias`
    /// would also give `o_proj` one).
    pub fn to_hf_json(&self) -> Value {
        let (architecture, model_type) = if self.attention_bias {
            ("Qwen2ForCausalLM", "qwen2")
        } else {
            ("LlamaForCausalLM", "llama")
        };
        serde_json::json!({
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        })
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: Arc<Param>,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: Arc<Param>,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// What every decoder layer of one forward shares: the head layout, the rotary table and
/// position offset, and the additive attention mask.
#[derive(Clone)]
struct Attention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    rotary: RotaryEmbedding,
    offset: usize,
    bias: Option<Tensor>,
}

impl DecoderLayer {
    /// The layer's output for `x` `[batch, len, hidden]`: attention (after the key/value
    /// `prefix`, and the cached positions of layer `cache.1` when generating) and the MLP, each
    /// on a residual branch.
    fn forward(
        &self,
        x: &Tensor,
        a: &Attention,
        prefix: Option<(&Prompted, usize)>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let (batch, len, _) = x.dims3()?;
        let h = ops::rms_norm(x, &self.input_layernorm.tensor(), a.eps)?;
        // Projections viewed per head, [batch, len, heads, head_dim]; rotated q and k come out
        // as [batch, heads, len, head_dim] (the fused kernel transposes as it rotates).
        let per_head = |t: Tensor, n: usize| t.reshape((batch, len, n, a.head_dim));
        let q = a
            .rotary
            .apply_to_heads(&per_head(self.q_proj.forward(&h)?, a.heads)?, a.offset)?;
        let k = a
            .rotary
            .apply_to_heads(&per_head(self.k_proj.forward(&h)?, a.kv_heads)?, a.offset)?;
        let v = per_head(self.v_proj.forward(&h)?, a.kv_heads)?
            .transpose(1, 2)?
            .contiguous()?;
        let (k, v) = match prefix {
            Some((prompted, i)) => prompted.prepend(i, k, v)?,
            None => (k, v),
        };
        let (k, v) = match cache {
            Some((cache, i)) => cache.append(i, &k, &v)?,
            None => (k, v),
        };
        // Grouped-query attention: the kv heads are shared by their groups of query heads
        // inside the product, never repeated.
        let attn = ops::scaled_dot_product_attention(&q, &k, &v, a.bias.as_ref())?;
        let attn = attn
            .transpose(1, 2)?
            .reshape((batch, len, a.heads * a.head_dim))?;
        let x = self.o_proj.forward_residual(x, &attn)?;
        let h = ops::rms_norm(&x, &self.post_attention_layernorm.tensor(), a.eps)?;
        let (gate, up) = (self.gate_proj.forward(&h)?, self.up_proj.forward(&h)?);
        Ok(self.down_proj.forward_swiglu_residual(&x, &gate, &up)?)
    }

    fn linears(&self) -> [&Linear; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    params: ParamStore,
    embed_tokens: Arc<Param>,
    layers: Vec<DecoderLayer>,
    norm: Arc<Param>,
    lm_head: Linear,
    rotary: RotaryEmbedding,
    max_positions: usize,
    ctx: Arc<ForwardContext>,
}

/// Takes the named tensors out of a weight map in the order the model's parameters are listed,
/// checking their shapes.
struct Builder {
    weights: HashMap<String, Tensor>,
    /// Linear weights already in quantized blocks (a GGUF file's own).
    quantized: HashMap<String, Arc<QuantizedMatrix>>,
    /// Quantize the decoder layers' dense linear weights to this format (QLoRA).
    quantize: Option<QuantFormat>,
    params: ParamStore,
    source: String,
}

impl Builder {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Arc<Param>> {
        let tensor = self.take_tensor(name, shape)?;
        Ok(self.params.insert(name, tensor))
    }

    /// The f32, contiguous tensor `name`, checked against `shape`.
    fn take_tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self.weights.remove(name).ok_or_else(|| {
            Error::config(format!(
                "{}: missing tensor `{name}` (expected shape {shape:?})",
                self.source
            ))
        })?;
        if tensor.dims() != shape {
            return Err(Error::config(format!(
                "{}: tensor `{name}` has shape {:?}, the config implies {shape:?}",
                self.source,
                tensor.dims()
            )));
        }
        let tensor = if tensor.dtype() == DType::F32 {
            tensor
        } else {
            tensor.to_dtype(DType::F32)?
        };
        Ok(tensor.contiguous()?)
    }

    /// The weight of a decoder layer's linear: kept blocks, quantized at load, or dense.
    fn linear_weight(&mut self, name: &str, out: usize, inp: usize) -> Result<Arc<Param>> {
        if let Some(matrix) = self.quantized.remove(name) {
            if matrix.dims() != (out, inp) {
                return Err(Error::config(format!(
                    "{}: tensor `{name}` has shape {:?}, the config implies [{out}, {inp}]",
                    self.source,
                    matrix.dims()
                )));
            }
            return Ok(self.params.insert_quantized(name, matrix));
        }
        let Some(format) = self.quantize else {
            return self.take(name, &[out, inp]);
        };
        let dense = self.take_tensor(name, &[out, inp])?;
        match QuantizedMatrix::quantize(&dense, format) {
            Ok(matrix) => Ok(self.params.insert_quantized(name, Arc::new(matrix))),
            Err(QuantError::Shape(why)) => {
                tracing::warn!(tensor = name, "kept in f32: {why}");
                Ok(self.params.insert(name, dense))
            }
            Err(e) => Err(Error::config(format!(
                "{}: cannot quantize `{name}` to {format}: {e}",
                self.source
            ))),
        }
    }

    fn linear(&mut self, module: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let weight = self.linear_weight(&format!("{module}.weight"), out, inp)?;
        let bias = if bias {
            Some(self.take(&format!("{module}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(module, weight, bias))
    }
}

impl Llama {
    /// Builds the model from tensors under their Hugging Face names (f32, on the target device).
    /// `source` names where they came from in errors. Every parameter starts frozen.
    pub fn from_weights(
        config: LlamaConfig,
        weights: HashMap<String, Tensor>,
        source: &str,
    ) -> Result<Self> {
        Self::from_parts(config, weights, HashMap::new(), None, source)
    }

    /// [`Llama::from_weights`] for a quantized base (QLoRA): the decoder layers' linear weights
    /// come from `quantized` (blocks kept from a GGUF file) or, when `quantize` names a format,
    /// are quantized from `weights` one at a time as the model is built. Weights whose shape the
    /// format cannot block stay in f32 (with a warning). Embeddings, norms and the output head
    /// stay f32.
    pub fn from_parts(
        config: LlamaConfig,
        weights: HashMap<String, Tensor>,
        quantized: HashMap<String, Arc<QuantizedMatrix>>,
        quantize: Option<QuantFormat>,
        source: &str,
    ) -> Result<Self> {
        config
            .validate()
            .map_err(|m| Error::config(format!("{source}: {m}")))?;
        let c = &config;
        let (hidden, head_dim) = (c.hidden_size, c.head_dim());
        let kv_width = c.num_key_value_heads * head_dim;
        let mut b = Builder {
            weights,
            quantized,
            quantize,
            params: ParamStore::new(),
            source: source.to_string(),
        };
        let device = match b.weights.get("model.embed_tokens.weight") {
            Some(t) => t.device().clone(),
            None => Device::Cpu,
        };
        let embed_tokens = b.take("model.embed_tokens.weight", &[c.vocab_size, hidden])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let input_layernorm = b.take(&format!("{p}.input_layernorm.weight"), &[hidden])?;
            let q_proj = b.linear(
                &format!("{p}.self_attn.q_proj"),
                hidden,
                hidden,
                c.attention_bias,
            )?;
            let k_proj = b.linear(
                &format!("{p}.self_attn.k_proj"),
                kv_width,
                hidden,
                c.attention_bias,
            )?;
            let v_proj = b.linear(
                &format!("{p}.self_attn.v_proj"),
                kv_width,
                hidden,
                c.attention_bias,
            )?;
            let o_proj = b.linear(&format!("{p}.self_attn.o_proj"), hidden, hidden, false)?;
            let post_attention_layernorm =
                b.take(&format!("{p}.post_attention_layernorm.weight"), &[hidden])?;
            let gate_proj = b.linear(
                &format!("{p}.mlp.gate_proj"),
                c.intermediate_size,
                hidden,
                false,
            )?;
            let up_proj = b.linear(
                &format!("{p}.mlp.up_proj"),
                c.intermediate_size,
                hidden,
                false,
            )?;
            let down_proj = b.linear(
                &format!("{p}.mlp.down_proj"),
                hidden,
                c.intermediate_size,
                false,
            )?;
            layers.push(DecoderLayer {
                input_layernorm,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                post_attention_layernorm,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let norm = b.take("model.norm.weight", &[hidden])?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints also store a copy; the tie is what the model computes with.
            b.weights.remove("lm_head.weight");
            Linear::new("lm_head", embed_tokens.clone(), None)
        } else {
            let weight = b.take("lm_head.weight", &[c.vocab_size, hidden])?;
            Linear::new("lm_head", weight, None)
        };
        let mut leftover: Vec<&String> = b
            .weights
            .keys()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .collect();
        if !leftover.is_empty() {
            leftover.sort();
            return Err(Error::config(format!(
                "{source}: tensors the Llama architecture does not use: {leftover:?} (unsupported variant?)"
            )));
        }
        let max_positions = c.max_position_embeddings.min(MAX_ROPE_POSITIONS);
        let rotary =
            RotaryEmbedding::new(head_dim, max_positions, c.rope_theta, DType::F32, &device)?;
        Ok(Self {
            config,
            params: b.params,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            max_positions,
            ctx: Arc::default(),
        })
    }

    /// A model with random weights (uniform, std 0.02; norms at 1), for fast tests. Deterministic
    /// in `seed`.
    pub fn random(config: &LlamaConfig, device: &Device, seed: u64) -> Result<Self> {
        let c = config;
        let (hidden, kv_width) = (c.hidden_size, c.num_key_value_heads * c.head_dim());
        let mut rng = StdRng::seed_from_u64(seed);
        let bound = 0.02 * 3f32.sqrt();
        let mut weights = HashMap::new();
        let mut random = |name: String, shape: &[usize]| -> Result<()> {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound)).collect();
            weights.insert(name, Tensor::from_vec(data, shape, device)?);
            Ok(())
        };
        random("model.embed_tokens.weight".into(), &[c.vocab_size, hidden])?;
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            for (m, out, inp) in [
                ("self_attn.q_proj", hidden, hidden),
                ("self_attn.k_proj", kv_width, hidden),
                ("self_attn.v_proj", kv_width, hidden),
                ("self_attn.o_proj", hidden, hidden),
                ("mlp.gate_proj", c.intermediate_size, hidden),
                ("mlp.up_proj", c.intermediate_size, hidden),
                ("mlp.down_proj", hidden, c.intermediate_size),
            ] {
                random(format!("{p}.{m}.weight"), &[out, inp])?;
                if c.attention_bias
                    && matches!(
                        m,
                        "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj"
                    )
                {
                    random(format!("{p}.{m}.bias"), &[out])?;
                }
            }
        }
        if !c.tie_word_embeddings {
            random("lm_head.weight".into(), &[c.vocab_size, hidden])?;
        }
        for i in 0..c.num_hidden_layers {
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                weights.insert(
                    format!("model.layers.{i}.{norm}.weight"),
                    Tensor::ones(hidden, DType::F32, device)?,
                );
            }
        }
        weights.insert(
            "model.norm.weight".into(),
            Tensor::ones(hidden, DType::F32, device)?,
        );
        Self::from_weights(config.clone(), weights, "random Llama")
    }

    /// Loads a Llama-family GGUF file: weights dequantized to f32 (q/k un-permuted to Hugging
    /// Face layout) and the tokenizer built from its metadata.
    pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel> {
        Self::load_gguf_quantized(path, device, None)
    }

    /// [`Llama::load_gguf`] with the decoder layers' linear weights quantized (`quantize`):
    /// `keep` holds them in the file's own ggml blocks, never dequantizing the whole model;
    /// `nf4` / `q8_0` requantize them one at a time.
    pub fn load_gguf_quantized(
        path: &Path,
        device: &Device,
        quantize: Option<QuantizeSpec>,
    ) -> Result<LoadedModel> {
        let mut file = gguf::GgufFile::open(path)?;
        let config = file.llama_config()?;
        let tok = tokenizer::from_gguf(&file)?;
        let keep = quantize == Some(QuantizeSpec::Keep);
        let (weights, kept) = file.load_hf_weights(&config, device, keep)?;
        let model = Self::from_parts(
            config,
            weights,
            kept,
            quantize.and_then(QuantizeSpec::target),
            &path.display().to_string(),
        )?;
        Ok(LoadedModel {
            max_positions: model.max_positions,
            model: Box::new(model),
            tokenizer: tok.tokenizer,
            special: tok.special,
            chat_template: tok.chat_template,
            source: path.to_path_buf(),
        })
    }

    /// Loads a Hugging Face Llama-family directory (`config.json`, safetensors, `tokenizer.json`).
    pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<LoadedModel> {
        Self::load_hf_dir_quantized(dir, device, None)
    }

    /// [`Llama::load_hf_dir`] with the decoder layers' linear weights quantized to `nf4` or
    /// `q8_0` as the model is built (`keep` is for GGUF files and is refused here).
    pub fn load_hf_dir_quantized(
        dir: &Path,
        device: &Device,
        quantize: Option<QuantizeSpec>,
    ) -> Result<LoadedModel> {
        if quantize == Some(QuantizeSpec::Keep) {
            return Err(QuantizeSpec::keep_refused(dir));
        }
        let config_json = hf::read_config(dir)?;
        let mut config = LlamaConfig::from_hf_json(&config_json, &dir.join("config.json"))?;
        let weights = hf::load_weights(dir, device)?;
        // Qwen2 has q/k/v biases without saying so in config.json.
        config.attention_bias |= weights.contains_key("model.layers.0.self_attn.q_proj.bias");
        let tokenizer = hf::load_tokenizer(dir)?;
        let special = hf::special_tokens_from_dir(dir, &tokenizer)?;
        let chat_template = hf::chat_template_from_dir(dir)?;
        let model = Self::from_parts(
            config,
            weights,
            HashMap::new(),
            quantize.and_then(QuantizeSpec::target),
            &dir.display().to_string(),
        )?;
        Ok(LoadedModel {
            max_positions: model.max_positions,
            model: Box::new(model),
            tokenizer,
            special,
            chat_template,
            source: dir.to_path_buf(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Number of positions the model can process (the rotary table's length).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The final hidden states (after the last norm) `[batch, seq, hidden]`, for `input_ids`
    /// `[batch, seq]` following `past` cached positions; `attention_mask` `[batch, past + seq]`
    /// (1 = real token) or `None` for all-real. A method's model hook (virtual tokens,
    /// attention prefixes) runs on the first call of a sequence (no cached positions); the
    /// cache then keeps what it added.
    fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq) = input_ids.dims2()?;
        let past = cache.as_ref().map(|k| k.seq_len()).unwrap_or(0);
        let (heads, kv_heads, head_dim) =
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let x = ops::embedding(&self.embed_tokens.tensor(), input_ids)?;
        let hook = if past == 0 {
            self.ctx.model_hook()
        } else {
            None
        };
        let prompted = match hook {
            None => None,
            Some(hook) => {
                let mask = match attention_mask {
                    Some(m) => m.clone(),
                    None => Tensor::ones((batch, seq), DType::U32, x.device())?,
                };
                let shape = AttentionShape {
                    layers: self.layers.len(),
                    kv_heads,
                    head_dim,
                };
                Some(prompt::apply(hook.as_ref(), x.clone(), &mask, shape)?)
            }
        };
        let (mut x, mask, offset) = match &prompted {
            Some(p) => (p.embeddings.clone(), Some(&p.mask), p.prefix_len()),
            None => (x, attention_mask, past),
        };
        let len = x.dim(1)?;
        if offset + len > self.max_positions {
            return Err(Error::config(format!(
                "{} positions (with the method's virtual tokens and prefix) exceed the model's \
                 limit of {}",
                offset + len,
                self.max_positions
            )));
        }
        let bias = match mask {
            Some(mask) => Some(ops::attention_bias(mask, len, true, x.dtype())?),
            None if len > 1 => {
                let ones = Tensor::ones((batch, past + len), DType::U32, x.device())?;
                Some(ops::attention_bias(&ones, len, true, x.dtype())?)
            }
            None => None,
        };
        let attention = Attention {
            heads,
            kv_heads,
            head_dim,
            eps: c.rms_norm_eps,
            rotary: self.rotary.clone(),
            offset,
            bias,
        };
        let checkpointing = cache.is_none() && self.ctx.checkpoints_blocks();
        for (i, layer) in self.layers.iter().enumerate() {
            // A layer's prefix is an input of its own: such layers keep their graph.
            let has_prefix = prompted
                .as_ref()
                .is_some_and(|p| p.prefixes.get(i).is_some());
            if checkpointing && !has_prefix {
                x = self.checkpointed_layer(layer, &attention, &x)?;
                continue;
            }
            let prefix = prompted.as_ref().map(|p| (p, i));
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            x = layer.forward(&x, &attention, prefix, layer_cache)?;
        }
        if let Some(p) = &prompted {
            x = p.strip_virtual(x)?;
        }
        Ok(ops::rms_norm(&x, &self.norm.tensor(), c.rms_norm_eps)?)
    }

    /// A decoder layer whose activations are recomputed in the backward pass instead of kept
    /// (`training.gradient_checkpointing`); the recompute replays the forward's mode and random
    /// draws (dropout in a method's hooks).
    fn checkpointed_layer(
        &self,
        layer: &DecoderLayer,
        a: &Attention,
        x: &Tensor,
    ) -> Result<Tensor> {
        let snapshot = self.ctx.rng_snapshot();
        let mode = self.ctx.mode();
        let (layer2, a2, ctx) = (layer.clone(), a.clone(), self.ctx.clone());
        let recompute: ops::Recompute = Box::new(move |x: &Tensor| {
            ctx.replay(&snapshot, mode, || layer2.forward(x, &a2, None, None))
        });
        ops::checkpoint(
            x,
            self.ctx.checkpoint_grads(),
            |x| layer.forward(x, a, None, None),
            recompute,
        )
    }

    /// Logits `[batch, seq, vocab]`: [`Llama::hidden_states`] through the output head.
    fn run(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let x = self.hidden_states(input_ids, attention_mask, cache)?;
        Ok(self.lm_head.forward(&x)?)
    }
}

impl Model for Llama {
    fn architecture(&self) -> &str {
        // As `LlamaConfig::to_hf_json` writes it: q/k/v biases are Qwen2's.
        if self.config.attention_bias {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        }
    }

    fn task(&self) -> TaskKind {
        TaskKind::CausalLm
    }

    fn params(&self) -> &ParamStore {
        &self.params
    }

    fn supports_checkpointing(&self) -> bool {
        true
    }

    fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, mode: Mode) -> Result<Tensor> {
        // Llama itself has no dropout; the mode matters to PEFT hooks (LoRA dropout).
        self.ctx.set_mode(mode);
        self.run(input_ids, Some(attention_mask), None)
    }

    /// The next-token loss from the final hidden states, chunk by chunk, over the positions
    /// whose label counts; `None` (the logits path) when a hook or bias sits on the output head.
    fn forward_loss(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        labels: &Tensor,
        mode: Mode,
    ) -> Result<Option<Tensor>> {
        let (_, seq) = input_ids.dims2()?;
        if seq < 2 || self.lm_head.has_hook() || self.lm_head.bias().is_some() {
            return Ok(None);
        }
        self.ctx.set_mode(mode);
        let hidden = self.hidden_states(input_ids, Some(attention_mask), None)?;
        let (batch, seq, width) = hidden.dims3()?;
        // Position t predicts the label at t + 1.
        let hidden = hidden
            .narrow(1, 0, seq - 1)?
            .contiguous()?
            .reshape((batch * (seq - 1), width))?;
        let targets = labels.narrow(1, 1, seq - 1)?.contiguous()?.flatten_all()?;
        let weight = self.lm_head.weight();
        Ok(Some(ops::linear_cross_entropy(
            &hidden,
            &weight.tensor(),
            &targets,
            weight.is_trainable(),
        )?))
    }

    /// The linear modules of every decoder layer (as PEFT's `all-linear`, the output head is
    /// left out).
    fn linears(&self) -> Vec<&Linear> {
        self.layers.iter().flat_map(|l| l.linears()).collect()
    }

    fn forward_context(&self) -> Arc<ForwardContext> {
        self.ctx.clone()
    }

    fn model_info(&self) -> whetstone_sdk::ModelInfo {
        let c = &self.config;
        whetstone_sdk::ModelInfo {
            architecture: self.architecture().to_string(),
            task: "causal-lm".into(),
            hidden_size: c.hidden_size,
            num_layers: self.layers.len(),
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            vocab_size: c.vocab_size,
        }
    }

    fn hf_config(&self) -> Option<Value> {
        Some(self.config.to_hf_json())
    }

    fn as_causal_lm(&self) -> Option<&dyn CausalLm> {
        Some(self)
    }
}

impl CausalLm for Llama {
    fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let needed = cache.seq_len() + input_ids.dim(1)?;
        if needed > self.max_positions {
            return Err(Error::config(format!(
                "{needed} positions exceed the model's limit of {}",
                self.max_positions
            )));
        }
        self.ctx.set_mode(Mode::Eval);
        self.run(input_ids, None, Some(cache))
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }
}
