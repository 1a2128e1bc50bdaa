//! Every golden fixture (each checkpoint layout and family; one prompt, step by step, and
//! every layer's hidden state) through the golden body every backend shares
//! (`flashmoe_testdata::golden`) on the wgpu backend.
mod device;

use flashmoe_testdata::golden::{check_on, FIXTURES};
use flashmoe_wgpu::{Fast, Form};

fn fixture(i: usize) {
    let Some(be) = device::backend() else { return };
    fixture_on(be, i);
}

fn fixture_on(be: flashmoe_wgpu::Wgpu, i: usize) {
    let Some(shared) = flashmoe_testdata::shared_dir(env!("CARGO_MANIFEST_DIR")) else {
        return;
    };
    let (fixture, variant, prefix, section) = FIXTURES[i];
    check_on(be, &shared, fixture, variant, prefix, section);
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
    fixture_on(be, 2);
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
