//! Prompt tuning as a Whetstone plugin, with Hugging Face PEFT's configuration and layout.
//!
//! Lester, Al-Rfou and Constant 2021, "The Power of Scale for Parameter-Efficient Prompt
//! Tuning": the base model stays frozen and `num_virtual_tokens` trainable embeddings
//! `P` `[n, hidden]` are prepended to the input embeddings of every sequence,
//! `embeddings' = [P; embed(input_ids)]`, with attention mask ones for the virtual tokens. The
//! host gives the virtual tokens positions `0..n`, shifts the input after them, keeps them in
//! the KV cache while generating, and drops them from the model's output.
//!
//! `P` is saved as PEFT saves it, under the bare key `prompt_embeddings`, so adapters move both
//! ways between Whetstone and Python. It starts as PEFT's `prompt_tuning_init` says: `"RANDOM"`
//! (`nn.Embedding`'s N(0, 1)), `"TEXT"` (the base model's embeddings of the tokens of
//! `prompt_tuning_init_text`, cut or repeated to `n`; the host tokenizes the text into
//! `prompt_tuning_init_token_ids`) or `"SAMPLE_VOCAB"` (the embeddings of tokens drawn
//! uniformly from the vocabulary with the host's seeded generator, not torch's).
//!
//! For sequence classification the classification head trains whole, as PEFT adds it to
//! `modules_to_save`.

mod config;
mod init;

use whetstone_sdk::prelude::*;

pub use config::{PromptTuningConfig, PromptTuningInit};

/// The key PEFT saves the virtual token embeddings under.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// The prompt tuning method.
pub struct PromptTuning {
    cfg: PromptTuningConfig,
    /// Classification heads PEFT adds to `modules_to_save` for sequence classification.
    head_modules: Vec<String>,
}

impl PromptTuning {
    /// How `prompt_embeddings` starts on `model` (`rows` keeps a `FromTensor` source alive).
    fn initial_value(&self, model: &ModelInfo, rows: &mut Option<Tensor>) -> Result<Init> {
        let n = self.cfg.virtual_tokens();
        let ids = match self.cfg.prompt_tuning_init {
            // A loaded adapter's value comes from its file (PEFT skips the init too).
            _ if self.cfg.inference_mode => return Ok(Init::Zeros),
            PromptTuningInit::Random => {
                return Ok(Init::Normal {
                    mean: 0.0,
                    std: 1.0,
                })
            }
            PromptTuningInit::Text => {
                let ids = self
                    .cfg
                    .prompt_tuning_init_token_ids
                    .as_deref()
                    .unwrap_or(&[]);
                init::repeat_to(ids, n)
            }
            PromptTuningInit::SampleVocab => init::sample_vocab(n, model.vocab_size)?,
        };
        let t = init::embedding_rows(&ids, model)?;
        let init = Init::FromTensor(t.handle());
        *rows = Some(t);
        Ok(init)
    }
}

impl PeftMethod for PromptTuning {
    type Config = PromptTuningConfig;

    fn new(cfg: PromptTuningConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(PromptTuning {
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
        let mut rows = None;
        let init = self.initial_value(model, &mut rows)?;
        let shape = [self.cfg.virtual_tokens(), dim];
        whet_host::add_param("", PROMPT_EMBEDDINGS, &shape, init).map(drop)
    }

    fn forward_embeddings(
        &self,
        embeddings: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let prompts = whet_host::param("", PROMPT_EMBEDDINGS)?;
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
        return Err(Error::msg("prompt_embeddings is not a matrix"));
    };
    if dim != hidden {
        return Err(Error::msg(format!(
            "prompt_embeddings is [{n}, {dim}] but the input embeddings are {hidden} wide"
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

whetstone_sdk::register_method!(PromptTuning);
