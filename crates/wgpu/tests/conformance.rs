//! The conformance harness (every primitive and fused op against the reference) on a wgpu
//! adapter: lavapipe on CI, a real GPU where there is one. Without any adapter the test says
//! it was skipped, except under CI=true, where .ci/run installs lavapipe and a missing
//! adapter is a failure.
mod device;

/// Both product kernels on this adapter (lavapipe's default is one thread per row, a GPU's a
/// workgroup per row), so CI checks the one that GPUs run too.
#[test]
fn wgpu_conforms() {
    for rows in [false, true] {
        let Some(be) = device::backend_with(Some(rows)) else {
            return;
        };
        eprintln!(
            "product kernels: one {} per row",
            if rows { "thread" } else { "workgroup" }
        );
        let r = flashmoe_core::backend::conformance::run(&be);
        println!("{}", r.summary());
        r.assert_ok();
    }
}
