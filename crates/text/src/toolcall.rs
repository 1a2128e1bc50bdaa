//! Streaming parser of generated assistant text into content, reasoning and tool calls.
//!
//! Owns the wire formats the Qwen family emits: the Qwen3.5 / Qwen3-Coder XML call
//! (`<tool_call>\n<function=NAME>\n<parameter=P>\nvalue\n</parameter>\n</function>\n</tool_call>`)
//! and the older Qwen3 JSON call (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`),
//! plus the `<think>...</think>` reasoning split. It must never drop text: a call it cannot
//! understand comes back as [`ToolEvent::MalformedToolCall`] with the raw text.
//!
//! Streaming contract: any split of the same text into pushes yields the same events once
//! adjacent text events are merged ([`merge_text_events`]). Text that could still become a tag
//! (`<tool_c`, `</thi`) is held back until the next push decides it.

use std::collections::HashMap;

use serde_json::{Map, Value};

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

/// One parsed piece of generated text.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolEvent {
    /// Visible answer text.
    Content(String),
    /// Thinking text (inside `<think>`, or before `</think>` when the prompt opened it).
    Reasoning(String),
    /// A complete, well-formed call of a known tool; arguments typed by the tool's schema.
    ToolCall { name: String, arguments: Value },
    /// A call that could not be understood (unknown tool, broken markup or JSON, unterminated).
    /// `raw` is the full text including the `<tool_call>` tags, so nothing is lost.
    MalformedToolCall { raw: String, error: String },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Thinking,
    Content,
    /// After `<tool_call>`; `buf` accumulates the body until `</tool_call>`.
    InCall,
}

/// Incremental parser; feed it decoded text with [`push`](Self::push), then call
/// [`finish`](Self::finish) at end of generation.
#[derive(Debug)]
pub struct ToolCallParser {
    /// Tool name -> JSON schema of its parameters; `None` when no tools were declared, in which
    /// case any name is accepted and values stay strings.
    schemas: Option<HashMap<String, Value>>,
    mode: Mode,
    buf: String,
    /// Whether non-whitespace text of the current segment was emitted; leading whitespace of a
    /// segment (the `\n\n` after `</think>`) is dropped, and `<think>` only opens at the start.
    seen_text: bool,
    /// A call was parsed; `<think>` can no longer open reasoning.
    calls_seen: bool,
}

impl ToolCallParser {
    /// `tools`: the request's tool list (OpenAI `[{"type":"function","function":{...}}]` or bare
    /// `{name, parameters}` objects). `starts_in_thinking`: the prompt already ended in `<think>\n`,
    /// so output is reasoning until `</think>`.
    pub fn new(tools: Option<&Value>, starts_in_thinking: bool) -> Self {
        let schemas = tools.map(|t| {
            let mut map = HashMap::new();
            for entry in t.as_array().map(Vec::as_slice).unwrap_or_default() {
                let f = entry.get("function").unwrap_or(entry);
                if let Some(name) = f.get("name").and_then(Value::as_str) {
                    let params = f.get("parameters").cloned().unwrap_or(Value::Null);
                    map.insert(name.to_string(), params);
                }
            }
            map
        });
        ToolCallParser {
            schemas,
            mode: if starts_in_thinking {
                Mode::Thinking
            } else {
                Mode::Content
            },
            buf: String::new(),
            seen_text: false,
            calls_seen: false,
        }
    }

    /// Feeds more generated text; returns the events it completes.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.buf.push_str(text);
        let mut events = Vec::new();
        while self.step(&mut events) {}
        events
    }

    /// Ends the stream: held-back text is emitted as it stands, and an unterminated call is
    /// parsed if complete enough, else reported as malformed.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        let mut events = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        match self.mode {
            Mode::Thinking => self.emit_text(&rest, &mut events),
            Mode::Content => self.emit_text(&rest, &mut events),
            Mode::InCall => {
                let raw = format!("{CALL_OPEN}{rest}");
                events.push(match self.parse_call(&rest) {
                    Ok((name, arguments)) => ToolEvent::ToolCall { name, arguments },
                    Err(e) => ToolEvent::MalformedToolCall {
                        raw,
                        error: format!("unterminated tool call ({e})"),
                    },
                });
                self.mode = Mode::Content;
            }
        }
        events
    }

    /// One transition; returns whether more progress may be possible.
    fn step(&mut self, events: &mut Vec<ToolEvent>) -> bool {
        match self.mode {
            Mode::Thinking => {
                if let Some(pos) = self.buf.find(THINK_CLOSE) {
                    let before: String = self.buf.drain(..pos + THINK_CLOSE.len()).collect();
                    self.emit_text(&before[..pos], events);
                    self.mode = Mode::Content;
                    self.seen_text = false;
                    return true;
                }
                let keep = partial_tag_suffix(&self.buf, &[THINK_CLOSE]);
                self.emit_prefix(self.buf.len() - keep, events);
                false
            }
            Mode::Content => {
                let call = self.buf.find(CALL_OPEN);
                // `<think>` opens reasoning only before any visible text (a model that thinks
                // although the prompt did not open `<think>`); later it is just text.
                let think = if self.seen_text || self.calls_seen {
                    None
                } else {
                    self.buf
                        .find(THINK_OPEN)
                        .filter(|&p| self.buf[..p].trim().is_empty())
                };
                let (pos, tag, next) = match (call, think) {
                    (Some(c), Some(t)) if t < c => (t, THINK_OPEN, Mode::Thinking),
                    (Some(c), _) => (c, CALL_OPEN, Mode::InCall),
                    (None, Some(t)) => (t, THINK_OPEN, Mode::Thinking),
                    (None, None) => {
                        let mut keep = partial_tag_suffix(&self.buf, &[CALL_OPEN]);
                        if !self.seen_text && !self.calls_seen {
                            let k = partial_tag_suffix(&self.buf, &[THINK_OPEN]);
                            if self.buf[..self.buf.len() - k].trim().is_empty() {
                                keep = keep.max(k);
                            }
                        }
                        self.emit_prefix(self.buf.len() - keep, events);
                        return false;
                    }
                };
                let before: String = self.buf.drain(..pos + tag.len()).collect();
                self.emit_text(&before[..pos], events);
                self.mode = next;
                if next == Mode::Thinking {
                    self.seen_text = false;
                }
                true
            }
            Mode::InCall => {
                let Some(pos) = self.buf.find(CALL_CLOSE) else {
                    return false;
                };
                let body: String = self.buf.drain(..pos + CALL_CLOSE.len()).collect();
                let body = &body[..pos];
                events.push(match self.parse_call(body) {
                    Ok((name, arguments)) => ToolEvent::ToolCall { name, arguments },
                    Err(error) => ToolEvent::MalformedToolCall {
                        raw: format!("{CALL_OPEN}{body}{CALL_CLOSE}"),
                        error,
                    },
                });
                self.mode = Mode::Content;
                // Whitespace between or after calls is framing, not content.
                self.seen_text = false;
                self.calls_seen = true;
                true
            }
        }
    }

    fn emit_prefix(&mut self, end: usize, events: &mut Vec<ToolEvent>) {
        if end > 0 {
            let text: String = self.buf.drain(..end).collect();
            self.emit_text(&text, events);
        }
    }

    /// Emits text of the current segment as Reasoning or Content, dropping leading whitespace.
    fn emit_text(&mut self, text: &str, events: &mut Vec<ToolEvent>) {
        let text = if self.seen_text {
            text
        } else {
            text.trim_start()
        };
        if text.is_empty() {
            return;
        }
        self.seen_text = true;
        events.push(match self.mode {
            Mode::Thinking => ToolEvent::Reasoning(text.to_string()),
            _ => ToolEvent::Content(text.to_string()),
        });
    }

    /// Parses a call body (between the tags) in either format, checking the tool name.
    fn parse_call(&self, body: &str) -> Result<(String, Value), String> {
        let trimmed = body.trim();
        let (name, arguments) = if trimmed.starts_with("<function=") {
            let (name, params) = parse_xml_call(trimmed)?;
            let schema = self.tool_schema(&name)?;
            let mut args = Map::new();
            for (p, raw) in params {
                let prop = schema
                    .and_then(|s| s.get("properties"))
                    .and_then(|ps| ps.get(&p));
                args.insert(p, typed_value(&raw, prop));
            }
            (name, Value::Object(args))
        } else if trimmed.starts_with('{') {
            let (name, args) = parse_json_call(trimmed)?;
            self.tool_schema(&name)?;
            (name, args)
        } else {
            return Err("expected <function=NAME> or a JSON object inside <tool_call>".into());
        };
        Ok((name, arguments))
    }

    /// The parameters schema of a declared tool; `Ok(None)` when no tools were declared.
    fn tool_schema(&self, name: &str) -> Result<Option<&Value>, String> {
        match &self.schemas {
            None => Ok(None),
            Some(map) => map
                .get(name)
                .map(Some)
                .ok_or_else(|| format!("unknown tool `{name}`")),
        }
    }
}

/// Length of the longest proper suffix of `buf` that is a prefix of one of `tags`.
fn partial_tag_suffix(buf: &str, tags: &[&str]) -> usize {
    let mut best = 0;
    for tag in tags {
        let max = (tag.len() - 1).min(buf.len());
        for len in (best + 1..=max).rev() {
            let start = buf.len() - len;
            if buf.is_char_boundary(start) && tag.starts_with(&buf[start..]) {
                best = len;
                break;
            }
        }
    }
    best
}

/// Splits `<function=NAME>` + `<parameter=P>\nvalue\n</parameter>`* + `</function>` into the
/// name and raw parameter strings. A missing `</parameter>` ends the value at the next
/// `<parameter=` (models sometimes drop it); anything else unexpected is an error.
fn parse_xml_call(s: &str) -> Result<(String, Vec<(String, String)>), String> {
    let rest = s
        .strip_prefix("<function=")
        .ok_or("expected <function=NAME>")?;
    let gt = rest.find('>').ok_or("unterminated <function=...> tag")?;
    let name = rest[..gt].trim().to_string();
    if name.is_empty() {
        return Err("empty function name".into());
    }
    let rest = &rest[gt + 1..];
    let end = rest.rfind("</function>").ok_or("missing </function>")?;
    if !rest[end + "</function>".len()..].trim().is_empty() {
        return Err("unexpected text after </function>".into());
    }
    let mut inner = &rest[..end];
    let mut params = Vec::new();
    loop {
        inner = inner.trim_start();
        if inner.is_empty() {
            break;
        }
        let r = inner.strip_prefix("<parameter=").ok_or_else(|| {
            let snippet: String = inner.chars().take(40).collect();
            format!("expected <parameter=NAME>, found {snippet:?}")
        })?;
        let gt = r.find('>').ok_or("unterminated <parameter=...> tag")?;
        let pname = r[..gt].trim().to_string();
        if pname.is_empty() {
            return Err("empty parameter name".into());
        }
        let after = &r[gt + 1..];
        let close = after.find("</parameter>");
        let open = after.find("<parameter=");
        let (value, next) = match (close, open) {
            (Some(c), Some(o)) if o < c => (&after[..o], &after[o..]),
            (Some(c), _) => (&after[..c], &after[c + "</parameter>".len()..]),
            (None, Some(o)) => (&after[..o], &after[o..]),
            (None, None) => (after, ""),
        };
        // The template writes `>\n{value}\n</parameter>`: strip exactly that framing.
        let value = value.strip_prefix('\n').unwrap_or(value);
        let value = value.strip_suffix('\n').unwrap_or(value);
        params.push((pname, value.to_string()));
        inner = next;
    }
    Ok((name, params))
}

/// Parses the Qwen3 JSON call; `arguments` (or `parameters`) may be an object or a JSON string.
fn parse_json_call(s: &str) -> Result<(String, Value), String> {
    let v: Value = serde_json::from_str(s).map_err(|e| format!("invalid JSON: {e}"))?;
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or("JSON call has no string `name`")?
        .to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()));
    let args = match args {
        Value::String(s) => {
            serde_json::from_str(&s).map_err(|e| format!("`arguments` string is not JSON: {e}"))?
        }
        other => other,
    };
    if !args.is_object() {
        return Err("`arguments` is not an object".into());
    }
    Ok((name, args))
}

/// Types a raw parameter string by its JSON-schema property: strings (and untyped or unknown
/// parameters) stay strings; other types are parsed as JSON, falling back to the string.
fn typed_value(raw: &str, prop: Option<&Value>) -> Value {
    let types: Vec<&str> = match prop.and_then(|p| p.get("type")) {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if types.is_empty() || types.contains(&"string") {
        return Value::String(raw.to_string());
    }
    let t = raw.trim();
    if types.contains(&"boolean") {
        // Models trained on Python-rendered arguments may write True/False.
        match t {
            "true" | "True" => return Value::Bool(true),
            "false" | "False" => return Value::Bool(false),
            _ => {}
        }
    }
    serde_json::from_str(t).unwrap_or_else(|_| Value::String(raw.to_string()))
}

/// Merges adjacent `Content` / `Reasoning` events, so event lists from different push splits
/// compare equal and a UI can coalesce pieces.
pub fn merge_text_events(events: Vec<ToolEvent>) -> Vec<ToolEvent> {
    let mut out: Vec<ToolEvent> = Vec::with_capacity(events.len());
    for ev in events {
        match (out.last_mut(), ev) {
            (Some(ToolEvent::Content(a)), ToolEvent::Content(b)) => a.push_str(&b),
            (Some(ToolEvent::Reasoning(a)), ToolEvent::Reasoning(b)) => a.push_str(&b),
            (_, ev) => out.push(ev),
        }
    }
    out
}

#[cfg(test)]
#[path = "toolcall_tests.rs"]
mod tests;
