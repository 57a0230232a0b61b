//! Draws load, capacity and replicas over time as an SVG (plotters, SVG backend only).

use std::path::Path;

use plotters::prelude::*;

use crate::simulate::SimPoint;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Only `.svg` output is built in.
    #[error("cannot write {0}: only .svg plots are supported (built with the SVG backend only)")]
    Format(String),
    /// Nothing to draw.
    #[error("no points to plot")]
    Empty,
    /// plotters failed (I/O or layout).
    #[error("plot: {0}")]
    Draw(String),
}

fn draw_err<E: std::fmt::Display>(e: E) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Writes `points` to `path` (`.svg`): load and capacity on the left axis, replicas on the right.
pub fn plot(points: &[SimPoint], path: &Path, title: &str) -> Result<(), PlotError> {
    if path.extension().and_then(|e| e.to_str()) != Some("svg") {
        return Err(PlotError::Format(path.display().to_string()));
    }
    let last = points.last().ok_or(PlotError::Empty)?;
    let t_max = last.time.max(1.0);
    let y_max = points.iter().map(|p| p.load.max(p.capacity)).fold(1.0, f64::max) * 1.1;
    let r_max = points
        .iter()
        .map(|p| p.desired.max(p.ready))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;

    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .right_y_label_area_size(45)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(draw_err)?
        .set_secondary_coord(0.0..t_max, 0.0..r_max);
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("load / capacity")
        .draw()
        .map_err(draw_err)?;
    chart
        .configure_secondary_axes()
        .y_desc("replicas")
        .draw()
        .map_err(draw_err)?;
    chart
        .draw_series(LineSeries::new(points.iter().map(|p| (p.time, p.load)), &BLUE))
        .map_err(draw_err)?
        .label("load")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(
            points.iter().map(|p| (p.time, p.capacity)),
            &GREEN,
        ))
        .map_err(draw_err)?
        .label("capacity (ready × target)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    chart
        .draw_secondary_series(LineSeries::new(
            points.iter().map(|p| (p.time, f64::from(p.desired))),
            &RED,
        ))
        .map_err(draw_err)?
        .label("desired replicas")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .draw_secondary_series(LineSeries::new(
            points.iter().map(|p| (p.time, f64::from(p.ready))),
            &MAGENTA,
        ))
        .map_err(draw_err)?
        .label("ready replicas")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}
