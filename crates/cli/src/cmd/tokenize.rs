//! `flashmoe tokenize`: text file in, token ids out (JSON array).
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use flashmoe_text::Tokenizer;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Directory holding tokenizer.json (or tokenizer.json.gz)
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// UTF-8 text file to tokenize (read as-is: no special handling of newlines)
    #[arg(long)]
    pub text_file: PathBuf,
}

/// Reads a file that must be UTF-8, naming the file and byte offset when it is not.
pub fn read_utf8(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not valid UTF-8 (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

pub fn run(a: Args) -> Result<()> {
    let tok = Tokenizer::from_dir(&a.tokenizer)?;
    let text = read_utf8(&a.text_file)?;
    let ids = tok.encode(&text)?;
    super::out::outln!("{}", serde_json::to_string(&ids)?)
}
