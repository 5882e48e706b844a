//! The embedding examples run end to end: `examples/c-embed` (built with make and the system C
//! compiler) and `examples/python-ctypes`, each fine-tuning MiniLM with LoRA on 400 Amazon
//! sentences through libwhetstone.so and asserting on accuracy, the saved adapter, embeddings,
//! cancellation and misuse. Needs the assets and the LoRA plugin, as CI installs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The examples run one at a time: each trains with every core, and two at once would only
/// slow each other down.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The directory holding libwhetstone.so: the profile directory of this test binary
/// (`target/debug/deps/examples-*` → `target/debug`).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    assert!(
        dir.join("libwhetstone.so").is_file(),
        "{} has no libwhetstone.so: build it with `cargo build -p whetstone-capi`",
        dir.display()
    );
    dir
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_c_example_fine_tunes_saves_embeds_and_cancels() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let lib = library_dir();
    let build = tempfile::tempdir().unwrap();
    let binary = build.path().join("fine_tune");
    let example = repo().join("examples/c-embed");
    run(Command::new("make")
        .arg("-C")
        .arg(&example)
        .arg(format!("WHETSTONE_LIB_DIR={}", lib.display()))
        .arg(format!("BIN={}", binary.display()))
        .arg(&binary));
    let out = tempfile::tempdir().unwrap();
    let stdout = run(Command::new(&binary).arg(out.path()));
    println!("{stdout}");
    assert!(stdout.contains("c-embed: all checks passed"), "{stdout}");
    assert!(out.path().join("adapter/adapter_config.json").is_file());
}

#[test]
fn the_python_ctypes_example_fine_tunes_saves_embeds_and_cancels() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let lib = library_dir().join("libwhetstone.so");
    let out = tempfile::tempdir().unwrap();
    let stdout = run(Command::new("python3")
        .arg(repo().join("examples/python-ctypes/fine_tune.py"))
        .arg(out.path())
        .env("WHETSTONE_LIB", &lib));
    println!("{stdout}");
    assert!(
        stdout.contains("python-ctypes: all checks passed"),
        "{stdout}"
    );
}
