//! CLI contract of `logits` and `generate`, and clear errors on bad input.
mod common;

use common::*;

fn golden_ids(shared: &std::path::Path) -> Vec<i64> {
    let bytes = std::fs::read(shared.join("golden/tiny-a/golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("input_ids").unwrap();
    t.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn logits_cli_matches_golden_with_and_without_prefill() {
    let Some(shared) = shared_dir() else { return };
    let ids = golden_ids(&shared);
    let ids_s: Vec<String> = ids.iter().map(|x| x.to_string()).collect();
    let bytes = std::fs::read(shared.join("golden/tiny-a/golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want: Vec<f32> = st
        .tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let tmp = temp_dir("logits_cli");
    // The prompt in one step, in steps of 7 tokens (--prefill-chunk), then stepped after 40.
    for (variant, prefill, step) in [
        ("hf-bf16", None, None),
        ("hf-bf16", None, Some(7)),
        ("hf-bf16-fused", Some(40), None),
    ] {
        let out = tmp.join(format!("{variant}-{step:?}.safetensors"));
        let mut cmd = bin();
        cmd.args(["logits", "--model"])
            .arg(shared.join("golden/tiny-a").join(variant))
            .args(["--ids", &ids_s.join(",")])
            .arg("--out")
            .arg(&out);
        if let Some(p) = prefill {
            cmd.args(["--prefill", &p.to_string()]);
        }
        if let Some(c) = step {
            cmd.args(["--prefill-chunk", &c.to_string()]);
        }
        run_ok(&mut cmd);
        let (shape, got) = read_logits(&out);
        assert_eq!(shape, vec![ids.len(), 1000]);
        let err = flashmoe_testdata::max_abs(&got, &want);
        assert!(err < 1e-3, "{variant} steps {step:?}: max abs err {err}");
    }
}

#[test]
fn generate_prints_greedy_ids() {
    let Some(shared) = shared_dir() else { return };
    let ids = golden_ids(&shared);
    let prompt: Vec<String> = ids[..40].iter().map(|x| x.to_string()).collect();
    let out = run_ok(
        bin()
            .args(["generate", "--model"])
            .arg(shared.join("golden/tiny-a/hf-bf16"))
            .args(["--ids", &prompt.join(","), "--tokens", "8"]),
    );
    let got = String::from_utf8(out.stdout).unwrap();
    let want: Vec<String> = ids[40..48].iter().map(|x| x.to_string()).collect();
    assert_eq!(got.trim(), want.join(","));
    // The same prompt prefilled in steps of 16 tokens.
    let out = run_ok(
        bin()
            .args(["generate", "--model"])
            .arg(shared.join("golden/tiny-a/hf-bf16"))
            .args([
                "--ids",
                &prompt.join(","),
                "--tokens",
                "8",
                "--prefill-chunk",
                "16",
            ]),
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        want.join(",")
    );
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let Some(shared) = shared_dir() else { return };
    let model = shared.join("golden/tiny-a/hf-bf16");
    let tmp = temp_dir("bad_inputs");
    let out = tmp.join("x.safetensors");
    // id outside the vocabulary
    let err = run_err(
        bin()
            .args(["logits", "--model"])
            .arg(&model)
            .args(["--ids", "1,5000"])
            .arg("--out")
            .arg(&out),
    );
    assert!(err.contains("5000") && err.contains("vocabulary"), "{err}");
    // not a number
    let err = run_err(
        bin()
            .args(["generate", "--model"])
            .arg(&model)
            .args(["--ids", "1,x"]),
    );
    assert!(err.contains("`x`"), "{err}");
    // missing directory
    let err = run_err(bin().args(["generate", "--model", "/nonexistent/model", "--ids", "1"]));
    assert!(
        err.contains("/nonexistent/model") && err.contains("model directory not found"),
        "{err}"
    );
    // More tokens than the context holds: refused before any work (it used to compute every
    // token that fit, then fail and print none of them).
    // Ids are printed as they are generated, so an empty stdout shows that none was (a
    // deterministic check where a time bound would fail on a slow machine).
    for cmd in ["generate", "run"] {
        let out = bin()
            .args([cmd, "--ids", "1,2,3", "--tokens", "100000", "--model"])
            .arg(&model)
            .output()
            .expect("spawn flashmoe");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && !err.contains("panicked"), "{err}");
        assert!(
            err.contains("--tokens 100000") && err.contains("4096"),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "{cmd} computed before refusing");
    }
    // An I/O error's reason is said once, not repeated by the error chain.
    let err = run_err(
        bin()
            .args(["logits", "--ids", "1", "--model"])
            .arg(&model)
            .args(["--out", "/nonexistent/dir/x.safetensors"]),
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");

    // truncated weights file
    let bad = tmp.join("truncated");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(model.join("config.json"), bad.join("config.json")).unwrap();
    let full = std::fs::read(model.join("model.safetensors")).unwrap();
    write(&bad.join("model.safetensors"), &full[..full.len() / 2]);
    let err = run_err(
        bin()
            .args(["generate", "--model"])
            .arg(&bad)
            .args(["--ids", "1"]),
    );
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    // unknown model_type
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap();
    write(
        &bad.join("config.json"),
        cfg.replace("qwen3_5_moe", "llama_moe"),
    );
    std::fs::copy(
        model.join("model.safetensors"),
        bad.join("model.safetensors"),
    )
    .unwrap();
    let err = run_err(
        bin()
            .args(["generate", "--model"])
            .arg(&bad)
            .args(["--ids", "1"]),
    );
    assert!(
        err.contains("model_type") && err.contains("llama_moe"),
        "{err}"
    );

    // unsupported rope scaling is refused, not ignored
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["text_config"]["rope_parameters"]["rope_type"] = "yarn".into();
    write(&bad.join("config.json"), serde_json::to_vec(&v).unwrap());
    let err = run_err(
        bin()
            .args(["generate", "--model"])
            .arg(&bad)
            .args(["--ids", "1"]),
    );
    assert!(err.contains("yarn"), "{err}");

    // wrong shape
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["text_config"]["moe_intermediate_size"] = 32.into();
    write(&bad.join("config.json"), serde_json::to_vec(&v).unwrap());
    let err = run_err(
        bin()
            .args(["generate", "--model"])
            .arg(&bad)
            .args(["--ids", "1"]),
    );
    assert!(err.contains("expected") && err.contains("experts"), "{err}");
}

#[test]
fn demo_runs_without_any_download() {
    let out = run_ok(bin().args(["demo", "--tokens", "8"]));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("tok/s") && s.contains("experts read"), "{s}");
}

/// The CLI decodes with int8 activations by default and exactly with `--exact` (or
/// `FLASHMOE_EXACT=1`, which the other tests set): on the 4-bit golden model the default's
/// stepped logits differ from the exact ones, `--int8-activations` is the default, and asking
/// for both is refused.
#[test]
fn logits_default_to_exact_activations_and_int8_is_named() {
    let Some(shared) = shared_dir() else { return };
    let model = shared.join("golden/tiny-a/mlx-4bit");
    let tmp = temp_dir("act_default");
    let logits = |name: &str, mut cmd: std::process::Command, extra: &[&str]| {
        let out = tmp.join(format!("{name}.safetensors"));
        run_ok(
            cmd.args([
                "logits",
                "--ids",
                "1,2,3,4,5,6,7,8",
                "--prefill",
                "1",
                "--model",
            ])
            .arg(&model)
            .args(extra)
            .arg("--out")
            .arg(&out),
        );
        read_logits(&out).1
    };
    let default = logits("default", bin_defaults(), &[]);
    let named = logits("named", bin_defaults(), &["--int8-activations"]);
    let exact = logits("exact", bin_defaults(), &["--exact"]);
    let env = logits("env", bin(), &[]);
    // `logits` is the command outputs are checked with: exact unless int8 is named.
    assert_eq!(default, exact, "logits defaults to exact activations");
    assert_eq!(exact, env, "FLASHMOE_EXACT=1 is --exact");
    let diff = flashmoe_testdata::max_abs(&named, &exact);
    // Measured 0.28 on the first decode step of this model (tests/int8_activations.rs in core).
    assert!(diff > 1e-3 && diff < 6.0, "int8 vs exact: {diff}");
    let err = run_err(
        bin_defaults()
            .args([
                "logits",
                "--ids",
                "1",
                "--exact",
                "--int8-activations",
                "--model",
            ])
            .arg(&model)
            .arg("--out")
            .arg(tmp.join("both.safetensors")),
    );
    assert!(
        err.contains("--exact") && err.contains("--int8-activations"),
        "{err}"
    );
}
