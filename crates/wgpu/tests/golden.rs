//! Every golden fixture (each checkpoint layout and family; one prompt, step by step, and
//! every layer's hidden state) through the golden body every backend shares
//! (`flashmoe_testdata::golden`) on the wgpu backend.
mod device;

use flashmoe_testdata::golden::{check_on_with, FIXTURES, TOL};
use flashmoe_wgpu::{Fast, Form};

fn fixture(i: usize) {
    let Some(be) = device::backend() else { return };
    fixture_on(be, i);
}

fn fixture_on(be: flashmoe_wgpu::Wgpu, i: usize) {
    fixture_within(be, i, TOL);
}

/// [`fixture_on`] with logits within `tol` (hidden states in proportion).
fn fixture_within(be: flashmoe_wgpu::Wgpu, i: usize, tol: f32) {
    let Some(shared) = flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR")) else {
        return;
    };
    let (fixture, variant, prefix, section) = FIXTURES[i];
    check_on_with(be, tol, &shared, fixture, variant, prefix, section);
}

#[test]
fn tiny_a_hf_bf16() {
    fixture(0);
}

#[test]
fn tiny_a_hf_bf16_fused() {
    fixture(1);
}

#[test]
fn tiny_a_mlx_4bit() {
    fixture(2);
}

/// The 4-bit checkpoint (fixture 2) through the fast products in the adapter's own
/// configuration changed by `change`; "skipped" where the adapter has none.
fn mlx_4bit_fast(change: impl Fn(Fast) -> Fast) {
    mlx_4bit_fast_within(change, TOL);
}

/// [`mlx_4bit_fast`] with logits within `tol`.
fn mlx_4bit_fast_within(change: impl Fn(Fast) -> Fast, tol: f32) {
    let Some(probe) = device::backend() else {
        return;
    };
    let fast = probe.default_fast();
    drop(probe);
    let Some(fast) = fast else {
        eprintln!("skipped: no workgroup of 32 threads on this adapter");
        return;
    };
    let Some(be) = device::backend_with(None, Some(change(fast))) else {
        return;
    };
    fixture_within(be, 2, tol);
}

/// The 4-bit checkpoint through the fast products as a GPU runs them (lavapipe's default is
/// one thread per row): the adapter's own configuration, subgroup operations included where
/// it has them.
#[test]
fn tiny_a_mlx_4bit_fast_products() {
    mlx_4bit_fast(|f| f);
}

/// The same through the one-token decode form of the fast products, lean (no forced loop
/// bounding), in the adapter's lanes and reduction.
#[test]
fn tiny_a_mlx_4bit_decode_form() {
    mlx_4bit_fast(|f| Fast {
        form: Form::Decode { span: 2 },
        lean: true,
        ..f
    });
}

/// Logits bound of the f16 decode form, far above the suite's: f16 rounds each product at
/// ~5e-4 relative rms (tests/products.rs). Measured on lavapipe (Mesa 22.3.6): the prompt's
/// logits within 1.35e-2 (its routed experts run one token per job, in f16), prompt and decode
/// steps within 0.33 (the steps run every product in f16; attention's cache and the linear
/// attention's state carry the errors on, and the error grows by jumps of ~0.1, as a routing
/// choice flipped by them would make; the f32 twin stays within 1e-4 at every step). The
/// logits reach 2.9 and a NaN fails (`max_abs`), so this catches a form that breaks, not one
/// that is slightly off: tests/products.rs bounds the arithmetic itself.
const HALF_TOL: f32 = 1.0;

/// The same through the f16 decode form (`fast_half.wgsl`), lean, where the device has f16 in
/// shaders (lavapipe does: under CI=true its absence fails), within [`HALF_TOL`].
#[test]
fn tiny_a_mlx_4bit_half_form() {
    let Some(probe) = device::backend() else {
        return;
    };
    if !device::f16_or_skip(probe) {
        return;
    }
    mlx_4bit_fast_within(
        |f| Fast {
            form: Form::Half { span: 2 },
            lean: true,
            ..f
        },
        HALF_TOL,
    );
}

#[test]
fn tiny_next_a() {
    fixture(3);
}

#[test]
fn tiny_qwen3moe_a() {
    fixture(4);
}

#[test]
fn every_fixture_has_a_test() {
    assert_eq!(FIXTURES.len(), 5, "add a test above for the new fixture");
}
