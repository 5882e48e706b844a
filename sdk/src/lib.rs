//! # whetstone-sdk
//!
//! The one crate a [Whetstone](https://github.com/whetstone-peft/whetstone) plugin depends on.
//! Plugins — PEFT methods, loss functions, data loaders — implement a trait of this crate and
//! call one registration macro. Built as a `cdylib` for the machine, the plugin exports a
//! versioned C vtable ([`abi`]); built for `wasm32-unknown-unknown` and componentized (`whet
//! plugin build --wasm`), it exports a WebAssembly component of the WIT world
//! `whetstone:plugin/whetstone-plugin` (shipped in this crate under `wit/0.2.0/`). The source is
//! the same for both, and so are the results.
//!
//! Tensors stay in the host: a plugin holds [`Tensor`] handles and computes with them through
//! host calls that the host records in its autograd graph, so a method's forward is
//! differentiable on any device without the plugin knowing about gradients.
//!
//! ## A LoRA in 25 lines
//!
//! ```
//! use whetstone_sdk::prelude::*;
//!
//! #[derive(Deserialize)]
//! struct Config { r: usize, lora_alpha: f64, #[serde(default)] lora_dropout: f64 }
//!
//! struct Lora { cfg: Config, scaling: f64 }
//!
//! impl PeftMethod for Lora {
//!     type Config = Config;
//!     fn new(cfg: Config) -> Result<Self> { let scaling = cfg.lora_alpha / cfg.r as f64; Ok(Self { cfg, scaling }) }
//!     fn select_linear(&self, linear: &LinearInfo) -> Result<bool> { Ok(linear.name.ends_with("q_proj")) }
//!     fn init_linear(&self, layer: &mut Linear) -> Result<()> {
//!         layer.add_param("lora_A.weight", &[self.cfg.r, layer.in_features()], Init::kaiming_uniform())?;
//!         layer.add_param("lora_B.weight", &[layer.out_features(), self.cfg.r], Init::Zeros)
//!     }
//!     fn forward_linear(&self, layer: &Linear, x: &Tensor, base_out: &Tensor) -> Result<Tensor> {
//!         let h = layer.dropout(x, self.cfg.lora_dropout)?.matmul_t(layer.param("lora_A.weight")?)?;
//!         base_out.add(h.matmul_t(layer.param("lora_B.weight")?)?.scale(self.scaling)?)
//!     }
//! }
//! whetstone_sdk::register_method!(Lora);
//!
//! // The configuration is PEFT's JSON; the host passes it to `new`.
//! let lora = Lora::new(serde_json::from_str(r#"{"r": 8, "lora_alpha": 16}"#).unwrap()).unwrap();
//! assert_eq!(lora.scaling, 2.0);
//! ```
//!
//! `whet plugin new NAME` scaffolds such a crate; `whet plugin build` builds it (native, wasm or
//! both) and writes its `plugin.toml`; `whet plugin check` runs the conformance suite on it.
//!
//! ## The contract
//!
//! The host accepts plugins whose [`CONTRACT_VERSION`] has its own major version and a minor
//! version no newer than its own (before 1.0: exactly its own version, as every 0.x minor
//! version breaks the contract), and refuses others with a message naming both. Handles
//! passed into a plugin's hook belong to the plugin (its `Tensor`s release them on drop); a
//! handle it returns belongs to the host again.

#![cfg_attr(docsrs, feature(doc_cfg))]

extern crate self as whetstone_sdk;

pub mod abi;
pub mod config;
mod error;
pub mod host;
pub mod loader;
mod loss;
mod method;
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod native;
mod runtime;
mod sys;
pub mod targets;
mod tensor;
pub mod types;
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod wasm;

pub use error::{Error, Result};
pub use loader::{DataLoader, Item, Position};
pub use loss::Loss;
pub use method::{Linear, PeftMethod};
pub use tensor::Tensor;
pub use types::{
    ConfigField, DType, Event, Init, LinearInfo, Metadata, Mode, ModelInfo, Op, PluginKind,
};

/// Version of this SDK crate, stamped into every plugin built with it.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The contract version this SDK speaks: the WIT package `wit/0.2.0` and [`abi::ABI_VERSION`].
pub const CONTRACT_VERSION: ContractVersion = ContractVersion { major: 0, minor: 2 };

/// The WIT package text of [`CONTRACT_VERSION`].
pub const WIT: &str = include_str!("../wit/0.2.0/whetstone.wit");

/// Everything a plugin usually needs.
pub mod prelude {
    pub use crate::host::{self as whet_host, DataFile, Level};
    pub use crate::targets::{ModuleSelector, TargetSpec};
    pub use crate::{
        ConfigField, DataLoader, Error, Event, Init, Item, Linear, LinearInfo, Loss, Mode,
        ModelInfo, PeftMethod, Position, Result, Tensor,
    };
    pub use serde::Deserialize;
}

/// A version of the host/plugin contract (the WIT package and the native vtable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContractVersion {
    /// Incremented on any incompatible change.
    pub major: u32,
    /// Incremented on backwards-compatible additions.
    pub minor: u32,
}

impl ContractVersion {
    /// Whether a plugin built against `self` can be loaded by a host that implements `host`:
    /// same major version and the host at least as new; while the major version is 0 every
    /// minor version is a breaking one (Cargo's semver rule), so it must match exactly.
    pub fn is_compatible_with(self, host: ContractVersion) -> bool {
        if host.major == 0 {
            return self == host;
        }
        self.major == host.major && self.minor <= host.minor
    }

    /// Parses `major.minor`.
    pub fn parse(text: &str) -> Option<ContractVersion> {
        let (major, minor) = text.trim().split_once('.')?;
        Some(ContractVersion {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

impl std::fmt::Display for ContractVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Items the registration macros expand to; not part of the public API.
#[doc(hidden)]
pub mod __private {
    #[cfg(not(target_arch = "wasm32"))]
    pub use crate::native;
    pub use crate::runtime::{new_loader, new_loss, new_method, Factory, Provider};
    #[cfg(target_arch = "wasm32")]
    pub use crate::wasm;
    #[cfg(target_arch = "wasm32")]
    pub use crate::wasm::bindings::export_whetstone_plugin;
}

/// Registers a plugin's components and emits its entry points: the C-ABI symbol
/// `whetstone_plugin_entry` for native builds, the component exports for wasm32 builds.
///
/// ```ignore
/// whetstone_sdk::register_plugin!(method: MyMethod, loss: MyLoss);
/// ```
/// Each of `method`, `loss` and `loader` is optional; give at least one.
#[macro_export]
macro_rules! register_plugin {
    ($($kind:ident : $ty:ty),+ $(,)?) => {
        #[doc(hidden)]
        pub struct __WhetstonePlugin;

        impl $crate::__private::Provider for __WhetstonePlugin {
            fn factory() -> $crate::__private::Factory {
                #[allow(unused_mut)]
                let mut factory = $crate::__private::Factory {
                    name: env!("CARGO_PKG_NAME"),
                    version: env!("CARGO_PKG_VERSION"),
                    description: env!("CARGO_PKG_DESCRIPTION"),
                    method: None,
                    loss: None,
                    loader: None,
                };
                $($crate::register_plugin!(@slot factory, $kind, $ty);)+
                factory
            }
        }

        /// The native entry point (C ABI version `whetstone_sdk::abi::ABI_VERSION`).
        ///
        /// # Safety
        /// `host` must be null or a host table valid for the life of the process.
        #[cfg(not(target_arch = "wasm32"))]
        #[unsafe(no_mangle)]
        pub unsafe extern "C-unwind" fn whetstone_plugin_entry(
            host: *const $crate::abi::WsHostApi,
        ) -> *const $crate::abi::WsPluginVtable {
            // SAFETY: forwarded contract.
            unsafe { $crate::__private::native::entry::<__WhetstonePlugin>(host) }
        }

        #[cfg(target_arch = "wasm32")]
        type __WhetstoneComponent = $crate::__private::wasm::Component<__WhetstonePlugin>;
        #[cfg(target_arch = "wasm32")]
        $crate::__private::export_whetstone_plugin!(
            __WhetstoneComponent with_types_in $crate::__private::wasm::bindings
        );
    };
    (@slot $f:ident, method, $ty:ty) => {
        $f.method = Some((
            $crate::__private::new_method::<$ty>,
            <$ty as $crate::PeftMethod>::config_fields,
        ));
    };
    (@slot $f:ident, loss, $ty:ty) => {
        $f.loss = Some((
            $crate::__private::new_loss::<$ty>,
            <$ty as $crate::Loss>::config_fields,
        ));
    };
    (@slot $f:ident, loader, $ty:ty) => {
        $f.loader = Some((
            $crate::__private::new_loader::<$ty>,
            <$ty as $crate::DataLoader>::config_fields,
        ));
    };
}

/// Registers a PEFT method: `register_method!(Lora)` is `register_plugin!(method: Lora)`.
#[macro_export]
macro_rules! register_method {
    ($ty:ty) => {
        $crate::register_plugin!(method: $ty);
    };
}

/// Registers a loss: `register_loss!(MyLoss)` is `register_plugin!(loss: MyLoss)`.
#[macro_export]
macro_rules! register_loss {
    ($ty:ty) => {
        $crate::register_plugin!(loss: $ty);
    };
}

/// Registers a data loader: `register_loader!(MyLoader)` is `register_plugin!(loader: MyLoader)`.
#[macro_export]
macro_rules! register_loader {
    ($ty:ty) => {
        $crate::register_plugin!(loader: $ty);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatibility_requires_same_major_and_older_minor() {
        let host = ContractVersion { major: 1, minor: 2 };
        assert!(ContractVersion { major: 1, minor: 0 }.is_compatible_with(host));
        assert!(!ContractVersion { major: 1, minor: 3 }.is_compatible_with(host));
        assert!(!ContractVersion { major: 0, minor: 1 }.is_compatible_with(host));
        assert_eq!(host.to_string(), "1.2");
        assert_eq!(ContractVersion::parse("0.2"), Some(CONTRACT_VERSION));
        assert_eq!(ContractVersion::parse("x"), None);
    }

    #[test]
    fn before_1_0_only_the_same_minor_is_compatible() {
        let host = ContractVersion { major: 0, minor: 2 };
        assert!(host.is_compatible_with(host));
        assert!(!ContractVersion { major: 0, minor: 1 }.is_compatible_with(host));
        assert!(!ContractVersion { major: 0, minor: 3 }.is_compatible_with(host));
    }

    #[test]
    fn op_codes_follow_the_wit_enum_order() {
        let start = WIT.find("enum op {").unwrap();
        let body = &WIT[start + 9..];
        let body = &body[..body.find('}').unwrap()];
        let names: Vec<&str> = body
            .split(',')
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        let ours: Vec<&str> = Op::ALL.iter().map(|o| o.name()).collect();
        assert_eq!(names, ours);
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
            assert_eq!(Op::from_code(i as u32), Some(*op));
        }
    }
}
