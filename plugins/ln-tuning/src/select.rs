//! Which base parameters LN tuning trains: a pure function of the model's parameter names.

use whetstone_sdk::targets::ModuleSelector;
use whetstone_sdk::{Error, Result};

use crate::config::LnTuningConfig;

/// The base parameters LN tuning trains, each list in the model's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// The parameters of the targeted modules (a norm's weight, and its bias for LayerNorm).
    pub tuned: Vec<String>,
    /// The parameters of `modules_to_save` that are not targeted (a classification head).
    pub saved: Vec<String>,
}

impl Selection {
    /// Every selected name, in the model's order.
    pub fn names(&self, all: &[String]) -> Vec<String> {
        all.iter()
            .filter(|n| self.tuned.contains(n) || self.saved.contains(n))
            .cloned()
            .collect()
    }

    /// The targeted modules, in the model's order.
    pub fn modules(&self) -> Vec<&str> {
        let mut modules: Vec<&str> = self.tuned.iter().map(|n| module_of(n)).collect();
        modules.dedup();
        modules
    }
}

/// The module a parameter belongs to (`model.layers.0.input_layernorm.weight` →
/// `model.layers.0.input_layernorm`).
pub fn module_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(m, _)| m)
}

/// Whether parameter `name` belongs to one of `modules` (PEFT's `modules_to_save` rule: the
/// module's name equals an entry or ends with `.<entry>`).
pub fn saves_module(modules: &[String], name: &str) -> bool {
    let module = module_of(name);
    modules
        .iter()
        .any(|m| module == m || module.ends_with(&format!(".{m}")))
}

/// The distinct modules among `names` whose name mentions a norm, for error messages.
fn norm_modules(names: &[String]) -> String {
    let mut modules: Vec<&str> = names
        .iter()
        .map(|n| module_of(n))
        .filter(|m| m.to_ascii_lowercase().contains("norm"))
        .collect();
    modules.dedup();
    let mut shown: Vec<&str> = modules.iter().take(6).copied().collect();
    if modules.len() > 6 {
        shown.push("...");
    }
    if shown.is_empty() {
        "none".to_string()
    } else {
        shown.join(", ")
    }
}

/// The parameters LN tuning trains among `names` (a model of `architecture`): every parameter
/// of the modules `target_modules` (or `default`) selects and `exclude_modules` does not, and
/// every parameter of `modules_to_save` and of the default `heads`. No default, or targets that
/// select nothing, is an error.
pub fn select(
    cfg: &LnTuningConfig,
    default: Option<&ModuleSelector>,
    heads: &[String],
    names: &[String],
    architecture: &str,
) -> Result<Selection> {
    let Some(targets) = cfg.target_modules.as_ref().or(default) else {
        return Err(Error::config(format!(
            "target_modules is not set and there is no LN tuning default for {architecture}; \
             list the normalisation modules (here: {})",
            norm_modules(names)
        )));
    };
    let mut tuned = Vec::new();
    for name in names {
        let module = module_of(name);
        let excluded = match &cfg.exclude_modules {
            Some(exclude) => exclude.matches(module)?,
            None => false,
        };
        if !excluded && targets.matches(module)? {
            tuned.push(name.clone());
        }
    }
    if tuned.is_empty() {
        return Err(Error::config(format!(
            "target_modules / exclude_modules select no module of the {architecture} model; \
             its normalisation modules: {}",
            norm_modules(names)
        )));
    }
    let save: Vec<String> = cfg
        .modules_to_save
        .iter()
        .flatten()
        .chain(heads)
        .cloned()
        .collect();
    let saved = names
        .iter()
        .filter(|n| !tuned.contains(n) && saves_module(&save, n))
        .cloned()
        .collect();
    Ok(Selection { tuned, saved })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defaults::default_targets;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn llama() -> Vec<String> {
        let mut n = names(&["model.embed_tokens.weight"]);
        for i in 0..2 {
            for p in [
                "input_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.q_proj.bias",
                "post_attention_layernorm.weight",
                "mlp.down_proj.weight",
            ] {
                n.push(format!("model.layers.{i}.{p}"));
            }
        }
        n.extend(names(&["model.norm.weight", "lm_head.weight"]));
        n
    }

    fn cfg(json: &str) -> LnTuningConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn llama_default_tunes_every_norm_and_nothing_else() {
        let all = llama();
        let default = default_targets("LlamaForCausalLM");
        let s = select(&cfg("{}"), default.as_ref(), &[], &all, "Llama").unwrap();
        assert_eq!(
            s.tuned,
            names(&[
                "model.layers.0.input_layernorm.weight",
                "model.layers.0.post_attention_layernorm.weight",
                "model.layers.1.input_layernorm.weight",
                "model.layers.1.post_attention_layernorm.weight",
                "model.norm.weight",
            ])
        );
        assert!(s.saved.is_empty());
        assert_eq!(s.modules().len(), 5);
    }

    #[test]
    fn bert_layernorms_train_weight_and_bias_and_the_head_is_saved() {
        let all = names(&[
            "embeddings.word_embeddings.weight",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
            "encoder.layer.0.attention.output.dense.weight",
            "encoder.layer.0.attention.output.LayerNorm.weight",
            "encoder.layer.0.attention.output.LayerNorm.bias",
            "classifier.weight",
            "classifier.bias",
        ]);
        let default = default_targets("BertForSequenceClassification");
        let heads = names(&["classifier", "score"]);
        let s = select(&cfg("{}"), default.as_ref(), &heads, &all, "Bert").unwrap();
        assert_eq!(s.tuned.len(), 4);
        assert_eq!(s.saved, names(&["classifier.weight", "classifier.bias"]));
        assert_eq!(s.names(&all).len(), 6);
    }

    #[test]
    fn exclusions_apply_and_empty_or_missing_targets_are_errors() {
        let all = llama();
        let c = cfg(
            r#"{"target_modules": ["input_layernorm", "norm"], "exclude_modules": ".*\\.0\\..*"}"#,
        );
        let s = select(&c, None, &[], &all, "Llama").unwrap();
        assert_eq!(
            s.tuned,
            names(&["model.layers.1.input_layernorm.weight", "model.norm.weight"])
        );
        let err = select(&cfg("{}"), None, &[], &all, "GPT2LMHeadModel")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("target_modules") && err.contains("GPT2LMHeadModel"),
            "{err}"
        );
        let err = select(
            &cfg(r#"{"target_modules": ["ln_f"]}"#),
            None,
            &[],
            &all,
            "Llama",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("model.norm"), "{err}");
    }
}
