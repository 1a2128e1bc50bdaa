//! Tokenizer: text <-> token ids through the Hugging Face `tokenizers` crate, plus
//! [`StreamDecoder`] for turning a stream of generated ids into text pieces.
//!
//! Owns loading `tokenizer.json` (or its gzip) and the rule that special tokens written in the
//! text (`<|im_start|>` ...) are recognised, as `apply_chat_template(tokenize=True)` does. It never
//! downloads anything and never adds BOS/EOS on its own (Qwen has `add_bos_token: false`).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Result, TextError};

/// A loaded tokenizer. Cheap to share by reference; all methods take `&self`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, or `dir/tokenizer.json.gz` when only the gzip exists.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let plain = dir.join("tokenizer.json");
        if plain.is_file() {
            return Self::from_file(&plain);
        }
        let gz = dir.join("tokenizer.json.gz");
        if gz.is_file() {
            return Self::from_file(&gz);
        }
        Err(TextError::TokenizerMissing(dir.to_path_buf()))
    }

    /// Loads one tokenizer file; a name ending in `.gz` is gunzipped first.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw = std::fs::read(path).map_err(|e| TextError::io("reading", path, e))?;
        let bytes = if path.extension().is_some_and(|e| e == "gz") {
            let mut out = Vec::with_capacity(raw.len() * 4);
            flate2::read::GzDecoder::new(raw.as_slice())
                .read_to_end(&mut out)
                .map_err(|e| TextError::io("gunzipping", path, e))?;
            out
        } else {
            raw
        };
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TextError::TokenizerLoad {
                path: path.to_path_buf(),
                msg: e.to_string(),
            })?;
        Ok(Tokenizer {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Encodes `text` without adding BOS/EOS. Added/special tokens spelled out in the text
    /// (e.g. `<|im_start|>`, `<think>`) become their single ids, which is what a rendered chat
    /// prompt needs.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TextError::Tokenize {
                op: "encode",
                msg: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, keeping special tokens (`skip_special_tokens = false`). Byte
    /// sequences that are not valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TextError::Tokenize {
                op: "decode",
                msg: e.to_string(),
            })
    }

    /// The id of a token string (including added tokens such as `<|im_end|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, as stored in the vocabulary (byte-level form for BPE).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included (the model's embedding may be larger: padding).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer as `tokenizer.json` would hold it (for readers of the vocabulary, such as
    /// the grammar engine's token trie).
    pub fn to_json(&self) -> Result<serde_json::Value> {
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| TextError::Tokenize {
                op: "serialize",
                msg: e.to_string(),
            })?;
        serde_json::from_str(&text).map_err(|e| TextError::Tokenize {
            op: "serialize",
            msg: e.to_string(),
        })
    }

    /// A fresh incremental decoder bound to this tokenizer.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }
}

/// Incremental detokenizer: push generated ids one at a time, get text pieces whose
/// concatenation equals `decode(all ids)`.
///
/// Byte-level BPE tokens can end in the middle of a UTF-8 character; such a piece is held back
/// (the decoded tail would be U+FFFD) until later ids complete it, or until [`flush`](Self::flush).
/// Decoding is done over a small window (`prefix..`) rather than single tokens so that decoders
/// which treat the first token specially (leading-space stripping) still join correctly.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window re-decoded for context; text before it has been emitted.
    prefix: usize,
    /// Ids before this index have had their text emitted.
    read: usize,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder with no ids yet.
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds one id; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix_text = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let full_text = self.tok.decode(&self.ids[self.prefix..])?;
        // A trailing U+FFFD means the last bytes are an incomplete character: wait for more.
        if full_text.len() <= prefix_text.len() || full_text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(new) = full_text.get(prefix_text.len()..) else {
            return Ok(None);
        };
        let new = new.to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(Some(new))
    }

    /// Emits whatever is still held back (incomplete bytes become U+FFFD) and resets the window.
    pub fn flush(&mut self) -> Result<Option<String>> {
        if self.read == self.ids.len() {
            return Ok(None);
        }
        let prefix_text = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let full_text = self.tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        let new = full_text.get(prefix_text.len()..).unwrap_or("").to_string();
        Ok((!new.is_empty()).then_some(new))
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
