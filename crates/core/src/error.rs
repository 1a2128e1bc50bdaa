//! The engine's one error type. Every variant names the operation and the offending thing
//! (file, tensor, layer, expert) so that a user can act on the message without a debugger.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The I/O error is part of the message and deliberately not a `source`: anyhow's `{:#}`
    // prints the source chain after the message, which showed every reason twice.
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: invalid JSON: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("tensor `{name}` not found in {where_}")]
    MissingTensor { name: String, where_: String },
    #[error("tensor `{name}` in {file}: expected {expected}, found {found}")]
    BadTensor {
        name: String,
        file: String,
        expected: String,
        found: String,
    },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("sequence of {len} tokens exceeds the model's context of {max} tokens")]
    ContextOverflow { len: usize, max: usize },
    #[error("{path}: packed model: {msg}")]
    Packed { path: PathBuf, msg: String },
    #[error("layer {layer} expert {expert}: {msg}")]
    Expert {
        layer: usize,
        expert: usize,
        msg: String,
    },
    /// NaN or infinity in the logits the head produced for sequence position `pos`: the
    /// weights (or the activations they produce) are not finite, so every token sampled from
    /// here on would be garbage. Checked on every forward pass's output, which is cheap.
    #[error(
        "non-finite logits at sequence position {pos} ({nan} NaN and {inf} infinite of {vocab}): \
         the model's weights or activations are not finite (damaged or badly converted model?); \
         generation stopped"
    )]
    NonFiniteLogits {
        pos: usize,
        nan: usize,
        inf: usize,
        vocab: usize,
    },
    /// Greedy decoding's argmax, reduced where the logits live, found no finite largest value
    /// for position `pos` (every logit NaN, or the largest infinite): what
    /// [`Error::NonFiniteLogits`] says of a row read back to the host, known without reading
    /// it back. Backends report position 0; the model gives the position.
    #[error(
        "non-finite logits at sequence position {pos} (no finite largest value): the model's \
         weights or activations are not finite (damaged or badly converted model?); \
         generation stopped"
    )]
    NonFiniteArgmax { pos: usize },
    /// A routing trace (`--trace-routing`) that cannot be read or appended to, at `offset`.
    #[error("{path}: routing trace, at byte offset {offset}: {msg}")]
    Trace {
        path: PathBuf,
        offset: u64,
        msg: String,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err,
        }
    }
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
