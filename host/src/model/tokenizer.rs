//! A `tokenizers::Tokenizer` built from GGUF metadata, for GGUF files that ship no
//! `tokenizer.json`.
//!
//! Supported: byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`, used by SmolLM2,
//! Qwen2, Llama 3, ...). The tokenizer is the one Hugging Face uses for these models: a BPE over
//! `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, the pre-tokenizer
//! `Sequence[Digits(individual_digits), ByteLevel(add_prefix_space = false)]` and a ByteLevel
//! decoder; control tokens (`token_type` 3) become special added tokens and user-defined tokens
//! (`token_type` 4) plain added tokens, so both are matched before BPE runs.

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use super::gguf::GgufFile;
use super::load::SpecialTokens;
use crate::{Error, Result};

/// `token_type` of a control token (`<|im_start|>`, `<|endoftext|>`, ...).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// `token_type` of a user-defined token (matched verbatim, but not special).
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Everything a GGUF file says about turning text into ids and back.
#[derive(Debug, Clone)]
pub struct GgufTokenizer {
    /// The tokenizer (no padding, no truncation).
    pub tokenizer: Tokenizer,
    /// BOS/EOS/PAD ids and whether BOS is prepended (`tokenizer.ggml.add_bos_token`).
    pub special: SpecialTokens,
    /// The model's Jinja chat template (`tokenizer.chat_template`), when it ships one.
    pub chat_template: Option<String>,
}

/// Builds the tokenizer, special tokens and chat template of `gguf`.
///
/// Errors name the file and the missing or unsupported metadata key.
pub fn from_gguf(gguf: &GgufFile) -> Result<GgufTokenizer> {
    let kind = gguf.string("tokenizer.ggml.model")?;
    if kind != "gpt2" {
        return Err(Error::bad_file(
            gguf.path(),
            format!(
                "tokenizer.ggml.model is `{kind}`; only byte-level BPE (`gpt2`) tokenizers can be \
                 built from GGUF metadata. Use the model's Hugging Face directory (with tokenizer.json) instead"
            ),
        ));
    }
    let tokens = gguf.strings("tokenizer.ggml.tokens")?;
    let merges = gguf.strings("tokenizer.ggml.merges")?;
    let types = match gguf.metadata().contains_key("tokenizer.ggml.token_type") {
        true => gguf.ints("tokenizer.ggml.token_type")?,
        false => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(Error::bad_file(
            gguf.path(),
            format!(
                "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
                types.len(),
                tokens.len()
            ),
        ));
    }

    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.to_string(), id as u32))
        .collect();
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())).ok_or_else(|| {
                Error::bad_file(gguf.path(), format!("tokenizer.ggml.merges[{i}] = `{m}` is not two tokens separated by a space"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| {
            Error::bad_file(gguf.path(), format!("cannot build the BPE tokenizer: {e}"))
        })?;

    let mut tokenizer = Tokenizer::new(bpe);
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]);
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));

    let added = |wanted: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, ty)| **ty == wanted)
            .map(|(t, _)| AddedToken::from(t.to_string(), special))
            .collect()
    };
    let add_err = |e: tokenizers::Error| {
        Error::bad_file(gguf.path(), format!("cannot add the control tokens: {e}"))
    };
    tokenizer
        .add_special_tokens(added(TOKEN_TYPE_CONTROL, true))
        .map_err(add_err)?;
    tokenizer
        .add_tokens(added(TOKEN_TYPE_USER_DEFINED, false))
        .map_err(add_err)?;

    let optional_id = |key: &str| -> Result<Option<u32>> {
        match gguf.metadata().contains_key(key) {
            true => Ok(Some(gguf.uint(key)? as u32)),
            false => Ok(None),
        }
    };
    let bos = optional_id("tokenizer.ggml.bos_token_id")?;
    let eos = optional_id("tokenizer.ggml.eos_token_id")?;
    let pad = optional_id("tokenizer.ggml.padding_token_id")?
        .or(eos)
        .unwrap_or(0);
    let add_bos = match gguf.metadata().contains_key("tokenizer.ggml.add_bos_token") {
        true => gguf.boolean("tokenizer.ggml.add_bos_token")?,
        false => false,
    } && bos.is_some();
    let chat_template = match gguf.metadata().contains_key("tokenizer.chat_template") {
        true => Some(gguf.string("tokenizer.chat_template")?.to_string()),
        false => None,
    };
    Ok(GgufTokenizer {
        tokenizer,
        special: SpecialTokens {
            bos,
            eos,
            pad,
            add_bos,
        },
        chat_template,
    })
}
