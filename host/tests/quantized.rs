//! QLoRA through the host: a Llama whose decoder linears are held quantized (NF4 and ggml
//! Q4_1/Q8_0) trains LoRA with the same loss and the same LoRA gradients (within 1e-5 relative)
//! as the f32 model that holds the dequantized weights, the quantized weights never train or get
//! a gradient, and the memory the blocks take is a fraction of f32's.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use serde_json::json;
use whetstone_host::model::llama::{Llama, LlamaConfig};
use whetstone_host::model::{Mode, Model};
use whetstone_host::plugin::method::MethodAdapter;
use whetstone_host::plugin::{Manifest, Plugin, TransportKind};
use whetstone_host::quant::QuantFormat;

mod common;

fn lora() -> &'static Manifest {
    static MANIFEST: OnceLock<Manifest> = OnceLock::new();
    MANIFEST.get_or_init(|| common::build_plugin("lora", false))
}

/// A tiny Llama whose linear widths are multiples of 64 (NF4's block) and 32 (ggml's).
fn config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 32,
        vocab_size: 40,
        tie_word_embeddings: true,
        attention_bias: false,
    }
}

/// The weights of a random model, by name.
fn random_weights() -> HashMap<String, Tensor> {
    let model = Llama::random(&config(), &Device::Cpu, 5).unwrap();
    model
        .params()
        .iter()
        .map(|p| (p.name().to_string(), p.tensor()))
        .collect()
}

/// The LoRA loss of a batch and the gradient of every LoRA tensor, by name.
fn lora_loss_and_grads(model: &Llama) -> (f32, HashMap<String, Tensor>) {
    let plugin = Plugin::load(lora(), TransportKind::Native).unwrap();
    let config =
        json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]});
    let adapter = MethodAdapter::attach(model, plugin, "default", config, 17).unwrap();
    // LoRA's B starts at zero; make it non-zero so the gradients of A are not zero too.
    for p in adapter.params() {
        if p.name().contains("lora_B") {
            let t = p.tensor();
            p.set_value(&(t.ones_like().unwrap() * 0.01).unwrap())
                .unwrap();
        }
    }
    let d = Device::Cpu;
    let ids = Tensor::new(&[[1u32, 5, 9, 14, 3, 22], [7, 2, 8, 30, 0, 0]], &d).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &d).unwrap();
    let labels = Tensor::new(&[[1i64, 5, 9, 14, 3, 22], [7, 2, 8, 30, -100, -100]], &d).unwrap();
    // Training mode (evaluation runs without autograd); lora_dropout is 0, so it is exact.
    let logits = model.forward(&ids, &mask, Mode::Train).unwrap();
    let loss = model.loss(&logits, &labels).unwrap();
    let grads = loss.backward().unwrap();
    for p in model.params().iter() {
        // A quantized weight is no variable: autograd has nothing to give a gradient to.
        assert!(
            p.quantized_matrix().is_none() || p.var().is_none(),
            "quantized {} is a variable",
            p.name()
        );
    }
    let lora_grads = adapter
        .params()
        .iter()
        .map(|p| {
            let g = grads
                .get(p.var().unwrap().as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {}", p.name()))
                .clone();
            (p.name().to_string(), g)
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), lora_grads)
}

#[test]
fn lora_over_a_quantized_base_has_the_gradients_of_its_dequantized_twin() {
    for format in [
        QuantFormat::Nf4,
        QuantFormat::Ggml(GgmlDType::Q4_1),
        QuantFormat::Ggml(GgmlDType::Q8_0),
    ] {
        let quantized = Llama::from_parts(
            config(),
            random_weights(),
            HashMap::new(),
            Some(format),
            "test",
        )
        .unwrap();
        let held: Vec<_> = quantized
            .params()
            .iter()
            .filter_map(|p| p.quantized_matrix())
            .collect();
        assert_eq!(
            held.len(),
            2 * 7,
            "{format}: every decoder linear is quantized"
        );
        let bytes: usize = held.iter().map(|m| m.size_in_bytes()).sum();
        let values: usize = held.iter().map(|m| m.dims().0 * m.dims().1).sum();
        assert!(
            (bytes as f64) < 0.3 * (4 * values) as f64,
            "{format}: {bytes} bytes for {values} weights"
        );
        // The twin: the same numbers, dequantized once, as ordinary f32 weights.
        let twin_weights = quantized
            .params()
            .iter()
            .map(|p| (p.name().to_string(), p.tensor()))
            .collect();
        let twin = Llama::from_weights(config(), twin_weights, "twin").unwrap();
        assert!(twin.params().iter().all(|p| p.quantized_matrix().is_none()));

        let (loss_q, grads_q) = lora_loss_and_grads(&quantized);
        let (loss_f, grads_f) = lora_loss_and_grads(&twin);
        assert!(
            (loss_q - loss_f).abs() <= 1e-5 * loss_f.abs(),
            "{format}: loss {loss_q} vs {loss_f}"
        );
        assert_eq!(grads_q.len(), grads_f.len());
        assert_eq!(
            grads_q.len(),
            2 * 3 * 2,
            "{format}: A and B of 3 modules in 2 layers"
        );
        for (name, gq) in &grads_q {
            let gf = &grads_f[name];
            let diff = (gq - gf)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let scale = gf
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-5 * scale,
                "{format} {name}: gradients differ by {diff} (largest {scale})"
            );
        }
    }
}

#[test]
fn a_quantized_weight_refuses_to_train() {
    let model = Llama::from_parts(
        config(),
        random_weights(),
        HashMap::new(),
        Some(QuantFormat::Nf4),
        "test",
    )
    .unwrap();
    let err = model
        .params()
        .set_trainable_by_patterns(&["model.layers.0.self_attn.q_proj.weight".to_string()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("quantized") && err.contains("q_proj"), "{err}");
    // Norms and embeddings stay f32 and still train.
    model
        .params()
        .set_trainable_by_patterns(&["model.norm.weight".to_string()])
        .unwrap();
}

/// The real SmolLM2 GGUF (Q4_1 linears) with `quantize = "keep"`: 210 linear weights stay in
/// their Q4_1 blocks and give the logits of the model dequantized to f32 at load (the same
/// numbers); `write_requantized` makes a Q8_0 copy that loads back as Q8_0 blocks.
#[test]
fn smollm2_keeps_its_q4_1_blocks_and_requantizes_to_q8_0() {
    use whetstone_host::model::gguf::GgufFile;
    use whetstone_host::quant::QuantizeSpec;
    let path = whetstone_host::assets::asset_dir("smollm2-135m-instruct")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run `whet assets fetch` first",
        path.display()
    );
    let d = Device::Cpu;
    let ids = Tensor::new(&[[1u32, 504, 3575, 282, 4649, 314]], &d).unwrap();
    let mask = ids.ones_like().unwrap();
    let logits = |model: &dyn Model| model.forward(&ids, &mask, Mode::Eval).unwrap();
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let blocks = |model: &dyn Model, want: QuantFormat| {
        let held: Vec<_> = model
            .params()
            .iter()
            .filter_map(|p| p.quantized_matrix())
            .collect();
        assert_eq!(held.len(), 30 * 7, "every decoder linear is held in blocks");
        assert!(held.iter().all(|m| m.format() == want), "all {want}");
        let bytes: usize = held.iter().map(|m| m.size_in_bytes()).sum();
        let values: usize = held.iter().map(|m| m.dims().0 * m.dims().1).sum();
        8.0 * bytes as f64 / values as f64
    };

    let dense = Llama::load_gguf(&path, &d).unwrap();
    let want = logits(dense.model.as_ref());
    let kept = Llama::load_gguf_quantized(&path, &d, Some(QuantizeSpec::Keep)).unwrap();
    let bits = blocks(kept.model.as_ref(), QuantFormat::Ggml(GgmlDType::Q4_1));
    assert!(
        (bits - 5.0).abs() < 1e-9,
        "Q4_1 is 5 bits per value, got {bits}"
    );
    let diff = max_abs(&(logits(kept.model.as_ref()) - &want).unwrap());
    assert!(
        diff < 1e-3 * max_abs(&want),
        "kept Q4_1 blocks: logits differ by {diff}"
    );
    drop(kept);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("q8_0.gguf");
    let changed = GgufFile::open(&path)
        .unwrap()
        .write_requantized(&out, GgmlDType::Q8_0)
        .unwrap();
    assert_eq!(changed, 30 * 7);
    let q8 = Llama::load_gguf_quantized(&out, &d, Some(QuantizeSpec::Keep)).unwrap();
    let bits = blocks(q8.model.as_ref(), QuantFormat::Ggml(GgmlDType::Q8_0));
    assert!(
        (bits - 8.5).abs() < 1e-9,
        "Q8_0 is 8.5 bits per value, got {bits}"
    );
    // Q8_0 of Q4_1 values: close to them, not equal.
    let q8_logits = logits(q8.model.as_ref());
    let diff = max_abs(&(&q8_logits - &want).unwrap());
    assert!(
        diff < 0.05 * max_abs(&want),
        "Q8_0 copy: logits differ by {diff}"
    );

    // Written from the host's (Hugging Face layout) values instead, as `whet merge
    // --requantize` does: the q/k rows go back to llama.cpp's order, so the file is the same.
    let from_values = dir.path().join("from-values.gguf");
    let params = dense.model.params();
    let value_of = |name: &str| params.get(name).ok().map(|p| p.tensor());
    GgufFile::open(&path)
        .unwrap()
        .write_with_values(&from_values, GgmlDType::Q8_0, &value_of)
        .unwrap();
    let again = Llama::load_gguf_quantized(&from_values, &d, Some(QuantizeSpec::Keep)).unwrap();
    let diff = max_abs(&(logits(again.model.as_ref()) - &q8_logits).unwrap());
    assert_eq!(diff, 0.0, "the same Q8_0 blocks either way");
}

/// `requantize_linears` holds a model's linears in blocks from then on, and `logit_error`
/// measures what that changed.
#[test]
fn requantizing_a_model_in_place_and_measuring_it() {
    use whetstone_host::quant::requantize::{logit_error, requantize_linears};
    let model = Llama::from_weights(config(), random_weights(), "test").unwrap();
    let d = Device::Cpu;
    let ids = Tensor::new(&[[1u32, 5, 9, 14, 3, 22]], &d).unwrap();
    let mask = ids.ones_like().unwrap();
    let before = model.forward(&ids, &mask, Mode::Eval).unwrap();
    assert_eq!(requantize_linears(&model, QuantFormat::Nf4).unwrap(), 2 * 7);
    let held = model
        .params()
        .iter()
        .filter(|p| p.quantized_matrix().is_some())
        .count();
    assert_eq!(held, 2 * 7);
    let after = model.forward(&ids, &mask, Mode::Eval).unwrap();
    let error = logit_error(&before, &after).unwrap();
    assert_eq!(error.positions, 6);
    assert!(error.max_abs > 0.0, "NF4 changes the weights");
    assert!(error.mean_abs < 0.1 * error.reference_max_abs, "{error:?}");
}
