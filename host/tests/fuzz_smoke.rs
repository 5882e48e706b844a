//! A short fuzzing run of every reader of untrusted files on each CI run: the entry points of
//! [`whetstone_host::fuzzing`] (the cargo-fuzz targets of `host/fuzz/`) get valid seed files,
//! the committed corpus under `host/fuzz/corpus/<target>/`, and seeded mutations of them
//! (flipped bytes, overwritten length fields, truncations, splices). None may panic.
//!
//! The long, coverage-guided runs are `cargo +nightly fuzz run <target>` (DEVELOPERS.md).

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use whetstone_host::fuzzing;

/// Mutants run per target (each seed gets its share).
const MUTANTS: usize = 2500;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The committed corpus files of `target`.
fn committed(target: &str) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(corpus_dir(target)) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// A tiny but complete Llama GGUF: metadata, an f32 embedding, a Q8_0 and a Q4_0 projection.
fn gguf_seed() -> Vec<u8> {
    let d = &Device::Cpu;
    let arch = Value::String("llama".into());
    let (hidden, heads) = (Value::U32(32), Value::U32(4));
    let (ffn, blocks, ctx) = (Value::U32(64), Value::U32(1), Value::U32(128));
    let eps = Value::F32(1e-5);
    let vocab = Value::U32(16);
    let metadata: Vec<(&str, &Value)> = vec![
        ("general.architecture", &arch),
        ("llama.embedding_length", &hidden),
        ("llama.attention.head_count", &heads),
        ("llama.attention.head_count_kv", &heads),
        ("llama.feed_forward_length", &ffn),
        ("llama.block_count", &blocks),
        ("llama.context_length", &ctx),
        ("llama.attention.layer_norm_rms_epsilon", &eps),
        ("llama.vocab_size", &vocab),
    ];
    let values = |n: usize| -> Vec<f32> { (0..n).map(|i| (i as f32 * 0.37).sin()).collect() };
    let embed = QTensor::quantize(
        &Tensor::from_vec(values(16 * 32), (16, 32), d).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let q = QTensor::quantize(
        &Tensor::from_vec(values(32 * 32), (32, 32), d).unwrap(),
        GgmlDType::Q8_0,
    )
    .unwrap();
    let k = QTensor::quantize(
        &Tensor::from_vec(values(32 * 32), (32, 32), d).unwrap(),
        GgmlDType::Q4_0,
    )
    .unwrap();
    let tensors: Vec<(&str, &QTensor)> = vec![
        ("token_embd.weight", &embed),
        ("blk.0.attn_q.weight", &q),
        ("blk.0.attn_k.weight", &k),
    ];
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
    out.into_inner()
}

/// A PEFT LoRA adapter's weights file.
fn safetensors_seed() -> Vec<u8> {
    let d = &Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter_model.safetensors");
    let tensors: HashMap<String, Tensor> = [
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            Tensor::ones((2, 8), candle_core::DType::F32, d).unwrap(),
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            Tensor::zeros((8, 2), candle_core::DType::BF16, d).unwrap(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
    std::fs::read(&path).unwrap()
}

fn adapter_config_seed() -> Vec<u8> {
    br#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": false}"#
        .to_vec()
}

/// Every example recipe of the repository.
fn recipe_seeds() -> Vec<Vec<u8>> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seeds = Vec::new();
    for dir in std::fs::read_dir(examples).unwrap().flatten() {
        let Ok(files) = std::fs::read_dir(dir.path()) else {
            continue;
        };
        for file in files.flatten() {
            if file.path().extension().is_some_and(|e| e == "toml") {
                seeds.push(std::fs::read(file.path()).unwrap());
            }
        }
    }
    assert!(seeds.len() > 10, "the example recipes are found");
    seeds
}

fn manifest_seed() -> Vec<u8> {
    br#"id = "lora"
version = "0.1.0"
kinds = ["method"]
sdk_version = "0.2.0"
contract = "0.2"
description = "LoRA"

[artifacts]
native = "libwhetstone_lora.so"
wasm = "whetstone_lora.wasm"

[limits]
memory_mb = 256
call_timeout_ms = 5000
"#
    .to_vec()
}

/// A seeded mutation of `seed`.
fn mutate(seed: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..4) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..b.len());
        match rng.random_range(0..6) {
            0 => b[at] ^= 1 << rng.random_range(0..8),
            1 => b[at] = [0, 0xff, 0x7f, 0x80, b'"', b'['][rng.random_range(0..6)],
            // An overwritten length, count or offset field.
            2 => {
                let value: u64 = match rng.random_range(0..4) {
                    0 => rng.random(),
                    1 => u64::MAX,
                    2 => 1 << rng.random_range(16..63),
                    _ => rng.random_range(0..64),
                };
                for (i, byte) in value.to_le_bytes().iter().enumerate() {
                    if let Some(slot) = b.get_mut(at + i) {
                        *slot = *byte;
                    }
                }
            }
            3 => b.truncate(at),
            4 => {
                let end = rng.random_range(at..b.len().min(at + 64) + 1);
                let chunk = b[at..end].to_vec();
                let to = rng.random_range(0..b.len());
                b.splice(to..to, chunk);
            }
            _ => {
                b.remove(at);
            }
        }
    }
    b
}

/// Runs `target` over `seeds`, the committed corpus and [`MUTANTS`] mutants; returns how many
/// inputs ran.
fn smoke(name: &str, target: fn(&[u8]), mut seeds: Vec<Vec<u8>>) -> usize {
    seeds.extend(committed(name));
    let mut rng = StdRng::seed_from_u64(0x5EED ^ name.len() as u64);
    let mut runs = 0;
    for seed in &seeds {
        target(seed);
        runs += 1;
    }
    for i in 0..MUTANTS {
        let input = mutate(&seeds[i % seeds.len()], &mut rng);
        let outcome = std::panic::catch_unwind(|| target(&input));
        if outcome.is_err() {
            let dir = std::env::temp_dir().join("whetstone-fuzz-crashes");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{name}-{i}"));
            std::fs::write(&path, &input).unwrap();
            panic!(
                "{name}: mutant {i} panicked; the input is in {} (copy it to \
                 host/fuzz/corpus/{name}/ once fixed)",
                path.display()
            );
        }
        runs += 1;
    }
    runs
}

#[test]
fn gguf_reader_survives_mutations() {
    let runs = smoke("gguf", fuzzing::gguf, vec![gguf_seed()]);
    assert!(runs > MUTANTS);
}

#[test]
fn safetensors_reader_survives_mutations() {
    smoke(
        "safetensors",
        fuzzing::safetensors,
        vec![safetensors_seed()],
    );
}

#[test]
fn adapter_config_reader_survives_mutations() {
    smoke(
        "adapter_config",
        fuzzing::adapter_config,
        vec![adapter_config_seed()],
    );
}

#[test]
fn recipe_parser_survives_mutations() {
    smoke("recipe", fuzzing::recipe, recipe_seeds());
}

#[test]
fn plugin_manifest_reader_survives_mutations() {
    smoke(
        "plugin_manifest",
        fuzzing::plugin_manifest,
        vec![manifest_seed()],
    );
}

/// The seeds are what they claim: each loads without error before it is mutated.
#[test]
fn the_seeds_are_valid_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("seed.gguf");
    std::fs::write(&gguf, gguf_seed()).unwrap();
    let mut file = whetstone_host::model::gguf::GgufFile::open(&gguf).unwrap();
    let config = file.llama_config().unwrap();
    let (dense, kept) = file.load_hf_weights(&config, &Device::Cpu, true).unwrap();
    assert_eq!((dense.len(), kept.len()), (1, 2));
    let st = dir.path().join("adapter_model.safetensors");
    std::fs::write(&st, safetensors_seed()).unwrap();
    assert_eq!(
        whetstone_host::model::hf::load_safetensors_file(&st, &Device::Cpu)
            .unwrap()
            .len(),
        2
    );
    std::fs::write(
        dir.path().join("adapter_config.json"),
        adapter_config_seed(),
    )
    .unwrap();
    whetstone_host::adapter::load::read_config(dir.path()).unwrap();
    let manifest = dir.path().join("plugin.toml");
    std::fs::write(&manifest, manifest_seed()).unwrap();
    whetstone_host::plugin::Manifest::read(&manifest).unwrap();
    for (i, recipe) in recipe_seeds().iter().enumerate() {
        let text = std::str::from_utf8(recipe).unwrap();
        whetstone_host::recipe::Recipe::from_toml_str(text, format!("example {i}")).unwrap();
    }
}

/// Writes the generated seeds into `host/fuzz/corpus/<target>/` for cargo-fuzz runs:
/// `cargo test -p whetstone-host --test fuzz_smoke -- --ignored write_seed_corpus`.
#[test]
#[ignore = "a tool: writes the seed corpus for cargo fuzz (DEVELOPERS.md)"]
fn write_seed_corpus() {
    let seeds: [(&str, Vec<Vec<u8>>); 5] = [
        ("gguf", vec![gguf_seed()]),
        ("safetensors", vec![safetensors_seed()]),
        ("adapter_config", vec![adapter_config_seed()]),
        ("recipe", recipe_seeds()),
        ("plugin_manifest", vec![manifest_seed()]),
    ];
    for (target, files) in seeds {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, bytes) in files.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), bytes).unwrap();
        }
    }
}
