//! The `--record` TSV: one row per bench run, appended, with a header when the file is new.
//! Columns: commit (of the build, embedded at compile time), model, bits, k, tok_s (warm
//! decode), ttft_ms (warm prefill, else the short decode prompt's), mem_gb (RSS), notes, then
//! date (UTC, RFC 3339) and the measured bound of each figure: tok_s_limit, ttft_limit_ms,
//! mem_limit_gb. Columns are only ever appended, so files written by older builds still read
//! (their missing cells read as `-`), and appending to one first extends its header.
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use flashmoe_core::clock::utc;
use serde_json::Value;

pub const HEADER: [&str; 12] = [
    "commit",
    "model",
    "bits",
    "k",
    "tok_s",
    "ttft_ms",
    "mem_gb",
    "notes",
    "date",
    "tok_s_limit",
    "ttft_limit_ms",
    "mem_limit_gb",
];

/// The commit this binary was built from (`v` + version outside a git checkout): build.rs.
pub const BUILD_COMMIT: &str = env!("FLASHMOE_BUILD_COMMIT");

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
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`; empty in rows written before the column existed.
    pub date: String,
    /// Warm decode tok/s the machine's measured read bandwidths allow.
    pub tok_s_limit: Option<f64>,
    /// Warm prefill time to first token those bandwidths allow (prefill runs only).
    pub ttft_limit_ms: Option<f64>,
    /// Resident memory the design promises for this model.
    pub mem_limit_gb: Option<f64>,
}

impl Row {
    /// The row's cells in [`HEADER`]'s order, numbers written by `num`, text made TSV-safe.
    pub fn cells(&self, num: impl Fn(Option<f64>) -> String) -> [String; 12] {
        [
            cell(&self.commit),
            cell(&self.model),
            cell(&self.bits),
            cell(&self.k),
            num(self.tok_s),
            num(self.ttft_ms),
            num(self.mem_gb),
            cell(&self.notes),
            cell(&self.date),
            num(self.tok_s_limit),
            num(self.ttft_limit_ms),
            num(self.mem_limit_gb),
        ]
    }
}

fn get<'a>(v: &'a Value, section: &str, key: &str) -> Option<&'a Value> {
    v.get(section)?.get(key)
}

fn num(v: &Value, section: &str, key: &str) -> Option<f64> {
    get(v, section, key)?.as_f64()
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
        ("decode", "warm_exact_tok_s", "exact_tok_s"),
        ("decode", "warm_int8_tok_s", "int8_tok_s"),
        ("decode", "int8_decode_kl_mean", "int8_kl"),
        ("decode", "int8_decode_top1_agree", "int8_top1"),
        ("decode", "int8_prompt_kl_mean", "int8_prompt_kl"),
        ("decode", "q8_0_ref_decode_kl_mean", "q8_0_kl"),
    ] {
        if let Some(x) = num(report, sec, key) {
            extra.push(format!("{label}={x}"));
        }
    }
    if let Some(a) = get(report, "decode", "activations").and_then(Value::as_str) {
        extra.push(format!("activations={a}"));
    }
    if !notes.is_empty() {
        extra.push(notes.to_string());
    }
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| model.display().to_string());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Row {
        commit: BUILD_COMMIT.to_string(),
        model: name,
        bits: get(report, "model", "bits").map_or("-".into(), |b| b.to_string()),
        k: get(report, "model", "k").map_or("-".into(), |b| b.to_string()),
        tok_s: num(report, "decode", "warm_tok_s"),
        ttft_ms: num(report, "prefill", "warm_prefill_ttft_ms")
            .or_else(|| num(report, "decode", "warm_ttft_ms")),
        mem_gb: num(report, "decode", "rss_gb"),
        notes: extra.join(" "),
        date: utc(now),
        tok_s_limit: num(report, "decode", "warm_tpt_limit_ms")
            .filter(|&ms| ms > 0.0)
            .map(|ms| flashmoe_core::bench::round4(1e3 / ms)),
        // Only prefill's TTFT has a bound; the decode prompt's fallback figure has none.
        ttft_limit_ms: num(report, "prefill", "warm_prefill_ttft_ms").and(num(
            report,
            "prefill",
            "warm_prefill_ttft_limit_ms",
        )),
        mem_limit_gb: num(report, "decode", "rss_limit_gb"),
    }
}

fn opt(x: Option<f64>) -> String {
    x.map_or("-".into(), |v| format!("{v}"))
}

/// Rewrites `path` with the current header when its header is an older, shorter one (a
/// prefix of [`HEADER`]), so rows appended now line up with the names above them.
fn upgrade_header(path: &Path, text: &str) -> Result<()> {
    let first = text.lines().next().unwrap_or("");
    let cols: Vec<&str> = first.split('\t').collect();
    if cols[0] != HEADER[0] || cols.len() >= HEADER.len() || cols[..] != HEADER[..cols.len()] {
        return Ok(());
    }
    let rest = &text[first.len()..];
    let tmp = path.with_extension("tsv.tmp");
    std::fs::write(&tmp, format!("{}{rest}", HEADER.join("\t")))
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("replacing {} with {}", path.display(), tmp.display()))
}

pub fn append(path: &Path, r: &Row) -> Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if !old.is_empty() {
        upgrade_header(path, &old)?;
    }
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    if old.is_empty() {
        writeln!(f, "{}", HEADER.join("\t"))?;
    } else if !old.ends_with('\n') {
        // A row cut short by a crash must not swallow this one.
        writeln!(f)?;
    }
    let cells = r.cells(opt);
    writeln!(f, "{}", cells.join("\t"))?;
    Ok(())
}

/// The rows of a `--record` file, cells found by the header's names (a file without a header
/// is read in [`HEADER`]'s order); a cell that is missing or not a number reads as absent.
pub fn read(path: &Path) -> Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut names: Vec<&str> = HEADER.to_vec();
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let c: Vec<&str> = line.split('\t').collect();
        if c[0] == HEADER[0] {
            names = c;
            continue;
        }
        let at = |name: &str| {
            names
                .iter()
                .position(|n| *n == name)
                .and_then(|i| c.get(i).copied())
                .unwrap_or("")
        };
        let num = |name: &str| at(name).parse::<f64>().ok().filter(|x| x.is_finite());
        rows.push(Row {
            commit: at("commit").into(),
            model: at("model").into(),
            bits: at("bits").into(),
            k: at("k").into(),
            tok_s: num("tok_s"),
            ttft_ms: num("ttft_ms"),
            mem_gb: num("mem_gb"),
            notes: at("notes").into(),
            date: at("date").into(),
            tok_s_limit: num("tok_s_limit"),
            ttft_limit_ms: num("ttft_limit_ms"),
            mem_limit_gb: num("mem_limit_gb"),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(commit: &str) -> Row {
        Row {
            commit: commit.into(),
            model: "m".into(),
            bits: "4".into(),
            k: "2".into(),
            tok_s: Some(10.5),
            ttft_ms: Some(80.0),
            mem_gb: Some(1.25),
            notes: "n".into(),
            date: "2025-01-01T00:00:00Z".into(),
            tok_s_limit: Some(20.0),
            ttft_limit_ms: None,
            mem_limit_gb: Some(2.0),
        }
    }

    #[test]
    fn older_files_still_read_and_get_the_new_header() {
        let dir = std::env::temp_dir().join(format!("fm-record-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("old.tsv");
        // What builds before the date and bound columns wrote (no trailing newline: a cut row).
        std::fs::write(
            &p,
            "commit\tmodel\tbits\tk\ttok_s\tttft_ms\tmem_gb\tnotes\nabc\tm\t4\t2\t9\t70\t1\told",
        )
        .unwrap();
        append(&p, &sample("def")).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().next().unwrap(), HEADER.join("\t"));
        let rows = read(&p).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].commit.as_str(), rows[0].tok_s), ("abc", Some(9.0)));
        assert_eq!((rows[0].date.as_str(), rows[0].tok_s_limit), ("", None));
        assert_eq!(rows[0].notes, "old");
        assert_eq!(
            (rows[1].commit.as_str(), rows[1].tok_s_limit),
            ("def", Some(20.0))
        );
        assert_eq!(
            (rows[1].ttft_limit_ms, rows[1].mem_limit_gb),
            (None, Some(2.0))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
