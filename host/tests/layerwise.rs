//! Gradual unfreezing through the host: the layer-wise plugin (built natively) on a tiny random
//! 3-block BERT, schedule `gradual` with `unfreeze_every = 2`, trained by `fit` for 6 steps. The
//! host asks the method after every step which base parameters train: the trainable count
//! grows at steps 2 and 4, a block's parameters change only after its unfreezing step, and a
//! run interrupted at step 3 and resumed ends with the parameters of an uninterrupted run.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::Device;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use whetstone_host::data::{Example, ExampleLabels};
use whetstone_host::model::bert::{BertConfig, BertForSequenceClassification};
use whetstone_host::model::load::Pooling;
use whetstone_host::model::Model;
use whetstone_host::params::Param;
use whetstone_host::plugin::build::{self, BuildOptions};
use whetstone_host::plugin::method::MethodAdapter;
use whetstone_host::plugin::{Manifest, Plugin, TransportKind};
use whetstone_host::recipe::{OutputConfig, TrainingConfig};
use whetstone_host::train::checkpoint;
use whetstone_host::train::{fit, FitData, RunOptions, RunSummary};
use whetstone_host::Error;

const VOCAB: usize = 40;
const BLOCKS: usize = 3;
const STEPS: usize = 6;
const UNFREEZE_EVERY: usize = 2;

/// The layer-wise plugin's native build, once per test binary.
fn manifest() -> &'static Manifest {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    MANIFEST.get_or_init(|| {
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/layerwise");
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("layerwise-plugin");
        let opts = BuildOptions {
            native: true,
            wasm: false,
            out_dir: Some(out),
            release: false,
        };
        build::build(&crate_dir, &opts).unwrap()
    })
}

fn bert_config() -> BertConfig {
    let json = json!({
        "vocab_size": VOCAB, "hidden_size": 16, "num_hidden_layers": BLOCKS,
        "num_attention_heads": 4, "intermediate_size": 32, "max_position_embeddings": 24,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0
    });
    BertConfig::from_json(&json, Path::new("config.json")).unwrap()
}

/// Sentences of 3 to 8 tokens; the class says whether most tokens come from the upper half of
/// the vocabulary.
fn examples(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(3..=8);
            let ids: Vec<u32> = (0..len)
                .map(|_| rng.random_range(1..VOCAB as u32))
                .collect();
            let high = ids.iter().filter(|&&t| t as usize >= VOCAB / 2).count();
            Example {
                labels: ExampleLabels::Class(i64::from(2 * high > ids.len())),
                input_ids: ids,
            }
        })
        .collect()
}

/// 24 examples in batches of 4: one epoch is the 6 steps.
fn training() -> TrainingConfig {
    TrainingConfig {
        learning_rate: 1e-2,
        weight_decay: 0.01,
        batch_size: 4,
        epochs: 1,
        max_grad_norm: Some(1.0),
        log_every: 1,
        seed: 9,
        ..Default::default()
    }
}

/// A fresh tiny BERT (always the same weights) with the layer-wise method attached.
fn attached() -> (BertForSequenceClassification, Arc<MethodAdapter>) {
    let model =
        BertForSequenceClassification::random(&bert_config(), 2, Pooling::Mean, &Device::Cpu, 5)
            .unwrap();
    model.params().freeze_all().unwrap();
    let plugin = Plugin::load(manifest(), TransportKind::Native).unwrap();
    let config = json!({"schedule": "gradual", "unfreeze_every": UNFREEZE_EVERY});
    let adapter = MethodAdapter::attach(&model, plugin, "default", config, 1).unwrap();
    (model, adapter)
}

/// Every parameter's values by name.
type Values = BTreeMap<String, Vec<f32>>;

fn values(params: &[Arc<Param>]) -> Values {
    params
        .iter()
        .map(|p| {
            let v = p.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (p.name().to_string(), v)
        })
        .collect()
}

/// Scalars in the parameters that are trainable now.
fn trainable_values(params: &[Arc<Param>]) -> usize {
    params
        .iter()
        .filter(|p| p.is_trainable())
        .map(|p| p.elem_count())
        .sum()
}

/// The values of block `block`'s parameters.
fn block(values: &Values, block: usize) -> Vec<(&String, &Vec<f32>)> {
    let prefix = format!("encoder.layer.{block}.");
    values
        .iter()
        .filter(|(n, _)| n.starts_with(&prefix))
        .collect()
}

/// What each step left behind: the trainable scalars and every parameter's values.
type Trace = Arc<Mutex<Vec<(usize, Values)>>>;

/// Trains a freshly attached model in `out` with `opts`, recording every step; `stop_after`
/// cancels the run after that step.
fn run(
    out: &Path,
    resume: bool,
    stop_after: Option<usize>,
) -> (
    whetstone_host::Result<RunSummary>,
    BertForSequenceClassification,
    Trace,
    (usize, Values),
) {
    let (model, adapter) = attached();
    let params: Vec<Arc<Param>> = model.params().iter().cloned().collect();
    let start = (trainable_values(&params), values(&params));
    let trace: Trace = Arc::default();
    let cancel = Arc::new(AtomicBool::new(false));
    let (seen, flag) = (trace.clone(), cancel.clone());
    let opts = RunOptions {
        resume,
        cancel: Some(cancel),
        on_step: Some(Arc::new(move |s| {
            seen.lock()
                .unwrap()
                .push((trainable_values(&params), values(&params)));
            if Some(s.step) == stop_after {
                flag.store(true, Ordering::SeqCst);
            }
        })),
        ..Default::default()
    };
    let train = examples(24, 11);
    let validation = examples(8, 12);
    let data = FitData {
        train: (&train).into(),
        validation: &validation,
        pad_id: 0,
        method: Some(&adapter),
        objective: None,
    };
    let result = fit(
        &model,
        data,
        &training(),
        &OutputConfig::new(out),
        &Device::Cpu,
        &opts,
    );
    (result, model, trace, start)
}

#[test]
fn gradual_unfreezing_trains_more_blocks_over_time_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (full, full_model, trace, (count0, values0)) = run(&dir.path().join("full"), false, None);
    let full = full.unwrap();
    assert_eq!(full.steps, STEPS);
    let trace = trace.lock().unwrap().clone();
    assert_eq!(trace.len(), STEPS);

    // The number of trained values grows after steps 2 and 4 (one block each) and only then.
    let counts: Vec<usize> = std::iter::once(count0)
        .chain(trace.iter().map(|(c, _)| *c))
        .collect();
    let block_size: usize = block(&values0, 0).iter().map(|(_, v)| v.len()).sum();
    let head = 2 * 16 + 2;
    assert_eq!(
        counts[0],
        block_size + head,
        "top block and head at the start"
    );
    for s in 1..=STEPS {
        let grows = s % UNFREEZE_EVERY == 0 && s / UNFREEZE_EVERY < BLOCKS;
        let want = if grows {
            counts[s - 1] + block_size
        } else {
            counts[s - 1]
        };
        assert_eq!(
            counts[s], want,
            "trainable values after step {s}: {counts:?}"
        );
    }
    assert_eq!(full.trainable_params, 3 * block_size + head);

    // Block b unfreezes after step (BLOCKS - 1 - b) · UNFREEZE_EVERY: its values stay put up to
    // that step and change in the next one.
    let at = |s: usize| -> &Values {
        if s == 0 {
            &values0
        } else {
            &trace[s - 1].1
        }
    };
    for b in 0..BLOCKS {
        let unfreezes = (BLOCKS - 1 - b) * UNFREEZE_EVERY;
        for s in 1..=unfreezes {
            assert_eq!(
                block(at(s), b),
                block(&values0, b),
                "block {b} changed in step {s}, before its unfreezing after step {unfreezes}"
            );
        }
        assert_ne!(
            block(at(unfreezes + 1), b),
            block(at(unfreezes), b),
            "block {b} did not change in step {}, the first after its unfreezing",
            unfreezes + 1
        );
    }
    for (name, v) in at(STEPS) {
        if name.starts_with("embeddings.") {
            assert_eq!(v, &values0[name], "`{name}` trained");
        }
    }

    // Interrupted after step 3 (block 1 unfrozen after step 2), then resumed.
    let out = dir.path().join("resumed");
    let (first, _, _, _) = run(&out, false, Some(3));
    assert!(matches!(first, Err(Error::Cancelled)), "{first:?}");
    let state = checkpoint::load(&out.join("last"), &Device::Cpu)
        .unwrap()
        .state;
    assert_eq!(state.step, 3);
    let (second, resumed_model, resumed_trace, _) = run(&out, true, None);
    let second = second.unwrap();
    assert_eq!(second.steps, STEPS);
    let losses = |s: &RunSummary| s.loss_history.iter().map(|p| p.loss).collect::<Vec<_>>();
    assert_eq!(losses(&second), losses(&full), "resumed losses differ");
    let resumed_counts: Vec<usize> = resumed_trace
        .lock()
        .unwrap()
        .iter()
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(resumed_counts, counts[4..].to_vec());
    let all =
        |m: &BertForSequenceClassification| values(&m.params().iter().cloned().collect::<Vec<_>>());
    assert_eq!(
        all(&resumed_model),
        all(&full_model),
        "resumed parameters differ"
    );
}
