//! The embedding session on the real all-MiniLM-L6-v2 (the asset) with the LoRA plugin: chunked
//! training equals its figures across calls, adapters switch by name without disturbing each
//! other, a written merge is non-destructive and reloads with the same predictions, and a
//! session from parts trains once configured. Needs `whet assets fetch` and the LoRA plugin.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use whetstone_host::session::{Session, TrainStatus, OWN_METHOD_NAME};

/// Writes 48 short sentiment records to `dir/data.jsonl` and returns the `[data]` section.
fn data_section(dir: &Path) -> String {
    let data = dir.join("data.jsonl");
    let lines: Vec<String> = (0..48)
        .map(|i| {
            let (text, label) = if i % 2 == 0 {
                (format!("a wonderful, great film number {i}"), 1)
            } else {
                (format!("a terrible, boring film number {i}"), 0)
            };
            serde_json::json!({"text": text, "label": label}).to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    format!(
        "[data]\ntrain = [\"{}\"]\nvalidation_ratio = 0.25\nmax_seq_len = 16\n",
        data.display()
    )
}

fn recipe(dir: &Path) -> String {
    format!(
        r#"
[model]
path = "asset:all-minilm-l6-v2"
task = "classification"
{}
[method]
kind = "lora"
r = 4
target_modules = ["query", "value"]
modules_to_save = ["classifier"]
[training]
batch_size = 8
epochs = 2
learning_rate = 3e-3
[output]
dir = "{}"
"#,
        data_section(dir),
        dir.join("own").display()
    )
}

#[test]
fn adapters_switch_by_name_and_merges_reload_with_the_same_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Session::from_recipe_text(&recipe(dir.path()), Vec::new()).unwrap();
    let start = s.evaluate().unwrap();

    // Training in two calls: a paused chunk, then the rest.
    let first = s.train(Some(4), None, None).unwrap();
    assert_eq!(
        (first.status, first.step, first.total_steps),
        (TrainStatus::Paused, 4, 10)
    );
    let rest = s.train(None, None, None).unwrap();
    assert_eq!((rest.status, rest.step), (TrainStatus::Finished, 10));
    let trained = s.evaluate().unwrap();
    assert_ne!(trained.loss, start.loss);

    // The saved adapter loads under another name and computes the same.
    let saved = dir.path().join("saved");
    s.save_adapter(&saved).unwrap();
    s.load_adapter(&saved, "copy").unwrap();
    assert_eq!(s.active_adapter_name(), Some("copy"));
    let copy = s.evaluate().unwrap();
    assert!(
        (copy.loss - trained.loss).abs() < 1e-5,
        "{copy:?} vs {trained:?}"
    );
    let err = s.train(Some(1), None, None).unwrap_err().to_string();
    assert!(
        err.contains("only the session's own method trains"),
        "{err}"
    );

    // Back to the own method, train more: the loaded copy keeps its own values.
    s.set_adapter(Some(OWN_METHOD_NAME)).unwrap();
    assert!((s.evaluate().unwrap().loss - trained.loss).abs() < 1e-5);
    s.configure(&format!(
        "{{\"output\": {{\"dir\": \"{}\"}}, \"training\": {{\"seed\": 3}}}}",
        dir.path().join("more").display()
    ))
    .unwrap();
    s.train(Some(3), None, None).unwrap();
    let more = s.evaluate().unwrap();
    assert_ne!(more.loss, trained.loss);
    s.set_adapter(Some("copy")).unwrap();
    assert!((s.evaluate().unwrap().loss - trained.loss).abs() < 1e-5);
    s.set_adapter(Some(OWN_METHOD_NAME)).unwrap();
    assert!((s.evaluate().unwrap().loss - more.loss).abs() < 1e-5);

    // A merge is written without changing the session.
    let merged = dir.path().join("merged");
    s.write_merged(&merged).unwrap();
    assert!((s.evaluate().unwrap().loss - more.loss).abs() < 1e-5);
    // The merged model, opened from parts (no method) and given the data, predicts the same.
    let mut m = Session::from_parts(merged.to_str().unwrap(), None, Vec::new()).unwrap();
    assert!(m.train(Some(1), None, None).is_err(), "nothing to train");
    m.configure(&data_section(dir.path())).unwrap();
    let reloaded = m.evaluate().unwrap();
    assert!(
        (reloaded.loss - more.loss).abs() < 1e-4 && reloaded.accuracy == more.accuracy,
        "{reloaded:?} vs {more:?}"
    );

    // Removing the copy: the name is gone; detaching the own method leaves the base model.
    s.remove_adapter("copy").unwrap();
    assert!(s.set_adapter(Some("copy")).is_err());
    s.detach_method().unwrap();
    assert_eq!(s.active_adapter_name(), None);
    assert!(s.train(Some(1), None, None).is_err());
}

#[test]
fn embeddings_are_pooled_normalised_and_batched_consistently() {
    let mut s = Session::from_parts("asset:all-minilm-l6-v2", None, Vec::new()).unwrap();
    assert_eq!(s.embedding_dim().unwrap(), 384);
    let texts = [
        "A wonderful film.",
        "A great movie!",
        "My phone battery died.",
    ];
    let e = s.embed(&texts, true).unwrap();
    assert_eq!((e.dim, e.values.len()), (384, 3 * 384));
    let row = |i: usize| &e.values[i * 384..(i + 1) * 384];
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    assert!((dot(row(0), row(0)) - 1.0).abs() < 1e-4);
    assert!(dot(row(0), row(1)) > dot(row(0), row(2)));
    // One text alone embeds as it does in a padded batch.
    let alone = s.embed(&texts[2..], true).unwrap();
    for (a, b) in alone.values.iter().zip(row(2)) {
        assert!((a - b).abs() < 1e-5);
    }
    // A causal LM asset is not an encoder; generation on an encoder is refused.
    let err = s
        .generate("hi", &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a causal language model"), "{err}");
    assert!(s.evaluate().is_err(), "no data configured");
    let err = s
        .configure("{\"method\": {\"kind\": \"lora\"}}")
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot change in an open session"), "{err}");
    let err = s.configure("[datas]\ntrain = []").unwrap_err().to_string();
    assert!(err.contains("unknown section `datas`"), "{err}");
}
