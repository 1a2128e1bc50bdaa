//! The conformance harness (`flashmoe_core::backend::conformance`) on every backend core
//! builds: each op of the CPU backend against the reference twin. Another backend adds one
//! line like `cpu_conforms` (docs/backends.md).
use flashmoe_core::backend::conformance::{self, Bounds};
use flashmoe_core::backend::{Cpu, Reference};

#[test]
fn cpu_conforms() {
    let r = conformance::run(&Cpu);
    println!("{}", r.summary());
    r.assert_ok();
}

/// The slot-batch op of expert residency on the CPU's host slots, through the tier.
#[test]
fn cpu_slots_conform() {
    let r = conformance::run_slots(&Cpu);
    println!("{}", r.summary());
    assert!(r
        .checks
        .iter()
        .any(|c| c.class.contains("resident routing")));
    assert!(r.checks.iter().any(|c| c.class.contains("evicting")));
    r.assert_ok();
}

/// The reference against itself: zero error everywhere (the harness compares like with like).
#[test]
fn reference_agrees_with_itself() {
    let r = conformance::run(&Reference);
    assert!(r.failures.is_empty(), "{:?}", r.failures);
    assert!(r.checks.iter().all(|c| c.nmse == 0.0));
}

/// The harness can fail, and says which op: with every bound at zero, the CPU's f32 rounding
/// against the f64 twin shows up as failures naming the ops.
#[test]
fn harness_names_the_op_that_disagrees() {
    let zero = Bounds {
        exact: 0.0,
        f32_ops: 0.0,
        seq_ops: 0.0,
        mat_f32: 0.0,
        mat_half: 0.0,
        mat_affine: 0.0,
    };
    let mut r = conformance::run_with(&Cpu, zero);
    r.failures
        .extend(conformance::run_slots_with(&Cpu, zero).failures);
    for op in [
        "matmul [",
        "rmsnorm [",
        "attention [",
        "gdn_chunked [",
        "moe_experts [",
        "slot_experts [",
    ] {
        assert!(
            r.failures.iter().any(|f| f.starts_with(op)),
            "no failure for {op} in {:#?}",
            r.failures
        );
    }
}
