//! Text the library hands out (generated text), as handles the caller frees.

use std::ffi::{c_char, CString};

use crate::handles::HandleTable;
use crate::status::{c_string, WhetStatus};

/// A text handle: read with `whet_text_data`, free with `whet_text_free`.
pub type WhetText = u64;

static TEXTS: HandleTable<CString> = HandleTable::new(3);

/// Stores `text` and returns its handle.
pub(crate) fn store(text: &str) -> Option<WhetText> {
    TEXTS.insert(c_string(text))
}

/// The NUL-terminated UTF-8 text of `text`, valid until `whet_text_free(text)`; NULL when
/// `text` is not a live text handle.
#[no_mangle]
pub extern "C" fn whet_text_data(text: WhetText) -> *const c_char {
    TEXTS.get(text).map_or(std::ptr::null(), |t| t.as_ptr())
}

/// Frees `text`. `WHET_STATUS_INVALID_HANDLE` when it is not a live text handle (freed twice);
/// 0 is accepted and ignored.
#[no_mangle]
pub extern "C" fn whet_text_free(text: WhetText) -> WhetStatus {
    if text == 0 {
        return WhetStatus::Ok;
    }
    match TEXTS.remove(text) {
        Some(_) => WhetStatus::Ok,
        None => WhetStatus::InvalidHandle,
    }
}

/// Number of live text objects (for leak checks in tests).
pub fn live_texts() -> usize {
    TEXTS.len()
}
