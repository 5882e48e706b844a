//! A data loader for CSV and TSV files, streamed: each row becomes an object of strings keyed by
//! the header row (or by `columns` for files without one), which the host maps with
//! `[data] text_field`, `label_field`, ... like any record; a conversation column holds JSON.
//! A row that cannot be read (unbalanced quotes, a wrong number of fields) is a bad record at
//! its line.
//!
//! ```toml
//! [data]
//! train = ["reviews.tsv"]
//! text_field = "review"
//! label_field = "stars"
//! [data.loader]
//! kind = "csv"
//! delimiter = "\t"
//! ```

use serde_json::{Map, Value};
use whetstone_sdk::loader::{EachFile, FileItems};
use whetstone_sdk::prelude::*;

/// The loader's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvConfig {
    /// The field delimiter, one ASCII character (default `,`; `"\t"` for TSV).
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Column names for files without a header row; empty (default) reads the first row as
    /// the header.
    #[serde(default)]
    pub columns: Vec<String>,
}

fn default_delimiter() -> String {
    ",".into()
}

impl CsvConfig {
    /// The delimiter as a byte.
    fn delimiter_byte(&self) -> Result<u8> {
        match self.delimiter.as_bytes() {
            [b] if b.is_ascii() => Ok(*b),
            _ => Err(Error::msg(format!(
                "delimiter = {:?} must be one ASCII character, e.g. \",\" or \"\\t\"",
                self.delimiter
            ))),
        }
    }
}

/// The CSV loader.
pub struct Csv {
    items: EachFile,
}

impl DataLoader for Csv {
    type Config = CsvConfig;

    fn new(config: CsvConfig) -> Result<Self> {
        let delimiter = config.delimiter_byte()?;
        let items = EachFile::new(move |file| {
            let reader = csv::ReaderBuilder::new()
                .delimiter(delimiter)
                .has_headers(config.columns.is_empty())
                .from_reader(file.reader());
            Ok(Box::new(rows(reader, &config.columns, file)?) as FileItems)
        });
        Ok(Csv { items })
    }

    fn config_fields() -> Vec<ConfigField> {
        vec![
            ConfigField::new(
                "delimiter",
                "string",
                ",",
                "the field delimiter (\"\\t\" for TSV)",
            ),
            ConfigField::new(
                "columns",
                "list of strings",
                "[]",
                "column names when the file has no header row",
            ),
        ]
    }

    fn next_record(&mut self) -> Result<Option<Item>> {
        self.items.next_item()
    }
}

/// The items of a CSV reader: each row keyed by the header (or `columns`).
pub fn rows<R: std::io::Read + Send + 'static>(
    mut reader: csv::Reader<R>,
    columns: &[String],
    file: DataFile,
) -> Result<impl Iterator<Item = Result<Item>> + Send> {
    let names: Vec<String> = if columns.is_empty() {
        let header = reader.headers().map_err(|e| {
            Error::msg(format!(
                "{}: cannot read the header row: {e}",
                file.name().unwrap_or_default()
            ))
        })?;
        header.iter().map(str::to_owned).collect()
    } else {
        columns.to_vec()
    };
    Ok(reader.into_records().map(move |row| {
        Ok(match row {
            Ok(row) => {
                let line = row.position().map_or(0, |p| p.line());
                let object: Map<String, Value> = names
                    .iter()
                    .zip(row.iter())
                    .map(|(name, value)| (name.clone(), Value::String(value.to_owned())))
                    .collect();
                Item::from_value(Value::Object(object), Position::new(file, line))
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                Item::bad(e.to_string(), Position::new(file, line))
            }
        })
    }))
}

whetstone_sdk::register_loader!(Csv);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delimiters_are_one_ascii_character() {
        let config = |d: &str| CsvConfig {
            delimiter: d.into(),
            columns: vec![],
        };
        assert_eq!(config("\t").delimiter_byte().unwrap(), b'\t');
        assert!(config(",,").delimiter_byte().is_err());
        assert!(config("").delimiter_byte().is_err());
    }
}
