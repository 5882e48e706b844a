//! End-to-end tests of the `whet` binary: help, inspect on the real all-MiniLM-L6-v2, recipe
//! errors, `bench train` JSON and the asset table.
//!
//! Tests that need a real asset fail (never skip) when it is missing, telling to run
//! `whet assets fetch`.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs the built `whet` with `args`.
fn whet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whet"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The folder of a fetched asset, or a failure telling how to fetch it.
fn asset(name: &str) -> PathBuf {
    whetstone_host::assets::resolve_path(&format!("asset:{name}")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn help_lists_every_command() {
    let out = whet(&["--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for command in [
        "train", "eval", "generate", "merge", "inspect", "bench", "assets", "demo", "plugin",
        "data",
    ] {
        assert!(
            text.contains(command),
            "`{command}` missing from --help:\n{text}"
        );
    }
}

#[test]
fn inspect_minilm_reports_parameters_and_module_names() {
    let dir = asset("all-minilm-l6-v2");
    let out = whet(&["inspect", dir.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let total = report["total_params"].as_u64().unwrap();
    // all-MiniLM-L6-v2 has 22.7M parameters with its pooler, which mean pooling does not use
    // (22.57M without it), plus the 2-class head.
    assert!(
        (22_500_000..22_800_000).contains(&total),
        "total_params {total}"
    );
    assert_eq!(report["num_layers"], 6);
    let linear: Vec<&str> = report["linear_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for name in [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.5.output.dense",
        "classifier",
    ] {
        assert!(linear.contains(&name), "{name} not in {linear:?}");
    }
    let targets = report["target_modules"].to_string();
    assert!(
        targets.contains("\"query\"") && targets.contains("\"value\""),
        "{targets}"
    );

    let out = whet(&["inspect", "asset:all-minilm-l6-v2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("parameters:     22.") && text.contains("BertForSequenceClassification"),
        "{text}"
    );
}

#[test]
fn unknown_recipe_key_is_named_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(
        &recipe,
        "[model]\npath = \"asset:all-minilm-l6-v2\"\ntask = \"classification\"\n\
         [data]\ntrain = [\"asset:uci-sentiment/imdb.json\"]\n\
         [training]\nlearning_rat = 1e-3\n[output]\ndir = \"out\"\n",
    )
    .unwrap();
    let out = whet(&["train", recipe.to_str().unwrap(), "--no-progress"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("learning_rat") && err.contains("recipe.toml"),
        "{err}"
    );
}

#[test]
fn bench_train_prints_json_figures() {
    asset("all-minilm-l6-v2");
    let args = [
        "bench",
        "train",
        "--model",
        "asset:all-minilm-l6-v2",
        "--batch",
        "2",
        "--seq",
        "16",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--trainable",
        "classifier.*",
    ];
    let out = whet(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (
            report["batch"].as_u64(),
            report["seq"].as_u64(),
            report["steps"].as_u64()
        ),
        (Some(2), Some(16), Some(3))
    );
    let t = &report["step_time_s"];
    let (min, median, max) = (
        t["min"].as_f64().unwrap(),
        t["median"].as_f64().unwrap(),
        t["max"].as_f64().unwrap(),
    );
    assert!(0.0 < min && min <= median && median <= max, "{t}");
    let phases = &report["phases_median_s"];
    let forward = phases["forward"].as_f64().unwrap();
    let backward = phases["backward"].as_f64().unwrap();
    assert!(forward > 0.0 && backward > 0.0, "{phases}");
    assert!(
        forward + backward <= max * 1.01,
        "phases fit in the step: {phases} vs {t}"
    );
    assert!(report["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(report["peak_rss_mb"].as_f64().unwrap() > 50.0);
    // The classifier of a 2-class head over 384 features: 384 * 2 + 2.
    assert_eq!(report["trainable_params"], 770);
    assert!(report["total_params"].as_u64().unwrap() > 22_000_000);
    // Model FLOPs: 32 tokens × (4 × params + 2 × trainable); utilisation against the GEMM peak
    // timed before the steps.
    let total = report["total_params"].as_f64().unwrap();
    assert_eq!(
        report["model_flops_per_step"].as_f64(),
        Some(32.0 * (4.0 * total + 2.0 * 770.0))
    );
    // The utilisation is those FLOPs over the median step time and the peak. It is not bounded
    // by 1 here: with only the classifier training, the backward pass stops at the head and the
    // embedding table is a lookup, so the estimate counts far more work than this step does.
    let peak = report["gemm_peak_gflops"].as_f64().unwrap();
    assert!(peak > 0.0);
    let mfu = report["mfu"].as_f64().unwrap();
    let expected = report["model_flops_per_step"].as_f64().unwrap() / median / (peak * 1e9);
    assert!(
        (mfu - expected).abs() <= 1e-9 * expected,
        "{mfu} vs {expected}"
    );
}

#[test]
fn bench_gemm_prints_rates_and_refuses_a_bad_shape() {
    let out = whet(&[
        "bench",
        "gemm",
        "--shape",
        "64x32x16",
        "--shape",
        "8x8x8",
        "--seconds",
        "0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let shapes = report["shapes"].as_array().unwrap();
    assert_eq!(shapes.len(), 2);
    assert_eq!(
        (
            shapes[0]["m"].as_u64(),
            shapes[0]["n"].as_u64(),
            shapes[0]["k"].as_u64()
        ),
        (Some(64), Some(32), Some(16))
    );
    let best = shapes
        .iter()
        .map(|s| s["gflops"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        best > 0.0
            && shapes
                .iter()
                .all(|s| s["candle_gflops"].as_f64().unwrap() > 0.0)
    );
    assert_eq!(report["peak_gflops"].as_f64(), Some(best));
    let out = whet(&["bench", "gemm", "--shape", "64x32"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("MxNxK"), "{}", stderr(&out));
}

#[test]
fn bench_rejects_a_pattern_that_matches_nothing() {
    asset("all-minilm-l6-v2");
    let out = whet(&[
        "bench",
        "train",
        "--model",
        "asset:all-minilm-l6-v2",
        "--trainable",
        "model.layers.29.*",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("model.layers.29.*"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn assets_list_and_path() {
    let out = whet(&["assets", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "smollm2-135m-instruct",
            "all-minilm-l6-v2",
            "uci-sentiment",
            "chatterbot-corpus",
            "brown-corpus"
        ]
    );

    let out = whet(&["assets", "path", "nonexistent-model"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown asset"), "{}", stderr(&out));
}

#[test]
fn data_preview_shows_the_trained_tokens_of_a_chat_example() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sft.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Name a colour.\"}, \
         {\"role\": \"assistant\", \"content\": \"Blue.\"}]}\n\
         {\"prompt\": \"Say hi.\", \"completion\": \"Hi!\"}\n",
    )
    .unwrap();
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = \"asset:smollm2-135m-instruct\"\n[data]\ntrain = [\"{}\"]\n\
             [output]\ndir = \"{}\"\n",
            data.display(),
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    let out = whet(&[
        "data",
        "preview",
        recipe.to_str().unwrap(),
        "-n",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["examples"], 2);
    let shown = &v["shown"][0];
    let trained: String = shown["spans"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s[1] == true)
        .map(|s| s[0].as_str().unwrap())
        .collect();
    // Only the assistant's answer (and its end of turn) is trained, never the prompt.
    assert!(trained.starts_with("Blue."), "{trained:?}");
    assert!(!trained.contains("Name a colour"), "{trained:?}");
    let all: String = shown["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[0].as_str().unwrap())
        .collect();
    assert!(
        all.contains("Name a colour.") && all.contains("<|im_start|>assistant"),
        "{all}"
    );
    assert_eq!(
        shown["trained_tokens"],
        shown["token_list"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["trained"] == true)
            .count()
    );
}
