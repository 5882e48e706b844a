//! The checks of a data-loader plugin, on sample files the user names (`whet plugin check
//! --data FILE`): it is created from its configuration (`create`), reads every file to the end,
//! yielding at least one record and only records of a known shape or bad records (`read`),
//! and, when both builds are checked, yields the same items from both (`native-wasm`).

use std::path::PathBuf;

use serde_json::{Map, Value};

use super::Outcome;
use crate::plugin::loader::{LoadedItem, LoaderRead};
use crate::plugin::Plugin;
use crate::Result;

/// Everything one build yielded.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderTrace {
    /// The items in order.
    pub items: Vec<LoadedItem>,
}

/// Most items read from the samples (a guard against a loader that never ends).
pub const MAX_ITEMS: usize = 1_000_000;

/// Reads every item of `files` with `plugin`'s loader configured by `config`.
pub fn trace(plugin: &Plugin, config: &Value, files: &[PathBuf]) -> Result<LoaderTrace> {
    let mut read = LoaderRead::open(plugin, config, files.to_vec())?;
    let mut items = Vec::new();
    while let Some(item) = read.next_item()? {
        items.push(item);
        if items.len() > MAX_ITEMS {
            return Err(crate::Error::plugin(
                plugin.id(),
                "next-record",
                format!("yielded more than {MAX_ITEMS} items from the samples without ending"),
            ));
        }
    }
    Ok(LoaderTrace { items })
}

/// The shape of a record under the standard field names, if it has one.
fn shape(record: &Map<String, Value>) -> Option<&'static str> {
    let has = |key: &str| record.get(key).is_some_and(|v| !v.is_null());
    if has("messages") {
        Some("messages")
    } else if has("prompt") && has("completion") {
        Some("prompt/completion")
    } else if has("text") {
        Some("text")
    } else {
        None
    }
}

/// The `read` check: records were yielded, each positioned at a line of a sample.
pub fn read(trace: &LoaderTrace) -> Outcome {
    let records = trace.items.iter().filter(|i| i.content.is_ok()).count();
    let bad = trace.items.len() - records;
    if records == 0 {
        return Outcome::fail(0.0, format!("no record from the samples ({bad} bad)"));
    }
    if let Some(item) = trace.items.iter().find(|i| i.line == 0) {
        return Outcome::fail(
            records as f64,
            format!("an item of file {} has line 0; lines start at 1", item.file),
        );
    }
    let mut shapes = std::collections::BTreeMap::<&str, usize>::new();
    for item in &trace.items {
        if let Ok(record) = &item.content {
            *shapes
                .entry(shape(record).unwrap_or("other fields"))
                .or_default() += 1;
        }
    }
    let shapes: Vec<String> = shapes.iter().map(|(s, n)| format!("{n} {s}")).collect();
    Outcome::pass(
        records as f64,
        format!("{records} records ({}), {bad} bad", shapes.join(", ")),
    )
}

/// The `native-wasm` check: both builds yielded the same items.
pub fn compare(native: &LoaderTrace, wasm: &LoaderTrace) -> Outcome {
    let n = native.items.len() as f64;
    match native
        .items
        .iter()
        .zip(&wasm.items)
        .position(|(a, b)| a != b)
    {
        Some(i) => Outcome::fail(
            i as f64,
            format!(
                "item {} differs: native {:?}, wasm {:?}",
                i + 1,
                native.items[i],
                wasm.items[i]
            ),
        ),
        None if native.items.len() != wasm.items.len() => Outcome::fail(
            n,
            format!(
                "native yielded {} items, wasm {}",
                native.items.len(),
                wasm.items.len()
            ),
        ),
        None => Outcome::pass(n, "identical items"),
    }
}
