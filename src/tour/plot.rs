//! The tour's plots: line charts as PNG files, drawn by `plotters` with the DejaVu Sans font
//! that ships in the repository (`assets/fonts`), so nothing depends on the machine's fonts.

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use std::path::Path;

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// The legend's text.
    pub name: String,
    /// The points, in order along the line. On a logarithmic axis, points at or below zero
    /// are left out (the chart's caption or the report says so where it matters).
    pub points: Vec<(f64, f64)>,
    /// A dashed line (a reference, not a measurement).
    pub dashed: bool,
}

impl Series {
    /// A solid line with markers: a measurement.
    pub fn measured(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            points,
            dashed: false,
        }
    }

    /// A dashed line: a reference (the chapter's figure, a bound, chance).
    pub fn reference(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            points,
            dashed: true,
        }
    }
}

/// A line chart.
#[derive(Clone, Debug, Default)]
pub struct Chart {
    /// Above the plot.
    pub title: String,
    /// Under the x axis.
    pub x_label: String,
    /// Beside the y axis.
    pub y_label: String,
    /// A logarithmic x axis.
    pub log_x: bool,
    /// A logarithmic y axis.
    pub log_y: bool,
    /// The y axis's range; the data's (with a margin) when `None`.
    pub y_range: Option<(f64, f64)>,
    /// The lines.
    pub series: Vec<Series>,
    /// Where the legend goes (away from the data).
    pub legend: Corner,
    /// Label the x axis at whole numbers only (steps, not fractions of one).
    pub integer_x: bool,
    /// The y values are base-10 logarithms: the axis is labelled `1e<value>` (a wide
    /// logarithmic range, labelled at every tick, which plotters' own log axis is not).
    pub log10_y: bool,
}

/// A place for the legend inside the plot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Corner {
    /// Top right.
    #[default]
    UpperRight,
    /// Top left.
    UpperLeft,
    /// Bottom right.
    LowerRight,
    /// Bottom left.
    LowerLeft,
    /// Halfway down the right side.
    MiddleRight,
}

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const WIDTH: u32 = 1000;
const HEIGHT: u32 = 640;

fn palette(i: usize) -> RGBColor {
    const COLORS: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(23, 190, 207),
        RGBColor(140, 86, 75),
        RGBColor(90, 90, 90),
        RGBColor(188, 189, 34),
        RGBColor(227, 119, 194),
    ];
    COLORS[i % COLORS.len()]
}

/// Registers the bundled font once (plotters' `ab_glyph` text needs a registered font).
fn font() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| "the bundled DejaVu Sans font could not be read".to_string())
    })
    .clone()
}

/// The range of `values` (finite, and positive on a logarithmic axis), with a margin.
fn span(values: impl Iterator<Item = f64>, log: bool) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    Some(if log {
        (lo / 2.0, hi * 2.0)
    } else if hi == lo {
        (lo - 1.0, hi + 1.0)
    } else {
        let m = (hi - lo) * 0.06;
        (lo - m, hi + m)
    })
}

/// Draws `chart` into the PNG file `path`.
pub fn line_chart(path: &Path, chart: &Chart) -> Result<(), String> {
    font()?;
    let shown = |log: bool, (x, y): (f64, f64)| x.is_finite() && y.is_finite() && (!log || y > 0.0);
    let points = || {
        chart
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|&(x, y)| shown(chart.log_y, (x, y)) && (!chart.log_x || x > 0.0))
    };
    let (x0, x1) = span(points().map(|p| p.0), chart.log_x)
        .ok_or_else(|| format!("{}: no point to plot", chart.title))?;
    let (x0, x1) = if chart.log_x {
        (x0 * 1.5, x1 / 1.5)
    } else {
        (x0, x1)
    };
    let (y0, y1) = match chart.y_range {
        Some(r) => r,
        None => span(points().map(|p| p.1), chart.log_y)
            .ok_or_else(|| format!("{}: no point to plot", chart.title))?,
    };
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    match (chart.log_x, chart.log_y) {
        (false, false) => draw(&root, chart, x0..x1, y0..y1),
        (true, false) => draw(&root, chart, (x0..x1).log_scale(), y0..y1),
        (false, true) => draw(&root, chart, x0..x1, (y0..y1).log_scale()),
        (true, true) => draw(&root, chart, (x0..x1).log_scale(), (y0..y1).log_scale()),
    }
    .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type DrawError<'a> = DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>;

fn draw<'a, X, Y>(root: &Area<'a>, chart: &Chart, x: X, y: Y) -> Result<(), DrawError<'a>>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut ctx = ChartBuilder::on(root)
        .caption(&chart.title, ("sans-serif", 26))
        .margin(18)
        .x_label_area_size(56)
        .y_label_area_size(86)
        .build_cartesian_2d(x, y)?;
    let fmt = |v: &f64| {
        let a = v.abs();
        if a != 0.0 && !(1e-2..1e5).contains(&a) {
            format!("{v:.0e}")
        } else if a >= 100.0 || v.fract() == 0.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.2}")
        }
    };
    let (integer_x, log10_y) = (chart.integer_x, chart.log10_y);
    let x_fmt = |v: &f64| {
        if integer_x && v.fract() != 0.0 {
            String::new()
        } else {
            fmt(v)
        }
    };
    let y_fmt = |v: &f64| {
        if log10_y {
            if v.fract() == 0.0 {
                format!("1e{v:.0}")
            } else {
                String::new()
            }
        } else {
            fmt(v)
        }
    };
    ctx.configure_mesh()
        .x_desc(&chart.x_label)
        .y_desc(&chart.y_label)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .x_labels(12)
        .y_labels(14)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 19))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let (log_x, log_y) = (chart.log_x, chart.log_y);
    let keep = move |&(x, y): &(f64, f64)| {
        x.is_finite() && y.is_finite() && (!log_x || x > 0.0) && (!log_y || y > 0.0)
    };
    for (i, s) in chart.series.iter().enumerate() {
        let color = palette(i);
        let points: Vec<(f64, f64)> = s.points.iter().copied().filter(keep).collect();
        let style = ShapeStyle {
            color: color.to_rgba(),
            filled: false,
            stroke_width: if s.dashed { 2 } else { 3 },
        };
        let drawn = if s.dashed {
            ctx.draw_series(DashedLineSeries::new(points.clone(), 9, 7, style))?
        } else {
            ctx.draw_series(LineSeries::new(points.clone(), style))?
        };
        // The legend's swatch is dashed like its line (a long dash is a solid swatch).
        let (dash, gap) = if s.dashed { (6, 4) } else { (24, 1) };
        drawn.label(&s.name).legend(move |(x, y)| {
            DashedPathElement::new(vec![(x, y), (x + 24, y)], dash, gap, color.stroke_width(3))
        });
        if !s.dashed && points.len() <= 40 {
            ctx.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
    }
    ctx.configure_series_labels()
        .label_font(("sans-serif", 17))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .position(match chart.legend {
            Corner::UpperRight => SeriesLabelPosition::UpperRight,
            Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
            Corner::LowerRight => SeriesLabelPosition::LowerRight,
            Corner::LowerLeft => SeriesLabelPosition::LowerLeft,
            Corner::MiddleRight => SeriesLabelPosition::MiddleRight,
        })
        .draw()?;
    Ok(())
}
