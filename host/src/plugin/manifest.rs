//! `plugin.toml`: the manifest beside a plugin's artifacts.
//!
//! ```toml
//! id = "lora"
//! version = "0.1.0"
//! kinds = ["method"]
//! sdk_version = "0.1.0"
//! contract = "0.2"
//! description = "LoRA (Hu et al. 2021) with PEFT's configuration"
//!
//! [artifacts]          # paths relative to this file; at least one
//! native = "liblora.so"
//! wasm = "lora.wasm"
//! # Optional pins (`whet plugin build` writes them): the host refuses an artifact whose
//! # sha256 differs.
//! native_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! wasm_sha256 = "..."
//!
//! [limits]             # WebAssembly only
//! memory_mb = 256
//! call_timeout_ms = 30000
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use whetstone_sdk::PluginKind;

use crate::{Error, Result};

/// The manifest file name.
pub const MANIFEST_FILE: &str = "plugin.toml";

/// Where a plugin's builds are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifacts {
    /// The native dynamic library (`.so`, `.dylib`, `.dll`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native: Option<PathBuf>,
    /// The WebAssembly component (`.wasm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<PathBuf>,
    /// The sha256 (hex) the native library must have; checked before it is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_sha256: Option<String>,
    /// The sha256 (hex) the component must have; checked before it is compiled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm_sha256: Option<String>,
}

/// Resource limits for a WebAssembly plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear-memory cap in MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Wall-clock budget of one call in milliseconds (epoch deadline).
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
}

fn default_memory_mb() -> u64 {
    256
}

fn default_call_timeout_ms() -> u64 {
    30_000
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mb: default_memory_mb(),
            call_timeout_ms: default_call_timeout_ms(),
        }
    }
}

/// A parsed `plugin.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The id recipes use (`kind = "lora"`).
    pub id: String,
    /// Plugin version.
    pub version: String,
    /// What it provides.
    pub kinds: Vec<PluginKind>,
    /// The whetstone-sdk version it was built with.
    pub sdk_version: String,
    /// The contract version it speaks (`major.minor`).
    pub contract: String,
    /// One line about it.
    #[serde(default)]
    pub description: String,
    /// Its builds.
    pub artifacts: Artifacts,
    /// Limits for the WebAssembly build.
    #[serde(default)]
    pub limits: Limits,
    /// The directory holding the manifest (artifact paths are relative to it).
    #[serde(skip)]
    pub dir: PathBuf,
}

impl Manifest {
    /// Reads `path`: a `plugin.toml`, or a directory holding one.
    pub fn read(path: &Path) -> Result<Manifest> {
        let file = if path.is_dir() {
            path.join(MANIFEST_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let mut manifest: Manifest = toml::from_str(&text)
            .map_err(|e| Error::bad_file(&file, format!("invalid plugin manifest: {e}")))?;
        if manifest.artifacts.native.is_none() && manifest.artifacts.wasm.is_none() {
            return Err(Error::bad_file(
                &file,
                "[artifacts] names neither `native` nor `wasm`; build the plugin with `whet plugin build`",
            ));
        }
        manifest.dir = file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(manifest)
    }

    /// The path of artifact `relative`, after checking it against `pin` (a sha256 in hex) when
    /// the manifest pins one.
    pub fn verified_artifact(&self, relative: &Path, pin: Option<&str>) -> Result<PathBuf> {
        let path = self.artifact(relative);
        let Some(pin) = pin else {
            return Ok(path);
        };
        let actual = crate::assets::sha256_file(&path)?;
        if !actual.eq_ignore_ascii_case(pin.trim()) {
            return Err(Error::plugin(
                &self.id,
                "load",
                format!(
                    "{} has sha256 {actual}, but {} pins {pin}: the artifact changed since the \
                     manifest was written; restore it, or rebuild with `whet plugin build`",
                    path.display(),
                    self.dir.join(MANIFEST_FILE).display()
                ),
            ));
        }
        Ok(path)
    }

    /// Writes the manifest to `dir/plugin.toml`.
    pub fn write(&self, dir: &Path) -> Result<PathBuf> {
        let file = dir.join(MANIFEST_FILE);
        let text = toml::to_string_pretty(self)
            .map_err(|e| Error::config(format!("cannot write the plugin manifest: {e}")))?;
        std::fs::write(&file, text).map_err(|e| Error::io(&file, e))?;
        Ok(file)
    }

    /// The absolute path of an artifact.
    pub fn artifact(&self, relative: &Path) -> PathBuf {
        self.dir.join(relative)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_artifact_must_match_its_sha256() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("liblora.so"), b"the library").unwrap();
        let actual = crate::assets::sha256_file(&dir.path().join("liblora.so")).unwrap();
        let mut m = Manifest {
            id: "lora".into(),
            version: "0.1.0".into(),
            kinds: vec![PluginKind::Method],
            sdk_version: "0.1.0".into(),
            contract: whetstone_sdk::CONTRACT_VERSION.to_string(),
            description: String::new(),
            artifacts: Artifacts {
                native: Some("liblora.so".into()),
                native_sha256: Some(actual.to_uppercase()),
                ..Artifacts::default()
            },
            limits: Limits::default(),
            dir: dir.path().to_path_buf(),
        };
        m.write(dir.path()).unwrap();
        let m2 = Manifest::read(dir.path()).unwrap();
        assert_eq!(m2.artifacts.native_sha256, m.artifacts.native_sha256);
        let lib = Path::new("liblora.so");
        let pin = m.artifacts.native_sha256.clone();
        assert_eq!(
            m.verified_artifact(lib, pin.as_deref()).unwrap(),
            dir.path().join("liblora.so")
        );
        // The file is swapped after the manifest was written.
        std::fs::write(dir.path().join("liblora.so"), b"something else").unwrap();
        let err = m
            .verified_artifact(lib, pin.as_deref())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("plugin `lora`: load")
                && err.contains("pins")
                && err.contains(&actual.to_uppercase()),
            "{err}"
        );
        // No pin, no check.
        m.artifacts.native_sha256 = None;
        m.verified_artifact(lib, None).unwrap();
    }

    #[test]
    fn manifest_round_trip_and_missing_artifacts_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest {
            id: "lora".into(),
            version: "0.1.0".into(),
            kinds: vec![PluginKind::Method],
            sdk_version: "0.1.0".into(),
            contract: whetstone_sdk::CONTRACT_VERSION.to_string(),
            description: String::new(),
            artifacts: Artifacts {
                native: Some("liblora.so".into()),
                ..Artifacts::default()
            },
            limits: Limits::default(),
            dir: PathBuf::new(),
        };
        m.write(dir.path()).unwrap();
        let back = Manifest::read(dir.path()).unwrap();
        assert_eq!(back.id, "lora");
        assert_eq!(
            back.artifact(Path::new("liblora.so")),
            dir.path().join("liblora.so")
        );
        std::fs::write(
            dir.path().join(MANIFEST_FILE),
            "id='x'\nversion='1'\nkinds=['method']\nsdk_version='0.1.0'\ncontract='0.1'\n[artifacts]\n",
        )
        .unwrap();
        let err = Manifest::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("neither"), "{err}");
    }
}
