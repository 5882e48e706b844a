//! Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, with
//! PEFT's key names (`base_model.model.<module>.lora_A.weight`), so adapters move both ways
//! between Whetstone and Python PEFT.

mod save;

pub use save::{peft_key, save, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_KEY_PREFIX};
