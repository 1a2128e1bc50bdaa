//! `flashmoe serve`: the OpenAI-compatible HTTP server (flashmoe-server) over one model.
use anyhow::Result;
use clap::Args as ClapArgs;
use flashmoe_server::{serve, ServeOptions};

use super::common::ModelArgs;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to bind (loopback only unless told otherwise)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed on stdout)
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 requests
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests that may wait while one generates; more get 429 with Retry-After
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// Largest request body in bytes (larger gets 413)
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body: usize,
    /// Name the model answers to in `model` (default: the model directory's name)
    #[arg(long)]
    pub served_model_name: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    let mut opts = ServeOptions::new(a.model.model.clone());
    opts.host = a.host;
    opts.port = a.port;
    opts.api_key = a.api_key;
    opts.max_queue = a.max_queue;
    opts.max_body_bytes = a.max_body;
    a.model.opts.apply_kernel_switches()?;
    opts.load = a.model.opts.runtime_options()?;
    opts.load.model_name = a.served_model_name;
    serve(opts)
}
