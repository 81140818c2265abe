//! PNG charts of the results: rate and latency against the number of
//! Services, one line per dataplane.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use plotters::{prelude::*, style::FontStyle};

use super::{Dataplane, Figure, Results, Row};

const SIZE: (u32, u32) = (900, 560);

/// The TrueType font the charts are labelled with (Debian's
/// fonts-dejavu-core, which `cargo xtask bench` installs: the same path as
/// `xtask/src/setup.rs`).
const CHART_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// A point's value and, where it has one, its min..max over the rounds.
type Point = (f64, Option<(f64, f64)>);

/// One chart: a figure of each row, as a y value with its range over the
/// rounds (drawn as an error bar) where it has one.
struct Chart {
    file: &'static str,
    title: &'static str,
    y_label: &'static str,
    value: fn(&Row) -> Option<Point>,
}

/// A figure's rate with its range; none for a figure with too many
/// failures to mean anything.
fn rate(figure: Option<&Figure>) -> Option<Point> {
    figure
        .filter(|f| !f.invalid())
        .map(|f| (f.median.probe.rate, Some((f.rate_min, f.rate_max))))
}

const CHARTS: [Chart; 4] = [
    Chart {
        file: "clusterip-connections.png",
        title: "New connections per second through a ClusterIP (higher is better)",
        y_label: "connections / s",
        value: |row| rate(row.short_connections.as_ref()),
    },
    Chart {
        file: "clusterip-p99-latency.png",
        title: "p99 connect + first response through a ClusterIP (lower is better)",
        y_label: "µs",
        value: |row| {
            row.short_connections
                .as_ref()
                .map(|f| (f.median.probe.p99_us as f64, None))
        },
    },
    Chart {
        file: "nodeport-connections.png",
        title: "New connections per second through a NodePort from outside (higher is better)",
        y_label: "connections / s",
        value: |row| rate(row.node_port_short.as_ref()),
    },
    Chart {
        file: "program-seconds.png",
        title: "Time to program all Services (lower is better; peers cut off at the timeout)",
        y_label: "seconds",
        value: |row| (row.dataplane() != Dataplane::Direct).then_some((row.program_seconds, None)),
    },
];

fn color(dataplane: Dataplane) -> RGBColor {
    match dataplane {
        Dataplane::Direct => RGBColor(120, 120, 120),
        Dataplane::Ours => RGBColor(0, 130, 70),
        Dataplane::Iptables => RGBColor(200, 60, 40),
        Dataplane::Nftables => RGBColor(40, 90, 200),
    }
}

pub(crate) fn draw(results: &Results, dir: &Path) -> Result<()> {
    let font = std::fs::read(CHART_FONT)
        .with_context(|| format!("reading the chart font {CHART_FONT}"))?;
    // plotters keeps registered fonts for the whole process.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{CHART_FONT} is not a usable font"))?;
    for chart in &CHARTS {
        let path = dir.join(chart.file);
        draw_one(results, chart, &path).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    Ok(())
}

fn draw_one(
    results: &Results,
    chart: &Chart,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let points: Vec<(Dataplane, usize, Point)> = results
        .rows
        .iter()
        .filter_map(|row| Some((row.dataplane(), row.services, (chart.value)(row)?)))
        .collect();
    let max_y = points
        .iter()
        .map(|(_, _, (value, range))| range.map_or(*value, |(_, max)| max.max(*value)))
        .fold(1.0, f64::max)
        * 1.15;
    let min_x = results.rows.iter().map(|r| r.services).min().unwrap_or(100) as f64;
    let max_x = results
        .rows
        .iter()
        .map(|r| r.services)
        .max()
        .unwrap_or(1000) as f64;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut plot = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d((min_x * 0.8..max_x * 1.25).log_scale(), 0.0..max_y)?;
    plot.configure_mesh()
        .x_desc("Services (10 endpoints each)")
        .y_desc(chart.y_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_labels(8)
        .label_style(("sans-serif", 14))
        .draw()?;
    for dataplane in Dataplane::ALL {
        let series: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.0 == dataplane)
            .map(|(_, services, (value, _))| (*services as f64, *value))
            .collect();
        if series.is_empty() {
            continue;
        }
        let style = ShapeStyle::from(color(dataplane)).stroke_width(3);
        plot.draw_series(LineSeries::new(series.clone(), style))?
            .label(dataplane.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        plot.draw_series(
            series
                .into_iter()
                .map(|point| Circle::new(point, 4, color(dataplane).filled())),
        )?;
        plot.draw_series(points.iter().filter(|p| p.0 == dataplane).filter_map(
            |(_, services, (value, range))| {
                let (min, max) = (*range)?;
                Some(ErrorBar::new_vertical(
                    *services as f64,
                    min,
                    *value,
                    max,
                    color(dataplane).stroke_width(2),
                    10,
                ))
            },
        ))?;
    }
    plot.configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::LowerLeft)
        .draw()?;
    root.present()?;
    Ok(())
}
