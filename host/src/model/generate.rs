//! Text generation for causal language models: a per-layer key/value cache, greedy or seeded
//! temperature / top-p sampling, stopping at EOS, and chat prompts rendered with the model's own
//! Jinja chat template (ChatML when it ships none; see [`crate::data::template`]).

use std::time::Instant;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::load::LoadedModel;
use crate::data::{ChatMessage, ChatTemplate};
use crate::{Error, Result};

/// Keys and values of the positions already processed, one entry per decoder layer, stored
/// before grouped-query heads are repeated (`[batch, kv_heads, seq, head_dim]`).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// Number of positions cached (0 when empty).
    pub fn seq_len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    /// Whether no position has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.seq_len() == 0
    }

    /// Appends the new `k`, `v` of `layer` along the sequence axis and returns the full keys and
    /// values (cached followed by new).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let num_layers = self.layers.len();
        let slot = self.layers.get_mut(layer).ok_or_else(|| {
            Error::config(format!(
                "KV cache has {num_layers} layers, layer {layer} was requested"
            ))
        })?;
        let full = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
            None => (k.clone(), v.clone()),
        };
        *slot = Some(full.clone());
        Ok(full)
    }

    /// Forgets every cached position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|slot| *slot = None);
    }
}

/// A model that can decode incrementally with a [`KvCache`].
pub trait CausalLm {
    /// Logits `[batch, new_len, vocab]` for the new tokens `input_ids` `[batch, new_len]`, which
    /// follow the positions already in `cache`; their keys and values are appended to it.
    fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor>;

    /// An empty cache sized for this model.
    fn new_cache(&self) -> KvCache;
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Maximum number of tokens to generate.
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy decoding.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`
    /// (1.0 keeps all). Ignored when greedy.
    pub top_p: f64,
    /// Seed of the sampler (same seed, same text).
    pub seed: u64,
    /// Wrap the prompt as a user turn of the model's chat template.
    pub chat: bool,
    /// System message for chat prompts.
    pub system: Option<String>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            chat: false,
            system: None,
        }
    }
}

/// The result of a generation.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated text (without the prompt).
    pub text: String,
    /// The generated token ids (without the prompt; a final EOS is not included).
    pub token_ids: Vec<u32>,
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens per second, prompt processing included.
    pub tokens_per_second: f64,
    /// Wall-clock seconds of the whole generation.
    pub seconds: f64,
}

/// Renders a single-turn chat prompt with the model's own chat template, or ChatML when it ships
/// none.
fn render_chat(loaded: &LoadedModel, system: Option<&str>, user: &str) -> Result<String> {
    let token_text = |id: Option<u32>| id.and_then(|id| loaded.tokenizer.id_to_token(id));
    let template = match &loaded.chat_template {
        Some(source) => ChatTemplate::from_jinja(
            source,
            token_text(loaded.special.bos).as_deref(),
            token_text(loaded.special.eos).as_deref(),
        )?,
        None => ChatTemplate::chatml(),
    };
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage::new("system", system));
    }
    messages.push(ChatMessage::new("user", user));
    template.render(&messages, true)
}

/// The prompt's token ids: the tokenizer's own special tokens, then BOS when the model wants one
/// and does not have it yet.
fn encode_prompt(loaded: &LoadedModel, text: &str) -> Result<Vec<u32>> {
    let encoding = loaded
        .tokenizer
        .encode(text, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut ids = encoding.get_ids().to_vec();
    if let Some(bos) = loaded.special.bos {
        // A chat template that writes `bos_token` itself plus a post-processor that adds it.
        if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
            ids.remove(0);
        }
        if loaded.special.add_bos && ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    Ok(ids)
}

/// Picks the next token from the last-position `logits`: argmax when `temperature` is 0,
/// otherwise a draw from the temperature-scaled distribution restricted to the top-p nucleus.
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut StdRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 {
                    (i, l)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= top_p {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut.max(1));
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut draw = rng.random::<f64>() * mass;
    for (id, p) in &probs {
        draw -= p;
        if draw <= 0.0 {
            return *id;
        }
    }
    probs.last().map(|p| p.0).unwrap_or_else(argmax)
}

/// Generates a continuation of `prompt` (or, with `opts.chat`, the assistant's answer to it),
/// calling `on_token` with each new piece of text as soon as it is complete UTF-8.
///
/// Stops after `max_new_tokens`, at the EOS token or any other special token (`<|endoftext|>`,
/// `<|im_start|>`), or at the model's context limit.
pub fn generate(
    loaded: &LoadedModel,
    prompt: &str,
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let lm = loaded.model.as_causal_lm().ok_or_else(|| {
        Error::config(format!(
            "{} ({}) is not a causal language model; generation needs one",
            loaded.source.display(),
            loaded.model.architecture()
        ))
    })?;
    let text = if opts.chat {
        render_chat(loaded, opts.system.as_deref(), prompt)?
    } else {
        prompt.to_string()
    };
    let prompt_ids = encode_prompt(loaded, &text)?;
    if prompt_ids.is_empty() {
        return Err(Error::config("the prompt is empty: nothing to continue"));
    }
    if prompt_ids.len() >= loaded.max_positions {
        return Err(Error::config(format!(
            "the prompt has {} tokens, the model supports at most {} positions",
            prompt_ids.len(),
            loaded.max_positions
        )));
    }
    let stop: Vec<u32> = loaded
        .tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| id)
        .chain(loaded.special.eos)
        .collect();

    let start = Instant::now();
    let device = loaded
        .model
        .params()
        .iter()
        .next()
        .map(|p| p.device())
        .unwrap_or(candle_core::Device::Cpu);
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut cache = lm.new_cache();
    let mut generated: Vec<u32> = Vec::new();
    let mut emitted = String::new();
    let mut input = prompt_ids.clone();
    while generated.len() < opts.max_new_tokens
        && prompt_ids.len() + generated.len() < loaded.max_positions
    {
        let ids = Tensor::new(input.as_slice(), &device)?.unsqueeze(0)?;
        let logits = lm.forward_cached(&ids, &mut cache)?;
        let last = logits
            .squeeze(0)?
            .get(input.len() - 1)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let next = sample(&last, opts.temperature, opts.top_p, &mut rng);
        if stop.contains(&next) {
            break;
        }
        generated.push(next);
        input = vec![next];
        let decoded = loaded
            .tokenizer
            .decode(&generated, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        // Wait while the last token ends inside a multi-byte character.
        if !decoded.ends_with('\u{FFFD}')
            && decoded.len() > emitted.len()
            && decoded.starts_with(&emitted)
        {
            on_token(&decoded[emitted.len()..]);
            emitted = decoded;
        }
    }
    let text = loaded
        .tokenizer
        .decode(&generated, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    if text.len() > emitted.len() && text.starts_with(&emitted) {
        on_token(&text[emitted.len()..]);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Generation {
        tokens_per_second: generated.len() as f64 / seconds.max(1e-9),
        text,
        token_ids: generated,
        prompt_tokens: prompt_ids.len(),
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_sampling_is_seeded() {
        let logits = [0.1f32, 2.0, -1.0, 1.9];
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(sample(&logits, 0.0, 1.0, &mut rng), 1);
        let draws = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..32)
                .map(|_| sample(&logits, 1.0, 1.0, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(7), draws(7));
        assert!(
            draws(7).iter().any(|&t| t != 1),
            "temperature 1 should not always pick the argmax"
        );
        // A tiny nucleus keeps only the most likely token.
        let mut rng = StdRng::seed_from_u64(3);
        assert!((0..32).all(|_| sample(&logits, 1.0, 0.01, &mut rng) == 1));
    }

    #[test]
    fn cache_appends_along_the_sequence() {
        let dev = candle_core::Device::Cpu;
        let mut cache = KvCache::new(2);
        let k = Tensor::zeros((1, 2, 3, 4), candle_core::DType::F32, &dev).unwrap();
        cache.append(0, &k, &k).unwrap();
        let (k2, _) = cache
            .append(0, &k.narrow(2, 0, 1).unwrap(), &k.narrow(2, 0, 1).unwrap())
            .unwrap();
        assert_eq!(k2.dims(), &[1, 2, 4, 4]);
        assert_eq!(cache.seq_len(), 4);
        assert!(cache.append(5, &k, &k).is_err());
        cache.clear();
        assert!(cache.is_empty());
    }
}
