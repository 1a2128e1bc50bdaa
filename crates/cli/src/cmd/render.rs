//! `flashmoe render`: the prompt the chat template makes of an OpenAI-style request file, as
//! `serve` would give it to the model (same validation, same rendering).
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args as ClapArgs;
use flashmoe_runtime::prompt::render_text;
use flashmoe_text::ChatTemplate;
use serde_json::Value;

use super::tokenize::read_utf8;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Directory holding chat_template.jinja or tokenizer_config.json
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// JSON request, as sent to `serve`'s /v1/chat/completions: {"messages": [...], "tools":
    /// [...], "tool_choice": ..., "chat_template_kwargs": {"enable_thinking": ...},
    /// "add_generation_prompt": true}; what serve refuses with 400 is refused here
    #[arg(long)]
    pub request: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let text = read_utf8(&a.request)?;
    let req: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", a.request.display()))?;
    // The server's validator: what `serve` refuses with 400, render refuses too, and what it
    // accepts renders here exactly as the model would see it (tool_choice applied).
    let req = flashmoe_server::parse_chat_request(&req, usize::MAX)
        .map_err(|e| anyhow!("{}: {e}", a.request.display()))?;
    let tpl = ChatTemplate::from_dir(&a.tokenizer)?;
    let out = render_text(Some(&tpl), "model", &req.prompt, &req.tool_choice)?;
    super::out::out!("{out}")
}
