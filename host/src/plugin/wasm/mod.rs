//! WebAssembly component plugins, run by wasmtime with no ambient capability (DESIGN.md
//! principle 6): the linker holds only the contract's `host` interface (no WASI), a store's
//! linear memory is capped at the manifest's `memory_mb`, and every call has an epoch deadline
//! of `call_timeout_ms`. A trap, timeout or out-of-memory becomes an [`Error::Plugin`] naming the
//! plugin and the call, and leaves the plugin failed: later calls report the first failure.
//!
//! - `engine`: the shared engine, its epoch ticker and the compiled-component cache;
//! - `imports`: the store's data and the `host` imports, delegating to
//!   [`HostState`](super::session::HostState) like the native transport.

mod engine;
mod imports;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Store, Trap};
use whetstone_sdk::{Event, LinearInfo, ModelInfo};

use self::bindings::exports::whetstone::plugin::plugin::{self as wit, Guest};
use self::bindings::WhetstonePlugin;
use self::imports::StoreData;
use super::manifest::Limits;
use super::session::Session;
use super::transport::Transport;
use crate::{Error, Result};

/// The version of the WIT package this host implements (`sdk/wit/<version>`).
pub const CONTRACT_WIT_VERSION: &str = "0.2.0";

#[allow(missing_docs, clippy::all)]
mod bindings {
    wasmtime::component::bindgen!({
        path: "../sdk/wit/0.2.0",
        world: "whetstone-plugin",
    });
}

/// What a call returns before its handles are taken out of the table.
type CallResult<T> = wasmtime::Result<std::result::Result<T, String>>;

struct Inner {
    store: Store<StoreData>,
    plugin: WhetstonePlugin,
    /// Why the plugin can no longer be called (after a trap, timeout or out-of-memory).
    failed: Option<String>,
}

/// A loaded WebAssembly plugin: one component instance in its own store.
pub struct WasmPlugin {
    id: String,
    limits: Limits,
    deadline_ticks: u64,
    inner: Mutex<Inner>,
    exclusive: Mutex<()>,
}

impl std::fmt::Debug for WasmPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmPlugin")
            .field("id", &self.id)
            .field("limits", &self.limits)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers `tensors` in the store's handle table (the plugin owns them from here on).
fn put(store: &mut Store<StoreData>, tensors: &[&Tensor]) -> std::result::Result<Vec<u64>, String> {
    let state = &mut store.data_mut().state;
    let mut handles = Vec::with_capacity(tensors.len());
    for t in tensors {
        match state.insert((*t).clone()) {
            Ok(h) => handles.push(h),
            Err(m) => {
                handles.iter().for_each(|&h| state.release(h));
                return Err(m);
            }
        }
    }
    Ok(handles)
}

/// Runs `$call` after registering `$tensors`, passing the plugin's refusal through.
macro_rules! with_handles {
    ($store:ident, [$($t:expr),+], |$hs:ident| $call:expr) => {
        match put($store, &[$($t),+]) {
            Ok($hs) => $call,
            Err(m) => Ok(Err(m)),
        }
    };
}

impl WasmPlugin {
    /// Loads the component at `path` into a fresh store with `limits`, linking only the
    /// contract's `host` interface.
    pub fn load(id: &str, path: &Path, limits: Limits) -> Result<WasmPlugin> {
        let fail = |m: String| Error::plugin(id, "load", format!("{}: {m}", path.display()));
        let engine = engine::engine().map_err(fail)?;
        let component = engine::component(engine, path).map_err(fail)?;
        let mut linker = Linker::<StoreData>::new(engine);
        WhetstonePlugin::add_to_linker::<StoreData, HasSelf<StoreData>>(&mut linker, |d| d)
            .map_err(|e| {
                fail(format!(
                    "cannot link the host interface: {}",
                    engine::chain(&e)
                ))
            })?;
        let mut store = Store::new(engine, StoreData::new(limits.memory_mb));
        store.limiter(|d| &mut d.cap);
        let deadline_ticks = engine::deadline_ticks(limits.call_timeout_ms);
        store.set_epoch_deadline(deadline_ticks);
        let plugin =
            WhetstonePlugin::instantiate(&mut store, &component, &linker).map_err(|e| {
                let refused = store.data().cap.refused;
                fail(describe(&e, refused, None, &limits))
            })?;
        Ok(WasmPlugin {
            id: id.to_string(),
            limits,
            deadline_ticks,
            inner: Mutex::new(Inner {
                store,
                plugin,
                failed: None,
            }),
            exclusive: Mutex::new(()),
        })
    }

    /// Runs one export under the call deadline. A plugin error passes through as its message;
    /// a trap (or any failure to run) marks the plugin failed.
    fn call<T>(
        &self,
        name: &str,
        f: impl FnOnce(&Guest, &mut Store<StoreData>) -> CallResult<T>,
    ) -> Result<T> {
        let mut inner = lock(&self.inner);
        if let Some(reason) = &inner.failed {
            let message = format!(
                "the plugin cannot be called after an earlier failure ({reason}); load it again"
            );
            return Err(Error::plugin(&self.id, name, message));
        }
        let Inner { store, plugin, .. } = &mut *inner;
        store.set_epoch_deadline(self.deadline_ticks);
        store.data_mut().cap.refused = None;
        store.data_mut().last_error_log = None;
        let guest = plugin.whetstone_plugin_plugin();
        let outcome = catch_unwind(AssertUnwindSafe(|| f(guest, store)));
        let message = match outcome {
            Ok(Ok(Ok(value))) => return Ok(value),
            Ok(Ok(Err(message))) => return Err(Error::plugin(&self.id, name, message)),
            Ok(Err(e)) => {
                let data = store.data();
                describe(
                    &e,
                    data.cap.refused,
                    data.last_error_log.as_deref(),
                    &self.limits,
                )
            }
            Err(_) => "the host panicked while serving this call".to_string(),
        };
        store.data_mut().drop_handles();
        inner.failed = Some(format!("{name}: {message}"));
        Err(Error::plugin(&self.id, name, message))
    }

    fn take(&self, h: u64, call: &str) -> Result<Tensor> {
        lock(&self.inner)
            .store
            .data_mut()
            .state
            .take(h)
            .map_err(|m| Error::plugin(&self.id, call, format!("returned {m}")))
    }

    fn take_pair(&self, pair: Option<(u64, u64)>, call: &str) -> Result<Option<(Tensor, Tensor)>> {
        match pair {
            None => Ok(None),
            Some((a, b)) => Ok(Some((self.take(a, call)?, self.take(b, call)?))),
        }
    }
}

/// The message for a call that did not return: timeout, out-of-memory or another trap. The
/// wasm backtrace goes to the debug log, not into the message.
fn describe(
    e: &wasmtime::Error,
    refused: Option<usize>,
    last_log: Option<&str>,
    limits: &Limits,
) -> String {
    tracing::debug!(target: "plugin", "wasm call failed: {e:?}");
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return format!(
            "exceeded its {} ms deadline (raise `call_timeout_ms` under [limits] in plugin.toml)",
            limits.call_timeout_ms
        );
    }
    if let Some(bytes) = refused {
        return format!(
            "out of memory: exceeded its {} MiB memory cap by growing to {} MiB (raise \
             `memory_mb` under [limits] in plugin.toml)",
            limits.memory_mb,
            bytes.div_ceil(1 << 20)
        );
    }
    let mut message = match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => engine::chain(e),
    };
    if let Some(log) = last_log {
        message.push_str(&format!(" (the plugin logged: {})", log.replace('\n', " ")));
    }
    message
}

fn linear_wit(l: &LinearInfo) -> wit::LinearInfo {
    wit::LinearInfo {
        name: l.name.clone(),
        in_features: l.in_features as u32,
        out_features: l.out_features as u32,
        has_bias: l.has_bias,
        layer_index: l.layer_index.map(|i| i as u32),
    }
}

impl Transport for WasmPlugin {
    fn metadata_json(&self) -> Result<String> {
        self.call("metadata", |g, s| g.call_metadata(s).map(Ok))
    }

    fn exclusive(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.exclusive)
    }

    fn set_session(&self, session: Option<Arc<Session>>) {
        lock(&self.inner)
            .store
            .data_mut()
            .state
            .set_session(session);
    }

    fn live_handles(&self) -> usize {
        lock(&self.inner).store.data().state.live_handles()
    }

    fn create_method(&self, config: &str) -> Result<u32> {
        self.call("create-method", |g, s| g.call_create_method(s, config))
    }

    fn init_model(&self, instance: u32, m: &ModelInfo) -> Result<()> {
        let info = wit::ModelInfo {
            architecture: m.architecture.clone(),
            task: m.task.clone(),
            hidden_size: m.hidden_size as u32,
            num_layers: m.num_layers as u32,
            num_attention_heads: m.num_attention_heads as u32,
            num_key_value_heads: m.num_key_value_heads as u32,
            head_dim: m.head_dim as u32,
            vocab_size: m.vocab_size as u32,
        };
        self.call("init-model", |g, s| g.call_init_model(s, instance, &info))
    }

    fn select_linear(&self, instance: u32, linear: &LinearInfo) -> Result<bool> {
        let info = linear_wit(linear);
        self.call("select-linear", |g, s| {
            g.call_select_linear(s, instance, &info)
        })
    }

    fn init_linear(&self, instance: u32, linear: &LinearInfo) -> Result<()> {
        let info = linear_wit(linear);
        self.call("init-linear", |g, s| g.call_init_linear(s, instance, &info))
    }

    fn forward_linear(
        &self,
        instance: u32,
        module: &str,
        x: &Tensor,
        base: &Tensor,
    ) -> Result<Tensor> {
        let call = "forward-linear";
        let out = self.call(call, |g, s| {
            with_handles!(s, [x, base], |h| g
                .call_forward_linear(s, instance, module, h[0], h[1]))
        })?;
        self.take(out, call)
    }

    fn delta_weight(&self, instance: u32, module: &str) -> Result<Option<Tensor>> {
        let call = "delta-weight";
        let out = self.call(call, |g, s| g.call_delta_weight(s, instance, module))?;
        out.map(|h| self.take(h, call)).transpose()
    }

    fn forward_embeddings(
        &self,
        instance: u32,
        e: &Tensor,
        m: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let call = "forward-embeddings";
        let out = self.call(call, |g, s| {
            with_handles!(s, [e, m], |h| g
                .call_forward_embeddings(s, instance, h[0], h[1]))
        })?;
        self.take_pair(out.map(|o| (o.embeddings, o.attention_mask)), call)
    }

    fn attention_prefix(
        &self,
        instance: u32,
        layer: u32,
        batch: u32,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let call = "attention-prefix";
        let out = self.call(call, |g, s| {
            g.call_attention_prefix(s, instance, layer, batch)
        })?;
        self.take_pair(out.map(|p| (p.key, p.value)), call)
    }

    fn trainable_base_params(&self, instance: u32, names: &[String]) -> Result<Vec<String>> {
        self.call("trainable-base-params", |g, s| {
            g.call_trainable_base_params(s, instance, names)
        })
    }

    fn loss_term(&self, instance: u32) -> Result<Option<Tensor>> {
        let call = "loss-term";
        let out = self.call(call, |g, s| g.call_loss_term(s, instance))?;
        out.map(|h| self.take(h, call)).transpose()
    }

    fn on_event(&self, instance: u32, event: &Event) -> Result<()> {
        let e = match *event {
            Event::TrainStart => wit::Event::TrainStart,
            Event::StepEnd { step, loss } => wit::Event::StepEnd((step, loss)),
            Event::EpochEnd(epoch) => wit::Event::EpochEnd(epoch),
            Event::TrainEnd => wit::Event::TrainEnd,
            Event::TaskStart(task) => wit::Event::TaskStart(task),
            Event::TaskGradient { task, example } => wit::Event::TaskGradient((task, example)),
            Event::TaskEnd(task) => wit::Event::TaskEnd(task),
        };
        self.call("on-event", |g, s| g.call_on_event(s, instance, e))
    }

    fn task_gradient_examples(&self, instance: u32) -> Result<u32> {
        self.call("task-gradient-examples", |g, s| {
            g.call_task_gradient_examples(s, instance)
        })
    }

    fn create_loss(&self, config: &str) -> Result<u32> {
        self.call("create-loss", |g, s| g.call_create_loss(s, config))
    }

    fn compute_loss(
        &self,
        instance: u32,
        logits: &Tensor,
        labels: &Tensor,
        mask: &Tensor,
        teacher: Option<&Tensor>,
    ) -> Result<Tensor> {
        let call = "compute-loss";
        let out = self.call(call, |g, s| match teacher {
            Some(t) => with_handles!(s, [logits, labels, mask, t], |h| {
                g.call_compute_loss(s, instance, h[0], h[1], h[2], Some(h[3]))
            }),
            None => with_handles!(s, [logits, labels, mask], |h| {
                g.call_compute_loss(s, instance, h[0], h[1], h[2], None)
            }),
        })?;
        self.take(out, call)
    }

    fn create_loader(&self, config: &str) -> Result<u32> {
        self.call("create-loader", |g, s| g.call_create_loader(s, config))
    }

    fn next_record(&self, instance: u32) -> Result<Option<String>> {
        self.call("next-record", |g, s| g.call_next_record(s, instance))
    }
}
