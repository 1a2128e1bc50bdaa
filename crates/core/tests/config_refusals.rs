//! Config fields the engine does not implement are refused with a message naming the field,
//! never ignored; the ones it does implement (here `norm_topk_prob`) change the result.
mod common;

use std::path::Path;

use common::{max_abs, shared_dir};
use flashmoe_core::config::{Arch, ModelConfig};
use flashmoe_core::loader::{open_model, LoadOptions};
use flashmoe_core::model::{ForwardStats, Logits, Model, State};
use serde_json::{json, Value};

/// A flat qwen3_moe config (the tiny-qwen3moe-a fixture's numbers).
fn qwen3_moe() -> Value {
    json!({
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 800, "hidden_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "attention_bias": false, "use_sliding_window": false, "sliding_window": null,
        "num_local_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "intermediate_size": 256, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": true, "tie_word_embeddings": false,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}
    })
}

/// A flat qwen3_next config (the tiny-next-a fixture's numbers).
fn qwen3_next() -> Value {
    json!({
        "model_type": "qwen3_next", "vocab_size": 900, "hidden_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "hidden_act": "silu", "attention_bias": false,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 32, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_value_head_dim": 32,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64, "intermediate_size": 256, "norm_topk_prob": true,
        "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 1e7, "rope_type": "default"}
    })
}

/// A nested qwen3_5_moe config (text_config), as the Qwen3.5 releases ship.
fn qwen3_5_moe() -> Value {
    let mut t = qwen3_next();
    t["model_type"] = "qwen3_5_moe_text".into();
    json!({"model_type": "qwen3_5_moe", "text_config": t})
}

fn parse(v: &Value) -> Result<ModelConfig, String> {
    ModelConfig::from_json(v, Path::new("test/config.json")).map_err(|e| e.to_string())
}

/// `edit` applied to every family's config must be refused with all of `words` in the message.
fn refused(edit: impl Fn(&mut Value), words: &[&str]) {
    for (name, mut v) in [
        ("qwen3_moe", qwen3_moe()),
        ("qwen3_next", qwen3_next()),
        ("qwen3_5_moe", qwen3_5_moe()),
    ] {
        parse(&v).unwrap_or_else(|e| panic!("{name}: the base config must parse: {e}"));
        // Text fields of a nested config live in text_config.
        if v.get("text_config").is_some() {
            edit(&mut v["text_config"]);
        } else {
            edit(&mut v);
        }
        match parse(&v) {
            Ok(_) => panic!("{name}: accepted a config it cannot run: {v}"),
            Err(e) => {
                for w in words {
                    assert!(e.contains(w), "{name}: error {e:?} does not name {w:?}");
                }
                assert!(
                    e.contains("test/config.json"),
                    "{name}: error names no file: {e}"
                );
            }
        }
    }
}

#[test]
fn rope_scaling_types_are_refused() {
    for ty in ["yarn", "linear", "dynamic", "longrope", "llama3"] {
        // transformers v5: `rope_parameters.rope_type`.
        refused(
            |v| {
                v["rope_parameters"]["rope_type"] = ty.into();
                v["rope_parameters"]["factor"] = 4.0.into();
            },
            &[ty],
        );
        // Legacy `rope_scaling` ({"type": ...} or {"rope_type": ...}).
        refused(
            |v| v["rope_scaling"] = json!({"type": ty, "factor": 4.0}),
            &[ty],
        );
        refused(
            |v| v["rope_scaling"] = json!({"rope_type": ty, "factor": 4.0}),
            &[ty],
        );
    }
    // Unscaled RoPE spelled out is fine; so is a null rope_scaling.
    let mut v = qwen3_moe();
    v["rope_scaling"] = Value::Null;
    parse(&v).expect("null rope_scaling");
    v["rope_scaling"] = json!({"rope_type": "default"});
    parse(&v).expect("default rope_scaling");
}

#[test]
fn sliding_window_attention_bias_and_activation_are_refused() {
    refused(
        |v| {
            v["use_sliding_window"] = true.into();
            v["sliding_window"] = 4096.into();
        },
        &["use_sliding_window"],
    );
    refused(|v| v["attention_bias"] = true.into(), &["attention_bias"]);
    for act in ["gelu", "gelu_pytorch_tanh", "relu"] {
        refused(|v| v["hidden_act"] = act.into(), &["hidden_act", act]);
    }
    // A sliding window that is configured but switched off is what HF ignores too.
    let mut v = qwen3_moe();
    v["sliding_window"] = 4096.into();
    parse(&v).expect("use_sliding_window=false ignores sliding_window");
}

#[test]
fn fields_of_the_wrong_type_are_refused_not_defaulted() {
    // Each of these used to be read as its default (rms_norm_eps 1e-6, rope_theta 10000, the
    // kv heads equal to the heads, ...), so the model ran with values the file does not hold.
    for (field, value) in [
        ("rms_norm_eps", json!("1e-5")),
        ("rope_theta", json!("1000000")),
        ("partial_rotary_factor", json!("0.5")),
        ("num_key_value_heads", json!(2.5)),
        ("head_dim", json!("32")),
        ("max_position_embeddings", json!(-1)),
        ("decoder_sparse_step", json!("1")),
        ("tie_word_embeddings", json!("false")),
        ("attention_bias", json!(0)),
    ] {
        refused(
            |v| {
                if let Some(rp) = v.get_mut("rope_parameters") {
                    rp.as_object_mut().unwrap().remove(field);
                }
                v[field] = value.clone();
            },
            &[field],
        );
    }
    refused(|v| v["head_dim"] = 0.into(), &["head_dim"]);
    // null stands for "not set" in transformers' configs and keeps the default.
    let mut v = qwen3_moe();
    v["rms_norm_eps"] = Value::Null;
    v["head_dim"] = Value::Null;
    assert_eq!(parse(&v).expect("nulls are defaults").head_dim, 32);
}

fn with_quant(q: Value) -> Result<ModelConfig, String> {
    let mut v = qwen3_next();
    v["quantization"] = q.clone();
    v["quantization_config"] = q;
    parse(&v)
}

#[test]
fn quantization_other_than_affine_2_4_8_is_refused() {
    for mode in ["mxfp4", "nvfp4", "mxfp8"] {
        let e = with_quant(json!({"group_size": 32, "bits": 4, "mode": mode})).unwrap_err();
        assert!(e.contains(mode) && e.contains("affine"), "{e}");
        // ... also when only one module's override names it.
        let e = with_quant(json!({"group_size": 64, "bits": 4,
            "model.layers.0.mlp.gate": {"group_size": 32, "bits": 4, "mode": mode}}))
        .unwrap_err();
        assert!(e.contains(mode), "{e}");
    }
    for bits in [3u32, 5, 6] {
        let e = with_quant(json!({"group_size": 64, "bits": bits})).unwrap_err();
        assert!(
            e.contains(&format!("bits {bits}")) && e.contains("not implemented"),
            "{e}"
        );
        let e = with_quant(json!({"group_size": 64, "bits": 4,
            "model.layers.0.mlp.switch_mlp.down_proj": {"group_size": 64, "bits": bits}}))
        .unwrap_err();
        assert!(e.contains(&format!("bits {bits}")), "{e}");
    }
    let e = with_quant(json!({"group_size": 16, "bits": 4})).unwrap_err();
    assert!(e.contains("group_size 16"), "{e}");
    // Hugging Face quantization methods are not MLX affine blocks.
    for m in ["fp8", "gptq", "awq", "bitsandbytes", "compressed-tensors"] {
        let mut v = qwen3_next();
        v["quantization_config"] = json!({"quant_method": m, "bits": 4, "group_size": 128});
        let e = parse(&v).unwrap_err();
        assert!(e.contains("quant_method") && e.contains(m), "{e}");
    }
    // What the engine does implement parses, with the overrides kept.
    for bits in [2u32, 4, 8] {
        let c = with_quant(json!({"group_size": 64, "bits": bits, "mode": "affine",
            "model.layers.0.mlp.gate": {"group_size": 64, "bits": 8}}))
        .expect("affine");
        let q = c.quantization.expect("quantization");
        assert_eq!(q.default.map(|d| d.bits), Some(bits));
        assert_eq!(
            q.overrides["model.layers.0.mlp.gate"].map(|d| d.bits),
            Some(8)
        );
    }
    // Older mlx-lm omits `mode`: affine.
    with_quant(json!({"group_size": 64, "bits": 4})).expect("no mode");
}

#[test]
fn norm_topk_prob_is_read_with_transformers_defaults() {
    let get = |v: Value| parse(&v).expect("parse").norm_topk_prob;
    let mut m = qwen3_moe();
    assert!(get(m.clone()));
    m["norm_topk_prob"] = false.into();
    assert!(!get(m.clone()));
    // Absent: Qwen3MoeConfig's default is False, Qwen3NextConfig's True.
    m.as_object_mut().unwrap().remove("norm_topk_prob");
    assert!(!get(m));
    let mut n = qwen3_next();
    n["norm_topk_prob"] = false.into();
    assert!(!get(n.clone()));
    n.as_object_mut().unwrap().remove("norm_topk_prob");
    assert!(get(n));
    // Qwen3.5 always renormalises (no such flag in its code).
    let c = parse(&qwen3_5_moe()).expect("parse");
    assert_eq!(c.arch, Arch::Qwen35Moe);
    assert!(c.norm_topk_prob);
}

fn logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut st = State::new(&model.cfg);
    model
        .forward(
            ids,
            &mut st,
            Logits::All,
            &mut ForwardStats::default(),
            None,
        )
        .expect("forward")
}

/// The tiny Qwen3-MoE fixture with `norm_topk_prob` set to `norm`, in a temp dir.
fn qwen3moe_with_norm(src: &Path, norm: bool) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("config-norm-topk-{norm}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["norm_topk_prob"] = norm.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn qwen3_moe_norm_topk_prob_false_is_honoured() {
    let Some(shared) = shared_dir() else { return };
    let src = shared.join("golden/tiny-qwen3moe-a/hf-bf16");
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 37 + 5) % 800).collect();
    let load = |norm: bool, k: Option<usize>| {
        let o = LoadOptions {
            top_k: k,
            ..Default::default()
        };
        open_model(&qwen3moe_with_norm(&src, norm), &o).expect("load")
    };
    // Top-2 of 8: raw softmax weights (summing to < 1) give another result than renormalised.
    let (on, off) = (load(true, None), load(false, None));
    assert!(on.cfg.norm_topk_prob && !off.cfg.norm_topk_prob);
    let d = max_abs(&logits(&on, &ids), &logits(&off, &ids));
    eprintln!("norm_topk_prob true vs false at k=2: max abs diff {d:.3}");
    assert!(d > 1e-3, "norm_topk_prob=false ignored ({d})");
    // With every expert routed the softmax weights already sum to 1: no difference.
    let e = on.cfg.num_experts;
    let d = max_abs(
        &logits(&load(true, Some(e)), &ids),
        &logits(&load(false, Some(e)), &ids),
    );
    eprintln!("norm_topk_prob true vs false at k=E: max abs diff {d:.2e}");
    assert!(d < 1e-4, "k=E must not depend on renormalisation ({d})");
}
