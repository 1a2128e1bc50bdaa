//! Int8 activations (`kernels::ActQuant::Int8`, the CLI's default) on a real model: tiny-a in
//! MLX 4-bit against the transformers golden, in the matvec (decode) and, for products of at
//! least `int8mm::MIN_N` inputs, the prompt's products. The exact path must stay within the golden
//! tests' 1e-3; the int8 path within the bounds below. Its own test binary, because the switch
//! is process-wide: the one test function sets it and puts it back, so nothing else sees it.
mod common;

use common::{logits, max_abs, shared_dir, Golden};
use flashmoe_core::kernels::{act_quant, set_act_quant, ActQuant};
use flashmoe_core::loader::{open_model, LoadOptions};

/// The exact path's bound, as in `golden.rs`.
const EXACT_TOL: f32 = 1e-3;
/// The whole prompt in one call (int8 products of its 40+ tokens' dense matrices): measured
/// 1.70 (logits up to ~3 in magnitude; 2.70 while the bias term took the exact `Σx`, see
/// `int8.rs`). tiny-a has hidden size 128, random weights and 2 groups per row, which its 8
/// layers amplify; `int8_accuracy.rs` measures the error against what rounding costs. 2x margin.
const INT8_PROMPT_TOL: f32 = 3.5;
/// The first decode step after an int8 prompt: measured 0.61 (1.47 with the exact `Σx`);
/// 2x margin.
const INT8_FIRST_STEP_TOL: f32 = 1.2;
/// All 24 decode steps: measured 1.47 by the last (2.91 with the exact `Σx`). Each step's error
/// feeds the KV cache and the GatedDeltaNet state, so it grows with the number of steps; 2x
/// margin.
const INT8_DECODE_TOL: f32 = 3.0;

#[test]
fn tiny_a_mlx_4bit_int8_activations() {
    let Some(shared) = shared_dir() else { return };
    let gdir = shared.join("golden").join("tiny-a");
    let g = Golden::load(&gdir);
    let model = open_model(&gdir.join("mlx-4bit"), &LoadOptions::default()).expect("load model");
    let ids = g.ids("mlx4_input_ids");
    let (shape, want) = &g.f32s["mlx4_logits"];
    let vocab = shape[1];
    let p = g.prompt_len("mlx4");
    let (_, dec) = &g.f32s["mlx4_decode_logits"];
    let n = dec.len() / vocab;
    // (one prompt, prefill `p` + one token at a time, its first decode step, all decode steps).
    // The decode steps run `matvec`; the prompt runs `matmul`; the switch applies to both.
    let run = |aq: ActQuant| {
        set_act_quant(aq);
        let full = logits(&model, &ids, ids.len());
        let stepped = logits(&model, &ids, p);
        set_act_quant(ActQuant::Exact);
        let first = max_abs(
            &stepped[p * vocab..(p + 1) * vocab],
            &want[p * vocab..(p + 1) * vocab],
        );
        let dec_err = max_abs(&stepped[(p - 1) * vocab..(p - 1 + n) * vocab], dec);
        [
            max_abs(&full, want),
            max_abs(&stepped, want),
            first,
            dec_err,
        ]
    };
    assert_eq!(act_quant(), ActQuant::Exact, "the default");
    let exact = run(ActQuant::Exact);
    let int8 = run(ActQuant::Int8);
    eprintln!("tiny-a/mlx-4bit max abs logit error (prompt, stepped, first step, decode):");
    let fmt = |v: [f32; 4]| v.map(|e| format!("{e:.2e}")).join(" ");
    eprintln!("  exact {}", fmt(exact));
    eprintln!("  int8  {}", fmt(int8));
    for e in exact {
        assert!(e < EXACT_TOL, "exact path: logits off by {exact:?}");
    }
    assert!(int8[0] < INT8_PROMPT_TOL, "int8: the prompt {int8:?}");
    assert!(
        int8[0] > 10.0 * exact[0],
        "the prompt's products ran exact: {int8:?} vs {exact:?}"
    );
    assert!(int8[2] < INT8_FIRST_STEP_TOL, "int8: first step {int8:?}");
    assert!(
        int8[1] < INT8_DECODE_TOL && int8[3] < INT8_DECODE_TOL,
        "int8: {int8:?}"
    );
    // The int8 path did run: it cannot match the exact one to float rounding.
    assert!(
        int8[3] > 10.0 * exact[3],
        "int8 changed nothing: {int8:?} vs {exact:?}"
    );
    // Back to exact: the same figures as before.
    assert_eq!(run(ActQuant::Exact), exact, "the switch left state behind");
}
