//! The host calls of the transport this plugin is built for.

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::native::host::*;
#[cfg(target_arch = "wasm32")]
pub(crate) use crate::wasm::host::*;
