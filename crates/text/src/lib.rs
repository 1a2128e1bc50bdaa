//! flashmoe text layer: everything between model token ids and user-facing text.
//!
//! Owns tokenization ([`Tokenizer`], [`StreamDecoder`]), prompt rendering ([`ChatTemplate`]),
//! parsing generated text into content / reasoning / tool calls ([`ToolCallParser`]),
//! next-token selection ([`Sampler`]), grammar masks for constrained decoding ([`constrain`],
//! [`call_grammar`]), user stop strings ([`StopChecker`]), end-of-sequence
//! discovery ([`special`]) and saved chat sessions ([`SessionStore`]).
//!
//! This crate never touches tensors or the network; it only sees logits as `&[f32]`.
//!
//! A chat turn, end to end (the model call is the engine's):
//!
//! ```no_run
//! use flashmoe_text::*;
//! # fn next_logits(_ids: &[u32]) -> Vec<f32> { unimplemented!() }
//! # fn main() -> Result<()> {
//! let dir = std::path::Path::new("/models/qwen3.5");
//! let tok = Tokenizer::from_dir(dir)?;
//! let tpl = ChatTemplate::from_dir(dir)?;
//! let messages = serde_json::json!([{"role": "user", "content": "Hello"}]);
//! let opts = RenderOptions { add_generation_prompt: true, ..Default::default() };
//! let prompt = tpl.render(&messages, None, &opts)?;
//! let mut ids = tok.encode(&prompt)?;
//! let eos = eos_token_ids(dir, Some(&tok))?;
//! let mut sampler = Sampler::new(SamplingParams::from_generation_config(dir)?);
//! let mut decoder = tok.stream_decoder();
//! // The prompt ended in `<think>\n`, so output starts as reasoning.
//! let mut parser = ToolCallParser::new(None, prompt.ends_with("<think>\n"));
//! loop {
//!     let id = sampler.sample(&next_logits(&ids), &[]);
//!     if eos.contains(&id) { break; }
//!     ids.push(id);
//!     if let Some(piece) = decoder.push(id)? {
//!         for event in parser.push(&piece) { println!("{event:?}"); }
//!     }
//! }
//! let rest = decoder.flush()?.unwrap_or_default();
//! let mut events = parser.push(&rest);
//! events.extend(parser.finish());
//! # Ok(()) }
//! ```

pub mod call_grammar;
pub mod constrain;
pub mod error;
pub mod sampling;
pub mod session_store;
pub mod special;
pub mod stop;
pub mod template;
pub mod tokenizer;
pub mod toolcall;

pub use constrain::{Constraint, GrammarCompiler, GrammarSpec};
pub use error::{Result, TextError};
pub use sampling::{Sampler, SamplingParams};
pub use session_store::{Session, SessionHeader, SessionInfo, SessionList, SessionStore};
pub use special::eos_token_ids;
pub use stop::StopChecker;
pub use template::{ChatTemplate, RenderOptions};
pub use tokenizer::{StreamDecoder, Tokenizer};
pub use toolcall::{merge_text_events, ToolCallParser, ToolEvent};
