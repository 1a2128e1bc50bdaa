//! `flashmoe serve`: the OpenAI-compatible HTTP server (flashmoe-server) over one model.
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Args as ClapArgs;
use flashmoe_server::{serve, ServeOptions};

use super::common::ModelArgs;

/// Shown after the options of `serve --help`: the policies a user should know.
const AFTER_HELP: &str = "\
Chat page: open http://HOST:PORT/ in a browser (built in; with --api-key it asks for the key).

Stopping: the first SIGINT or SIGTERM prints \"shutting down\", stops accepting connections, \
cancels the running generation and answers it and every queued request 503, then exits once \
responses are sent (after 10 s at most); a second signal exits at once.

Model files: the weights are read in place from the model's files. If one of them is \
truncated, rewritten or replaced while the server runs, every generation is refused with a \
500 naming the file (and /health answers 503) until the server is restarted; the server itself \
keeps running. Replace a model by starting a new server on it.

Requests: fields the server does not implement (response_format other than text, suffix, \
logprobs, logit_bias, best_of, functions, audio) are refused with 400, never ignored. As in \
vLLM, \"ignore_eos\": true generates exactly max_tokens.";

#[derive(ClapArgs, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind (loopback only unless told otherwise)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed on stdout)
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` (scheme in any case) on /v1 requests and /metrics
    #[arg(long)]
    pub api_key: Option<String>,
    /// Serve /metrics without the API key (default: behind it when --api-key is set)
    #[arg(long)]
    pub metrics_public: bool,
    /// Requests that may wait while one generates; more get 429 with Retry-After
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// Largest request body in bytes (larger gets 413)
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body: usize,
    /// Name the model answers to in `model` (default: the model directory's name)
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Seconds a client has to send a request's headers, counted from connecting or from its
    /// previous response: stalled and idle keep-alive connections are closed after this
    #[arg(long, value_name = "SECS", default_value_t = 30.0, value_parser = seconds)]
    pub header_timeout: f64,
    /// Seconds to receive a request's body once its headers are in (later: 408), and the longest
    /// a client may stop reading its response before the connection is dropped (which cancels
    /// its generation)
    #[arg(long, value_name = "SECS", default_value_t = 60.0, value_parser = seconds)]
    pub idle_timeout: f64,
    /// Open connections at most; more are answered 503 with Retry-After and closed
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Test hook: a JSON array of strings answered in turn (cycling) instead of generating,
    /// streamed token by token through the same parsing (exercises front ends: tool calls,
    /// thinking, stop)
    #[arg(long, hide = true, value_name = "F")]
    pub scripted_replies: Option<std::path::PathBuf>,
}

/// A timeout in seconds: finite, positive, at most a day.
fn seconds(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if x.is_finite() && x > 0.0 && x <= 86_400.0 {
        Ok(x)
    } else {
        Err(format!("`{s}`: expected seconds in (0, 86400]"))
    }
}

pub fn run(a: Args) -> Result<()> {
    let mut opts = ServeOptions::new(a.model.model.clone());
    opts.host = a.host;
    opts.port = a.port;
    opts.api_key = a.api_key;
    opts.max_queue = a.max_queue;
    opts.max_body_bytes = a.max_body;
    opts.metrics_public = a.metrics_public;
    opts.header_timeout = Duration::from_secs_f64(a.header_timeout);
    opts.idle_timeout = Duration::from_secs_f64(a.idle_timeout);
    opts.max_connections = a.max_connections as usize;
    a.model.opts.apply_kernel_switches()?;
    opts.load = a.model.opts.runtime_options()?;
    opts.load.model_name = a.served_model_name;
    if let Some(p) = &a.scripted_replies {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        opts.scripted_replies = serde_json::from_str(&text)
            .with_context(|| format!("{}: expected a JSON array of strings", p.display()))?;
    }
    a.model.opts.trace.install(&a.model.model)?;
    serve(opts)
}
