//! Status codes, error objects and the guard every entry point runs in: arguments checked
//! first, panics caught, failures turned into a status plus an error handle.

use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::handles::HandleTable;

/// What a call did. Every fallible function returns one; `WHET_STATUS_OK` is 0.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhetStatus {
    /// The call succeeded.
    Ok = 0,
    /// Training stopped because the progress callback returned non-zero or
    /// `whet_session_cancel` was called; the next `whet_session_train` continues the run.
    Cancelled = 1,
    /// An argument was NULL, not UTF-8 or out of range (the message names it).
    InvalidArgument = 2,
    /// A handle was 0, freed, stale, forged or of another kind.
    InvalidHandle = 3,
    /// The program was compiled against another `whetstone.h` than this library's.
    VersionMismatch = 4,
    /// A recipe, configuration, model, dataset or adapter file is invalid.
    Config = 5,
    /// A plugin could not be found or loaded, or failed.
    Plugin = 6,
    /// Reading or writing a file failed.
    Io = 7,
    /// The session is in use by another call (another thread, or its own progress callback).
    Busy = 8,
    /// The caller's buffer is too small (the message says how large it must be).
    BufferTooSmall = 9,
    /// An internal error (a panic) was caught; the session it happened in is unusable.
    Panic = 10,
    /// Any other failure (tensor errors, non-finite loss, ...).
    Failed = 11,
}

impl WhetStatus {
    /// The status's name as the header spells it.
    pub fn name(self) -> &'static CStr {
        match self {
            WhetStatus::Ok => c"WHET_STATUS_OK",
            WhetStatus::Cancelled => c"WHET_STATUS_CANCELLED",
            WhetStatus::InvalidArgument => c"WHET_STATUS_INVALID_ARGUMENT",
            WhetStatus::InvalidHandle => c"WHET_STATUS_INVALID_HANDLE",
            WhetStatus::VersionMismatch => c"WHET_STATUS_VERSION_MISMATCH",
            WhetStatus::Config => c"WHET_STATUS_CONFIG",
            WhetStatus::Plugin => c"WHET_STATUS_PLUGIN",
            WhetStatus::Io => c"WHET_STATUS_IO",
            WhetStatus::Busy => c"WHET_STATUS_BUSY",
            WhetStatus::BufferTooSmall => c"WHET_STATUS_BUFFER_TOO_SMALL",
            WhetStatus::Panic => c"WHET_STATUS_PANIC",
            WhetStatus::Failed => c"WHET_STATUS_FAILED",
        }
    }

    const ALL: [WhetStatus; 12] = [
        WhetStatus::Ok,
        WhetStatus::Cancelled,
        WhetStatus::InvalidArgument,
        WhetStatus::InvalidHandle,
        WhetStatus::VersionMismatch,
        WhetStatus::Config,
        WhetStatus::Plugin,
        WhetStatus::Io,
        WhetStatus::Busy,
        WhetStatus::BufferTooSmall,
        WhetStatus::Panic,
        WhetStatus::Failed,
    ];
}

/// A failed call: its status and a message that says what was wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The status the call returns.
    pub status: WhetStatus,
    /// What went wrong.
    pub message: String,
}

impl ApiError {
    /// An error with `status`.
    pub fn new(status: WhetStatus, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// A bad argument.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(WhetStatus::InvalidArgument, message)
    }

    /// A handle that names no live object of `kind`.
    pub fn handle(kind: &str, handle: u64) -> Self {
        Self::new(
            WhetStatus::InvalidHandle,
            format!(
                "{kind} handle {handle:#x} is not a live {kind}: it was freed, never created, or \
                 is a handle of another kind"
            ),
        )
    }

    fn panic(payload: Box<dyn std::any::Any + Send>) -> Self {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Self::new(
            WhetStatus::Panic,
            format!("internal error: {what} (please report it; free the session it happened in)"),
        )
    }
}

impl From<whetstone_host::Error> for ApiError {
    fn from(e: whetstone_host::Error) -> Self {
        use whetstone_host::Error as E;
        let status = match &e {
            E::Config(_)
            | E::BadFile { .. }
            | E::BadRecord { .. }
            | E::UnknownParam(_)
            | E::Tokenizer(_)
            | E::Asset { .. } => WhetStatus::Config,
            E::Io { .. } => WhetStatus::Io,
            E::Plugin { .. } => WhetStatus::Plugin,
            E::Cancelled => WhetStatus::Cancelled,
            _ => WhetStatus::Failed,
        };
        Self::new(status, e.to_string())
    }
}

/// An error handle: read with `whet_error_message`, free with `whet_error_free`. 0 is none.
pub type WhetError = u64;

/// A stored error.
struct ErrorEntry {
    status: WhetStatus,
    message: CString,
}

static ERRORS: HandleTable<ErrorEntry> = HandleTable::new(2);

/// A C string of `text` (NUL bytes, which C cannot hold, become U+FFFD).
pub(crate) fn c_string(text: &str) -> CString {
    CString::new(text.replace('\0', "\u{FFFD}")).unwrap_or_default()
}

/// Runs an entry point's body: catches panics, and on failure returns the status and (when
/// `err` is not NULL) stores an error handle in `*err`. `*err` is set to 0 first.
///
/// # Safety
/// `err` is NULL or valid for writing a [`WhetError`].
pub(crate) unsafe fn guard(
    err: *mut WhetError,
    body: impl FnOnce() -> Result<WhetStatus, ApiError>,
) -> WhetStatus {
    if !err.is_null() {
        // SAFETY: the caller passes NULL or a writable WhetError.
        unsafe { err.write(0) };
    }
    let error = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(status)) => return status,
        Ok(Err(e)) => e,
        Err(payload) => ApiError::panic(payload),
    };
    let status = error.status;
    if !err.is_null() {
        let entry = ErrorEntry {
            status,
            message: c_string(&error.message),
        };
        if let Some(handle) = ERRORS.insert(entry) {
            // SAFETY: as above.
            unsafe { err.write(handle) };
        }
    }
    status
}

/// The UTF-8 text at `ptr`, named `what` in errors.
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string that outlives the call.
pub(crate) unsafe fn text<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, ApiError> {
    if ptr.is_null() {
        return Err(ApiError::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(ptr) }
        .to_str()
        .map_err(|e| ApiError::invalid(format!("{what} is not valid UTF-8: {e}")))
}

/// Like [`text`], with NULL meaning "not given".
///
/// # Safety
/// As [`text`].
pub(crate) unsafe fn optional_text<'a>(
    ptr: *const c_char,
    what: &str,
) -> Result<Option<&'a str>, ApiError> {
    if ptr.is_null() {
        Ok(None)
    } else {
        // SAFETY: forwarded contract.
        unsafe { text(ptr, what) }.map(Some)
    }
}

/// Refuses a NULL output pointer before any work is done.
pub(crate) fn require_out<T>(ptr: *mut T, what: &str) -> Result<(), ApiError> {
    if ptr.is_null() {
        Err(ApiError::invalid(format!(
            "{what} is NULL: pass the address to store the result in"
        )))
    } else {
        Ok(())
    }
}

/// The status of error `err` (`WHET_STATUS_INVALID_HANDLE` when `err` is not a live error).
#[no_mangle]
pub extern "C" fn whet_error_status(err: WhetError) -> WhetStatus {
    ERRORS
        .get(err)
        .map_or(WhetStatus::InvalidHandle, |e| e.status)
}

/// The message of error `err`: what was wrong and how to fix it. The string stays valid until
/// `whet_error_free(err)`. NULL when `err` is not a live error.
#[no_mangle]
pub extern "C" fn whet_error_message(err: WhetError) -> *const c_char {
    // The table keeps the entry (and so the string) alive until the handle is freed.
    ERRORS
        .get(err)
        .map_or(std::ptr::null(), |e| e.message.as_ptr())
}

/// Frees error `err`. Returns `WHET_STATUS_INVALID_HANDLE` for a handle that is not a live
/// error (freed twice, or never an error); 0 is accepted and ignored.
#[no_mangle]
pub extern "C" fn whet_error_free(err: WhetError) -> WhetStatus {
    if err == 0 {
        return WhetStatus::Ok;
    }
    match ERRORS.remove(err) {
        Some(_) => WhetStatus::Ok,
        None => WhetStatus::InvalidHandle,
    }
}

/// The name of status code `status` (`"WHET_STATUS_OK"`, ...), or `"WHET_STATUS_UNKNOWN"`. The
/// string is static.
#[no_mangle]
pub extern "C" fn whet_status_name(status: i32) -> *const c_char {
    WhetStatus::ALL
        .iter()
        .find(|s| **s as i32 == status)
        .map_or(c"WHET_STATUS_UNKNOWN".as_ptr(), |s| s.name().as_ptr())
}

/// Number of live error objects (for leak checks in tests).
pub fn live_errors() -> usize {
    ERRORS.len()
}
