//! Constrained decoding end to end on a random model (the tiny golden model with the test
//! tokenizer, whose 256 byte tokens let a random model try every byte): outputs under a schema
//! always parse and validate, forced and opened tool calls always parse, and the mask is right
//! at token boundaries inside multi-byte characters and JSON escapes.
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use flashmoe_runtime::testutil::{temp_dir, test_model_dir, test_tokenizer_json};
use flashmoe_runtime::{
    Engine, Event, FinishReason, GenerationRequest, LoadOptions, PromptInput, SamplingOverrides,
    ToolChoice,
};
use flashmoe_text::{GrammarCompiler, GrammarSpec, Tokenizer};
use serde_json::{json, Value};

fn model_dir() -> Option<PathBuf> {
    test_model_dir(Path::new(env!("CARGO_MANIFEST_DIR")), "constrained-test")
}

fn chat(tools: Vec<Value>) -> PromptInput {
    PromptInput::Messages {
        messages: vec![json!({"role": "user", "content": "Answer."})],
        tools,
        enable_thinking: Some(false),
        add_generation_prompt: true,
    }
}

fn request(seed: u64, prompt: PromptInput, max_tokens: usize) -> GenerationRequest {
    let mut req = GenerationRequest::new(prompt);
    req.max_tokens = Some(max_tokens);
    req.sampling = SamplingOverrides {
        temperature: Some(1.0),
        seed: Some(seed),
        ..Default::default()
    };
    req
}

fn run(engine: &mut Engine, req: &GenerationRequest) -> (String, Vec<Event>, FinishReason) {
    let mut events = Vec::new();
    let done = engine
        .generate(req, |e| {
            events.push(e);
            ControlFlow::Continue(())
        })
        .expect("generate");
    let text: String = events
        .iter()
        .filter_map(|e| match e {
            Event::Content(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    (text, events, done.finish_reason)
}

/// The subset of JSON Schema the test schemas use, checked strictly.
fn validate(v: &Value, s: &Value, path: &str) -> Result<(), String> {
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return if e.contains(v) {
            Ok(())
        } else {
            Err(format!("{path}: {v} not in {e:?}"))
        };
    }
    let types: Vec<&str> = match s.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let ok_type = |t: &str| match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    };
    if !types.is_empty() && !types.iter().any(|t| ok_type(t)) {
        return Err(format!("{path}: {v} is not of type {types:?}"));
    }
    let num = |k: &str| s.get(k).and_then(Value::as_f64);
    if let Some(x) = v.as_f64() {
        if num("minimum").is_some_and(|m| x < m) || num("maximum").is_some_and(|m| x > m) {
            return Err(format!("{path}: {x} out of range"));
        }
    }
    if let (Some(t), Some(m)) = (v.as_str(), num("maxLength")) {
        if t.chars().count() as f64 > m {
            return Err(format!("{path}: {t:?} longer than {m}"));
        }
    }
    if let Some(items) = v.as_array() {
        if num("maxItems").is_some_and(|m| items.len() as f64 > m) {
            return Err(format!("{path}: too many items"));
        }
        for (i, it) in items.iter().enumerate() {
            validate(it, &s["items"], &format!("{path}[{i}]"))?;
        }
    }
    if let Some(o) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for r in s["required"].as_array().into_iter().flatten() {
            let r = r.as_str().unwrap_or_default();
            if !o.contains_key(r) {
                return Err(format!("{path}: missing required `{r}`"));
            }
        }
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => validate(x, ps, &format!("{path}.{k}"))?,
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{path}: unexpected key `{k}`"))
                }
                None => {}
            }
        }
    }
    Ok(())
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b\"q", "ü\\n"]}, "maxItems": 3},
            "ok": {"type": "boolean"},
            "nested": {
                "type": "object",
                "properties": {
                    "x": {"type": "number", "minimum": -1000, "maximum": 1000},
                    "note": {"type": ["string", "null"], "maxLength": 5}
                },
                "required": ["x"],
                "additionalProperties": false
            }
        },
        "required": ["name", "age", "nested"],
        "additionalProperties": false
    })
}

#[test]
fn random_model_output_under_a_schema_always_parses_and_validates() {
    let Some(dir) = model_dir() else { return };
    let mut engine = Engine::open(&dir, LoadOptions::default()).expect("open");
    let schema = person_schema();
    let mut escapes = 0;
    let mut multibyte = 0;
    for seed in 0..24 {
        let mut req = request(seed, chat(vec![]), 160);
        req.grammar = Some(GrammarSpec::JsonSchema(schema.clone()));
        let (text, _, finish) = run(&mut engine, &req);
        assert_eq!(finish, FinishReason::Stop, "seed {seed}: {text:?}");
        assert!(!text.contains('\u{FFFD}'), "seed {seed}: {text:?}");
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text:?}"));
        validate(&v, &schema, "$").unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
        escapes += usize::from(text.contains('\\'));
        multibyte += usize::from(!text.is_ascii());
    }
    // The random model did meet escapes and multi-byte characters inside strings.
    assert!(escapes > 0 && multibyte > 0, "{escapes} {multibyte}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn json_mode_and_lark_grammar() {
    let Some(dir) = model_dir() else { return };
    let mut engine = Engine::open(&dir, LoadOptions::default()).expect("open");
    // An object whose values are short: JSON mode's bare `{"type": "object"}` lets a random
    // model write one string for ever, so this bounds it while exercising the same path.
    let lark = r#"start: "{\"n\": " NUM ", \"e\": " %json {"enum": [true, "x"]} "}"
NUM: /-?[1-9][0-9]{0,3}/"#;
    for seed in 0..8 {
        let mut req = request(seed, chat(vec![]), 40);
        req.grammar = Some(GrammarSpec::Lark(lark.into()));
        let (text, _, finish) = run(&mut engine, &req);
        assert_eq!(finish, FinishReason::Stop, "seed {seed}: {text:?}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(
            v["n"].is_i64() && (v["e"] == json!(true) || v["e"] == json!("x")),
            "{v}"
        );
    }
    // A grammar that does not compile is the request's error, before the model runs.
    let mut req = request(0, chat(vec![]), 4);
    req.grammar = Some(GrammarSpec::Lark("start: undefined_rule".into()));
    let err = engine
        .generate(&req, |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(err.is_client_error(), "{err}");
    // JSON mode on a short budget: whatever was written is a prefix the grammar allowed.
    let mut req = request(3, chat(vec![]), 6);
    req.grammar = Some(GrammarSpec::json_object());
    let (text, _, _) = run(&mut engine, &req);
    assert!(text.starts_with('{'), "{text:?}");
    let _ = std::fs::remove_dir_all(dir);
}

fn lookup_tool() -> Value {
    json!({"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object",
        "properties": {
            "query": {"type": "string", "maxLength": 10},
            "limit": {"type": "integer", "minimum": 1, "maximum": 5},
            "mode": {"type": "string", "enum": ["fast", "slow"]}
        },
        "required": ["query", "mode"]
    }}})
}

#[test]
fn forced_tool_calls_always_parse() {
    let Some(dir) = model_dir() else { return };
    let mut engine = Engine::open(&dir, LoadOptions::default()).expect("open");
    let other = json!({"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}});
    let params = lookup_tool()["function"]["parameters"].clone();
    for seed in 0..16 {
        let choice = if seed % 2 == 0 {
            ToolChoice::Function("lookup".into())
        } else {
            ToolChoice::Required
        };
        let mut req = request(seed, chat(vec![lookup_tool(), other.clone()]), 120);
        req.tool_choice = choice;
        let (text, events, finish) = run(&mut engine, &req);
        let calls: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::ToolCall(c) => Some(c),
                _ => None,
            })
            .collect();
        assert_eq!(
            finish,
            FinishReason::ToolCalls,
            "seed {seed}: {text:?} {events:?}"
        );
        assert_eq!(calls.len(), 1, "seed {seed}: {events:?}");
        assert!(text.is_empty(), "seed {seed}: content {text:?}");
        let args: Value = serde_json::from_str(&calls[0].arguments).expect("arguments JSON");
        match calls[0].name.as_str() {
            "lookup" => validate(&args, &params, "$").unwrap_or_else(|e| panic!("{e}: {args}")),
            "noop" => assert_eq!(args, json!({})),
            n => panic!("unknown tool {n}"),
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn calls_the_model_opens_are_constrained() {
    let Some(dir) = model_dir() else { return };
    let mut engine = Engine::open(&dir, LoadOptions::default()).expect("open");
    let params = lookup_tool()["function"]["parameters"].clone();
    let mut opened = 0;
    for seed in 0..40 {
        let mut req = request(seed, chat(vec![lookup_tool()]), 60);
        req.sampling.temperature = Some(2.0);
        let mut saw_open = false;
        let mut events = Vec::new();
        let done = engine
            .generate(&req, |e| {
                events.push(e);
                ControlFlow::Continue(())
            })
            .expect("generate");
        for e in &events {
            match e {
                Event::ToolCall(c) => {
                    saw_open = true;
                    let args: Value = serde_json::from_str(&c.arguments).expect("JSON");
                    validate(&args, &params, "$").unwrap_or_else(|e| panic!("{e}: {args}"));
                }
                // A call cut by max_tokens comes back as text: only then may one be left open.
                Event::Content(t) if t.contains("<tool_call>") => {
                    saw_open = true;
                    assert_eq!(
                        done.finish_reason,
                        FinishReason::Length,
                        "seed {seed}: {t:?}"
                    );
                }
                _ => {}
            }
        }
        opened += usize::from(saw_open);
    }
    assert!(opened > 0, "no seed opened a call: the test checks nothing");
    let _ = std::fs::remove_dir_all(dir);
}

/// The grammar compiler over the test tokenizer (ids 0-255 are single bytes).
fn compiler() -> GrammarCompiler {
    let dir = temp_dir("constrained-tok");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, test_tokenizer_json()).expect("write");
    let tok = Tokenizer::from_file(&path).expect("tokenizer");
    let _ = std::fs::remove_dir_all(&dir);
    GrammarCompiler::new(&tok, 1000, &[258]).expect("compiler")
}

fn allowed_bytes(c: &mut flashmoe_text::Constraint) -> Vec<u32> {
    let mask = c.allowed(true).expect("mask");
    (0..256).filter(|&b| mask.is_allowed(b)).collect()
}

#[test]
fn mask_is_right_inside_multibyte_characters_and_escapes() {
    let g = compiler();
    let schema = json!({"type": "string", "maxLength": 4});
    let mut c = g
        .compile(&GrammarSpec::JsonSchema(schema))
        .expect("compile");
    assert_eq!(allowed_bytes(&mut c), [b'"' as u32]);
    assert!(
        !c.allowed(true).expect("mask").is_allowed(258),
        "EOS before the value"
    );
    c.advance(b'"' as u32).expect("quote");
    // Half of `é` (C3 A9): only continuation bytes may follow, not a quote or ASCII.
    c.advance(0xC3).expect("lead byte");
    let cont = allowed_bytes(&mut c);
    assert_eq!(cont, (0x80..=0xBF).collect::<Vec<u32>>());
    c.advance(0xA9).expect("continuation");
    // A three-byte character split after its second byte.
    c.advance(0xE2).expect("lead");
    c.advance(0x82).expect("second");
    assert_eq!(allowed_bytes(&mut c), (0x80..=0xBF).collect::<Vec<u32>>());
    c.advance(0xAC).expect("third (€)");
    // After a backslash, only JSON's escape letters (llguidance leaves out the optional `\/`).
    c.advance(b'\\' as u32).expect("backslash");
    let esc: Vec<u32> = br#""\bfnrtu"#.iter().map(|&b| b as u32).collect();
    let mut want = esc.clone();
    want.sort();
    assert_eq!(allowed_bytes(&mut c), want);
    c.advance(b'u' as u32).expect("u");
    let hex: Vec<u32> = (b'0'..=b'9')
        .chain(b'A'..=b'F')
        .chain(b'a'..=b'f')
        .map(u32::from)
        .collect();
    let got = allowed_bytes(&mut c);
    assert!(
        got.iter().all(|b| hex.contains(b)) && got.contains(&(b'0' as u32)),
        "{got:?}"
    );
    // (By default llguidance takes `\u` escapes for control characters only.)
    for b in b"001f" {
        c.advance(*b as u32).expect("hex digit");
    }
    // Three characters written (é, €, U+001F): one more, then only the quote.
    assert!(
        !c.allowed(true).expect("mask").is_allowed(258),
        "EOS inside the string"
    );
    c.advance(b'x' as u32).expect("4th char");
    assert_eq!(allowed_bytes(&mut c), [b'"' as u32]);
    c.advance(b'"' as u32).expect("close");
    assert!(c.is_accepting());
    // Complete: only end-of-sequence.
    let mask = c.allowed(true).expect("mask");
    assert!(mask.is_allowed(258) && (0..256).all(|b| !mask.is_allowed(b)));
}

#[test]
fn multi_byte_tokens_are_allowed_only_when_all_their_bytes_fit() {
    let g = compiler();
    // The test tokenizer merges pairs of `a-z .,\n`: `ab` is one token.
    let tok_ab = 265 + 1; // "a" then "b" in the merge order (aa, ab, ...)
    let lark = r#"start: "a" /[bc]/ "d""#;
    let mut c = g.compile(&GrammarSpec::Lark(lark.into())).expect("compile");
    let mask = c.allowed(true).expect("mask");
    assert!(mask.is_allowed(b'a' as u32) && mask.is_allowed(tok_ab));
    assert!(!mask.is_allowed(265), "`aa` cannot start the output");
    c.advance(tok_ab).expect("ab");
    assert_eq!(allowed_bytes(&mut c), [b'd' as u32]);
}
