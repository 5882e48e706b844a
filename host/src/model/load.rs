//! Loading a model from a path: a GGUF file (Llama family) or a Hugging Face directory
//! (`config.json` + safetensors + `tokenizer.json`), dispatched on the file type and the
//! `architectures` / `model_type` fields.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::llama::Llama;
use super::{bert, hf, Model};
use crate::{Error, Result};

/// How a sequence-classification head pools the encoder's token states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean over real (non-padding) tokens (sentence-transformers' default).
    #[default]
    Mean,
    /// The first (`[CLS]`) token's state.
    Cls,
}

/// The task head to put on the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskSpec {
    /// Causal language modelling (Llama family).
    #[default]
    CausalLm,
    /// Sequence classification (BERT family): a `classifier` linear over the pooled state.
    Classification,
}

/// The `[model]` section of a recipe: what to load and how.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A `.gguf` file or a Hugging Face model directory. `asset:NAME` refers to a fetched asset
    /// (`asset:smollm2-135m-instruct`, `asset:all-minilm-l6-v2`).
    pub path: String,
    /// The head: `causal-lm` or `classification`.
    #[serde(default)]
    pub task: TaskSpec,
    /// Number of classes for `classification`.
    #[serde(default = "default_num_labels")]
    pub num_labels: usize,
    /// Pooling for `classification`: `mean` (default) or `cls`.
    #[serde(default)]
    pub pooling: Pooling,
    /// Dropout probability used in training mode for encoder models; `None` keeps the value of
    /// `config.json` (`hidden_dropout_prob`).
    #[serde(default)]
    pub dropout: Option<f32>,
    /// Hold the frozen linear layers quantized while fine-tuning (QLoRA): `"nf4"` (NF4 with
    /// double quantization) or `"q8_0"`, made at load, or `"keep"` for a GGUF file's own blocks.
    /// Absent: f32 weights.
    #[serde(default)]
    pub quantize: Option<crate::quant::QuantizeSpec>,
}

fn default_num_labels() -> usize {
    2
}

/// Special token ids a tokenizer/model pair uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Beginning of sequence, when the model uses one.
    pub bos: Option<u32>,
    /// End of sequence / end of turn.
    pub eos: Option<u32>,
    /// Padding id.
    pub pad: u32,
    /// Whether the BOS token is prepended when encoding.
    pub add_bos: bool,
}

/// A loaded model with everything needed to feed it text.
pub struct LoadedModel {
    /// The model.
    pub model: Box<dyn Model>,
    /// Its tokenizer (padding and truncation turned off; the host pads and truncates).
    pub tokenizer: tokenizers::Tokenizer,
    /// Special token ids.
    pub special: SpecialTokens,
    /// The model's own Jinja chat template, when it ships one.
    pub chat_template: Option<String>,
    /// Maximum number of positions the model supports.
    pub max_positions: usize,
    /// Where it was loaded from.
    pub source: PathBuf,
}

/// Model families the host implements, keyed by `config.json`'s `model_type`.
const LLAMA_TYPES: &[&str] = &["llama", "mistral", "qwen2"];
const BERT_TYPES: &[&str] = &["bert", "roberta", "xlm-roberta"];

/// Loads the model described by `spec` onto `device`. `seed` initialises any new head and seeds
/// dropout.
///
/// `spec.path` may be a `.gguf` file, a Hugging Face directory, a directory holding exactly one
/// `.gguf` file, or `asset:NAME` for a fetched asset.
pub fn load(spec: &ModelSpec, device: &candle_core::Device, seed: u64) -> Result<LoadedModel> {
    let path = crate::assets::resolve_path(&spec.path)?;
    let path = gguf_in_dir(&path)?.unwrap_or(path);
    if !path.exists() {
        return Err(Error::bad_file(
            &path,
            "no such file or directory (model.path in the recipe, or --model)",
        ));
    }
    let started = std::time::Instant::now();
    let loaded = if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            return Err(Error::bad_file(
                &path,
                "not a model: expected a .gguf file or a Hugging Face directory with config.json",
            ));
        }
        require_causal_lm(spec, &path)?;
        Llama::load_gguf_quantized(&path, device, spec.quantize)?
    } else {
        let config = hf::read_config(&path)?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        if LLAMA_TYPES.contains(&model_type) {
            require_causal_lm(spec, &path)?;
            Llama::load_hf_dir_quantized(&path, device, spec.quantize)?
        } else if BERT_TYPES.contains(&model_type) {
            bert::load_hf_dir(&path, spec, device, seed)?
        } else {
            return Err(Error::bad_file(
                path.join("config.json"),
                format!(
                    "unsupported model_type `{model_type}`: supported are {} (causal LM) and {} (encoder)",
                    LLAMA_TYPES.join(", "),
                    BERT_TYPES.join(", ")
                ),
            ));
        }
    };
    tracing::info!(
        path = %path.display(),
        architecture = loaded.model.architecture(),
        params = loaded.model.params().num_params(),
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    Ok(loaded)
}

/// The head a model at `path` (a resolved path) gets when none is asked for: `classification`
/// for BERT-family Hugging Face directories, `causal-lm` for everything else.
pub fn default_task(path: &Path) -> TaskSpec {
    let model_type = hf::read_config(path).ok().and_then(|c| {
        c.get("model_type")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    });
    match model_type {
        Some(t) if BERT_TYPES.contains(&t.as_str()) => TaskSpec::Classification,
        _ => TaskSpec::CausalLm,
    }
}

/// The single `.gguf` file inside `dir`, when `dir` is a directory without `config.json`.
fn gguf_in_dir(dir: &Path) -> Result<Option<PathBuf>> {
    if !dir.is_dir() || dir.join("config.json").exists() {
        return Ok(None);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let ggufs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("gguf"))
        .collect();
    match ggufs.as_slice() {
        [one] => Ok(Some(one.clone())),
        [] => Ok(None),
        _ => Err(Error::bad_file(
            dir,
            "holds several .gguf files: name the one to load",
        )),
    }
}

fn require_causal_lm(spec: &ModelSpec, path: &Path) -> Result<()> {
    if spec.task == TaskSpec::CausalLm {
        Ok(())
    } else {
        Err(Error::config(format!(
            "{} is a causal LM (Llama family): set `task = \"causal-lm\"` in the [model] section",
            path.display()
        )))
    }
}

impl ModelSpec {
    /// A spec for `path` with the given task and defaults for everything else.
    pub fn new(path: impl Into<String>, task: TaskSpec) -> Self {
        Self {
            path: path.into(),
            task,
            num_labels: default_num_labels(),
            pooling: Pooling::default(),
            dropout: None,
            quantize: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_err(spec: &ModelSpec) -> String {
        match load(spec, &candle_core::Device::Cpu, 0) {
            Ok(_) => panic!("loading {} should fail", spec.path),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn dispatch_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let path = |p: &Path| p.to_string_lossy().into_owned();

        let missing = dir.path().join("nope");
        let err = load_err(&ModelSpec::new(path(&missing), TaskSpec::CausalLm));
        assert!(err.contains("no such file or directory"), "{err}");

        let text = dir.path().join("weights.bin");
        std::fs::write(&text, b"not a model").unwrap();
        let err = load_err(&ModelSpec::new(path(&text), TaskSpec::CausalLm));
        assert!(err.contains("expected a .gguf file"), "{err}");

        let gguf = dir.path().join("m.gguf");
        std::fs::write(&gguf, b"GGUF").unwrap();
        let err = load_err(&ModelSpec::new(path(&gguf), TaskSpec::Classification));
        assert!(
            err.contains("is a causal LM") && err.contains("task = \"causal-lm\""),
            "{err}"
        );

        let hf = dir.path().join("hf");
        std::fs::create_dir(&hf).unwrap();
        std::fs::write(hf.join("config.json"), br#"{"model_type": "gpt2"}"#).unwrap();
        let err = load_err(&ModelSpec::new(path(&hf), TaskSpec::CausalLm));
        assert!(
            err.contains("unsupported model_type `gpt2`") && err.contains("config.json"),
            "{err}"
        );
    }

    #[test]
    fn default_task_follows_the_model_type() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(default_task(dir.path()), TaskSpec::CausalLm);
        std::fs::write(dir.path().join("config.json"), br#"{"model_type": "bert"}"#).unwrap();
        assert_eq!(default_task(dir.path()), TaskSpec::Classification);
    }

    #[test]
    fn a_directory_with_two_gguf_files_is_ambiguous() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.gguf"), b"").unwrap();
        std::fs::write(dir.path().join("b.gguf"), b"").unwrap();
        let err = load_err(&ModelSpec::new(
            dir.path().to_string_lossy(),
            TaskSpec::CausalLm,
        ));
        assert!(err.contains("several .gguf files"), "{err}");
    }
}
