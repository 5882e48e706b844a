//! The README's main job, end to end on real assets: partial fine-tuning of all-MiniLM-L6-v2
//! (classifier head + last encoder layer) on the UCI sentiment sentences (2400 train / 600
//! held-out) must reach a held-out accuracy of at least 0.85, and leave its artefacts behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use whetstone_host::recipe::Recipe;
use whetstone_host::train::run::run;
use whetstone_host::train::RunOptions;
use whetstone_tests::{repo_root, require_asset};

#[test]
fn partial_fine_tune_of_minilm_reaches_085_held_out_accuracy() -> anyhow::Result<()> {
    require_asset("all-minilm-l6-v2");
    require_asset("uci-sentiment");
    let out = tempfile::tempdir()?;
    let mut recipe = Recipe::from_file(repo_root().join("examples/sentiment/recipe.toml"))?;
    recipe.output.dir = out.path().to_path_buf();

    let summary = run(
        &recipe,
        &RunOptions {
            progress: false,
            ..RunOptions::default()
        },
    )?;

    assert_eq!(summary.train_examples, 2400);
    assert_eq!(summary.validation_examples, 600);
    assert_eq!(
        summary.skipped_records, 3,
        "the three trailing empty records are skipped"
    );
    let eval = summary.final_eval.as_ref().expect("final evaluation");
    let accuracy = eval.accuracy.expect("classification accuracy");
    eprintln!(
        "held-out accuracy {accuracy:.4}, loss {:.4}, {} steps, {:.1} tokens/s, {:.1} s, trainable {}/{}",
        eval.loss, summary.steps, summary.tokens_per_s, summary.elapsed_s, summary.trainable_params, summary.total_params
    );
    assert!(accuracy >= 0.85, "held-out accuracy {accuracy} < 0.85");
    assert!(
        summary.trainable_params < summary.total_params / 5,
        "partial fine-tuning trains a small part"
    );

    let metrics = std::fs::read_to_string(out.path().join(&recipe.output.metrics_file))?;
    assert!(
        metrics.lines().count() > 5,
        "metrics JSONL has one line per logged step"
    );
    for line in metrics.lines() {
        serde_json::from_str::<serde_json::Value>(line)?;
    }
    assert!(out.path().join("last").is_dir(), "last checkpoint written");
    Ok(())
}
