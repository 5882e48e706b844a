//! Training engine: AdamW, learning-rate schedules, gradient clipping, checkpoints, metrics,
//! evaluation, the progress bar, the loss plot, and the loop that runs a recipe.
//!
//! - [`Trainer`] takes one optimizer step over a set of micro-batches;
//! - [`fit`] runs the whole loop over prepared examples (epochs, accumulation, evaluation,
//!   checkpoints, resume, cancellation);
//! - [`run`](fn@run) does everything a recipe asks: device, model, method, data, then [`fit`].

pub mod answers;
pub mod checkpoint;
pub mod clip;
pub mod continual;
pub mod eval;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod run;
pub mod schedule;
pub mod teacher;
pub mod trainer;

pub use eval::{evaluate, EvalMetrics};
pub use run::{fit, run, FitData, RunOptions, RunSummary, StepCallback, TrainSource};
pub use trainer::{Objective, StepStats, Trainer};
