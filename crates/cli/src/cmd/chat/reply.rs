//! One assistant reply: generated (or scripted) and streamed to the screen as it comes, with
//! thinking hidden or dimmed, and parsed into the message to save and the tool calls to run.
//! A closed stdout stops the generation before the next token.
use std::ops::ControlFlow;
use std::sync::atomic::Ordering;

use anyhow::Result;
use flashmoe_runtime::{Event, FinishReason, GenerationRequest, PromptInput};
use flashmoe_text::{ToolCallParser, ToolEvent};
use serde_json::{json, Value};

use super::repl::Chat;
use super::{PendingCall, Replier, Style};
use crate::cmd::out::{out, outln};

/// The two kinds of streamed text the chat shows.
enum Piece {
    Content(String),
    Reasoning(String),
}

/// Shows streamed pieces and collects them into the message.
struct Screen {
    style: Style,
    show_think: bool,
    in_think: bool,
    content: String,
    reasoning: String,
}

impl Screen {
    fn show(&mut self, p: Piece) -> Result<()> {
        let Style { dim, reset, .. } = self.style;
        match p {
            Piece::Content(t) => {
                if self.in_think {
                    self.in_think = false;
                    if self.show_think {
                        outln!("{reset}")?;
                    }
                }
                self.content.push_str(&t);
                out!("{t}")
            }
            Piece::Reasoning(t) => {
                self.reasoning.push_str(&t);
                let opened = !self.in_think;
                self.in_think = true;
                match (self.show_think, opened) {
                    (true, true) => out!("{dim}{t}"),
                    (true, false) => out!("{t}"),
                    (false, true) => out!("{dim}(thinking…){reset} "),
                    (false, false) => Ok(()),
                }
            }
        }
    }
}

impl Chat {
    /// One assistant message: (message JSON, tool calls, cancelled).
    pub(super) fn one_reply(&mut self) -> Result<(Value, Vec<PendingCall>, bool)> {
        let Style { dim, reset, .. } = self.style;
        let mut calls: Vec<PendingCall> = Vec::new();
        let mut screen = Screen {
            style: self.style,
            show_think: self.show_think,
            in_think: false,
            content: String::new(),
            reasoning: String::new(),
        };
        let mut cancelled = false;
        match &mut self.replier {
            Replier::Script(it) => {
                let text = it.next().unwrap_or_default();
                let tools = Value::Array(self.tools.clone());
                let mut p = ToolCallParser::new(Some(&tools), false);
                let mut evs = p.push(&text);
                evs.extend(p.finish());
                for e in evs {
                    match e {
                        ToolEvent::Content(t) => screen.show(Piece::Content(t))?,
                        ToolEvent::Reasoning(t) => screen.show(Piece::Reasoning(t))?,
                        ToolEvent::ToolCall { name, arguments } => {
                            calls.push((format!("call_{}", calls.len()), name, arguments))
                        }
                        ToolEvent::MalformedToolCall { raw, error } => {
                            screen.content.push_str(&raw);
                            outln!("\n{dim}[malformed tool call: {error}]{reset}")?;
                        }
                    }
                }
            }
            Replier::Model(engine) => {
                let mut req = GenerationRequest::new(PromptInput::Messages {
                    messages: self.messages.clone(),
                    tools: self.tools.clone(),
                    enable_thinking: self.enable_thinking,
                    add_generation_prompt: true,
                });
                req.max_tokens = Some(self.max_tokens);
                req.sampling = self.sampling.overrides();
                // Checked between prefill steps and tokens, so Ctrl-C also stops a long prefill.
                req.cancel = Some(self.interrupted.clone());
                let flag = self.interrupted.clone();
                let mut closed = None;
                let done = engine.generate(&req, |ev| {
                    let shown = match ev {
                        Event::Content(t) => screen.show(Piece::Content(t)),
                        Event::Reasoning(t) => screen.show(Piece::Reasoning(t)),
                        Event::ToolCall(c) => {
                            let args = serde_json::from_str(&c.arguments).unwrap_or(Value::Null);
                            calls.push((c.id, c.name, args));
                            Ok(())
                        }
                        Event::Done(_) => Ok(()),
                    };
                    if let Err(e) = shown {
                        closed = Some(e);
                        return ControlFlow::Break(());
                    }
                    if flag.load(Ordering::SeqCst) {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })?;
                if let Some(e) = closed {
                    return Err(e);
                }
                cancelled = done.finish_reason == FinishReason::Cancelled;
                if done.finish_reason == FinishReason::Length {
                    out!("\n{dim}[reached --max-tokens]{reset}")?;
                }
            }
        }
        if screen.in_think && screen.show_think {
            out!("{reset}")?;
        }
        outln!()?;
        let mut msg = json!({"role": "assistant", "content": screen.content});
        if !screen.reasoning.is_empty() {
            msg["reasoning_content"] = Value::String(screen.reasoning);
        }
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(
                calls
                    .iter()
                    .map(|(id, name, args)| {
                        json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
                    })
                    .collect(),
            );
        }
        Ok((msg, calls, cancelled))
    }
}
