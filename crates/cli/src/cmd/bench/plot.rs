//! `--plot`: the `--record` history as a PNG (warm decode tok/s above, time to first token
//! below, one point per run in file order). plotters is built with its bitmap backend only, so
//! no system font library is needed; labels are drawn with the small pixel font below.
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::record::Row;

const W: u32 = 900;
const H: u32 = 640;
/// Margin around each panel's plotting area, pixels.
const M: i32 = 50;
/// Pixel-font scale: each font pixel is an S×S square.
const S: i32 = 2;

/// 3×5 glyphs, one row per string, `#` set.
fn glyph(c: char) -> [&'static str; 5] {
    match c.to_ascii_uppercase() {
        '0' => ["###", "#.#", "#.#", "#.#", "###"],
        '1' => [".#.", "##.", ".#.", ".#.", "###"],
        '2' => ["###", "..#", "###", "#..", "###"],
        '3' => ["###", "..#", "###", "..#", "###"],
        '4' => ["#.#", "#.#", "###", "..#", "..#"],
        '5' => ["###", "#..", "###", "..#", "###"],
        '6' => ["###", "#..", "###", "#.#", "###"],
        '7' => ["###", "..#", "..#", "..#", "..#"],
        '8' => ["###", "#.#", "###", "#.#", "###"],
        '9' => ["###", "#.#", "###", "..#", "###"],
        'A' => [".#.", "#.#", "###", "#.#", "#.#"],
        'B' => ["##.", "#.#", "##.", "#.#", "##."],
        'C' => ["###", "#..", "#..", "#..", "###"],
        'D' => ["##.", "#.#", "#.#", "#.#", "##."],
        'E' => ["###", "#..", "##.", "#..", "###"],
        'F' => ["###", "#..", "##.", "#..", "#.."],
        'G' => ["###", "#..", "#.#", "#.#", "###"],
        'H' => ["#.#", "#.#", "###", "#.#", "#.#"],
        'I' => ["###", ".#.", ".#.", ".#.", "###"],
        'J' => ["..#", "..#", "..#", "#.#", "###"],
        'K' => ["#.#", "#.#", "##.", "#.#", "#.#"],
        'L' => ["#..", "#..", "#..", "#..", "###"],
        'M' => ["#.#", "###", "###", "#.#", "#.#"],
        'N' => ["##.", "#.#", "#.#", "#.#", "#.#"],
        'O' => ["###", "#.#", "#.#", "#.#", "###"],
        'P' => ["###", "#.#", "###", "#..", "#.."],
        'Q' => ["###", "#.#", "#.#", "###", "..#"],
        'R' => ["##.", "#.#", "##.", "#.#", "#.#"],
        'S' => ["###", "#..", "###", "..#", "###"],
        'T' => ["###", ".#.", ".#.", ".#.", ".#."],
        'U' => ["#.#", "#.#", "#.#", "#.#", "###"],
        'V' => ["#.#", "#.#", "#.#", "#.#", ".#."],
        'W' => ["#.#", "#.#", "###", "###", "#.#"],
        'X' => ["#.#", "#.#", ".#.", "#.#", "#.#"],
        'Y' => ["#.#", "#.#", ".#.", ".#.", ".#."],
        'Z' => ["###", "..#", ".#.", "#..", "###"],
        '.' => ["...", "...", "...", "...", ".#."],
        '-' => ["...", "...", "###", "...", "..."],
        '/' => ["..#", "..#", ".#.", "#..", "#.."],
        ':' => ["...", ".#.", "...", ".#.", "..."],
        '=' => ["...", "###", "...", "###", "..."],
        '(' => [".#.", "#..", "#..", "#..", ".#."],
        ')' => [".#.", "..#", "..#", "..#", ".#."],
        '_' => ["...", "...", "...", "...", "###"],
        _ => ["...", "...", "...", "...", "..."],
    }
}

/// Draws `text` with its top-left corner at (x, y).
fn text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    x: i32,
    y: i32,
    s: &str,
    color: RGBColor,
) -> Result<()> {
    for (i, c) in s.chars().enumerate() {
        let gx = x + i as i32 * 4 * S;
        for (r, row) in glyph(c).iter().enumerate() {
            for (col, b) in row.bytes().enumerate() {
                if b == b'#' {
                    let px = gx + col as i32 * S;
                    let py = y + r as i32 * S;
                    area.draw(&Rectangle::new(
                        [(px, py), (px + S - 1, py + S - 1)],
                        color.filled(),
                    ))
                    .map_err(|e| anyhow!("plot: {e}"))?;
                }
            }
        }
    }
    Ok(())
}

fn short(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// One panel: `title` top-left, points (run index, value) joined by a line, y from 0 to the
/// largest value, the first and last commits under the axis.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    rows: &[Row],
    values: &[Option<f64>],
    color: RGBColor,
) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("plot: {e}");
    let (w, h) = area.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    text(area, M, 14, title, BLACK)?;
    let pts: Vec<(f64, f64)> = values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| (i as f64, v)))
        .collect();
    let ymax = pts.iter().map(|p| p.1).fold(0f64, f64::max).max(1e-9) * 1.1;
    let xmax = (rows.len().max(2) - 1) as f64;
    area.draw(&Rectangle::new([(M, M), (w - M, h - M)], BLACK))
        .map_err(err)?;
    text(area, M + 6, M + 6, &format!("MAX {}", short(ymax)), BLACK)?;
    text(area, M - 6 * S, h - M - 5 * S, "0", BLACK)?;
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        text(area, M, h - M + 8, &first.commit, BLACK)?;
        let lx = w - M - last.commit.len() as i32 * 4 * S;
        text(area, lx, h - M + 8, &last.commit, BLACK)?;
        let latest = values.last().copied().flatten().map_or("-".into(), short);
        text(
            area,
            M + (title.len() as i32 + 3) * 4 * S,
            14,
            &format!("LATEST {latest}  RUNS {}", rows.len()),
            color,
        )?;
    }
    let plot_area = area.margin(M as u32, M as u32, M as u32, M as u32);
    let mut chart = ChartBuilder::on(&plot_area)
        .build_cartesian_2d(-0.05 * xmax..xmax * 1.05, 0f64..ymax)
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
        .map_err(err)?;
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
        .map_err(err)?;
    Ok(())
}

pub fn draw(rows: &[Row], png: &Path) -> Result<()> {
    let root = BitMapBackend::new(png, (W, H)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let halves = root.split_evenly((2, 1));
    let tok: Vec<Option<f64>> = rows.iter().map(|r| r.tok_s).collect();
    let ttft: Vec<Option<f64>> = rows.iter().map(|r| r.ttft_ms).collect();
    let model = rows.last().map_or(String::new(), |r| r.model.clone());
    panel(
        &halves[0],
        &format!("DECODE TOK/S (WARM)  {model}"),
        rows,
        &tok,
        RGBColor(31, 119, 180),
    )?;
    panel(
        &halves[1],
        "TIME TO FIRST TOKEN MS",
        rows,
        &ttft,
        RGBColor(214, 39, 40),
    )?;
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}
