//! WebAssembly component plugins (being written).

use std::path::Path;
use std::sync::Arc;

use candle_core::Tensor;
use whetstone_sdk::{Event, LinearInfo, ModelInfo};

use super::manifest::Limits;
use super::session::Session;
use super::transport::Transport;
use crate::{Error, Result};

/// A loaded WebAssembly plugin.
pub struct WasmPlugin {
    id: String,
}

impl WasmPlugin {
    /// Loads the component at `path`.
    pub fn load(id: &str, path: &Path, _limits: Limits) -> Result<WasmPlugin> {
        Err(Error::plugin(
            id,
            "load",
            format!("{}: wasm transport not written yet", path.display()),
        ))
    }
}

impl Transport for WasmPlugin {
    fn metadata_json(&self) -> Result<String> {
        Err(Error::plugin(&self.id, "metadata", "todo"))
    }
    fn set_session(&self, _session: Option<Arc<Session>>) {}
    fn live_handles(&self) -> usize {
        0
    }
    fn create_method(&self, _config: &str) -> Result<u32> {
        todo!()
    }
    fn init_model(&self, _instance: u32, _model: &ModelInfo) -> Result<()> {
        todo!()
    }
    fn select_linear(&self, _instance: u32, _linear: &LinearInfo) -> Result<bool> {
        todo!()
    }
    fn init_linear(&self, _instance: u32, _linear: &LinearInfo) -> Result<()> {
        todo!()
    }
    fn forward_linear(
        &self,
        _instance: u32,
        _module: &str,
        _x: &Tensor,
        _base: &Tensor,
    ) -> Result<Tensor> {
        todo!()
    }
    fn delta_weight(&self, _instance: u32, _module: &str) -> Result<Option<Tensor>> {
        todo!()
    }
    fn forward_embeddings(
        &self,
        _instance: u32,
        _e: &Tensor,
        _m: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        todo!()
    }
    fn attention_prefix(
        &self,
        _instance: u32,
        _layer: u32,
        _batch: u32,
    ) -> Result<Option<(Tensor, Tensor)>> {
        todo!()
    }
    fn trainable_base_params(&self, _instance: u32, _names: &[String]) -> Result<Vec<String>> {
        todo!()
    }
    fn loss_term(&self, _instance: u32) -> Result<Option<Tensor>> {
        todo!()
    }
    fn on_event(&self, _instance: u32, _event: &Event) -> Result<()> {
        todo!()
    }
    fn create_loss(&self, _config: &str) -> Result<u32> {
        todo!()
    }
    fn compute_loss(
        &self,
        _instance: u32,
        _l: &Tensor,
        _y: &Tensor,
        _m: &Tensor,
        _t: Option<&Tensor>,
    ) -> Result<Tensor> {
        todo!()
    }
    fn create_loader(&self, _config: &str) -> Result<u32> {
        todo!()
    }
    fn next_record(&self, _instance: u32) -> Result<Option<String>> {
        todo!()
    }
}
