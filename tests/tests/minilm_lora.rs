//! LoRA through the whole run path on real assets: `examples/sentiment/lora.toml` (the LoRA
//! plugin on all-MiniLM-L6-v2, UCI sentiment) for a short run finds the plugin through the
//! recipe's `plugins`, trains only the LoRA factors and the classification head, beats chance
//! clearly, and writes a PEFT adapter that, loaded onto a freshly loaded model, reproduces the
//! run's final evaluation exactly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::Device;
use whetstone_host::recipe::Recipe;
use whetstone_host::train::run::run;
use whetstone_host::train::{evaluate, RunOptions};
use whetstone_tests::{lora_plugin, repo_root, require_asset};

/// LoRA r = 8 on query and value of 6 layers (12 × (8·384 + 384·8)) plus the 2-class head.
const TRAINABLE: usize = 12 * 2 * 8 * 384 + 2 * 384 + 2;

#[test]
fn short_lora_run_on_minilm_learns_and_its_adapter_reloads() -> anyhow::Result<()> {
    require_asset("all-minilm-l6-v2");
    require_asset("uci-sentiment");
    let out = tempfile::tempdir()?;
    let mut recipe = Recipe::from_file(repo_root().join("examples/sentiment/lora.toml"))?;
    recipe.output.dir = out.path().to_path_buf();
    recipe.output.plot = false;
    recipe.training.max_steps = Some(30);
    recipe.plugins = vec![lora_plugin()];

    let summary = run(
        &recipe,
        &RunOptions {
            progress: false,
            ..RunOptions::default()
        },
    )?;
    assert_eq!(summary.trainable_params, TRAINABLE);
    let eval = summary.final_eval.as_ref().expect("final evaluation");
    let accuracy = eval.accuracy.expect("accuracy");
    eprintln!(
        "30 LoRA steps: held-out accuracy {accuracy:.4}, loss {:.4}, {:.1} s",
        eval.loss, summary.elapsed_s
    );
    assert!(
        accuracy >= 0.75,
        "held-out accuracy {accuracy} after 30 steps"
    );

    let adapter_dir = summary.adapter_dir.as_ref().expect("a PEFT adapter");
    let loaded = whetstone_host::model::load::load(&recipe.model, &Device::Cpu, 1234)?;
    let model = loaded.model.as_ref();
    whetstone_host::adapter::load(model, adapter_dir, "default", &recipe.plugins)?;
    let data = whetstone_host::data::prepare(&recipe.data, &loaded)?;
    let again = evaluate(
        model,
        &data.validation,
        recipe.training.eval_batch_size(),
        loaded.special.pad,
        &Device::Cpu,
    )?;
    assert_eq!(again.accuracy, eval.accuracy);
    assert!(
        (again.loss - eval.loss).abs() < 1e-5,
        "reloaded adapter: loss {} vs {}",
        again.loss,
        eval.loss
    );
    Ok(())
}
