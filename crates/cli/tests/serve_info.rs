//! `flashmoe serve`'s answers about itself, over raw HTTP: `/v1/models` reports the context
//! and the quantization; `/v1/embeddings` and unknown paths get OpenAI-shaped JSON 404s
//! that say what is missing.
mod serve_util;

use serde_json::{json, Value};
use serve_util::*;

/// The one model object, checked to be the same in the list and by id.
fn model_object(srv: &Server) -> Value {
    let list = srv.get("/v1/models");
    assert_eq!(list.status, 200, "{}", list.body);
    let list = list.json();
    let m = list["data"][0].clone();
    let one = srv.get(&format!("/v1/models/{}", m["id"].as_str().unwrap_or("")));
    assert_eq!(one.status, 200, "{}", one.body);
    assert_eq!(one.json(), m);
    m
}

fn error_message(r: &Resp, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.body);
    let v = r.json();
    assert!(v["error"]["type"].is_string(), "{v}");
    v["error"]["message"].as_str().unwrap_or("").to_string()
}

#[test]
fn models_report_context_and_float_weights() {
    let Some(dir) = model_dir("serve-info-ckpt") else {
        return;
    };
    let srv = Server::start(&dir, &["--ctx-size", "1000"]);
    let m = model_object(&srv);
    // The existing fields stay as they were.
    assert_eq!(m["id"], "tiny-a");
    assert_eq!(m["object"], "model");
    assert_eq!(m["owned_by"], "flashmoe");
    // The context is the plan's (--ctx-size), not the model's maximum.
    assert_eq!(m["context_length"], 1000, "{m}");
    assert_eq!(m["max_model_len"], 1000, "{m}");
    assert_eq!(
        m["quantization"],
        json!({"experts_bits": 16, "dense_bits": 16, "group_size": null}),
        "{m}"
    );
}

#[test]
fn models_report_packed_quantization() {
    let Some(out) =
        packed_model_dir_with("serve-info-packed", &["--bits", "2", "--dense-bits", "8"])
    else {
        return;
    };
    let srv = Server::start(&out, &[]);
    let m = model_object(&srv);
    assert!(m["context_length"].as_u64().is_some_and(|c| c > 0), "{m}");
    assert_eq!(m["context_length"], m["max_model_len"], "{m}");
    assert_eq!(
        m["quantization"],
        json!({"experts_bits": 2, "dense_bits": 8, "group_size": 64}),
        "{m}"
    );
}

#[test]
fn embeddings_and_unknown_paths_get_json_404s() {
    let Some(dir) = model_dir("serve-info-404") else {
        return;
    };
    let srv = Server::start(&dir, &[]);
    let emb = srv.post(
        "/v1/embeddings",
        &json!({"model": "tiny-a", "input": "hello"}),
    );
    let msg = error_message(&emb, 404);
    assert!(msg.contains("does not compute embeddings"), "{msg}");
    assert_eq!(emb.json()["error"]["code"], "embeddings_not_supported");
    // Whatever the method.
    let msg = error_message(&srv.get("/v1/embeddings"), 404);
    assert!(msg.contains("does not compute embeddings"), "{msg}");

    for path in ["/v1/audio/speech", "/v1/nothing/at/all", "/api/nothing"] {
        let msg = error_message(&srv.post(path, &json!({})), 404);
        assert!(msg.contains(path), "{path}: {msg}");
    }
    // Still serving.
    assert_eq!(srv.get("/health").status, 200);
}

#[test]
fn ollama_tags_and_show() {
    let Some(dir) = model_dir("serve-info-ollama") else {
        return;
    };
    let srv = Server::start(&dir, &["--ctx-size", "1000"]);
    let tags = srv.get("/api/tags");
    assert_eq!(tags.status, 200, "{}", tags.body);
    let tags = tags.json();
    let m = &tags["models"][0];
    assert_eq!(tags["models"].as_array().map(Vec::len), Some(1), "{tags}");
    assert_eq!(m["name"], "tiny-a");
    assert_eq!(m["model"], "tiny-a");
    assert!(m["size"].as_u64().is_some_and(|s| s > 0), "{m}");
    let modified = m["modified_at"].as_str().unwrap_or("");
    assert!(
        modified.len() == 20 && modified.starts_with("20") && modified.ends_with('Z'),
        "{m}"
    );
    assert_eq!(m["details"]["quantization_level"], "BF16", "{m}");
    let family = m["details"]["family"].as_str().unwrap_or("").to_string();
    assert!(!family.is_empty(), "{m}");

    // Both the bare name and Ollama's default tag; `name` as older clients send it.
    for body in [
        json!({"model": "tiny-a"}),
        json!({"model": "tiny-a:latest"}),
        json!({"name": "tiny-a"}),
    ] {
        let show = srv.post("/api/show", &body);
        assert_eq!(show.status, 200, "{body}: {}", show.body);
        let v = show.json();
        assert_eq!(
            v["model_info"]["general.architecture"],
            family.as_str(),
            "{v}"
        );
        assert_eq!(
            v["model_info"][format!("{family}.context_length")],
            1000,
            "{v}"
        );
        assert_eq!(v["details"], m["details"], "{v}");
        assert!(
            v["capabilities"]
                .as_array()
                .is_some_and(|c| c.contains(&json!("completion"))),
            "{v}"
        );
    }

    // Errors in Ollama's shape.
    let missing = srv.post("/api/show", &json!({"model": "llama3"}));
    assert_eq!(missing.status, 404, "{}", missing.body);
    let msg = missing.json()["error"].as_str().unwrap_or("").to_string();
    assert!(msg.contains("llama3") && msg.contains("tiny-a"), "{msg}");
    let bad = request(&srv.addr, "POST", "/api/show", &[], b"{not json");
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.json()["error"].is_string(), "{}", bad.body);
    assert_eq!(srv.post("/api/show", &json!({})).status, 400);
}

#[test]
fn ollama_routes_need_the_key() {
    let Some(dir) = model_dir("serve-info-ollama-key") else {
        return;
    };
    let srv = Server::start(&dir, &["--api-key", "k1"]);
    assert_eq!(srv.get("/api/tags").status, 401);
    let ok = request(
        &srv.addr,
        "GET",
        "/api/tags",
        &[("Authorization", "Bearer k1")],
        b"",
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
}
