//! Sessions: create (from a recipe or from parts), configure, attach and detach methods and
//! adapters, save, merge, cancel and free.

use std::ffi::c_char;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};

use serde_json::Value;
use whetstone_host::recipe::MethodSpec;
use whetstone_host::session::{parse_document, Session};

use crate::handles::HandleTable;
use crate::status::{guard, optional_text, require_out, text, ApiError, WhetError, WhetStatus};
use crate::WHETSTONE_ABI_VERSION;

/// A session handle: one loaded model with its method, data and adapters. Free it with
/// `whet_session_free`.
pub type WhetSession = u64;

/// A session and the flag that cancels its training from any thread.
pub(crate) struct SessionEntry {
    session: Mutex<Session>,
    pub(crate) cancel: Arc<AtomicBool>,
}

static SESSIONS: HandleTable<SessionEntry> = HandleTable::new(1);

/// Runs `f` on the session `handle` names, refusing a dead handle and a session another call
/// is using.
pub(crate) fn with_session<R>(
    handle: WhetSession,
    f: impl FnOnce(&mut Session, &SessionEntry) -> Result<R, ApiError>,
) -> Result<R, ApiError> {
    let entry = SESSIONS
        .get(handle)
        .ok_or_else(|| ApiError::handle("session", handle))?;
    let mut session = match entry.session.try_lock() {
        Ok(s) => s,
        Err(TryLockError::WouldBlock) => {
            return Err(ApiError::new(
                WhetStatus::Busy,
                "the session is in use by another call (another thread, or its own progress \
                 callback); a session serves one call at a time",
            ))
        }
        Err(TryLockError::Poisoned(_)) => {
            return Err(ApiError::new(
                WhetStatus::Panic,
                "the session is unusable after an internal error in an earlier call; free it \
                 and create a new one",
            ))
        }
    };
    f(&mut session, &entry)
}

/// Runs a session method that returns nothing: success is `WHET_STATUS_OK`.
fn on_session(
    handle: WhetSession,
    f: impl FnOnce(&mut Session) -> whetstone_host::Result<()>,
) -> Result<WhetStatus, ApiError> {
    with_session(handle, |s, _| {
        f(s)?;
        Ok(WhetStatus::Ok)
    })
}

fn check_abi(abi_version: u32) -> Result<(), ApiError> {
    if abi_version == WHETSTONE_ABI_VERSION {
        return Ok(());
    }
    Err(ApiError::new(
        WhetStatus::VersionMismatch,
        format!(
            "the program was compiled against whetstone.h ABI version {abi_version}, but this \
             library is ABI version {WHETSTONE_ABI_VERSION}: rebuild the program with the \
             whetstone.h that ships with this library"
        ),
    ))
}

/// Stores `session` and writes its handle to `out`.
///
/// # Safety
/// `out` is valid for writing (checked non-NULL by the caller).
unsafe fn store(session: Session, out: *mut WhetSession) -> Result<WhetStatus, ApiError> {
    let entry = SessionEntry {
        session: Mutex::new(session),
        cancel: Arc::new(AtomicBool::new(false)),
    };
    let handle = SESSIONS
        .insert(entry)
        .ok_or_else(|| ApiError::new(WhetStatus::Failed, "too many open sessions"))?;
    // SAFETY: checked non-NULL; valid by the caller's contract.
    unsafe { out.write(handle) };
    Ok(WhetStatus::Ok)
}

/// A method spec from a kind and an optional TOML/JSON configuration.
fn method_spec(kind: &str, config: Option<&str>) -> Result<MethodSpec, ApiError> {
    let mut map = match config {
        Some(c) => parse_document(c, "method configuration")?,
        None => serde_json::Map::new(),
    };
    map.insert("kind".into(), Value::String(kind.to_string()));
    MethodSpec::try_from(map).map_err(|e| ApiError::new(WhetStatus::Config, e))
}

/// Creates a session from a recipe: the TOML text of a `whet train` recipe, or the same as
/// JSON (text starting with `{`). Loads the model and attaches the method; the data is read at
/// the first train or evaluate. Relative paths are relative to the working directory.
///
/// Pass `WHETSTONE_ABI_VERSION` as `abi_version`: a program compiled against another header
/// gets `WHET_STATUS_VERSION_MISMATCH`. On success the handle is stored in `*out_session`.
///
/// # Safety
/// `recipe` is NULL or a NUL-terminated string; `out_session` is NULL or writable; `err` is
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_create(
    abi_version: u32,
    recipe: *const c_char,
    out_session: *mut WhetSession,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            check_abi(abi_version)?;
            let recipe = text(recipe, "recipe")?;
            require_out(out_session, "out_session")?;
            let session = Session::from_recipe_text(recipe, Vec::new())?;
            store(session, out_session)
        })
    }
}

/// Creates a session from parts: the model at `model_path` (a `.gguf` file, a Hugging Face
/// directory, or `asset:NAME`), and the method plugin `method` (an id such as `"lora"`, or
/// `"full"`/`"partial"`; NULL for none: the frozen base model, to load adapters onto) with its
/// configuration `method_config` (TOML or JSON with PEFT's field names; NULL for the defaults).
/// The session has no data until `whet_session_configure` gives it a `[data]` section.
///
/// # Safety
/// String arguments are NULL or NUL-terminated; `out_session` and `err` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_create_from_parts(
    abi_version: u32,
    model_path: *const c_char,
    method: *const c_char,
    method_config: *const c_char,
    out_session: *mut WhetSession,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            check_abi(abi_version)?;
            let model_path = text(model_path, "model_path")?;
            let method = optional_text(method, "method")?;
            let config = optional_text(method_config, "method_config")?;
            require_out(out_session, "out_session")?;
            let spec = method.map(|m| method_spec(m, config)).transpose()?;
            if spec.is_none() && config.is_some() {
                return Err(ApiError::invalid(
                    "method_config is given but method is NULL: name the method it configures",
                ));
            }
            let session = Session::from_parts(model_path, spec, Vec::new())?;
            store(session, out_session)
        })
    }
}

/// Changes the session's `[data]`, `[training]` and/or `[output]` sections: `config` is TOML
/// or JSON whose tables are written field by field over the current ones (for example
/// `{"training": {"max_steps": 20}}`). The next `whet_session_train` starts a new run.
///
/// # Safety
/// `config` is NULL or NUL-terminated; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_configure(
    session: WhetSession,
    config: *const c_char,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            let config = text(config, "config")?;
            on_session(session, |s| s.configure(config))
        })
    }
}

/// Replaces the session's own method with plugin `method` (or `"full"`/`"partial"`) configured
/// by `method_config` (TOML/JSON, NULL for defaults), and makes it the active adapter.
///
/// # Safety
/// String arguments are NULL or NUL-terminated; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_attach_method(
    session: WhetSession,
    method: *const c_char,
    method_config: *const c_char,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            let method = text(method, "method")?;
            let config = optional_text(method_config, "method_config")?;
            let spec = method_spec(method, config)?;
            on_session(session, |s| s.attach_method(spec))
        })
    }
}

/// Removes the session's own method: the base model computes and nothing trains until another
/// method is attached.
///
/// # Safety
/// `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_detach_method(
    session: WhetSession,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: `err` follows this function's contract.
    unsafe { guard(err, || on_session(session, |s| s.detach_method())) }
}

/// Loads the PEFT adapter in directory `dir` (`adapter_config.json` +
/// `adapter_model.safetensors`, from Whetstone or Python PEFT) under `name` and makes it the
/// active adapter. Its method plugin must be installed. Only the session's own method
/// (`"default"`) trains; loaded adapters evaluate, generate and embed.
///
/// # Safety
/// String arguments are NULL or NUL-terminated; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_load_adapter(
    session: WhetSession,
    dir: *const c_char,
    name: *const c_char,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            let dir = text(dir, "dir")?;
            let name = text(name, "name")?;
            on_session(session, |s| s.load_adapter(Path::new(dir), name))
        })
    }
}

/// Makes adapter `name` the one that computes: a loaded adapter's name, `"default"` for the
/// session's own method, or NULL for the base model alone.
///
/// # Safety
/// `name` is NULL or NUL-terminated; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_set_adapter(
    session: WhetSession,
    name: *const c_char,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            let name = optional_text(name, "name")?;
            on_session(session, |s| s.set_adapter(name))
        })
    }
}

/// Unloads the loaded adapter `name` (the base model computes if it was the active one).
///
/// # Safety
/// `name` is NULL or NUL-terminated; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_remove_adapter(
    session: WhetSession,
    name: *const c_char,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            let name = text(name, "name")?;
            on_session(session, |s| s.remove_adapter(name))
        })
    }
}

/// Saves the active adapter to directory `dir` in PEFT's format (Python PEFT loads it with
/// `PeftModel.from_pretrained`).
///
/// # Safety
/// `dir` is NULL or NUL-terminated; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_save_adapter(
    session: WhetSession,
    dir: *const c_char,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            let dir = text(dir, "dir")?;
            on_session(session, |s| s.save_adapter(Path::new(dir)))
        })
    }
}

/// Writes the model with the active adapter merged into its weights to directory `dir` (a
/// Hugging Face model: f32 safetensors, `config.json`, tokenizer). The session keeps its
/// unmerged adapter.
///
/// # Safety
/// `dir` is NULL or NUL-terminated; `err` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_merge(
    session: WhetSession,
    dir: *const c_char,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            let dir = text(dir, "dir")?;
            on_session(session, |s| s.write_merged(Path::new(dir)).map(|_| ()))
        })
    }
}

/// Asks a `whet_session_train` in progress on this session to stop after its current step
/// (it then returns `WHET_STATUS_CANCELLED`). Callable from any thread, also while the session
/// is busy.
#[no_mangle]
pub extern "C" fn whet_session_cancel(session: WhetSession) -> WhetStatus {
    match SESSIONS.get(session) {
        Some(entry) => {
            entry.cancel.store(true, Ordering::SeqCst);
            WhetStatus::Ok
        }
        None => WhetStatus::InvalidHandle,
    }
}

/// Frees `session` and everything it holds (model, plugins, adapters). A training call in
/// progress on another thread is cancelled and the memory is released when it returns.
/// `WHET_STATUS_INVALID_HANDLE` for a handle that is not a live session (freed twice); 0 is
/// accepted and ignored.
#[no_mangle]
pub extern "C" fn whet_session_free(session: WhetSession) -> WhetStatus {
    if session == 0 {
        return WhetStatus::Ok;
    }
    let Some(entry) = SESSIONS.remove(session) else {
        return WhetStatus::InvalidHandle;
    };
    entry.cancel.store(true, Ordering::SeqCst);
    // Dropping the model and plugins runs no caller code; a panic there still stops here.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(entry))) {
        Ok(()) => WhetStatus::Ok,
        Err(_) => WhetStatus::Panic,
    }
}

/// Number of live sessions (for leak checks in tests).
pub fn live_sessions() -> usize {
    SESSIONS.len()
}
