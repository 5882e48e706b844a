//! `whet plugin build`: compiles a plugin crate natively (a `cdylib`) and/or for
//! `wasm32-unknown-unknown` (componentized with `wit-component`), copies the builds into the
//! plugin directory and writes their `plugin.toml`.
//!
//! The wasm build uses an installed rustup target when there is one (`rustup target add
//! wasm32-unknown-unknown`); otherwise Debian's second toolchain (`apt-get install -y
//! rustc-web cargo-web rust-web-src rust-web-llvm lld-22`), which builds std itself
//! (`-Zbuild-std`) into a separate target directory because its artifacts do not mix with
//! rustup's. Cargo's progress goes to the terminal; artifacts are found from cargo's JSON
//! messages, not guessed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use whetstone_sdk::{Metadata, CONTRACT_VERSION, SDK_VERSION};

use super::manifest::{Artifacts, Limits, Manifest};
use super::transport::Transport;
use crate::{Error, Result};

/// The WebAssembly target plugins are built for.
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// What to build and where to put it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Build the native library.
    pub native: bool,
    /// Build the WebAssembly component.
    pub wasm: bool,
    /// Where to copy the builds and write `plugin.toml` (default: the plugin directory's
    /// `<id>/`).
    pub out_dir: Option<PathBuf>,
    /// Build the native library with `--release` (the wasm build always is).
    pub release: bool,
}

impl Default for BuildOptions {
    /// Both transports, release, into the plugin directory.
    fn default() -> Self {
        BuildOptions {
            native: true,
            wasm: true,
            out_dir: None,
            release: true,
        }
    }
}

/// The plugin id of a package: its name without a leading `whetstone-`.
pub fn plugin_id(package: &str) -> String {
    package
        .strip_prefix("whetstone-")
        .filter(|s| !s.is_empty())
        .unwrap_or(package)
        .to_string()
}

/// What `cargo metadata` says about the crate.
#[derive(Debug)]
struct Package {
    name: String,
    version: String,
    description: String,
    manifest_path: PathBuf,
    target_dir: PathBuf,
    /// `[package.metadata.whetstone.limits]`, if the crate sets it.
    limits: Option<Limits>,
}

#[derive(Deserialize)]
struct CargoMetadata {
    packages: Vec<MetaPackage>,
    target_directory: PathBuf,
}

#[derive(Deserialize)]
struct MetaPackage {
    name: String,
    version: String,
    description: Option<String>,
    manifest_path: PathBuf,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

/// Whether two paths name the same file (`canonical` is already canonical).
fn same_file(path: &Path, canonical: &Path) -> bool {
    path == canonical || path.canonicalize().is_ok_and(|p| p == canonical)
}

fn fail(id: &str, message: impl Into<String>) -> Error {
    Error::plugin(id, "build", message)
}

/// The cargo that runs us (under `cargo test`/`cargo run`), else the one on `PATH`.
fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn read_package(crate_dir: &Path) -> Result<Package> {
    let manifest = crate_dir.join("Cargo.toml");
    let label = crate_dir.display().to_string();
    if !manifest.is_file() {
        return Err(fail(
            &label,
            format!("{} does not exist: not a crate", manifest.display()),
        ));
    }
    let manifest = manifest
        .canonicalize()
        .map_err(|e| Error::io(&manifest, e))?;
    let output = cargo()
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| fail(&label, format!("cannot run cargo: {e}")))?;
    if !output.status.success() {
        return Err(fail(
            &label,
            format!("`cargo metadata` failed ({})", output.status),
        ));
    }
    let meta: CargoMetadata = serde_json::from_slice(&output.stdout)
        .map_err(|e| fail(&label, format!("unreadable `cargo metadata` output: {e}")))?;
    let pkg = meta
        .packages
        .into_iter()
        .find(|p| same_file(&p.manifest_path, &manifest))
        .ok_or_else(|| fail(&label, format!("{} has no [package]", manifest.display())))?;
    let limits = match pkg
        .metadata
        .as_ref()
        .and_then(|m| m.pointer("/whetstone/limits"))
    {
        Some(v) => Some(Limits::deserialize(v).map_err(|e| {
            fail(
                &label,
                format!(
                    "[package.metadata.whetstone.limits] in {}: {e}",
                    manifest.display()
                ),
            )
        })?),
        None => None,
    };
    Ok(Package {
        name: pkg.name,
        version: pkg.version,
        description: pkg.description.unwrap_or_default(),
        manifest_path: manifest,
        target_dir: meta.target_directory,
        limits,
    })
}

#[derive(Deserialize)]
struct ArtifactMessage {
    reason: String,
    #[serde(default)]
    manifest_path: Option<PathBuf>,
    #[serde(default)]
    target: Option<ArtifactTarget>,
    #[serde(default)]
    filenames: Vec<PathBuf>,
}

#[derive(Deserialize)]
struct ArtifactTarget {
    kind: Vec<String>,
}

/// Runs a `cargo build` (progress and diagnostics on the terminal) and returns the crate's
/// `cdylib` file with extension `ext` (`so`/`dylib`/`dll`/`wasm`).
fn run_cargo(
    id: &str,
    mut cmd: Command,
    pkg: &Package,
    what: &str,
    exts: &[&str],
) -> Result<PathBuf> {
    cmd.arg("--manifest-path")
        .arg(&pkg.manifest_path)
        .args(["--lib", "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    tracing::info!("building {what} of `{id}`: {cmd:?}");
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(id, format!("cannot run cargo for the {what}: {e}")))?;
    let mut found = None;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.map_err(|e| fail(id, format!("reading cargo's output: {e}")))?;
            let Ok(msg) = serde_json::from_str::<ArtifactMessage>(&line) else {
                continue;
            };
            let ours = msg
                .manifest_path
                .as_deref()
                .is_some_and(|m| same_file(m, &pkg.manifest_path));
            let cdylib = msg
                .target
                .is_some_and(|t| t.kind.iter().any(|k| k == "cdylib"));
            if msg.reason == "compiler-artifact" && ours && cdylib {
                found = msg.filenames.into_iter().find(|f| {
                    f.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| exts.contains(&e))
                });
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| fail(id, format!("waiting for cargo: {e}")))?;
    if !status.success() {
        return Err(fail(
            id,
            format!("cargo failed to build the {what} ({status}); see its messages above"),
        ));
    }
    found.ok_or_else(|| {
        fail(
            id,
            format!(
                "cargo built no {what}: add `[lib] crate-type = [\"cdylib\"]` to {}",
                pkg.manifest_path.display()
            ),
        )
    })
}

fn build_native(id: &str, pkg: &Package, release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    run_cargo(id, cmd, pkg, "native library", &["so", "dylib", "dll"])
}

/// How this machine builds wasm32.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WasmToolchain {
    /// rustup with the `wasm32-unknown-unknown` target installed.
    Rustup,
    /// Debian's `rustc-web`/`cargo-web` with `rust-web-src`, building std itself.
    Debian,
}

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_CARGO: &str = "/usr/bin/cargo";
/// The wasm linker Debian's rustc runs (package `rust-web-llvm`, a link to `lld-22`).
const DEBIAN_LLD: &str = "/usr/bin/rust-lld";

fn rustup_has_wasm_target(crate_dir: &Path) -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(crate_dir)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == WASM_TARGET)
        })
}

fn debian_toolchain_ready() -> bool {
    let sysroot = Command::new(DEBIAN_RUSTC)
        .arg("--print=sysroot")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let has_std_source =
        sysroot.is_some_and(|s| s.join("lib/rustlib/src/rust/library/Cargo.lock").is_file());
    Path::new(DEBIAN_CARGO).is_file() && Path::new(DEBIAN_LLD).exists() && has_std_source
}

fn wasm_toolchain(id: &str, crate_dir: &Path) -> Result<WasmToolchain> {
    if rustup_has_wasm_target(crate_dir) {
        return Ok(WasmToolchain::Rustup);
    }
    if debian_toolchain_ready() {
        return Ok(WasmToolchain::Debian);
    }
    Err(fail(id, missing_wasm_toolchain()))
}

/// The message when no wasm32 toolchain is installed, with both fixes.
pub fn missing_wasm_toolchain() -> String {
    format!(
        "no Rust toolchain for {WASM_TARGET} here: run `rustup target add {WASM_TARGET}`, or on \
         Debian/Ubuntu without rustup downloads `apt-get install -y rustc-web cargo-web \
         rust-web-src rust-web-llvm lld-22`"
    )
}

/// Whether this machine can build WebAssembly plugins.
pub fn wasm_toolchain_available() -> bool {
    rustup_has_wasm_target(Path::new(".")) || debian_toolchain_ready()
}

fn build_wasm(id: &str, crate_dir: &Path, pkg: &Package) -> Result<PathBuf> {
    let cmd = match wasm_toolchain(id, crate_dir)? {
        WasmToolchain::Rustup => {
            let mut cmd = cargo();
            cmd.args(["build", "--release", "--target", WASM_TARGET]);
            cmd
        }
        WasmToolchain::Debian => {
            let mut cmd = Command::new(DEBIAN_CARGO);
            cmd.env("RUSTC", DEBIAN_RUSTC)
                .env("RUSTC_BOOTSTRAP", "1")
                .env("CARGO_TARGET_DIR", pkg.target_dir.join("wasm-debian"))
                .args(["build", "--release", "--target", WASM_TARGET])
                .arg("-Zbuild-std=std,panic_abort");
            cmd
        }
    };
    run_cargo(id, cmd, pkg, "WebAssembly module", &["wasm"])
}

/// Turns a core wasm module built with the SDK into a component of the contract's world.
pub fn componentize(id: &str, module: &[u8]) -> Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .module(module)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| {
            fail(
                id,
                format!("cannot make a component of the wasm module: {e:#}"),
            )
        })
}

/// Writes `bytes` to `dest` through a temporary file and a rename, so a library a process
/// still has mapped is replaced, never overwritten in place.
fn install(bytes: &[u8], dest: &Path) -> Result<()> {
    let name = dest
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("artifact");
    let tmp = dest.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Builds the plugin crate in `crate_dir` as `opts` asks, installs the builds and their
/// `plugin.toml`, and returns the manifest (its `kinds` are what the fresh build reports).
pub fn build(crate_dir: &Path, opts: &BuildOptions) -> Result<Manifest> {
    let pkg = read_package(crate_dir)?;
    let id = plugin_id(&pkg.name);
    if !opts.native && !opts.wasm {
        return Err(fail(
            &id,
            "nothing to build: ask for the native build, the wasm build or both",
        ));
    }
    let out_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| super::discover::plugin_dir().join(&id));
    // Find the toolchain before spending minutes on the native build.
    if opts.wasm {
        wasm_toolchain(&id, crate_dir)?;
    }
    let native = opts
        .native
        .then(|| build_native(&id, &pkg, opts.release))
        .transpose()?;
    let wasm = opts
        .wasm
        .then(|| build_wasm(&id, crate_dir, &pkg).and_then(|m| componentize(&id, &read(&m)?)))
        .transpose()?;

    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let mut artifacts = Artifacts::default();
    if let Some(lib) = &native {
        let name = lib
            .file_name()
            .map(PathBuf::from)
            .ok_or_else(|| fail(&id, format!("odd library path {}", lib.display())))?;
        let bytes = read(lib)?;
        install(&bytes, &out_dir.join(&name))?;
        artifacts.native = Some(name);
        artifacts.native_sha256 = Some(sha256_hex(&bytes));
    }
    if let Some(component) = &wasm {
        let name = PathBuf::from(format!("{id}.wasm"));
        install(component, &out_dir.join(&name))?;
        artifacts.wasm = Some(name);
        artifacts.wasm_sha256 = Some(sha256_hex(component));
    }
    let mut manifest = Manifest {
        id: id.clone(),
        version: pkg.version.clone(),
        kinds: Vec::new(),
        sdk_version: SDK_VERSION.to_string(),
        contract: CONTRACT_VERSION.to_string(),
        description: pkg.description.clone(),
        artifacts,
        limits: pkg.limits.unwrap_or_default(),
        dir: out_dir.clone(),
    };
    let metadata = built_metadata(&manifest)?;
    manifest.kinds = metadata.kinds;
    manifest.sdk_version = metadata.sdk_version;
    manifest.contract = metadata.contract;
    manifest.write(&out_dir)?;
    Ok(manifest)
}

/// The metadata of the fresh build: from the component when there is one (a fresh instance),
/// else from the native library.
fn built_metadata(manifest: &Manifest) -> Result<Metadata> {
    let id = manifest.id.as_str();
    let a = &manifest.artifacts;
    let json = if let Some(wasm) = &a.wasm {
        super::wasm::WasmPlugin::load(id, &manifest.artifact(wasm), manifest.limits)?
            .metadata_json()?
    } else if let Some(lib) = &a.native {
        super::native::NativePlugin::load(id, &manifest.artifact(lib))?.metadata_json()?
    } else {
        return Err(fail(id, "no build to read the metadata of"));
    };
    let metadata: Metadata = serde_json::from_str(&json)
        .map_err(|e| Error::plugin(id, "metadata", format!("unreadable metadata {json}: {e}")))?;
    super::check_contract(id, &metadata.contract)?;
    Ok(metadata)
}

/// The sha256 of `bytes` in lower-case hex (the manifest's artifact pins).
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_drop_the_whetstone_prefix() {
        assert_eq!(plugin_id("whetstone-lora"), "lora");
        assert_eq!(plugin_id("my-method"), "my-method");
        assert_eq!(plugin_id("whetstone-"), "whetstone-");
    }

    #[test]
    fn a_directory_without_a_crate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = build(dir.path(), &BuildOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a crate"), "{err}");
    }
}
