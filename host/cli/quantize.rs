//! `whet quantize MODEL --to FORMAT`: how much a quantization format changes the model's linear
//! weights (mean and largest absolute error against f32, bits per value), and with `--out` a
//! GGUF copy of a GGUF model whose decoder linear weights are re-quantized to a ggml type, for
//! reuse as a QLoRA base (`[model] quantize = "keep"`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use clap::{Args, ValueEnum};
use whetstone_host::model::gguf::{is_gguf, GgufFile};
use whetstone_host::quant::report::round_trip;
use whetstone_host::quant::QuantFormat;

use crate::model_arg::ModelOptions;

/// The formats `whet quantize` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// NF4 with double quantization (made at load; no GGUF type).
    Nf4,
    /// ggml Q8_0: 8-bit, blocks of 32.
    #[value(name = "q8_0")]
    Q8_0,
    /// ggml Q4_0: 4-bit, blocks of 32, one scale.
    #[value(name = "q4_0")]
    Q4_0,
    /// ggml Q4_1: 4-bit, blocks of 32, scale and minimum.
    #[value(name = "q4_1")]
    Q4_1,
    /// ggml Q4_K: 4-bit k-quant, super-blocks of 256.
    #[value(name = "q4_k")]
    Q4K,
    /// ggml Q5_K: 5-bit k-quant, super-blocks of 256.
    #[value(name = "q5_k")]
    Q5K,
    /// ggml Q6_K: 6-bit k-quant, super-blocks of 256.
    #[value(name = "q6_k")]
    Q6K,
}

impl Format {
    /// The host's format.
    pub fn quant_format(self) -> QuantFormat {
        match self {
            Format::Nf4 => QuantFormat::Nf4,
            Format::Q8_0 => QuantFormat::Ggml(GgmlDType::Q8_0),
            Format::Q4_0 => QuantFormat::Ggml(GgmlDType::Q4_0),
            Format::Q4_1 => QuantFormat::Ggml(GgmlDType::Q4_1),
            Format::Q4K => QuantFormat::Ggml(GgmlDType::Q4K),
            Format::Q5K => QuantFormat::Ggml(GgmlDType::Q5K),
            Format::Q6K => QuantFormat::Ggml(GgmlDType::Q6K),
        }
    }
}

/// Options of `whet quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// A `.gguf` file, a Hugging Face model directory or `asset:NAME`.
    model: String,
    #[command(flatten)]
    options: ModelOptions,
    /// The formats to measure (repeatable; comma-separated works too).
    #[arg(long, value_enum, value_delimiter = ',', required = true)]
    to: Vec<Format>,
    /// Write a GGUF copy of MODEL (a GGUF file) with its decoder linear weights re-quantized to
    /// the one ggml format given in `--to`; metadata and the other tensors are copied as stored.
    #[arg(long, value_name = "FILE.gguf")]
    out: Option<PathBuf>,
}

/// Runs `whet quantize`: prints one JSON report per format, then writes `--out`.
pub fn run(args: QuantizeArgs) -> Result<()> {
    if args.out.is_some() && args.to.len() != 1 {
        bail!("--out writes one format: give exactly one --to");
    }
    let loaded = args.options.load(&args.model, 0)?;
    let mut reports = Vec::new();
    for format in &args.to {
        let report = round_trip(loaded.model.as_ref(), format.quant_format())
            .with_context(|| format!("quantizing {} to {:?}", args.model, format))?;
        eprintln!(
            "{}: {} matrices, mean |error| {:.3e} ({:.2}% of mean |w| {:.3e}), max {:.3e}, \
             {:.3} bits per value{}",
            report.format,
            report.matrices,
            report.mean_abs_error,
            100.0 * report.mean_abs_error / report.mean_abs_weight.max(f64::MIN_POSITIVE),
            report.mean_abs_weight,
            report.max_abs_error,
            report.bits_per_value,
            match &report.skip_reason {
                None => String::new(),
                Some(why) => format!(", {} skipped (e.g. {why})", report.skipped),
            }
        );
        reports.push(report);
    }
    println!("{}", serde_json::to_string_pretty(&reports)?);
    if let Some(out) = &args.out {
        let QuantFormat::Ggml(dtype) = args.to[0].quant_format() else {
            bail!(
                "NF4 has no GGUF type: a model is quantized to NF4 when it loads (`[model] \
                 quantize = \"nf4\"`); --out takes a ggml format (q8_0, q4_0, q4_1, q4_k, ...)"
            );
        };
        let source = loaded.source.clone();
        if !is_gguf(&source) {
            bail!(
                "--out re-quantizes a GGUF file, and {} is not one; quantize a Hugging Face \
                 directory at load instead (`[model] quantize = \"q8_0\"` or \"nf4\")",
                source.display()
            );
        }
        drop(loaded);
        let mut file = GgufFile::open(&source)?;
        let changed = file
            .write_requantized(out, dtype)
            .with_context(|| format!("writing {}", out.display()))?;
        eprintln!(
            "wrote {} ({changed} linear weights re-quantized to {dtype:?})",
            out.display()
        );
    }
    Ok(())
}
