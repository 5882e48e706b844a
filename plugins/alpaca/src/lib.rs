//! A data loader for Alpaca-style instruction data (Taori et al. 2023): records
//! `{"instruction", "input", "output"}` in JSON lines or a JSON array.
//!
//! By default (`template = "chat"`) each record becomes a chat record: a user turn holding the
//! instruction (and, when `input` is not empty, a blank line and the input) and an assistant
//! turn holding the output, so that the host applies the model's chat template and trains on the
//! answer only. `template = "alpaca"` yields `{"prompt", "completion"}` with Stanford Alpaca's
//! original prompt ("Below is an instruction that describes a task. ...") for base models
//! without a chat template. A record without an instruction or output is a bad record.
//!
//! ```toml
//! [data.loader]
//! kind = "alpaca"
//! template = "chat"
//! ```

use serde_json::{json, Value};
use whetstone_sdk::loader::{json_values, EachFile, FileItems};
use whetstone_sdk::prelude::*;

/// How a record is laid out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Template {
    /// A user turn and an assistant turn (the model's chat template applies).
    #[default]
    Chat,
    /// Stanford Alpaca's prompt and the output as completion.
    Alpaca,
}

/// The loader's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlpacaConfig {
    /// `chat` (default) or `alpaca`.
    #[serde(default)]
    pub template: Template,
}

/// The Alpaca loader.
pub struct Alpaca {
    items: EachFile,
}

impl DataLoader for Alpaca {
    type Config = AlpacaConfig;

    fn new(config: AlpacaConfig) -> Result<Self> {
        let items = EachFile::new(move |file| {
            let template = config.template;
            let items = json_values(file)?.map(move |value| {
                value.map(
                    |(at, value)| match value.and_then(|v| record(&v, template)) {
                        Ok(record) => Item::from_value(record, at),
                        Err(message) => Item::bad(message, at),
                    },
                )
            });
            Ok(Box::new(items) as FileItems)
        });
        Ok(Alpaca { items })
    }

    fn config_fields() -> Vec<ConfigField> {
        vec![ConfigField::new(
            "template",
            "\"chat\" | \"alpaca\"",
            "chat",
            "a user/assistant conversation, or Stanford Alpaca's prompt and the output",
        )]
    }

    fn next_record(&mut self) -> Result<Option<Item>> {
        self.items.next_item()
    }
}

/// The record of one Alpaca example.
pub fn record(example: &Value, template: Template) -> std::result::Result<Value, String> {
    let field = |key: &str| -> std::result::Result<&str, String> {
        match example.get(key) {
            None | Some(Value::Null) => Ok(""),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!("field `{key}` must be a string, found {other}")),
        }
    };
    let (instruction, input, output) = (field("instruction")?, field("input")?, field("output")?);
    if instruction.trim().is_empty() {
        return Err("field `instruction` is missing or empty".into());
    }
    if output.trim().is_empty() {
        return Err("field `output` is missing or empty".into());
    }
    Ok(match template {
        Template::Chat => {
            let user = if input.trim().is_empty() {
                instruction.to_string()
            } else {
                format!("{instruction}\n\n{input}")
            };
            json!({"messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": output}
            ]})
        }
        Template::Alpaca => {
            json!({"prompt": alpaca_prompt(instruction, input), "completion": output})
        }
    })
}

/// Stanford Alpaca's prompt (with and without an input).
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

whetstone_sdk::register_loader!(Alpaca);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_and_alpaca_layouts() {
        let ex = json!({"instruction": "Add.", "input": "2 and 3", "output": "5"});
        let chat = record(&ex, Template::Chat).unwrap();
        assert_eq!(chat["messages"][0]["content"], "Add.\n\n2 and 3");
        assert_eq!(
            chat["messages"][1],
            json!({"role": "assistant", "content": "5"})
        );
        let plain = record(
            &json!({"instruction": "Hi", "output": "Hello"}),
            Template::Alpaca,
        )
        .unwrap();
        assert!(plain["prompt"]
            .as_str()
            .unwrap()
            .ends_with("### Instruction:\nHi\n\n### Response:\n"));
        assert_eq!(plain["completion"], "Hello");
    }

    #[test]
    fn missing_parts_are_bad() {
        assert!(record(&json!({"output": "x"}), Template::Chat).is_err());
        assert!(record(&json!({"instruction": "x", "output": ""}), Template::Chat).is_err());
        assert!(record(&json!({"instruction": 1, "output": "x"}), Template::Chat).is_err());
    }
}
