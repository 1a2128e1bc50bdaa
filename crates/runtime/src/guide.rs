//! One generation's constrained decoding: which grammar applies when, on top of
//! [`flashmoe_text::constrain`].
//!
//! Three uses, by the request: the answer (`response_format`, a Lark grammar) is constrained
//! from its first token, or from just after `</think>` when the prompt opened thinking; a call
//! forced by `tool_choice` (its opening already in the prompt) is constrained to its end, after
//! which the generation ends; with tools on `auto`, each call the model opens with
//! `<tool_call>` is constrained until `</tool_call>`, and text around calls is free.
//! A trigger fires only at a token boundary (the text so far ends with the tag after a token).
use std::sync::Arc;

use flashmoe_text::call_grammar::{tool_call_lark, CallStart};
use flashmoe_text::{Constraint, GrammarCompiler, GrammarSpec, TextError};

use crate::error::{Result, RuntimeError};
use crate::prompt::PreparedPrompt;
use crate::request::{GenerationRequest, ToolChoice};

const THINK_CLOSE: &str = "</think>";
const CALL_OPEN: &str = "<tool_call>";

/// What the grammar covers.
enum Scope {
    /// The answer; the generation ends when it is complete.
    Answer,
    /// The forced call; the generation ends when it is complete.
    ForcedCall,
    /// Each call the model opens; free text between calls.
    Calls,
}

/// Whether a request needs a grammar at all (so an engine builds its trie only then).
pub(crate) fn needed(req: &GenerationRequest, prompt: &PreparedPrompt) -> bool {
    req.grammar.is_some() || (req.constrain_tools && !prompt.tools.is_empty() && !req.raw)
}

pub(crate) struct Guide {
    compiler: Arc<GrammarCompiler>,
    scope: Scope,
    spec: GrammarSpec,
    active: Option<Constraint>,
    /// A compiled grammar for the next activation.
    ready: Option<Constraint>,
    /// The grammar was completed and nothing may follow.
    finished: bool,
    /// Text generated so far is thinking (until `</think>`).
    in_thinking: bool,
    /// The end of the generated text, to see tags complete at a token boundary.
    tail: String,
    /// Sample first and mask only when the grammar refuses the token (see [`Guide::sample`]).
    speculate: bool,
    /// The active grammar already consumed the token being advanced past.
    consumed: bool,
}

impl Guide {
    /// The guide for this request, or `None` when nothing is constrained.
    /// `speculate`: [`Guide::sample`] tries the unmasked choice first (greedy decoding, where
    /// that choice is cheap and, when allowed, the same token).
    pub(crate) fn new(
        compiler: Arc<GrammarCompiler>,
        req: &GenerationRequest,
        prompt: &PreparedPrompt,
        speculate: bool,
    ) -> Result<Option<Guide>> {
        let close = if compiler.is_special_token("</tool_call>") {
            "</tool_call>".to_string()
        } else {
            "\"</tool_call>\"".to_string()
        };
        let forced = !prompt.forced_prefix.is_empty();
        let (scope, spec) = if forced && req.constrain_tools {
            let start = match &req.tool_choice {
                ToolChoice::Function(name) => CallStart::InFunction(name),
                _ => CallStart::AfterOpen {
                    newline_written: true,
                },
            };
            match tool_call_lark(&prompt.tools, prompt.call_format, start, &close) {
                Some(g) => (Scope::ForcedCall, GrammarSpec::Lark(g)),
                None => return Ok(None),
            }
        } else if let Some(g) = &req.grammar {
            (Scope::Answer, g.clone())
        } else if req.constrain_tools && !prompt.tools.is_empty() && !req.raw {
            let start = CallStart::AfterOpen {
                newline_written: false,
            };
            match tool_call_lark(&prompt.tools, prompt.call_format, start, &close) {
                Some(g) => (Scope::Calls, GrammarSpec::Lark(g)),
                None => return Ok(None),
            }
        } else {
            return Ok(None);
        };
        // Compile now, so a bad grammar is the request's error before the model runs.
        let first = compiler.compile(&spec).map_err(|e| match e {
            TextError::Grammar { msg, .. } => RuntimeError::Grammar(msg),
            e => e.into(),
        })?;
        let starts_now = match scope {
            Scope::Answer => !prompt.starts_in_thinking,
            Scope::ForcedCall => true,
            Scope::Calls => false,
        };
        let (active, ready) = if starts_now {
            (Some(first), None)
        } else {
            (None, Some(first))
        };
        Ok(Some(Guide {
            compiler,
            scope,
            spec,
            active,
            ready,
            finished: false,
            in_thinking: prompt.starts_in_thinking,
            tail: String::new(),
            speculate,
            consumed: false,
        }))
    }

    /// Picks the next token with `sample`, within the grammar when one is active; `None`: the
    /// grammar is complete and the generation must end. `allow_eos: false` keeps
    /// end-of-sequence out (`ignore_eos`).
    ///
    /// When speculating, the unmasked choice is tried first and the mask (a walk of the whole
    /// vocabulary) is computed only if the grammar refuses it: for greedy decoding the argmax
    /// of the masked logits is that same token whenever the grammar allows it.
    pub(crate) fn sample(
        &mut self,
        logits: &mut [f32],
        allow_eos: bool,
        mut sample: impl FnMut(&[f32]) -> u32,
    ) -> Result<Option<u32>> {
        if self.finished {
            return Ok(None);
        }
        let Some(c) = self.active.as_mut() else {
            return Ok(Some(sample(logits)));
        };
        if self.speculate {
            let tok = sample(logits);
            if c.try_accept(tok, allow_eos)? {
                self.consumed = true;
                return Ok(Some(tok));
            }
        }
        if c.apply(logits, allow_eos)? == 0 {
            return Ok(None);
        }
        Ok(Some(sample(logits)))
    }

    /// Whether the grammar is complete and the generation must end.
    pub(crate) fn finished(&self) -> bool {
        self.finished
    }

    /// Moves past a sampled token; `piece` is the text it completed, if any.
    pub(crate) fn advance(&mut self, tok: u32, piece: Option<&str>) -> Result<()> {
        if let Some(c) = self.active.as_mut() {
            if !std::mem::take(&mut self.consumed) {
                c.advance(tok)?;
            }
            if c.is_stopped() {
                self.active = None;
                match self.scope {
                    Scope::Answer | Scope::ForcedCall => self.finished = true,
                    Scope::Calls => self.tail.clear(),
                }
            }
            return Ok(());
        }
        let Some(piece) = piece else { return Ok(()) };
        self.tail.push_str(piece);
        let keep = self.tail.len().saturating_sub(32);
        let keep = (keep..=self.tail.len())
            .find(|&i| self.tail.is_char_boundary(i))
            .unwrap_or(0);
        self.tail.drain(..keep);
        if self.in_thinking {
            if self.tail.contains(THINK_CLOSE) {
                self.in_thinking = false;
                // A `</think>` that ends inside a token with text after it leaves the answer
                // unconstrained (tokenizers of thinking models have it as one token).
                let fire = matches!(self.scope, Scope::Answer) && self.tail.ends_with(THINK_CLOSE);
                self.tail.clear();
                if fire {
                    self.activate()?;
                }
            }
            return Ok(());
        }
        if matches!(self.scope, Scope::Calls) && self.tail.ends_with(CALL_OPEN) {
            self.tail.clear();
            self.activate()?;
        }
        Ok(())
    }

    fn activate(&mut self) -> Result<()> {
        let c = match self.ready.take() {
            Some(c) => c,
            None => self.compiler.compile(&self.spec)?,
        };
        self.active = Some(c);
        Ok(())
    }
}
