//! The training progress bar (indicatif): step count, loss, tokens/s and ETA on stderr. Hidden
//! when stderr is not a terminal or when the caller disables it.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar over the optimizer steps of a run.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar for `total` steps starting at `done`; hidden unless `enabled` and stderr is a TTY.
    pub fn new(total: usize, done: usize, enabled: bool) -> Self {
        let target = if enabled && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total as u64), target);
        // The template is a constant that parses; fall back to the default style otherwise.
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} {msg} (ETA {eta})",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_position(done as u64);
        bar.reset_eta();
        Self { bar }
    }

    /// Advances to `step` and shows the step's loss and throughput.
    pub fn update(&self, step: usize, loss: f64, tokens_per_s: f64) {
        self.bar.set_position(step as u64);
        self.bar
            .set_message(format!("loss {loss:.4} | {tokens_per_s:.0} tok/s"));
    }

    /// Prints a line above the bar (or nothing when hidden).
    pub fn println(&self, line: impl AsRef<str>) {
        self.bar.println(line.as_ref());
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
