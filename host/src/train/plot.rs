//! The loss-curve PNG drawn at the end of a run (plotters, bitmap backend).
//!
//! plotters renders text with `ab_glyph`, which needs a font file registered at run time. The
//! first call looks for DejaVu Sans (Debian/Ubuntu package `fonts-dejavu-core`) and a few other
//! common sans-serif fonts, or the file named by `WHETSTONE_FONT`; without one the curve is drawn
//! without any text and a warning is logged. Callers treat a plot error as a warning: a plot
//! never fails a run.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::prelude::*;

use super::checkpoint::LossPoint;
use crate::{Error, Result};

/// Font files tried in order when `WHETSTONE_FONT` is not set.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a sans-serif font with plotters once per process; `true` when one is available.
fn font_available() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let from_env = std::env::var_os("WHETSTONE_FONT").map(PathBuf::from);
        let candidates = from_env.into_iter().chain(FONT_CANDIDATES.iter().map(PathBuf::from));
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else { continue };
            // plotters keeps fonts for the life of the process and wants `'static` bytes; this
            // happens at most once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                tracing::debug!("plot font: {}", path.display());
                return true;
            }
        }
        tracing::warn!(
            "no font found for the loss plot (install fonts-dejavu-core or set WHETSTONE_FONT); drawing it without text"
        );
        false
    })
}

/// Draws the training loss (and the evaluation loss, when there is any) against the step into
/// a PNG at `path`.
pub fn plot_losses(path: &Path, train: &[LossPoint], eval: &[LossPoint]) -> Result<()> {
    draw(path, train, eval, font_available())
}

fn draw(path: &Path, train: &[LossPoint], eval: &[LossPoint], with_text: bool) -> Result<()> {
    let fail = |e: &dyn std::fmt::Display| {
        Error::bad_file(path, format!("cannot draw the loss plot: {e}"))
    };
    if train.is_empty() && eval.is_empty() {
        return Err(fail(&"no loss values to plot"));
    }
    let all = train.iter().chain(eval);
    let max_step = all.clone().map(|p| p.step).max().unwrap_or(1).max(1) as f64;
    let finite = all.map(|p| p.loss).filter(|l| l.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), l| {
        (lo.min(l), hi.max(l))
    });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let y_range = (lo - pad).max(0.0)..hi + pad;

    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if with_text {
        builder
            .caption("loss", ("sans-serif", 24))
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..max_step, y_range)
        .map_err(|e| fail(&e))?;
    let mut mesh = chart.configure_mesh();
    if with_text {
        mesh.x_desc("step")
            .y_desc("loss")
            .x_label_formatter(&|x| format!("{x:.0}"));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| fail(&e))?;

    let to_xy = |p: &LossPoint| (p.step as f64, p.loss);
    let train_series = chart
        .draw_series(LineSeries::new(
            train.iter().filter(|p| p.loss.is_finite()).map(to_xy),
            &BLUE,
        ))
        .map_err(|e| fail(&e))?;
    if with_text {
        train_series
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    if !eval.is_empty() {
        let style = RED.stroke_width(2);
        let eval_series = chart
            .draw_series(LineSeries::new(eval.iter().map(to_xy), style).point_size(3))
            .map_err(|e| fail(&e))?;
        if with_text {
            eval_series
                .label("eval")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    if with_text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(&e))?;
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn curve() -> Vec<LossPoint> {
        (1..=20)
            .map(|s| LossPoint {
                step: s,
                loss: 1.0 / s as f64,
            })
            .collect()
    }

    #[test]
    fn draws_without_any_font() {
        let dir = std::env::temp_dir().join(format!("whet-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nofont.png");
        draw(
            &path,
            &curve(),
            &[LossPoint {
                step: 10,
                loss: 0.2,
            }],
            false,
        )
        .unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 1000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
