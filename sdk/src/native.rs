//! The native transport: host calls through the host's [`WsHostApi`], and the plugin's
//! [`WsPluginVtable`] whose entries adapt C arguments to the plugin-side runtime (`runtime.rs`).

use std::cell::RefCell;
use std::sync::OnceLock;

use crate::abi::*;
use crate::runtime::{self, Provider};
use crate::types::{DType, Event, Init, LinearInfo, Mode, ModelInfo, Op};
use crate::{Error, Result, Tensor};

/// The host's table. Function pointers and an opaque context the host keeps alive for the life
/// of the process.
struct HostTable(WsHostApi);
// SAFETY: the host promises its table (and `ctx`) may be used from any thread (its context is
// internally synchronised).
unsafe impl Send for HostTable {}
// SAFETY: as above.
unsafe impl Sync for HostTable {}

static HOST: OnceLock<HostTable> = OnceLock::new();

fn api() -> Result<&'static WsHostApi> {
    HOST.get()
        .map(|t| &t.0)
        .ok_or_else(|| Error::Host("not running inside a Whetstone host".into()))
}

fn check(api: &WsHostApi, status: WsStatus) -> Result<()> {
    if status == WS_OK {
        return Ok(());
    }
    // SAFETY: the host's last_error returns a string valid until its next call.
    let message = unsafe { (api.last_error)(api.ctx).as_str().into_owned() };
    Err(Error::Host(message))
}

/// Host calls (the `sys` layer for native builds).
pub(crate) mod host {
    use super::*;

    pub(crate) fn tensor_op(op: Op, inputs: &[u64], ints: &[i64], floats: &[f64]) -> Result<u64> {
        let api = api()?;
        let mut out = 0u64;
        // SAFETY: slices are valid for their lengths during the call; `out` is writable.
        let status = unsafe {
            (api.tensor_op)(
                api.ctx,
                op as u32,
                inputs.as_ptr(),
                inputs.len(),
                ints.as_ptr(),
                ints.len(),
                floats.as_ptr(),
                floats.len(),
                &mut out,
            )
        };
        check(api, status).map(|_| out)
    }

    pub(crate) fn shape(t: u64) -> Result<Vec<usize>> {
        let api = api()?;
        let (mut dims, mut rank) = (std::ptr::null(), 0usize);
        // SAFETY: out-pointers are writable; the host's buffer is read before any other call.
        let status = unsafe { (api.shape)(api.ctx, t, &mut dims, &mut rank) };
        check(api, status)?;
        if rank == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: the host wrote `rank` dims at `dims`, valid until its next call.
        let dims = unsafe { std::slice::from_raw_parts(dims, rank) };
        Ok(dims.iter().map(|&d| d as usize).collect())
    }

    pub(crate) fn dtype(t: u64) -> Result<DType> {
        let api = api()?;
        let mut code = 0u32;
        // SAFETY: `code` is writable.
        let status = unsafe { (api.dtype)(api.ctx, t, &mut code) };
        check(api, status)?;
        DType::from_code(code).ok_or_else(|| Error::Host(format!("unknown dtype code {code}")))
    }

    pub(crate) fn to_vec(t: u64) -> Result<Vec<f32>> {
        let api = api()?;
        let (mut data, mut len) = (std::ptr::null(), 0usize);
        // SAFETY: out-pointers are writable.
        let status = unsafe { (api.to_vec)(api.ctx, t, &mut data, &mut len) };
        check(api, status)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: the host wrote `len` values at `data`, valid until its next call.
        Ok(unsafe { std::slice::from_raw_parts(data, len) }.to_vec())
    }

    pub(crate) fn from_vec(data: &[f32], shape: &[usize]) -> Result<u64> {
        let api = api()?;
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let mut out = 0u64;
        // SAFETY: slices valid for the call; `out` writable.
        let status = unsafe {
            (api.from_vec)(
                api.ctx,
                data.as_ptr(),
                data.len(),
                dims.as_ptr(),
                dims.len(),
                &mut out,
            )
        };
        check(api, status).map(|_| out)
    }

    pub(crate) fn release(t: u64) {
        if let Ok(api) = api() {
            // SAFETY: plain value call.
            unsafe { (api.release)(api.ctx, t) }
        }
    }

    fn init_to_c(init: Init) -> WsInit {
        let (kind, a, b, tensor) = match init {
            Init::Zeros => (0, 0.0, 0.0, 0),
            Init::Ones => (1, 0.0, 0.0, 0),
            Init::Constant(v) => (2, v, 0.0, 0),
            Init::Normal { mean, std } => (3, mean, std, 0),
            Init::Uniform { low, high } => (4, low, high, 0),
            Init::KaimingUniform { a } => (5, a, 0.0, 0),
            Init::FromTensor(t) => (6, 0.0, 0.0, t),
        };
        WsInit { kind, a, b, tensor }
    }

    pub(crate) fn add_param(module: &str, name: &str, shape: &[usize], init: Init) -> Result<u64> {
        let api = api()?;
        let dims: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let mut out = 0u64;
        // SAFETY: strings and slices valid for the call; `out` writable.
        let status = unsafe {
            (api.add_param)(
                api.ctx,
                WsStr::new(module),
                WsStr::new(name),
                dims.as_ptr(),
                dims.len(),
                init_to_c(init),
                &mut out,
            )
        };
        check(api, status).map(|_| out)
    }

    pub(crate) fn param(module: &str, name: &str) -> Result<u64> {
        let api = api()?;
        let mut out = 0u64;
        // SAFETY: strings valid for the call; `out` writable.
        let status =
            unsafe { (api.param)(api.ctx, WsStr::new(module), WsStr::new(name), &mut out) };
        check(api, status).map(|_| out)
    }

    pub(crate) fn base_param(name: &str) -> Result<u64> {
        let api = api()?;
        let mut out = 0u64;
        // SAFETY: string valid for the call; `out` writable.
        let status = unsafe { (api.base_param)(api.ctx, WsStr::new(name), &mut out) };
        check(api, status).map(|_| out)
    }

    pub(crate) fn grad(t: u64) -> Result<Option<u64>> {
        let api = api()?;
        let (mut present, mut out) = (0u32, 0u64);
        // SAFETY: plain values; `present` and `out` writable.
        let status = unsafe { (api.grad)(api.ctx, t, &mut present, &mut out) };
        check(api, status).map(|_| (present != 0).then_some(out))
    }

    pub(crate) fn mode() -> Mode {
        match api() {
            // SAFETY: plain value call.
            Ok(api) if unsafe { (api.mode)(api.ctx) } == 0 => Mode::Train,
            _ => Mode::Eval,
        }
    }

    pub(crate) fn step() -> u64 {
        // SAFETY: plain value call.
        api().map(|api| unsafe { (api.step)(api.ctx) }).unwrap_or(0)
    }

    pub(crate) fn log(level: u8, message: &str) {
        if let Ok(api) = api() {
            // SAFETY: string valid for the call.
            unsafe { (api.log)(api.ctx, level as u32, WsStr::new(message)) }
        }
    }

    pub(crate) fn file_count() -> u32 {
        // SAFETY: plain value call.
        api()
            .map(|api| unsafe { (api.file_count)(api.ctx) })
            .unwrap_or(0)
    }

    pub(crate) fn file_name(index: u32) -> Result<String> {
        let api = api()?;
        let mut out = WsStr::empty();
        // SAFETY: `out` writable; the string is copied before the next host call.
        let status = unsafe { (api.file_name)(api.ctx, index, &mut out) };
        check(api, status)?;
        // SAFETY: host-owned string valid until its next call.
        Ok(unsafe { out.as_str() }.into_owned())
    }

    pub(crate) fn read_file(index: u32, offset: u64, len: u32) -> Result<Vec<u8>> {
        let api = api()?;
        let (mut data, mut read) = (std::ptr::null(), 0usize);
        // SAFETY: out-pointers writable.
        let status = unsafe { (api.read_file)(api.ctx, index, offset, len, &mut data, &mut read) };
        check(api, status)?;
        if read == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: the host wrote `read` bytes at `data`, valid until its next call.
        Ok(unsafe { std::slice::from_raw_parts(data, read) }.to_vec())
    }
}

thread_local! {
    /// The message of the last failed export and the text of the last string result; both are
    /// valid until the next call into the plugin on this thread.
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
    static LAST_TEXT: RefCell<String> = const { RefCell::new(String::new()) };
}

fn keep_text(text: String) -> WsStr {
    LAST_TEXT.with(|cell| {
        *cell.borrow_mut() = text;
        let s = cell.borrow();
        WsStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    })
}

fn status(call: &str, f: impl FnOnce() -> Result<()>) -> WsStatus {
    match runtime::guard(call, f) {
        Ok(()) => WS_OK,
        Err(e) => {
            LAST_ERROR.with(|cell| *cell.borrow_mut() = e.to_string());
            WS_ERROR
        }
    }
}

unsafe fn text(s: WsStr) -> String {
    // SAFETY: the host passes strings valid for the call.
    unsafe { s.as_str() }.into_owned()
}

fn linear_info(info: &WsLinearInfo) -> LinearInfo {
    LinearInfo {
        // SAFETY: the host's string is valid for the call.
        name: unsafe { text(info.name) },
        in_features: info.in_features as usize,
        out_features: info.out_features as usize,
        has_bias: info.has_bias != 0,
        layer_index: usize::try_from(info.layer_index).ok(),
    }
}

/// Writes an optional pair of handles.
///
/// # Safety
/// The pointers must be writable.
unsafe fn put_pair(pair: Option<(Tensor, Tensor)>, present: *mut u32, a: *mut u64, b: *mut u64) {
    // SAFETY: the caller passes writable pointers.
    unsafe {
        match pair {
            Some((x, y)) => {
                *present = 1;
                *a = x.into_handle();
                *b = y.into_handle();
            }
            None => *present = 0,
        }
    }
}

unsafe extern "C-unwind" fn last_error() -> WsStr {
    LAST_ERROR.with(|cell| {
        let s = cell.borrow();
        WsStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    })
}

unsafe extern "C-unwind" fn metadata() -> WsStr {
    match runtime::guard("metadata", runtime::metadata) {
        Ok(json) => keep_text(json),
        Err(e) => keep_text(format!("{{\"error\": {:?}}}", e.to_string())),
    }
}

unsafe extern "C-unwind" fn create_method(config: WsStr, out: *mut u32) -> WsStatus {
    status("create-method", || {
        // SAFETY: valid string, writable out.
        let id = runtime::create_method(&unsafe { text(config) })?;
        unsafe { *out = id };
        Ok(())
    })
}

unsafe extern "C-unwind" fn init_model(instance: u32, model: *const WsModelInfo) -> WsStatus {
    status("init-model", || {
        // SAFETY: the host passes a valid struct for the call.
        let m = unsafe { &*model };
        let info = ModelInfo {
            architecture: unsafe { text(m.architecture) },
            task: unsafe { text(m.task) },
            hidden_size: m.hidden_size as usize,
            num_layers: m.num_layers as usize,
            num_attention_heads: m.num_attention_heads as usize,
            num_key_value_heads: m.num_key_value_heads as usize,
            head_dim: m.head_dim as usize,
            vocab_size: m.vocab_size as usize,
        };
        runtime::init_model(instance, &info)
    })
}

unsafe extern "C-unwind" fn select_linear(
    instance: u32,
    linear: *const WsLinearInfo,
    selected: *mut u32,
) -> WsStatus {
    status("select-linear", || {
        // SAFETY: valid struct; writable out.
        let info = linear_info(unsafe { &*linear });
        let chosen = runtime::select_linear(instance, &info)?;
        unsafe { *selected = chosen as u32 };
        Ok(())
    })
}

unsafe extern "C-unwind" fn init_linear(instance: u32, linear: *const WsLinearInfo) -> WsStatus {
    status("init-linear", || {
        // SAFETY: valid struct.
        runtime::init_linear(instance, linear_info(unsafe { &*linear }))
    })
}

unsafe extern "C-unwind" fn forward_linear(
    instance: u32,
    module: WsStr,
    x: u64,
    base_out: u64,
    out: *mut u64,
) -> WsStatus {
    status("forward-linear", || {
        // SAFETY: valid string; writable out.
        let module = unsafe { module.as_str() };
        let y = runtime::forward_linear(
            instance,
            &module,
            Tensor::from_handle(x),
            Tensor::from_handle(base_out),
        )?;
        unsafe { *out = y.into_handle() };
        Ok(())
    })
}

unsafe extern "C-unwind" fn delta_weight(
    instance: u32,
    module: WsStr,
    present: *mut u32,
    out: *mut u64,
) -> WsStatus {
    status("delta-weight", || {
        // SAFETY: valid string; writable outs.
        let module = unsafe { module.as_str() };
        match runtime::delta_weight(instance, &module)? {
            Some(t) => unsafe {
                *present = 1;
                *out = t.into_handle();
            },
            None => unsafe { *present = 0 },
        }
        Ok(())
    })
}

unsafe extern "C-unwind" fn forward_embeddings(
    instance: u32,
    embeddings: u64,
    mask: u64,
    present: *mut u32,
    out_embeddings: *mut u64,
    out_mask: *mut u64,
) -> WsStatus {
    status("forward-embeddings", || {
        let pair = runtime::forward_embeddings(
            instance,
            Tensor::from_handle(embeddings),
            Tensor::from_handle(mask),
        )?;
        // SAFETY: writable outs.
        unsafe { put_pair(pair, present, out_embeddings, out_mask) };
        Ok(())
    })
}

unsafe extern "C-unwind" fn attention_prefix(
    instance: u32,
    layer: u32,
    batch: u32,
    present: *mut u32,
    key: *mut u64,
    value: *mut u64,
) -> WsStatus {
    status("attention-prefix", || {
        let pair = runtime::attention_prefix(instance, layer, batch)?;
        // SAFETY: writable outs.
        unsafe { put_pair(pair, present, key, value) };
        Ok(())
    })
}

unsafe extern "C-unwind" fn trainable_base_params(
    instance: u32,
    names_json: WsStr,
    out_json: *mut WsStr,
) -> WsStatus {
    status("trainable-base-params", || {
        // SAFETY: valid string; writable out.
        let names: Vec<String> = serde_json::from_str(&unsafe { names_json.as_str() })
            .map_err(|e| Error::Host(format!("bad names list: {e}")))?;
        let chosen = runtime::trainable_base_params(instance, &names)?;
        let json = serde_json::to_string(&chosen).map_err(|e| Error::msg(e.to_string()))?;
        unsafe { *out_json = keep_text(json) };
        Ok(())
    })
}

unsafe extern "C-unwind" fn loss_term(instance: u32, present: *mut u32, out: *mut u64) -> WsStatus {
    status("loss-term", || {
        // SAFETY: writable outs.
        match runtime::loss_term(instance)? {
            Some(t) => unsafe {
                *present = 1;
                *out = t.into_handle();
            },
            None => unsafe { *present = 0 },
        }
        Ok(())
    })
}

unsafe extern "C-unwind" fn on_event(instance: u32, event: WsEvent) -> WsStatus {
    status("on-event", || {
        let event = match event.kind {
            0 => Event::TrainStart,
            1 => Event::StepEnd {
                step: event.step,
                loss: event.loss,
            },
            2 => Event::EpochEnd(event.step as u32),
            3 => Event::TrainEnd,
            4 => Event::TaskStart(event.task),
            5 => Event::TaskGradient {
                task: event.task,
                example: event.step as u32,
            },
            6 => Event::TaskEnd(event.task),
            other => return Err(Error::Host(format!("unknown event kind {other}"))),
        };
        runtime::on_event(instance, &event)
    })
}

unsafe extern "C-unwind" fn task_gradient_examples(instance: u32, out: *mut u32) -> WsStatus {
    status("task-gradient-examples", || {
        let n = runtime::task_gradient_examples(instance)?;
        // SAFETY: writable out.
        unsafe { *out = n };
        Ok(())
    })
}

unsafe extern "C-unwind" fn create_loss(config: WsStr, out: *mut u32) -> WsStatus {
    status("create-loss", || {
        // SAFETY: valid string; writable out.
        let id = runtime::create_loss(&unsafe { text(config) })?;
        unsafe { *out = id };
        Ok(())
    })
}

unsafe extern "C-unwind" fn compute_loss(
    instance: u32,
    logits: u64,
    labels: u64,
    mask: u64,
    has_teacher: u32,
    teacher_logits: u64,
    out: *mut u64,
) -> WsStatus {
    status("compute-loss", || {
        let teacher = (has_teacher != 0).then(|| Tensor::from_handle(teacher_logits));
        let loss = runtime::compute_loss(
            instance,
            Tensor::from_handle(logits),
            Tensor::from_handle(labels),
            Tensor::from_handle(mask),
            teacher,
        )?;
        // SAFETY: writable out.
        unsafe { *out = loss.into_handle() };
        Ok(())
    })
}

unsafe extern "C-unwind" fn create_loader(config: WsStr, out: *mut u32) -> WsStatus {
    status("create-loader", || {
        // SAFETY: valid string; writable out.
        let id = runtime::create_loader(&unsafe { text(config) })?;
        unsafe { *out = id };
        Ok(())
    })
}

unsafe extern "C-unwind" fn next_record(
    instance: u32,
    present: *mut u32,
    out: *mut WsStr,
) -> WsStatus {
    status("next-record", || {
        // SAFETY: writable outs.
        match runtime::next_record(instance)? {
            Some(json) => unsafe {
                *present = 1;
                *out = keep_text(json);
            },
            None => unsafe { *present = 0 },
        }
        Ok(())
    })
}

static VTABLE: WsPluginVtable = WsPluginVtable {
    abi_version: ABI_VERSION,
    struct_size: std::mem::size_of::<WsPluginVtable>() as u32,
    last_error,
    metadata,
    create_method,
    init_model,
    select_linear,
    init_linear,
    forward_linear,
    delta_weight,
    forward_embeddings,
    attention_prefix,
    trainable_base_params,
    loss_term,
    on_event,
    task_gradient_examples,
    create_loss,
    compute_loss,
    create_loader,
    next_record,
};

/// The body of the `whetstone_plugin_entry` symbol the registration macro emits.
///
/// # Safety
/// `host` must be null or point to a host table valid for the life of the process.
#[doc(hidden)]
pub unsafe fn entry<P: Provider>(host: *const WsHostApi) -> *const WsPluginVtable {
    if host.is_null() {
        return std::ptr::null();
    }
    // SAFETY: non-null and valid per the contract. Only the two leading u32 fields are read
    // before the version is known to match.
    let (version, size) = unsafe { ((*host).abi_version, (*host).struct_size) };
    if version != ABI_VERSION || (size as usize) < std::mem::size_of::<WsHostApi>() {
        return std::ptr::null();
    }
    // SAFETY: version and size match, so the whole table is readable.
    let table = unsafe { *host };
    let _ = HOST.set(HostTable(table));
    runtime::install::<P>();
    &VTABLE
}
