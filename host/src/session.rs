//! An open fine-tuning session for programs that embed the host (the C ABI of
//! `host/capi` is a thin layer over it).
//!
//! A [`Session`] holds one loaded model with its method attached, the prepared data of its
//! recipe, and any PEFT adapters loaded next to that method. It trains in chunks of steps (each
//! chunk continues exactly where the last stopped, through the `last/` checkpoint), evaluates,
//! generates, embeds, saves the adapter and writes merged models. The session's own method
//! answers to the adapter name [`OWN_METHOD_NAME`]; adapters loaded from disk switch in and out
//! by their names, and only the own method trains.
//!
//! A session is not for concurrent use: the caller serialises calls (the C layer does).

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use serde_json::{Map, Value};

use crate::adapter::AdapterSet;
use crate::data::{BatchOrder, PreparedData};
use crate::model::generate::{GenerateOptions, Generation};
use crate::model::load::{default_task, LoadedModel, ModelSpec};
use crate::params::Param;
use crate::plugin::method::MethodAdapter;
use crate::recipe::{MethodSpec, OutputConfig, Recipe};
use crate::train::eval::{evaluate, EvalMetrics};
use crate::train::run::{
    apply_method_with_plugins, check_label_count, fit, load_objective, write_recipe_copy, FitData,
    RunOptions, RunSummary, StepCallback,
};
use crate::train::Objective;
use crate::{Error, Result};

/// The adapter name of the session's own (trainable) method.
pub const OWN_METHOD_NAME: &str = crate::adapter::DEFAULT_ADAPTER_NAME;

/// Where a session made from parts writes checkpoints until its `[output]` is configured.
pub const DEFAULT_OUTPUT_DIR: &str = "runs/session";

/// Which adapter computes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Active {
    /// The session's own method (or, for full and partial fine-tuning, the model itself).
    Own,
    /// An adapter loaded from disk, by name.
    Loaded(String),
    /// No adapter: the base model.
    Base,
}

/// How a call to [`Session::train`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainStatus {
    /// The run reached its last step (final evaluation done, `last/` saved).
    Finished,
    /// The call's step budget ran out; the next call continues the run.
    Paused,
    /// The cancel flag was raised; the next call continues the run.
    Cancelled,
}

/// What a call to [`Session::train`] reports.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// How the call ended.
    pub status: TrainStatus,
    /// Optimizer steps the run has taken so far (over all calls).
    pub step: usize,
    /// Steps the whole run takes.
    pub total_steps: usize,
    /// Loss of the last step taken, if any.
    pub last_loss: Option<f64>,
    /// The run's summary (none when cancelled).
    pub summary: Option<RunSummary>,
}

/// Sentence embeddings, one row per text.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// Width of each embedding.
    pub dim: usize,
    /// `texts × dim` values, row-major.
    pub values: Vec<f32>,
}

/// Texts embedded per forward pass.
const EMBED_BATCH: usize = 32;

/// An open fine-tuning session (see the [module documentation](self)).
pub struct Session {
    recipe: Recipe,
    plugins: Vec<PathBuf>,
    device: Device,
    loaded: LoadedModel,
    /// The own method when it is a plugin (full and partial fine-tuning have none).
    method: Option<Arc<MethodAdapter>>,
    /// Whether the session has an own method at all (false after [`Session::detach_method`]).
    has_own: bool,
    objective: Objective,
    adapters: AdapterSet,
    active: Active,
    data: Option<PreparedData>,
    /// `last/` holds this session's unfinished run, which the next `train` continues.
    paused: bool,
    step: usize,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("model", &self.recipe.model.path)
            .field("method", &self.recipe.method)
            .field("active", &self.active)
            .field("adapters", &self.adapters)
            .field("step", &self.step)
            .field("paused", &self.paused)
            .finish()
    }
}

/// Parses a TOML or JSON document (JSON when the first non-blank character is `{`).
pub fn parse_document(text: &str, what: &str) -> Result<Map<String, Value>> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| Error::config(format!("invalid {what} (JSON): {e}")))
    } else {
        let table: toml::Table = toml::from_str(text)
            .map_err(|e| Error::config(format!("invalid {what} (TOML): {e}")))?;
        match serde_json::to_value(table) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(Error::config(format!("invalid {what}: not a table"))),
            Err(e) => Err(Error::config(format!("invalid {what}: {e}"))),
        }
    }
}

/// `base` with `overlay`'s fields written over it, tables field by field.
fn overlay(base: &mut Value, overlay: Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                overlay_field(b, k, v);
            }
        }
        (b, o) => *b = o,
    }
}

fn overlay_field(base: &mut Map<String, Value>, key: String, value: Value) {
    match base.get_mut(&key) {
        Some(existing) if existing.is_object() && value.is_object() => overlay(existing, value),
        _ => {
            base.insert(key, value);
        }
    }
}

/// Checks a recipe whose `[data]` may still be empty (a session made from parts).
fn validate_open(recipe: &Recipe) -> Result<()> {
    if recipe.data.train.is_empty() {
        recipe.training.validate()
    } else {
        recipe.validate()
    }
}

impl Session {
    /// Opens a session for `recipe` (a `[continual]` recipe is refused: it runs with
    /// `whet train`), searching `plugins` (manifest paths) first for plugins.
    pub fn from_recipe(recipe: Recipe, plugins: Vec<PathBuf>) -> Result<Self> {
        recipe.validate()?;
        if recipe.continual.is_some() {
            return Err(Error::config(
                "a [continual] recipe trains a sequence of tasks: run it with `whet train`; a \
                 session trains one task",
            ));
        }
        Self::open(recipe, plugins, true)
    }

    /// Opens a session for the recipe in `text` (TOML, or JSON when it starts with `{`).
    pub fn from_recipe_text(text: &str, plugins: Vec<PathBuf>) -> Result<Self> {
        let doc = parse_document(text, "recipe")?;
        let recipe: Recipe = serde_json::from_value(Value::Object(doc))
            .map_err(|e| Error::config(format!("invalid recipe: {e}")))?;
        Self::from_recipe(recipe, plugins)
    }

    /// Opens a session on the model at `model_path` (a path or `asset:NAME`) with `method`
    /// attached (`None`: the frozen base model, for loading adapters) and no data: it can
    /// generate, embed, load adapters, save and merge at once, and trains after
    /// [`Session::configure`] gives it a `[data]` section (its checkpoints go to
    /// [`DEFAULT_OUTPUT_DIR`] unless `[output]` is configured too).
    pub fn from_parts(
        model_path: &str,
        method: Option<MethodSpec>,
        plugins: Vec<PathBuf>,
    ) -> Result<Self> {
        let resolved = crate::assets::resolve_path(model_path)?;
        let model = ModelSpec::new(model_path, default_task(&resolved));
        let data = serde_json::from_value(serde_json::json!({ "train": [] }))
            .map_err(|e| Error::config(format!("empty [data]: {e}")))?;
        let recipe = Recipe {
            model,
            data,
            method: method.clone().unwrap_or_default(),
            plugins: Vec::new(),
            training: Default::default(),
            output: OutputConfig::new(DEFAULT_OUTPUT_DIR),
            continual: None,
            loss: None,
            teacher: None,
        };
        validate_open(&recipe)?;
        Self::open(recipe, plugins, method.is_some())
    }

    /// Loads the recipe's model and, with `attach`, its method, loss and teacher.
    fn open(recipe: Recipe, plugins: Vec<PathBuf>, attach: bool) -> Result<Self> {
        let device = recipe.training.device()?;
        let loaded = crate::model::load::load(&recipe.model, &device, recipe.training.seed)?;
        let mut all_plugins = plugins;
        all_plugins.extend(recipe.plugins.iter().cloned());
        let objective = load_objective(&recipe, &loaded, &device, &all_plugins)?;
        let mut session = Self {
            recipe,
            plugins: all_plugins,
            device,
            loaded,
            method: None,
            has_own: false,
            objective,
            adapters: AdapterSet::new(),
            active: Active::Base,
            data: None,
            paused: false,
            step: 0,
        };
        if attach {
            session.attach_method(session.recipe.method.clone())?;
        }
        Ok(session)
    }

    /// The session's recipe (as configured so far).
    pub fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    /// The loaded model with its tokenizer.
    pub fn loaded(&self) -> &LoadedModel {
        &self.loaded
    }

    /// Optimizer steps of the current run so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The name of the adapter that computes now (`None`: the base model).
    pub fn active_adapter_name(&self) -> Option<&str> {
        match &self.active {
            Active::Own => Some(OWN_METHOD_NAME),
            Active::Loaded(name) => Some(name),
            Active::Base => None,
        }
    }

    /// Changes the `[data]`, `[training]` and `[output]` sections: `text` is a TOML or JSON
    /// document whose tables are written field by field over the current ones (so
    /// `{"training": {"max_steps": 20}}` changes one field). The next [`Session::train`] starts
    /// a new run from the current weights. The model, method, loss and teacher cannot change
    /// (attach another method with [`Session::attach_method`], or open a new session).
    pub fn configure(&mut self, text: &str) -> Result<()> {
        let doc = parse_document(text, "configuration")?;
        for key in doc.keys() {
            match key.as_str() {
                "data" | "training" | "output" => {}
                "model" | "method" | "loss" | "teacher" | "continual" | "plugins" => {
                    return Err(Error::config(format!(
                        "`{key}` cannot change in an open session (only data, training and \
                         output can); open a new session{}",
                        if key == "method" {
                            ", or attach another method"
                        } else {
                            ""
                        }
                    )))
                }
                other => {
                    return Err(Error::config(format!(
                        "unknown section `{other}`: a session's configuration has data, training \
                         and output"
                    )))
                }
            }
        }
        let mut value = serde_json::to_value(&self.recipe)
            .map_err(|e| Error::config(format!("cannot serialise the recipe: {e}")))?;
        let changes_data = doc.contains_key("data");
        overlay(&mut value, Value::Object(doc));
        let recipe: Recipe = serde_json::from_value(value)
            .map_err(|e| Error::config(format!("invalid configuration: {e}")))?;
        validate_open(&recipe)?;
        if recipe.training.device != self.recipe.training.device {
            return Err(Error::config(
                "training.device cannot change in an open session: the model is loaded on it",
            ));
        }
        if changes_data {
            self.data = None;
        }
        self.recipe = recipe;
        self.paused = false;
        Ok(())
    }

    /// Tokenizes the recipe's data (once per configuration).
    fn ensure_data(&mut self) -> Result<()> {
        if self.recipe.data.train.is_empty() {
            return Err(Error::config(
                "the session has no training data: configure [data] train = [\"file.jsonl\"] \
                 (Session::configure, whet_session_configure)",
            ));
        }
        if self.recipe.data.streaming {
            return Err(Error::config(
                "[data] streaming = true is not supported by an embedding session yet; train \
                 this recipe with `whet train` (or set streaming = false)",
            ));
        }
        if self.data.is_none() {
            let data =
                crate::data::prepare_with_plugins(&self.recipe.data, &self.loaded, &self.plugins)?;
            check_label_count(data.label_count, self.loaded.model.as_ref())?;
            self.data = Some(data);
        }
        Ok(())
    }

    /// The prepared data (after [`Session::ensure_data`]).
    fn data(data: &Option<PreparedData>) -> Result<&PreparedData> {
        data.as_ref()
            .ok_or_else(|| Error::config("the session's data is not prepared"))
    }

    /// Optimizer steps a run on the session's data takes (tokenizes the data first).
    pub fn total_steps(&mut self) -> Result<usize> {
        self.ensure_data()?;
        let data = Self::data(&self.data)?;
        let batches = BatchOrder::shuffled(
            data.train.len(),
            self.recipe.training.batch_size,
            self.recipe.training.seed,
        )?
        .num_batches();
        Ok(self.recipe.training.total_steps(batches))
    }

    /// Trains the session's own method: up to `max_steps` optimizer steps of this call (`None`:
    /// to the end of the run). A run that paused or was cancelled continues exactly where it
    /// stopped; after a finished run the next call starts a new run (fresh optimizer and
    /// schedule) from the current weights. `on_step` hears every step; raising `cancel` stops
    /// the run after the current step (status [`TrainStatus::Cancelled`]). Checkpoints, metrics
    /// and the recipe copy go to the recipe's `output.dir`, as with `whet train`.
    pub fn train(
        &mut self,
        max_steps: Option<usize>,
        on_step: Option<StepCallback>,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<TrainReport> {
        if !self.has_own {
            return Err(Error::config(
                "the session has no method to train: attach one first (attach_method)",
            ));
        }
        if let Active::Loaded(name) = &self.active {
            return Err(Error::config(format!(
                "adapter `{name}` is active, and only the session's own method trains: switch \
                 to `{OWN_METHOD_NAME}` first"
            )));
        }
        if self.active == Active::Base {
            return Err(Error::config(format!(
                "the base model is active (adapters detached): switch to `{OWN_METHOD_NAME}` \
                 to train"
            )));
        }
        if max_steps == Some(0) {
            return Err(Error::config(
                "max_steps must be at least 1 (or none, to train to the end of the run)",
            ));
        }
        if !self.paused {
            write_recipe_copy(&self.recipe)?;
        }
        let last: Arc<Mutex<Option<(usize, f64)>>> = Arc::default();
        let seen = last.clone();
        let callback: StepCallback = Arc::new(move |stats| {
            if let Ok(mut slot) = seen.lock() {
                *slot = Some((stats.step, stats.loss));
            }
            if let Some(user) = &on_step {
                user(stats);
            }
        });
        let opts = RunOptions {
            resume: self.paused,
            cancel,
            progress: false,
            on_step: Some(callback),
            plugins: Vec::new(),
            max_session_steps: max_steps,
        };
        let pad_id = self.loaded.special.pad;
        let method = self.method.clone();
        let objective = self.objective.clone();
        let total_steps = self.total_steps()?;
        let data = Self::data(&self.data)?;
        let fit_data = FitData {
            train: (&data.train).into(),
            validation: &data.validation,
            pad_id,
            method: method.as_ref(),
            objective: Some(&objective),
        };
        let result = fit(
            self.loaded.model.as_ref(),
            fit_data,
            &self.recipe.training,
            &self.recipe.output,
            &self.device,
            &opts,
        );
        let last = last.lock().ok().and_then(|l| *l);
        match result {
            Ok(summary) => {
                self.paused = !summary.finished;
                self.step = summary.steps;
                Ok(TrainReport {
                    status: if summary.finished {
                        TrainStatus::Finished
                    } else {
                        TrainStatus::Paused
                    },
                    step: summary.steps,
                    total_steps: summary.total_steps,
                    last_loss: summary.final_train_loss,
                    summary: Some(summary),
                })
            }
            Err(Error::Cancelled) => {
                self.paused = true;
                if let Some((step, _)) = last {
                    self.step = step;
                }
                Ok(TrainReport {
                    status: TrainStatus::Cancelled,
                    step: self.step,
                    total_steps,
                    last_loss: last.map(|(_, loss)| loss),
                    summary: None,
                })
            }
            Err(e) => {
                self.paused = false;
                Err(e)
            }
        }
    }

    /// Evaluates the active adapter (or model) on the recipe's validation examples: mean loss
    /// and accuracy (classification) or perplexity (language modelling).
    pub fn evaluate(&mut self) -> Result<EvalMetrics> {
        let batch_size = self.recipe.training.eval_batch_size();
        let pad_id = self.loaded.special.pad;
        self.ensure_data()?;
        let data = Self::data(&self.data)?;
        if data.validation.is_empty() {
            return Err(Error::config(
                "the session's data has no validation examples: configure [data] validation = \
                 [\"file\"] or validation_ratio = 0.2",
            ));
        }
        let validation = &data.validation;
        evaluate(
            self.loaded.model.as_ref(),
            validation,
            batch_size,
            pad_id,
            &self.device,
        )
    }

    /// Generates a continuation of `prompt` (or the chat answer to it) with the active adapter.
    pub fn generate(&self, prompt: &str, opts: &GenerateOptions) -> Result<Generation> {
        crate::model::generate::generate(&self.loaded, prompt, opts, &mut |_| {})
    }

    fn encoder(&self) -> Result<&dyn crate::model::SentenceEncoder> {
        self.loaded.model.as_encoder().ok_or_else(|| {
            Error::config(format!(
                "{} ({}) is not an encoder: embeddings need one (e.g. all-MiniLM-L6-v2)",
                self.loaded.source.display(),
                self.loaded.model.architecture()
            ))
        })
    }

    /// The width of [`Session::embed`]'s vectors (encoder models only).
    pub fn embedding_dim(&self) -> Result<usize> {
        Ok(self.encoder()?.embedding_dim())
    }

    /// The pooled sentence embedding of every text (the model's pooling, evaluation mode, with
    /// the active adapter), L2-normalised when `normalize` is set (as sentence-transformers'
    /// `Normalize` module does). Texts longer than the model's positions are cut.
    pub fn embed(&self, texts: &[&str], normalize: bool) -> Result<Embeddings> {
        let encoder = self.encoder()?;
        let dim = encoder.embedding_dim();
        let mut values = Vec::with_capacity(texts.len() * dim);
        for chunk in texts.chunks(EMBED_BATCH) {
            let ids = chunk
                .iter()
                .map(|t| self.encode_for_embedding(t))
                .collect::<Result<Vec<_>>>()?;
            let width = ids.iter().map(Vec::len).max().unwrap_or(1).max(1);
            let mut input = Vec::with_capacity(ids.len() * width);
            let mut mask = Vec::with_capacity(ids.len() * width);
            for row in &ids {
                input.extend(row.iter().copied());
                input.extend(std::iter::repeat_n(
                    self.loaded.special.pad,
                    width - row.len(),
                ));
                mask.extend(std::iter::repeat_n(1u32, row.len()));
                mask.extend(std::iter::repeat_n(0u32, width - row.len()));
            }
            let shape = (ids.len(), width);
            let input = Tensor::from_vec(input, shape, &self.device)?;
            let mask = Tensor::from_vec(mask, shape, &self.device)?;
            let pooled = encoder.embed(&input, &mask)?.detach();
            for mut row in pooled.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()? {
                if normalize {
                    let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
                    row.iter_mut().for_each(|x| *x /= norm);
                }
                values.extend(row);
            }
        }
        Ok(Embeddings { dim, values })
    }

    /// Token ids of `text` for embedding, cut to the model's positions (keeping the final
    /// special token, `[SEP]`).
    fn encode_for_embedding(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .loaded
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        let max = self.loaded.max_positions.max(2);
        if ids.len() > max {
            let end = ids[ids.len() - 1];
            ids.truncate(max - 1);
            ids.push(end);
        }
        Ok(ids)
    }

    /// The adapter that computes now, if it is a PEFT adapter.
    fn active_adapter(&self) -> Option<&Arc<MethodAdapter>> {
        match &self.active {
            Active::Own => self.method.as_ref(),
            Active::Loaded(name) => self.adapters.get(name),
            Active::Base => None,
        }
    }

    /// Writes the active adapter to `dir` as a PEFT adapter (`adapter_config.json` +
    /// `adapter_model.safetensors`).
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let adapter = self.active_adapter().ok_or_else(|| {
            Error::config(
                "no PEFT adapter is active: full and partial fine-tuning train the model itself \
                 (write it with write_merged), and a detached session computes with the base model",
            )
        })?;
        crate::adapter::save(
            self.loaded.model.as_ref(),
            adapter,
            &self.recipe.model.path,
            dir,
        )
    }

    /// Writes the model with the active adapter merged into its weights to `dir` (a Hugging
    /// Face directory: f32 safetensors, `config.json`, tokenizer). The session keeps computing
    /// with the unmerged adapter afterwards. Without a PEFT adapter the model is written as it
    /// is (a full or partial fine-tune).
    pub fn write_merged(&mut self, dir: &Path) -> Result<PathBuf> {
        let Some(adapter) = self.active_adapter().cloned() else {
            return crate::adapter::write_merged(&self.loaded, dir);
        };
        let model = self.loaded.model.as_ref();
        let weights: Vec<(Arc<Param>, Tensor)> = model
            .linears()
            .into_iter()
            .filter(|l| adapter.wrapped_modules().contains(&l.name))
            .map(|l| (l.weight().clone(), l.weight().tensor()))
            .collect();
        crate::adapter::merge(model, &adapter)?;
        let written = crate::adapter::write_merged(&self.loaded, dir);
        for (param, value) in &weights {
            param.set_value(value)?;
        }
        adapter.activate(model)?;
        written
    }

    /// Before leaving the own method: the adapter set must restore the base values it trained.
    fn leave_own(&mut self) -> Result<()> {
        if self.active == Active::Own {
            if let Some(m) = &self.method {
                self.adapters.rebase(&m.base_params())?;
            }
        }
        Ok(())
    }

    /// Loads the PEFT adapter in `dir` under `name` and makes it the active one (for
    /// evaluation, generation and embedding; only the own method trains).
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<()> {
        if name == OWN_METHOD_NAME {
            return Err(Error::config(format!(
                "`{OWN_METHOD_NAME}` names the session's own method; load the adapter under \
                 another name"
            )));
        }
        if self.has_own && self.method.is_none() {
            return Err(Error::config(
                "this session fine-tunes the model's own weights (method kind = full or \
                 partial); adapters load over a frozen base: detach the method first",
            ));
        }
        self.leave_own()?;
        let model = self.loaded.model.as_ref();
        match self.adapters.load(model, dir, name, &self.plugins) {
            Ok(_) => {
                self.active = Active::Loaded(name.to_string());
                Ok(())
            }
            Err(e) => {
                // The set restored its own active adapter (or none); put the own method back.
                if self.active == Active::Own {
                    self.switch_to_own()?;
                }
                Err(e)
            }
        }
    }

    fn switch_to_own(&mut self) -> Result<()> {
        let model = self.loaded.model.as_ref();
        self.adapters.deactivate(model)?;
        if let Some(m) = &self.method {
            m.activate(model)?;
        }
        self.active = Active::Own;
        Ok(())
    }

    /// Makes adapter `name` compute: a loaded adapter's name, [`OWN_METHOD_NAME`] for the
    /// session's own method, or `None` for the base model alone.
    pub fn set_adapter(&mut self, name: Option<&str>) -> Result<()> {
        match name {
            Some(OWN_METHOD_NAME) => {
                if !self.has_own {
                    return Err(Error::config(
                        "the session has no method of its own (it was detached); attach one",
                    ));
                }
                if self.active != Active::Own {
                    self.switch_to_own()?;
                }
            }
            Some(name) => {
                self.leave_own()?;
                self.adapters.activate(self.loaded.model.as_ref(), name)?;
                self.active = Active::Loaded(name.to_string());
            }
            None => {
                self.leave_own()?;
                self.adapters.deactivate(self.loaded.model.as_ref())?;
                self.active = Active::Base;
            }
        }
        Ok(())
    }

    /// Unloads the loaded adapter `name` (the base model computes if it was active).
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        if name == OWN_METHOD_NAME {
            return Err(Error::config(
                "the session's own method is removed with detach_method",
            ));
        }
        self.adapters.remove(self.loaded.model.as_ref(), name)?;
        if self.active == Active::Loaded(name.to_string()) {
            self.active = Active::Base;
        }
        Ok(())
    }

    /// Replaces the session's own method with `method` (a plugin's parameters are initialised
    /// from the recipe's seed) and makes it the active one; the next `train` starts a new run.
    pub fn attach_method(&mut self, method: MethodSpec) -> Result<()> {
        let mut method = method;
        if let MethodSpec::Plugin { config, .. } = &mut method {
            crate::plugin::resolve::tokenize_fields(config, &self.loaded.tokenizer)?;
        }
        self.leave_own()?;
        let model = self.loaded.model.as_ref();
        self.adapters.deactivate(model)?;
        let attached =
            apply_method_with_plugins(model, &method, &self.plugins, self.recipe.training.seed)?;
        self.method = attached;
        self.recipe.method = method;
        self.has_own = true;
        self.active = Active::Own;
        self.paused = false;
        Ok(())
    }

    /// Removes the session's own method: its hooks come off, every parameter is frozen and the
    /// base model computes (loaded adapters stay loaded).
    pub fn detach_method(&mut self) -> Result<()> {
        if !self.has_own {
            return Err(Error::config("the session has no method attached"));
        }
        self.leave_own()?;
        let model = self.loaded.model.as_ref();
        self.adapters.deactivate(model)?;
        MethodAdapter::deactivate(model);
        model.params().freeze_all()?;
        self.method = None;
        self.has_own = false;
        self.active = Active::Base;
        self.paused = false;
        Ok(())
    }
}
