//! The loss curve as a PNG.
//!
//! Drawn without any text: plotters' text needs a TTF font (font-kit/fontconfig or a
//! bundled font file), which a fresh Debian lacks, and the numbers are in
//! `train_log.jsonl` anyway. Light grid lines mark tenths of the axes; the y axis
//! runs from 0 to the largest loss, the x axis over all steps.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{DistillError, Result};

/// Draw `points` (step, loss) and, if long enough, a moving average, into `path`.
pub fn loss_png(path: &Path, points: &[(usize, f64)]) -> Result<()> {
    let err = |e: String| DistillError::Plot {
        path: path.to_path_buf(),
        message: e,
    };
    if points.is_empty() {
        return Err(err("no losses to draw".into()));
    }
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let x_max = points.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let x_min = points.iter().map(|p| p.0).min().unwrap_or(0) as f64;
    let y_max = points
        .iter()
        .map(|p| p.1)
        .filter(|y| y.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .build_cartesian_2d(x_min..x_max.max(x_min + 1.0), 0.0..y_max)
        .map_err(|e| err(e.to_string()))?;
    let grid = RGBColor(225, 225, 225);
    let (xs, ys) = (x_max - x_min, y_max);
    for i in 0..=10 {
        let x = x_min + xs * f64::from(i) / 10.0;
        let y = ys * f64::from(i) / 10.0;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, y_max)],
                grid.stroke_width(1),
            )))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x_min, y), (x_max, y)],
                grid.stroke_width(1),
            )))
            .map_err(|e| err(e.to_string()))?;
    }
    let series: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(s, l)| (s as f64, l))
        .collect();
    chart
        .draw_series(LineSeries::new(
            series.clone(),
            RGBColor(150, 170, 220).stroke_width(1),
        ))
        .map_err(|e| err(e.to_string()))?;
    let window = (series.len() / 20).max(1);
    if window > 1 {
        let smooth: Vec<(f64, f64)> = series
            .windows(window)
            .map(|w| {
                (
                    w[w.len() - 1].0,
                    w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64,
                )
            })
            .collect();
        chart
            .draw_series(LineSeries::new(
                smooth,
                RGBColor(20, 60, 170).stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}
