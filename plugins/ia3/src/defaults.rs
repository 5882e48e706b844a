//! PEFT's default (IA)³ modules per model type: `TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`
//! and `TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING` (`peft.utils.constants`), for the
//! model types whose projections are `nn.Linear` (GPT-2 style `Conv1D` models are left out: they
//! need `fan_in_fan_out`, which this plugin refuses).

use whetstone_sdk::targets::ModuleSelector;

/// One row of PEFT's tables (keyed there by `model_type`, given beside each row): the
/// `config.json` class-name prefix (`Llama` of `LlamaForCausalLM`), the target modules and the
/// feedforward modules.
struct Row {
    class: &'static str,
    targets: &'static [&'static str],
    feedforward: &'static [&'static str],
}

const TABLE: &[Row] = &[
    Row {
        class: "T5", // PEFT model_type `t5`
        targets: &["k", "v", "wo"],
        feedforward: &["wo"],
    },
    Row {
        class: "MT5", // PEFT model_type `mt5`
        targets: &["k", "v", "wi_1"],
        feedforward: &[],
    },
    Row {
        class: "Bloom", // PEFT model_type `bloom`
        targets: &["query_key_value", "mlp.dense_4h_to_h"],
        feedforward: &["mlp.dense_4h_to_h"],
    },
    Row {
        class: "Roberta", // PEFT model_type `roberta`
        targets: &["key", "value", "output.dense"],
        feedforward: &["output.dense"],
    },
    Row {
        class: "OPT", // PEFT model_type `opt`
        targets: &["q_proj", "k_proj", "fc2"],
        feedforward: &["fc2"],
    },
    Row {
        class: "GPTJ", // PEFT model_type `gptj`
        targets: &["q_proj", "v_proj", "fc_out"],
        feedforward: &["fc_out"],
    },
    Row {
        class: "GPTNeoX", // PEFT model_type `gpt_neox`
        targets: &["query_key_value", "dense_4h_to_h"],
        feedforward: &["dense_4h_to_h"],
    },
    Row {
        class: "GPTNeo", // PEFT model_type `gpt_neo`
        targets: &["q_proj", "v_proj", "c_proj"],
        feedforward: &["c_proj"],
    },
    Row {
        class: "Bart", // PEFT model_type `bart`
        targets: &["q_proj", "v_proj", "fc2"],
        feedforward: &["fc2"],
    },
    Row {
        class: "Llama", // PEFT model_type `llama`
        targets: &["k_proj", "v_proj", "down_proj"],
        feedforward: &["down_proj"],
    },
    Row {
        class: "Llama4", // PEFT model_type `llama4`
        targets: &["q_proj", "v_proj", "down_proj"],
        feedforward: &["down_proj"],
    },
    Row {
        class: "Mistral", // PEFT model_type `mistral`
        targets: &["k_proj", "v_proj", "down_proj"],
        feedforward: &["down_proj"],
    },
    Row {
        class: "Mixtral", // PEFT model_type `mixtral`
        targets: &["k_proj", "v_proj", "w2"],
        feedforward: &["w2"],
    },
    Row {
        class: "Bert", // PEFT model_type `bert`
        targets: &["key", "value", "output.dense"],
        feedforward: &["output.dense"],
    },
    Row {
        class: "DebertaV2", // PEFT model_type `deberta-v2`
        targets: &["key_proj", "value_proj", "output.dense"],
        feedforward: &["output.dense"],
    },
    Row {
        class: "Deberta", // PEFT model_type `deberta`
        targets: &["in_proj", "output.dense"],
        feedforward: &["output.dense"],
    },
    Row {
        class: "Falcon", // PEFT model_type `falcon`
        targets: &["query_key_value", "dense_4h_to_h"],
        feedforward: &["dense_4h_to_h"],
    },
    Row {
        class: "Phi", // PEFT model_type `phi`
        targets: &["q_proj", "v_proj", "fc2"],
        feedforward: &["fc2"],
    },
    Row {
        class: "Gemma", // PEFT model_type `gemma`
        targets: &["q_proj", "v_proj", "down_proj"],
        feedforward: &["down_proj"],
    },
    Row {
        class: "Gemma2", // PEFT model_type `gemma2`
        targets: &["q_proj", "v_proj", "down_proj"],
        feedforward: &["down_proj"],
    },
    Row {
        class: "Qwen2", // PEFT model_type `qwen2`
        targets: &["q_proj", "v_proj", "down_proj"],
        feedforward: &["down_proj"],
    },
    Row {
        class: "Qwen3", // PEFT model_type `qwen3`
        targets: &["q_proj", "v_proj", "down_proj"],
        feedforward: &["down_proj"],
    },
];

/// The class-name prefix of an architecture: `Llama` of `LlamaForCausalLM`, `Bert` of
/// `BertModel`.
fn class_prefix(architecture: &str) -> &str {
    if let Some((prefix, _)) = architecture.split_once("For") {
        prefix
    } else {
        architecture.strip_suffix("Model").unwrap_or(architecture)
    }
}

fn row(architecture: &str) -> Option<&'static Row> {
    let class = class_prefix(architecture);
    TABLE.iter().find(|r| r.class == class)
}

fn selector(names: &[&str]) -> ModuleSelector {
    ModuleSelector::List(names.iter().map(|s| s.to_string()).collect())
}

/// PEFT's default `target_modules` for an architecture.
pub fn targets(architecture: &str) -> Option<ModuleSelector> {
    row(architecture).map(|r| selector(r.targets))
}

/// PEFT's default `feedforward_modules` for an architecture.
pub fn feedforward(architecture: &str) -> Option<ModuleSelector> {
    row(architecture).map(|r| selector(r.feedforward))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: Option<ModuleSelector>) -> Vec<String> {
        match s {
            Some(ModuleSelector::List(v)) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn llama_and_bert_follow_peft() {
        assert_eq!(
            names(targets("LlamaForCausalLM")),
            ["k_proj", "v_proj", "down_proj"]
        );
        assert_eq!(names(feedforward("LlamaForCausalLM")), ["down_proj"]);
        assert_eq!(
            names(targets("BertForSequenceClassification")),
            ["key", "value", "output.dense"]
        );
        assert_eq!(names(feedforward("BertModel")), ["output.dense"]);
        assert_eq!(
            names(targets("Qwen2ForCausalLM")),
            ["q_proj", "v_proj", "down_proj"]
        );
    }

    #[test]
    fn prefixes_match_whole_class_names_only() {
        assert_eq!(
            names(targets("Gemma2ForCausalLM")),
            ["q_proj", "v_proj", "down_proj"]
        );
        assert_eq!(names(feedforward("GPTNeoXForCausalLM")), ["dense_4h_to_h"]);
        assert_eq!(
            names(feedforward("MT5ForConditionalGeneration")),
            Vec::<String>::new()
        );
        assert!(targets("Phi3ForCausalLM").is_none());
        assert!(targets("GPT2LMHeadModel").is_none());
        assert!(targets("Unknown").is_none());
    }
}
