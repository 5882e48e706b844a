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

/// The `plugin.toml` of the first-party LoRA plugin's native build, built on first use with
/// `cargo build -p whetstone-lora` (dev profile) and written beside the library (tests only;
/// panics when the build fails).
pub fn lora_plugin() -> PathBuf {
    static MANIFEST: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MANIFEST.get_or_init(build_lora_plugin).clone()
}

fn build_lora_plugin() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = std::process::Command::new(cargo)
        .current_dir(repo_root())
        .args([
            "build",
            "-p",
            "whetstone-lora",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the LoRA plugin: {e}"));
    assert!(output.status.success(), "building whetstone-lora failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let library = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "whetstone_lora")
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
        .unwrap_or_else(|| panic!("cargo reported no native library for whetstone-lora"));
    let dir = library
        .parent()
        .unwrap_or_else(|| panic!("{} has no directory", library.display()))
        .join("whetstone-lora-plugin");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let manifest = format!(
        "id = \"lora\"\nversion = \"0.1.0\"\nkinds = [\"method\"]\nsdk_version = \"0.1.0\"\n\
         contract = \"0.1\"\n\n[artifacts]\nnative = {:?}\n",
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
