//! OpenAI response shapes: `chat.completion`, `chat.completion.chunk`, `text_completion`,
//! usage with `prompt_tokens_details.cached_tokens`. Pure functions from events to JSON.
use flashmoe_runtime::{Done, ToolCall};
use serde_json::{json, Value};

/// Which API a response belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

pub fn usage(d: &Done) -> Value {
    let u = d.usage;
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// flashmoe's own timing figures, sent beside `usage` (clients ignore unknown fields).
pub fn timings(d: &Done) -> Value {
    let t = d.timings;
    json!({
        "prefill_ms": t.prefill_ms,
        "ttft_ms": t.ttft_ms,
        "decode_ms": t.decode_ms,
        "decode_tokens_per_second": t.decode_tok_s,
        "total_ms": t.total_ms,
        "expert_bytes_read": d.expert_io.bytes_read,
        "expert_bytes_cached": d.expert_io.bytes_cached,
    })
}

pub fn tool_call_json(c: &ToolCall) -> Value {
    json!({
        "id": c.id,
        "type": "function",
        "function": {"name": c.name, "arguments": c.arguments},
    })
}

/// Builds the chunks of one streamed response.
pub struct Chunks {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

impl Chunks {
    fn chunk(&self, choices: Value) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut c = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    fn delta(&self, delta: Value, finish: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => self.chunk(json!([{
                "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish,
            }])),
            Kind::Completion => {
                let text = delta.get("content").cloned().unwrap_or(json!(""));
                self.chunk(json!([{
                    "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                }]))
            }
        }
    }

    /// The opening chunk (chat only): the assistant role with empty content.
    pub fn opening(&self) -> Option<Value> {
        (self.kind == Kind::Chat)
            .then(|| self.delta(json!({"role": "assistant", "content": ""}), None))
    }

    pub fn content(&self, text: &str) -> Value {
        self.delta(json!({"content": text}), None)
    }

    pub fn reasoning(&self, text: &str) -> Value {
        self.delta(json!({"reasoning_content": text}), None)
    }

    pub fn tool_call(&self, c: &ToolCall) -> Value {
        let mut call = tool_call_json(c);
        call["index"] = json!(c.index);
        self.delta(json!({"tool_calls": [call]}), None)
    }

    /// The finishing chunk, then the usage chunk when asked for.
    pub fn done(&self, d: &Done) -> Vec<Value> {
        let mut out = vec![self.delta(json!({}), Some(d.finish_reason.as_str()))];
        if self.include_usage {
            let mut u = self.chunk(json!([]));
            u["usage"] = usage(d);
            u["timings"] = timings(d);
            out.push(u);
        }
        out
    }
}

/// A whole non-streamed response.
pub struct Collected {
    pub content: String,
    pub reasoning: String,
    pub calls: Vec<ToolCall>,
}

pub fn full_response(
    kind: Kind,
    id: &str,
    created: u64,
    model: &str,
    c: &Collected,
    d: &Done,
) -> Value {
    let finish = d.finish_reason.as_str();
    let choice = match kind {
        Kind::Chat => {
            let mut message = json!({
                "role": "assistant",
                "content": if c.content.is_empty() && !c.calls.is_empty() { Value::Null } else { json!(c.content) },
            });
            if !c.reasoning.is_empty() {
                message["reasoning_content"] = json!(c.reasoning);
            }
            if !c.calls.is_empty() {
                message["tool_calls"] = c.calls.iter().map(tool_call_json).collect();
            }
            json!({"index": 0, "message": message, "logprobs": null, "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": 0, "text": c.content, "logprobs": null, "finish_reason": finish})
        }
    };
    json!({
        "id": id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "system_fingerprint": null,
        "choices": [choice],
        "usage": usage(d),
        "timings": timings(d),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flashmoe_runtime::{ExpertIo, FinishReason, Timings, Usage};

    fn done(finish: FinishReason) -> Done {
        Done {
            finish_reason: finish,
            stop_sequence: None,
            usage: Usage {
                prompt_tokens: 10,
                completion_tokens: 3,
                cached_tokens: 7,
            },
            timings: Timings::default(),
            expert_io: ExpertIo::default(),
        }
    }

    fn call() -> ToolCall {
        ToolCall {
            index: 0,
            id: "call_x".into(),
            name: "get_weather".into(),
            arguments: r#"{"city": "Paris"}"#.into(),
        }
    }

    #[test]
    fn tool_call_response_has_null_content_string_arguments_and_usage() {
        let c = Collected {
            content: String::new(),
            reasoning: "hmm".into(),
            calls: vec![call()],
        };
        let v = full_response(
            Kind::Chat,
            "chatcmpl-1",
            5,
            "m",
            &c,
            &done(FinishReason::ToolCalls),
        );
        let msg = &v["choices"][0]["message"];
        assert_eq!(msg["content"], Value::Null);
        assert_eq!(msg["reasoning_content"], "hmm");
        assert_eq!(
            msg["tool_calls"],
            json!([{"id": "call_x", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}])
        );
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                   "prompt_tokens_details": {"cached_tokens": 7}})
        );
    }

    #[test]
    fn stream_chunks_follow_openai_shapes() {
        let ch = Chunks {
            kind: Kind::Chat,
            id: "chatcmpl-1".into(),
            created: 5,
            model: "m".into(),
            include_usage: true,
        };
        let open = ch.opening().expect("chat opens with the role");
        assert_eq!(
            open["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(open["usage"], Value::Null);
        let tc = ch.tool_call(&call());
        assert_eq!(tc["choices"][0]["delta"]["tool_calls"][0]["index"], 0);
        assert_eq!(tc["choices"][0]["delta"]["tool_calls"][0]["id"], "call_x");
        assert_eq!(
            ch.reasoning("r")["choices"][0]["delta"],
            json!({"reasoning_content": "r"})
        );
        let end = ch.done(&done(FinishReason::Stop));
        assert_eq!(end.len(), 2);
        assert_eq!(end[0]["choices"][0]["finish_reason"], "stop");
        assert_eq!(end[0]["choices"][0]["delta"], json!({}));
        assert_eq!(end[1]["choices"], json!([]));
        assert_eq!(end[1]["usage"]["total_tokens"], 13);
        let text = Chunks {
            kind: Kind::Completion,
            include_usage: false,
            ..ch
        };
        assert!(text.opening().is_none());
        let c = text.content("hi");
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"], "hi");
        assert!(c.get("usage").is_none());
    }
}
