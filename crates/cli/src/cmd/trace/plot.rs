//! `trace stats --plot DIR`: three PNGs drawn with plotters and the embedded font that `bench
//! --plot` registers. `popularity.png`: per layer, the cumulative share of routings against
//! the share of experts taken most-used first (the diagonal is uniform routing).
//! `reuse.png`: per layer, the share of accesses whose LRU stack distance is below d (an LRU
//! share of d experts per layer hits exactly those). `working_set.png`: distinct experts of
//! all layers per window of tokens. At most eight layers are drawn, evenly spaced.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use super::stats::LayerStats;

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

type Series = (String, Vec<(f64, f64)>);

/// One chart of lines, y from 0 to `ymax`.
fn chart(path: &Path, title: &str, xl: &str, yl: &str, series: &[Series], ymax: f64) -> Result<()> {
    crate::cmd::bench::plot::font()?;
    let err = |e: &dyn std::fmt::Display| anyhow!("{}: {e}", path.display());
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let xmax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .fold(1e-9f64, f64::max);
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc(xl)
        .y_desc(yl)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let col = PALETTE[i % PALETTE.len()];
        c.draw_series(LineSeries::new(pts.iter().copied(), col.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], col.stroke_width(2)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Up to eight layers, evenly spaced.
fn pick(layers: &[LayerStats]) -> Vec<&LayerStats> {
    let n = layers.len();
    let step = n.div_ceil(8).max(1);
    layers.iter().step_by(step).collect()
}

pub fn stats(
    dir: &Path,
    layers: &[LayerStats],
    ws: &[(usize, f64)],
    experts: usize,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files = Vec::new();
    let shown = pick(layers);
    let pop: Vec<Series> = shown
        .iter()
        .map(|l| {
            let mut c = l.counts.clone();
            c.sort_unstable_by(|a, b| b.cmp(a));
            let total = c.iter().sum::<u64>().max(1) as f64;
            let mut acc = 0.0;
            let mut pts = vec![(0.0, 0.0)];
            for (i, x) in c.iter().enumerate() {
                acc += *x as f64;
                pts.push(((i + 1) as f64 / c.len() as f64, acc / total));
            }
            (format!("layer {}", l.layer), pts)
        })
        .collect();
    let p: PathBuf = dir.join("popularity.png");
    chart(
        &p,
        "Expert popularity: cumulative share of routings",
        "share of experts (most used first)",
        "share of routings",
        &pop,
        1.0,
    )?;
    files.push(p.display().to_string());
    let reuse: Vec<Series> = shown
        .iter()
        .map(|l| {
            let total = (l.dist.iter().sum::<u64>() + l.first_uses).max(1) as f64;
            let mut acc = 0.0;
            let mut pts = vec![(0.0, 0.0)];
            for (d, x) in l.dist.iter().enumerate() {
                acc += *x as f64;
                pts.push(((d + 1) as f64, acc / total));
            }
            (format!("layer {}", l.layer), pts)
        })
        .collect();
    let p = dir.join("reuse.png");
    chart(
        &p,
        &format!("Reuse distance (LRU stack distance, of {experts} experts per layer)"),
        "experts per layer an LRU would keep (d)",
        "share of accesses with distance < d",
        &reuse,
        1.0,
    )?;
    files.push(p.display().to_string());
    let pts: Vec<(f64, f64)> = ws.iter().map(|&(w, n)| ((w as f64).log2(), n)).collect();
    let ymax = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let p = dir.join("working_set.png");
    chart(
        &p,
        "Working set: distinct experts (all layers) per window",
        "log2(window in tokens)",
        "distinct experts",
        &[("all layers".into(), pts)],
        ymax,
    )?;
    files.push(p.display().to_string());
    Ok(files)
}
