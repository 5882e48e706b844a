//! `whet data preview RECIPE`: the first examples of a recipe's data as the trainer sees them,
//! after reading, templating, tokenizing, truncating and masking, with the trained tokens
//! marked, so a recipe's data can be checked before an hour of training.
//!
//! `whet data scan RECIPE`: one epoch of the training data streamed (read, tokenized, packed,
//! shuffled as `[data] streaming = true` trains), with its counts, speed and peak memory.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use whetstone_host::data::{Example, ExampleLabels};
use whetstone_host::ops::IGNORE_INDEX;

/// `whet data ...`.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Print the first examples of a recipe's data, tokenized and masked as the trainer sees
    /// them (trained tokens marked «like this», or in colour on a terminal).
    Preview(PreviewArgs),
    /// Stream one epoch of a recipe's training data as `[data] streaming = true` reads it and
    /// print what it holds (records, examples, tokens, skipped, truncated), how fast it read and
    /// the peak memory.
    Scan(ScanArgs),
}

/// Options of `whet data scan`.
#[derive(Debug, Args)]
pub struct ScanArgs {
    /// The recipe whose `[model]` (for the tokenizer) and `[data]` to use.
    recipe: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// A plugin manifest to search first for a `[data.loader]` plugin (repeatable).
    #[arg(long = "plugin", value_name = "PATH")]
    plugins: Vec<PathBuf>,
}

/// Which split to show.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Split {
    /// The training examples (in file order, before shuffling).
    Train,
    /// The held-out examples.
    Validation,
}

/// Options of `whet data preview`.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// The recipe whose `[model]` (for the tokenizer and chat template) and `[data]` to use.
    recipe: PathBuf,
    /// How many examples to show.
    #[arg(short = 'n', long, default_value_t = 3)]
    count: usize,
    /// Which split to show.
    #[arg(long, value_enum, default_value_t = Split::Train)]
    split: Split,
    /// Also list every token: position, id, text and whether the loss sees it.
    #[arg(long)]
    tokens: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// A plugin manifest (`plugin.toml` or its folder) to search, before the recipe's `plugins`
    /// and the plugin directory, for a `[data.loader]` plugin (repeatable).
    #[arg(long = "plugin", value_name = "PATH")]
    plugins: Vec<PathBuf>,
}

/// Runs `whet data ...`.
pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Preview(args) => preview(args),
        DataCommand::Scan(args) => scan(args),
    }
}

fn scan(args: ScanArgs) -> Result<()> {
    use whetstone_host::data::stream::StreamCounts;
    let recipe = crate::train::read_recipe(&args.recipe)?;
    let loaded = whetstone_host::model::load::load(
        &recipe.model,
        &candle_core::Device::Cpu,
        recipe.training.seed,
    )
    .context("loading the recipe's model (for its tokenizer and chat template)")?;
    let mut plugins = args.plugins.clone();
    plugins.extend(recipe.plugins.iter().cloned());
    let mut cfg = recipe.data.clone();
    cfg.streaming = true;
    let start = std::time::Instant::now();
    let data = whetstone_host::data::prepare_streaming(&cfg, &loaded, &plugins)
        .context("preparing the streamed data")?;
    let counts = std::sync::Arc::new(StreamCounts::default());
    let progress = indicatif::ProgressBar::new_spinner();
    if args.json || !std::io::stderr().is_terminal() {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut trained_tokens = 0usize;
    for (i, example) in data
        .epoch(0, recipe.training.seed, Some(counts.clone()))?
        .enumerate()
    {
        trained_tokens += trained(&example?);
        if i % 10_000 == 0 {
            progress.set_message(format!("{i} examples"));
            progress.tick();
        }
    }
    progress.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    let get = StreamCounts::get;
    let records = get(&counts.records);
    let out = serde_json::json!({
        "records": records,
        "examples": get(&counts.examples),
        "tokens": get(&counts.tokens),
        "trained_tokens": trained_tokens,
        "skipped_records": get(&counts.skipped),
        "truncated": get(&counts.truncated),
        "validation_examples": data.validation.len(),
        "seconds": seconds,
        "records_per_s": records as f64 / seconds.max(1e-9),
        "peak_rss_mb": whetstone_host::bench::peak_rss_mb(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} records → {} examples, {} tokens ({} trained); {} skipped, {} truncated; \
             {} held out\n{seconds:.1} s ({:.0} records/s), peak RSS {:.0} MiB",
            records,
            out["examples"],
            out["tokens"],
            trained_tokens,
            out["skipped_records"],
            out["truncated"],
            data.validation.len(),
            out["records_per_s"].as_f64().unwrap_or(0.0),
            out["peak_rss_mb"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}

/// Tokens a language-model example trains on (1 for a classification example).
fn trained(example: &Example) -> usize {
    match &example.labels {
        ExampleLabels::Tokens(labels) => labels.iter().filter(|&&l| l != IGNORE_INDEX).count(),
        ExampleLabels::Class(_) => 1,
    }
}

/// One token of a shown example.
#[derive(Debug, Serialize)]
struct TokenView {
    id: u32,
    text: String,
    trained: bool,
}

/// One shown example.
#[derive(Debug, Serialize)]
struct ExampleView {
    index: usize,
    tokens: usize,
    trained_tokens: usize,
    /// The class of a classification example (its name when the recipe gives `label_names`).
    label: Option<String>,
    /// Consecutive tokens with the same mask, decoded: (text, trained).
    spans: Vec<(String, bool)>,
    token_list: Vec<TokenView>,
}

fn preview(args: PreviewArgs) -> Result<()> {
    let recipe = crate::train::read_recipe(&args.recipe)?;
    // The tokenizer, special tokens and chat template come with the model.
    let device = candle_core::Device::Cpu;
    let loaded = whetstone_host::model::load::load(&recipe.model, &device, recipe.training.seed)
        .context("loading the recipe's model (for its tokenizer and chat template)")?;
    let mut plugins = args.plugins.clone();
    plugins.extend(recipe.plugins.iter().cloned());
    let data = whetstone_host::data::prepare_with_plugins(&recipe.data, &loaded, &plugins)
        .context("preparing the data")?;
    let examples = match args.split {
        Split::Train => &data.train,
        Split::Validation => &data.validation,
    };
    let views = examples
        .iter()
        .take(args.count)
        .enumerate()
        .map(|(i, e)| view(i, e, &loaded.tokenizer, &recipe.data.label_names))
        .collect::<Result<Vec<_>>>()?;
    if args.json {
        let out = serde_json::json!({
            "split": format!("{:?}", args.split).to_lowercase(),
            "examples": examples.len(),
            "skipped_records": data.skipped,
            "truncated": data.truncated,
            "shown": views,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let colour = std::io::stdout().is_terminal();
    println!(
        "{} {} examples ({} records skipped, {} cut to max_seq_len = {}); trained tokens are {}",
        examples.len(),
        format!("{:?}", args.split).to_lowercase(),
        data.skipped,
        data.truncated,
        recipe.data.max_seq_len,
        if colour { "green" } else { "«marked»" }
    );
    for v in &views {
        print_view(v, colour, args.tokens);
    }
    Ok(())
}

fn view(
    index: usize,
    example: &Example,
    tokenizer: &tokenizers::Tokenizer,
    label_names: &[String],
) -> Result<ExampleView> {
    let ids = &example.input_ids;
    let (trained, label): (Vec<bool>, Option<String>) = match &example.labels {
        ExampleLabels::Tokens(labels) => {
            (labels.iter().map(|&l| l != IGNORE_INDEX).collect(), None)
        }
        ExampleLabels::Class(c) => {
            let name = usize::try_from(*c)
                .ok()
                .and_then(|i| label_names.get(i))
                .map_or_else(|| c.to_string(), |n| format!("{c} ({n})"));
            (vec![false; ids.len()], Some(name))
        }
    };
    let decode = |part: &[u32]| {
        tokenizer
            .decode(part, false)
            .map_err(|e| anyhow::anyhow!("decoding tokens: {e}"))
    };
    let mut spans: Vec<(String, bool)> = Vec::new();
    let mut start = 0;
    for i in 1..=ids.len() {
        if i == ids.len() || trained[i] != trained[start] {
            spans.push((decode(&ids[start..i])?, trained[start]));
            start = i;
        }
    }
    let token_list = ids
        .iter()
        .zip(&trained)
        .map(|(&id, &t)| {
            Ok(TokenView {
                id,
                text: decode(&[id])?,
                trained: t,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ExampleView {
        index,
        tokens: ids.len(),
        trained_tokens: trained.iter().filter(|&&t| t).count(),
        label,
        spans,
        token_list,
    })
}

fn print_view(v: &ExampleView, colour: bool, tokens: bool) {
    let head = match &v.label {
        Some(label) => format!("label {label}"),
        None => format!("{} trained", v.trained_tokens),
    };
    println!(
        "\n── example {} · {} tokens · {head}",
        v.index + 1,
        v.tokens
    );
    let mut text = String::new();
    for (span, trained) in &v.spans {
        match (trained, colour) {
            (true, true) => text += &format!("\x1b[32m{span}\x1b[0m"),
            (true, false) => text += &format!("«{span}»"),
            (false, _) => text += span,
        }
    }
    println!("{text}");
    if tokens {
        for (i, t) in v.token_list.iter().enumerate() {
            println!(
                "  {i:4}  {:6}  {}{:?}",
                t.id,
                if t.trained { "▶ " } else { "  " },
                t.text
            );
        }
    }
}
