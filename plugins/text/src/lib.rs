//! A data loader for plain text, for language-model training: each document becomes a
//! `{"text"}` record, which the host tokenizes and (with `[data] packing = true`) packs into
//! fixed-length chunks. Files are streamed line by line, so a file larger than memory is fine.
//!
//! What a document is (`split`): a paragraph, i.e. lines up to a blank line (default); a single
//! non-empty line; or a whole file. Each record is positioned at its first line.
//!
//! ```toml
//! [data]
//! train = ["corpus/"]
//! packing = true
//! [data.loader]
//! kind = "text"
//! split = "paragraph"
//! ```

use serde_json::json;
use whetstone_sdk::loader::{EachFile, FileItems};
use whetstone_sdk::prelude::*;

/// What one document is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Lines up to a blank line.
    #[default]
    Paragraph,
    /// One non-empty line.
    Line,
    /// A whole file.
    File,
}

/// The loader's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    /// `paragraph` (default), `line` or `file`.
    #[serde(default)]
    pub split: Split,
}

/// The plain-text loader.
pub struct Text {
    items: EachFile,
}

impl DataLoader for Text {
    type Config = TextConfig;

    fn new(config: TextConfig) -> Result<Self> {
        let items = EachFile::new(move |file| {
            let lines = file
                .lines()
                .map(|line| line.map(|(at, text)| (at.line, text)));
            let documents = documents(lines, config.split).map(move |doc| {
                doc.map(|(line, text)| {
                    Item::from_value(json!({"text": text}), Position::new(file, line))
                })
            });
            Ok(Box::new(documents) as FileItems)
        });
        Ok(Text { items })
    }

    fn config_fields() -> Vec<ConfigField> {
        vec![ConfigField::new(
            "split",
            "\"paragraph\" | \"line\" | \"file\"",
            "paragraph",
            "what one document is",
        )]
    }

    fn next_record(&mut self) -> Result<Option<Item>> {
        self.items.next_item()
    }
}

/// The documents of numbered lines: each one's first line and text (lines joined by `\n`).
pub fn documents<I>(lines: I, split: Split) -> Documents<I>
where
    I: Iterator<Item = Result<(u64, String)>>,
{
    Documents { lines, split }
}

/// The iterator of [`documents`].
pub struct Documents<I> {
    lines: I,
    split: Split,
}

impl<I: Iterator<Item = Result<(u64, String)>>> Iterator for Documents<I> {
    type Item = Result<(u64, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut document: Option<(u64, String)> = None;
        for line in self.lines.by_ref() {
            let (number, text) = match line {
                Ok(line) => line,
                Err(e) => return Some(Err(e)),
            };
            let blank = text.trim().is_empty();
            match (&mut document, blank) {
                (None, true) => continue,
                (None, false) => document = Some((number, text)),
                (Some(_), true) if self.split == Split::Paragraph => break,
                (Some((_, doc)), _) => {
                    doc.push('\n');
                    doc.push_str(&text);
                }
            }
            if self.split == Split::Line {
                break;
            }
        }
        if let Some((_, doc)) = &mut document {
            let end = doc.trim_end().len();
            doc.truncate(end);
        }
        document.map(Ok)
    }
}

whetstone_sdk::register_loader!(Text);

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str, split: Split) -> Vec<(u64, String)> {
        let lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| Ok((i as u64 + 1, l.to_string())));
        documents(lines, split).map(|d| d.unwrap()).collect()
    }

    #[test]
    fn paragraphs_lines_and_files() {
        let text = "\nOne a.\nOne b.\n\n\nTwo.\n  \nThree.\n";
        assert_eq!(
            split(text, Split::Paragraph),
            [
                (2, "One a.\nOne b.".to_string()),
                (6, "Two.".into()),
                (8, "Three.".into())
            ]
        );
        assert_eq!(split(text, Split::Line).len(), 4);
        assert_eq!(
            split(text, Split::File),
            [(2, "One a.\nOne b.\n\n\nTwo.\n  \nThree.".to_string())]
        );
        assert!(split("\n \n", Split::Paragraph).is_empty());
    }
}
