//! `whet merge`: fold a PEFT adapter into its base model and write a Hugging Face model
//! directory that runs without the plugin (PEFT's `merge_and_unload` + `save_pretrained`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use candle_core::Tensor;
use clap::Args;
use whetstone_host::adapter;
use whetstone_host::model::gguf::{is_gguf, GgufFile};
use whetstone_host::model::load::LoadedModel;
use whetstone_host::model::Mode;
use whetstone_host::quant::requantize::{logit_error, requantize_linears};
use whetstone_host::quant::QuantFormat;

use crate::adapter_arg;
use crate::model_arg::ModelOptions;
use crate::quantize::Format;

/// The text whose logits measure what re-quantizing the merged model changes.
const PROBE: &str = "The service was quick and the food was excellent, but the room was too loud \
                     to talk. Would I come back? Probably yes.";

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
    /// After writing the f32 model, re-quantize the merged linear weights to this format and
    /// print the logit error that brings (merged f32 vs re-quantized, on a probe sentence); with
    /// a GGUF base and a ggml format, also write `OUT/merged-FORMAT.gguf` (the base file's
    /// metadata, the merged weights) for `[model] quantize = "keep"`.
    #[arg(long, value_enum)]
    requantize: Option<Format>,
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
    if let Some(format) = args.requantize {
        requantize(&loaded, format.quant_format(), &dir)?;
    }
    Ok(())
}

/// `--requantize`: quantizes the merged model's linear weights, reports the logit error and
/// writes the GGUF copy when the base is a GGUF file.
fn requantize(loaded: &LoadedModel, format: QuantFormat, out: &Path) -> Result<()> {
    let model = loaded.model.as_ref();
    let ids: Vec<u32> = loaded
        .tokenizer
        .encode(PROBE, true)
        .map_err(|e| anyhow!("tokenizing the probe sentence: {e}"))?
        .get_ids()
        .to_vec();
    let device = model
        .params()
        .iter()
        .next()
        .map(|p| p.device())
        .unwrap_or(candle_core::Device::Cpu);
    let ids = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
    let mask = ids.ones_like()?;
    let before = model.forward(&ids, &mask, Mode::Eval)?;
    let matrices = requantize_linears(model, format)?;
    let after = model.forward(&ids, &mask, Mode::Eval)?;
    let error = logit_error(&before, &after)?;
    eprintln!(
        "re-quantized {matrices} linear weights to {format}: logits change by {:.3e} on average, \
         {:.3e} at most (largest logit {:.3e}); the top token agrees at {:.1}% of {} positions",
        error.mean_abs,
        error.max_abs,
        error.reference_max_abs,
        100.0 * error.top1_agreement,
        error.positions
    );
    println!(
        "{}",
        serde_json::json!({"format": format.to_string(), "matrices": matrices, "logit_error": error})
    );
    if let QuantFormat::Ggml(dtype) = format {
        if is_gguf(&loaded.source) {
            let path = out.join(format!("merged-{format}.gguf"));
            let params = model.params();
            let value_of = |name: &str| params.get(name).ok().map(|p| p.tensor());
            GgufFile::open(&loaded.source)?
                .write_with_values(&path, dtype, &value_of)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("re-quantized model written to {}", path.display());
        }
    }
    Ok(())
}
