//! `pack`'s dense-matrix defaults (issue 20): from a bf16 checkpoint the dense matrices follow
//! the expert bits, with router, shared-expert gate and head at 8 bits and norms untouched;
//! `dense_bits: Some(16)` and 16-bit experts keep bf16. Accuracy against the bf16 golden logits
//! is printed as a figure (random tiny models amplify quantization noise; not asserted).
mod common;

use std::path::PathBuf;

use common::{shared_dir, Golden};
use flashmoe_core::loader::{open_model, LoadOptions};
use flashmoe_core::packed::{pack, Manifest, NoProgress, PackOptions};
use flashmoe_core::store::DType;

fn pack_tiny(name: &str, bits: u32, dense_bits: Option<u32>) -> Option<(PathBuf, Manifest)> {
    let src = shared_dir()?.join("golden/tiny-a/hf-bf16");
    let dst = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("pack-defaults-{name}"));
    let _ = std::fs::remove_dir_all(&dst);
    let opts = PackOptions {
        bits: Some(bits),
        dense_bits,
        ..Default::default()
    };
    pack(&src, &dst, &opts, &NoProgress).expect("pack");
    let man = Manifest::read(&dst).expect("manifest");
    Some((dst, man))
}

/// Bits of each dense tensor named `name` (None: not quantized), panicking when absent.
fn bits_of(man: &Manifest, name: &str) -> Option<u32> {
    let t = man.dense.tensors.iter().find(|t| t.name == name);
    t.unwrap_or_else(|| panic!("no dense tensor {name}"))
        .quant
        .map(|q| q.bits)
}

#[test]
fn bf16_source_gets_dense_at_expert_bits_with_8_bit_router_gate_and_head() {
    let Some((dst, man)) = pack_tiny("default", 4, None) else {
        return;
    };
    assert_eq!(man.source["dense_bits"], 4, "{}", man.source);
    for (name, want) in [
        ("layers.3.self_attn.q_proj.weight", Some(4)),
        ("layers.3.self_attn.o_proj.weight", Some(4)),
        ("layers.0.linear_attn.in_proj_qkv.weight", Some(4)),
        ("layers.0.mlp.shared_expert.down_proj.weight", Some(4)),
        ("embed_tokens.weight", Some(4)),
        ("layers.0.mlp.gate.weight", Some(8)),
        ("layers.0.mlp.shared_expert_gate.weight", Some(8)),
        ("lm_head.weight", Some(8)),
        ("layers.0.input_layernorm.weight", None),
        ("norm.weight", None),
    ] {
        assert_eq!(bits_of(&man, name), want, "{name}");
    }
    // Norms and small vectors stay floats.
    for t in &man.dense.tensors {
        if t.shape.len() == 1 {
            assert!(t.quant.is_none(), "{} was quantized", t.name);
        }
    }
    let shared = shared_dir().expect("shared");
    let g = Golden::load(&shared.join("golden/tiny-a"));
    let ids = g.ids("input_ids");
    let m = open_model(&dst, &LoadOptions::default()).expect("load");
    let l = common::logits(&m, &ids, ids.len());
    assert!(l.iter().all(|v| v.is_finite()));
    let (shape, want) = &g.f32s["logits"];
    let (mut top1, rows) = (0usize, want.len() / shape[1]);
    for (a, b) in l.chunks(shape[1]).zip(want.chunks(shape[1])) {
        let arg = |v: &[f32]| (0..v.len()).max_by(|&i, &j| v[i].total_cmp(&v[j]));
        top1 += usize::from(arg(a) == arg(b));
    }
    eprintln!(
        "FIGURE tiny-a pack defaults (4-bit experts and dense) vs bf16 golden: top-1 {top1}/{rows}"
    );
}

#[test]
fn explicit_4_bit_dense_keeps_the_head_at_8_bits() {
    let Some((_, man)) = pack_tiny("d4", 4, Some(4)) else {
        return;
    };
    assert_eq!(bits_of(&man, "lm_head.weight"), Some(8));
    assert_eq!(bits_of(&man, "layers.3.self_attn.q_proj.weight"), Some(4));
}

#[test]
fn dense_bits_16_and_16_bit_experts_keep_dense_bf16() {
    for (name, bits, dense) in [("d16", 4, Some(16)), ("b16", 16, None)] {
        let Some((_, man)) = pack_tiny(name, bits, dense) else {
            return;
        };
        for t in &man.dense.tensors {
            assert!(t.quant.is_none(), "{name}: {} was quantized", t.name);
        }
        let q = man
            .dense
            .tensors
            .iter()
            .find(|t| t.name == "layers.3.self_attn.q_proj.weight")
            .expect("q_proj");
        assert_eq!(q.dtype, DType::BF16, "{name}");
    }
}
