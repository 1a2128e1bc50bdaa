pub mod error;
pub mod template;
pub mod tokenizer;
pub use error::{Result, TextError};
pub use template::{ChatTemplate, RenderOptions};
pub use tokenizer::{StreamDecoder, Tokenizer};
