//! Learning-rate schedules: linear warm-up, then cosine decay, linear decay or a constant rate.
//!
//! The formulas are Hugging Face `transformers`' `get_{cosine,linear,constant}_schedule_with_warmup`:
//! the rate for the update that follows `step` completed updates is `base · factor(step)` with
//!
//! ```text
//! warm-up (step < warmup):  factor = step / warmup
//! linear:                   factor = max(0, (total − step) / (total − warmup))
//! cosine:                   factor = max(0, ½·(1 + cos(π · (step − warmup) / (total − warmup))))
//! constant:                 factor = 1
//! ```

use serde::{Deserialize, Serialize};

/// How the learning rate evolves after warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    /// Half a cosine period from the base rate down to 0 at the last step.
    #[default]
    Cosine,
    /// Straight line from the base rate down to 0 at the last step.
    Linear,
    /// The base rate throughout (after warm-up).
    Constant,
}

/// A learning-rate schedule over a known number of optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Number of warm-up steps.
    pub warmup_steps: usize,
    /// Total number of optimizer steps of the run.
    pub total_steps: usize,
    /// Shape after warm-up.
    pub kind: SchedulerKind,
}

impl Schedule {
    /// The learning rate of the update that follows `step` completed updates (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        self.base_lr * self.factor(step)
    }

    fn factor(&self, step: usize) -> f64 {
        let (step, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < warmup {
            return step / warmup.max(1.0);
        }
        let span = (total - warmup).max(1.0);
        match self.kind {
            SchedulerKind::Constant => 1.0,
            SchedulerKind::Linear => ((total - step) / span).max(0.0),
            SchedulerKind::Cosine => {
                let progress = (step - warmup) / span;
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sched(kind: SchedulerKind) -> Schedule {
        Schedule {
            base_lr: 1e-3,
            warmup_steps: 10,
            total_steps: 110,
            kind,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        for kind in [
            SchedulerKind::Cosine,
            SchedulerKind::Linear,
            SchedulerKind::Constant,
        ] {
            let s = sched(kind);
            assert!(close(s.lr(0), 0.0));
            assert!(close(s.lr(5), 5e-4));
            assert!(close(s.lr(10), 1e-3));
        }
    }

    #[test]
    fn decays_reach_the_expected_values() {
        let cos = sched(SchedulerKind::Cosine);
        assert!(close(cos.lr(60), 5e-4));
        assert!(close(
            cos.lr(35),
            1e-3 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())
        ));
        assert!(close(cos.lr(110), 0.0));
        let lin = sched(SchedulerKind::Linear);
        assert!(close(lin.lr(60), 5e-4));
        assert!(close(lin.lr(85), 2.5e-4));
        assert!(close(lin.lr(200), 0.0));
        assert!(close(sched(SchedulerKind::Constant).lr(100), 1e-3));
    }

    #[test]
    fn no_warmup_starts_at_the_base_rate() {
        let s = Schedule {
            base_lr: 0.1,
            warmup_steps: 0,
            total_steps: 4,
            kind: SchedulerKind::Linear,
        };
        let lrs: Vec<f64> = (0..4).map(|i| s.lr(i)).collect();
        assert!(lrs
            .iter()
            .zip([0.1, 0.075, 0.05, 0.025])
            .all(|(a, b)| close(*a, b)));
    }
}
