//! A data loader for ShareGPT-style conversations: records
//! `{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}`
//! in JSON lines or a JSON array, yielded as chat records `{"messages": [{"role", "content"}]}`
//! so that the host applies the model's chat template and trains on the assistant turns only.
//!
//! Speakers map to roles as most ShareGPT dumps use them: `human`/`user` → `user`,
//! `gpt`/`chatgpt`/`bard`/`bing`/`assistant`/`model` → `assistant`, `system` → `system`;
//! `roles` adds or overrides names. A turn from an unknown speaker, or a record without the
//! conversation, is a bad record at its line.
//!
//! ```toml
//! [data.loader]
//! kind = "sharegpt"
//! roles = { tool = "tool" }   # optional extra speakers
//! ```

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};
use whetstone_sdk::loader::{json_values, EachFile, FileItems};
use whetstone_sdk::prelude::*;

/// The loader's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareGptConfig {
    /// The field holding the turns (default `conversations`).
    #[serde(default = "default_field")]
    pub conversations_field: String,
    /// Extra or overriding speaker → role names (`{"tool" = "tool"}`).
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
}

fn default_field() -> String {
    "conversations".into()
}

/// The ShareGPT loader.
pub struct ShareGpt {
    items: EachFile,
}

impl DataLoader for ShareGpt {
    type Config = ShareGptConfig;

    fn new(config: ShareGptConfig) -> Result<Self> {
        let items = EachFile::new(move |file| {
            let config = config.clone();
            let items = json_values(file)?.map(move |value| {
                value.map(
                    |(at, value)| match value.and_then(|v| messages(&v, &config)) {
                        Ok(record) => Item::from_value(record, at),
                        Err(message) => Item::bad(message, at),
                    },
                )
            });
            Ok(Box::new(items) as FileItems)
        });
        Ok(ShareGpt { items })
    }

    fn config_fields() -> Vec<ConfigField> {
        vec![
            ConfigField::new(
                "conversations_field",
                "string",
                "conversations",
                "the field holding the turns",
            ),
            ConfigField::new(
                "roles",
                "table",
                "{}",
                "extra or overriding speaker → role names",
            ),
        ]
    }

    fn next_record(&mut self) -> Result<Option<Item>> {
        self.items.next_item()
    }
}

/// The role of a speaker.
fn role<'a>(from: &'a str, config: &'a ShareGptConfig) -> Option<&'a str> {
    if let Some(role) = config.roles.get(from) {
        return Some(role);
    }
    match from.to_ascii_lowercase().as_str() {
        "human" | "user" => Some("user"),
        "gpt" | "chatgpt" | "bard" | "bing" | "assistant" | "model" => Some("assistant"),
        "system" => Some("system"),
        _ => None,
    }
}

/// The chat record of one ShareGPT record.
pub fn messages(record: &Value, config: &ShareGptConfig) -> std::result::Result<Value, String> {
    let field = &config.conversations_field;
    let Some(turns) = record.get(field).and_then(Value::as_array) else {
        return Err(format!("the record has no `{field}` list of turns"));
    };
    if turns.is_empty() {
        return Err(format!("`{field}` is an empty conversation"));
    }
    let mut messages = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let text = |key: &str| turn.get(key).and_then(Value::as_str);
        let (Some(from), Some(value)) = (text("from"), text("value")) else {
            return Err(format!(
                "turn {} needs a string `from` and a string `value`",
                i + 1
            ));
        };
        let Some(role) = role(from, config) else {
            return Err(format!(
                "turn {} is from `{from}`, which is no known speaker; map it in the loader's `roles`",
                i + 1
            ));
        };
        messages.push(json!({"role": role, "content": value}));
    }
    let mut out = Map::new();
    out.insert("messages".into(), Value::Array(messages));
    Ok(Value::Object(out))
}

whetstone_sdk::register_loader!(ShareGpt);

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ShareGptConfig {
        serde_json::from_str("{}").unwrap()
    }

    #[test]
    fn turns_become_roles() {
        let record = json!({"conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"}
        ]});
        let out = messages(&record, &config()).unwrap();
        assert_eq!(out["messages"][1], json!({"role": "user", "content": "Hi"}));
        assert_eq!(out["messages"][2]["role"], "assistant");
    }

    #[test]
    fn unknown_speakers_and_missing_turns_are_bad() {
        let record = json!({"conversations": [{"from": "tool", "value": "42"}]});
        let err = messages(&record, &config()).unwrap_err();
        assert!(err.contains("roles"), "{err}");
        let mut mapped = config();
        mapped.roles.insert("tool".into(), "tool".into());
        assert!(messages(&record, &mapped).is_ok());
        assert!(messages(&json!({"text": "x"}), &config()).is_err());
        assert!(messages(&json!({"conversations": [{"from": "human"}]}), &config()).is_err());
    }
}
