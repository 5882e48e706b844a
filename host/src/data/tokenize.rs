//! Turning records into token ids and labels.
//!
//! - Classification: the text is encoded with the tokenizer's special tokens (`[CLS] ... [SEP]`)
//!   and truncated to `max_seq_len` by the tokenizer (so the closing special token stays).
//! - Causal LM: `{"text"}` records train on every token (BOS when the model adds one, EOS
//!   appended); `{"prompt","completion"}` records train on the completion and the appended EOS
//!   only; `{"messages"}` records are rendered with the chat template and train only on the
//!   assistant turns (content and end-of-turn marker). The trained spans are located in the
//!   rendered text by rendering the conversation's prefixes, and mapped onto tokens through the
//!   tokenizer's byte offsets, so masking is exact whatever the tokenizer merges.
//!   With [`LossOn::All`] every token is trained.

use std::ops::Range;

use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use super::config::LossOn;
use super::records::{Record, SourcedRecord};
use super::template::{ChatMessage, ChatTemplate};
use crate::model::load::SpecialTokens;
use crate::model::TaskKind;
use crate::ops::IGNORE_INDEX;
use crate::{Error, Result};

/// One tokenized training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, without padding.
    pub input_ids: Vec<u32>,
    /// What the model learns from it.
    pub labels: ExampleLabels,
}

/// The target of an [`Example`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExampleLabels {
    /// A class id (sequence classification).
    Class(i64),
    /// One label per input token (causal LM): the token id, or [`IGNORE_INDEX`] where the token
    /// is not trained on.
    Tokens(Vec<i64>),
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no token.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// An encoded record and whether it was cut to `max_seq_len`.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The example.
    pub example: Example,
    /// Whether tokens were dropped to fit `max_seq_len`.
    pub truncated: bool,
}

/// Encodes records for one model and task.
pub struct Encoder {
    task: TaskKind,
    tokenizer: Tokenizer,
    special: SpecialTokens,
    template: ChatTemplate,
    loss_on: LossOn,
    max_seq_len: usize,
    truncate: bool,
}

impl Encoder {
    /// An encoder for `task`. `chat_template` is the model's Jinja template (ChatML when `None`).
    /// With `truncate = false` (packing) causal-LM examples keep their full length.
    pub fn new(
        task: TaskKind,
        tokenizer: &Tokenizer,
        special: SpecialTokens,
        chat_template: Option<&str>,
        loss_on: LossOn,
        max_seq_len: usize,
        truncate: bool,
    ) -> Result<Self> {
        let mut tokenizer = tokenizer.clone();
        let truncation = match task {
            TaskKind::SequenceClassification { .. } => Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_seq_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }),
            TaskKind::CausalLm => None,
        };
        let added = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if truncation.is_some() && max_seq_len <= added {
            return Err(Error::config(format!(
                "[data] max_seq_len = {max_seq_len} leaves no room for text next to the tokenizer's \
                 {added} special tokens; raise it"
            )));
        }
        tokenizer
            .with_truncation(truncation)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        let token_text = |id: Option<u32>| id.and_then(|id| tokenizer.id_to_token(id));
        let template = match chat_template {
            Some(source) => ChatTemplate::from_jinja(
                source,
                token_text(special.bos).as_deref(),
                token_text(special.eos).as_deref(),
            )?,
            None => ChatTemplate::chatml(),
        };
        Ok(Self {
            task,
            tokenizer,
            special,
            template,
            loss_on,
            max_seq_len,
            truncate,
        })
    }

    /// Encodes one record. Every failure is an [`Error::BadRecord`] naming the record's file and
    /// line, so that the caller can skip it.
    pub fn encode(&self, sourced: &SourcedRecord) -> Result<Encoded> {
        match self.task {
            TaskKind::SequenceClassification { num_labels } => {
                self.classification(sourced, num_labels)
            }
            TaskKind::CausalLm => self.causal_lm(sourced),
        }
    }

    fn classification(&self, sourced: &SourcedRecord, num_labels: usize) -> Result<Encoded> {
        let (text, label) = match &sourced.record {
            Record::Text { text, label: Some(label) } => (text, *label),
            Record::Text { label: None, .. } => {
                return Err(sourced.error("the record has no class label; check [data] label_field"))
            }
            _ => {
                return Err(sourced.error(
                    "classification needs {\"text\", \"label\"} records, not prompt/completion or messages",
                ))
            }
        };
        if label < 0 || label as usize >= num_labels {
            return Err(sourced.error(format!(
                "label {label} is out of range for a model with {num_labels} labels (set [model] num_labels)"
            )));
        }
        let encoding = self
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| sourced.error(format!("tokenizer: {e}")))?;
        let truncated = !encoding.get_overflowing().is_empty();
        Ok(Encoded {
            example: Example {
                input_ids: encoding.get_ids().to_vec(),
                labels: ExampleLabels::Class(label),
            },
            truncated,
        })
    }

    fn causal_lm(&self, sourced: &SourcedRecord) -> Result<Encoded> {
        let train_all = self.loss_on == LossOn::All;
        let (text, spans, wrap) = match &sourced.record {
            Record::Text { text, .. } => (text.clone(), single(0..text.len()), true),
            Record::PromptCompletion { prompt, completion } => {
                let text = format!("{prompt}{completion}");
                let spans = single(if train_all {
                    0..text.len()
                } else {
                    prompt.len()..text.len()
                });
                (text, spans, true)
            }
            Record::Messages(messages) => {
                let text = self
                    .template
                    .render(messages, false)
                    .map_err(|e| sourced.error(e.to_string()))?;
                let spans = if train_all {
                    single(0..text.len())
                } else {
                    assistant_spans(&self.template, messages, &text)
                        .map_err(|e| sourced.error(e))?
                };
                (text, spans, false)
            }
        };
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| sourced.error(format!("tokenizer: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 2);
        let mut labels = Vec::with_capacity(encoding.len() + 2);
        if wrap && self.special.add_bos {
            if let Some(bos) = self.special.bos {
                ids.push(bos);
                labels.push(IGNORE_INDEX);
            }
        }
        for (&id, &(start, end)) in encoding.get_ids().iter().zip(encoding.get_offsets()) {
            let trained = spans.iter().any(|s| start < s.end && end > s.start);
            ids.push(id);
            labels.push(if trained { i64::from(id) } else { IGNORE_INDEX });
        }
        if wrap {
            if let Some(eos) = self.special.eos {
                ids.push(eos);
                labels.push(i64::from(eos));
            }
        }
        if ids.len() < 2 {
            return Err(sourced.error("too short: a causal LM example needs at least 2 tokens"));
        }
        let truncated = self.truncate && ids.len() > self.max_seq_len;
        if truncated {
            ids.truncate(self.max_seq_len);
            labels.truncate(self.max_seq_len);
        }
        if !has_target(&labels) {
            return Err(sourced.error(if truncated {
                format!("every trained token lies beyond max_seq_len = {}; raise max_seq_len", self.max_seq_len)
            } else {
                "nothing to train on: the conversation has no assistant turn (or loss_on excludes all tokens)".into()
            }));
        }
        Ok(Encoded {
            example: Example {
                input_ids: ids,
                labels: ExampleLabels::Tokens(labels),
            },
            truncated,
        })
    }
}

/// A list of one trained byte range.
fn single(range: Range<usize>) -> Vec<Range<usize>> {
    std::iter::once(range).collect()
}

/// Whether a causal-LM label row has a trained position the loss can reach (labels at position 0
/// are never predicted).
fn has_target(labels: &[i64]) -> bool {
    labels.iter().skip(1).any(|&l| l != IGNORE_INDEX)
}

/// Byte ranges of the assistant turns in `rendered` (the full rendering of `messages`): for the
/// assistant message `i`, from the end of the rendering of `messages[..i]` with a generation
/// prompt to the end of the rendering of `messages[..=i]`.
fn assistant_spans(
    template: &ChatTemplate,
    messages: &[ChatMessage],
    rendered: &str,
) -> std::result::Result<Vec<Range<usize>>, String> {
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let before = template
            .render(&messages[..i], true)
            .map_err(|e| e.to_string())?;
        let through = template
            .render(&messages[..=i], false)
            .map_err(|e| e.to_string())?;
        if !through.starts_with(&before) || !rendered.starts_with(&through) {
            return Err(format!(
                "cannot locate assistant turn {} in the rendered conversation: the chat template \
                 does not render conversations as stable prefixes; use loss_on = \"all\" or a \
                 template that does",
                i + 1
            ));
        }
        spans.push(before.len()..through.len());
    }
    Ok(spans)
}

/// Packs causal-LM examples: concatenates them (an `eos` separates examples that do not already
/// end with it) and cuts the stream into chunks of `max_seq_len` tokens. A last chunk with
/// nothing to train on is dropped. Classification examples are returned unchanged.
pub fn pack(examples: Vec<Example>, max_seq_len: usize, eos: Option<u32>) -> Vec<Example> {
    let mut packer = Packer::new(max_seq_len, eos);
    let mut out = Vec::new();
    for example in examples {
        packer.push(example, &mut out);
    }
    out.extend(packer.finish());
    out
}

/// [`pack`] one example at a time, for streamed data: full chunks come out as soon as they
/// fill; [`Packer::finish`] gives the last, shorter one.
#[derive(Debug)]
pub struct Packer {
    max_seq_len: usize,
    eos: Option<u32>,
    ids: Vec<u32>,
    labels: Vec<i64>,
}

impl Packer {
    /// A packer into chunks of `max_seq_len` tokens, examples separated by `eos`.
    pub fn new(max_seq_len: usize, eos: Option<u32>) -> Packer {
        Packer {
            max_seq_len: max_seq_len.max(1),
            eos,
            ids: Vec::new(),
            labels: Vec::new(),
        }
    }

    /// Adds `example`; pushes the chunks it completes (or, for a classification example, the
    /// example itself) onto `out`.
    pub fn push(&mut self, example: Example, out: &mut Vec<Example>) {
        let labels = match example.labels {
            ExampleLabels::Tokens(labels) => labels,
            ExampleLabels::Class(_) => {
                out.push(example);
                return;
            }
        };
        self.ids.extend_from_slice(&example.input_ids);
        self.labels.extend_from_slice(&labels);
        if let Some(eos) = self.eos {
            if self.ids.last() != Some(&eos) {
                self.ids.push(eos);
                self.labels.push(i64::from(eos));
            }
        }
        let full = self.ids.len() / self.max_seq_len * self.max_seq_len;
        if full == 0 {
            return;
        }
        let ids: Vec<u32> = self.ids.drain(..full).collect();
        let labels: Vec<i64> = self.labels.drain(..full).collect();
        out.extend(
            ids.chunks(self.max_seq_len)
                .zip(labels.chunks(self.max_seq_len))
                .filter_map(|(i, l)| chunk(i, l)),
        );
    }

    /// The last chunk (shorter than `max_seq_len`), unless it has nothing to train on.
    pub fn finish(self) -> Option<Example> {
        chunk(&self.ids, &self.labels)
    }
}

/// A packed chunk, when it has at least 2 tokens and a target.
fn chunk(ids: &[u32], labels: &[i64]) -> Option<Example> {
    (ids.len() >= 2 && has_target(labels)).then(|| Example {
        input_ids: ids.to_vec(),
        labels: ExampleLabels::Tokens(labels.to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::AddedToken;

    use super::*;

    const WORDS: &[&str] = &[
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "<|im_start|>",
        "<|im_end|>",
        "<s>",
        "</s>",
        "user",
        "assistant",
        "system",
        "hello",
        "world",
        "how",
        "are",
        "you",
        "fine",
        "thanks",
        "bye",
        "good",
        "a",
        "b",
        "c",
        "d",
        "e",
    ];

    fn id(word: &str) -> u32 {
        WORDS.iter().position(|w| *w == word).unwrap() as u32
    }

    /// A word-level tokenizer with ChatML special tokens and a `[CLS] $A [SEP]` post-processor.
    pub(crate) fn tiny_tokenizer() -> Tokenizer {
        let vocab = WORDS
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i as u32))
            .collect();
        let model = WordLevel::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .unwrap();
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(WhitespaceSplit));
        tokenizer
            .add_special_tokens(
                [
                    "[CLS]",
                    "[SEP]",
                    "<|im_start|>",
                    "<|im_end|>",
                    "<s>",
                    "</s>",
                ]
                .map(|t| AddedToken::from(t, true)),
            )
            .unwrap();
        let post = TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .unwrap()
            .special_tokens(vec![("[CLS]", id("[CLS]")), ("[SEP]", id("[SEP]"))])
            .build()
            .unwrap();
        tokenizer.with_post_processor(Some(post));
        tokenizer
    }

    fn special() -> SpecialTokens {
        SpecialTokens {
            bos: Some(id("<s>")),
            eos: Some(id("</s>")),
            pad: 0,
            add_bos: true,
        }
    }

    fn sourced(record: Record) -> SourcedRecord {
        SourcedRecord {
            record,
            path: PathBuf::from("d.jsonl"),
            line: 7,
        }
    }

    fn lm(loss_on: LossOn, max_seq_len: usize) -> Encoder {
        Encoder::new(
            TaskKind::CausalLm,
            &tiny_tokenizer(),
            special(),
            None,
            loss_on,
            max_seq_len,
            true,
        )
        .unwrap()
    }

    fn tokens(e: &Encoded) -> &[i64] {
        match &e.example.labels {
            ExampleLabels::Tokens(t) => t,
            ExampleLabels::Class(_) => panic!("expected token labels"),
        }
    }

    #[test]
    fn classification_adds_special_tokens_and_truncates() {
        let enc = Encoder::new(
            TaskKind::SequenceClassification { num_labels: 2 },
            &tiny_tokenizer(),
            special(),
            None,
            LossOn::Completion,
            4,
            true,
        )
        .unwrap();
        let out = enc
            .encode(&sourced(Record::Text {
                text: "hello world".into(),
                label: Some(1),
            }))
            .unwrap();
        assert_eq!(
            out.example.input_ids,
            vec![id("[CLS]"), id("hello"), id("world"), id("[SEP]")]
        );
        assert_eq!(out.example.labels, ExampleLabels::Class(1));
        assert!(!out.truncated);
        let out = enc
            .encode(&sourced(Record::Text {
                text: "a b c d".into(),
                label: Some(0),
            }))
            .unwrap();
        assert_eq!(
            out.example.input_ids,
            vec![id("[CLS]"), id("a"), id("b"), id("[SEP]")]
        );
        assert!(out.truncated);
        let err = enc
            .encode(&sourced(Record::Text {
                text: "a".into(),
                label: Some(2),
            }))
            .unwrap_err();
        assert!(matches!(err, Error::BadRecord { line: 7, .. }), "{err}");
        let err = enc
            .encode(&sourced(Record::Text {
                text: "a".into(),
                label: None,
            }))
            .unwrap_err();
        assert!(err.to_string().contains("no class label"), "{err}");
    }

    #[test]
    fn text_trains_on_everything_with_bos_and_eos() {
        let out = lm(LossOn::Completion, 16)
            .encode(&sourced(Record::Text {
                text: "a b".into(),
                label: None,
            }))
            .unwrap();
        assert_eq!(
            out.example.input_ids,
            vec![id("<s>"), id("a"), id("b"), id("</s>")]
        );
        assert_eq!(
            tokens(&out),
            &[
                IGNORE_INDEX,
                i64::from(id("a")),
                i64::from(id("b")),
                i64::from(id("</s>"))
            ]
        );
    }

    #[test]
    fn prompt_is_masked_and_eos_trained() {
        let record = Record::PromptCompletion {
            prompt: "how are you ".into(),
            completion: "fine thanks".into(),
        };
        let out = lm(LossOn::Completion, 16)
            .encode(&sourced(record.clone()))
            .unwrap();
        let ign = IGNORE_INDEX;
        let want = [
            ign,
            ign,
            ign,
            ign,
            id("fine") as i64,
            id("thanks") as i64,
            id("</s>") as i64,
        ];
        assert_eq!(tokens(&out), &want);
        let all = lm(LossOn::All, 16)
            .encode(&sourced(record.clone()))
            .unwrap();
        assert_eq!(tokens(&all)[1], i64::from(id("how")));
        let cut = lm(LossOn::Completion, 5)
            .encode(&sourced(record.clone()))
            .unwrap();
        assert!(cut.truncated);
        assert_eq!(cut.example.input_ids.len(), 5);
        let err = lm(LossOn::Completion, 3)
            .encode(&sourced(record))
            .unwrap_err();
        assert!(err.to_string().contains("beyond max_seq_len"), "{err}");
    }

    #[test]
    fn only_assistant_turns_are_trained_in_a_multi_turn_conversation() {
        let messages = vec![
            ChatMessage::new("system", "good"),
            ChatMessage::new("user", "hello"),
            ChatMessage::new("assistant", "how are you"),
            ChatMessage::new("user", "fine thanks"),
            ChatMessage::new("assistant", "bye"),
        ];
        let out = lm(LossOn::Completion, 64)
            .encode(&sourced(Record::Messages(messages)))
            .unwrap();
        let words: Vec<&str> = out
            .example
            .input_ids
            .iter()
            .map(|&i| WORDS[i as usize])
            .collect();
        assert_eq!(
            words.join(" "),
            "<|im_start|> system good <|im_end|> <|im_start|> user hello <|im_end|> <|im_start|> assistant how are \
             you <|im_end|> <|im_start|> user fine thanks <|im_end|> <|im_start|> assistant bye <|im_end|>"
        );
        let trained: Vec<&str> = out
            .example
            .input_ids
            .iter()
            .zip(tokens(&out))
            .filter(|(_, &l)| l != IGNORE_INDEX)
            .map(|(&i, _)| WORDS[i as usize])
            .collect();
        assert_eq!(
            trained,
            ["how", "are", "you", "<|im_end|>", "bye", "<|im_end|>"]
        );
        for (&i, &l) in out.example.input_ids.iter().zip(tokens(&out)) {
            assert!(l == IGNORE_INDEX || l == i64::from(i));
        }
    }

    #[test]
    fn conversation_without_assistant_is_bad() {
        let err = lm(LossOn::Completion, 64)
            .encode(&sourced(Record::Messages(vec![ChatMessage::new(
                "user", "hello",
            )])))
            .unwrap_err();
        assert!(err.to_string().contains("no assistant turn"), "{err}");
    }

    #[test]
    fn model_template_with_bos_and_eos_tokens() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.role }} {{ m.content }} {% if m.role == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}{% if add_generation_prompt %}assistant {% endif %}";
        let enc = Encoder::new(
            TaskKind::CausalLm,
            &tiny_tokenizer(),
            special(),
            Some(src),
            LossOn::Completion,
            64,
            true,
        )
        .unwrap();
        let messages = vec![
            ChatMessage::new("user", "hello"),
            ChatMessage::new("assistant", "fine"),
        ];
        let out = enc.encode(&sourced(Record::Messages(messages))).unwrap();
        assert_eq!(
            out.example.input_ids,
            [
                id("<s>"),
                id("user"),
                id("hello"),
                id("assistant"),
                id("fine"),
                id("</s>")
            ]
        );
        let ign = IGNORE_INDEX;
        assert_eq!(
            tokens(&out),
            &[
                ign,
                ign,
                ign,
                ign,
                i64::from(id("fine")),
                i64::from(id("</s>"))
            ]
        );
    }

    #[test]
    fn packing_concatenates_with_eos_and_chunks() {
        let eos = id("</s>");
        let ex = |ids: &[u32]| Example {
            input_ids: ids.to_vec(),
            labels: ExampleLabels::Tokens(ids.iter().map(|&i| i64::from(i)).collect()),
        };
        let packed = pack(
            vec![ex(&[10, 11, eos]), ex(&[12, 13]), ex(&[14])],
            3,
            Some(eos),
        );
        let ids: Vec<Vec<u32>> = packed.iter().map(|e| e.input_ids.clone()).collect();
        assert_eq!(
            ids,
            vec![vec![10, 11, eos], vec![12, 13, eos], vec![14, eos]]
        );
    }
}
