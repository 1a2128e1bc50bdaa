//! Golden tests: the engine against what Hugging Face transformers computed (float32 math on
//! bf16 weights) for tiny models in every checkpoint layout, one prompt and step by step,
//! plus every layer's hidden state (which localises a mismatch to a layer).
mod common;

use common::{logits, max_abs, shared_dir, Golden};
use flashmoe_core::backend::{Backend, Cpu, Reference};
use flashmoe_core::loader::{open_model, LoadOptions};
use flashmoe_testdata::golden;

fn check(fixture: &str, variant: &str, prefix: &str, section: &str) {
    check_on(Cpu, fixture, variant, prefix, section)
}

/// One golden fixture on backend `be`: the body every backend shares
/// (`flashmoe_testdata::golden`).
fn check_on<B: Backend>(be: B, fixture: &str, variant: &str, prefix: &str, section: &str) {
    let Some(shared) = shared_dir() else { return };
    golden::check_on(be, &shared, fixture, variant, prefix, section)
}

#[test]
fn tiny_a_hf_bf16() {
    check("tiny-a", "hf-bf16", "", "bf16");
}

#[test]
fn tiny_a_hf_bf16_fused() {
    check("tiny-a", "hf-bf16-fused", "", "bf16");
}

#[test]
fn tiny_a_mlx_4bit() {
    check("tiny-a", "mlx-4bit", "mlx4_", "mlx4");
}

#[test]
fn tiny_next_a() {
    check("tiny-next-a", "hf-bf16", "", "bf16");
}

#[test]
fn tiny_qwen3moe_a() {
    check("tiny-qwen3moe-a", "hf-bf16", "", "bf16");
}

/// Every fixture through the same body on the reference backend (the plain twins of every
/// op): the model, written once, runs on a second backend.
#[test]
fn every_fixture_on_the_reference_backend() {
    for (fixture, variant, prefix, section) in golden::FIXTURES {
        check_on(Reference, fixture, variant, prefix, section);
    }
}

#[test]
fn k_override_changes_routing_and_renormalises() {
    let Some(shared) = shared_dir() else { return };
    let dir = shared.join("golden/tiny-a/hf-bf16");
    let opts = LoadOptions {
        top_k: Some(2),
        ..Default::default()
    };
    let m2 = open_model(&dir, &opts).expect("load");
    assert_eq!(m2.top_k, 2);
    let m4 = open_model(&dir, &LoadOptions::default()).expect("load");
    let ids = [1u32, 2, 3, 4];
    let a = logits(&m2, &ids, 4);
    let b = logits(&m4, &ids, 4);
    assert!(a.iter().all(|v| v.is_finite()));
    assert!(max_abs(&a, &b) > 1e-4, "--k 2 must change the result");
    let bad = LoadOptions {
        top_k: Some(99),
        ..Default::default()
    };
    assert!(open_model(&dir, &bad).is_err());
}

/// A session's prefill split into steps of a few tokens (as `--prefill-chunk` does for long
/// prompts) gives the golden logits after the prompt, as one step does.
#[test]
fn session_prefill_steps_match_golden() {
    let Some(shared) = shared_dir() else { return };
    let gdir = shared.join("golden/tiny-a");
    let g = Golden::load(&gdir);
    let model = std::sync::Arc::new(
        open_model(&gdir.join("hf-bf16"), &LoadOptions::default()).expect("load model"),
    );
    let ids = g.ids("input_ids");
    let (shape, want) = &g.f32s["logits"];
    let vocab = shape[1];
    let last = &want[(ids.len() - 1) * vocab..ids.len() * vocab];
    for chunk in [1, 3, ids.len()] {
        let mut s = flashmoe_core::session::Session::new(model.clone());
        s.prefill_chunk = chunk;
        let got = s.feed(&ids).expect("feed").to_vec();
        let err = max_abs(&got, last);
        assert!(
            err < golden::TOL,
            "prefill in steps of {chunk}: logits off by {err}"
        );
        assert_eq!(s.tokens(), &ids[..], "tokens held after steps of {chunk}");
    }
}

/// The session path on a model moved to another backend (`Model::to_backend`, its experts
/// read through the CPU model's) behind the generic `ModelSeq`: here the reference backend,
/// as crates/cuda does with `Cuda`.
#[test]
fn model_seq_on_another_backend_matches_golden() {
    use flashmoe_core::model::SharedExperts;
    use flashmoe_core::model_seq::ModelSeq;
    use std::sync::Arc;
    let Some(shared) = shared_dir() else { return };
    for (fixture, variant, prefix) in [("tiny-a", "hf-bf16", ""), ("tiny-next-a", "hf-bf16", "")] {
        golden::check_session(&shared, fixture, variant, prefix, golden::TOL, |m| {
            let experts = Box::new(SharedExperts(m.clone()));
            let on = m.to_backend(Reference, experts).expect("to_backend");
            Box::new(ModelSeq::new(Arc::new(on)))
        });
    }
}

/// A model loaded on the CPU and uploaded to another backend (`model::upload_to`, how the CLI
/// hands one loaded model to a GPU backend) gives the CPU's logits, experts read through the
/// CPU model's source.
#[test]
fn a_cpu_model_uploaded_to_another_backend_gives_its_logits() {
    let Some(shared) = shared_dir() else { return };
    for fixture in ["tiny-a", "tiny-qwen3moe-a"] {
        let dir = shared.join("golden").join(fixture).join("hf-bf16");
        let cpu = std::sync::Arc::new(open_model(&dir, &LoadOptions::default()).expect("load"));
        let on_ref = flashmoe_core::model::upload_to(&cpu, Reference).expect("upload");
        let ids = [1u32, 5, 9, 2];
        let want = logits(&cpu, &ids, 2);
        let before = cpu.experts.counters().snapshot().fetched;
        let got = logits(&on_ref, &ids, 2);
        let err = max_abs(&got, &want);
        assert!(err < 1e-4, "{fixture}: uploaded model off by {err}");
        assert!(
            cpu.experts.counters().snapshot().fetched > before,
            "{fixture}: the uploaded model reads its experts through the CPU model's source"
        );
    }
}
