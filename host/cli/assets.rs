//! `whet assets`: fetch, list, locate and verify the real models and datasets.

use anyhow::{bail, Result};
use clap::Subcommand;
use whetstone_host::assets::{self, FetchEvent, Registry, ASSETS};

/// What to do with the asset cache.
#[derive(Debug, Subcommand)]
pub enum AssetsCommand {
    /// Download (with pip / npm), verify and unpack assets into the cache; all when none is
    /// named. Complete assets are not downloaded again.
    Fetch {
        /// Asset names (see `whet assets list`).
        names: Vec<String>,
        /// Fetch again even when the cache holds a complete copy.
        #[arg(long)]
        force: bool,
    },
    /// List the known assets, whether they are fetched, and where they live.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the folder of a fetched asset.
    Path {
        /// The asset name.
        name: String,
    },
    /// Re-hash the files of fetched assets against their manifests; all fetched ones when none
    /// is named.
    Verify {
        /// Asset names.
        names: Vec<String>,
    },
}

/// Prints one progress event of a fetch to stderr.
pub fn report(event: FetchEvent<'_>) {
    match event {
        FetchEvent::UpToDate { asset, dir } => {
            eprintln!("{:<22} up to date in {}", asset.name, dir.display())
        }
        FetchEvent::Downloading { asset } => eprintln!(
            "{:<22} downloading {} ...",
            asset.name,
            asset.package_spec()
        ),
        FetchEvent::Unpacking { asset, command } => {
            eprintln!(
                "{:<22} verifying and unpacking (downloaded with `{command}`)",
                asset.name
            )
        }
        FetchEvent::Installed {
            asset,
            dir,
            files,
            bytes,
            seconds,
        } => eprintln!(
            "{:<22} {files} files, {:.1} MB in {} ({seconds:.1} s)",
            asset.name,
            bytes as f64 / 1e6,
            dir.display()
        ),
    }
}

/// Runs an `assets` subcommand.
pub fn run(command: AssetsCommand) -> Result<()> {
    match command {
        AssetsCommand::Fetch { names, force } => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            assets::fetch(&names, force, &mut report)?;
        }
        AssetsCommand::List { json } => list(json)?,
        AssetsCommand::Path { name } => {
            let dir = assets::resolve_path(&format!("{}{name}", assets::ASSET_SCHEME))?;
            if !assets::is_fetched(&name) {
                bail!("asset `{name}` is not completely fetched; run `whet assets fetch {name}`");
            }
            println!("{}", dir.display());
        }
        AssetsCommand::Verify { names } => {
            let names: Vec<String> = if names.is_empty() {
                ASSETS
                    .iter()
                    .filter(|a| assets::is_fetched(a.name))
                    .map(|a| a.name.to_string())
                    .collect()
            } else {
                names
            };
            for name in names {
                assets::verify(&name)?;
                eprintln!("{name:<22} ok");
            }
        }
    }
    Ok(())
}

/// Prints the asset table.
fn list(json: bool) -> Result<()> {
    if json {
        let rows: Vec<_> = ASSETS
            .iter()
            .map(|a| {
                serde_json::json!({
                    "name": a.name,
                    "description": a.description,
                    "license": a.license,
                    "registry": match a.registry { Registry::PyPi => "pypi", Registry::Npm => "npm" },
                    "package": a.package_spec(),
                    "sha256": a.sha256,
                    "default": a.default,
                    "fetched": assets::is_fetched(a.name),
                    "path": assets::asset_dir(a.name),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("cache: {}", assets::cache_dir().display());
    for a in ASSETS {
        let state = if assets::is_fetched(a.name) {
            "fetched"
        } else {
            "missing"
        };
        println!(
            "{:<22} {:<8} {:<28} {}",
            a.name,
            state,
            a.package_spec(),
            a.description
        );
    }
    Ok(())
}
