//! The first-party method catalogue (`plugins/*`) through the conformance suite: each plugin is
//! built natively, and for wasm32 too when this machine has the toolchain (then the native ==
//! wasm check runs as well), and must pass every check on every build. `WHETSTONE_REQUIRE_WASM`
//! (set by CI) makes a missing toolchain a failure.
//!
//! LoRA itself has its own, more detailed test in `plugin_conformance.rs`.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};
use whetstone_host::plugin::build::{self, BuildOptions};
use whetstone_host::plugin::conformance::{self, Report, Status};

/// Builds `plugins/<crate_dir>` (native, and wasm when possible) into a temporary folder and
/// runs the conformance suite with `config` on every build. Returns the report after asserting
/// that it passed.
fn check_plugin(crate_dir: &str, config: Value) -> Report {
    let wasm = build::wasm_toolchain_available();
    if !wasm {
        let why = build::missing_wasm_toolchain();
        assert!(
            std::env::var_os("WHETSTONE_REQUIRE_WASM").is_none(),
            "{why}"
        );
        eprintln!("checking the native build only: {why}");
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins")
        .join(crate_dir);
    let out = tempfile::tempdir().unwrap();
    let opts = BuildOptions {
        native: true,
        wasm,
        out_dir: Some(out.path().to_path_buf()),
        release: false,
    };
    let start = Instant::now();
    let manifest = build::build(&dir, &opts).unwrap();
    eprintln!("built `{}` in {:.1?}", manifest.id, start.elapsed());
    let report = conformance::check(&manifest, &[], config).unwrap();
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    if wasm {
        let cross = report.checks.iter().find(|c| c.name == "native-wasm");
        assert_eq!(cross.map(|c| c.status), Some(Status::Pass), "{report}");
    }
    report
}

/// The figure a check reported on the first build it ran on.
#[allow(dead_code)]
fn figure(report: &Report, check: &str) -> Option<f64> {
    report
        .checks
        .iter()
        .find(|c| c.name == check)
        .and_then(|c| c.figure)
}

/// DoRA is LoRA with `use_dora`: the magnitude vector trains with A and B, and the merged
/// weight `m · (W + s·B·A) / ‖W + s·B·A‖` reproduces the hooked model.
#[test]
fn dora_passes_conformance() {
    let report = check_plugin(
        "lora",
        json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": true}),
    );
    assert_eq!(figure(&report, "inject"), Some(4.0));
    let merge = report.checks.iter().find(|c| c.name == "merge");
    assert_eq!(merge.map(|c| c.status), Some(Status::Pass), "{report}");
}

/// VeRA: the shared projections are generated in the plugin (identical native and wasm, and
/// regenerated on reload), only `vera_lambda_b` / `vera_lambda_d` train, and `ΔW` merges.
#[test]
fn vera_passes_conformance() {
    let report = check_plugin(
        "vera",
        json!({"r": 8, "target_modules": ["q_proj", "v_proj"]}),
    );
    assert_eq!(figure(&report, "inject"), Some(4.0));
    assert_eq!(figure(&report, "handles"), Some(0.0));
    let merge = report.checks.iter().find(|c| c.name == "merge");
    assert_eq!(merge.map(|c| c.status), Some(Status::Pass), "{report}");
}

/// Houlsby adapters: after the attention output projection and after the feed-forward output
/// projection of both blocks; non-linear, so merge is skipped.
#[test]
fn bottleneck_houlsby_passes_conformance() {
    let report = check_plugin("bottleneck", json!({"config": "houlsby"}));
    assert_eq!(figure(&report, "inject"), Some(4.0));
    let merge = report.checks.iter().find(|c| c.name == "merge");
    assert_eq!(merge.map(|c| c.status), Some(Status::Skip), "{report}");
}

/// Pfeiffer adapters: after the feed-forward output projection of both blocks only.
#[test]
fn bottleneck_pfeiffer_passes_conformance() {
    let report = check_plugin("bottleneck", json!({"config": "pfeiffer"}));
    assert_eq!(figure(&report, "inject"), Some(2.0));
    let merge = report.checks.iter().find(|c| c.name == "merge");
    assert_eq!(merge.map(|c| c.status), Some(Status::Skip), "{report}");
}

/// LoHa: `ΔW = (hada_w1_a·hada_w1_b) ⊙ (hada_w2_a·hada_w2_b) · alpha/r` on the query and value
/// projections of both blocks, and `ΔW` merges.
#[test]
fn loha_passes_conformance() {
    let report = check_plugin(
        "loha",
        json!({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    );
    assert_eq!(figure(&report, "inject"), Some(4.0));
    let merge = report.checks.iter().find(|c| c.name == "merge");
    assert_eq!(merge.map(|c| c.status), Some(Status::Pass), "{report}");
}

/// LoKr: `ΔW = kron(w1, w2) · alpha/r` with PEFT's factorisation, here both factors whole
/// (`lokr_w1`, `lokr_w2`), on the query and value projections of both blocks; `ΔW` merges.
#[test]
fn lokr_passes_conformance() {
    let report = check_plugin(
        "lokr",
        json!({"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    );
    assert_eq!(figure(&report, "inject"), Some(4.0));
    let merge = report.checks.iter().find(|c| c.name == "merge");
    assert_eq!(merge.map(|c| c.status), Some(Status::Pass), "{report}");
}

/// (IA)³: output scaling `l ⊙ (W x + b)` on `o_proj` and `up_proj`, input scaling
/// `W (l ⊙ x) + b` on the feedforward `down_proj`, in both blocks; `ΔW = W ⊙ (l − 1)` merges.
/// PEFT's Llama default (`k_proj`, `v_proj`, `down_proj`) would refuse to merge here: the tiny
/// Llama's `k_proj`/`v_proj` have biases, which IA3 scales too and `ΔW` cannot carry.
#[test]
fn ia3_passes_conformance() {
    let report = check_plugin(
        "ia3",
        json!({"target_modules": ["o_proj", "up_proj", "down_proj"],
               "feedforward_modules": ["down_proj"]}),
    );
    assert_eq!(figure(&report, "inject"), Some(6.0));
    let merge = report.checks.iter().find(|c| c.name == "merge");
    assert_eq!(merge.map(|c| c.status), Some(Status::Pass), "{report}");
}

/// The status of `check` on the first build it ran on.
fn status(report: &Report, check: &str) -> Option<Status> {
    report
        .checks
        .iter()
        .find(|c| c.name == check)
        .map(|c| c.status)
}

/// Asserts what every model-level (prompt-learning) method shows: it wraps no linear (inject
/// and merge skip), and cached decoding with its virtual tokens or prefix equals a full forward.
fn assert_model_level(report: &Report) {
    assert_eq!(status(report, "inject"), Some(Status::Skip), "{report}");
    assert_eq!(status(report, "merge"), Some(Status::Skip), "{report}");
    assert_eq!(status(report, "kv-cache"), Some(Status::Pass), "{report}");
    let skipped: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| c.status == Status::Skip)
        .map(|c| c.name.as_str())
        .collect();
    assert!(
        skipped.iter().all(|c| *c == "inject" || *c == "merge"),
        "{report}"
    );
}

/// Prompt tuning: 4 virtual tokens (`prompt_embeddings` `[4, 32]`) before the tiny Llama's
/// input; the hooked forward, the KV cache and the save → load round trip agree.
#[test]
fn prompt_tuning_passes_conformance() {
    let report = check_plugin("prompt-tuning", json!({"num_virtual_tokens": 4}));
    assert_model_level(&report);
    assert_eq!(figure(&report, "handles"), Some(0.0));
}

/// P-tuning: 4 virtual tokens from PEFT's MLP prompt encoder (embedding, three linear layers).
#[test]
fn p_tuning_passes_conformance() {
    let report = check_plugin(
        "p-tuning",
        json!({"num_virtual_tokens": 4, "encoder_hidden_size": 16}),
    );
    assert_model_level(&report);
    assert_eq!(figure(&report, "handles"), Some(0.0));
}

/// Prefix tuning: a 3-position key/value prefix on both attention layers of the tiny Llama
/// (grouped-query: 2 key/value heads of 8), plain and with PEFT's projection.
#[test]
fn prefix_tuning_passes_conformance() {
    let report = check_plugin("prefix-tuning", json!({"num_virtual_tokens": 3}));
    assert_model_level(&report);
    assert_eq!(figure(&report, "handles"), Some(0.0));
    let projected = check_plugin(
        "prefix-tuning",
        json!({"num_virtual_tokens": 3, "prefix_projection": true, "encoder_hidden_size": 12}),
    );
    assert_model_level(&projected);
}

/// Asserts what a method that trains only base parameters shows on the tiny Llama (27 base
/// tensors): it wraps nothing (inject and merge skip), every trained tensor gets a gradient, and
/// exactly `trained` tensors are left out of the frozen check.
fn assert_trains_base_params(report: &Report, trained: usize) {
    let status_of = |name: &str| {
        report
            .checks
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.status)
    };
    assert_eq!(status_of("inject"), Some(Status::Skip), "{report}");
    assert_eq!(status_of("merge"), Some(Status::Skip), "{report}");
    assert_eq!(status_of("gradients"), Some(Status::Pass), "{report}");
    assert_eq!(figure(report, "frozen"), Some((27 - trained) as f64));
    let attach = report.checks.iter().find(|c| c.name == "attach");
    let message = attach.map(|c| c.message.as_str()).unwrap_or_default();
    assert!(
        message.contains(&format!("{trained} trained base parameters")),
        "{report}"
    );
}

/// BitFit: only the biases train — the q/k/v biases of both blocks of the tiny Llama.
#[test]
fn bitfit_passes_conformance() {
    let report = check_plugin("bitfit", json!({}));
    assert_trains_base_params(&report, 6);
    let query_only = check_plugin("bitfit", json!({"target_modules": ["q_proj"]}));
    assert_trains_base_params(&query_only, 2);
}

/// LN tuning. The fixture has q/k/v biases, so it is a Qwen2 and PEFT's Qwen2 default applies:
/// the `post_attention_layernorm` of both blocks. Llama's default set (both RMSNorms of both
/// blocks and the final norm), named explicitly, trains 5.
#[test]
fn ln_tuning_passes_conformance() {
    let report = check_plugin("ln-tuning", json!({}));
    assert_trains_base_params(&report, 2);
    let llama_set = check_plugin(
        "ln-tuning",
        json!({"target_modules": ["input_layernorm", "post_attention_layernorm", "norm"]}),
    );
    assert_trains_base_params(&llama_set, 5);
}

/// Layer-wise, gradual unfreezing at step 0: the top block (12 tensors with the q/k/v biases),
/// the final norm and the untied `lm_head` train; the embeddings and block 0 stay frozen.
#[test]
fn layerwise_passes_conformance() {
    let report = check_plugin(
        "layerwise",
        json!({"schedule": "gradual", "unfreeze_every": 2}),
    );
    assert_trains_base_params(&report, 14);
    let all = check_plugin(
        "layerwise",
        json!({"schedule": "last_n", "last_n_layers": 2, "train_embeddings": true}),
    );
    assert_trains_base_params(&all, 27);
}

/// EWC trains the base parameters its patterns name (the top block of the tiny Llama, 12
/// tensors, and its untied `lm_head`); outside a task sequence it adds no penalty. Its Fisher
/// estimate and penalty are tested in `continual.rs`.
#[test]
fn ewc_passes_conformance() {
    let report = check_plugin(
        "ewc",
        json!({"trainable": ["model.layers.1.*", "lm_head.*"]}),
    );
    assert_trains_base_params(&report, 13);
}

/// Prompt tuning's `TEXT` and `SAMPLE_VOCAB` inits copy rows of the tiny Llama's input
/// embeddings: `TEXT` those of the given token ids, repeated to the number of virtual tokens;
/// `SAMPLE_VOCAB` those of tokens drawn from the attach seed (same seed, same tokens).
#[test]
fn prompt_tuning_inits_copy_input_embedding_rows() {
    use whetstone_host::model::llama::Llama;
    use whetstone_host::model::Model;
    use whetstone_host::plugin::method::MethodAdapter;
    use whetstone_host::plugin::{Plugin, TransportKind};

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/prompt-tuning");
    let out = tempfile::tempdir().unwrap();
    let opts = BuildOptions {
        native: true,
        wasm: false,
        out_dir: Some(out.path().to_path_buf()),
        release: false,
    };
    let plugin = Plugin::load(&build::build(&dir, &opts).unwrap(), TransportKind::Native).unwrap();
    // The virtual tokens and the embedding matrix, after attaching with `config` and `seed`.
    let attach = |config: Value, seed: u64| -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let device = candle_core::Device::Cpu;
        let model = Llama::random(&conformance::tiny_config(), &device, 1).unwrap();
        let adapter =
            MethodAdapter::attach(&model, plugin.clone(), "default", config, seed).unwrap();
        let prompts = adapter.params()[0].tensor().to_vec2::<f32>().unwrap();
        let embed = model.params().get("model.embed_tokens.weight").unwrap();
        (prompts, embed.tensor().to_vec2::<f32>().unwrap())
    };

    let text = json!({"num_virtual_tokens": 4, "prompt_tuning_init": "TEXT",
                      "prompt_tuning_init_text": "w3 w7 w9", "tokenizer_name_or_path": "tiny",
                      "prompt_tuning_init_token_ids": [3, 7, 9]});
    let (prompts, embed) = attach(text, 17);
    let want: Vec<Vec<f32>> = [3, 7, 9, 3].iter().map(|&i| embed[i].clone()).collect();
    assert_eq!(prompts, want);

    let sample = json!({"num_virtual_tokens": 6, "prompt_tuning_init": "SAMPLE_VOCAB"});
    let (a, embed) = attach(sample.clone(), 17);
    assert!(
        a.iter().all(|row| embed.contains(row)),
        "rows of the vocabulary"
    );
    assert_eq!(attach(sample.clone(), 17).0, a, "same seed, same tokens");
    assert_ne!(attach(sample, 18).0, a, "another seed, other tokens");
}

/// The loss plugins pass the loss checks: a finite value for a classifier and a causal LM, a
/// gradient that is zero exactly where positions do not count, the same results native and wasm.
#[test]
fn loss_plugins_pass_conformance() {
    for (plugin, config) in [
        (
            "cross-entropy",
            json!({"label_smoothing": 0.1, "ignore_index": 2}),
        ),
        ("focal", json!({"gamma": 2.0})),
        ("distill", json!({"alpha": 0.5, "temperature": 2.0})),
    ] {
        let report = check_plugin(plugin, config);
        let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        assert!(
            names.contains(&"value") && names.contains(&"gradients"),
            "{report}"
        );
    }
}
