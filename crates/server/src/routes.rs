//! HTTP handlers: chat and text completions (streamed as SSE or whole), models, health,
//! metrics, and the API-key check. Handlers only translate; the worker thread generates.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
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
use crate::worker::{CancelGuard, Msg, Queue};

pub struct AppState {
    pub queue: Queue,
    pub metrics: Arc<Metrics>,
    pub model_name: String,
    pub context: usize,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub started: u64,
}

type St = State<Arc<AppState>>;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    let tail: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("{prefix}{tail}")
}

/// 401 unless `Authorization: Bearer KEY` matches (only when the server has a key).
pub async fn auth(State(st): St, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given.map(str::trim) != Some(key.as_str()) {
            st.metrics.client_error();
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
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
    json!({
        "id": st.model_name,
        "object": "model",
        "created": st.started,
        "owned_by": "flashmoe",
        "max_model_len": st.context,
    })
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

pub async fn not_found() -> Response {
    ApiError::not_found("no such endpoint").into_response()
}

pub async fn chat_completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    st.metrics.request(Endpoint::Chat);
    respond(&st, Kind::Chat, body).await
}

pub async fn completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    st.metrics.request(Endpoint::Completions);
    respond(&st, Kind::Completion, body).await
}

async fn respond(st: &Arc<AppState>, kind: Kind, body: Result<Bytes, BytesRejection>) -> Response {
    match generate(st, kind, body).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_client_error() && e.status != StatusCode::TOO_MANY_REQUESTS {
                st.metrics.client_error();
            }
            e.into_response()
        }
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

async fn generate(
    st: &Arc<AppState>,
    kind: Kind,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| body_error(st, e))?;
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
    // The first message tells whether the request was accepted by the engine (context checks,
    // template errors) before any response status is committed.
    let first = match rx.recv().await {
        Some(Msg::Error(e)) => return Err(e),
        Some(Msg::Event(ev)) => ev,
        None => return Err(ApiError::internal("the generation ended without a result")),
    };
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
        next = match rx.recv().await {
            Some(Msg::Event(ev)) => Some(ev),
            Some(Msg::Error(e)) => return Err(e),
            None => return Err(ApiError::internal("the generation ended without a result")),
        };
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
