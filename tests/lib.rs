//! Shared helpers of the workspace-level end-to-end tests (see `tests/tests/`).

use std::path::PathBuf;

/// The directory of a fetched asset, or a panic telling how to fetch it (tests only).
pub fn require_asset(name: &str) -> PathBuf {
    let dir = whetstone_host::assets::asset_dir(name);
    assert!(
        dir.exists(),
        "asset `{name}` is missing at {}: run `cargo run -p whetstone-host --bin whet -- assets fetch` first",
        dir.display()
    );
    dir
}

/// The repository root (for recipes under `examples/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `plugin.toml` of the first-party LoRA plugin's native build (see [`method_plugin`]).
pub fn lora_plugin() -> PathBuf {
    method_plugin("lora")
}

/// The `plugin.toml` of first-party plugin `id`'s native build (crate `whetstone-<id>` under
/// `plugins/`), built on first use with `cargo build -p whetstone-<id>` (dev profile) and
/// written beside the library (tests only; panics when the build fails).
pub fn method_plugin(id: &str) -> PathBuf {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static MANIFESTS: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    // Held while building: one cargo at a time, and every plugin is built once per process.
    let mut built = MANIFESTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    built
        .entry(id.to_string())
        .or_insert_with(|| build_plugin(id))
        .clone()
}

fn build_plugin(id: &str) -> PathBuf {
    let package = format!("whetstone-{id}");
    let target = package.replace('-', "_");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = std::process::Command::new(cargo)
        .current_dir(repo_root())
        .args([
            "build",
            "-p",
            &package,
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {package}: {e}"));
    assert!(output.status.success(), "building {package} failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let library = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == target.as_str())
        .flat_map(|m| {
            m["filenames"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|f| f.as_str().map(PathBuf::from))
        })
        .find(|f| {
            matches!(
                f.extension().and_then(|e| e.to_str()),
                Some("so" | "dylib" | "dll")
            )
        })
        .unwrap_or_else(|| panic!("cargo reported no native library for {package}"));
    let dir = library
        .parent()
        .unwrap_or_else(|| panic!("{} has no directory", library.display()))
        .join(format!("{package}-plugin"));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let manifest = format!(
        "id = \"{id}\"\nversion = \"0.1.0\"\nkinds = [\"method\"]\nsdk_version = \"0.1.0\"\n\
         contract = \"{}\"\n\n[artifacts]\nnative = {:?}\n",
        whetstone_host::plugin::HOST_CONTRACT,
        library.display().to_string()
    );
    // Written aside and renamed, so concurrent test binaries never read half a file.
    let path = dir.join("plugin.toml");
    let partial = dir.join(format!("plugin.toml.{}", std::process::id()));
    std::fs::write(&partial, manifest)
        .and_then(|()| std::fs::rename(&partial, &path))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}
