//! # whetstone-sdk
//!
//! The one crate a Whetstone plugin depends on. Plugins (PEFT methods, loss functions, data
//! loaders) are written against this crate and loaded by the Whetstone host either as native
//! dynamic libraries (C ABI) or as WebAssembly components.
//!
//! This release carries the versioning vocabulary shared by the host and plugins; the plugin
//! traits and the registration macro arrive with contract version 1 (see the project's
//! `DESIGN.md`, principles 1-4).

/// Version of this SDK crate, stamped into every plugin built with it.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

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
    /// same major version, and the host is at least as new.
    pub fn is_compatible_with(self, host: ContractVersion) -> bool {
        self.major == host.major && self.minor <= host.minor
    }
}

impl std::fmt::Display for ContractVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
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
    }
}
