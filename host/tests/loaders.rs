//! Data-loader plugins through the host (each built native, and wasm when the toolchain is
//! there): every first-party loader reads its format into the records expected, identically
//! on both transports; `jsonl` and `csv` give exactly the records of the host's built-in
//! readers; bad records name file and line (or are skipped and counted); `chatterbot` reads the
//! real chatterbot corpus; and `whet data preview` over a ShareGPT file through the loader
//! trains the assistant turns only.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{json, Value};
use whetstone_host::data::records::{BadRecordPolicy, FieldMap};
use whetstone_host::data::sources::read_list;
use whetstone_host::data::{ChatMessage, DataConfig, Record, SourcedRecord};
use whetstone_host::plugin::conformance::{self, Status};
use whetstone_host::plugin::{Manifest, Plugin, PluginSpec, TransportKind};
use whetstone_host::Error;

mod common;

/// The loader plugins' builds, once per test binary each.
fn manifest(plugin: &'static str) -> &'static Manifest {
    static BUILT: OnceLock<std::sync::Mutex<Vec<(&'static str, &'static Manifest)>>> =
        OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, m)) = built.iter().find(|(id, _)| *id == plugin) {
        return m;
    }
    let m: &'static Manifest = Box::leak(Box::new(common::build_plugin(plugin, true)));
    built.push((plugin, m));
    m
}

/// A `[data]` section over `files`, read by loader `kind` configured by `config`.
fn loader_config(files: &[&Path], kind: &str, config: Value) -> DataConfig {
    let mut cfg = DataConfig::new(files.iter().map(|f| f.display().to_string()).collect());
    cfg.loader = Some(PluginSpec {
        kind: kind.into(),
        transport: TransportKind::Auto,
        config: config.as_object().cloned().unwrap_or_default(),
    });
    cfg
}

/// The records `cfg`'s train files give through loader `kind`, per transport (native first);
/// asserts both transports agree.
fn read(kind: &'static str, cfg: &DataConfig) -> whetstone_host::Result<Vec<SourcedRecord>> {
    let manifest = manifest(kind);
    let mut results = Vec::new();
    for transport in common::transports(manifest) {
        let plugin = Plugin::load(manifest, transport).unwrap();
        let fields = FieldMap::from_config(cfg);
        let mut policy = BadRecordPolicy::new(cfg.skip_bad_records);
        let records = read_list(&cfg.train, cfg, &fields, &mut policy, Some(&plugin));
        results.push((transport, records.map(|r| (r, policy.skipped))));
    }
    let (_, first) = results.remove(0);
    for (transport, other) in &results {
        match (&first, other) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{kind}: native and {transport:?} differ"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            (a, b) => panic!("{kind}: native gave {a:?}, {transport:?} gave {b:?}"),
        }
    }
    first.map(|(records, _)| records)
}

/// The records the host's built-in readers give for `cfg`.
fn read_built_in(cfg: &DataConfig) -> Vec<SourcedRecord> {
    let mut plain = cfg.clone();
    plain.loader = None;
    let fields = FieldMap::from_config(&plain);
    let mut policy = BadRecordPolicy::new(plain.skip_bad_records);
    read_list(&plain.train, &plain, &fields, &mut policy, None).unwrap()
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn chat(pairs: &[(&str, &str)]) -> Record {
    Record::Messages(
        pairs
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect(),
    )
}

#[test]
fn jsonl_gives_the_built_in_readers_records() {
    let dir = tempfile::tempdir().unwrap();
    let lines = write(
        dir.path(),
        "mixed.jsonl",
        "{\"review\":\"good\",\"stars\":\"positive\"}\n\n{\"prompt\":\"Q\",\"completion\":\"A\"}\n\
         {\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},{\"role\":\"assistant\",\"content\":\"yo\"}]}\n",
    );
    let array = write(
        dir.path(),
        "array.json",
        r#"[{"review": "bad", "stars": 0}, {"review": "fine", "stars": 1}]"#,
    );
    let mut cfg = loader_config(&[&lines, &array], "jsonl", json!({}));
    cfg.text_field = "review".into();
    cfg.label_field = "stars".into();
    cfg.label_names = vec!["negative".into(), "positive".into()];
    let records = read("jsonl", &cfg).unwrap();
    assert_eq!(records.len(), 5);
    assert_eq!(records, read_built_in(&cfg));
    assert_eq!(records[1].line, 3);
    assert_eq!(records[4].path, array);
    assert_eq!(
        records[0].record,
        Record::Text {
            text: "good".into(),
            label: Some(1)
        }
    );
}

#[test]
fn csv_and_tsv_give_the_built_in_readers_records() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write(
        dir.path(),
        "d.csv",
        "text,label\n\"hello, world\",1\n\"two\nlines\",0\n",
    );
    let cfg = loader_config(&[&csv], "csv", json!({}));
    let records = read("csv", &cfg).unwrap();
    assert_eq!(records, read_built_in(&cfg));
    assert_eq!(records.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 3]);

    let tsv = write(dir.path(), "d.tsv", "text\tlabel\nfine\t1\n");
    let cfg = loader_config(&[&tsv], "csv", json!({"delimiter": "\t"}));
    assert_eq!(read("csv", &cfg).unwrap(), read_built_in(&cfg));

    let headless = write(dir.path(), "h.csv", "great,1\nawful,0\n");
    let cfg = loader_config(&[&headless], "csv", json!({"columns": ["text", "label"]}));
    let records = read("csv", &cfg).unwrap();
    assert_eq!(
        records[1].record,
        Record::Text {
            text: "awful".into(),
            label: Some(0)
        }
    );
}

#[test]
fn sharegpt_alpaca_and_text_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let share = write(
        dir.path(),
        "share.jsonl",
        &format!(
            "{}\n",
            json!({"conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}
            ]})
        ),
    );
    let records = read("sharegpt", &loader_config(&[&share], "sharegpt", json!({}))).unwrap();
    assert_eq!(
        records[0].record,
        chat(&[
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello"),
            ("user", "Bye"),
            ("assistant", "Bye!")
        ])
    );

    let alpaca = write(
        dir.path(),
        "alpaca.json",
        r#"[{"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Greet.", "input": "", "output": "Hello."}]"#,
    );
    let records = read("alpaca", &loader_config(&[&alpaca], "alpaca", json!({}))).unwrap();
    assert_eq!(
        records[0].record,
        chat(&[("user", "Add.\n\n2 and 3"), ("assistant", "5")])
    );
    let records = read(
        "alpaca",
        &loader_config(&[&alpaca], "alpaca", json!({"template": "alpaca"})),
    )
    .unwrap();
    assert!(
        matches!(&records[1].record, Record::PromptCompletion { prompt, completion }
            if prompt.contains("### Instruction:\nGreet.") && completion == "Hello.")
    );

    let text = write(
        dir.path(),
        "corpus.txt",
        "First paragraph,\nstill first.\n\nSecond.\n",
    );
    let records = read("text", &loader_config(&[&text], "text", json!({}))).unwrap();
    let texts: Vec<(usize, &Record)> = records.iter().map(|r| (r.line, &r.record)).collect();
    assert_eq!(
        texts,
        [
            (
                1,
                &Record::Text {
                    text: "First paragraph,\nstill first.".into(),
                    label: None
                }
            ),
            (
                4,
                &Record::Text {
                    text: "Second.".into(),
                    label: None
                }
            )
        ]
    );
}

#[test]
fn every_loader_passes_the_conformance_checks() {
    let dir = tempfile::tempdir().unwrap();
    let samples = [
        ("jsonl", "s.jsonl", "{\"text\": \"a\"}\n{\"prompt\": \"p\", \"completion\": \"c\"}\n"),
        ("csv", "s.csv", "text,label\ngood,1\n"),
        (
            "sharegpt",
            "s.jsonl",
            "{\"conversations\": [{\"from\": \"human\", \"value\": \"Hi\"}, {\"from\": \"gpt\", \"value\": \"Yo\"}]}\n",
        ),
        ("alpaca", "s.jsonl", "{\"instruction\": \"Hi\", \"output\": \"Hello\"}\n"),
        ("text", "s.txt", "One.\n\nTwo.\n"),
        ("chatterbot", "s.yml", "conversations:\n- - Hi\n  - Hello\n"),
    ];
    for (id, name, content) in samples {
        let sample = write(dir.path(), &format!("{id}-{name}"), content);
        let report = conformance::check_with_data(manifest(id), &[], json!({}), &[sample]).unwrap();
        assert!(report.passed(), "{report}");
        let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
        let expected: &[&str] = if common::transports(manifest(id)).len() == 2 {
            &["load", "read", "load", "read", "native-wasm"]
        } else {
            &["load", "read"]
        };
        assert_eq!(names, expected, "{report}");
    }
    // Without samples a loader's read check fails, saying what to pass.
    let report = conformance::check_with_data(manifest("text"), &[], json!({}), &[]).unwrap();
    let failure = report.failures().next().unwrap();
    assert_eq!(
        (failure.name.as_str(), failure.status),
        ("read", Status::Fail)
    );
    assert!(failure.message.contains("--data"), "{report}");
}

#[test]
fn bad_records_name_file_and_line_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "share.jsonl",
        "{\"conversations\": [{\"from\": \"human\", \"value\": \"Hi\"}, {\"from\": \"gpt\", \"value\": \"Yo\"}]}\n\
         {\"conversations\": [{\"from\": \"robot\", \"value\": \"?\"}]}\n\
         {not json\n",
    );
    let mut cfg = loader_config(&[&file], "sharegpt", json!({}));
    match read("sharegpt", &cfg).unwrap_err() {
        Error::BadRecord {
            path,
            line,
            message,
        } => {
            assert_eq!((path.as_path(), line), (file.as_path(), 2));
            assert!(
                message.contains("robot") && message.contains("roles"),
                "{message}"
            );
        }
        other => panic!("unexpected {other}"),
    }
    cfg.skip_bad_records = true;
    assert_eq!(read("sharegpt", &cfg).unwrap().len(), 1);

    let cfg = loader_config(&[&file], "sharegpt", json!({"speakers": {}}));
    let err = read("sharegpt", &cfg).unwrap_err().to_string();
    assert!(
        err.contains("sharegpt") && err.contains("speakers"),
        "{err}"
    );
}

#[test]
fn chatterbot_reads_the_real_corpus() {
    let corpus = whetstone_host::assets::resolve_path("asset:chatterbot-corpus/english")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cfg = DataConfig::new(vec!["asset:chatterbot-corpus/english".into()]);
    cfg.loader = Some(PluginSpec {
        kind: "chatterbot".into(),
        transport: TransportKind::Auto,
        config: Default::default(),
    });
    // One conversation of trivia.yml is a string, not a list (PyYAML reads it so too).
    match read("chatterbot", &cfg).unwrap_err() {
        Error::BadRecord { path, message, .. } => {
            assert_eq!(path, corpus.join("trivia.yml"));
            assert!(message.contains("two little ducks"), "{message}");
        }
        other => panic!("unexpected {other}"),
    }
    cfg.skip_bad_records = true;
    let records = read("chatterbot", &cfg).unwrap();
    // Counted independently with PyYAML: 2,026 conversations in 21 files, one of them the
    // string above; 2,144 question/answer pairs in the others.
    let files: std::collections::BTreeSet<_> = records.iter().map(|r| &r.path).collect();
    assert_eq!(files.len(), 21);
    let pairs: usize = records
        .iter()
        .map(|r| match &r.record {
            Record::Messages(m) => m.len() / 2,
            other => panic!("not a conversation: {other:?}"),
        })
        .sum();
    assert_eq!((records.len(), pairs), (2025, 2144));
    let first = &records[0];
    assert_eq!(first.path, corpus.join("ai.yml"));
    assert_eq!(first.line, 5);
    assert_eq!(
        first.record,
        chat(&[
            ("user", "What is AI?"),
            (
                "assistant",
                "Artificial Intelligence is the branch of engineering and science devoted to \
                 constructing machines that think."
            )
        ])
    );
}

#[test]
fn data_preview_of_sharegpt_through_the_loader_trains_assistant_turns_only() {
    let manifest = manifest("sharegpt");
    let dir = tempfile::tempdir().unwrap();
    let data = write(
        dir.path(),
        "share.json",
        &json!([{"conversations": [
            {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "Another?"}, {"from": "gpt", "value": "Green."}
        ]}])
        .to_string(),
    );
    let recipe = write(
        dir.path(),
        "recipe.toml",
        &format!(
            "[model]\npath = \"asset:smollm2-135m-instruct\"\n[data]\ntrain = [\"{}\"]\n\
             validation_ratio = 0\n[data.loader]\nkind = \"sharegpt\"\n[output]\ndir = \"{}\"\n",
            data.display(),
            dir.path().join("out").display()
        ),
    );
    let manifest_path = manifest.dir.join("plugin.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_whet"))
        .args([
            "data",
            "preview",
            recipe.to_str().unwrap(),
            "--json",
            "--plugin",
        ])
        .arg(&manifest_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let spans = v["shown"][0]["spans"].as_array().unwrap();
    let trained: String = spans
        .iter()
        .filter(|s| s[1] == true)
        .map(|s| s[0].as_str().unwrap())
        .collect();
    assert_eq!(trained, "Blue.<|im_end|>\nGreen.<|im_end|>\n");
    let shown: String = spans.iter().map(|s| s[0].as_str().unwrap()).collect();
    assert!(
        shown.contains("<|im_start|>user\nName a colour.<|im_end|>"),
        "{shown}"
    );
}
