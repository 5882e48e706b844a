//! Data path: records, tokenization, masking, batching.
//!
//! The stages are kept apart so that reading can move into data-loader plugins:
//! - [`records`]: files (JSON lines, JSON arrays, CSV, TSV) to [`Record`]s, each with its file
//!   and line;
//! - [`sources`]: the files of a `train` / `validation` list (folders expanded), read by those
//!   formats or by a data-loader plugin;
//! - [`stream`]: streamed training data (`streaming = true`): read, tokenized and shuffled
//!   through a bounded buffer each epoch;
//! - [`template`]: chat templates (the model's Jinja template, or ChatML);
//! - [`tokenize`]: records to [`Example`]s (truncation, prompt / assistant-turn masking, packing);
//! - [`prepare`](mod@prepare): the whole path from a `[data]` section and a model, with the seeded
//!   train/validation split;
//! - [`batch`]: seeded per-epoch batch order and padding into a [`crate::model::Batch`].

pub mod batch;
pub mod config;
pub mod instruct;
pub mod prepare;
pub mod records;
pub mod sources;
pub mod stream;
pub mod template;
pub mod tokenize;

pub use batch::{collate, BatchOrder};
pub use config::{DataConfig, Format, LossOn};
pub use prepare::{prepare, prepare_with, prepare_with_plugins, PreparedData};
pub use records::{Record, SourcedRecord};
pub use stream::{prepare_streaming, StreamingData};
pub use template::{ChatMessage, ChatTemplate};
pub use tokenize::{Example, ExampleLabels};
