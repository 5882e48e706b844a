//! Short real-model smoke test of causal-LM fine-tuning: SmolLM2-135M (from its GGUF), partial
//! fine-tuning of the last decoder block on real sentences for a few steps must lower the
//! held-out perplexity, and no frozen parameter may change.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::Device;
use whetstone_host::data::{prepare, DataConfig};
use whetstone_host::model::load::{load, ModelSpec, TaskSpec};
use whetstone_host::recipe::{MethodSpec, OutputConfig, TrainingConfig};
use whetstone_host::train::run::apply_method;
use whetstone_host::train::{evaluate, fit, FitData, RunOptions};
use whetstone_tests::require_asset;

#[test]
fn partial_fine_tune_of_smollm2_lowers_held_out_perplexity() -> anyhow::Result<()> {
    require_asset("smollm2-135m-instruct");
    require_asset("uci-sentiment");
    let device = Device::Cpu;
    let loaded = load(
        &ModelSpec::new("asset:smollm2-135m-instruct", TaskSpec::CausalLm),
        &device,
        7,
    )?;
    let model = loaded.model.as_ref();
    apply_method(
        model,
        &MethodSpec::Partial {
            trainable: vec!["model.layers.29.*".into()],
        },
    )?;

    let mut data = DataConfig::new(vec!["asset:uci-sentiment/yelp.json".into()]);
    data.text_field = "text".into();
    data.label_field = "no-such-field".into();
    data.max_records = Some(48);
    data.max_seq_len = 32;
    data.validation_ratio = 0.25;
    let prepared = prepare(&data, &loaded)?;
    assert_eq!((prepared.train.len(), prepared.validation.len()), (36, 12));

    let frozen = model
        .params()
        .get("model.layers.28.mlp.down_proj.weight")?
        .tensor();
    let pad = loaded.special.pad;
    let before = evaluate(model, &prepared.validation, 12, pad, &device)?;

    let training = TrainingConfig {
        learning_rate: 5e-4,
        batch_size: 6,
        epochs: 2,
        seed: 3,
        ..TrainingConfig::default()
    };
    let out = tempfile::tempdir()?;
    let mut output = OutputConfig::new(out.path());
    output.plot = false;
    let summary = fit(
        model,
        FitData {
            train: (&prepared.train).into(),
            validation: &prepared.validation,
            pad_id: pad,
            method: None,
            objective: None,
        },
        &training,
        &output,
        &device,
        &RunOptions::default(),
    )?;
    let after = evaluate(model, &prepared.validation, 12, pad, &device)?;
    let (ppl_before, ppl_after) = (before.perplexity.unwrap(), after.perplexity.unwrap());
    eprintln!(
        "SmolLM2 held-out perplexity {ppl_before:.2} -> {ppl_after:.2} after {} steps ({:.1} tokens/s)",
        summary.steps, summary.tokens_per_s
    );
    assert_eq!(summary.steps, 12);
    assert!(
        ppl_after < ppl_before * 0.95,
        "perplexity {ppl_before} -> {ppl_after}"
    );
    let frozen_after = model
        .params()
        .get("model.layers.28.mlp.down_proj.weight")?
        .tensor();
    assert_eq!(
        frozen
            .sub(&frozen_after)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?,
        0.0,
        "frozen weight changed"
    );
    Ok(())
}
