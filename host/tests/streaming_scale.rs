//! A dataset larger than it should be held in memory: a generated JSON-lines file is streamed
//! through one epoch of tokenization (`whet data scan`, MiniLM's tokenizer) with a peak RSS
//! under 300 MB, and every record is counted. Its own test binary, so that the peak RSS is the
//! scan's alone.
//!
//! The file is 256 MiB by default, which already holds more text and tokens than fit in the
//! limit beside the model (in memory, the records and their tokens alone would take about
//! 400 MB). `WHETSTONE_STREAM_TEST_MB=1024` runs it at 1 GiB (about 3 minutes on 2 cores):
//! 4.7 M records, 172 M tokens, peak RSS 200 MiB when measured.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::Command;

const RSS_LIMIT_MB: f64 = 300.0;

/// The size of the generated file in bytes (`WHETSTONE_STREAM_TEST_MB`, default 256 MiB).
fn target_bytes() -> u64 {
    let mb = std::env::var("WHETSTONE_STREAM_TEST_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(256);
    mb << 20
}

#[test]
fn a_large_json_lines_file_streams_in_bounded_memory() {
    whetstone_host::assets::resolve_path("asset:all-minilm-l6-v2")
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("big.jsonl");
    let words = [
        "the", "film", "was", "great", "awful", "plot", "acting", "service", "food", "slow",
        "quick", "friendly", "never", "again", "loved", "it", "battery", "screen", "works",
        "broke",
    ];
    let mut file =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&data).unwrap());
    let mut written = 0u64;
    let mut records = 0usize;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let target = target_bytes();
    while written < target {
        let mut text = String::new();
        let n = 20 + (state % 30) as usize;
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            text.push_str(words[(state % words.len() as u64) as usize]);
            text.push(' ');
        }
        let line = format!(
            "{{\"text\": \"{}\", \"label\": {}}}\n",
            text.trim_end(),
            state % 2
        );
        file.write_all(line.as_bytes()).unwrap();
        written += line.len() as u64;
        records += 1;
    }
    file.flush().unwrap();
    drop(file);
    // `whet data scan` streams the data whether or not the recipe sets `streaming`.
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = \"asset:all-minilm-l6-v2\"\ntask = \"classification\"\nnum_labels = 2\n\
             [data]\ntrain = [\"{}\"]\nvalidation_ratio = 0\nmax_seq_len = 64\n\
             [output]\ndir = \"{}\"\n",
            data.display(),
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_whet"))
        .args(["data", "scan", recipe.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{written} bytes, {records} records: {report}");
    assert_eq!(report["records"], records);
    assert_eq!(report["examples"], records);
    let peak = report["peak_rss_mb"].as_f64().unwrap();
    assert!(
        peak < RSS_LIMIT_MB,
        "peak RSS {peak:.0} MiB over {written} bytes"
    );
}
