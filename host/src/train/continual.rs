//! Continual learning: a sequence of tasks trained one after another on the same model and
//! method, with experience replay, the task events and gradient pass that methods such as EWC
//! use, and the accuracy matrix that measures forgetting.
//!
//! A recipe with a `[continual]` section lists its tasks as `[[continual.tasks]]` tables: a
//! `name` plus any `[data]` fields the task changes (`train`, `validation`, `file_labels`, ...);
//! everything else comes from `[data]` and `[training]`. Each task trains with a fresh optimizer
//! and schedule (`fit`), in its own output folder `tasks/<index>-<name>/`. Then:
//!
//! 1. if the method asks for it (`task_gradient_examples`) and a task follows, the host runs
//!    forward and backward on that many of the task's training examples, one at a time, in evaluation mode (no dropout)
//!    with the data loss only, and sends a `task-gradient` event after each, during which the
//!    plugin reads the gradients (`grad`);
//! 2. the method hears `task-end`;
//! 3. `replay_examples` of the task's training examples (a seeded sample) join the replay
//!    buffer, and every later task's training set gains `replay_ratio / (1 − replay_ratio)` times
//!    its size in examples drawn from the buffer, so that on average a share `replay_ratio` of each
//!    batch replays earlier tasks (experience replay, Chaudhry et al. 2019, "On Tiny Episodic
//!    Memories in Continual Learning");
//! 4. every task seen so far is evaluated on its validation set: row `i` of the accuracy matrix
//!    holds the accuracy on tasks `0..=i` after training task `i`, and the forgetting of a task is
//!    its best earlier accuracy minus its final one (Chaudhry et al. 2018).

use std::fmt;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use whetstone_sdk::Event;

use super::eval::{evaluate, EvalMetrics};
use super::run::{check_label_count, fit, load_run, save_adapter, write_recipe_copy};
use super::run::{FitData, LoadedRun};
use super::run::{RunOptions, RunSummary};
use super::trainer::Objective;
use crate::data::{collate, DataConfig, Example};
use crate::model::{Mode, Model};
use crate::plugin::method::MethodAdapter;
use crate::recipe::{OutputConfig, Recipe, TrainingConfig};
use crate::{Error, Result};
use candle_core::Device;

/// The `[continual]` section of a recipe.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContinualConfig {
    /// The tasks, in training order (`[[continual.tasks]]`).
    pub tasks: Vec<TaskSpec>,
    /// Training examples of each finished task kept in the replay buffer (a seeded uniform
    /// sample; all of them when the task has fewer). 0 turns replay off.
    #[serde(default)]
    pub replay_examples: usize,
    /// The share of each later task's training examples drawn from the replay buffer, at least
    /// 0 and below 1 (0.2: one example in five replays an earlier task).
    #[serde(default)]
    pub replay_ratio: f64,
}

/// One task of a continual-learning recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task's name (in logs, folders and the report).
    pub name: String,
    /// `[data]` fields this task sets (`train`, `validation`, `file_labels`, ...); the others
    /// come from `[data]`.
    #[serde(flatten)]
    pub data: toml::Table,
}

impl ContinualConfig {
    /// Refuses an empty or ambiguous task list, replay settings out of range, and tasks whose
    /// data settings are invalid or hold no validation data (forgetting needs it).
    pub fn validate(&self, base: &DataConfig) -> Result<()> {
        if base.streaming {
            return Err(Error::config(
                "[data] streaming = true is not supported with [continual] yet; each task's data \
                 is read into memory (set streaming = false)",
            ));
        }
        if self.tasks.is_empty() {
            return Err(Error::config(
                "[continual] lists no task; add [[continual.tasks]] tables with a name and their \
                 data (train = [...])",
            ));
        }
        for (i, task) in self.tasks.iter().enumerate() {
            if task.name.trim().is_empty() {
                return Err(Error::config(format!(
                    "[[continual.tasks]] number {} has an empty name",
                    i + 1
                )));
            }
            if self.tasks[..i].iter().any(|t| t.name == task.name) {
                return Err(Error::config(format!(
                    "two continual tasks are named `{}`; give each a name of its own",
                    task.name
                )));
            }
            let data = task_data(base, task)?;
            data.validate()
                .map_err(|e| Error::config(format!("continual task `{}`: {e}", task.name)))?;
            if data.validation.is_empty() && data.validation_ratio == 0.0 {
                return Err(Error::config(format!(
                    "continual task `{}` has no validation data, so its forgetting cannot be \
                     measured; set validation files or a validation_ratio above 0",
                    task.name
                )));
            }
        }
        if !(0.0..1.0).contains(&self.replay_ratio) {
            return Err(Error::config(format!(
                "[continual] replay_ratio = {} must be at least 0 and below 1",
                self.replay_ratio
            )));
        }
        if self.replay_ratio > 0.0 && self.replay_examples == 0 {
            return Err(Error::config(
                "[continual] replay_ratio > 0 needs replay_examples > 0 (how many examples of \
                 each finished task to keep)",
            ));
        }
        Ok(())
    }
}

/// The data settings of `task`: `[data]` with the task's fields laid over it.
pub fn task_data(base: &DataConfig, task: &TaskSpec) -> Result<DataConfig> {
    let mut table = toml::Table::try_from(base)
        .map_err(|e| Error::config(format!("cannot read [data] back: {e}")))?;
    for (key, value) in &task.data {
        table.insert(key.clone(), value.clone());
    }
    table.try_into().map_err(|e: toml::de::Error| {
        Error::config(format!("continual task `{}`: {}", task.name, e.message()))
    })
}

/// What one task of a continual-learning run reports.
#[derive(Debug, Clone, Serialize)]
pub struct TaskResult {
    /// The task's name.
    pub name: String,
    /// Optimizer steps of the task.
    pub steps: usize,
    /// The task's own training examples.
    pub train_examples: usize,
    /// Replayed examples of earlier tasks added to its training set.
    pub replayed_examples: usize,
    /// Mean seconds per step.
    pub seconds_per_step: f64,
    /// Examples of the gradient pass after the task (0 when the method asks for none, and after
    /// the last task).
    pub gradient_examples: usize,
    /// Its own validation result right after it trained.
    pub eval_after_training: Option<EvalMetrics>,
}

/// A continual-learning run's results.
#[derive(Debug, Clone, Serialize)]
pub struct ContinualReport {
    /// `accuracy` for classification, `loss` for language modelling.
    pub metric: String,
    /// Per task, in training order.
    pub tasks: Vec<TaskResult>,
    /// `matrix[i][j]`: the metric on task `j`'s validation set after training task `i`
    /// (`j ≤ i`).
    pub matrix: Vec<Vec<f64>>,
    /// The mean of the last row: every task's metric at the end.
    pub final_average: f64,
    /// Per task but the last: how much worse it ended than at its best earlier point (accuracy
    /// lost, or loss gained).
    pub forgetting: Vec<f64>,
    /// The mean of `forgetting` (none with a single task).
    pub mean_forgetting: Option<f64>,
}

impl ContinualReport {
    fn new(metric: &str, tasks: Vec<TaskResult>, matrix: Vec<Vec<f64>>) -> ContinualReport {
        let higher_is_better = metric == "accuracy";
        let last = matrix.last().cloned().unwrap_or_default();
        let final_average = last.iter().sum::<f64>() / last.len().max(1) as f64;
        let forgetting: Vec<f64> = (0..last.len().saturating_sub(1))
            .map(|j| {
                let earlier = matrix[j..matrix.len() - 1].iter().map(|row| row[j]);
                if higher_is_better {
                    earlier.fold(f64::MIN, f64::max) - last[j]
                } else {
                    last[j] - earlier.fold(f64::MAX, f64::min)
                }
            })
            .collect();
        let mean_forgetting = (!forgetting.is_empty())
            .then(|| forgetting.iter().sum::<f64>() / forgetting.len() as f64);
        ContinualReport {
            metric: metric.to_string(),
            tasks,
            matrix,
            final_average,
            forgetting,
            mean_forgetting,
        }
    }
}

impl fmt::Display for ContinualReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "continual learning ({} after each task):", self.metric)?;
        let names: Vec<&str> = self.tasks.iter().map(|t| t.name.as_str()).collect();
        writeln!(f, "  after \\ on      {}", names.join("  "))?;
        for (i, row) in self.matrix.iter().enumerate() {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:.4}")).collect();
            writeln!(f, "  {:<15} {}", names[i], cells.join("  "))?;
        }
        write!(f, "  final average {:.4}", self.final_average)?;
        if let Some(m) = self.mean_forgetting {
            write!(f, ", mean forgetting {m:.4}")?;
        }
        Ok(())
    }
}

/// The replay buffer: examples of finished tasks.
#[derive(Debug, Default)]
struct ReplayBuffer {
    examples: Vec<Example>,
}

impl ReplayBuffer {
    /// Keeps a seeded sample of `keep` of `examples`.
    fn add_task(&mut self, examples: &[Example], keep: usize, seed: u64) {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(seed));
        self.examples
            .extend(order.into_iter().take(keep).map(|i| examples[i].clone()));
    }

    /// `count` examples drawn from the buffer (each at most once per pass over it).
    fn draw(&self, count: usize, seed: u64) -> Vec<Example> {
        let mut drawn = Vec::with_capacity(count);
        let mut rng = StdRng::seed_from_u64(seed);
        while drawn.len() < count && !self.examples.is_empty() {
            let mut order: Vec<usize> = (0..self.examples.len()).collect();
            order.shuffle(&mut rng);
            let missing = count - drawn.len();
            drawn.extend(
                order
                    .into_iter()
                    .take(missing)
                    .map(|i| self.examples[i].clone()),
            );
        }
        drawn
    }
}

/// How a gradient pass picks and batches its examples.
#[derive(Debug, Clone, Copy)]
pub struct PassSettings<'a> {
    /// How many examples (fewer when the task has fewer).
    pub count: usize,
    /// Padding token id.
    pub pad_id: u32,
    /// The model's device.
    pub device: &'a Device,
    /// Seed of the choice of examples.
    pub seed: u64,
}

/// Runs forward and backward on `settings.count` seeded-chosen examples, one at a time, in
/// evaluation mode with the data loss only, and sends the method a `task-gradient` event after
/// each while the gradients are published. Returns how many examples it used.
pub fn gradient_pass(
    model: &dyn Model,
    method: &MethodAdapter,
    task: u32,
    examples: &[Example],
    settings: PassSettings<'_>,
) -> Result<usize> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(settings.seed));
    order.truncate(settings.count);
    // Forward and backward build graphs per example; the plugin reads the gradients in between.
    let ctx = model.forward_context();
    ctx.set_gradient_pass(true);
    let result = (|| {
        for (k, &i) in order.iter().enumerate() {
            let batch = collate(&[&examples[i]], settings.pad_id, settings.device)?;
            let logits = model.forward(&batch.input_ids, &batch.attention_mask, Mode::Eval)?;
            let loss = model.loss(&logits, &batch.labels)?;
            let grads = loss.backward()?;
            ctx.set_gradients(Some(Arc::new(grads)));
            let heard = method.on_event(&Event::TaskGradient {
                task,
                example: k as u32,
            });
            ctx.set_gradients(None);
            heard?;
        }
        Ok(order.len())
    })();
    ctx.set_gradient_pass(false);
    result
}

/// The metric of a validation result: accuracy for classification, loss otherwise.
fn metric_of(m: &EvalMetrics) -> f64 {
    m.accuracy.unwrap_or(m.loss)
}

/// One task's tokenized examples.
#[derive(Debug, Clone)]
pub struct TaskExamples {
    /// The task's name.
    pub name: String,
    /// Its training examples.
    pub train: Vec<Example>,
    /// Its validation examples (required: forgetting is measured on them).
    pub validation: Vec<Example>,
}

/// Trains `tasks` one after another on `model` (whose trainable parameters are chosen and whose
/// method, if any, is attached): replay, `fit` per task in `<output>/tasks/<index>-<name>/`,
/// the method's gradient pass and task events, and the evaluation of every task seen so far.
/// Returns the report and the last task's summary.
#[allow(clippy::too_many_arguments)]
pub fn train_sequence(
    model: &dyn Model,
    method: Option<&Arc<MethodAdapter>>,
    objective: Option<&Objective>,
    tasks: &[TaskExamples],
    replay: (usize, f64),
    pad_id: u32,
    training: &TrainingConfig,
    output: &OutputConfig,
    device: &Device,
    opts: &RunOptions,
) -> Result<(ContinualReport, RunSummary)> {
    let (replay_examples, replay_ratio) = replay;
    let seed = training.seed;
    let mut buffer = ReplayBuffer::default();
    let mut matrix: Vec<Vec<f64>> = Vec::new();
    let mut results = Vec::new();
    let mut metric = "accuracy";
    let mut last_summary = None;
    for (t, task) in tasks.iter().enumerate() {
        if task.validation.is_empty() {
            return Err(Error::config(format!(
                "continual task `{}` has no validation examples; forgetting is measured on them",
                task.name
            )));
        }
        let index = t as u32;
        let replay_count = if replay_ratio > 0.0 {
            (replay_ratio / (1.0 - replay_ratio) * task.train.len() as f64).round() as usize
        } else {
            0
        };
        let replayed = buffer.draw(replay_count, seed ^ (0x5EED_0000 + t as u64));
        let replayed_examples = replayed.len();
        // The task's own examples are copied only when replayed ones join them.
        let mixed: Vec<Example>;
        let train: &[Example] = if replayed.is_empty() {
            &task.train
        } else {
            mixed = [task.train.as_slice(), &replayed].concat();
            &mixed
        };
        tracing::info!(
            task = task.name.as_str(),
            train = task.train.len(),
            replayed = replayed_examples,
            validation = task.validation.len(),
            "continual task {} of {}",
            t + 1,
            tasks.len()
        );
        if let Some(m) = method {
            m.on_event(&Event::TaskStart(index))?;
        }
        let task_output = OutputConfig {
            dir: output.dir.join("tasks").join(format!("{t}-{}", task.name)),
            ..output.clone()
        };
        let fit_data = FitData {
            train: train.into(),
            validation: &task.validation,
            pad_id,
            method,
            objective,
        };
        let summary = fit(model, fit_data, training, &task_output, device, opts)?;
        let mut gradient_examples = 0;
        if let Some(m) = method {
            // No later task can use what the last one would consolidate.
            let wanted = if t + 1 < tasks.len() {
                m.task_gradient_examples()?
            } else {
                0
            };
            if wanted > 0 {
                let started = std::time::Instant::now();
                let settings = PassSettings {
                    count: wanted,
                    pad_id,
                    device,
                    seed: seed ^ t as u64,
                };
                gradient_examples = gradient_pass(model, m, index, &task.train, settings)?;
                tracing::info!(
                    task = task.name.as_str(),
                    examples = gradient_examples,
                    seconds = started.elapsed().as_secs_f64(),
                    "gradient pass for the method"
                );
            }
            m.on_event(&Event::TaskEnd(index))?;
        }
        if replay_examples > 0 {
            buffer.add_task(&task.train, replay_examples, seed ^ (0xB0FF + t as u64));
        }
        let mut row = Vec::with_capacity(t + 1);
        for earlier in &tasks[..=t] {
            let m = evaluate(
                model,
                &earlier.validation,
                training.eval_batch_size(),
                pad_id,
                device,
            )?;
            if m.accuracy.is_none() {
                metric = "loss";
            }
            tracing::info!(
                after = task.name.as_str(),
                on = earlier.name.as_str(),
                loss = m.loss,
                accuracy = m.accuracy,
                "continual evaluation"
            );
            row.push(metric_of(&m));
        }
        matrix.push(row);
        results.push(TaskResult {
            name: task.name.clone(),
            steps: summary.steps,
            train_examples: task.train.len(),
            replayed_examples,
            seconds_per_step: summary.seconds_per_step,
            gradient_examples,
            eval_after_training: summary.final_eval,
        });
        last_summary = Some(summary);
    }
    let Some(summary) = last_summary else {
        return Err(Error::config("the task sequence is empty"));
    };
    Ok((ContinualReport::new(metric, results, matrix), summary))
}

/// Trains the task sequence of `recipe` (which must have a `[continual]` section). Every
/// task's data is read and tokenized before the first step, so a broken file stops the run
/// before hours of training.
pub fn run(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary> {
    let Some(continual) = &recipe.continual else {
        return Err(Error::config("the recipe has no [continual] section"));
    };
    if opts.resume {
        return Err(Error::config(
            "--resume is not supported for continual-learning recipes yet; start the task \
             sequence again",
        ));
    }
    let LoadedRun {
        device,
        loaded,
        method,
        objective,
        plugin_paths,
    } = load_run(recipe, opts)?;
    let model = loaded.model.as_ref();
    let mut tasks = Vec::with_capacity(continual.tasks.len());
    let mut skipped = 0;
    for task in &continual.tasks {
        let data = crate::data::prepare_with_plugins(
            &task_data(&recipe.data, task)?,
            &loaded,
            &plugin_paths,
        )?;
        check_label_count(data.label_count, model)?;
        skipped += data.skipped;
        tasks.push(TaskExamples {
            name: task.name.clone(),
            train: data.train,
            validation: data.validation,
        });
    }
    write_recipe_copy(recipe)?;
    let (report, mut summary) = train_sequence(
        model,
        method.as_ref(),
        Some(&objective),
        &tasks,
        (continual.replay_examples, continual.replay_ratio),
        loaded.special.pad,
        &recipe.training,
        &recipe.output,
        &device,
        opts,
    )?;
    tracing::info!("{report}");
    let path = recipe.output.dir.join("continual.json");
    let text = serde_json::to_string_pretty(&report)
        .map_err(|e| Error::config(format!("cannot write {}: {e}", path.display())))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    summary.skipped_records = skipped;
    summary.output_dir = recipe.output.dir.clone();
    summary.train_examples = tasks.iter().map(|t| t.train.len()).sum();
    summary.validation_examples = tasks.iter().map(|t| t.validation.len()).sum();
    summary.adapter_dir = save_adapter(recipe, model, method.as_ref())?;
    summary.continual = Some(report);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, data: &str) -> TaskSpec {
        TaskSpec {
            name: name.into(),
            data: toml::from_str(data).unwrap(),
        }
    }

    #[test]
    fn a_task_lays_its_fields_over_the_data_section() {
        let mut base = DataConfig::new(vec![]);
        base.max_seq_len = 64;
        let task = spec("b", "train = [\"b.json\"]\nvalidation_ratio = 0.1");
        let data = task_data(&base, &task).unwrap();
        assert_eq!(data.train, vec!["b.json".to_string()]);
        assert_eq!(data.validation_ratio, 0.1);
        assert_eq!(data.max_seq_len, 64);
        let typo = spec("c", "trian = [\"c.json\"]");
        let message = task_data(&base, &typo).unwrap_err().to_string();
        assert!(
            message.contains("task `c`") && message.contains("trian"),
            "{message}"
        );
    }

    #[test]
    fn bad_sequences_are_refused_by_name() {
        let base = DataConfig::new(vec![]);
        let ok = spec("a", "train = [\"a.json\"]");
        let cases = [
            (vec![], 0, 0.0, "lists no task"),
            (
                vec![ok.clone(), ok.clone()],
                0,
                0.0,
                "two continual tasks are named `a`",
            ),
            (
                vec![spec("x", "validation_ratio = 0.2")],
                0,
                0.0,
                "task `x`",
            ),
            (
                vec![spec("v", "train = [\"v.json\"]\nvalidation_ratio = 0.0")],
                0,
                0.0,
                "no validation data",
            ),
            (vec![ok.clone()], 0, 0.5, "replay_examples"),
            (vec![ok.clone()], 10, 1.0, "replay_ratio"),
        ];
        for (tasks, replay_examples, replay_ratio, needle) in cases {
            let cfg = ContinualConfig {
                tasks,
                replay_examples,
                replay_ratio,
            };
            let message = cfg.validate(&base).unwrap_err().to_string();
            assert!(message.contains(needle), "{needle}: {message}");
        }
    }

    #[test]
    fn forgetting_is_the_drop_from_the_best_earlier_accuracy() {
        let task = |name: &str| TaskResult {
            name: name.into(),
            steps: 1,
            train_examples: 1,
            replayed_examples: 0,
            seconds_per_step: 0.0,
            gradient_examples: 0,
            eval_after_training: None,
        };
        let matrix = vec![vec![0.9], vec![0.8, 0.7], vec![0.6, 0.75, 0.95]];
        let r = ContinualReport::new("accuracy", vec![task("a"), task("b"), task("c")], matrix);
        assert!((r.forgetting[0] - 0.3).abs() < 1e-12);
        assert!((r.forgetting[1] + 0.05).abs() < 1e-12);
        assert!((r.final_average - (0.6 + 0.75 + 0.95) / 3.0).abs() < 1e-12);
        let loss = ContinualReport::new(
            "loss",
            vec![task("a"), task("b")],
            vec![vec![1.0], vec![1.5, 0.5]],
        );
        assert!((loss.forgetting[0] - 0.5).abs() < 1e-12);
    }

    #[test]
    fn replay_draws_cycle_through_the_buffer() {
        let ex = |id: u32| Example {
            input_ids: vec![id],
            labels: crate::data::ExampleLabels::Class(0),
        };
        let mut buffer = ReplayBuffer::default();
        let task: Vec<Example> = (0..10).map(ex).collect();
        buffer.add_task(&task, 4, 1);
        assert_eq!(buffer.examples.len(), 4);
        let drawn = buffer.draw(10, 2);
        assert_eq!(drawn.len(), 10);
        // The first four draws are the four buffered examples, each once.
        let mut first: Vec<u32> = drawn[..4].iter().map(|e| e.input_ids[0]).collect();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), 4);
        assert!(ReplayBuffer::default().draw(5, 0).is_empty());
    }
}
