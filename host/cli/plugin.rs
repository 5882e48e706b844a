//! `whet plugin`: scaffold a method plugin crate, build it (native and/or wasm), list the
//! installed plugins, and run the conformance suite on one.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use whetstone_host::plugin::build::{self, BuildOptions};
use whetstone_host::plugin::manifest::MANIFEST_FILE;
use whetstone_host::plugin::{conformance, discover, Manifest, Plugin, TransportKind};

/// What to do with plugins.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Create a plugin crate NAME holding a small working LoRA-style method to start from.
    New {
        /// The crate name (letters, digits, `-`, `_`); the plugin id drops a `whetstone-` prefix.
        name: String,
        /// The folder to create the crate in.
        #[arg(long, value_name = "PARENT", default_value = ".")]
        dir: PathBuf,
    },
    /// Build plugin crates and install the builds with their plugin.toml (the native build
    /// unless --wasm is given; both flags for both).
    Build {
        /// The crates' folders (`plugins/*` builds every first-party plugin).
        #[arg(default_value = ".")]
        paths: Vec<PathBuf>,
        /// Build the native library.
        #[arg(long)]
        native: bool,
        /// Build the WebAssembly component.
        #[arg(long)]
        wasm: bool,
        /// Install here instead of the plugin directory's `<id>/` (one crate only).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Build the native library with optimisations (the wasm build always is).
        #[arg(long)]
        release: bool,
    },
    /// List the installed plugins with their configuration fields.
    List,
    /// Run the conformance suite on a method, loss or data-loader plugin; exits non-zero when a
    /// check fails.
    Check(CheckArgs),
}

/// Options of `whet plugin check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// A plugin.toml, the folder holding one, or a plugin crate to build first.
    pub path: PathBuf,
    /// The plugin's configuration as JSON (PEFT's field names for a method).
    #[arg(long, default_value = "{}")]
    pub config: String,
    /// Check the native build (with --wasm too: both, and native == wasm). Without either
    /// flag: every build the manifest names, or the native build of a crate.
    #[arg(long)]
    pub native: bool,
    /// Check the WebAssembly build.
    #[arg(long)]
    pub wasm: bool,
    /// When PATH is a crate: install the builds here instead of the plugin directory.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// When PATH is a crate: build the native library with optimisations.
    #[arg(long)]
    pub release: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// A sample file for a data loader to read (repeatable; required for loaders).
    #[arg(long = "data", value_name = "FILE")]
    pub data: Vec<PathBuf>,
}

/// Runs `whet plugin ...`.
pub fn run(command: PluginCommand) -> Result<()> {
    match command {
        PluginCommand::New { name, dir } => new(&name, &dir),
        PluginCommand::Build {
            paths,
            native,
            wasm,
            out,
            release,
        } => {
            if out.is_some() && paths.len() > 1 {
                bail!("--out installs one plugin; give one crate, or drop --out to install each into the plugin directory");
            }
            for path in &paths {
                let manifest = build_crate(path, native, wasm, out.clone(), release)?;
                println!(
                    "built `{}` {} ({}) into {}",
                    manifest.id,
                    manifest.version,
                    transports(&manifest),
                    manifest.dir.join(MANIFEST_FILE).display()
                );
            }
            Ok(())
        }
        PluginCommand::List => list(),
        PluginCommand::Check(args) => check(args),
    }
}

/// Builds the crate at `path`: the builds asked for, the native one when neither is.
fn build_crate(
    path: &Path,
    native: bool,
    wasm: bool,
    out_dir: Option<PathBuf>,
    release: bool,
) -> Result<Manifest> {
    let opts = BuildOptions {
        native: native || !wasm,
        wasm,
        out_dir,
        release,
    };
    build::build(path, &opts).with_context(|| format!("building the plugin in {}", path.display()))
}

/// `native, wasm`: the builds a manifest names.
fn transports(m: &Manifest) -> String {
    let a = &m.artifacts;
    [("native", a.native.is_some()), ("wasm", a.wasm.is_some())]
        .iter()
        .filter(|(_, present)| *present)
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn list() -> Result<()> {
    let installed = discover::installed();
    if installed.is_empty() {
        println!(
            "no plugins in {}; build one with `whet plugin build PATH` (e.g. plugins/lora)",
            discover::plugin_dir().display()
        );
        return Ok(());
    }
    for m in &installed {
        let kinds: Vec<String> = m
            .kinds
            .iter()
            .map(|k| format!("{k:?}").to_lowercase())
            .collect();
        println!(
            "{} {}  [{}]  {}  {}",
            m.id,
            m.version,
            kinds.join(", "),
            transports(m),
            m.dir.display()
        );
        if !m.description.is_empty() {
            println!("    {}", m.description);
        }
        match Plugin::load(m, TransportKind::Auto) {
            Ok(p) => {
                for f in &p.metadata.config_fields {
                    let default = if f.default.is_empty() {
                        "required".to_string()
                    } else {
                        format!("= {}", f.default)
                    };
                    println!("    {:<20} {} {}: {}", f.name, f.ty, default, f.doc);
                }
            }
            Err(e) => println!("    (cannot load it to read its configuration fields: {e})"),
        }
    }
    Ok(())
}

/// The manifest `path` names: a plugin.toml, its folder, or a crate to build first.
fn resolve(
    path: &Path,
    native: bool,
    wasm: bool,
    out: Option<PathBuf>,
    release: bool,
) -> Result<Manifest> {
    if path.is_file() || path.join(MANIFEST_FILE).is_file() {
        return Ok(Manifest::read(path)?);
    }
    if path.join("Cargo.toml").is_file() {
        return build_crate(path, native, wasm, out, release);
    }
    bail!(
        "{} is neither a plugin.toml, a folder holding one, nor a plugin crate",
        path.display()
    )
}

fn check(args: CheckArgs) -> Result<()> {
    let CheckArgs {
        path,
        config,
        native,
        wasm,
        out,
        release,
        json,
        data,
    } = args;
    let config: serde_json::Value = serde_json::from_str(&config)
        .with_context(|| format!("--config is not valid JSON: {config}"))?;
    let manifest = resolve(&path, native, wasm, out, release)?;
    let kinds: Vec<TransportKind> = [(TransportKind::Native, native), (TransportKind::Wasm, wasm)]
        .into_iter()
        .filter_map(|(k, asked)| asked.then_some(k))
        .collect();
    let report = conformance::check_with_data(&manifest, &kinds, config, &data)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    let failed = report.count(conformance::Status::Fail);
    if failed > 0 {
        bail!(
            "`{}` fails {failed} of {} conformance checks",
            report.plugin,
            report.checks.len()
        );
    }
    Ok(())
}

/// Whether `name` is a usable crate name.
fn valid_crate_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The `whetstone-sdk` dependency of a new crate: this repository's `sdk/` when `whet` runs
/// from a checkout, else the published version.
fn sdk_dependency() -> String {
    let repo_sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    match repo_sdk.canonicalize() {
        Ok(dir) if dir.join("Cargo.toml").is_file() => format!(
            "{{ path = {} }}",
            toml::Value::String(dir.display().to_string())
        ),
        _ => format!("\"{}\"", whetstone_sdk::SDK_VERSION),
    }
}

fn cargo_toml(name: &str) -> String {
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
description = "A LoRA-style PEFT method as a Whetstone plugin"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
whetstone-sdk = {sdk}
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

# Builds on its own, outside any enclosing workspace.
[workspace]
"#,
        sdk = sdk_dependency()
    )
}

fn fill(template: &str, name: &str, id: &str) -> String {
    template.replace("{{name}}", name).replace("{{id}}", id)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn new(name: &str, parent: &Path) -> Result<()> {
    if !valid_crate_name(name) {
        bail!("`{name}` is not a crate name: use letters, digits, `-` and `_`, starting with a letter");
    }
    let dir = parent.join(name);
    if dir.exists() {
        bail!(
            "{} already exists; pick another name or --dir",
            dir.display()
        );
    }
    let id = build::plugin_id(name);
    let src = dir.join("src");
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    write(&dir.join("Cargo.toml"), &cargo_toml(name))?;
    write(&dir.join(".gitignore"), "/target\n")?;
    let lib = include_str!("templates/plugin/lib.rs.tmpl");
    write(&src.join("lib.rs"), &fill(lib, name, &id))?;
    let readme = include_str!("templates/plugin/README.md.tmpl");
    write(&dir.join("README.md"), &fill(readme, name, &id))?;
    println!("created the method plugin `{id}` in {}", dir.display());
    println!(
        "next: `whet plugin check {} --native` builds it and runs the conformance suite",
        dir.display()
    );
    Ok(())
}
