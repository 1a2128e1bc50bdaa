//! The golden body shared by every backend's golden test (core's `golden.rs` for the CPU and
//! the reference; other backends' crates include this module by path): one fixture, one
//! prompt and step by step, and every layer's hidden state.
use super::{logits, max_abs, shared_dir, Golden};
use flashmoe_core::backend::Backend;
use flashmoe_core::loader::{open_model_on, LoadOptions};
use flashmoe_core::model::{ForwardStats, Logits};

/// Tolerance on logits against the golden data.
pub const TOL: f32 = 1e-3;

/// Every golden fixture: (fixture, variant, key prefix, prompt section), one per checkpoint
/// layout and family.
pub const FIXTURES: [(&str, &str, &str, &str); 5] = [
    ("tiny-a", "hf-bf16", "", "bf16"),
    ("tiny-a", "hf-bf16-fused", "", "bf16"),
    ("tiny-a", "mlx-4bit", "mlx4_", "mlx4"),
    ("tiny-next-a", "hf-bf16", "", "bf16"),
    ("tiny-qwen3moe-a", "hf-bf16", "", "bf16"),
];

/// One golden fixture on backend `be`: the same body for every backend.
pub fn check_on<B: Backend>(be: B, fixture: &str, variant: &str, prefix: &str, section: &str) {
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
