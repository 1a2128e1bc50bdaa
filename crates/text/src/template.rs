//! Chat template: renders a conversation (OpenAI-style `messages`, optional `tools`) into the
//! prompt string the model was trained on, with the model's own Jinja template.
//!
//! Owns Python/Jinja2 compatibility as Hugging Face `apply_chat_template` sets it up:
//! `trim_blocks` + `lstrip_blocks`, a `raise_exception` function, Python string methods, a
//! `tojson` that prints like `json.dumps` (", " and ": " separators, no ASCII escaping) and a
//! `string` filter that prints booleans/None as Python does. It never tokenizes.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};

use crate::error::{read_json_opt, Result, TextError};

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template plus the special-token strings it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// Per-render switches besides the messages and tools.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Append the opening of an assistant turn (`<|im_start|>assistant\n...`).
    pub add_generation_prompt: bool,
    /// `None` leaves `enable_thinking` undefined, so the template's default applies.
    pub enable_thinking: Option<bool>,
    /// Further variables passed to the template (e.g. `reasoning_effort`), as HF passes kwargs.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ChatTemplate {
    /// Loads `dir/chat_template.jinja`, else `chat_template` from `dir/tokenizer_config.json`
    /// (a string, or a list of `{name, template}` from which "default" is taken), else from
    /// `dir/chat_template.json` (the processor's file). BOS/EOS strings
    /// come from `tokenizer_config.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_opt(&config_path)?;
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.is_file() {
            std::fs::read_to_string(&jinja_path)
                .map_err(|e| TextError::io("reading", &jinja_path, e))?
        } else {
            let field = config.as_ref().and_then(|c| c.get("chat_template"));
            match template_from_config_field(field, &config_path)? {
                Some(t) => t,
                // Multimodal releases (processor layout) may keep the template only in
                // `chat_template.json` as `{"chat_template": ...}`; pack copies that file too.
                None => {
                    let json_path = dir.join("chat_template.json");
                    let j = read_json_opt(&json_path)?;
                    template_from_config_field(
                        j.as_ref().and_then(|c| c.get("chat_template")),
                        &json_path,
                    )?
                    .ok_or_else(|| TextError::TemplateMissing(dir.to_path_buf()))?
                }
            }
        };
        let mut tpl = Self::from_source(source)?;
        if let Some(c) = &config {
            tpl.bos_token = special_token_string(c.get("bos_token"));
            tpl.eos_token = special_token_string(c.get("eos_token"));
        }
        Ok(tpl)
    }

    /// Compiles a template from its source text.
    pub fn from_source(source: impl Into<String>) -> Result<Self> {
        let mut env = Environment::new();
        // HF: jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson_filter);
        env.add_filter("string", python_string_filter);
        env.add_template_owned(TEMPLATE_NAME, source.into())
            .map_err(|e| TextError::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token: None,
            eos_token: None,
        })
    }

    /// Sets the `bos_token` / `eos_token` strings visible to the template.
    pub fn with_special_tokens(mut self, bos: Option<String>, eos: Option<String>) -> Self {
        self.bos_token = bos;
        self.eos_token = eos;
        self
    }

    /// Renders `messages` (a JSON array of message objects) and optional `tools` (a JSON array
    /// of tool definitions). A template that raises gives [`TextError::Template`] with its message.
    pub fn render(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        opts: &RenderOptions,
    ) -> Result<String> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), Value::from_serialize(v));
        }
        ctx.insert("messages".into(), Value::from_serialize(messages));
        if let Some(t) = tools {
            ctx.insert("tools".into(), Value::from_serialize(t));
        }
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(opts.add_generation_prompt),
        );
        if let Some(t) = opts.enable_thinking {
            ctx.insert("enable_thinking".into(), Value::from(t));
        }
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token".into(), Value::from(b.as_str()));
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token".into(), Value::from(e.as_str()));
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TextError::Template(describe(&e)))?;
        tmpl.render(ctx)
            .map_err(|e| TextError::Template(describe(&e)))
    }
}

/// Extracts the template source from `tokenizer_config.json`'s `chat_template` field.
fn template_from_config_field(
    field: Option<&serde_json::Value>,
    path: &Path,
) -> Result<Option<String>> {
    let bad = |msg: &str| TextError::BadField {
        path: path.to_path_buf(),
        field: "chat_template",
        msg: msg.to_string(),
    };
    match field {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => {
            for entry in list {
                if entry.get("name").and_then(|n| n.as_str()) == Some("default") {
                    return entry
                        .get("template")
                        .and_then(|t| t.as_str())
                        .map(|t| Some(t.to_string()))
                        .ok_or_else(|| bad("entry \"default\" has no string `template`"));
                }
            }
            Err(bad("list of templates has no entry named \"default\""))
        }
        Some(_) => Err(bad("expected a string or a list of named templates")),
    }
}

/// `bos_token`/`eos_token` may be a string, null, or an AddedToken object `{content: ...}`.
fn special_token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Formats a minijinja error with its cause chain and, for `raise_exception`, just its message.
fn describe(e: &Error) -> String {
    if e.kind() == ErrorKind::InvalidOperation {
        if let Some(detail) = e.detail() {
            if let Some(msg) = detail.strip_prefix(RAISED) {
                return format!("template raised: {msg} (line {})", e.line().unwrap_or(0));
            }
        }
    }
    let mut out = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

const RAISED: &str = "raise_exception: ";

fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{msg}"),
    ))
}

/// Python's `str()` for the values JSON can carry: `True`/`False`/`None` rather than Rust's
/// spelling, so tool arguments render as transformers renders them.
fn python_string_filter(v: Value) -> Value {
    if v.is_undefined() || v.is_none() {
        return Value::from(if v.is_none() { "None" } else { "" });
    }
    if let Some(b) = v.as_str() {
        return Value::from(b);
    }
    match v.kind() {
        minijinja::value::ValueKind::Bool => {
            Value::from(if v.is_true() { "True" } else { "False" })
        }
        _ => Value::from(v.to_string()),
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`. Output is marked safe (no HTML escaping).
fn tojson_filter(v: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&v).map_err(|e| {
        Error::new(ErrorKind::InvalidOperation, "tojson: value is not JSON").with_source(e)
    })?;
    if sort_keys.unwrap_or(false) {
        json = sort_json_keys(json);
    }
    let mut out = String::new();
    write_py_json(&json, indent, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn sort_json_keys(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<_> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_json_keys(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(sort_json_keys).collect())
        }
        other => other,
    }
}

/// Writes JSON the way Python's `json.dumps` does: `", "`/`": "` separators without indent,
/// `","` + newline with indent, floats in `repr` form.
pub(crate) fn write_py_json(
    v: &serde_json::Value,
    indent: Option<usize>,
    level: usize,
    out: &mut String,
) {
    use serde_json::Value as J;
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&py_float_repr(f)),
            _ => out.push_str(&n.to_string()),
        },
        // serde_json escapes exactly Python's set for ensure_ascii=False: `"`, `\`, and controls.
        J::String(s) => out.push_str(&serde_json::Value::String(s.clone()).to_string()),
        J::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_py_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        J::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_py_json(item, indent, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

/// Python `repr(float)`: shortest round-trip digits, positional for 1e-4 <= |x| < 1e16,
/// otherwise `d.ddde+XX`; always shows a `.0` on whole numbers.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{f:e}"); // shortest digits, e.g. "-1.5e-7"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn py_json_matches_python_dumps() {
        let v = json!({"a": [1, 2.5, "é\n\"x\""], "b": {}, "c": null, "d": true, "e": 1e-7, "f": 1e16, "g": 3.0});
        let mut s = String::new();
        write_py_json(&v, None, 0, &mut s);
        assert_eq!(
            s,
            r#"{"a": [1, 2.5, "é\n\"x\""], "b": {}, "c": null, "d": true, "e": 1e-07, "f": 1e+16, "g": 3.0}"#
        );
        let mut s = String::new();
        write_py_json(&json!({"a": [1, 2]}), Some(2), 0, &mut s);
        assert_eq!(s, "{\n  \"a\": [\n    1,\n    2\n  ]\n}");
    }

    #[test]
    fn raise_exception_is_a_template_error() {
        let t = ChatTemplate::from_source("{{ raise_exception('nope') }}").unwrap();
        let err = t
            .render(&json!([]), None, &RenderOptions::default())
            .unwrap_err();
        match err {
            TextError::Template(msg) => assert!(msg.contains("template raised: nope"), "{msg}"),
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn string_filter_is_pythonic() {
        let t = ChatTemplate::from_source("{{ a|string }} {{ b|string }} {{ c|string }}").unwrap();
        let mut opts = RenderOptions::default();
        opts.extra.insert("a".into(), json!(true));
        opts.extra.insert("b".into(), json!(null));
        opts.extra.insert("c".into(), json!(42));
        assert_eq!(t.render(&json!([]), None, &opts).unwrap(), "True None 42");
    }

    #[test]
    fn config_field_list_takes_default() {
        let p = Path::new("tokenizer_config.json");
        let f =
            json!([{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]);
        assert_eq!(
            template_from_config_field(Some(&f), p).unwrap().as_deref(),
            Some("y")
        );
        assert!(template_from_config_field(Some(&json!(3)), p).is_err());
    }

    #[test]
    fn template_from_processor_chat_template_json() {
        // A directory whose only template is the processor's chat_template.json used to be
        // refused as having no template at all.
        let dir = std::env::temp_dir().join(format!("flashmoe-tpl-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("chat_template.json");
        std::fs::write(&f, r#"{"chat_template": "{{ messages[0].content }}!"}"#).unwrap();
        let t = ChatTemplate::from_dir(&dir).expect("template from chat_template.json");
        let msgs = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(
            t.render(&msgs, None, &RenderOptions::default()).unwrap(),
            "hi!"
        );
        // tokenizer_config.json's template, when there is one, comes first (as for HF tokenizers).
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": "{{ 1 }}"}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_dir(&dir).unwrap();
        assert_eq!(
            t.render(&msgs, None, &RenderOptions::default()).unwrap(),
            "1"
        );
        std::fs::write(&f, r#"{"chat_template": 7}"#).unwrap();
        std::fs::remove_file(dir.join("tokenizer_config.json")).unwrap();
        let Err(e) = ChatTemplate::from_dir(&dir) else {
            panic!("a non-string chat_template was accepted")
        };
        let e = e.to_string();
        assert!(e.contains("chat_template.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
