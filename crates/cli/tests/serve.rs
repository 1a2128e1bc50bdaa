//! `flashmoe serve` end to end: the real binary on a loopback port over the tiny test model,
//! driven with raw HTTP (and, in `openai_python_client`, with the official `openai` package).
mod serve_util;

use flashmoe_runtime::{Engine, LoadOptions, PromptInput, ToolChoice};
use serde_json::{json, Value};
use serve_util::*;

fn chat_body(user: &str, max_tokens: u64) -> Value {
    json!({
        "model": "tiny-a",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": user}
        ],
        "max_tokens": max_tokens,
        "chat_template_kwargs": {"enable_thinking": false}
    })
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "description": "City name"},
                           "days": {"type": "integer"}},
            "required": ["city"]}}}])
}

fn check_usage(v: &Value, max_tokens: u64) {
    let u = &v["usage"];
    let p = u["prompt_tokens"].as_u64().expect("prompt_tokens");
    let c = u["completion_tokens"].as_u64().expect("completion_tokens");
    assert!(p > 0 && c >= 1 && c <= max_tokens, "{u}");
    assert_eq!(u["total_tokens"].as_u64(), Some(p + c), "{u}");
    assert!(
        u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .is_some(),
        "{u}"
    );
}

#[test]
fn chat_stream_models_and_usage() {
    let Some(dir) = model_dir("serve-chat") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    assert_eq!(srv.get("/health").status, 200);
    let models = srv.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], "tiny-a");

    let r = srv.post("/v1/chat/completions", &chat_body("Hello there", 16));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().is_some_and(|s| s.starts_with("chatcmpl-")));
    assert_eq!(v["model"], "tiny-a");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap_or("")));
    check_usage(&v, 16);
    // The prompt the server counted is the chat template's rendering, tokenized.
    let engine = Engine::open(&dir, LoadOptions::default()).expect("engine");
    let prompt = PromptInput::Messages {
        messages: chat_body("Hello there", 16)["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        tools: vec![],
        enable_thinking: Some(false),
        add_generation_prompt: true,
    };
    let text = engine.render(&prompt, &ToolChoice::Auto).expect("render");
    let n = engine.tokenizer().encode(&text).expect("encode").len() as u64;
    assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(n));

    // Streaming, with usage.
    let mut body = chat_body("Hello there", 16);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = srv.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let data = r.sse();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let id = chunks[0]["id"].clone();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
    }
    let usage_chunk = chunks.last().expect("usage chunk");
    assert_eq!(usage_chunk["choices"], json!([]));
    check_usage(usage_chunk, 16);
    let fin = &chunks[chunks.len() - 2]["choices"][0];
    assert!(fin["finish_reason"].is_string(), "{fin}");
    let streamed_tokens = usage_chunk["usage"]["completion_tokens"].as_u64();
    assert!(streamed_tokens.is_some());

    // Plain completions, whole and streamed.
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 8}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    check_usage(&v, 8);
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 8, "stream": true}),
    );
    assert_eq!(r.sse().last().map(String::as_str), Some("[DONE]"));

    let m = srv.get("/metrics");
    assert_eq!(m.status, 200);
    assert!(
        m.body.contains("flashmoe_generated_tokens_total"),
        "{}",
        m.body
    );
    assert!(srv.metric("flashmoe_generated_tokens_total") > 0.0);
    assert_eq!(srv.metric("flashmoe_queue_depth"), 0.0);
}

#[test]
fn tools_round_trip_and_prefix_reuse() {
    let Some(dir) = model_dir("serve-tools") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    let messages = json!([
        {"role": "system", "content": "You help with weather questions."},
        {"role": "user", "content": "What is the weather in Paris?"}
    ]);
    let first = json!({"messages": messages, "tools": weather_tools(), "max_tokens": 8});
    let r = srv.post("/v1/chat/completions", &first);
    assert_eq!(r.status, 200, "{}", r.body);
    let v1 = r.json();
    check_usage(&v1, 8);
    assert_eq!(v1["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

    // The tool block is in what the model saw: the server's count equals the render's.
    let engine = Engine::open(&dir, LoadOptions::default()).expect("engine");
    let render = |msgs: &Value| {
        let p = PromptInput::Messages {
            messages: msgs.as_array().cloned().unwrap_or_default(),
            tools: weather_tools().as_array().cloned().unwrap_or_default(),
            enable_thinking: None,
            add_generation_prompt: true,
        };
        engine.render(&p, &ToolChoice::Auto).expect("render")
    };
    let text = render(&messages);
    assert!(text.contains("# Tools\n\nYou have access to the following functions:\n\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""), "{text}");
    assert!(
        text.contains("</IMPORTANT>\n\nYou help with weather questions.<|im_end|>\n"),
        "{text}"
    );
    let n = engine.tokenizer().encode(&text).expect("encode").len() as u64;
    assert_eq!(v1["usage"]["prompt_tokens"].as_u64(), Some(n));

    // A scripted tool call and its result, as an OpenAI client sends them back.
    let mut convo = messages.as_array().cloned().unwrap_or_default();
    convo.push(json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "call_abc123", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]}));
    convo.push(json!({"role": "tool", "tool_call_id": "call_abc123", "content": "sunny, 21C"}));
    let convo = Value::Array(convo);
    let text2 = render(&convo);
    // The tool-calling turn follows the last real user query, so it carries an (empty) think block.
    assert!(text2.contains("<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"), "{text2}");
    let second = json!({"messages": convo, "tools": weather_tools(), "max_tokens": 8});
    let r = srv.post("/v1/chat/completions", &second);
    assert_eq!(r.status, 200, "{}", r.body);
    let v2 = r.json();
    let n2 = engine.tokenizer().encode(&text2).expect("encode").len() as u64;
    assert_eq!(v2["usage"]["prompt_tokens"].as_u64(), Some(n2));
    // The conversation so far (system + tools + first question) came from a snapshot.
    let cached = v2["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        cached >= n * 8 / 10 && cached < n2,
        "cached {cached}, first prompt {n}, second {n2}"
    );
    // The reuse itself is proven by the counts above; comparing the two prefill times would
    // only test the machine's load (on a busy 2-core runner they can come out inverted).
    for v in [&v1, &v2] {
        let p = v["timings"]["prefill_ms"].as_f64().expect("prefill_ms");
        assert!(p.is_finite() && p >= 0.0, "{}", v["timings"]);
    }

    // A new conversation with the same system prompt and tools reuses the system block.
    let other = json!({"messages": [
        {"role": "system", "content": "You help with weather questions."},
        {"role": "user", "content": "And in Rome?"}], "tools": weather_tools(), "max_tokens": 4});
    let v3 = srv.post("/v1/chat/completions", &other).json();
    let cached3 = v3["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert!(cached3 > n / 2, "{}", v3["usage"]);

    // tool_choice: none renders no tool block; a named function must exist.
    let mut none = first.clone();
    none["tool_choice"] = json!("none");
    let vn = srv.post("/v1/chat/completions", &none).json();
    assert!(
        vn["usage"]["prompt_tokens"].as_u64() < Some(n / 2),
        "{}",
        vn["usage"]
    );
    let mut named = first.clone();
    named["tool_choice"] = json!({"type": "function", "function": {"name": "get_weather"}});
    let r = srv.post("/v1/chat/completions", &named);
    assert_eq!(r.status, 200, "{}", r.body);
    named["tool_choice"] = json!({"type": "function", "function": {"name": "nope"}});
    let r = srv.post("/v1/chat/completions", &named);
    assert_eq!(r.status, 400, "{}", r.body);
}

#[test]
fn cancel_on_disconnect_and_concurrency() {
    let Some(dir) = model_dir("serve-cancel") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    // Start a long stream, read its first chunk, hang up.
    let mut body = chat_body("Tell me a long story", 3000);
    body["stream"] = json!(true);
    // All 3000 tokens (seconds), whatever the model samples: it must still run when dropped.
    body["ignore_eos"] = json!(true);
    drop(open_stream(&srv.addr, &body));
    // No bound on how soon: a loaded CI machine is slow. That it stopped early is what the
    // token count below shows.
    assert!(
        wait_until(20, || srv
            .metric("flashmoe_generations_total{finish_reason=\"cancelled\"}")
            == 1.0),
        "the generation was not cancelled"
    );
    assert_eq!(srv.metric("flashmoe_busy"), 0.0);
    let done = srv.metric("flashmoe_generated_tokens_total");
    assert!(
        done < 3000.0,
        "{done} tokens generated after the client left"
    );

    // 2, then 10 concurrent clients: every one answered in full.
    for clients in [2usize, 10] {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let addr = srv.addr.clone();
                std::thread::spawn(move || {
                    let mut b = chat_body(&format!("Client {i} says hi"), 6);
                    if i % 2 == 1 {
                        b["stream"] = json!(true);
                    }
                    request(
                        &addr,
                        "POST",
                        "/v1/chat/completions",
                        &[],
                        b.to_string().as_bytes(),
                    )
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let r = h.join().expect("client thread");
            assert_eq!(r.status, 200, "client {i}: {}", r.body);
            if i % 2 == 1 {
                assert_eq!(
                    r.sse().last().map(String::as_str),
                    Some("[DONE]"),
                    "client {i}"
                );
            } else {
                check_usage(&r.json(), 6);
            }
        }
    }
}

#[test]
fn bad_inputs_get_openai_errors() {
    let Some(dir) = model_dir("serve-bad") else {
        return;
    };
    let srv = Server::start(&dir, &["--max-body", "100000"]);
    let raw = |body: &[u8]| request(&srv.addr, "POST", "/v1/chat/completions", &[], body);
    let long = "hello world ".repeat(3000);
    let cases: Vec<(&str, Resp, u16)> = vec![
        ("malformed JSON", raw(b"{\"messages\": [}"), 400),
        ("not an object", raw(b"[1, 2]"), 400),
        ("missing messages", srv.post("/v1/chat/completions", &json!({"model": "tiny-a"})), 400),
        ("empty messages", srv.post("/v1/chat/completions", &json!({"messages": []})), 400),
        ("unknown role", srv.post("/v1/chat/completions", &json!({"messages": [{"role": "wizard", "content": "hi"}]})), 400),
        ("content type", srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": 42}]})), 400),
        ("messages type", srv.post("/v1/chat/completions", &json!({"messages": "hi"})), 400),
        ("temperature type", srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})), 400),
        ("max_tokens type", srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"})), 400),
        ("max_tokens beyond context", srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000})), 400),
        ("max_tokens plus prompt beyond context", srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4090})), 400),
        ("prompt too long", srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": long}]})), 400),
        ("unknown model", srv.post("/v1/chat/completions", &json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})), 404),
        ("body too large", srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x".repeat(200_000)}]})), 413),
        ("bad tool arguments", srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]})), 400),
        ("completions without prompt", srv.post("/v1/completions", &json!({"max_tokens": 3})), 400),
        ("unknown route", srv.get("/v1/nothing"), 404),
    ];
    for (what, r, status) in cases {
        assert_eq!(r.status, status, "{what}: {}", r.body);
        let v = r.json();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        assert!(v["error"]["type"].is_string(), "{what}: {v}");
    }
    // Still serving.
    let r = srv.post("/v1/chat/completions", &chat_body("still there?", 4));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(srv.get("/health").status, 200);
}

#[test]
fn api_key_required() {
    let Some(dir) = model_dir("serve-key") else {
        return;
    };
    let srv = Server::start(&dir, &["--api-key", "sekrit"]);
    let body = chat_body("hi", 2).to_string();
    let no = request(
        &srv.addr,
        "POST",
        "/v1/chat/completions",
        &[],
        body.as_bytes(),
    );
    assert_eq!(no.status, 401, "{}", no.body);
    assert_eq!(no.json()["error"]["code"], "invalid_api_key");
    let wrong = request(
        &srv.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer nope")],
        body.as_bytes(),
    );
    assert_eq!(wrong.status, 401);
    let ok = request(
        &srv.addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer sekrit")],
        body.as_bytes(),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    let models = request(&srv.addr, "GET", "/v1/models", &[], b"");
    assert_eq!(models.status, 401);
}

#[test]
fn burst_with_small_queue_answers_or_refuses_every_request() {
    let Some(dir) = model_dir("serve-burst") else {
        return;
    };
    let srv = Server::start(&dir, &["--max-queue", "2"]);
    // Warm up, then measure idle memory.
    assert_eq!(
        srv.post("/v1/chat/completions", &chat_body("warm up", 4))
            .status,
        200
    );
    let idle = srv.rss_kib();
    // Keep the model busy with a long stream so that the burst must queue; it is dropped
    // (cancelled) once the queue has refused someone, letting the queued requests run.
    let mut long = chat_body("Tell me a long story", 3000);
    long["stream"] = json!(true);
    long["ignore_eos"] = json!(true);
    let hold = open_stream(&srv.addr, &long);
    let handles: Vec<_> = (0..100)
        .map(|i| {
            let addr = srv.addr.clone();
            std::thread::spawn(move || {
                let mut b = chat_body(&format!("burst {i}"), 4);
                if i % 3 == 0 {
                    b["stream"] = json!(true);
                }
                (
                    i,
                    request(
                        &addr,
                        "POST",
                        "/v1/chat/completions",
                        &[],
                        b.to_string().as_bytes(),
                    ),
                )
            })
        })
        .collect();
    wait_until(30, || srv.metric("flashmoe_requests_rejected_total") >= 1.0);
    drop(hold);
    let (mut ok, mut refused) = (0, 0);
    for h in handles {
        let (i, r) = h.join().expect("client thread");
        match r.status {
            200 if i % 3 == 0 => {
                assert_eq!(r.sse().last().map(String::as_str), Some("[DONE]"), "{i}");
                ok += 1;
            }
            200 => {
                check_usage(&r.json(), 4);
                ok += 1;
            }
            429 => {
                assert!(r.header("retry-after").is_some(), "{i}: no Retry-After");
                assert_eq!(r.json()["error"]["type"], "rate_limit_error");
                refused += 1;
            }
            s => panic!("request {i}: status {s}: {}", r.body),
        }
    }
    assert_eq!(ok + refused, 100);
    assert!(ok >= 1 && refused >= 1, "ok {ok}, refused {refused}");
    assert!(wait_until(10, || srv.metric("flashmoe_queue_depth") == 0.0
        && srv.metric("flashmoe_busy") == 0.0));
    assert_eq!(
        srv.metric("flashmoe_requests_rejected_total"),
        refused as f64
    );
    let after = srv.rss_kib();
    assert!(
        after < idle + 64 * 1024,
        "memory grew from {idle} KiB to {after} KiB"
    );
    assert_eq!(
        srv.post("/v1/chat/completions", &chat_body("after the burst", 4))
            .status,
        200
    );
}

#[test]
fn openai_python_client() {
    let Some(dir) = model_dir("serve-python") else {
        return;
    };
    let srv = Server::start(&dir, &["--api-key", "test-key"]);
    python_client_test(
        "openai",
        "test_openai_client.py",
        &[
            ("OPENAI_BASE_URL", format!("http://{}/v1", srv.addr)),
            ("OPENAI_API_KEY", "test-key".into()),
            ("FLASHMOE_MODEL", "tiny-a".into()),
        ],
    );
}
