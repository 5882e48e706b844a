//! Named model parameters that are either frozen (plain tensors, never given a gradient) or
//! trainable (candle [`Var`]s), and the store that holds them under their Hugging Face names.
//!
//! Trainability can change during a run (gradual unfreezing): a [`Param`] is shared by the model
//! code (which reads it at every forward) and by the trainer (which flips it and collects the
//! trainable ones for the optimizer).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use candle_core::{Device, Tensor, Var};

use crate::quant::QuantizedMatrix;
use crate::{Error, Result};

/// The current state of one parameter.
#[derive(Debug, Clone)]
enum State {
    /// A constant tensor: the model reads it, autograd never tracks it.
    Frozen(Tensor),
    /// A variable that receives gradients.
    Trainable(Var),
    /// A frozen matrix kept in quantized blocks (QLoRA's base weights): linear layers multiply
    /// by it tile by tile ([`crate::ops::quantized_linear`]); it never trains.
    Quantized(Arc<QuantizedMatrix>),
}

/// One named parameter.
#[derive(Debug)]
pub struct Param {
    name: String,
    state: RwLock<State>,
}

impl Param {
    /// A new frozen parameter.
    pub fn frozen(name: impl Into<String>, value: Tensor) -> Self {
        Self {
            name: name.into(),
            state: RwLock::new(State::Frozen(value)),
        }
    }

    /// A new frozen parameter held in quantized blocks.
    pub fn quantized(name: impl Into<String>, value: Arc<QuantizedMatrix>) -> Self {
        Self {
            name: name.into(),
            state: RwLock::new(State::Quantized(value)),
        }
    }

    /// The Hugging Face name, e.g. `model.layers.3.self_attn.q_proj.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn read(&self) -> State {
        // A poisoned lock only means another thread panicked while swapping the state; the
        // state itself is always a complete value, so reading it is sound.
        match self.state.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn write(&self, state: State) {
        match self.state.write() {
            Ok(mut guard) => *guard = state,
            Err(poisoned) => *poisoned.into_inner() = state,
        }
    }

    /// The value to compute with: the variable's tensor when trainable, the constant otherwise.
    /// A quantized parameter is dequantized to a new f32 tensor on every call (for merging,
    /// saving and inspection; linear layers multiply by its blocks instead, see
    /// [`Param::quantized_matrix`]).
    #[allow(clippy::expect_used)]
    pub fn tensor(&self) -> Tensor {
        match self.read() {
            State::Frozen(t) => t,
            State::Trainable(v) => v.as_tensor().clone(),
            State::Quantized(m) => m.dequantize().expect(
                "a quantized matrix dequantizes: its shape and bytes were checked when it was built",
            ),
        }
    }

    /// The quantized blocks, when the parameter is held quantized.
    pub fn quantized_matrix(&self) -> Option<Arc<QuantizedMatrix>> {
        match self.read() {
            State::Quantized(m) => Some(m),
            _ => None,
        }
    }

    /// The shape (without dequantizing a quantized parameter).
    pub fn dims(&self) -> Vec<usize> {
        match self.read() {
            State::Frozen(t) => t.dims().to_vec(),
            State::Trainable(v) => v.as_tensor().dims().to_vec(),
            State::Quantized(m) => {
                let (rows, cols) = m.dims();
                vec![rows, cols]
            }
        }
    }

    /// The device the value lives on (quantized blocks live on the CPU).
    pub fn device(&self) -> Device {
        match self.read() {
            State::Frozen(t) => t.device().clone(),
            State::Trainable(v) => v.as_tensor().device().clone(),
            State::Quantized(_) => Device::Cpu,
        }
    }

    /// The variable, when the parameter is trainable.
    pub fn var(&self) -> Option<Var> {
        match self.read() {
            State::Frozen(_) | State::Quantized(_) => None,
            State::Trainable(v) => Some(v),
        }
    }

    /// Whether the parameter currently receives gradients.
    pub fn is_trainable(&self) -> bool {
        matches!(self.read(), State::Trainable(_))
    }

    /// Makes the parameter trainable (keeping its current value) or freezes it.
    pub fn set_trainable(&self, trainable: bool) -> Result<()> {
        let next = match (self.read(), trainable) {
            (State::Quantized(_), true) => {
                return Err(Error::config(format!(
                    "`{}` is a quantized base weight and cannot train; train it through a \
                     method (LoRA...) or load the model without `quantize`",
                    self.name
                )))
            }
            (State::Frozen(t), true) => State::Trainable(Var::from_tensor(&t)?),
            (State::Trainable(v), false) => State::Frozen(v.as_tensor().detach()),
            (same, _) => same,
        };
        self.write(next);
        Ok(())
    }

    /// Overwrites the value (shape must match), e.g. when loading a checkpoint.
    /// A quantized parameter becomes a plain frozen one holding `value` (e.g. a merged weight).
    pub fn set_value(&self, value: &Tensor) -> Result<()> {
        let dims = self.dims();
        if dims != value.dims() {
            return Err(Error::config(format!(
                "parameter `{}` has shape {:?}, the value to load has shape {:?}",
                self.name,
                dims,
                value.dims()
            )));
        }
        match self.read() {
            State::Frozen(current) => self.write(State::Frozen(
                value
                    .to_dtype(current.dtype())?
                    .to_device(current.device())?,
            )),
            State::Trainable(v) => {
                let current = v.as_tensor();
                v.set(
                    &value
                        .to_dtype(current.dtype())?
                        .to_device(current.device())?,
                )?
            }
            State::Quantized(_) => self.write(State::Frozen(value.detach())),
        }
        Ok(())
    }

    /// Holds a frozen parameter as `value`'s quantized blocks from now on (re-quantizing a
    /// merged model). The shapes must match; a trainable parameter is refused.
    pub fn set_quantized(&self, value: Arc<QuantizedMatrix>) -> Result<()> {
        let (rows, cols) = value.dims();
        if self.dims() != [rows, cols] {
            return Err(Error::config(format!(
                "parameter `{}` has shape {:?}, the quantized value [{rows}, {cols}]",
                self.name,
                self.dims()
            )));
        }
        if self.is_trainable() {
            return Err(Error::config(format!(
                "parameter `{}` is training: freeze it before quantizing it",
                self.name
            )));
        }
        self.write(State::Quantized(value));
        Ok(())
    }

    /// Number of scalar elements.
    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }
}

/// All parameters of a model, in a stable (insertion) order, addressable by name.
#[derive(Debug, Default, Clone)]
pub struct ParamStore {
    order: Vec<Arc<Param>>,
    by_name: HashMap<String, Arc<Param>>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a frozen parameter held in quantized blocks (see [`ParamStore::insert`]).
    pub fn insert_quantized(
        &mut self,
        name: impl Into<String>,
        value: Arc<QuantizedMatrix>,
    ) -> Arc<Param> {
        let name = name.into();
        if let Some(existing) = self.by_name.get(&name) {
            return existing.clone();
        }
        let param = Arc::new(Param::quantized(name.clone(), value));
        self.order.push(param.clone());
        self.by_name.insert(name, param.clone());
        param
    }

    /// Adds a frozen parameter and returns the shared handle the model keeps.
    ///
    /// Adding a name twice replaces nothing: the existing handle is returned (tied weights).
    pub fn insert(&mut self, name: impl Into<String>, value: Tensor) -> Arc<Param> {
        let name = name.into();
        if let Some(existing) = self.by_name.get(&name) {
            return existing.clone();
        }
        let param = Arc::new(Param::frozen(name.clone(), value));
        self.order.push(param.clone());
        self.by_name.insert(name, param.clone());
        param
    }

    /// The parameter called `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Param>> {
        self.by_name
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownParam(name.to_string()))
    }

    /// Whether a parameter called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// All parameters in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Param>> {
        self.order.iter()
    }

    /// The parameters that currently receive gradients.
    pub fn trainable(&self) -> Vec<Arc<Param>> {
        self.order
            .iter()
            .filter(|p| p.is_trainable())
            .cloned()
            .collect()
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.order.iter().map(|p| p.elem_count()).sum()
    }

    /// Number of scalar parameters that currently receive gradients.
    pub fn num_trainable(&self) -> usize {
        self.order
            .iter()
            .filter(|p| p.is_trainable())
            .map(|p| p.elem_count())
            .sum()
    }

    /// Makes every parameter whose name matches one of `patterns` trainable and returns how many
    /// parameters matched. Patterns are globs over the dotted name (`*` matches any run of
    /// characters, dots included): `classifier.*`, `model.layers.29.*`, `*.bias`.
    ///
    /// A pattern that matches nothing is an error (a typo would otherwise silently train nothing).
    pub fn set_trainable_by_patterns(&self, patterns: &[String]) -> Result<usize> {
        let mut matched = 0;
        for pattern in patterns {
            let glob = glob::Pattern::new(pattern).map_err(|e| {
                Error::config(format!("invalid trainable pattern `{pattern}`: {e}"))
            })?;
            let mut hits = 0;
            for param in &self.order {
                if glob.matches(param.name()) {
                    param.set_trainable(true)?;
                    hits += 1;
                }
            }
            if hits == 0 {
                return Err(Error::config(format!(
                    "trainable pattern `{pattern}` matches no parameter (run `whet inspect MODEL` to list names)"
                )));
            }
            matched += hits;
        }
        Ok(matched)
    }

    /// Freezes every parameter.
    pub fn freeze_all(&self) -> Result<()> {
        self.order.iter().try_for_each(|p| p.set_trainable(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn store() -> ParamStore {
        let mut s = ParamStore::new();
        for name in [
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "classifier.bias",
        ] {
            s.insert(
                name,
                Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
            );
        }
        s
    }

    #[test]
    fn patterns_select_params_and_typos_are_errors() {
        let s = store();
        assert_eq!(
            s.set_trainable_by_patterns(&["model.layers.1.*".into()])
                .unwrap(),
            1
        );
        assert!(s
            .get("model.layers.1.mlp.up_proj.weight")
            .unwrap()
            .is_trainable());
        assert!(!s
            .get("model.layers.0.mlp.up_proj.weight")
            .unwrap()
            .is_trainable());
        assert_eq!(s.num_trainable(), 4);
        assert!(s
            .set_trainable_by_patterns(&["model.layer.1.*".into()])
            .is_err());
    }

    #[test]
    fn freezing_keeps_the_trained_value() {
        let s = store();
        let p = s.get("classifier.bias").unwrap();
        p.set_trainable(true).unwrap();
        p.var()
            .unwrap()
            .set(&Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        p.set_trainable(false).unwrap();
        assert!(p.var().is_none());
        assert_eq!(
            p.tensor().sum_all().unwrap().to_scalar::<f32>().unwrap(),
            4.0
        );
    }
}
