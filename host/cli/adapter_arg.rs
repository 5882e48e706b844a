//! The `--adapter DIR` and `--plugin PATH` arguments shared by `generate` and `eval`: a PEFT
//! adapter directory attached to the model after it is loaded, and the plugin manifests searched
//! first for the adapter's method.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use whetstone_host::model::Model;
use whetstone_host::plugin::method::MethodAdapter;

/// Which adapter to attach, and where to look for its method plugin.
#[derive(Debug, Clone, Args)]
pub struct AdapterOptions {
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors, from Whetstone
    /// or Python PEFT) to attach to the model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// A plugin manifest (`plugin.toml` or its folder) searched before the plugin directory for
    /// the adapter's method; repeatable.
    #[arg(long = "plugin", value_name = "PATH")]
    pub plugins: Vec<PathBuf>,
}

impl AdapterOptions {
    /// Attaches the adapter, if one was given, to `model`.
    pub fn attach(&self, model: &dyn Model) -> Result<Option<Arc<MethodAdapter>>> {
        let Some(dir) = &self.adapter else {
            return Ok(None);
        };
        attach(model, dir, &self.plugins).map(Some)
    }
}

/// Loads the PEFT adapter in `dir` onto `model`, searching `plugins` first for its method.
pub fn attach(
    model: &dyn Model,
    dir: &std::path::Path,
    plugins: &[PathBuf],
) -> Result<Arc<MethodAdapter>> {
    let adapter = whetstone_host::adapter::load(
        model,
        dir,
        whetstone_host::adapter::DEFAULT_ADAPTER_NAME,
        plugins,
    )
    .with_context(|| format!("loading adapter {}", dir.display()))?;
    eprintln!(
        "[adapter {}: {} on {} modules]",
        dir.display(),
        adapter.plugin.id(),
        adapter.wrapped_modules().len()
    );
    Ok(adapter)
}
