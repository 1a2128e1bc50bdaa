//! CLI contract on the Qwen3-Next and Qwen3-MoE fixtures: `logits` (one prompt and with
//! `--prefill`) against transformers' logits, `generate` and `run --ids` reproduce the golden
//! greedy continuation, `--k 1` changes the result, `pack` (4 and 16 bits) then `run`, and the
//! text front end (`run --prompt`, chat template + tokenizer) on each family.
mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const FIXTURES: [&str; 2] = ["tiny-next-a", "tiny-qwen3moe-a"];

struct Golden {
    ids: Vec<u32>,
    logits: Vec<f32>,
    vocab: usize,
    prompt_len: usize,
    eos: u32,
}

fn golden(dir: &Path) -> Golden {
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    let t = st.tensor("logits").unwrap();
    let logits = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hf-bf16/config.json")).unwrap())
            .unwrap();
    Golden {
        ids,
        logits,
        vocab: t.shape()[1],
        prompt_len: meta["bf16"]["prompt_len"].as_u64().unwrap() as usize,
        eos: cfg["eos_token_id"].as_u64().unwrap() as u32,
    }
}

fn csv(ids: &[u32]) -> String {
    ids.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `flashmoe logits` on `model` with extra args; the logits written.
fn cli_logits(model: &Path, ids: &[u32], extra: &[&str], out: &Path) -> Vec<f32> {
    run_ok(
        bin()
            .args(["logits", "--model"])
            .arg(model)
            .args(["--ids", &csv(ids)])
            .args(extra)
            .arg("--out")
            .arg(out),
    );
    read_logits(out).1
}

fn stdout_ids(out: std::process::Output) -> Vec<u32> {
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .split(',')
        .map(|s| s.parse().expect("an id"))
        .collect()
}

#[test]
fn logits_generate_run_and_k_on_next_and_qwen3_moe() {
    let Some(shared) = shared_dir() else { return };
    for fixture in FIXTURES {
        let gdir = shared.join("golden").join(fixture);
        let model = gdir.join("hf-bf16");
        let g = golden(&gdir);
        let tmp = temp_dir(&format!("families-cli-{fixture}"));

        let got = cli_logits(&model, &g.ids, &[], &tmp.join("all.safetensors"));
        let (shape, _) = read_logits(&tmp.join("all.safetensors"));
        assert_eq!(shape, vec![g.ids.len(), g.vocab]);
        let err = max_abs(&got, &g.logits);
        eprintln!("{fixture}: flashmoe logits vs golden max abs {err:.2e}");
        assert!(err < 1e-3, "{fixture}: logits {err}");
        let p = g.prompt_len.to_string();
        let got = cli_logits(
            &model,
            &g.ids,
            &["--prefill", &p],
            &tmp.join("prefill.safetensors"),
        );
        let err = max_abs(&got, &g.logits);
        eprintln!("{fixture}: flashmoe logits --prefill {p} vs golden max abs {err:.2e}");
        assert!(err < 1e-3, "{fixture}: logits --prefill {err}");

        // Greedy continuation: the golden ids after the prompt are transformers' greedy picks.
        let prompt = &g.ids[..g.prompt_len];
        let want = &g.ids[g.prompt_len..g.prompt_len + 8];
        let out = run_ok(bin().args(["generate", "--model"]).arg(&model).args([
            "--ids",
            &csv(prompt),
            "--tokens",
            "8",
        ]));
        assert_eq!(stdout_ids(out), want, "{fixture}: generate");
        let out = run_ok(bin().args(["run", "--model"]).arg(&model).args([
            "--ids",
            &csv(prompt),
            "--tokens",
            "8",
            "--timing",
        ]));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        let ran = stdout_ids(out);
        // `run` stops at the model's end-of-sequence id.
        let n = want.iter().position(|&x| x == g.eos).map_or(8, |i| i + 1);
        assert_eq!(ran, &want[..n], "{fixture}: run --ids");
        assert!(
            err.contains("layer"),
            "{fixture}: --timing table missing: {err}"
        );

        // --k 1 runs and changes the logits; an impossible k is refused.
        let k1 = cli_logits(
            &model,
            &g.ids[..12],
            &["--k", "1"],
            &tmp.join("k1.safetensors"),
        );
        let k0 = cli_logits(&model, &g.ids[..12], &[], &tmp.join("k0.safetensors"));
        assert!(k1.iter().all(|v| v.is_finite()));
        let d = max_abs(&k1, &k0);
        eprintln!("{fixture}: --k 1 vs default max abs diff {d:.3}");
        assert!(d > 1e-3, "{fixture}: --k 1 changed nothing");
        let e = run_err(
            bin()
                .args(["generate", "--k", "99", "--model"])
                .arg(&model)
                .args(["--ids", "1,2"]),
        );
        assert!(e.contains("--k 99"), "{fixture}: {e}");

        // pack at 16 bits reproduces the golden continuation; at 4 bits it runs with --k 1.
        for (bits, k) in [("16", None), ("4", Some("1"))] {
            let dst = tmp.join(format!("packed-{bits}"));
            run_ok(
                bin()
                    .args(["pack", "--bits", bits, "--from"])
                    .arg(&model)
                    .arg("--out")
                    .arg(&dst),
            );
            let mut cmd = bin();
            cmd.args(["run", "--model"])
                .arg(&dst)
                .args(["--ids", &csv(prompt), "--tokens", "8"]);
            if let Some(k) = k {
                cmd.args(["--k", k]);
            }
            let ran = stdout_ids(run_ok(&mut cmd));
            assert!(!ran.is_empty() && ran.len() <= 8);
            assert!(ran.iter().all(|&x| (x as usize) < g.vocab));
            if bits == "16" {
                assert_eq!(ran, &want[..n], "{fixture}: packed --bits 16 run");
            }
        }
    }
}

/// A runnable text model: the fixture, the Qwen3.5 chat template and the runtime's test
/// tokenizer cut to the model's vocabulary (its ids 0..vocab, merges in id order).
fn text_model(shared: &Path, fixture: &str, out: &Path) -> PathBuf {
    let src = shared.join("golden").join(fixture).join("hf-bf16");
    std::fs::create_dir_all(out).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let tok = shared.join("tokenizer/qwen3.5");
    for f in ["chat_template.jinja", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), out.join(f)).unwrap();
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let vocab = cfg["vocab_size"].as_u64().unwrap();
    let mut t: Value =
        serde_json::from_str(&flashmoe_runtime::testutil::test_tokenizer_json()).unwrap();
    let model = t["model"].as_object_mut().unwrap();
    model["vocab"]
        .as_object_mut()
        .unwrap()
        .retain(|_, id| id.as_u64().unwrap() < vocab);
    let first_merge = flashmoe_runtime::testutil::SPECIAL_TOKENS
        .iter()
        .map(|s| s.1 as u64 + 1)
        .max()
        .unwrap();
    model["merges"]
        .as_array_mut()
        .unwrap()
        .truncate((vocab - first_merge) as usize);
    write(&out.join("tokenizer.json"), t.to_string());
    out.to_path_buf()
}

#[test]
fn text_front_end_runs_on_next_and_qwen3_moe() {
    let Some(shared) = shared_dir() else { return };
    for fixture in FIXTURES {
        let tmp = temp_dir(&format!("families-text-{fixture}"));
        let dir = text_model(&shared, fixture, &tmp.join("model"));
        let packed = tmp.join("packed");
        run_ok(
            bin()
                .args(["pack", "--bits", "4", "--from"])
                .arg(&dir)
                .arg("--out")
                .arg(&packed),
        );
        assert!(
            packed.join("tokenizer.json").exists(),
            "pack must carry the tokenizer"
        );
        for m in [&dir, &packed] {
            let out = run_ok(bin().args(["run", "--model"]).arg(m).args([
                "--prompt",
                "hello there, what is new",
                "--no-think",
                "--tokens",
                "12",
                "--temperature",
                "0",
                "--timing",
            ]));
            let err = String::from_utf8_lossy(&out.stderr);
            eprintln!(
                "{fixture} {}: run --prompt -> {:?}",
                m.display(),
                String::from_utf8_lossy(&out.stdout)
            );
            assert!(
                err.contains("prompt") && err.contains("generated"),
                "{fixture}: no timing report: {err}"
            );
        }
        // The rendered prompt's ids are all in the model's vocabulary (the tokenizer fits it).
        let req = tmp.join("req.json");
        write(
            &req,
            r#"{"messages": [{"role": "user", "content": "hello there"}]}"#,
        );
        let out = run_ok(
            bin()
                .args(["render", "--tokenizer"])
                .arg(&dir)
                .arg("--request")
                .arg(&req),
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("hello there"));
    }
}
