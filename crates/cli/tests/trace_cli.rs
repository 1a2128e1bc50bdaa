//! Routing traces end to end on the tiny golden model: `generate --trace-routing` records,
//! then `trace stats`, `trace simulate`, `trace predict` and `bench decode --replay-trace` run
//! on the file and agree with each other and with what was generated (tokens, phases, hits of
//! the replayed cache equal the simulation's for every policy and size). A cut tail is used up
//! to the cut and reported; a damaged byte is an error naming the file and offset.
mod common;

use std::path::{Path, PathBuf};

use common::{bin, run_err, run_ok, shared_dir, temp_dir};
use serde_json::Value;

const PROMPT: &str = "1,2,3,4,5,6,7,8,9,10";
const NEW: usize = 40;

fn json(out: std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn record(model: &Path, trace: &Path, hidden: bool) -> Vec<u8> {
    let mut cmd = bin();
    cmd.args(["generate", "--backend", "cpu", "--ids", PROMPT])
        .args(["--tokens", &NEW.to_string()])
        .arg("--model")
        .arg(model)
        .arg("--trace-routing")
        .arg(trace);
    if hidden {
        cmd.arg("--trace-hidden");
    }
    run_ok(&mut cmd).stdout
}

fn setup(name: &str) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let shared = shared_dir()?;
    let model = shared.join("golden/tiny-a/hf-bf16");
    let dir = temp_dir(name);
    let trace = dir.join("routing.trace");
    Some((model, dir, trace))
}

#[test]
fn record_then_stats_simulate_predict_and_replay_agree() {
    let Some((model, dir, trace)) = setup("trace-e2e") else {
        return;
    };
    let traced = record(&model, &trace, true);
    // Recording does not change what is generated.
    let plain = run_ok(
        bin()
            .args(["generate", "--backend", "cpu", "--ids", PROMPT])
            .args(["--tokens", &NEW.to_string()])
            .arg("--model")
            .arg(&model),
    );
    assert_eq!(traced, plain.stdout);
    let n_prompt = PROMPT.split(',').count();
    // generate feeds the prompt, then NEW - 1 single-token steps.
    let tokens = n_prompt + NEW - 1;

    let stats = json(run_ok(
        bin()
            .args(["trace", "stats", "--json"])
            .arg(&trace)
            .arg("--plot")
            .arg(dir.join("plots")),
    ));
    assert_eq!(stats["tokens"], tokens);
    assert_eq!(stats["prefill_tokens"], n_prompt);
    assert_eq!(stats["decode_tokens"], NEW - 1);
    assert_eq!(stats["k"], 4);
    let layers = stats["per_layer"].as_array().unwrap();
    assert_eq!(layers.len(), 8);
    for l in layers {
        let routings: u64 = l["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .sum();
        assert_eq!(
            routings,
            (tokens * 4) as u64,
            "every token routes to K experts"
        );
        let share = l["top10pct_share"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&share));
    }
    for f in stats["plots"].as_array().unwrap() {
        let png = std::fs::read(f.as_str().unwrap()).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }

    let sizes = "0.0005,0.002,0.004";
    let sim = json(run_ok(
        bin()
            .args([
                "trace",
                "simulate",
                "--json",
                "--cache-gb",
                sizes,
                "--bw",
                "ram=10,disk=1",
            ])
            .arg(&trace)
            .args(["--tiers", "vram=0.001,pinned=0.002"]),
    ));
    assert_eq!(sim["tokens"], tokens);
    for size in sim["sizes"].as_array().unwrap() {
        let gb = size["cache_gb"].as_f64().unwrap();
        let rows = size["policies"].as_array().unwrap();
        let belady = rows.iter().find(|r| r["policy"] == "belady").unwrap()["hits"]
            .as_u64()
            .unwrap();
        for r in rows.iter().filter(|r| r["policy"] != "belady") {
            let policy = r["policy"].as_str().unwrap();
            let hits = r["hits"].as_u64().unwrap();
            assert!(hits <= belady, "{policy} beat Belady at {gb} GB");
            let rep = json(run_ok(
                bin()
                    .args(["bench", "decode", "--json", "--cache-policy", policy])
                    .arg("--model")
                    .arg(&model)
                    .arg("--replay-trace")
                    .arg(&trace)
                    .args(["--expert-cache-gb", &gb.to_string()]),
            ));
            let c = &rep["decode_replay"]["cache"];
            assert_eq!(
                c["hits"].as_u64().unwrap(),
                hits,
                "{policy} at {gb} GB: replay vs simulation"
            );
            assert_eq!(c["misses"], r["misses"], "{policy} at {gb} GB");
            assert_eq!(rep["decode_replay"]["tokens"], tokens);
        }
    }
    assert!(sim["hierarchy"]["policies"].as_array().unwrap().len() == 6);
    // Time per token from a bench report's bandwidths: cached bytes at memory bandwidth,
    // missed bytes at disk bandwidth.
    let bench = dir.join("bench.json");
    std::fs::write(
        &bench,
        r#"{"machine": {"mem_read_bw_gbs": 8.0, "disk_read_bw_gbs": 0.5}}"#,
    )
    .unwrap();
    let sim = json(run_ok(
        bin()
            .args(["trace", "simulate", "--json", "--cache-gb", "0.002"])
            .arg(&trace)
            .arg("--bench")
            .arg(&bench),
    ));
    for r in sim["sizes"][0]["policies"].as_array().unwrap() {
        let (c, d) = (
            r["cached_bytes_per_token"].as_f64().unwrap(),
            r["disk_bytes_per_token"].as_f64().unwrap(),
        );
        let want = c / 8.0 / 1e6 + d / 0.5 / 1e6;
        let got = r["ms_per_token"].as_f64().unwrap();
        assert!((got - want).abs() <= 2e-3 * want, "{got} vs {want}");
    }

    let pred = json(run_ok(
        bin()
            .args(["trace", "predict", "--json"])
            .arg(&trace)
            .arg("--model")
            .arg(&model),
    ));
    for name in ["prev_token", "popularity", "early_router", "probe"] {
        let p = &pred["predictors"][name];
        let (pk, p2k) = (
            p["precision_at_k"].as_f64().unwrap(),
            p["recall_at_2k"].as_f64().unwrap(),
        );
        assert!(
            (0.0..=1.0).contains(&pk) && (0.0..=1.0).contains(&p2k),
            "{name}"
        );
        assert!(
            p2k >= p["recall_at_k"].as_f64().unwrap(),
            "{name}: recall grows with 2K"
        );
    }
    assert!(pred["prefetch_next"]["pays"].is_boolean());
}

#[test]
fn appends_continue_and_cut_or_damaged_files_are_reported() {
    let Some((model, _dir, trace)) = setup("trace-faults") else {
        return;
    };
    record(&model, &trace, false);
    let one = std::fs::metadata(&trace).unwrap().len();
    record(&model, &trace, false);
    let stats = json(run_ok(bin().args(["trace", "stats", "--json"]).arg(&trace)));
    let tokens = PROMPT.split(',').count() + NEW - 1;
    assert_eq!(
        stats["tokens"],
        2 * tokens,
        "the second run appended under new request ids"
    );
    assert_eq!(stats["requests"], 2);
    // Another model (K 2) refuses to append.
    let e = run_err(
        bin()
            .args([
                "generate",
                "--backend",
                "cpu",
                "--ids",
                "1,2",
                "--tokens",
                "2",
                "--k",
                "2",
            ])
            .arg("--model")
            .arg(&model)
            .arg("--trace-routing")
            .arg(&trace),
    );
    assert!(
        e.contains("another model") && e.contains(&trace.display().to_string()),
        "{e}"
    );

    // Cut in the middle of the second run's last record: a warning and the rest still used.
    let full = std::fs::read(&trace).unwrap();
    std::fs::write(&trace, &full[..full.len() - 7]).unwrap();
    let out = run_ok(bin().args(["trace", "stats", "--json"]).arg(&trace));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("incomplete") && err.contains("offset"),
        "{err}"
    );
    let t: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        t["tokens"],
        2 * tokens,
        "the last decode step lost only its last layer"
    );

    // A flipped byte in the first run's records: an error naming file and offset.
    let mut bad = full.clone();
    bad[one as usize - 9] ^= 0x40;
    std::fs::write(&trace, &bad).unwrap();
    let e = run_err(
        bin()
            .args(["trace", "simulate", "--cache-gb", "1"])
            .arg(&trace),
    );
    assert!(
        e.contains(&trace.display().to_string()) && e.contains("offset") && e.contains("checksum"),
        "{e}"
    );

    // Replay on a model of another shape is refused.
    std::fs::write(&trace, &full).unwrap();
    let other = shared_dir().unwrap().join("golden/tiny-qwen3moe-a/hf-bf16");
    if other.is_dir() {
        let e = run_err(
            bin()
                .args(["bench", "decode", "--replay-trace"])
                .arg(&trace)
                .arg("--model")
                .arg(&other),
        );
        assert!(e.contains("same shape"), "{e}");
    }
}

/// A GPU backend routes resident layers on the device and never brings the routing back, so
/// `--trace-routing` there is refused by name instead of recording a trace with layers missing
/// (or, as before for wgpu, running on the CPU without saying so).
#[test]
fn trace_routing_on_a_gpu_backend_is_refused() {
    let Some((model, dir, trace)) = setup("trace-gpu") else {
        return;
    };
    for backend in ["wgpu", "cuda"] {
        let e = run_err(
            bin()
                .args([
                    "generate",
                    "--backend",
                    backend,
                    "--ids",
                    "1,2",
                    "--tokens",
                    "2",
                ])
                .arg("--model")
                .arg(&model)
                .arg("--trace-routing")
                .arg(&trace),
        );
        assert!(
            e.contains("--trace-routing") && e.contains("--backend cpu"),
            "{backend}: {e}"
        );
        assert!(!trace.exists(), "{backend}: no trace is written");
    }
    let _ = std::fs::remove_dir_all(dir);
}
