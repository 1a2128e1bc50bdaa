//! Faults a user or a client can cause to `flashmoe serve`, each answered with an error and
//! never a dead or stuck server: model files truncated under it (before and during a
//! generation), requests it cannot honour, stalled and excess connections, signals, bursts.
//! The real binary on a loopback port over the tiny test model (packed where the fault is in
//! the packed files).
mod serve_util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_util::*;

fn chat(user: &str, max_tokens: u64) -> Value {
    json!({
        "messages": [{"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "chat_template_kwargs": {"enable_thinking": false}
    })
}

/// Opens a streamed generation of exactly `max_tokens` (end-of-sequence ignored, so that it
/// runs for seconds, whatever the model samples) and returns the connection once the response
/// has started (the generation is running).
fn start_stream(srv: &Server, max_tokens: u64) -> TcpStream {
    let mut body = chat("Tell me a long story", max_tokens);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    open_stream(&srv.addr, &body)
}

fn read_rest(mut s: TcpStream) -> String {
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    String::from_utf8_lossy(&rest).into_owned()
}

fn error_of(r: &Resp) -> (String, Value) {
    let v = r.json();
    let msg = v["error"]["message"].as_str().unwrap_or("").to_string();
    (msg, v["error"]["param"].clone())
}

fn truncate(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("truncating {}: {e}", path.display()));
}

/// `dense.bin` is mmap'd: truncating it used to kill the server with SIGBUS on the next request.
#[test]
fn dense_file_truncated_between_requests_is_a_500_naming_it() {
    let Some(dir) = packed_model_dir("faults-dense") else {
        return;
    };
    let mut srv = Server::start(&dir, &[]);
    assert_eq!(srv.post("/v1/chat/completions", &chat("hi", 4)).status, 200);
    truncate(&dir.join("dense.bin"), 0);
    for _ in 0..2 {
        let r = srv.post("/v1/chat/completions", &chat("hi again", 4));
        assert_eq!(r.status, 500, "{}", r.body);
        let (msg, _) = error_of(&r);
        assert!(
            msg.contains("dense.bin") && msg.contains("changed"),
            "{msg}"
        );
    }
    assert!(srv.alive(), "the server died");
    let h = srv.get("/health");
    assert_eq!(h.status, 503, "{}", h.body);
    assert_eq!(srv.get("/v1/models").status, 200);
}

/// A truncation while a generation reads the weights: the SIGBUS becomes an error in the stream.
#[test]
fn dense_file_truncated_during_a_generation_ends_it_with_an_error() {
    let Some(dir) = packed_model_dir("faults-dense-live") else {
        return;
    };
    let mut srv = Server::start(&dir, &[]);
    let s = start_stream(&srv, 4000);
    truncate(&dir.join("dense.bin"), 0);
    let rest = read_rest(s);
    assert!(
        rest.contains("\"error\"") && rest.contains("dense.bin"),
        "the stream did not end with an error naming dense.bin: ...{}",
        &rest[rest.len().saturating_sub(600)..]
    );
    assert!(srv.alive(), "the server died");
    let r = srv.post("/v1/chat/completions", &chat("hi", 4));
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(error_of(&r).0.contains("dense.bin"), "{}", r.body);
}

#[test]
fn expert_file_truncated_is_a_500_naming_it() {
    let Some(dir) = packed_model_dir("faults-expert") else {
        return;
    };
    let mut srv = Server::start(&dir, &[]);
    let layer = std::fs::read_dir(dir.join("experts"))
        .expect("experts dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .min()
        .expect("an expert file");
    truncate(&layer, 100);
    let r = srv.post("/v1/chat/completions", &chat("hi", 4));
    assert_eq!(r.status, 500, "{}", r.body);
    let name = layer
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    assert!(error_of(&r).0.contains(&name), "{}", r.body);
    assert!(srv.alive());
}

/// Every expert byte of the tiny packed model is in the page cache (pack just wrote it): the
/// ratio was computed as cached / (fetched + cached), which showed 0.5 for all-cached.
#[test]
fn expert_cache_hit_ratio_is_cached_over_fetched() {
    let Some(dir) = packed_model_dir("faults-metrics") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    assert_eq!(srv.post("/v1/chat/completions", &chat("hi", 8)).status, 200);
    let fetched = srv.metric("flashmoe_expert_bytes_read_total");
    let cached = srv.metric("flashmoe_expert_bytes_cached_total");
    let ratio = srv.metric("flashmoe_expert_cache_hit_ratio");
    assert!(
        fetched > 0.0 && cached > 0.0,
        "fetched {fetched}, cached {cached}"
    );
    assert!(cached <= fetched, "cached {cached} > fetched {fetched}");
    assert!(
        (ratio - cached / fetched).abs() < 1e-9,
        "ratio {ratio}, cached {cached}, fetched {fetched}"
    );
    let text = srv.get("/metrics").body;
    assert!(!text.contains("read from disk"), "{text}");
}

#[test]
fn unsupported_fields_are_refused_and_errors_name_the_right_field() {
    let Some(dir) = model_dir("faults-fields") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    let with = |extra: Value| {
        let mut b = chat("hi", 2);
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            b[k] = v;
        }
        b
    };
    let refused = [
        (
            "/v1/chat/completions",
            with(json!({"response_format": {"type": "xml"}})),
            "response_format",
        ),
        (
            "/v1/chat/completions",
            with(json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}})),
            "response_format.json_schema.schema",
        ),
        (
            "/v1/chat/completions",
            with(json!({"logit_bias": {"42": 10}})),
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            with(json!({"logprobs": true})),
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            with(json!({"functions": [{"name": "f"}]})),
            "functions",
        ),
        ("/v1/chat/completions", with(json!({"tools": "x"})), "tools"),
        (
            "/v1/completions",
            json!({"prompt": "Once", "max_tokens": 2, "suffix": "the end"}),
            "suffix",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Once", "max_tokens": 2, "logprobs": 0}),
            "logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt": "Once", "max_tokens": 2, "best_of": 3}),
            "best_of",
        ),
    ];
    for (path, body, field) in refused {
        let r = srv.post(path, &body);
        assert_eq!(r.status, 400, "{field}: {}", r.body);
        let (msg, param) = error_of(&r);
        assert_eq!(param, json!(field), "{msg}");
        assert!(msg.contains(field), "{msg}");
    }
    // Values that ask for nothing are accepted.
    for body in [
        with(json!({"response_format": {"type": "text"}})),
        with(json!({"logprobs": false, "logit_bias": {}})),
    ] {
        let r = srv.post("/v1/chat/completions", &body);
        assert_eq!(r.status, 200, "{body}: {}", r.body);
    }
    let r = srv.post(
        "/v1/completions",
        &json!({"prompt": "Once", "max_tokens": 2, "suffix": ""}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // Prompt errors of /v1/completions name `prompt`, not `messages`.
    let long = "hello world ".repeat(3000);
    for body in [
        json!({"prompt": long, "max_tokens": 2}),
        json!({"prompt": [5, 999999], "max_tokens": 2}),
    ] {
        let r = srv.post("/v1/completions", &body);
        assert_eq!(r.status, 400, "{}", r.body);
        let (msg, param) = error_of(&r);
        assert_eq!(param, json!("prompt"), "{msg}");
    }
}

/// `render` and `serve` share one validator: what one refuses, the other does too.
#[test]
fn render_refuses_what_serve_refuses() {
    let Some(dir) = model_dir("faults-render") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    let tmp = dir.with_file_name("requests");
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let render = |body: &Value| {
        let f = tmp.join("req.json");
        std::fs::write(&f, body.to_string()).expect("writing the request");
        std::process::Command::new(env!("CARGO_BIN_EXE_flashmoe"))
            .args(["render", "--tokenizer"])
            .arg(&dir)
            .arg("--request")
            .arg(&f)
            .output()
            .expect("running flashmoe render")
    };
    let mut bad_tools = chat("hi", 2);
    bad_tools["tools"] = json!("x");
    let mut bad_format = chat("hi", 2);
    bad_format["response_format"] = json!({"type": "xml"});
    let mut bad_role = chat("hi", 2);
    bad_role["messages"][0]["role"] = json!("wizard");
    for (body, field) in [
        (bad_tools, "tools"),
        (bad_format, "response_format"),
        (bad_role, "role"),
    ] {
        assert_eq!(
            srv.post("/v1/chat/completions", &body).status,
            400,
            "{field}"
        );
        let out = render(&body);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "render accepted {body}");
        assert!(out.stdout.is_empty(), "render printed a prompt for {body}");
        assert!(err.contains(field), "{err}");
    }
    let out = render(&chat("hello there", 2));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello there"));
}

#[test]
fn api_key_scheme_is_case_insensitive_and_guards_metrics() {
    let Some(dir) = model_dir("faults-key") else {
        return;
    };
    let srv = Server::start(&dir, &["--api-key", "sekrit"]);
    let get = |path: &str, auth: Option<&str>| {
        let h: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        request(&srv.addr, "GET", path, &h, b"").status
    };
    for ok in ["Bearer sekrit", "bearer sekrit", "BEARER  sekrit "] {
        assert_eq!(get("/v1/models", Some(ok)), 200, "{ok}");
        assert_eq!(get("/metrics", Some(ok)), 200, "{ok}");
    }
    for bad in [
        None,
        Some("Bearer wrong"),
        Some("Basic sekrit"),
        Some("sekrit"),
        Some("Bearer sekri"),
    ] {
        assert_eq!(get("/v1/models", bad), 401, "{bad:?}");
        assert_eq!(get("/metrics", bad), 401, "{bad:?}");
    }
    assert_eq!(get("/health", None), 200);
    drop(srv);
    let public = Server::start(&dir, &["--api-key", "sekrit", "--metrics-public"]);
    assert_eq!(
        request(&public.addr, "GET", "/metrics", &[], b"").status,
        200
    );
    assert_eq!(
        request(&public.addr, "GET", "/v1/models", &[], b"").status,
        401
    );
}

/// Whether the server closed `s` within `secs` (EOF or reset, rather than the read timing out).
fn closed_within(s: &mut TcpStream, secs: u64) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(secs))).ok();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a 408 or similar before the close
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

#[test]
fn stalled_connections_are_closed_after_the_timeouts() {
    let Some(dir) = model_dir("faults-stall") else {
        return;
    };
    let srv = Server::start(&dir, &["--header-timeout", "1", "--idle-timeout", "1"]);
    let t = Instant::now();
    // Silent, half a request line, headers without their blank line.
    let mut stalled: Vec<TcpStream> = (0..30).map(|_| connect(&srv.addr)).collect();
    for (i, s) in stalled.iter_mut().enumerate() {
        let part: &[u8] = match i % 3 {
            0 => b"",
            1 => b"POST /v1/chat/compl",
            _ => b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
        };
        s.write_all(part).expect("writing");
    }
    // A keep-alive connection left idle after its response.
    let mut idle = connect(&srv.addr);
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("writing");
    let mut buf = [0u8; 256];
    assert!(idle.read(&mut buf).expect("health answer") > 0);
    // A body that stops halfway: 408.
    let mut body = connect(&srv.addr);
    body.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"messages\"",
    )
    .expect("writing");
    for (i, s) in stalled.iter_mut().enumerate() {
        assert!(closed_within(s, 15), "stalled connection {i} still open");
    }
    assert!(closed_within(&mut idle, 15), "idle connection still open");
    let mut answer = Vec::new();
    let _ = body.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(t.elapsed() < Duration::from_secs(15));
    // Still serving; and a request that waits for the model longer than the header timeout
    // is answered (waiting on the server is not a client stall): it queues behind a long
    // stream that is read for 1.5 s.
    assert_eq!(srv.post("/v1/chat/completions", &chat("hi", 2)).status, 200);
    let mut s = start_stream(&srv, 4000);
    let queued = spawn_post(&srv.addr, "/v1/chat/completions", &chat("queued", 2));
    assert!(wait_until(10, || srv.metric("flashmoe_queue_depth") == 1.0));
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while t.elapsed() < Duration::from_millis(1500) && s.read(&mut buf).is_ok_and(|n| n > 0) {}
    drop(s);
    let r = queued.join().expect("client thread");
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn connections_beyond_the_cap_get_503_until_some_close() {
    let Some(dir) = model_dir("faults-cap") else {
        return;
    };
    let srv = Server::start(&dir, &["--max-connections", "4"]);
    let held: Vec<TcpStream> = (0..4).map(|_| connect(&srv.addr)).collect();
    assert!(wait_until(10, || srv_metric_raw(&srv.addr) == Some(503)));
    let r = request(&srv.addr, "GET", "/health", &[], b"");
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "too_many_connections");
    assert!(r.header("retry-after").is_some());
    drop(held);
    assert!(
        wait_until(10, || srv_metric_raw(&srv.addr) == Some(200)),
        "connections were not released"
    );
    assert_eq!(srv.post("/v1/chat/completions", &chat("hi", 2)).status, 200);
}

/// The status of one GET /health, or None when the connection failed.
fn srv_metric_raw(addr: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Malformed, mistyped and oversized requests (these already got 4xx; kept from coming back).
#[test]
fn malformed_requests_and_a_burst_of_100() {
    let Some(dir) = model_dir("faults-burst") else {
        return;
    };
    let srv = Server::start(&dir, &["--max-body", "100000", "--max-queue", "128"]);
    let raw = |body: &[u8]| request(&srv.addr, "POST", "/v1/chat/completions", &[], body);
    let cases = [
        (raw(b"{\"messages\": [}"), 400),
        (raw(b"\xff\xfe"), 400),
        (raw(b"[1, 2]"), 400),
        (
            srv.post("/v1/chat/completions", &json!({"messages": "hi"})),
            400,
        ),
        (
            srv.post(
                "/v1/chat/completions",
                &json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
            ),
            400,
        ),
        (
            srv.post(
                "/v1/chat/completions",
                &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
            ),
            400,
        ),
        (
            srv.post("/v1/completions", &json!({"prompt": {"a": 1}})),
            400,
        ),
        (
            srv.post(
                "/v1/chat/completions",
                &json!({"messages": [{"role": "user", "content": "x".repeat(200_000)}]}),
            ),
            413,
        ),
    ];
    for (i, (r, status)) in cases.iter().enumerate() {
        assert_eq!(r.status, *status, "case {i}: {}", r.body);
        assert!(r.json()["error"]["message"].is_string(), "case {i}");
    }
    // 100 at once, every one answered in full.
    let handles: Vec<_> = (0..100)
        .map(|i| {
            spawn_post(
                &srv.addr,
                "/v1/chat/completions",
                &chat(&format!("burst {i}"), 2),
            )
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.join().expect("client thread");
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        assert!(r.json()["usage"]["completion_tokens"].as_u64() >= Some(1));
    }
}

/// The first SIGTERM cancels the running generation, answers the queued request 503 and exits.
#[test]
fn sigterm_cancels_the_generation_and_refuses_the_queue() {
    let Some(dir) = model_dir("faults-sigterm") else {
        return;
    };
    let mut srv = Server::start(&dir, &[]);
    // Read as it comes, so that the server never waits on this client.
    let stream = start_stream(&srv, 4000);
    let stream = std::thread::spawn(move || read_rest(stream));
    let queued = spawn_post(&srv.addr, "/v1/chat/completions", &chat("queued", 4));
    assert!(wait_until(20, || srv.metric("flashmoe_queue_depth") == 1.0));
    let t = Instant::now();
    srv.signal("TERM");
    let status = srv.wait_exit(20).expect("the server did not exit");
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(srv.stdout().contains("shutting down"), "{}", srv.stdout());
    let r = queued.join().expect("client thread");
    assert_eq!(r.status, 503, "{}", r.body);
    let rest = stream.join().expect("reader thread");
    assert!(
        rest.contains("shutting down"),
        "...{}",
        &rest[rest.len().saturating_sub(400)..]
    );
}

/// A second signal exits at once, even while a connection keeps the first one's drain waiting.
#[test]
fn second_signal_exits_at_once() {
    let Some(dir) = model_dir("faults-sigint") else {
        return;
    };
    let mut srv = Server::start(&dir, &["--idle-timeout", "120"]);
    // A request whose body never completes: its connection stays busy.
    let mut busy = connect(&srv.addr);
    busy.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
    )
    .expect("writing");
    // Two: the busy one and the one asking for the metric.
    assert!(wait_until(10, || srv.metric("flashmoe_connections_open") >= 2.0));
    srv.signal("INT");
    assert!(
        wait_until(10, || srv.stdout().contains("shutting down")),
        "{}",
        srv.stdout()
    );
    // No longer accepting, still draining.
    assert!(wait_until(5, || TcpStream::connect(&srv.addr).is_err()));
    assert!(srv.alive(), "exited before the drain ended");
    let t = Instant::now();
    srv.signal("INT");
    let status = srv.wait_exit(5).expect("the second signal did not exit");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "{status:?}");
}
