//! Reading records from dataset files (JSON lines, JSON arrays, CSV, TSV).
//!
//! This is the part a data-loader plugin replaces: it turns bytes into [`Record`]s and knows
//! nothing of tokenizers. Each record keeps where it came from ([`SourcedRecord`]) so that every
//! later error names the file and line.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use whetstone_sdk::loader::kind;

use super::config::{DataConfig, Format};
use super::template::ChatMessage;
use crate::{Error, Result};

/// One training record, before tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A text, with a class label for classification (ignored by language modelling).
    Text {
        /// The text.
        text: String,
        /// The class id, when the record has one.
        label: Option<i64>,
    },
    /// A prompt and the completion the model should learn to produce.
    PromptCompletion {
        /// The prompt (masked out of the loss by default).
        prompt: String,
        /// The completion.
        completion: String,
    },
    /// A conversation; the assistant turns are what the model learns.
    Messages(Vec<ChatMessage>),
}

/// A record and where it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcedRecord {
    /// The record.
    pub record: Record,
    /// The file it came from.
    pub path: PathBuf,
    /// 1-based line (JSON lines, CSV) or record number (JSON arrays).
    pub line: usize,
}

impl SourcedRecord {
    /// A [`Error::BadRecord`] about this record.
    pub fn error(&self, message: impl Into<String>) -> Error {
        Error::BadRecord {
            path: self.path.clone(),
            line: self.line,
            message: message.into(),
        }
    }
}

/// How the fields of a file map onto records.
#[derive(Debug, Clone)]
pub struct FieldMap {
    /// Field of the text.
    pub text: String,
    /// Field of the class label.
    pub label: String,
    /// Field of the prompt.
    pub prompt: String,
    /// Field of the completion.
    pub completion: String,
    /// Field of the conversation.
    pub messages: String,
    /// Class names in id order (string labels map to their position); empty for integer labels.
    pub label_names: Vec<String>,
}

impl FieldMap {
    /// The field mapping of a `[data]` section.
    pub fn from_config(cfg: &DataConfig) -> Self {
        Self {
            text: cfg.text_field.clone(),
            label: cfg.label_field.clone(),
            prompt: cfg.prompt_field.clone(),
            completion: cfg.completion_field.clone(),
            messages: cfg.messages_field.clone(),
            label_names: cfg.label_names.clone(),
        }
    }

    /// Builds a record from one JSON object (a CSV row is an object of strings). The error is a
    /// message without location; the caller adds file and line.
    pub fn record(&self, object: &Map<String, Value>) -> std::result::Result<Record, String> {
        let present = |field: &str| object.get(field).is_some_and(|v| !v.is_null());
        if present(&self.messages) {
            return self.messages(&object[&self.messages]).map(Record::Messages);
        }
        if present(&self.prompt) {
            let prompt = self.string(object, &self.prompt)?;
            let completion = self.string(object, &self.completion)?;
            return Ok(Record::PromptCompletion { prompt, completion });
        }
        if object.contains_key(&self.text) {
            let text = self.string(object, &self.text)?;
            let label = self.label_of(object.get(&self.label))?;
            return Ok(Record::Text { text, label });
        }
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        Err(format!(
            "the record has none of the fields `{}`, `{}`/`{}` or `{}` (it has {keys:?}); set \
             text_field, prompt_field/completion_field or messages_field in [data]",
            self.text, self.prompt, self.completion, self.messages
        ))
    }

    /// A non-empty string field.
    fn string(
        &self,
        object: &Map<String, Value>,
        field: &str,
    ) -> std::result::Result<String, String> {
        match object.get(field) {
            Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(format!("field `{field}` is empty")),
            None | Some(Value::Null) => Err(format!("field `{field}` is missing")),
            Some(other) => Err(format!("field `{field}` must be a string, found {other}")),
        }
    }

    /// The class id of a label value (`None` when absent, null or an empty CSV cell).
    pub fn label_of(&self, value: Option<&Value>) -> std::result::Result<Option<i64>, String> {
        let field = &self.label;
        let id = match value {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(id) => id,
                None => return Err(format!("label `{n}` (field `{field}`) is not an integer")),
            },
            Some(Value::String(s)) => {
                let s = s.trim();
                if let Some(pos) = self.label_names.iter().position(|name| name == s) {
                    return Ok(Some(pos as i64));
                }
                match s.parse::<i64>() {
                    Ok(id) => id,
                    Err(_) if self.label_names.is_empty() => {
                        return Err(format!(
                            "label \"{s}\" (field `{field}`) is not an integer; list the class \
                             names in [data] label_names to map string labels to ids"
                        ))
                    }
                    Err(_) => {
                        return Err(format!(
                            "label \"{s}\" (field `{field}`) is not one of label_names {:?}",
                            self.label_names
                        ))
                    }
                }
            }
            Some(other) => {
                return Err(format!(
                    "label {other} (field `{field}`) must be an integer or a string"
                ))
            }
        };
        if id < 0 {
            return Err(format!(
                "label {id} (field `{field}`) is negative; class ids start at 0"
            ));
        }
        if !self.label_names.is_empty() && id as usize >= self.label_names.len() {
            return Err(format!(
                "label {id} (field `{field}`) is out of range for the {} label_names",
                self.label_names.len()
            ));
        }
        Ok(Some(id))
    }

    /// A conversation: an array of `{"role", "content"}` objects (or that array as a JSON string,
    /// as CSV files hold it).
    fn messages(&self, value: &Value) -> std::result::Result<Vec<ChatMessage>, String> {
        let field = &self.messages;
        let parsed;
        let value = match value {
            Value::String(s) => {
                parsed = serde_json::from_str::<Value>(s)
                    .map_err(|e| format!("field `{field}` is not a JSON list of messages: {e}"))?;
                &parsed
            }
            v => v,
        };
        let Value::Array(items) = value else {
            return Err(format!(
                "field `{field}` must be a list of {{\"role\", \"content\"}} objects"
            ));
        };
        if items.is_empty() {
            return Err(format!("field `{field}` is an empty conversation"));
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let get = |key: &str| item.get(key).and_then(Value::as_str);
                match (get("role"), get("content")) {
                    (Some(role), Some(content)) if !role.is_empty() => Ok(ChatMessage::new(role, content)),
                    _ => Err(format!(
                        "message {} of field `{field}` needs a string \"role\" and a string \"content\"",
                        i + 1
                    )),
                }
            })
            .collect()
    }
}

/// Counts skipped records, or turns the first bad one into an error.
#[derive(Debug, Clone, Copy)]
pub struct BadRecordPolicy {
    skip: bool,
    /// Records skipped so far.
    pub skipped: usize,
}

impl BadRecordPolicy {
    /// `skip = true` skips and counts bad records; `false` makes the first one an error.
    pub fn new(skip: bool) -> Self {
        Self { skip, skipped: 0 }
    }

    /// Handles a bad record: `Ok` (counted) when skipping, the error otherwise.
    pub fn bad(&mut self, error: Error) -> Result<()> {
        if !self.skip {
            return Err(error);
        }
        if self.skipped < 5 {
            tracing::warn!("skipping bad record: {error}");
        }
        self.skipped += 1;
        Ok(())
    }
}

/// One entry of a data file: its 1-based line (record number in a JSON array) and its JSON
/// value, or why the text there is not one.
pub type Entry = (usize, std::result::Result<Value, String>);

/// The entries of a data file, in order.
pub type Entries = Box<dyn Iterator<Item = Result<Entry>> + Send>;

/// Bytes read from a data file at a time.
const READ_BUFFER: usize = 1 << 20;

/// The entries of `path` in `format`, streamed: JSON lines and CSV/TSV are read a buffer at a
/// time, so a file larger than memory is fine; a JSON array is read whole.
pub fn entries(path: &Path, format: Format) -> Result<Entries> {
    let open = || std::fs::File::open(path).map_err(|e| Error::io(path, e));
    match format {
        Format::Json if !starts_with_object(path)? => json_array(path),
        Format::Json | Format::JsonLines => Ok(json_lines(path, open()?)),
        Format::Csv => delimited(path, open()?, b','),
        Format::Tsv => delimited(path, open()?, b'\t'),
    }
}

/// The record of an entry's value (an object, mapped by `fields`).
pub fn record_of(fields: &FieldMap, value: Value) -> std::result::Result<Record, String> {
    match value {
        Value::Object(object) => fields.record(&object),
        other => Err(format!("expected a JSON object, found {}", kind(&other))),
    }
}

/// Reads the records of `path` in `format`, handing bad records to `policy`, and stops after
/// `limit` usable records.
pub fn read_records(
    path: &Path,
    format: Format,
    fields: &FieldMap,
    policy: &mut BadRecordPolicy,
    limit: Option<usize>,
) -> Result<Vec<SourcedRecord>> {
    let mut records = Vec::new();
    for entry in entries(path, format)? {
        if limit.is_some_and(|n| records.len() >= n) {
            break;
        }
        let (line, value) = entry?;
        match value.and_then(|v| record_of(fields, v)) {
            Ok(record) => records.push(SourcedRecord {
                record,
                path: path.to_path_buf(),
                line,
            }),
            Err(message) => policy.bad(Error::BadRecord {
                path: path.to_path_buf(),
                line,
                message,
            })?,
        }
    }
    Ok(records)
}

/// Whether the first non-blank byte of `path` is `{` (a `.json` file of JSON lines).
fn starts_with_object(path: &Path) -> Result<bool> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    for byte in std::io::BufReader::new(file).bytes() {
        let byte = byte.map_err(|e| Error::io(path, e))?;
        if !byte.is_ascii_whitespace() {
            return Ok(byte == b'{');
        }
    }
    Ok(false)
}

fn json_lines(path: &Path, file: std::fs::File) -> Entries {
    use std::io::BufRead;
    let path = path.to_path_buf();
    let mut reader = std::io::BufReader::with_capacity(READ_BUFFER, file);
    let mut number = 0;
    let mut line = Vec::new();
    Box::new(std::iter::from_fn(move || loop {
        line.clear();
        number += 1;
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) => return Some(Err(Error::io(&path, e))),
        }
        let text = match std::str::from_utf8(&line) {
            Ok(text) => text,
            Err(e) => return Some(Ok((number, Err(format!("not UTF-8 text: {e}"))))),
        };
        if text.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str::<Value>(text).map_err(|e| format!("invalid JSON: {e}"));
        return Some(Ok((number, value)));
    }))
}

fn json_array(path: &Path) -> Result<Entries> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let items: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
        Error::bad_file(
            path,
            format!(
                "expected a JSON array of records: {e} (use format = \"jsonl\" for one object per line)"
            ),
        )
    })?;
    Ok(Box::new(
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| Ok((i + 1, Ok(item)))),
    ))
}

fn delimited(path: &Path, file: std::fs::File, delimiter: u8) -> Result<Entries> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .buffer_capacity(READ_BUFFER)
        .from_reader(file);
    let headers = reader
        .headers()
        .map_err(|e| Error::bad_file(path, format!("cannot read the header row: {e}")))?
        .clone();
    let path = path.to_path_buf();
    Ok(Box::new(reader.into_records().map(move |row| match row {
        Ok(row) => {
            let line = row.position().map_or(0, |p| p.line() as usize);
            let object: Map<String, Value> = headers
                .iter()
                .zip(row.iter())
                .map(|(h, v)| (h.to_owned(), Value::String(v.to_owned())))
                .collect();
            Ok((line, Ok(Value::Object(object))))
        }
        Err(e) => match e.position() {
            Some(pos) => Ok((pos.line() as usize, Err(e.to_string()))),
            None => Err(Error::bad_file(&path, e.to_string())),
        },
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> FieldMap {
        FieldMap::from_config(&DataConfig::new(vec![]))
    }

    fn read(name: &str, content: &str, skip: bool) -> (Result<Vec<SourcedRecord>>, usize) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        let mut policy = BadRecordPolicy::new(skip);
        let format = Format::from_extension(&path).unwrap();
        let out = read_records(&path, format, &fields(), &mut policy, None);
        (out, policy.skipped)
    }

    #[test]
    fn jsonl_shapes_and_line_numbers() {
        let content = "{\"text\":\"good\",\"label\":1}\n\n{\"prompt\":\"Q\",\"completion\":\"A\"}\n\
                       {\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n";
        let records = read("d.jsonl", content, false).0.unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(
            records[0].record,
            Record::Text {
                text: "good".into(),
                label: Some(1)
            }
        );
        assert_eq!(records[1].line, 3);
        assert_eq!(
            records[1].record,
            Record::PromptCompletion {
                prompt: "Q".into(),
                completion: "A".into()
            }
        );
        assert!(
            matches!(&records[2].record, Record::Messages(m) if m.len() == 2 && m[1].content == "yo")
        );
        assert_eq!(records[2].line, 4);
    }

    #[test]
    fn bad_jsonl_line_is_an_error_or_skipped() {
        let content = "{\"text\":\"a\"}\n{\"text\":\"b\",\n{\"txt\":\"c\"}\n{\"text\":\"d\"}\n";
        let err = read("d.jsonl", content, false).0.unwrap_err();
        match err {
            Error::BadRecord { line, ref path, .. } => {
                assert_eq!(line, 2);
                assert!(path.ends_with("d.jsonl"));
            }
            other => panic!("unexpected {other}"),
        }
        let (records, skipped) = read("d.jsonl", content, true);
        assert_eq!(records.unwrap().len(), 2);
        assert_eq!(skipped, 2);
    }

    #[test]
    fn json_array_with_record_numbers() {
        let content = r#"[{"text":"a","label":0},{"text":"","label":null}]"#;
        let err = read("d.json", content, false).0.unwrap_err().to_string();
        assert!(err.contains("d.json:2:") && err.contains("empty"), "{err}");
    }

    #[test]
    fn csv_and_tsv_with_string_labels() {
        let content = "text,label\n\"hello, world\",1\nbye,0\n";
        let records = read("d.csv", content, false).0.unwrap();
        assert_eq!(
            records[0].record,
            Record::Text {
                text: "hello, world".into(),
                label: Some(1)
            }
        );
        assert_eq!(records[1].line, 3);
        let err = read("d.tsv", "text\tlabel\nfine\tpositive\n", false)
            .0
            .unwrap_err()
            .to_string();
        assert!(err.contains("label_names"), "{err}");
        let mut named = fields();
        named.label_names = vec!["negative".into(), "positive".into()];
        let obj = serde_json::json!({"text": "x", "label": "positive"});
        assert_eq!(
            named.record(obj.as_object().unwrap()).unwrap(),
            Record::Text {
                text: "x".into(),
                label: Some(1)
            }
        );
        let obj = serde_json::json!({"text": "x", "label": 2});
        assert!(named
            .record(obj.as_object().unwrap())
            .unwrap_err()
            .contains("out of range"));
    }

    #[test]
    fn csv_messages_column_is_json() {
        let content = "messages\n\"[{\"\"role\"\":\"\"user\"\",\"\"content\"\":\"\"hi\"\"}]\"\n";
        let records = read("d.csv", content, false).0.unwrap();
        assert_eq!(
            records[0].record,
            Record::Messages(vec![ChatMessage::new("user", "hi")])
        );
    }

    #[test]
    fn limit_stops_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            "{\"text\":\"a\"}\n{\"text\":\"b\"}\n{\"text\":\"c\"}\n",
        )
        .unwrap();
        let mut policy = BadRecordPolicy::new(false);
        let records =
            read_records(&path, Format::JsonLines, &fields(), &mut policy, Some(2)).unwrap();
        assert_eq!(records.len(), 2);
    }
}
