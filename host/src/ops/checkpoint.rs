//! Activation (gradient) checkpointing: a block's activations are dropped after its forward and
//! recomputed, one block at a time, during the backward pass (Chen et al. 2016, "Training Deep
//! Nets with Sublinear Memory Cost"; PyTorch's `torch.utils.checkpoint`, which Hugging Face's
//! `gradient_checkpointing` uses).
//!
//! [`checkpoint`] runs the block on a detached copy of its input, keeps only the output, and
//! records a custom op from the input to that output. When the backward pass reaches the op it
//! runs the block again on a fresh leaf holding the input, back-propagates the incoming gradient
//! through that small graph, and returns the input's gradient to the outer pass. The gradients of
//! the trainable parameters inside the block cannot travel through a one-input op; they are added
//! to a [`CheckpointGrads`] collector, and the trainer merges them with the outer pass's
//! ([`CheckpointGrads::merge_into`]). The memory kept across the whole forward is one
//! `[batch, seq, hidden]` tensor per block instead of every intermediate; the price is one more
//! forward of each block.
//!
//! A block must compute the same function when it is run again: the caller restores whatever
//! randomness it draws (dropout masks) and the mode before recomputing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, TensorId, Var};

/// Runs a block again on its input during the backward pass.
pub type Recompute = Box<dyn Fn(&Tensor) -> crate::Result<Tensor> + Send + Sync>;

/// Gradients of the trainable tensors inside checkpointed blocks, summed over the blocks (and
/// over every backward pass since the last [`CheckpointGrads::merge_into`]).
#[derive(Debug, Default)]
pub struct CheckpointGrads(Mutex<HashMap<TensorId, Tensor>>);

impl CheckpointGrads {
    /// Adds the gradients in `store` of the tensors `ids`.
    fn add(&self, store: &GradStore, ids: &[TensorId]) -> candle_core::Result<()> {
        let mut grads = self.0.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            let Some(g) = store.get_id(*id) else { continue };
            let sum = match grads.remove(id) {
                Some(acc) => (acc + g)?,
                None => g.clone(),
            };
            grads.insert(*id, sum);
        }
        Ok(())
    }

    /// Whether no gradient is waiting to be merged.
    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Forgets the collected gradients (after a failed backward pass, say).
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Adds the collected gradients to `store` (summing with a gradient the outer pass already
    /// holds for the same tensor) and empties the collector.
    pub fn merge_into(&self, store: &mut GradStore) -> candle_core::Result<()> {
        let collected = std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()));
        for (id, g) in collected {
            let sum = match store.get_id(id) {
                Some(outer) => (outer + &g)?,
                None => g,
            };
            store.insert_id(id, sum);
        }
        Ok(())
    }
}

/// The op from a block's input to its output: forward hands back the output computed without a
/// graph; backward recomputes.
struct Checkpoint {
    output: Mutex<Option<Tensor>>,
    recompute: Recompute,
    grads: Arc<CheckpointGrads>,
}

impl Checkpoint {
    /// The stored output (once: the op's forward runs once).
    fn take_output(&self) -> candle_core::Result<Tensor> {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpoint: forward ran twice".into()))
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self.take_output()?;
        let (storage, layout) = out.storage_and_layout();
        let Storage::Cpu(s) = &*storage else {
            candle_core::bail!("checkpoint: the block's output is not on the CPU");
        };
        Ok((s.try_clone(layout)?, out.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = self.take_output()?;
        let (storage, layout) = out.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            candle_core::bail!("checkpoint: the block's output is not on the CUDA device");
        };
        Ok((s.try_clone(layout)?, out.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let leaf = Var::from_tensor(&x.detach())?;
        let y = (self.recompute)(leaf.as_tensor()).map_err(|e| {
            candle_core::Error::Msg(format!("recomputing a checkpointed block: {e}"))
        })?;
        if y.dims() != grad.dims() {
            candle_core::bail!(
                "checkpoint: the recomputed block gave shape {:?}, the forward gave {:?}",
                y.dims(),
                grad.dims()
            );
        }
        let surrogate = (y * grad.detach())?.sum_all()?;
        // The store also holds gradients of intermediate tensors; only the block's trainable
        // variables (not the input's leaf) are the outer pass's business.
        let leaf_id = leaf.as_tensor().id();
        let vars: Vec<TensorId> = surrogate
            .sorted_nodes()
            .iter()
            .filter(|n| n.is_variable() && n.id() != leaf_id)
            .map(|n| n.id())
            .collect();
        let store = surrogate.backward()?;
        self.grads.add(&store, &vars)?;
        Ok(store.get(leaf.as_tensor()).cloned())
    }
}

/// The output of a block `forward(x)` whose activations are not kept: `forward` runs now on a
/// detached `x`, and `recompute` (the same function, with any randomness it drew restored) runs
/// again in the backward pass, its parameter gradients going to `grads`. When `x` is not part
/// of a graph (the layers below are frozen) the block simply runs with its graph, since nothing
/// would call the op's backward.
pub fn checkpoint(
    x: &Tensor,
    grads: &Arc<CheckpointGrads>,
    forward: impl FnOnce(&Tensor) -> crate::Result<Tensor>,
    recompute: Recompute,
) -> crate::Result<Tensor> {
    if !x.track_op() {
        return forward(x);
    }
    // A fresh, exactly-sized storage: the op's forward hands out a clone of all of it.
    let output = forward(&x.detach())?.detach().copy()?;
    let op = Checkpoint {
        output: Mutex::new(Some(output)),
        recompute,
        grads: grads.clone(),
    };
    Ok(x.apply_op1(op)?)
}
