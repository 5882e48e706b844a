//! Where PEFT methods attach to a model: a hook slot on every [`crate::ops::Linear`], a
//! model-level [`ModelHook`] (input embeddings, attention prefixes), and the forward context
//! (mode, step, seeded generator, the model hook, gradients of a task's gradient pass) that
//! hooks read.
//!
//! The model code stays unaware of methods: a linear layer computes its frozen output and, when
//! a [`LinearHook`] is installed, hands it `(x, base_out)` and returns what the hook returns; a
//! model asks its context's [`ModelHook`] for extra virtual tokens and key/value prefixes
//! (see [`super::prompt`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::Mode;
use crate::ops::CheckpointGrads;
use crate::Result;

/// Wraps one linear module: gets its input and frozen output, returns the module's output.
pub trait LinearHook: Send + Sync + std::fmt::Debug {
    /// The module's output for input `x` `[..., in]` and base output `base_out` `[..., out]`.
    fn forward(&self, x: &Tensor, base_out: &Tensor) -> Result<Tensor>;
}

/// Model-level method hooks: prompt tuning and P-tuning transform the input embeddings, prefix
/// tuning gives every attention layer extra keys and values.
pub trait ModelHook: Send + Sync + std::fmt::Debug {
    /// The input embeddings `[batch, seq, hidden]` and attention mask `[batch, seq]` (f32, 1 =
    /// real token) with virtual tokens prepended: `[batch, virtual + seq, hidden]` and
    /// `[batch, virtual + seq]`; `None` leaves them unchanged.
    fn embeddings(
        &self,
        embeddings: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>>;

    /// Keys and values `[batch, kv_heads, prefix, head_dim]` every query of attention layer
    /// `layer` attends to before the sequence's own; `None` for none.
    fn attention_prefix(&self, layer: usize, batch: usize) -> Result<Option<(Tensor, Tensor)>>;
}

/// A shared, swappable hook slot (clones of a [`crate::ops::Linear`] share it).
#[derive(Debug, Default, Clone)]
pub struct HookSlot(Arc<RwLock<Option<Arc<dyn LinearHook>>>>);

impl HookSlot {
    /// Installs `hook`, replacing any previous one; `None` removes it.
    pub fn set(&self, hook: Option<Arc<dyn LinearHook>>) {
        match self.0.write() {
            Ok(mut guard) => *guard = hook,
            Err(poisoned) => *poisoned.into_inner() = hook,
        }
    }

    /// The installed hook.
    pub fn get(&self) -> Option<Arc<dyn LinearHook>> {
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The state hooks see during a forward: training or evaluation, the optimizer step, and a
/// generator seeded per step (so dropout masks repeat across runs and resumes).
#[derive(Debug)]
pub struct ForwardContext {
    mode: AtomicU8,
    step: AtomicU64,
    rng: Mutex<StdRng>,
    model_hook: RwLock<Option<Arc<dyn ModelHook>>>,
    gradients: RwLock<Option<Arc<GradStore>>>,
    gradient_pass: AtomicBool,
    checkpointing: AtomicBool,
    checkpoint_grads: Arc<CheckpointGrads>,
}

impl Default for ForwardContext {
    fn default() -> Self {
        Self {
            mode: AtomicU8::new(1),
            step: AtomicU64::new(0),
            rng: Mutex::new(StdRng::seed_from_u64(0)),
            model_hook: RwLock::new(None),
            gradients: RwLock::new(None),
            gradient_pass: AtomicBool::new(false),
            checkpointing: AtomicBool::new(false),
            checkpoint_grads: Arc::default(),
        }
    }
}

impl ForwardContext {
    /// Installs the model-level hook, replacing any previous one; `None` removes it.
    pub fn set_model_hook(&self, hook: Option<Arc<dyn ModelHook>>) {
        match self.model_hook.write() {
            Ok(mut guard) => *guard = hook,
            Err(poisoned) => *poisoned.into_inner() = hook,
        }
    }

    /// The installed model-level hook.
    pub fn model_hook(&self) -> Option<Arc<dyn ModelHook>> {
        match self.model_hook.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Publishes the gradients of a backward pass for plugins to read (`grad`) during a
    /// `task-gradient` event; `None` withdraws them.
    pub fn set_gradients(&self, gradients: Option<Arc<GradStore>>) {
        match self.gradients.write() {
            Ok(mut guard) => *guard = gradients,
            Err(poisoned) => *poisoned.into_inner() = gradients,
        }
    }

    /// The gradient of `param` in the published gradients: `Err` when none are published,
    /// `Ok(None)` when `param` got no gradient.
    pub fn gradient_of(&self, param: &Tensor) -> std::result::Result<Option<Tensor>, String> {
        let guard = match self.gradients.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let store = guard.as_ref().ok_or_else(|| {
            "no gradients to read: `grad` answers only during a task-gradient event".to_string()
        })?;
        Ok(store.get(param).cloned())
    }

    /// Marks a gradient pass: forwards run in [`Mode::Eval`] (no dropout) yet plugin parameters
    /// stay attached to the graph, so that their gradients can be read.
    pub fn set_gradient_pass(&self, on: bool) {
        self.gradient_pass.store(on, Ordering::Relaxed);
    }

    /// Whether a gradient pass is running.
    pub fn in_gradient_pass(&self) -> bool {
        self.gradient_pass.load(Ordering::Relaxed)
    }

    /// Sets the mode of the forward about to run.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(
            match mode {
                Mode::Train => 0,
                Mode::Eval => 1,
            },
            Ordering::Relaxed,
        );
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        if self.mode.load(Ordering::Relaxed) == 0 {
            Mode::Train
        } else {
            Mode::Eval
        }
    }

    /// Sets the optimizer step being computed.
    pub fn set_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    /// The optimizer step being computed.
    pub fn step(&self) -> u64 {
        self.step.load(Ordering::Relaxed)
    }

    /// Reseeds the generator.
    pub fn reseed(&self, seed: u64) {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        *rng = StdRng::seed_from_u64(seed);
    }

    /// Runs `f` with the generator.
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut rng)
    }

    /// Turns activation checkpointing on or off (`training.gradient_checkpointing`). Models that
    /// support it drop their blocks' activations in training forwards and recompute them in the
    /// backward pass; see [`crate::ops::checkpoint`].
    pub fn set_checkpointing(&self, on: bool) {
        self.checkpointing.store(on, Ordering::Relaxed);
    }

    /// Whether the forward about to run should checkpoint its blocks: checkpointing is on and the
    /// forward trains (gradient passes keep their graphs, since their readers expect every
    /// gradient in one store).
    pub fn checkpoints_blocks(&self) -> bool {
        self.checkpointing.load(Ordering::Relaxed)
            && self.mode() == Mode::Train
            && !self.in_gradient_pass()
    }

    /// Where checkpointed blocks put the gradients of their parameters during the backward pass;
    /// whoever runs the backward merges them ([`CheckpointGrads::merge_into`]).
    pub fn checkpoint_grads(&self) -> &Arc<CheckpointGrads> {
        &self.checkpoint_grads
    }

    /// The generator's current state, to replay a block's random draws when it is recomputed.
    pub fn rng_snapshot(&self) -> StdRng {
        self.with_rng(|rng| rng.clone())
    }

    /// Runs `f` as a forward in `mode` with the generator at `snapshot`, then restores the mode
    /// and the generator: a checkpointed block recomputed in the backward pass draws the same
    /// dropout masks as in its forward.
    pub fn replay<T>(&self, snapshot: &StdRng, mode: Mode, f: impl FnOnce() -> T) -> T {
        let saved_mode = self.mode();
        let saved_rng = self.with_rng(|rng| std::mem::replace(rng, snapshot.clone()));
        self.set_mode(mode);
        let out = f();
        self.set_mode(saved_mode);
        self.with_rng(|rng| *rng = saved_rng);
        out
    }
}
