pub mod error;
pub mod template;
pub mod tokenizer;
pub mod toolcall;
pub use error::{Result, TextError};
pub use template::{ChatTemplate, RenderOptions};
pub use tokenizer::{StreamDecoder, Tokenizer};
pub use toolcall::{merge_text_events, ToolCallParser, ToolEvent};
