//! Named taps of the forward pass (`model::tap`): the points come in arch-spec order, carry
//! the tensors the hidden-state capture reads, and the timing tap fills every phase it names.
mod common;

use common::{max_abs, shared_dir};
use flashmoe_core::backend::{Backend, Cpu};
use flashmoe_core::loader::{open_model, LoadOptions};
use flashmoe_core::model::{ForwardStats, Logits, Tap, Timing};

/// Records every point, and the tensors at `layer_out`.
#[derive(Default)]
struct Recorder {
    points: Vec<(&'static str, Option<usize>)>,
    layer_out: Vec<Vec<f32>>,
}

impl Tap<Cpu> for Recorder {
    fn tap(
        &mut self,
        be: &Cpu,
        name: &'static str,
        layer: Option<usize>,
        x: Option<&Vec<f32>>,
    ) -> flashmoe_core::Result<()> {
        self.points.push((name, layer));
        if let ("layer_out", Some(x)) = (name, x) {
            self.layer_out.push(be.download(x)?);
        }
        Ok(())
    }
}

#[test]
fn taps_come_in_order_with_the_hidden_states() {
    let Some(shared) = shared_dir() else { return };
    let dir = shared.join("golden/tiny-a/hf-bf16");
    let model = open_model(&dir, &LoadOptions::default()).expect("load");
    let ids = [1u32, 2, 3, 4, 5];
    let n = model.cfg.num_layers;

    let mut rec = Recorder::default();
    let mut st = model.new_state().expect("state");
    let a = model
        .forward_tapped(&ids, &mut st, Logits::Last, &mut rec)
        .expect("forward");
    let mut want = vec![("embed", None)];
    for l in 0..n {
        let ffn: &[&str] = if model.cfg.is_moe_layer(l) {
            if model.cfg.shared_expert_intermediate_size > 0 {
                &["routes", "shared_out", "experts_out"]
            } else {
                &["routes", "experts_out"]
            }
        } else {
            &["ffn_out"]
        };
        want.push(("mixer_out", Some(l)));
        want.push(("ffn_inp", Some(l)));
        want.extend(ffn.iter().map(|&p| (p, Some(l))));
        want.push(("layer_out", Some(l)));
    }
    want.push(("result_output", None));
    assert_eq!(rec.points, want);

    // The standard capture (golden tests) reads the same tensors; taps change no result.
    let mut hidden = Vec::new();
    let mut st = model.new_state().expect("state");
    let mut stats = ForwardStats::default();
    let b = model
        .forward(&ids, &mut st, Logits::Last, &mut stats, Some(&mut hidden))
        .expect("forward");
    assert_eq!(a, b);
    assert_eq!(
        hidden.len(),
        n + 1,
        "embeddings, n-1 layer outputs, final norm"
    );
    for l in 0..n - 1 {
        assert_eq!(max_abs(&hidden[l + 1], &rec.layer_out[l]), 0.0, "layer {l}");
    }

    // Timing: every layer's mixer and, in MoE layers, routing and experts got time.
    let mut stats = ForwardStats::default();
    let mut st = model.new_state().expect("state");
    let mut timing = Timing::new(&mut stats, n);
    model
        .forward_tapped(&ids, &mut st, Logits::Last, &mut timing)
        .expect("forward");
    for (l, t) in stats.layers.iter().enumerate() {
        assert!(!t.mixer.is_zero(), "layer {l}: no mixer time");
        if model.cfg.is_moe_layer(l) {
            assert!(!t.routing.is_zero(), "layer {l}: no routing time");
            assert!(
                !(t.expert_wait + t.expert_compute).is_zero(),
                "layer {l}: no expert time"
            );
        }
    }
    assert!(!stats.head.is_zero() && !stats.embed.is_zero());
}

/// Greedy decoding's fused head gives the argmax of the logits `forward` returns.
#[test]
fn forward_argmax_is_the_argmax_of_the_logits() {
    let Some(shared) = shared_dir() else { return };
    let dir = shared.join("golden/tiny-a/mlx-4bit");
    let model = open_model(&dir, &LoadOptions::default()).expect("load");
    let (mut a, mut b) = (
        model.new_state().expect("state"),
        model.new_state().expect("state"),
    );
    let mut stats = ForwardStats::default();
    let mut tok = 1u32;
    for step in 0..6 {
        let ids: Vec<u32> = if step == 0 { vec![1, 2, 3] } else { vec![tok] };
        let logits = model
            .forward(&ids, &mut a, Logits::Last, &mut stats, None)
            .expect("forward");
        let want = Cpu.argmax(&logits).expect("argmax");
        tok = model.forward_argmax(&ids, &mut b).expect("forward_argmax");
        assert_eq!(tok, want, "step {step}");
    }
}
