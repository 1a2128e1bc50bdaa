//! Sparse MoE block (arch-spec §7): softmax router over all experts, top-k, renormalise,
//! SwiGLU experts fetched from the ExpertSource, shared expert scaled by sigmoid(gate).
//! Routing stays here; where expert bytes come from is the ExpertSource's business.
use std::time::Instant;

use crate::error::Result;
use crate::experts::{ExpertSource, ExpertWeights};
use crate::kernels;
use crate::weights::Linear;

use super::{linear, LayerTimes};

/// A SwiGLU MLP: down(silu(gate x) * up x). Used for the shared expert and dense-MLP layers.
pub struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &[f32], t: usize) -> Vec<f32> {
        swiglu_mlp(&self.gate, &self.up, &self.down, x, t)
    }
}

pub fn swiglu_mlp(gate: &Linear, up: &Linear, down: &Linear, x: &[f32], t: usize) -> Vec<f32> {
    let g = linear(gate, x, t);
    let u = linear(up, x, t);
    let mut h = vec![0f32; g.len()];
    kernels::swiglu(&g, &u, &mut h);
    linear(down, &h, t)
}

pub struct Moe {
    /// [E, H]
    pub router: Linear,
    pub shared: Option<Mlp>,
    /// [1, H]
    pub shared_gate: Option<Linear>,
    pub layer: usize,
}

/// Most experts fetched at once during prefill: bounds the buffers a chunk holds.
const FETCH_BATCH: usize = 16;

impl Moe {
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &[f32],
        t: usize,
        hidden: usize,
        top_k: usize,
        norm_topk: bool,
        experts: &dyn ExpertSource,
        times: &mut LayerTimes,
    ) -> Result<Vec<f32>> {
        let t0 = Instant::now();
        let logits = linear(&self.router, x, t);
        let ne = self.router.rows();
        // Per token: (expert, weight) pairs.
        let mut routes: Vec<Vec<(usize, f32)>> = Vec::with_capacity(t);
        for ti in 0..t {
            let mut p = logits[ti * ne..][..ne].to_vec();
            kernels::softmax_inplace(&mut p);
            let mut sel = kernels::top_k(&p, top_k);
            if norm_topk {
                let sum: f32 = sel.iter().map(|s| s.1).sum();
                for s in sel.iter_mut() {
                    s.1 /= sum;
                }
            }
            routes.push(sel);
        }
        let mut used: Vec<usize> = routes.iter().flatten().map(|r| r.0).collect();
        used.sort_unstable();
        used.dedup();
        let first: Vec<usize> = used.iter().copied().take(FETCH_BATCH).collect();
        experts.prefetch(self.layer, &first);
        times.routing += t0.elapsed();

        // Shared expert while the routed reads are in flight.
        let t1 = Instant::now();
        let mut out = vec![0f32; t * hidden];
        if let (Some(sh), Some(sg)) = (&self.shared, &self.shared_gate) {
            let s = sh.forward(x, t);
            let g = linear(sg, x, t);
            for ti in 0..t {
                let w = 1.0 / (1.0 + (-g[ti]).exp());
                kernels::axpy(
                    w,
                    &s[ti * hidden..][..hidden],
                    &mut out[ti * hidden..][..hidden],
                );
            }
        }
        times.shared += t1.elapsed();

        for (bi, batch) in used.chunks(FETCH_BATCH).enumerate() {
            let tw = Instant::now();
            let ws = experts.fetch(self.layer, batch)?;
            times.expert_wait += tw.elapsed();
            if let Some(next) = used.chunks(FETCH_BATCH).nth(bi + 1) {
                experts.prefetch(self.layer, next);
            }
            for (&e, w) in batch.iter().zip(&ws) {
                self.apply_expert(e, w, x, hidden, &routes, &mut out, times);
            }
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_expert(
        &self,
        e: usize,
        w: &ExpertWeights,
        x: &[f32],
        hidden: usize,
        routes: &[Vec<(usize, f32)>],
        out: &mut [f32],
        times: &mut LayerTimes,
    ) {
        let tc = Instant::now();
        // Tokens routed to e and their weights.
        let toks: Vec<(usize, f32)> = routes
            .iter()
            .enumerate()
            .filter_map(|(ti, r)| r.iter().find(|s| s.0 == e).map(|s| (ti, s.1)))
            .collect();
        let mut xe = Vec::with_capacity(toks.len() * hidden);
        for &(ti, _) in &toks {
            xe.extend_from_slice(&x[ti * hidden..][..hidden]);
        }
        let y = swiglu_mlp(&w.gate, &w.up, &w.down, &xe, toks.len());
        times.expert_compute += tc.elapsed();
        let tm = Instant::now();
        for (j, &(ti, wt)) in toks.iter().enumerate() {
            kernels::axpy(
                wt,
                &y[j * hidden..][..hidden],
                &mut out[ti * hidden..][..hidden],
            );
        }
        times.combine += tm.elapsed();
    }
}
