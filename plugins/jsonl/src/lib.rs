//! A data loader for JSON lines (one object per line, streamed) and JSON arrays of objects,
//! yielding each object as it is: the host maps its fields with `[data] text_field`,
//! `label_field`, `prompt_field`, `completion_field` and `messages_field`, so this loader reads
//! `{"text","label"}`, `{"prompt","completion"}` and OpenAI-style `{"messages": [...]}` files
//! alike. A line that is not a JSON object is a bad record at its line.
//!
//! ```toml
//! [data]
//! train = ["reviews.jsonl"]
//! text_field = "review"
//! [data.loader]
//! kind = "jsonl"
//! ```

use whetstone_sdk::loader::{json_values, EachFile, FileItems};
use whetstone_sdk::prelude::*;

/// The loader's configuration (it has no settings; the host maps the fields).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {}

/// The JSON-lines loader.
pub struct Jsonl {
    items: EachFile,
}

impl DataLoader for Jsonl {
    type Config = JsonlConfig;

    fn new(_: JsonlConfig) -> Result<Self> {
        let items = EachFile::new(|file| {
            let items = json_values(file)?.map(|value| {
                value.map(|(at, value)| match value {
                    Ok(value) => Item::from_value(value, at),
                    Err(message) => Item::bad(message, at),
                })
            });
            Ok(Box::new(items) as FileItems)
        });
        Ok(Jsonl { items })
    }

    fn next_record(&mut self) -> Result<Option<Item>> {
        self.items.next_item()
    }
}

whetstone_sdk::register_loader!(Jsonl);
