//! Finding a plugin by id: the manifests the user named (`--plugin PATH`, a recipe's
//! `plugins = [...]`), then the plugin directory where `whet plugin build` installs builds
//! (`$WHETSTONE_PLUGIN_DIR`, default `$WHETSTONE_CACHE/plugins`, default
//! `~/.cache/whetstone/plugins`).

use std::path::{Path, PathBuf};

use super::manifest::{Manifest, MANIFEST_FILE};
use crate::{Error, Result};

/// The plugin directory.
pub fn plugin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WHETSTONE_PLUGIN_DIR") {
        return PathBuf::from(dir);
    }
    crate::assets::cache_dir().join("plugins")
}

/// Every manifest in the plugin directory (unreadable ones are skipped with a warning).
pub fn installed() -> Vec<Manifest> {
    let dir = plugin_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut found: Vec<Manifest> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(MANIFEST_FILE))
        .filter(|p| p.is_file())
        .filter_map(|p| match Manifest::read(&p) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("skipping {}: {e}", p.display());
                None
            }
        })
        .collect();
    found.sort_by(|a, b| a.id.cmp(&b.id));
    found
}

/// The manifest of plugin `id`: the first of `explicit` (manifest files or directories holding
/// one) whose id matches, else the plugin directory's.
pub fn find(id: &str, explicit: &[PathBuf]) -> Result<Manifest> {
    for path in explicit {
        let manifest = Manifest::read(path)?;
        if manifest.id == id {
            return Ok(manifest);
        }
    }
    if let Some(m) = installed().into_iter().find(|m| m.id == id) {
        return Ok(m);
    }
    let named: Vec<String> = explicit.iter().map(|p| p.display().to_string()).collect();
    Err(Error::config(format!(
        "no plugin with id `{id}`: looked in [{}] and {}; build it with `whet plugin build PATH` \
         (first-party plugins live in plugins/, e.g. `whet plugin build plugins/{id}`) or pass \
         --plugin PATH/plugin.toml",
        named.join(", "),
        plugin_dir().display()
    )))
}

/// Resolves a path from a recipe relative to the recipe's directory.
pub fn relative_to(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}
