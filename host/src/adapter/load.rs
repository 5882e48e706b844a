//! Loading a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) onto a
//! model: the config's `peft_type` names the method plugin (`LORA` → `lora`), the plugin is
//! attached with the config as PEFT wrote it, and every parameter it creates is then overwritten
//! with the file's tensor, as are the base parameters the method trains (`modules_to_save`).
//!
//! Keys are matched as PEFT writes them (`base_model.model.<checkpoint name>`), also accepting
//! the in-memory forms PEFT uses before it strips the adapter name
//! (`...q_proj.lora_A.default.weight`, `...classifier.modules_to_save.default.weight`). A key
//! that matches no parameter, or a parameter without a key, is an error that names them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::Value;

use super::save::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_KEY_PREFIX};
use crate::model::Model;
use crate::params::Param;
use crate::plugin::method::MethodAdapter;
use crate::plugin::{discover, Plugin, TransportKind};
use crate::{Error, Result};

/// The adapter name PEFT uses when none is given.
pub const DEFAULT_ADAPTER_NAME: &str = "default";

/// How many names an error lists before it says "and N more".
const NAMES_SHOWN: usize = 12;

/// An adapter directory's `adapter_config.json`.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// PEFT's `peft_type` (`LORA`, `IA3`, ...).
    pub peft_type: String,
    /// The id of the plugin that implements it (see [`plugin_id`]).
    pub plugin_id: String,
    /// The whole file, handed to the plugin as its configuration.
    pub json: Value,
}

/// The plugin id of a PEFT method: `peft_type` in lower case with `_` as `-` (`LORA` → `lora`,
/// `PROMPT_TUNING` → `prompt-tuning`). DoRA is LoRA with `use_dora: true`, so it stays `lora`.
pub fn plugin_id(peft_type: &str) -> String {
    peft_type.to_lowercase().replace('_', "-")
}

/// Reads `dir/adapter_config.json`.
pub fn read_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    if !path.is_file() {
        return Err(Error::bad_file(
            &path,
            "not found: a PEFT adapter directory holds adapter_config.json and \
             adapter_model.safetensors",
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&path, format!("invalid JSON: {e}")))?;
    if !json.is_object() {
        return Err(Error::bad_file(&path, "must hold a JSON object"));
    }
    let peft_type = json
        .get("peft_type")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::bad_file(&path, "has no `peft_type` string (e.g. \"LORA\")"))?
        .to_string();
    Ok(AdapterConfig {
        plugin_id: plugin_id(&peft_type),
        peft_type,
        json,
    })
}

/// The path of `dir`'s weights file; a PyTorch `adapter_model.bin` is refused by name.
pub fn weights_path(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    if path.is_file() {
        return Ok(path);
    }
    let bin = dir.join("adapter_model.bin");
    if bin.is_file() {
        return Err(Error::bad_file(
            &bin,
            "PyTorch pickle adapters are not read (they can run code); re-save the adapter with \
             safetensors: `PeftModel.from_pretrained(...).save_pretrained(DIR, \
             safe_serialization=True)`",
        ));
    }
    Err(Error::bad_file(
        &path,
        "not found: a PEFT adapter directory holds adapter_config.json and adapter_model.safetensors",
    ))
}

/// The parameter key a file key stands for: `base_model.model.` removed, and PEFT's in-memory
/// segments (`.default.` adapter name, `.modules_to_save.`, LN tuning's `.ln_tuning_layers.`)
/// dropped. `None` without the prefix.
pub fn normalize_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix(PEFT_KEY_PREFIX)?;
    let parts: Vec<&str> = rest
        .split('.')
        .filter(|p| {
            *p != DEFAULT_ADAPTER_NAME
                && *p != "modules_to_save"
                && *p != super::save::LN_TUNING_SEGMENT
        })
        .collect();
    Some(parts.join("."))
}

/// A list of names for an error message, cut after [`NAMES_SHOWN`].
fn name_list(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(NAMES_SHOWN).map(String::as_str).collect();
    let more = names.len().saturating_sub(NAMES_SHOWN);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Overwrites `adapter`'s parameters (and the base parameters it trains) with `tensors`, keyed
/// as in a PEFT file. `path` names the file in errors.
pub fn apply_weights(
    model: &dyn Model,
    adapter: &MethodAdapter,
    tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<()> {
    // Keyed by the file key without PEFT's prefix; model-level parameters have none.
    let mut wanted: BTreeMap<String, Arc<Param>> = BTreeMap::new();
    let mut bare = Vec::new();
    for p in adapter.params().iter().chain(&adapter.base_params()) {
        if adapter.is_model_level(p.name()) {
            bare.push(p.name().to_string());
            wanted.insert(p.name().to_string(), p.clone());
        } else {
            wanted.insert(model.checkpoint_name(p.name()), p.clone());
        }
    }
    let mut found: BTreeMap<String, (String, Tensor)> = BTreeMap::new();
    let mut unmatched = Vec::new();
    for (key, tensor) in tensors {
        let name = if bare.contains(&key) {
            Some(key.clone())
        } else {
            normalize_key(&key)
        };
        match name {
            Some(name) if wanted.contains_key(&name) => {
                if let Some((other, _)) = found.get(&name) {
                    return Err(Error::bad_file(
                        path,
                        format!("`{key}` and `{other}` both hold parameter `{name}`"),
                    ));
                }
                found.insert(name, (key, tensor));
            }
            _ => unmatched.push(key),
        }
    }
    unmatched.sort();
    let missing: Vec<String> = wanted
        .keys()
        .filter(|k| !found.contains_key(*k))
        .map(|k| {
            if bare.contains(k) {
                k.clone()
            } else {
                format!("{PEFT_KEY_PREFIX}{k}")
            }
        })
        .collect();
    if !unmatched.is_empty() || !missing.is_empty() {
        let mut parts = Vec::new();
        if !unmatched.is_empty() {
            parts.push(format!(
                "keys that match no parameter of the `{}` adapter on this {} model: {}",
                adapter.plugin.id(),
                model.architecture(),
                name_list(&unmatched)
            ));
        }
        if !missing.is_empty() {
            parts.push(format!(
                "parameters missing from the file: {}",
                name_list(&missing)
            ));
        }
        return Err(Error::bad_file(
            path,
            format!(
                "{} (was the adapter trained on this model, with this config?)",
                parts.join("; ")
            ),
        ));
    }
    for (name, (key, tensor)) in found {
        if let Some(param) = wanted.get(&name) {
            param.set_value(&tensor).map_err(|e| {
                Error::bad_file(path, format!("`{key}` does not fit `{name}`: {e}"))
            })?;
        }
    }
    Ok(())
}

/// Attaches an already loaded `plugin` under `name` with the adapter in `dir`, then sets its
/// weights from the file. On failure the model's hooks are removed.
pub fn load_with_plugin(
    model: &dyn Model,
    dir: &Path,
    name: &str,
    plugin: Plugin,
) -> Result<Arc<MethodAdapter>> {
    let config = read_config(dir)?;
    if plugin.id() != config.plugin_id {
        return Err(Error::config(format!(
            "{}: peft_type `{}` needs plugin `{}`, not `{}`",
            dir.join(ADAPTER_CONFIG_FILE).display(),
            config.peft_type,
            config.plugin_id,
            plugin.id()
        )));
    }
    let path = weights_path(dir)?;
    let tensors = crate::model::hf::load_safetensors_file(&path, &Device::Cpu)?;
    let adapter =
        MethodAdapter::attach(model, plugin, name, config.json, 0).map_err(|e| match e {
            Error::Config(m) => {
                Error::config(format!("{}: {m}", dir.join(ADAPTER_CONFIG_FILE).display()))
            }
            other => other,
        })?;
    if let Err(e) = apply_weights(model, &adapter, tensors, &path) {
        MethodAdapter::deactivate(model);
        return Err(e);
    }
    tracing::info!(
        adapter = name,
        dir = %dir.display(),
        plugin = adapter.plugin.id(),
        modules = adapter.wrapped_modules().len(),
        "PEFT adapter loaded"
    );
    Ok(adapter)
}

/// Finds the plugin for the adapter in `dir` (searching the manifests in `plugins` first, see
/// [`discover::find`]) and loads it with `transport`.
pub fn find_plugin(dir: &Path, plugins: &[PathBuf], transport: TransportKind) -> Result<Plugin> {
    let config = read_config(dir)?;
    let manifest = discover::find(&config.plugin_id, plugins)?;
    Plugin::load(&manifest, transport)
}

/// Loads the PEFT adapter in `dir` onto `model` under `name` and activates it: finds its method
/// plugin (`plugins` are searched first), attaches it and sets its weights from the file.
pub fn load(
    model: &dyn Model,
    dir: &Path,
    name: &str,
    plugins: &[PathBuf],
) -> Result<Arc<MethodAdapter>> {
    let plugin = find_plugin(dir, plugins, TransportKind::Auto)?;
    load_with_plugin(model, dir, name, plugin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_types_map_to_plugin_ids() {
        assert_eq!(plugin_id("LORA"), "lora");
        assert_eq!(plugin_id("PROMPT_TUNING"), "prompt-tuning");
        assert_eq!(plugin_id("IA3"), "ia3");
        for id in ["lora", "prompt-tuning", "ia3", "ln-tuning"] {
            assert_eq!(plugin_id(&crate::adapter::save::peft_type(id)), id);
        }
    }

    #[test]
    fn keys_drop_the_prefix_and_peft_in_memory_segments() {
        let k = |s: &str| normalize_key(s);
        assert_eq!(
            k("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").as_deref(),
            Some("model.layers.0.self_attn.q_proj.lora_A.weight")
        );
        assert_eq!(
            k("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight").as_deref(),
            Some("model.layers.0.self_attn.q_proj.lora_B.weight")
        );
        assert_eq!(
            k("base_model.model.classifier.modules_to_save.default.weight").as_deref(),
            Some("classifier.weight")
        );
        assert_eq!(
            k("base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight").as_deref(),
            Some("model.layers.0.input_layernorm.weight")
        );
        assert_eq!(
            k("base_model.model.classifier.modules_to_save.bias").as_deref(),
            Some("classifier.bias")
        );
        assert_eq!(k("model.layers.0.q_proj.lora_A.weight"), None);
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_config(dir.path()).unwrap_err().to_string();
        assert!(err.contains("adapter_config.json"), "{err}");
        std::fs::write(dir.path().join("adapter_config.json"), "{\"r\": 4}").unwrap();
        let err = read_config(dir.path()).unwrap_err().to_string();
        assert!(err.contains("peft_type"), "{err}");
        std::fs::write(dir.path().join("adapter_model.bin"), b"pickle").unwrap();
        let err = weights_path(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("adapter_model.bin") && err.contains("safetensors"),
            "{err}"
        );
    }

    #[test]
    fn name_lists_are_cut() {
        let names: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
        let text = name_list(&names);
        assert!(
            text.ends_with("and 8 more") && text.starts_with("k0, k1"),
            "{text}"
        );
    }
}
