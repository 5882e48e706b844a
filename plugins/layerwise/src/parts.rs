//! Which part of the model a parameter belongs to, read from its Hugging Face name, and the
//! parameters that train at a step.

use whetstone_sdk::{Error, Result};

use crate::config::LayerwiseConfig;
use crate::schedule::Plan;

/// Containers whose numbered children are the transformer blocks (`model.layers.N.` in Llama,
/// `encoder.layer.N.` in BERT, `transformer.h.N.` in GPT-2).
const BLOCK_CONTAINERS: [&str; 4] = ["layers", "layer", "h", "blocks"];
/// Head modules: sequence-classification heads and an untied causal-LM output layer.
const HEADS: [&str; 3] = ["classifier", "score", "lm_head"];
/// Final normalisations after the last block.
const FINAL_NORMS: [&str; 1] = ["model.norm"];
/// Embedding modules (Llama's token embeddings; BERT's word, position and token-type
/// embeddings and their LayerNorm).
const EMBEDDINGS: [&str; 2] = ["model.embed_tokens", "embeddings"];

/// The part of the model a parameter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Transformer block `N`.
    Block(usize),
    /// The head.
    Head,
    /// The final normalisation.
    FinalNorm,
    /// The embeddings.
    Embeddings,
    /// Anything else (never trained unless in `modules_to_save`).
    Other,
}

/// Whether `name` lies under module `module` (equal, or `module.` followed by more).
fn under(name: &str, module: &str) -> bool {
    name == module
        || name
            .strip_prefix(module)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// The block index in a parameter name: the number after the first block container
/// (`model.layers.3.self_attn.q_proj.weight` → 3).
pub fn block_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(3).find_map(|w| {
        if BLOCK_CONTAINERS.contains(&w[0]) {
            w[1].parse().ok()
        } else {
            None
        }
    })
}

/// The part parameter `name` belongs to.
pub fn part_of(name: &str) -> Part {
    if let Some(block) = block_index(name) {
        Part::Block(block)
    } else if HEADS.iter().any(|m| under(name, m)) {
        Part::Head
    } else if FINAL_NORMS.iter().any(|m| under(name, m)) {
        Part::FinalNorm
    } else if EMBEDDINGS.iter().any(|m| under(name, m)) {
        Part::Embeddings
    } else {
        Part::Other
    }
}

/// Whether parameter `name` belongs to one of `modules` (PEFT's `modules_to_save` rule: the
/// owning module's name equals an entry or ends with `.<entry>`).
fn saves_module(modules: &[String], name: &str) -> bool {
    let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
    modules
        .iter()
        .any(|m| module == m || module.ends_with(&format!(".{m}")))
}

/// The parameters among `names` that train once `step` optimizer steps are done: the blocks
/// the plan has unfrozen, the head, final norm and embeddings as configured, and
/// `modules_to_save`. A model whose names show no block is an error.
pub fn trained(
    cfg: &LayerwiseConfig,
    plan: &Plan,
    names: &[String],
    step: u64,
) -> Result<Vec<String>> {
    if !names.iter().any(|n| block_index(n).is_some()) {
        return Err(Error::config(format!(
            "no parameter name shows a transformer block (expected `model.layers.N.` or \
             `encoder.layer.N.`), so layer-wise fine-tuning cannot tell the blocks apart; \
             names start with: {}",
            names
                .iter()
                .take(4)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let save = cfg.modules_to_save.as_deref().unwrap_or(&[]);
    Ok(names
        .iter()
        .filter(|n| {
            saves_module(save, n)
                || match part_of(n) {
                    Part::Block(b) => plan.trains(b, step),
                    Part::Head => cfg.train_head,
                    Part::FinalNorm => cfg.train_final_norm,
                    Part::Embeddings => cfg.train_embeddings,
                    Part::Other => false,
                }
        })
        .cloned()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn llama() -> Vec<String> {
        let mut n = names(&["model.embed_tokens.weight"]);
        for i in 0..3 {
            n.push(format!("model.layers.{i}.self_attn.q_proj.weight"));
            n.push(format!("model.layers.{i}.input_layernorm.weight"));
        }
        n.extend(names(&["model.norm.weight", "lm_head.weight"]));
        n
    }

    fn cfg(json: &str) -> LayerwiseConfig {
        let c: LayerwiseConfig = serde_json::from_str(json).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn parts_follow_llama_and_bert_names() {
        assert_eq!(
            part_of("model.layers.12.mlp.down_proj.weight"),
            Part::Block(12)
        );
        assert_eq!(
            part_of("encoder.layer.5.output.LayerNorm.bias"),
            Part::Block(5)
        );
        assert_eq!(part_of("classifier.weight"), Part::Head);
        assert_eq!(part_of("score.weight"), Part::Head);
        assert_eq!(part_of("lm_head.weight"), Part::Head);
        assert_eq!(part_of("model.norm.weight"), Part::FinalNorm);
        assert_eq!(part_of("model.embed_tokens.weight"), Part::Embeddings);
        assert_eq!(part_of("embeddings.LayerNorm.weight"), Part::Embeddings);
        assert_eq!(part_of("model.normalizer.weight"), Part::Other);
        assert_eq!(block_index("model.layers.weight"), None);
    }

    #[test]
    fn gradual_schedule_trains_more_blocks_over_time() {
        let c = cfg(r#"{"schedule": "gradual", "unfreeze_every": 2}"#);
        let all = llama();
        let plan = Plan::new(&c, 3);
        let at0 = trained(&c, &plan, &all, 0).unwrap();
        assert_eq!(
            at0,
            names(&[
                "model.layers.2.self_attn.q_proj.weight",
                "model.layers.2.input_layernorm.weight",
                "model.norm.weight",
                "lm_head.weight",
            ])
        );
        assert_eq!(trained(&c, &plan, &all, 1).unwrap(), at0);
        assert_eq!(trained(&c, &plan, &all, 2).unwrap().len(), 6);
        assert_eq!(trained(&c, &plan, &all, 4).unwrap().len(), 8);
    }

    #[test]
    fn switches_and_modules_to_save_choose_the_rest() {
        let c = cfg(
            r#"{"schedule": "last_n", "last_n_layers": 0, "train_head": false,
                "train_final_norm": false, "train_embeddings": true,
                "modules_to_save": ["q_proj"]}"#,
        );
        let all = llama();
        let plan = Plan::new(&c, 3);
        let got = trained(&c, &plan, &all, 100).unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[0], "model.embed_tokens.weight");
        assert!(got[1..].iter().all(|n| n.ends_with("q_proj.weight")));
        let err = trained(&c, &plan, &names(&["weight", "bias"]), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.layers.N"), "{err}");
    }
}
