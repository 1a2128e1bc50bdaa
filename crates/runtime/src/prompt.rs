//! Turning a [`PromptInput`] into token ids: rendering with the chat template, applying
//! `tool_choice`, and finding the points worth snapshotting for prefix reuse (end of the system
//! block, end of the conversation before the assistant turn opens).
//!
//! Never runs the model; every boundary it reports is verified to be a prefix of the ids.
use flashmoe_text::call_grammar::CallFormat;
use flashmoe_text::{ChatTemplate, RenderOptions, TextError, Tokenizer};
use serde_json::Value;

use crate::error::{Result, RuntimeError};
use crate::request::{PromptInput, ToolChoice};

/// A prompt ready for the model.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    pub ids: Vec<u32>,
    /// Token counts, increasing and each < `ids.len()`, after which the state is worth saving
    /// (a later request with the same system prompt, or continuing this conversation, starts
    /// with exactly these tokens).
    pub boundaries: Vec<usize>,
    /// The prompt ends inside an open `<think>`: generated text is reasoning until `</think>`.
    pub starts_in_thinking: bool,
    /// Tools the parser types call arguments by; `Some([])` turns every call into plain text.
    pub parser_tools: Option<Value>,
    /// Text appended after the generation prompt to force a call; the parser sees it first.
    pub forced_prefix: String,
    /// The tools the model may call (after `tool_choice`), as sent; empty: none.
    pub tools: Vec<Value>,
    /// The call format the template teaches (XML when its tool block shows `<function=`).
    pub call_format: CallFormat,
}

/// The rendered text of a chat prompt as the model will see it (tool choice applied).
pub fn render_text(
    tpl: Option<&ChatTemplate>,
    model: &str,
    prompt: &PromptInput,
    choice: &ToolChoice,
) -> Result<String> {
    match prompt {
        PromptInput::Text(t) => Ok(t.clone()),
        PromptInput::Ids(_) => Err(RuntimeError::InvalidPrompt(
            "a prompt of ids has no text to render".into(),
        )),
        PromptInput::Messages { .. } => {
            let chat = ChatParts::new(tpl, model, prompt, choice)?;
            let text = chat.render(&chat.messages, chat.add_generation_prompt)?;
            let prefix = chat.forced_prefix(&text);
            Ok(text + &prefix)
        }
    }
}

pub(crate) fn prepare(
    tok: &Tokenizer,
    tpl: Option<&ChatTemplate>,
    model: &str,
    prompt: &PromptInput,
    choice: &ToolChoice,
) -> Result<PreparedPrompt> {
    let p = match prompt {
        PromptInput::Ids(ids) => {
            let tail = &ids[ids.len().saturating_sub(64)..];
            PreparedPrompt {
                ids: ids.clone(),
                boundaries: Vec::new(),
                starts_in_thinking: opens_thinking(&tok.decode(tail)?),
                parser_tools: None,
                forced_prefix: String::new(),
                tools: Vec::new(),
                call_format: CallFormat::Xml,
            }
        }
        PromptInput::Text(text) => PreparedPrompt {
            ids: tok.encode(text)?,
            boundaries: Vec::new(),
            starts_in_thinking: opens_thinking(text),
            parser_tools: None,
            forced_prefix: String::new(),
            tools: Vec::new(),
            call_format: CallFormat::Xml,
        },
        PromptInput::Messages { .. } => {
            prepare_chat(tok, ChatParts::new(tpl, model, prompt, choice)?)?
        }
    };
    if p.ids.is_empty() {
        return Err(RuntimeError::InvalidPrompt("the prompt is empty".into()));
    }
    Ok(p)
}

/// A chat prompt with `tool_choice` applied.
struct ChatParts<'a> {
    tpl: &'a ChatTemplate,
    messages: Vec<Value>,
    tools: Vec<Value>,
    opts: RenderOptions,
    add_generation_prompt: bool,
    choice: &'a ToolChoice,
}

impl<'a> ChatParts<'a> {
    fn new(
        tpl: Option<&'a ChatTemplate>,
        model: &str,
        prompt: &'a PromptInput,
        choice: &'a ToolChoice,
    ) -> Result<Self> {
        let PromptInput::Messages {
            messages,
            tools,
            enable_thinking,
            add_generation_prompt,
        } = prompt
        else {
            return Err(RuntimeError::InvalidPrompt("not a chat prompt".into()));
        };
        let tpl = tpl.ok_or_else(|| RuntimeError::NoChatTemplate(model.to_string()))?;
        let messages = normalize_messages(messages)?;
        let mut enable_thinking = *enable_thinking;
        let tools = match choice {
            ToolChoice::Auto => tools.clone(),
            ToolChoice::None => Vec::new(),
            ToolChoice::Required => {
                if tools.is_empty() {
                    return Err(RuntimeError::InvalidPrompt(
                        "tool_choice `required` needs at least one tool".into(),
                    ));
                }
                enable_thinking = Some(false);
                tools.clone()
            }
            ToolChoice::Function(name) => {
                let chosen: Vec<Value> = tools
                    .iter()
                    .filter(|t| tool_name(t) == Some(name.as_str()))
                    .cloned()
                    .collect();
                if chosen.is_empty() {
                    return Err(RuntimeError::InvalidPrompt(format!(
                        "tool_choice names function `{name}`, which is not among the tools"
                    )));
                }
                enable_thinking = Some(false);
                chosen
            }
        };
        Ok(ChatParts {
            tpl,
            messages,
            tools,
            opts: RenderOptions {
                add_generation_prompt: false,
                enable_thinking,
                extra: Default::default(),
            },
            add_generation_prompt: *add_generation_prompt,
            choice,
        })
    }

    fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        let opts = RenderOptions {
            add_generation_prompt,
            ..self.opts.clone()
        };
        let tools = Value::Array(self.tools.clone());
        let tools = (!self.tools.is_empty()).then_some(&tools);
        self.tpl
            .render(&Value::Array(messages.to_vec()), tools, &opts)
            .map_err(|e| match e {
                TextError::Template(m) => RuntimeError::Template(m),
                e => RuntimeError::Text(e),
            })
    }

    /// The text that opens a forced call after the generation prompt, in the format the
    /// template taught (Qwen3.5 XML when its tool block shows `<function=`, else Qwen3 JSON).
    fn forced_prefix(&self, rendered: &str) -> String {
        if !self.add_generation_prompt {
            return String::new();
        }
        match self.choice {
            ToolChoice::Required => "<tool_call>\n".into(),
            ToolChoice::Function(name) if rendered.contains("<function=") => {
                format!("<tool_call>\n<function={name}>\n")
            }
            ToolChoice::Function(name) => {
                let quoted = serde_json::to_string(name).unwrap_or_default();
                format!("<tool_call>\n{{\"name\": {quoted}, \"arguments\": ")
            }
            ToolChoice::Auto | ToolChoice::None => String::new(),
        }
    }

    fn parser_tools(&self) -> Option<Value> {
        match self.choice {
            // An empty tool list makes every call "unknown", so its raw text stays content.
            ToolChoice::None => Some(Value::Array(Vec::new())),
            _ if self.tools.is_empty() => None,
            _ => Some(Value::Array(self.tools.clone())),
        }
    }
}

fn prepare_chat(tok: &Tokenizer, chat: ChatParts<'_>) -> Result<PreparedPrompt> {
    let rendered = chat.render(&chat.messages, chat.add_generation_prompt)?;
    let forced_prefix = chat.forced_prefix(&rendered);
    let text = format!("{rendered}{forced_prefix}");
    let ids = tok.encode(&text)?;
    let mut boundaries = Vec::new();
    let mut push = |b: Option<Vec<u32>>| {
        if let Some(b) = b {
            let n = b.len();
            if n > 0 && n < ids.len() && ids.starts_with(&b) && boundaries.last() < Some(&n) {
                boundaries.push(n);
            }
        }
    };
    push(system_block(tok, &chat));
    if chat.add_generation_prompt || !forced_prefix.is_empty() {
        // Errors here only cost a reuse opportunity, never the request.
        push(
            chat.render(&chat.messages, false)
                .ok()
                .and_then(|t| tok.encode(&t).ok()),
        );
    }
    let call_format = if rendered.contains("<function=") {
        CallFormat::Xml
    } else {
        CallFormat::Json
    };
    Ok(PreparedPrompt {
        starts_in_thinking: forced_prefix.is_empty() && opens_thinking(&text),
        parser_tools: chat.parser_tools(),
        tools: match chat.choice {
            ToolChoice::None => Vec::new(),
            _ => chat.tools.clone(),
        },
        call_format,
        forced_prefix,
        ids,
        boundaries,
    })
}

/// The tokens every conversation with this system prompt (and these tools) starts with: the
/// common prefix of two renders that differ only in the first user message's text.
fn system_block(tok: &Tokenizer, chat: &ChatParts<'_>) -> Option<Vec<u32>> {
    let first_is_system = chat.messages.first()?.get("role")?.as_str() == Some("system");
    if chat.messages.len() < 2 || (!first_is_system && chat.tools.is_empty()) {
        return None;
    }
    let probe = |text: &str| {
        let mut m: Vec<Value> = chat.messages[..usize::from(first_is_system)].to_vec();
        m.push(serde_json::json!({"role": "user", "content": text}));
        chat.render(&m, false).ok()
    };
    let (a, b) = (probe("A")?, probe("B")?);
    let common = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)?;
    tok.encode(&a[..common]).ok()
}

/// OpenAI sends a tool call's `arguments` as a JSON string; chat templates iterate them as a
/// mapping (as transformers does), so string arguments are parsed into objects here.
fn normalize_messages(messages: &[Value]) -> Result<Vec<Value>> {
    let mut out = messages.to_vec();
    for (i, m) in out.iter_mut().enumerate() {
        let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) else {
            continue;
        };
        for (j, call) in calls.iter_mut().enumerate() {
            let f = match call.get_mut("function") {
                Some(f) => f,
                None => call,
            };
            let Some(args) = f.get_mut("arguments") else {
                continue;
            };
            if let Value::String(s) = args {
                let parsed: Value = if s.trim().is_empty() {
                    Value::Object(Default::default())
                } else {
                    serde_json::from_str(s).map_err(|e| {
                        RuntimeError::InvalidPrompt(format!(
                            "messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {e}"
                        ))
                    })?
                };
                *args = parsed;
            }
            if !args.is_object() {
                return Err(RuntimeError::InvalidPrompt(format!(
                    "messages[{i}].tool_calls[{j}].function.arguments must be a JSON object"
                )));
            }
        }
    }
    Ok(out)
}

fn tool_name(tool: &Value) -> Option<&str> {
    tool.get("function")
        .unwrap_or(tool)
        .get("name")
        .and_then(Value::as_str)
}

/// Whether the last turn of `text` leaves a `<think>` open.
pub fn opens_thinking(text: &str) -> bool {
    let turn = text.rsplit("<|im_start|>").next().unwrap_or(text);
    match (turn.rfind("<think>"), turn.rfind("</think>")) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::opens_thinking;

    #[test]
    fn thinking_open_at_end_of_prompt() {
        assert!(opens_thinking("<|im_start|>assistant\n<think>\n"));
        assert!(!opens_thinking(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!opens_thinking("<think>x</think><|im_start|>assistant\n"));
        assert!(!opens_thinking("plain text"));
    }
}
