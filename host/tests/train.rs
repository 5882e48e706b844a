//! Training-engine tests on tiny models built here (the engine must work for any `Model`):
//! AdamW, schedules, clipping, accumulation, checkpoints and resume, atomic writes, NaN
//! handling, determinism, evaluation and recipe errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use whetstone_host::data::{collate, Example, ExampleLabels};
use whetstone_host::model::{Batch, Mode, Model, TaskKind};
use whetstone_host::params::{Param, ParamStore};
use whetstone_host::recipe::{OutputConfig, Recipe, TrainingConfig};
use whetstone_host::train::checkpoint::{self, TrainerState};
use whetstone_host::train::clip::clip_grad_norm;
use whetstone_host::train::metrics::{read_metrics, MetricsRecord};
use whetstone_host::train::optim::{AdamW, AdamWConfig};
use whetstone_host::train::schedule::{Schedule, SchedulerKind};
use whetstone_host::train::{evaluate, fit, FitData, RunOptions, Trainer};
use whetstone_host::Error;

const VOCAB: usize = 16;
const HIDDEN: usize = 4;

/// Bag-of-embeddings model: mean of token embeddings (over the attention mask), then a linear
/// classifier (`classifier.weight`, `classifier.bias`); or, as a causal LM, per-token logits
/// `embedding · lm_head`.
struct Tiny {
    params: ParamStore,
    embed: Arc<Param>,
    weight: Arc<Param>,
    bias: Arc<Param>,
    task: TaskKind,
    poison: bool,
}

impl Tiny {
    fn new(seed: u64, task: TaskKind) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut rand = |shape: (usize, usize)| {
            let v: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| rng.random_range(-0.5f32..0.5))
                .collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        let out = match task {
            TaskKind::CausalLm => VOCAB,
            TaskKind::SequenceClassification { num_labels } => num_labels,
        };
        let mut params = ParamStore::new();
        let embed = params.insert("embeddings.weight", rand((VOCAB, HIDDEN)));
        let weight = params.insert("classifier.weight", rand((out, HIDDEN)));
        let bias = params.insert(
            "classifier.bias",
            Tensor::zeros(out, DType::F32, &Device::Cpu).unwrap(),
        );
        Self {
            params,
            embed,
            weight,
            bias,
            task,
            poison: false,
        }
    }

    fn classifier(seed: u64) -> Self {
        Self::new(seed, TaskKind::SequenceClassification { num_labels: 2 })
    }

    fn train_all(self) -> Self {
        self.params
            .iter()
            .for_each(|p| p.set_trainable(true).unwrap());
        self
    }

    fn values(&self) -> HashMap<String, Vec<f32>> {
        self.params
            .iter()
            .map(|p| {
                (
                    p.name().to_string(),
                    p.tensor().flatten_all().unwrap().to_vec1().unwrap(),
                )
            })
            .collect()
    }
}

impl Model for Tiny {
    fn architecture(&self) -> &str {
        "TinyBag"
    }
    fn task(&self) -> TaskKind {
        self.task
    }
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn forward(&self, ids: &Tensor, mask: &Tensor, _mode: Mode) -> whetstone_host::Result<Tensor> {
        let h = whetstone_host::ops::embedding(&self.embed.tensor(), ids)?; // [b, s, h]
        let w = self.weight.tensor().t()?;
        let logits = match self.task {
            TaskKind::CausalLm => h.broadcast_matmul(&w)?.broadcast_add(&self.bias.tensor())?,
            TaskKind::SequenceClassification { .. } => {
                let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
                let pooled = h.broadcast_mul(&m)?.sum(1)?.broadcast_div(&m.sum(1)?)?;
                pooled.matmul(&w)?.broadcast_add(&self.bias.tensor())?
            }
        };
        Ok(if self.poison {
            (logits * f64::NAN)?
        } else {
            logits
        })
    }
    fn linears(&self) -> Vec<&whetstone_host::ops::Linear> {
        Vec::new()
    }
    fn forward_context(&self) -> Arc<whetstone_host::model::hooks::ForwardContext> {
        Arc::default()
    }
    fn model_info(&self) -> whetstone_sdk::ModelInfo {
        whetstone_sdk::ModelInfo::default()
    }
}

/// Sentences of 3 to 6 tokens; the class says whether most tokens come from the upper half of
/// the vocabulary.
fn class_examples(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(3..=6);
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

fn cfg() -> TrainingConfig {
    TrainingConfig {
        learning_rate: 0.05,
        batch_size: 4,
        log_every: 1,
        ..Default::default()
    }
}

fn fixed_batch(examples: &[Example]) -> Batch {
    let refs: Vec<&Example> = examples.iter().collect();
    collate(&refs, 0, &Device::Cpu).unwrap()
}

#[test]
fn adamw_matches_a_hand_computed_update() {
    let theta0 = [1.0f64, -2.0];
    let grads = [[0.5f64, 0.1], [-0.3, 0.2]];
    let (lr, wd, b1, b2, eps) = (0.1, 0.01, 0.9, 0.999, 1e-8);
    let var =
        candle_core::Var::from_vec(theta0.iter().map(|&x| x as f32).collect(), 2, &Device::Cpu)
            .unwrap();
    let frozen_decay = candle_core::Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
    let cfg = AdamWConfig {
        weight_decay: wd,
        beta1: b1,
        beta2: b2,
        eps,
    };
    let mut opt = AdamW::new(
        vec![
            ("w".into(), var.clone(), true),
            ("b".into(), frozen_decay.clone(), false),
        ],
        cfg,
    )
    .unwrap();

    let (mut theta, mut theta_nd) = (theta0, theta0);
    let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
    for (t, g) in grads.iter().enumerate() {
        let g_t = Tensor::from_vec(g.iter().map(|&x| x as f32).collect(), 2, &Device::Cpu).unwrap();
        opt.step_with(&[Some(g_t.clone()), Some(g_t)], lr).unwrap();
        let t = (t + 1) as i32;
        for i in 0..2 {
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let update = (m[i] / (1.0 - b1.powi(t))) / ((v[i] / (1.0 - b2.powi(t))).sqrt() + eps);
            theta[i] = theta[i] * (1.0 - lr * wd) - lr * update;
            theta_nd[i] -= lr * update;
        }
    }
    let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
    let got_nd: Vec<f32> = frozen_decay.as_tensor().to_vec1().unwrap();
    for i in 0..2 {
        assert!(
            (f64::from(got[i]) - theta[i]).abs() < 1e-6,
            "decayed {i}: {} vs {}",
            got[i],
            theta[i]
        );
        assert!(
            (f64::from(got_nd[i]) - theta_nd[i]).abs() < 1e-6,
            "undecayed {i}: {} vs {}",
            got_nd[i],
            theta_nd[i]
        );
    }
    // First step of Adam moves each coordinate by lr (times sign); decay on top.
    assert!(
        (theta[0] - (1.0 * (1.0 - lr * wd) - lr)).abs() > 1e-3,
        "two steps were taken"
    );
    assert_eq!(opt.step_count(), 2);
}

#[test]
fn schedule_values() {
    let s = Schedule {
        base_lr: 2e-4,
        warmup_steps: 4,
        total_steps: 104,
        kind: SchedulerKind::Cosine,
    };
    assert_eq!(s.lr(0), 0.0);
    assert!((s.lr(2) - 1e-4).abs() < 1e-15);
    assert!((s.lr(4) - 2e-4).abs() < 1e-15);
    assert!((s.lr(54) - 1e-4).abs() < 1e-15);
    assert!(s.lr(104).abs() < 1e-15);
    let lin = Schedule {
        kind: SchedulerKind::Linear,
        ..s
    };
    assert!((lin.lr(29) - 1.5e-4).abs() < 1e-15);
    let constant = Schedule {
        kind: SchedulerKind::Constant,
        ..s
    };
    assert_eq!(constant.lr(100), 2e-4);
}

#[test]
fn clipping_scales_to_the_max_norm_and_returns_the_pre_clip_norm() {
    let t = |v: Vec<f32>| Some(Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap());
    let mut grads = vec![t(vec![3.0]), None, t(vec![0.0, 4.0])];
    let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
    assert!((norm - 5.0).abs() < 1e-6);
    let a: Vec<f32> = grads[0].as_ref().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = grads[2].as_ref().unwrap().to_vec1().unwrap();
    assert!(
        (a[0] - 0.6).abs() < 1e-5 && (b[1] - 0.8).abs() < 1e-5,
        "{a:?} {b:?}"
    );
    let norm = clip_grad_norm(&mut grads, 10.0).unwrap();
    assert!((norm - 1.0).abs() < 1e-5);
    let a: Vec<f32> = grads[0].as_ref().unwrap().to_vec1().unwrap();
    assert!((a[0] - 0.6).abs() < 1e-5, "no clipping below the max");
}

#[test]
fn accumulating_two_micro_batches_equals_one_batch_of_both() {
    // Same-length sentences so that the mean of the two means is the mean over all four.
    let examples: Vec<Example> = class_examples(64, 3)
        .into_iter()
        .filter(|e| e.len() == 4)
        .take(4)
        .collect();
    assert_eq!(examples.len(), 4);
    let config = TrainingConfig {
        weight_decay: 0.1,
        max_grad_norm: Some(0.5),
        ..cfg()
    };
    let split = Tiny::classifier(1).train_all();
    let whole = Tiny::classifier(1).train_all();
    let mut t_split = Trainer::new(&split, &config, 10).unwrap();
    let mut t_whole = Trainer::new(&whole, &config, 10).unwrap();
    for _ in 0..3 {
        let a = t_split
            .train_step(
                &split,
                &[fixed_batch(&examples[..2]), fixed_batch(&examples[2..])],
            )
            .unwrap();
        let b = t_whole
            .train_step(&whole, &[fixed_batch(&examples)])
            .unwrap();
        assert!((a.loss - b.loss).abs() < 1e-6, "{} vs {}", a.loss, b.loss);
        assert!(
            (a.grad_norm - b.grad_norm).abs() < 1e-5,
            "{} vs {}",
            a.grad_norm,
            b.grad_norm
        );
        assert_eq!(a.tokens, b.tokens);
    }
    let (vs, vw) = (split.values(), whole.values());
    let before = Tiny::classifier(1).values();
    for (name, a) in &vs {
        let b = &vw[name];
        assert!(
            a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5),
            "{name}: {a:?} vs {b:?}"
        );
        assert_ne!(a, &before[name], "{name} was updated");
    }
}

#[test]
fn nan_loss_stops_with_the_step_and_leaves_params_untouched() {
    let examples = class_examples(8, 4);
    let mut model = Tiny::classifier(2).train_all();
    let mut trainer = Trainer::new(&model, &cfg(), 10).unwrap();
    trainer
        .train_step(&model, &[fixed_batch(&examples[..4])])
        .unwrap();
    let before = model.values();
    model.poison = true;
    let err = trainer
        .train_step(&model, &[fixed_batch(&examples[4..])])
        .unwrap_err();
    assert!(
        matches!(err, Error::NonFiniteLoss { step: 2, value } if value.is_nan()),
        "{err:?}"
    );
    assert!(err.to_string().contains("step 2"), "{err}");
    assert_eq!(model.values(), before);
    assert_eq!(trainer.step(), 1);
}

#[test]
fn nothing_trainable_is_an_error() {
    let model = Tiny::classifier(1);
    let err = Trainer::new(&model, &cfg(), 1).unwrap_err().to_string();
    assert!(err.contains("nothing to train"), "{err}");
}

#[test]
fn checkpoint_round_trip_restores_params_and_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    let examples = class_examples(8, 5);
    let model = Tiny::classifier(3).train_all();
    let mut trainer = Trainer::new(&model, &cfg(), 10).unwrap();
    for _ in 0..2 {
        trainer
            .train_step(&model, &[fixed_batch(&examples)])
            .unwrap();
    }
    let mut state = TrainerState::new(7, 10);
    state.step = 2;
    state.batch_in_epoch = 2;
    let ckpt_dir = dir.path().join("last");
    trainer.save_checkpoint(&ckpt_dir, &state).unwrap();

    let fresh = Tiny::classifier(99).train_all();
    let mut restored = Trainer::new(&fresh, &cfg(), 10).unwrap();
    let ckpt = checkpoint::load(&ckpt_dir, &Device::Cpu).unwrap();
    assert_eq!(ckpt.state, state);
    restored.restore(&ckpt).unwrap();
    assert_eq!(fresh.values(), model.values());
    assert_eq!(restored.step(), 2);
    let (a, b) = (
        trainer.optimizer().state_tensors(),
        restored.optimizer().state_tensors(),
    );
    // Two moments and an update count per parameter.
    assert_eq!(a.len(), 9);
    let values = |t: &Tensor| -> Vec<f64> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    for (k, t) in &a {
        let (x, y) = (values(t), values(&b[k]));
        assert_eq!(x, y, "{k}");
    }
    // The next step is identical from the original and from the restored trainer.
    let s1 = trainer
        .train_step(&model, &[fixed_batch(&examples)])
        .unwrap();
    let s2 = restored
        .train_step(&fresh, &[fixed_batch(&examples)])
        .unwrap();
    assert_eq!((s1.loss, s1.lr, s1.step), (s2.loss, s2.lr, s2.step));
    assert_eq!(fresh.values(), model.values());

    // A checkpoint of other parameters is refused with a message naming the parameter.
    let partial = Tiny::classifier(3);
    partial
        .params
        .set_trainable_by_patterns(&["classifier.*".into()])
        .unwrap();
    let mut other = Trainer::new(&partial, &cfg(), 10).unwrap();
    let err = other.restore(&ckpt).unwrap_err().to_string();
    assert!(err.contains("embeddings.weight"), "{err}");
}

#[test]
fn checkpoint_writes_are_atomic_and_leave_no_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let model = Tiny::classifier(3).train_all();
    let trainer = Trainer::new(&model, &cfg(), 10).unwrap();
    let target = dir.path().join("last");
    let mut state = TrainerState::new(1, 10);
    trainer.save_checkpoint(&target, &state).unwrap();
    state.step = 5;
    trainer.save_checkpoint(&target, &state).unwrap();
    let entries: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, vec!["last".to_string()]);
    let mut files: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            "optimizer.safetensors",
            "trainable.safetensors",
            "trainer_state.json"
        ]
    );
    assert_eq!(
        checkpoint::load(&target, &Device::Cpu).unwrap().state.step,
        5
    );
    let missing = checkpoint::load(&dir.path().join("nope"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("nope") && missing.contains("trainer_state.json"),
        "{missing}"
    );
}

fn fit_tiny(
    out: &std::path::Path,
    training: &TrainingConfig,
    opts: &RunOptions,
) -> (
    whetstone_host::Result<whetstone_host::train::RunSummary>,
    Tiny,
) {
    let train = class_examples(40, 11);
    let validation = class_examples(12, 12);
    let model = Tiny::classifier(5).train_all();
    let data = FitData {
        train: (&train).into(),
        validation: &validation,
        pad_id: 0,
        method: None,
        objective: None,
    };
    let output = OutputConfig {
        plot: true,
        ..OutputConfig::new(out)
    };
    let result = fit(&model, data, training, &output, &Device::Cpu, opts);
    (result, model)
}

fn losses(summary: &whetstone_host::train::RunSummary) -> Vec<f64> {
    summary.loss_history.iter().map(|p| p.loss).collect()
}

#[test]
fn same_seed_gives_identical_losses_and_another_seed_differs() {
    let dir = tempfile::tempdir().unwrap();
    let training = TrainingConfig { epochs: 2, ..cfg() };
    let (a, _) = fit_tiny(&dir.path().join("a"), &training, &RunOptions::default());
    let (b, _) = fit_tiny(&dir.path().join("b"), &training, &RunOptions::default());
    let (c, _) = fit_tiny(
        &dir.path().join("c"),
        &TrainingConfig {
            seed: 7,
            ..training
        },
        &RunOptions::default(),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(a.steps, 20);
    assert_eq!(losses(&a), losses(&b));
    assert_ne!(losses(&a), losses(&c));
}

#[test]
fn training_in_chunks_of_steps_equals_one_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let training = TrainingConfig {
        epochs: 3,
        gradient_accumulation_steps: 2,
        eval_every: Some(4),
        ..cfg()
    };
    let (full, full_model) = fit_tiny(&dir.path().join("full"), &training, &RunOptions::default());
    let full = full.unwrap();
    assert_eq!(
        (full.steps, full.total_steps, full.finished),
        (15, 15, true)
    );

    // Chunks of 5 steps end exactly at the epoch boundaries (5 steps per epoch); the resumed
    // chunk does the epoch-end evaluation the uninterrupted run did there.
    let out = dir.path().join("chunks");
    let mut chunk_ends = Vec::new();
    let mut resume = false;
    let last = loop {
        let (chunk, model) = fit_tiny(
            &out,
            &training,
            &RunOptions {
                resume,
                max_session_steps: Some(5),
                ..Default::default()
            },
        );
        let chunk = chunk.unwrap();
        chunk_ends.push((chunk.steps, chunk.finished));
        resume = true;
        if chunk.finished {
            break (chunk, model);
        }
    };
    assert_eq!(chunk_ends, [(5, false), (10, false), (15, true)]);
    assert_eq!(losses(&last.0), losses(&full));
    assert_eq!(last.1.values(), full_model.values());
    assert_eq!(last.0.best_step, full.best_step);
    assert_eq!(last.0.final_eval, full.final_eval);
}

#[test]
fn resume_continues_exactly_like_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let training = TrainingConfig {
        epochs: 3,
        gradient_accumulation_steps: 2,
        warmup_steps: Some(2),
        lr_scheduler: SchedulerKind::Cosine,
        weight_decay: 0.01,
        max_grad_norm: Some(1.0),
        eval_every: Some(4),
        ..cfg()
    };
    let (full, full_model) = fit_tiny(&dir.path().join("full"), &training, &RunOptions::default());
    let full = full.unwrap();
    assert_eq!(full.steps, 15, "3 epochs of ceil(10 batches / 2)");

    // Interrupt after step 7 (mid-epoch: epoch 1, batch 4 of 10).
    let out = dir.path().join("resumed");
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen_in = seen.clone();
    let interrupted = RunOptions {
        cancel: Some(cancel),
        on_step: Some(Arc::new(move |s| {
            seen_in.lock().unwrap().push(s.loss);
            if s.step == 7 {
                flag.store(true, Ordering::SeqCst);
            }
        })),
        ..Default::default()
    };
    let (first, _) = fit_tiny(&out, &training, &interrupted);
    assert!(matches!(first, Err(Error::Cancelled)), "{first:?}");
    let state = checkpoint::load(&out.join("last"), &Device::Cpu)
        .unwrap()
        .state;
    assert_eq!((state.step, state.epoch, state.batch_in_epoch), (7, 1, 4));

    let (second, resumed_model) = fit_tiny(
        &out,
        &training,
        &RunOptions {
            resume: true,
            ..Default::default()
        },
    );
    let second = second.unwrap();
    assert_eq!(
        losses(&second),
        losses(&full),
        "resumed loss sequence differs"
    );
    assert_eq!(resumed_model.values(), full_model.values());
    assert_eq!(second.best_step, full.best_step);
    assert_eq!(seen.lock().unwrap().as_slice(), &losses(&full)[..7]);

    // The metrics file has each step once, as in the uninterrupted run.
    let steps = |dir: &std::path::Path| -> Vec<(String, usize)> {
        read_metrics(&dir.join("metrics.jsonl"))
            .unwrap()
            .into_iter()
            .map(|r| match r {
                MetricsRecord::Train { step, .. } => ("train".to_string(), step),
                MetricsRecord::Eval { step, .. } => ("eval".to_string(), step),
            })
            .collect()
    };
    assert_eq!(steps(&out), steps(&dir.path().join("full")));

    // Resuming a finished run trains and evaluates nothing more and reports the same result.
    let before = steps(&out);
    let (again, _) = fit_tiny(
        &out,
        &training,
        &RunOptions {
            resume: true,
            ..Default::default()
        },
    );
    let again = again.unwrap();
    assert_eq!(
        (again.steps, again.final_eval),
        (second.steps, second.final_eval)
    );
    assert_eq!(steps(&out), before);
}

#[test]
fn fit_learns_writes_metrics_best_last_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let training = TrainingConfig {
        epochs: 8,
        learning_rate: 0.1,
        eval_every: Some(5),
        ..cfg()
    };
    let (summary, model) = fit_tiny(&out, &training, &RunOptions::default());
    let summary = summary.unwrap();
    let first = summary.loss_history[..10]
        .iter()
        .map(|p| p.loss)
        .sum::<f64>()
        / 10.0;
    let last = summary.loss_history[70..]
        .iter()
        .map(|p| p.loss)
        .sum::<f64>()
        / 10.0;
    assert!(last < first * 0.8, "loss went from {first} to {last}");
    let final_eval = summary.final_eval.unwrap();
    assert_eq!(final_eval.examples, 12);
    assert!(final_eval.accuracy.is_some() && final_eval.perplexity.is_none());
    let best = summary.best_eval.unwrap();
    assert!(best.accuracy >= final_eval.accuracy);
    assert_eq!(summary.trainable_params, (VOCAB + 2) * HIDDEN + 2);
    assert!(summary.tokens_per_s > 0.0);

    let records = read_metrics(&out.join("metrics.jsonl")).unwrap();
    let train_lines = records
        .iter()
        .filter(|r| matches!(r, MetricsRecord::Train { .. }))
        .count();
    let eval_lines = records
        .iter()
        .filter(|r| matches!(r, MetricsRecord::Eval { .. }))
        .count();
    assert_eq!(train_lines, 80);
    // Every 5 steps (16); the epoch ends (every 10 steps) and the end fall on those steps.
    assert_eq!(eval_lines, 16);
    for sub in ["last", "best"] {
        assert!(out.join(sub).join("trainer_state.json").is_file(), "{sub}/");
    }
    // last/ holds the final parameters.
    let last = checkpoint::load(&out.join("last"), &Device::Cpu).unwrap();
    let w: Vec<f32> = last.params["classifier.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(w, model.values()["classifier.weight"]);
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 2000);
}

#[test]
fn evaluate_reports_accuracy_and_perplexity() {
    let examples = class_examples(10, 8);
    let model = Tiny::classifier(4);
    let m = evaluate(&model, &examples, 3, 0, &Device::Cpu).unwrap();
    // Accuracy by hand: argmax of each example's logits on its own.
    let mut correct = 0;
    let mut loss = 0.0;
    for e in &examples {
        let b = fixed_batch(std::slice::from_ref(e));
        let logits = model
            .forward(&b.input_ids, &b.attention_mask, Mode::Eval)
            .unwrap();
        loss += f64::from(
            model
                .loss(&logits, &b.labels)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
        let pred = logits.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
        correct += usize::from(matches!(e.labels, ExampleLabels::Class(c) if c == i64::from(pred)));
    }
    assert_eq!(m.examples, 10);
    assert!((m.accuracy.unwrap() - correct as f64 / 10.0).abs() < 1e-12);
    assert!(
        (m.loss - loss / 10.0).abs() < 1e-5,
        "{} vs {}",
        m.loss,
        loss / 10.0
    );

    // Language model: perplexity = exp(mean loss per predicted token), whatever the batching.
    let lm = Tiny::new(4, TaskKind::CausalLm);
    let seqs: Vec<Example> = [vec![1u32, 2, 3, 4, 5], vec![6, 7, 8], vec![9, 10, 11, 12]]
        .into_iter()
        .map(|ids| {
            let mut labels: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
            labels[1] = -100; // a masked prompt token
            Example {
                input_ids: ids,
                labels: ExampleLabels::Tokens(labels),
            }
        })
        .collect();
    let one = evaluate(&lm, &seqs, 3, 0, &Device::Cpu).unwrap();
    let per = evaluate(&lm, &seqs, 1, 0, &Device::Cpu).unwrap();
    assert!(
        (one.loss - per.loss).abs() < 1e-5,
        "{} vs {}",
        one.loss,
        per.loss
    );
    assert!((one.perplexity.unwrap() - one.loss.exp()).abs() < 1e-9);
    assert!(one.accuracy.is_none());
    assert!(one.perplexity.unwrap() > 1.0);
}

#[test]
fn unknown_recipe_keys_are_errors_naming_the_key_and_file() {
    let base =
        "[model]\npath = \"m.gguf\"\n[data]\ntrain = [\"t.jsonl\"]\n[output]\ndir = \"out\"\n";
    let err = Recipe::from_toml_str(
        &format!("{base}[training]\nlearning_rat = 1e-3\n"),
        "my-recipe.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("learning_rat") && err.contains("my-recipe.toml"),
        "{err}"
    );
    let err = Recipe::from_toml_str(&format!("{base}[outptu]\ndir = \"x\"\n"), "r.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("outptu"), "{err}");
    let err = Recipe::from_toml_str(
        &format!("{base}[training]\nwarmup_steps = 3\nwarmup_ratio = 0.1\n"),
        "r.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("warmup_steps") && err.contains("warmup_ratio"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    // `kind` names a plugin method for anything but full/partial, whose own fields then pass
    // through to the plugin; the built-in kinds still refuse fields they do not have.
    std::fs::write(
        &path,
        format!("{base}[method]\nkind = \"partial\"\ntrainable = [\"a\"]\nrank = 4\n"),
    )
    .unwrap();
    let err = Recipe::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("bad.toml") && err.contains("`rank`"), "{err}");
}

/// The cached asset folder `name`, or a failure telling how to fetch it.
fn require_asset(name: &str) -> std::path::PathBuf {
    let dir = whetstone_host::assets::asset_dir(name);
    assert!(
        dir.is_dir(),
        "asset `{name}` is missing at {}: run `whet assets fetch` first",
        dir.display()
    );
    dir
}

#[test]
fn run_fine_tunes_minilm_on_real_sentiment_data_deterministically() {
    require_asset("all-minilm-l6-v2");
    require_asset("uci-sentiment");
    let dir = tempfile::tempdir().unwrap();
    let recipe_for = |out: &std::path::Path| {
        let text = format!(
            r#"
[model]
path = "asset:all-minilm-l6-v2"
task = "classification"
num_labels = 2

[data]
train = ["asset:uci-sentiment/yelp.json"]
label_field = "class"
max_records = 48
validation_ratio = 0.25
max_seq_len = 32

[method]
kind = "partial"
trainable = ["classifier.*", "encoder.layer.5.output.*"]

[training]
learning_rate = 1e-3
batch_size = 8
gradient_accumulation_steps = 2
max_steps = 3
eval_every = 2
log_every = 1
seed = 5

[output]
dir = "{}"
"#,
            out.display()
        );
        Recipe::from_toml_str(&text, "minilm-test.toml").unwrap()
    };
    let a = whetstone_host::train::run(&recipe_for(&dir.path().join("a")), &RunOptions::default())
        .unwrap();
    let b = whetstone_host::train::run(&recipe_for(&dir.path().join("b")), &RunOptions::default())
        .unwrap();
    assert_eq!(a.steps, 3);
    assert_eq!((a.train_examples, a.validation_examples), (36, 12));
    assert_eq!(losses(&a).len(), 3);
    assert!(losses(&a).iter().all(|l| l.is_finite() && *l > 0.0));
    assert_eq!(losses(&a), losses(&b), "same seed, same losses");
    // classifier (384·2 + 2) and encoder.layer.5.output.{dense (1536·384 + 384), LayerNorm (2·384)}.
    assert_eq!(a.trainable_params, 770 + 1536 * 384 + 384 + 2 * 384);
    assert!(a.total_params > 22_000_000);
    let eval = a.final_eval.unwrap();
    assert_eq!(eval.examples, 12);
    assert!(eval.accuracy.is_some_and(|x| (0.0..=1.0).contains(&x)));
    let records = read_metrics(&dir.path().join("a").join("metrics.jsonl")).unwrap();
    let evals = records
        .iter()
        .filter(|r| matches!(r, MetricsRecord::Eval { .. }))
        .count();
    assert_eq!(evals, 2, "at step 2 and at the end");
    for file in [
        "recipe.toml",
        "loss.png",
        "last/trainable.safetensors",
        "best/trainer_state.json",
    ] {
        assert!(dir.path().join("a").join(file).is_file(), "{file}");
    }
    println!("{a}");
}

/// A whitespace word-level tokenizer over the words `t0` … `t15` (ids 0 … 15), so that text
/// records tokenize to the ids the tiny model knows.
fn word_tokenizer() -> tokenizers::Tokenizer {
    let vocab: std::collections::HashMap<String, u32> =
        (0..VOCAB as u32).map(|i| (format!("t{i}"), i)).collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("t0".into())
        .build()
        .unwrap();
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::whitespace::WhitespaceSplit,
    ));
    tokenizer
}

/// `examples` as JSON lines of `{"text": "t3 t9 …", "label": 0|1}`.
fn jsonl_of(examples: &[Example]) -> String {
    examples
        .iter()
        .map(|e| {
            let text: Vec<String> = e.input_ids.iter().map(|i| format!("t{i}")).collect();
            let ExampleLabels::Class(label) = e.labels else {
                panic!("class examples expected")
            };
            format!(
                "{}\n",
                serde_json::json!({"text": text.join(" "), "label": label})
            )
        })
        .collect()
}

/// Trains the tiny classifier on `class_examples(40, 11)` streamed from a JSON-lines file
/// (validation: `class_examples(12, 12)` from another file).
fn fit_streamed(
    dir: &std::path::Path,
    out: &std::path::Path,
    training: &TrainingConfig,
    opts: &RunOptions,
) -> (
    whetstone_host::Result<whetstone_host::train::RunSummary>,
    Tiny,
) {
    let train = dir.join("train.jsonl");
    let validation = dir.join("validation.jsonl");
    std::fs::write(&train, jsonl_of(&class_examples(40, 11))).unwrap();
    std::fs::write(&validation, jsonl_of(&class_examples(12, 12))).unwrap();
    let mut data_cfg = whetstone_host::data::DataConfig::new(vec![train.display().to_string()]);
    data_cfg.validation = vec![validation.display().to_string()];
    data_cfg.streaming = true;
    data_cfg.shuffle_buffer = 16;
    let special = whetstone_host::model::load::SpecialTokens {
        bos: None,
        eos: None,
        pad: 0,
        add_bos: false,
    };
    let task = TaskKind::SequenceClassification { num_labels: 2 };
    let stream = whetstone_host::data::stream::prepare_streaming_with(
        &data_cfg,
        task,
        &word_tokenizer(),
        special,
        None,
        &[],
    )
    .unwrap();
    assert_eq!(stream.validation, class_examples(12, 12));
    let model = Tiny::classifier(5).train_all();
    let data = FitData {
        train: whetstone_host::train::TrainSource::Stream(&stream),
        validation: &stream.validation,
        pad_id: 0,
        method: None,
        objective: None,
    };
    let result = fit(
        &model,
        data,
        training,
        &OutputConfig::new(out),
        &Device::Cpu,
        opts,
    );
    (result, model)
}

#[test]
fn streamed_training_learns_resumes_exactly_and_needs_max_steps() {
    let dir = tempfile::tempdir().unwrap();
    let training = TrainingConfig {
        max_steps: Some(25),
        eval_every: Some(4),
        ..cfg()
    };
    let (full, full_model) = fit_streamed(
        dir.path(),
        &dir.path().join("full"),
        &training,
        &RunOptions::default(),
    );
    let full = full.unwrap();
    // 40 examples in batches of 4: 10 batches an epoch, so 25 steps end mid-epoch 2.
    assert_eq!((full.steps, full.train_examples), (25, 40));
    let loss = losses(&full);
    assert!(
        loss[20..].iter().sum::<f64>() < loss[..5].iter().sum::<f64>(),
        "{loss:?}"
    );

    // Interrupted after step 13 (epoch 1, batch 3), then resumed: the stream skips the
    // batches already trained and the run ends as the uninterrupted one did.
    let out = dir.path().join("resumed");
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let interrupted = RunOptions {
        cancel: Some(cancel),
        on_step: Some(Arc::new(move |s| {
            if s.step == 13 {
                flag.store(true, Ordering::SeqCst);
            }
        })),
        ..Default::default()
    };
    let (first, _) = fit_streamed(dir.path(), &out, &training, &interrupted);
    assert!(matches!(first, Err(Error::Cancelled)), "{first:?}");
    let state = checkpoint::load(&out.join("last"), &Device::Cpu)
        .unwrap()
        .state;
    assert_eq!((state.step, state.epoch, state.batch_in_epoch), (13, 1, 3));
    let resume = RunOptions {
        resume: true,
        ..Default::default()
    };
    let (second, resumed_model) = fit_streamed(dir.path(), &out, &training, &resume);
    let second = second.unwrap();
    assert_eq!(losses(&second), loss, "resumed loss sequence differs");
    assert_eq!(resumed_model.values(), full_model.values());

    let no_limit = TrainingConfig {
        max_steps: None,
        ..training
    };
    let (err, _) = fit_streamed(
        dir.path(),
        &dir.path().join("unbounded"),
        &no_limit,
        &RunOptions::default(),
    );
    let err = err.unwrap_err().to_string();
    assert!(err.contains("max_steps"), "{err}");
}
