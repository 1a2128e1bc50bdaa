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

pub mod golden_body;
pub mod mlx_convert;

/// Logits for every position: `prefill` tokens as one prompt, then one token at a time
/// through the cached state.
pub fn logits<B: flashmoe_core::backend::Backend>(
    model: &flashmoe_core::model::Model<B>,
    ids: &[u32],
    prefill: usize,
) -> Vec<f32> {
    use flashmoe_core::model::{ForwardStats, Logits};
    let mut st = model.new_state().expect("state");
    let mut stats = ForwardStats::default();
    let mut out = model
        .forward(&ids[..prefill], &mut st, Logits::All, &mut stats, None)
        .expect("prefill");
    for &id in &ids[prefill..] {
        out.extend(
            model
                .forward(&[id], &mut st, Logits::Last, &mut stats, None)
                .expect("decode"),
        );
    }
    out
}
