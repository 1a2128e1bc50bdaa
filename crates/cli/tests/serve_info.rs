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
