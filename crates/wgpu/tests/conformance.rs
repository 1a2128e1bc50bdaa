//! The conformance harness (every primitive and fused op against the reference) on a wgpu
//! adapter: lavapipe on CI, a real GPU where there is one. Without any adapter the test says
//! it was skipped, except under CI=true, where .ci/run installs lavapipe and a missing
//! adapter is a failure.
mod device;

use flashmoe_wgpu::{Fast, Form, Products};

/// Every product kernel on this adapter, whichever it would choose by default (lavapipe's is
/// one thread per row, a GPU's the fast kernels): one thread and one workgroup per row, the
/// fast kernels summing through workgroup memory at two widths and rows per lane group, and
/// through subgroup operations where the adapter has them (lavapipe does), each also with its
/// one-token products in the decode form (`fast_dec.wgsl`) at one and two chunks per step, and
/// lean (no forced loop bounding) in both forms.
#[test]
fn wgpu_conforms() {
    let Some(probe) = device::backend() else {
        return;
    };
    let wg = device::fast_wg;
    let (plain, d1, d2) = (
        Form::Plain,
        Form::Decode { span: 1 },
        Form::Decode { span: 2 },
    );
    let mut variants: Vec<(Option<bool>, Option<Fast>)> = vec![
        (Some(true), None),
        (Some(false), None),
        (None, Some(wg(32, 128, 2, plain))),
        (None, Some(wg(16, 64, 4, plain))),
        (None, Some(wg(64, 256, 1, plain))),
        (None, Some(wg(32, 128, 2, d2))),
        (None, Some(wg(16, 64, 4, d1))),
        (None, Some(wg(64, 256, 1, d2))),
        (
            None,
            Some(Fast {
                lean: true,
                ..wg(32, 128, 2, d2)
            }),
        ),
    ];
    match probe.default_fast() {
        Some(f) if f.subgroup => {
            for (r, form, lean) in [
                (1, plain, false),
                (2, plain, false),
                (4, plain, false),
                (1, d2, false),
                (2, d1, false),
                (4, d2, false),
                (2, plain, true),
                (2, d2, true),
                (8, d1, true),
            ] {
                variants.push((None, Some(Fast { r, form, lean, ..f })));
            }
        }
        _ => eprintln!("no subgroup operations at a fixed size here: those variants not run"),
    }
    if std::env::var("CI").as_deref() == Ok("true") && probe.adapter().software {
        // lavapipe has subgroups: a CI run that lost them would leave the kernel GPUs run
        // untested.
        assert!(
            probe.default_fast().is_some_and(|f| f.subgroup),
            "CI=true: the software adapter has no subgroup operations"
        );
    }
    drop(probe);
    for (rows, fast) in variants {
        let Some(be) = device::backend_with(rows, fast) else {
            return;
        };
        eprintln!("product kernels: {:?}", be.products());
        if let Some(f) = fast {
            assert_eq!(be.products(), Products::Fast(f));
        }
        let r = flashmoe_core::backend::conformance::run(&be);
        println!("{}", r.summary());
        r.assert_ok();
    }
    // Every kernel without forced loop bounding (`set_lean_kernels`), the adapter's products.
    let Some(be) = device::backend() else {
        return;
    };
    be.set_lean_kernels(true).expect("lean kernels");
    let r = flashmoe_core::backend::conformance::run(&be);
    println!("lean kernels: {}", r.summary());
    r.assert_ok();
    // Submissions of 3 commands: the parameter arena fills and is replaced mid-op, copies and
    // dispatches interleave across submissions.
    let Some(be) = device::backend() else {
        return;
    };
    be.set_submit_batch(3).expect("batch");
    let r = flashmoe_core::backend::conformance::run(&be);
    println!("submissions of 3: {}", r.summary());
    r.assert_ok();
}

/// `alloc` gives zeros also when it reuses a dropped buffer of the same size (`pool.rs`).
#[test]
fn a_reused_buffer_is_zeroed() {
    use flashmoe_core::backend::Backend;
    let Some(be) = device::backend() else {
        return;
    };
    let n = 1000;
    let mut a = be.alloc(n).expect("alloc");
    let ones = be.upload(&vec![1.0f32; n]).expect("upload");
    be.add(&mut a, &ones).expect("add");
    assert_eq!(be.download(&a).expect("read"), vec![1.0f32; n]);
    drop(a);
    let b = be.alloc(n).expect("alloc again");
    assert_eq!(be.download(&b).expect("read"), vec![0.0f32; n]);
}
