//! PEFT's default LN tuning targets per model type
//! (`TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING`), for the architectures the host
//! runs, plus BERT's `LayerNorm` modules, for which PEFT has no default.

use whetstone_sdk::targets::ModuleSelector;

fn list(names: &[&str]) -> ModuleSelector {
    ModuleSelector::List(names.iter().map(|s| s.to_string()).collect())
}

/// The default `target_modules` for a `config.json` architecture, `None` when neither PEFT nor
/// Whetstone has one:
///
/// - Llama, Mistral, Gemma: `input_layernorm`, `post_attention_layernorm`, `norm` (PEFT's);
/// - Qwen2, Qwen3: `post_attention_layernorm` (PEFT's);
/// - BERT, RoBERTa: `LayerNorm` (the embedding LayerNorm and both LayerNorms of every block).
///   This one is Whetstone's: PEFT has no LN tuning default for BERT and asks for
///   `target_modules`, so a recipe meant for Python too should write it out.
pub fn default_targets(architecture: &str) -> Option<ModuleSelector> {
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| architecture.starts_with(p));
    if starts(&["Qwen2", "Qwen3"]) {
        Some(list(&["post_attention_layernorm"]))
    } else if starts(&["Llama", "Mistral", "Gemma"]) {
        Some(list(&[
            "input_layernorm",
            "post_attention_layernorm",
            "norm",
        ]))
    } else if starts(&["Bert", "Roberta", "XLMRoberta"]) {
        Some(list(&["LayerNorm"]))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_and_bert_have_defaults_and_others_do_not() {
        let llama = default_targets("LlamaForCausalLM").unwrap();
        assert!(llama.matches("model.layers.3.input_layernorm").unwrap());
        assert!(llama.matches("model.norm").unwrap());
        assert!(!llama.matches("model.layers.3.self_attn.q_norm").unwrap());
        let bert = default_targets("BertForSequenceClassification").unwrap();
        assert!(bert.matches("encoder.layer.0.output.LayerNorm").unwrap());
        assert!(bert.matches("embeddings.LayerNorm").unwrap());
        assert!(!bert.matches("encoder.layer.0.output.dense").unwrap());
        assert!(default_targets("GPT2LMHeadModel").is_none());
    }
}
