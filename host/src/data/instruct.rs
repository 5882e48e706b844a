//! Classification records as instructions for a causal LM (`[data] instruction_template`): the
//! user turn asks about the record's text, the assistant turn answers with the label's name.

use super::records::{Record, SourcedRecord};
use super::template::ChatMessage;
use crate::{Error, Result};

/// The placeholder the template's text goes into.
pub const TEXT_PLACEHOLDER: &str = "{text}";

/// A held-out question and the answer the model should give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerExample {
    /// The user turn.
    pub prompt: String,
    /// The expected answer (a label name).
    pub answer: String,
}

/// Checks the template and the label names before any record is read.
pub fn validate(template: &str, label_names: &[String]) -> Result<()> {
    if !template.contains(TEXT_PLACEHOLDER) {
        return Err(Error::config(format!(
            "[data] instruction_template must contain {TEXT_PLACEHOLDER} where the record's text goes"
        )));
    }
    if label_names.is_empty() {
        return Err(Error::config(
            "[data] instruction_template needs label_names: the answer for each class id (e.g. [\"negative\", \"positive\"])",
        ));
    }
    Ok(())
}

/// The user turn for `text`.
pub fn prompt(template: &str, text: &str) -> String {
    template.replace(TEXT_PLACEHOLDER, text)
}

/// The question and answer of one labelled record.
fn question(
    template: &str,
    label_names: &[String],
    record: &SourcedRecord,
) -> Result<AnswerExample> {
    match &record.record {
        Record::Text {
            text,
            label: Some(label),
        } => {
            let answer = usize::try_from(*label)
                .ok()
                .and_then(|i| label_names.get(i))
                .ok_or_else(|| {
                    Error::config(format!(
                        "{}: label {label} has no name in label_names {label_names:?}",
                        record.path.display()
                    ))
                })?;
            Ok(AnswerExample {
                prompt: prompt(template, text),
                answer: answer.clone(),
            })
        }
        _ => Err(Error::config(format!(
            "{}: instruction_template applies to labelled {{\"text\", \"label\"}} records only",
            record.path.display()
        ))),
    }
}

/// Rewrites labelled records as two-turn conversations and returns, alongside, each record's
/// question and answer.
pub fn to_conversations(
    records: Vec<SourcedRecord>,
    template: &str,
    label_names: &[String],
) -> Result<(Vec<SourcedRecord>, Vec<AnswerExample>)> {
    let mut answers = Vec::with_capacity(records.len());
    let converted = records
        .into_iter()
        .map(|r| {
            let q = question(template, label_names, &r)?;
            let record = Record::Messages(vec![
                ChatMessage::new("user", q.prompt.clone()),
                ChatMessage::new("assistant", q.answer.clone()),
            ]);
            answers.push(q);
            Ok(SourcedRecord { record, ..r })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((converted, answers))
}

/// Whether a generated reply gives `answer`: its first word, case and punctuation aside.
pub fn is_correct(reply: &str, answer: &str) -> bool {
    let first = reply
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_matches(|c: char| !c.is_alphanumeric());
    first.eq_ignore_ascii_case(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn records_become_questions_and_answers() {
        let names = vec!["negative".to_string(), "positive".to_string()];
        let records = vec![SourcedRecord {
            record: Record::Text {
                text: "Great food".into(),
                label: Some(1),
            },
            path: PathBuf::from("yelp.json"),
            line: 1,
        }];
        let (conv, answers) =
            to_conversations(records, "Review: {text}. Sentiment?", &names).unwrap();
        assert_eq!(answers[0].prompt, "Review: Great food. Sentiment?");
        assert_eq!(answers[0].answer, "positive");
        assert!(matches!(&conv[0].record, Record::Messages(m) if m[1].content == "positive"));
        assert!(is_correct(" Positive.", "positive"));
        assert!(!is_correct("The review is positive", "positive"));
        assert!(validate("no placeholder", &names).is_err());
        assert!(validate("{text}", &[]).is_err());
    }
}
