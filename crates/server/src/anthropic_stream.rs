//! Anthropic Messages answers from generation events: the SSE stream (`message_start`,
//! `content_block_start`, `ping`, `content_block_delta`, `content_block_stop`, `message_delta`,
//! `message_stop`) and the whole `message` object.
//!
//! One assembler ([`Blocks`]) turns events into the stream's steps; the whole message is those
//! same steps applied in order (as the SDKs accumulate a stream), so both answers always agree.
//! Thinking goes in `thinking` blocks, text in `text` blocks, each tool call in its own
//! `tool_use` block; a change of kind closes the open block.
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::response::sse::Event as SseEvent;
use flashmoe_runtime::{Done, Event, FinishReason, ToolCall, Usage};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::anthropic::error_body;
use crate::error::ApiError;
use crate::worker::{CancelGuard, Msg};

/// What every step of one answer carries.
pub struct Meta {
    pub id: String,
    pub model: String,
    /// The client's `max_tokens`: a generation cut shorter by the context says so.
    pub max_tokens: usize,
    /// `disable_parallel_tool_use`: calls after the first are dropped.
    pub one_tool_call: bool,
}

/// One SSE event: its name and JSON payload.
pub type Step = (&'static str, Value);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Thinking,
    Text,
}

/// Assigns events to content blocks.
struct Blocks {
    /// The block that takes more deltas of its kind, if any.
    open: Option<(usize, Kind)>,
    /// Blocks started so far (the next one's index).
    started: usize,
    calls: usize,
}

/// Anthropic's usage: the prompt tokens a snapshot supplied are cache reads, the rest input.
fn usage(u: &Usage) -> Value {
    let cached = u.cached_tokens.min(u.prompt_tokens);
    json!({
        "input_tokens": u.prompt_tokens - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": u.completion_tokens,
    })
}

/// `stop_reason` and `stop_sequence`.
fn stop_reason(meta: &Meta, d: &Done) -> (&'static str, Option<String>) {
    match d.finish_reason {
        FinishReason::ToolCalls => ("tool_use", None),
        FinishReason::Stop if d.stop_sequence.is_some() => {
            ("stop_sequence", d.stop_sequence.clone())
        }
        FinishReason::Stop | FinishReason::Cancelled => ("end_turn", None),
        // The context ended the generation before `max_tokens` did.
        FinishReason::Length if d.usage.completion_tokens < meta.max_tokens => {
            ("model_context_window_exceeded", None)
        }
        FinishReason::Length => ("max_tokens", None),
    }
}

/// The id a client sends back with the result (`toolu_` ids, as Anthropic's).
fn tool_id(c: &ToolCall) -> String {
    format!("toolu_{}", c.id.strip_prefix("call_").unwrap_or(&c.id))
}

/// The `message` object with no content yet (as `message_start` carries it).
fn message(meta: &Meta, u: &Usage) -> Value {
    json!({
        "id": meta.id,
        "type": "message",
        "role": "assistant",
        "model": meta.model,
        "content": [],
        "stop_reason": null,
        "stop_sequence": null,
        "usage": usage(u),
    })
}

impl Blocks {
    fn new() -> Blocks {
        Blocks {
            open: None,
            started: 0,
            calls: 0,
        }
    }

    fn close(&mut self, out: &mut Vec<Step>) {
        if let Some((index, _)) = self.open.take() {
            out.push((
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    fn start(&mut self, block: Value, out: &mut Vec<Step>) -> usize {
        self.close(out);
        let index = self.started;
        self.started += 1;
        out.push((
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        index
    }

    fn delta(index: usize, delta: Value, out: &mut Vec<Step>) {
        out.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
    }

    /// Text or thinking: continues the open block of that kind, or opens one.
    fn text(&mut self, kind: Kind, t: &str, out: &mut Vec<Step>) {
        let index = match self.open {
            Some((i, k)) if k == kind => i,
            _ => {
                let block = match kind {
                    Kind::Text => json!({"type": "text", "text": ""}),
                    Kind::Thinking => json!({"type": "thinking", "thinking": "", "signature": ""}),
                };
                let i = self.start(block, out);
                self.open = Some((i, kind));
                i
            }
        };
        let delta = match kind {
            Kind::Text => json!({"type": "text_delta", "text": t}),
            Kind::Thinking => json!({"type": "thinking_delta", "thinking": t}),
        };
        Blocks::delta(index, delta, out);
    }

    /// The steps for one event.
    fn push(&mut self, meta: &Meta, ev: &Event, out: &mut Vec<Step>) {
        match ev {
            Event::Content(t) => self.text(Kind::Text, t, out),
            Event::Reasoning(t) => self.text(Kind::Thinking, t, out),
            Event::ToolCall(_) if meta.one_tool_call && self.calls > 0 => {}
            Event::ToolCall(c) => {
                self.calls += 1;
                let block = json!({"type": "tool_use", "id": tool_id(c), "name": c.name,
                                   "input": {}});
                let index = self.start(block, out);
                let delta = json!({"type": "input_json_delta", "partial_json": c.arguments});
                Blocks::delta(index, delta, out);
                out.push((
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": index}),
                ));
            }
            Event::Done(d) => {
                self.close(out);
                let (reason, sequence) = stop_reason(meta, d);
                out.push((
                    "message_delta",
                    json!({"type": "message_delta",
                           "delta": {"stop_reason": reason, "stop_sequence": sequence},
                           "usage": usage(&d.usage)}),
                ));
                out.push(("message_stop", json!({"type": "message_stop"})));
            }
        }
    }
}

/// The whole `message` for a generation's events (the last one `Done`): the stream's steps
/// applied in order.
pub fn whole_message(meta: &Meta, events: &[Event]) -> Value {
    let mut blocks = Blocks::new();
    let mut steps = Vec::new();
    for ev in events {
        blocks.push(meta, ev, &mut steps);
    }
    let mut msg = message(meta, &Usage::default());
    let mut content: Vec<Value> = Vec::new();
    let mut json_buf = String::new();
    for (_, step) in steps {
        match step["type"].as_str() {
            Some("content_block_start") => content.push(step["content_block"].clone()),
            Some("content_block_delta") => {
                let Some(block) = content.last_mut() else {
                    continue;
                };
                let d = &step["delta"];
                let append = |block: &mut Value, key: &str| {
                    let s = format!(
                        "{}{}",
                        block[key].as_str().unwrap_or(""),
                        d[key].as_str().unwrap_or("")
                    );
                    block[key] = json!(s);
                };
                match d["type"].as_str() {
                    Some("text_delta") => append(block, "text"),
                    Some("thinking_delta") => append(block, "thinking"),
                    Some("input_json_delta") => {
                        json_buf.push_str(d["partial_json"].as_str().unwrap_or(""))
                    }
                    _ => {}
                }
            }
            Some("content_block_stop") if !json_buf.is_empty() => {
                // Arguments the runtime parsed as JSON; an unparsable one stays an empty input.
                let input = serde_json::from_str::<Value>(&std::mem::take(&mut json_buf))
                    .ok()
                    .filter(Value::is_object)
                    .unwrap_or_else(|| json!({}));
                if let Some(block) = content.last_mut() {
                    block["input"] = input;
                }
            }
            Some("message_delta") => {
                msg["stop_reason"] = step["delta"]["stop_reason"].clone();
                msg["stop_sequence"] = step["delta"]["stop_sequence"].clone();
                msg["usage"] = step["usage"].clone();
            }
            _ => {}
        }
    }
    msg["content"] = Value::Array(content);
    msg
}

/// The SSE body. Dropping it (the client went away) drops the guard, which cancels the
/// generation.
pub struct MessageStream {
    rx: UnboundedReceiver<Msg>,
    _guard: CancelGuard,
    meta: Meta,
    blocks: Blocks,
    pending: VecDeque<Step>,
    finished: bool,
}

impl MessageStream {
    /// Starts with `message_start` (the prompt's usage), the first event's steps, and a `ping`
    /// after the first block opens.
    pub fn new(
        meta: Meta,
        prompt: Usage,
        first: Event,
        rx: UnboundedReceiver<Msg>,
        guard: CancelGuard,
    ) -> MessageStream {
        let start = Usage {
            completion_tokens: 0,
            ..prompt
        };
        let mut steps = vec![(
            "message_start",
            json!({"type": "message_start", "message": message(&meta, &start)}),
        )];
        let mut blocks = Blocks::new();
        blocks.push(&meta, &first, &mut steps);
        let at = if steps.get(1).is_some_and(|s| s.0 == "content_block_start") {
            2
        } else {
            1
        };
        steps.insert(at, ("ping", json!({"type": "ping"})));
        MessageStream {
            rx,
            _guard: guard,
            finished: matches!(first, Event::Done(_)),
            meta,
            blocks,
            pending: steps.into(),
        }
    }

    fn fail(&mut self, e: &ApiError) {
        // The status is sent already: the error goes in-band, as Anthropic's API does.
        self.pending.push_back(("error", error_body(e)));
        self.finished = true;
    }
}

impl futures_core::Stream for MessageStream {
    type Item = Result<SseEvent, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some((name, data)) = this.pending.pop_front() {
                let ev = SseEvent::default().event(name).data(data.to_string());
                return Poll::Ready(Some(Ok(ev)));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(Msg::Event(ev))) => {
                    let mut steps = Vec::new();
                    this.blocks.push(&this.meta, &ev, &mut steps);
                    this.pending.extend(steps);
                    this.finished = matches!(ev, Event::Done(_));
                }
                Poll::Ready(Some(Msg::Error(e))) => this.fail(&e),
                Poll::Ready(None) => {
                    this.fail(&ApiError::internal("the generation ended without a result"))
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashmoe_runtime::{ExpertIo, Timings};

    fn meta(one_tool_call: bool) -> Meta {
        Meta {
            id: "msg_1".into(),
            model: "m".into(),
            max_tokens: 50,
            one_tool_call,
        }
    }

    fn done(finish: FinishReason, stop: Option<&str>, completion: usize) -> Event {
        Event::Done(Done {
            finish_reason: finish,
            stop_sequence: stop.map(str::to_string),
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: completion,
                cached_tokens: 4,
            },
            timings: Timings::default(),
            expert_io: ExpertIo::default(),
        })
    }

    fn call(index: usize, name: &str) -> Event {
        Event::ToolCall(ToolCall {
            index,
            id: format!("call_{index}"),
            name: name.into(),
            arguments: r#"{"city": "Paris"}"#.into(),
        })
    }

    fn names(steps: &[Step]) -> Vec<&str> {
        steps.iter().map(|s| s.0).collect()
    }

    #[test]
    fn blocks_open_and_close_by_kind_and_the_whole_message_agrees() {
        let events = [
            Event::Reasoning("hm".into()),
            Event::Reasoning("m".into()),
            Event::Content("Let me ".into()),
            Event::Content("check.".into()),
            call(0, "get_weather"),
            call(1, "get_time"),
            done(FinishReason::ToolCalls, None, 12),
        ];
        let m = meta(false);
        let mut b = Blocks::new();
        let mut steps = Vec::new();
        for ev in &events {
            b.push(&m, ev, &mut steps);
        }
        assert_eq!(
            names(&steps),
            [
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let indices: Vec<u64> = steps.iter().filter_map(|s| s.1["index"].as_u64()).collect();
        assert_eq!(indices, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
        assert_eq!(
            steps[9].1["delta"],
            json!({"type": "input_json_delta",
                                               "partial_json": "{\"city\": \"Paris\"}"})
        );
        assert_eq!(
            steps[14].1["usage"],
            json!({"input_tokens": 6,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4, "output_tokens": 12})
        );

        let whole = whole_message(&m, &events);
        assert_eq!(
            whole["content"],
            json!([
                {"type": "thinking", "thinking": "hmm", "signature": ""},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_1", "name": "get_time", "input": {"city": "Paris"}},
            ])
        );
        assert_eq!(whole["stop_reason"], "tool_use");
        assert_eq!(whole["type"], "message");
        assert_eq!(whole["usage"]["output_tokens"], 12);

        // disable_parallel_tool_use: the second call is dropped.
        let one = whole_message(&meta(true), &events);
        assert_eq!(one["content"].as_array().map(Vec::len), Some(3));
    }

    #[test]
    fn stop_reasons() {
        let m = meta(false);
        let reason = |ev: Event| {
            let w = whole_message(&m, &[ev]);
            (w["stop_reason"].clone(), w["stop_sequence"].clone())
        };
        assert_eq!(
            reason(done(FinishReason::Stop, None, 3)),
            (json!("end_turn"), Value::Null)
        );
        assert_eq!(
            reason(done(FinishReason::Stop, Some("END"), 3)),
            (json!("stop_sequence"), json!("END"))
        );
        assert_eq!(reason(done(FinishReason::Length, None, 50)).0, "max_tokens");
        assert_eq!(
            reason(done(FinishReason::Length, None, 20)).0,
            "model_context_window_exceeded"
        );
    }

    #[test]
    fn the_stream_opens_with_message_start_then_a_block_then_ping() {
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let prompt = Usage {
            prompt_tokens: 10,
            completion_tokens: 0,
            cached_tokens: 0,
        };
        let s = MessageStream::new(
            meta(false),
            prompt,
            Event::Content("Hi".into()),
            rx,
            CancelGuard(flag),
        );
        let steps: Vec<&Step> = s.pending.iter().collect();
        let names: Vec<&str> = steps.iter().map(|s| s.0).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta"
            ]
        );
        assert_eq!(steps[0].1["message"]["usage"]["input_tokens"], 10);
        assert_eq!(steps[0].1["message"]["content"], json!([]));
        assert_eq!(
            steps[1].1["content_block"],
            json!({"type": "text", "text": ""})
        );
    }
}
