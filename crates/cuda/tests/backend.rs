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

/// The slot-batch op (core's residency tier over VRAM slots and pinned host slots) against the
/// reference: an evicting tier with a middle tier, and every expert resident (looked up on the
/// device from the router's ids).
#[test]
fn cuda_slots_conform() {
    let Some(be) = cuda() else { return };
    let r = conformance::run_slots(&be);
    println!("{}", r.summary());
    assert!(
        r.checks
            .iter()
            .any(|c| c.class.contains("resident routing")),
        "no layer ran on device-side lookup"
    );
    r.assert_ok();
}

/// `Model<Cuda>` through the residency tier against the golden logits: every expert preloaded
/// (each MoE layer looked up on the device, no routing read back), and a tier of one batch of
/// VRAM slots over a small pinned host tier (evictions, middle-tier hits).
#[test]
fn session_on_model_cuda_tiers() {
    use flashmoe_core::cache::CachePolicy;
    use flashmoe_core::model_seq::ModelSeq;
    use flashmoe_cuda::CudaOptions;
    use std::sync::Arc;
    let Some(_) = cuda() else { return };
    let Some(shared) = flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR")) else {
        return;
    };
    for (fixture, variant, prefix, _) in golden::FIXTURES {
        golden::check_session(&shared, fixture, variant, prefix, CUDA_TOL, |m| {
            let on = Cuda::load(m, 0).expect("model on CUDA");
            assert!(
                Cuda::preload(&on).expect("preload"),
                "every MoE layer resident"
            );
            Box::new(ModelSeq::new(Arc::new(on)))
        });
        for policy in [CachePolicy::Lru, CachePolicy::Arc] {
            golden::check_session(&shared, fixture, variant, prefix, CUDA_TOL, |m| {
                let eb = m.experts.expert_bytes();
                let opts = CudaOptions {
                    expert_cache_bytes: Some(eb),
                    host_cache_bytes: 3 * eb,
                    ..CudaOptions::default()
                };
                let on = Cuda::load_with(m, &opts, policy).expect("model on CUDA");
                let info = on.be.tier_info().expect("a tier");
                assert!(!info.all_fit && info.host_slots.is_some(), "{info:?}");
                Box::new(ModelSeq::new(Arc::new(on)))
            });
        }
    }
}
