//! Tests of the streaming tool-call parser: every case is also fed char by char and in
//! 3-byte-ish chunks, and must give the same merged events as the whole text.

use super::*;
use serde_json::json;

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "bash", "parameters": {"type": "object",
            "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"},
                           "verbose": {"type": "boolean"}, "env": {"type": "object"},
                           "ratio": {"type": ["number", "null"]}}}}},
        {"name": "read", "parameters": {"properties": {"path": {"type": "string"}}}}
    ])
}

/// Parses `text` whole, char by char and in small chunks; asserts all agree; returns events.
fn parse(text: &str, thinking: bool) -> Vec<ToolEvent> {
    let t = tools();
    let whole = {
        let mut p = ToolCallParser::new(Some(&t), thinking);
        let mut ev = p.push(text);
        ev.extend(p.finish());
        merge_text_events(ev)
    };
    let by_char = {
        let mut p = ToolCallParser::new(Some(&t), thinking);
        let mut ev = Vec::new();
        for c in text.chars() {
            ev.extend(p.push(c.encode_utf8(&mut [0; 4])));
        }
        ev.extend(p.finish());
        merge_text_events(ev)
    };
    let chunks: Vec<String> = text
        .chars()
        .collect::<Vec<_>>()
        .chunks(3)
        .map(|c| c.iter().collect())
        .collect();
    let by_chunk = {
        let mut p = ToolCallParser::new(Some(&t), thinking);
        let mut ev = Vec::new();
        for c in &chunks {
            ev.extend(p.push(c));
        }
        ev.extend(p.finish());
        merge_text_events(ev)
    };
    assert_eq!(whole, by_char, "char-by-char differs for {text:?}");
    assert_eq!(whole, by_chunk, "chunked differs for {text:?}");
    whole
}

fn content(s: &str) -> ToolEvent {
    ToolEvent::Content(s.into())
}

#[test]
fn plain_content_passes_through() {
    assert_eq!(
        parse("a < b and <tool is fine", false),
        [content("a < b and <tool is fine")]
    );
    assert_eq!(parse("", false), []);
}

#[test]
fn well_formed_xml_call_with_typed_values() {
    let text = "<tool_call>\n<function=bash>\n<parameter=command>\nls -la\n</parameter>\n\
                <parameter=timeout>\n30\n</parameter>\n<parameter=verbose>\nTrue\n</parameter>\n\
                <parameter=env>\n{\"A\": 1}\n</parameter>\n<parameter=ratio>\nabc\n</parameter>\n\
                </function>\n</tool_call>";
    assert_eq!(
        parse(text, false),
        [ToolEvent::ToolCall {
            name: "bash".into(),
            arguments: json!({"command": "ls -la", "timeout": 30, "verbose": true,
                              "env": {"A": 1}, "ratio": "abc"})
        }]
    );
}

#[test]
fn string_parameter_stays_string_and_keeps_inner_newlines() {
    let text = "<tool_call>\n<function=bash>\n<parameter=command>\n42\n\necho hi\n</parameter>\n</function>\n</tool_call>";
    assert_eq!(
        parse(text, false),
        [ToolEvent::ToolCall {
            name: "bash".into(),
            arguments: json!({"command": "42\n\necho hi"})
        }]
    );
}

#[test]
fn json_call_form() {
    let text =
        "<tool_call>\n{\"name\": \"read\", \"arguments\": {\"path\": \"/tmp/x\"}}\n</tool_call>";
    assert_eq!(
        parse(text, false),
        [ToolEvent::ToolCall {
            name: "read".into(),
            arguments: json!({"path": "/tmp/x"})
        }]
    );
}

#[test]
fn reasoning_then_content_then_calls() {
    let text = "Let me look.\n</think>\n\nI will list files.\n\n<tool_call>\n<function=bash>\n\
                <parameter=command>\nls\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n\
                <function=read>\n<parameter=path>\na.txt\n</parameter>\n</function>\n</tool_call>";
    assert_eq!(
        parse(text, true),
        [
            ToolEvent::Reasoning("Let me look.\n".into()),
            content("I will list files.\n\n"),
            ToolEvent::ToolCall {
                name: "bash".into(),
                arguments: json!({"command": "ls"})
            },
            ToolEvent::ToolCall {
                name: "read".into(),
                arguments: json!({"path": "a.txt"})
            },
        ]
    );
}

#[test]
fn think_tag_opens_reasoning_only_at_start() {
    assert_eq!(
        parse("<think>\nhmm\n</think>\n\nhi", false),
        [ToolEvent::Reasoning("hmm\n".into()), content("hi")]
    );
    assert_eq!(parse("x <think> y", false), [content("x <think> y")]);
}

#[test]
fn unknown_tool_is_malformed_with_raw_text() {
    let text = "ok <tool_call>\n<function=rm>\n<parameter=path>\n/\n</parameter>\n</function>\n</tool_call> after";
    let ev = parse(text, false);
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[0], content("ok "));
    match &ev[1] {
        ToolEvent::MalformedToolCall { raw, error } => {
            assert!(error.contains("unknown tool `rm`"), "{error}");
            assert!(text.contains(raw.as_str()) && raw.starts_with("<tool_call>"));
            assert!(raw.ends_with("</tool_call>"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(ev[2], content("after"));
}

#[test]
fn broken_markup_and_json_are_malformed() {
    for text in [
        "<tool_call>\n<function=bash>\n<parameter=command>\nls\n</parameter>\n</tool_call>",
        "<tool_call>\n<function=bash>\nstray text\n</function>\n</tool_call>",
        "<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": }\n</tool_call>",
        "<tool_call>\nnonsense\n</tool_call>",
    ] {
        let ev = parse(text, false);
        match ev.as_slice() {
            [ToolEvent::MalformedToolCall { raw, .. }] => assert_eq!(raw, text),
            other => panic!("{text:?}: {other:?}"),
        }
    }
}

#[test]
fn missing_close_parameter_is_tolerated() {
    let text = "<tool_call>\n<function=bash>\n<parameter=command>\nls\n<parameter=timeout>\n5\n</function>\n</tool_call>";
    assert_eq!(
        parse(text, false),
        [ToolEvent::ToolCall {
            name: "bash".into(),
            arguments: json!({"command": "ls", "timeout": 5})
        }]
    );
}

#[test]
fn partial_call_at_end_of_stream() {
    let text = "Sure.<tool_call>\n<function=bash>\n<parameter=command>\nls";
    let ev = parse(text, false);
    assert_eq!(ev[0], content("Sure."));
    match &ev[1] {
        ToolEvent::MalformedToolCall { raw, error } => {
            assert_eq!(raw, "<tool_call>\n<function=bash>\n<parameter=command>\nls");
            assert!(error.contains("unterminated"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    // A complete call whose closing tag was cut by the end of stream is still accepted.
    let ev = parse("<tool_call>\n<function=bash>\n</function>\n", false);
    assert_eq!(
        ev,
        [ToolEvent::ToolCall {
            name: "bash".into(),
            arguments: json!({})
        }]
    );
}

#[test]
fn holds_back_possible_tag_start() {
    let t = tools();
    let mut p = ToolCallParser::new(Some(&t), false);
    assert_eq!(p.push("Hello <tool_"), [content("Hello ")]);
    assert_eq!(p.push("x"), [content("<tool_x")]);
    let mut p = ToolCallParser::new(None, true);
    assert_eq!(p.push("abc</th"), [ToolEvent::Reasoning("abc".into())]);
    assert_eq!(p.push("ink>done"), [content("done")]);
}

#[test]
fn without_declared_tools_any_name_is_accepted_as_strings() {
    let mut p = ToolCallParser::new(None, false);
    let mut ev = p.push(
        "<tool_call>\n<function=x>\n<parameter=n>\n1\n</parameter>\n</function>\n</tool_call>",
    );
    ev.extend(p.finish());
    assert_eq!(
        ev,
        [ToolEvent::ToolCall {
            name: "x".into(),
            arguments: json!({"n": "1"})
        }]
    );
}

#[test]
fn multibyte_text_near_tags() {
    assert_eq!(
        parse("日本<tool_call>\n{\"name\":\"read\",\"arguments\":\"{\\\"path\\\":\\\"é\\\"}\"}</tool_call>🌊", false),
        [
            content("日本"),
            ToolEvent::ToolCall {
                name: "read".into(),
                arguments: json!({"path": "é"})
            },
            content("🌊")
        ]
    );
}
