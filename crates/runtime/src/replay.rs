//! Scripted replies: a generation whose text is given instead of sampled, for front-end tests
//! (`serve --scripted-replies`). The model does not run: the request's prompt is prepared and
//! checked as for a real generation (same errors, same token counts), then the given text is
//! tokenized and streamed token by token through the same tool-call and reasoning parsing, so
//! a front end sees exactly the events a model writing that text would produce.
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use flashmoe_text::ToolCallParser;

use crate::engine::Engine;
use crate::error::Result;
use crate::generate::Emitter;
use crate::request::{Done, Event, ExpertIo, FinishReason, GenerationRequest, Timings, Usage};

impl Engine {
    /// Streams `text` as if the model had written it for `req`, one token every `pace` (so that
    /// a client sees it arrive in pieces). Honours cancellation and `max_tokens` like
    /// [`Engine::generate`]; the end-of-turn token is counted, as a real stop would be.
    pub fn replay<F>(
        &mut self,
        req: &GenerationRequest,
        text: &str,
        pace: Duration,
        mut on_event: F,
    ) -> Result<Done>
    where
        F: FnMut(Event) -> ControlFlow<()>,
    {
        let t0 = Instant::now();
        let (prompt, max_new) = self.prepare(req)?;
        let prepare_ms = t0.elapsed().as_secs_f64() * 1e3;
        if let Some(u) = &req.prompt_usage {
            let _ = u.set(Usage {
                prompt_tokens: prompt.ids.len(),
                completion_tokens: 0,
                cached_tokens: 0,
            });
        }
        let ids = self.tokenizer().encode(text)?;
        let mut parser =
            ToolCallParser::new(prompt.parser_tools.as_ref(), prompt.starts_in_thinking);
        let mut emitter = Emitter {
            on_event: &mut on_event,
            calls: 0,
        };
        let mut flow = emitter.emit(parser.push(&prompt.forced_prefix));
        let mut decoder = self.tokenizer().stream_decoder();
        let t_first = Instant::now();
        let mut completion = 0;
        let mut finish = FinishReason::Stop;
        for &id in &ids {
            if flow.is_break() || req.is_cancelled() {
                break;
            }
            if completion == max_new {
                finish = FinishReason::Length;
                break;
            }
            std::thread::sleep(pace);
            completion += 1;
            if let Some(piece) = decoder.push(id)? {
                flow = emitter.emit(parser.push(&piece));
            }
        }
        if flow.is_continue() && !req.is_cancelled() {
            let mut events = match decoder.flush()? {
                Some(piece) => parser.push(&piece),
                None => Vec::new(),
            };
            events.extend(parser.finish());
            flow = emitter.emit(events);
            if finish == FinishReason::Stop {
                // The end-of-turn token a model would have sampled.
                completion = (completion + 1).min(max_new);
            }
        }
        if flow.is_break() || req.is_cancelled() {
            finish = FinishReason::Cancelled;
        } else if finish == FinishReason::Stop && emitter.calls > 0 {
            finish = FinishReason::ToolCalls;
        }
        let decode_ms = t_first.elapsed().as_secs_f64() * 1e3;
        let done = Done {
            finish_reason: finish,
            usage: Usage {
                prompt_tokens: prompt.ids.len(),
                completion_tokens: completion,
                cached_tokens: 0,
            },
            timings: Timings {
                prepare_ms,
                prefill_ms: 0.0,
                ttft_ms: prepare_ms,
                decode_ms,
                decode_tok_s: if completion > 1 && decode_ms > 0.0 {
                    (completion - 1) as f64 / (decode_ms / 1e3)
                } else {
                    0.0
                },
                total_ms: t0.elapsed().as_secs_f64() * 1e3,
                mask_ms: 0.0,
            },
            expert_io: ExpertIo::default(),
            stop_sequence: None,
        };
        if !matches!(finish, FinishReason::Cancelled) {
            let _ = on_event(Event::Done(done.clone()));
        }
        Ok(done)
    }
}
