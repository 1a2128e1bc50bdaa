//! The golden test body, one for every backend: a fixture's model loaded onto a backend,
//! checked against what Hugging Face transformers computed, one prompt and step by step, and
//! every layer's hidden state through the taps. Core's tests run it on `Cpu` and `Reference`;
//! crates/cuda's on `Cuda` (docs/backends.md: a new backend adds one test per fixture).
use std::sync::Arc;

use flashmoe_core::backend::Backend;
use flashmoe_core::loader::{open_model, open_model_on, LoadOptions};
use flashmoe_core::model::{ForwardStats, Logits, Model};
use flashmoe_core::session::{SeqBackend, Session};

use crate::{max_abs, Golden};

/// Tolerance on logits (max abs difference).
pub const TOL: f32 = 1e-3;

/// Every golden fixture: (fixture, variant, key prefix, meta section).
pub const FIXTURES: [(&str, &str, &str, &str); 5] = [
    ("tiny-a", "hf-bf16", "", "bf16"),
    ("tiny-a", "hf-bf16-fused", "", "bf16"),
    ("tiny-a", "mlx-4bit", "mlx4_", "mlx4"),
    ("tiny-next-a", "hf-bf16", "", "bf16"),
    ("tiny-qwen3moe-a", "hf-bf16", "", "bf16"),
];

/// Logits for every position: `prefill` tokens as one prompt, then one token at a time
/// through the cached state.
pub fn logits<B: Backend>(model: &Model<B>, ids: &[u32], prefill: usize) -> Vec<f32> {
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

/// One golden fixture on backend `be` (the fixture's data under `shared/golden`) at the
/// suite's tolerance.
pub fn check_on<B: Backend>(
    be: B,
    shared: &std::path::Path,
    fixture: &str,
    variant: &str,
    prefix: &str,
    section: &str,
) {
    check_on_with(be, TOL, shared, fixture, variant, prefix, section)
}

/// [`check_on`] with logits within `tol`; the hidden states' bound scales by `tol / TOL`
/// (a backend whose products quantise activations says why in its test).
#[allow(clippy::too_many_arguments)]
pub fn check_on_with<B: Backend>(
    be: B,
    tol: f32,
    shared: &std::path::Path,
    fixture: &str,
    variant: &str,
    prefix: &str,
    section: &str,
) {
    let gdir = shared.join("golden").join(fixture);
    let g = Golden::load(&gdir);
    let dir = gdir.join(variant);
    let name = be.name();
    let model = open_model_on(be, &dir, &LoadOptions::default()).expect("load model");
    let ids = g.ids(&format!("{prefix}input_ids"));
    let (shape, want) = &g.f32s[&format!("{prefix}logits")];
    let vocab = shape[1];
    let what = format!("{fixture}/{variant} on {name}");

    let full = logits(&model, &ids, ids.len());
    let err = max_abs(&full, want);
    eprintln!("{what}: one prompt max abs err {err:.2e}");
    assert!(err < tol, "{what}: logits off by {err}");

    let p = g.prompt_len(section);
    let stepped = logits(&model, &ids, p);
    let (_, dec) = &g.f32s[&format!("{prefix}decode_logits")];
    let n = dec.len() / vocab;
    // decode_logits[i] predicts input_ids[p + i]: the logits at position p - 1 + i.
    let err = max_abs(&stepped[(p - 1) * vocab..(p - 1 + n) * vocab], dec);
    eprintln!("{what}: prefill {p} + decode max abs err {err:.2e}");
    assert!(err < tol, "{what}: decode logits off by {err}");
    let err = max_abs(&stepped, want);
    assert!(err < tol, "{what}: stepped logits off by {err}");

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
    assert_eq!(got.len(), hs_shape[0], "{what}: hidden state count");
    for (i, layer) in got.iter().enumerate() {
        let want = &hs[i * t * h..(i + 1) * t * h];
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let err = max_abs(layer, want);
        assert!(
            err < (1e-4 * scale.max(1.0) + 2e-4) * (tol / TOL),
            "{what}: hidden state {i} off by {err} (scale {scale})"
        );
    }
}

/// A session on the sequence backend `make` builds for a fixture's CPU model: the prompt fed
/// in steps of 1, 3 and all its tokens gives the golden logits after the prompt (within
/// `tol`), each step on a fresh backend; then a saved state restored into another fresh one
/// continues like the original.
pub fn check_session(
    shared: &std::path::Path,
    fixture: &str,
    variant: &str,
    prefix: &str,
    tol: f32,
    make: impl Fn(Arc<Model>) -> Box<dyn SeqBackend>,
) {
    let gdir = shared.join("golden").join(fixture);
    let g = Golden::load(&gdir);
    let model =
        Arc::new(open_model(&gdir.join(variant), &LoadOptions::default()).expect("load model"));
    let ids = g.ids(&format!("{prefix}input_ids"));
    let (shape, want) = &g.f32s[&format!("{prefix}logits")];
    let vocab = shape[1];
    let last = &want[(ids.len() - 1) * vocab..ids.len() * vocab];
    for chunk in [1, 3, ids.len()] {
        let mut s = Session::with_backend(model.clone(), make(model.clone()));
        s.prefill_chunk = chunk;
        let got = s.feed(&ids).expect("feed").to_vec();
        let err = max_abs(&got, last);
        assert!(
            err < tol,
            "{fixture}/{variant}: session prefill in steps of {chunk}: logits off by {err}"
        );
    }
    // Save after all but the last token, restore into a fresh backend, feed the last.
    let mut a = make(model.clone());
    let mut stats = ForwardStats::default();
    let n = ids.len();
    a.forward(&ids[..n - 1], Logits::Last, &mut stats)
        .expect("forward");
    let saved = a.save().expect("save");
    let mut b = make(model.clone());
    b.restore(saved.as_ref()).expect("restore");
    assert_eq!(b.pos(), n - 1, "{fixture}/{variant}: restored position");
    let got = b
        .forward(&ids[n - 1..], Logits::Last, &mut stats)
        .expect("forward");
    let err = max_abs(&got, last);
    assert!(
        err < tol,
        "{fixture}/{variant}: restored state: logits off by {err}"
    );
}
