//! The conformance suite (`plugin::conformance`, `whet plugin check`) on the first-party LoRA
//! plugin, a configuration that selects nothing, and a crate freshly scaffolded by
//! `whet plugin new`.
//!
//! LoRA is built natively, and for wasm32 too when this machine has the toolchain (then the
//! native == wasm check runs as well); `WHETSTONE_REQUIRE_WASM` (set by CI) makes a missing
//! toolchain a failure.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::json;
use whetstone_host::plugin::build::{self, BuildOptions};
use whetstone_host::plugin::conformance::{self, Status};
use whetstone_host::plugin::{Manifest, TransportKind};

/// The LoRA plugin built into a temporary plugin folder, once per test binary.
fn lora() -> &'static Manifest {
    static BUILT: OnceLock<(tempfile::TempDir, Manifest)> = OnceLock::new();
    let (_, manifest) = BUILT.get_or_init(|| {
        let wasm = build::wasm_toolchain_available();
        if !wasm {
            let why = build::missing_wasm_toolchain();
            assert!(
                std::env::var_os("WHETSTONE_REQUIRE_WASM").is_none(),
                "{why}"
            );
            eprintln!("checking the native build only: {why}");
        }
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/lora");
        let out = tempfile::tempdir().unwrap();
        let opts = BuildOptions {
            native: true,
            wasm,
            out_dir: Some(out.path().to_path_buf()),
            release: false,
        };
        let start = Instant::now();
        let manifest = build::build(&crate_dir, &opts).unwrap();
        eprintln!("built the LoRA plugin in {:.1?}", start.elapsed());
        (out, manifest)
    });
    manifest
}

#[test]
fn lora_passes_every_check_on_every_build() {
    let manifest = lora();
    let config = json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]});
    let report = conformance::check(manifest, &[], config).unwrap();
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
    let per_build = [
        "load",
        "attach",
        "inject",
        "forward",
        "handles",
        "gradients",
        "frozen",
        "merge",
        "save-load",
    ];
    for kind in &report.transports {
        for name in per_build {
            let c = report
                .checks
                .iter()
                .find(|c| c.name == name && c.transport == Some(*kind))
                .unwrap_or_else(|| panic!("no `{name}` check for {kind:?}:\n{report}"));
            assert_eq!(c.status, Status::Pass, "{report}");
        }
        // q_proj and v_proj of both layers of the tiny model.
        let inject = report
            .checks
            .iter()
            .find(|c| c.name == "inject" && c.transport == Some(*kind))
            .unwrap();
        assert_eq!(inject.figure, Some(4.0), "{report}");
    }
    if report.transports.len() == 2 {
        let cross = report.checks.iter().find(|c| c.name == "native-wasm");
        assert_eq!(cross.map(|c| c.status), Some(Status::Pass), "{report}");
    }
}

#[test]
fn targets_that_match_nothing_fail_naming_target_modules() {
    let config = json!({"r": 4, "target_modules": ["no_such_proj"]});
    let report = conformance::check(lora(), &[TransportKind::Native], config).unwrap();
    assert!(!report.passed(), "{report}");
    let failure = report.failures().next().unwrap();
    assert_eq!(failure.name, "attach", "{report}");
    assert!(failure.message.contains("target_modules"), "{report}");
    // The display names the failure too.
    assert!(report.to_string().contains("FAIL"), "{report}");
}

/// `whet plugin new` scaffolds a crate that builds (offline, against this repository's sdk) and
/// passes `whet plugin check` on its native build.
#[test]
fn a_scaffolded_plugin_builds_and_passes_the_check() {
    let tmp = tempfile::tempdir().unwrap();
    let whet = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_whet"))
            .args(args)
            .env("WHETSTONE_PLUGIN_DIR", tmp.path().join("plugins"))
            .env("CARGO_NET_OFFLINE", "true")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let parent = tmp.path().to_str().unwrap();
    let (ok, text) = whet(&["plugin", "new", "demo-method", "--dir", parent]);
    assert!(ok, "{text}");
    let crate_dir = tmp.path().join("demo-method");
    let cargo_toml = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    assert!(
        cargo_toml.contains("crate-type = [\"cdylib\"]"),
        "{cargo_toml}"
    );
    assert!(cargo_toml.contains("[workspace]"), "{cargo_toml}");
    assert!(cargo_toml.contains("path = "), "{cargo_toml}");
    assert!(crate_dir.join("README.md").is_file());
    let (again, text) = whet(&["plugin", "new", "demo-method", "--dir", parent]);
    assert!(!again && text.contains("already exists"), "{text}");

    let start = Instant::now();
    let config = r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}"#;
    let (ok, text) = whet(&[
        "plugin",
        "check",
        crate_dir.to_str().unwrap(),
        "--native",
        "--config",
        config,
    ]);
    eprintln!(
        "built and checked the scaffold in {:.1?}:\n{text}",
        start.elapsed()
    );
    assert!(ok, "{text}");
    assert!(text.contains("0 failed"), "{text}");
    let manifest = Manifest::read(&tmp.path().join("plugins/demo-method")).unwrap();
    assert_eq!(manifest.id, "demo-method");
}
