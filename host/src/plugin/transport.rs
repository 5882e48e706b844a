//! The host's view of a loaded plugin: the contract's exports as Rust calls, implemented by the
//! native ([`super::native`]) and WebAssembly ([`super::wasm`]) transports alike.
//!
//! Tensors passed in are registered in the plugin's handle table for the call (the plugin owns
//! those handles from then on); tensors returned are taken out of it.

use std::sync::Arc;

use candle_core::Tensor;
use whetstone_sdk::{Event, LinearInfo, ModelInfo};

use super::session::Session;
use crate::Result;

/// Calls into one loaded plugin. Errors are [`crate::Error::Plugin`] naming the plugin and call.
pub trait Transport: Send + Sync {
    /// The metadata JSON the plugin reports.
    fn metadata_json(&self) -> Result<String>;
    /// Attaches the session (model) later calls act on.
    fn set_session(&self, session: Option<Arc<Session>>);
    /// Exclusive use of the plugin for a session switch and the calls that follow it: one
    /// loaded plugin may serve several models, from several threads.
    fn exclusive(&self) -> std::sync::MutexGuard<'_, ()>;
    /// Live handles the plugin holds (leak diagnostics and tests).
    fn live_handles(&self) -> usize;

    /// `create-method`.
    fn create_method(&self, config: &str) -> Result<u32>;
    /// `init-model`.
    fn init_model(&self, instance: u32, model: &ModelInfo) -> Result<()>;
    /// `select-linear`.
    fn select_linear(&self, instance: u32, linear: &LinearInfo) -> Result<bool>;
    /// `init-linear`.
    fn init_linear(&self, instance: u32, linear: &LinearInfo) -> Result<()>;
    /// `forward-linear`.
    fn forward_linear(
        &self,
        instance: u32,
        module: &str,
        x: &Tensor,
        base: &Tensor,
    ) -> Result<Tensor>;
    /// `delta-weight`.
    fn delta_weight(&self, instance: u32, module: &str) -> Result<Option<Tensor>>;
    /// `forward-embeddings`.
    fn forward_embeddings(
        &self,
        instance: u32,
        embeddings: &Tensor,
        mask: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>>;
    /// `attention-prefix`.
    fn attention_prefix(
        &self,
        instance: u32,
        layer: u32,
        batch: u32,
    ) -> Result<Option<(Tensor, Tensor)>>;
    /// `trainable-base-params`.
    fn trainable_base_params(&self, instance: u32, names: &[String]) -> Result<Vec<String>>;
    /// `loss-term`.
    fn loss_term(&self, instance: u32) -> Result<Option<Tensor>>;
    /// `on-event`.
    fn on_event(&self, instance: u32, event: &Event) -> Result<()>;
    /// `task-gradient-examples`.
    fn task_gradient_examples(&self, instance: u32) -> Result<u32>;

    /// `create-loss`.
    fn create_loss(&self, config: &str) -> Result<u32>;
    /// `compute-loss`.
    fn compute_loss(
        &self,
        instance: u32,
        logits: &Tensor,
        labels: &Tensor,
        mask: &Tensor,
        teacher: Option<&Tensor>,
    ) -> Result<Tensor>;

    /// `create-loader`.
    fn create_loader(&self, config: &str) -> Result<u32>;
    /// `next-record` (JSON text).
    fn next_record(&self, instance: u32) -> Result<Option<String>>;
}
