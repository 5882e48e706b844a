//! The `--model` argument shared by `generate`, `inspect` and `bench`: a path or `asset:NAME`,
//! the task head and the device, turned into a loaded model.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use whetstone_host::assets;
use whetstone_host::model::load::{self, LoadedModel, ModelSpec, Pooling, TaskSpec};
use whetstone_host::quant::QuantizeSpec;

/// The head to put on the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Task {
    /// Next-token prediction (Llama family).
    CausalLm,
    /// Sequence classification over the pooled state (BERT family).
    Classification,
}

/// Options that say how to load a model (the model itself is a separate argument: a `.gguf`
/// file, a Hugging Face model directory, or `asset:NAME` for a fetched asset such as
/// `asset:smollm2-135m-instruct` or `asset:all-minilm-l6-v2`).
#[derive(Debug, Clone, Args)]
pub struct ModelOptions {
    /// The head; by default `classification` for encoder (BERT-family) directories and
    /// `causal-lm` otherwise.
    #[arg(long, value_enum)]
    pub task: Option<Task>,
    /// Number of classes of a classification head.
    #[arg(long, default_value_t = 2)]
    pub num_labels: usize,
    /// Where to compute: cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Hold the frozen linear layers quantized (QLoRA): `nf4` or `q8_0` made at load, or
    /// `keep` for a GGUF file's own blocks (as `[model] quantize` in a recipe).
    #[arg(long, value_enum)]
    pub quantize: Option<Quantize>,
}

/// `--quantize`: see [`whetstone_host::quant::QuantizeSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Quantize {
    /// NF4 with double quantization, made at load.
    Nf4,
    /// ggml Q8_0, made at load.
    #[value(name = "q8_0")]
    Q8_0,
    /// A GGUF file's own blocks, as stored.
    Keep,
}

impl From<Quantize> for QuantizeSpec {
    fn from(q: Quantize) -> Self {
        match q {
            Quantize::Nf4 => QuantizeSpec::Nf4,
            Quantize::Q8_0 => QuantizeSpec::Q8_0,
            Quantize::Keep => QuantizeSpec::Keep,
        }
    }
}

impl ModelOptions {
    /// The recipe-style spec of `model` (a path or `asset:NAME`) with these options.
    pub fn spec(&self, model: &str) -> Result<ModelSpec> {
        let path = assets::resolve_path(model)?;
        let task = match self.task {
            Some(Task::CausalLm) => TaskSpec::CausalLm,
            Some(Task::Classification) => TaskSpec::Classification,
            None => load::default_task(&path),
        };
        Ok(ModelSpec {
            path: model.to_string(),
            task,
            num_labels: self.num_labels,
            pooling: Pooling::Mean,
            dropout: None,
            quantize: self.quantize.map(QuantizeSpec::from),
        })
    }

    /// Loads `model` on the chosen device; `seed` drives any random initialisation (e.g. a
    /// new classification head).
    pub fn load(&self, model: &str, seed: u64) -> Result<LoadedModel> {
        let spec = self.spec(model)?;
        let device = whetstone_host::device::parse_device(&self.device)?;
        let loaded = load::load(&spec, &device, seed)
            .with_context(|| format!("loading model {}", spec.path))?;
        Ok(loaded)
    }
}
