//! Structured output on `flashmoe serve` over raw HTTP, with the random tiny model: OpenAI's
//! `response_format` (JSON Schema, JSON mode), the `grammar` extension, tool calls forced by
//! `tool_choice` (strict and `"strict": false`), and Ollama's `format`.
mod serve_util;

use serde_json::{json, Value};
use serve_util::*;

fn chat(seed: u64, max_tokens: u64) -> Value {
    json!({
        "messages": [{"role": "user", "content": "Describe a point."}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": seed,
        "chat_template_kwargs": {"enable_thinking": false}
    })
}

fn point_schema() -> Value {
    json!({"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -50, "maximum": 50},
        "label": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["dot", "cross"]}
    }, "required": ["x", "label", "kind"], "additionalProperties": false})
}

fn check_point(v: &Value) {
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    assert_eq!(o.len(), 3, "{v}");
    assert!(
        v["x"].as_i64().is_some_and(|x| (-50..=50).contains(&x)),
        "{v}"
    );
    assert!(
        v["label"].as_str().is_some_and(|l| l.chars().count() <= 6),
        "{v}"
    );
    assert!(v["kind"] == "dot" || v["kind"] == "cross", "{v}");
}

#[test]
fn response_format_grammar_and_forced_tools() {
    let Some(dir) = model_dir("serve-structured") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    for seed in 0..6 {
        let mut b = chat(seed, 120);
        b["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "point", "schema": point_schema(), "strict": true}});
        let r = srv.post("/v1/chat/completions", &b);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let content = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
        check_point(&serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content:?}")));
    }

    let mut b = chat(1, 30);
    b["grammar"] = json!(r#"start: "yes" | "no" | "n/a""#);
    let v = srv.post("/v1/chat/completions", &b).json();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
    assert!(["yes", "no", "n/a"].contains(&content), "{v}");

    // A grammar that does not compile: 400 before the model runs.
    let mut b = chat(1, 4);
    b["grammar"] = json!("start: missing_rule");
    let r = srv.post("/v1/chat/completions", &b);
    assert_eq!(r.status, 400, "{}", r.body);

    let tool = |strict: bool| {
        json!({"type": "function", "function": {"name": "plot", "strict": strict,
            "parameters": point_schema()}})
    };
    for (seed, strict) in [(0, true), (1, true), (2, false)] {
        let mut b = chat(seed, 200);
        b["tools"] = json!([tool(strict)]);
        b["tool_choice"] = json!({"type": "function", "function": {"name": "plot"}});
        let r = srv.post("/v1/chat/completions", &b);
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let calls = &v["choices"][0]["message"]["tool_calls"];
        if !strict {
            // Only the call's shape is held: a random model's free parameter text may run to
            // max_tokens, leaving the call open (then shown as text).
            let content = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
            let parsed = calls[0]["function"]["arguments"].as_str().is_some();
            assert!(
                parsed || content.starts_with("<tool_call>\n<function=plot>\n<parameter="),
                "{v}"
            );
            continue;
        }
        let args = calls[0]["function"]["arguments"].as_str().unwrap_or("");
        let args: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{e}: {v}"));
        // The test tokenizer spells most text a byte a token: 200 leave room for the call.
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        assert_eq!(calls.as_array().map(Vec::len), Some(1), "{v}");
        check_point(&args);
    }

    // Ollama's `format`: a schema, with thinking off.
    let b = json!({"model": "tiny-a", "stream": false, "think": false,
        "messages": [{"role": "user", "content": "A point?"}],
        "format": point_schema(), "options": {"seed": 4, "temperature": 1.0, "num_predict": 120}});
    let r = srv.post("/api/chat", &b);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    let content = v["message"]["content"].as_str().unwrap_or("");
    check_point(&serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {v}")));
}
