//! Direct calls into the host beyond tensor ops: parameters, mode, step, logging and the data
//! files a data loader may read.
//!
//! Most plugins only need [`crate::Linear`]'s methods; these are for model-level parameters
//! (prompt tuning, prefix tuning), penalties over base weights and their gradients (EWC) and data
//! loaders.

use crate::sys;
use crate::types::{Init, Mode};
use crate::{Result, Tensor};

/// Creates a trainable parameter saved under the PEFT key `<module>.<name>` (just `<name>` when
/// `module` is empty) and returns its current value.
pub fn add_param(module: &str, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
    Ok(Tensor::from_handle(sys::add_param(
        module, name, shape, init,
    )?))
}

/// The current value of a parameter this plugin created with [`add_param`].
pub fn param(module: &str, name: &str) -> Result<Tensor> {
    Ok(Tensor::from_handle(sys::param(module, name)?))
}

/// The current value of a base-model parameter (e.g. `model.layers.0.self_attn.q_proj.weight`).
pub fn base_param(name: &str) -> Result<Tensor> {
    Ok(Tensor::from_handle(sys::base_param(name)?))
}

/// The gradient of the data loss with respect to `param` (a value from [`param`] or
/// [`base_param`]) while the host handles an [`crate::Event::TaskGradient`]; `None` when the
/// parameter got no gradient (frozen, or not part of the forward pass). Asking at any other time
/// is an error.
pub fn grad(param: &Tensor) -> Result<Option<Tensor>> {
    Ok(sys::grad(param.handle())?.map(Tensor::from_handle))
}

/// Whether the host is training or evaluating.
pub fn mode() -> Mode {
    sys::mode()
}

/// The optimizer step being computed (0 before the first).
pub fn step() -> u64 {
    sys::step()
}

/// Log levels for [`log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something failed.
    Error = 0,
    /// Something looks wrong.
    Warn = 1,
    /// Progress worth telling the user.
    Info = 2,
    /// Detail for debugging.
    Debug = 3,
    /// Very fine detail.
    Trace = 4,
}

/// Writes a line to the host's log, attributed to this plugin.
pub fn log(level: Level, message: &str) {
    sys::log(level as u8, message);
}

/// A data file the user named for this run (data loaders only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataFile {
    index: u32,
}

impl DataFile {
    /// The file's index among [`data_files`].
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The name the user gave.
    pub fn name(&self) -> Result<String> {
        sys::file_name(self.index)
    }

    /// Up to `len` bytes from `offset` (fewer at the end of the file).
    pub fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>> {
        sys::read_file(self.index, offset, len)
    }

    /// The whole file.
    pub fn read_to_end(&self) -> Result<Vec<u8>> {
        const CHUNK: u32 = 1 << 20;
        let mut bytes = Vec::new();
        loop {
            let chunk = self.read(bytes.len() as u64, CHUNK)?;
            let done = chunk.len() < CHUNK as usize;
            bytes.extend_from_slice(&chunk);
            if done {
                return Ok(bytes);
            }
        }
    }
}

/// The data files the user named, in order.
pub fn data_files() -> Vec<DataFile> {
    (0..sys::file_count())
        .map(|index| DataFile { index })
        .collect()
}
