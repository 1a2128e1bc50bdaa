//! The generation loop: prefill with prefix reuse, then sample, detokenize, apply stop strings
//! and split the text into content, reasoning and tool calls, streaming each piece at once.
//!
//! Never blocks on the caller beyond its callback; a `Break` from the callback ends the loop
//! before the next forward pass.
use std::ops::ControlFlow;
use std::time::Instant;

use flashmoe_core::mapguard;
use flashmoe_text::{Sampler, StopChecker, ToolCallParser, ToolEvent};
use rand::distributions::Alphanumeric;
use rand::Rng;

use crate::engine::Engine;
use crate::error::Result;
use crate::guide::{self, Guide};
use crate::request::{
    Done, Event, ExpertIo, FinishReason, GenerationRequest, Timings, ToolCall, Usage,
};

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Turns parser events into [`Event`]s and hands them to the callback.
pub(crate) struct Emitter<'f, F: FnMut(Event) -> ControlFlow<()>> {
    pub(crate) on_event: &'f mut F,
    pub(crate) calls: usize,
}

impl<F: FnMut(Event) -> ControlFlow<()>> Emitter<'_, F> {
    pub(crate) fn emit(&mut self, events: Vec<ToolEvent>) -> ControlFlow<()> {
        for ev in events {
            let out = match ev {
                ToolEvent::Content(t) if t.is_empty() => continue,
                ToolEvent::Reasoning(t) if t.is_empty() => continue,
                ToolEvent::Content(t) => Event::Content(t),
                ToolEvent::Reasoning(t) => Event::Reasoning(t),
                // Nothing is dropped: a call that cannot be understood is shown as text.
                ToolEvent::MalformedToolCall { raw, .. } => Event::Content(raw),
                ToolEvent::ToolCall { name, arguments } => {
                    let arguments = match arguments {
                        serde_json::Value::String(s) => s,
                        v => v.to_string(),
                    };
                    self.calls += 1;
                    Event::ToolCall(ToolCall {
                        index: self.calls - 1,
                        id: call_id(),
                        name,
                        arguments,
                    })
                }
            };
            (self.on_event)(out)?;
        }
        ControlFlow::Continue(())
    }
}

fn cancelled(prompt_tokens: usize, prepare_ms: f64, t0: Instant) -> Done {
    Done {
        finish_reason: FinishReason::Cancelled,
        stop_sequence: None,
        usage: Usage {
            prompt_tokens,
            ..Usage::default()
        },
        timings: Timings {
            prepare_ms,
            total_ms: ms(t0),
            ..Timings::default()
        },
        expert_io: ExpertIo::default(),
    }
}

fn call_id() -> String {
    let tail: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("call_{tail}")
}

impl Engine {
    /// `Session::set_prompt(ids)`, fed one prefill step at a time when a progress callback is
    /// set (told after each step) or a cancel flag may stop it between steps. Returns (logits,
    /// tokens reused).
    fn prefill_to(&mut self, ids: &[u32], req: &GenerationRequest) -> Result<(Vec<f32>, usize)> {
        if self.prefill_progress.is_none() && req.cancel.is_none() {
            return Ok(self.session.set_prompt(ids)?);
        }
        let reused = self.session.reusable(ids);
        let (mut logits, _) = self.session.set_prompt(&ids[..reused])?;
        let step = self.session.prefill_chunk.max(1);
        let mut at = reused;
        while at < ids.len() && !req.is_cancelled() {
            let next = (at + step).min(ids.len());
            logits = self.session.feed(&ids[at..next])?.to_vec();
            at = next;
            if let Some(f) = self.prefill_progress.as_mut() {
                f(at, ids.len());
            }
        }
        Ok((logits, reused))
    }

    /// Runs one generation, streaming [`Event`]s to `on_event`, and returns the summary that was
    /// also sent as the last event ([`Event::Done`]). Returning `Break` from the callback stops
    /// at once: no further events, and the result says [`FinishReason::Cancelled`].
    ///
    /// Errors in the request (prompt too long, `max_tokens` beyond the context, a template that
    /// raises) come back before the model runs, as does a model file changed on disk since it
    /// was loaded (`flashmoe_core::mapguard`; one truncated during the generation ends it with
    /// that error after the forward pass that noticed).
    pub fn generate<F>(&mut self, req: &GenerationRequest, mut on_event: F) -> Result<Done>
    where
        F: FnMut(Event) -> ControlFlow<()>,
    {
        let t0 = Instant::now();
        // A model file changed since it was mapped: refuse before touching any weight.
        mapguard::check_unchanged_in(&self.dir)?;
        let (prompt, max_new) = self.prepare(req)?;
        // A routing trace being recorded numbers its records by request.
        if let Some(r) = flashmoe_core::trace::active() {
            r.begin_request();
        }
        let params = req.sampling.apply(&self.defaults);
        let mut guide = if guide::needed(req, &prompt) {
            // Only greedy: a sampled first try sorts the whole vocabulary (tens of ms for 250k
            // ids) and is thrown away whenever the grammar refuses it.
            let speculate = params.is_greedy();
            Guide::new(self.grammar_compiler()?, req, &prompt, speculate)?
        } else {
            None
        };
        let prepare_ms = ms(t0);
        let io0 = self.model().experts.counters().snapshot();

        // Prefill up to each boundary in turn, saving a snapshot at each: set_prompt reuses the
        // longest saved state, so every call after the first only extends the live state.
        let t_prefill = Instant::now();
        let mut fed = 0usize;
        let mut logits = Vec::new();
        let ends = prompt.boundaries.iter().copied().chain([prompt.ids.len()]);
        for end in ends {
            if req.is_cancelled() {
                return Ok(cancelled(prompt.ids.len(), prepare_ms, t0));
            }
            let (l, reused) = self.prefill_to(&prompt.ids[..end], req)?;
            mapguard::check_faults_in(&self.dir)?;
            fed += end - reused.min(end);
            logits = l;
            self.session.snapshot();
        }
        if req.is_cancelled() {
            return Ok(cancelled(prompt.ids.len(), prepare_ms, t0));
        }
        let prefill_ms = ms(t_prefill);
        let n_prompt = prompt.ids.len();
        let cached = n_prompt - fed.min(n_prompt);
        if let Some(u) = &req.prompt_usage {
            let _ = u.set(Usage {
                prompt_tokens: n_prompt,
                completion_tokens: 0,
                cached_tokens: cached,
            });
        }

        let penalise_prompt = params.repetition_penalty != 1.0;
        let mut sampler = Sampler::new(params);
        let mut history: Vec<u32> = if penalise_prompt {
            prompt.ids.clone()
        } else {
            Vec::new()
        };
        let mut stops = StopChecker::new(&req.stop);
        let mut parser =
            ToolCallParser::new(prompt.parser_tools.as_ref(), prompt.starts_in_thinking);
        let raw = req.raw;
        let parse = |parser: &mut ToolCallParser, text: &str| {
            if raw {
                vec![ToolEvent::Content(text.to_string())]
            } else {
                parser.push(text)
            }
        };
        let mut emitter = Emitter {
            on_event: &mut on_event,
            calls: 0,
        };
        let mut decoder = self.tokenizer.stream_decoder();
        // The forced call opening is part of the prompt, but the parser must see it first.
        let mut flow = emitter.emit(parser.push(&prompt.forced_prefix));

        let mut completion = 0usize;
        let mut mask_ms = 0.0;
        let mut ttft_ms = 0.0;
        let mut t_first = None;
        let mut finish = FinishReason::Length;
        while flow.is_continue() && completion < max_new {
            if req.is_cancelled() {
                flow = ControlFlow::Break(());
                break;
            }
            let tok = match guide.as_mut() {
                None => sampler.sample(&logits, &history),
                Some(g) => {
                    // Mask time: the whole choice less its last sampling (the one an
                    // unconstrained step does too; a refused first try counts as mask time).
                    let t = Instant::now();
                    let mut sampling = 0.0;
                    let picked = g.sample(&mut logits, !req.ignore_eos, |l| {
                        let ts = Instant::now();
                        let tok = sampler.sample(l, &history);
                        sampling = ms(ts);
                        tok
                    })?;
                    mask_ms += ms(t) - sampling;
                    match picked {
                        Some(tok) => tok,
                        None => {
                            // The grammar is complete and nothing may follow it.
                            finish = FinishReason::Stop;
                            break;
                        }
                    }
                }
            };
            completion += 1;
            if t_first.is_none() {
                ttft_ms = ms(t0);
                t_first = Some(Instant::now());
            }
            if !req.ignore_eos && self.stop_ids.contains(&tok) {
                finish = FinishReason::Stop;
                break;
            }
            history.push(tok);
            let piece = decoder.push(tok)?;
            if let Some(g) = guide.as_mut() {
                let t = Instant::now();
                g.advance(tok, piece.as_deref())?;
                mask_ms += ms(t);
            }
            if let Some(piece) = piece {
                let (text, hit) = stops.push(&piece);
                flow = emitter.emit(parse(&mut parser, &text));
                if hit {
                    finish = FinishReason::Stop;
                    break;
                }
            }
            if flow.is_break() || completion >= max_new || req.is_cancelled() {
                break;
            }
            if guide.as_ref().is_some_and(Guide::finished) {
                // Complete: no forward pass for a token the grammar would not allow.
                finish = FinishReason::Stop;
                break;
            }
            logits = self.session.step(tok)?.to_vec();
            mapguard::check_faults_in(&self.dir)?;
        }
        if flow.is_continue() {
            let mut tail = String::new();
            if !stops.stopped() {
                if let Some(piece) = decoder.flush()? {
                    let (text, hit) = stops.push(&piece);
                    tail.push_str(&text);
                    if hit {
                        finish = FinishReason::Stop;
                    }
                }
                tail.push_str(&stops.finish());
            }
            let mut events = parse(&mut parser, &tail);
            if !raw {
                events.extend(parser.finish());
            }
            flow = emitter.emit(events);
        }
        if flow.is_break() || req.is_cancelled() {
            finish = FinishReason::Cancelled;
        } else if finish == FinishReason::Stop && emitter.calls > 0 {
            finish = FinishReason::ToolCalls;
        }
        // The conversation so far, for a follow-up that continues it.
        self.session.snapshot();

        let decode_ms = t_first.map(ms).unwrap_or(0.0);
        let io = self.model().experts.counters().snapshot().since(&io0);
        let done = Done {
            finish_reason: finish,
            stop_sequence: stops.matched().map(str::to_string),
            usage: Usage {
                prompt_tokens: n_prompt,
                completion_tokens: completion,
                cached_tokens: cached,
            },
            timings: Timings {
                prepare_ms,
                prefill_ms,
                ttft_ms,
                decode_ms,
                decode_tok_s: if completion > 1 && decode_ms > 0.0 {
                    (completion - 1) as f64 / (decode_ms / 1e3)
                } else {
                    0.0
                },
                mask_ms,
                total_ms: ms(t0),
            },
            expert_io: ExpertIo {
                fetched: io.fetched,
                bytes_read: io.bytes_read,
                bytes_cached: io.bytes_cached,
                read_ns: io.read_ns,
            },
        };
        if finish != FinishReason::Cancelled {
            let _ = on_event(Event::Done(done.clone()));
        }
        Ok(done)
    }
}
