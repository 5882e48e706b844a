//! `whet demo`: fetch the default assets and fine-tune all-MiniLM-L6-v2 on the UCI sentiment
//! sentences with the bundled recipe, then print the held-out accuracy.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use whetstone_host::assets;
use whetstone_host::recipe::Recipe;
use whetstone_host::train::RunOptions;

/// The bundled recipe, embedded so that the demo runs from any working directory.
const RECIPE: &str = include_str!("../../examples/sentiment/recipe.toml");

/// Where the bundled recipe lives in the repository (for error messages).
const RECIPE_ORIGIN: &str = "examples/sentiment/recipe.toml";

/// Options of `whet demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Output directory (the recipe copy, checkpoints, metrics and the loss plot go here).
    #[arg(long, default_value = "runs/sentiment-demo")]
    output: PathBuf,
    /// Do not draw the progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// Runs `whet demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    let needed: Vec<&str> = assets::ASSETS
        .iter()
        .filter(|a| a.default)
        .map(|a| a.name)
        .collect();
    eprintln!("fetching the demo assets ({}) ...", needed.join(", "));
    assets::fetch(&needed, false, &mut crate::assets::report)?;

    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let recipe_path = args.output.join("recipe.toml");
    std::fs::write(&recipe_path, RECIPE)
        .with_context(|| format!("writing {}", recipe_path.display()))?;
    let mut recipe = Recipe::from_toml_str(RECIPE, RECIPE_ORIGIN)?;
    recipe.output.dir = args.output.clone();
    eprintln!(
        "fine-tuning {} (partial: classifier + last encoder layer) with {} ...",
        recipe.model.path,
        recipe_path.display()
    );

    let opts = RunOptions {
        progress: !args.no_progress,
        ..RunOptions::default()
    };
    let summary = crate::train::train_recipe(&recipe, &opts, false)?;
    match summary
        .final_eval
        .and_then(|m| m.accuracy.map(|a| (a, m.examples)))
    {
        Some((accuracy, examples)) => {
            println!("held-out accuracy: {accuracy:.4} ({examples} sentences)")
        }
        None => anyhow::bail!("the run reported no held-out accuracy"),
    }
    println!(
        "re-run or change it with: whet train {} --output {}",
        recipe_path.display(),
        args.output.display()
    );
    Ok(())
}
