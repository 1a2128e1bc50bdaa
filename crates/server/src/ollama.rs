//! The read-only part of Ollama's API that front ends call to list and describe models
//! (`GET /api/tags`, `POST /api/show`), so that they can be pointed at flashmoe. Errors are
//! in Ollama's shape, `{"error": "..."}`.
use std::path::Path;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use flashmoe_core::clock::utc;
use flashmoe_runtime::Engine;
use serde_json::{json, Value};

use crate::metrics::Endpoint;
use crate::routes::AppState;

/// What Ollama's model descriptions need that `/v1/models` does not, gathered at start.
#[derive(Debug, Clone)]
pub struct Facts {
    /// `general.architecture` (e.g. `qwen3_moe`).
    pub arch: String,
    /// Bytes of the model directory's files.
    pub size: u64,
    /// Newest modification of those files, RFC 3339 UTC.
    pub modified_at: String,
    /// Whether a chat template (which renders tool definitions) was found.
    pub has_template: bool,
}

impl Facts {
    pub fn of(engine: &Engine) -> Facts {
        let arch = serde_json::to_value(engine.model().cfg.arch)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        let (size, newest) = dir_size_and_mtime(engine.model_dir());
        Facts {
            arch,
            size,
            modified_at: utc(newest),
            has_template: engine.template().is_some(),
        }
    }
}

/// Sum of the sizes and newest mtime (unix seconds) of the files directly in `dir`; files
/// that cannot be read are left out (the description is informational).
fn dir_size_and_mtime(dir: &Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .fold((0, 0), |(size, newest), m| {
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            (size + m.len(), newest.max(t))
        })
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn details(st: &AppState) -> Value {
    let level = match &st.quantization {
        Some(q) if q.experts_bits == 16 => "BF16".to_string(),
        Some(q) => format!("Q{}", q.experts_bits),
        None => String::new(),
    };
    json!({
        "parent_model": "",
        "format": "flashmoe",
        "family": st.facts.arch,
        "families": [st.facts.arch],
        "parameter_size": "",
        "quantization_level": level,
    })
}

/// `GET /api/tags`: the one model this server serves.
pub async fn tags(State(st): State<Arc<AppState>>) -> Json<Value> {
    st.metrics.request(Endpoint::Other);
    Json(json!({"models": [{
        "name": st.model_name,
        "model": st.model_name,
        "modified_at": st.facts.modified_at,
        "size": st.facts.size,
        "details": details(&st),
    }]}))
}

/// Whether Ollama's `name[:tag]` names the served model (`:latest` is Ollama's default tag).
pub(crate) fn is_served(st: &AppState, name: &str) -> bool {
    name == st.model_name || name.strip_suffix(":latest") == Some(st.model_name.as_str())
}

/// `POST /api/show {"model": NAME}` (older clients send `name`).
pub async fn show(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    st.metrics.request(Endpoint::Other);
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            st.metrics.client_error();
            return error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}"));
        }
    };
    let Some(name) = v
        .get("model")
        .or_else(|| v.get("name"))
        .and_then(Value::as_str)
    else {
        st.metrics.client_error();
        return error(
            StatusCode::BAD_REQUEST,
            "missing field `model` (the model's name)".into(),
        );
    };
    if !is_served(&st, name) {
        st.metrics.client_error();
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "model '{name}' not found; this server serves '{}'",
                st.model_name
            ),
        );
    }
    let arch = &st.facts.arch;
    let mut capabilities = vec!["completion"];
    if st.facts.has_template {
        capabilities.push("tools");
    }
    let mut info = json!({
        "general.architecture": arch,
        format!("{arch}.context_length"): st.context,
    });
    if let Some(q) = &st.quantization {
        info["flashmoe.quantization"] = q.json();
    }
    Json(json!({
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": details(&st),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": st.facts.modified_at,
    }))
    .into_response()
}
