//! `chart.svg`: median IOPS per profile (groups) per server (bars), log scale, drawn with plotters.

use std::path::Path;

use plotters::prelude::*;

use crate::error::{BenchError, Result};
use crate::report::Results;

const COLORS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(127, 127, 127),
    RGBColor(148, 103, 189),
];

/// Draws the chart of `r` into `path`.
pub fn write_svg(path: &Path, r: &Results) -> Result<()> {
    draw(path, r).map_err(|e| BenchError::Usage(format!("drawing {}: {e}", path.display())))
}

fn draw(path: &Path, r: &Results) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let servers: Vec<&str> = r.servers.iter().map(|(id, _)| id.as_str()).collect();
    let profiles: Vec<&str> = r.profiles.iter().map(|(id, _)| id.as_str()).collect();
    let group = servers.len() + 1;
    let slots = (profiles.len() * group).max(1) as u32;
    let values = || {
        r.summary
            .iter()
            .map(|s| s.iops)
            .filter(|v| v.is_finite() && *v >= 1.0)
    };
    let max = values().fold(10.0_f64, f64::max);
    // The axis starts a bit under the smallest bar so that the bars' differences stay visible.
    let floor = values().fold(max, f64::min).max(1.0) / 2.0;

    let root = SVGBackend::new(path, (1200, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "median IOPS per profile ({} CPUs, kernel {}, {} s x {} rounds)",
                r.meta.cpus, r.meta.kernel, r.meta.runtime_s, r.meta.rounds
            ),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (0u32..slots).into_segmented(),
            (floor..max * 2.0).log_scale(),
        )?;
    let names = profiles.clone();
    let centre = (servers.len() / 2) as u32;
    let g = group as u32;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(slots as usize)
        .x_label_formatter(&move |v| match v {
            SegmentValue::CenterOf(k) if k % g == centre => names
                .get((k / g) as usize)
                .map_or_else(String::new, |n| (*n).to_owned()),
            _ => String::new(),
        })
        .y_desc("IOPS (log)")
        .draw()?;
    for (si, sid) in servers.iter().enumerate() {
        let color = COLORS.get(si % COLORS.len()).copied().unwrap_or(BLACK);
        let bars: Vec<_> = profiles
            .iter()
            .enumerate()
            .filter_map(|(pi, pid)| {
                let v = r.get(pid, sid)?.iops;
                if !v.is_finite() || v < 1.0 {
                    return None;
                }
                let x = (pi * group + si) as u32;
                Some(Rectangle::new(
                    [
                        (SegmentValue::Exact(x), 1.0),
                        (SegmentValue::Exact(x + 1), v),
                    ],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)?
            .label(*sid)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
