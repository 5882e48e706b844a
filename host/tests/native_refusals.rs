//! Native plugins that are not what they claim are refused before any of their hooks is called,
//! with an error naming the plugin, the file and what is wrong: a library without the entry
//! symbol, one built for another ABI version, one that refuses the host's version, one whose
//! vtable is too short, and a file that is no library at all. The libraries are small C files
//! compiled with the system C compiler (`cc`, which CI installs).

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use whetstone_host::plugin::native::NativePlugin;
use whetstone_sdk::abi::{ABI_VERSION, ENTRY_SYMBOL};

/// Compiles `source` into the shared library `dir/lib<name>.so`.
fn shared_library(dir: &Path, name: &str, source: &str) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, source).unwrap();
    let lib = dir.join(format!("lib{name}.so"));
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&c)
        .output()
        .expect("the system C compiler `cc` (apt-get install gcc libc6-dev)");
    assert!(
        out.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lib
}

/// A library whose entry point returns a vtable header of `abi_version` and `struct_size`
/// (`NULL` when `table` is false).
fn entry_library(
    dir: &Path,
    name: &str,
    table: bool,
    abi_version: u32,
    struct_size: u32,
) -> PathBuf {
    let body = if table {
        format!(
            "static const struct header table = {{ {abi_version}u, {struct_size}u }};\n\
             const void *{ENTRY_SYMBOL}(const void *host) {{ (void)host; return &table; }}\n"
        )
    } else {
        format!("const void *{ENTRY_SYMBOL}(const void *host) {{ (void)host; return 0; }}\n")
    };
    let source = format!(
        "#include <stdint.h>\nstruct header {{ uint32_t abi_version; uint32_t struct_size; }};\n{body}"
    );
    shared_library(dir, name, &source)
}

fn refusal(id: &str, path: &Path) -> String {
    match NativePlugin::load(id, path) {
        Ok(_) => panic!("{} must be refused", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn libraries_that_are_not_plugins_of_this_abi_are_refused_before_any_call() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "no-entry",
            shared_library(dir.path(), "noentry", "int unrelated(void) { return 0; }\n"),
            format!("no `{ENTRY_SYMBOL}` symbol"),
        ),
        (
            "other-abi",
            entry_library(dir.path(), "otherabi", true, 999, 8),
            format!("speaks native ABI version 999, this host speaks {ABI_VERSION}"),
        ),
        (
            "refuses",
            entry_library(dir.path(), "refuses", false, 0, 0),
            format!("refused host ABI version {ABI_VERSION}"),
        ),
        (
            "short-table",
            entry_library(dir.path(), "shorttable", true, ABI_VERSION, 8),
            "the plugin's vtable is 8 bytes".to_string(),
        ),
    ];
    for (id, path, expected) in cases {
        let err = refusal(id, &path);
        assert!(
            err.contains(&format!("plugin `{id}`: load"))
                && err.contains(&path.display().to_string())
                && err.contains(&expected),
            "{id}: {err}"
        );
    }
}

#[test]
fn a_file_that_is_no_library_gives_the_loaders_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libgarbage.so");
    std::fs::write(&path, b"this is not an ELF file").unwrap();
    let err = refusal("garbage", &path);
    assert!(
        err.contains("plugin `garbage`: load") && err.contains("cannot load the library"),
        "{err}"
    );
    let missing = dir.path().join("libmissing.so");
    let err = refusal("missing", &missing);
    assert!(err.contains("cannot open the library"), "{err}");
}
