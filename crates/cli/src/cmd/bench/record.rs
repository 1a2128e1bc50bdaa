//! The `--record` TSV: one row per bench run, appended, with a header when the file is new.
//! Columns: commit, model, bits, k, tok_s (warm decode), ttft_ms (warm prefill, else the short
//! decode prompt's), mem_gb (RSS), notes.
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use serde_json::Value;

pub const HEADER: [&str; 8] = [
    "commit", "model", "bits", "k", "tok_s", "ttft_ms", "mem_gb", "notes",
];

#[derive(Clone, Debug)]
pub struct Row {
    pub commit: String,
    pub model: String,
    pub bits: String,
    pub k: String,
    pub tok_s: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub mem_gb: Option<f64>,
    pub notes: String,
}

fn get<'a>(v: &'a Value, section: &str, key: &str) -> Option<&'a Value> {
    v.get(section)?.get(key)
}

fn num(v: &Value, section: &str, key: &str) -> Option<f64> {
    get(v, section, key)?.as_f64()
}

fn commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
}

/// Strips what would break a TSV cell.
fn cell(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

pub fn row(report: &Value, model: &Path, notes: &str) -> Row {
    let mut extra = Vec::new();
    for (sec, key, label) in [
        ("decode", "cold_tok_s", "cold_tok_s"),
        ("decode", "warm_tpt_ratio", "warm_tpt_ratio"),
        ("decode", "cold_overlap_tpt_ratio", "cold_overlap_ratio"),
        ("prefill", "warm_prefill_tok_s", "prefill_tok_s"),
        ("moe", "warm_moe_tok_s", "moe_tok_s"),
        ("kernels", "q4_matvec_bw_ratio", "q4_bw_ratio"),
    ] {
        if let Some(x) = num(report, sec, key) {
            extra.push(format!("{label}={x}"));
        }
    }
    if !notes.is_empty() {
        extra.push(notes.to_string());
    }
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.display().to_string());
    Row {
        commit: commit(),
        model: name,
        bits: get(report, "model", "bits").map_or("-".into(), |b| b.to_string()),
        k: get(report, "model", "k").map_or("-".into(), |b| b.to_string()),
        tok_s: num(report, "decode", "warm_tok_s"),
        ttft_ms: num(report, "prefill", "warm_prefill_ttft_ms")
            .or_else(|| num(report, "decode", "warm_ttft_ms")),
        mem_gb: num(report, "decode", "rss_gb"),
        notes: extra.join(" "),
    }
}

fn opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v}"))
}

pub fn append(path: &Path, r: &Row) -> Result<()> {
    let new = !path.exists()
        || std::fs::metadata(path)
            .map(|m| m.len() == 0)
            .unwrap_or(true);
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    if new {
        writeln!(f, "{}", HEADER.join("\t"))?;
    }
    let cells = [
        cell(&r.commit),
        cell(&r.model),
        cell(&r.bits),
        cell(&r.k),
        opt(r.tok_s),
        opt(r.ttft_ms),
        opt(r.mem_gb),
        cell(&r.notes),
    ];
    writeln!(f, "{}", cells.join("\t"))?;
    Ok(())
}

pub fn read(path: &Path) -> Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let parse = |s: &str| s.parse::<f64>().ok();
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("commit\t"))
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            let at = |i: usize| c.get(i).copied().unwrap_or("");
            Row {
                commit: at(0).into(),
                model: at(1).into(),
                bits: at(2).into(),
                k: at(3).into(),
                tok_s: parse(at(4)),
                ttft_ms: parse(at(5)),
                mem_gb: parse(at(6)),
                notes: at(7).into(),
            }
        })
        .collect())
}
