//! Run metrics as JSON Lines: one object per logged training step (`"kind": "train"`) and per
//! evaluation (`"kind": "eval"`), flushed line by line so that a crashed run keeps its history.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One line of the metrics file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum MetricsRecord {
    /// A training step.
    Train {
        /// Optimizer step (1-based).
        step: usize,
        /// Epoch (0-based) the step's batches came from.
        epoch: usize,
        /// Mean loss over the step's micro-batches.
        loss: f64,
        /// Learning rate used for the update.
        lr: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Training tokens per second over the step.
        tokens_per_s: f64,
        /// Seconds since the run started.
        elapsed_s: f64,
    },
    /// An evaluation on the held-out set.
    Eval {
        /// Optimizer step after which it ran.
        step: usize,
        /// Epoch (0-based) in progress.
        epoch: usize,
        /// Mean loss.
        loss: f64,
        /// Classification accuracy.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        accuracy: Option<f64>,
        /// Language-model perplexity.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        perplexity: Option<f64>,
        /// Number of examples evaluated.
        examples: usize,
    },
}

/// Appends [`MetricsRecord`]s to a JSONL file.
#[derive(Debug)]
pub struct MetricsWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsWriter {
    /// Opens `path`, truncating it (`append = false`) or appending to it (a resumed run).
    pub fn open(path: &Path, append: bool) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// Writes one record as a line and flushes it.
    pub fn write(&mut self, record: &MetricsRecord) -> Result<()> {
        let line = serde_json::to_string(record)
            .map_err(|e| Error::config(format!("cannot serialise metrics record: {e}")))?;
        writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a metrics file back (for plots and tests).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_metrics(path, &text)
}

/// [`read_metrics`] for a file whose writer may have been killed: a last line without its
/// newline (a record cut short) is dropped.
pub fn read_complete_metrics(path: &Path) -> Result<Vec<MetricsRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let complete = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    if complete.len() < text.len() {
        tracing::warn!("{}: dropping a cut-short last record", path.display());
    }
    parse_metrics(path, complete)
}

fn parse_metrics(path: &Path, text: &str) -> Result<Vec<MetricsRecord>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::BadRecord {
                path: path.to_path_buf(),
                line: i + 1,
                message: format!("invalid metrics record: {e}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_short_last_record_is_dropped_only_when_reading_for_a_resume() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::open(&path, false).unwrap();
        let record = MetricsRecord::Eval {
            step: 3,
            epoch: 0,
            loss: 0.5,
            accuracy: Some(0.75),
            perplexity: None,
            examples: 8,
        };
        w.write(&record).unwrap();
        drop(w);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"kind\":\"train\",\"st");
        std::fs::write(&path, text).unwrap();
        assert!(read_metrics(&path).is_err());
        assert_eq!(read_complete_metrics(&path).unwrap(), vec![record]);
    }
}
