//! Shared helpers for the integration tests: locating the read-only reference data.

use std::path::PathBuf;

/// The shared reference directory (see `flashmoe_testdata::shared_dir`).
pub fn shared_dir() -> Option<PathBuf> {
    flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR"))
}

/// `shared/tokenizer/qwen3.5`, or `None` when skipped.
pub fn qwen35_dir() -> Option<PathBuf> {
    shared_dir().map(|d| d.join("tokenizer/qwen3.5"))
}

/// Reads a JSON file from the Qwen3.5 tokenizer fixture directory.
pub fn read_case_file(name: &str) -> Option<serde_json::Value> {
    let path = qwen35_dir()?.join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display())))
}
