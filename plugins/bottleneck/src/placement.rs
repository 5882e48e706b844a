//! Where the adapters go when `target_modules` is not given: on the output projection of the
//! attention block (Houlsby's first adapter, AdapterHub's `mh_adapter`) and of the
//! feed-forward block (AdapterHub's `output_adapter`), recognised by Hugging Face module
//! names, matched on the full name's suffix:
//!
//! | family | attention output | feed-forward output |
//! | --- | --- | --- |
//! | BERT, RoBERTa (`BertModel` names) | `<i>.attention.output.dense` | `<i>.output.dense` |
//! | Llama, Mistral, Qwen2, Gemma, Phi-3 | `self_attn.o_proj` | `mlp.down_proj` |
//!
//! A BERT block has two modules called `output.dense`; the feed-forward one is the one whose
//! parent segment is the block index (`encoder.layer.3.output.dense`), never
//! `encoder.layer.3.attention.output.dense`.

use whetstone_sdk::targets::ModuleSelector;

/// Name suffixes (regular expressions) of attention output projections.
const ATTENTION_OUTPUTS: [&str; 2] = [r"self_attn\.o_proj", r"attention\.output\.dense"];

/// Name suffixes (regular expressions) of feed-forward output projections.
const FFN_OUTPUTS: [&str; 2] = [r"mlp\.down_proj", r"\d+\.output\.dense"];

/// The selector for the placements asked for, or `None` when neither is.
pub fn default_selector(attention: bool, ffn: bool) -> Option<ModuleSelector> {
    let mut suffixes: Vec<&str> = Vec::new();
    if attention {
        suffixes.extend(ATTENTION_OUTPUTS);
    }
    if ffn {
        suffixes.extend(FFN_OUTPUTS);
    }
    if suffixes.is_empty() {
        return None;
    }
    Some(ModuleSelector::Regex(format!(
        r"(.*\.)?({})",
        suffixes.join("|")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BERT: [&str; 6] = [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.0.output.dense",
        "pooler.dense",
    ];

    const LLAMA: [&str; 4] = [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    ];

    fn picked(selector: &ModuleSelector, names: &[&str]) -> Vec<String> {
        names
            .iter()
            .filter(|n| selector.matches(n).unwrap())
            .map(|n| n.to_string())
            .collect()
    }

    #[test]
    fn houlsby_takes_both_output_projections() {
        let s = default_selector(true, true).unwrap();
        assert_eq!(
            picked(&s, &BERT),
            [
                "encoder.layer.0.attention.output.dense",
                "encoder.layer.0.output.dense"
            ]
        );
        assert_eq!(
            picked(&s, &LLAMA),
            [
                "model.layers.1.self_attn.o_proj",
                "model.layers.1.mlp.down_proj"
            ]
        );
    }

    #[test]
    fn pfeiffer_takes_the_feed_forward_output_only() {
        let s = default_selector(false, true).unwrap();
        assert_eq!(picked(&s, &BERT), ["encoder.layer.0.output.dense"]);
        assert_eq!(
            picked(&s, &["roberta.encoder.layer.11.output.dense"]),
            ["roberta.encoder.layer.11.output.dense"]
        );
        assert_eq!(picked(&s, &LLAMA), ["model.layers.1.mlp.down_proj"]);
        let attention = default_selector(true, false).unwrap();
        assert_eq!(
            picked(&attention, &BERT),
            ["encoder.layer.0.attention.output.dense"]
        );
        assert!(default_selector(false, false).is_none());
    }
}
