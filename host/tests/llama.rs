//! The Llama family: the real SmolLM2 GGUF against an independent numpy reference
//! (`tests/reference/smollm2_logits.py`), its GGUF-built tokenizer, generation with the KV cache,
//! and gradient routing on a tiny random model.

// Tests may unwrap: a failure is the test's report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use whetstone_host::model::generate::{generate, CausalLm, GenerateOptions};
use whetstone_host::model::gguf::GgufFile;
use whetstone_host::model::llama::{Llama, LlamaConfig};
use whetstone_host::model::load::LoadedModel;
use whetstone_host::model::{tokenizer, Mode, Model};

const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn smollm2_path() -> PathBuf {
    let path = whetstone_host::assets::asset_dir("smollm2-135m-instruct").join(GGUF_NAME);
    assert!(
        path.is_file(),
        "{} is missing: run `whet assets fetch` first (this test needs the real SmolLM2 GGUF)",
        path.display()
    );
    path
}

/// The model, loaded once for all tests of this file.
fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let start = Instant::now();
        let loaded = Llama::load_gguf(&smollm2_path(), &Device::Cpu).unwrap();
        eprintln!("SmolLM2 GGUF load: {:.2} s", start.elapsed().as_secs_f64());
        loaded
    })
}

#[derive(Deserialize)]
struct IdLogit {
    id: u32,
    logit: f64,
}

#[derive(Deserialize)]
struct LastPosition {
    top20: Vec<IdLogit>,
    fixed: Vec<IdLogit>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    name: String,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Reference {
    prompt: String,
    token_ids: Vec<u32>,
    last_position: LastPosition,
    greedy_ids: Vec<u32>,
    tokenizer_cases: Vec<TokenizerCase>,
}

fn reference() -> Reference {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/smollm2_logits.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn gguf_tokenizer_reproduces_the_reference_ids_and_round_trips() {
    let gguf = GgufFile::open(&smollm2_path()).unwrap();
    let tok = tokenizer::from_gguf(&gguf).unwrap();
    let reference = reference();
    let ids = tok
        .tokenizer
        .encode(reference.prompt.as_str(), true)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(
        ids, reference.token_ids,
        "prompt ids differ from the Python BPE"
    );
    for case in &reference.tokenizer_cases {
        let ids = tok
            .tokenizer
            .encode(case.text.as_str(), true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids, case.ids, "case `{}`", case.name);
    }
    // Digits are split one by one.
    let digits = tok.tokenizer.encode("2024", false).unwrap();
    assert_eq!(digits.get_ids().len(), 4);
    for s in [
        "The capital of France is",
        "In 2024, 12 cafés served 3.5 crèmes brûlées.",
        "日本語のテキスト 🚀 emoji",
        "  two  spaces\nand\ttabs",
    ] {
        let ids = tok.tokenizer.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.tokenizer.decode(&ids, false).unwrap(), s);
    }
    assert_eq!(
        tok.tokenizer
            .encode("<|im_start|>", false)
            .unwrap()
            .get_ids(),
        &[1]
    );
    assert_eq!(
        (
            tok.special.bos,
            tok.special.eos,
            tok.special.pad,
            tok.special.add_bos
        ),
        (Some(1), Some(2), 2, false)
    );
    let template = tok.chat_template.unwrap();
    assert!(template.contains("<|im_start|>") && template.contains("add_generation_prompt"));
}

#[test]
fn smollm2_logits_match_the_numpy_reference() {
    let loaded = smollm2();
    let reference = reference();
    let ids = Tensor::new(reference.token_ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mask = ids.ones_like().unwrap();
    let start = Instant::now();
    let logits = loaded.model.forward(&ids, &mask, Mode::Eval).unwrap();
    eprintln!(
        "forward of {} tokens: {:.3} s",
        reference.token_ids.len(),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(logits.dims(), &[1, reference.token_ids.len(), 49152]);
    let last = logits
        .squeeze(0)
        .unwrap()
        .get(reference.token_ids.len() - 1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut max_diff = 0f64;
    for entry in reference
        .last_position
        .top20
        .iter()
        .chain(&reference.last_position.fixed)
    {
        let diff = (last[entry.id as usize] as f64 - entry.logit).abs();
        max_diff = max_diff.max(diff);
        assert!(
            diff <= 1e-3,
            "logit of id {}: ours {} reference {}",
            entry.id,
            last[entry.id as usize],
            entry.logit
        );
    }
    eprintln!("max |Δlogit| vs numpy reference: {max_diff:.2e}");
    // Our top-20 is the reference's top-20, in order.
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let ours: Vec<u32> = order[..20].iter().map(|&i| i as u32).collect();
    let theirs: Vec<u32> = reference.last_position.top20.iter().map(|e| e.id).collect();
    assert_eq!(ours, theirs);
}

#[test]
fn smollm2_greedy_generation_answers_paris() {
    let loaded = smollm2();
    let reference = reference();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        ..GenerateOptions::default()
    };
    let mut streamed = String::new();
    let out = generate(loaded, &reference.prompt, &opts, &mut |piece| {
        streamed.push_str(piece)
    })
    .unwrap();
    eprintln!(
        "greedy: {:?} ({} prompt tokens, {} new tokens, {:.1} tokens/s)",
        out.text,
        out.prompt_tokens,
        out.token_ids.len(),
        out.tokens_per_second
    );
    assert_eq!(out.prompt_tokens, reference.token_ids.len());
    assert_eq!(
        out.token_ids, reference.greedy_ids,
        "greedy continuation differs from the numpy reference"
    );
    assert!(out.text.contains("Paris"), "{:?}", out.text);
    assert_eq!(streamed, out.text);
}

#[test]
fn smollm2_chat_uses_the_gguf_template() {
    let loaded = smollm2();
    let opts = GenerateOptions {
        max_new_tokens: 24,
        chat: true,
        ..GenerateOptions::default()
    };
    let out = generate(loaded, "What is the capital of France?", &opts, &mut |_| {}).unwrap();
    eprintln!(
        "chat: {:?} ({:.1} tokens/s)",
        out.text, out.tokens_per_second
    );
    // The template adds the default system turn, so the prompt is much longer than the question.
    assert!(
        out.prompt_tokens > 20,
        "{} prompt tokens",
        out.prompt_tokens
    );
    assert!(out.text.contains("Paris"), "{:?}", out.text);
    // Sampling is reproducible with a seed.
    let sampled = GenerateOptions {
        temperature: 0.8,
        top_p: 0.9,
        seed: 11,
        ..opts
    };
    let a = generate(loaded, "Name a colour.", &sampled, &mut |_| {}).unwrap();
    let b = generate(loaded, "Name a colour.", &sampled, &mut |_| {}).unwrap();
    assert_eq!(a.token_ids, b.token_ids);
}

fn tiny_config(tied: bool, bias: bool) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        max_position_embeddings: 64,
        vocab_size: 50,
        tie_word_embeddings: tied,
        attention_bias: bias,
    }
}

/// Greedy decoding with the KV cache picks the same tokens (and nearly the same logits) as
/// re-running the full forward over the whole sequence at every step.
#[test]
fn cached_decoding_equals_the_full_forward() {
    for (tied, bias) in [(true, false), (false, true)] {
        let model = Llama::random(&tiny_config(tied, bias), &Device::Cpu, 3).unwrap();
        // q/k/v biases make it Qwen2, as its written config.json says.
        let expected = if bias {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        assert_eq!(model.architecture(), expected);
        let prompt = vec![3u32, 17, 5, 42, 8];
        let mut cache = model.new_cache();
        let mut cached = prompt.clone();
        let mut input = prompt.clone();
        let mut full = prompt.clone();
        for _ in 0..12 {
            let ids = Tensor::new(input.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let step = model.forward_cached(&ids, &mut cache).unwrap();
            assert_eq!(step.dims(), &[1, input.len(), 50]);
            let step_last = step.squeeze(0).unwrap().get(input.len() - 1).unwrap();

            let all = Tensor::new(full.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = model
                .forward(&all, &all.ones_like().unwrap(), Mode::Eval)
                .unwrap();
            let full_last = logits.squeeze(0).unwrap().get(full.len() - 1).unwrap();
            let diff = (&step_last - &full_last)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "cached and full logits differ by {diff}");

            let next_cached = step_last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            let next_full = full_last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            cached.push(next_cached);
            full.push(next_full);
            input = vec![next_cached];
        }
        assert_eq!(cached, full);
        assert_eq!(cache_len(&model, &cached), cached.len() - 1);
    }
}

fn cache_len(model: &Llama, ids: &[u32]) -> usize {
    let mut cache = model.new_cache();
    let t = Tensor::new(&ids[..ids.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.forward_cached(&t, &mut cache).unwrap();
    cache.seq_len()
}

/// Padding positions do not change the logits of real tokens.
#[test]
fn right_padding_leaves_real_positions_unchanged() {
    let model = Llama::random(&tiny_config(true, false), &Device::Cpu, 5).unwrap();
    let ids = Tensor::new(&[[4u32, 9, 13, 2, 0, 0], [4, 9, 13, 2, 7, 1]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let logits = model.forward(&ids, &mask, Mode::Eval).unwrap();
    let a = logits.get(0).unwrap().narrow(0, 0, 4).unwrap();
    let b = logits.get(1).unwrap().narrow(0, 0, 4).unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");
}

/// With `model.layers.1.*` trainable, one backward of the LM loss gives every trainable tensor a
/// non-zero gradient and no frozen tensor (the tied embedding / output head included) any.
#[test]
fn gradients_reach_exactly_the_trainable_params() {
    let model = Llama::random(&tiny_config(true, true), &Device::Cpu, 7).unwrap();
    assert!(
        !model.params().contains("lm_head.weight"),
        "tied head must reuse the embedding"
    );
    let n = model
        .params()
        .set_trainable_by_patterns(&["model.layers.1.*".to_string()])
        .unwrap();
    assert_eq!(n, 12, "9 weights + 3 q/k/v biases in layer 1");
    let ids = Tensor::new(
        &[[1u32, 5, 9, 14, 3, 22], [7, 2, 8, 40, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let labels = Tensor::new(
        &[[1i64, 5, 9, 14, 3, 22], [7, 2, 8, 40, -100, -100]],
        &Device::Cpu,
    )
    .unwrap();
    let logits = model.forward(&ids, &mask, Mode::Train).unwrap();
    let loss = model.loss(&logits, &labels).unwrap();
    let grads = loss.backward().unwrap();
    let mut seen = HashMap::new();
    for param in model.params().iter() {
        let tensor = param.tensor();
        let grad = grads.get(&tensor);
        if param.is_trainable() {
            let norm = grad
                .unwrap_or_else(|| panic!("no gradient for trainable {}", param.name()))
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "zero gradient for {}", param.name());
        } else {
            assert!(
                grad.is_none(),
                "frozen {} received a gradient",
                param.name()
            );
        }
        seen.insert(param.name().to_string(), param.is_trainable());
    }
    assert_eq!(seen.values().filter(|t| **t).count(), 12);
    assert!(!seen["model.embed_tokens.weight"]);
}

#[test]
fn module_names_are_hugging_face_names() {
    let model = Llama::random(&tiny_config(true, false), &Device::Cpu, 1).unwrap();
    let names = model.linear_module_names();
    assert_eq!(names.len(), 14);
    assert_eq!(names[0], "model.layers.0.self_attn.q_proj");
    assert!(names.contains(&"model.layers.1.mlp.down_proj".to_string()));
    assert_eq!(model.architecture(), "LlamaForCausalLM");
}

#[test]
fn bad_inputs_give_errors_that_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let not_gguf = dir.path().join("model.gguf");
    std::fs::write(&not_gguf, b"definitely not a gguf file").unwrap();
    let err = Llama::load_gguf(&not_gguf, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.gguf") && err.contains("GGUF"), "{err}");

    let config = tiny_config(false, false);
    let mut weights = HashMap::new();
    weights.insert(
        "model.embed_tokens.weight".to_string(),
        Tensor::zeros((50, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let err = Llama::from_weights(config, weights, "my-checkpoint")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("my-checkpoint") && err.contains("model.layers.0.input_layernorm.weight"),
        "{err}"
    );

    let hf = serde_json::json!({"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 50, "rope_scaling": {"type": "llama3"}});
    let err = LlamaConfig::from_hf_json(&hf, std::path::Path::new("config.json"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("rope_scaling"), "{err}");
}

/// A Hugging Face directory (config.json, safetensors, tokenizer.json, tokenizer_config.json)
/// loads into the same model: a tiny random Llama saved with the real SmolLM2 tokenizer.
#[test]
fn hf_directory_loads_weights_tokenizer_and_special_tokens() {
    let gguf = GgufFile::open(&smollm2_path()).unwrap();
    let tok = tokenizer::from_gguf(&gguf).unwrap();
    let mut config = tiny_config(true, false);
    config.vocab_size = 49152;
    let model = Llama::random(&config, &Device::Cpu, 9).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let weights: HashMap<String, Tensor> = model
        .params()
        .iter()
        .map(|p| (p.name().to_string(), p.tensor()))
        .collect();
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    tok.tokenizer
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    let hf_config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "vocab_size": 49152, "tie_word_embeddings": true,
        "torch_dtype": "float32"
    });
    std::fs::write(dir.path().join("config.json"), hf_config.to_string()).unwrap();
    let tokenizer_config = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "chat_template": tok.chat_template.clone().unwrap()
    });
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();

    let loaded = Llama::load_hf_dir(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(
        (
            loaded.special.bos,
            loaded.special.eos,
            loaded.special.pad,
            loaded.special.add_bos
        ),
        (Some(1), Some(2), 2, false)
    );
    assert_eq!(loaded.chat_template, tok.chat_template);
    assert_eq!(loaded.max_positions, 64);
    let ids = Tensor::new(&[[504u32, 3575, 282, 4649, 314]], &Device::Cpu).unwrap();
    let mask = ids.ones_like().unwrap();
    let ours = model.forward(&ids, &mask, Mode::Eval).unwrap();
    let theirs = loaded.model.forward(&ids, &mask, Mode::Eval).unwrap();
    let diff = (ours - theirs)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    let opts = GenerateOptions {
        max_new_tokens: 5,
        ..GenerateOptions::default()
    };
    let out = generate(&loaded, "The capital of France is", &opts, &mut |_| {}).unwrap();
    assert_eq!(out.prompt_tokens, 5);
}

/// The chunked loss (`Model::forward_loss`, no `[tokens, vocab]` logits) equals the logits path
/// in value and in every gradient: only layer 1 training (frozen tied head), an untied head that
/// trains, and everything training with the head tied to the embedding.
#[test]
fn the_chunked_loss_equals_the_logits_loss_with_its_gradients() {
    let ids = Tensor::new(
        &[[1u32, 5, 9, 14, 3, 22], [7, 2, 8, 40, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    // The first sequence's prompt does not count (SFT): only its last two tokens are labels.
    let labels = Tensor::new(
        &[[-100i64, -100, -100, 14, 3, 22], [7, 2, 8, 40, -100, -100]],
        &Device::Cpu,
    )
    .unwrap();
    for (tied, patterns) in [
        (true, vec!["model.layers.1.*"]),
        (false, vec!["lm_head.*", "model.layers.0.mlp.*"]),
        (true, vec!["*"]),
    ] {
        let model = Llama::random(&tiny_config(tied, false), &Device::Cpu, 11).unwrap();
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        model.params().set_trainable_by_patterns(&patterns).unwrap();
        let logits = model.forward(&ids, &mask, Mode::Eval).unwrap();
        let plain = model.loss(&logits, &labels).unwrap();
        let chunked = model
            .forward_loss(&ids, &mask, &labels, Mode::Eval)
            .unwrap()
            .expect("Llama has a chunked loss");
        let value = |t: &Tensor| t.to_scalar::<f32>().unwrap();
        assert!(
            (value(&plain) - value(&chunked)).abs() < 1e-5,
            "{patterns:?}: {} vs {}",
            value(&plain),
            value(&chunked)
        );
        let (g_plain, g_chunked) = (plain.backward().unwrap(), chunked.backward().unwrap());
        let mut trained = 0;
        for param in model.params().iter() {
            let tensor = param.tensor();
            match (g_plain.get(&tensor), g_chunked.get(&tensor)) {
                (Some(a), Some(b)) => {
                    let diff = (a - b)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    let scale = a
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(
                        diff <= 1e-5 * scale.max(1.0),
                        "{patterns:?} {}: gradients differ by {diff}",
                        param.name()
                    );
                    trained += 1;
                }
                (None, None) => assert!(!param.is_trainable(), "{}", param.name()),
                (a, b) => panic!(
                    "{patterns:?} {}: gradient in one path only ({} plain, {} chunked)",
                    param.name(),
                    a.is_some(),
                    b.is_some()
                ),
            }
        }
        assert_eq!(trained, model.params().trainable().len(), "{patterns:?}");
    }
}
