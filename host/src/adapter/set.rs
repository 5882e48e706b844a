//! Several PEFT adapters on one model, switched by name (PEFT's `load_adapter` +
//! `set_adapter`).
//!
//! Every adapter's method stays attached; switching installs the chosen adapter's hooks and
//! puts its own values into the base parameters it trains (`modules_to_save`, trained biases),
//! which the adapters share with the model. [`AdapterSet::deactivate`] restores the base values
//! from before the first adapter was loaded, so the base model alone computes again.
//!
//! The per-adapter base values are the ones read from the adapter files: the set is for
//! inference and evaluation. Training an adapter of a set changes the shared base parameters
//! (call [`AdapterSet::snapshot_active`] afterwards to keep its new values).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Tensor;

use crate::model::Model;
use crate::params::Param;
use crate::plugin::method::MethodAdapter;
use crate::plugin::{Plugin, TransportKind};
use crate::{Error, Result};

/// One adapter of a set and the values it gives the base parameters it trains.
struct Entry {
    name: String,
    adapter: Arc<MethodAdapter>,
    base_values: Vec<(Arc<Param>, Tensor)>,
}

/// Named adapters attached to one model, one of them (or none) active.
#[derive(Default)]
pub struct AdapterSet {
    entries: Vec<Entry>,
    /// Base parameter values from before any adapter of the set changed them, by name.
    originals: HashMap<String, (Arc<Param>, Tensor)>,
    /// Loaded plugins by id, so adapters of one method share a plugin.
    plugins: HashMap<String, Plugin>,
    active: Option<String>,
}

impl std::fmt::Debug for AdapterSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterSet")
            .field("names", &self.names())
            .field("active", &self.active)
            .finish()
    }
}

/// The current values of `params`.
fn values_of(params: &[Arc<Param>]) -> Result<Vec<(Arc<Param>, Tensor)>> {
    params
        .iter()
        .map(|p| Ok((p.clone(), p.tensor().detach().copy()?)))
        .collect()
}

impl AdapterSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The adapters' names, in loading order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// The name of the active adapter, if any.
    pub fn active(&self) -> Option<&str> {
        self.active.as_deref()
    }

    /// The adapter called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<MethodAdapter>> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| &e.adapter)
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.iter().find(|e| e.name == name).ok_or_else(|| {
            Error::config(format!(
                "no adapter named `{name}` (loaded: {})",
                self.names().join(", ")
            ))
        })
    }

    /// Loads the PEFT adapter in `dir` onto `model` under `name` (searching `plugins` for its
    /// method plugin) and makes it the active one.
    pub fn load(
        &mut self,
        model: &dyn Model,
        dir: &Path,
        name: &str,
        plugins: &[PathBuf],
    ) -> Result<Arc<MethodAdapter>> {
        if self.get(name).is_some() {
            return Err(Error::config(format!(
                "an adapter named `{name}` is already loaded; pick another name"
            )));
        }
        let config = super::load::read_config(dir)?;
        let plugin = match self.plugins.get(&config.plugin_id) {
            Some(p) => p.clone(),
            None => {
                let p = super::load::find_plugin(dir, plugins, TransportKind::Auto)?;
                self.plugins.insert(config.plugin_id.clone(), p.clone());
                p
            }
        };
        // The new adapter starts from the base model's values, not the active adapter's.
        self.restore_originals()?;
        // The base parameters the adapter will overwrite are not known before it is attached;
        // keep every current value (frozen tensors are never written in place, so holding them
        // costs nothing; a trainable one is copied).
        let before = model
            .params()
            .iter()
            .filter(|p| !self.originals.contains_key(p.name()))
            .map(|p| {
                let t = p.tensor();
                let t = if p.is_trainable() { t.copy()? } else { t };
                Ok((p.name().to_string(), t))
            })
            .collect::<Result<HashMap<String, Tensor>>>()?;
        let loaded = super::load::load_with_plugin(model, dir, name, plugin);
        let adapter = match loaded {
            Ok(a) => a,
            Err(e) => {
                self.reinstall(model)?;
                return Err(e);
            }
        };
        for p in adapter.base_params() {
            if let Some(t) = before.get(p.name()) {
                self.originals
                    .insert(p.name().to_string(), (p.clone(), t.detach().copy()?));
            }
        }
        let base_values = values_of(&adapter.base_params())?;
        self.entries.push(Entry {
            name: name.to_string(),
            adapter: adapter.clone(),
            base_values,
        });
        self.active = Some(name.to_string());
        Ok(adapter)
    }

    /// Re-activates the active adapter (or none) after a failed load left the hooks removed.
    fn reinstall(&mut self, model: &dyn Model) -> Result<()> {
        match self.active.clone() {
            Some(name) => self.activate(model, &name),
            None => self.deactivate(model),
        }
    }

    /// Makes adapter `name` the one that computes: installs its hooks and its base-parameter
    /// values.
    pub fn activate(&mut self, model: &dyn Model, name: &str) -> Result<()> {
        self.restore_originals()?;
        let entry = self.entry(name)?;
        entry.adapter.activate(model)?;
        for (param, value) in &entry.base_values {
            param.set_value(value)?;
        }
        self.active = Some(name.to_string());
        Ok(())
    }

    /// Removes every adapter's hooks and restores the base parameters, so the base model alone
    /// computes.
    pub fn deactivate(&mut self, model: &dyn Model) -> Result<()> {
        MethodAdapter::deactivate(model);
        self.restore_originals()?;
        self.active = None;
        Ok(())
    }

    /// Records the active adapter's current base-parameter values as its own (after training
    /// it).
    pub fn snapshot_active(&mut self) -> Result<()> {
        let Some(name) = self.active.clone() else {
            return Ok(());
        };
        if let Some(entry) = self.entries.iter_mut().find(|e| e.name == name) {
            entry.base_values = values_of(&entry.adapter.base_params())?;
        }
        Ok(())
    }

    /// Unloads adapter `name` (when it is the active one, the base model computes afterwards).
    pub fn remove(&mut self, model: &dyn Model, name: &str) -> Result<()> {
        self.entry(name)?;
        if self.active.as_deref() == Some(name) {
            self.deactivate(model)?;
        }
        self.entries.retain(|e| e.name != name);
        Ok(())
    }

    /// Records the current values of `params` as their base values: for parameters that
    /// something outside the set changed (a method trained next to the set), so that switching
    /// adapters restores those values rather than older ones.
    pub fn rebase(&mut self, params: &[Arc<Param>]) -> Result<()> {
        for p in params {
            if let Some(entry) = self.originals.get_mut(p.name()) {
                entry.1 = p.tensor().detach().copy()?;
            }
        }
        Ok(())
    }

    fn restore_originals(&self) -> Result<()> {
        for (param, value) in self.originals.values() {
            param.set_trainable(false)?;
            param.set_value(value)?;
        }
        Ok(())
    }
}
