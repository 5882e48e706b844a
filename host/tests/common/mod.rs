//! Helpers shared by the host's integration tests: building a first-party plugin, a tiny random
//! BERT classifier and synthetic classification examples. (Each test file is its own crate and
//! uses only some of them.)

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use whetstone_host::data::{Example, ExampleLabels};
use whetstone_host::model::bert::{BertConfig, BertForSequenceClassification};
use whetstone_host::model::load::Pooling;
use whetstone_host::model::Model;
use whetstone_host::plugin::build::{self, BuildOptions};
use whetstone_host::plugin::{Manifest, TransportKind};

/// Vocabulary of [`tiny_bert`] and [`examples`].
pub const VOCAB: usize = 40;

/// Builds `plugins/<dir>` into the test target folder: native, and wasm too when the toolchain
/// is there (`WHETSTONE_REQUIRE_WASM`, set by CI, makes a missing toolchain a failure).
pub fn build_plugin(dir: &str, wasm: bool) -> Manifest {
    let wasm = wasm && {
        let available = build::wasm_toolchain_available();
        if !available {
            let why = build::missing_wasm_toolchain();
            assert!(
                std::env::var_os("WHETSTONE_REQUIRE_WASM").is_none(),
                "{why}"
            );
            eprintln!("testing the native build only: {why}");
        }
        available
    };
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins")
        .join(dir);
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{dir}-plugin"));
    let opts = BuildOptions {
        native: true,
        wasm,
        out_dir: Some(out),
        release: false,
    };
    build::build(&crate_dir, &opts).unwrap()
}

/// The transports `manifest` has builds for.
pub fn transports(manifest: &Manifest) -> Vec<TransportKind> {
    let mut all = vec![TransportKind::Native];
    if manifest.artifacts.wasm.is_some() {
        all.push(TransportKind::Wasm);
    }
    all
}

/// A 2-block BERT classifier of hidden size 16 over [`VOCAB`] tokens, 2 classes, always the
/// same weights, with every parameter frozen.
pub fn tiny_bert() -> BertForSequenceClassification {
    let json = json!({
        "vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 32, "max_position_embeddings": 24,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0
    });
    let config = BertConfig::from_json(&json, Path::new("config.json")).unwrap();
    let model =
        BertForSequenceClassification::random(&config, 2, Pooling::Mean, &Device::Cpu, 5).unwrap();
    model.params().freeze_all().unwrap();
    model
}

/// `n` sentences of 3 to 8 tokens (ids 1..VOCAB) labelled by `rule`.
pub fn examples(n: usize, seed: u64, rule: fn(&[u32]) -> bool) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(3..=8);
            let ids: Vec<u32> = (0..len)
                .map(|_| rng.random_range(1..VOCAB as u32))
                .collect();
            Example {
                labels: ExampleLabels::Class(i64::from(rule(&ids))),
                input_ids: ids,
            }
        })
        .collect()
}

/// Most tokens come from the upper half of the vocabulary.
pub fn mostly_high(ids: &[u32]) -> bool {
    2 * ids.iter().filter(|&&t| t as usize >= VOCAB / 2).count() > ids.len()
}
