//! Shared helpers for the integration tests: locating the read-only reference data.

use std::path::PathBuf;

/// The shared reference directory: `$FLASHMOE_SHARED`, else `<repo>/../shared`.
///
/// Returns `None` (after printing why) when it is absent on a developer machine; under CI
/// (`CI` set) a missing directory is a failure, so a broken layout cannot pass silently.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("FLASHMOE_SHARED") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    };
    if dir.join("tokenizer/qwen3.5").is_dir() {
        return Some(dir);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "shared reference data not found at {} (set FLASHMOE_SHARED); required under CI",
            dir.display()
        );
    }
    eprintln!(
        "SKIPPED: shared reference data not found at {} (set FLASHMOE_SHARED)",
        dir.display()
    );
    None
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
