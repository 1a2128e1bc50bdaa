//! What a front end asks for ([`GenerationRequest`]) and what it gets back ([`Event`], [`Done`]).
//! Plain data: no behaviour beyond merging sampling settings over the model's defaults.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use flashmoe_text::{GrammarSpec, SamplingParams};
use serde::Serialize;
use serde_json::Value;

/// The prompt, in one of three forms.
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// A conversation rendered with the model's chat template.
    Messages {
        /// OpenAI-style message objects (`role`, `content`, `tool_calls`, `reasoning_content`...).
        messages: Vec<Value>,
        /// OpenAI-style tool definitions (`[{"type":"function","function":{...}}]`); empty: none.
        tools: Vec<Value>,
        /// `None` leaves the template's default (thinking on for Qwen3.5).
        enable_thinking: Option<bool>,
        /// Open an assistant turn at the end (what a chat completion wants).
        add_generation_prompt: bool,
    },
    /// Raw text, tokenized as is (special tokens spelled out are recognised).
    Text(String),
    /// Token ids, used as they are.
    Ids(Vec<u32>),
}

impl PromptInput {
    /// A chat prompt with the generation prompt opened and the template's thinking default.
    pub fn chat(messages: Vec<Value>) -> Self {
        PromptInput::Messages {
            messages,
            tools: Vec::new(),
            enable_thinking: None,
            add_generation_prompt: true,
        }
    }
}

/// Which tool calls the model may make (OpenAI `tool_choice`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides; calls in its output are parsed.
    #[default]
    Auto,
    /// No calls: tools are left out of the prompt and any call markup stays plain content.
    None,
    /// A call is forced: the assistant turn is opened with the call tag (thinking off).
    Required,
    /// This function is forced: only it is offered and its call is opened for the model.
    Function(String),
}

/// Sampling settings a request may set; `None` keeps the model's default
/// (`generation_config.json`, else greedy).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingOverrides {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
}

impl SamplingOverrides {
    /// These overrides applied over `base`.
    pub fn apply(&self, base: &SamplingParams) -> SamplingParams {
        let mut p = base.clone();
        if let Some(v) = self.temperature {
            p.temperature = v;
        }
        if let Some(v) = self.top_k {
            p.top_k = v;
        }
        if let Some(v) = self.top_p {
            p.top_p = v;
        }
        if let Some(v) = self.min_p {
            p.min_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            p.repetition_penalty = v;
        }
        if let Some(v) = self.presence_penalty {
            p.presence_penalty = v;
        }
        if let Some(v) = self.frequency_penalty {
            p.frequency_penalty = v;
        }
        if self.seed.is_some() {
            p.seed = self.seed;
        }
        p
    }
}

/// One generation.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: PromptInput,
    pub tool_choice: ToolChoice,
    pub sampling: SamplingOverrides,
    /// Most tokens to generate; `None`: up to the end of the context.
    pub max_tokens: Option<usize>,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
    /// Generate `max_tokens` whatever the model samples: end-of-sequence ids do not stop it
    /// (vLLM's `ignore_eos`, for benchmarks and tests that need a known length).
    pub ignore_eos: bool,
    /// Emit all generated text as [`Event::Content`], with no reasoning or tool-call parsing
    /// (plain completions).
    pub raw: bool,
    /// Set from another thread to stop the generation before its next forward pass (the
    /// result then says [`FinishReason::Cancelled`]).
    pub cancel: Option<Arc<AtomicBool>>,
    /// `max_tokens` beyond what the context leaves after the prompt is lowered to what is left
    /// instead of refused (the result then says [`FinishReason::Length`] with fewer tokens);
    /// for APIs whose clients send one large `max_tokens` whatever the prompt (Anthropic's).
    pub clamp_max_tokens: bool,
    /// Set once the prompt is prefilled, before the first event: the prompt's part of
    /// [`Done::usage`] (`completion_tokens` 0), for streams that report it at their start.
    pub prompt_usage: Option<Arc<OnceLock<Usage>>>,
    /// The answer must match this grammar (OpenAI `response_format`, a Lark `grammar`): at
    /// every step only tokens that keep it inside the grammar are sampled, and end-of-sequence
    /// only where it is complete. A prompt that opens `<think>` is constrained after `</think>`.
    pub grammar: Option<GrammarSpec>,
    /// Tool calls follow their tool's parameter schema (OpenAI `"strict": true`), when a
    /// `tool_choice` forces one and whenever the model opens one; a tool whose
    /// `function.strict` is `false` only has its call's shape constrained. `false`: calls are
    /// not constrained at all.
    pub constrain_tools: bool,
}

impl GenerationRequest {
    pub fn new(prompt: PromptInput) -> Self {
        GenerationRequest {
            prompt,
            tool_choice: ToolChoice::Auto,
            sampling: SamplingOverrides::default(),
            max_tokens: None,
            stop: Vec::new(),
            ignore_eos: false,
            raw: false,
            cancel: None,
            clamp_max_tokens: false,
            prompt_usage: None,
            grammar: None,
            constrain_tools: true,
        }
    }
}

impl GenerationRequest {
    /// Whether [`cancel`](Self::cancel) has been set.
    pub fn is_cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// A parsed tool call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    /// 0-based position among this generation's calls.
    pub index: usize,
    /// Unique id (`call_` + 24 alphanumerics), as OpenAI clients expect.
    pub id: String,
    pub name: String,
    /// The arguments as a JSON object string (OpenAI sends arguments as a string).
    pub arguments: String,
}

/// What a generation streams.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Visible answer text.
    Content(String),
    /// Thinking text.
    Reasoning(String),
    /// A complete tool call.
    ToolCall(ToolCall),
    /// The end: sent once, last, unless the callback cancelled.
    Done(Done),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence id or a stop string.
    Stop,
    /// `max_tokens` (or the context) was reached.
    Length,
    /// The model ended its turn after making tool calls.
    ToolCalls,
    /// The callback returned `Break`.
    Cancelled,
}

impl FinishReason {
    /// OpenAI's spelling (`stop`, `length`, `tool_calls`); a cancelled generation never reaches
    /// a client, `cancelled` is for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Sampled tokens, the end-of-sequence id included.
    pub completion_tokens: usize,
    /// Prompt tokens taken from a saved state instead of being prefilled.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Rendering and tokenizing the prompt.
    pub prepare_ms: f64,
    /// Prefilling the prompt tokens that were not reused.
    pub prefill_ms: f64,
    /// From the start of `generate` to the first sampled token.
    pub ttft_ms: f64,
    /// From the first sampled token to the end.
    pub decode_ms: f64,
    /// Tokens per second after the first one (0 when fewer than two were sampled).
    pub decode_tok_s: f64,
    /// Part of `decode_ms` spent on grammar masks (computing them, applying them to the
    /// logits, advancing the grammar); 0 without constraints.
    pub mask_ms: f64,
    pub total_ms: f64,
}

/// Expert reads during this generation (differences of the ExpertSource counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ExpertIo {
    pub fetched: u64,
    pub bytes_read: u64,
    /// Bytes served without touching the disk (page cache as measured, or a RAM/VRAM cache).
    pub bytes_cached: u64,
    pub read_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Done {
    pub finish_reason: FinishReason,
    /// The stop string that ended the generation (finish reason `Stop` by a string, not an
    /// end-of-sequence id).
    pub stop_sequence: Option<String>,
    pub usage: Usage,
    pub timings: Timings,
    pub expert_io: ExpertIo,
}
