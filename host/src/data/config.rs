//! The `[data]` section of a recipe: which files to read, how their fields map onto records, and
//! how records become training examples (sequence length, packing, loss masking, split).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which tokens of a causal-LM example the loss is computed on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// Only the completion of `{"prompt","completion"}` records and the assistant turns of
    /// `{"messages"}` records (supervised fine-tuning). Plain `{"text"}` records train on all
    /// their tokens either way.
    #[default]
    Completion,
    /// Every token, prompts and user turns included.
    All,
}

/// The file formats the host reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line (`.jsonl`, `.ndjson`).
    JsonLines,
    /// A JSON array of objects (`.json`); a `.json` file whose content starts with `{` is read as
    /// JSON lines, as many tools write them that way.
    Json,
    /// Comma-separated values with a header row (`.csv`).
    Csv,
    /// Tab-separated values with a header row (`.tsv`, `.tab`).
    Tsv,
}

impl Format {
    /// Parses a `format` value of the recipe (`jsonl`, `json`, `csv`, `tsv`).
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" | "jsonlines" => Ok(Format::JsonLines),
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            "tsv" => Ok(Format::Tsv),
            other => Err(Error::config(format!(
                "[data] format = \"{other}\" is not supported; use \"jsonl\", \"json\", \"csv\" or \"tsv\""
            ))),
        }
    }

    /// The format a file's extension implies.
    pub fn from_extension(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" => Ok(Format::JsonLines),
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            "tsv" | "tab" => Ok(Format::Tsv),
            _ => Err(Error::config(format!(
                "cannot tell the format of {} from its extension; set [data] format = \"jsonl\", \
                 \"json\", \"csv\" or \"tsv\"",
                path.display()
            ))),
        }
    }
}

/// The `[data]` section of a recipe.
///
/// Records come in three shapes: `{"text", "label"}` (classification, or plain language
/// modelling when there is no label), `{"prompt", "completion"}` and
/// `{"messages": [{"role", "content"}, ...]}` (supervised fine-tuning). The field names are
/// configurable so that existing datasets read as they are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training files: paths, or `asset:NAME/FILE` for a fetched asset
    /// (`asset:uci-sentiment/imdb.json`). Records of all files are concatenated in order.
    /// Required (in a continual-learning recipe, each task names its own).
    #[serde(default)]
    pub train: Vec<String>,
    /// Validation files. When empty, a `validation_ratio` share of the training records is held
    /// out instead.
    #[serde(default)]
    pub validation: Vec<String>,
    /// Share of the training records held out for validation when `validation` is empty
    /// (0 disables validation; must be below 1).
    #[serde(default = "default_validation_ratio")]
    pub validation_ratio: f64,
    /// Seed of the shuffle that splits training and validation records (the same seed always
    /// gives the same split).
    #[serde(default = "default_split_seed")]
    pub split_seed: u64,
    /// File format: `jsonl`, `json`, `csv` or `tsv`. By default it follows each file's extension.
    /// Not used with a `loader`.
    #[serde(default)]
    pub format: Option<String>,
    /// A data-loader plugin that reads the files instead of the built-in formats
    /// (`[data.loader]`, `kind = "chatterbot"`; every other field is the loader's
    /// configuration). It gets the bytes of the `train` files (and, separately, of the
    /// `validation` files) and yields records, which are mapped by the `*_field` settings below
    /// as a built-in format's are. A folder in `train` or `validation` stands for the files in
    /// it, in name order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader: Option<crate::plugin::PluginSpec>,
    /// Field (or CSV column) holding the text of `{"text", "label"}` records.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Field holding the class label: an integer, or a string listed in `label_names`.
    /// The UCI sentiment files call it `class`.
    #[serde(default = "default_label_field")]
    pub label_field: String,
    /// Field holding the prompt of `{"prompt", "completion"}` records.
    #[serde(default = "default_prompt_field")]
    pub prompt_field: String,
    /// Field holding the completion of `{"prompt", "completion"}` records.
    #[serde(default = "default_completion_field")]
    pub completion_field: String,
    /// Field holding the conversation (`[{"role", "content"}, ...]`) of chat records. In a CSV
    /// file this column holds the conversation as a JSON string.
    #[serde(default = "default_messages_field")]
    pub messages_field: String,
    /// Names of the classes, in id order. When set, string labels are mapped to their position
    /// in this list; when empty, labels must be integers.
    #[serde(default)]
    pub label_names: Vec<String>,
    /// Labels for whole files, keyed by the file as written in `train` / `validation`: every
    /// record of that file gets the label (an integer, or a name from `label_names`), whatever
    /// its own label field holds; for datasets kept as one file per class, or to give a file's
    /// records a task of their own (`{"asset:uci-sentiment/amazon.json" = 0}`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub file_labels: std::collections::BTreeMap<String, serde_json::Value>,
    /// Maximum number of tokens of an example; longer examples are truncated (and counted).
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Causal LM only: concatenate examples (separated by the end-of-sequence token) and cut the
    /// stream into chunks of exactly `max_seq_len` tokens instead of padding each example.
    #[serde(default)]
    pub packing: bool,
    /// What to do with a record that cannot be used (missing field, empty text, bad label):
    /// `false` stops with an error naming the file and line; `true` skips it and counts it in the
    /// summary.
    #[serde(default)]
    pub skip_bad_records: bool,
    /// Read at most this many usable records from the `train` files (and as many from the
    /// `validation` files); handy for quick runs.
    #[serde(default)]
    pub max_records: Option<usize>,
    /// Causal LM: train on the completion / assistant tokens only (`completion`, default) or on
    /// every token (`all`).
    #[serde(default)]
    pub loss_on: LossOn,
    /// Causal LM: turn `{"text", "label"}` records into instructions. Each becomes a
    /// conversation whose user turn is this template with `{text}` replaced by the record's text
    /// and whose assistant turn is the label's name from `label_names` (which must be set).
    /// After training, the held-out records are answered by generation and the answer accuracy
    /// is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instruction_template: Option<String>,
    /// Stream the training files instead of reading them into memory: every epoch reads them
    /// again, tokenizes on the way and shuffles through a buffer of `shuffle_buffer` examples,
    /// so a dataset larger than memory trains in bounded memory. Needs `[training] max_steps`
    /// (the number of batches is not known in advance). Held-out examples (from `validation`,
    /// or the `validation_ratio` share chosen by a seeded hash of file and line) stay in memory.
    #[serde(default)]
    pub streaming: bool,
    /// With `streaming`: how many examples the shuffle buffer holds (more mixes better and
    /// costs memory). Default 10000.
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// With `instruction_template`: answer at most this many held-out questions after training
    /// (generation is slow on a CPU); all of them by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_answer_examples: Option<usize>,
}

fn default_validation_ratio() -> f64 {
    0.2
}
fn default_shuffle_buffer() -> usize {
    10_000
}

fn default_split_seed() -> u64 {
    42
}
fn default_text_field() -> String {
    "text".into()
}
fn default_label_field() -> String {
    "label".into()
}
fn default_prompt_field() -> String {
    "prompt".into()
}
fn default_completion_field() -> String {
    "completion".into()
}
fn default_messages_field() -> String {
    "messages".into()
}
fn default_max_seq_len() -> usize {
    128
}

impl DataConfig {
    /// A configuration reading `train` with every other field at its default.
    pub fn new(train: Vec<String>) -> Self {
        Self {
            train,
            validation: Vec::new(),
            validation_ratio: default_validation_ratio(),
            split_seed: default_split_seed(),
            format: None,
            loader: None,
            text_field: default_text_field(),
            label_field: default_label_field(),
            prompt_field: default_prompt_field(),
            completion_field: default_completion_field(),
            messages_field: default_messages_field(),
            label_names: Vec::new(),
            file_labels: Default::default(),
            max_seq_len: default_max_seq_len(),
            packing: false,
            skip_bad_records: false,
            max_records: None,
            loss_on: LossOn::default(),
            instruction_template: None,
            max_answer_examples: None,
            streaming: false,
            shuffle_buffer: default_shuffle_buffer(),
        }
    }

    /// Checks the values that serde cannot check.
    pub fn validate(&self) -> Result<()> {
        if self.train.is_empty() {
            return Err(Error::config(
                "[data] train lists no file; name at least one dataset file",
            ));
        }
        if !(0.0..1.0).contains(&self.validation_ratio) {
            return Err(Error::config(format!(
                "[data] validation_ratio = {} must be at least 0 and below 1",
                self.validation_ratio
            )));
        }
        if self.max_seq_len < 2 {
            return Err(Error::config(format!(
                "[data] max_seq_len = {} is too small; use at least 2 (typically 128 to 2048)",
                self.max_seq_len
            )));
        }
        if self.streaming && self.shuffle_buffer == 0 {
            return Err(Error::config(
                "[data] shuffle_buffer = 0 cannot shuffle; use at least 1 (default 10000)",
            ));
        }
        if self.max_records == Some(0) {
            return Err(Error::config(
                "[data] max_records = 0 would read nothing; remove it or raise it",
            ));
        }
        if let Some(format) = &self.format {
            if let Some(loader) = &self.loader {
                return Err(Error::config(format!(
                    "[data] format = \"{format}\" and [data.loader] kind = \"{}\" both say how to \
                     read the files; keep one",
                    loader.kind
                )));
            }
            Format::parse(format)?;
        }
        if let Some(file) = self
            .file_labels
            .keys()
            .find(|f| !self.train.contains(f) && !self.validation.contains(f))
        {
            return Err(Error::config(format!(
                "[data] file_labels names `{file}`, which is in neither train nor validation;                  write the file exactly as it is listed there"
            )));
        }
        Ok(())
    }

    /// The format of `path`: the configured one, or the one its extension implies.
    pub fn format_of(&self, path: &Path) -> Result<Format> {
        match &self.format {
            Some(name) => Format::parse(name),
            None => Format::from_extension(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let cfg: DataConfig = toml::from_str("train = [\"a.jsonl\"]").unwrap();
        assert_eq!(cfg.max_seq_len, 128);
        assert_eq!(cfg.validation_ratio, 0.2);
        assert_eq!(cfg.split_seed, 42);
        assert_eq!(cfg.loss_on, LossOn::Completion);
        assert_eq!(cfg.label_field, "label");
        cfg.validate().unwrap();
        let err = toml::from_str::<DataConfig>("train = [\"a\"]\nlabel_feild = \"x\"").unwrap_err();
        assert!(err.to_string().contains("label_feild"), "{err}");
        let cfg: DataConfig = toml::from_str("train = [\"a\"]\nloss_on = \"all\"").unwrap();
        assert_eq!(cfg.loss_on, LossOn::All);
    }

    #[test]
    fn validation_of_values() {
        let mut cfg = DataConfig::new(vec!["a.jsonl".into()]);
        cfg.validation_ratio = 1.0;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("validation_ratio"));
        cfg.validation_ratio = 0.1;
        cfg.format = Some("parquet".into());
        assert!(cfg.validate().unwrap_err().to_string().contains("parquet"));
    }

    #[test]
    fn formats_from_extension() {
        assert_eq!(
            Format::from_extension(Path::new("x.JSONL")).unwrap(),
            Format::JsonLines
        );
        assert_eq!(
            Format::from_extension(Path::new("x.json")).unwrap(),
            Format::Json
        );
        assert_eq!(
            Format::from_extension(Path::new("x.tsv")).unwrap(),
            Format::Tsv
        );
        assert!(Format::from_extension(Path::new("x.txt")).is_err());
    }
}
