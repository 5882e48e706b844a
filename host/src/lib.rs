//! # whetstone-host
//!
//! The native host of Whetstone: it owns the pretrained model, the tensors (candle), autograd and
//! the training loop. PEFT methods, losses and data loaders plug into it (see `DESIGN.md`).
//!
//! Module map:
//! - [`params`]: named parameters that are frozen or trainable, selected by name patterns;
//! - [`ops`]: differentiable operations whose backward is proven by finite-difference tests;
//! - [`quant`]: quantized frozen weight matrices (NF4, ggml blocks), the base of QLoRA;
//! - [`model`]: the model architectures the host owns (Llama family, BERT family), loaders and
//!   generation;
//! - [`data`]: records, tokenization, masking, batching;
//! - [`train`]: optimizer, schedules, checkpoints, metrics and the training loop;
//! - [`recipe`]: the TOML recipe that describes a fine-tuning run;
//! - [`assets`]: fetching and verifying the real models and datasets;
//! - [`plugin`]: PEFT methods, losses and data loaders as native or WebAssembly plugins;
//! - [`bench`](mod@bench): measured figures (step time, tokens/s, peak RSS);
//! - [`session`]: an open session for programs that embed the host (the C ABI builds on it);
//! - [`fuzzing`]: the readers of untrusted files, as fuzz targets take them.

pub mod adapter;
pub mod assets;
pub mod bench;
pub mod data;
pub mod device;
pub mod error;
pub mod fuzzing;
pub mod model;
pub mod ops;
pub mod params;
pub mod plugin;
pub mod quant;
pub mod recipe;
pub mod session;
pub mod train;

pub use error::{Error, Result};
