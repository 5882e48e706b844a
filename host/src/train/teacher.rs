//! The teacher of knowledge distillation (Hinton, Vinyals and Dean 2015, "Distilling the
//! Knowledge in a Neural Network"): a second, frozen model whose logits for every training batch
//! go to the loss plugin as soft targets. It reads the student's token ids, so it must share the
//! student's tokenizer, and its logits must have the student's shape (vocabulary or classes).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint;
use crate::model::load::{LoadedModel, ModelSpec};
use crate::model::{Batch, Mode, Model};
use crate::plugin::method::MethodAdapter;
use crate::{Error, Result};

/// The `[teacher]` section of a recipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherSpec {
    /// The teacher model, with `[model]`'s fields (`path`, `task`, `num_labels`, ...).
    pub model: ModelSpec,
    /// A checkpoint of a run (`runs/x/best`) whose trained tensors replace the teacher's, e.g.
    /// a fully fine-tuned classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// A PEFT adapter directory attached to the teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
}

/// A loaded teacher.
pub struct Teacher {
    model: Box<dyn Model>,
    /// Keeps an attached adapter's hooks alive.
    _adapter: Option<Arc<MethodAdapter>>,
}

impl std::fmt::Debug for Teacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Teacher")
            .field("architecture", &self.model.architecture())
            .finish()
    }
}

/// Text both tokenizers must split identically.
const TOKENIZER_PROBE: &str = "The quick brown fox jumps over the lazy dog; it cost $12.50!";

impl Teacher {
    /// Loads the teacher `spec` describes on `device`, frozen, and checks that it reads token ids
    /// the way `student_tokenizer` writes them.
    pub fn load(
        spec: &TeacherSpec,
        device: &Device,
        seed: u64,
        plugins: &[PathBuf],
        student_tokenizer: &tokenizers::Tokenizer,
    ) -> Result<Teacher> {
        if spec.checkpoint.is_some() && spec.adapter.is_some() {
            return Err(Error::config(
                "[teacher] takes a checkpoint or an adapter, not both",
            ));
        }
        let LoadedModel {
            model,
            tokenizer,
            source,
            ..
        } = crate::model::load::load(&spec.model, device, seed)?;
        same_tokenizer(&tokenizer, student_tokenizer, &source)?;
        model.params().freeze_all()?;
        if let Some(dir) = &spec.checkpoint {
            restore(model.as_ref(), dir, device)?;
        }
        let adapter = spec
            .adapter
            .as_ref()
            .map(|dir| {
                crate::adapter::load(
                    model.as_ref(),
                    dir,
                    crate::adapter::DEFAULT_ADAPTER_NAME,
                    plugins,
                )
            })
            .transpose()?;
        tracing::info!(
            teacher = %source.display(),
            params = model.params().num_params(),
            "loaded the teacher"
        );
        Ok(Teacher {
            model,
            _adapter: adapter,
        })
    }

    /// A teacher from a model already in memory (its parameters are frozen).
    pub fn new(model: Box<dyn Model>) -> Result<Teacher> {
        model.params().freeze_all()?;
        Ok(Teacher {
            model,
            _adapter: None,
        })
    }

    /// The teacher's model.
    pub fn model(&self) -> &dyn Model {
        self.model.as_ref()
    }

    /// The teacher's logits for `batch`, without gradient.
    pub fn logits(&self, batch: &Batch) -> Result<Tensor> {
        let logits = self
            .model()
            .forward(&batch.input_ids, &batch.attention_mask, Mode::Eval)?;
        Ok(logits.detach())
    }
}

/// Refuses a teacher whose tokenizer splits text differently from the student's.
fn same_tokenizer(
    teacher: &tokenizers::Tokenizer,
    student: &tokenizers::Tokenizer,
    source: &Path,
) -> Result<()> {
    let ids = |t: &tokenizers::Tokenizer| {
        t.encode(TOKENIZER_PROBE, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::config(format!("tokenizing a probe text: {e}")))
    };
    if teacher.get_vocab_size(true) != student.get_vocab_size(true)
        || ids(teacher)? != ids(student)?
    {
        return Err(Error::config(format!(
            "the teacher {} does not share the student's tokenizer (vocabulary {} against {}); \
             distillation feeds both the same token ids",
            source.display(),
            teacher.get_vocab_size(true),
            student.get_vocab_size(true)
        )));
    }
    Ok(())
}

/// Copies the tensors of the checkpoint in `dir` into `model`.
fn restore(model: &dyn Model, dir: &Path, device: &Device) -> Result<()> {
    let ckpt = checkpoint::load(dir, device)?;
    for (name, value) in &ckpt.params {
        let param = model.params().get(name).map_err(|_| {
            Error::config(format!(
                "teacher checkpoint {} holds `{name}`, which the teacher model does not have",
                dir.display()
            ))
        })?;
        param.set_value(value)?;
    }
    Ok(())
}
