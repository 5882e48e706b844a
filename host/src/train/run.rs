//! The training loop: epochs of seeded batches, gradient accumulation, periodic evaluation,
//! metrics, best/last checkpoints, exact resume and cancellation ([`fit`]); and the whole
//! fine-tune a recipe describes ([`run`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use super::checkpoint::{self, LossPoint, TrainerState};
use super::eval::{evaluate, EvalMetrics};
use super::metrics::{read_complete_metrics, MetricsRecord, MetricsWriter};
use super::plot::plot_losses;
use super::progress::Progress;
use super::trainer::{Objective, StepStats, Trainer};
use crate::data::{collate, BatchOrder, Example};
use crate::model::Model;
use crate::plugin::method::MethodAdapter;
use crate::recipe::{MethodSpec, OutputConfig, Recipe, TrainingConfig};
use crate::{Error, Result};
use whetstone_sdk::Event;

/// Called after every optimizer step (progress reporting for embedders, tests).
pub type StepCallback = Arc<dyn Fn(&StepStats) + Send + Sync>;

/// How to run a recipe, besides the recipe itself.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Continue from `<output>/last/`: same parameters, optimizer state, position in the data and
    /// history.
    pub resume: bool,
    /// Checked between steps; when set, the run saves `last/` and stops with
    /// [`Error::Cancelled`].
    pub cancel: Option<Arc<AtomicBool>>,
    /// Show the progress bar (only drawn when stderr is a terminal).
    pub progress: bool,
    /// Called after every optimizer step.
    pub on_step: Option<StepCallback>,
    /// Plugin manifests to search (from `--plugin PATH`) before the recipe's and the plugin
    /// directory.
    pub plugins: Vec<PathBuf>,
    /// Stop after this many optimizer steps of this call, saving `last/` so that a call with
    /// `resume` continues exactly there (the summary then has `finished: false`). `None` trains
    /// to the end.
    pub max_session_steps: Option<usize>,
}

impl fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunOptions")
            .field("resume", &self.resume)
            .field("cancel", &self.cancel)
            .field("progress", &self.progress)
            .field("on_step", &self.on_step.as_ref().map(|_| "<callback>"))
            .field("plugins", &self.plugins)
            .field("max_session_steps", &self.max_session_steps)
            .finish()
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Optimizer steps taken (over all resumed sessions).
    pub steps: usize,
    /// Steps the whole run takes.
    pub total_steps: usize,
    /// Whether the run reached its last step (false when `max_session_steps` paused it).
    pub finished: bool,
    /// Mean loss of the last step.
    pub final_train_loss: Option<f64>,
    /// Evaluation at the end of the run (none without a validation set).
    pub final_eval: Option<EvalMetrics>,
    /// The best evaluation of the run.
    pub best_eval: Option<EvalMetrics>,
    /// The step of the best evaluation.
    pub best_step: Option<usize>,
    /// Scalars that trained.
    pub trainable_params: usize,
    /// Scalars of the whole model.
    pub total_params: usize,
    /// Training tokens per second (forward, backward and update time of this session).
    pub tokens_per_s: f64,
    /// Mean seconds of forward, backward and update per optimizer step (this session).
    pub seconds_per_step: f64,
    /// Peak resident memory of the process in MiB, when the system reports it.
    pub peak_rss_mb: Option<f64>,
    /// Evaluation before the first step (with `training.eval_at_start`): the starting point,
    /// e.g. the untrained classification head.
    pub initial_eval: Option<EvalMetrics>,
    /// Wall time of the run in seconds (over all resumed sessions).
    pub elapsed_s: f64,
    /// Bad records skipped while reading the data.
    pub skipped_records: usize,
    /// Training examples.
    pub train_examples: usize,
    /// Validation examples.
    pub validation_examples: usize,
    /// Training loss of every step.
    pub loss_history: Vec<LossPoint>,
    /// Where checkpoints, metrics and the plot were written.
    pub output_dir: PathBuf,
    /// The PEFT adapter directory, when the method was a plugin.
    pub adapter_dir: Option<PathBuf>,
    /// Held-out answer accuracy by generation (with `[data] instruction_template`).
    pub answers: Option<super::answers::AnswerMetrics>,
    /// A continual-learning run's per-task results and accuracy matrix. Then `steps`, the
    /// losses, evaluations and timings describe its last task, while the example counts cover
    /// every task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continual: Option<super::continual::ContinualReport>,
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let share = 100.0 * self.trainable_params as f64 / self.total_params.max(1) as f64;
        writeln!(f, "steps:            {}", self.steps)?;
        if let Some(loss) = self.final_train_loss {
            writeln!(f, "final train loss: {loss:.4}")?;
        }
        let describe = |m: &EvalMetrics| {
            let mut s = format!("loss {:.4}", m.loss);
            if let Some(a) = m.accuracy {
                s += &format!(", accuracy {a:.4}");
            }
            if let Some(p) = m.perplexity {
                s += &format!(", perplexity {p:.3}");
            }
            s + &format!(" ({} examples)", m.examples)
        };
        if let Some(m) = &self.initial_eval {
            writeln!(f, "initial eval:     {}", describe(m))?;
        }
        if let Some(m) = &self.final_eval {
            writeln!(f, "final eval:       {}", describe(m))?;
        }
        if let (Some(m), Some(step)) = (&self.best_eval, self.best_step) {
            writeln!(f, "best eval:        {} at step {step}", describe(m))?;
        }
        if let Some(a) = &self.answers {
            writeln!(
                f,
                "answer accuracy:  {:.4} ({} held-out questions answered by generation)",
                a.accuracy, a.examples
            )?;
        }
        writeln!(
            f,
            "trainable params: {} of {} ({share:.2}%)",
            self.trainable_params, self.total_params
        )?;
        writeln!(
            f,
            "throughput:       {:.0} tokens/s, {:.3} s/step",
            self.tokens_per_s, self.seconds_per_step
        )?;
        if let Some(mb) = self.peak_rss_mb {
            writeln!(f, "peak memory:      {mb:.0} MiB resident")?;
        }
        writeln!(f, "elapsed:          {:.1} s", self.elapsed_s)?;
        writeln!(
            f,
            "examples:         {} train, {} validation",
            self.train_examples, self.validation_examples
        )?;
        writeln!(f, "skipped records:  {}", self.skipped_records)?;
        if let Some(report) = &self.continual {
            writeln!(f, "{report}")?;
        }
        write!(f, "output:           {}", self.output_dir.display())
    }
}

/// Where the training examples come from.
#[derive(Debug, Clone, Copy)]
pub enum TrainSource<'a> {
    /// Examples in memory, in a seeded order per epoch.
    Examples(&'a [Example]),
    /// Examples streamed from the files each epoch (`[data] streaming = true`).
    Stream(&'a crate::data::StreamingData),
}

impl<'a> From<&'a [Example]> for TrainSource<'a> {
    fn from(examples: &'a [Example]) -> Self {
        TrainSource::Examples(examples)
    }
}

impl<'a> From<&'a Vec<Example>> for TrainSource<'a> {
    fn from(examples: &'a Vec<Example>) -> Self {
        TrainSource::Examples(examples)
    }
}

/// A batch: borrowed from memory, or owned when streamed.
type BatchExamples<'a> = Vec<std::borrow::Cow<'a, Example>>;
/// The batches of one epoch, from a given batch on.
type EpochBatches<'a> =
    std::iter::Peekable<Box<dyn Iterator<Item = Result<BatchExamples<'a>>> + 'a>>;

impl<'a> TrainSource<'a> {
    /// Batches per epoch, when known before reading (not for a stream).
    fn batches_per_epoch(&self, order: Option<&BatchOrder>) -> Option<usize> {
        match self {
            TrainSource::Examples(_) => order.map(BatchOrder::num_batches),
            TrainSource::Stream(_) => None,
        }
    }

    /// The batches of `epoch` from batch `skip` on.
    fn epoch(
        &self,
        order: Option<&BatchOrder>,
        epoch: usize,
        skip: usize,
        batch_size: usize,
        seed: u64,
        counts: Option<Arc<crate::data::stream::StreamCounts>>,
    ) -> Result<EpochBatches<'a>> {
        use std::borrow::Cow;
        let batches: Box<dyn Iterator<Item = Result<BatchExamples<'a>>> + 'a> = match (*self, order)
        {
            (TrainSource::Examples(examples), Some(order)) => Box::new(
                order
                    .batches(epoch)
                    .into_iter()
                    .skip(skip)
                    .map(move |indices| {
                        Ok(indices
                            .iter()
                            .map(|&i| Cow::Borrowed(&examples[i]))
                            .collect())
                    }),
            ),
            (TrainSource::Stream(stream), _) => {
                let mut examples = stream.epoch(epoch, seed, counts)?;
                let mut batches = std::iter::from_fn(move || {
                    let mut batch = Vec::with_capacity(batch_size);
                    for example in examples.by_ref() {
                        match example {
                            Ok(e) => batch.push(Cow::Owned(e)),
                            Err(e) => return Some(Err(e)),
                        }
                        if batch.len() == batch_size {
                            break;
                        }
                    }
                    (!batch.is_empty()).then_some(Ok(batch))
                });
                // Reading is deterministic: a resumed epoch skips the batches already trained.
                for _ in 0..skip {
                    if let Some(Err(e)) = batches.next() {
                        return Err(e);
                    }
                }
                Box::new(batches)
            }
            (TrainSource::Examples(_), None) => {
                return Err(Error::config("in-memory examples need a batch order"))
            }
        };
        Ok(batches.peekable())
    }
}

/// Tokenized examples to train on.
#[derive(Debug, Clone, Copy)]
pub struct FitData<'a> {
    /// Training examples.
    pub train: TrainSource<'a>,
    /// Validation examples (may be empty: then there is no evaluation and no `best/`).
    pub validation: &'a [Example],
    /// Padding token id.
    pub pad_id: u32,
    /// The attached PEFT method plugin, if the method is one: its parameters train and it hears
    /// the lifecycle events.
    pub method: Option<&'a Arc<MethodAdapter>>,
    /// A loss plugin and teacher replacing the model's cross-entropy (`None`: the model's).
    pub objective: Option<&'a Objective>,
}

/// Makes the parameters the method names trainable (and freezes the rest). A plugin method is
/// loaded and attached (see [`apply_method_with_plugins`]).
pub fn apply_method(model: &dyn Model, method: &MethodSpec) -> Result<()> {
    apply_method_with_plugins(model, method, &[], 0).map(|_| ())
}

/// [`apply_method`], searching `plugins` (manifest paths) first for a plugin method, whose
/// parameters are initialised from `seed`. Returns the attached plugin method.
pub fn apply_method_with_plugins(
    model: &dyn Model,
    method: &MethodSpec,
    plugins: &[PathBuf],
    seed: u64,
) -> Result<Option<Arc<MethodAdapter>>> {
    let params = model.params();
    match method {
        MethodSpec::Full => params.iter().try_for_each(|p| p.set_trainable(true))?,
        MethodSpec::Partial { trainable } => {
            params.freeze_all()?;
            params.set_trainable_by_patterns(trainable)?;
        }
        MethodSpec::Plugin {
            id,
            transport,
            config,
        } => {
            params.freeze_all()?;
            let manifest = crate::plugin::discover::find(id, plugins)?;
            let plugin = crate::plugin::Plugin::load(&manifest, *transport)?;
            tracing::info!(
                plugin = id.as_str(),
                transport = ?plugin.transport_kind,
                version = plugin.metadata.version.as_str(),
                "loaded method plugin"
            );
            let adapter = MethodAdapter::attach(
                model,
                plugin,
                "default",
                serde_json::Value::Object(config.clone()),
                seed,
            )?;
            return Ok(Some(adapter));
        }
    }
    Ok(None)
}

/// A recipe's model, loaded on its device, with the method applied.
pub(crate) struct LoadedRun {
    /// The device of the run.
    pub device: Device,
    /// The model with its tokenizer.
    pub loaded: crate::model::load::LoadedModel,
    /// The attached method plugin, when the method is one.
    pub method: Option<Arc<MethodAdapter>>,
    /// The `[loss]` plugin and `[teacher]`, when the recipe names them.
    pub objective: Objective,
    /// Plugin manifests to search before the plugin directory (`--plugin`, then the recipe's).
    pub plugin_paths: Vec<PathBuf>,
}

/// Opens the device, loads the model and applies the method of `recipe`.
pub(crate) fn load_run(recipe: &Recipe, opts: &RunOptions) -> Result<LoadedRun> {
    let device = recipe.training.device()?;
    let loaded = crate::model::load::load(&recipe.model, &device, recipe.training.seed)?;
    let mut plugin_paths = opts.plugins.clone();
    plugin_paths.extend(recipe.plugins.iter().cloned());
    let mut method_spec = recipe.method.clone();
    if let MethodSpec::Plugin { config, .. } = &mut method_spec {
        crate::plugin::resolve::tokenize_fields(config, &loaded.tokenizer)?;
    }
    let method = apply_method_with_plugins(
        loaded.model.as_ref(),
        &method_spec,
        &plugin_paths,
        recipe.training.seed,
    )?;
    let objective = load_objective(recipe, &loaded, &device, &plugin_paths)?;
    Ok(LoadedRun {
        device,
        loaded,
        method,
        objective,
        plugin_paths,
    })
}

/// Loads the recipe's `[loss]` plugin and `[teacher]`, if any.
pub(crate) fn load_objective(
    recipe: &Recipe,
    loaded: &crate::model::load::LoadedModel,
    device: &Device,
    plugin_paths: &[PathBuf],
) -> Result<Objective> {
    let Some(spec) = &recipe.loss else {
        return Ok(Objective::default());
    };
    let loss = crate::plugin::loss::LossAdapter::attach(
        loaded.model.as_ref(),
        spec.load(plugin_paths)?,
        spec.config_value(),
    )?;
    tracing::info!(loss = spec.kind.as_str(), "loaded loss plugin");
    let teacher = recipe
        .teacher
        .as_ref()
        .map(|t| {
            super::teacher::Teacher::load(
                t,
                device,
                recipe.training.seed,
                plugin_paths,
                &loaded.tokenizer,
            )
            .map(Arc::new)
        })
        .transpose()?;
    Ok(Objective {
        loss: Some(loss),
        teacher,
    })
}

/// Refuses data with more classes than the classification head has.
pub(crate) fn check_label_count(label_count: Option<usize>, model: &dyn Model) -> Result<()> {
    if let (Some(found), crate::model::TaskKind::SequenceClassification { num_labels }) =
        (label_count, model.task())
    {
        if found > num_labels {
            return Err(Error::config(format!(
                "the data has {found} classes but model.num_labels = {num_labels}; raise model.num_labels"
            )));
        }
    }
    Ok(())
}

/// Writes the plugin method's PEFT adapter to `<output.dir>/adapter/` and returns that folder
/// (`None` without a plugin method).
pub(crate) fn save_adapter(
    recipe: &Recipe,
    model: &dyn Model,
    method: Option<&Arc<MethodAdapter>>,
) -> Result<Option<PathBuf>> {
    let Some(m) = method else {
        return Ok(None);
    };
    let adapter_dir = recipe.output.dir.join("adapter");
    crate::adapter::save(model, m, &recipe.model.path, &adapter_dir)?;
    tracing::info!("PEFT adapter: {}", adapter_dir.display());
    Ok(Some(adapter_dir))
}

/// Creates the output directory and copies the recipe into it as `recipe.toml`.
pub(crate) fn write_recipe_copy(recipe: &Recipe) -> Result<()> {
    let dir = &recipe.output.dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let recipe_copy = dir.join("recipe.toml");
    let text = toml::to_string_pretty(recipe)
        .map_err(|e| Error::config(format!("cannot serialise the recipe: {e}")))?;
    std::fs::write(&recipe_copy, text).map_err(|e| Error::io(&recipe_copy, e))
}

/// Runs the fine-tune `recipe` describes: opens the device, loads the model, applies the
/// method, prepares the data, then [`fit`]s. The recipe is copied to `<output>/recipe.toml`.
/// A recipe with a `[continual]` task sequence runs through [`super::continual::run`].
pub fn run(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary> {
    recipe.validate()?;
    if recipe.continual.is_some() {
        return super::continual::run(recipe, opts);
    }
    let LoadedRun {
        device,
        loaded,
        method,
        objective,
        plugin_paths,
    } = load_run(recipe, opts)?;
    let model = loaded.model.as_ref();
    let (memory, stream);
    let (train, validation, answers, label_count, skipped) = if recipe.data.streaming {
        stream = crate::data::prepare_streaming(&recipe.data, &loaded, &plugin_paths)?;
        (
            TrainSource::Stream(&stream),
            &stream.validation,
            &stream.answers,
            stream.label_count,
            stream.validation_skipped,
        )
    } else {
        memory = crate::data::prepare_with_plugins(&recipe.data, &loaded, &plugin_paths)?;
        (
            TrainSource::from(&memory.train),
            &memory.validation,
            &memory.answers,
            memory.label_count,
            memory.skipped,
        )
    };
    check_label_count(label_count, model)?;
    write_recipe_copy(recipe)?;
    let dir = &recipe.output.dir;

    let fit_data = FitData {
        train,
        validation,
        pad_id: loaded.special.pad,
        method: method.as_ref(),
        objective: Some(&objective),
    };
    let mut summary = fit(
        model,
        fit_data,
        &recipe.training,
        &recipe.output,
        &device,
        opts,
    )?;
    summary.skipped_records += skipped;
    summary.adapter_dir = save_adapter(recipe, model, method.as_ref())?;
    if !answers.is_empty() {
        let limit = recipe.data.max_answer_examples;
        tracing::info!(
            questions = limit.unwrap_or(answers.len()).min(answers.len()),
            "answering held-out instructions"
        );
        let metrics = super::answers::answer_accuracy(&loaded, answers, limit)?;
        let path = dir.join("answers.json");
        let text = serde_json::to_string_pretty(&metrics)
            .map_err(|e| Error::config(format!("cannot write {}: {e}", path.display())))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        summary.answers = Some(metrics);
    }
    Ok(summary)
}

/// Whether `candidate` beats `best`: higher accuracy for classifiers, lower loss otherwise.
fn improves(candidate: &EvalMetrics, best: Option<f64>) -> (f64, &'static str, bool) {
    let (value, name, higher_is_better) = match candidate.accuracy {
        Some(a) => (a, "eval_accuracy", true),
        None => (candidate.loss, "eval_loss", false),
    };
    let better = match best {
        None => true,
        Some(b) if higher_is_better => value > b,
        Some(b) => value < b,
    };
    (value, name, better)
}

/// The loop's mutable context.
struct Session<'a> {
    model: &'a dyn Model,
    data: FitData<'a>,
    training: &'a TrainingConfig,
    output: &'a OutputConfig,
    device: &'a Device,
    trainer: Trainer,
    state: TrainerState,
    metrics: MetricsWriter,
    progress: Progress,
    started: Instant,
    elapsed_before: f64,
    session_tokens: usize,
    session_train_s: f64,
    session_steps: usize,
    /// What the first streamed epoch read (streaming only).
    first_epoch_counts: Arc<crate::data::stream::StreamCounts>,
}

impl Session<'_> {
    /// What the run reports now; `finished` says whether it reached its last step.
    fn into_summary(self, initial_eval: Option<EvalMetrics>, finished: bool) -> RunSummary {
        RunSummary {
            steps: self.state.step,
            total_steps: self.state.total_steps,
            finished,
            final_train_loss: self.state.loss_history.last().map(|p| p.loss),
            final_eval: self.state.last_eval.map(|(_, m)| m),
            best_eval: self.state.best_eval,
            best_step: self.state.best_step,
            trainable_params: self.trainer.num_trainable(),
            total_params: self.model.params().num_params(),
            tokens_per_s: if self.session_train_s > 0.0 {
                self.session_tokens as f64 / self.session_train_s
            } else {
                0.0
            },
            seconds_per_step: if self.session_steps > 0 {
                self.session_train_s / self.session_steps as f64
            } else {
                0.0
            },
            peak_rss_mb: crate::bench::peak_rss_mb(),
            initial_eval,
            elapsed_s: self.elapsed_before + self.started.elapsed().as_secs_f64(),
            skipped_records: match self.data.train {
                TrainSource::Examples(_) => 0,
                TrainSource::Stream(_) => {
                    crate::data::stream::StreamCounts::get(&self.first_epoch_counts.skipped)
                }
            },
            train_examples: match self.data.train {
                TrainSource::Examples(examples) => examples.len(),
                // Examples of the first epoch read so far (all of them once it was read whole).
                TrainSource::Stream(_) => {
                    crate::data::stream::StreamCounts::get(&self.first_epoch_counts.examples)
                }
            },
            validation_examples: self.data.validation.len(),
            loss_history: self.state.loss_history,
            output_dir: self.output.dir.clone(),
            adapter_dir: None,
            answers: None,
            continual: None,
        }
    }

    fn last_dir(&self) -> PathBuf {
        self.output.dir.join("last")
    }

    fn save_last(&mut self) -> Result<()> {
        self.state.elapsed_s = self.elapsed_before + self.started.elapsed().as_secs_f64();
        self.trainer.save_checkpoint(&self.last_dir(), &self.state)
    }

    fn evaluate_now(&mut self) -> Result<()> {
        let step = self.state.step;
        if self.data.validation.is_empty() || self.state.last_eval.is_some_and(|(s, _)| s == step) {
            return Ok(());
        }
        let m = evaluate(
            self.model,
            self.data.validation,
            self.training.eval_batch_size(),
            self.data.pad_id,
            self.device,
        )?;
        self.metrics.write(&MetricsRecord::Eval {
            step,
            epoch: self.state.epoch,
            loss: m.loss,
            accuracy: m.accuracy,
            perplexity: m.perplexity,
            examples: m.examples,
        })?;
        let mut line = format!("step {step}: eval loss {:.4}", m.loss);
        if let Some(a) = m.accuracy {
            line += &format!(", accuracy {a:.4}");
        }
        if let Some(p) = m.perplexity {
            line += &format!(", perplexity {p:.3}");
        }
        tracing::info!("{line}");
        self.progress.println(&line);
        self.state
            .eval_history
            .push(LossPoint { step, loss: m.loss });
        self.state.last_eval = Some((step, m));
        let (value, name, better) = improves(&m, self.state.best_metric);
        if better {
            self.state.best_metric = Some(value);
            self.state.best_metric_name = Some(name.to_string());
            self.state.best_step = Some(step);
            self.state.best_eval = Some(m);
            if self.output.save_best {
                self.state.elapsed_s = self.elapsed_before + self.started.elapsed().as_secs_f64();
                self.trainer
                    .save_checkpoint(&self.output.dir.join("best"), &self.state)?;
            }
        }
        Ok(())
    }

    fn record_step(&mut self, stats: &StepStats, batches: usize) -> Result<()> {
        self.state.step = stats.step;
        self.state.batch_in_epoch += batches;
        self.state.tokens_seen += stats.tokens;
        self.state.loss_history.push(LossPoint {
            step: stats.step,
            loss: stats.loss,
        });
        self.session_tokens += stats.tokens;
        self.session_steps += 1;
        self.session_train_s += stats.forward_s + stats.backward_s + stats.optimizer_s;
        let tokens_per_s = stats.tokens_per_s();
        if stats.step.is_multiple_of(self.training.log_every)
            || stats.step == self.state.total_steps
        {
            let elapsed_s = self.elapsed_before + self.started.elapsed().as_secs_f64();
            self.metrics.write(&MetricsRecord::Train {
                step: stats.step,
                epoch: self.state.epoch,
                loss: stats.loss,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                tokens_per_s,
                elapsed_s,
            })?;
            tracing::info!(
                step = stats.step,
                loss = stats.loss,
                lr = stats.lr,
                grad_norm = stats.grad_norm,
                tokens_per_s = tokens_per_s.round(),
                "train"
            );
        }
        self.progress.update(stats.step, stats.loss, tokens_per_s);
        Ok(())
    }
}

/// Keeps the metrics lines of steps up to `step` (a resumed run rewrites what came after its
/// checkpoint).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let kept: Vec<MetricsRecord> = read_complete_metrics(path)?
        .into_iter()
        .filter(|r| match r {
            MetricsRecord::Train { step: s, .. } | MetricsRecord::Eval { step: s, .. } => {
                *s <= step
            }
        })
        .collect();
    let mut writer = MetricsWriter::open(path, false)?;
    kept.iter().try_for_each(|r| writer.write(r))
}

/// Trains `model` (whose trainable parameters are already chosen) on `data`: epochs of seeded
/// batches, `gradient_accumulation_steps` micro-batches per step, evaluation every `eval_every`
/// steps, at each epoch end and at the end, metrics lines, `best/` and `last/` checkpoints, and
/// the loss plot. With `opts.resume` it continues from `<output>/last/` exactly where that
/// checkpoint stopped.
pub fn fit(
    model: &dyn Model,
    data: FitData<'_>,
    training: &TrainingConfig,
    output: &OutputConfig,
    device: &Device,
    opts: &RunOptions,
) -> Result<RunSummary> {
    training.validate()?;
    let order = match data.train {
        TrainSource::Examples([]) => return Err(Error::config("no training examples")),
        TrainSource::Examples(examples) => Some(BatchOrder::shuffled(
            examples.len(),
            training.batch_size,
            training.seed,
        )?),
        TrainSource::Stream(_) => None,
    };
    let batches_per_epoch = data.train.batches_per_epoch(order.as_ref());
    let total_steps = match (batches_per_epoch, training.max_steps) {
        (Some(n), _) => training.total_steps(n),
        (None, Some(n)) => n,
        (None, None) => {
            return Err(Error::config(
                "[data] streaming = true needs [training] max_steps: a stream's number of \
                 batches is not known before it is read",
            ))
        }
    };
    let mut trainer = Trainer::with_method(model, data.method.cloned(), training, total_steps)?
        .with_objective(data.objective.cloned().unwrap_or_default());
    let mut state = TrainerState::new(training.seed, total_steps);
    std::fs::create_dir_all(&output.dir).map_err(|e| Error::io(&output.dir, e))?;
    let metrics_path = output.dir.join(&output.metrics_file);
    if opts.resume {
        let ckpt = checkpoint::load(&output.dir.join("last"), device)?;
        if ckpt.state.total_steps != total_steps || ckpt.state.seed != training.seed {
            return Err(Error::bad_file(
                &ckpt.dir,
                format!(
                    "cannot resume: the checkpoint was written for {} steps with seed {}, this recipe gives {} steps with seed {}; \
                     keep the data, batch size, epochs and seed of the interrupted run",
                    ckpt.state.total_steps, ckpt.state.seed, total_steps, training.seed
                ),
            ));
        }
        // A schedule that unfreezes parameters over time trains the checkpoint step's set.
        model.forward_context().set_step(ckpt.state.step as u64);
        trainer.refresh_trainable(model)?;
        trainer.restore(&ckpt)?;
        state = ckpt.state;
        truncate_metrics(&metrics_path, state.step)?;
        tracing::info!(
            step = state.step,
            epoch = state.epoch,
            "resumed from {}",
            ckpt.dir.display()
        );
    } else if output
        .dir
        .join("last")
        .join(checkpoint::STATE_FILE)
        .is_file()
    {
        tracing::warn!(
            "{} holds a checkpoint; starting afresh (use --resume to continue it)",
            output.dir.display()
        );
    }
    let metrics = MetricsWriter::open(&metrics_path, opts.resume)?;
    if let Some(m) = data.method {
        m.on_event(&Event::TrainStart)?;
    }
    tracing::info!(
        trainable = trainer.num_trainable(),
        total = model.params().num_params(),
        steps = total_steps,
        batches_per_epoch = ?batches_per_epoch,
        "training"
    );
    let first_epoch_counts = Arc::new(crate::data::stream::StreamCounts::default());
    let mut s = Session {
        model,
        data,
        training,
        output,
        device,
        progress: Progress::new(total_steps, state.step, opts.progress),
        elapsed_before: state.elapsed_s,
        trainer,
        state,
        metrics,
        started: Instant::now(),
        session_tokens: 0,
        session_train_s: 0.0,
        session_steps: 0,
        first_epoch_counts: first_epoch_counts.clone(),
    };
    let mut initial_eval = None;
    if training.eval_at_start && s.state.step == 0 {
        s.evaluate_now()?;
        initial_eval = s.state.last_eval.map(|(_, m)| m);
    }
    let accumulation = training.gradient_accumulation_steps;
    while s.state.step < total_steps {
        let counts = (s.state.epoch == 0).then(|| first_epoch_counts.clone());
        let mut batches = data.train.epoch(
            order.as_ref(),
            s.state.epoch,
            s.state.batch_in_epoch,
            training.batch_size,
            training.seed,
            counts,
        )?;
        while batches.peek().is_some() && s.state.step < total_steps {
            if opts
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::SeqCst))
            {
                s.save_last()?;
                s.progress.finish();
                tracing::info!(
                    step = s.state.step,
                    "cancelled; saved {} (continue with --resume)",
                    s.last_dir().display()
                );
                return Err(Error::Cancelled);
            }
            let examples = batches
                .by_ref()
                .take(accumulation)
                .collect::<Result<Vec<_>>>()?;
            let micro = examples
                .iter()
                .map(|batch| {
                    let refs: Vec<&Example> = batch.iter().map(|e| e.as_ref()).collect();
                    collate(&refs, data.pad_id, device)
                })
                .collect::<Result<Vec<_>>>()?;
            let stats = s.trainer.train_step(model, &micro)?;
            if s.trainer.refresh_trainable(model)? {
                tracing::info!(
                    step = stats.step,
                    trainable = s.trainer.num_trainable(),
                    "the method changed which base parameters train"
                );
            }
            s.record_step(&stats, micro.len())?;
            if let Some(m) = data.method {
                m.on_event(&Event::StepEnd {
                    step: stats.step as u64,
                    loss: stats.loss,
                })?;
            }
            if let Some(callback) = &opts.on_step {
                callback(&stats);
            }
            if training.eval_every.is_some_and(|n| stats.step % n == 0) {
                s.evaluate_now()?;
            }
            if output.save_every.is_some_and(|n| stats.step % n == 0) {
                s.save_last()?;
            }
            let paused = opts
                .max_session_steps
                .is_some_and(|n| s.session_steps >= n && s.state.step < total_steps);
            if paused {
                // At an epoch's end the resumed run does the epoch-end work (event, evaluation),
                // as an uninterrupted one would.
                s.save_last()?;
                s.progress.finish();
                tracing::info!(
                    step = s.state.step,
                    "paused after {} steps; saved {}",
                    s.session_steps,
                    s.last_dir().display()
                );
                return Ok(s.into_summary(initial_eval, false));
            }
        }
        if batches.peek().is_none() {
            s.state.epoch += 1;
            s.state.batch_in_epoch = 0;
            if let Some(m) = data.method {
                m.on_event(&Event::EpochEnd(s.state.epoch as u32))?;
            }
            s.evaluate_now()?;
            s.save_last()?;
        }
    }
    s.evaluate_now()?;
    s.save_last()?;
    s.progress.finish();
    if let Some(m) = data.method {
        m.on_event(&Event::TrainEnd)?;
    }
    if output.plot {
        let path = output.dir.join("loss.png");
        match plot_losses(&path, &s.state.loss_history, &s.state.eval_history) {
            Ok(()) => tracing::info!("loss plot: {}", path.display()),
            Err(e) => tracing::warn!("no loss plot: {e}"),
        }
    }
    Ok(s.into_summary(initial_eval, true))
}
