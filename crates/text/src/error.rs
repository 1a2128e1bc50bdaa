//! The one error type of the text layer. Every variant names the file or thing at fault so a
//! message alone is enough to act on; nothing here panics on data from files or users.

use std::path::PathBuf;

/// Result alias used throughout `flashmoe-text`.
pub type Result<T, E = TextError> = std::result::Result<T, E>;

/// Errors of the text layer.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file or directory could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file did not parse.
    #[error("parsing JSON file {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A JSON file parsed but a field has the wrong shape.
    #[error("{path}: field `{field}`: {msg}")]
    BadField {
        path: PathBuf,
        field: &'static str,
        msg: String,
    },
    /// Neither `tokenizer.json` nor `tokenizer.json.gz` exists in the directory.
    #[error("no tokenizer.json or tokenizer.json.gz in {0}")]
    TokenizerMissing(PathBuf),
    /// The tokenizer file exists but the `tokenizers` crate rejected it.
    #[error("loading tokenizer {path}: {msg}")]
    TokenizerLoad { path: PathBuf, msg: String },
    /// Encoding or decoding failed inside the tokenizer.
    #[error("tokenizer {op} failed: {msg}")]
    Tokenize { op: &'static str, msg: String },
    /// No chat template in the model directory.
    #[error("no chat template in {0} (looked for chat_template.jinja, tokenizer_config.json `chat_template` and chat_template.json)")]
    TemplateMissing(PathBuf),
    /// The chat template failed to compile or render, or raised an exception itself.
    #[error("chat template: {0}")]
    Template(String),
    /// A session file has a line that is not valid JSON (or a bad header).
    #[error("session file {path} line {line}: {msg}")]
    SessionCorrupt {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// No session with this id exists, or the id is not a valid session id.
    #[error("session `{id}`: {msg}")]
    Session { id: String, msg: String },
    /// A grammar for constrained decoding could not be built or followed.
    #[error("grammar: {op}: {msg}")]
    Grammar { op: &'static str, msg: String },
    /// No directory to keep sessions in could be determined.
    #[error("no data directory: set FLASHMOE_DATA_DIR, XDG_DATA_HOME or HOME")]
    NoDataDir,
}

impl TextError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        TextError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Reads and parses a JSON file; `Ok(None)` when it does not exist (optional model files).
pub(crate) fn read_json_opt(path: &std::path::Path) -> Result<Option<serde_json::Value>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(TextError::io("reading", path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| TextError::Json {
            path: path.to_path_buf(),
            source,
        })
}
