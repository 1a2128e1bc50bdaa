//! Where tests find the shared reference data (`../shared` beside the checkout, or
//! `FLASHMOE_SHARED`), with one rule for every crate: missing data is a failure under CI and a
//! printed skip elsewhere, never a silent pass.
use std::path::{Path, PathBuf};

/// The shared reference directory for a crate of this workspace (`manifest_dir` is its
/// `CARGO_MANIFEST_DIR`): `$FLASHMOE_SHARED`, else `<manifest_dir>/../../../shared`.
///
/// Returns `None` after printing why when it is absent; panics instead when `CI` is set.
pub fn shared_dir(manifest_dir: &str) -> Option<PathBuf> {
    let dir = match std::env::var_os("FLASHMOE_SHARED") {
        Some(d) => PathBuf::from(d),
        None => Path::new(manifest_dir).join("../../../shared"),
    };
    if dir.join("golden").is_dir() && dir.join("tokenizer").is_dir() {
        return Some(dir);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "CI is set but the shared reference data is missing at {} (set FLASHMOE_SHARED)",
            dir.display()
        );
    }
    eprintln!(
        "skipped: shared reference data not found at {} (set FLASHMOE_SHARED)",
        dir.display()
    );
    None
}
