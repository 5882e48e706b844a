//! The committed C header `include/whetstone.h` is what cbindgen generates from this crate.
//! Run with `WHETSTONE_BLESS=1` to rewrite it after an API change (and raise
//! `WHETSTONE_ABI_VERSION` when the change is incompatible).

use std::path::Path;

#[test]
fn c_header_matches_the_library() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_crate(dir)
        .generate()
        .expect("cbindgen generates the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("utf-8 header");
    let path = dir.join("include/whetstone.h");
    if std::env::var_os("WHETSTONE_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write header");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale: regenerate it with `WHETSTONE_BLESS=1 cargo test -p whetstone-capi --test c_header`",
        path.display()
    );
    assert!(generated.contains("#define WHETSTONE_ABI_VERSION 1"));
}
