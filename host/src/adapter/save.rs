//! Writing an attached method's parameters as a PEFT adapter directory.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::model::{Model, TaskKind};
use crate::plugin::method::MethodAdapter;
use crate::{Error, Result};

/// PEFT's adapter configuration file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before every key of a saved adapter.
pub const PEFT_KEY_PREFIX: &str = "base_model.model.";

/// The PEFT key of parameter `name` (our module naming) of `model`.
pub fn peft_key(model: &dyn Model, name: &str) -> String {
    format!("{PEFT_KEY_PREFIX}{}", model.checkpoint_name(name))
}

/// The segment under which PEFT's LN tuning saves its trained copy of a norm module
/// (`...input_layernorm.ln_tuning_layers.weight`).
pub const LN_TUNING_SEGMENT: &str = "ln_tuning_layers";

/// Whether base parameter `name` sits in one of the modules the method's configuration lists
/// in `modules_to_save` (PEFT matches a module by its name or a dotted suffix of it).
fn in_modules_to_save(method: &MethodAdapter, name: &str) -> bool {
    let Some((module, _)) = name.rsplit_once('.') else {
        return false;
    };
    method
        .config
        .get("modules_to_save")
        .and_then(Value::as_array)
        .is_some_and(|list| {
            list.iter()
                .filter_map(Value::as_str)
                .any(|m| module == m || module.ends_with(&format!(".{m}")))
        })
}

/// Whether base parameter `name` is a norm parameter trained by LN tuning (saved, as PEFT does,
/// under [`LN_TUNING_SEGMENT`] rather than as a `modules_to_save` module).
fn is_ln_tuned(method: &MethodAdapter, name: &str) -> bool {
    method.plugin.id() == "ln-tuning"
        && method.base_params().iter().any(|p| p.name() == name)
        && !in_modules_to_save(method, name)
}

/// The key parameter `name` of `method` has in an adapter file: its bare name for a
/// model-level parameter of the method (prompt tuning's `prompt_embeddings`), the
/// `ln_tuning_layers` key for a norm LN tuning trains, else its [`peft_key`].
pub fn file_key(model: &dyn Model, method: &MethodAdapter, name: &str) -> String {
    if method.is_model_level(name) {
        return name.to_string();
    }
    let key = peft_key(model, name);
    if is_ln_tuned(method, name) {
        if let Some((module, leaf)) = key.rsplit_once('.') {
            return format!("{module}.{LN_TUNING_SEGMENT}.{leaf}");
        }
    }
    key
}

/// PEFT's `task_type` for the model's task.
fn task_type(model: &dyn Model) -> &'static str {
    match model.task() {
        TaskKind::CausalLm => "CAUSAL_LM",
        TaskKind::SequenceClassification { .. } => "SEQ_CLS",
    }
}

/// PEFT's `peft_type` for a plugin id: upper case with `-` as `_` (`prompt-tuning` →
/// `PROMPT_TUNING`), the inverse of [`super::load::plugin_id`].
pub fn peft_type(plugin_id: &str) -> String {
    plugin_id.to_uppercase().replace('-', "_")
}

/// The modules of which `trained` holds every parameter, sorted: PEFT's
/// `modules_to_save`. A module the method trains only in part (BitFit's biases) is left out: the
/// method selects those parts again from its own configuration when the adapter is loaded, while
/// listing it would make the whole module train and the loader look for all its tensors.
fn whole_modules(
    model: &dyn Model,
    trained: &[std::sync::Arc<crate::params::Param>],
) -> Vec<String> {
    let trained: std::collections::HashSet<&str> = trained.iter().map(|p| p.name()).collect();
    let mut modules: Vec<String> = Vec::new();
    for name in &trained {
        let Some((module, _)) = name.rsplit_once('.') else {
            continue;
        };
        if modules.iter().any(|m| m == module) {
            continue;
        }
        let prefix = format!("{module}.");
        let whole = model
            .params()
            .iter()
            .filter(|p| p.name().starts_with(&prefix))
            .all(|p| trained.contains(p.name()));
        if whole {
            modules.push(module.to_string());
        }
    }
    modules.sort();
    modules
}

/// Writes `method`'s parameters (and the base parameters it trains, e.g. `modules_to_save`) and
/// its configuration to `dir` as PEFT does. `base_model` goes to `base_model_name_or_path`.
pub fn save(model: &dyn Model, method: &MethodAdapter, base_model: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = HashMap::new();
    for p in method.params().iter().chain(&method.base_params()) {
        let t = p
            .tensor()
            .detach()
            .to_device(&candle_core::Device::Cpu)?
            .contiguous()?;
        tensors.insert(file_key(model, method, p.name()), t);
    }
    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    candle_core::safetensors::save(&tensors, &weights)?;

    let mut config: Map<String, Value> = match &method.config {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    let mut set_default = |k: &str, v: Value| {
        config.entry(k.to_string()).or_insert(v);
    };
    set_default("peft_type", Value::from(peft_type(method.plugin.id())));
    set_default("task_type", Value::from(task_type(model)));
    set_default("base_model_name_or_path", Value::from(base_model));
    set_default("inference_mode", Value::Bool(true));
    // LN tuning's norms are saved under `ln_tuning_layers`, not as modules to save.
    let saved_whole: Vec<_> = method
        .base_params()
        .into_iter()
        .filter(|p| !is_ln_tuned(method, p.name()))
        .collect();
    if !saved_whole.is_empty() && !config.contains_key("modules_to_save") {
        let modules = whole_modules(model, &saved_whole);
        if !modules.is_empty() {
            config.insert("modules_to_save".into(), Value::from(modules));
        }
    }
    let text = serde_json::to_string_pretty(&Value::Object(config))
        .map_err(|e| Error::config(format!("cannot write the adapter config: {e}")))?;
    let path = dir.join(ADAPTER_CONFIG_FILE);
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    Ok(())
}
