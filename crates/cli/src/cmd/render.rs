//! `flashmoe render`: the prompt the chat template makes of an OpenAI-style request file.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use flashmoe_text::{ChatTemplate, RenderOptions};
use serde_json::Value;

use super::tokenize::read_utf8;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Directory holding chat_template.jinja or tokenizer_config.json
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// JSON request: {"messages": [...], "tools": [...], "chat_template_kwargs": {...},
    /// "add_generation_prompt": true}
    #[arg(long)]
    pub request: PathBuf,
}

/// Template options from a request's `add_generation_prompt` (default true) and
/// `chat_template_kwargs` (enable_thinking and any other variables).
pub fn render_options(req: &Value) -> Result<RenderOptions> {
    let mut opts = RenderOptions {
        add_generation_prompt: true,
        ..Default::default()
    };
    match req.get("add_generation_prompt") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => opts.add_generation_prompt = *b,
        Some(other) => bail!("`add_generation_prompt` must be a boolean, got {other}"),
    }
    if let Some(kw) = req.get("chat_template_kwargs") {
        let Some(obj) = kw.as_object() else {
            bail!("`chat_template_kwargs` must be an object");
        };
        for (k, v) in obj {
            if k == "enable_thinking" {
                match v {
                    Value::Bool(b) => opts.enable_thinking = Some(*b),
                    Value::Null => {}
                    other => bail!("`enable_thinking` must be a boolean, got {other}"),
                }
            } else {
                opts.extra.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(opts)
}

pub fn run(a: Args) -> Result<()> {
    let text = read_utf8(&a.request)?;
    let req: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", a.request.display()))?;
    let Some(messages) = req.get("messages").filter(|m| m.is_array()) else {
        bail!("{}: `messages` must be an array", a.request.display());
    };
    let tools = req.get("tools").filter(|t| !t.is_null());
    let tpl = ChatTemplate::from_dir(&a.tokenizer)?;
    let out = tpl.render(messages, tools, &render_options(&req)?)?;
    super::out::out!("{out}")
}
