//! The data path on real assets: the all-MiniLM-L6-v2 WordPiece tokenizer with the UCI sentiment
//! sentences, and the SmolLM2 tokenizer and chat template (built from its GGUF file) on a
//! multi-turn conversation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use candle_core::Device;
use tokenizers::Tokenizer;
use whetstone_host::data::{
    collate, prepare_with, BatchOrder, ChatMessage, DataConfig, Example, ExampleLabels, LossOn,
    PreparedData,
};
use whetstone_host::model::gguf::GgufFile;
use whetstone_host::model::load::SpecialTokens;
use whetstone_host::model::tokenizer::from_gguf;
use whetstone_host::model::TaskKind;
use whetstone_host::ops::IGNORE_INDEX;
use whetstone_host::Error;

const UCI: [&str; 3] = [
    "asset:uci-sentiment/imdb.json",
    "asset:uci-sentiment/amazon.json",
    "asset:uci-sentiment/yelp.json",
];
const CLASSIFY: TaskKind = TaskKind::SequenceClassification { num_labels: 2 };

/// A file of a fetched asset; fails (never skips) when the asset is missing.
fn asset_file(name: &str, file: &str) -> PathBuf {
    let path = whetstone_host::assets::asset_dir(name).join(file);
    assert!(
        path.is_file(),
        "{} is missing: run `whet assets fetch` first",
        path.display()
    );
    path
}

/// The real MiniLM tokenizer with its baked-in padding and truncation turned off.
fn minilm_tokenizer() -> Tokenizer {
    let mut tokenizer =
        Tokenizer::from_file(asset_file("all-minilm-l6-v2", "tokenizer.json")).unwrap();
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).unwrap();
    tokenizer
}

fn minilm_special() -> SpecialTokens {
    SpecialTokens {
        bos: None,
        eos: Some(102),
        pad: 0,
        add_bos: false,
    }
}

fn uci_config(files: &[&str]) -> DataConfig {
    for f in files {
        asset_file("uci-sentiment", f.rsplit('/').next().unwrap());
    }
    let mut cfg = DataConfig::new(files.iter().map(|s| s.to_string()).collect());
    cfg.label_field = "class".into();
    cfg
}

fn classify(cfg: &DataConfig) -> whetstone_host::Result<PreparedData> {
    prepare_with(cfg, CLASSIFY, &minilm_tokenizer(), minilm_special(), None)
}

#[test]
fn uci_trailing_empty_record_is_an_error_naming_file_and_record() {
    let cfg = uci_config(&UCI[..1]);
    match classify(&cfg) {
        Err(Error::BadRecord {
            path,
            line,
            message,
        }) => {
            assert!(
                path.ends_with("uci-sentiment/imdb.json"),
                "{}",
                path.display()
            );
            assert_eq!(line, 1001, "the empty record is the 1001st of imdb.json");
            assert!(message.contains("`text` is empty"), "{message}");
        }
        Err(other) => panic!("expected a bad-record error, got: {other}"),
        Ok(_) => panic!("the empty trailing record must be reported"),
    }
}

#[test]
fn uci_split_2400_600_deterministic_with_skipped_records() {
    let mut cfg = uci_config(&UCI);
    cfg.skip_bad_records = true;
    let data = classify(&cfg).unwrap();
    assert_eq!(data.skipped, 3, "one empty record per file");
    assert_eq!((data.train.len(), data.validation.len()), (2400, 600));
    assert_eq!(data.label_count, Some(2));
    let positives = data
        .train
        .iter()
        .chain(&data.validation)
        .filter(|e| e.labels == ExampleLabels::Class(1))
        .count();
    assert_eq!(positives, 1500);
    for e in data.train.iter().chain(&data.validation) {
        assert_eq!(e.input_ids.first(), Some(&101), "starts with [CLS]");
        assert_eq!(e.input_ids.last(), Some(&102), "ends with [SEP]");
        assert!(e.len() <= 128);
    }
    let again = classify(&cfg).unwrap();
    assert_eq!(
        data.validation, again.validation,
        "the split is deterministic for a seed"
    );
    cfg.split_seed = 7;
    let other = classify(&cfg).unwrap();
    assert_ne!(
        data.validation, other.validation,
        "another seed gives another split"
    );
}

#[test]
fn uci_truncation_and_max_records() {
    let mut cfg = uci_config(&UCI[1..2]);
    cfg.skip_bad_records = true;
    cfg.max_seq_len = 12;
    cfg.max_records = Some(500);
    cfg.validation_ratio = 0.1;
    let data = classify(&cfg).unwrap();
    assert_eq!(data.train.len() + data.validation.len(), 500);
    assert_eq!(
        data.skipped, 0,
        "the empty record lies beyond the first 500"
    );
    assert!(
        data.truncated > 10,
        "some amazon reviews exceed 12 tokens: {}",
        data.truncated
    );
    assert!(data
        .train
        .iter()
        .all(|e| e.len() <= 12 && e.input_ids.last() == Some(&102)));
    let longest = data.train.iter().map(Example::len).max().unwrap();
    assert_eq!(longest, 12);
}

#[test]
fn uci_batches_collate_with_dynamic_padding() {
    let mut cfg = uci_config(&UCI[2..]);
    cfg.skip_bad_records = true;
    let data = classify(&cfg).unwrap();
    let order = BatchOrder::shuffled(data.train.len(), 16, 3).unwrap();
    let batches = order.batches(0);
    assert_eq!(batches.len(), 50);
    let examples: Vec<&Example> = batches[0].iter().map(|&i| &data.train[i]).collect();
    let batch = collate(&examples, 0, &Device::Cpu).unwrap();
    let longest = examples.iter().map(|e| e.len()).max().unwrap();
    assert_eq!(batch.input_ids.dims(), &[16, longest]);
    assert_eq!(batch.labels.dims(), &[16]);
    let mask: u32 = batch.attention_mask.sum_all().unwrap().to_scalar().unwrap();
    assert_eq!(mask as usize, batch.num_tokens);
    assert_eq!(
        batch.num_tokens,
        examples.iter().map(|e| e.len()).sum::<usize>()
    );
}

#[test]
fn uci_packing_for_language_modelling() {
    let mut cfg = uci_config(&UCI[..1]);
    cfg.skip_bad_records = true;
    cfg.packing = true;
    cfg.max_seq_len = 64;
    cfg.validation_ratio = 0.0;
    let data = prepare_with(
        &cfg,
        TaskKind::CausalLm,
        &minilm_tokenizer(),
        minilm_special(),
        None,
    )
    .unwrap();
    assert!(data.validation.is_empty());
    assert_eq!(data.truncated, 0);
    let (last, full) = data.train.split_last().unwrap();
    assert!(full.iter().all(|e| e.len() == 64));
    assert!(last.len() <= 64);
    let separators = data
        .train
        .iter()
        .flat_map(|e| &e.input_ids)
        .filter(|&&id| id == 102)
        .count();
    assert_eq!(separators, 1000, "one end-of-sequence per sentence");
    for e in &data.train {
        let ExampleLabels::Tokens(labels) = &e.labels else {
            panic!("LM labels expected")
        };
        assert!(
            labels
                .iter()
                .zip(&e.input_ids)
                .all(|(&l, &i)| l == i64::from(i)),
            "text trains on all tokens"
        );
    }
}

#[test]
fn smollm2_chat_template_trains_only_on_assistant_turns() {
    let gguf = GgufFile::open(&asset_file(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ))
    .unwrap();
    let tok = from_gguf(&gguf).unwrap();
    assert!(tok.chat_template.is_some(), "SmolLM2 ships a chat template");
    let conversation = serde_json::json!({"messages": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, of course."},
    ]});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chat.jsonl");
    std::fs::write(&file, format!("{conversation}\n")).unwrap();
    let mut cfg = DataConfig::new(vec![file.to_string_lossy().into_owned()]);
    cfg.validation_ratio = 0.0;
    cfg.max_seq_len = 256;
    let data = prepare_with(
        &cfg,
        TaskKind::CausalLm,
        &tok.tokenizer,
        tok.special,
        tok.chat_template.as_deref(),
    )
    .unwrap();
    let example = &data.train[0];
    let ExampleLabels::Tokens(labels) = &example.labels else {
        panic!("LM labels expected")
    };
    let trained: Vec<u32> = example
        .input_ids
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(&i, _)| i)
        .collect();
    let decoded = tok.tokenizer.decode(&trained, false).unwrap();
    assert_eq!(decoded, "Paris.<|im_end|>\nRome, of course.<|im_end|>\n");
    let full = tok.tokenizer.decode(&example.input_ids, false).unwrap();
    assert!(
        full.starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{full}"
    );

    cfg.loss_on = LossOn::All;
    let all = prepare_with(
        &cfg,
        TaskKind::CausalLm,
        &tok.tokenizer,
        tok.special,
        tok.chat_template.as_deref(),
    )
    .unwrap();
    let ExampleLabels::Tokens(labels) = &all.train[0].labels else {
        panic!("LM labels expected")
    };
    assert!(labels.iter().all(|&l| l != IGNORE_INDEX));

    let rendered = whetstone_host::data::ChatTemplate::from_jinja(
        tok.chat_template.as_deref().unwrap(),
        None,
        None,
    )
    .unwrap()
    .render(&[ChatMessage::new("user", "Hi")], true)
    .unwrap();
    assert!(
        rendered.ends_with("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        "{rendered}"
    );
}

#[test]
fn uci_streamed_epochs_are_seeded_permutations_and_the_hash_split_is_disjoint() {
    let mut cfg = uci_config(&UCI);
    cfg.skip_bad_records = true;
    cfg.validation_ratio = 0.0;
    let all = classify(&cfg).unwrap();
    let mut streamed_cfg = cfg.clone();
    streamed_cfg.streaming = true;
    streamed_cfg.validation_ratio = 0.2;
    streamed_cfg.shuffle_buffer = 500;
    let stream = whetstone_host::data::stream::prepare_streaming_with(
        &streamed_cfg,
        CLASSIFY,
        &minilm_tokenizer(),
        minilm_special(),
        None,
        &[],
    )
    .unwrap();
    let epoch = |e: usize| -> Vec<Example> {
        stream
            .epoch(e, 42, None)
            .unwrap()
            .collect::<whetstone_host::Result<_>>()
            .unwrap()
    };
    let first = epoch(0);
    // About a fifth held out, by a hash of file and line.
    let share = stream.validation.len() as f64 / all.train.len() as f64;
    assert!((0.17..0.23).contains(&share), "{share}");
    // Training and held-out examples together are the in-memory examples, each once.
    let key = |e: &Example| format!("{:?}", e);
    let mut together: Vec<String> = first.iter().chain(&stream.validation).map(key).collect();
    let mut expected: Vec<String> = all.train.iter().map(key).collect();
    together.sort();
    expected.sort();
    assert_eq!(together, expected);
    // The same epoch is the same order; the next epoch another; neither is the file order.
    assert_eq!(epoch(0), first);
    let second = epoch(1);
    assert_ne!(second, first);
    let in_file_order: Vec<&Example> = all
        .train
        .iter()
        .filter(|e| !stream.validation.contains(e))
        .collect();
    assert_ne!(first.iter().collect::<Vec<_>>(), in_file_order);
}
