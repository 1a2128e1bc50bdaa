//! End-to-end generation on the tiny golden model with the test tokenizer and the real
//! Qwen3.5 chat template: events, usage, stop conditions, prefix reuse, context errors.
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use flashmoe_runtime::testutil::test_model_dir;
use flashmoe_runtime::{
    Engine, Event, FinishReason, GenerationRequest, LoadOptions, PromptInput, RuntimeError,
    ToolChoice,
};
use serde_json::json;

fn model_dir() -> Option<PathBuf> {
    test_model_dir(Path::new(env!("CARGO_MANIFEST_DIR")), "runtime-test")
}

fn chat(user: &str) -> PromptInput {
    PromptInput::Messages {
        messages: vec![
            json!({"role": "system", "content": "You are terse."}),
            json!({"role": "user", "content": user}),
        ],
        tools: vec![],
        enable_thinking: Some(false),
        add_generation_prompt: true,
    }
}

fn collect(engine: &mut Engine, req: &GenerationRequest) -> (Vec<Event>, flashmoe_runtime::Done) {
    let mut events = Vec::new();
    let done = engine
        .generate(req, |e| {
            events.push(e);
            ControlFlow::Continue(())
        })
        .expect("generate");
    (events, done)
}

#[test]
fn tokenizer_round_trips_and_fits_vocab() {
    let Some(dir) = model_dir() else { return };
    let engine = Engine::open(&dir, LoadOptions::default()).expect("open");
    let text = "<|im_start|>user\nhello, world é\n<|im_end|>";
    let ids = engine.tokenizer().encode(text).expect("encode");
    assert!(ids.iter().all(|&i| i < 1000), "{ids:?}");
    assert_eq!(ids[0], 257);
    assert_eq!(engine.tokenizer().decode(&ids).expect("decode"), text);
    for id in 0..1000 {
        assert!(
            engine.tokenizer().id_to_token(id).is_some(),
            "id {id} has no token"
        );
    }
    assert!(engine.stop_ids().contains(&258) && engine.stop_ids().contains(&999));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn generates_reuses_prefix_and_rejects_oversize() {
    let Some(dir) = model_dir() else { return };
    let mut engine = Engine::open(&dir, LoadOptions::default()).expect("open");
    let mut req = GenerationRequest::new(chat("Say something."));
    req.max_tokens = Some(12);
    let (events, done) = collect(&mut engine, &req);
    assert!(matches!(events.last(), Some(Event::Done(_))));
    assert!(matches!(
        done.finish_reason,
        FinishReason::Length | FinishReason::Stop
    ));
    assert!(done.usage.completion_tokens >= 1 && done.usage.completion_tokens <= 12);
    assert_eq!(done.usage.cached_tokens, 0);
    let prompt = engine
        .render(&req.prompt, &ToolChoice::Auto)
        .expect("render");
    assert!(
        prompt.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        "{prompt}"
    );
    assert_eq!(
        done.usage.prompt_tokens,
        engine.tokenizer().encode(&prompt).expect("encode").len()
    );

    // Same system prompt, another question: the system block is reused.
    let mut req2 = GenerationRequest::new(chat("Another question entirely."));
    req2.max_tokens = Some(4);
    let (_, d2) = collect(&mut engine, &req2);
    assert!(d2.usage.cached_tokens > 0, "{:?}", d2.usage);
    assert!(d2.usage.cached_tokens < d2.usage.prompt_tokens);

    // The identical request again: the whole prompt is reused, and greedy output repeats.
    let (ev3, d3) = collect(&mut engine, &req);
    assert_eq!(d3.usage.cached_tokens, d3.usage.prompt_tokens);
    assert_eq!(d3.usage.completion_tokens, done.usage.completion_tokens);
    assert_eq!(ev3[..ev3.len() - 1], events[..events.len() - 1]);

    // Context checks happen before any work.
    let ctx = engine.context_len();
    let mut too_many = req.clone();
    too_many.max_tokens = Some(ctx);
    assert!(matches!(
        engine.generate(&too_many, |_| ControlFlow::Continue(())),
        Err(RuntimeError::MaxTokensTooLarge { .. })
    ));
    // Unless asked to clamp: then it may generate up to the end of the context, and the
    // prompt's usage is told before the first event.
    too_many.clamp_max_tokens = true;
    let usage = std::sync::Arc::new(std::sync::OnceLock::new());
    too_many.prompt_usage = Some(usage.clone());
    let (prepared, max_new) = engine.prepare(&too_many).expect("clamped");
    assert_eq!(max_new, ctx - prepared.ids.len());
    let mut first_usage = None;
    let d4 = engine
        .generate(&too_many, |_| {
            first_usage = usage.get().copied();
            ControlFlow::Break(())
        })
        .expect("generate");
    assert_eq!(d4.finish_reason, FinishReason::Cancelled);
    let u = first_usage.expect("prompt usage set before the first event");
    assert_eq!(u.prompt_tokens, prepared.ids.len());
    assert_eq!(
        u.cached_tokens, u.prompt_tokens,
        "the same prompt as before: all reused"
    );

    let long = GenerationRequest::new(PromptInput::Ids(vec![5; ctx + 1]));
    let err = engine
        .generate(&long, |_| ControlFlow::Continue(()))
        .expect_err("too long");
    assert!(matches!(err, RuntimeError::PromptTooLong { .. }) && err.is_client_error());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn cancel_stops_at_once_and_stop_strings_cut() {
    let Some(dir) = model_dir() else { return };
    let mut engine = Engine::open(&dir, LoadOptions::default()).expect("open");
    let mut req = GenerationRequest::new(PromptInput::Text("hello there".into()));
    req.max_tokens = Some(64);
    let mut seen = 0;
    let done = engine
        .generate(&req, |_| {
            seen += 1;
            ControlFlow::Break(())
        })
        .expect("generate");
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert_eq!(seen, 1);

    // Whatever the model says, stopping on its first character ends the text before it.
    let (events, done) = collect(&mut engine, &req);
    let text: String = events
        .iter()
        .filter_map(|e| match e {
            Event::Content(t) | Event::Reasoning(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    if let Some(c) = text.chars().nth(1) {
        req.stop = vec![c.to_string()];
        let (ev2, d2) = collect(&mut engine, &req);
        let t2: String = ev2
            .iter()
            .filter_map(|e| match e {
                Event::Content(t) | Event::Reasoning(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert!(!t2.contains(c), "{t2:?} still has {c:?}");
        assert_eq!(d2.finish_reason, FinishReason::Stop);
        // The result names the string that stopped it (Anthropic's `stop_sequence`).
        assert_eq!(d2.stop_sequence.as_deref(), Some(c.to_string().as_str()));
    }
    assert_eq!(done.stop_sequence, None);
    assert!(done.usage.completion_tokens > 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn tools_render_and_forced_call() {
    let Some(dir) = model_dir() else { return };
    let mut engine = Engine::open(&dir, LoadOptions::default()).expect("open");
    let tools = vec![json!({"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})];
    let prompt = PromptInput::Messages {
        messages: vec![
            json!({"role": "user", "content": "Weather in Paris?"}),
            json!({"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}),
        ],
        tools: tools.clone(),
        enable_thinking: None,
        add_generation_prompt: true,
    };
    let text = engine.render(&prompt, &ToolChoice::Auto).expect("render");
    assert!(text.starts_with("<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\""), "{text}");
    assert!(text.contains("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call><|im_end|>\n"), "{text}");
    assert!(
        text.contains(
            "<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response><|im_end|>\n"
        ),
        "{text}"
    );
    let none = engine.render(&prompt, &ToolChoice::None).expect("render");
    assert!(!none.contains("# Tools"));
    let forced = engine
        .render(&prompt, &ToolChoice::Function("get_weather".into()))
        .expect("render");
    assert!(
        forced.ends_with("</think>\n\n<tool_call>\n<function=get_weather>\n"),
        "{forced}"
    );
    let bad = engine.render(&prompt, &ToolChoice::Function("nope".into()));
    assert!(matches!(bad, Err(RuntimeError::InvalidPrompt(_))));
    let mut req = GenerationRequest::new(prompt);
    req.tool_choice = ToolChoice::Function("get_weather".into());
    req.max_tokens = Some(8);
    let (_, done) = collect(&mut engine, &req);
    assert!(done.usage.completion_tokens > 0);
    let _ = std::fs::remove_dir_all(dir);
}
