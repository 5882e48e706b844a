//! Which blocks train at a step: a pure function of the step, so a resumed run (the host sets
//! the step to the checkpoint's before asking) trains what the interrupted one did.

use crate::config::{LayerwiseConfig, ScheduleKind};

/// The unfreezing plan of a model with `num_layers` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Gradual or fixed.
    pub kind: ScheduleKind,
    /// Blocks that train at step 0 (all the time for `last_n`).
    pub start: usize,
    /// Steps between unfreezing one more block (gradual).
    pub every: u64,
    /// Blocks of the model.
    pub num_layers: usize,
}

impl Plan {
    /// The plan of `cfg` for a model of `num_layers` blocks.
    pub fn new(cfg: &LayerwiseConfig, num_layers: usize) -> Plan {
        Plan {
            kind: cfg.schedule,
            start: cfg.last_n_layers.min(num_layers),
            every: cfg.unfreeze_every.unwrap_or(1).max(1),
            num_layers,
        }
    }

    /// How many top blocks train once `step` optimizer steps are done: `start` for `last_n`;
    /// `start + ⌊step / every⌋`, at most all, for `gradual`.
    pub fn unfrozen(&self, step: u64) -> usize {
        match self.kind {
            ScheduleKind::LastN => self.start,
            ScheduleKind::Gradual => {
                let more = usize::try_from(step / self.every).unwrap_or(usize::MAX);
                self.start.saturating_add(more).min(self.num_layers)
            }
        }
    }

    /// Whether block `block` (0 = nearest the embeddings) trains once `step` steps are done:
    /// the top `unfrozen(step)` blocks do.
    pub fn trains(&self, block: usize, step: u64) -> bool {
        block < self.num_layers && block + self.unfrozen(step) >= self.num_layers
    }

    /// The step count after which block `block` trains (its first update is the step after),
    /// `None` if it never does.
    pub fn unfreezes_at(&self, block: usize) -> Option<u64> {
        if block >= self.num_layers {
            return None;
        }
        let needed = self.num_layers - block;
        if needed <= self.start {
            return Some(0);
        }
        match self.kind {
            ScheduleKind::LastN => None,
            ScheduleKind::Gradual => Some((needed - self.start) as u64 * self.every),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kind: ScheduleKind, start: usize, every: u64, num_layers: usize) -> Plan {
        Plan {
            kind,
            start,
            every,
            num_layers,
        }
    }

    /// The blocks that train at `step`, bottom up.
    fn blocks(p: &Plan, step: u64) -> Vec<usize> {
        (0..p.num_layers).filter(|&b| p.trains(b, step)).collect()
    }

    #[test]
    fn gradual_unfreezes_one_more_block_every_n_steps_top_down() {
        let p = plan(ScheduleKind::Gradual, 1, 2, 3);
        assert_eq!(blocks(&p, 0), vec![2]);
        assert_eq!(blocks(&p, 1), vec![2]);
        assert_eq!(blocks(&p, 2), vec![1, 2]);
        assert_eq!(blocks(&p, 3), vec![1, 2]);
        assert_eq!(blocks(&p, 4), vec![0, 1, 2]);
        assert_eq!(blocks(&p, 1_000), vec![0, 1, 2]);
        assert_eq!(
            (0..3).map(|b| p.unfreezes_at(b)).collect::<Vec<_>>(),
            vec![Some(4), Some(2), Some(0)]
        );
        for b in 0..3 {
            let at = p.unfreezes_at(b).unwrap();
            assert!(p.trains(b, at) && (at == 0 || !p.trains(b, at - 1)));
        }
    }

    #[test]
    fn gradual_can_start_from_the_head_alone() {
        // ULMFiT: only the head in the first phase, then the top block, and so on.
        let p = plan(ScheduleKind::Gradual, 0, 25, 6);
        assert!(blocks(&p, 24).is_empty());
        assert_eq!(blocks(&p, 25), vec![5]);
        assert_eq!(blocks(&p, 149), vec![1, 2, 3, 4, 5]);
        assert_eq!(blocks(&p, 150), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(p.unfreezes_at(0), Some(150));
        assert_eq!(p.unfrozen(u64::MAX), 6);
    }

    #[test]
    fn last_n_trains_the_same_top_blocks_at_every_step() {
        let p = plan(ScheduleKind::LastN, 2, 1, 6);
        for step in [0, 1, 7, 10_000] {
            assert_eq!(blocks(&p, step), vec![4, 5]);
        }
        assert_eq!(p.unfreezes_at(3), None);
        assert_eq!(p.unfreezes_at(4), Some(0));
        assert_eq!(p.unfreezes_at(6), None);
    }
}
