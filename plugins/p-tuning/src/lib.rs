//! P-tuning as a Whetstone plugin, with Hugging Face PEFT's configuration and encoder.
//!
//! Liu, Zheng, Du, Ding, Qian, Yang and Tang 2021, "GPT Understands, Too": like prompt tuning,
//! `num_virtual_tokens` continuous prompts are prepended to the input embeddings of the frozen
//! model, `embeddings' = [P; embed(input_ids)]` (attention mask ones for them), but the prompts
//! are reparameterised by a prompt encoder, which the paper finds trains faster and more
//! stably. With PEFT's `"MLP"` encoder (`PromptEncoder`):
//!
//! `P = W₄ · relu(W₂ · relu(W₀ · E + b₀) + b₂) + b₄`
//!
//! for a trainable embedding `E` `[n, token_dim]`, `W₀` `[h, token_dim]`, `W₂` `[h, h]`, `W₄`
//! `[token_dim, h]`, `h = encoder_hidden_size` (default `token_dim`). The host gives the
//! virtual tokens positions `0..n`, keeps them in the KV cache while generating, and drops them
//! from the model's output.
//!
//! Parameters are model-level and named after PEFT's modules (without the adapter name):
//! `prompt_encoder.embedding.weight`, `prompt_encoder.mlp_head.{0,2,4}.{weight,bias}`. PEFT
//! itself saves the encoder's *output* as `prompt_embeddings` and reloads it without the
//! encoder; a Whetstone adapter keeps the encoder so training can resume.
//!
//! For sequence classification the classification head trains whole, as PEFT adds it to
//! `modules_to_save`.

mod config;
mod encoder;

use whetstone_sdk::prelude::*;

pub use config::{PromptEncoderConfig, Reparameterization};
pub use encoder::EMBEDDING;

/// The P-tuning method.
pub struct PTuning {
    cfg: PromptEncoderConfig,
    /// Classification heads PEFT adds to `modules_to_save` for sequence classification.
    head_modules: Vec<String>,
}

impl PeftMethod for PTuning {
    type Config = PromptEncoderConfig;

    fn new(cfg: PromptEncoderConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(PTuning {
            cfg,
            head_modules: Vec::new(),
        })
    }

    fn config_fields() -> Vec<ConfigField> {
        config::fields()
    }

    fn init_model(&mut self, model: &ModelInfo) -> Result<()> {
        let dim = self.cfg.token_dim_for(model)?;
        if model.task == "sequence-classification" {
            self.head_modules = vec!["classifier".into(), "score".into()];
        }
        encoder::create(self.cfg.virtual_tokens(), dim, self.cfg.hidden_size(dim))
    }

    fn forward_embeddings(
        &self,
        embeddings: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let prompts = encoder::forward()?;
        prepend(&prompts, embeddings, attention_mask).map(Some)
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

/// `[prompts; embeddings]` and `[1; mask]` for `prompts` `[n, hidden]`, `embeddings`
/// `[batch, seq, hidden]` and `mask` `[batch, seq]`: the same virtual tokens in front of every
/// row, in the embeddings' dtype.
fn prepend(prompts: &Tensor, embeddings: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let shape = embeddings.shape()?;
    let [batch, _, hidden] = shape[..] else {
        return Err(Error::msg(format!(
            "input embeddings have shape {shape:?}, expected [batch, seq, hidden]"
        )));
    };
    let [n, dim] = prompts.shape()?[..] else {
        return Err(Error::msg("the prompt encoder's output is not a matrix"));
    };
    if dim != hidden {
        return Err(Error::msg(format!(
            "the prompt encoder gives [{n}, {dim}] but the input embeddings are {hidden} wide"
        )));
    }
    let dtype = embeddings.dtype()?;
    let cast;
    let prompts = if prompts.dtype()? == dtype {
        prompts
    } else {
        cast = prompts.to_dtype(dtype)?;
        &cast
    };
    let prompts = prompts.unsqueeze(0)?.broadcast_as(&[batch, n, hidden])?;
    let ones = Tensor::ones(&[batch, n])?.to_dtype(mask.dtype()?)?;
    Ok((
        Tensor::cat(&[&prompts, embeddings], 1)?,
        Tensor::cat(&[&ones, mask], 1)?,
    ))
}

whetstone_sdk::register_method!(PTuning);
