//! A data loader for the [chatterbot-corpus](https://github.com/gunthercox/chatterbot-corpus)
//! YAML format: each file has `categories` and `conversations`, a list of conversations, each a
//! list of statements `[question, answer, ...]` that alternate between the user and the bot.
//!
//! Every conversation becomes one chat record,
//! `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}`, positioned at the
//! line where it starts. A conversation with fewer than two statements is a bad record; an odd
//! last statement (a question without an answer) is left out, as nothing would learn from it.
//!
//! ```toml
//! [data]
//! train = ["asset:chatterbot-corpus/english"]   # a folder: every .yml file in it
//! [data.loader]
//! kind = "chatterbot"
//! system = "You are a friendly chatbot."        # optional first turn
//! ```

use serde_json::json;
use whetstone_sdk::loader::{EachFile, FileItems};
use whetstone_sdk::prelude::*;
use yaml_rust2::parser::{MarkedEventReceiver, Parser};
use yaml_rust2::{scanner::Marker, Event};

/// The loader's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatterbotConfig {
    /// A system message put before every conversation; none by default.
    #[serde(default)]
    pub system: Option<String>,
}

/// The chatterbot-corpus loader.
pub struct Chatterbot {
    items: EachFile,
}

impl DataLoader for Chatterbot {
    type Config = ChatterbotConfig;

    fn new(config: ChatterbotConfig) -> Result<Self> {
        let items = EachFile::new(move |file| {
            let text = file.read_to_string()?;
            let conversations = conversations(&text)
                .map_err(|e| Error::msg(format!("{}: {e}", file.name().unwrap_or_default())))?;
            let system = config.system.clone();
            let items = conversations.into_iter().map(move |(line, turns)| {
                let at = Position::new(file, line);
                Ok(match turns {
                    Ok(turns) => record(turns, system.as_deref(), at),
                    Err(message) => Item::bad(message, at),
                })
            });
            Ok(Box::new(items) as FileItems)
        });
        Ok(Chatterbot { items })
    }

    fn config_fields() -> Vec<ConfigField> {
        vec![ConfigField::new(
            "system",
            "string",
            "none",
            "a system message put before every conversation",
        )]
    }

    fn next_record(&mut self) -> Result<Option<Item>> {
        self.items.next_item()
    }
}

/// The chat record of one conversation's statements.
pub fn record(statements: Vec<String>, system: Option<&str>, at: Position) -> Item {
    if statements.len() < 2 {
        return Item::bad("a conversation needs a question and an answer", at);
    }
    let pairs = statements.len() / 2 * 2;
    let system = system.map(|s| json!({"role": "system", "content": s}));
    let turns = statements[..pairs].iter().enumerate().map(|(i, s)| {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        json!({"role": role, "content": s})
    });
    Item::from_value(
        json!({"messages": system.into_iter().chain(turns).collect::<Vec<_>>()}),
        at,
    )
}

/// A conversation's first line and its statements, or why it has none.
pub type Conversation = (u64, std::result::Result<Vec<String>, String>);

/// The conversations of a chatterbot YAML document.
pub fn conversations(text: &str) -> std::result::Result<Vec<Conversation>, String> {
    let mut collector = Collector::default();
    Parser::new_from_str(text)
        .load(&mut collector, false)
        .map_err(|e| format!("not valid YAML: {e}"))?;
    if !collector.seen_key {
        return Err("no `conversations:` list; is this a chatterbot-corpus file?".into());
    }
    Ok(collector.found)
}

/// Walks the parser's events: the scalars inside each item of the top-level `conversations` list.
#[derive(Default)]
struct Collector {
    depth: usize,
    last_top_scalar: Option<String>,
    seen_key: bool,
    list_depth: Option<usize>,
    current: Option<Conversation>,
    found: Vec<Conversation>,
}

const NOT_A_LIST: &str = "a conversation must be a list of statements [question, answer, ...]";

impl MarkedEventReceiver for Collector {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                self.depth += 1;
                let is_list = matches!(event, Event::SequenceStart(..));
                if is_list
                    && self.depth == 2
                    && self.last_top_scalar.as_deref() == Some("conversations")
                {
                    self.list_depth = Some(self.depth);
                    self.seen_key = true;
                } else if self.list_depth == Some(self.depth - 1) {
                    let turns = if is_list {
                        Ok(Vec::new())
                    } else {
                        Err(NOT_A_LIST.into())
                    };
                    self.current = Some((mark.line() as u64, turns));
                } else if let Some((_, turns)) = &mut self.current {
                    *turns = Err("a statement must be text, not a list or a mapping".into());
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if self.list_depth == Some(self.depth - 1) {
                    self.found.extend(self.current.take());
                } else if self.list_depth == Some(self.depth) {
                    self.list_depth = None;
                }
                self.depth -= 1;
            }
            Event::Scalar(value, ..) => match (&mut self.current, self.list_depth) {
                (Some((_, Ok(statements))), Some(d)) if self.depth == d + 1 => {
                    statements.push(value)
                }
                (None, Some(d)) if self.depth == d => {
                    let message = format!("{NOT_A_LIST}, found the text {value:?}");
                    self.found.push((mark.line() as u64, Err(message)));
                }
                _ if self.depth == 1 => self.last_top_scalar = Some(value),
                _ => {}
            },
            _ => {}
        }
    }
}

whetstone_sdk::register_loader!(Chatterbot);

#[cfg(test)]
mod tests {
    use super::*;

    const CORPUS: &str =
        "categories:\n- AI\nconversations:\n- - What is AI?\n  - A field of study.\n\
                          - - Hi\n  - Hello!\n  - How are you?\n  - Fine.\n- - \"Quoted: yes\"\n\
                          - - Odd\n  - one\n  - dangling\n- just text\n- - [nested]\n  - x\n";

    #[test]
    fn conversations_with_their_lines() {
        let found = conversations(CORPUS).unwrap();
        let lines: Vec<u64> = found.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [4, 6, 10, 11, 14, 15]);
        assert_eq!(
            found[1].1.as_deref().unwrap(),
            ["Hi", "Hello!", "How are you?", "Fine."]
        );
        assert_eq!(found[2].1.as_deref().unwrap(), ["Quoted: yes"]);
        assert!(found[4].1.as_ref().unwrap_err().contains("\"just text\""));
        assert!(found[5].1.as_ref().unwrap_err().contains("must be text"));
    }

    #[test]
    fn records_alternate_user_and_assistant() {
        let at = Position { file: 0, line: 6 };
        let turns = vec!["Hi".to_string(), "Hello!".into(), "Bye?".into()];
        let Item::Record { record: fields, .. } = record(turns, Some("Be kind."), at) else {
            panic!("expected a record");
        };
        let roles: Vec<&str> = fields["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["system", "user", "assistant"]);
        assert!(matches!(
            record(vec!["Q".into()], None, at),
            Item::Bad { .. }
        ));
    }

    #[test]
    fn not_chatterbot_is_an_error() {
        assert!(conversations("a: [1, 2]\n")
            .unwrap_err()
            .contains("conversations"));
        assert!(conversations("conversations: [\n")
            .unwrap_err()
            .contains("YAML"));
    }
}
