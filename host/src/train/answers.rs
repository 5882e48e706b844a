//! Answer accuracy of a causal LM on held-out instructions (`[data] instruction_template`):
//! each question is rendered with the model's chat template, answered by greedy generation, and
//! the reply's first word is compared with the expected label name.

use serde::Serialize;

use crate::data::instruct::{is_correct, AnswerExample};
use crate::model::generate::{generate, GenerateOptions};
use crate::model::load::LoadedModel;
use crate::Result;

/// Tokens generated per answer: label names are one or two tokens; a few more let the first
/// word end.
const ANSWER_TOKENS: usize = 4;

/// What answering the held-out questions gave.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AnswerMetrics {
    /// Share of replies whose first word is the expected answer.
    pub accuracy: f64,
    /// Questions answered.
    pub examples: usize,
}

/// Answers up to `limit` of `questions` (all when `None`) by greedy generation.
pub fn answer_accuracy(
    loaded: &LoadedModel,
    questions: &[AnswerExample],
    limit: Option<usize>,
) -> Result<AnswerMetrics> {
    let opts = GenerateOptions {
        max_new_tokens: ANSWER_TOKENS,
        temperature: 0.0,
        chat: true,
        ..GenerateOptions::default()
    };
    let take = limit.unwrap_or(questions.len()).min(questions.len());
    let mut correct = 0usize;
    for q in &questions[..take] {
        let reply = generate(loaded, &q.prompt, &opts, &mut |_| {})?;
        if is_correct(&reply.text, &q.answer) {
            correct += 1;
        }
    }
    Ok(AnswerMetrics {
        accuracy: if take == 0 {
            0.0
        } else {
            correct as f64 / take as f64
        },
        examples: take,
    })
}
