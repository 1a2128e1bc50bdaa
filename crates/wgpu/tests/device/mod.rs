//! The adapter the wgpu tests run on: the first hardware one, else a software one
//! (lavapipe). None at all: "skipped" on a developer's machine, a failure under CI=true
//! (.ci/run installs lavapipe).
// Each test binary uses some of these.
#![allow(dead_code)]
use flashmoe_wgpu::{Fast, Form, Options, Wgpu};

pub fn backend() -> Option<Wgpu> {
    backend_with(None, None)
}

/// [`backend`] with the product kernels chosen (`None`: the adapter's default).
pub fn backend_with(row_per_thread: Option<bool>, fast: Option<Fast>) -> Option<Wgpu> {
    match Wgpu::new(Options {
        adapter: None,
        allow_software: true,
        row_per_thread,
        fast,
    }) {
        Ok(be) => {
            eprintln!("wgpu adapter: {:?}", be.adapter());
            Some(be)
        }
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true and no wgpu adapter (.ci/run installs lavapipe): {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// A fast-products configuration whose lanes sum through workgroup memory (any adapter).
pub fn fast_wg(lg: u32, wgs: u32, r: u32, form: Form) -> Fast {
    Fast {
        lg,
        wgs,
        r,
        subgroup: false,
        form,
        lean: false,
    }
}

/// Whether `be`'s device has f16 in shaders (the f16 decode form); otherwise "skipped" on a
/// developer's machine and a failure under CI=true (lavapipe, which .ci/run installs, has
/// shaderFloat16 and 16-bit storage). Drops `be`.
pub fn f16_or_skip(be: Wgpu) -> bool {
    if be.has_f16() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "CI=true and the adapter has no f16 in shaders: {:?}",
            be.adapter()
        );
    }
    eprintln!("skipped: adapter has no f16");
    false
}

/// The golden fixture `tiny-a` and its 4-bit model on the CPU (`None`: no shared data, see
/// `flashmoe_testdata::shared_dir`).
pub fn tiny_4bit() -> Option<(
    flashmoe_testdata::Golden,
    std::sync::Arc<flashmoe_core::model::Model>,
)> {
    let shared = flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR"))?;
    let gdir = shared.join("golden/tiny-a");
    let g = flashmoe_testdata::Golden::load(&gdir);
    let cpu = flashmoe_core::loader::open_model(
        &gdir.join("mlx-4bit"),
        &flashmoe_core::loader::LoadOptions::default(),
    )
    .expect("load model");
    Some((g, std::sync::Arc::new(cpu)))
}
