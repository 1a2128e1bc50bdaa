//! Golden tests: the engine against what Hugging Face transformers computed (float32 math on
//! bf16 weights) for tiny models in every checkpoint layout, one prompt and step by step,
//! plus every layer's hidden state (which localises a mismatch to a layer).
mod common;

use common::{logits, max_abs, shared_dir, Golden};
use flashmoe_core::backend::{Backend, Cpu, Reference};
use flashmoe_core::loader::{open_model, open_model_on, LoadOptions};
use flashmoe_core::model::{ForwardStats, Logits};

const TOL: f32 = 1e-3;

fn check(fixture: &str, variant: &str, prefix: &str, section: &str) {
    check_on(Cpu, fixture, variant, prefix, section)
}

/// One golden fixture on backend `be`: the same body for every backend.
fn check_on<B: Backend>(be: B, fixture: &str, variant: &str, prefix: &str, section: &str) {
    let Some(shared) = shared_dir() else { return };
    let gdir = shared.join("golden").join(fixture);
    let g = Golden::load(&gdir);
    let dir = gdir.join(variant);
    let model = open_model_on(be, &dir, &LoadOptions::default()).expect("load model");
    let ids = g.ids(&format!("{prefix}input_ids"));
    let (shape, want) = &g.f32s[&format!("{prefix}logits")];
    let vocab = shape[1];

    let full = logits(&model, &ids, ids.len());
    let err = max_abs(&full, want);
    eprintln!("{fixture}/{variant}: one prompt max abs err {err:.2e}");
    assert!(err < TOL, "{fixture}/{variant}: logits off by {err}");

    let p = g.prompt_len(section);
    let stepped = logits(&model, &ids, p);
    let (_, dec) = &g.f32s[&format!("{prefix}decode_logits")];
    let n = dec.len() / vocab;
    // decode_logits[i] predicts input_ids[p + i]: the logits at position p - 1 + i.
    let err = max_abs(&stepped[(p - 1) * vocab..(p - 1 + n) * vocab], dec);
    eprintln!("{fixture}/{variant}: prefill {p} + decode max abs err {err:.2e}");
    assert!(err < TOL, "{fixture}/{variant}: decode logits off by {err}");
    let err = max_abs(&stepped, want);
    assert!(
        err < TOL,
        "{fixture}/{variant}: stepped logits off by {err}"
    );

    // Hidden states after each layer.
    let (hs_shape, hs) = &g.f32s[&format!("{prefix}hidden_states")];
    let (t, h) = (hs_shape[1], hs_shape[2]);
    let mut got = Vec::new();
    let mut st = model.new_state().expect("state");
    model
        .forward(
            &ids,
            &mut st,
            Logits::Last,
            &mut ForwardStats::default(),
            Some(&mut got),
        )
        .expect("forward");
    assert_eq!(got.len(), hs_shape[0], "hidden state count");
    for (i, layer) in got.iter().enumerate() {
        let want = &hs[i * t * h..(i + 1) * t * h];
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let err = max_abs(layer, want);
        assert!(
            err < 1e-4 * scale.max(1.0) + 2e-4,
            "{fixture}/{variant}: hidden state {i} off by {err} (scale {scale})"
        );
    }
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
    check_on(Reference, "tiny-a", "hf-bf16", "", "bf16");
    check_on(Reference, "tiny-a", "hf-bf16-fused", "", "bf16");
    check_on(Reference, "tiny-a", "mlx-4bit", "mlx4_", "mlx4");
    check_on(Reference, "tiny-next-a", "hf-bf16", "", "bf16");
    check_on(Reference, "tiny-qwen3moe-a", "hf-bf16", "", "bf16");
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
            err < TOL,
            "prefill in steps of {chunk}: logits off by {err}"
        );
        assert_eq!(s.tokens(), &ids[..], "tokens held after steps of {chunk}");
    }
}
