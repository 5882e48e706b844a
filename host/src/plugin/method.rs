//! Attaching a PEFT method plugin to a model: the plugin sees the model's shape, picks linear
//! modules and creates its parameters through the host; the host installs a hook on each picked
//! module that calls the plugin's `forward-linear`, and trains the parameters it created (plus
//! the base parameters it names, such as a classification head in PEFT's `modules_to_save`).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use whetstone_sdk::{Event, LinearInfo, PluginKind};

use super::session::Session;
use super::Plugin;
use crate::model::hooks::{LinearHook, ModelHook};
use crate::model::Model;
use crate::params::Param;
use crate::{Error, Result};

/// A method plugin attached to a model under an adapter name.
pub struct MethodAdapter {
    /// The adapter's name (`default` unless several are loaded).
    pub name: String,
    /// The plugin providing the method.
    pub plugin: Plugin,
    /// The method's configuration (PEFT's JSON fields).
    pub config: serde_json::Value,
    instance: u32,
    session: Arc<Session>,
    wrapped: Vec<String>,
    base_trainable: std::sync::Mutex<Vec<Arc<Param>>>,
    model_hooks: ModelHooks,
}

/// Which model-level hooks a method uses, found by asking it once at attach (a method that
/// returns nothing for a one-token probe does not use the hook, and is not called at every
/// forward).
#[derive(Debug, Clone, Copy, Default)]
struct ModelHooks {
    embeddings: bool,
    attention_prefix: bool,
}

impl ModelHooks {
    fn any(self) -> bool {
        self.embeddings || self.attention_prefix
    }
}

impl std::fmt::Debug for MethodAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MethodAdapter")
            .field("name", &self.name)
            .field("plugin", &self.plugin.id())
            .field("wrapped", &self.wrapped.len())
            .finish()
    }
}

/// The block index in a module name: the first all-digit component
/// (`model.layers.3.self_attn.q_proj` → 3).
pub fn layer_index(name: &str) -> Option<usize> {
    name.split('.').find_map(|part| part.parse().ok())
}

pub(crate) fn model_device(model: &dyn Model) -> Device {
    model
        .params()
        .iter()
        .next()
        .map(|p| p.device())
        .unwrap_or(Device::Cpu)
}

/// The hook on one wrapped module.
struct PluginLinear {
    adapter: Arc<MethodAdapter>,
    module: String,
}

impl std::fmt::Debug for PluginLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PluginLinear({} on {})",
            self.adapter.plugin.id(),
            self.module
        )
    }
}

impl LinearHook for PluginLinear {
    fn forward(&self, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        let a = &self.adapter;
        let _exclusive = a.enter();
        let out = a
            .plugin
            .transport
            .forward_linear(a.instance, &self.module, x, base_out)?;
        // A wrong shape would otherwise broadcast silently or fail far from its cause.
        if out.dims() != base_out.dims() {
            return Err(Error::plugin(
                a.plugin.id(),
                "forward-linear",
                format!(
                    "returned a tensor of shape {:?} for `{}`, whose output has shape {:?}",
                    out.dims(),
                    self.module,
                    base_out.dims()
                ),
            ));
        }
        Ok(out)
    }
}

/// The model-level hook of an adapter whose method transforms the input embeddings or gives
/// attention prefixes.
struct PluginModelHook {
    adapter: Arc<MethodAdapter>,
}

impl std::fmt::Debug for PluginModelHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PluginModelHook({})", self.adapter.plugin.id())
    }
}

impl ModelHook for PluginModelHook {
    fn embeddings(
        &self,
        embeddings: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let a = &self.adapter;
        if !a.model_hooks.embeddings {
            return Ok(None);
        }
        let _exclusive = a.enter();
        a.plugin
            .transport
            .forward_embeddings(a.instance, embeddings, attention_mask)
    }

    fn attention_prefix(&self, layer: usize, batch: usize) -> Result<Option<(Tensor, Tensor)>> {
        let a = &self.adapter;
        if !a.model_hooks.attention_prefix {
            return Ok(None);
        }
        let _exclusive = a.enter();
        a.plugin
            .transport
            .attention_prefix(a.instance, layer as u32, batch as u32)
    }
}

/// Asks a freshly attached method whether it uses the model-level hooks: one forward of a
/// one-token batch through `forward-embeddings`, and layer 0's `attention-prefix`.
fn probe_model_hooks(
    t: &dyn super::transport::Transport,
    instance: u32,
    model: &dyn Model,
    device: &Device,
) -> Result<ModelHooks> {
    let info = model.model_info();
    let ctx = model.forward_context();
    let mode = ctx.mode();
    ctx.set_mode(crate::model::Mode::Eval);
    let embeddings = Tensor::zeros((1, 1, info.hidden_size), candle_core::DType::F32, device)?;
    let mask = Tensor::ones((1, 1), candle_core::DType::F32, device)?;
    let probed = (|| {
        Ok(ModelHooks {
            embeddings: t
                .forward_embeddings(instance, &embeddings, &mask)?
                .is_some(),
            attention_prefix: info.num_layers > 0 && t.attention_prefix(instance, 0, 1)?.is_some(),
        })
    })();
    ctx.set_mode(mode);
    probed
}

/// The base parameters of `model` the method names in `trainable-base-params`.
fn chosen_base_params(
    t: &dyn super::transport::Transport,
    instance: u32,
    plugin_id: &str,
    model: &dyn Model,
) -> Result<Vec<Arc<Param>>> {
    let names: Vec<String> = model
        .params()
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    let chosen = t.trainable_base_params(instance, &names)?;
    chosen
        .iter()
        .map(|n| {
            model.params().get(n).map_err(|_| {
                Error::plugin(
                    plugin_id,
                    "trainable-base-params",
                    format!("named `{n}`, which is not a parameter of the model"),
                )
            })
        })
        .collect()
}

impl MethodAdapter {
    /// Attaches `plugin`'s method, configured by `config`, to `model` under `name` and installs
    /// its hooks. Parameters are initialised from the model's forward-context generator reseeded
    /// with `seed`, so the same seed gives the same adapter.
    pub fn attach(
        model: &dyn Model,
        plugin: Plugin,
        name: &str,
        config: serde_json::Value,
        seed: u64,
    ) -> Result<Arc<MethodAdapter>> {
        if !plugin.provides(PluginKind::Method) {
            return Err(Error::plugin(
                plugin.id(),
                "attach",
                format!("provides {:?}, not a PEFT method", plugin.metadata.kinds),
            ));
        }
        let ctx = model.forward_context();
        ctx.reseed(seed);
        let session = Arc::new(Session::new(
            model_device(model),
            model.params().clone(),
            ctx,
        ));
        let t = plugin.transport.clone();
        let _exclusive = t.exclusive();
        t.set_session(Some(session.clone()));
        let config_text = config.to_string();
        let instance = t.create_method(&config_text)?;
        t.init_model(instance, &model.model_info())?;
        let mut wrapped = Vec::new();
        for linear in model.linears() {
            let info = LinearInfo {
                name: linear.name.clone(),
                in_features: linear.in_features()?,
                out_features: linear.out_features()?,
                has_bias: linear.bias().is_some(),
                layer_index: layer_index(&linear.name),
            };
            if t.select_linear(instance, &info)? {
                t.init_linear(instance, &info)?;
                wrapped.push(info.name);
            }
        }
        let model_hooks = probe_model_hooks(t.as_ref(), instance, model, &model_device(model))?;
        let base_trainable = chosen_base_params(t.as_ref(), instance, plugin.id(), model)?;
        if wrapped.is_empty()
            && base_trainable.is_empty()
            && !model_hooks.any()
            && session.with_params(|p| p.is_empty())
        {
            return Err(Error::config(format!(
                "method `{}` selected no module of the {} model and trains nothing; check \
                 target_modules against `whet inspect MODEL` (linear modules: {})",
                plugin.id(),
                model.architecture(),
                model
                    .linear_module_names()
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let adapter = Arc::new(MethodAdapter {
            name: name.to_string(),
            plugin,
            config,
            instance,
            session,
            wrapped,
            base_trainable: std::sync::Mutex::new(base_trainable),
            model_hooks,
        });
        adapter.activate(model)?;
        Ok(adapter)
    }

    /// Points the plugin's calls at this adapter's session (one plugin may serve several
    /// models, from several threads) and keeps it there until the guard drops.
    fn enter(&self) -> std::sync::MutexGuard<'_, ()> {
        let guard = self.plugin.transport.exclusive();
        self.plugin
            .transport
            .set_session(Some(self.session.clone()));
        guard
    }

    /// Installs this adapter's hooks on `model` (replacing another adapter's) and makes its
    /// base parameters trainable.
    pub fn activate(self: &Arc<Self>, model: &dyn Model) -> Result<()> {
        for linear in model.linears() {
            let hook: Option<Arc<dyn LinearHook>> = if self.wrapped.contains(&linear.name) {
                Some(Arc::new(PluginLinear {
                    adapter: self.clone(),
                    module: linear.name.clone(),
                }))
            } else {
                None
            };
            linear.set_hook(hook);
        }
        let model_hook: Option<Arc<dyn ModelHook>> = if self.model_hooks.any() {
            Some(Arc::new(PluginModelHook {
                adapter: self.clone(),
            }))
        } else {
            None
        };
        model.forward_context().set_model_hook(model_hook);
        for p in self.base_params() {
            p.set_trainable(true)?;
        }
        Ok(())
    }

    /// Asks the method again which base parameters train now (a gradual-unfreezing schedule
    /// reads the step): the newly named ones become trainable, the ones it no longer names are
    /// frozen. Returns whether the set changed.
    pub fn refresh_base_params(&self, model: &dyn Model) -> Result<bool> {
        let chosen = {
            let _exclusive = self.enter();
            chosen_base_params(
                self.plugin.transport.as_ref(),
                self.instance,
                self.plugin.id(),
                model,
            )?
        };
        let mut current = self
            .base_trainable
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let same = chosen.len() == current.len()
            && chosen
                .iter()
                .zip(current.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return Ok(false);
        }
        for p in current.iter() {
            if !chosen.iter().any(|c| Arc::ptr_eq(c, p)) {
                p.set_trainable(false)?;
            }
        }
        for p in &chosen {
            p.set_trainable(true)?;
        }
        *current = chosen;
        Ok(true)
    }

    /// Removes every hook from `model` (the base model alone computes).
    pub fn deactivate(model: &dyn Model) {
        for linear in model.linears() {
            linear.set_hook(None);
        }
        model.forward_context().set_model_hook(None);
    }

    /// Whether the method prepends virtual tokens to the input embeddings.
    pub fn uses_embeddings_hook(&self) -> bool {
        self.model_hooks.embeddings
    }

    /// Whether the method gives attention layers a key/value prefix.
    pub fn uses_attention_prefix(&self) -> bool {
        self.model_hooks.attention_prefix
    }

    /// The modules this adapter wraps.
    pub fn wrapped_modules(&self) -> &[String] {
        &self.wrapped
    }

    /// The parameters the plugin created, in creation order (names are PEFT keys without
    /// `base_model.model.`).
    pub fn params(&self) -> Vec<Arc<Param>> {
        self.session.with_params(|p| p.iter().cloned().collect())
    }

    /// Whether plugin parameter `name` was created without a module (PEFT saves such
    /// parameters, like prompt tuning's `prompt_embeddings`, under their bare name).
    pub fn is_model_level(&self, name: &str) -> bool {
        self.session.with_params(|p| p.is_model_level(name))
    }

    /// The base parameters the method trains now (e.g. `modules_to_save`, `bias = "all"`, the
    /// unfrozen blocks of a schedule).
    pub fn base_params(&self) -> Vec<Arc<Param>> {
        self.base_trainable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Everything the optimizer updates now: the plugin's parameters and the trained base ones.
    pub fn trainable(&self) -> Vec<Arc<Param>> {
        let mut all = self.params();
        all.extend(self.base_params());
        all
    }

    /// `ΔW` `[out, in]` of a wrapped module, when the method can be merged.
    pub fn delta_weight(&self, module: &str) -> Result<Option<Tensor>> {
        let _exclusive = self.enter();
        self.plugin.transport.delta_weight(self.instance, module)
    }

    /// The method's extra loss term for the current step.
    pub fn loss_term(&self) -> Result<Option<Tensor>> {
        let _exclusive = self.enter();
        self.plugin.transport.loss_term(self.instance)
    }

    /// Notifies the method of a lifecycle event.
    pub fn on_event(&self, event: &Event) -> Result<()> {
        let _exclusive = self.enter();
        self.plugin.transport.on_event(self.instance, event)
    }

    /// How many examples of each finished task the method wants gradients for.
    pub fn task_gradient_examples(&self) -> Result<usize> {
        let _exclusive = self.enter();
        Ok(self
            .plugin
            .transport
            .task_gradient_examples(self.instance)? as usize)
    }
}
