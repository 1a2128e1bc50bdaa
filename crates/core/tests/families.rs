//! Every family (Qwen3.5-MoE, Qwen3-Next, Qwen3-MoE) through the MLX path: tiny checkpoints
//! converted to mlx-lm's layout (tests/common/mlx_convert.rs, checked against the real tiny-a
//! MLX fixture's conventions), the engine on the MLX directory against the engine on an f32
//! Hugging Face directory holding the same dequantized values, one prompt and step by step;
//! and `--k` on each family.
mod common;

use std::path::PathBuf;

use common::mlx_convert::{convert, header, tensor_bytes, Converted, Family};
use common::{logits, max_abs, shared_dir, Golden};
use flashmoe_core::loader::{open_model, LoadOptions};
use flashmoe_core::model::Model;
use flashmoe_core::packed::{pack, NoProgress, PackOptions};
use flashmoe_core::weights::Linear;

const FIXTURES: [&str; 3] = ["tiny-a", "tiny-next-a", "tiny-qwen3moe-a"];

fn tmp(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("families-{name}"))
}

fn load(dir: &std::path::Path, k: Option<usize>) -> Model {
    let o = LoadOptions {
        top_k: k,
        ..Default::default()
    };
    open_model(dir, &o).unwrap_or_else(|e| panic!("load {}: {e}", dir.display()))
}

#[test]
fn converter_matches_the_tiny_a_mlx_fixture_conventions() {
    let Some(shared) = shared_dir() else { return };
    let gdir = shared.join("golden/tiny-a");
    let fixture = gdir.join("mlx-4bit");
    let want = header(&fixture.join("model.safetensors"));
    // Both Hugging Face layouts (per-expert and fused gate_up) convert to the same files.
    for variant in ["hf-bf16", "hf-bf16-fused"] {
        let c = convert(
            &gdir.join(variant),
            &tmp(&format!("fixture-{variant}")),
            4,
            64,
        );
        assert_eq!(c.family, Family::Qwen35Moe);
        let got = header(&c.mlx.join("model.safetensors"));
        let names =
            |h: &std::collections::BTreeMap<String, _>| h.keys().cloned().collect::<Vec<String>>();
        assert_eq!(names(&got), names(&want), "{variant}: tensor names");
        for (k, w) in &want {
            assert_eq!(&got[k], w, "{variant}: {k} dtype/shape");
        }
        // Unquantized tensors hold the same bytes: norms shifted by +1 (rounded to bf16), the
        // conv moved to [C,K,1], A_log / dt_bias / the gated norm untouched.
        let mut same = 0;
        for (k, (dt, _)) in &want {
            if *dt == safetensors::Dtype::U32 || k.ends_with(".scales") || k.ends_with(".biases") {
                continue;
            }
            let a = tensor_bytes(&c.mlx.join("model.safetensors"), k);
            let b = tensor_bytes(&fixture.join("model.safetensors"), k);
            assert!(a == b, "{variant}: {k} differs from the fixture");
            same += 1;
        }
        // The quantization block: same defaults and the same 8-bit overrides.
        let cfg = |d: &std::path::Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
        };
        let (gc, wc) = (cfg(&c.mlx), cfg(&fixture));
        assert_eq!(gc["quantization"], wc["quantization"], "{variant}");
        assert_eq!(gc["quantization_config"], wc["quantization_config"]);
        eprintln!(
            "{variant}: {} tensors as the fixture, {same} unquantized ones byte-identical, {} modules quantized ({} at 8 bits)",
            want.len(),
            c.quantized,
            c.overrides
        );
    }
}

/// Converts a fixture's `hf-bf16` to MLX 4-bit (and its f32 twin) under a test-unique name.
fn converted(fixture: &str, tag: &str) -> Option<(Converted, Golden)> {
    let shared = shared_dir()?;
    let gdir = shared.join("golden").join(fixture);
    let c = convert(
        &gdir.join("hf-bf16"),
        &tmp(&format!("{tag}-{fixture}")),
        4,
        64,
    );
    Some((c, Golden::load(&gdir)))
}

#[test]
fn mlx_checkpoints_agree_with_their_dequantized_weights() {
    for fixture in FIXTURES {
        let Some((c, g)) = converted(fixture, "agree") else {
            return;
        };
        let mlx = load(&c.mlx, None);
        let f32m = load(&c.hf_f32, None);
        assert!(
            matches!(mlx.embed, Linear::Affine { bits: 4, .. }),
            "{fixture}: MLX embedding not read as 4-bit"
        );
        assert!(matches!(f32m.embed, Linear::Dense { .. }));
        let ids = g.ids("input_ids");
        let p = g.prompt_len("bf16");
        let (_, bf16_golden) = &g.f32s["logits"];

        let a = logits(&mlx, &ids, ids.len());
        let b = logits(&f32m, &ids, ids.len());
        let err = max_abs(&a, &b);
        eprintln!("FIGURE {fixture} mlx-4bit vs f32 dequantized, one prompt: max abs {err:.2e}");
        assert!(err < 1e-3, "{fixture}: one prompt {err}");

        let sa = logits(&mlx, &ids, p);
        let sb = logits(&f32m, &ids, p);
        let err = max_abs(&sa, &sb);
        eprintln!(
            "FIGURE {fixture} mlx-4bit vs f32 dequantized, prefill {p} + decode: max abs {err:.2e}"
        );
        assert!(err < 1e-3, "{fixture}: stepped {err}");
        let err = max_abs(&sa, &a);
        assert!(err < 1e-3, "{fixture}: stepped vs one prompt {err}");
        // Not asserted: the 4-bit quantization's own effect on a random tiny model.
        eprintln!(
            "FIGURE {fixture} mlx-4bit vs bf16 golden (quantization error): max abs {:.3}",
            max_abs(&a, bf16_golden)
        );
    }
}

#[test]
fn k1_runs_and_changes_the_result_on_every_family() {
    let Some(shared) = shared_dir() else { return };
    for fixture in FIXTURES {
        let hf = shared.join("golden").join(fixture).join("hf-bf16");
        let Some((c, g)) = converted(fixture, "k1") else {
            return;
        };
        let ids = &g.ids("input_ids")[..12];
        for dir in [hf, c.mlx.clone()] {
            let m1 = load(&dir, Some(1));
            assert_eq!(m1.top_k, 1);
            let full = load(&dir, None);
            let (a, b) = (logits(&m1, ids, 8), logits(&full, ids, 8));
            assert!(
                a.iter().all(|v| v.is_finite()),
                "{fixture}: --k 1 not finite"
            );
            let d = max_abs(&a, &b);
            eprintln!(
                "{fixture} {}: --k 1 vs default k: max abs diff {d:.3}",
                dir.display()
            );
            assert!(d > 1e-3, "{fixture}: --k 1 must change the result ({d})");
            let e = m1.cfg.num_experts;
            assert!(
                open_model(
                    &dir,
                    &LoadOptions {
                        top_k: Some(e + 1),
                        ..Default::default()
                    }
                )
                .is_err(),
                "{fixture}: --k above the expert count must be refused"
            );
        }
    }
}

/// Other MLX quantizations of every family: 8-bit g64 and 2-bit g32 agree with their
/// dequantized weights and repack without a byte changed; at g128 the tiny experts' down_proj
/// (64 inputs) stays bf16 beside 4-bit gate/up, as mlx-lm leaves it: that mixed checkpoint
/// runs unpacked, and `pack` refuses it with a clear error.
#[test]
fn other_mlx_bits_and_groups_run_and_repack() {
    let Some(shared) = shared_dir() else { return };
    for fixture in FIXTURES {
        let gdir = shared.join("golden").join(fixture);
        let g = Golden::load(&gdir);
        let ids = g.ids("input_ids");
        for (bits, group) in [(8u32, 64usize), (2, 32), (4, 128)] {
            let name = format!("q-{fixture}-{bits}-g{group}");
            let c = convert(&gdir.join("hf-bf16"), &tmp(&name), bits, group);
            let mlx = load(&c.mlx, None);
            let a = logits(&mlx, &ids, ids.len());
            let err = max_abs(&a, &logits(&load(&c.hf_f32, None), &ids, ids.len()));
            eprintln!(
                "FIGURE {fixture} mlx {bits}-bit g{group} ({} modules quantized) vs f32 dequantized: max abs {err:.2e}",
                c.quantized
            );
            assert!(err < 1e-3, "{fixture} {bits}-bit g{group}: {err}");
            let dst = tmp(&format!("{name}-packed"));
            let _ = std::fs::remove_dir_all(&dst);
            let r = pack(&c.mlx, &dst, &PackOptions::default(), &NoProgress);
            if group == 128 {
                let e = match r {
                    Err(e) => e.to_string(),
                    Ok(_) => panic!("mixed-format experts must be refused"),
                };
                assert!(e.contains("group size 128"), "{e}");
                continue;
            }
            let r = r.expect("pack");
            assert_eq!((r.expert_bits, r.group_size), (bits, group));
            let p = logits(&load(&dst, None), &ids, ids.len());
            assert_eq!(
                max_abs(&p, &a),
                0.0,
                "{fixture} {bits}-bit: repack changed the result"
            );
        }
    }
}
