//! Anthropic's Messages API on `flashmoe serve`: over raw HTTP, the exact SSE event sequence
//! and its agreement with the whole answer, `x-api-key` and Bearer keys, errors in Anthropic's
//! shape, a tool round trip that the model sees as the template renders it, `count_tokens`, and
//! a `max_tokens` beyond the context; then the official `anthropic` Python client
//! (`anthropic_python_client`).
mod serve_util;

use flashmoe_runtime::{Engine, LoadOptions, PromptInput, ToolChoice};
use serde_json::{json, Value};
use serve_util::*;

const KEY: &str = "test-key";

fn ask(user: &str, max_tokens: u64) -> Value {
    json!({
        "model": "tiny-a", "max_tokens": max_tokens, "temperature": 0, "top_k": 1,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": user}],
    })
}

fn post(srv: &Server, path: &str, headers: &[(&str, &str)], body: &Value) -> Resp {
    request(
        &srv.addr,
        "POST",
        path,
        headers,
        body.to_string().as_bytes(),
    )
}

fn keyed(srv: &Server, path: &str, body: &Value) -> Resp {
    post(
        srv,
        path,
        &[("x-api-key", KEY), ("anthropic-version", "2023-06-01")],
        body,
    )
}

/// `(event, data)` pairs of an SSE body.
fn events(r: &Resp) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut name = String::new();
    for line in r.body.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            let v = serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}"));
            out.push((std::mem::take(&mut name), v));
        }
    }
    out
}

fn check_error(r: &Resp, status: u16, kind: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let v = r.json();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
}

/// Prompt tokens in Anthropic's usage: the uncached input plus the cache reads.
fn prompt_tokens(usage: &Value) -> u64 {
    usage["input_tokens"].as_u64().expect("input_tokens")
        + usage["cache_read_input_tokens"]
            .as_u64()
            .expect("cache_read_input_tokens")
}

/// Checks the stream's grammar (message_start, a block's start with ping after it, each block
/// as start, deltas, stop with increasing indices, message_delta, message_stop) and rebuilds
/// the content blocks from it.
fn replay(evs: &[(String, Value)]) -> (Vec<Value>, Value) {
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    for (n, d) in evs {
        assert_eq!(
            d["type"],
            n.as_str(),
            "event name and data type differ: {d}"
        );
    }
    assert_eq!(names[0], "message_start", "{names:?}");
    let ping = if names[1] == "content_block_start" {
        2
    } else {
        1
    };
    assert_eq!(names[ping], "ping", "{names:?}");
    assert_eq!(
        names[names.len() - 2..],
        ["message_delta", "message_stop"],
        "{names:?}"
    );
    assert_eq!(evs[0].1["message"]["content"], json!([]));
    let mut blocks: Vec<Value> = Vec::new();
    let mut open = false;
    for (i, (n, d)) in evs.iter().enumerate() {
        if i == ping || i == 0 || i >= evs.len() - 2 {
            continue;
        }
        match n.as_str() {
            "content_block_start" => {
                assert!(!open, "a block started inside another: {names:?}");
                assert_eq!(d["index"], blocks.len(), "{d}");
                blocks.push(d["content_block"].clone());
                open = true;
            }
            "content_block_delta" => {
                assert!(open, "{names:?}");
                assert_eq!(d["index"], blocks.len() - 1, "{d}");
                let b = blocks.last_mut().expect("open block");
                for key in ["text", "thinking"] {
                    if let Some(t) = d["delta"][key].as_str() {
                        let s = format!("{}{t}", b[key].as_str().expect("same kind"));
                        b[key] = json!(s);
                    }
                }
            }
            "content_block_stop" => {
                assert!(open && d["index"] == blocks.len() - 1, "{d}");
                open = false;
            }
            other => panic!("unexpected event {other}: {names:?}"),
        }
    }
    assert!(!open, "a block was left open: {names:?}");
    (blocks, evs[evs.len() - 2].1.clone())
}

#[test]
fn stream_event_sequence_keys_and_errors() {
    let Some(dir) = model_dir("serve-anthropic") else {
        return;
    };
    let srv = Server::start(&dir, &["--api-key", KEY]);
    let body = ask("Tell me about the sea", 12);
    let whole = keyed(&srv, "/v1/messages", &body);
    assert_eq!(whole.status, 200, "{}", whole.body);
    let whole = whole.json();
    assert_eq!(whole["type"], "message");
    assert_eq!(whole["role"], "assistant");
    assert!(
        whole["id"].as_str().is_some_and(|i| i.starts_with("msg_")),
        "{whole}"
    );
    assert!(
        matches!(
            whole["stop_reason"].as_str(),
            Some("end_turn" | "max_tokens")
        ),
        "{whole}"
    );
    let out = whole["usage"]["output_tokens"]
        .as_u64()
        .expect("output_tokens");
    assert!((1..=12).contains(&out), "{whole}");
    assert!(
        !whole["content"].as_array().expect("content").is_empty(),
        "{whole}"
    );

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = keyed(&srv, "/v1/messages", &streamed);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let evs = events(&r);
    let (blocks, delta) = replay(&evs);
    // Greedy: the stream's blocks are the whole answer's, with the same ending and counts.
    assert_eq!(Value::Array(blocks), whole["content"]);
    assert_eq!(delta["delta"]["stop_reason"], whole["stop_reason"]);
    assert_eq!(delta["usage"]["output_tokens"], out);
    let start_usage = &evs[0].1["message"]["usage"];
    assert_eq!(prompt_tokens(start_usage), prompt_tokens(&whole["usage"]));
    // The same prompt twice: the second prefill was reused, and message_start said so.
    assert_eq!(start_usage["input_tokens"], 0, "{start_usage}");
    assert_eq!(prompt_tokens(&delta["usage"]), prompt_tokens(start_usage));

    // Keys: x-api-key or Bearer; none or a wrong one is refused in Anthropic's shape.
    let bearer = format!("Bearer {KEY}");
    let r = post(&srv, "/v1/messages", &[("Authorization", &bearer)], &body);
    assert_eq!(r.status, 200, "{}", r.body);
    check_error(
        &post(&srv, "/v1/messages", &[], &body),
        401,
        "authentication_error",
    );
    check_error(
        &post(&srv, "/v1/messages", &[("x-api-key", "nope")], &body),
        401,
        "authentication_error",
    );

    let user = json!([{"role": "user", "content": "hi"}]);
    for (what, b, status, kind) in [
        (
            "no max_tokens",
            json!({"model": "tiny-a", "messages": user}),
            400,
            "invalid_request_error",
        ),
        (
            "unknown model",
            json!({"model": "claude-x", "max_tokens": 4, "messages": user}),
            404,
            "not_found_error",
        ),
        (
            "image",
            json!({"model": "tiny-a", "max_tokens": 4, "messages": [{"role": "user",
            "content": [{"type": "image", "source": {}}]}]}),
            400,
            "invalid_request_error",
        ),
        (
            "bad temperature",
            json!({"model": "tiny-a", "max_tokens": 4, "messages": user,
            "temperature": "hot"}),
            400,
            "invalid_request_error",
        ),
        (
            "tool_choice names no tool",
            json!({"model": "tiny-a", "max_tokens": 4, "messages": user,
            "tool_choice": {"type": "tool", "name": "nope"}}),
            400,
            "invalid_request_error",
        ),
    ] {
        let r = keyed(&srv, "/v1/messages", &b);
        assert_eq!(r.status, status, "{what}: {}", r.body);
        check_error(&r, status, kind);
    }
    let r = request(
        &srv.addr,
        "POST",
        "/v1/messages",
        &[("x-api-key", KEY)],
        b"{not json",
    );
    check_error(&r, 400, "invalid_request_error");
    assert_eq!(srv.get("/health").status, 200);
}

#[test]
fn tool_round_trip_count_tokens_and_long_max_tokens() {
    let Some(dir) = model_dir("serve-anthropic-tools") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    let tools = json!([{"name": "get_weather", "description": "weather",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let convo = json!([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9",
            "content": [{"type": "text", "text": "sunny"}]}]},
    ]);
    let body = json!({"model": "tiny-a", "max_tokens": 4, "tools": tools, "messages": convo});
    let r = post(&srv, "/v1/messages", &[], &body);
    assert_eq!(r.status, 200, "{}", r.body);
    let got = prompt_tokens(&r.json()["usage"]);

    // What the model saw is the template's rendering of the same turns in OpenAI's shape.
    let engine = Engine::open(&dir, LoadOptions::default()).expect("engine");
    let openai = PromptInput::Messages {
        messages: vec![
            json!({"role": "user", "content": "Weather in Paris?"}),
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "toolu_9",
                "type": "function", "function": {"name": "get_weather",
                "arguments": {"city": "Paris"}}}]}),
            json!({"role": "tool", "tool_call_id": "toolu_9", "content": "sunny",
                   "name": "get_weather"}),
        ],
        tools: vec![
            json!({"type": "function", "function": {"name": "get_weather",
            "description": "weather", "parameters": tools[0]["input_schema"]}}),
        ],
        enable_thinking: None,
        add_generation_prompt: true,
    };
    let text = engine.render(&openai, &ToolChoice::Auto).expect("render");
    assert!(
        text.contains("<tool_response>\nsunny\n</tool_response>"),
        "{text}"
    );
    let want = engine.tokenizer().encode(&text).expect("encode").len() as u64;
    assert_eq!(got, want);

    let mut count = body.clone();
    count.as_object_mut().map(|o| o.remove("max_tokens"));
    let c = post(&srv, "/v1/messages/count_tokens", &[], &count);
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(c.json(), json!({"input_tokens": want}));

    // Agents send one large max_tokens whatever the prompt: it is clamped to the context,
    // never refused, and a generation the context cut says so. (Greedy, this prompt's answer
    // runs ~300 tokens before its end-of-turn: beyond a context of 128.)
    drop(srv);
    let srv = Server::start(&dir, &["--ctx-size", "128"]);
    let mut long = ask("hi", 100_000);
    long["stream"] = json!(true);
    let r = post(&srv, "/v1/messages", &[], &long);
    assert_eq!(r.status, 200, "{}", r.body);
    let (_, delta) = replay(&events(&r));
    let used =
        prompt_tokens(&delta["usage"]) + delta["usage"]["output_tokens"].as_u64().expect("n");
    assert_eq!(
        delta["delta"]["stop_reason"], "model_context_window_exceeded",
        "{delta}"
    );
    assert_eq!(used, 128, "{delta}");
}

#[test]
fn anthropic_python_client() {
    let Some(dir) = model_dir("serve-anthropic-python") else {
        return;
    };
    let srv = Server::start(&dir, &["--api-key", KEY]);
    python_client_test(
        "anthropic",
        "test_anthropic_client.py",
        &[
            ("ANTHROPIC_BASE_URL", format!("http://{}", srv.addr)),
            ("ANTHROPIC_API_KEY", KEY.into()),
            ("FLASHMOE_MODEL", "tiny-a".into()),
        ],
    );
}
