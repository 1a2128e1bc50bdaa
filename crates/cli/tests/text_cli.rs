//! CLI contract of `tokenize` and `render` against the Qwen3.5 reference cases.
mod common;

use common::*;
use serde_json::{json, Value};

/// The Qwen3.5 tokenizer dir and one of its reference case files, or None (skipped).
fn reference_cases(file: &str) -> Option<(std::path::PathBuf, Value)> {
    let tdir = shared_dir()?.join("tokenizer/qwen3.5");
    let text = std::fs::read_to_string(tdir.join(file)).expect("reference cases");
    Some((
        tdir,
        serde_json::from_str(&text).expect("reference cases JSON"),
    ))
}

#[test]
fn tokenize_matches_reference_cases() {
    let Some((tdir, cases)) = reference_cases("tokenizer_cases.json") else {
        return;
    };
    let tmp = temp_dir("tokenize_cases");
    for (i, c) in cases.as_array().unwrap().iter().enumerate() {
        let f = tmp.join(format!("case{i}.txt"));
        write(&f, c["text"].as_str().unwrap());
        let out = run_ok(
            bin()
                .args(["tokenize", "--tokenizer"])
                .arg(&tdir)
                .arg("--text-file")
                .arg(&f),
        );
        let got: Value = serde_json::from_slice(&out.stdout).expect("JSON array");
        assert_eq!(got, c["ids"], "case {i}: {:?}", c["text"]);
    }
}

#[test]
fn render_matches_reference_cases() {
    let Some((tdir, cases)) = reference_cases("chat_cases.json") else {
        return;
    };
    let tmp = temp_dir("render_cases");
    for c in cases.as_array().unwrap() {
        let mut req = json!({ "messages": c["messages"] });
        if let Some(t) = c.get("tools") {
            req["tools"] = t.clone();
        }
        if let Some(g) = c.get("add_generation_prompt") {
            req["add_generation_prompt"] = g.clone();
        }
        if let Some(e) = c.get("enable_thinking") {
            req["chat_template_kwargs"] = json!({ "enable_thinking": e });
        }
        let f = tmp.join(format!("{}.json", c["name"].as_str().unwrap()));
        write(&f, serde_json::to_vec(&req).unwrap());
        let out = run_ok(
            bin()
                .args(["render", "--tokenizer"])
                .arg(&tdir)
                .arg("--request")
                .arg(&f),
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            c["rendered"].as_str().unwrap(),
            "case {}",
            c["name"]
        );
    }
}

#[test]
fn bad_text_input_gives_clear_errors() {
    let Some(shared) = shared_dir() else { return };
    let tdir = shared.join("tokenizer/qwen3.5");
    let tmp = temp_dir("text_bad");
    let f = tmp.join("bad.txt");
    write(&f, [b'o', b'k', 0xff, 0xfe]);
    let err = run_err(
        bin()
            .args(["tokenize", "--tokenizer"])
            .arg(&tdir)
            .arg("--text-file")
            .arg(&f),
    );
    assert!(err.contains("UTF-8") && err.contains("bad.txt"), "{err}");

    let r = tmp.join("req.json");
    write(&r, "{\"messages\": [");
    let err = run_err(
        bin()
            .args(["render", "--tokenizer"])
            .arg(&tdir)
            .arg("--request")
            .arg(&r),
    );
    assert!(err.contains("invalid JSON"), "{err}");

    // The Qwen3.5 template raises when there is no user query.
    write(&r, r#"{"messages": [{"role": "system", "content": "x"}]}"#);
    let err = run_err(
        bin()
            .args(["render", "--tokenizer"])
            .arg(&tdir)
            .arg("--request")
            .arg(&r),
    );
    assert!(!err.is_empty(), "{err}");
}

#[test]
fn sampling_flags_out_of_range_are_refused() {
    // NaN or negative temperatures, a zero repetition penalty and the like used to reach the
    // sampler, which then emitted arbitrary tokens (or nothing) and exited 0. Flags are parsed
    // before the model is opened, so no model is needed to see the refusal.
    let tmp = temp_dir("sampling_flags");
    let model = tmp.join("no-model-here");
    for cmd in [&["run", "--prompt", "x"][..], &["chat"]] {
        for (flag, value) in [
            ("--temperature", "nan"),
            ("--temperature", "-1"),
            ("--temperature", "inf"),
            ("--top-p", "1.5"),
            ("--top-p", "-0.1"),
            ("--min-p", "2"),
            ("--repetition-penalty", "0"),
            ("--repetition-penalty", "-1"),
            ("--presence-penalty", "nan"),
            ("--frequency-penalty", "inf"),
        ] {
            let err = run_err(bin().args(cmd).args([flag, value, "--model"]).arg(&model));
            assert!(
                err.contains(flag)
                    && (err.contains("out of range") || err.contains("not a number")),
                "{cmd:?} {flag} {value}: {err}"
            );
        }
        // In-range values, negative penalties included, get past the flags to the model.
        let err = run_err(
            bin()
                .args(cmd)
                .args(["--temperature", "0.7", "--top-p", "0.9"])
                .args(["--presence-penalty", "-0.5", "--repetition-penalty", "1.1"])
                .arg("--model")
                .arg(&model),
        );
        assert!(err.contains("no-model-here"), "{cmd:?}: {err}");
    }
}
