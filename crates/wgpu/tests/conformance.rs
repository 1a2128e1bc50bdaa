//! The conformance harness (every primitive and fused op against the reference) on a wgpu
//! adapter: lavapipe on CI, a real GPU where there is one. Without any adapter the test says
//! it was skipped, except under CI=true, where .ci/run installs lavapipe and a missing
//! adapter is a failure.
use flashmoe_wgpu::{Options, Wgpu};

pub fn backend() -> Option<Wgpu> {
    match Wgpu::new(Options {
        adapter: None,
        allow_software: true,
    }) {
        Ok(be) => Some(be),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true and no wgpu adapter (.ci/run installs lavapipe): {e}")
        }
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

#[test]
fn wgpu_conforms() {
    let Some(be) = backend() else { return };
    eprintln!("adapter: {:?}", be.adapter());
    let r = flashmoe_core::backend::conformance::run(&be);
    println!("{}", r.summary());
    r.assert_ok();
}
