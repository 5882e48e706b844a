//! The BERT-family encoder: gradients reach exactly the trainable parameters, padding does not
//! leak into the pooled state, Hugging Face directories load (single and sharded weights, `bert.`
//! prefixes) or fail with errors naming the file, and the real all-MiniLM-L6-v2 gives
//! sentence-transformers' similarities.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use whetstone_host::model::bert::{self, BertConfig, BertForSequenceClassification};
use whetstone_host::model::hf;
use whetstone_host::model::load::{ModelSpec, Pooling, TaskSpec};
use whetstone_host::model::{Mode, Model};

fn tiny_config() -> BertConfig {
    let json = serde_json::json!({
        "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 32, "max_position_embeddings": 24, "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "pad_token_id": 0
    });
    BertConfig::from_json(&json, Path::new("config.json")).unwrap()
}

/// Two sequences, the second right-padded.
fn batch() -> (Tensor, Tensor) {
    let ids = Tensor::from_vec(
        vec![2u32, 7, 9, 11, 3, 5, 2, 8, 3, 0, 0, 0],
        (2, 6),
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::from_vec(
        vec![1u32, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        (2, 6),
        &Device::Cpu,
    )
    .unwrap();
    (ids, mask)
}

fn abs_sum(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn gradients_reach_every_trainable_param_and_no_frozen_one() {
    let model =
        BertForSequenceClassification::random(&tiny_config(), 3, Pooling::Mean, &Device::Cpu, 7)
            .unwrap();
    let matched = model
        .params()
        .set_trainable_by_patterns(&["classifier.*".to_string(), "encoder.layer.1.*".to_string()])
        .unwrap();
    assert_eq!(
        matched,
        2 + 16,
        "classifier weight+bias and the 16 tensors of layer 1"
    );
    let (ids, mask) = batch();
    let labels = Tensor::from_vec(vec![2i64, 0], 2, &Device::Cpu).unwrap();
    let logits = model.forward(&ids, &mask, Mode::Train).unwrap();
    assert_eq!(logits.dims(), &[2, 3]);
    let grads = model.loss(&logits, &labels).unwrap().backward().unwrap();
    let (mut trainable, mut frozen) = (0, 0);
    for p in model.params().iter() {
        match p.var() {
            Some(var) => {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{} got no gradient", p.name()));
                assert!(abs_sum(g) > 0.0, "{} has an all-zero gradient", p.name());
                trainable += 1;
            }
            None => {
                assert!(
                    grads.get(&p.tensor()).is_none(),
                    "frozen {} has a gradient entry",
                    p.name()
                );
                frozen += 1;
            }
        }
    }
    assert_eq!((trainable, frozen), (18, 5 + 16));
}

#[test]
fn padding_does_not_change_the_embedding_and_eval_is_deterministic() {
    for pooling in [Pooling::Mean, Pooling::Cls] {
        let model =
            BertForSequenceClassification::random(&tiny_config(), 2, pooling, &Device::Cpu, 3)
                .unwrap();
        let (ids, mask) = batch();
        let padded = model.embed(&ids, &mask).unwrap();
        // The second sequence alone, without padding.
        let alone = model
            .embed(
                &ids.narrow(0, 1, 1).unwrap().narrow(1, 0, 3).unwrap(),
                &mask.narrow(0, 1, 1).unwrap().narrow(1, 0, 3).unwrap(),
            )
            .unwrap();
        let diff = abs_sum(&(padded.narrow(0, 1, 1).unwrap() - &alone).unwrap());
        assert!(
            diff < 1e-4,
            "{pooling:?}: padding changed the embedding by {diff}"
        );
        let again = model.embed(&ids, &mask).unwrap();
        assert_eq!(abs_sum(&(padded - again).unwrap()), 0.0);
    }
}

#[test]
fn dropout_is_seeded_and_only_active_in_training() {
    let (ids, mask) = batch();
    let logits = |seed: u64, mode: Mode| {
        let model = BertForSequenceClassification::random(
            &tiny_config(),
            2,
            Pooling::Mean,
            &Device::Cpu,
            5,
        )
        .unwrap();
        // Same weights (seed 5) for all; the dropout stream differs only through `seed` draws.
        for _ in 0..seed {
            model.forward(&ids, &mask, Mode::Train).unwrap();
        }
        model.forward(&ids, &mask, mode).unwrap()
    };
    let diff = |a: Tensor, b: Tensor| abs_sum(&(a - b).unwrap());
    assert_eq!(
        diff(logits(0, Mode::Train), logits(0, Mode::Train)),
        0.0,
        "same seed, same dropout"
    );
    assert!(
        diff(logits(0, Mode::Train), logits(1, Mode::Train)) > 0.0,
        "dropout draws new masks"
    );
    assert!(
        diff(logits(0, Mode::Train), logits(0, Mode::Eval)) > 0.0,
        "dropout is active in training"
    );
    assert_eq!(
        diff(logits(0, Mode::Eval), logits(1, Mode::Eval)),
        0.0,
        "evaluation is deterministic"
    );
}

#[test]
fn linear_module_names_are_hugging_face_names() {
    let model =
        BertForSequenceClassification::random(&tiny_config(), 2, Pooling::Mean, &Device::Cpu, 1)
            .unwrap();
    let names = model.linear_module_names();
    assert_eq!(names.len(), 2 * 6 + 1);
    for n in [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.1.attention.output.dense",
        "encoder.layer.1.intermediate.dense",
        "encoder.layer.1.output.dense",
        "classifier",
    ] {
        assert!(names.iter().any(|x| x == n), "missing {n}");
    }
    for n in &names {
        assert!(
            model.params().contains(&format!("{n}.weight")),
            "{n}.weight is not a parameter"
        );
    }
    assert_eq!(model.architecture(), "BertForSequenceClassification");
}

/// All parameter values of a model under `prefix + name`.
fn tensors_of(model: &BertForSequenceClassification, prefix: &str) -> HashMap<String, Tensor> {
    model
        .params()
        .iter()
        .map(|p| (format!("{prefix}{}", p.name()), p.tensor()))
        .collect()
}

#[test]
fn sharded_prefixed_half_precision_weights_load_like_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let model =
        BertForSequenceClassification::random(&tiny_config(), 2, Pooling::Mean, &Device::Cpu, 11)
            .unwrap();
    let all = tensors_of(&model, "bert.");
    // Two shards; the embeddings in bf16 (converted back to f32 on load).
    let (emb, rest): (HashMap<_, _>, HashMap<_, _>) =
        all.into_iter().partition(|(k, _)| k.contains("embeddings"));
    let emb: HashMap<_, _> = emb
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
        .collect();
    candle_core::safetensors::save(&emb, dir.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&rest, dir.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    let mut map = serde_json::Map::new();
    for k in emb.keys() {
        map.insert(k.clone(), "model-00001-of-00002.safetensors".into());
    }
    for k in rest.keys() {
        map.insert(k.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let loaded = hf::load_weights(dir.path(), &Device::Cpu).unwrap();
    assert!(loaded.values().all(|t| t.dtype() == DType::F32));
    let reloaded = BertForSequenceClassification::from_tensors(
        &tiny_config(),
        loaded,
        dir.path(),
        2,
        Pooling::Mean,
        &Device::Cpu,
        0,
    )
    .unwrap();
    let (ids, mask) = batch();
    let a = model.forward(&ids, &mask, Mode::Eval).unwrap();
    let b = reloaded.forward(&ids, &mask, Mode::Eval).unwrap();
    // The classifier came from the checkpoint (not re-initialised); only bf16 rounding differs.
    let diff = abs_sum(&(a - b).unwrap());
    assert!(diff < 1e-3, "reloaded model differs by {diff}");
}

fn write_tiny_config(dir: &Path) {
    std::fs::write(
        dir.join("config.json"),
        r#"{"hidden_size": 16, "num_attention_heads": 4}"#,
    )
    .unwrap();
}

fn classification_spec(dir: &Path) -> ModelSpec {
    ModelSpec {
        path: dir.display().to_string(),
        task: TaskSpec::Classification,
        num_labels: 2,
        pooling: Pooling::Mean,
        dropout: None,
        quantize: None,
    }
}

fn load_err(dir: &Path) -> String {
    match bert::load_hf_dir(dir, &classification_spec(dir), &Device::Cpu, 0) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn loading_errors_name_the_file() {
    // Missing config.json.
    let empty = tempfile::tempdir().unwrap();
    let msg = load_err(empty.path());
    assert!(msg.contains("config.json"), "{msg}");

    // Invalid config.json.
    let bad_config = tempfile::tempdir().unwrap();
    std::fs::write(bad_config.path().join("config.json"), "{ not json").unwrap();
    let msg = load_err(bad_config.path());
    assert!(
        msg.contains("config.json") && msg.contains("invalid JSON"),
        "{msg}"
    );

    // No weights.
    let no_weights = tempfile::tempdir().unwrap();
    write_tiny_config(no_weights.path());
    let msg = load_err(no_weights.path());
    assert!(msg.contains("model.safetensors"), "{msg}");

    // Corrupt safetensors.
    let corrupt = tempfile::tempdir().unwrap();
    write_tiny_config(corrupt.path());
    std::fs::write(
        corrupt.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00garbage",
    )
    .unwrap();
    let msg = load_err(corrupt.path());
    assert!(
        msg.contains("model.safetensors") && msg.contains("not a valid safetensors file"),
        "{msg}"
    );

    // An index naming a shard that is not there.
    let missing_shard = tempfile::tempdir().unwrap();
    write_tiny_config(missing_shard.path());
    let index = r#"{"weight_map": {"embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors"}}"#;
    std::fs::write(
        missing_shard.path().join("model.safetensors.index.json"),
        index,
    )
    .unwrap();
    let msg = load_err(missing_shard.path());
    assert!(msg.contains("model-00001-of-00002.safetensors"), "{msg}");

    // Weights of another architecture: the missing tensor is named.
    let wrong = tempfile::tempdir().unwrap();
    write_tiny_config(wrong.path());
    let t: HashMap<String, Tensor> = [(
        "model.embed_tokens.weight".to_string(),
        Tensor::zeros((4, 16), DType::F32, &Device::Cpu).unwrap(),
    )]
    .into();
    candle_core::safetensors::save(&t, wrong.path().join("model.safetensors")).unwrap();
    let msg = load_err(wrong.path());
    assert!(msg.contains("embeddings.word_embeddings.weight"), "{msg}");

    // A causal-LM task on an encoder is a configuration error.
    let mut spec = classification_spec(wrong.path());
    spec.task = TaskSpec::CausalLm;
    assert!(bert::load_hf_dir(wrong.path(), &spec, &Device::Cpu, 0).is_err());
}

/// The real all-MiniLM-L6-v2 directory; fails (never skips) when the asset is missing.
fn minilm_dir() -> PathBuf {
    let dir = whetstone_host::assets::asset_dir("all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 is not in {}: run `whet assets fetch` first",
        dir.display()
    );
    dir
}

/// L2-normalised mean-pooled embeddings of `sentences`, batched with padding.
fn sentence_embeddings(
    model: &BertForSequenceClassification,
    tokenizer: &tokenizers::Tokenizer,
    sentences: &[&str],
) -> Vec<Vec<f32>> {
    let encodings: Vec<_> = sentences
        .iter()
        .map(|s| tokenizer.encode(*s, true).unwrap())
        .collect();
    let len = encodings.iter().map(|e| e.get_ids().len()).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for e in &encodings {
        let n = e.get_ids().len();
        ids.extend(
            e.get_ids()
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, len - n)),
        );
        mask.extend(std::iter::repeat_n(1u32, n).chain(std::iter::repeat_n(0, len - n)));
    }
    let ids = Tensor::from_vec(ids, (sentences.len(), len), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (sentences.len(), len), &Device::Cpu).unwrap();
    let emb = model.embed(&ids, &mask).unwrap().to_vec2::<f32>().unwrap();
    emb.into_iter()
        .map(|v| {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect()
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn minilm_paraphrases_are_close_and_unrelated_sentences_are_not() {
    let dir = minilm_dir();
    let config =
        BertConfig::from_json(&hf::read_config(&dir).unwrap(), &dir.join("config.json")).unwrap();
    let weights = hf::load_weights(&dir, &Device::Cpu).unwrap();
    let model = BertForSequenceClassification::from_tensors(
        &config,
        weights,
        &dir,
        2,
        Pooling::Mean,
        &Device::Cpu,
        0,
    )
    .unwrap();
    let tokenizer = hf::load_tokenizer(&dir).unwrap();
    let emb = sentence_embeddings(
        &model,
        &tokenizer,
        &[
            "A man is playing a guitar.",
            "Someone is playing an acoustic guitar.",
            "The stock market fell sharply on Monday.",
        ],
    );
    let paraphrase = cosine(&emb[0], &emb[1]);
    let unrelated = cosine(&emb[0], &emb[2]);
    eprintln!("all-MiniLM-L6-v2 cosine: paraphrase {paraphrase:.4}, unrelated {unrelated:.4}");
    assert!(paraphrase > 0.6, "paraphrase cosine {paraphrase}");
    assert!(unrelated < 0.3, "unrelated cosine {unrelated}");
}

#[test]
fn minilm_loads_through_load_hf_dir() {
    let dir = minilm_dir();
    let loaded = bert::load_hf_dir(&dir, &classification_spec(&dir), &Device::Cpu, 0).unwrap();
    assert_eq!(loaded.model.architecture(), "BertForSequenceClassification");
    assert_eq!(loaded.max_positions, 512);
    assert_eq!(loaded.special.pad, 0);
    assert_eq!(loaded.model.linear_module_names().len(), 6 * 6 + 1);
    assert_eq!(loaded.model.params().num_params(), 22_565_376 + 2 * 384 + 2);
    // Padding and truncation are off: a long text is not cut to 128 tokens, a short one not padded.
    let long = "word ".repeat(300);
    assert!(
        loaded
            .tokenizer
            .encode(long.as_str(), true)
            .unwrap()
            .get_ids()
            .len()
            > 300
    );
    assert_eq!(
        loaded.tokenizer.encode("hello", true).unwrap().get_ids(),
        &[101, 7592, 102]
    );
}

/// The host's tokenization and mean-pooled embeddings match an independent numpy float64
/// implementation (`tests/reference/minilm_embeddings.py`, own WordPiece and safetensors reader).
#[test]
fn minilm_matches_the_numpy_reference() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/minilm_embeddings.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let dir = minilm_dir();
    let config =
        BertConfig::from_json(&hf::read_config(&dir).unwrap(), &dir.join("config.json")).unwrap();
    let weights = hf::load_weights(&dir, &Device::Cpu).unwrap();
    let model = BertForSequenceClassification::from_tensors(
        &config,
        weights,
        &dir,
        2,
        Pooling::Mean,
        &Device::Cpu,
        0,
    )
    .unwrap();
    let tokenizer = hf::load_tokenizer(&dir).unwrap();
    let sentences = reference["sentences"].as_array().unwrap();
    let texts: Vec<&str> = sentences
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    let encodings: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tokenizer.encode(*t, true).unwrap().get_ids().to_vec())
        .collect();
    let len = encodings.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for (enc, s) in encodings.iter().zip(sentences) {
        let expected: Vec<u32> = s["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(enc, &expected, "token ids of {:?}", s["text"]);
        ids.extend(
            enc.iter()
                .copied()
                .chain(std::iter::repeat_n(0, len - enc.len())),
        );
        mask.extend(
            std::iter::repeat_n(1u32, enc.len()).chain(std::iter::repeat_n(0, len - enc.len())),
        );
    }
    let ids = Tensor::from_vec(ids, (texts.len(), len), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (texts.len(), len), &Device::Cpu).unwrap();
    let emb = model.embed(&ids, &mask).unwrap().to_vec2::<f32>().unwrap();
    let mut worst = 0.0f64;
    for (row, s) in emb.iter().zip(sentences) {
        for (a, b) in row.iter().zip(s["mean_pooled"].as_array().unwrap()) {
            worst = worst.max((f64::from(*a) - b.as_f64().unwrap()).abs());
        }
    }
    eprintln!("all-MiniLM-L6-v2 vs numpy reference: max |Δ| = {worst:.2e}");
    assert!(
        worst < 1e-4,
        "embeddings differ from the reference by {worst}"
    );
}
