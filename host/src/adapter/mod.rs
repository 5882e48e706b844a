//! Hugging Face PEFT adapter files: `adapter_config.json` + `adapter_model.safetensors`, with
//! PEFT's key names (`base_model.model.<module>.lora_A.weight`), so adapters move both ways
//! between Whetstone and Python PEFT.
//!
//! - [`save()`]: an attached method's parameters and config written as PEFT does;
//! - [`load()`]: an adapter directory attached to a model through its method plugin;
//! - [`AdapterSet`]: several adapters on one model, switched by name;
//! - [`merge()`] / [`write_merged`]: an adapter folded into the base weights and the result
//!   written as a Hugging Face model directory.

pub mod load;
mod merge;
pub mod save;
mod set;

pub use load::{load, read_config, AdapterConfig, DEFAULT_ADAPTER_NAME};
pub use merge::{merge, write_merged, MERGED_WEIGHTS_FILE};
pub use save::{
    peft_key, peft_type, save, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_KEY_PREFIX,
};
pub use set::AdapterSet;
