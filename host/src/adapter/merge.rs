//! Merging an adapter into its base model (PEFT's `merge_and_unload`) and writing the result as
//! a Hugging Face model directory that needs no plugin to run.
//!
//! [`merge`] adds each wrapped module's `ΔW` (from the method's `delta_weight`) to the base
//! weight and removes the hooks; the base parameters a method trains (`modules_to_save`, biases)
//! already hold the adapter's values. [`write_merged`] writes every parameter under its
//! checkpoint name to `model.safetensors` beside a `config.json` and the tokenizer files: copied
//! from the source directory for a Hugging Face model (tensors of the source the host does not
//! use, such as BERT's pooler, are carried over unchanged), or built from the model's own
//! configuration and tokenizer for a GGUF model (`tokenizer.json` and `tokenizer_config.json`
//! with the special tokens and chat template).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Map, Value};

use crate::model::load::LoadedModel;
use crate::model::{Model, TaskKind};
use crate::plugin::method::MethodAdapter;
use crate::{Error, Result};

/// The weights file of a merged model.
pub const MERGED_WEIGHTS_FILE: &str = "model.safetensors";

/// Tokenizer and generation files copied from a Hugging Face source directory when present.
const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
];

/// Folds `adapter` into `model`: every wrapped module's weight becomes `W + ΔW`, the hooks are
/// removed and the adapter's trained base parameters are frozen with their adapter values.
///
/// Every `ΔW` is computed before any weight changes, so a method that cannot be merged leaves
/// the model as it was.
pub fn merge(model: &dyn Model, adapter: &MethodAdapter) -> Result<()> {
    let linears = model.linears();
    let mut updates = Vec::with_capacity(adapter.wrapped_modules().len());
    for module in adapter.wrapped_modules() {
        let linear = linears
            .iter()
            .find(|l| l.name == *module)
            .ok_or_else(|| Error::config(format!("the model has no module `{module}`")))?;
        let delta = adapter.delta_weight(module)?.ok_or_else(|| {
            Error::plugin(
                adapter.plugin.id(),
                "delta-weight",
                format!("gives no ΔW for `{module}`: this method cannot be merged"),
            )
        })?;
        let weight = linear.weight();
        let base = weight.tensor();
        let delta = delta
            .detach()
            .to_dtype(base.dtype())?
            .to_device(base.device())?;
        if delta.dims() != base.dims() {
            return Err(Error::plugin(
                adapter.plugin.id(),
                "delta-weight",
                format!(
                    "ΔW of `{module}` has shape {:?}, the weight {:?}",
                    delta.dims(),
                    base.dims()
                ),
            ));
        }
        updates.push((weight.clone(), (base.detach() + delta)?));
    }
    for (weight, merged) in updates {
        weight.set_value(&merged)?;
    }
    MethodAdapter::deactivate(model);
    for p in adapter.base_params() {
        p.set_trainable(false)?;
    }
    tracing::info!(
        adapter = adapter.name.as_str(),
        modules = adapter.wrapped_modules().len(),
        "adapter merged into the base weights"
    );
    Ok(())
}

/// The Hugging Face directory `loaded` came from, if it came from one.
fn source_dir(loaded: &LoadedModel) -> Option<&Path> {
    let s = loaded.source.as_path();
    (s.is_dir() && s.join("config.json").is_file()).then_some(s)
}

/// Tensors of the source checkpoint the model does not hold (BERT's pooler, MLM heads), except
/// a tied model's stored copy of the output head.
fn unused_source_tensors(
    dir: &Path,
    written: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let files = crate::model::hf::weight_files(dir)?;
    // SAFETY: read-only mappings, dropped before this function returns; the tensors are copied
    // out of them (the same caveat as every memory-mapped model loader).
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| Error::bad_file(dir, format!("cannot map the source weights: {e}")))?;
    let mut out = Vec::new();
    for (name, _) in st.tensors() {
        if written.contains_key(&name) || name == "lm_head.weight" {
            continue;
        }
        let t = st.load(&name, &Device::Cpu)?;
        out.push((name, t));
    }
    Ok(out)
}

/// The source's `config.json`, told the head's architecture and number of labels.
fn patched_config(dir: &Path, model: &dyn Model) -> Result<Value> {
    let mut config = crate::model::hf::read_config(dir)?;
    if let (TaskKind::SequenceClassification { num_labels }, Some(map)) =
        (model.task(), config.as_object_mut())
    {
        map.insert("architectures".into(), json!([model.architecture()]));
        let labels = map.get("id2label").and_then(Value::as_object).map(Map::len);
        if labels != Some(num_labels) {
            let id2label: Map<String, Value> = (0..num_labels)
                .map(|i| (i.to_string(), Value::from(format!("LABEL_{i}"))))
                .collect();
            let label2id: Map<String, Value> = (0..num_labels)
                .map(|i| (format!("LABEL_{i}"), Value::from(i)))
                .collect();
            map.insert("id2label".into(), Value::Object(id2label));
            map.insert("label2id".into(), Value::Object(label2id));
        }
    }
    Ok(config)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::config(format!("cannot serialise {}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// `config.json`, `tokenizer.json` and `tokenizer_config.json` of a model without a source
/// directory (GGUF), from its own configuration and tokenizer.
fn write_generated_files(loaded: &LoadedModel, dir: &Path) -> Result<()> {
    let model = loaded.model.as_ref();
    let mut config = model.hf_config().ok_or_else(|| {
        Error::config(format!(
            "cannot write config.json for a {} model loaded from {}: load it from a Hugging Face \
             directory instead",
            model.architecture(),
            loaded.source.display()
        ))
    })?;
    let special = loaded.special;
    let token = |id: Option<u32>| id.and_then(|i| loaded.tokenizer.id_to_token(i));
    if let Some(map) = config.as_object_mut() {
        map.insert("bos_token_id".into(), json!(special.bos));
        map.insert("eos_token_id".into(), json!(special.eos));
        map.insert("pad_token_id".into(), json!(special.pad));
    }
    write_json(&dir.join("config.json"), &config)?;
    let tok_path = dir.join("tokenizer.json");
    loaded
        .tokenizer
        .save(&tok_path, false)
        .map_err(|e| Error::bad_file(&tok_path, format!("cannot write the tokenizer: {e}")))?;
    let mut tok_config = Map::new();
    tok_config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    tok_config.insert("add_bos_token".into(), json!(special.add_bos));
    for (key, id) in [
        ("bos_token", special.bos),
        ("eos_token", special.eos),
        ("pad_token", Some(special.pad)),
    ] {
        if let Some(t) = token(id) {
            tok_config.insert(key.into(), json!(t));
        }
    }
    if let Some(t) = &loaded.chat_template {
        tok_config.insert("chat_template".into(), json!(t));
    }
    write_json(
        &dir.join("tokenizer_config.json"),
        &Value::Object(tok_config),
    )
}

/// Writes `loaded`'s model (typically after [`merge`]) as a Hugging Face model directory at
/// `dir`: `model.safetensors` (f32, checkpoint names), `config.json` and the tokenizer files.
/// Refuses a model that still has an adapter's hooks, and writing over the source directory.
pub fn write_merged(loaded: &LoadedModel, dir: &Path) -> Result<PathBuf> {
    let model = loaded.model.as_ref();
    if let Some(l) = model.linears().iter().find(|l| l.has_hook()) {
        return Err(Error::config(format!(
            "`{}` still has an adapter attached: merge it first (adapter::merge)",
            l.name
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let source = source_dir(loaded);
    if let Some(src) = source {
        let same = std::fs::canonicalize(src).ok() == std::fs::canonicalize(dir).ok();
        if same {
            return Err(Error::config(format!(
                "{} is the source model's directory: write the merged model elsewhere",
                dir.display()
            )));
        }
    }
    let mut tensors = HashMap::new();
    for p in model.params().iter() {
        let t = p.tensor().detach().to_device(&Device::Cpu)?.contiguous()?;
        tensors.insert(model.checkpoint_name(p.name()), t);
    }
    if let Some(src) = source {
        for (name, t) in unused_source_tensors(src, &tensors)? {
            tensors.insert(name, t);
        }
    }
    let weights = dir.join(MERGED_WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights)?;
    match source {
        Some(src) => {
            write_json(&dir.join("config.json"), &patched_config(src, model)?)?;
            for name in COPIED_FILES {
                let from = src.join(name);
                if from.is_file() {
                    let to = dir.join(name);
                    std::fs::copy(&from, &to).map_err(|e| Error::io(&to, e))?;
                }
            }
        }
        None => write_generated_files(loaded, dir)?,
    }
    tracing::info!(dir = %dir.display(), tensors = tensors.len(), "merged model written");
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::hooks::LinearHook;
    use crate::model::llama::{Llama, LlamaConfig};
    use crate::model::load::{self, ModelSpec, SpecialTokens, TaskSpec};
    use crate::model::Mode;

    fn word_tokenizer(n: u32) -> tokenizers::Tokenizer {
        let vocab = (0..n).map(|i| (format!("w{i}"), i)).collect();
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab(vocab)
            .unk_token("w0".into())
            .build()
            .unwrap();
        let mut t = tokenizers::Tokenizer::new(model);
        t.with_pre_tokenizer(Some(
            tokenizers::pre_tokenizers::whitespace::WhitespaceSplit,
        ));
        t
    }

    /// A random Llama posing as a GGUF model (no source directory).
    fn gguf_like(tied: bool, bias: bool) -> LoadedModel {
        let config = LlamaConfig {
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 500.0,
            max_position_embeddings: 32,
            vocab_size: 24,
            tie_word_embeddings: tied,
            attention_bias: bias,
        };
        LoadedModel {
            model: Box::new(Llama::random(&config, &Device::Cpu, 3).unwrap()),
            tokenizer: word_tokenizer(24),
            special: SpecialTokens {
                bos: Some(1),
                eos: Some(2),
                pad: 0,
                add_bos: true,
            },
            chat_template: Some("{{ messages }}".into()),
            max_positions: 32,
            source: PathBuf::from("random.gguf"),
        }
    }

    fn logits(model: &dyn Model) -> Tensor {
        let ids = Tensor::new(&[[1u32, 5, 9, 23, 4, 2]], &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, 6), candle_core::DType::U32, &Device::Cpu).unwrap();
        model.forward(&ids, &mask, Mode::Eval).unwrap()
    }

    #[test]
    fn a_model_without_source_directory_is_written_from_its_own_config() {
        for (tied, bias) in [(true, false), (false, true)] {
            let loaded = gguf_like(tied, bias);
            let dir = tempfile::tempdir().unwrap();
            write_merged(&loaded, dir.path()).unwrap();
            let spec = ModelSpec::new(dir.path().to_string_lossy(), TaskSpec::CausalLm);
            let back = load::load(&spec, &Device::Cpu, 0).unwrap();
            let d = (logits(back.model.as_ref()) - logits(loaded.model.as_ref()))
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "tied {tied}, bias {bias}");
            assert_eq!(back.special, loaded.special);
            assert_eq!(back.chat_template, loaded.chat_template);
            let config = crate::model::hf::read_config(dir.path()).unwrap();
            let expected_type = if bias { "qwen2" } else { "llama" };
            assert_eq!(config["model_type"], expected_type);
        }
    }

    #[derive(Debug)]
    struct Identity;

    impl LinearHook for Identity {
        fn forward(&self, _x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
            Ok(base_out.clone())
        }
    }

    #[test]
    fn a_model_with_hooks_is_not_written() {
        let loaded = gguf_like(true, false);
        loaded.model.linears()[0].set_hook(Some(Arc::new(Identity)));
        let dir = tempfile::tempdir().unwrap();
        let err = write_merged(&loaded, dir.path()).unwrap_err().to_string();
        assert!(err.contains("merge it first"), "{err}");
    }
}
