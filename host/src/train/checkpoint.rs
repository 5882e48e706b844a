//! Training checkpoints: the trainable parameters, the optimizer state and a JSON
//! `trainer_state.json`, written atomically.
//!
//! A checkpoint is a directory (`<output>/last/`, `<output>/best/`) holding
//! - `trainable.safetensors`: the trainable parameters under their Hugging Face names;
//! - `optimizer.safetensors`: AdamW's moments (`exp_avg.<name>`, `exp_avg_sq.<name>`) and
//!   per-parameter update counts (`step.<name>`);
//! - `trainer_state.json`: [`TrainerState`] (step, epoch, position in the epoch, best metric,
//!   seed, loss history).
//!
//! Atomicity: the files are written and synced into a temporary sibling directory
//! (`.<name>.tmp-<pid>`) of the same parent, which then replaces the checkpoint by renames. A
//! crash leaves either the previous checkpoint or the new one, never a mix; if it strikes between
//! the two renames, [`load`] finds the previous checkpoint under `.<name>.old-<pid>`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::eval::EvalMetrics;
use crate::{Error, Result};

/// File name of the trainable parameters inside a checkpoint directory.
pub const PARAMS_FILE: &str = "trainable.safetensors";
/// File name of the optimizer state inside a checkpoint directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File name of the trainer state inside a checkpoint directory.
pub const STATE_FILE: &str = "trainer_state.json";

/// Version of the `trainer_state.json` layout.
pub const STATE_FORMAT: u32 = 1;

/// One point of the training-loss history.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossPoint {
    /// Optimizer step (1-based) after which the loss was measured.
    pub step: usize,
    /// Mean training loss of that step's micro-batches.
    pub loss: f64,
}

/// Where a run stands: everything besides tensors that `--resume` needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Layout version ([`STATE_FORMAT`]).
    pub format: u32,
    /// Optimizer steps completed.
    pub step: usize,
    /// Total optimizer steps the run was planned with.
    pub total_steps: usize,
    /// The epoch (0-based) the next batch comes from.
    pub epoch: usize,
    /// Batches of that epoch already consumed (micro-batches, in the seeded order).
    pub batch_in_epoch: usize,
    /// The seed of the run (data order, dropout, initialisation).
    pub seed: u64,
    /// Name of the metric that selects `best/` (`eval_loss`, `eval_accuracy`).
    pub best_metric_name: Option<String>,
    /// Best value of that metric so far.
    pub best_metric: Option<f64>,
    /// Step at which the best value was reached.
    pub best_step: Option<usize>,
    /// The full evaluation at the best step.
    #[serde(default)]
    pub best_eval: Option<EvalMetrics>,
    /// Training tokens processed so far.
    pub tokens_seen: usize,
    /// Training wall time so far, in seconds (summed over resumed sessions).
    pub elapsed_s: f64,
    /// Training loss per step.
    pub loss_history: Vec<LossPoint>,
    /// The latest evaluation and the step it ran after.
    #[serde(default)]
    pub last_eval: Option<(usize, EvalMetrics)>,
    /// Evaluation loss per evaluation, as `(step, loss)` points.
    #[serde(default)]
    pub eval_history: Vec<LossPoint>,
}

impl TrainerState {
    /// The state at the start of a run.
    pub fn new(seed: u64, total_steps: usize) -> Self {
        Self {
            format: STATE_FORMAT,
            step: 0,
            total_steps,
            epoch: 0,
            batch_in_epoch: 0,
            seed,
            best_metric_name: None,
            best_metric: None,
            best_step: None,
            best_eval: None,
            last_eval: None,
            tokens_seen: 0,
            elapsed_s: 0.0,
            loss_history: Vec::new(),
            eval_history: Vec::new(),
        }
    }
}

/// A checkpoint read back from disk.
#[derive(Debug)]
pub struct Checkpoint {
    /// Trainable parameters by name.
    pub params: HashMap<String, Tensor>,
    /// Optimizer state tensors by name.
    pub optimizer: HashMap<String, Tensor>,
    /// Trainer state.
    pub state: TrainerState,
    /// The directory it was read from.
    pub dir: PathBuf,
}

fn sibling(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| {
        Error::config(format!(
            "checkpoint path `{}` has no directory name",
            dir.display()
        ))
    })?;
    let parent = dir.parent().unwrap_or_else(|| Path::new("."));
    Ok(parent.join(format!(
        ".{}.{tag}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

fn sync_file(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::bad_file(path, format!("cannot write safetensors: {e}")))?;
    sync_file(path)
}

/// Writes a checkpoint to `dir` atomically (see the module docs), replacing any previous one.
pub fn save(
    dir: &Path,
    params: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    state: &TrainerState,
) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let staging = sibling(dir, "tmp")?;
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    let written = (|| -> Result<()> {
        save_tensors(&staging.join(PARAMS_FILE), params)?;
        save_tensors(&staging.join(OPTIMIZER_FILE), optimizer)?;
        let json = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::config(format!("cannot serialise trainer state: {e}")))?;
        let state_path = staging.join(STATE_FILE);
        fs::write(&state_path, json).map_err(|e| Error::io(&state_path, e))?;
        sync_file(&state_path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    let old = sibling(dir, "old")?;
    if dir.exists() {
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    fs::rename(&staging, dir).map_err(|e| Error::io(dir, e))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// A previous checkpoint left under `.<name>.old-<pid>` by a save that was interrupted between
/// its two renames.
fn interrupted_previous(dir: &Path) -> Option<PathBuf> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    let parent = dir.parent().unwrap_or_else(|| Path::new("."));
    let prefix = format!(".{name}.old-");
    fs::read_dir(parent)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
                && p.join(STATE_FILE).is_file()
        })
}

/// Reads the checkpoint in `dir`, putting its tensors on `device`.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let dir = if dir.join(STATE_FILE).is_file() {
        dir.to_path_buf()
    } else if let Some(previous) = interrupted_previous(dir) {
        tracing::warn!(
            "{} is missing; using the previous checkpoint {}",
            dir.display(),
            previous.display()
        );
        previous
    } else {
        return Err(Error::bad_file(
            dir,
            format!("no checkpoint here (no {STATE_FILE}); start without --resume or point to a run's output dir"),
        ));
    };
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&state_path, format!("invalid trainer state: {e}")))?;
    if state.format != STATE_FORMAT {
        return Err(Error::bad_file(
            &state_path,
            format!(
                "trainer state format {} is not supported (this build reads {STATE_FORMAT})",
                state.format
            ),
        ));
    }
    let read = |file: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(file);
        candle_core::safetensors::load(&path, device)
            .map_err(|e| Error::bad_file(&path, format!("cannot read safetensors: {e}")))
    };
    Ok(Checkpoint {
        params: read(PARAMS_FILE)?,
        optimizer: read(OPTIMIZER_FILE)?,
        state,
        dir,
    })
}
