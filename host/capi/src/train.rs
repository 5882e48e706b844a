//! Training with a progress callback that can cancel.

use std::ffi::c_void;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use whetstone_host::session::TrainStatus;
use whetstone_host::train::{StepCallback, StepStats};

use crate::session::{with_session, WhetSession};
use crate::status::{guard, ApiError, WhetError, WhetStatus};

/// One optimizer step, as the progress callback hears it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WhetProgress {
    /// The step just taken (1-based, counted over the whole run).
    pub step: u64,
    /// Steps the whole run takes.
    pub total_steps: u64,
    /// Mean training loss of the step.
    pub loss: f64,
    /// Learning rate of the step.
    pub learning_rate: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Training tokens per second over the step.
    pub tokens_per_second: f64,
}

/// Called after every optimizer step with the step's figures and the caller's `user_data`, on
/// the thread that called `whet_session_train`. Return 0 to go on, non-zero to cancel (the
/// run stops after this step and can be continued). It may call `whet_session_cancel`, but no
/// other function on the same session (that returns `WHET_STATUS_BUSY`).
pub type WhetProgressFn =
    Option<unsafe extern "C" fn(progress: *const WhetProgress, user_data: *mut c_void) -> i32>;

/// What a `whet_session_train` call did. Figures that do not apply are NaN.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct WhetTrainReport {
    /// 1 when the run reached its last step, 0 when it paused (step budget) or was cancelled.
    pub finished: i32,
    /// Steps the run has taken so far (over all calls).
    pub step: u64,
    /// Steps the whole run takes.
    pub total_steps: u64,
    /// Loss of the last step taken.
    pub last_loss: f64,
    /// Validation loss of the run's latest evaluation.
    pub eval_loss: f64,
    /// Validation accuracy of the run's latest evaluation (classification).
    pub eval_accuracy: f64,
    /// Mean seconds per optimizer step in this call.
    pub seconds_per_step: f64,
    /// Training tokens per second in this call.
    pub tokens_per_second: f64,
}

/// The caller's callback and its context; called synchronously on the training thread.
struct Progress {
    callback: unsafe extern "C" fn(*const WhetProgress, *mut c_void) -> i32,
    user_data: usize,
    total_steps: u64,
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

impl Progress {
    fn report(&self, stats: &StepStats) {
        let progress = WhetProgress {
            step: stats.step as u64,
            total_steps: self.total_steps,
            loss: stats.loss,
            learning_rate: stats.lr,
            grad_norm: stats.grad_norm,
            tokens_per_second: stats.tokens_per_s(),
        };
        // SAFETY: the caller of whet_session_train vouches for the callback and its user data.
        let answer = unsafe { (self.callback)(&progress, self.user_data as *mut c_void) };
        if answer != 0 {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }
}

/// Trains the session's own method for up to `max_steps` optimizer steps (0: to the end of the
/// run). A paused or cancelled run continues exactly where it stopped; after a finished run the
/// next call starts a new run from the current weights. Checkpoints and metrics go to the
/// recipe's `output.dir`. `progress` (may be NULL) hears every step with `user_data`; `report`
/// (may be NULL) receives the outcome. Returns `WHET_STATUS_OK` when the run finished or used
/// up `max_steps`, `WHET_STATUS_CANCELLED` when it was cancelled.
///
/// # Safety
/// `progress` is NULL or a function that follows `WhetProgressFn`'s contract; `report` and
/// `err` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn whet_session_train(
    session: WhetSession,
    max_steps: u64,
    progress: WhetProgressFn,
    user_data: *mut c_void,
    report: *mut WhetTrainReport,
    err: *mut WhetError,
) -> WhetStatus {
    // SAFETY: the pointers follow this function's contract.
    unsafe {
        guard(err, || {
            with_session(session, |s, entry| {
                entry.cancel.store(false, Ordering::SeqCst);
                let total_steps = s.total_steps()? as u64;
                let on_step: Option<StepCallback> = progress.map(|callback| {
                    let p = Progress {
                        callback,
                        user_data: user_data as usize,
                        total_steps,
                        cancel: entry.cancel.clone(),
                    };
                    Arc::new(move |stats: &StepStats| p.report(stats)) as StepCallback
                });
                let max_steps = (max_steps > 0)
                    .then(|| usize::try_from(max_steps))
                    .transpose()
                    .map_err(|_| ApiError::invalid("max_steps is too large"))?;
                let outcome = s.train(max_steps, on_step, Some(entry.cancel.clone()))?;
                if !report.is_null() {
                    let eval = outcome.summary.as_ref().and_then(|r| r.final_eval);
                    let filled = WhetTrainReport {
                        finished: i32::from(outcome.status == TrainStatus::Finished),
                        step: outcome.step as u64,
                        total_steps: outcome.total_steps as u64,
                        last_loss: outcome.last_loss.unwrap_or(f64::NAN),
                        eval_loss: eval.map_or(f64::NAN, |m| m.loss),
                        eval_accuracy: eval.and_then(|m| m.accuracy).unwrap_or(f64::NAN),
                        seconds_per_step: outcome
                            .summary
                            .as_ref()
                            .map_or(f64::NAN, |r| r.seconds_per_step),
                        tokens_per_second: outcome
                            .summary
                            .as_ref()
                            .map_or(f64::NAN, |r| r.tokens_per_s),
                    };
                    // SAFETY: non-NULL and writable by the contract.
                    report.write(filled);
                }
                Ok(match outcome.status {
                    TrainStatus::Cancelled => WhetStatus::Cancelled,
                    TrainStatus::Finished | TrainStatus::Paused => WhetStatus::Ok,
                })
            })
        })
    }
}
