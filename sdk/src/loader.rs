//! The [`DataLoader`] trait: turns the bytes of the user's data files into records.

use serde::de::DeserializeOwned;

use crate::types::ConfigField;
use crate::Result;

/// A data loader. It reads the files the user named through [`crate::host::data_files`] and
/// yields records the host tokenizes and batches: `{"text", "label"}`,
/// `{"prompt", "completion"}` or `{"messages": [...]}`.
pub trait DataLoader: Send + 'static {
    /// The loader's configuration.
    type Config: DeserializeOwned;

    /// A loader from its configuration.
    fn new(config: Self::Config) -> Result<Self>
    where
        Self: Sized;

    /// The configuration fields, for `whet plugin list` and the docs.
    fn config_fields() -> Vec<ConfigField>
    where
        Self: Sized,
    {
        Vec::new()
    }

    /// The next record, or `None` at the end of the data.
    fn next_record(&mut self) -> Result<Option<serde_json::Value>>;
}
