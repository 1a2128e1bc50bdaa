//! The runtime's error type. Variants say whether the caller (a user, a request) is at fault
//! ([`RuntimeError::is_client_error`]) so that a server can answer 400 rather than 500.
use flashmoe_text::TextError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Loading or running the model failed.
    #[error(transparent)]
    Core(#[from] flashmoe_core::Error),
    /// Tokenizer or template files are missing or broken.
    #[error(transparent)]
    Text(#[from] TextError),
    /// The chat template rejected the conversation (it raised, or a field has the wrong shape).
    #[error("chat template: {0}")]
    Template(String),
    /// A chat request on a model directory without a chat template.
    #[error("model {0} has no chat template: send a plain-text prompt instead")]
    NoChatTemplate(String),
    /// A context size (`--ctx-size`) the model cannot have.
    #[error("{0}")]
    ContextSize(String),
    /// The prompt itself is unusable (empty, ids outside the vocabulary, ...).
    #[error("invalid prompt: {0}")]
    InvalidPrompt(String),
    /// The request's grammar (`response_format`, `grammar`, a tool's parameter schema) does
    /// not compile.
    #[error("invalid grammar: {0}")]
    Grammar(String),
    /// The prompt alone fills the context.
    #[error(
        "the prompt is {prompt_tokens} tokens, but the model's context is {context} tokens \
         (at least one token must be left to generate)"
    )]
    PromptTooLong {
        prompt_tokens: usize,
        context: usize,
    },
    /// Prompt plus the requested completion would not fit the context.
    #[error(
        "max_tokens {max_tokens} plus the prompt's {prompt_tokens} tokens exceeds the model's \
         context of {context} tokens (at most {} can be generated)",
        context.saturating_sub(*prompt_tokens)
    )]
    MaxTokensTooLarge {
        max_tokens: usize,
        prompt_tokens: usize,
        context: usize,
    },
}

impl RuntimeError {
    /// Whether the request is at fault (a server answers 4xx), rather than the engine or files.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            RuntimeError::Template(_)
                | RuntimeError::NoChatTemplate(_)
                | RuntimeError::InvalidPrompt(_)
                | RuntimeError::Grammar(_)
                | RuntimeError::PromptTooLong { .. }
                | RuntimeError::MaxTokensTooLarge { .. }
        )
    }
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
