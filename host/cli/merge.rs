//! `whet merge`: fold a PEFT adapter into its base model and write a Hugging Face model
//! directory that runs without the plugin (PEFT's `merge_and_unload` + `save_pretrained`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use whetstone_host::adapter;

use crate::adapter_arg;
use crate::model_arg::ModelOptions;

/// Options of `whet merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model: a `.gguf` file, a Hugging Face model directory or `asset:NAME`.
    #[arg(long, short = 'm')]
    model: String,
    #[command(flatten)]
    options: ModelOptions,
    /// The PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,
    /// Where to write the merged model (config.json, model.safetensors, tokenizer files).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A plugin manifest (`plugin.toml` or its folder) searched before the plugin directory for
    /// the adapter's method; repeatable.
    #[arg(long = "plugin", value_name = "PATH")]
    plugins: Vec<PathBuf>,
}

/// Runs `whet merge`.
pub fn run(args: MergeArgs) -> Result<()> {
    let loaded = args.options.load(&args.model, 0)?;
    let model = loaded.model.as_ref();
    let method = adapter_arg::attach(model, &args.adapter, &args.plugins)?;
    adapter::merge(model, &method).context("merging the adapter")?;
    let dir = adapter::write_merged(&loaded, &args.out)
        .with_context(|| format!("writing the merged model to {}", args.out.display()))?;
    println!("merged model written to {}", dir.display());
    Ok(())
}
