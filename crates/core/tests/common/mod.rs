//! Test helpers shared by integration tests: locating ../shared and reading golden files.
#![allow(dead_code)]
use std::path::PathBuf;

/// The shared reference directory (see `flashmoe_testdata::shared_dir`).
pub fn shared_dir() -> Option<PathBuf> {
    flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR"))
}

// Not every test binary that includes this module uses both.
#[allow(unused_imports)]
pub use flashmoe_testdata::{max_abs, Golden};

pub mod mlx_convert;

#[allow(unused_imports)]
pub use flashmoe_testdata::golden::logits;
