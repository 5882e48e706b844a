//! `whet train` and `whet eval`: run a recipe, or evaluate a checkpoint of it on held-out data.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use whetstone_host::model::load::LoadedModel;
use whetstone_host::recipe::{MethodSpec, Recipe};
use whetstone_host::train::{self, checkpoint, EvalMetrics, RunOptions, RunSummary};

use crate::adapter_arg::AdapterOptions;

/// Options of `whet train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The recipe (TOML; see README.md "Recipe format").
    recipe: PathBuf,
    /// Continue from the `last/` checkpoint of the output directory.
    #[arg(long)]
    resume: bool,
    /// Write checkpoints, metrics and the plot here instead of the recipe's `output.dir`.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Do not draw the progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// A plugin manifest (`plugin.toml` or its folder) to search before the recipe's `plugins`
    /// and the plugin directory; repeatable.
    #[arg(long = "plugin", value_name = "PATH")]
    plugins: Vec<PathBuf>,
}

/// Options of `whet eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The recipe the checkpoint was trained with.
    recipe: PathBuf,
    /// The checkpoint directory; by default `best/` of the recipe's output directory, or `last/`
    /// when there is no `best/`.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Print the metrics as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Evaluate the recipe's model with this PEFT adapter attached instead of a checkpoint.
    #[command(flatten)]
    adapter: AdapterOptions,
}

/// Reads a recipe file, naming it in errors.
pub fn read_recipe(path: &Path) -> Result<Recipe> {
    Recipe::from_file(path).with_context(|| format!("reading recipe {}", path.display()))
}

/// Trains `recipe` and prints the summary (text or JSON).
pub fn train_recipe(recipe: &Recipe, opts: &RunOptions, json: bool) -> Result<RunSummary> {
    let summary = train::run(recipe, opts).context("training failed")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{summary}");
    }
    Ok(summary)
}

/// Runs `whet train`.
pub fn run_train(args: TrainArgs) -> Result<()> {
    let mut recipe = read_recipe(&args.recipe)?;
    if let Some(dir) = args.output {
        recipe.output.dir = dir;
    }
    let opts = RunOptions {
        resume: args.resume,
        progress: !args.no_progress,
        plugins: args.plugins,
        ..RunOptions::default()
    };
    train_recipe(&recipe, &opts, args.json)?;
    Ok(())
}

/// The checkpoint `whet eval` uses when none is given.
fn default_checkpoint(recipe: &Recipe) -> Result<PathBuf> {
    let dir = &recipe.output.dir;
    for name in ["best", "last"] {
        if dir.join(name).is_dir() {
            return Ok(dir.join(name));
        }
    }
    bail!(
        "no checkpoint in {} (neither best/ nor last/); train first with `whet train` or pass --checkpoint DIR",
        dir.display()
    )
}

/// Evaluates `recipe`'s held-out data with the parameters of the checkpoint in `ckpt_dir`. A
/// plugin method is attached first (searching `plugins`, then the recipe's) so that its
/// parameters can be restored.
pub fn evaluate_checkpoint(
    recipe: &Recipe,
    ckpt_dir: &Path,
    plugins: &[PathBuf],
) -> Result<EvalMetrics> {
    let device = recipe.training.device()?;
    let loaded = whetstone_host::model::load::load(&recipe.model, &device, recipe.training.seed)
        .with_context(|| format!("loading model {}", recipe.model.path))?;
    let model = loaded.model.as_ref();
    let method = match &recipe.method {
        MethodSpec::Plugin { .. } => {
            let mut paths = plugins.to_vec();
            paths.extend(recipe.plugins.iter().cloned());
            train::run::apply_method_with_plugins(
                model,
                &recipe.method,
                &paths,
                recipe.training.seed,
            )?
        }
        _ => None,
    };
    let method_params = method.as_ref().map(|m| m.params()).unwrap_or_default();
    let ckpt = checkpoint::load(ckpt_dir, &device)?;
    let params = model.params();
    for (name, value) in &ckpt.params {
        let own = method_params.iter().find(|p| p.name() == name).cloned();
        let param = own
            .map(Ok)
            .unwrap_or_else(|| params.get(name))
            .with_context(|| {
                format!(
                    "checkpoint {} holds `{name}`, which the recipe's model does not have",
                    ckpt_dir.display()
                )
            })?;
        param
            .set_value(value)
            .with_context(|| format!("restoring `{name}` from {}", ckpt_dir.display()))?;
    }
    evaluate_loaded(recipe, &loaded)
}

/// Evaluates `recipe`'s held-out data with the recipe's model and the PEFT adapter `adapter`
/// attached (its method plugin searched in `adapter.plugins`, then the recipe's `plugins`).
pub fn evaluate_adapter(recipe: &Recipe, adapter: &AdapterOptions) -> Result<EvalMetrics> {
    let device = recipe.training.device()?;
    let loaded = whetstone_host::model::load::load(&recipe.model, &device, recipe.training.seed)
        .with_context(|| format!("loading model {}", recipe.model.path))?;
    let mut adapter = adapter.clone();
    adapter.plugins.extend(recipe.plugins.iter().cloned());
    let _attached = adapter.attach(loaded.model.as_ref())?;
    evaluate_loaded(recipe, &loaded)
}

/// Evaluates `recipe`'s held-out data with `loaded` as it is.
fn evaluate_loaded(recipe: &Recipe, loaded: &LoadedModel) -> Result<EvalMetrics> {
    let device = recipe.training.device()?;
    let model = loaded.model.as_ref();
    // A streaming recipe holds out by a hash of file and line: the split its training used.
    let validation = if recipe.data.streaming {
        whetstone_host::data::prepare_streaming(&recipe.data, loaded, &recipe.plugins)?.validation
    } else {
        whetstone_host::data::prepare_with_plugins(&recipe.data, loaded, &recipe.plugins)?
            .validation
    };
    if validation.is_empty() {
        bail!("the recipe has no held-out data: set data.validation files or data.validation_ratio > 0");
    }
    let batch = recipe.training.eval_batch_size();
    Ok(train::evaluate(
        model,
        &validation,
        batch,
        loaded.special.pad,
        &device,
    )?)
}

/// Runs `whet eval`.
pub fn run_eval(args: EvalArgs) -> Result<()> {
    let recipe = read_recipe(&args.recipe)?;
    let (source, metrics) = match (&args.adapter.adapter, args.checkpoint) {
        (Some(_), Some(_)) => bail!("give either --checkpoint or --adapter, not both"),
        (Some(dir), None) => (
            format!("adapter:    {}", dir.display()),
            evaluate_adapter(&recipe, &args.adapter)?,
        ),
        (None, ckpt) => {
            let ckpt = match ckpt {
                Some(dir) => dir,
                None => default_checkpoint(&recipe)?,
            };
            let metrics = evaluate_checkpoint(&recipe, &ckpt, &args.adapter.plugins)?;
            (format!("checkpoint: {}", ckpt.display()), metrics)
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&metrics)?);
        return Ok(());
    }
    println!("{source}");
    println!("examples:   {}", metrics.examples);
    println!("loss:       {:.4}", metrics.loss);
    if let Some(a) = metrics.accuracy {
        println!("accuracy:   {a:.4}");
    }
    if let Some(p) = metrics.perplexity {
        println!("perplexity: {p:.3}");
    }
    Ok(())
}
