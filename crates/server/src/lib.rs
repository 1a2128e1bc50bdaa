//! flashmoe-server: an OpenAI-compatible HTTP API over one model (`flashmoe serve`).
//!
//! Owns HTTP only: request validation, OpenAI response shapes, SSE streaming, the bounded
//! queue in front of the single generation thread, API-key checks and metrics. Generation
//! itself is `flashmoe_runtime::Engine`'s.
mod api;
mod error;
mod format;
mod metrics;
mod routes;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use flashmoe_runtime::{Engine, LoadOptions};

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
    pub load: LoadOptions,
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
            load: LoadOptions::default(),
        }
    }
}

/// Loads the model, binds, prints `flashmoe serve: listening on http://ADDR` on stdout and
/// serves until Ctrl-C.
pub fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let engine = Engine::open(&opts.model_dir, opts.load.clone())
        .with_context(|| format!("loading model from {}", opts.model_dir.display()))?;
    eprintln!("flashmoe serve: {}", engine.context_plan());
    let metrics = Arc::new(Metrics::default());
    let model_name = engine.model_name().to_string();
    let context = engine.context_len();
    let queue = Queue::start(engine, opts.max_queue, metrics.clone())
        .context("starting the generation thread")?;
    let state = Arc::new(AppState {
        queue,
        metrics,
        model_name: model_name.clone(),
        context,
        api_key: opts.api_key.clone().filter(|k| !k.is_empty()),
        max_body_bytes: opts.max_body_bytes,
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    let v1 = Router::new()
        .route("/chat/completions", post(routes::chat_completions))
        .route("/completions", post(routes::completions))
        .route("/models", get(routes::models))
        .route("/models/{id}", get(routes::model))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::auth,
        ));
    let app = Router::new()
        .nest("/v1", v1)
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .layer(DefaultBodyLimit::max(opts.max_body_bytes))
        .with_state(state);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
            .await
            .with_context(|| format!("binding {}:{}", opts.host, opts.port))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        println!(
            "flashmoe serve: listening on http://{addr} (model `{model_name}`, context {context})"
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving HTTP")
    })
}
