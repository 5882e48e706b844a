//! The C ABI of native plugins, version [`ABI_VERSION`]: the same interface as the WIT package
//! `sdk/wit/0.2.0`, as `#[repr(C)]` tables of function pointers.
//!
//! A native plugin exports one symbol, [`ENTRY_SYMBOL`], of type [`EntryFn`]. The host calls it
//! with its [`WsHostApi`] and gets the plugin's [`WsPluginVtable`] back. Both tables start with
//! `abi_version` and `struct_size`, so either side can refuse a table it does not understand
//! before calling anything in it. The generated C header is `sdk/include/whetstone_plugin.h`.
//!
//! Conventions: every fallible call returns a [`WsStatus`] (`0` is success). On failure the
//! callee's message is read with its `last_error` function. Strings are UTF-8 [`WsStr`] (not
//! NUL-terminated). Memory returned through a pointer (a shape, a string) belongs to the callee
//! and stays valid until the next call into that side.

use std::ffi::c_void;

/// The native vtable's version. Bumped with every incompatible change (a new WIT folder).
pub const ABI_VERSION: u32 = 2;

/// The symbol every native plugin exports.
pub const ENTRY_SYMBOL: &str = "whetstone_plugin_entry";

/// Status of a call: [`WS_OK`] or [`WS_ERROR`].
pub type WsStatus = i32;
/// Success.
pub const WS_OK: WsStatus = 0;
/// Failure; the message is available from `last_error`.
pub const WS_ERROR: WsStatus = 1;

/// A borrowed UTF-8 string.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WsStr {
    /// First byte (may be dangling when `len` is 0).
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

impl WsStr {
    /// Borrows `s`.
    pub fn new(s: &str) -> WsStr {
        WsStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// An empty string.
    pub const fn empty() -> WsStr {
        WsStr {
            ptr: std::ptr::null(),
            len: 0,
        }
    }

    /// The string's text (lossy on invalid UTF-8).
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that stay alive for `'a`.
    pub unsafe fn as_str<'a>(self) -> std::borrow::Cow<'a, str> {
        if self.ptr.is_null() || self.len == 0 {
            return std::borrow::Cow::Borrowed("");
        }
        // SAFETY: the caller guarantees `ptr..ptr+len` is readable for 'a.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        String::from_utf8_lossy(bytes)
    }
}

/// A parameter initialisation ([`crate::Init`]): `kind` 0 zeros, 1 ones, 2 constant(`a`),
/// 3 normal(mean `a`, std `b`), 4 uniform(`a`, `b`), 5 kaiming-uniform(`a`), 6 from-tensor(`tensor`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WsInit {
    /// Which initialisation.
    pub kind: u32,
    /// First argument.
    pub a: f64,
    /// Second argument.
    pub b: f64,
    /// Source tensor handle for from-tensor.
    pub tensor: u64,
}

/// A linear module ([`crate::LinearInfo`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WsLinearInfo {
    /// Module name.
    pub name: WsStr,
    /// Input features.
    pub in_features: u32,
    /// Output features.
    pub out_features: u32,
    /// 1 when the module has a bias.
    pub has_bias: u32,
    /// Block index, or -1 when none.
    pub layer_index: i64,
}

/// The base model's shape ([`crate::ModelInfo`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WsModelInfo {
    /// Architecture.
    pub architecture: WsStr,
    /// `causal-lm` or `sequence-classification`.
    pub task: WsStr,
    /// Hidden size.
    pub hidden_size: u32,
    /// Transformer blocks.
    pub num_layers: u32,
    /// Attention heads.
    pub num_attention_heads: u32,
    /// Key/value heads.
    pub num_key_value_heads: u32,
    /// Per-head dimension.
    pub head_dim: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
}

/// A lifecycle event ([`crate::Event`]): `kind` 0 train-start, 1 step-end(`step`, `loss`),
/// 2 epoch-end(`step` holds the epoch), 3 train-end, 4 task-start(`task`),
/// 5 task-gradient(`task`, `step` holds the example), 6 task-end(`task`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WsEvent {
    /// Which event.
    pub kind: u32,
    /// The task of the task events.
    pub task: u32,
    /// Step, epoch or example.
    pub step: u64,
    /// Loss for step-end.
    pub loss: f64,
}

/// The functions the host offers a native plugin (WIT interface `host`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WsHostApi {
    /// [`ABI_VERSION`] of the host.
    pub abi_version: u32,
    /// `size_of::<WsHostApi>()` as the host built it.
    pub struct_size: u32,
    /// Host context, passed back as the first argument of every call.
    pub ctx: *mut c_void,
    /// The message of the last failed host call.
    pub last_error: unsafe extern "C-unwind" fn(ctx: *mut c_void) -> WsStr,
    /// `tensor-op`.
    pub tensor_op: unsafe extern "C-unwind" fn(
        ctx: *mut c_void,
        op: u32,
        inputs: *const u64,
        n_inputs: usize,
        ints: *const i64,
        n_ints: usize,
        floats: *const f64,
        n_floats: usize,
        out: *mut u64,
    ) -> WsStatus,
    /// `shape`: `*dims` points to `*rank` host-owned values.
    pub shape: unsafe extern "C-unwind" fn(
        ctx: *mut c_void,
        t: u64,
        dims: *mut *const u64,
        rank: *mut usize,
    ) -> WsStatus,
    /// `dtype`: writes a [`crate::DType`] code.
    pub dtype: unsafe extern "C-unwind" fn(ctx: *mut c_void, t: u64, out: *mut u32) -> WsStatus,
    /// `to-vec`: `*data` points to `*len` host-owned values.
    pub to_vec: unsafe extern "C-unwind" fn(
        ctx: *mut c_void,
        t: u64,
        data: *mut *const f32,
        len: *mut usize,
    ) -> WsStatus,
    /// `from-vec`.
    pub from_vec: unsafe extern "C-unwind" fn(
        ctx: *mut c_void,
        data: *const f32,
        len: usize,
        shape: *const u64,
        rank: usize,
        out: *mut u64,
    ) -> WsStatus,
    /// `release`.
    pub release: unsafe extern "C-unwind" fn(ctx: *mut c_void, t: u64),
    /// `add-param`.
    pub add_param: unsafe extern "C-unwind" fn(
        ctx: *mut c_void,
        module: WsStr,
        name: WsStr,
        shape: *const u64,
        rank: usize,
        init: WsInit,
        out: *mut u64,
    ) -> WsStatus,
    /// `param`.
    pub param: unsafe extern "C-unwind" fn(
        ctx: *mut c_void,
        module: WsStr,
        name: WsStr,
        out: *mut u64,
    ) -> WsStatus,
    /// `base-param`.
    pub base_param:
        unsafe extern "C-unwind" fn(ctx: *mut c_void, name: WsStr, out: *mut u64) -> WsStatus,
    /// `grad`: `*present` 0 when the parameter got no gradient.
    pub grad: unsafe extern "C-unwind" fn(
        ctx: *mut c_void,
        t: u64,
        present: *mut u32,
        out: *mut u64,
    ) -> WsStatus,
    /// `mode`: 0 train, 1 eval.
    pub mode: unsafe extern "C-unwind" fn(ctx: *mut c_void) -> u32,
    /// `step`.
    pub step: unsafe extern "C-unwind" fn(ctx: *mut c_void) -> u64,
    /// `log`.
    pub log: unsafe extern "C-unwind" fn(ctx: *mut c_void, level: u32, message: WsStr),
    /// `file-count`.
    pub file_count: unsafe extern "C-unwind" fn(ctx: *mut c_void) -> u32,
    /// `file-name`: `*out` is host-owned.
    pub file_name:
        unsafe extern "C-unwind" fn(ctx: *mut c_void, index: u32, out: *mut WsStr) -> WsStatus,
    /// `read-file`: `*data` points to `*read` host-owned bytes.
    pub read_file: unsafe extern "C-unwind" fn(
        ctx: *mut c_void,
        index: u32,
        offset: u64,
        len: u32,
        data: *mut *const u8,
        read: *mut usize,
    ) -> WsStatus,
}

/// The functions a native plugin exports (WIT interface `plugin`). Optional results use a
/// presence flag (`*present = 1`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WsPluginVtable {
    /// [`ABI_VERSION`] the plugin was built for.
    pub abi_version: u32,
    /// `size_of::<WsPluginVtable>()` as the plugin built it.
    pub struct_size: u32,
    /// The message of the plugin's last failed call.
    pub last_error: unsafe extern "C-unwind" fn() -> WsStr,
    /// `metadata` (JSON).
    pub metadata: unsafe extern "C-unwind" fn() -> WsStr,
    /// `create-method`.
    pub create_method: unsafe extern "C-unwind" fn(config: WsStr, out: *mut u32) -> WsStatus,
    /// `init-model`.
    pub init_model:
        unsafe extern "C-unwind" fn(instance: u32, model: *const WsModelInfo) -> WsStatus,
    /// `select-linear`: `*selected` is 0 or 1.
    pub select_linear: unsafe extern "C-unwind" fn(
        instance: u32,
        linear: *const WsLinearInfo,
        selected: *mut u32,
    ) -> WsStatus,
    /// `init-linear`.
    pub init_linear:
        unsafe extern "C-unwind" fn(instance: u32, linear: *const WsLinearInfo) -> WsStatus,
    /// `forward-linear`.
    pub forward_linear: unsafe extern "C-unwind" fn(
        instance: u32,
        module: WsStr,
        x: u64,
        base_out: u64,
        out: *mut u64,
    ) -> WsStatus,
    /// `delta-weight`.
    pub delta_weight: unsafe extern "C-unwind" fn(
        instance: u32,
        module: WsStr,
        present: *mut u32,
        out: *mut u64,
    ) -> WsStatus,
    /// `forward-embeddings`.
    pub forward_embeddings: unsafe extern "C-unwind" fn(
        instance: u32,
        embeddings: u64,
        attention_mask: u64,
        present: *mut u32,
        out_embeddings: *mut u64,
        out_mask: *mut u64,
    ) -> WsStatus,
    /// `attention-prefix`.
    pub attention_prefix: unsafe extern "C-unwind" fn(
        instance: u32,
        layer: u32,
        batch: u32,
        present: *mut u32,
        key: *mut u64,
        value: *mut u64,
    ) -> WsStatus,
    /// `trainable-base-params`: names in and out as JSON arrays of strings.
    pub trainable_base_params: unsafe extern "C-unwind" fn(
        instance: u32,
        names_json: WsStr,
        out_json: *mut WsStr,
    ) -> WsStatus,
    /// `loss-term`.
    pub loss_term:
        unsafe extern "C-unwind" fn(instance: u32, present: *mut u32, out: *mut u64) -> WsStatus,
    /// `on-event`.
    pub on_event: unsafe extern "C-unwind" fn(instance: u32, event: WsEvent) -> WsStatus,
    /// `task-gradient-examples`.
    pub task_gradient_examples:
        unsafe extern "C-unwind" fn(instance: u32, out: *mut u32) -> WsStatus,
    /// `create-loss`.
    pub create_loss: unsafe extern "C-unwind" fn(config: WsStr, out: *mut u32) -> WsStatus,
    /// `compute-loss`: `has_teacher` 0 or 1.
    pub compute_loss: unsafe extern "C-unwind" fn(
        instance: u32,
        logits: u64,
        labels: u64,
        mask: u64,
        has_teacher: u32,
        teacher_logits: u64,
        out: *mut u64,
    ) -> WsStatus,
    /// `create-loader`.
    pub create_loader: unsafe extern "C-unwind" fn(config: WsStr, out: *mut u32) -> WsStatus,
    /// `next-record`: `*present` 0 at the end of the data; `*out` is plugin-owned JSON.
    pub next_record:
        unsafe extern "C-unwind" fn(instance: u32, present: *mut u32, out: *mut WsStr) -> WsStatus,
}

/// The type of [`ENTRY_SYMBOL`]: takes the host's table (valid for the life of the process) and
/// returns the plugin's (likewise), or null when the plugin refuses the host's version.
pub type EntryFn = unsafe extern "C-unwind" fn(host: *const WsHostApi) -> *const WsPluginVtable;
