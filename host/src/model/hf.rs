//! Reading a Hugging Face model directory: `config.json`, the weights (`model.safetensors` or a
//! sharded `model.safetensors.index.json` and its shards), `tokenizer.json`, the special tokens
//! (`tokenizer_config.json` / `special_tokens_map.json`) and the chat template.
//!
//! Every error names the file it is about and, where possible, what to do about it.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::load::SpecialTokens;
use crate::{Error, Result};

/// Name of the single-file weights.
const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the index of sharded weights.
const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// Reads and parses a JSON file, naming the file in every error.
fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
}

/// Parses `dir/config.json`.
///
/// A missing file is an error that says the directory is not a Hugging Face model directory.
pub fn read_config(dir: &Path) -> Result<Value> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(Error::bad_file(
            &path,
            "config.json not found: a Hugging Face model directory needs config.json, the weights \
             (model.safetensors) and tokenizer.json",
        ));
    }
    let value = read_json(&path)?;
    if !value.is_object() {
        return Err(Error::bad_file(
            &path,
            "config.json must hold a JSON object",
        ));
    }
    Ok(value)
}

/// The safetensors files of a model directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json` (in sorted order).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join(WEIGHTS_INDEX_FILE);
    if !index_path.is_file() {
        return Err(Error::bad_file(
            dir,
            format!("no weights found: expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in this directory"),
        ));
    }
    let index = read_json(&index_path)?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| {
            Error::bad_file(
                &index_path,
                "missing the `weight_map` object (tensor name → shard file)",
            )
        })?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::bad_file(
                &index_path,
                format!("weight_map entry `{tensor}` is not a file name"),
            )
        })?;
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        return Err(Error::bad_file(&index_path, "weight_map is empty"));
    }
    Ok(shards.into_iter().map(|f| dir.join(f)).collect())
}

/// Reads every tensor of one safetensors file onto `device`, converting bf16/f16 to f32.
pub fn load_safetensors_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the mapping is read-only and dropped before this function returns; the tensors
    // are copied out of it. A concurrent truncation of the file by another process could fault,
    // which is the documented caveat of every memory-mapped model loader.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let tensors = candle_core::safetensors::load_buffer(&mmap, device)
        .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file: {e}")))?;
    tensors
        .into_iter()
        .map(|(name, t)| {
            let t = match t.dtype() {
                DType::BF16 | DType::F16 => t.to_dtype(DType::F32).map_err(|e| {
                    Error::bad_file(path, format!("tensor `{name}`: cannot convert to f32: {e}"))
                })?,
                _ => t,
            };
            Ok((name, t))
        })
        .collect()
}

/// Loads all weights of a Hugging Face model directory (single file or sharded) onto `device`,
/// with bf16/f16 tensors converted to f32.
pub fn load_weights(dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for file in weight_files(dir)? {
        if !file.is_file() {
            return Err(Error::bad_file(
                &file,
                format!("shard listed in {WEIGHTS_INDEX_FILE} is missing"),
            ));
        }
        for (name, tensor) in load_safetensors_file(&file, device)? {
            if all.insert(name.clone(), tensor).is_some() {
                return Err(Error::bad_file(
                    &file,
                    format!("tensor `{name}` appears in more than one shard"),
                ));
            }
        }
    }
    Ok(all)
}

/// Loads `dir/tokenizer.json` with padding and truncation turned off (the host pads and
/// truncates itself; all-MiniLM's file has both baked in).
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::bad_file(
            &path,
            "tokenizer.json not found in the model directory",
        ));
    }
    let mut tokenizer = tokenizers::Tokenizer::from_file(&path)
        .map_err(|e| Error::bad_file(&path, format!("invalid tokenizer: {e}")))?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(None)
        .map_err(|e| Error::bad_file(&path, format!("cannot turn truncation off: {e}")))?;
    Ok(tokenizer)
}

/// The content of a token entry of `tokenizer_config.json` / `special_tokens_map.json`: either a
/// plain string or an `AddedToken` object with a `content` field.
fn token_content(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        Value::Object(map) => map.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// The special-token fields of `tokenizer_config.json` overlaid on `special_tokens_map.json`,
/// both optional.
fn special_token_fields(dir: &Path) -> Result<serde_json::Map<String, Value>> {
    let mut fields = serde_json::Map::new();
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if path.is_file() {
            if let Value::Object(map) = read_json(&path)? {
                fields.extend(map);
            }
        }
    }
    Ok(fields)
}

/// Whether encoding with special tokens already puts `bos` first (a `TemplateProcessing`
/// post-processor), in which case the host must not prepend it again.
fn tokenizer_adds(tokenizer: &tokenizers::Tokenizer, bos: u32) -> bool {
    tokenizer
        .encode("a", true)
        .map(|enc| enc.get_ids().first() == Some(&bos))
        .unwrap_or(false)
}

/// The special token ids of a model directory, from `tokenizer_config.json` and
/// `special_tokens_map.json` when present, resolved through `tokenizer`'s vocabulary.
///
/// `pad` falls back to `[PAD]`, then `<pad>`, then the EOS token, then 0. `add_bos` is true only
/// when `tokenizer_config.json` asks for a BOS (`add_bos_token`) and the tokenizer's own
/// post-processor does not already add it. BERT's `[CLS]`/`[SEP]` are added by its tokenizer's
/// post-processor and need no entry here.
pub fn special_tokens_from_dir(
    dir: &Path,
    tokenizer: &tokenizers::Tokenizer,
) -> Result<SpecialTokens> {
    let fields = special_token_fields(dir)?;
    let id_of = |key: &str| {
        fields
            .get(key)
            .and_then(token_content)
            .and_then(|token| tokenizer.token_to_id(token))
    };
    let bos = id_of("bos_token");
    let eos = id_of("eos_token");
    let pad = id_of("pad_token")
        .or_else(|| tokenizer.token_to_id("[PAD]"))
        .or_else(|| tokenizer.token_to_id("<pad>"))
        .or(eos)
        .unwrap_or(0);
    let wants_bos = fields
        .get("add_bos_token")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let add_bos = match bos {
        Some(bos) if wants_bos => !tokenizer_adds(tokenizer, bos),
        _ => false,
    };
    Ok(SpecialTokens {
        bos,
        eos,
        pad,
        add_bos,
    })
}

/// The Jinja chat template of `dir/tokenizer_config.json` (`chat_template`), when there is one.
///
/// A template given as a list of named templates yields the one named `default`.
pub fn chat_template_from_dir(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let config = read_json(&path)?;
    Ok(match config.get("chat_template") {
        Some(Value::String(template)) => Some(template.clone()),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_entries_may_be_strings_or_objects() {
        assert_eq!(token_content(&Value::String("<s>".into())), Some("<s>"));
        let obj = serde_json::json!({"content": "</s>", "lstrip": false});
        assert_eq!(token_content(&obj), Some("</s>"));
        assert_eq!(token_content(&Value::Null), None);
    }
}
