//! `bench --record --plot` run from outside the repository: every row names the build's
//! commit (embedded at compile time), its date and the bounds; the PNG and the HTML page are
//! real drawings of that history. No timing assertions: the figures are whatever the machine
//! measured.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, run_ok, temp_dir};

/// What build.rs embedded in this build (the binary and this test share one build-script run):
/// `git rev-parse --short HEAD` at build time, else `v` + version. Checked to be a commit of
/// this checkout when git is at hand, but not against today's HEAD, which a commit made
/// between the build and the test run would move.
fn expected_commit() -> String {
    let c = env!("FLASHMOE_BUILD_COMMIT").to_string();
    if !c.starts_with('v') {
        let known = Command::new("git")
            .args(["cat-file", "-e", &format!("{c}^{{commit}}")])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status();
        assert!(
            known.is_ok_and(|st| st.success()),
            "embedded commit {c} is not a commit of this checkout"
        );
    }
    c
}

/// A directory outside any git repository (under the system temp dir), emptied.
fn outside_repo(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flashmoe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

fn bench(cwd: &Path, model: &Path, plot: &str) {
    run_ok(
        bin()
            .current_dir(cwd)
            .args(["bench", "decode", "--json", "--no-cold", "--no-compare"])
            .arg("--model")
            .arg(model)
            .args(["--tokens", "2", "--kernel-mb", "4", "--io-mb", "4"])
            .args(["--record", "results.tsv", "--plot", plot]),
    );
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(b: &[u8]) -> (u32, u32) {
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "a PNG signature");
    assert_eq!(&b[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

#[test]
fn recorded_rows_name_the_build_and_plot_as_png_and_html() {
    let model = temp_dir("bench-plot").join("tiny");
    run_ok(
        bin()
            .args(["synth", "--preset", "tiny", "--out"])
            .arg(&model),
    );
    let cwd = outside_repo("bench-plot");
    bench(&cwd, &model, "history.png");
    bench(&cwd, &model, "history.png");
    bench(&cwd, &model, "history.html");

    let tsv = std::fs::read_to_string(cwd.join("results.tsv")).expect("--record wrote the TSV");
    let lines: Vec<&str> = tsv.lines().collect();
    assert_eq!(lines.len(), 4, "header + three rows:\n{tsv}");
    let header: Vec<&str> = lines[0].split('\t').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no {name} column in {header:?}"))
    };
    let want = expected_commit();
    for row in &lines[1..] {
        let c: Vec<&str> = row.split('\t').collect();
        assert_eq!(c.len(), header.len(), "{row}");
        // Run outside the repository, the row still names the commit that built the binary.
        assert_eq!(c[col("commit")], want, "{row}");
        let date = c[col("date")];
        assert!(
            date.len() == 20 && date.ends_with('Z') && &date[10..11] == "T",
            "date {date:?} is not YYYY-MM-DDTHH:MM:SSZ"
        );
        for bound in ["tok_s_limit", "mem_limit_gb"] {
            let x: f64 = c[col(bound)].parse().unwrap_or(f64::NAN);
            assert!(x > 0.0, "{bound} = {:?} in {row}", c[col(bound)]);
        }
    }

    let png = std::fs::read(cwd.join("history.png")).expect("--plot wrote the PNG");
    assert_eq!(png_size(&png), (1100, 1060));
    // A blank canvas of that size compresses to a few KB; three panels with text, ticks and
    // lines are well over 30 KB.
    assert!(png.len() > 30_000, "PNG is only {} bytes", png.len());

    let html = std::fs::read_to_string(cwd.join("history.html")).expect("--plot wrote HTML");
    assert!(html.starts_with("<!doctype html>"), "{}", &html[..80]);
    assert!(html.contains("<svg") && html.contains("</svg>"));
    assert!(html.contains("Decode, warm") && html.contains("tok/s"));
    assert!(
        html.contains(&format!("<td>{want}</td>")),
        "the table names the build"
    );
    assert_eq!(html.matches("<tr><td>").count(), 3, "one table row per run");
    // Self-contained: nothing loaded from elsewhere.
    for fetch in [
        "<script src",
        "<link",
        "src=\"http",
        "href=\"http",
        "@import",
    ] {
        assert!(!html.contains(fetch), "the page fetches something: {fetch}");
    }
    let sample = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-plot");
    for f in ["history.png", "history.html", "results.tsv"] {
        std::fs::copy(cwd.join(f), sample.join(f)).expect("keep the sample for a look");
    }
    std::fs::remove_dir_all(&cwd).expect("remove temp dir");
}
