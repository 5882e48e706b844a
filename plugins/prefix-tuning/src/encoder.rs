//! PEFT's `PrefixEncoder`: the prefix itself (`prompt_embeddings`, PEFT's saved key), or with
//! `prefix_projection` a virtual-token embedding reparameterised by `Linear → Tanh → Linear`.
//!
//! The host asks for each layer's prefix in turn; with the projection, each request runs the
//! first linear layer and only the rows of the second that produce that layer's keys and
//! values, so a forward costs one full projection plus `num_layers` small first layers and no
//! state is kept between calls.

use whetstone_sdk::prelude::*;

use crate::config::InitWeights;
use crate::layout::Layout;

/// The prefix `[n, num_layers · 2 · token_dim]` without projection (PEFT's saved key).
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";
/// The virtual-token embedding `[n, token_dim]` of the projection.
pub const EMBEDDING: &str = "prompt_encoder.embedding.weight";
const W0: &str = "prompt_encoder.transform.0.weight";
const B0: &str = "prompt_encoder.transform.0.bias";
const W2: &str = "prompt_encoder.transform.2.weight";
const B2: &str = "prompt_encoder.transform.2.bias";

/// The prefix's parameters.
#[derive(Debug, Clone, Copy)]
pub struct PrefixEncoder {
    /// Where each layer's keys and values sit.
    pub layout: Layout,
    /// Whether the prefix is projected.
    pub projection: bool,
}

/// `nn.Linear`'s default bias init, uniform in `±1/√in`.
fn linear_bias(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        low: -bound,
        high: bound,
    }
}

impl PrefixEncoder {
    /// Creates the parameters for `n` prefix positions with PyTorch's defaults (`nn.Embedding`
    /// N(0, 1), `nn.Linear` Kaiming-uniform weights and `±1/√in` biases), or PEFT's `"zero"`
    /// init for the prefix or the projection's last layer.
    pub fn create(&self, n: usize, hidden: usize, init: InitWeights) -> Result<()> {
        let normal = Init::Normal {
            mean: 0.0,
            std: 1.0,
        };
        let zero = init == InitWeights::Zero;
        let width = self.layout.width();
        if !self.projection {
            let init = if zero { Init::Zeros } else { normal };
            return whet_host::add_param("", PROMPT_EMBEDDINGS, &[n, width], init).map(drop);
        }
        let d = self.layout.token_dim();
        whet_host::add_param("", EMBEDDING, &[n, d], normal)?;
        whet_host::add_param("", W0, &[hidden, d], Init::kaiming_uniform())?;
        whet_host::add_param("", B0, &[hidden], linear_bias(d))?;
        let (w2, b2) = if zero {
            (Init::Zeros, Init::Zeros)
        } else {
            (Init::kaiming_uniform(), linear_bias(hidden))
        };
        whet_host::add_param("", W2, &[width, hidden], w2)?;
        whet_host::add_param("", B2, &[width], b2).map(drop)
    }

    /// Layer `layer`'s keys and values `[batch, kv_heads, n, head_dim]`.
    pub fn layer(&self, layer: usize, batch: usize) -> Result<(Tensor, Tensor)> {
        let start = self.layout.layer_start(layer)?;
        let len = 2 * self.layout.token_dim();
        let columns = if self.projection {
            let e = whet_host::param("", EMBEDDING)?;
            let h = e
                .matmul_t(whet_host::param("", W0)?)?
                .add(whet_host::param("", B0)?)?
                .tanh()?;
            let w2 = whet_host::param("", W2)?.narrow(0, start, len)?;
            let b2 = whet_host::param("", B2)?.narrow(0, start, len)?;
            h.matmul_t(w2)?.add(b2)?
        } else {
            whet_host::param("", PROMPT_EMBEDDINGS)?.narrow(1, start, len)?
        };
        self.layout.split(&columns, batch)
    }
}
