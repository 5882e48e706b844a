//! A loss plugin attached to a model: the training objective computed by a plugin from the
//! logits, the labels, the loss mask and, when the recipe has a teacher, the teacher's logits.
//!
//! The host aligns what it hands over, so a loss never deals with padding or shifting:
//!
//! - classification: logits `[batch, classes]`, labels and mask `[batch]`;
//! - causal LM: logits `[batch, seq - 1, vocab]` and labels and mask `[batch, seq - 1]`, already
//!   shifted (the label at `t` is the token the logits at `t` predict).
//!
//! Labels are `u32` class or token ids, 0 where the mask is 0 (prompt, padding); the mask is
//! `f32`, 1 where the position counts. Teacher logits have the logits' shape and carry no
//! gradient.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use whetstone_sdk::PluginKind;

use super::method::model_device;
use super::session::Session;
use super::Plugin;
use crate::model::{Model, TaskKind};
use crate::ops::IGNORE_INDEX;
use crate::{Error, Result};

/// A loss plugin instance attached to a model.
pub struct LossAdapter {
    plugin: Plugin,
    instance: u32,
    session: Arc<Session>,
    task: TaskKind,
}

impl std::fmt::Debug for LossAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossAdapter")
            .field("plugin", &self.plugin.id())
            .field("instance", &self.instance)
            .finish()
    }
}

/// Logits, labels and teacher logits aligned for a loss (see the module docs).
#[derive(Debug)]
pub struct Aligned {
    /// The student's logits.
    pub logits: Tensor,
    /// `u32` ids, 0 where masked.
    pub labels: Tensor,
    /// `f32`, 1 where the position counts.
    pub mask: Tensor,
    /// The teacher's logits, shaped like `logits`.
    pub teacher: Option<Tensor>,
}

/// Aligns a batch's logits, labels (as [`Model::loss`] takes them: `-100` marks ignored
/// positions) and teacher logits for a loss of a model doing `task`.
pub fn align(
    task: TaskKind,
    logits: &Tensor,
    labels: &Tensor,
    teacher: Option<&Tensor>,
) -> Result<Aligned> {
    if let Some(t) = teacher {
        if t.dims() != logits.dims() {
            return Err(Error::config(format!(
                "the teacher's logits are {:?} but the student's are {:?}; the teacher must have \
                 the student's vocabulary or classes",
                t.dims(),
                logits.dims()
            )));
        }
    }
    let (logits, labels, teacher) = match task {
        TaskKind::SequenceClassification { .. } => {
            (logits.clone(), labels.clone(), teacher.cloned())
        }
        TaskKind::CausalLm => {
            let (_, s, _) = logits.dims3()?;
            if s < 2 {
                return Err(Error::config(format!(
                    "a causal LM loss needs sequences of at least 2 tokens, got {s}"
                )));
            }
            let shift = |t: &Tensor| t.narrow(1, 0, s - 1);
            (
                shift(logits)?,
                labels.narrow(1, 1, s - 1)?,
                teacher.map(shift).transpose()?,
            )
        }
    };
    let labels = labels.to_dtype(DType::I64)?;
    let valid = labels.ne(IGNORE_INDEX)?;
    let mask = valid.to_dtype(DType::F32)?;
    let labels = valid
        .where_cond(&labels, &labels.zeros_like()?)?
        .to_dtype(DType::U32)?;
    Ok(Aligned {
        logits,
        labels,
        mask,
        teacher: teacher.map(|t| t.detach()),
    })
}

impl LossAdapter {
    /// Creates `plugin`'s loss, configured by `config`, for `model`.
    pub fn attach(
        model: &dyn Model,
        plugin: Plugin,
        config: serde_json::Value,
    ) -> Result<Arc<LossAdapter>> {
        if !plugin.provides(PluginKind::Loss) {
            return Err(Error::plugin(
                plugin.id(),
                "attach",
                format!("provides {:?}, not a loss", plugin.metadata.kinds),
            ));
        }
        let session = Arc::new(Session::new(
            model_device(model),
            model.params().clone(),
            model.forward_context(),
        ));
        let transport = plugin.transport.clone();
        let instance = {
            let _exclusive = transport.exclusive();
            transport.set_session(Some(session.clone()));
            transport.create_loss(&config.to_string())?
        };
        Ok(Arc::new(LossAdapter {
            plugin,
            instance,
            session,
            task: model.task(),
        }))
    }

    /// The plugin's id.
    pub fn id(&self) -> &str {
        self.plugin.id()
    }

    /// The loss of a batch: `logits` and `labels` as the model produces and the data gives
    /// them, `teacher` the teacher's logits for the same batch.
    pub fn loss(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        teacher: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.loss_for(self.task, logits, labels, teacher)
    }

    /// [`LossAdapter::loss`] for logits of a model doing `task`.
    pub fn loss_for(
        &self,
        task: TaskKind,
        logits: &Tensor,
        labels: &Tensor,
        teacher: Option<&Tensor>,
    ) -> Result<Tensor> {
        let a = align(task, logits, labels, teacher)?;
        let transport = &self.plugin.transport;
        let _exclusive = transport.exclusive();
        transport.set_session(Some(self.session.clone()));
        let loss = transport.compute_loss(
            self.instance,
            &a.logits,
            &a.labels,
            &a.mask,
            a.teacher.as_ref(),
        )?;
        if loss.elem_count() != 1 {
            return Err(Error::plugin(
                self.plugin.id(),
                "compute-loss",
                format!("returned a tensor of shape {:?}, not a scalar", loss.dims()),
            ));
        }
        let loss = loss.reshape(())?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() && all_finite(&a.logits)? {
            return Err(Error::plugin(
                self.plugin.id(),
                "compute-loss",
                format!("returned {value} for finite logits"),
            ));
        }
        Ok(loss)
    }
}

/// Whether every element of `t` is finite: `x - x` is 0 for finite `x` and NaN (which is
/// `!= 0`) for NaN and ±∞.
fn all_finite(t: &Tensor) -> Result<bool> {
    let not_finite = t.sub(t)?.ne(0f64)?;
    Ok(not_finite.flatten_all()?.max(0)?.to_scalar::<u8>()? == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn all_finite_spots_nan_and_infinities() {
        let d = Device::Cpu;
        let finite = Tensor::new(&[[1f32, -2.5], [0.0, 3e38]], &d).unwrap();
        assert!(all_finite(&finite).unwrap());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = Tensor::new(&[[1f32, bad], [0.0, 2.0]], &d).unwrap();
            assert!(!all_finite(&t).unwrap(), "{bad}");
        }
    }

    #[test]
    fn causal_lm_batches_are_shifted_and_masked() {
        let d = Device::Cpu;
        let logits = Tensor::arange(0f32, 2. * 3. * 4., &d)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let labels = Tensor::new(&[[5i64, 1, 2], [5, -100, 3]], &d).unwrap();
        let a = align(TaskKind::CausalLm, &logits, &labels, Some(&logits)).unwrap();
        assert_eq!(a.logits.dims(), &[2, 2, 4]);
        assert_eq!(
            a.labels.to_vec2::<u32>().unwrap(),
            vec![vec![1, 2], vec![0, 3]]
        );
        assert_eq!(
            a.mask.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 1.0], vec![0.0, 1.0]]
        );
        assert_eq!(a.teacher.unwrap().dims(), &[2, 2, 4]);
        let wrong = Tensor::zeros((2, 3, 5), DType::F32, &d).unwrap();
        let err = align(TaskKind::CausalLm, &logits, &labels, Some(&wrong));
        assert!(err.unwrap_err().to_string().contains("vocabulary"));
    }

    #[test]
    fn classification_batches_pass_through() {
        let d = Device::Cpu;
        let logits = Tensor::zeros((3, 2), DType::F32, &d).unwrap();
        let labels = Tensor::new(&[1i64, 0, 1], &d).unwrap();
        let task = TaskKind::SequenceClassification { num_labels: 2 };
        let a = align(task, &logits, &labels, None).unwrap();
        assert_eq!(a.labels.to_vec1::<u32>().unwrap(), vec![1, 0, 1]);
        assert_eq!(a.mask.to_vec1::<f32>().unwrap(), vec![1.0, 1.0, 1.0]);
        assert!(a.teacher.is_none());
    }
}
