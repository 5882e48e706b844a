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
