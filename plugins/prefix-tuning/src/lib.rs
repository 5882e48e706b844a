//! Prefix tuning as a Whetstone plugin, with Hugging Face PEFT's configuration and layout.
//!
//! Li and Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation": the base
//! model stays frozen and every attention layer `i` attends, before the sequence's own keys and
//! values, to `num_virtual_tokens` trainable ones, `K'ᵢ = [Pᵏᵢ; Kᵢ]`, `V'ᵢ = [Pᵛᵢ; Vᵢ]`. As in
//! PEFT (and Hugging Face's `past_key_values`), the prefix counts as cached positions: the
//! input's positions start after it, it is not rotated, every query attends to all of it, and
//! the KV cache keeps it while generating.
//!
//! Without `prefix_projection` (PEFT's default) the prefix is one matrix `P`
//! `[n, num_layers · 2 · token_dim]`, saved as PEFT saves it under `prompt_embeddings`, and laid
//! out as PEFT's `get_prompt` reads it (see [`layout`]); `token_dim` is
//! `num_key_value_heads · head_dim`, PEFT's grouped-query rule. With `prefix_projection` it is
//! reparameterised, `P = W₂ · tanh(W₀ · E + b₀) + b₂` with `E` `[n, token_dim]`, `W₀`
//! `[h, token_dim]`, `W₂` `[num_layers · 2 · token_dim, h]`, `h = encoder_hidden_size`
//! (default `token_dim`), parameters named after PEFT's modules:
//! `prompt_encoder.embedding.weight`, `prompt_encoder.transform.{0,2}.{weight,bias}` (PEFT
//! itself saves the projected `P` as `prompt_embeddings` and reloads it without the
//! projection; a Whetstone adapter keeps the projection so training can resume).
//!
//! For sequence classification the classification head trains whole, as PEFT adds it to
//! `modules_to_save`.

mod config;
mod encoder;
pub mod layout;

use whetstone_sdk::prelude::*;

pub use config::{InitWeights, PrefixTuningConfig};
pub use encoder::{EMBEDDING, PROMPT_EMBEDDINGS};

use encoder::PrefixEncoder;

/// The prefix tuning method.
pub struct PrefixTuning {
    cfg: PrefixTuningConfig,
    /// The prefix's parameters, once the model is known.
    encoder: Option<PrefixEncoder>,
    /// Classification heads PEFT adds to `modules_to_save` for sequence classification.
    head_modules: Vec<String>,
}

impl PeftMethod for PrefixTuning {
    type Config = PrefixTuningConfig;

    fn new(cfg: PrefixTuningConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(PrefixTuning {
            cfg,
            encoder: None,
            head_modules: Vec::new(),
        })
    }

    fn config_fields() -> Vec<ConfigField> {
        config::fields()
    }

    fn init_model(&mut self, model: &ModelInfo) -> Result<()> {
        let layout = self.cfg.layout_for(model)?;
        if model.task == "sequence-classification" {
            self.head_modules = vec!["classifier".into(), "score".into()];
        }
        let encoder = PrefixEncoder {
            layout,
            projection: self.cfg.prefix_projection,
        };
        let hidden = self.cfg.hidden_size(layout.token_dim());
        encoder.create(self.cfg.virtual_tokens(), hidden, self.cfg.init_weights)?;
        self.encoder = Some(encoder);
        Ok(())
    }

    fn attention_prefix(&self, layer: usize, batch: usize) -> Result<Option<(Tensor, Tensor)>> {
        let encoder = self
            .encoder
            .ok_or_else(|| Error::msg("attention prefix asked for before the model was known"))?;
        encoder.layer(layer, batch).map(Some)
    }

    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>> {
        Ok(names
            .iter()
            .filter(|n| {
                let module = n.rsplit_once('.').map(|(m, _)| m).unwrap_or(n);
                self.cfg
                    .modules_to_save
                    .iter()
                    .flatten()
                    .chain(self.head_modules.iter())
                    .any(|m| module == m || module.ends_with(&format!(".{m}")))
            })
            .cloned()
            .collect())
    }
}

whetstone_sdk::register_method!(PrefixTuning);
