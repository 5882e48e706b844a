//! `whet inspect MODEL`: architecture, parameter count, layers and the linear module names a
//! PEFT method can target.

use std::collections::BTreeSet;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use whetstone_host::model::load::LoadedModel;

use crate::model_arg::ModelOptions;

/// Options of `whet inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A `.gguf` file, a Hugging Face model directory or `asset:NAME`.
    model: String,
    #[command(flatten)]
    options: ModelOptions,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also list every parameter with its shape.
    #[arg(long)]
    params: bool,
}

/// One parameter in the report.
#[derive(Debug, Serialize)]
struct ParamInfo {
    name: String,
    shape: Vec<usize>,
}

/// What `whet inspect` reports.
#[derive(Debug, Serialize)]
struct Report {
    source: String,
    architecture: String,
    task: String,
    total_params: usize,
    num_layers: usize,
    vocab_size: usize,
    max_positions: usize,
    /// Distinct last components of the linear module names (what `target_modules` lists).
    target_modules: Vec<String>,
    linear_modules: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<Vec<ParamInfo>>,
}

/// The number of transformer blocks: distinct indices after `layers.` / `layer.` in names.
fn count_layers<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    let mut layers = BTreeSet::new();
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        for pair in parts.windows(2) {
            if matches!(pair[0], "layers" | "layer" | "h" | "blocks") {
                if let Ok(i) = pair[1].parse::<usize>() {
                    layers.insert(i);
                }
            }
        }
    }
    layers.len()
}

/// `22713216` → `22.71M`.
pub fn human_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Builds the report of a loaded model.
fn report(loaded: &LoadedModel, with_params: bool) -> Report {
    let model = &loaded.model;
    let store = model.params();
    let linear_modules = model.linear_module_names();
    let target_modules: BTreeSet<String> = linear_modules
        .iter()
        .filter_map(|n| n.rsplit('.').next())
        .map(str::to_string)
        .collect();
    Report {
        source: loaded.source.display().to_string(),
        architecture: model.architecture().to_string(),
        task: format!("{:?}", model.task()),
        total_params: store.num_params(),
        num_layers: count_layers(store.iter().map(|p| p.name())),
        vocab_size: loaded.tokenizer.get_vocab_size(true),
        max_positions: loaded.max_positions,
        target_modules: target_modules.into_iter().collect(),
        linear_modules,
        params: with_params.then(|| {
            store
                .iter()
                .map(|p| ParamInfo {
                    name: p.name().into(),
                    shape: p.dims(),
                })
                .collect()
        }),
    }
}

/// Runs `whet inspect`.
pub fn run(args: InspectArgs) -> Result<()> {
    let loaded = args.options.load(&args.model, 0)?;
    let r = report(&loaded, args.params);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("source:         {}", r.source);
    println!("architecture:   {}", r.architecture);
    println!("task:           {}", r.task);
    println!(
        "parameters:     {} ({})",
        human_count(r.total_params),
        r.total_params
    );
    println!("layers:         {}", r.num_layers);
    println!("vocabulary:     {}", r.vocab_size);
    println!("max positions:  {}", r.max_positions);
    println!("target_modules: {}", r.target_modules.join(", "));
    println!("linear modules ({}):", r.linear_modules.len());
    for name in &r.linear_modules {
        println!("  {name}");
    }
    if let Some(params) = &r.params {
        println!("parameters ({}):", params.len());
        for p in params {
            println!("  {:<60} {:?}", p.name, p.shape);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_and_counts() {
        let names = [
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.11.mlp.up_proj.weight",
            "encoder.layer.3.x",
            "lm_head",
        ];
        assert_eq!(count_layers(names.into_iter()), 3);
        assert_eq!(human_count(22_713_216), "22.71M");
        assert_eq!(human_count(134_515_008), "134.52M");
        assert_eq!(human_count(999), "999");
    }
}
