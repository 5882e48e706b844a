//! Where records come from: the files of a `[data] train` or `validation` list (a folder stands
//! for the files in it), read by the built-in formats ([`super::records`]) or by the recipe's
//! data-loader plugin ([`crate::plugin::loader`]), with `max_records` and `file_labels` applied.

use std::collections::HashMap;
use std::path::PathBuf;

use super::config::DataConfig;
use super::records::{read_records, BadRecordPolicy, FieldMap, Record, SourcedRecord};
use crate::plugin::loader::LoaderRead;
use crate::plugin::Plugin;
use crate::{Error, Result};

/// One data file of a list: the location as the recipe writes it, and the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFile {
    /// The entry of `train` / `validation` the file comes from (the folder, for a folder's files).
    pub location: String,
    /// The file.
    pub path: PathBuf,
}

/// The files of `locations`, in order: each `asset:` location resolved, each folder replaced by
/// the files in it (in name order, hidden files left out).
pub fn expand(locations: &[String]) -> Result<Vec<DataFile>> {
    let mut files = Vec::new();
    for location in locations {
        let path = crate::assets::resolve_path(location)?;
        if path.is_dir() {
            let mut inside: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(|e| Error::io(&path, e))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && !is_hidden(p))
                .collect();
            if inside.is_empty() {
                return Err(Error::config(format!(
                    "[data] dataset folder `{location}` ({}) holds no file",
                    path.display()
                )));
            }
            inside.sort();
            files.extend(inside.into_iter().map(|path| DataFile {
                location: location.clone(),
                path,
            }));
        } else if path.is_file() {
            files.push(DataFile {
                location: location.clone(),
                path,
            });
        } else {
            return Err(Error::config(format!(
                "[data] dataset file `{location}` not found"
            )));
        }
    }
    Ok(files)
}

fn is_hidden(path: &std::path::Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Reads the records of every file of `locations`: with `loader` (the recipe's `[data.loader]`
/// plugin) through one instance of it over all the files, else with the built-in formats. Stops
/// after `cfg.max_records` usable records; applies `cfg.file_labels`.
pub fn read_list(
    locations: &[String],
    cfg: &DataConfig,
    fields: &FieldMap,
    policy: &mut BadRecordPolicy,
    loader: Option<&Plugin>,
) -> Result<Vec<SourcedRecord>> {
    if locations.is_empty() {
        return Ok(Vec::new());
    }
    let files = expand(locations)?;
    let mut records = match (loader, &cfg.loader) {
        (Some(plugin), Some(spec)) => {
            read_with_loader(plugin, &spec.config_value(), &files, cfg, fields, policy)?
        }
        _ => read_built_in(&files, cfg, fields, policy)?,
    };
    apply_file_labels(&mut records, &files, cfg, fields)?;
    Ok(records)
}

fn read_built_in(
    files: &[DataFile],
    cfg: &DataConfig,
    fields: &FieldMap,
    policy: &mut BadRecordPolicy,
) -> Result<Vec<SourcedRecord>> {
    let mut records = Vec::new();
    for file in files {
        let remaining = cfg.max_records.map(|n| n.saturating_sub(records.len()));
        if remaining == Some(0) {
            break;
        }
        let format = cfg.format_of(&file.path)?;
        records.extend(read_records(&file.path, format, fields, policy, remaining)?);
    }
    Ok(records)
}

fn read_with_loader(
    plugin: &Plugin,
    config: &serde_json::Value,
    files: &[DataFile],
    cfg: &DataConfig,
    fields: &FieldMap,
    policy: &mut BadRecordPolicy,
) -> Result<Vec<SourcedRecord>> {
    let paths = files.iter().map(|f| f.path.clone()).collect();
    let mut read = LoaderRead::open(plugin, config, paths)?;
    let mut records = Vec::new();
    while cfg.max_records.is_none_or(|n| records.len() < n) {
        let Some(item) = read.next_item()? else {
            break;
        };
        let path = read.path(&item).to_path_buf();
        let record = item.content.and_then(|object| fields.record(&object));
        match record {
            Ok(record) => records.push(SourcedRecord {
                record,
                path,
                line: item.line,
            }),
            Err(message) => policy.bad(Error::BadRecord {
                path,
                line: item.line,
                message,
            })?,
        }
    }
    Ok(records)
}

/// The class id `[data] file_labels` gives each of `files` that it lists.
pub fn file_label_ids(
    files: &[DataFile],
    cfg: &DataConfig,
    fields: &FieldMap,
) -> Result<HashMap<PathBuf, Option<i64>>> {
    let mut label_of_path = HashMap::new();
    for file in files {
        if let Some(value) = cfg.file_labels.get(&file.location) {
            let id = fields.label_of(Some(value)).map_err(|e| {
                Error::config(format!("[data] file_labels.\"{}\": {e}", file.location))
            })?;
            label_of_path.insert(file.path.clone(), id);
        }
    }
    Ok(label_of_path)
}

/// Gives `record` its file's label from `label_of_path` ([`file_label_ids`]), if it has one.
pub fn relabel(
    record: &mut SourcedRecord,
    label_of_path: &HashMap<PathBuf, Option<i64>>,
) -> Result<()> {
    let Some(id) = label_of_path.get(&record.path) else {
        return Ok(());
    };
    match &mut record.record {
        Record::Text { label, .. } => *label = *id,
        _ => {
            return Err(record
                .error("[data] file_labels applies to {\"text\"} records only (classification)"))
        }
    }
    Ok(())
}

/// Gives every record of a file listed in `[data] file_labels` that file's label.
fn apply_file_labels(
    records: &mut [SourcedRecord],
    files: &[DataFile],
    cfg: &DataConfig,
    fields: &FieldMap,
) -> Result<()> {
    if cfg.file_labels.is_empty() {
        return Ok(());
    }
    let label_of_path = file_label_ids(files, cfg, fields)?;
    records
        .iter_mut()
        .try_for_each(|r| relabel(r, &label_of_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_expand_to_their_visible_files_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.jsonl"), "{\"text\":\"b\"}\n").unwrap();
        std::fs::write(dir.path().join("a.jsonl"), "{\"text\":\"a\"}\n").unwrap();
        std::fs::write(dir.path().join(".complete"), "").unwrap();
        let folder = dir.path().display().to_string();
        let files = expand(std::slice::from_ref(&folder)).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.path.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.jsonl", "b.jsonl"]);
        assert!(files.iter().all(|f| f.location == folder));

        let mut cfg = DataConfig::new(vec![folder.clone()]);
        cfg.file_labels.insert(folder.clone(), serde_json::json!(1));
        let fields = FieldMap::from_config(&cfg);
        let mut policy = BadRecordPolicy::new(false);
        let records = read_list(&cfg.train, &cfg, &fields, &mut policy, None).unwrap();
        assert_eq!(records.len(), 2);
        assert!(records
            .iter()
            .all(|r| matches!(r.record, Record::Text { label: Some(1), .. })));

        let empty = tempfile::tempdir().unwrap();
        let err = expand(&[empty.path().display().to_string()]).unwrap_err();
        assert!(err.to_string().contains("holds no file"), "{err}");
        let err = expand(&["/no/such/file.jsonl".to_string()]).unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
    }
}
