//! Ollama's `POST /api/chat` and `POST /api/generate` on `flashmoe serve`, over raw HTTP:
//! NDJSON streaming (the default) and whole answers agree, options map to sampling, tool turns
//! translate, `raw` prompts skip the template, and errors come in Ollama's `{"error": "..."}`
//! shape.
mod serve_util;

use serde_json::{json, Value};
use serve_util::*;

fn body(stream: Option<bool>) -> Value {
    let mut b = json!({
        "model": "tiny-a",
        "messages": [{"role": "user", "content": "hello there"}],
        "options": {"num_predict": 6, "temperature": 0, "top_k": 1, "seed": 3},
    });
    if let Some(s) = stream {
        b["stream"] = json!(s);
    }
    b
}

/// The last object; `model` is echoed as the client named it (with or without `:latest`).
fn check_final(v: &Value, model: &str) {
    assert_eq!(v["done"], true, "{v}");
    assert_eq!(v["model"], model, "{v}");
    assert!(
        matches!(v["done_reason"].as_str(), Some("stop" | "length")),
        "{v}"
    );
    assert!(
        v["prompt_eval_count"].as_u64().is_some_and(|n| n > 0),
        "{v}"
    );
    assert!(
        v["eval_count"]
            .as_u64()
            .is_some_and(|n| (1..=6).contains(&n)),
        "{v}"
    );
    assert!(v["total_duration"].as_u64().is_some(), "{v}");
    assert!(
        v["created_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );
}

#[test]
fn chat_streams_ndjson_and_matches_the_whole_answer() {
    let Some(dir) = model_dir("serve-ollama-chat") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    let whole = srv.post("/api/chat", &body(Some(false)));
    assert_eq!(whole.status, 200, "{}", whole.body);
    let whole = whole.json();
    check_final(&whole, "tiny-a");
    assert_eq!(whole["message"]["role"], "assistant");
    // The test model answers inside its thinking block: compare both parts.
    let part = |v: &Value, k: &str| v["message"][k].as_str().unwrap_or("").to_string();
    let (text, thought) = (part(&whole, "content"), part(&whole, "thinking"));

    // Streaming is the default.
    let streamed = srv.post("/api/chat", &body(None));
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert_eq!(
        streamed.header("content-type"),
        Some("application/x-ndjson")
    );
    let lines: Vec<Value> = streamed
        .body
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let (last, rest) = lines.split_last().expect("at least the final line");
    check_final(last, "tiny-a");
    assert_eq!(last["eval_count"], whole["eval_count"]);
    assert!(rest.iter().all(|v| v["done"] == false), "{lines:?}");
    let join = |k: &str| rest.iter().map(|v| part(v, k)).collect::<String>();
    assert!(!(text.is_empty() && thought.is_empty()), "{whole}");
    assert_eq!(join("content"), text);
    assert_eq!(join("thinking"), thought);
}

#[test]
fn chat_translates_tool_turns_and_refuses_in_ollama_shape() {
    let Some(dir) = model_dir("serve-ollama-errors") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    // A tool round trip as Ollama sends it: arguments as an object, `tool_name` on the result.
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let r = srv.post(
        "/api/chat",
        &json!({
            "model": "tiny-a:latest", "stream": false, "tools": tools,
            "options": {"num_predict": 3},
            "messages": [
                {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_name": "get_weather", "content": "18C"},
            ],
        }),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    check_final(&r.json(), "tiny-a:latest");

    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (
            "unknown model",
            json!({"model": "llama3", "messages": msgs}),
            404,
        ),
        ("no messages", json!({"model": "tiny-a"}), 400),
        (
            "images",
            json!({"model": "tiny-a", "messages": [
            {"role": "user", "content": "what is this?", "images": ["aGVsbG8="]}]}),
            400,
        ),
        (
            "format",
            json!({"model": "tiny-a", "messages": msgs, "format": "yaml"}),
            400,
        ),
        (
            "bad temperature",
            json!({"model": "tiny-a", "messages": msgs,
            "options": {"temperature": "hot"}}),
            400,
        ),
        (
            "beyond context",
            json!({"model": "tiny-a", "messages": msgs,
            "options": {"num_predict": 100000}}),
            400,
        ),
    ];
    for (what, b, status) in cases {
        let r = srv.post("/api/chat", &b);
        assert_eq!(r.status, status, "{what}: {}", r.body);
        let v = r.json();
        assert!(
            v["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
    }
    let raw = request(&srv.addr, "POST", "/api/chat", &[], b"{not json");
    assert_eq!(raw.status, 400, "{}", raw.body);
    assert!(raw.json()["error"].is_string(), "{}", raw.body);
    assert_eq!(srv.get("/health").status, 200);
}

fn ndjson(r: &Resp) -> Vec<Value> {
    r.body
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn generate_streams_ndjson_raw_and_templated() {
    let Some(dir) = model_dir("serve-ollama-generate") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    let body = json!({"model": "tiny-a", "prompt": "Why is the sky blue?", "system": "Be brief.",
        "options": {"num_predict": 6, "temperature": 0, "top_k": 1, "seed": 1}});
    let mut whole_body = body.clone();
    whole_body["stream"] = json!(false);
    let whole = srv.post("/api/generate", &whole_body);
    assert_eq!(whole.status, 200, "{}", whole.body);
    let whole = whole.json();
    check_final(&whole, "tiny-a");
    assert!(whole["response"].is_string(), "{whole}");
    for k in ["prompt_eval_duration", "eval_duration", "load_duration"] {
        assert!(whole[k].as_u64().is_some(), "{k}: {whole}");
    }

    // Streaming is the default: the lines carry the same text as the whole answer.
    let streamed = srv.post("/api/generate", &body);
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert_eq!(
        streamed.header("content-type"),
        Some("application/x-ndjson")
    );
    let lines = ndjson(&streamed);
    let (last, rest) = lines.split_last().expect("at least the final line");
    check_final(last, "tiny-a");
    assert_eq!(last["eval_count"], whole["eval_count"]);
    assert!(rest.iter().all(|v| v["done"] == false), "{lines:?}");
    let join = |k: &str| {
        rest.iter()
            .map(|v| v[k].as_str().unwrap_or("").to_string())
            .collect::<String>()
    };
    let part = |k: &str| whole[k].as_str().unwrap_or("").to_string();
    assert!(
        !(part("response").is_empty() && part("thinking").is_empty()),
        "{whole}"
    );
    assert_eq!(join("response"), part("response"));
    assert_eq!(join("thinking"), part("thinking"));

    // The template wraps a prompt; `raw` sends it as it is, and the system prompt counts.
    let count = |b: Value| {
        let r = srv.post("/api/generate", &b);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["prompt_eval_count"]
            .as_u64()
            .expect("prompt_eval_count")
    };
    let prompt = "Once upon a time";
    let raw = count(
        json!({"model": "tiny-a", "prompt": prompt, "raw": true, "stream": false,
        "options": {"num_predict": 2}}),
    );
    let engine = flashmoe_runtime::Engine::open(&dir, flashmoe_runtime::LoadOptions::default())
        .expect("engine");
    let ids = engine.tokenizer().encode(prompt).expect("encode");
    assert_eq!(raw, ids.len() as u64);
    let templated = count(json!({"model": "tiny-a", "prompt": prompt, "stream": false,
        "options": {"num_predict": 2}}));
    let with_system = count(json!({"model": "tiny-a", "prompt": prompt, "stream": false,
        "system": "You answer in one line.", "options": {"num_predict": 2}}));
    assert!(
        raw < templated && templated < with_system,
        "{raw} {templated} {with_system}"
    );
    // `think: false` closes the think block in the prompt (the template's default opens it).
    let no_think = count(json!({"model": "tiny-a", "prompt": prompt, "stream": false,
        "think": false, "options": {"num_predict": 2}}));
    assert!(no_think > templated, "{no_think} {templated}");

    // A stop string ends it with done_reason "stop", the string left out.
    let text = part("response") + &part("thinking");
    let c = text.chars().nth(1).expect("two characters of output");
    let mut b = whole_body.clone();
    b["options"]["stop"] = json!([c.to_string()]);
    let v = srv.post("/api/generate", &b).json();
    assert_eq!(v["done_reason"], "stop", "{v}");
    let said = format!(
        "{}{}",
        v["response"].as_str().unwrap_or(""),
        v["thinking"].as_str().unwrap_or("")
    );
    assert!(!said.contains(c), "{v}");

    // An empty prompt only loads the model.
    let v = srv
        .post("/api/generate", &json!({"model": "tiny-a"}))
        .json();
    assert_eq!(v["done"], true, "{v}");
    assert_eq!(v["done_reason"], "load", "{v}");

    for (what, b, status) in [
        (
            "unknown model",
            json!({"model": "llama3", "prompt": "hi"}),
            404,
        ),
        (
            "images",
            json!({"model": "tiny-a", "prompt": "hi", "images": ["aGk="]}),
            400,
        ),
        (
            "raw with system",
            json!({"model": "tiny-a", "prompt": "hi", "raw": true,
            "system": "s"}),
            400,
        ),
        (
            "context",
            json!({"model": "tiny-a", "prompt": "hi", "context": [1, 2, 3]}),
            400,
        ),
        (
            "bad top_p",
            json!({"model": "tiny-a", "prompt": "hi", "options": {"top_p": 7}}),
            400,
        ),
    ] {
        let r = srv.post("/api/generate", &b);
        assert_eq!(r.status, status, "{what}: {}", r.body);
        assert!(
            r.json()["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
}
