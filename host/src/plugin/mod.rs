//! Plugins: PEFT methods, losses and data loaders loaded as native libraries or WebAssembly
//! components (DESIGN.md principles 1-3, 6).
//!
//! - [`manifest`]: `plugin.toml` beside each build;
//! - [`discover`]: finding plugins by id (`--plugin PATH`, a recipe's `plugins`, the plugin
//!   directory);
//! - [`session`]: the handle table and the model a plugin's calls act on;
//! - [`ops`]: the tensor operations plugins ask for;
//! - [`transport`], [`native`], [`wasm`]: the two ways of calling a plugin;
//! - [`method`]: attaching a PEFT method plugin to a model; [`loss`]: a loss plugin;
//!   [`loader`]: a data-loader plugin reading the user's files.

pub mod build;
pub mod conformance;
pub mod discover;
pub mod loader;
pub mod loss;
pub mod manifest;
pub mod method;
pub mod native;
pub mod ops;
pub mod resolve;
pub mod session;
pub mod transport;
pub mod wasm;

use std::sync::Arc;

use whetstone_sdk::{ContractVersion, Metadata, PluginKind, CONTRACT_VERSION};

pub use manifest::Manifest;
pub use transport::Transport;

use crate::{Error, Result};

/// The contract versions this host accepts: major 0, minor up to the SDK's.
pub const HOST_CONTRACT: ContractVersion = CONTRACT_VERSION;

/// Which build of a plugin to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// The native library when there is one, else the WebAssembly component.
    #[default]
    Auto,
    /// The native library.
    Native,
    /// The WebAssembly component.
    Wasm,
}

impl std::str::FromStr for TransportKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(TransportKind::Auto),
            "native" => Ok(TransportKind::Native),
            "wasm" => Ok(TransportKind::Wasm),
            other => Err(Error::config(format!(
                "unknown plugin transport `{other}`: use auto, native or wasm"
            ))),
        }
    }
}

/// A recipe section naming a plugin by id with its configuration (`[loss]`, `[data.loader]`):
/// `kind` is the plugin's id, `transport` which build to load (`auto`, `native`, `wasm`), and
/// every other field is the plugin's configuration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PluginSpec {
    /// The plugin's id (`distill`, `chatterbot`, ...).
    pub kind: String,
    /// Which build of the plugin to load.
    #[serde(default)]
    pub transport: TransportKind,
    /// The plugin's configuration (every other field).
    #[serde(flatten)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

impl PluginSpec {
    /// Finds the plugin (in `explicit` manifests first, then the plugin directory) and loads
    /// the build `transport` asks for.
    pub fn load(&self, explicit: &[std::path::PathBuf]) -> Result<Plugin> {
        let manifest = discover::find(&self.kind, explicit)?;
        Plugin::load(&manifest, self.transport)
    }

    /// The configuration as one JSON object.
    pub fn config_value(&self) -> serde_json::Value {
        serde_json::Value::Object(self.config.clone())
    }
}

/// A loaded plugin: its manifest, what it reported about itself, and its transport.
#[derive(Clone)]
pub struct Plugin {
    /// The manifest it was loaded from.
    pub manifest: Manifest,
    /// The plugin's own metadata.
    pub metadata: Metadata,
    /// Which build is loaded (`native` or `wasm`).
    pub transport_kind: TransportKind,
    /// Calls into it.
    pub transport: Arc<dyn Transport>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("id", &self.manifest.id)
            .field("transport", &self.transport_kind)
            .finish()
    }
}

/// The contract versions this host accepts, in words.
fn accepted_range() -> String {
    if HOST_CONTRACT.major == 0 {
        // Before 1.0 every minor version breaks the contract.
        format!("only {HOST_CONTRACT}")
    } else {
        format!("{}.0 to {HOST_CONTRACT}", HOST_CONTRACT.major)
    }
}

/// Checks a plugin's contract version against [`HOST_CONTRACT`].
pub fn check_contract(id: &str, contract: &str) -> Result<()> {
    let version = ContractVersion::parse(contract).ok_or_else(|| {
        Error::plugin(
            id,
            "load",
            format!("unreadable contract version `{contract}`"),
        )
    })?;
    if !version.is_compatible_with(HOST_CONTRACT) {
        return Err(Error::plugin(
            id,
            "load",
            format!(
                "the plugin speaks contract {version}, this host accepts {}; rebuild the plugin \
                 against whetstone-sdk {} (contract {HOST_CONTRACT})",
                accepted_range(),
                whetstone_sdk::SDK_VERSION
            ),
        ));
    }
    Ok(())
}

impl Plugin {
    /// Loads the build of `manifest` that `kind` asks for and checks its contract version.
    pub fn load(manifest: &Manifest, kind: TransportKind) -> Result<Plugin> {
        let id = manifest.id.as_str();
        check_contract(id, &manifest.contract)?;
        let a = &manifest.artifacts;
        let (kind, transport): (TransportKind, Arc<dyn Transport>) =
            match (kind, &a.native, &a.wasm) {
                (TransportKind::Native | TransportKind::Auto, Some(lib), _) => (
                    TransportKind::Native,
                    native::NativePlugin::load(
                        id,
                        &manifest.verified_artifact(lib, a.native_sha256.as_deref())?,
                    )?,
                ),
                (TransportKind::Wasm | TransportKind::Auto, _, Some(wasm)) => (
                    TransportKind::Wasm,
                    Arc::new(wasm::WasmPlugin::load(
                        id,
                        &manifest.verified_artifact(wasm, a.wasm_sha256.as_deref())?,
                        manifest.limits,
                    )?),
                ),
                (want, _, _) => {
                    return Err(Error::plugin(
                        id,
                        "load",
                        format!(
                        "{} has no {want:?} build; run `whet plugin build` with --native or --wasm",
                        manifest.dir.display()
                    ),
                    ))
                }
            };
        let json = transport.metadata_json()?;
        let metadata: Metadata = serde_json::from_str(&json).map_err(|e| {
            Error::plugin(id, "metadata", format!("unreadable metadata {json}: {e}"))
        })?;
        check_contract(id, &metadata.contract)?;
        Ok(Plugin {
            manifest: manifest.clone(),
            metadata,
            transport_kind: kind,
            transport,
        })
    }

    /// The plugin's id.
    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    /// Whether it provides `kind`.
    pub fn provides(&self, kind: PluginKind) -> bool {
        self.metadata.kinds.contains(&kind)
    }
}

/// Forwards a plugin's log line to `tracing`.
pub(crate) fn log_from_plugin(level: u32, message: &str) {
    match level {
        0 => tracing::error!(target: "plugin", "{message}"),
        1 => tracing::warn!(target: "plugin", "{message}"),
        2 => tracing::info!(target: "plugin", "{message}"),
        3 => tracing::debug!(target: "plugin", "{message}"),
        _ => tracing::trace!(target: "plugin", "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_versions_outside_the_range_are_refused_naming_both() {
        check_contract("lora", "0.2").unwrap();
        for other in ["0.1", "0.3", "0.0"] {
            let refused = check_contract("lora", other).unwrap_err().to_string();
            assert!(
                refused.contains(other)
                    && refused.contains("only 0.2")
                    && refused.contains("`lora`"),
                "{refused}"
            );
        }
        let major = check_contract("lora", "1.0").unwrap_err().to_string();
        assert!(major.contains("1.0"), "{major}");
        assert!(check_contract("lora", "one").is_err());
        assert_eq!(
            "wasm".parse::<TransportKind>().unwrap(),
            TransportKind::Wasm
        );
        assert!("gpu".parse::<TransportKind>().is_err());
    }
}
