//! Session: one sequence's state over a model, with chunked prefill, single-token decode and
//! a small cache of state snapshots for prefix reuse (same system prompt and tools, or a
//! continuing conversation, prefills only the new tokens). Sampling lives with the caller.
//!
//! Where the forward pass runs is behind [`SeqBackend`]: [`CpuBackend`] (the CPU model, used by
//! [`Session::new`]) or another one handed to [`Session::with_backend`] (the CUDA backend lives
//! in flashmoe-cuda, which core does not depend on).
use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::{ForwardStats, Logits, Model};
use crate::trace::Phase;

/// A backend's copy of a sequence's state, for prefix reuse. Only the backend that saved it
/// can restore it.
pub trait SavedState: Send {
    fn as_any(&self) -> &dyn Any;
}

/// Refuses logits holding NaN or infinity with [`Error::NonFiniteLogits`] naming the sequence
/// position of the first bad row (`first_pos` is the position of row 0). Every backend checks
/// what it returns, so no front end samples from garbage: one pass over `vocab` floats per
/// row, nothing next to the forward pass itself.
pub fn check_logits(logits: &[f32], vocab: usize, first_pos: usize) -> Result<()> {
    for (r, row) in logits.chunks(vocab.max(1)).enumerate() {
        if !any_non_finite(row) {
            continue;
        }
        let nan = row.iter().filter(|v| v.is_nan()).count();
        return Err(Error::NonFiniteLogits {
            pos: first_pos + r,
            nan,
            inf: row.iter().filter(|v| v.is_infinite()).count(),
            vocab: row.len(),
        });
    }
    Ok(())
}

/// Whether any value is NaN or infinite (an all-ones exponent). Branch-free so that it
/// vectorizes, where a short-circuiting `all(is_finite)` does not: it runs once per token over
/// the whole vocabulary (248,320 floats for Qwen3.5), beside a GPU token of about 1 ms. (A
/// one-off timing on the dev VM, not a bench field: 42 against 144 us.)
fn any_non_finite(row: &[f32]) -> bool {
    const EXP: u32 = 0x7f80_0000;
    row.iter()
        .fold(0u32, |a, v| a | u32::from(v.to_bits() & EXP == EXP))
        != 0
}

/// The sequence position of the first row of logits a forward call over `n` tokens from
/// position `pos` returns.
fn first_logits_pos(pos: usize, n: usize, want: Logits) -> usize {
    match want {
        Logits::All => pos,
        Logits::Last => pos + n.saturating_sub(1),
    }
}

/// One sequence's forward pass with its state kept inside, on some backend.
pub trait SeqBackend: Send {
    /// Runs `tokens` from the current state (advancing it) and returns logits as
    /// [`Model::forward`] does. What a backend implements; callers use [`SeqBackend::forward`].
    fn forward_unchecked(
        &mut self,
        tokens: &[u32],
        want: Logits,
        stats: &mut ForwardStats,
    ) -> Result<Vec<f32>>;
    /// [`SeqBackend::forward_unchecked`] with its logits checked finite ([`check_logits`]),
    /// here once for every backend, so that no front end samples from NaN. The caller has
    /// checked the ids and the context length.
    fn forward(
        &mut self,
        tokens: &[u32],
        want: Logits,
        stats: &mut ForwardStats,
    ) -> Result<Vec<f32>> {
        let first = first_logits_pos(self.pos(), tokens.len(), want);
        let rows = match want {
            Logits::All => tokens.len(),
            Logits::Last => 1,
        };
        let logits = self.forward_unchecked(tokens, want, stats)?;
        check_logits(&logits, logits.len() / rows.max(1), first)?;
        Ok(logits)
    }
    /// Greedy decoding's step: runs `tokens` as [`SeqBackend::forward`] does and returns the
    /// argmax of the last position's logits, reduced where they live where the backend can
    /// (one id crosses to the host instead of the vocabulary's logits: 1 MB a token for
    /// Qwen3.5). [`Error::NonFiniteArgmax`] when the largest logit is not finite. Forward
    /// stats are not recorded. The caller has checked the ids and the context length.
    fn forward_argmax(&mut self, tokens: &[u32]) -> Result<u32> {
        let mut stats = ForwardStats::default();
        let logits = self.forward(tokens, Logits::Last, &mut stats)?;
        crate::backend::argmax_checked(&logits)
    }
    /// Tokens the state has consumed.
    fn pos(&self) -> usize;
    /// Back to a fresh state.
    fn reset(&mut self);
    /// A copy of the current state.
    fn save(&self) -> Result<Box<dyn SavedState>>;
    /// Makes the current state a copy of `saved` (which this backend saved).
    fn restore(&mut self, saved: &dyn SavedState) -> Result<()>;
    /// Bytes the current state holds.
    fn state_bytes(&self) -> usize;
    /// "cpu", "cuda", ...
    fn name(&self) -> &'static str;
}

/// The CPU forward pass: [`Model::forward`] over a host [`State`], the same sequence every
/// backend uses.
pub type CpuBackend = crate::model_seq::ModelSeq<crate::backend::Cpu>;

type MakeBackend = dyn Fn(Arc<Model>) -> Result<Box<dyn SeqBackend>> + Send + Sync;

/// Builds a backend for a loaded model (what an engine is told to run on).
#[derive(Clone)]
pub struct BackendFactory {
    name: &'static str,
    make: Arc<MakeBackend>,
}

impl BackendFactory {
    /// `name` is for messages only; `make` may fall back to another backend.
    pub fn new(
        name: &'static str,
        make: impl Fn(Arc<Model>) -> Result<Box<dyn SeqBackend>> + Send + Sync + 'static,
    ) -> Self {
        BackendFactory {
            name,
            make: Arc::new(make),
        }
    }

    /// The CPU backend.
    pub fn cpu() -> Self {
        Self::new("cpu", |m| Ok(Box::new(CpuBackend::new(m))))
    }

    pub fn build(&self, model: Arc<Model>) -> Result<Box<dyn SeqBackend>> {
        (self.make)(model)
    }
}

impl fmt::Debug for BackendFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackendFactory({})", self.name)
    }
}

/// A saved point: the tokens consumed, the state after them, and the logits they produced.
struct Snapshot {
    tokens: Vec<u32>,
    state: Box<dyn SavedState>,
    logits: Vec<f32>,
}

pub struct Session {
    /// Shared: a server's worker and its metrics, or a chat and its front end, hold it too.
    pub model: Arc<Model>,
    /// Declared before `backend` so that saved states drop before the backend (a device
    /// backend's context).
    snapshots: Vec<Snapshot>,
    backend: Box<dyn SeqBackend>,
    tokens: Vec<u32>,
    last_logits: Vec<f32>,
    /// Most snapshots kept (oldest dropped first).
    pub max_snapshots: usize,
    /// Tokens per prefill forward call (bounds activation memory and expert batches).
    pub prefill_chunk: usize,
    pub stats: ForwardStats,
}

/// Tokens per prefill forward call unless set (`--prefill-chunk`). Every call reads each
/// routed expert its tokens route to once per layer, and with 512 experts that is nearly all
/// of them, so longer calls read less when experts stream from disk: a 2,048-token prompt of
/// the 2-layer 397B-shaped model reads 14.5 GB of experts in 1024-token calls against 29.0 GB
/// in 512-token ones (cold, from the disk: 62.6 against 38.2 tok/s, one run each), and each
/// routed expert gets ~20 tokens instead of ~10 for the CPU kernels (warm, 2-core EPYC: 68.9,
/// 71.3, 66.7 against 64.0, 66.9, 58.8 tok/s, alternating pairs). Peak RSS, which counts the
/// expert pages used in place, was 1.34 against 1.54 GB. 2048-token calls read 7.2 GB but
/// measured no faster warm on the CPU (their 12288x2048 transposed result exceeds the blocked
/// kernel's kept scratch and is re-allocated every product), so the default stays at 1024.
pub const DEFAULT_PREFILL_CHUNK: usize = 1024;

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Session {
    /// A session on the CPU.
    pub fn new(model: Arc<Model>) -> Self {
        let backend = Box::new(CpuBackend::new(model.clone()));
        Self::with_backend(model, backend)
    }

    /// A session running on `backend`, which must run `model`.
    pub fn with_backend(model: Arc<Model>, backend: Box<dyn SeqBackend>) -> Self {
        Session {
            backend,
            model,
            tokens: Vec::new(),
            last_logits: Vec::new(),
            snapshots: Vec::new(),
            max_snapshots: 4,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            stats: ForwardStats::default(),
        }
    }

    /// Tokens the state currently holds.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Where the forward pass runs ("cpu", "cuda").
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn reset(&mut self) {
        self.backend.reset();
        self.tokens.clear();
        self.last_logits.clear();
    }

    /// Appends tokens (chunked prefill) and returns the logits after the last one.
    pub fn feed(&mut self, toks: &[u32]) -> Result<&[f32]> {
        self.feed_as(toks, Phase::Prefill)
    }

    /// [`Session::feed`], labelled `phase` in a routing trace being recorded.
    fn feed_as(&mut self, toks: &[u32], phase: Phase) -> Result<&[f32]> {
        let rec = crate::trace::active();
        if let Some(r) = rec {
            r.set_phase(Some(phase));
        }
        let r = self.feed_chunks(toks);
        if let Some(r) = rec {
            r.set_phase(None);
        }
        r?;
        Ok(&self.last_logits)
    }

    fn feed_chunks(&mut self, toks: &[u32]) -> Result<()> {
        self.model.check_tokens_at(toks, self.backend.pos())?;
        for chunk in toks.chunks(self.prefill_chunk.max(1)) {
            match self.backend.forward(chunk, Logits::Last, &mut self.stats) {
                Ok(l) => self.last_logits = l,
                Err(e) => {
                    // The state may have advanced part-way (or hold NaN): start the next
                    // prompt from scratch rather than from a state `tokens` does not describe.
                    self.reset();
                    return Err(e);
                }
            }
            self.tokens.extend_from_slice(chunk);
        }
        Ok(())
    }

    /// Makes the state hold exactly `prompt`, reusing the longest saved or live state whose
    /// tokens are a prefix of it, and returns (logits after the prompt, tokens reused).
    /// Recurrent (GatedDeltaNet) state cannot be rewound, so only whole saved points count.
    pub fn set_prompt(&mut self, prompt: &[u32]) -> Result<(Vec<f32>, usize)> {
        self.model.check_tokens_at(prompt, 0)?;
        let reused = match self.reuse_for(prompt) {
            (Some(i), n) => {
                let s = &self.snapshots[i];
                self.backend.restore(&*s.state)?;
                self.tokens.clone_from(&s.tokens);
                self.last_logits.clone_from(&s.logits);
                n
            }
            (None, 0) => {
                self.reset();
                0
            }
            (None, live) => live,
        };
        if reused < prompt.len() {
            self.feed(&prompt[reused..])?;
        }
        Ok((self.last_logits.clone(), reused))
    }

    /// How many leading tokens of `prompt` [`Session::set_prompt`] would take from a saved or
    /// the live state instead of computing them (a front end that feeds the rest in steps, to
    /// show progress, restores them with `set_prompt(&prompt[..n])`).
    pub fn reusable(&self, prompt: &[u32]) -> usize {
        self.reuse_for(prompt).1
    }

    /// (the saved state to restore, if one beats the live state; tokens reused).
    fn reuse_for(&self, prompt: &[u32]) -> (Option<usize>, usize) {
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
        match best {
            Some((i, n)) if n > live => (Some(i), n),
            _ => (None, live),
        }
    }

    /// Saves the current point for later prefix reuse. A save that fails (a device out of
    /// memory) is skipped: reuse is an optimisation; [`Session::try_snapshot`] reports it.
    pub fn snapshot(&mut self) {
        let _ = self.try_snapshot();
    }

    /// [`Session::snapshot`], with the backend's error when the state could not be saved.
    pub fn try_snapshot(&mut self) -> Result<()> {
        if self.tokens.is_empty() || self.max_snapshots == 0 {
            return Ok(());
        }
        let state = self.backend.save()?;
        self.snapshots.retain(|s| s.tokens != self.tokens);
        if self.snapshots.len() >= self.max_snapshots {
            self.snapshots.remove(0);
        }
        self.snapshots.push(Snapshot {
            tokens: self.tokens.clone(),
            state,
            logits: self.last_logits.clone(),
        });
        Ok(())
    }

    /// Decodes one token: appends it and returns the next logits.
    pub fn step(&mut self, tok: u32) -> Result<&[f32]> {
        self.feed_as(&[tok], Phase::Decode)
    }

    pub fn state_bytes(&self) -> usize {
        self.backend.state_bytes()
    }
}
