//! The trace as tokens: one row per (request, position) in the order they were computed, with
//! each MoE layer's experts (by descending weight) and, when recorded, its router input.
use std::collections::HashMap;

use flashmoe_core::trace::{Phase, Trace};

pub struct Token {
    pub request: u64,
    pub pos: u32,
    pub phase: Phase,
    /// Per MoE layer (index into the header's `moe_layers`): the experts, empty if absent.
    pub experts: Vec<Vec<u16>>,
    /// Per MoE layer: the router input, when recorded.
    pub hidden: Vec<Option<Vec<f32>>>,
}

impl Token {
    /// Whether `self` directly follows `prev` in the same request.
    pub fn follows(&self, prev: &Token) -> bool {
        self.request == prev.request && self.pos == prev.pos + 1
    }
}

pub fn tokens(t: &Trace) -> Vec<Token> {
    let h = &t.header;
    let (k, nm, hd) = (h.k as usize, h.moe_layers.len(), h.hidden as usize);
    let mut at: HashMap<(u64, u32), usize> = HashMap::new();
    let mut out: Vec<Token> = Vec::new();
    for r in &t.records {
        let Some(li) = h.moe_index(r.layer) else {
            continue;
        };
        for i in 0..r.t as usize {
            let pos = r.pos + i as u32;
            let idx = *at.entry((r.request, pos)).or_insert_with(|| {
                out.push(Token {
                    request: r.request,
                    pos,
                    phase: r.phase,
                    experts: vec![Vec::new(); nm],
                    hidden: vec![None; nm],
                });
                out.len() - 1
            });
            out[idx].experts[li] = r.token(i, k).to_vec();
            if let Some(hs) = &r.hidden {
                out[idx].hidden[li] = Some(hs[i * hd..(i + 1) * hd].to_vec());
            }
        }
    }
    out
}

/// The engine's expert accesses the trace implies, in order: each record's distinct experts,
/// ascending, as keys (`flashmoe_core::cache::key`).
pub fn accesses(t: &Trace) -> Vec<u64> {
    let mut v = Vec::new();
    for r in &t.records {
        for e in r.used() {
            v.push(flashmoe_core::cache::key(r.layer as usize, e as usize));
        }
    }
    v
}

/// Tokens the trace covers (each counted once, at its first MoE layer's records).
pub fn token_count(t: &Trace) -> usize {
    let first = t.header.moe_layers.first().copied();
    t.records
        .iter()
        .filter(|r| Some(r.layer) == first)
        .map(|r| r.t as usize)
        .sum()
}
