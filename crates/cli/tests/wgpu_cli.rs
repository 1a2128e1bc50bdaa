//! `--backend wgpu` through the binary: `flashmoe devices` lists the adapter, `logits` on
//! wgpu matches the golden logits (one prompt and stepped), `generate` gives the CPU's ids,
//! `run`, `chat` and `serve` answer from the adapter, `auto` never picks a software
//! adapter, and `FLASHMOE_WGPU_FAST` picks the product kernels. On a machine with no adapter
//! the tests say they were skipped; under CI=true (lavapipe installed by .ci/run) that is a
//! failure.
mod common;
mod serve_util;

use std::io::Write;
use std::process::Stdio;

use common::*;

/// Whether `flashmoe devices` lists a wgpu adapter.
fn have_adapter() -> bool {
    let out = run_ok(bin().arg("devices"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if text.contains("wgpu adapters") {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and no wgpu adapter (.ci/run installs lavapipe):\n{text}"
    );
    eprintln!("skipped: no wgpu adapter:\n{text}");
    false
}

fn golden(shared: &std::path::Path, name: &str) -> Vec<u8> {
    let bytes = std::fs::read(shared.join("golden/tiny-a/golden.safetensors")).expect("golden");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden parse");
    st.tensor(name).expect("tensor").data().to_vec()
}

#[test]
fn logits_on_wgpu_match_golden() {
    let Some(shared) = shared_dir() else { return };
    if !have_adapter() {
        return;
    }
    let ids: Vec<String> = golden(&shared, "input_ids")
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()).to_string())
        .collect();
    let want: Vec<f32> = golden(&shared, "logits")
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let tmp = temp_dir("wgpu_cli");
    for prefill in [None, Some(30)] {
        let out = tmp.join(format!("{prefill:?}.safetensors"));
        let mut cmd = bin();
        cmd.args(["logits", "--backend", "wgpu", "--model"])
            .arg(shared.join("golden/tiny-a/hf-bf16"))
            .args(["--ids", &ids.join(",")])
            .arg("--out")
            .arg(&out);
        if let Some(p) = prefill {
            cmd.args(["--prefill", &p.to_string()]);
        }
        let o = run_ok(&mut cmd);
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("wgpu: "),
            "the adapter is named on stderr"
        );
        let (shape, got) = read_logits(&out);
        assert_eq!(shape, vec![ids.len(), 1000]);
        let err = flashmoe_testdata::max_abs(&got, &want);
        assert!(err < 1e-3, "prefill {prefill:?}: max abs err {err}");
    }
}

#[test]
fn generate_on_wgpu_gives_the_cpu_ids_and_auto_skips_software() {
    let Some(shared) = shared_dir() else { return };
    if !have_adapter() {
        return;
    }
    let model = shared.join("golden/tiny-a/mlx-4bit");
    let gen = |backend: &str| {
        let o = run_ok(
            bin()
                .args(["generate", "--backend", backend, "--model"])
                .arg(&model)
                .args(["--ids", "1,2,3,4,5", "--tokens", "8"]),
        );
        (
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (cpu, _) = gen("cpu");
    let (wgpu, _) = gen("wgpu");
    assert_eq!(wgpu, cpu, "greedy ids on wgpu and on the CPU");
    let out = run_ok(bin().arg("devices"));
    if String::from_utf8_lossy(&out.stdout).contains("software: never chosen") {
        let (_, err) = gen("auto");
        assert!(
            !err.contains("backend: wgpu"),
            "auto chose a software adapter:\n{err}"
        );
    }
}

/// `FLASHMOE_WGPU_FAST` (the product kernels' A/B switch) runs the named configuration: the
/// one-token decode form without loop bounding gives the CPU's greedy ids on the 4-bit
/// model, as does every kernel with naga's loop bounding forced (`FLASHMOE_WGPU_LEAN=0`; lean is the default); a word that
/// names no configuration is refused with it quoted.
#[test]
fn fast_products_named_by_the_environment() {
    let Some(shared) = shared_dir() else { return };
    if !have_adapter() {
        return;
    }
    let model = shared.join("golden/tiny-a/mlx-4bit");
    let gen = |backend: &str, fast: &str| {
        let mut cmd = bin();
        cmd.env("FLASHMOE_WGPU_FAST", fast)
            .args(["generate", "--backend", backend, "--model"])
            .arg(&model)
            .args(["--ids", "1,2,3,4,5", "--tokens", "8"]);
        cmd
    };
    let cpu = run_ok(&mut gen("cpu", ""));
    let fast = run_ok(&mut gen("wgpu", "r2_lg32_wg128_wg_d2_lean"));
    assert_eq!(
        String::from_utf8_lossy(&fast.stdout).trim(),
        String::from_utf8_lossy(&cpu.stdout).trim(),
        "greedy ids through the decode form and on the CPU"
    );
    let bounded = run_ok(gen("wgpu", "").env("FLASHMOE_WGPU_LEAN", "0"));
    assert_eq!(
        String::from_utf8_lossy(&bounded.stdout).trim(),
        String::from_utf8_lossy(&cpu.stdout).trim(),
        "greedy ids with every kernel's loop bounding forced (lean is the default) and on the CPU"
    );
    let err = run_err(&mut gen("wgpu", "r3_fast"));
    assert!(err.contains("FLASHMOE_WGPU_FAST=r3_fast"), "{err}");
}

#[test]
fn a_missing_adapter_index_is_a_clear_error() {
    let Some(shared) = shared_dir() else { return };
    if !have_adapter() {
        return;
    }
    let err = run_err(
        bin()
            .args([
                "generate",
                "--backend",
                "wgpu",
                "--gpu-adapter",
                "99",
                "--model",
            ])
            .arg(shared.join("golden/tiny-a/hf-bf16"))
            .args(["--ids", "1,2", "--tokens", "1"]),
    );
    assert!(err.contains("adapter 99 requested"), "{err}");
}

#[test]
fn bench_wgpu_reports_the_adapter_limits_beside_kernels_and_decode() {
    let Some(shared) = shared_dir() else { return };
    if !have_adapter() {
        return;
    }
    let o = run_ok(
        bin()
            .args([
                "bench",
                "decode",
                "--backend",
                "wgpu",
                "--json",
                "--tokens",
                "2",
            ])
            .arg("--model")
            .arg(shared.join("golden/tiny-a/mlx-4bit")),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("bench JSON");
    let w = &v["wgpu"];
    for key in ["device_copy_gbps", "upload_gbps"] {
        assert!(w[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {w}");
    }
    let k = &w["kernels"][0];
    assert!(k["weight_gbps"].as_f64().is_some_and(|x| x > 0.0), "{k}");
    assert!(
        k["vs_copy_traffic"].as_f64().is_some_and(|x| x > 0.0),
        "{k}"
    );
    let d = &w["decode"];
    assert!(d["ms_per_token"].as_f64().is_some_and(|x| x > 0.0), "{d}");
    assert!(d["expert_upload_bound_ms"].as_f64().is_some(), "{d}");
    assert!(
        d["time_over_bound_ratio"].as_f64().is_some_and(|x| x > 0.0),
        "{d}"
    );
    // The resident decode: every expert of the tiny model preloaded into device slots, so
    // no token fills a slot and the layers read no routing back.
    let r = &w["decode_resident"];
    assert!(r["ms_per_token"].as_f64().is_some_and(|x| x > 0.0), "{r}");
    assert_eq!(r["all_preloaded"], true, "{r}");
    assert_eq!(r["slot_fills_per_token"].as_f64(), Some(0.0), "{r}");
    // The resident decode runs the default (every kernel lean), restored after the product
    // candidates were timed with each one's own loop bounding.
    assert_eq!(r["lean_kernels"], true, "{r}");
    // The same decode with every kernel's loop bounding toggled (the A/B of `lean`).
    let l = &r["lean_kernels_toggled"];
    assert!(l["ms_per_token"].as_f64().is_some_and(|x| x > 0.0), "{l}");
    assert_eq!(
        l["lean_kernels"].as_bool(),
        r["lean_kernels"].as_bool().map(|b| !b),
        "{r}"
    );
    assert!(
        r["resident_layer_calls_per_token"]
            .as_f64()
            .is_some_and(|x| x > 0.0),
        "resident layers look their routing up on the device: {r}"
    );
    // One resident token timed on the device: per kernel where the adapter has timestamp
    // queries (lavapipe has), else the reason, and the table on stderr either way.
    let t = &r["kernel_trace"];
    match t["timestamps"].as_str() {
        Some("on") => {
            let k = t["kernels"].as_array().expect("kernels");
            assert!(!k.is_empty(), "{t}");
            assert!(t["sum_us"].as_f64().is_some_and(|x| x > 0.0), "{t}");
            assert!(t["wall_us"].as_f64().is_some_and(|x| x > 0.0), "{t}");
        }
        other => assert!(other.is_some_and(|s| s.contains("TIMESTAMP")), "{t}"),
    }
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("kernel") && err.contains("launches") && err.contains("device span"),
        "{err}"
    );
}

/// The text commands on wgpu over the tiny test model with a tokenizer: `run --prompt` and
/// `chat` (piped) name the adapter and answer, `serve --backend wgpu` answers a chat
/// completion.
#[test]
fn run_chat_and_serve_on_wgpu() {
    if shared_dir().is_none() || !have_adapter() {
        return;
    }
    let Some(dir) = serve_util::model_dir("wgpu-text") else {
        return;
    };
    let o = run_ok(
        bin()
            .args(["run", "--backend", "wgpu", "--model"])
            .arg(&dir)
            .args([
                "--prompt",
                "hello there",
                "--no-think",
                "--tokens",
                "4",
                "--temperature",
                "0",
            ]),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("wgpu: "), "run names the adapter: {err}");
    assert!(!o.stdout.is_empty(), "run printed nothing");

    let data = temp_dir("wgpu-chat-data");
    let mut child = bin()
        .args(["chat", "--backend", "wgpu", "--model"])
        .arg(&dir)
        .args(["--no-think", "--max-tokens", "4", "--temperature", "0"])
        .env("FLASHMOE_DATA_DIR", &data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"hello\n/exit\n")
        .expect("write chat input");
    let o = child.wait_with_output().expect("wait chat");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "chat failed:\n{out}\n{err}");
    assert!(err.contains("wgpu: "), "chat names the adapter: {err}");

    let srv = serve_util::Server::start(&dir, &["--backend", "wgpu"]);
    let r = srv.post(
        "/v1/chat/completions",
        &serde_json::json!({
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
            "chat_template_kwargs": {"enable_thinking": false}
        }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert!(v["choices"][0]["message"].is_object(), "{v}");
    assert!(
        v["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|c| (1..=4).contains(&c)),
        "{v}"
    );
}
