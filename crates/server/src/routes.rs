//! HTTP handlers: chat and text completions (streamed as SSE or whole), models, health,
//! metrics, and the API-key check. Handlers only translate; the worker thread generates.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flashmoe_runtime::Event;
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::{self, Parsed};
use crate::error::ApiError;
use crate::format::{full_response, Chunks, Collected, Kind};
use crate::metrics::{Endpoint, Metrics};
use crate::worker::{recv_event, CancelGuard, Msg, Queue};

pub struct AppState {
    pub queue: Queue,
    pub metrics: Arc<Metrics>,
    pub model_name: String,
    pub context: usize,
    /// Weight precision, reported by `/v1/models`; None when it could not be read.
    pub quantization: Option<crate::info::Quantization>,
    /// What Ollama's `/api/tags` and `/api/show` report besides name and context.
    pub facts: crate::ollama::Facts,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub started: u64,
    /// Longest wait for a request body once its headers are in.
    pub body_timeout: Duration,
}

type St = State<Arc<AppState>>;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn new_id(prefix: &str) -> String {
    let tail: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}{tail}")
}

/// The key in an `Authorization: Bearer KEY` header; the scheme is case-insensitive (RFC 9110).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// Compares in time independent of where the first difference is.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether the request may pass: the server has no key, or `Authorization: Bearer KEY`
/// matches (or, with `x_api_key`, Anthropic's `x-api-key: KEY` header does).
pub(crate) fn key_ok(st: &AppState, headers: &header::HeaderMap, x_api_key: bool) -> bool {
    let Some(key) = &st.api_key else {
        return true;
    };
    let value = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let given = value(header::AUTHORIZATION).and_then(bearer);
    let given = given.or(value(header::HeaderName::from_static("x-api-key")).filter(|_| x_api_key));
    given.is_some_and(|g| same_key(g.trim(), key))
}

/// 401 unless `Authorization: Bearer KEY` matches (only when the server has a key).
pub async fn auth(State(st): St, req: Request, next: Next) -> Response {
    if !key_ok(&st, req.headers(), false) {
        st.metrics.client_error();
        return ApiError::unauthorized().into_response();
    }
    next.run(req).await
}

/// 200 while the model can serve; 503 once a model file changed on disk (every generation is
/// then refused with a 500 naming the file until the server is restarted), so that a supervisor
/// restarts it. Public, so it does not name the file.
pub async fn health() -> Response {
    match flashmoe_core::mapguard::check_unchanged() {
        Ok(()) => Json(json!({"status": "ok"})).into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "message":
                "a model file changed on disk while loaded; restart the server to load it"})),
        )
            .into_response(),
    }
}

pub async fn metrics(State(st): St) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

fn model_json(st: &AppState) -> Value {
    let mut v = json!({
        "id": st.model_name,
        "object": "model",
        "created": st.started,
        "owned_by": "flashmoe",
        "max_model_len": st.context,
        "context_length": st.context,
    });
    if let Some(q) = &st.quantization {
        v["quantization"] = q.json();
    }
    v
}

pub async fn models(State(st): St) -> Json<Value> {
    st.metrics.request(Endpoint::Other);
    Json(json!({"object": "list", "data": [model_json(&st)]}))
}

pub async fn model(
    State(st): St,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if id == st.model_name {
        Json(model_json(&st)).into_response()
    } else {
        ApiError::not_found(format!("model `{id}` does not exist"))
            .with_code("model_not_found")
            .into_response()
    }
}

/// Any path no route takes: a JSON 404 naming it, so that a client pointed at a route this
/// server lacks says which.
pub async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::not_found(format!(
        "no such endpoint: {method} {}; this server has /v1/chat/completions, \
         /v1/completions, /v1/messages, /v1/models, /api/tags, /api/show, /api/chat, \
         /api/generate, /health and /metrics",
        uri.path()
    ))
    .with_code("unknown_url")
    .into_response()
}

/// Clients that ask for embeddings (RAG front ends, agents) learn that this server only
/// generates, instead of a bare 404 that looks like a wrong base URL.
pub async fn embeddings(State(st): St) -> Response {
    st.metrics.client_error();
    ApiError::not_found(format!(
        "this server does not compute embeddings: `{}` is served for text generation only \
         (/v1/chat/completions, /v1/completions); use a separate embedding model server",
        st.model_name
    ))
    .with_code("embeddings_not_supported")
    .into_response()
}

pub async fn chat_completions(State(st): St, req: Request) -> Response {
    st.metrics.request(Endpoint::Chat);
    respond(&st, Kind::Chat, req).await
}

pub async fn completions(State(st): St, req: Request) -> Response {
    st.metrics.request(Endpoint::Completions);
    respond(&st, Kind::Completion, req).await
}

/// The body, within the size limit and `body_timeout` (a client that stalls mid-upload is
/// answered 408 instead of holding its connection for good).
pub(crate) async fn read_body(st: &AppState, req: Request) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(st.body_timeout, Bytes::from_request(req, &())).await {
        Ok(body) => body.map_err(|e| body_error(st, e)),
        Err(_) => Err(ApiError::body_timeout(st.body_timeout.as_secs_f64())),
    }
}

async fn respond(st: &Arc<AppState>, kind: Kind, req: Request) -> Response {
    let result = match read_body(st, req).await {
        Ok(body) => generate(st, kind, body).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(r) => r,
        Err(e) => {
            count_error(st, &e);
            e.into_response()
        }
    }
}

/// Counts a refused request as the client's fault unless the server was only busy.
pub(crate) fn count_error(st: &AppState, e: &ApiError) {
    if e.status.is_client_error() && e.status != StatusCode::TOO_MANY_REQUESTS {
        st.metrics.client_error();
    }
}

fn body_error(st: &AppState, e: BytesRejection) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::invalid(
            format!("the request body exceeds {} bytes", st.max_body_bytes),
            None,
        )
        .status(status)
        .with_code("request_too_large")
    } else {
        ApiError::invalid(format!("reading the request body: {}", e.body_text()), None)
            .status(status)
    }
}

async fn generate(st: &Arc<AppState>, kind: Kind, body: Bytes) -> Result<Response, ApiError> {
    let obj = api::parse_body(&body)?;
    let Parsed {
        req,
        stream,
        include_usage,
        model,
    } = match kind {
        Kind::Chat => api::parse_chat(&obj, st.context)?,
        Kind::Completion => api::parse_completion(&obj, st.context)?,
    };
    if let Some(m) = &model {
        if m != &st.model_name {
            return Err(ApiError::not_found(format!(
                "model `{m}` does not exist; this server serves `{}`",
                st.model_name
            ))
            .with_code("model_not_found")
            .status(StatusCode::NOT_FOUND));
        }
    }
    let (mut rx, guard) = st.queue.submit(req)?;
    let first = recv_event(&mut rx).await?;
    let id = new_id(if kind == Kind::Chat {
        "chatcmpl-"
    } else {
        "cmpl-"
    });
    let created = now();
    if stream {
        let chunks = Chunks {
            kind,
            id,
            created,
            model: st.model_name.clone(),
            include_usage,
        };
        let mut pending: VecDeque<String> = chunks
            .opening()
            .map(|c| c.to_string())
            .into_iter()
            .collect();
        let finished = on_event(&chunks, &first, &mut pending);
        let s = SseStream {
            rx,
            _guard: guard,
            chunks,
            pending,
            finished,
        };
        return Ok(Sse::new(s).into_response());
    }
    let mut c = Collected {
        content: String::new(),
        reasoning: String::new(),
        calls: Vec::new(),
    };
    let mut next = Some(first);
    while let Some(ev) = next.take() {
        match ev {
            Event::Content(t) => c.content.push_str(&t),
            Event::Reasoning(t) => c.reasoning.push_str(&t),
            Event::ToolCall(call) => c.calls.push(call),
            Event::Done(d) => {
                drop(guard);
                return Ok(
                    Json(full_response(kind, &id, created, &st.model_name, &c, &d)).into_response(),
                );
            }
        }
        next = Some(recv_event(&mut rx).await?);
    }
    Err(ApiError::internal("the generation ended without a result"))
}

/// Appends the SSE payloads for one event; true when it was the last.
fn on_event(chunks: &Chunks, ev: &Event, out: &mut VecDeque<String>) -> bool {
    match ev {
        Event::Content(t) => out.push_back(chunks.content(t).to_string()),
        Event::Reasoning(t) if chunks.kind == Kind::Chat => {
            out.push_back(chunks.reasoning(t).to_string())
        }
        Event::Reasoning(_) => {}
        Event::ToolCall(c) => out.push_back(chunks.tool_call(c).to_string()),
        Event::Done(d) => {
            out.extend(chunks.done(d).into_iter().map(|c| c.to_string()));
            out.push_back("[DONE]".into());
            return true;
        }
    }
    false
}

/// The SSE body: events from the worker, formatted as chunks. Dropping it (the client went
/// away) drops the guard, which cancels the generation.
struct SseStream {
    rx: UnboundedReceiver<Msg>,
    _guard: CancelGuard,
    chunks: Chunks,
    pending: VecDeque<String>,
    finished: bool,
}

impl futures_core::Stream for SseStream {
    type Item = Result<SseEvent, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(data) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(SseEvent::default().data(data))));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(Msg::Event(ev))) => {
                    this.finished = on_event(&this.chunks, &ev, &mut this.pending);
                }
                Poll::Ready(Some(Msg::Error(e))) => {
                    // Headers are sent already: report the error in-band, as OpenAI does.
                    this.pending.push_back(e.body().to_string());
                    this.finished = true;
                }
                Poll::Ready(None) => {
                    let e = ApiError::internal("the generation ended without a result");
                    this.pending.push_back(e.body().to_string());
                    this.finished = true;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
