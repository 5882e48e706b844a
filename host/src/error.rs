//! The host's error type.

use std::path::PathBuf;

/// Everything that can go wrong inside the host library.
///
/// Each variant names what was wrong and, where the user can act, how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed (shape mismatch, dtype, device).
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A file exists but its content is not what it must be.
    #[error("{path}: {message}")]
    BadFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// A record of a dataset could not be used.
    #[error("{path}:{line}: {message}")]
    BadRecord {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line (JSONL/CSV) or record number (JSON arrays).
        line: usize,
        /// What is wrong with the record.
        message: String,
    },

    /// The recipe or a configuration value is invalid.
    #[error("configuration error: {0}")]
    Config(String),

    /// A parameter name was looked up that the model does not have.
    #[error("unknown parameter `{0}` (run `whet inspect MODEL` to list parameter names)")]
    UnknownParam(String),

    /// The tokenizer failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// An asset could not be fetched, verified or unpacked.
    #[error("asset `{asset}`: {message}")]
    Asset {
        /// The asset's name.
        asset: String,
        /// What went wrong and how to fix it.
        message: String,
    },

    /// Training stopped because the loss became NaN or infinite.
    #[error("loss became {value} at step {step}; lower the learning rate or enable gradient clipping (max_grad_norm)")]
    NonFiniteLoss {
        /// The optimizer step at which it happened.
        step: usize,
        /// The non-finite value.
        value: f32,
    },

    /// A plugin failed, trapped, timed out or was refused; names the plugin and the call.
    #[error("plugin `{plugin}`: {call}: {message}")]
    Plugin {
        /// The plugin's id (or its path before the id is known).
        plugin: String,
        /// The contract call (`load`, `create-method`, `forward-linear`, ...).
        call: String,
        /// What went wrong.
        message: String,
    },

    /// The run was cancelled by the user or a callback.
    #[error("cancelled")]
    Cancelled,
}

/// Result type of the host library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A file whose content is wrong.
    pub fn bad_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A plugin error.
    pub fn plugin(
        plugin: impl Into<String>,
        call: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Error::Plugin {
            plugin: plugin.into(),
            call: call.into(),
            message: message.into(),
        }
    }

    /// An invalid configuration value.
    pub fn config(message: impl Into<String>) -> Self {
        Error::Config(message.into())
    }
}
