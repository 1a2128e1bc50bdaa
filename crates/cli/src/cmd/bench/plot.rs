//! `--plot`: the `--record` history as a PNG, or as a self-contained HTML page (inline SVG and
//! a table of the rows, nothing fetched) when the path ends in `.html`. Three panels, one point
//! per run of the latest row's model in file order: warm decode tok/s, time to first token and
//! resident memory, each with its measured bound as a dashed line beside it. The x axis names
//! each run's build commit and date. Text is drawn by plotters through ab_glyph with a DejaVu
//! Sans subset embedded in the binary (crates/cli/assets), so no system font is needed.
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::record::Row;

const W: u32 = 1100;
const H: u32 = 1060;
/// Height of the title band above the panels, pixels.
const TOP: u32 = 64;
const FONT: &[u8] = include_bytes!("../../../assets/DejaVuSans-subset.ttf");
const BLUE: RGBColor = RGBColor(31, 119, 180);
const RED: RGBColor = RGBColor(214, 39, 40);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const GREY: RGBColor = RGBColor(90, 90, 90);

/// Registers the embedded font as plotters' `sans-serif` (once per process).
pub(crate) fn font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if !ok {
        bail!("the embedded plot font (assets/DejaVuSans-subset.ttf) does not parse");
    }
    Ok(())
}

/// `x` with about 3 significant digits, no exponent.
pub fn short(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// Width of the key beside each panel, pixels.
const SIDE: u32 = 260;

/// How the latest value stands against its bound: a share below 2x, a multiple above.
fn against(v: f64, l: f64) -> String {
    let r = v / l;
    if r >= 2.0 {
        format!("{} x the bound", short(r))
    } else {
        format!("{:.0}% of the bound", 100.0 * r)
    }
}

/// The key beside a panel: the two line styles with the latest run's value and bound, what
/// the bound is, and how far the value is from it.
fn key<DB: DrawingBackend>(side: &DrawingArea<DB, Shift>, f: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    let big = ("sans-serif", 16).into_font().color(&BLACK);
    let small = ("sans-serif", 13).into_font().color(&GREY);
    let (c, pale) = (f.color, f.color.mix(0.55));
    let (x, mut y) = (8, 52);
    let v = f.values.last().copied().flatten();
    let l = f.limits.last().copied().flatten();
    let val = |x: Option<f64>| {
        x.map_or("not measured".into(), |x| {
            format!("{} {}", short(x), f.unit)
        })
    };
    side.draw_text(
        "latest run",
        &("sans-serif", 14).into_font().color(&GREY),
        (x, y - 24),
    )
    .map_err(err)?;
    side.draw(&PathElement::new(
        vec![(x, y), (x + 26, y)],
        c.stroke_width(2),
    ))
    .map_err(err)?;
    side.draw(&Circle::new((x + 13, y), 4, c.filled()))
        .map_err(err)?;
    side.draw_text(&format!("measured: {}", val(v)), &big, (x + 36, y - 3))
        .map_err(err)?;
    y += 28;
    for dash in [(x, x + 7), (x + 11, x + 18)] {
        side.draw(&PathElement::new(
            vec![(dash.0, y), (dash.1, y)],
            pale.stroke_width(2),
        ))
        .map_err(err)?;
    }
    side.draw(&Cross::new((x + 24, y), 4, pale.stroke_width(2)))
        .map_err(err)?;
    side.draw_text(&format!("bound: {}", val(l)), &big, (x + 36, y - 3))
        .map_err(err)?;
    y += 22;
    for line in f.bound {
        side.draw_text(line, &small, (x + 34, y)).map_err(err)?;
        y += 17;
    }
    if let (Some(v), Some(l)) = (v, l) {
        y += 8;
        side.draw_text(&against(v, l), &big.color(&c), (x + 34, y))
            .map_err(err)?;
    }
    Ok(())
}

/// A run's x label: its commit and day, and the time of day (to the second) where another run
/// shares both.
fn run_label(rows: &[Row], r: &Row) -> String {
    let twin = rows
        .iter()
        .filter(|o| o.commit == r.commit && day(o) == day(r))
        .count()
        > 1;
    let time = if twin {
        r.date.get(11..19).unwrap_or("")
    } else {
        ""
    };
    format!("{} {} {time}", r.commit, day(r)).trim().to_string()
}

/// One figure over the runs and the bound it is measured against.
struct Figure<'a> {
    title: &'a str,
    unit: &'a str,
    values: Vec<Option<f64>>,
    limits: Vec<Option<f64>>,
    /// What the bound is, for the key, in lines.
    bound: &'a [&'a str],
    color: RGBColor,
}

/// `MM-DD` of a row's RFC 3339 date, or "" for rows from before the date column.
fn day(r: &Row) -> &str {
    r.date.get(5..10).unwrap_or("")
}

/// Run indices that get an x label: as many as fit at `px_per_label` each, spread evenly from
/// the first run to the last.
fn label_runs(n: usize, width_px: u32, px_per_label: u32) -> Vec<f64> {
    let k = ((width_px / px_per_label).max(1) as usize).min(n);
    if k <= 1 {
        return vec![n.saturating_sub(1) as f64];
    }
    let span = (n - 1) as f64;
    let mut v: Vec<f64> = (0..k)
        .map(|i| (i as f64 * span / (k - 1) as f64).round())
        .collect();
    v.dedup();
    v
}

/// The x axis: runs 0..n at unit spacing with half a run of room each side, ticks only at
/// the runs in `keys` (plotters' own f64 axis would tick at fractions of a run).
struct Runs {
    n: usize,
    keys: Vec<f64>,
}

impl Ranged for Runs {
    type ValueType = f64;
    type FormatOption = NoDefaultFormatting;
    fn range(&self) -> std::ops::Range<f64> {
        -0.5..self.n as f64 - 0.5
    }
    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let r = self.range();
        let t = (v - r.start) / (r.end - r.start);
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }
    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.keys.clone()
        }
    }
}

impl ValueFormatter<f64> for Runs {
    fn format(v: &f64) -> String {
        format!("{v:.0}")
    }
}

fn panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, rows: &[Row], f: &Figure) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let n = rows.len();
    let pts = |vals: &[Option<f64>]| -> Vec<(f64, f64)> {
        vals.iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i as f64, v)))
            .collect()
    };
    let (meas, lim) = (pts(&f.values), pts(&f.limits));
    let ymax = meas
        .iter()
        .chain(&lim)
        .map(|p| p.1)
        .fold(0f64, f64::max)
        .max(1e-9)
        * 1.18;
    let (w, _) = area.dim_in_pixel();
    let (area, side) = area.split_horizontally(w.saturating_sub(SIDE));
    key(&side, f)?;
    let keys = label_runs(n, w.saturating_sub(SIDE + 100), 180);
    let xs = Runs { n, keys };
    let xfmt = |x: &f64| -> String {
        let i = x.round();
        if (x - i).abs() > 1e-6 || i < 0.0 {
            return String::new();
        }
        rows.get(i as usize)
            .map_or(String::new(), |r| run_label(rows, r))
    };
    // As many decimals as a tick step of about a seventh of the range needs.
    let decimals = (-(ymax / 7.0).log10().floor()).clamp(0.0, 6.0) as usize;
    let yfmt = move |y: &f64| format!("{y:.decimals$}");
    let mut chart = ChartBuilder::on(&area)
        .caption(f.title, ("sans-serif", 19))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(74)
        .build_cartesian_2d(xs, 0f64..ymax)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("run: build commit and date (UTC), oldest left")
        .y_desc(f.unit)
        .x_label_formatter(&xfmt)
        .y_label_formatter(&yfmt)
        .y_labels(7)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let c = f.color;
    let pale = c.mix(0.55);
    chart
        .draw_series(DashedLineSeries::new(
            lim.iter().copied(),
            8,
            5,
            pale.stroke_width(2),
        ))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(lim.iter().map(|&p| Cross::new(p, 4, pale.stroke_width(2))))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(meas.iter().copied(), c.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(meas.iter().map(|&p| Circle::new(p, 4, c.filled())))
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The rows drawn (those of the latest row's model) and a note on those left out.
fn drawn(rows: &[Row]) -> (Vec<Row>, String) {
    let Some(last) = rows.last() else {
        return (Vec::new(), String::new());
    };
    let same: Vec<Row> = rows
        .iter()
        .filter(|r| r.model == last.model)
        .cloned()
        .collect();
    let other = rows.len() - same.len();
    let note = if other > 0 {
        format!(" ({other} runs of other models not shown)")
    } else {
        String::new()
    };
    (same, note)
}

fn chart<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, rows: &[Row]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    font()?;
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (rows, note) = drawn(rows);
    let (head, body) = root.split_vertically(TOP);
    let Some(last) = rows.last() else {
        head.draw_text(
            "no runs recorded yet",
            &("sans-serif", 22).into_font().color(&BLACK),
            (20, 20),
        )
        .map_err(|e| anyhow!("{e}"))?;
        return Ok(());
    };
    let title = format!(
        "flashmoe bench: {}  ({} bits, K = {})",
        last.model, last.bits, last.k
    );
    let sub = format!(
        "{} run{}{note}; latest by build {}{}",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" },
        last.commit,
        if last.date.is_empty() {
            String::new()
        } else {
            format!(" on {}", last.date.replace('T', " ").replace('Z', " UTC"))
        }
    );
    head.draw_text(
        &title,
        &("sans-serif", 24).into_font().color(&BLACK),
        (20, 10),
    )
    .map_err(|e| anyhow!("{e}"))?;
    head.draw_text(&sub, &("sans-serif", 15).into_font().color(&GREY), (20, 40))
        .map_err(|e| anyhow!("{e}"))?;
    let panels = body.split_evenly((3, 1));
    let col = |g: fn(&Row) -> Option<f64>| rows.iter().map(g).collect::<Vec<_>>();
    let figs = [
        Figure {
            title: "Decode, warm",
            unit: "tok/s",
            values: col(|r| r.tok_s),
            limits: col(|r| r.tok_s_limit),
            bound: &[
                "dense + expert bytes per token",
                "at the measured read bandwidths",
            ],
            color: BLUE,
        },
        Figure {
            title: "Time to first token",
            unit: "ms",
            values: col(|r| r.ttft_ms),
            limits: col(|r| r.ttft_limit_ms),
            bound: &[
                "prefill's weight reads at the",
                "measured read bandwidths",
                "(bench prefill or all only)",
            ],
            color: RED,
        },
        Figure {
            title: "Resident memory",
            unit: "GB",
            values: col(|r| r.mem_gb),
            limits: col(|r| r.mem_limit_gb),
            bound: &["the design's promise: dense", "weights + state + K experts"],
            color: GREEN,
        },
    ];
    for (area, f) in panels.iter().zip(&figs) {
        panel(area, &rows, f)?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The same chart as inline SVG, then every row (all models) as a table.
fn html(rows: &[Row], path: &Path) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        chart(&root, rows)?;
    }
    let mut table = String::from("<table>\n<tr>");
    for h in super::record::HEADER {
        table += &format!("<th>{}</th>", esc(h));
    }
    table += "</tr>\n";
    let o = |x: Option<f64>| x.map_or("-".into(), short);
    for r in rows.iter().rev() {
        let cells = r.cells(o);
        table += "<tr>";
        for c in &cells {
            table += &format!("<td>{}</td>", esc(c));
        }
        table += "</tr>\n";
    }
    table += "</table>\n";
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>flashmoe bench history</title>\n<style>\
         body{{font-family:sans-serif;margin:1.5em;color:#222}}\
         svg{{max-width:100%;height:auto}}\
         table{{border-collapse:collapse;font-size:13px;margin-top:1em}}\
         th,td{{border:1px solid #ccc;padding:3px 6px;text-align:left}}\
         th{{background:#f3f3f3}}</style></head>\n<body>\n{svg}\n\
         <h2>Runs, newest first</h2>\n{table}</body></html>\n"
    );
    std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))
}

/// Draws `rows` to `path`: HTML when it ends in `.html`/`.htm`, else an image whose format the
/// extension names (PNG normally).
pub fn draw(rows: &[Row], path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    if matches!(ext.as_deref(), Some("html" | "htm")) {
        return html(rows, path);
    }
    let root = BitMapBackend::new(path, (W, H)).into_drawing_area();
    chart(&root, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded font draws text into a bitmap with no system font at all; a missing or
    /// unparsable font makes plotters' text calls fail, which this would report.
    #[test]
    fn text_renders_with_the_embedded_font() {
        let (w, h) = (400u32, 60u32);
        let mut buf = vec![255u8; (w * h * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
            font().unwrap();
            let style = ("sans-serif", 24).into_font().color(&BLACK);
            root.draw_text("f0d60be 12-07 tok/s", &style, (10, 10))
                .unwrap();
            root.present().unwrap();
        }
        let dark: Vec<usize> = (0..(w * h) as usize)
            .filter(|&i| buf[3 * i] < 128)
            .map(|i| i % w as usize)
            .collect();
        assert!(dark.len() > 400, "only {} dark pixels", dark.len());
        let (lo, hi) = (dark.iter().min().unwrap(), dark.iter().max().unwrap());
        // 19 characters at 24 px: about 200 px of ink from x = 10.
        assert!(
            (8..=16).contains(lo) && (170..=260).contains(hi),
            "ink {lo}..{hi}"
        );
    }

    #[test]
    fn x_labels_thin_out_and_keep_the_last_run() {
        assert_eq!(label_runs(1, 800, 160), vec![0.0]);
        assert_eq!(label_runs(3, 800, 160), vec![0.0, 1.0, 2.0]);
        assert_eq!(label_runs(8, 640, 160), vec![0.0, 2.0, 5.0, 7.0]);
        assert_eq!(label_runs(9, 640, 160), vec![0.0, 3.0, 5.0, 8.0]);
        assert_eq!(label_runs(2, 100, 160), vec![1.0]);
    }

    #[test]
    fn tick_numbers_are_short() {
        assert_eq!(short(2024.4), "2024");
        assert_eq!(short(55.55), "55.5");
        assert_eq!(short(5.556), "5.56");
        assert_eq!(short(0.0908), "0.091");
        assert_eq!(against(5.0, 0.05), "100 x the bound");
        assert_eq!(against(8.0, 100.0), "8% of the bound");
    }
}
