//! `hushd bench --plot DIR`: the growth curves an operator sizes a server
//! by, as SVG files (plotters' SVG backend, no fonts loaded: text is left
//! to the viewer).

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::{fail, BenchError};

/// One chart: how something grows with something else, hush next to its
/// baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// File name in the plot directory.
    pub file: &'static str,
    pub title: String,
    pub x_label: &'static str,
    pub y_label: &'static str,
    pub series: Vec<Series>,
}

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    /// (x, y), in x order.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), points: Vec::new() }
    }
}

/// Chart size in pixels.
const SIZE: (u32, u32) = (800, 500);

/// Colours of the series, in order.
const COLOURS: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];

/// Writes each curve to `dir` (created if needed) as an SVG file, both axes
/// logarithmic; returns the files written. A curve with no positive point
/// is skipped.
pub fn write(dir: &Path, curves: &[Curve]) -> Result<Vec<PathBuf>, BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError(format!("{}: {e}", dir.display())))?;
    let mut written = Vec::new();
    for curve in curves {
        let points = || curve.series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| *x > 0.0 && *y > 0.0);
        let (Some(x0), Some(x1)) = (points().map(|p| p.0).reduce(f64::min), points().map(|p| p.0).reduce(f64::max))
        else {
            continue;
        };
        let (Some(y0), Some(y1)) = (points().map(|p| p.1).reduce(f64::min), points().map(|p| p.1).reduce(f64::max))
        else {
            continue;
        };
        let path = dir.join(curve.file);
        draw(&path, curve, (x0 / 1.2, x1 * 1.2), (y0 / 1.5, y1 * 1.5))?;
        written.push(path);
    }
    Ok(written)
}

fn draw(path: &Path, curve: &Curve, x: (f64, f64), y: (f64, f64)) -> Result<(), BenchError> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(fail)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&curve.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((x.0..x.1).log_scale(), (y.0..y.1).log_scale())
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc(curve.x_label)
        .y_desc(curve.y_label)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(fail)?;
    for (series, colour) in curve.series.iter().zip(COLOURS.iter().cycle()) {
        let points: Vec<(f64, f64)> = series.points.iter().copied().filter(|(x, y)| *x > 0.0 && *y > 0.0).collect();
        let style = ShapeStyle::from(colour).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(fail)?
            .label(series.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, colour.filled()))).map_err(fail)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(fail)?;
    root.present().map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_are_written_as_svg_and_empty_ones_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut hush = Series::new("hush");
        hush.points = vec![(10.0, 300.0), (100.0, 2000.0), (1000.0, 25000.0)];
        let mut raw = Series::new("openmls");
        raw.points = vec![(10.0, 200.0), (100.0, 1500.0), (1000.0, 20000.0)];
        let curves = [
            Curve {
                file: "commit-cost.svg",
                title: "CPU per commit".into(),
                x_label: "devices",
                y_label: "µs",
                series: vec![hush, raw],
            },
            Curve { file: "empty.svg", title: "nothing".into(), x_label: "x", y_label: "y", series: vec![] },
        ];
        let written = write(&dir.path().join("plots"), &curves).unwrap();
        assert_eq!(written.len(), 1);
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("openmls") && svg.contains("CPU per commit"), "{svg}");
        assert!(!dir.path().join("plots/empty.svg").exists());
    }
}
