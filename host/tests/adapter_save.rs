//! What `adapter::save` writes for methods that train base parameters, on a tiny random BERT
//! classifier: with BitFit, `modules_to_save` lists only the modules trained whole (the
//! classification head), not the modules whose bias alone trains; with LN tuning, the norms go
//! under PEFT's `ln_tuning_layers` keys and the head under `modules_to_save`. Both adapters
//! reload onto a fresh model with the same outputs.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use whetstone_host::adapter;
use whetstone_host::model::{Mode, Model};
use whetstone_host::plugin::method::MethodAdapter;
use whetstone_host::plugin::{Plugin, TransportKind};

mod common;

use common::tiny_bert;

fn logits(model: &dyn Model) -> Tensor {
    let ids = Tensor::new(&[[3u32, 7, 11, 2], [5, 9, 0, 0]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 0, 0]], &Device::Cpu).unwrap();
    model.forward(&ids, &mask, Mode::Eval).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn bitfit_adapters_list_only_whole_modules_and_reload() {
    let manifest = common::build_plugin("bitfit", false);
    let model = tiny_bert();
    let plugin = Plugin::load(&manifest, TransportKind::Native).unwrap();
    let method = MethodAdapter::attach(&model, plugin, "default", json!({}), 1).unwrap();
    let trained = method.base_params();
    assert!(trained.iter().any(|p| p.name().ends_with("query.bias")));
    // Move every trained tensor so that a reload that missed one would show.
    for p in &trained {
        let var = p.var().unwrap();
        var.set(&(var.as_tensor() + 0.25).unwrap()).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    adapter::save(&model, &method, "tiny-bert", dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let config: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["modules_to_save"], json!(["classifier"]), "{text}");

    let fresh = tiny_bert();
    let plugin = Plugin::load(&manifest, TransportKind::Native).unwrap();
    let _reloaded = adapter::load::load_with_plugin(&fresh, dir.path(), "default", plugin).unwrap();
    let diff = max_diff(&logits(&model), &logits(&fresh));
    assert!(diff < 1e-6, "reloaded logits differ by {diff}");
}

#[test]
fn ln_tuning_adapters_use_peft_ln_tuning_layers_keys_and_reload() {
    let manifest = common::build_plugin("ln-tuning", false);
    let model = tiny_bert();
    let plugin = Plugin::load(&manifest, TransportKind::Native).unwrap();
    let config = json!({"modules_to_save": ["classifier"]});
    let method = MethodAdapter::attach(&model, plugin, "default", config, 1).unwrap();
    for p in &method.base_params() {
        let var = p.var().unwrap();
        var.set(&(var.as_tensor() + 0.25).unwrap()).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    adapter::save(&model, &method, "tiny-bert", dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
    let config: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["peft_type"], "LN_TUNING");
    assert_eq!(config["modules_to_save"], json!(["classifier"]), "{text}");
    let tensors =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let norms: Vec<&String> = tensors.keys().filter(|k| k.contains("LayerNorm")).collect();
    assert!(!norms.is_empty());
    for key in &norms {
        assert!(
            key.ends_with(".LayerNorm.ln_tuning_layers.weight")
                || key.ends_with(".LayerNorm.ln_tuning_layers.bias"),
            "{key}"
        );
    }
    assert!(tensors.contains_key("base_model.model.classifier.weight"));

    let fresh = tiny_bert();
    let plugin = Plugin::load(&manifest, TransportKind::Native).unwrap();
    let _reloaded = adapter::load::load_with_plugin(&fresh, dir.path(), "default", plugin).unwrap();
    let diff = max_diff(&logits(&model), &logits(&fresh));
    assert!(diff < 1e-6, "reloaded logits differ by {diff}");
}
