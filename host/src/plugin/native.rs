//! Native plugins: a dynamic library exporting [`whetstone_sdk::abi::ENTRY_SYMBOL`], loaded with
//! `libloading`. The ABI version is checked before anything else is called, every entry runs
//! inside `catch_unwind`, and a loaded library is never unloaded (a plugin's code may still be
//! referenced by tensors' backward closures or thread-locals).

use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::Tensor;
use whetstone_sdk::abi::*;
use whetstone_sdk::{Event, Init, LinearInfo, ModelInfo, Op};

use super::session::{HostState, Session};
use super::transport::Transport;
use crate::{Error, Result};

/// Host-side context behind the `ctx` pointer: the plugin's state and the buffers whose
/// pointers host calls return (valid until the next host call).
#[derive(Default)]
struct NativeCtx {
    state: Mutex<HostState>,
    last_error: Mutex<String>,
    dims: Mutex<Vec<u64>>,
    floats: Mutex<Vec<f32>>,
    bytes: Mutex<Vec<u8>>,
    text: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// # Safety
/// `ctx` is the pointer the host put in its table: a leaked `NativeCtx`.
unsafe fn ctx<'a>(ctx: *mut c_void) -> &'a NativeCtx {
    // SAFETY: see above; the context is leaked, so it lives for the process.
    unsafe { &*(ctx as *const NativeCtx) }
}

/// Runs a host function body: records an error message and returns `WS_ERROR` on failure,
/// including a panic inside the host.
fn host_call(c: &NativeCtx, f: impl FnOnce() -> std::result::Result<(), String>) -> WsStatus {
    let outcome = catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err("the host panicked while serving this call".to_string()));
    match outcome {
        Ok(()) => WS_OK,
        Err(message) => {
            *lock(&c.last_error) = message;
            WS_ERROR
        }
    }
}

/// # Safety
/// `ptr` must point to `len` readable values (or `len` be 0).
unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

unsafe extern "C-unwind" fn h_last_error(c: *mut c_void) -> WsStr {
    // SAFETY: host context.
    let c = unsafe { ctx(c) };
    let s = lock(&c.last_error);
    WsStr {
        ptr: s.as_ptr(),
        len: s.len(),
    }
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn h_tensor_op(
    c: *mut c_void,
    op: u32,
    inputs: *const u64,
    n_inputs: usize,
    ints: *const i64,
    n_ints: usize,
    floats: *const f64,
    n_floats: usize,
    out: *mut u64,
) -> WsStatus {
    // SAFETY: host context; slices per the ABI.
    let c = unsafe { ctx(c) };
    host_call(c, || {
        let op = Op::from_code(op).ok_or_else(|| format!("unknown op code {op}"))?;
        let (inputs, ints, floats) = unsafe {
            (
                slice(inputs, n_inputs),
                slice(ints, n_ints),
                slice(floats, n_floats),
            )
        };
        let h = lock(&c.state).tensor_op(op, inputs, ints, floats)?;
        unsafe { *out = h };
        Ok(())
    })
}

unsafe extern "C-unwind" fn h_shape(
    c: *mut c_void,
    t: u64,
    dims: *mut *const u64,
    rank: *mut usize,
) -> WsStatus {
    // SAFETY: host context; writable outs.
    let c = unsafe { ctx(c) };
    host_call(c, || {
        let shape = lock(&c.state).shape(t)?;
        let mut buf = lock(&c.dims);
        *buf = shape;
        unsafe {
            *dims = buf.as_ptr();
            *rank = buf.len();
        }
        Ok(())
    })
}

unsafe extern "C-unwind" fn h_dtype(c: *mut c_void, t: u64, out: *mut u32) -> WsStatus {
    // SAFETY: host context; writable out.
    let c = unsafe { ctx(c) };
    host_call(c, || {
        let d = lock(&c.state).dtype(t)?;
        unsafe { *out = d as u32 };
        Ok(())
    })
}

unsafe extern "C-unwind" fn h_to_vec(
    c: *mut c_void,
    t: u64,
    data: *mut *const f32,
    len: *mut usize,
) -> WsStatus {
    // SAFETY: host context; writable outs.
    let c = unsafe { ctx(c) };
    host_call(c, || {
        let values = lock(&c.state).to_vec(t)?;
        let mut buf = lock(&c.floats);
        *buf = values;
        unsafe {
            *data = buf.as_ptr();
            *len = buf.len();
        }
        Ok(())
    })
}

unsafe extern "C-unwind" fn h_from_vec(
    c: *mut c_void,
    data: *const f32,
    len: usize,
    shape: *const u64,
    rank: usize,
    out: *mut u64,
) -> WsStatus {
    // SAFETY: host context; slices per the ABI; writable out.
    let c = unsafe { ctx(c) };
    host_call(c, || {
        let (data, shape) = unsafe { (slice(data, len), slice(shape, rank)) };
        let h = lock(&c.state).from_vec(data, shape)?;
        unsafe { *out = h };
        Ok(())
    })
}

unsafe extern "C-unwind" fn h_release(c: *mut c_void, t: u64) {
    // SAFETY: host context.
    let c = unsafe { ctx(c) };
    lock(&c.state).release(t);
}

fn init_from_c(init: WsInit) -> std::result::Result<Init, String> {
    Ok(match init.kind {
        0 => Init::Zeros,
        1 => Init::Ones,
        2 => Init::Constant(init.a),
        3 => Init::Normal {
            mean: init.a,
            std: init.b,
        },
        4 => Init::Uniform {
            low: init.a,
            high: init.b,
        },
        5 => Init::KaimingUniform { a: init.a },
        6 => Init::FromTensor(init.tensor),
        other => return Err(format!("unknown init kind {other}")),
    })
}

unsafe extern "C-unwind" fn h_add_param(
    c: *mut c_void,
    module: WsStr,
    name: WsStr,
    shape: *const u64,
    rank: usize,
    init: WsInit,
    out: *mut u64,
) -> WsStatus {
    // SAFETY: host context; strings and slices per the ABI; writable out.
    let c = unsafe { ctx(c) };
    host_call(c, || {
        let (module, name, shape) = unsafe { (module.as_str(), name.as_str(), slice(shape, rank)) };
        let h = lock(&c.state).add_param(&module, &name, shape, init_from_c(init)?)?;
        unsafe { *out = h };
        Ok(())
    })
}

unsafe extern "C-unwind" fn h_param(
    c: *mut c_void,
    module: WsStr,
    name: WsStr,
    out: *mut u64,
) -> WsStatus {
    // SAFETY: host context; strings per the ABI; writable out.
    let c = unsafe { ctx(c) };
    host_call(c, || {
        let (module, name) = unsafe { (module.as_str(), name.as_str()) };
        let h = lock(&c.state).param(&module, &name)?;
        unsafe { *out = h };
        Ok(())
    })
}

unsafe extern "C-unwind" fn h_base_param(c: *mut c_void, name: WsStr, out: *mut u64) -> WsStatus {
    // SAFETY: host context; string per the ABI; writable out.
    let c = unsafe { ctx(c) };
    host_call(c, || {
        let name = unsafe { name.as_str() };
        let h = lock(&c.state).base_param(&name)?;
        unsafe { *out = h };
        Ok(())
    })
}

unsafe extern "C-unwind" fn h_grad(
    c: *mut c_void,
    t: u64,
    present: *mut u32,
    out: *mut u64,
) -> WsStatus {
    // SAFETY: host context; writable outs.
    let c = unsafe { ctx(c) };
    host_call(c, || {
        match lock(&c.state).grad(t)? {
            Some(h) => unsafe {
                *present = 1;
                *out = h;
            },
            None => unsafe { *present = 0 },
        }
        Ok(())
    })
}

unsafe extern "C-unwind" fn h_mode(c: *mut c_void) -> u32 {
    // SAFETY: host context.
    let c = unsafe { ctx(c) };
    let state = lock(&c.state);
    match state.session() {
        Ok(s) if s.ctx.mode() == crate::model::Mode::Train => 0,
        _ => 1,
    }
}

unsafe extern "C-unwind" fn h_step(c: *mut c_void) -> u64 {
    // SAFETY: host context.
    let c = unsafe { ctx(c) };
    let state = lock(&c.state);
    state.session().map(|s| s.ctx.step()).unwrap_or(0)
}

unsafe extern "C-unwind" fn h_log(_c: *mut c_void, level: u32, message: WsStr) {
    // SAFETY: string per the ABI.
    let message = unsafe { message.as_str() };
    super::log_from_plugin(level, &message);
}

unsafe extern "C-unwind" fn h_file_count(c: *mut c_void) -> u32 {
    // SAFETY: host context.
    let c = unsafe { ctx(c) };
    let state = lock(&c.state);
    state.session().map(|s| s.files.len() as u32).unwrap_or(0)
}

unsafe extern "C-unwind" fn h_file_name(c: *mut c_void, index: u32, out: *mut WsStr) -> WsStatus {
    // SAFETY: host context; writable out.
    let c = unsafe { ctx(c) };
    host_call(c, || {
        let name = lock(&c.state).file_name(index)?;
        let mut buf = lock(&c.text);
        *buf = name;
        unsafe {
            *out = WsStr {
                ptr: buf.as_ptr(),
                len: buf.len(),
            }
        };
        Ok(())
    })
}

unsafe extern "C-unwind" fn h_read_file(
    c: *mut c_void,
    index: u32,
    offset: u64,
    len: u32,
    data: *mut *const u8,
    read: *mut usize,
) -> WsStatus {
    // SAFETY: host context; writable outs.
    let c = unsafe { ctx(c) };
    host_call(c, || {
        let bytes = lock(&c.state).read_file(index, offset, len)?;
        let mut buf = lock(&c.bytes);
        *buf = bytes;
        unsafe {
            *data = buf.as_ptr();
            *read = buf.len();
        }
        Ok(())
    })
}

/// A loaded native plugin.
pub struct NativePlugin {
    id: String,
    ctx: &'static NativeCtx,
    vtable: &'static WsPluginVtable,
    /// The library and the host table handed to it live as long as the process (a plugin is
    /// never unloaded); kept here so that they stay reachable (a leak checker sees them held).
    _library: &'static libloading::Library,
    _host: HostTable,
    /// Serialises calls: the plugin's result buffers are valid until its next call.
    call: Mutex<()>,
    /// Held across a session switch and the calls that use it.
    exclusive: Mutex<()>,
}

/// The host table handed to a plugin's entry point, held for the life of the process.
struct HostTable(#[allow(dead_code)] &'static WsHostApi);

// SAFETY: the table is never written after its creation; its only pointer, `ctx`, is the
// plugin's `NativeCtx`, which is shared between threads behind its own mutex.
unsafe impl Send for HostTable {}
// SAFETY: as above: read-only after creation.
unsafe impl Sync for HostTable {}

impl std::fmt::Debug for NativePlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativePlugin")
            .field("id", &self.id)
            .finish()
    }
}

/// Libraries loaded so far, by canonical path: a library is entered once and never unloaded.
fn loaded() -> &'static Mutex<HashMap<PathBuf, Arc<NativePlugin>>> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, Arc<NativePlugin>>>> = OnceLock::new();
    LOADED.get_or_init(Default::default)
}

impl NativePlugin {
    /// Loads the library at `path` (once per process) and checks its ABI version.
    pub fn load(id: &str, path: &Path) -> Result<Arc<NativePlugin>> {
        let fail = |m: String| Error::plugin(id, "load", format!("{}: {m}", path.display()));
        let canonical = path
            .canonicalize()
            .map_err(|e| fail(format!("cannot open the library: {e}")))?;
        let mut all = lock(loaded());
        if let Some(p) = all.get(&canonical) {
            return Ok(p.clone());
        }
        // SAFETY: loading runs the library's initialisers; native plugins are trusted code
        // (DESIGN.md principle 6), the user chose to load it.
        let library = unsafe { libloading::Library::new(&canonical) }
            .map_err(|e| fail(format!("cannot load the library: {e}")))?;
        let library: &'static libloading::Library = Box::leak(Box::new(library));
        // SAFETY: the symbol's type is the contract's `EntryFn`.
        let entry: libloading::Symbol<EntryFn> = unsafe {
            library.get(ENTRY_SYMBOL.as_bytes())
        }
        .map_err(|_| {
            fail(format!(
                "no `{ENTRY_SYMBOL}` symbol: not a Whetstone plugin (build it with whetstone-sdk's register macro)"
            ))
        })?;
        let ctx: &'static NativeCtx = Box::leak(Box::default());
        let host: &'static WsHostApi = Box::leak(Box::new(WsHostApi {
            abi_version: ABI_VERSION,
            struct_size: std::mem::size_of::<WsHostApi>() as u32,
            ctx: ctx as *const NativeCtx as *mut c_void,
            last_error: h_last_error,
            tensor_op: h_tensor_op,
            shape: h_shape,
            dtype: h_dtype,
            to_vec: h_to_vec,
            from_vec: h_from_vec,
            release: h_release,
            add_param: h_add_param,
            param: h_param,
            base_param: h_base_param,
            grad: h_grad,
            mode: h_mode,
            step: h_step,
            log: h_log,
            file_count: h_file_count,
            file_name: h_file_name,
            read_file: h_read_file,
        }));
        // SAFETY: calling the entry with a table valid for the process; panics are caught.
        let vtable = catch_unwind(AssertUnwindSafe(|| unsafe { entry(host) }))
            .map_err(|_| fail("the plugin panicked in its entry point".into()))?;
        if vtable.is_null() {
            return Err(fail(format!(
                "the plugin refused host ABI version {ABI_VERSION} (it was built for another \
                 version of whetstone-sdk; rebuild it against whetstone-sdk {})",
                whetstone_sdk::SDK_VERSION
            )));
        }
        // SAFETY: non-null; the two leading u32s are read before anything else.
        let (version, size) = unsafe { ((*vtable).abi_version, (*vtable).struct_size) };
        if version != ABI_VERSION {
            return Err(fail(format!(
                "the plugin speaks native ABI version {version}, this host speaks {ABI_VERSION}"
            )));
        }
        if (size as usize) < std::mem::size_of::<WsPluginVtable>() {
            return Err(fail(format!(
                "the plugin's vtable is {size} bytes, ABI version {ABI_VERSION} needs {}",
                std::mem::size_of::<WsPluginVtable>()
            )));
        }
        // SAFETY: version and size checked; the table is static in the plugin.
        let vtable: &'static WsPluginVtable = unsafe { &*vtable };
        let plugin = Arc::new(NativePlugin {
            id: id.to_string(),
            ctx,
            vtable,
            _library: library,
            _host: HostTable(host),
            call: Mutex::new(()),
            exclusive: Mutex::new(()),
        });
        all.insert(canonical, plugin.clone());
        Ok(plugin)
    }

    /// Runs one export: serialised, panics caught, a failure status turned into an error
    /// carrying the plugin's message.
    fn call<T>(&self, name: &str, f: impl FnOnce(&WsPluginVtable) -> (WsStatus, T)) -> Result<T> {
        let _serial = lock(&self.call);
        let (status, value) = catch_unwind(AssertUnwindSafe(|| f(self.vtable)))
            .map_err(|_| Error::plugin(&self.id, name, "the plugin panicked"))?;
        if status == WS_OK {
            return Ok(value);
        }
        // SAFETY: the plugin's message stays valid until its next call (we hold the lock).
        let message = unsafe { (self.vtable.last_error)().as_str().into_owned() };
        Err(Error::plugin(&self.id, name, message))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HostState> {
        lock(&self.ctx.state)
    }

    fn put(&self, t: &Tensor, call: &str) -> Result<u64> {
        self.state()
            .insert(t.clone())
            .map_err(|m| Error::plugin(&self.id, call, m))
    }

    fn take(&self, h: u64, call: &str) -> Result<Tensor> {
        self.state()
            .take(h)
            .map_err(|m| Error::plugin(&self.id, call, format!("returned {m}")))
    }

    fn take_pair(
        &self,
        present: u32,
        a: u64,
        b: u64,
        call: &str,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if present == 0 {
            return Ok(None);
        }
        Ok(Some((self.take(a, call)?, self.take(b, call)?)))
    }
}

struct LinearC {
    _name: String,
    info: WsLinearInfo,
}

fn linear_c(l: &LinearInfo) -> LinearC {
    let name = l.name.clone();
    let info = WsLinearInfo {
        name: WsStr::new(&name),
        in_features: l.in_features as u32,
        out_features: l.out_features as u32,
        has_bias: l.has_bias as u32,
        layer_index: l.layer_index.map(|i| i as i64).unwrap_or(-1),
    };
    // `info.name` points into the String's heap buffer, which moving the String does not move.
    LinearC { _name: name, info }
}

impl Transport for NativePlugin {
    fn metadata_json(&self) -> Result<String> {
        // SAFETY: the plugin's string stays valid until its next call.
        self.call("metadata", |v| {
            (WS_OK, unsafe { (v.metadata)().as_str().into_owned() })
        })
    }

    fn set_session(&self, session: Option<Arc<Session>>) {
        self.state().set_session(session);
    }

    fn exclusive(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.exclusive)
    }

    fn live_handles(&self) -> usize {
        self.state().live_handles()
    }

    fn create_method(&self, config: &str) -> Result<u32> {
        let mut id = 0u32;
        // SAFETY: valid string for the call; writable out.
        self.call("create-method", |v| {
            (
                unsafe { (v.create_method)(WsStr::new(config), &mut id) },
                (),
            )
        })?;
        Ok(id)
    }

    fn init_model(&self, instance: u32, m: &ModelInfo) -> Result<()> {
        let info = WsModelInfo {
            architecture: WsStr::new(&m.architecture),
            task: WsStr::new(&m.task),
            hidden_size: m.hidden_size as u32,
            num_layers: m.num_layers as u32,
            num_attention_heads: m.num_attention_heads as u32,
            num_key_value_heads: m.num_key_value_heads as u32,
            head_dim: m.head_dim as u32,
            vocab_size: m.vocab_size as u32,
        };
        // SAFETY: valid struct for the call.
        self.call("init-model", |v| {
            (unsafe { (v.init_model)(instance, &info) }, ())
        })
    }

    fn select_linear(&self, instance: u32, linear: &LinearInfo) -> Result<bool> {
        let l = linear_c(linear);
        let mut selected = 0u32;
        // SAFETY: valid struct; writable out.
        self.call("select-linear", |v| {
            (
                unsafe { (v.select_linear)(instance, &l.info, &mut selected) },
                (),
            )
        })?;
        Ok(selected != 0)
    }

    fn init_linear(&self, instance: u32, linear: &LinearInfo) -> Result<()> {
        let l = linear_c(linear);
        // SAFETY: valid struct for the call.
        self.call("init-linear", |v| {
            (unsafe { (v.init_linear)(instance, &l.info) }, ())
        })
    }

    fn forward_linear(
        &self,
        instance: u32,
        module: &str,
        x: &Tensor,
        base: &Tensor,
    ) -> Result<Tensor> {
        let call = "forward-linear";
        let (hx, hb) = (self.put(x, call)?, self.put(base, call)?);
        let mut out = 0u64;
        // SAFETY: valid string; writable out.
        self.call(call, |v| {
            (
                unsafe { (v.forward_linear)(instance, WsStr::new(module), hx, hb, &mut out) },
                (),
            )
        })?;
        self.take(out, call)
    }

    fn delta_weight(&self, instance: u32, module: &str) -> Result<Option<Tensor>> {
        let call = "delta-weight";
        let (mut present, mut out) = (0u32, 0u64);
        // SAFETY: valid string; writable outs.
        self.call(call, |v| {
            (
                unsafe { (v.delta_weight)(instance, WsStr::new(module), &mut present, &mut out) },
                (),
            )
        })?;
        if present == 0 {
            return Ok(None);
        }
        self.take(out, call).map(Some)
    }

    fn forward_embeddings(
        &self,
        instance: u32,
        e: &Tensor,
        m: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let call = "forward-embeddings";
        let (he, hm) = (self.put(e, call)?, self.put(m, call)?);
        let (mut present, mut oe, mut om) = (0u32, 0u64, 0u64);
        // SAFETY: writable outs.
        self.call(call, |v| {
            (
                unsafe { (v.forward_embeddings)(instance, he, hm, &mut present, &mut oe, &mut om) },
                (),
            )
        })?;
        self.take_pair(present, oe, om, call)
    }

    fn attention_prefix(
        &self,
        instance: u32,
        layer: u32,
        batch: u32,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let call = "attention-prefix";
        let (mut present, mut k, mut val) = (0u32, 0u64, 0u64);
        // SAFETY: writable outs.
        self.call(call, |v| {
            (
                unsafe {
                    (v.attention_prefix)(instance, layer, batch, &mut present, &mut k, &mut val)
                },
                (),
            )
        })?;
        self.take_pair(present, k, val, call)
    }

    fn trainable_base_params(&self, instance: u32, names: &[String]) -> Result<Vec<String>> {
        let call = "trainable-base-params";
        let json = serde_json::to_string(names)
            .map_err(|e| Error::plugin(&self.id, call, e.to_string()))?;
        let text = self.call(call, |v| {
            let mut out = WsStr::empty();
            // SAFETY: valid string; writable out; the result is copied under the call lock.
            let status =
                unsafe { (v.trainable_base_params)(instance, WsStr::new(&json), &mut out) };
            (status, unsafe { out.as_str().into_owned() })
        })?;
        serde_json::from_str(&text)
            .map_err(|e| Error::plugin(&self.id, call, format!("returned a bad names list: {e}")))
    }

    fn loss_term(&self, instance: u32) -> Result<Option<Tensor>> {
        let call = "loss-term";
        let (mut present, mut out) = (0u32, 0u64);
        // SAFETY: writable outs.
        self.call(call, |v| {
            (
                unsafe { (v.loss_term)(instance, &mut present, &mut out) },
                (),
            )
        })?;
        if present == 0 {
            return Ok(None);
        }
        self.take(out, call).map(Some)
    }

    fn on_event(&self, instance: u32, event: &Event) -> Result<()> {
        let (kind, task, step, loss) = match *event {
            Event::TrainStart => (0, 0, 0, 0.0),
            Event::StepEnd { step, loss } => (1, 0, step, loss),
            Event::EpochEnd(epoch) => (2, 0, u64::from(epoch), 0.0),
            Event::TrainEnd => (3, 0, 0, 0.0),
            Event::TaskStart(task) => (4, task, 0, 0.0),
            Event::TaskGradient { task, example } => (5, task, u64::from(example), 0.0),
            Event::TaskEnd(task) => (6, task, 0, 0.0),
        };
        let e = WsEvent {
            kind,
            task,
            step,
            loss,
        };
        // SAFETY: plain values.
        self.call("on-event", |v| (unsafe { (v.on_event)(instance, e) }, ()))
    }

    fn task_gradient_examples(&self, instance: u32) -> Result<u32> {
        let mut n = 0u32;
        // SAFETY: writable out.
        self.call("task-gradient-examples", |v| {
            (unsafe { (v.task_gradient_examples)(instance, &mut n) }, ())
        })?;
        Ok(n)
    }

    fn create_loss(&self, config: &str) -> Result<u32> {
        let mut id = 0u32;
        // SAFETY: valid string; writable out.
        self.call("create-loss", |v| {
            (unsafe { (v.create_loss)(WsStr::new(config), &mut id) }, ())
        })?;
        Ok(id)
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
        let hl = self.put(logits, call)?;
        let hy = self.put(labels, call)?;
        let hm = self.put(mask, call)?;
        let ht = teacher.map(|t| self.put(t, call)).transpose()?;
        let mut out = 0u64;
        // SAFETY: writable out.
        self.call(call, |v| {
            (
                unsafe {
                    (v.compute_loss)(
                        instance,
                        hl,
                        hy,
                        hm,
                        ht.is_some() as u32,
                        ht.unwrap_or(0),
                        &mut out,
                    )
                },
                (),
            )
        })?;
        self.take(out, call)
    }

    fn create_loader(&self, config: &str) -> Result<u32> {
        let mut id = 0u32;
        // SAFETY: valid string; writable out.
        self.call("create-loader", |v| {
            (
                unsafe { (v.create_loader)(WsStr::new(config), &mut id) },
                (),
            )
        })?;
        Ok(id)
    }

    fn next_record(&self, instance: u32) -> Result<Option<String>> {
        self.call("next-record", |v| {
            let (mut present, mut out) = (0u32, WsStr::empty());
            // SAFETY: writable outs; the text is copied under the call lock.
            let status = unsafe { (v.next_record)(instance, &mut present, &mut out) };
            let text = (present != 0).then(|| unsafe { out.as_str().into_owned() });
            (status, text)
        })
    }
}
