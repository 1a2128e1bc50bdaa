//! Test support: a tiny model directory that front-end tests can run end to end without a GPU
//! or network. A golden tiny model (vocabulary 1000) is paired with a small byte-level BPE
//! tokenizer built here, whose ids all fit that vocabulary (the real Qwen3.5 tokenizer's do
//! not), and with the real Qwen3.5 chat template.
//!
//! Only for tests and demos; the engine never depends on it.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Special tokens of the test tokenizer, with their ids (all below 1000, after the 256 bytes).
pub const SPECIAL_TOKENS: [(&str, u32); 9] = [
    ("<|endoftext|>", 256),
    ("<|im_start|>", 257),
    ("<|im_end|>", 258),
    ("<think>", 259),
    ("</think>", 260),
    ("<tool_call>", 261),
    ("</tool_call>", 262),
    ("<tool_response>", 263),
    ("</tool_response>", 264),
];

/// Vocabulary size of the test tokenizer (equal to the tiny models').
pub const VOCAB: u32 = 1000;

/// GPT-2's byte -> printable character table used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut next = 256u32;
    (0u32..256)
        .map(|b| {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let code = if printable {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or('?')
        })
        .collect()
}

/// `tokenizer.json` text: ids 0-255 are bytes, 256-264 the specials above, 265-999 merged
/// pairs of common characters (so every id a tiny model can emit decodes to text).
pub fn test_tokenizer_json() -> String {
    let chars = byte_chars();
    let mut vocab: Vec<(String, u32)> = (0..256u32)
        .map(|b| (chars[b as usize].to_string(), b))
        .collect();
    // Added tokens must also sit in the model's vocabulary at their ids; otherwise `tokenizers`
    // renumbers them after the last vocabulary id.
    vocab.extend(SPECIAL_TOKENS.iter().map(|(t, id)| (t.to_string(), *id)));
    let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyz .,\n"
        .bytes()
        .map(|b| chars[b as usize])
        .collect();
    let mut merges = Vec::new();
    let mut id = 265u32;
    'outer: for &a in &alphabet {
        for &b in &alphabet {
            if id >= VOCAB {
                break 'outer;
            }
            vocab.push((format!("{a}{b}"), id));
            merges.push(format!("{a} {b}"));
            id += 1;
        }
    }
    let mut added = String::new();
    for (i, (tok, id)) in SPECIAL_TOKENS.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(
            added,
            r#"{sep}{{"id":{id},"content":{},"single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}"#,
            serde_json::Value::from(*tok)
        );
    }
    let vocab_json: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .map(|(t, id)| (t, serde_json::Value::from(id)))
        .collect();
    format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{added}],
"normalizer":{{"type":"NFC"}},
"pre_tokenizer":{{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":true}},
"post_processor":null,
"decoder":{{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":true}},
"model":{{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,"vocab":{},"merges":{}}}}}"#,
        serde_json::Value::Object(vocab_json),
        serde_json::Value::from(merges)
    )
}

/// The shared fixtures folder (see `flashmoe_testdata::shared_dir`): `None`, with a printed
/// skip, when absent outside CI; a panic under CI.
pub fn shared_dir(manifest_dir: &Path) -> Option<PathBuf> {
    flashmoe_testdata::shared_dir(&manifest_dir.to_string_lossy())
}

/// Fills `out` with a runnable test model: `shared/golden/tiny-a/hf-bf16` (config, weights,
/// generation config), the test tokenizer, and the Qwen3.5 chat template and tokenizer config.
pub fn make_test_model_dir(shared: &Path, out: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    let model = shared.join("golden/tiny-a/hf-bf16");
    for entry in std::fs::read_dir(&model)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), out.join(entry.file_name()))?;
        }
    }
    let tok = shared.join("tokenizer/qwen3.5");
    for f in ["chat_template.jinja", "tokenizer_config.json"] {
        std::fs::copy(tok.join(f), out.join(f))?;
    }
    std::fs::write(out.join("tokenizer.json"), test_tokenizer_json())
}

/// A fresh test model directory (see [`make_test_model_dir`]) for a test of the crate at
/// `manifest_dir`; `None` (skipped) where the shared fixtures are absent outside CI.
pub fn test_model_dir(manifest_dir: &Path, tag: &str) -> Option<PathBuf> {
    let shared = shared_dir(manifest_dir)?;
    let dir = temp_dir(tag);
    make_test_model_dir(&shared, &dir).expect("building the test model dir");
    Some(dir)
}

/// A fresh, unique temporary directory name under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!("flashmoe-{tag}-{}-{nanos}", std::process::id()))
}
