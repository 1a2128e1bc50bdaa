//! The tokenizer is built with the pure-Rust `fancy-regex` engine (so that flashmoe builds for
//! macOS without a C toolchain for Oniguruma). Hugging Face's Python `tokenizers` runs the same
//! pre-tokenizer pattern on Oniguruma: this test asks it for the ids of 3,000 generated strings
//! (`tests/python/tokenize_reference.py`: contractions, whitespace runs, scripts without
//! spaces, combining marks, emoji, control characters, special-token look-alikes) and requires
//! flashmoe's ids to be the same, id for id.
//!
//! It needs `python3` with `tokenizers` (`.ci/run` installs it). Outside CI, without them, it
//! says it was skipped; with `CI=true` it fails.

#[allow(dead_code)]
mod common;

use std::path::Path;
use std::process::Command;

use flashmoe_text::Tokenizer;

#[test]
fn ids_equal_hugging_face_oniguruma_on_generated_text() {
    let Some(dir) = common::qwen35_dir() else {
        return;
    };
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/tokenize_reference.py");
    let out =
        std::env::temp_dir().join(format!("flashmoe-regex-parity-{}.json", std::process::id()));
    let run = Command::new("python3")
        .arg(&script)
        .arg(dir.join("tokenizer.json.gz"))
        .arg(&out)
        .arg("3000")
        .output();
    let ok = matches!(&run, Ok(o) if o.status.success());
    if !ok {
        let why = match &run {
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        if std::env::var_os("CI").is_some() {
            panic!("reference tokenizer (python3 + tokenizers) unavailable on CI: {why}");
        }
        eprintln!("SKIPPED: python3 with `tokenizers` is needed for the reference ids ({why})");
        return;
    }
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("reading reference ids"))
            .expect("parsing reference ids");
    std::fs::remove_file(&out).ok();
    assert_eq!(cases.len(), 3000);
    let tok = Tokenizer::from_dir(&dir).expect("loading tokenizer");
    let mut mismatches = Vec::new();
    for case in &cases {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let got = tok.encode(text).expect("encode");
        if got != want {
            mismatches.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} strings tokenized differently, first: {}",
        mismatches.len(),
        cases.len(),
        mismatches[0]
    );
}
