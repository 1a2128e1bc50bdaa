//! flashmoe-server: an OpenAI-compatible HTTP API over one model (`flashmoe serve`), with
//! Anthropic's Messages API and Ollama's chat and generate routes beside it.
//!
//! Owns HTTP only: request validation, OpenAI response shapes, SSE streaming, the bounded
//! queue in front of the single generation thread, API-key checks and metrics. Generation
//! itself is `flashmoe_runtime::Engine`'s.
mod anthropic;
mod anthropic_stream;
mod api;
mod error;
mod format;
mod info;
mod listen;
mod metrics;
mod ollama;
mod ollama_chat;
mod ollama_generate;
mod page;
mod routes;
mod signals;
mod structured;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post};
use axum::Router;
use flashmoe_runtime::{Engine, GenerationRequest, LoadOptions};

pub use crate::error::ApiError;
use crate::listen::Limits;
use crate::metrics::Metrics;
use crate::routes::AppState;
use crate::worker::Queue;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model_dir: PathBuf,
    pub host: String,
    /// 0 picks a free port (the address is printed on stdout).
    pub port: u16,
    pub api_key: Option<String>,
    /// Requests that may wait while one generates; more are refused with 429.
    pub max_queue: usize,
    pub max_body_bytes: usize,
    /// Time for a request's headers, from connecting or from the previous response.
    pub header_timeout: Duration,
    /// Time for a request's body once its headers are in, and longest stall of a client
    /// reading its response.
    pub idle_timeout: Duration,
    /// Open connections beyond this are answered 503.
    pub max_connections: usize,
    /// Serve `/metrics` without the API key.
    pub metrics_public: bool,
    pub load: LoadOptions,
    /// Texts answered in turn instead of generating, streamed as the model's output would be
    /// (a test hook for front ends: `serve --scripted-replies F`); empty: generate.
    pub scripted_replies: Vec<String>,
}

impl ServeOptions {
    pub fn new(model_dir: PathBuf) -> Self {
        ServeOptions {
            model_dir,
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            max_queue: 16,
            max_body_bytes: 4 << 20,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 256,
            metrics_public: false,
            load: LoadOptions::default(),
            scripted_replies: Vec::new(),
        }
    }
}

/// The validator `serve` applies to a `/v1/chat/completions` body, for other front ends that
/// take the same JSON (`flashmoe render`), so that both accept and refuse the same requests.
/// `context`: the model's context in tokens (`usize::MAX` when no model is loaded).
pub fn parse_chat_request(
    body: &serde_json::Value,
    context: usize,
) -> Result<GenerationRequest, ApiError> {
    Ok(api::parse_chat(api::as_object(body)?, context)?.req)
}

/// Loads the model, binds, prints `flashmoe serve: listening on http://ADDR` on stdout and
/// serves until SIGINT or SIGTERM (see `signals`).
pub fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let engine = Engine::open(&opts.model_dir, opts.load.clone())
        .with_context(|| format!("loading model from {}", opts.model_dir.display()))?;
    eprintln!("flashmoe serve: {}", engine.context_plan());
    let metrics = Arc::new(Metrics::default());
    let model_name = engine.model_name().to_string();
    let context = engine.context_len();
    let quantization = info::quantization(&engine);
    let facts = ollama::Facts::of(&engine);
    let replies = opts.scripted_replies.clone();
    let queue = Queue::start(engine, opts.max_queue, metrics.clone(), replies)
        .context("starting the generation thread")?;
    let api_key = opts.api_key.clone().filter(|k| !k.is_empty());
    let state = Arc::new(AppState {
        queue: queue.clone(),
        metrics: metrics.clone(),
        model_name: model_name.clone(),
        context,
        quantization,
        facts,
        api_key: api_key.clone(),
        max_body_bytes: opts.max_body_bytes,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        body_timeout: opts.idle_timeout,
    });
    let auth = axum::middleware::from_fn_with_state(state.clone(), routes::auth);
    let v1 = Router::new()
        .route("/chat/completions", post(routes::chat_completions))
        .route("/completions", post(routes::completions))
        .route("/models", get(routes::models))
        .route("/models/{id}", get(routes::model))
        .route("/embeddings", any(routes::embeddings))
        .layer(auth.clone());
    // Anthropic's routes check the key themselves (`x-api-key` too) and answer in its shape.
    let anthropic_auth = axum::middleware::from_fn_with_state(state.clone(), anthropic::auth);
    let v1 = v1
        .route(
            "/messages",
            post(anthropic::messages_route).layer(anthropic_auth.clone()),
        )
        .route(
            "/messages/count_tokens",
            post(anthropic::count_tokens).layer(anthropic_auth),
        );
    let ollama_api = Router::new()
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/chat", post(ollama_chat::chat))
        .route("/api/generate", post(ollama_generate::generate))
        .layer(auth.clone());
    let mut metrics_route = Router::new().route("/metrics", get(routes::metrics));
    if !opts.metrics_public {
        metrics_route = metrics_route.layer(auth);
    }
    let app = Router::new()
        .nest("/v1", v1)
        .merge(ollama_api)
        .merge(metrics_route)
        .merge(page::routes())
        .route("/health", get(routes::health))
        .fallback(routes::not_found)
        .layer(DefaultBodyLimit::max(opts.max_body_bytes))
        .with_state(state);
    let limits = Limits {
        header_timeout: opts.header_timeout,
        idle_timeout: opts.idle_timeout,
        max_connections: opts.max_connections,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let signals = signals::Signals::new().context("installing the signal handlers")?;
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
            .await
            .with_context(|| format!("binding {}:{}", opts.host, opts.port))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        println!(
            "flashmoe serve: listening on http://{addr} (model `{model_name}`, context {context})"
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(signals.run(queue, stop_tx));
        listen::serve(listener, app, limits, stop_rx, metrics).await;
        println!("flashmoe serve: stopped");
        anyhow::Ok(())
    })?;
    // Connections still open after the drain are dropped with the runtime.
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(())
}
