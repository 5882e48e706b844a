//! `whet bench methods`: trains each recipe in its own `whet train` process (so each run's peak
//! memory is its own), then tabulates held-out accuracy, the starting accuracy, trainable
//! parameters, seconds per step and peak RSS as a Markdown table, optionally written into a
//! file between two marker lines (the README's method table is made this way).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

/// The line after which `--write` puts the table (without `--table`).
pub const BEGIN_MARKER: &str = "<!-- whet bench methods: begin -->";
/// The line before which `--write` ends the table (without `--table`).
pub const END_MARKER: &str = "<!-- whet bench methods: end -->";

/// Where the runs write their checkpoints unless `--output` says otherwise.
const DEFAULT_OUTPUT: &str = "runs/bench-methods";

/// The marker lines of table `name` (`None`: the default markers).
fn markers(name: Option<&str>) -> (String, String) {
    match name {
        None => (BEGIN_MARKER.to_string(), END_MARKER.to_string()),
        Some(n) => (
            format!("<!-- whet bench methods {n}: begin -->"),
            format!("<!-- whet bench methods {n}: end -->"),
        ),
    }
}

/// Options of `whet bench methods`.
#[derive(Debug, Args)]
pub struct MethodsArgs {
    /// The recipes to train, one row each (e.g. `examples/sentiment/*.toml`).
    #[arg(required = true)]
    recipes: Vec<PathBuf>,
    /// Replace the table between the marker lines `<!-- whet bench methods: begin -->` and
    /// `<!-- whet bench methods: end -->` of this file (e.g. README.md). The markers are checked
    /// before any training.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
    /// With `--write`: use the markers `<!-- whet bench methods NAME: begin -->` / `end`, so one
    /// file holds several tables (the README's SmolLM2 SFT table is `sft`).
    #[arg(long, value_name = "NAME")]
    table: Option<String>,
    /// Also save every run's summary (the JSON of `whet train --json`) here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Where the runs write their checkpoints (one folder per recipe).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_OUTPUT)]
    output: PathBuf,
    /// Where every run's result (`<recipe>.summary.json`: the recipe as trained and its summary)
    /// is kept; default: `--output`. The README's rows are committed under
    /// `examples/*/results/`, so `--results examples/sentiment/results --resume` rebuilds the
    /// table from them without training, and retrains only the rows whose file is missing or
    /// whose recipe changed.
    #[arg(long, value_name = "DIR")]
    results: Option<PathBuf>,
    /// Cap every run at this many optimizer steps (for a quick look; the README table uses the
    /// recipes as they are).
    #[arg(long)]
    max_steps: Option<usize>,
    /// A plugin manifest to search first (passed to every `whet train`); repeatable.
    #[arg(long)]
    plugin: Vec<PathBuf>,
    /// Reuse the summary of a recipe that an earlier (interrupted) run of this command already
    /// saved in the same `--results` folder, when the recipe is unchanged; train only the others.
    #[arg(long)]
    resume: bool,
}

impl MethodsArgs {
    /// The folder that keeps the runs' summaries.
    fn results_dir(&self) -> &Path {
        self.results.as_deref().unwrap_or(&self.output)
    }
}

/// One finished run.
struct Row {
    recipe: String,
    method: String,
    summary: Value,
}

/// Runs `whet bench methods`.
pub fn run(args: MethodsArgs) -> Result<()> {
    let exe = std::env::current_exe().context("locating the whet executable")?;
    check_unique_stems(&args.recipes)?;
    let (begin, end) = markers(args.table.as_deref());
    if let Some(path) = &args.write {
        // Refuse a target without markers now, not after an hour of training.
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        replace_between_markers(&text, "", &begin, &end)
            .with_context(|| format!("checking {}", path.display()))?;
    }
    for dir in [&args.output, args.results_dir()] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut rows = Vec::new();
    for recipe in &args.recipes {
        eprintln!("=== {}", recipe.display());
        rows.push(train_one(&exe, recipe, &args)?);
    }
    let table = markdown(&rows, &args);
    println!("{table}");
    if let Some(path) = &args.json {
        let all: Vec<Value> = rows
            .iter()
            .map(|r| serde_json::json!({"recipe": r.recipe, "method": r.method, "summary": r.summary}))
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.write {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let updated = replace_between_markers(&text, &table, &begin, &end)
            .with_context(|| format!("updating {}", path.display()))?;
        std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote the table into {}", path.display());
    }
    Ok(())
}

/// The method column of a recipe: its `[method] kind`, with the LoRA variant it turns on
/// (`lora (DoRA)`, `lora (rsLoRA)`).
fn method_label(doc: &toml::Table) -> String {
    let method = doc.get("method");
    let kind = method
        .and_then(|m| m.get("kind"))
        .and_then(|k| k.as_str())
        .unwrap_or("partial");
    let on = |flag: &str| {
        method
            .and_then(|m| m.get(flag))
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    };
    let variants: Vec<&str> = [("use_dora", "DoRA"), ("use_rslora", "rsLoRA")]
        .into_iter()
        .filter(|(flag, _)| kind == "lora" && on(flag))
        .map(|(_, name)| name)
        .collect();
    if variants.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} ({})", variants.join(", "))
    }
}

/// Trains `recipe` in a child `whet train` with `eval_at_start` on and returns its summary.
fn train_one(exe: &Path, recipe: &Path, args: &MethodsArgs) -> Result<Row> {
    let text =
        std::fs::read_to_string(recipe).with_context(|| format!("reading {}", recipe.display()))?;
    let mut doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", recipe.display()))?;
    let stem = recipe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "recipe".into());
    let method = method_label(&doc);
    let training = doc
        .entry("training")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let Some(t) = training.as_table_mut() {
        t.insert("eval_at_start".into(), toml::Value::Boolean(true));
        if let Some(n) = args.max_steps {
            t.insert("max_steps".into(), toml::Value::Integer(n as i64));
        }
    }
    let out_dir = args.output.join(&stem);
    let output = doc
        .entry("output")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let Some(t) = output.as_table_mut() {
        t.insert(
            "dir".into(),
            toml::Value::String(out_dir.to_string_lossy().into_owned()),
        );
    }
    let patched = args.output.join(format!("{stem}.toml"));
    let patched_text = toml::to_string(&doc)?;
    let saved = args.results_dir().join(format!("{stem}.summary.json"));
    if args.resume {
        if let Some(summary) = saved_summary(&saved, &patched_text) {
            eprintln!("reusing the summary in {}", saved.display());
            return Ok(Row {
                recipe: recipe.display().to_string(),
                method,
                summary,
            });
        }
    }
    std::fs::write(&patched, &patched_text)
        .with_context(|| format!("writing {}", patched.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("train")
        .arg(&patched)
        .args(["--json", "--no-progress"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for p in &args.plugin {
        cmd.arg("--plugin").arg(p);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running whet train {}", patched.display()))?;
    if !out.status.success() {
        bail!(
            "whet train {} failed ({}); its log is above",
            recipe.display(),
            out.status
        );
    }
    let summary: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "reading the JSON summary of {} (stdout: {})",
            recipe.display(),
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let record = serde_json::json!({"recipe": patched_text, "summary": summary});
    std::fs::write(&saved, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("writing {}", saved.display()))?;
    Ok(Row {
        recipe: recipe.display().to_string(),
        method,
        summary,
    })
}

/// The summary saved in `path` by an earlier run, if that run trained exactly `recipe_text`.
fn saved_summary(path: &Path, recipe_text: &str) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut record: Value = serde_json::from_str(&text).ok()?;
    if record.get("recipe")?.as_str()? != recipe_text {
        return None;
    }
    Some(record.get_mut("summary")?.take())
}

/// Held-out accuracy of a summary: answer accuracy by generation for SFT, else the
/// classification accuracy of the final evaluation.
fn accuracy(summary: &Value, key: &str) -> Option<f64> {
    if key == "final_eval" {
        if let Some(a) = summary.pointer("/answers/accuracy").and_then(Value::as_f64) {
            return Some(a);
        }
    }
    summary.get(key)?.get("accuracy")?.as_f64()
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_string(), |x| format!("{x:.digits$}"))
}

/// The Markdown table of `rows`, with the command that made it.
fn markdown(rows: &[Row], args: &MethodsArgs) -> String {
    let mut lines = vec![
        "| recipe | method | held-out accuracy | at start | trainable params | % of model | s/step | peak RSS (MiB) | steps |".to_string(),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |".to_string(),
    ];
    for r in rows {
        let s = &r.summary;
        let trainable = s.get("trainable_params").and_then(Value::as_u64);
        let total = s.get("total_params").and_then(Value::as_u64);
        let share = match (trainable, total) {
            (Some(t), Some(n)) if n > 0 => Some(100.0 * t as f64 / n as f64),
            _ => None,
        };
        lines.push(format!(
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.recipe,
            r.method,
            cell(accuracy(s, "final_eval"), 4),
            cell(accuracy(s, "initial_eval"), 4),
            trainable.map_or_else(|| "–".into(), |t| t.to_string()),
            cell(share, 3),
            cell(s.get("seconds_per_step").and_then(Value::as_f64), 3),
            cell(s.get("peak_rss_mb").and_then(Value::as_f64), 0),
            s.get("steps").and_then(Value::as_u64).unwrap_or(0),
        ));
    }
    let recipes: Vec<String> = args
        .recipes
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut command = format!("whet bench methods {}", recipes.join(" "));
    if let Some(n) = args.max_steps {
        command += &format!(" --max-steps {n}");
    }
    if let Some(name) = &args.table {
        command += &format!(" --table {name}");
    }
    if args.output != Path::new(DEFAULT_OUTPUT) {
        // The output folder is part of each run's recipe, so a rerun must name it too.
        command += &format!(" --output {}", args.output.display());
    }
    if let Some(dir) = &args.results {
        command += &format!(" --results {}", dir.display());
    }
    lines.push(String::new());
    lines.push(format!(
        "Generated by `{command}` ({} threads; \"at start\" is the accuracy before the first step).",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    ));
    lines.join("\n")
}

/// Refuses two recipes with the same file stem: their runs would share an output folder and
/// overwrite each other's summaries.
fn check_unique_stems(recipes: &[PathBuf]) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    for r in recipes {
        let stem = r.file_stem().map(|s| s.to_string_lossy().into_owned());
        if let Some(other) = seen.insert(stem, r) {
            bail!(
                "{} and {} have the same file name: their runs would share one output folder; \
                 bench them in two commands with different --output",
                other.display(),
                r.display()
            );
        }
    }
    Ok(())
}

/// `text` with the lines between `begin` and `end` replaced by `table`.
fn replace_between_markers(text: &str, table: &str, begin: &str, end: &str) -> Result<String> {
    let (Some(b), Some(e)) = (text.find(begin), text.find(end)) else {
        bail!("no `{begin}` … `{end}` lines to put the table between; add them");
    };
    if e < b {
        bail!("`{end}` comes before `{begin}`");
    }
    let head = &text[..b + begin.len()];
    let tail = &text[e..];
    Ok(format!("{head}\n{table}\n{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_name_lora_variants() {
        let label = |text: &str| method_label(&toml::from_str(text).unwrap());
        assert_eq!(
            label("[method]\nkind = \"lora\"\nuse_dora = true"),
            "lora (DoRA)"
        );
        assert_eq!(label("[method]\nkind = \"lora\"\nuse_dora = false"), "lora");
        assert_eq!(label("[method]\nkind = \"ia3\"\nuse_dora = true"), "ia3");
        assert_eq!(label("[data]\ntrain = []"), "partial");
    }

    #[test]
    fn the_table_goes_between_the_markers_and_nowhere_else() {
        let text = format!("intro\n{BEGIN_MARKER}\nold table\n{END_MARKER}\noutro\n");
        let out = replace_between_markers(&text, "| new |", BEGIN_MARKER, END_MARKER).unwrap();
        assert_eq!(
            out,
            format!("intro\n{BEGIN_MARKER}\n| new |\n{END_MARKER}\noutro\n")
        );
        let again = replace_between_markers(&out, "| newer |", BEGIN_MARKER, END_MARKER).unwrap();
        assert!(again.contains("| newer |") && !again.contains("| new |"));
        assert!(replace_between_markers("no markers", "x", BEGIN_MARKER, END_MARKER).is_err());
        // A named table has its own markers and leaves the default table alone.
        let (b, e) = markers(Some("sft"));
        let both = format!("{again}{b}\nold\n{e}\n");
        let named = replace_between_markers(&both, "| sft |", &b, &e).unwrap();
        assert!(named.contains("| newer |") && named.contains("| sft |") && !named.contains("old"));
    }

    #[test]
    fn recipes_with_the_same_file_name_are_refused() {
        let ok = [PathBuf::from("a/lora.toml"), PathBuf::from("a/ia3.toml")];
        assert!(check_unique_stems(&ok).is_ok());
        let clash = [PathBuf::from("a/lora.toml"), PathBuf::from("b/lora.toml")];
        let err = check_unique_stems(&clash).unwrap_err().to_string();
        assert!(
            err.contains("a/lora.toml") && err.contains("b/lora.toml"),
            "{err}"
        );
    }

    #[test]
    fn a_saved_summary_is_reused_only_for_the_same_recipe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lora.summary.json");
        assert!(saved_summary(&path, "a = 1").is_none());
        let record = serde_json::json!({"recipe": "a = 1", "summary": {"steps": 3}});
        std::fs::write(&path, record.to_string()).unwrap();
        assert_eq!(saved_summary(&path, "a = 1").unwrap()["steps"], 3);
        assert!(saved_summary(&path, "a = 2").is_none());
    }

    #[test]
    fn accuracy_prefers_answers_for_sft_runs() {
        let sft =
            serde_json::json!({"answers": {"accuracy": 0.9}, "final_eval": {"accuracy": null}});
        assert_eq!(accuracy(&sft, "final_eval"), Some(0.9));
        let cls = serde_json::json!({"final_eval": {"accuracy": 0.93}, "initial_eval": {"accuracy": 0.5}});
        assert_eq!(accuracy(&cls, "final_eval"), Some(0.93));
        assert_eq!(accuracy(&cls, "initial_eval"), Some(0.5));
    }
}
