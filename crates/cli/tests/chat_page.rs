//! The chat page `serve` answers `/` with, in a real browser: headless Chromium driven over
//! WebDriver (chromedriver, raw JSON over the tests' HTTP client). Against a server with an
//! API key and scripted replies (so that a tool call and thinking come back for sure): the key
//! is asked for, text streams in, thinking is collapsed, a tool call is shown and its result
//! sent back, regenerate and stop work, and the conversation survives a reload. Against the
//! tiny model itself: a real answer streams with its token count, tok/s and context use.
//! Screenshots: `target/chat-page.png` (scripted) and `target/chat-page-model.png`.
mod serve_util;
mod webdriver;

use std::path::PathBuf;

use serde_json::json;
use serve_util::*;
use webdriver::Browser;

const TOOL_REPLY: &str = "The user asks about the weather, so I should call the tool.</think>\n\n\
    Let me check the weather in Paris for you.\n\n<tool_call>\n<function=get_weather>\n\
    <parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>";
const AFTER_TOOL: &str = "It is sunny and 21 degrees in Paris today.";
/// Markup in a model's output is shown as text, never parsed.
const REGENERATED: &str = "Regenerated: sunny, <b>21</b> degrees <img src=x>.";
/// The prompt ends inside `<think>` after every turn: each reply thinks first.
const THOUGHT: &str = "The tool answered.</think>\n\n";

fn screenshot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target")
        .join(name)
}

/// The last assistant message's text (thinking, content, tool calls and meta line).
const LAST_ANSWER: &str = "const a = document.querySelectorAll('.msg.assistant'); \
    return a.length ? a[a.length - 1].textContent : '';";
const STREAMING: &str = "return !document.getElementById('stop').hidden;";

#[test]
fn chat_page_in_headless_chromium() {
    let Some(dir) = model_dir("chat-page") else {
        return;
    };
    // The page itself: public, embedded, typed, and locked to this origin.
    let script = dir.with_file_name("replies.json");
    let long = "This answer is long so that it can be stopped. ".repeat(12) + "THE END";
    let replies = [
        TOOL_REPLY.to_string(),
        format!("{THOUGHT}{AFTER_TOOL}"),
        format!("{THOUGHT}{REGENERATED}"),
        format!("{THOUGHT}{long}"),
    ];
    std::fs::write(&script, json!(replies).to_string()).expect("writing the scripted replies");
    let script_arg = script.to_string_lossy().to_string();
    let srv = Server::start(
        &dir,
        &["--api-key", "secret", "--scripted-replies", &script_arg],
    );
    let index = srv.get("/");
    assert_eq!(index.status, 200, "{}", index.body);
    assert_eq!(
        index.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let csp = index.header("content-security-policy").unwrap_or("");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    let js = srv.get("/assets/app.js");
    assert_eq!(js.status, 200);
    assert!(js
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/javascript")));
    assert!(srv
        .get("/assets/style.css")
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/css")));
    assert_eq!(srv.get("/assets/nope.js").status, 404);
    assert_eq!(
        srv.get("/v1/models").status,
        401,
        "the API stays behind the key"
    );

    let Some(b) = Browser::start() else {
        return;
    };
    let base = format!("http://{}/", srv.addr);
    b.goto(&base);
    // /v1/models answered 401: the page asks for the key, keeps it and retries.
    b.wait_js(
        "return document.getElementById('key-dialog').open || null;",
        20,
    );
    // A wrong key is refused and asked for again.
    b.type_into("#key-input", "wrong");
    b.click("#key-ok");
    b.wait_js(
        "const d = document.getElementById('key-dialog'); \
         return d.open && d.textContent.includes('refused this API key') || null;",
        20,
    );
    b.type_into("#key-input", "secret");
    b.click("#key-ok");
    b.wait_js(
        "return document.getElementById('model').textContent === 'tiny-a' || null;",
        20,
    );
    // The stylesheet loaded under the CSP, and nothing the page does broke it.
    assert_eq!(
        b.js("return getComputedStyle(document.getElementById('sidebar')).backgroundColor;"),
        json!("rgb(31, 37, 51)")
    );
    let violations = b.console_lines("Content Security Policy");
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(
        b.js("return localStorage.getItem('flashmoe.key');"),
        json!("\"secret\"")
    );

    // Streaming: the text is on screen while the answer is still coming.
    b.type_into("#input", "What is the weather in Paris?");
    b.click("#send");
    let early = b.wait_js(
        "const a = document.querySelector('.msg.assistant'); \
         return a && a.textContent.includes('Let me check') ? \
           {streaming: !document.getElementById('stop').hidden, \
            call: !!a.querySelector('.toolcall')} : null;",
        30,
    );
    assert_eq!(
        early,
        json!({"streaming": true, "call": false}),
        "text did not stream"
    );
    b.wait_js(
        "return !document.getElementById('stop').hidden ? null : true;",
        30,
    );
    let call = b.js("const t = document.querySelector('.msg.assistant .toolcall'); return t ? t.textContent : '';");
    let call = call.as_str().unwrap_or("");
    assert!(
        call.contains("Tool call: get_weather") && call.contains("\"city\": \"Paris\""),
        "{call}"
    );
    // Thinking is there, collapsed, and apart from the answer's text.
    let think = b.js(
        "const d = document.querySelector('.msg.assistant details.think'); \
         return d ? {open: d.open, text: d.textContent} : null;",
    );
    assert_eq!(think["open"], json!(false), "{think}");
    assert!(
        think["text"]
            .as_str()
            .unwrap_or("")
            .contains("The user asks about the weather"),
        "{think}"
    );
    let body = b.js("return document.querySelector('.msg.assistant > .body').textContent;");
    assert_eq!(body, json!("Let me check the weather in Paris for you."));
    // Context use and speed, from the stream's usage chunk.
    let ctx = b.js("return document.getElementById('ctx').textContent;");
    let ctx = ctx.as_str().unwrap_or("");
    let figures: Vec<u64> = ctx
        .strip_prefix("context ")
        .map(|r| r.split(" / ").filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default();
    assert!(
        figures.len() == 2 && figures[0] > 0 && figures[0] < figures[1],
        "{ctx}"
    );
    let speed = b.js("return document.getElementById('speed').textContent;");
    assert!(
        speed.as_str().is_some_and(|s| s.ends_with(" tok/s")),
        "{speed}"
    );

    // The tool's result goes back to the model, which answers.
    b.type_into(".tool-result textarea", "sunny, 21C");
    b.click(".tool-result button");
    b.wait_js(&answer_done_with(AFTER_TOOL), 30);
    let answer = b.js("const a = document.querySelectorAll('.msg.assistant > .body'); return a[a.length - 1].textContent;");
    assert_eq!(answer, json!(AFTER_TOOL));
    let tool = b.js("return document.querySelector('.msg.tool').textContent;");
    assert_eq!(tool, json!("Result of get_weathersunny, 21C"));
    b.screenshot(&screenshot_path("chat-page.png"));

    // Regenerate replaces the last answer.
    b.click("#regen");
    b.wait_js(&answer_done_with(REGENERATED), 30);
    let n = b.js("return document.querySelectorAll('.msg.assistant').length;");
    assert_eq!(n, json!(2));
    assert!(!b
        .js(LAST_ANSWER)
        .as_str()
        .unwrap_or("")
        .contains(AFTER_TOOL));
    assert_eq!(
        b.js("return document.querySelector('#messages b, #messages img');"),
        json!(null)
    );

    // Stop ends a streaming answer where it is and says so.
    b.type_into("#input", "Tell me more");
    b.click("#send");
    b.wait_js(
        "const a = document.querySelectorAll('.msg.assistant'); \
         return a.length === 3 && a[2].textContent.includes('long') || null;",
        30,
    );
    assert_eq!(
        b.js(STREAMING),
        json!(true),
        "the long answer ended before Stop"
    );
    b.click("#stop");
    b.wait_js("return document.getElementById('stop').hidden || null;", 30);
    let last = b.js(LAST_ANSWER);
    let last = last.as_str().unwrap_or("");
    assert!(
        last.contains("stopped") && !last.contains("THE END"),
        "{last}"
    );

    // Everything is in localStorage: a reload shows the same conversation.
    let before = b.js("return document.getElementById('messages').textContent;");
    b.goto(&base);
    b.wait_js(
        "return document.getElementById('model').textContent === 'tiny-a' || null;",
        20,
    );
    assert_eq!(
        b.js("return document.getElementById('messages').textContent;"),
        before
    );
    let titles =
        "return [...document.querySelectorAll('#conversations .title')].map(t => t.textContent);";
    assert_eq!(b.js(titles), json!(["What is the weather in Paris?"]));
    b.click("#new-chat");
    assert_eq!(
        b.js(titles),
        json!(["New chat", "What is the weather in Paris?"])
    );
    b.click("#conversations li:nth-child(2) .delete");
    assert_eq!(b.js(titles), json!(["New chat"]));
    let violations = b.console_lines("Content Security Policy");
    assert!(violations.is_empty(), "{violations:?}");
    drop(srv);

    // The real model, no key: a generated answer with its figures.
    let srv = Server::start(&dir, &[]);
    b.goto(&format!("http://{}/", srv.addr));
    b.wait_js(
        "return document.getElementById('model').textContent === 'tiny-a' || null;",
        20,
    );
    b.click("#settings-btn");
    b.type_into("#set-max-tokens", "24");
    b.click("#set-thinking");
    b.type_into("#input", "Hello there");
    b.click("#send");
    b.wait_js(
        "const a = document.querySelector('.msg.assistant'); \
         return a && document.getElementById('stop').hidden || null;",
        60,
    );
    let answer = b.js("return document.querySelector('.msg.assistant').textContent;");
    let meta = b.js("return document.querySelector('.msg.assistant .meta').textContent;");
    assert!(
        meta.as_str()
            .is_some_and(|m| m.contains(" tokens · ") && m.contains(" tok/s")),
        "{meta}"
    );
    let text = answer
        .as_str()
        .unwrap_or("")
        .replace(meta.as_str().unwrap_or(""), "");
    assert!(text.len() > "tiny-a".len(), "no text came out: {answer}");
    assert!(b
        .js("return document.getElementById('ctx').textContent;")
        .as_str()
        .is_some_and(|c| c.starts_with("context ")));
    b.screenshot(&screenshot_path("chat-page-model.png"));
}

/// A script that is true once the last answer contains `text` and is finished.
fn answer_done_with(text: &str) -> String {
    format!(
        "const a = document.querySelectorAll('.msg.assistant'); \
         return a.length && a[a.length - 1].textContent.includes({text:?}) \
           && document.getElementById('stop').hidden || null;"
    )
}

/// The test hook the page's test relies on: scripted replies stream as a model writing them
/// would (reasoning, content, a parsed tool call, usage), in turn, cut by `max_tokens`.
#[test]
fn scripted_replies_stream_like_the_model() {
    let Some(dir) = model_dir("chat-page-script") else {
        return;
    };
    let script = dir.with_file_name("replies.json");
    std::fs::write(&script, json!([TOOL_REPLY, AFTER_TOOL]).to_string()).expect("script");
    let srv = Server::start(&dir, &["--scripted-replies", &script.to_string_lossy()]);
    let body = |max: u64| {
        json!({"messages": [{"role": "user", "content": "Weather?"}], "stream": true,
               "stream_options": {"include_usage": true}, "max_tokens": max})
    };
    let r = srv.post("/v1/chat/completions", &body(500));
    assert_eq!(r.status, 200, "{}", r.body);
    let chunks: Vec<serde_json::Value> = r
        .sse()
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    let delta = |key: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][key].as_str())
            .collect()
    };
    assert_eq!(
        delta("reasoning_content"),
        "The user asks about the weather, so I should call the tool."
    );
    assert_eq!(
        delta("content").trim_end(),
        "Let me check the weather in Paris for you."
    );
    assert!(
        chunks
            .iter()
            .filter(|c| c["choices"][0]["delta"]["content"].is_string())
            .count()
            > 3,
        "not streamed in pieces"
    );
    let call = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0).cloned())
        .expect("a tool call chunk");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{\"city\":\"Paris\"}");
    let fin = chunks
        .iter()
        .find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert_eq!(fin, Some("tool_calls"));
    let usage = &chunks.last().expect("usage chunk")["usage"];
    assert!(usage["prompt_tokens"].as_u64() > Some(0), "{usage}");
    // The next reply, cut by max_tokens.
    let r = srv.post("/v1/chat/completions", &body(3));
    let tail: Vec<serde_json::Value> = r
        .sse()
        .iter()
        .rev()
        .skip(1)
        .take(2)
        .map(|d| serde_json::from_str(d).expect("chunk JSON"))
        .collect();
    assert_eq!(tail[0]["usage"]["completion_tokens"], 3, "{tail:?}");
    assert_eq!(tail[1]["choices"][0]["finish_reason"], "length", "{tail:?}");
}
