//! Entry points for fuzzing the readers of untrusted files: each takes arbitrary bytes, runs
//! them through the same code `whet` uses on a user's file, and must return (an error is fine)
//! without panicking, aborting or allocating without bound.
//!
//! The cargo-fuzz targets in `host/fuzz/` call these (long, coverage-guided runs: see
//! DEVELOPERS.md), and `host/tests/fuzz_smoke.rs` runs them over the committed seed corpus and
//! seeded mutations of it on every CI run.

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::model::gguf::GgufFile;

/// Writes `bytes` to `name` in a scratch directory of this process and thread (the readers take
/// paths, as `whet` gets them) and returns its path.
fn scratch_file(name: &str, bytes: &[u8]) -> Option<PathBuf> {
    let thread = format!("{:?}", std::thread::current().id());
    let thread: String = thread.chars().filter(char::is_ascii_digit).collect();
    let dir = std::env::temp_dir().join(format!("whetstone-fuzz-{}-{thread}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(name);
    std::fs::write(&path, bytes).ok()?;
    Some(path)
}

/// A GGUF file: header, metadata, the Llama configuration, and every tensor small enough to
/// read (each dequantized, and kept in its blocks when quantized).
pub fn gguf(bytes: &[u8]) {
    let Some(path) = scratch_file("model.gguf", bytes) else {
        return;
    };
    let Ok(mut file) = GgufFile::open(&path) else {
        return;
    };
    let _ = file.architecture();
    if let Ok(config) = file.llama_config() {
        let _ = file.load_hf_weights(&config, &Device::Cpu, true);
    }
    let names: Vec<String> = file.tensor_names();
    for name in names {
        let _ = file.dequantize(&name, &Device::Cpu);
    }
}

/// A safetensors weights file, as a model or adapter loader reads it, and its keys as an
/// adapter's are normalised.
pub fn safetensors(bytes: &[u8]) {
    let Some(path) = scratch_file("adapter_model.safetensors", bytes) else {
        return;
    };
    if let Ok(tensors) = crate::model::hf::load_safetensors_file(&path, &Device::Cpu) {
        for name in tensors.keys() {
            let _ = crate::adapter::load::normalize_key(name);
        }
    }
}

/// An `adapter_config.json` (PEFT's), read as `whet` reads an adapter directory.
pub fn adapter_config(bytes: &[u8]) {
    let Some(path) = scratch_file("adapter_config.json", bytes) else {
        return;
    };
    if let Some(dir) = path.parent() {
        let _ = crate::adapter::load::read_config(dir);
    }
}

/// A recipe's TOML text, parsed and validated.
pub fn recipe(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let _ = crate::recipe::Recipe::from_toml_str(text, Path::new("fuzz.toml"));
}

/// A plugin manifest (`plugin.toml`).
pub fn plugin_manifest(bytes: &[u8]) {
    let Some(path) = scratch_file("plugin.toml", bytes) else {
        return;
    };
    let _ = crate::plugin::Manifest::read(&path);
}
