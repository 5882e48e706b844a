//! Merging on a real model: a LoRA adapter on SmolLM2-135M (loaded from its Q4_1 GGUF, so the
//! merged directory's `config.json`, `tokenizer.json` and `tokenizer_config.json` are generated
//! from the model itself) is saved, loaded back through `adapter::load`, merged and written; the
//! written directory loads as a Hugging Face model with the same tokenizer, special tokens and
//! chat template, and reproduces the adapter model's logits.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use serde_json::json;
use whetstone_host::adapter;
use whetstone_host::model::load::{load, ModelSpec, TaskSpec};
use whetstone_host::model::{Mode, Model};
use whetstone_host::plugin::method::MethodAdapter;
use whetstone_host::plugin::{discover, Plugin, TransportKind};
use whetstone_tests::{lora_plugin, require_asset};

fn logits(model: &dyn Model, ids: &[u32]) -> Result<Tensor> {
    let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let mask = Tensor::ones_like(&input)?;
    Ok(model.forward(&input, &mask, Mode::Eval)?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn lora_on_smollm2_merges_into_a_loadable_model() -> Result<()> {
    require_asset("smollm2-135m-instruct");
    let spec = ModelSpec::new("asset:smollm2-135m-instruct", TaskSpec::CausalLm);
    let loaded = load(&spec, &Device::Cpu, 0)?;
    let model = loaded.model.as_ref();
    let text = "The capital of France is";
    let ids = loaded
        .tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .get_ids()
        .to_vec();

    let manifest = discover::find("lora", &[lora_plugin()])?;
    let plugin = Plugin::load(&manifest, TransportKind::Native)?;
    let config = json!({"r": 8, "lora_alpha": 16, "target_modules": "all-linear",
                        "init_lora_weights": false});
    let trained = MethodAdapter::attach(model, plugin, "default", config, 3)?;
    let dir = tempfile::tempdir()?;
    adapter::save(model, &trained, &spec.path, &dir.path().join("adapter"))?;
    MethodAdapter::deactivate(model);
    let base = logits(model, &ids)?;

    let method = adapter::load(
        model,
        &dir.path().join("adapter"),
        "default",
        &[lora_plugin()],
    )?;
    let with_adapter = logits(model, &ids)?;
    ensure!(
        max_diff(&with_adapter, &base)? > 1e-2,
        "the adapter changes the output"
    );
    adapter::merge(model, &method)?;
    let merged_dir = dir.path().join("merged");
    adapter::write_merged(&loaded, &merged_dir)?;
    let spec = ModelSpec::new(merged_dir.to_string_lossy(), TaskSpec::CausalLm);
    let back = load(&spec, &Device::Cpu, 0)?;
    let again = back
        .tokenizer
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(again.get_ids(), ids.as_slice());
    assert_eq!(back.special, loaded.special);
    assert_eq!(back.chat_template, loaded.chat_template);
    let d = max_diff(&logits(back.model.as_ref(), &ids)?, &with_adapter)?;
    let scale = with_adapter
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    eprintln!("SmolLM2 merged vs adapter: max |Δlogits| {d:.2e} (logits up to {scale:.1})");
    ensure!(d <= 1e-3, "merged logits differ by {d}");
    Ok(())
}
