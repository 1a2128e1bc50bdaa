//! `Cuda` as core's op-level `Backend`: the conformance harness (every primitive and fused op
//! against the reference twins) and the golden suite through the body every backend shares
//! (`flashmoe_testdata::golden`), on `Model<Cuda>`. Without a GPU each test prints
//! "skipped: no CUDA device (CI has no GPU)" and passes.
use flashmoe_core::backend::conformance;
use flashmoe_cuda::Cuda;
use flashmoe_testdata::golden;

fn cuda() -> Option<Cuda> {
    if !flashmoe_cuda::device_available() {
        flashmoe_testdata::say_skipped("no CUDA device (CI has no GPU)");
        return None;
    }
    Some(Cuda::new(0).expect("a CUDA device is present but could not be opened"))
}

#[test]
fn cuda_conforms() {
    let Some(be) = cuda() else { return };
    let r = conformance::run(&be);
    println!("{}", r.summary());
    r.assert_ok();
}

/// The bound of crates/cuda's own golden tests (2e-3; the decode products of affine matrices
/// read x quantised to int8 levels, the `mp` kernels). Measured on an H200 (27da02d): logits
/// within 1.04e-4 of the golden on every fixture, so the suite's 1e-3 would hold for logits;
/// the per-layer hidden states have not been checked at the suite's bound on a device yet.
const CUDA_TOL: f32 = 2e-3;

#[test]
fn golden_fixtures_on_cuda() {
    let Some(_) = cuda() else { return };
    let Some(shared) = flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR")) else {
        return;
    };
    for (fixture, variant, prefix, section) in golden::FIXTURES {
        let be = Cuda::new(0).expect("CUDA device");
        golden::check_on_with(be, CUDA_TOL, &shared, fixture, variant, prefix, section);
    }
}

/// The session path on `Model<Cuda>` (the generic `ModelSeq`), prefill in steps and a saved
/// state restored, against the golden logits.
#[test]
fn session_on_model_cuda() {
    use flashmoe_core::model_seq::ModelSeq;
    use std::sync::Arc;
    let Some(_) = cuda() else { return };
    let Some(shared) = flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR")) else {
        return;
    };
    for (fixture, variant, prefix, _) in golden::FIXTURES {
        golden::check_session(&shared, fixture, variant, prefix, CUDA_TOL, |m| {
            let on = Cuda::load(m, 0).expect("model on CUDA");
            Box::new(ModelSeq::new(Arc::new(on)))
        });
    }
}
