//! SVG plots of a [`Report`]: completion CDF, egress over time, rollout progress over time,
//! the hosts' link use over time.
//!
//! Drawn with plotters' SVG backend and no font stack: text is written as SVG text and left to
//! the viewer to render.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::report::Report;

/// A plot could not be written.
#[derive(Debug, thiserror::Error)]
#[error("drawing {path}: {message}")]
pub struct PlotError {
    /// The file.
    pub path: String,
    /// plotters' error.
    pub message: String,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn err(path: &Path, e: impl std::fmt::Display) -> PlotError {
    PlotError { path: path.display().to_string(), message: e.to_string() }
}

/// Writes `NAME-cdf.svg`, `NAME-egress.svg`, `NAME-progress.svg` and `NAME-links.svg` into
/// `dir`; returns their paths.
pub fn write_all(report: &Report, dir: &Path) -> Result<Vec<PathBuf>, PlotError> {
    let name = &report.scenario;
    let cdf = dir.join(format!("{name}-cdf.svg"));
    let egress = dir.join(format!("{name}-egress.svg"));
    let progress = dir.join(format!("{name}-progress.svg"));
    let links = dir.join(format!("{name}-links.svg"));
    completion_cdf(report, &cdf)?;
    egress_over_time(report, &egress)?;
    progress_over_time(report, &progress)?;
    links_over_time(report, &links)?;
    Ok(vec![cdf, egress, progress, links])
}

fn completion_cdf(report: &Report, path: &Path) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let t_max = report
        .completion_by_region
        .iter()
        .flatten()
        .copied()
        .chain(report.regions.iter().map(|r| r.bound.t_min))
        .fold(1.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: host completion CDF", report.scenario), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..t_max, 0.0..1.0)
        .map_err(|e| err(path, e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since staging started")
        .y_desc("share of live hosts holding every chunk")
        .draw()
        .map_err(|e| err(path, e))?;
    for (r, times) in report.completion_by_region.iter().enumerate() {
        let color = COLORS[r % COLORS.len()];
        let n = times.len().max(1) as f64;
        let step = (times.len() / 2000).max(1);
        let points: Vec<(f64, f64)> = times
            .iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0 || *i + 1 == times.len())
            .map(|(i, &t)| (t, (i + 1) as f64 / n))
            .collect();
        let name = report.regions.get(r).map_or(String::new(), |g| g.name.clone());
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(path, e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        if let Some(g) = report.regions.get(r) {
            let t = g.bound.t_min;
            chart
                .draw_series(LineSeries::new(vec![(t, 0.0), (t, 1.0)], color.mix(0.5)))
                .map_err(|e| err(path, e))?
                .label(format!("T_min {} = {t:.1} s", g.name))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.mix(0.5)));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))
}

fn egress_over_time(report: &Report, path: &Path) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let s = &report.series;
    let mbit = |v: f64| v * 8.0 / 1e6;
    let len = s
        .cache_bytes_per_sec
        .iter()
        .map(Vec::len)
        .chain([s.origin_bytes_per_sec.len()])
        .max()
        .unwrap_or(0);
    let t_max = (len as f64 * s.bucket).max(s.bucket);
    let y_max = s
        .origin_bytes_per_sec
        .iter()
        .chain(s.cache_bytes_per_sec.iter().flatten())
        .copied()
        .map(mbit)
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: origin and cache egress", report.scenario), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(|e| err(path, e))?;
    chart.configure_mesh().x_desc("seconds").y_desc("Mbit/s").draw().map_err(|e| err(path, e))?;
    let series = |v: &[f64]| -> Vec<(f64, f64)> {
        v.iter().enumerate().map(|(i, &b)| (i as f64 * s.bucket, mbit(b))).collect()
    };
    chart
        .draw_series(LineSeries::new(series(&s.origin_bytes_per_sec), BLACK.stroke_width(2)))
        .map_err(|e| err(path, e))?
        .label("origin")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    for (r, v) in s.cache_bytes_per_sec.iter().enumerate() {
        let color = COLORS[r % COLORS.len()];
        let name = report.regions.get(r).map_or(String::new(), |g| g.name.clone());
        chart
            .draw_series(LineSeries::new(series(v), color.stroke_width(1)))
            .map_err(|e| err(path, e))?
            .label(format!("caches of {name}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))
}

fn progress_over_time(report: &Report, path: &Path) -> Result<(), PlotError> {
    let s = &report.series;
    let hosts = |v: &Vec<u32>| v.iter().map(|&n| f64::from(n)).collect::<Vec<f64>>();
    let lines = [
        ("holding every chunk", hosts(&s.complete), COLORS[0]),
        ("staged (verified)", hosts(&s.staged), COLORS[1]),
        ("running the target", hosts(&s.on_target), COLORS[2]),
        ("updated (coordinator)", hosts(&s.updated), COLORS[3]),
    ];
    let len = s.complete.len().max(s.updated.len());
    let caption = format!("{}: rollout progress", report.scenario);
    let y_max = report.hosts.max(1) as f64 * 1.05;
    lines_over_time(path, &caption, "hosts", y_max, (len, s.bucket), &lines)
}

/// A chart of labelled lines over time, one point per bucket of `width` seconds (`len`
/// buckets at least), the legend at the lower right.
fn lines_over_time(
    path: &Path,
    caption: &str,
    y_desc: &str,
    y_max: f64,
    (len, width): (usize, f64),
    lines: &[(&str, Vec<f64>, RGBColor)],
) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(path, e))?;
    let len = lines.iter().map(|(_, v, _)| v.len()).fold(len, usize::max).max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..len as f64 * width, 0.0..y_max)
        .map_err(|e| err(path, e))?;
    chart.configure_mesh().x_desc("seconds").y_desc(y_desc).draw().map_err(|e| err(path, e))?;
    for &(label, ref v, color) in lines {
        let points: Vec<(f64, f64)> =
            v.iter().enumerate().map(|(i, &y)| (i as f64 * width, y)).collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(path, e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(path, e))?;
    root.present().map_err(|e| err(path, e))
}

/// Where staging time goes: the staging hosts' downlink use, the chunk holders' uplink use, and
/// the share of hosts holding chunks whose uplink sits under half used while they still stage.
fn links_over_time(report: &Report, path: &Path) -> Result<(), PlotError> {
    let s = &report.series;
    let pct = |v: &Vec<f64>| v.iter().map(|&u| 100.0 * u).collect::<Vec<f64>>();
    let hosts = report.hosts.max(1) as f64;
    let idle = s.idle_holders.iter().map(|&n| 100.0 * f64::from(n) / hosts).collect();
    let lines = [
        ("downlink use, hosts staging", pct(&s.staging_down_use), COLORS[0]),
        ("uplink use, hosts holding chunks", pct(&s.holder_up_use), COLORS[1]),
        ("hosts staging with chunks and an idle uplink", idle, COLORS[3]),
    ];
    let caption = format!("{}: hosts' link use", report.scenario);
    let y_desc = "% (sampled at bucket ends)";
    lines_over_time(path, &caption, y_desc, 105.0, (0, s.bucket), &lines)
}
