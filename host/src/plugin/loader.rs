//! A data-loader plugin reading the user's data files: the host hands it the files of one list
//! (`[data] train` or `validation`), and it yields records one at a time.
//!
//! The loader sees only those files, through `read-file` (a WebAssembly loader has no other
//! access to the filesystem). Each item it yields crosses the boundary as a JSON object in the
//! wire form of `whetstone_sdk::loader::Item`: the record's fields plus `"$position"` (file index
//! and line), or `"$error"` for a record the loader could not read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value};
use whetstone_sdk::loader::{ERROR_KEY, POSITION_KEY};
use whetstone_sdk::PluginKind;

use super::session::Session;
use super::Plugin;
use crate::{Error, Result};

/// One item a loader yielded, located in the host's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedItem {
    /// The record's fields, or why it is bad.
    pub content: std::result::Result<Map<String, Value>, String>,
    /// Index of the data file it came from (into [`LoaderRead::files`]).
    pub file: usize,
    /// 1-based line or record number in that file.
    pub line: usize,
}

/// A data-loader plugin instance reading a list of files.
pub struct LoaderRead {
    plugin: Plugin,
    instance: u32,
    session: Arc<Session>,
    files: Vec<PathBuf>,
    /// Items yielded so far (the line of an item without a position).
    count: usize,
    done: bool,
}

impl std::fmt::Debug for LoaderRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoaderRead")
            .field("plugin", &self.plugin.id())
            .field("files", &self.files)
            .field("count", &self.count)
            .finish()
    }
}

impl LoaderRead {
    /// Creates `plugin`'s loader, configured by `config`, over `files`.
    pub fn open(plugin: &Plugin, config: &Value, files: Vec<PathBuf>) -> Result<LoaderRead> {
        if !plugin.provides(PluginKind::DataLoader) {
            return Err(Error::plugin(
                plugin.id(),
                "create-loader",
                format!(
                    "provides {:?}, not a data loader; name a loader plugin in [data.loader] kind",
                    plugin.metadata.kinds
                ),
            ));
        }
        let session = Arc::new(Session::for_files(files.clone()));
        let transport = plugin.transport.clone();
        let instance = {
            let _exclusive = transport.exclusive();
            transport.set_session(Some(session.clone()));
            transport.create_loader(&config.to_string())?
        };
        Ok(LoaderRead {
            plugin: plugin.clone(),
            instance,
            session,
            files,
            count: 0,
            done: false,
        })
    }

    /// The files the loader reads, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The file of an item.
    pub fn path(&self, item: &LoadedItem) -> &Path {
        &self.files[item.file]
    }

    /// The next item, or `None` at the end of the data.
    pub fn next_item(&mut self) -> Result<Option<LoadedItem>> {
        if self.done {
            return Ok(None);
        }
        let wire = {
            let transport = &self.plugin.transport;
            let _exclusive = transport.exclusive();
            transport.set_session(Some(self.session.clone()));
            transport.next_record(self.instance)?
        };
        let Some(wire) = wire else {
            self.done = true;
            return Ok(None);
        };
        self.count += 1;
        self.parse(&wire)
            .map(Some)
            .map_err(|message| Error::plugin(self.plugin.id(), "next-record", message))
    }

    /// An item from its wire form.
    fn parse(&self, wire: &str) -> std::result::Result<LoadedItem, String> {
        let value: Value = serde_json::from_str(wire)
            .map_err(|e| format!("yielded text that is not JSON ({e}): {}", excerpt(wire)))?;
        let Value::Object(mut object) = value else {
            return Err(format!(
                "yielded {} instead of a record object",
                excerpt(wire)
            ));
        };
        let (file, line) = match object.remove(POSITION_KEY) {
            None => (0, self.count),
            Some(position) => self.position(&position)?,
        };
        let content = match object.remove(ERROR_KEY) {
            None => Ok(object),
            Some(Value::String(message)) => Err(message),
            Some(other) => Err(format!("the loader reported a bad record: {other}")),
        };
        Ok(LoadedItem {
            content,
            file,
            line,
        })
    }

    /// File index and line of a `"$position"` value.
    fn position(&self, position: &Value) -> std::result::Result<(usize, usize), String> {
        let field = |name: &str| position.get(name).and_then(Value::as_u64);
        let (Some(file), Some(line)) = (field("file"), field("line")) else {
            return Err(format!(
                "yielded a `{POSITION_KEY}` of {position}; it must be {{\"file\": N, \"line\": N}}"
            ));
        };
        let file = file as usize;
        if file >= self.files.len() {
            return Err(format!(
                "yielded a record of data file {file}, but it was given {} file(s)",
                self.files.len()
            ));
        }
        Ok((file, line as usize))
    }
}

impl Iterator for LoaderRead {
    type Item = Result<LoadedItem>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_item().transpose()
    }
}

/// The start of `text`, for messages.
fn excerpt(text: &str) -> String {
    const MAX: usize = 120;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}
