//! Session: one sequence's state over a model, with chunked prefill, single-token decode and
//! a small cache of state snapshots for prefix reuse (same system prompt and tools, or a
//! continuing conversation, prefills only the new tokens). Sampling lives with the caller.
use std::sync::Arc;

use crate::error::Result;
use crate::model::{ForwardStats, Logits, Model, State};

/// A saved point: the tokens consumed, the state after them, and the logits they produced.
#[derive(Clone)]
struct Snapshot {
    tokens: Vec<u32>,
    state: State,
    logits: Vec<f32>,
}

pub struct Session {
    /// Shared: a server's worker and its metrics, or a chat and its front end, hold it too.
    pub model: Arc<Model>,
    state: State,
    tokens: Vec<u32>,
    last_logits: Vec<f32>,
    snapshots: Vec<Snapshot>,
    /// Most snapshots kept (oldest dropped first).
    pub max_snapshots: usize,
    /// Tokens per prefill forward call (bounds activation memory and expert batches).
    pub prefill_chunk: usize,
    pub stats: ForwardStats,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Session {
    pub fn new(model: Arc<Model>) -> Self {
        Session {
            state: State::new(&model.cfg),
            model,
            tokens: Vec::new(),
            last_logits: Vec::new(),
            snapshots: Vec::new(),
            max_snapshots: 4,
            prefill_chunk: 512,
            stats: ForwardStats::default(),
        }
    }

    /// Tokens the state currently holds.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn reset(&mut self) {
        self.state = State::new(&self.model.cfg);
        self.tokens.clear();
        self.last_logits.clear();
    }

    /// Appends tokens (chunked prefill) and returns the logits after the last one.
    pub fn feed(&mut self, toks: &[u32]) -> Result<&[f32]> {
        self.model.check_tokens(toks, &self.state)?;
        for chunk in toks.chunks(self.prefill_chunk.max(1)) {
            self.last_logits =
                self.model
                    .forward(chunk, &mut self.state, Logits::Last, &mut self.stats, None)?;
            self.tokens.extend_from_slice(chunk);
        }
        Ok(&self.last_logits)
    }

    /// Makes the state hold exactly `prompt`, reusing the longest saved or live state whose
    /// tokens are a prefix of it, and returns (logits after the prompt, tokens reused).
    /// Recurrent (GatedDeltaNet) state cannot be rewound, so only whole saved points count.
    pub fn set_prompt(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
        self.model
            .check_tokens(prompt, &State::new(&self.model.cfg))?;
        let live = if !self.tokens.is_empty()
            && common_prefix(&self.tokens, prompt) == self.tokens.len()
        {
            self.tokens.len()
        } else {
            0
        };
        let best = self
            .snapshots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.tokens.len() <= prompt.len() && prompt.starts_with(&s.tokens))
            .max_by_key(|(_, s)| s.tokens.len())
            .map(|(i, s)| (i, s.tokens.len()));
        let reused = match best {
            Some((i, n)) if n > live => {
                let s = self.snapshots[i].clone();
                self.tokens = s.tokens;
                self.state = s.state;
                self.last_logits = s.logits;
                n
            }
            _ if live > 0 => live,
            _ => {
                self.reset();
                0
            }
        };
        if reused < prompt.len() {
            self.feed(&prompt[reused..])?;
        }
        Ok((self.last_logits.clone(), reused))
    }

    /// Saves the current point for later prefix reuse.
    pub fn snapshot(&mut self) {
        if self.tokens.is_empty() || self.max_snapshots == 0 {
            return;
        }
        self.snapshots.retain(|s| s.tokens != self.tokens);
        if self.snapshots.len() >= self.max_snapshots {
            self.snapshots.remove(0);
        }
        self.snapshots.push(Snapshot {
            tokens: self.tokens.clone(),
            state: self.state.clone(),
            logits: self.last_logits.clone(),
        });
    }

    /// Decodes one token: appends it and returns the next logits.
    pub fn step(&mut self, tok: u32) -> Result<&[f32]> {
        self.feed(&[tok])
    }

    pub fn state_bytes(&self) -> usize {
        self.state.nbytes()
    }
}
