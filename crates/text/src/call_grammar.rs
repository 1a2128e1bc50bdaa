//! Grammars (llguidance Lark) for tool calls in the two wire formats [`crate::toolcall`]
//! parses, so a constrained call always parses and its arguments follow the tool's schema.
//!
//! Strict by default, as OpenAI's `"strict": true`: the Qwen3.5 XML call may only name declared
//! parameters, in the schema's order, required ones present, each value of the declared type
//! (strings as raw text up to `\n</parameter>`, capped by `maxLength`; string enums as one of
//! their values; anything else as JSON under the property's schema); the Qwen3 JSON call's
//! `arguments` follow the whole parameters schema. A tool whose `function.strict` is `false`
//! only has its call's shape constrained (any parameter names, any object).
use serde_json::Value;

use crate::constrain::with_json_layout;

/// The two call formats (see [`crate::toolcall`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFormat {
    /// `<tool_call>\n<function=NAME>\n<parameter=P>\nvalue\n</parameter>\n</function>\n</tool_call>`
    Xml,
    /// `<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>`
    Json,
}

/// Where the grammar takes over: the text before it is already written (by the model or by
/// the prompt's forced opening).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallStart<'a> {
    /// Right after `<tool_call>`: the model chose to call (or `tool_choice: required` opened
    /// the call with `<tool_call>\n`, see `newline_written`).
    AfterOpen { newline_written: bool },
    /// Inside the call of this function, whose header the prompt wrote
    /// (`<function=NAME>\n`, or `{"name": NAME, "arguments": `).
    InFunction(&'a str),
}

/// A Lark grammar for the rest of one call, ending with the closing tag. `close` is how the
/// grammar spells `</tool_call>`: `<\/tool_call>`-style special-token reference when the
/// tokenizer has it as one special token (what the model was trained to emit), else a quoted
/// literal. Tools are OpenAI tool objects or bare `{name, parameters, strict}` functions.
/// `None` when no tool matches (an empty list, or `InFunction` naming none of them).
pub fn tool_call_lark(
    tools: &[Value],
    format: CallFormat,
    start: CallStart,
    close: &str,
) -> Option<String> {
    let mut g = Grammar::default();
    let lead = match start {
        CallStart::AfterOpen {
            newline_written: false,
        } => "\"\\n\" ",
        _ => "",
    };
    let funcs: Vec<(&str, &Value, bool)> = tools
        .iter()
        .filter_map(|t| {
            let f = t.get("function").unwrap_or(t);
            let name = f.get("name")?.as_str()?;
            let params = f.get("parameters").unwrap_or(&Value::Null);
            let strict = f.get("strict").and_then(Value::as_bool).unwrap_or(true);
            Some((name, params, strict))
        })
        .filter(|(name, _, _)| match start {
            CallStart::InFunction(n) => *name == n,
            CallStart::AfterOpen { .. } => true,
        })
        .collect();
    let mut alts = Vec::new();
    for (i, (name, params, strict)) in funcs.iter().enumerate() {
        let body = match format {
            CallFormat::Xml => g.xml_params(i, params, *strict),
            CallFormat::Json => g.json_args(i, params, *strict),
        };
        let head = match (format, start) {
            (_, CallStart::InFunction(_)) => String::new(),
            (CallFormat::Xml, _) => format!("{} ", lit(&format!("<function={name}>\n"))),
            (CallFormat::Json, _) => {
                let quoted = serde_json::to_string(name).unwrap_or_default();
                format!(
                    "{} ",
                    lit(&format!("{{\"name\": {quoted}, \"arguments\": "))
                )
            }
        };
        let tail = match format {
            CallFormat::Xml => lit("</function>\n"),
            CallFormat::Json => lit("}\n"),
        };
        g.rules.push(format!("f{i}: {head}{body} {tail}"));
        alts.push(format!("f{i}"));
    }
    if alts.is_empty() {
        return None;
    }
    let mut out = format!("start: {lead}({}) {close}\n", alts.join(" | "));
    for r in &g.rules {
        out.push_str(r);
        out.push('\n');
    }
    Some(out)
}

/// A quoted Lark string literal (JSON escapes, which the Lark reader takes).
fn lit(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// `%json {schema}` with flashmoe's layout.
fn json_rule(schema: &Value) -> String {
    let s = if schema.is_null() {
        serde_json::json!({"type": "object"})
    } else {
        schema.clone()
    };
    format!("%json {}", with_json_layout(&s))
}

/// Raw parameter text: anything without `\n</parameter>`, then that closing line. A terminal
/// (one lexeme), so it ends exactly at the first closing tag.
fn raw_value_terminal(max_chars: Option<u64>) -> String {
    let body = match max_chars {
        Some(n) => format!("/(?s:.{{0,{n}}})/"),
        None => "/(?s:.*)/".into(),
    };
    format!("{body} & ~/(?s:.*\\n<\\/parameter>.*)/")
}

#[derive(Default)]
struct Grammar {
    rules: Vec<String>,
}

impl Grammar {
    fn xml_params(&mut self, i: usize, params: &Value, strict: bool) -> String {
        let close = lit("\n</parameter>\n");
        if !strict {
            self.rules.push(format!(
                "f{i}_any: {} /[A-Za-z0-9_.\\-]{{1,64}}/ {} F{i}_RAW",
                lit("<parameter="),
                lit(">\n")
            ));
            self.rules
                .push(format!("F{i}_RAW: ({}) {close}", raw_value_terminal(None)));
            return format!("f{i}_any*");
        }
        let required: Vec<&str> = params
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let props = params.get("properties").and_then(Value::as_object);
        let mut seq = Vec::new();
        for (j, (pname, prop)) in props.into_iter().flatten().enumerate() {
            let open = lit(&format!("<parameter={pname}>\n"));
            let value = self.xml_value(i, j, prop, &close);
            self.rules.push(format!("f{i}_p{j}: {open} {value}"));
            let opt = if required.contains(&pname.as_str()) {
                ""
            } else {
                "?"
            };
            seq.push(format!("f{i}_p{j}{opt}"));
        }
        seq.join(" ")
    }

    /// One parameter's value and closing line, typed the way [`crate::toolcall`] reads it.
    fn xml_value(&mut self, i: usize, j: usize, prop: &Value, close: &str) -> String {
        let types: Vec<&str> = match prop.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let enum_strings: Option<Vec<&str>> = prop
            .get("enum")
            .and_then(Value::as_array)
            .and_then(|e| e.iter().map(Value::as_str).collect());
        if let Some(values) = enum_strings.filter(|v| !v.is_empty()) {
            let alts: Vec<String> = values.iter().map(|v| lit(v)).collect();
            return format!("({}) {close}", alts.join(" | "));
        }
        if types.is_empty() || types.contains(&"string") {
            let max = prop.get("maxLength").and_then(Value::as_u64);
            let name = format!("F{i}_P{j}");
            self.rules
                .push(format!("{name}: ({}) {close}", raw_value_terminal(max)));
            return name;
        }
        let name = format!("f{i}_v{j}");
        self.rules.push(format!("{name}: {}", json_rule(prop)));
        format!("{name} {close}")
    }

    fn json_args(&mut self, i: usize, params: &Value, strict: bool) -> String {
        let name = format!("f{i}_args");
        let schema = if strict && params.is_object() {
            params.clone()
        } else {
            serde_json::json!({"type": "object"})
        };
        self.rules.push(format!("{name}: {}", json_rule(&schema)));
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn xml_grammar_names_each_parameter_in_order() {
        let tools = [
            json!({"type": "function", "function": {"name": "bash", "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
            "required": ["command"]}}}),
        ];
        let g = tool_call_lark(
            &tools,
            CallFormat::Xml,
            CallStart::AfterOpen {
                newline_written: false,
            },
            "</tool_call>",
        )
        .expect("a grammar");
        assert!(g.starts_with("start: \"\\n\" (f0) </tool_call>"), "{g}");
        assert!(
            g.contains("f0: \"<function=bash>\\n\" f0_p0 f0_p1? \"</function>\\n\""),
            "{g}"
        );
        assert!(g.contains("f0_v1: %json {\"type\":\"integer\""), "{g}");
    }
}
