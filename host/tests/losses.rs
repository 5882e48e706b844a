//! Loss plugins through the host (each built native, and wasm when the toolchain is there):
//!
//! - `cross-entropy` with its defaults is the host's fused cross-entropy (the default loss), and
//!   with label smoothing, class weights and `ignore_index` equals PyTorch's formula computed
//!   here; `focal` equals `−α_t (1 − p_t)^γ log p_t`; both for classifiers and causal LMs, with
//!   identical results native and wasm;
//! - `distill`'s value equals `α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1 − α)·CE` computed here, for a
//!   classifier and for a causal LM (shifted, with ignored positions), on both transports;
//! - with `α = 0` it is the host's own cross-entropy, and a run trained with it repeats the loss
//!   history of a run without a loss plugin;
//! - a teacher identical to the student makes the soft term 0.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use whetstone_host::model::bert::BertForSequenceClassification;
use whetstone_host::model::{Model, TaskKind};
use whetstone_host::plugin::loss::LossAdapter;
use whetstone_host::plugin::{Manifest, Plugin, TransportKind};
use whetstone_host::recipe::{OutputConfig, TrainingConfig};
use whetstone_host::train::teacher::Teacher;
use whetstone_host::train::{fit, FitData, Objective, RunOptions};

mod common;

use common::{examples, mostly_high, tiny_bert};

/// The loss plugins' builds (wasm too when the toolchain is there), once per test binary each.
fn manifest(plugin: &str) -> &'static Manifest {
    static DISTILL: OnceLock<Manifest> = OnceLock::new();
    static CROSS_ENTROPY: OnceLock<Manifest> = OnceLock::new();
    static FOCAL: OnceLock<Manifest> = OnceLock::new();
    let cell = match plugin {
        "distill" => &DISTILL,
        "cross-entropy" => &CROSS_ENTROPY,
        "focal" => &FOCAL,
        other => panic!("no loss plugin {other}"),
    };
    cell.get_or_init(|| common::build_plugin(plugin, true))
}

fn transports(plugin: &str) -> Vec<TransportKind> {
    common::transports(manifest(plugin))
}

fn loss(
    plugin: &str,
    model: &dyn Model,
    transport: TransportKind,
    config: Value,
) -> Arc<LossAdapter> {
    let plugin = Plugin::load(manifest(plugin), transport).unwrap();
    LossAdapter::attach(model, plugin, config).unwrap()
}

fn distill(model: &dyn Model, transport: TransportKind, config: Value) -> Arc<LossAdapter> {
    loss("distill", model, transport, config)
}

fn scalar(t: &Tensor) -> f64 {
    f64::from(t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap())
}

/// `log_softmax(row / temp)` in f64.
fn log_softmax(row: &[f32], temp: f64) -> Vec<f64> {
    let x: Vec<f64> = row.iter().map(|&v| f64::from(v) / temp).collect();
    let m = x.iter().cloned().fold(f64::MIN, f64::max);
    let z = x.iter().map(|v| (v - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|v| v - z).collect()
}

/// `α·T²·KL + (1 − α)·CE` over the rows of `logits` `[n, c]` whose label is not -100.
fn reference(logits: &Tensor, labels: &[i64], teacher: &Tensor, alpha: f64, t: f64) -> f64 {
    let s = logits.to_vec2::<f32>().unwrap();
    let tt = teacher.to_vec2::<f32>().unwrap();
    let (mut kl, mut ce, mut kept) = (0.0, 0.0, 0.0);
    for (i, &y) in labels.iter().enumerate() {
        if y < 0 {
            continue;
        }
        kept += 1.0;
        ce -= log_softmax(&s[i], 1.0)[y as usize];
        let (ls, lt) = (log_softmax(&s[i], t), log_softmax(&tt[i], t));
        kl += lt
            .iter()
            .zip(&ls)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>();
    }
    alpha * t * t * kl / kept + (1.0 - alpha) * ce / kept
}

/// PyTorch's `cross_entropy(logits, labels, weight, ignore_index, label_smoothing)` (mean) over
/// the rows of `logits` `[n, c]`, with the options read from the plugin's `config`; labels -100
/// are the host's ignored positions.
fn cross_entropy_reference(logits: &Tensor, labels: &[i64], config: &Value) -> f64 {
    let rows = logits.to_vec2::<f32>().unwrap();
    let eps = config["label_smoothing"].as_f64().unwrap_or(0.0);
    let ignore = config["ignore_index"].as_i64().unwrap_or(-100);
    let weight: Option<Vec<f64>> = serde_json::from_value(config["weight"].clone()).unwrap();
    let w = |k: usize| weight.as_ref().map_or(1.0, |w| w[k]);
    let classes = rows[0].len();
    let (mut nll, mut smooth, mut total) = (0.0, 0.0, 0.0);
    for (row, &y) in rows.iter().zip(labels) {
        if y < 0 || y == ignore {
            continue;
        }
        let lp = log_softmax(row, 1.0);
        nll -= w(y as usize) * lp[y as usize];
        total += w(y as usize);
        smooth -= (0..classes).map(|k| w(k) * lp[k]).sum::<f64>();
    }
    (1.0 - eps) * nll / total + eps / classes as f64 * smooth / total
}

/// Focal loss `mean(−α_t (1 − p_t)^γ log p_t)` over the rows of `logits` whose label is not
/// -100, with `alpha` one weight per class.
fn focal_reference(logits: &Tensor, labels: &[i64], gamma: f64, alpha: Option<&[f64]>) -> f64 {
    let rows = logits.to_vec2::<f32>().unwrap();
    let (mut sum, mut kept) = (0.0, 0.0);
    for (row, &y) in rows.iter().zip(labels) {
        if y < 0 {
            continue;
        }
        kept += 1.0;
        let lp = log_softmax(row, 1.0)[y as usize];
        let a = alpha.map_or(1.0, |a| a[y as usize]);
        sum -= a * (1.0 - lp.exp()).powf(gamma) * lp;
    }
    sum / kept
}

/// The causal-LM batch of these tests: logits `[2, 4, 5]` predicting labels shifted by one,
/// with one ignored (-100) position, and the same as rows `[6, 5]` with their labels.
struct LmBatch {
    logits: Tensor,
    labels: Tensor,
    rows: Tensor,
    row_labels: Vec<i64>,
}

fn lm_batch() -> LmBatch {
    let d = Device::Cpu;
    let logits = Tensor::randn(0f32, 1.0, (2, 4, 5), &d).unwrap();
    let raw = [[9i64, 1, -100, 4], [9, 3, 2, 0]];
    LmBatch {
        rows: logits.narrow(1, 0, 3).unwrap().reshape((6, 5)).unwrap(),
        labels: Tensor::new(&raw, &d).unwrap(),
        row_labels: raw.iter().flat_map(|r| r[1..].to_vec()).collect(),
        logits,
    }
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() < 1e-5 * want.abs().max(1.0),
        "{what}: {got} vs {want}"
    );
}

#[test]
fn cross_entropy_is_the_host_loss_and_pytorchs_formula() {
    let model = tiny_bert();
    let d = Device::Cpu;
    let logits = Tensor::randn(0f32, 2.0, (6, 3), &d).unwrap();
    let labels = [0i64, 2, 1, 1, 0, 2];
    let y = Tensor::new(&labels, &d).unwrap();
    let classifier = TaskKind::SequenceClassification { num_labels: 3 };
    let lm = lm_batch();
    let mut seen = Vec::new();
    for transport in transports("cross-entropy") {
        let ce = |config: &Value| loss("cross-entropy", &model, transport, config.clone());
        // Its defaults are the host's fused cross-entropy, for both tasks.
        let plain = ce(&json!({}));
        let got = scalar(&plain.loss_for(classifier, &logits, &y, None).unwrap());
        let host = scalar(&whetstone_host::ops::cross_entropy(&logits, &y).unwrap());
        assert!((got - host).abs() < 1e-6, "{transport:?}: {got} vs {host}");
        let got = scalar(
            &plain
                .loss_for(TaskKind::CausalLm, &lm.logits, &lm.labels, None)
                .unwrap(),
        );
        let host = scalar(&whetstone_host::ops::causal_lm_loss(&lm.logits, &lm.labels).unwrap());
        assert!(
            (got - host).abs() < 1e-6,
            "{transport:?} LM: {got} vs {host}"
        );

        for config in [
            json!({"label_smoothing": 0.1}),
            json!({"weight": [1.0, 2.0, 0.5]}),
            json!({"label_smoothing": 0.2, "weight": [0.3, 1.0, 2.0], "ignore_index": 1}),
        ] {
            let got = scalar(&ce(&config).loss_for(classifier, &logits, &y, None).unwrap());
            let want = cross_entropy_reference(&logits, &labels, &config);
            close(got, want, &format!("{transport:?} {config}"));
            seen.push(got);
        }
        let config =
            json!({"label_smoothing": 0.1, "weight": [1.0, 0.5, 2.0, 1.5, 0.7], "ignore_index": 2});
        let got = scalar(
            &ce(&config)
                .loss_for(TaskKind::CausalLm, &lm.logits, &lm.labels, None)
                .unwrap(),
        );
        close(
            got,
            cross_entropy_reference(&lm.rows, &lm.row_labels, &config),
            &format!("{transport:?} LM {config}"),
        );
        seen.push(got);

        let err = ce(&json!({"weight": [1.0, 2.0]}))
            .loss_for(classifier, &logits, &y, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 entries") && err.contains("3 classes"),
            "{err}"
        );
    }
    if seen.len() == 8 {
        assert_eq!(seen[..4], seen[4..], "native and wasm differ");
    }
}

#[test]
fn focal_matches_its_formula() {
    let model = tiny_bert();
    let d = Device::Cpu;
    let logits = Tensor::randn(0f32, 2.0, (6, 3), &d).unwrap();
    let labels = [0i64, 2, 1, 1, 0, 2];
    let y = Tensor::new(&labels, &d).unwrap();
    let classifier = TaskKind::SequenceClassification { num_labels: 3 };
    let lm = lm_batch();
    let mut seen = Vec::new();
    for transport in transports("focal") {
        let focal = |config: Value| loss("focal", &model, transport, config);
        // γ = 0 without α is the host's cross-entropy.
        let got = scalar(
            &focal(json!({"gamma": 0.0}))
                .loss_for(classifier, &logits, &y, None)
                .unwrap(),
        );
        let host = scalar(&whetstone_host::ops::cross_entropy(&logits, &y).unwrap());
        assert!((got - host).abs() < 1e-6, "{transport:?}: {got} vs {host}");

        for (gamma, alpha) in [(2.0, None), (0.5, Some(vec![0.2, 0.5, 0.3]))] {
            let config = json!({"gamma": gamma, "alpha": alpha});
            let got = scalar(
                &focal(config)
                    .loss_for(classifier, &logits, &y, None)
                    .unwrap(),
            );
            let want = focal_reference(&logits, &labels, gamma, alpha.as_deref());
            close(got, want, &format!("{transport:?} γ={gamma} α={alpha:?}"));
            seen.push(got);
        }
        let alpha = [0.1, 0.2, 0.3, 0.4, 0.5];
        let got = scalar(
            &focal(json!({"gamma": 1.5, "alpha": alpha}))
                .loss_for(TaskKind::CausalLm, &lm.logits, &lm.labels, None)
                .unwrap(),
        );
        close(
            got,
            focal_reference(&lm.rows, &lm.row_labels, 1.5, Some(&alpha)),
            &format!("{transport:?} LM"),
        );
        seen.push(got);

        // A number α is the two-class form: α for class 1, 1 − α for class 0.
        let two = logits.narrow(1, 0, 2).unwrap().contiguous().unwrap();
        let two_labels = [0i64, 1, 1, 0, 0, 1];
        let got = scalar(
            &focal(json!({"alpha": 0.25}))
                .loss_for(
                    TaskKind::SequenceClassification { num_labels: 2 },
                    &two,
                    &Tensor::new(&two_labels, &d).unwrap(),
                    None,
                )
                .unwrap(),
        );
        close(
            got,
            focal_reference(&two, &two_labels, 2.0, Some(&[0.75, 0.25])),
            &format!("{transport:?} binary α"),
        );
        let err = focal(json!({"alpha": 0.25}))
            .loss_for(classifier, &logits, &y, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 classes"), "{err}");
    }
    if seen.len() == 6 {
        assert_eq!(seen[..3], seen[3..], "native and wasm differ");
    }
}

#[test]
fn distill_matches_its_formula_for_classifiers_and_causal_lms() {
    let model = tiny_bert();
    let d = Device::Cpu;
    let logits = Tensor::randn(0f32, 2.0, (6, 3), &d).unwrap();
    let teacher = Tensor::randn(0f32, 2.0, (6, 3), &d).unwrap();
    let labels = [0i64, 2, 1, 1, 0, 2];
    let y = Tensor::new(&labels, &d).unwrap();
    let classifier = TaskKind::SequenceClassification { num_labels: 3 };
    let mut seen = Vec::new();
    for transport in transports("distill") {
        for (alpha, t) in [(0.5, 2.0), (1.0, 4.0), (0.0, 1.0)] {
            let loss = distill(&model, transport, json!({"alpha": alpha, "temperature": t}));
            let got = scalar(
                &loss
                    .loss_for(classifier, &logits, &y, Some(&teacher))
                    .unwrap(),
            );
            let want = reference(&logits, &labels, &teacher, alpha, t);
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{transport:?} α={alpha} T={t}: {got} vs {want}"
            );
            seen.push(got);
        }
        // α = 0 is the host's cross-entropy, and needs no teacher.
        let plain = distill(&model, transport, json!({"alpha": 0.0}));
        let got = scalar(&plain.loss_for(classifier, &logits, &y, None).unwrap());
        let host = scalar(&whetstone_host::ops::cross_entropy(&logits, &y).unwrap());
        assert!((got - host).abs() < 1e-6, "{got} vs {host}");
        let needs_teacher = distill(&model, transport, json!({"alpha": 0.5}))
            .loss_for(classifier, &logits, &y, None)
            .unwrap_err()
            .to_string();
        assert!(needs_teacher.contains("[teacher]"), "{needs_teacher}");

        // A causal LM: logits [2, 4, 5] predict labels shifted by one; -100 positions do not count.
        let lm_logits = Tensor::randn(0f32, 1.0, (2, 4, 5), &d).unwrap();
        let lm_teacher = Tensor::randn(0f32, 1.0, (2, 4, 5), &d).unwrap();
        let lm_labels = [[9i64, 1, -100, 4], [9, 3, 2, 0]];
        let lm_y = Tensor::new(&lm_labels, &d).unwrap();
        let loss = distill(&model, transport, json!({"alpha": 0.3, "temperature": 2.0}));
        let got = scalar(
            &loss
                .loss_for(TaskKind::CausalLm, &lm_logits, &lm_y, Some(&lm_teacher))
                .unwrap(),
        );
        let rows = |x: &Tensor| x.narrow(1, 0, 3).unwrap().reshape((6, 5)).unwrap();
        let shifted: Vec<i64> = lm_labels.iter().flat_map(|r| r[1..].to_vec()).collect();
        let want = reference(&rows(&lm_logits), &shifted, &rows(&lm_teacher), 0.3, 2.0);
        assert!(
            (got - want).abs() < 1e-5 * want.abs().max(1.0),
            "{transport:?} LM: {got} vs {want}"
        );
        let host_lm = scalar(&whetstone_host::ops::causal_lm_loss(&lm_logits, &lm_y).unwrap());
        let plain_lm = scalar(
            &distill(&model, transport, json!({"alpha": 0.0}))
                .loss_for(TaskKind::CausalLm, &lm_logits, &lm_y, None)
                .unwrap(),
        );
        assert!((plain_lm - host_lm).abs() < 1e-6, "{plain_lm} vs {host_lm}");
    }
    if seen.len() == 6 {
        assert_eq!(seen[..3], seen[3..], "native and wasm differ");
    }
}

/// Trains the tiny BERT (classifier and top block) for 6 steps with `objective` and returns its
/// loss history.
fn losses(objective: Option<&Objective>, model: &BertForSequenceClassification) -> Vec<f64> {
    let patterns = vec!["classifier.*".to_string(), "encoder.layer.1.*".to_string()];
    model.params().freeze_all().unwrap();
    model.params().set_trainable_by_patterns(&patterns).unwrap();
    let train = examples(24, 11, mostly_high);
    let validation = examples(8, 12, mostly_high);
    let dir = tempfile::tempdir().unwrap();
    let training = TrainingConfig {
        learning_rate: 1e-2,
        batch_size: 4,
        epochs: 1,
        log_every: 1,
        seed: 9,
        ..Default::default()
    };
    let summary = fit(
        model,
        FitData {
            train: (&train).into(),
            validation: &validation,
            pad_id: 0,
            method: None,
            objective,
        },
        &training,
        &OutputConfig {
            save_best: false,
            plot: false,
            ..OutputConfig::new(dir.path())
        },
        &Device::Cpu,
        &RunOptions::default(),
    )
    .unwrap();
    summary.loss_history.iter().map(|p| p.loss).collect()
}

#[test]
fn training_with_the_plugin_loss_and_a_teacher() {
    let plain = losses(None, &tiny_bert());
    let model = tiny_bert();
    let objective = Objective {
        loss: Some(distill(
            &model,
            TransportKind::Native,
            json!({"alpha": 0.0}),
        )),
        teacher: None,
    };
    let through_plugin = losses(Some(&objective), &model);
    assert_eq!(plain.len(), 6);
    for (a, b) in plain.iter().zip(&through_plugin) {
        assert!((a - b).abs() < 1e-5, "{plain:?} vs {through_plugin:?}");
    }
    // The cross-entropy plugin's gradients are the fused kernel's too: the same history.
    let model = tiny_bert();
    let objective = Objective {
        loss: Some(loss(
            "cross-entropy",
            &model,
            TransportKind::Native,
            json!({}),
        )),
        teacher: None,
    };
    let through_ce = losses(Some(&objective), &model);
    for (a, b) in plain.iter().zip(&through_ce) {
        assert!((a - b).abs() < 1e-5, "{plain:?} vs {through_ce:?}");
    }

    // A teacher with the student's starting weights: at the first step KL(teacher ‖ student) is
    // 0 (dropout is off in the teacher and on in the student, so only nearly).
    let model = tiny_bert();
    let objective = Objective {
        loss: Some(distill(
            &model,
            TransportKind::Native,
            json!({"alpha": 1.0, "temperature": 1.0}),
        )),
        teacher: Some(Arc::new(Teacher::new(Box::new(tiny_bert())).unwrap())),
    };
    let soft = losses(Some(&objective), &model);
    eprintln!("hard {plain:?}\nsoft {soft:?}");
    assert!(
        soft[0] < 0.05 * plain[0],
        "first soft loss {} against hard {}",
        soft[0],
        plain[0]
    );
}
