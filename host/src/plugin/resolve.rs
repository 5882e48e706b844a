//! Configuration fields the host resolves before a method plugin sees its configuration.
//!
//! Plugins have no tokenizer, so a field holding text to tokenize is turned into token ids by
//! the host, with the model's tokenizer, as PEFT tokenizes it:
//!
//! | field (PEFT) | added field | used by |
//! | --- | --- | --- |
//! | `prompt_tuning_init_text` | `prompt_tuning_init_token_ids` (special tokens included, as PEFT's `tokenizer(text)["input_ids"]`) | prompt tuning with `prompt_tuning_init = "TEXT"` |
//!
//! A configuration that already holds the added field keeps it.

use serde_json::{Map, Value};

use crate::{Error, Result};

/// Text fields and the token-id fields the host adds for them.
pub const TOKENIZED_FIELDS: &[(&str, &str)] =
    &[("prompt_tuning_init_text", "prompt_tuning_init_token_ids")];

/// Adds the token ids of every text field of `config` that [`TOKENIZED_FIELDS`] lists.
pub fn tokenize_fields(
    config: &mut Map<String, Value>,
    tokenizer: &tokenizers::Tokenizer,
) -> Result<()> {
    for (text_field, ids_field) in TOKENIZED_FIELDS {
        if config.contains_key(*ids_field) {
            continue;
        }
        let Some(value) = config.get(*text_field) else {
            continue;
        };
        let text = match value {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            other => {
                return Err(Error::config(format!(
                    "method.{text_field} must be a string, not {other}"
                )))
            }
        };
        let encoding = tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| Error::Tokenizer(format!("method.{text_field}: {e}")))?;
        if encoding.get_ids().is_empty() {
            return Err(Error::config(format!(
                "method.{text_field} = {text:?} gives no tokens; give some text"
            )));
        }
        let ids: Vec<Value> = encoding
            .get_ids()
            .iter()
            .map(|&id| Value::from(id))
            .collect();
        config.insert((*ids_field).to_string(), Value::Array(ids));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::models::wordlevel::WordLevel;

    fn tokenizer() -> tokenizers::Tokenizer {
        let vocab = [
            ("hello".to_string(), 3u32),
            ("world".to_string(), 4),
            ("[UNK]".to_string(), 0),
        ]
        .into_iter()
        .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut t = tokenizers::Tokenizer::new(model);
        t.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
        t
    }

    #[test]
    fn init_text_becomes_token_ids_and_explicit_ids_win() {
        let mut config = serde_json::json!({"prompt_tuning_init_text": "hello world"})
            .as_object()
            .cloned()
            .unwrap_or_default();
        tokenize_fields(&mut config, &tokenizer()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config["prompt_tuning_init_token_ids"],
            serde_json::json!([3, 4])
        );

        let mut explicit = serde_json::json!({
            "prompt_tuning_init_text": "hello",
            "prompt_tuning_init_token_ids": [9]
        })
        .as_object()
        .cloned()
        .unwrap_or_default();
        tokenize_fields(&mut explicit, &tokenizer()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            explicit["prompt_tuning_init_token_ids"],
            serde_json::json!([9])
        );
    }

    #[test]
    fn wrong_types_and_empty_text_are_errors() {
        let mut config = serde_json::json!({"prompt_tuning_init_text": 5})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let err = tokenize_fields(&mut config, &tokenizer())
            .unwrap_err()
            .to_string();
        assert!(err.contains("prompt_tuning_init_text"), "{err}");
        let mut empty = serde_json::json!({"prompt_tuning_init_text": ""})
            .as_object()
            .cloned()
            .unwrap_or_default();
        let err = tokenize_fields(&mut empty, &tokenizer())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no tokens"), "{err}");
    }
}
