//! flashmoe text layer: everything between model token ids and user-facing text.
//!
//! Owns tokenization ([`Tokenizer`], [`StreamDecoder`]), prompt rendering ([`ChatTemplate`]),
//! parsing generated text into content / reasoning / tool calls ([`ToolCallParser`]),
//! next-token selection ([`Sampler`]), user stop strings ([`StopChecker`]), end-of-sequence
//! discovery ([`special`]) and saved chat sessions ([`SessionStore`]).
//!
//! This crate never touches tensors or the network; it only sees logits as `&[f32]`.

pub mod error;
pub mod sampling;
pub mod session_store;
pub mod special;
pub mod stop;
pub mod template;
pub mod tokenizer;
pub mod toolcall;

pub use error::{Result, TextError};
pub use sampling::{Sampler, SamplingParams};
pub use session_store::{Session, SessionHeader, SessionStore};
pub use special::eos_token_ids;
pub use stop::StopChecker;
pub use template::{ChatTemplate, RenderOptions};
pub use tokenizer::{StreamDecoder, Tokenizer};
pub use toolcall::{merge_text_events, ToolCallParser, ToolEvent};
