//! The plugin side of both transports: the registered factory and the live instances. The
//! native vtable and the wasm component exports are thin adapters over these functions, so a
//! plugin behaves identically under both.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde::de::DeserializeOwned;

use crate::types::{ConfigField, Event, LinearInfo, Metadata, ModelInfo, PluginKind};
use crate::{DataLoader, Error, Linear, Loss, PeftMethod, Result, Tensor};

/// A component's constructor (from config JSON) and its config-field documentation.
#[doc(hidden)]
pub type Ctor<T> = (fn(&str) -> Result<Box<T>>, fn() -> Vec<ConfigField>);

/// What the registration macro records about a plugin.
#[doc(hidden)]
pub struct Factory {
    pub name: &'static str,
    pub version: &'static str,
    pub description: &'static str,
    pub method: Option<Ctor<dyn DynMethod>>,
    pub loss: Option<Ctor<dyn DynLoss>>,
    pub loader: Option<Ctor<dyn DynLoader>>,
}

/// Implemented by the type the registration macro generates.
#[doc(hidden)]
pub trait Provider {
    fn factory() -> Factory;
}

static FACTORY: OnceLock<Factory> = OnceLock::new();

/// Installs the plugin's factory (first call wins; later calls are no-ops).
#[doc(hidden)]
pub fn install<P: Provider>() {
    FACTORY.get_or_init(P::factory);
}

fn factory() -> Result<&'static Factory> {
    FACTORY
        .get()
        .ok_or_else(|| Error::msg("plugin entry was not called before its exports"))
}

fn parse<C: DeserializeOwned>(config: &str) -> Result<C> {
    let text = if config.trim().is_empty() {
        "{}"
    } else {
        config
    };
    serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))
}

#[doc(hidden)]
pub fn new_method<M: PeftMethod>(config: &str) -> Result<Box<dyn DynMethod>> {
    Ok(Box::new(M::new(parse(config)?)?))
}

#[doc(hidden)]
pub fn new_loss<L: Loss>(config: &str) -> Result<Box<dyn DynLoss>> {
    Ok(Box::new(L::new(parse(config)?)?))
}

#[doc(hidden)]
pub fn new_loader<D: DataLoader>(config: &str) -> Result<Box<dyn DynLoader>> {
    Ok(Box::new(D::new(parse(config)?)?))
}

/// [`PeftMethod`] without its associated type, for storage behind a pointer.
#[doc(hidden)]
pub trait DynMethod: Send {
    fn init_model(&mut self, model: &ModelInfo) -> Result<()>;
    fn select_linear(&self, linear: &LinearInfo) -> Result<bool>;
    fn init_linear(&self, layer: &mut Linear) -> Result<()>;
    fn forward_linear(&self, layer: &Linear, x: &Tensor, base_out: &Tensor) -> Result<Tensor>;
    fn delta_weight(&self, layer: &Linear) -> Result<Option<Tensor>>;
    fn forward_embeddings(&self, e: &Tensor, m: &Tensor) -> Result<Option<(Tensor, Tensor)>>;
    fn attention_prefix(&self, layer: usize, batch: usize) -> Result<Option<(Tensor, Tensor)>>;
    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>>;
    fn loss_term(&self) -> Result<Option<Tensor>>;
    fn on_event(&mut self, event: &Event) -> Result<()>;
    fn task_gradient_examples(&self) -> Result<usize>;
}

impl<M: PeftMethod> DynMethod for M {
    fn init_model(&mut self, model: &ModelInfo) -> Result<()> {
        PeftMethod::init_model(self, model)
    }
    fn select_linear(&self, linear: &LinearInfo) -> Result<bool> {
        PeftMethod::select_linear(self, linear)
    }
    fn init_linear(&self, layer: &mut Linear) -> Result<()> {
        PeftMethod::init_linear(self, layer)
    }
    fn forward_linear(&self, layer: &Linear, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
        PeftMethod::forward_linear(self, layer, x, base_out)
    }
    fn delta_weight(&self, layer: &Linear) -> Result<Option<Tensor>> {
        PeftMethod::delta_weight(self, layer)
    }
    fn forward_embeddings(&self, e: &Tensor, m: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        PeftMethod::forward_embeddings(self, e, m)
    }
    fn attention_prefix(&self, layer: usize, batch: usize) -> Result<Option<(Tensor, Tensor)>> {
        PeftMethod::attention_prefix(self, layer, batch)
    }
    fn trainable_base_params(&self, names: &[String]) -> Result<Vec<String>> {
        PeftMethod::trainable_base_params(self, names)
    }
    fn loss_term(&self) -> Result<Option<Tensor>> {
        PeftMethod::loss_term(self)
    }
    fn on_event(&mut self, event: &Event) -> Result<()> {
        PeftMethod::on_event(self, event)
    }
    fn task_gradient_examples(&self) -> Result<usize> {
        PeftMethod::task_gradient_examples(self)
    }
}

/// [`Loss`] without its associated type.
#[doc(hidden)]
pub trait DynLoss: Send {
    fn compute(&self, l: &Tensor, y: &Tensor, m: &Tensor, t: Option<&Tensor>) -> Result<Tensor>;
}

impl<L: Loss> DynLoss for L {
    fn compute(&self, l: &Tensor, y: &Tensor, m: &Tensor, t: Option<&Tensor>) -> Result<Tensor> {
        Loss::compute(self, l, y, m, t)
    }
}

/// [`DataLoader`] without its associated type.
#[doc(hidden)]
pub trait DynLoader: Send {
    fn next_record(&mut self) -> Result<Option<crate::loader::Item>>;
}

impl<D: DataLoader> DynLoader for D {
    fn next_record(&mut self) -> Result<Option<crate::loader::Item>> {
        DataLoader::next_record(self)
    }
}

struct MethodSlot {
    method: Box<dyn DynMethod>,
    linears: HashMap<String, Linear>,
}

#[derive(Default)]
struct Instances {
    methods: Vec<MethodSlot>,
    losses: Vec<Box<dyn DynLoss>>,
    loaders: Vec<Box<dyn DynLoader>>,
}

fn instances() -> MutexGuard<'static, Instances> {
    static INSTANCES: OnceLock<Mutex<Instances>> = OnceLock::new();
    let lock = INSTANCES.get_or_init(|| Mutex::new(Instances::default()));
    // A panic inside a hook is caught at the boundary and reported; the instance table itself
    // is never left half-written, so a poisoned lock is still usable.
    lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn with_method<T>(instance: u32, f: impl FnOnce(&mut MethodSlot) -> Result<T>) -> Result<T> {
    let mut all = instances();
    let slot = all
        .methods
        .get_mut(instance as usize)
        .ok_or_else(|| Error::msg(format!("no method instance {instance}")))?;
    f(slot)
}

fn unsupported(kind: &'static str) -> Error {
    Error::Unsupported(kind)
}

/// The `metadata` export.
pub fn metadata() -> Result<String> {
    let f = factory()?;
    let mut kinds = Vec::new();
    let mut fields = Vec::new();
    if let Some((_, doc)) = f.method {
        kinds.push(PluginKind::Method);
        fields.extend(doc());
    }
    if let Some((_, doc)) = f.loss {
        kinds.push(PluginKind::Loss);
        fields.extend(doc());
    }
    if let Some((_, doc)) = f.loader {
        kinds.push(PluginKind::DataLoader);
        fields.extend(doc());
    }
    let meta = Metadata {
        name: f.name.to_string(),
        version: f.version.to_string(),
        description: f.description.to_string(),
        kinds,
        sdk_version: crate::SDK_VERSION.to_string(),
        contract: crate::CONTRACT_VERSION.to_string(),
        config_fields: fields,
    };
    serde_json::to_string(&meta).map_err(|e| Error::msg(e.to_string()))
}

/// The `create-method` export.
pub fn create_method(config: &str) -> Result<u32> {
    let (ctor, _) = factory()?.method.ok_or(unsupported("a PEFT method"))?;
    let method = ctor(config)?;
    let mut all = instances();
    all.methods.push(MethodSlot {
        method,
        linears: HashMap::new(),
    });
    Ok((all.methods.len() - 1) as u32)
}

/// The `init-model` export.
pub fn init_model(instance: u32, model: &ModelInfo) -> Result<()> {
    with_method(instance, |s| s.method.init_model(model))
}

/// The `select-linear` export.
pub fn select_linear(instance: u32, linear: &LinearInfo) -> Result<bool> {
    with_method(instance, |s| s.method.select_linear(linear))
}

/// The `init-linear` export.
pub fn init_linear(instance: u32, linear: LinearInfo) -> Result<()> {
    with_method(instance, |s| {
        let mut layer = Linear::new(linear);
        s.method.init_linear(&mut layer)?;
        s.linears.insert(layer.name().to_string(), layer);
        Ok(())
    })
}

fn layer<'a>(slot: &'a MethodSlot, module: &str) -> Result<&'a Linear> {
    slot.linears
        .get(module)
        .ok_or_else(|| Error::msg(format!("linear module `{module}` was not initialised")))
}

/// The `forward-linear` export. `x` and `base_out` are owned by the plugin from here on.
pub fn forward_linear(instance: u32, module: &str, x: Tensor, base_out: Tensor) -> Result<Tensor> {
    with_method(instance, |s| {
        s.method.forward_linear(layer(s, module)?, &x, &base_out)
    })
}

/// The `delta-weight` export.
pub fn delta_weight(instance: u32, module: &str) -> Result<Option<Tensor>> {
    with_method(instance, |s| s.method.delta_weight(layer(s, module)?))
}

/// The `forward-embeddings` export.
pub fn forward_embeddings(
    instance: u32,
    embeddings: Tensor,
    mask: Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    with_method(instance, |s| {
        s.method.forward_embeddings(&embeddings, &mask)
    })
}

/// The `attention-prefix` export.
pub fn attention_prefix(instance: u32, layer: u32, batch: u32) -> Result<Option<(Tensor, Tensor)>> {
    with_method(instance, |s| {
        s.method.attention_prefix(layer as usize, batch as usize)
    })
}

/// The `trainable-base-params` export.
pub fn trainable_base_params(instance: u32, names: &[String]) -> Result<Vec<String>> {
    with_method(instance, |s| s.method.trainable_base_params(names))
}

/// The `loss-term` export.
pub fn loss_term(instance: u32) -> Result<Option<Tensor>> {
    with_method(instance, |s| s.method.loss_term())
}

/// The `on-event` export.
pub fn on_event(instance: u32, event: &Event) -> Result<()> {
    with_method(instance, |s| s.method.on_event(event))
}

/// The `task-gradient-examples` export.
pub fn task_gradient_examples(instance: u32) -> Result<u32> {
    with_method(instance, |s| {
        let n = s.method.task_gradient_examples()?;
        u32::try_from(n).map_err(|_| Error::msg(format!("{n} task-gradient examples is too many")))
    })
}

/// The `create-loss` export.
pub fn create_loss(config: &str) -> Result<u32> {
    let (ctor, _) = factory()?.loss.ok_or(unsupported("a loss"))?;
    let loss = ctor(config)?;
    let mut all = instances();
    all.losses.push(loss);
    Ok((all.losses.len() - 1) as u32)
}

/// The `compute-loss` export.
pub fn compute_loss(
    instance: u32,
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    teacher: Option<Tensor>,
) -> Result<Tensor> {
    let all = instances();
    let loss = all
        .losses
        .get(instance as usize)
        .ok_or_else(|| Error::msg(format!("no loss instance {instance}")))?;
    loss.compute(&logits, &labels, &mask, teacher.as_ref())
}

/// The `create-loader` export.
pub fn create_loader(config: &str) -> Result<u32> {
    let (ctor, _) = factory()?.loader.ok_or(unsupported("a data loader"))?;
    let loader = ctor(config)?;
    let mut all = instances();
    all.loaders.push(loader);
    Ok((all.loaders.len() - 1) as u32)
}

/// The `next-record` export (the item's wire form as JSON text: see [`crate::loader`]).
pub fn next_record(instance: u32) -> Result<Option<String>> {
    let mut all = instances();
    let loader = all
        .loaders
        .get_mut(instance as usize)
        .ok_or_else(|| Error::msg(format!("no data loader instance {instance}")))?;
    match loader.next_record()? {
        Some(item) => Ok(Some(item.to_wire().to_string())),
        None => Ok(None),
    }
}

/// Runs `f`, turning a panic into an error that carries the panic message.
pub fn guard<T>(call: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            Err(Error::msg(format!("plugin panicked in {call}: {message}")))
        }
    }
}
