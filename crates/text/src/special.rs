//! End-of-sequence discovery: which token ids stop generation for a model directory.
//!
//! Owns reading `eos_token_id` from `generation_config.json` and `config.json` (top level and the
//! multimodal wrapper's `text_config`), plus the chat-turn terminators `<|im_end|>` and
//! `<|endoftext|>` when the vocabulary has them. Missing files are normal; malformed ones are errors.

use std::path::Path;

use serde_json::Value;

use crate::error::{read_json_opt, Result, TextError};
use crate::tokenizer::Tokenizer;

/// Token strings that end a chat turn in the Qwen family (see arch-spec §10.1).
pub const CHAT_STOP_TOKENS: [&str; 2] = ["<|im_end|>", "<|endoftext|>"];

/// All stop ids for `model_dir`, deduplicated, in discovery order: generation_config first,
/// then config.json (`eos_token_id`, `text_config.eos_token_id`), then [`CHAT_STOP_TOKENS`]
/// found in `tokenizer`'s vocabulary.
pub fn eos_token_ids(model_dir: &Path, tokenizer: Option<&Tokenizer>) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    let gen_path = model_dir.join("generation_config.json");
    if let Some(cfg) = read_json_opt(&gen_path)? {
        ids.extend(eos_field(cfg.get("eos_token_id"), &gen_path)?);
    }
    let cfg_path = model_dir.join("config.json");
    if let Some(cfg) = read_json_opt(&cfg_path)? {
        ids.extend(eos_field(cfg.get("eos_token_id"), &cfg_path)?);
        let nested = cfg.get("text_config").and_then(|t| t.get("eos_token_id"));
        ids.extend(eos_field(nested, &cfg_path)?);
    }
    if let Some(tok) = tokenizer {
        ids.extend(CHAT_STOP_TOKENS.iter().filter_map(|t| tok.token_id(t)));
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    Ok(ids)
}

/// `eos_token_id` is an int, a list of ints, or null.
fn eos_field(v: Option<&Value>, path: &Path) -> Result<Vec<u32>> {
    let bad = |v: &Value| TextError::BadField {
        path: path.to_path_buf(),
        field: "eos_token_id",
        msg: format!("expected a token id or a list of them, found {v}"),
    };
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(v))
    };
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list.iter().map(as_id).collect(),
        Some(other) => Ok(vec![as_id(other)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_int_list_and_nested_text_config() {
        let dir = std::env::temp_dir().join(format!("flashmoe-special-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(eos_token_ids(&dir, None).unwrap(), Vec::<u32>::new());
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"eos_token_id": [248046, 248044]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("config.json"),
            r#"{"eos_token_id": 248044, "text_config": {"eos_token_id": 7}}"#,
        )
        .unwrap();
        assert_eq!(eos_token_ids(&dir, None).unwrap(), [248046, 248044, 7]);
        std::fs::write(dir.join("config.json"), r#"{"eos_token_id": "x"}"#).unwrap();
        let err = eos_token_ids(&dir, None).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("eos_token_id"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
