//! Chat template against `shared/tokenizer/qwen3.5/chat_cases.json` (rendered by transformers'
//! `apply_chat_template`), byte for byte, and the rendered prompt's ids.

mod common;

use flashmoe_text::{ChatTemplate, RenderOptions, TextError, Tokenizer};
use serde_json::json;

#[test]
fn renders_reference_cases_byte_for_byte() {
    let Some(dir) = common::qwen35_dir() else {
        return;
    };
    let tpl = ChatTemplate::from_dir(&dir).expect("loading template");
    let tok = Tokenizer::from_dir(&dir).expect("loading tokenizer");
    let cases = common::read_case_file("chat_cases.json").unwrap_or_default();
    let cases = cases.as_array().expect("cases array");
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().unwrap_or("?");
        let opts = RenderOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap_or(false),
            enable_thinking: case.get("enable_thinking").and_then(|v| v.as_bool()),
            ..Default::default()
        };
        let got = tpl
            .render(&case["messages"], case.get("tools"), &opts)
            .unwrap_or_else(|e| panic!("case {name}: {e}"));
        assert_eq!(got, case["rendered"].as_str().unwrap(), "case {name}");
        let ids = tok.encode(&got).unwrap();
        assert_eq!(
            tok.decode(&ids).unwrap(),
            got,
            "case {name}: ids round trip"
        );
        // The fixture's `ids` field holds only the BatchEncoding keys, so ids are checked where
        // they are known: every `<|im_start|>` is the single special id.
        let starts = got.matches("<|im_start|>").count();
        assert_eq!(
            ids.iter().filter(|&&i| i == 248045).count(),
            starts,
            "case {name}"
        );
        if let Some(want) = case["ids"]
            .as_array()
            .filter(|a| a.iter().all(|v| v.is_u64()))
        {
            let want: Vec<u32> = want
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect();
            assert_eq!(ids, want, "case {name}: ids");
        }
    }
}

/// The thinking-off prompt for "Hello" whose ids arch-spec §10.1 gives.
#[test]
fn hello_prompt_ids_match_spec() {
    let Some(dir) = common::qwen35_dir() else {
        return;
    };
    let tpl = ChatTemplate::from_dir(&dir).unwrap();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let opts = RenderOptions {
        add_generation_prompt: true,
        enable_thinking: Some(false),
        ..Default::default()
    };
    let text = tpl
        .render(&json!([{"role": "user", "content": "Hello"}]), None, &opts)
        .unwrap();
    assert_eq!(
        tok.encode(&text).unwrap(),
        [248045, 846, 198, 9419, 248046, 198, 248045, 74455, 198, 248068, 271, 248069, 271]
    );
}

#[test]
fn template_exception_is_reported() {
    let Some(dir) = common::qwen35_dir() else {
        return;
    };
    let tpl = ChatTemplate::from_dir(&dir).unwrap();
    let err = tpl
        .render(&json!([]), None, &RenderOptions::default())
        .unwrap_err();
    match err {
        TextError::Template(msg) => assert!(msg.contains("No messages provided."), "{msg}"),
        other => panic!("unexpected {other}"),
    }
    let err = tpl
        .render(
            &json!([{"role": "wizard", "content": "x"}, {"role": "user", "content": "q"}]),
            None,
            &RenderOptions::default(),
        )
        .unwrap_err();
    assert!(
        err.to_string().contains("Unexpected message role."),
        "{err}"
    );
}

#[test]
fn assistant_bool_and_object_arguments_render_like_python() {
    let Some(dir) = common::qwen35_dir() else {
        return;
    };
    let tpl = ChatTemplate::from_dir(&dir).unwrap();
    let msgs = json!([
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "ok", "tool_calls": [
            {"function": {"name": "f", "arguments": {"flag": true, "opts": {"a": [1, "é"]}, "n": 2}}}
        ]}
    ]);
    let out = tpl.render(&msgs, None, &RenderOptions::default()).unwrap();
    assert!(
        out.contains("<parameter=flag>\nTrue\n</parameter>"),
        "{out}"
    );
    assert!(
        out.contains("<parameter=opts>\n{\"a\": [1, \"é\"]}\n</parameter>"),
        "{out}"
    );
    assert!(out.contains("ok\n\n<tool_call>\n<function=f>\n"), "{out}");
}
