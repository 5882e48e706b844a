//! Which base parameters BitFit trains: a pure function of the model's parameter names.

use whetstone_sdk::targets::ModuleSelector;
use whetstone_sdk::{Error, LinearInfo, Result};

use crate::config::BitFitConfig;

/// The base parameters BitFit trains, each list in the model's order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// The bias vectors (`*.bias`) of the targeted modules.
    pub biases: Vec<String>,
    /// The other parameters of `modules_to_save` (a classification head's weight).
    pub saved: Vec<String>,
}

impl Selection {
    /// Every selected name, in the model's order.
    pub fn names(&self, all: &[String]) -> Vec<String> {
        all.iter()
            .filter(|n| self.biases.contains(n) || self.saved.contains(n))
            .cloned()
            .collect()
    }
}

/// The module a parameter belongs to (`encoder.layer.0.output.dense.bias` →
/// `encoder.layer.0.output.dense`).
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

/// Whether the bias of `module` trains under the config's target rules (every module when
/// `target_modules` is absent).
fn targeted(cfg: &BitFitConfig, module: &str) -> Result<bool> {
    let every = ModuleSelector::Regex(".*".into());
    let info = LinearInfo {
        name: module.to_string(),
        in_features: 0,
        out_features: 0,
        has_bias: true,
        layer_index: None,
    };
    cfg.targets.matches(&info, Some(&every))
}

/// A few names for an error message.
fn some(names: &[String]) -> String {
    let mut shown: Vec<&str> = names.iter().take(6).map(String::as_str).collect();
    if names.len() > 6 {
        shown.push("...");
    }
    shown.join(", ")
}

/// The parameters BitFit trains among `names` (a model of `architecture`): the targeted biases,
/// and every parameter of `modules_to_save` and of the default `heads`. A model without biases,
/// or targets that select none, is an error.
pub fn select(
    cfg: &BitFitConfig,
    heads: &[String],
    names: &[String],
    architecture: &str,
) -> Result<Selection> {
    let all_biases: Vec<String> = names
        .iter()
        .filter(|n| n.ends_with(".bias"))
        .cloned()
        .collect();
    if all_biases.is_empty() {
        return Err(Error::config(format!(
            "BitFit trains bias terms, and the {architecture} model has none (no parameter ends \
             in `.bias`; Llama-family models such as SmolLM2 have no biases): use kind = \
             \"ln-tuning\" or \"lora\" instead"
        )));
    }
    let mut biases = Vec::new();
    for name in &all_biases {
        if targeted(cfg, module_of(name))? {
            biases.push(name.clone());
        }
    }
    if biases.is_empty() {
        let modules: Vec<String> = all_biases
            .iter()
            .map(|n| module_of(n).to_string())
            .collect();
        return Err(Error::config(format!(
            "target_modules / exclude_modules leave no bias of the {architecture} model to \
             train; modules with a bias: {}",
            some(&modules)
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
        .filter(|n| !biases.contains(n) && saves_module(&save, n))
        .cloned()
        .collect();
    Ok(Selection { biases, saved })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bert_names() -> Vec<String> {
        let mut names = vec![
            "embeddings.word_embeddings.weight".to_string(),
            "embeddings.LayerNorm.weight".into(),
            "embeddings.LayerNorm.bias".into(),
        ];
        for i in 0..2 {
            for m in [
                "attention.self.query",
                "attention.self.value",
                "output.dense",
            ] {
                names.push(format!("encoder.layer.{i}.{m}.weight"));
                names.push(format!("encoder.layer.{i}.{m}.bias"));
            }
        }
        names.push("classifier.weight".into());
        names.push("classifier.bias".into());
        names
    }

    fn cfg(json: &str) -> BitFitConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn every_bias_trains_by_default_and_the_head_trains_whole() {
        let names = bert_names();
        let heads = vec!["classifier".to_string(), "score".to_string()];
        let s = select(&cfg("{}"), &heads, &names, "BertForSequenceClassification").unwrap();
        assert_eq!(s.biases.len(), 8);
        assert!(s.biases.iter().all(|n| n.ends_with(".bias")));
        assert_eq!(s.saved, vec!["classifier.weight".to_string()]);
        let all = s.names(&names);
        assert_eq!(all.len(), 9);
        assert_eq!(all.last().map(String::as_str), Some("classifier.bias"));
    }

    #[test]
    fn target_modules_restrict_the_biases_with_peft_rules() {
        let names = bert_names();
        let c = cfg(r#"{"target_modules": ["query"], "layers_to_transform": [1]}"#);
        let s = select(&c, &[], &names, "Bert").unwrap();
        assert_eq!(
            s.biases,
            vec!["encoder.layer.1.attention.self.query.bias".to_string()]
        );
        assert!(s.saved.is_empty());
        let c = cfg(r#"{"target_modules": ".*\\.self\\..*", "exclude_modules": ["value"]}"#);
        let s = select(&c, &[], &names, "Bert").unwrap();
        assert_eq!(s.biases.len(), 2);
        assert!(s.biases.iter().all(|n| n.contains("query")));
    }

    #[test]
    fn a_model_without_biases_or_an_empty_selection_is_a_clear_error() {
        let llama: Vec<String> = [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.input_layernorm.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let err = select(&cfg("{}"), &[], &llama, "LlamaForCausalLM")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("LlamaForCausalLM") && err.contains("ln-tuning") && err.contains("lora"),
            "{err}"
        );
        let err = select(
            &cfg(r#"{"target_modules": ["nope"]}"#),
            &[],
            &bert_names(),
            "Bert",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no bias") && err.contains("query"), "{err}");
    }
}
