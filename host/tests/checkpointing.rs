//! Activation checkpointing (`training.gradient_checkpointing`): a Llama whose decoder layers are
//! recomputed in the backward pass gives the same loss and the same gradients as one that keeps
//! every activation, whichever parameters train, with a hook that draws dropout masks, and
//! through the trainer's steps.

// Tests may unwrap: a failure is the test's report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use whetstone_host::data::{collate, Example, ExampleLabels};
use whetstone_host::model::hooks::{ForwardContext, LinearHook};
use whetstone_host::model::llama::{Llama, LlamaConfig};
use whetstone_host::model::{Mode, Model};
use whetstone_host::ops;
use whetstone_host::recipe::TrainingConfig;
use whetstone_host::train::Trainer;

fn config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        vocab_size: 50,
        tie_word_embeddings: false,
        attention_bias: false,
    }
}

/// A LoRA-like hook with dropout on its input: `base + dropout(x) Aᵀ Bᵀ`, the masks drawn from
/// the forward context's generator (as the plugins' `dropout` op draws them).
#[derive(Debug)]
struct DropoutLowRank {
    ctx: Arc<ForwardContext>,
    a: Var,
    b: Var,
}

impl LinearHook for DropoutLowRank {
    fn forward(&self, x: &Tensor, base: &Tensor) -> whetstone_host::Result<Tensor> {
        let x = self.ctx.with_rng(|rng| ops::dropout(x, 0.3, rng))?;
        let delta = x
            .broadcast_matmul(&self.a.as_tensor().t()?)?
            .broadcast_matmul(&self.b.as_tensor().t()?)?;
        Ok((base + delta)?)
    }
}

/// Installs a [`DropoutLowRank`] on every q/v projection; returns its variables.
fn install_hooks(model: &Llama) -> Vec<Var> {
    let ctx = model.forward_context();
    let mut vars = Vec::new();
    for linear in model.linears() {
        if !(linear.name.ends_with("q_proj") || linear.name.ends_with("v_proj")) {
            continue;
        }
        let (out, inp) = (
            linear.out_features().unwrap(),
            linear.in_features().unwrap(),
        );
        let a = Var::randn(0f32, 0.2, (4, inp), &Device::Cpu).unwrap();
        let b = Var::randn(0f32, 0.2, (out, 4), &Device::Cpu).unwrap();
        linear.set_hook(Some(Arc::new(DropoutLowRank {
            ctx: ctx.clone(),
            a: a.clone(),
            b: b.clone(),
        })));
        vars.extend([a, b]);
    }
    vars
}

fn batch() -> (Tensor, Tensor, Tensor) {
    let d = &Device::Cpu;
    let ids = Tensor::new(&[[1u32, 5, 9, 14, 3, 22], [7, 2, 8, 40, 0, 0]], d).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], d).unwrap();
    let labels = Tensor::new(
        &[[-100i64, -100, 9, 14, 3, 22], [7, 2, 8, 40, -100, -100]],
        d,
    )
    .unwrap();
    (ids, mask, labels)
}

/// The training loss and its gradients (checkpointed blocks' merged in), with the generator
/// seeded as a training step seeds it, and whether any gradient came through the collector.
fn loss_and_grads(model: &Llama, checkpointing: bool, chunked: bool) -> (f32, GradStore, bool) {
    let (ids, mask, labels) = batch();
    let ctx = model.forward_context();
    ctx.set_checkpointing(checkpointing);
    ctx.reseed(1234);
    let loss = if chunked {
        model
            .forward_loss(&ids, &mask, &labels, Mode::Train)
            .unwrap()
            .unwrap()
    } else {
        let logits = model.forward(&ids, &mask, Mode::Train).unwrap();
        model.loss(&logits, &labels).unwrap()
    };
    let mut store = loss.backward().unwrap();
    let collected = !ctx.checkpoint_grads().is_empty();
    ctx.checkpoint_grads().merge_into(&mut store).unwrap();
    assert!(ctx.checkpoint_grads().is_empty());
    (loss.to_scalar::<f32>().unwrap(), store, collected)
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_same_grads(what: &str, tensors: &[Tensor], kept: &GradStore, ckpt: &GradStore) {
    for (i, t) in tensors.iter().enumerate() {
        let (a, b) = match (kept.get(t), ckpt.get(t)) {
            (Some(a), Some(b)) => (a, b),
            (a, b) => panic!(
                "{what}: tensor {i} has a gradient in one pass only (kept {}, checkpointed {})",
                a.is_some(),
                b.is_some()
            ),
        };
        let diff = max_abs(&(a - b).unwrap());
        let scale = max_abs(a);
        assert!(scale > 0.0, "{what}: tensor {i} has a zero gradient");
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "{what}: tensor {i} gradients differ by {diff} (scale {scale})"
        );
    }
}

#[test]
fn checkpointed_layers_give_the_kept_graphs_loss_and_gradients() {
    // (trainable patterns, hooks on q/v, chunked loss, whether a layer with trainable
    // parameters is checkpointed)
    for (patterns, hooks, chunked, collects) in [
        (vec!["*"], false, true, true),
        // Nothing trains below layer 2, so its input is not part of a graph: it keeps its graph
        // (there is nothing to save) and nothing is checkpointed.
        (
            vec!["model.layers.2.*", "model.norm.weight"],
            false,
            false,
            false,
        ),
        // Layer 2 is checkpointed for its input gradient only.
        (
            vec!["model.layers.1.mlp.*", "lm_head.*"],
            false,
            true,
            false,
        ),
        // Only the hooks train, and they draw dropout masks the recompute must repeat.
        (vec![], true, true, true),
        (
            vec!["model.layers.0.input_layernorm.weight"],
            true,
            false,
            true,
        ),
    ] {
        let what = format!("{patterns:?} hooks={hooks} chunked={chunked}");
        let model = Llama::random(&config(), &Device::Cpu, 5).unwrap();
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        model.params().set_trainable_by_patterns(&patterns).unwrap();
        let mut tensors: Vec<Tensor> = model
            .params()
            .trainable()
            .iter()
            .map(|p| p.tensor())
            .collect();
        if hooks {
            let vars = install_hooks(&model);
            tensors.extend(vars.iter().map(|v| v.as_tensor().clone()));
        }
        let (kept_loss, kept, none) = loss_and_grads(&model, false, chunked);
        assert!(!none, "{what}: nothing is collected without checkpointing");
        let (ckpt_loss, ckpt, collected) = loss_and_grads(&model, true, chunked);
        assert_eq!(
            collected, collects,
            "{what}: checkpointed parameter gradients"
        );
        assert!(
            (kept_loss - ckpt_loss).abs() < 1e-6,
            "{what}: loss {kept_loss} vs {ckpt_loss}"
        );
        assert_same_grads(&what, &tensors, &kept, &ckpt);
    }
}

/// Without restoring the generator the recompute would draw other dropout masks: the test
/// above would then see different gradients. This checks the premise: two forwards from the
/// same seed agree, from different seeds they do not.
#[test]
fn dropout_hooks_depend_on_the_generator_state() {
    let model = Llama::random(&config(), &Device::Cpu, 5).unwrap();
    let vars = install_hooks(&model);
    let (ids, mask, labels) = batch();
    let ctx = model.forward_context();
    let loss_from = |seed: u64| {
        ctx.reseed(seed);
        let loss = model
            .forward_loss(&ids, &mask, &labels, Mode::Train)
            .unwrap()
            .unwrap();
        loss.to_scalar::<f32>().unwrap()
    };
    assert_eq!(loss_from(1), loss_from(1));
    assert_ne!(loss_from(1), loss_from(2));
    assert!(!vars.is_empty());
}

fn lm_example(ids: &[u32], prompt: usize) -> Example {
    Example {
        input_ids: ids.to_vec(),
        labels: ExampleLabels::Tokens(
            ids.iter()
                .enumerate()
                .map(|(i, &t)| if i < prompt { -100 } else { i64::from(t) })
                .collect(),
        ),
    }
}

#[test]
fn training_with_checkpointing_repeats_the_loss_sequence_and_weights() {
    let examples = [
        lm_example(&[1, 5, 9, 14, 3, 22, 8], 2),
        lm_example(&[7, 2, 8, 40, 11], 0),
    ];
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = collate(&refs, 0, &Device::Cpu).unwrap();
    let run = |checkpointing: bool| {
        let model = Llama::random(&config(), &Device::Cpu, 9).unwrap();
        model
            .params()
            .set_trainable_by_patterns(&["model.layers.*".to_string()])
            .unwrap();
        let cfg = TrainingConfig {
            learning_rate: 1e-2,
            max_grad_norm: Some(1.0),
            gradient_checkpointing: checkpointing,
            ..TrainingConfig::default()
        };
        let mut trainer = Trainer::new(&model, &cfg, 4).unwrap();
        let losses: Vec<f64> = (0..4)
            .map(|_| {
                trainer
                    .train_step(&model, std::slice::from_ref(&batch))
                    .unwrap()
                    .loss
            })
            .collect();
        (losses, trainer.param_tensors())
    };
    let (kept_losses, kept_params) = run(false);
    let (ckpt_losses, ckpt_params) = run(true);
    assert!(
        kept_losses.last() < kept_losses.first(),
        "training lowers the loss: {kept_losses:?}"
    );
    for (a, b) in kept_losses.iter().zip(&ckpt_losses) {
        assert!((a - b).abs() < 1e-5, "{kept_losses:?} vs {ckpt_losses:?}");
    }
    for (name, a) in &kept_params {
        let diff = max_abs(&(a - &ckpt_params[name]).unwrap());
        assert!(diff < 1e-5, "{name} differs by {diff} after 4 steps");
    }
}
