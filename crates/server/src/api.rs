//! Request parsing and validation: an OpenAI JSON body becomes a [`GenerationRequest`], or an
//! [`ApiError`] naming the offending parameter. Checked by hand (not serde derive) so that each
//! wrong type or value gets its own precise message.
use flashmoe_runtime::{GenerationRequest, PromptInput, SamplingOverrides, ToolChoice};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// A parsed chat or completion request.
pub struct Parsed {
    pub req: GenerationRequest,
    pub stream: bool,
    pub include_usage: bool,
    /// The `model` the client named, echoed back.
    pub model: Option<String>,
}

type Obj = Map<String, Value>;

pub(crate) fn bad(param: &str, msg: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(format!("`{param}`: {msg}"), Some(param))
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A present, non-null field.
pub(crate) fn field<'a>(o: &'a Obj, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

fn opt_bool(o: &Obj, key: &str) -> Result<Option<bool>, ApiError> {
    match field(o, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(bad(
            key,
            format!("expected a boolean, got {}", type_name(v)),
        )),
    }
}

fn opt_num(o: &Obj, key: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
    match field(o, key) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if !(min..=max).contains(&x) {
                return Err(bad(key, format!("{x} is outside [{min}, {max}]")));
            }
            Ok(Some(x))
        }
        Some(v) => Err(bad(key, format!("expected a number, got {}", type_name(v)))),
    }
}

fn opt_int(o: &Obj, key: &str, min: i64) -> Result<Option<i64>, ApiError> {
    match field(o, key) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) if i >= min => Ok(Some(i)),
            Some(i) => Err(bad(key, format!("{i} is below the minimum of {min}"))),
            None => Err(bad(key, format!("expected an integer, got {n}"))),
        },
        Some(v) => Err(bad(
            key,
            format!("expected an integer, got {}", type_name(v)),
        )),
    }
}

/// Parses the body text into a JSON object.
pub fn parse_body(body: &[u8]) -> Result<Obj, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    match v {
        Value::Object(o) => Ok(o),
        v => Err(not_object(&v)),
    }
}

/// The request as a JSON object.
pub fn as_object(v: &Value) -> Result<&Obj, ApiError> {
    match v {
        Value::Object(o) => Ok(o),
        v => Err(not_object(v)),
    }
}

fn not_object(v: &Value) -> ApiError {
    ApiError::invalid(
        format!(
            "the request body must be a JSON object, got {}",
            type_name(v)
        ),
        None,
    )
}

/// Whether `v` is absent, null, or one of the values that ask for nothing (`false`, `0`, `""`,
/// `{}`, `[]`): a client library may send such a default for a feature it does not use.
fn is_default(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => true,
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Object(m)) => m.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Bool(true)) => false,
    }
}

/// Refuses, with 400, OpenAI features this server does not implement, rather than ignoring
/// them and answering something the client did not ask for. Values that ask for nothing pass.
fn refuse_unsupported(o: &Obj, completion: bool) -> Result<(), ApiError> {
    // Chat completions take structured output (`crate::structured`); plain completions only
    // the format that asks for nothing.
    match field(o, "response_format") {
        None => {}
        Some(_) if !completion => {}
        Some(Value::Object(f)) => match f.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some(t) => {
                return Err(bad(
                    "response_format",
                    format!("`{t}` is only supported by /v1/chat/completions"),
                ))
            }
            None => return Err(bad("response_format", "needs a `type`")),
        },
        Some(v) => {
            return Err(bad(
                "response_format",
                format!("expected an object, got {}", type_name(v)),
            ))
        }
    }
    if completion && field(o, "grammar").is_some() {
        return Err(bad("grammar", "is only supported by /v1/chat/completions"));
    }
    if completion && !is_default(o.get("suffix")) {
        return Err(bad(
            "suffix",
            "text after the completion (fill-in-the-middle) is not supported",
        ));
    }
    let refused: [(&str, &str); 9] = [
        ("logprobs", "log probabilities are not supported"),
        ("top_logprobs", "log probabilities are not supported"),
        ("logit_bias", "logit bias is not supported"),
        ("best_of", "only best_of = 1 is supported"),
        (
            "functions",
            "the deprecated functions API is not supported: send `tools`",
        ),
        (
            "function_call",
            "the deprecated functions API is not supported: send `tool_choice`",
        ),
        ("audio", "audio output is not supported"),
        ("tools", "tools are only supported by /v1/chat/completions"),
        (
            "tool_choice",
            "tools are only supported by /v1/chat/completions",
        ),
    ];
    for (key, why) in refused {
        let chat_feature = matches!(key, "tools" | "tool_choice");
        if chat_feature && !completion {
            continue;
        }
        // best_of = 1 asks for the one completion there is.
        let v = o.get(key);
        if key == "best_of" && v.and_then(Value::as_u64) == Some(1) {
            continue;
        }
        // Legacy completions take `logprobs` as a count, where 0 still asks for the chosen
        // tokens' log probabilities.
        let count = completion && key == "logprobs" && v.is_some_and(Value::is_number);
        if count || !is_default(v) {
            return Err(bad(key, why));
        }
    }
    if let Some(Value::Array(m)) = field(o, "modalities") {
        if m.iter().any(|x| x.as_str() != Some("text")) {
            return Err(bad("modalities", "only text output is supported"));
        }
    }
    Ok(())
}

/// Fields shared by chat and plain completions.
fn common(
    o: &Obj,
    context: usize,
) -> Result<(GenerationRequest, bool, bool, Option<String>), ApiError> {
    let model = match field(o, "model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(bad(
                "model",
                format!("expected a string, got {}", type_name(v)),
            ))
        }
    };
    let stream = opt_bool(o, "stream")?.unwrap_or(false);
    let include_usage = match field(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => opt_bool(so, "include_usage")
            .map_err(|_| bad("stream_options.include_usage", "expected a boolean"))?
            .unwrap_or(false),
        Some(v) => {
            return Err(bad(
                "stream_options",
                format!("expected an object, got {}", type_name(v)),
            ))
        }
    };
    if let Some(n) = opt_int(o, "n", 1)? {
        if n != 1 {
            return Err(bad("n", "only n = 1 is supported"));
        }
    }
    let max_tokens = match opt_int(o, "max_completion_tokens", 1)? {
        Some(m) => Some(("max_completion_tokens", m)),
        None => opt_int(o, "max_tokens", 1)?.map(|m| ("max_tokens", m)),
    };
    let max_tokens = match max_tokens {
        Some((key, m)) if m as u64 >= context as u64 => {
            return Err(bad(
                key,
                format!("{m} is beyond the model's context of {context} tokens (prompt included)"),
            )
            .with_code("context_length_exceeded"))
        }
        Some((_, m)) => Some(m as usize),
        None => None,
    };
    let top_k = opt_int(o, "top_k", -1)?.map(|k| k.max(0) as usize);
    let sampling = SamplingOverrides {
        temperature: opt_num(o, "temperature", 0.0, 2.0)?.map(|x| x as f32),
        top_p: opt_num(o, "top_p", 0.0, 1.0)?.map(|x| x as f32),
        top_k,
        min_p: opt_num(o, "min_p", 0.0, 1.0)?.map(|x| x as f32),
        repetition_penalty: opt_num(o, "repetition_penalty", 0.0, 10.0)?.map(|x| x as f32),
        presence_penalty: opt_num(o, "presence_penalty", -2.0, 2.0)?.map(|x| x as f32),
        frequency_penalty: opt_num(o, "frequency_penalty", -2.0, 2.0)?.map(|x| x as f32),
        seed: opt_int(o, "seed", i64::MIN)?.map(|s| s as u64),
    };
    if sampling.repetition_penalty == Some(0.0) {
        return Err(bad("repetition_penalty", "must be positive"));
    }
    let stop = match field(o, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| match s {
                Value::String(s) => Ok(s.clone()),
                v => Err(bad(
                    "stop",
                    format!("expected strings, got {}", type_name(v)),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(bad(
                "stop",
                format!(
                    "expected a string or an array of strings, got {}",
                    type_name(v)
                ),
            ))
        }
    };
    let mut req = GenerationRequest::new(PromptInput::Text(String::new()));
    // vLLM's extension: exactly max_tokens (benchmarks, tests).
    req.ignore_eos = opt_bool(o, "ignore_eos")?.unwrap_or(false);
    req.sampling = sampling;
    req.max_tokens = max_tokens;
    req.stop = stop;
    Ok((req, stream, include_usage, model))
}

/// `POST /v1/chat/completions`.
pub fn parse_chat(o: &Obj, context: usize) -> Result<Parsed, ApiError> {
    refuse_unsupported(o, false)?;
    let (mut req, stream, include_usage, model) = common(o, context)?;
    let messages = match field(o, "messages") {
        None => return Err(bad("messages", "is required")),
        Some(Value::Array(a)) if a.is_empty() => return Err(bad("messages", "must not be empty")),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => {
            return Err(bad(
                "messages",
                format!("expected an array, got {}", type_name(v)),
            ))
        }
    };
    let tools = match field(o, "tools") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, t)| tool(i, t))
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(bad(
                "tools",
                format!("expected an array, got {}", type_name(v)),
            ))
        }
    };
    req.tool_choice = match field(o, "tool_choice") {
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("unknown value `{other}` (auto, none, required, or a function)"),
                ))
            }
        },
        Some(Value::Object(c)) => {
            let name = c
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    bad(
                        "tool_choice",
                        "expected {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            ToolChoice::Function(name.to_string())
        }
        Some(v) => {
            return Err(bad(
                "tool_choice",
                format!("expected a string or an object, got {}", type_name(v)),
            ))
        }
    };
    if tools.is_empty()
        && matches!(
            req.tool_choice,
            ToolChoice::Required | ToolChoice::Function(_)
        )
    {
        return Err(bad("tool_choice", "names a tool, but `tools` is empty"));
    }
    let enable_thinking = match field(o, "chat_template_kwargs") {
        None => None,
        Some(Value::Object(k)) => opt_bool(k, "enable_thinking")
            .map_err(|_| bad("chat_template_kwargs.enable_thinking", "expected a boolean"))?,
        Some(v) => {
            return Err(bad(
                "chat_template_kwargs",
                format!("expected an object, got {}", type_name(v)),
            ))
        }
    };
    let add_generation_prompt = match field(o, "add_generation_prompt") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(bad(
                "add_generation_prompt",
                format!("expected a boolean, got {}", type_name(v)),
            ))
        }
    };
    req.grammar = crate::structured::output_grammar(o)?;
    req.prompt = PromptInput::Messages {
        messages,
        tools,
        enable_thinking,
        add_generation_prompt,
    };
    Ok(Parsed {
        req,
        stream,
        include_usage,
        model,
    })
}

/// Message content as the template wants it: a string (text parts joined), or null.
fn content(i: usize, v: Option<&Value>, role: &str) -> Result<Value, ApiError> {
    let key = format!("messages[{i}].content");
    match v {
        None | Some(Value::Null) => Ok(Value::Null),
        Some(Value::String(s)) => Ok(Value::String(s.clone())),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (Some(t), _) if t != "text" => {
                        return Err(bad(
                            &key,
                            format!("content part type `{t}` is not supported (text only)"),
                        ))
                    }
                    _ => {
                        return Err(bad(
                            &key,
                            "expected text parts {\"type\": \"text\", \"text\": \"...\"}",
                        ))
                    }
                }
            }
            Ok(Value::String(text))
        }
        Some(v) => Err(bad(
            &key,
            format!(
                "expected a string or an array of parts in a {role} message, got {}",
                type_name(v)
            ),
        )),
    }
}

fn message(i: usize, m: &Value) -> Result<Value, ApiError> {
    let Value::Object(m) = m else {
        return Err(bad(
            &format!("messages[{i}]"),
            format!("expected an object, got {}", type_name(m)),
        ));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) => r.as_str(),
        None => return Err(bad(&format!("messages[{i}].role"), "is required")),
        Some(v) => {
            return Err(bad(
                &format!("messages[{i}].role"),
                format!("expected a string, got {}", type_name(v)),
            ))
        }
    };
    let role = match role {
        "developer" => "system",
        "system" | "user" | "assistant" | "tool" => role,
        other => {
            return Err(bad(
                &format!("messages[{i}].role"),
                format!("unknown role `{other}` (system, developer, user, assistant, tool)"),
            ))
        }
    };
    let content = content(i, m.get("content"), role)?;
    let mut out = Map::new();
    out.insert("role".into(), Value::String(role.into()));
    if content.is_null() && role != "assistant" {
        return Err(bad(
            &format!("messages[{i}].content"),
            format!("is required in a {role} message"),
        ));
    }
    out.insert(
        "content".into(),
        if content.is_null() {
            Value::String(String::new())
        } else {
            content
        },
    );
    if role == "assistant" {
        if let Some(r) = field(m, "reasoning_content") {
            let Value::String(_) = r else {
                return Err(bad(
                    &format!("messages[{i}].reasoning_content"),
                    "expected a string",
                ));
            };
            out.insert("reasoning_content".into(), r.clone());
        }
        match field(m, "tool_calls") {
            None => {}
            Some(Value::Array(calls)) => {
                for (j, c) in calls.iter().enumerate() {
                    let key = format!("messages[{i}].tool_calls[{j}]");
                    let f = c
                        .get("function")
                        .ok_or_else(|| bad(&key, "needs a `function` object"))?;
                    if !f.get("name").is_some_and(Value::is_string) {
                        return Err(bad(&key, "`function.name` must be a string"));
                    }
                    match f.get("arguments") {
                        None | Some(Value::String(_)) | Some(Value::Object(_)) => {}
                        Some(v) => {
                            return Err(bad(
                                &key,
                                format!(
                                    "`function.arguments` must be a JSON string, got {}",
                                    type_name(v)
                                ),
                            ))
                        }
                    }
                }
                out.insert("tool_calls".into(), Value::Array(calls.clone()));
            }
            Some(v) => {
                return Err(bad(
                    &format!("messages[{i}].tool_calls"),
                    format!("expected an array, got {}", type_name(v)),
                ))
            }
        }
    }
    if role == "tool" {
        if let Some(id) = field(m, "tool_call_id") {
            out.insert("tool_call_id".into(), id.clone());
        }
    }
    if let Some(Value::String(n)) = m.get("name") {
        out.insert("name".into(), Value::String(n.clone()));
    }
    Ok(Value::Object(out))
}

fn tool(i: usize, t: &Value) -> Result<Value, ApiError> {
    let key = format!("tools[{i}]");
    let ty = t.get("type").and_then(Value::as_str).unwrap_or("function");
    if ty != "function" {
        return Err(bad(
            &key,
            format!("type `{ty}` is not supported (function only)"),
        ));
    }
    let f = t
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(&key, "needs a `function` object"))?;
    if !f.get("name").is_some_and(Value::is_string) {
        return Err(bad(&key, "`function.name` must be a string"));
    }
    if field(f, "strict").is_some_and(|s| !s.is_boolean()) {
        return Err(bad(&key, "`function.strict` must be a boolean"));
    }
    if let Some(p) = field(f, "parameters") {
        if !p.is_object() {
            return Err(bad(
                &key,
                "`function.parameters` must be a JSON Schema object",
            ));
        }
    }
    Ok(t.clone())
}

/// `POST /v1/completions`: the prompt is text (a string or a one-element list of strings) or
/// token ids; output is raw text.
pub fn parse_completion(o: &Obj, context: usize) -> Result<Parsed, ApiError> {
    refuse_unsupported(o, true)?;
    let (mut req, stream, include_usage, model) = common(o, context)?;
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter()
            .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
            .collect()
    };
    req.prompt = match field(o, "prompt") {
        None => return Err(bad("prompt", "is required")),
        Some(Value::String(s)) => PromptInput::Text(s.clone()),
        Some(Value::Array(a)) => match a.as_slice() {
            [Value::String(s)] => PromptInput::Text(s.clone()),
            [Value::Array(inner)] => PromptInput::Ids(ids(inner).ok_or_else(|| bad("prompt", "token ids must be non-negative integers"))?),
            a if !a.is_empty() && a.iter().all(Value::is_number) => {
                PromptInput::Ids(ids(a).ok_or_else(|| bad("prompt", "token ids must be non-negative integers"))?)
            }
            _ => return Err(bad("prompt", "expected a string, one string in a list, or a list of token ids (one prompt per request)")),
        },
        Some(v) => return Err(bad("prompt", format!("expected a string, got {}", type_name(v)))),
    };
    if opt_bool(o, "echo")? == Some(true) {
        return Err(bad("echo", "echo is not supported"));
    }
    req.raw = true;
    Ok(Parsed {
        req,
        stream,
        include_usage,
        model,
    })
}
