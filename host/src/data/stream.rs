//! Streamed training data (`[data] streaming = true`): each epoch reads the training files
//! again (built-in formats a buffer at a time, or through the `[data.loader]` plugin), tokenizes
//! chunks of records in parallel on the way, packs when asked, and shuffles through a bounded
//! buffer seeded by the run's seed and the epoch. Memory stays bounded by the shuffle buffer and
//! a chunk, whatever the size of the files, and an epoch is the same sequence of batches every
//! time it is read (so a resumed run skips to exactly where it stopped).
//!
//! Held-out examples stay in memory: the `validation` files, or, without them, the records a
//! seeded hash of their file and line puts in the `validation_ratio` share (read in one pass
//! when the data is prepared; the stream leaves them out).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use super::config::DataConfig;
use super::instruct::{self, AnswerExample};
use super::records::{entries, record_of, BadRecordPolicy, FieldMap, Record, SourcedRecord};
use super::sources::{expand, file_label_ids, read_list, relabel, DataFile};
use super::tokenize::{pack, Encoder, Example, Packer};
use crate::model::load::{LoadedModel, SpecialTokens};
use crate::model::TaskKind;
use crate::plugin::loader::LoaderRead;
use crate::plugin::Plugin;
use crate::{Error, Result};

/// Records tokenized together (in parallel).
const CHUNK: usize = 512;

/// Counts of a streamed epoch, shared with the caller.
#[derive(Debug, Default)]
pub struct StreamCounts {
    /// Records read.
    pub records: AtomicUsize,
    /// Bad records skipped.
    pub skipped: AtomicUsize,
    /// Examples cut to `max_seq_len`.
    pub truncated: AtomicUsize,
    /// Examples yielded (after packing).
    pub examples: AtomicUsize,
    /// Tokens of the yielded examples.
    pub tokens: AtomicUsize,
}

impl StreamCounts {
    fn add(counter: &AtomicUsize, n: usize) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A counter's value.
    pub fn get(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::Relaxed)
    }
}

/// Training data read from the files anew each epoch, and the held-out examples.
pub struct StreamingData {
    cfg: DataConfig,
    fields: FieldMap,
    encoder: Encoder,
    eos: Option<u32>,
    loader: Option<Plugin>,
    files: Vec<DataFile>,
    /// Whether held-out records are chosen by hash (and left out of the stream).
    hash_split: bool,
    /// Held-out examples.
    pub validation: Vec<Example>,
    /// With `instruction_template`: the held-out questions and their answers.
    pub answers: Vec<AnswerExample>,
    /// Classification: the number of classes (`label_names`' length), when named.
    pub label_count: Option<usize>,
    /// Bad held-out records skipped.
    pub validation_skipped: usize,
}

impl std::fmt::Debug for StreamingData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingData")
            .field("files", &self.files.len())
            .field("validation", &self.validation.len())
            .finish()
    }
}

/// Whether the record at `line` of `path` is held out: a seeded hash (FNV-1a) of file and line
/// below `ratio`. Stable across runs, platforms and versions.
pub fn held_out(seed: u64, path: &Path, line: usize, ratio: f64) -> bool {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let name = path.to_string_lossy();
    for byte in seed
        .to_le_bytes()
        .iter()
        .chain(name.as_bytes())
        .chain(&(line as u64).to_le_bytes())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // The top 53 bits as a fraction in [0, 1).
    ((hash >> 11) as f64 / (1u64 << 53) as f64) < ratio
}

/// Prepares streamed training data for `loaded`: checks the configuration, collects the held-out
/// examples; the training examples come from [`StreamingData::epoch`].
pub fn prepare_streaming(
    cfg: &DataConfig,
    loaded: &LoadedModel,
    plugins: &[PathBuf],
) -> Result<StreamingData> {
    prepare_streaming_with(
        cfg,
        loaded.model.task(),
        &loaded.tokenizer,
        loaded.special,
        loaded.chat_template.as_deref(),
        plugins,
    )
}

/// [`prepare_streaming`] from the parts of a model it needs.
pub fn prepare_streaming_with(
    cfg: &DataConfig,
    task: TaskKind,
    tokenizer: &tokenizers::Tokenizer,
    special: SpecialTokens,
    chat_template: Option<&str>,
    plugins: &[PathBuf],
) -> Result<StreamingData> {
    super::prepare::check_task(cfg, task)?;
    let loader = cfg
        .loader
        .as_ref()
        .map(|spec| spec.load(plugins))
        .transpose()?;
    let encoder = Encoder::new(
        task,
        tokenizer,
        special,
        chat_template,
        cfg.loss_on,
        cfg.max_seq_len,
        !cfg.packing,
    )?;
    let fields = FieldMap::from_config(cfg);
    let files = expand(&cfg.train)?;
    let hash_split = cfg.validation.is_empty() && cfg.validation_ratio > 0.0;
    let mut data = StreamingData {
        cfg: cfg.clone(),
        fields,
        encoder,
        eos: special.eos,
        loader,
        files,
        hash_split,
        validation: Vec::new(),
        answers: Vec::new(),
        label_count: match task {
            TaskKind::SequenceClassification { .. } if !cfg.label_names.is_empty() => {
                Some(cfg.label_names.len())
            }
            _ => None,
        },
        validation_skipped: 0,
    };
    let mut policy = BadRecordPolicy::new(cfg.skip_bad_records);
    let held_out = if hash_split {
        let mut held_out = Vec::new();
        for record in data.records(RecordFilter::HeldOut)? {
            match record {
                Ok(Some(record)) => held_out.push(record),
                Ok(None) => {}
                Err(e @ Error::BadRecord { .. }) => policy.bad(e)?,
                Err(e) => return Err(e),
            }
        }
        held_out
    } else {
        read_list(
            &cfg.validation,
            cfg,
            &data.fields,
            &mut policy,
            data.loader.as_ref(),
        )?
    };
    let (held_out, answers) = data.conversations(held_out)?;
    let (mut validation, _) = super::prepare::encode_all(&data.encoder, &held_out, &mut policy)?;
    if cfg.packing {
        validation = pack(validation, cfg.max_seq_len, special.eos);
    }
    data.validation = validation;
    data.answers = answers;
    data.validation_skipped = policy.skipped;
    tracing::info!(
        files = data.files.len(),
        validation = data.validation.len(),
        shuffle_buffer = cfg.shuffle_buffer,
        "streaming the training data"
    );
    Ok(data)
}

/// Which records [`StreamingData::records`] yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecordFilter {
    /// The training records (without the hash-held-out ones).
    Train,
    /// Only the hash-held-out records.
    HeldOut,
}

impl StreamingData {
    /// The streamed training examples of `epoch`, in the order batches take them; `counts`
    /// (when given) follows what was read.
    pub fn epoch(
        &self,
        epoch: usize,
        seed: u64,
        counts: Option<Arc<StreamCounts>>,
    ) -> Result<EpochStream<'_>> {
        let records = self.records(RecordFilter::Train)?;
        let epoch_seed = seed ^ (epoch as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Ok(EpochStream {
            data: self,
            records,
            policy: BadRecordPolicy::new(self.cfg.skip_bad_records),
            packer: self
                .cfg
                .packing
                .then(|| Packer::new(self.cfg.max_seq_len, self.eos)),
            ready: Vec::new(),
            buffer: Vec::with_capacity(self.cfg.shuffle_buffer.min(1 << 20)),
            rng: StdRng::seed_from_u64(epoch_seed),
            read_all: false,
            counts: counts.unwrap_or_default(),
        })
    }

    /// The record stream of the training files (`None` items are records filtered out; a bad
    /// record is an [`Error::BadRecord`] item, for the consumer's [`BadRecordPolicy`]).
    fn records(
        &self,
        filter: RecordFilter,
    ) -> Result<Box<dyn Iterator<Item = Result<Option<SourcedRecord>>> + '_>> {
        let labels = file_label_ids(&self.files, &self.cfg, &self.fields)?;
        let raw: Box<dyn Iterator<Item = Result<RawRecord>> + '_> = match &self.loader {
            Some(plugin) => {
                let config = self
                    .cfg
                    .loader
                    .as_ref()
                    .map(|s| s.config_value())
                    .unwrap_or_default();
                let paths: Vec<PathBuf> = self.files.iter().map(|f| f.path.clone()).collect();
                let read = LoaderRead::open(plugin, &config, paths.clone())?;
                Box::new(read.map(move |item| {
                    item.map(|item| RawRecord {
                        path: paths[item.file].clone(),
                        line: item.line,
                        record: item.content.and_then(|object| self.fields.record(&object)),
                    })
                }))
            }
            None => {
                let mut files = Vec::with_capacity(self.files.len());
                for file in &self.files {
                    files.push((file.path.clone(), self.cfg.format_of(&file.path)?));
                }
                Box::new(files.into_iter().flat_map(move |(path, format)| {
                    let entries = match entries(&path, format) {
                        Ok(entries) => entries,
                        Err(e) => {
                            return Box::new(std::iter::once(Err(e))) as Box<dyn Iterator<Item = _>>
                        }
                    };
                    Box::new(entries.map(move |entry| {
                        entry.map(|(line, value)| RawRecord {
                            path: path.clone(),
                            line,
                            record: value.and_then(|v| record_of(&self.fields, v)),
                        })
                    }))
                }))
            }
        };
        let ratio = self.cfg.validation_ratio;
        let seed = self.cfg.split_seed;
        let hash_split = self.hash_split;
        let usable = std::rc::Rc::new(std::cell::Cell::new(0usize));
        let limit = self.cfg.max_records;
        let counted = usable.clone();
        let records = raw
            .take_while(move |_| limit.is_none_or(|n| counted.get() < n))
            .map(move |raw| {
                let raw = raw?;
                let is_held_out = hash_split && held_out(seed, &raw.path, raw.line, ratio);
                let wanted = match filter {
                    RecordFilter::Train => !is_held_out,
                    RecordFilter::HeldOut => is_held_out,
                };
                if !wanted {
                    return Ok(None);
                }
                let mut record = match raw.record {
                    Ok(record) => SourcedRecord {
                        record,
                        path: raw.path,
                        line: raw.line,
                    },
                    Err(message) => {
                        return Err(Error::BadRecord {
                            path: raw.path,
                            line: raw.line,
                            message,
                        })
                    }
                };
                relabel(&mut record, &labels)?;
                usable.set(usable.get() + 1);
                Ok(Some(record))
            });
        Ok(Box::new(records))
    }

    /// Records turned into conversations by `instruction_template` (when set).
    fn conversations(
        &self,
        records: Vec<SourcedRecord>,
    ) -> Result<(Vec<SourcedRecord>, Vec<AnswerExample>)> {
        match &self.cfg.instruction_template {
            Some(template) => instruct::to_conversations(records, template, &self.cfg.label_names),
            None => Ok((records, Vec::new())),
        }
    }
}

/// A record as read, before it is checked.
struct RawRecord {
    path: PathBuf,
    line: usize,
    record: std::result::Result<Record, String>,
}

/// The examples of one streamed epoch ([`StreamingData::epoch`]), shuffled.
pub struct EpochStream<'a> {
    data: &'a StreamingData,
    records: Box<dyn Iterator<Item = Result<Option<SourcedRecord>>> + 'a>,
    policy: BadRecordPolicy,
    packer: Option<Packer>,
    /// Tokenized examples waiting for the shuffle buffer.
    ready: Vec<Example>,
    buffer: Vec<Example>,
    rng: StdRng,
    read_all: bool,
    counts: Arc<StreamCounts>,
}

impl EpochStream<'_> {
    /// Reads and tokenizes the next chunk of records into `ready`; false at the end.
    fn fill(&mut self) -> Result<bool> {
        let mut chunk = Vec::with_capacity(CHUNK);
        while chunk.len() < CHUNK {
            match self.records.next() {
                None => break,
                Some(Ok(Some(record))) => chunk.push(record),
                Some(Ok(None)) => {}
                Some(Err(e @ Error::BadRecord { .. })) => {
                    self.policy.bad(e)?;
                    StreamCounts::add(&self.counts.skipped, 1);
                }
                Some(Err(e)) => return Err(e),
            }
        }
        if chunk.is_empty() {
            if let Some(packer) = self.packer.take() {
                self.ready.extend(packer.finish());
            }
            return Ok(false);
        }
        StreamCounts::add(&self.counts.records, chunk.len());
        let (chunk, _) = self.data.conversations(chunk)?;
        let encoded: Vec<_> = chunk
            .par_iter()
            .map(|r| self.data.encoder.encode(r))
            .collect();
        for result in encoded {
            match result {
                Ok(e) => {
                    StreamCounts::add(&self.counts.truncated, usize::from(e.truncated));
                    match &mut self.packer {
                        Some(packer) => packer.push(e.example, &mut self.ready),
                        None => self.ready.push(e.example),
                    }
                }
                Err(error) => {
                    self.policy.bad(error)?;
                    StreamCounts::add(&self.counts.skipped, 1);
                }
            }
        }
        Ok(true)
    }

    /// The next example, shuffled.
    fn next_example(&mut self) -> Result<Option<Example>> {
        let capacity = self.data.cfg.shuffle_buffer;
        loop {
            if let Some(example) = self.ready.pop() {
                if self.buffer.len() < capacity {
                    self.buffer.push(example);
                    continue;
                }
                let i = self.rng.random_range(0..self.buffer.len());
                return Ok(Some(std::mem::replace(&mut self.buffer[i], example)));
            }
            if !self.read_all {
                // Examples come out of `ready` last first; reverse to keep record order.
                self.read_all = !self.fill()?;
                self.ready.reverse();
                continue;
            }
            if self.buffer.is_empty() {
                return Ok(None);
            }
            let i = self.rng.random_range(0..self.buffer.len());
            return Ok(Some(self.buffer.swap_remove(i)));
        }
    }
}

impl Iterator for EpochStream<'_> {
    type Item = Result<Example>;

    fn next(&mut self) -> Option<Self::Item> {
        let next = self.next_example().transpose()?;
        if let Ok(example) = &next {
            StreamCounts::add(&self.counts.examples, 1);
            StreamCounts::add(&self.counts.tokens, example.input_ids.len());
        }
        Some(next)
    }
}
