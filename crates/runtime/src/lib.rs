//! flashmoe-runtime: the generation engine every front end shares (`run`, `chat`, `serve`).
//!
//! Owns the path from a request (chat messages, raw text or ids) to streamed events: rendering
//! with the model's chat template, tokenizing, context checks, prefix reuse through the core
//! [`Session`](flashmoe_core::session::Session)'s snapshots, sampling, stop ids and strings, and
//! the split of generated text into content, reasoning and tool calls. It never does I/O with
//! users (no terminal, no sockets): front ends turn [`Event`]s into whatever they show.
pub mod context;
pub mod engine;
pub mod error;
mod generate;
mod guide;
pub mod prompt;
mod replay;
pub mod request;
pub mod testutil;

pub use context::ContextPlan;
pub use engine::{Engine, LoadOptions};
pub use error::{Result, RuntimeError};
pub use flashmoe_core::session::BackendFactory;
pub use request::{
    Done, Event, ExpertIo, FinishReason, GenerationRequest, PromptInput, SamplingOverrides,
    Timings, ToolCall, ToolChoice, Usage,
};
