//! The [`DataLoader`] trait: turns the bytes of the user's data files into records, and the
//! plumbing most loaders share: a streaming reader over a data file ([`DataFile::reader`]), its
//! numbered lines ([`DataFile::lines`]), the JSON values of a JSON-lines or JSON-array file
//! ([`json_values`]) and a walk over every data file in order ([`EachFile`]).
//!
//! A loader never opens files itself (a WebAssembly plugin cannot): it reads the bytes of the
//! files the user named through the host, a chunk at a time, so a file larger than memory
//! streams through a loader that yields records as it goes.
//!
//! # What the host receives
//!
//! Each [`Item`] crosses the plugin boundary as one JSON object: the record's own fields, plus
//! `"$position": {"file": N, "line": N}` (which data file, which 1-based line or record number);
//! a bad record is `{"$error": "why", "$position": {...}}`. The host maps the record's fields as
//! it maps a built-in format's (`[data] text_field`, `label_names`, ...), so a loader that yields
//! the standard names (`text`/`label`, `prompt`/`completion`, `messages`) needs no mapping.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::host::DataFile;
use crate::types::ConfigField;
use crate::{Error, Result};

/// A data loader. It reads the files the user named through [`crate::host::data_files`] and
/// yields records the host tokenizes and batches: `{"text", "label"}`,
/// `{"prompt", "completion"}` or `{"messages": [{"role", "content"}, ...]}`.
///
/// Yield [`Item::Bad`] for a record that cannot be used (the host skips it with
/// `skip_bad_records = true`, or stops with an error naming file and line); return `Err` only
/// for a failure that ends the whole read (an unreadable file).
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
    fn next_record(&mut self) -> Result<Option<Item>>;
}

/// Where a record was read: the data file (its index among [`crate::host::data_files`]) and the
/// 1-based line, or record number for formats without lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Index of the data file.
    pub file: u32,
    /// 1-based line or record number.
    pub line: u64,
}

impl Position {
    /// Line `line` of `file`.
    pub fn new(file: DataFile, line: u64) -> Position {
        Position {
            file: file.index(),
            line,
        }
    }
}

/// What a loader yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A record: a JSON object with the fields of one of the record shapes.
    Record {
        /// The record's fields.
        record: Map<String, Value>,
        /// Where it was read.
        at: Position,
    },
    /// A record that cannot be used, and why.
    Bad {
        /// What is wrong with it (the host adds file and line).
        message: String,
        /// Where it was read.
        at: Position,
    },
}

impl Item {
    /// A record from a JSON value, which must be an object (anything else is a bad record).
    pub fn from_value(value: Value, at: Position) -> Item {
        match value {
            Value::Object(record) => Item::Record { record, at },
            other => Item::bad(
                format!("expected a JSON object, found {}", kind(&other)),
                at,
            ),
        }
    }

    /// A bad record.
    pub fn bad(message: impl Into<String>, at: Position) -> Item {
        Item::Bad {
            message: message.into(),
            at,
        }
    }

    /// The JSON object that crosses the plugin boundary (see the module docs).
    pub fn to_wire(&self) -> Value {
        let (mut object, at) = match self {
            Item::Record { record, at } => (record.clone(), at),
            Item::Bad { message, at } => {
                let mut object = Map::new();
                object.insert(ERROR_KEY.into(), Value::String(message.clone()));
                (object, at)
            }
        };
        object.insert(
            POSITION_KEY.into(),
            serde_json::json!({"file": at.file, "line": at.line}),
        );
        Value::Object(object)
    }
}

/// The key of a record's position in the wire form of an [`Item`].
pub const POSITION_KEY: &str = "$position";
/// The key of a bad record's message in the wire form of an [`Item`].
pub const ERROR_KEY: &str = "$error";

/// The JSON type of a value, for messages.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Bytes asked of the host per read.
const CHUNK: u32 = 1 << 20;

/// A streaming [`Read`] over a data file: the host hands over one chunk per call.
#[derive(Debug)]
pub struct FileReader {
    file: DataFile,
    offset: u64,
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf.len().min(CHUNK as usize) as u32;
        let bytes = self
            .file
            .read(self.offset, want)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        self.offset += n as u64;
        Ok(n)
    }
}

impl DataFile {
    /// A streaming reader over the file's bytes.
    pub fn reader(&self) -> FileReader {
        FileReader {
            file: *self,
            offset: 0,
        }
    }

    /// The file's lines (without their line ending), numbered from 1, streamed.
    pub fn lines(&self) -> Lines {
        Lines {
            file: *self,
            reader: BufReader::with_capacity(CHUNK as usize, self.reader()),
            line: 0,
        }
    }

    /// The file's whole content as UTF-8 text.
    pub fn read_to_string(&self) -> Result<String> {
        let bytes = self.read_to_end()?;
        String::from_utf8(bytes).map_err(|e| {
            Error::msg(format!(
                "{} is not UTF-8 text: {e}",
                self.name().unwrap_or_default()
            ))
        })
    }
}

/// The numbered lines of a data file ([`DataFile::lines`]).
#[derive(Debug)]
pub struct Lines {
    file: DataFile,
    reader: BufReader<FileReader>,
    line: u64,
}

impl Iterator for Lines {
    type Item = Result<(Position, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut text = String::new();
        match self.reader.read_line(&mut text) {
            Ok(0) => None,
            Ok(_) => {
                self.line += 1;
                let end = text.trim_end_matches(['\n', '\r']).len();
                text.truncate(end);
                Some(Ok((Position::new(self.file, self.line), text)))
            }
            Err(e) => Some(Err(Error::msg(format!(
                "{} line {}: {e}",
                self.file.name().unwrap_or_default(),
                self.line + 1
            )))),
        }
    }
}

/// A JSON value read at a position, or why the text there is not JSON.
pub type JsonValue = (Position, std::result::Result<Value, String>);
/// The iterator [`json_values`] returns.
pub type JsonValues = Box<dyn Iterator<Item = Result<JsonValue>> + Send>;

/// The JSON values of a data file with their positions: one per non-empty line of a JSON-lines
/// file (streamed), or each item of a file holding one JSON array (read whole; positions are
/// item numbers). A line that is not JSON is an [`Err`] value, to be yielded as a bad record.
pub fn json_values(file: DataFile) -> Result<JsonValues> {
    let mut head = [0u8; 1];
    let mut reader = file.reader();
    let starts_with_array = loop {
        match reader.read(&mut head) {
            Ok(0) => break false,
            Ok(_) if head[0].is_ascii_whitespace() => continue,
            Ok(_) => break head[0] == b'[',
            Err(e) => return Err(Error::msg(e.to_string())),
        }
    };
    if starts_with_array {
        let text = file.read_to_string()?;
        let items: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
            Error::msg(format!(
                "{}: expected a JSON array of records: {e}",
                file.name().unwrap_or_default()
            ))
        })?;
        let values = items
            .into_iter()
            .enumerate()
            .map(move |(i, v)| Ok((Position::new(file, i as u64 + 1), Ok(v))));
        return Ok(Box::new(values));
    }
    let values = file.lines().filter_map(|line| match line {
        Err(e) => Some(Err(e)),
        Ok((_, text)) if text.trim().is_empty() => None,
        Ok((at, text)) => Some(Ok((
            at,
            serde_json::from_str(&text).map_err(|e| format!("invalid JSON: {e}")),
        ))),
    });
    Ok(Box::new(values))
}

/// How [`EachFile`] turns one data file into items.
pub type OpenFile = Box<dyn FnMut(DataFile) -> Result<FileItems> + Send>;
/// The items of one data file.
pub type FileItems = Box<dyn Iterator<Item = Result<Item>> + Send>;

/// The items of every data file, in order: each file is opened (by the function given to
/// [`EachFile::new`]) when the one before it is done.
pub struct EachFile {
    files: VecDeque<DataFile>,
    open: OpenFile,
    current: Option<FileItems>,
}

impl std::fmt::Debug for EachFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EachFile")
            .field("files_left", &self.files.len())
            .finish()
    }
}

impl EachFile {
    /// Every file of [`crate::host::data_files`], each turned into items by `open`.
    pub fn new(open: impl FnMut(DataFile) -> Result<FileItems> + Send + 'static) -> EachFile {
        EachFile {
            files: crate::host::data_files().into(),
            open: Box::new(open),
            current: None,
        }
    }

    /// The next item of the current file, moving on to the next file at its end.
    pub fn next_item(&mut self) -> Result<Option<Item>> {
        loop {
            if let Some(items) = &mut self.current {
                match items.next() {
                    Some(item) => return item.map(Some),
                    None => self.current = None,
                }
            }
            let Some(file) = self.files.pop_front() else {
                return Ok(None);
            };
            self.current = Some((self.open)(file)?);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_carries_position_and_error() {
        let at = Position { file: 2, line: 7 };
        let record = Item::from_value(serde_json::json!({"text": "hi"}), at);
        assert_eq!(
            record.to_wire(),
            serde_json::json!({"text": "hi", "$position": {"file": 2, "line": 7}})
        );
        let bad = Item::from_value(serde_json::json!([1]), at);
        assert_eq!(
            bad.to_wire(),
            serde_json::json!({"$error": "expected a JSON object, found an array",
                               "$position": {"file": 2, "line": 7}})
        );
    }
}
