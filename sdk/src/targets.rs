//! Hugging Face PEFT's rules for choosing modules: `target_modules`, `exclude_modules`,
//! `layers_to_transform` / `layers_pattern`, and `rank_pattern` / `alpha_pattern` lookups, with
//! PEFT's exact semantics (`peft.tuners.tuners_utils.check_target_module_exists`).

use std::collections::BTreeMap;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::types::LinearInfo;
use crate::{Error, Result};

/// `target_modules` / `exclude_modules`: a list of names (a module matches when its name equals
/// one or ends with `.<name>`), or one regular expression that must match the whole name.
/// The string `"all-linear"` selects every linear module except the output layer (`lm_head`)
/// and the classification head (`classifier`, `score`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSelector {
    /// Names matched exactly or as a dotted suffix.
    List(Vec<String>),
    /// A regular expression over the full name, or `"all-linear"`.
    Regex(String),
}

/// PEFT's `layers_to_transform`: one index or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// One layer.
    One(usize),
    /// Several layers.
    Many(Vec<usize>),
}

/// PEFT's `layers_pattern`: one name or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    /// One container name (`layers`, `h`, `layer`, ...).
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// Output and head modules `"all-linear"` leaves out.
const HEAD_MODULES: [&str; 3] = ["lm_head", "classifier", "score"];

fn full_match(pattern: &str, text: &str) -> Result<bool> {
    let re = Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| Error::config(format!("invalid module regex `{pattern}`: {e}")))?;
    Ok(re.is_match(text))
}

fn suffix_match(names: &[String], key: &str) -> bool {
    names
        .iter()
        .any(|n| key == n || key.ends_with(&format!(".{n}")))
}

impl ModuleSelector {
    /// Whether module `key` is selected.
    pub fn matches(&self, key: &str) -> Result<bool> {
        match self {
            ModuleSelector::Regex(s) if s == "all-linear" => Ok(!HEAD_MODULES
                .iter()
                .any(|h| key == *h || key.starts_with(&format!("{h}.")))),
            ModuleSelector::Regex(pattern) => full_match(pattern, key),
            ModuleSelector::List(names) => Ok(suffix_match(names, key)),
        }
    }
}

/// The layer index PEFT reads from a module name: the number after `.<pattern>.`, or after any
/// `.<container>.` when no pattern is given.
fn layer_index(key: &str, pattern: Option<&LayersPattern>) -> Option<usize> {
    let patterns: Vec<String> = match pattern {
        None => vec!["[^.]*".to_string()],
        Some(LayersPattern::One(p)) => vec![regex::escape(p)],
        Some(LayersPattern::Many(ps)) if ps.is_empty() => vec!["[^.]*".to_string()],
        Some(LayersPattern::Many(ps)) => ps.iter().map(|p| regex::escape(p)).collect(),
    };
    patterns.iter().find_map(|p| {
        let re = Regex::new(&format!(r"^.*\.{p}\.(\d+)\.")).ok()?;
        re.captures(key)?.get(1)?.as_str().parse().ok()
    })
}

/// Which linear modules a method wraps, as PEFT configures it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetSpec {
    /// `target_modules`; `None` uses the model type's default (see [`default_targets`]).
    #[serde(default)]
    pub target_modules: Option<ModuleSelector>,
    /// `exclude_modules`.
    #[serde(default)]
    pub exclude_modules: Option<ModuleSelector>,
    /// `layers_to_transform`.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// `layers_pattern`.
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
}

impl TargetSpec {
    /// Whether `linear` is targeted. `default` stands in for an absent `target_modules`.
    pub fn matches(&self, linear: &LinearInfo, default: Option<&ModuleSelector>) -> Result<bool> {
        let key = linear.name.as_str();
        let Some(targets) = self.target_modules.as_ref().or(default) else {
            return Err(Error::config(
                "target_modules is not set and there is no default for this model type; \
                 list module names (e.g. [\"q_proj\", \"v_proj\"]) or use \"all-linear\"",
            ));
        };
        if let Some(exclude) = &self.exclude_modules {
            if exclude.matches(key)? {
                return Ok(false);
            }
        }
        if !targets.matches(key)? {
            return Ok(false);
        }
        let Some(layers) = &self.layers_to_transform else {
            return Ok(true);
        };
        Ok(match layer_index(key, self.layers_pattern.as_ref()) {
            None => false,
            Some(i) => match layers {
                LayerIndices::One(l) => i == *l,
                LayerIndices::Many(ls) => ls.contains(&i),
            },
        })
    }
}

/// PEFT's default LoRA targets for an architecture (its
/// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`): query and value projections.
pub fn default_targets(architecture: &str) -> Option<ModuleSelector> {
    let names: &[&str] = if architecture.starts_with("Bert") || architecture.starts_with("Roberta")
    {
        &["query", "value"]
    } else if ["Llama", "Mistral", "Qwen2", "Gemma", "Phi3"]
        .iter()
        .any(|a| architecture.starts_with(a))
    {
        &["q_proj", "v_proj"]
    } else {
        return None;
    };
    Some(ModuleSelector::List(
        names.iter().map(|s| s.to_string()).collect(),
    ))
}

/// PEFT's per-module override lookup for `rank_pattern` / `alpha_pattern`: the first pattern
/// equal to `key` or matching it as `(.*\.)?(<pattern>)$`.
pub fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, key: &str) -> Result<Option<T>> {
    for (pattern, value) in patterns {
        if pattern == key {
            return Ok(Some(*value));
        }
        let re = Regex::new(&format!(r"^(.*\.)?(?:{pattern})$"))
            .map_err(|e| Error::config(format!("invalid pattern `{pattern}`: {e}")))?;
        if re.is_match(key) {
            return Ok(Some(*value));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> LinearInfo {
        LinearInfo {
            name: name.into(),
            in_features: 4,
            out_features: 4,
            has_bias: false,
            layer_index: None,
        }
    }

    fn list(names: &[&str]) -> ModuleSelector {
        ModuleSelector::List(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn list_matches_exact_names_and_dotted_suffixes_only() {
        let spec = TargetSpec {
            target_modules: Some(list(&["q_proj", "v_proj"])),
            ..Default::default()
        };
        let yes = info("model.layers.0.self_attn.q_proj");
        let no = info("model.layers.0.self_attn.qq_proj");
        assert!(spec.matches(&yes, None).unwrap());
        assert!(!spec.matches(&no, None).unwrap());
    }

    #[test]
    fn regex_must_match_the_whole_name() {
        let spec = TargetSpec {
            target_modules: Some(ModuleSelector::Regex(r".*\.(q|v)_proj".into())),
            ..Default::default()
        };
        assert!(spec
            .matches(&info("model.layers.3.self_attn.v_proj"), None)
            .unwrap());
        assert!(!spec
            .matches(&info("model.layers.3.self_attn.v_proj.x"), None)
            .unwrap());
    }

    #[test]
    fn all_linear_skips_heads_and_exclusions_win() {
        let spec = TargetSpec {
            target_modules: Some(ModuleSelector::Regex("all-linear".into())),
            exclude_modules: Some(list(&["down_proj"])),
            ..Default::default()
        };
        assert!(spec
            .matches(&info("model.layers.0.mlp.up_proj"), None)
            .unwrap());
        assert!(!spec
            .matches(&info("model.layers.0.mlp.down_proj"), None)
            .unwrap());
        assert!(!spec.matches(&info("lm_head"), None).unwrap());
        assert!(!spec.matches(&info("classifier"), None).unwrap());
    }

    #[test]
    fn layers_to_transform_reads_the_block_index() {
        let spec = TargetSpec {
            target_modules: Some(list(&["query"])),
            layers_to_transform: Some(LayerIndices::Many(vec![1, 3])),
            layers_pattern: Some(LayersPattern::One("layer".into())),
            ..Default::default()
        };
        assert!(spec
            .matches(&info("encoder.layer.3.attention.self.query"), None)
            .unwrap());
        assert!(!spec
            .matches(&info("encoder.layer.2.attention.self.query"), None)
            .unwrap());
        let any = TargetSpec {
            layers_pattern: None,
            ..spec
        };
        assert!(any
            .matches(&info("encoder.layer.1.attention.self.query"), None)
            .unwrap());
    }

    #[test]
    fn missing_targets_fall_back_to_the_default_or_fail() {
        let spec = TargetSpec::default();
        let q = info("model.layers.0.self_attn.q_proj");
        let default = default_targets("LlamaForCausalLM");
        assert!(spec.matches(&q, default.as_ref()).unwrap());
        assert!(spec.matches(&q, None).is_err());
    }

    #[test]
    fn pattern_lookup_follows_peft() {
        let mut ranks = BTreeMap::new();
        ranks.insert("layers.0.self_attn.q_proj".to_string(), 4usize);
        assert_eq!(
            pattern_value(&ranks, "model.layers.0.self_attn.q_proj").unwrap(),
            Some(4)
        );
        assert_eq!(
            pattern_value(&ranks, "model.layers.10.self_attn.q_proj").unwrap(),
            None
        );
    }
}
