//! Chat templates: turning a conversation into the text a chat model was trained on.
//!
//! Models ship their template as a Jinja string (`tokenizer_config.json`'s `chat_template`, or
//! the GGUF key `tokenizer.chat_template`); it is rendered with [`minijinja`] the way Hugging
//! Face's `apply_chat_template` renders it (`trim_blocks` and `lstrip_blocks` on, the variables
//! `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and a `raise_exception`
//! function). Models without one get ChatML.

use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`), used when a model has none.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
                      message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if \
                      add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks: `system`, `user` or `assistant` (templates may accept others, e.g. `tool`).
    pub role: String,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` saying `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled-on-demand chat template with the special-token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: Option<String>,
    eos: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

/// The Jinja function templates call to reject a conversation (`raise_exception('...')`).
fn raise_exception(message: String) -> std::result::Result<minijinja::Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// An environment configured like Hugging Face's chat-template environment.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // Python string methods (`.strip()`, `.startswith()`, ...) that HF templates call.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env
}

impl ChatTemplate {
    /// The ChatML template (as SmolLM2 and Qwen use), with `<|im_start|>` / `<|im_end|>` turns.
    pub fn chatml() -> Self {
        Self {
            env: environment(),
            source: CHATML.to_owned(),
            bos: None,
            eos: Some("<|im_end|>".into()),
        }
    }

    /// A model's own Jinja template. `bos` and `eos` are the strings of its special tokens, which
    /// templates use as `bos_token` / `eos_token`. Fails when the template does not compile.
    pub fn from_jinja(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let env = environment();
        env.template_from_str(source).map_err(|e| {
            Error::config(format!("the model's chat template does not compile: {e}"))
        })?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos: bos.map(str::to_owned),
            eos: eos.map(str::to_owned),
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's reply
    /// starts. Errors carry the template's message (for example from `raise_exception`).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_deref().unwrap_or(""),
            eos_token => self.eos.as_deref().unwrap_or(""),
        };
        self.env
            .render_str(&self.source, ctx)
            .map_err(|e| Error::config(format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
        ]
    }

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::chatml();
        assert_eq!(
            t.render(&conversation(), false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
        assert_eq!(
            t.render(&conversation()[..1], true).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn jinja_template_with_special_tokens_and_blocks() {
        let src = "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'user' %}[INST] {{ m.content }} \
                   [/INST]{% else %}{{ m.content }}{{ eos_token }}{% endif %}\n{% endfor %}";
        let t = ChatTemplate::from_jinja(src, Some("<s>"), Some("</s>")).unwrap();
        assert_eq!(
            t.render(&conversation(), false).unwrap(),
            "<s>[INST] Hi [/INST]Hello!</s>"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let src = "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}";
        let t = ChatTemplate::from_jinja(src, None, None).unwrap();
        let err = t.render(&conversation(), false).unwrap_err().to_string();
        assert!(err.contains("first message must be system"), "{err}");
    }

    #[test]
    fn syntax_errors_are_reported_at_construction() {
        let err = ChatTemplate::from_jinja("{% for m in messages %}", None, None).unwrap_err();
        assert!(err.to_string().contains("does not compile"), "{err}");
    }
}
