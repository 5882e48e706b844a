//! The TOML recipe that describes a fine-tuning run: which model, which data, which method, the
//! hyper-parameters and where to write the results.
//!
//! ```toml
//! [model]
//! path = "asset:all-minilm-l6-v2"
//! task = "classification"
//! num_labels = 2
//!
//! [data]
//! train = ["asset:uci-sentiment/imdb.json", "asset:uci-sentiment/amazon.json", "asset:uci-sentiment/yelp.json"]
//! text_field = "text"
//! label_field = "class"
//! skip_bad_records = true
//!
//! [method]
//! kind = "partial"
//! trainable = ["classifier.*", "encoder.layer.5.*"]
//!
//! [training]
//! learning_rate = 1e-4
//! epochs = 3
//! batch_size = 32
//! seed = 42
//!
//! [output]
//! dir = "runs/sentiment"
//! ```
//!
//! Every section rejects unknown keys with an error naming the key, so a typo never silently
//! falls back to a default. Relative paths are relative to the working directory.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::model::load::ModelSpec;
use crate::train::schedule::SchedulerKind;
use crate::{Error, Result};

/// A whole fine-tuning run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// What model to load and which head to put on it (see [`ModelSpec`]).
    pub model: ModelSpec,
    /// Which records to train and validate on, and how to tokenize them (see [`DataConfig`]).
    pub data: DataConfig,
    /// Which parameters train. Defaults to full fine-tuning.
    #[serde(default)]
    pub method: MethodSpec,
    /// Plugin manifests to search before the plugin directory (`plugin.toml` files or
    /// directories holding one; relative paths are relative to the working directory).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<std::path::PathBuf>,
    /// Optimizer, schedule, batching and run-length settings.
    #[serde(default)]
    pub training: TrainingConfig,
    /// Where checkpoints, metrics and the plot go.
    pub output: OutputConfig,
    /// Continual learning: a sequence of tasks trained one after another, with experience
    /// replay (see [`crate::train::continual::ContinualConfig`]). Without it the recipe trains
    /// on `[data]` alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continual: Option<crate::train::continual::ContinualConfig>,
    /// A loss plugin that replaces the model's cross-entropy (see [`LossSpec`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<LossSpec>,
    /// A teacher model whose logits the loss plugin receives (knowledge distillation; see
    /// [`crate::train::teacher::TeacherSpec`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<crate::train::teacher::TeacherSpec>,
}

/// The `[loss]` section: the training loss comes from a loss plugin instead of the model's
/// cross-entropy. `kind` is the plugin's id, `transport` which build to load (`auto`, `native`,
/// `wasm`); every other field is the loss's configuration. Evaluation keeps the model's own
/// cross-entropy, so held-out figures stay comparable between losses.
pub type LossSpec = crate::plugin::PluginSpec;

/// The `[method]` section: how the model is fine-tuned.
///
/// `kind = "full"` trains every parameter; `kind = "partial"` trains only the parameters whose
/// names match `trainable`. Any other `kind` names a PEFT method plugin (`kind = "lora"`); the
/// section's other fields are the plugin's configuration with Hugging Face PEFT's names
/// (`r`, `lora_alpha`, `target_modules`, ...), except `transport` (`auto`, `native` or `wasm`:
/// which build of the plugin to load).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(
    try_from = "serde_json::Map<String, serde_json::Value>",
    into = "serde_json::Map<String, serde_json::Value>"
)]
pub enum MethodSpec {
    /// Full fine-tuning: every parameter of the model trains.
    #[default]
    Full,
    /// Partial fine-tuning: only the parameters whose Hugging Face names match one of the glob
    /// patterns train; everything else stays frozen.
    Partial {
        /// Glob patterns over dotted parameter names (`*` also matches dots), e.g.
        /// `["classifier.*", "encoder.layer.5.*"]`. A pattern that matches nothing is an error;
        /// `whet inspect MODEL` lists the names.
        trainable: Vec<String>,
    },
    /// A PEFT method plugin.
    Plugin {
        /// The plugin's id (`lora`).
        id: String,
        /// Which build to load.
        transport: crate::plugin::TransportKind,
        /// The method's configuration (PEFT's JSON fields).
        config: serde_json::Map<String, serde_json::Value>,
    },
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for MethodSpec {
    type Error = String;

    fn try_from(
        mut map: serde_json::Map<String, serde_json::Value>,
    ) -> std::result::Result<Self, String> {
        let kind = match map.remove("kind") {
            None => "full".to_string(),
            Some(serde_json::Value::String(k)) => k,
            Some(other) => return Err(format!("method.kind must be a string, not {other}")),
        };
        let no_extra = |map: &serde_json::Map<String, serde_json::Value>, kind: &str| match map
            .keys()
            .next()
        {
            Some(k) => Err(format!("unknown field `{k}` for method kind \"{kind}\"")),
            None => Ok(()),
        };
        match kind.as_str() {
            "full" => {
                no_extra(&map, "full")?;
                Ok(MethodSpec::Full)
            }
            "partial" => {
                let trainable = map.remove("trainable").ok_or(
                    "method kind \"partial\" needs `trainable` (a list of parameter patterns)",
                )?;
                let trainable: Vec<String> = serde_json::from_value(trainable)
                    .map_err(|e| format!("method.trainable: {e}"))?;
                no_extra(&map, "partial")?;
                Ok(MethodSpec::Partial { trainable })
            }
            id => {
                let transport = match map.remove("transport") {
                    None => crate::plugin::TransportKind::Auto,
                    Some(serde_json::Value::String(t)) => {
                        t.parse().map_err(|e: Error| e.to_string())?
                    }
                    Some(other) => {
                        return Err(format!("method.transport must be a string, not {other}"))
                    }
                };
                Ok(MethodSpec::Plugin {
                    id: id.to_string(),
                    transport,
                    config: map,
                })
            }
        }
    }
}

impl From<MethodSpec> for serde_json::Map<String, serde_json::Value> {
    fn from(m: MethodSpec) -> Self {
        use serde_json::Value;
        let mut map = serde_json::Map::new();
        match m {
            MethodSpec::Full => {
                map.insert("kind".into(), Value::from("full"));
            }
            MethodSpec::Partial { trainable } => {
                map.insert("kind".into(), Value::from("partial"));
                map.insert("trainable".into(), Value::from(trainable));
            }
            MethodSpec::Plugin {
                id,
                transport,
                config,
            } => {
                map.insert("kind".into(), Value::from(id));
                if transport != crate::plugin::TransportKind::Auto {
                    map.insert(
                        "transport".into(),
                        serde_json::to_value(transport).unwrap_or(Value::Null),
                    );
                }
                map.extend(config);
            }
        }
        map
    }
}

/// The `[training]` section: hyper-parameters of the optimizer, the schedule and the loop.
/// Names and defaults follow Hugging Face `TrainingArguments` where they overlap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    /// Peak learning rate of AdamW (reached after warm-up). Default 5e-5.
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Decoupled weight decay of AdamW. Applies to weights, not to biases or normalisation
    /// parameters (as Hugging Face's Trainer does). Default 0.
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW β1 (first-moment decay). Default 0.9.
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    /// AdamW β2 (second-moment decay). Default 0.999.
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    /// AdamW ε (denominator stabiliser). Default 1e-8.
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    /// Number of passes over the training set. Default 1.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Stop after this many optimizer steps; overrides `epochs` when set.
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Examples per micro-batch. Default 8.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Examples per batch during evaluation. Defaults to `batch_size`.
    #[serde(default)]
    pub eval_batch_size: Option<usize>,
    /// Micro-batches whose gradients are summed (each scaled by 1/n) before one optimizer step;
    /// the effective batch is `batch_size × gradient_accumulation_steps`. Default 1.
    #[serde(default = "default_accumulation")]
    pub gradient_accumulation_steps: usize,
    /// Linear warm-up length in optimizer steps. Set at most one of `warmup_steps` and
    /// `warmup_ratio`; default no warm-up.
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    /// Linear warm-up length as a share of all optimizer steps (0 to 1).
    #[serde(default)]
    pub warmup_ratio: Option<f64>,
    /// Learning-rate shape after warm-up: `"linear"` (default) decays to 0 at the last step,
    /// `"cosine"` follows half a cosine down to 0, `"constant"` keeps the peak rate.
    #[serde(default = "default_scheduler")]
    pub lr_scheduler: SchedulerKind,
    /// Clip the global L2 norm of the gradients to this value before each update; no clipping
    /// when absent.
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Evaluate on the validation set every this many optimizer steps. Evaluation also runs at
    /// the end of each epoch and of the run whenever there is a validation set.
    #[serde(default)]
    pub eval_every: Option<usize>,
    /// Also evaluate before the first step (the starting point: for a classifier, the
    /// untrained head). Default false.
    #[serde(default)]
    pub eval_at_start: bool,
    /// Causal LMs: compute the training loss from the final hidden states a chunk of rows at a
    /// time, never materialising the `[tokens, vocab]` logits, and only for the tokens that
    /// count (answers in SFT). The same value and gradients as the plain path, with less memory
    /// and, for SFT, less work. `false` keeps the plain logits path. A `[loss]` plugin always
    /// gets the full logits. Default true.
    #[serde(default = "default_true")]
    pub chunked_lm_loss: bool,
    /// Activation (gradient) checkpointing, Hugging Face's `gradient_checkpointing`: keep only
    /// each decoder layer's input during the forward and recompute the layer in the backward
    /// pass. Peak memory drops by nearly all the activations for the price of one more forward
    /// per step (about a third more compute). Same gradients, dropout masks included. Llama-family
    /// models; others train without it (with a warning). Default false.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Seed of the data order, the dropout masks and any random initialisation. The same seed
    /// gives the same loss sequence on CPU. Default 42.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Where to compute: `"cpu"` (default), `"cuda"` (GPU 0), `"cuda:N"` or `"metal"`. CUDA and
    /// Metal need a `whet` built with the `cuda` or `metal` feature.
    #[serde(default = "default_device")]
    pub device: String,
    /// Write a training line to the metrics file (and the log) every this many optimizer steps.
    /// Default 10.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
}

/// The `[output]` section: where the results of a run go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Output directory; created when missing. Holds `last/` (the latest checkpoint, for
    /// `--resume`), `best/` (the checkpoint with the best evaluation metric), the metrics file
    /// and the plot.
    pub dir: PathBuf,
    /// Keep a `best/` checkpoint: the lowest evaluation loss for language models, the highest
    /// accuracy for classifiers. Default true.
    #[serde(default = "default_true")]
    pub save_best: bool,
    /// Also write `last/` every this many optimizer steps (it is always written at each epoch
    /// end, at the end of the run and when the run is cancelled).
    #[serde(default)]
    pub save_every: Option<usize>,
    /// Name of the JSON Lines metrics file inside `dir`. Default `metrics.jsonl`.
    #[serde(default = "default_metrics_file")]
    pub metrics_file: String,
    /// Draw `loss.png` (training and evaluation loss against the step) at the end. Default true.
    #[serde(default = "default_true")]
    pub plot: bool,
}

fn default_learning_rate() -> f64 {
    5e-5
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_epochs() -> usize {
    1
}
fn default_batch_size() -> usize {
    8
}
fn default_accumulation() -> usize {
    1
}
fn default_scheduler() -> SchedulerKind {
    SchedulerKind::Linear
}
fn default_seed() -> u64 {
    42
}
fn default_device() -> String {
    "cpu".into()
}
fn default_log_every() -> usize {
    10
}
fn default_true() -> bool {
    true
}
fn default_metrics_file() -> String {
    "metrics.jsonl".into()
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            learning_rate: default_learning_rate(),
            weight_decay: 0.0,
            adam_beta1: default_beta1(),
            adam_beta2: default_beta2(),
            adam_epsilon: default_eps(),
            epochs: default_epochs(),
            max_steps: None,
            batch_size: default_batch_size(),
            eval_batch_size: None,
            gradient_accumulation_steps: default_accumulation(),
            warmup_steps: None,
            warmup_ratio: None,
            lr_scheduler: default_scheduler(),
            max_grad_norm: None,
            eval_every: None,
            eval_at_start: false,
            chunked_lm_loss: true,
            gradient_checkpointing: false,
            seed: default_seed(),
            device: default_device(),
            log_every: default_log_every(),
        }
    }
}

impl OutputConfig {
    /// Output to `dir` with every other field at its default.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            save_best: true,
            save_every: None,
            metrics_file: default_metrics_file(),
            plot: true,
        }
    }
}

impl TrainingConfig {
    /// Opens the device this run computes on (see [`crate::device::parse_device`]).
    pub fn device(&self) -> Result<Device> {
        crate::device::parse_device(&self.device).map_err(|e| match e {
            Error::Config(message) => Error::config(format!("training.device: {message}")),
            other => other,
        })
    }

    /// The batch size used for evaluation.
    pub fn eval_batch_size(&self) -> usize {
        self.eval_batch_size.unwrap_or(self.batch_size)
    }

    /// Optimizer steps of a run over `batches_per_epoch` micro-batches per epoch: `max_steps`
    /// when set, otherwise `epochs × ceil(batches_per_epoch / gradient_accumulation_steps)`.
    pub fn total_steps(&self, batches_per_epoch: usize) -> usize {
        self.max_steps.unwrap_or_else(|| {
            self.epochs * batches_per_epoch.div_ceil(self.gradient_accumulation_steps.max(1))
        })
    }

    /// Warm-up length in steps for a run of `total_steps`.
    pub fn warmup_steps(&self, total_steps: usize) -> usize {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(n), _) => n,
            (None, Some(r)) => (r * total_steps as f64).ceil() as usize,
            (None, None) => 0,
        }
    }

    /// Checks the ranges serde cannot check; messages name the field.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, value: f64| -> Result<()> {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(Error::config(format!(
                    "training.{name} must be > 0 (got {value})"
                )))
            }
        };
        let at_least_one = |name: &str, value: usize| -> Result<()> {
            if value >= 1 {
                Ok(())
            } else {
                Err(Error::config(format!(
                    "training.{name} must be ≥ 1 (got {value})"
                )))
            }
        };
        positive("learning_rate", self.learning_rate)?;
        positive("adam_epsilon", self.adam_epsilon)?;
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::config(format!(
                "training.weight_decay must be ≥ 0 (got {})",
                self.weight_decay
            )));
        }
        for (name, beta) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::config(format!(
                    "training.{name} must be in [0, 1) (got {beta})"
                )));
            }
        }
        at_least_one("batch_size", self.batch_size)?;
        at_least_one(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
        )?;
        at_least_one("log_every", self.log_every)?;
        if let Some(n) = self.eval_batch_size {
            at_least_one("eval_batch_size", n)?;
        }
        if let Some(n) = self.eval_every {
            at_least_one("eval_every", n)?;
        }
        match self.max_steps {
            Some(n) => at_least_one("max_steps", n)?,
            None => at_least_one("epochs", self.epochs)?,
        }
        if let Some(norm) = self.max_grad_norm {
            positive("max_grad_norm", norm)?;
        }
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(_), Some(_)) => {
                return Err(Error::config(
                    "set only one of training.warmup_steps and training.warmup_ratio",
                ))
            }
            (None, Some(r)) if !(0.0..=1.0).contains(&r) => {
                return Err(Error::config(format!(
                    "training.warmup_ratio must be in [0, 1] (got {r})"
                )))
            }
            _ => {}
        }
        Ok(())
    }
}

impl Recipe {
    /// Reads and validates the recipe at `path`; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Parses and validates a recipe from TOML text; `origin` (the file name) prefixes errors.
    pub fn from_toml_str(text: &str, origin: impl AsRef<Path>) -> Result<Self> {
        let origin = origin.as_ref();
        let recipe: Recipe = toml::from_str(text)
            .map_err(|e| Error::bad_file(origin, format!("invalid recipe: {e}")))?;
        recipe.validate().map_err(|e| match e {
            Error::Config(message) => Error::bad_file(origin, message),
            other => other,
        })?;
        Ok(recipe)
    }

    /// Checks every section's values.
    pub fn validate(&self) -> Result<()> {
        self.training.validate()?;
        match &self.continual {
            Some(continual) => continual.validate(&self.data)?,
            None => self.data.validate()?,
        }
        if self.data.streaming && self.training.max_steps.is_none() {
            return Err(Error::config(
                "[data] streaming = true needs [training] max_steps: a stream's number of batches \
                 is not known before it is read",
            ));
        }
        if self.teacher.is_some() && self.loss.is_none() {
            return Err(Error::config(
                "[teacher] needs a [loss] that uses the teacher's logits, e.g. kind = \"distill\" \
                 (`whet plugin build plugins/distill`)",
            ));
        }
        if let MethodSpec::Partial { trainable } = &self.method {
            if trainable.is_empty() {
                return Err(Error::config(
                    "method.trainable is empty: list the parameter patterns to train (e.g. [\"classifier.*\"]) or use kind = \"full\"",
                ));
            }
        }
        if self.output.dir.as_os_str().is_empty() {
            return Err(Error::config(
                "output.dir is empty: name the directory for checkpoints and metrics",
            ));
        }
        let metrics = Path::new(&self.output.metrics_file);
        if self.output.metrics_file.is_empty() || metrics.components().count() != 1 {
            return Err(Error::config(format!(
                "output.metrics_file = \"{}\" must be a plain file name (it is written inside output.dir)",
                self.output.metrics_file
            )));
        }
        if self.output.save_every == Some(0) {
            return Err(Error::config("output.save_every must be ≥ 1 (got 0)"));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "[model]\npath = \"m.gguf\"\n[data]\ntrain = [\"t.jsonl\"]\n[output]\ndir = \"out\"\n";

    #[test]
    fn minimal_recipe_takes_defaults() {
        let r = Recipe::from_toml_str(MINIMAL, "r.toml").unwrap();
        assert_eq!(r.method, MethodSpec::Full);
        assert_eq!(r.training, TrainingConfig::default());
        assert!(r.output.save_best && r.output.plot);
        assert_eq!(r.training.total_steps(10), 10);
    }

    #[test]
    fn data_loaders_and_streaming_parse_and_validate() {
        let text = MINIMAL.replace(
            "[output]",
            "streaming = true\nshuffle_buffer = 64\n[data.loader]\nkind = \"csv\"\n\
             delimiter = \"\\t\"\n[training]\nmax_steps = 10\n[output]",
        );
        let r = Recipe::from_toml_str(&text, "r.toml").unwrap();
        let loader = r.data.loader.as_ref().unwrap();
        assert_eq!(
            (loader.kind.as_str(), loader.config["delimiter"].as_str()),
            ("csv", Some("\t"))
        );
        assert!(r.data.streaming && r.data.shuffle_buffer == 64);
        let unbounded = text.replace("max_steps = 10", "epochs = 1");
        let err = Recipe::from_toml_str(&unbounded, "r.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_steps"), "{err}");
        let both = text.replace("streaming = true", "format = \"csv\"");
        let err = Recipe::from_toml_str(&both, "r.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep one"), "{err}");
    }

    #[test]
    fn plugin_methods_keep_their_peft_config_and_round_trip() {
        let text = format!(
            "plugins = [\"p/plugin.toml\"]\n{MINIMAL}[method]\nkind = \"lora\"\ntransport = \"wasm\"\nr = 8\ntarget_modules = [\"q_proj\"]\n"
        );
        let r = Recipe::from_toml_str(&text, "r.toml").unwrap();
        let MethodSpec::Plugin {
            id,
            transport,
            config,
        } = &r.method
        else {
            panic!("not a plugin method: {:?}", r.method);
        };
        assert_eq!(id, "lora");
        assert_eq!(*transport, crate::plugin::TransportKind::Wasm);
        assert_eq!(config["r"], 8);
        assert_eq!(r.plugins, [std::path::PathBuf::from("p/plugin.toml")]);
        let again = Recipe::from_toml_str(&toml::to_string(&r).unwrap(), "again.toml").unwrap();
        assert_eq!(again.method, r.method);
        let bad = format!("{MINIMAL}[method]\nkind = \"full\"\nr = 8\n");
        let err = Recipe::from_toml_str(&bad, "r.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`r`"), "{err}");
    }

    #[test]
    fn partial_method_and_ranges() {
        let text =
            format!("{MINIMAL}[method]\nkind = \"partial\"\ntrainable = [\"classifier.*\"]\n");
        let r = Recipe::from_toml_str(&text, "r.toml").unwrap();
        assert_eq!(
            r.method,
            MethodSpec::Partial {
                trainable: vec!["classifier.*".into()]
            }
        );
        let bad = format!("{MINIMAL}[training]\nbatch_size = 0\n");
        let err = Recipe::from_toml_str(&bad, "r.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("r.toml") && err.contains("training.batch_size must be ≥ 1"),
            "{err}"
        );
        let bad = format!("{MINIMAL}[method]\nkind = \"partial\"\ntrainable = [\"a\"]\nrank = 3\n");
        let err = Recipe::from_toml_str(&bad, "r.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rank"), "{err}");
    }

    #[test]
    fn device_errors_name_the_field() {
        let cfg = TrainingConfig {
            device: "gpu".into(),
            ..Default::default()
        };
        assert!(cfg
            .device()
            .unwrap_err()
            .to_string()
            .contains("training.device"));
        assert!(TrainingConfig::default().device().unwrap().is_cpu());
    }

    #[test]
    fn steps_and_warmup() {
        let cfg = TrainingConfig {
            epochs: 2,
            gradient_accumulation_steps: 3,
            warmup_ratio: Some(0.1),
            ..Default::default()
        };
        assert_eq!(cfg.total_steps(10), 8);
        assert_eq!(cfg.warmup_steps(8), 1);
        assert_eq!(
            TrainingConfig {
                max_steps: Some(5),
                ..cfg
            }
            .total_steps(10),
            5
        );
    }
}
