//! From a `[data]` section and a loaded model to tokenized training and validation examples:
//! read the records, split off validation by a seeded shuffle, encode (in parallel), pack.

use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use tokenizers::Tokenizer;

use super::config::DataConfig;
use super::instruct::{self, AnswerExample};
use super::records::{BadRecordPolicy, FieldMap, SourcedRecord};
use super::sources::read_list;
use super::tokenize::{pack, Encoder, Example, ExampleLabels};
use crate::model::load::{LoadedModel, SpecialTokens};
use crate::model::TaskKind;
use crate::{Error, Result};

/// Tokenized examples ready for batching, and what happened on the way.
#[derive(Debug, Clone)]
pub struct PreparedData {
    /// Training examples (in file order; shuffle with [`super::BatchOrder`]).
    pub train: Vec<Example>,
    /// Validation examples (empty when there is no validation set).
    pub validation: Vec<Example>,
    /// Bad records skipped (only with `skip_bad_records = true`).
    pub skipped: usize,
    /// Examples cut to `max_seq_len`.
    pub truncated: usize,
    /// Classification: the number of classes the data uses (`label_names`' length, or the largest
    /// label plus one). `None` for language modelling.
    pub label_count: Option<usize>,
    /// With `instruction_template`: the held-out questions and their expected answers.
    pub answers: Vec<AnswerExample>,
}

/// Prepares the data of `cfg` for `loaded`: its task, tokenizer, special tokens and chat template.
/// A `[data.loader]` plugin is looked up in the plugin directory.
pub fn prepare(cfg: &DataConfig, loaded: &LoadedModel) -> Result<PreparedData> {
    prepare_with_plugins(cfg, loaded, &[])
}

/// [`prepare`], looking up a `[data.loader]` plugin in `plugins` (manifest paths) first.
pub fn prepare_with_plugins(
    cfg: &DataConfig,
    loaded: &LoadedModel,
    plugins: &[PathBuf],
) -> Result<PreparedData> {
    if cfg.max_seq_len > loaded.max_positions {
        return Err(Error::config(format!(
            "[data] max_seq_len = {} exceeds the {} positions of {}; lower it",
            cfg.max_seq_len,
            loaded.max_positions,
            loaded.source.display()
        )));
    }
    prepare_parts(
        cfg,
        ModelParts {
            task: loaded.model.task(),
            tokenizer: &loaded.tokenizer,
            special: loaded.special,
            chat_template: loaded.chat_template.as_deref(),
        },
        plugins,
    )
}

/// [`prepare`] from the parts of a model it needs (for callers and tests without a model).
pub fn prepare_with(
    cfg: &DataConfig,
    task: TaskKind,
    tokenizer: &Tokenizer,
    special: SpecialTokens,
    chat_template: Option<&str>,
) -> Result<PreparedData> {
    let parts = ModelParts {
        task,
        tokenizer,
        special,
        chat_template,
    };
    prepare_parts(cfg, parts, &[])
}

/// What data preparation needs of a model.
struct ModelParts<'a> {
    task: TaskKind,
    tokenizer: &'a Tokenizer,
    special: SpecialTokens,
    chat_template: Option<&'a str>,
}

fn prepare_parts(
    cfg: &DataConfig,
    model: ModelParts<'_>,
    plugins: &[PathBuf],
) -> Result<PreparedData> {
    let ModelParts {
        task,
        tokenizer,
        special,
        chat_template,
    } = model;
    check_task(cfg, task)?;
    let packing = cfg.packing;
    let fields = FieldMap::from_config(cfg);
    let mut policy = BadRecordPolicy::new(cfg.skip_bad_records);
    let loader = cfg
        .loader
        .as_ref()
        .map(|spec| spec.load(plugins))
        .transpose()?;
    if let Some(plugin) = &loader {
        tracing::info!(
            loader = plugin.id(),
            transport = ?plugin.transport_kind,
            "reading the data with a loader plugin"
        );
    }
    let read = |locations: &[String], policy: &mut BadRecordPolicy| {
        read_list(locations, cfg, &fields, policy, loader.as_ref())
    };
    let mut train_records = read(&cfg.train, &mut policy)?;
    let mut validation_records = read(&cfg.validation, &mut policy)?;
    if cfg.validation.is_empty() {
        (train_records, validation_records) =
            split(train_records, cfg.validation_ratio, cfg.split_seed)?;
    }
    let mut answers = Vec::new();
    if let Some(template) = &cfg.instruction_template {
        (train_records, _) = instruct::to_conversations(train_records, template, &cfg.label_names)?;
        (validation_records, answers) =
            instruct::to_conversations(validation_records, template, &cfg.label_names)?;
    }

    let encoder = Encoder::new(
        task,
        tokenizer,
        special,
        chat_template,
        cfg.loss_on,
        cfg.max_seq_len,
        !packing,
    )?;
    let (mut train, mut truncated) = encode_all(&encoder, &train_records, &mut policy)?;
    let (mut validation, val_truncated) = encode_all(&encoder, &validation_records, &mut policy)?;
    truncated += val_truncated;
    if packing {
        train = pack(train, cfg.max_seq_len, special.eos);
        validation = pack(validation, cfg.max_seq_len, special.eos);
    }
    if train.is_empty() {
        return Err(Error::config(format!(
            "[data] no usable training example in {:?} ({} bad records skipped)",
            cfg.train, policy.skipped
        )));
    }
    let label_count = match task {
        TaskKind::CausalLm => None,
        TaskKind::SequenceClassification { .. } if !cfg.label_names.is_empty() => {
            Some(cfg.label_names.len())
        }
        TaskKind::SequenceClassification { .. } => {
            let max = train
                .iter()
                .chain(&validation)
                .filter_map(|e| match e.labels {
                    ExampleLabels::Class(c) => Some(c),
                    ExampleLabels::Tokens(_) => None,
                });
            max.max().map(|m| m as usize + 1)
        }
    };
    tracing::info!(
        train = train.len(),
        validation = validation.len(),
        skipped = policy.skipped,
        truncated,
        "data prepared"
    );
    Ok(PreparedData {
        train,
        validation,
        skipped: policy.skipped,
        truncated,
        label_count,
        answers,
    })
}

/// Validates `cfg`, and the settings that need a causal LM (`packing`, `instruction_template`)
/// against `task`.
pub(crate) fn check_task(cfg: &DataConfig, task: TaskKind) -> Result<()> {
    cfg.validate()?;
    if cfg.packing && task != TaskKind::CausalLm {
        return Err(Error::config(
            "[data] packing = true applies to causal language models only; remove it",
        ));
    }
    if let Some(template) = &cfg.instruction_template {
        if task != TaskKind::CausalLm {
            return Err(Error::config(
                "[data] instruction_template turns records into conversations for a causal LM; \
                 remove it for a classification model",
            ));
        }
        instruct::validate(template, &cfg.label_names)?;
    }
    Ok(())
}

/// Splits records into (train, validation) by a seeded shuffle: `round(len * ratio)` records go
/// to validation. Both parts keep file order.
pub fn split(
    records: Vec<SourcedRecord>,
    ratio: f64,
    seed: u64,
) -> Result<(Vec<SourcedRecord>, Vec<SourcedRecord>)> {
    let n = records.len();
    let n_val = (n as f64 * ratio).round() as usize;
    if n_val == 0 {
        return Ok((records, Vec::new()));
    }
    if n_val >= n {
        return Err(Error::config(format!(
            "[data] validation_ratio = {ratio} leaves no training record out of {n}; lower it"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut is_val = vec![false; n];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    let (validation, train): (Vec<_>, Vec<_>) =
        records.into_iter().zip(is_val).partition(|(_, v)| *v);
    Ok((
        train.into_iter().map(|(r, _)| r).collect(),
        validation.into_iter().map(|(r, _)| r).collect(),
    ))
}

/// Encodes records in parallel, handing bad ones to `policy`; returns the examples (in record
/// order) and how many were truncated.
pub(crate) fn encode_all(
    encoder: &Encoder,
    records: &[SourcedRecord],
    policy: &mut BadRecordPolicy,
) -> Result<(Vec<Example>, usize)> {
    let encoded: Vec<_> = records.par_iter().map(|r| encoder.encode(r)).collect();
    let mut examples = Vec::with_capacity(encoded.len());
    let mut truncated = 0;
    for result in encoded {
        match result {
            Ok(e) => {
                truncated += usize::from(e.truncated);
                examples.push(e.example);
            }
            Err(error) => policy.bad(error)?,
        }
    }
    Ok((examples, truncated))
}

#[cfg(test)]
mod tests {
    use super::super::records::Record;
    use super::*;

    fn records(n: usize) -> Vec<SourcedRecord> {
        (0..n)
            .map(|i| SourcedRecord {
                record: Record::Text {
                    text: format!("t{i}"),
                    label: Some(0),
                },
                path: PathBuf::from("x"),
                line: i + 1,
            })
            .collect()
    }

    #[test]
    fn split_is_seeded_disjoint_and_complete() {
        let (t, v) = split(records(100), 0.2, 42).unwrap();
        assert_eq!((t.len(), v.len()), (80, 20));
        let (t2, v2) = split(records(100), 0.2, 42).unwrap();
        assert_eq!(v, v2);
        assert_eq!(t, t2);
        let (_, v3) = split(records(100), 0.2, 43).unwrap();
        assert_ne!(v, v3);
        let mut lines: Vec<usize> = t.iter().chain(&v).map(|r| r.line).collect();
        lines.sort_unstable();
        assert_eq!(lines, (1..=100).collect::<Vec<_>>());
        assert_eq!(split(records(3), 0.0, 1).unwrap().1.len(), 0);
        assert!(split(records(1), 0.9, 1).is_err());
    }
}
