//! Sparse MoE block (arch-spec §7): softmax router over all experts, top-k, renormalise,
//! SwiGLU experts fetched from the ExpertSource, shared expert scaled by sigmoid(gate).
//! Routing stays here; where expert bytes come from is the ExpertSource's business.
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::error::Result;
use crate::experts::ExpertSource;
use crate::kernels;
use crate::weights::Linear;

use super::{linear, sigmoid, LayerTimes};

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
    swiglu_mlp_with(gate, up, down, x, t, linear)
}

fn swiglu_mlp_with(
    gate: &Linear,
    up: &Linear,
    down: &Linear,
    x: &[f32],
    t: usize,
    lin: fn(&Linear, &[f32], usize) -> Vec<f32>,
) -> Vec<f32> {
    let g = lin(gate, x, t);
    let u = lin(up, x, t);
    let mut h = vec![0f32; g.len()];
    kernels::swiglu(&g, &u, &mut h);
    lin(down, &h, t)
}

/// `linear` on the calling thread only (for products that already run one per thread).
fn linear_one_thread(w: &Linear, x: &[f32], t: usize) -> Vec<f32> {
    let mut y = vec![0f32; t * w.rows()];
    kernels::matmul_with(kernels::isa(), usize::MAX, &w.view(), x, t, &mut y);
    y
}

pub struct Moe {
    /// [E, H]
    pub router: Linear,
    pub shared: Option<Mlp>,
    /// [1, H]
    pub shared_gate: Option<Linear>,
    pub layer: usize,
}

/// Experts run in parallel only when each is at least this much work (bytes × tokens): a rayon
/// fork-join costs 10-25 us on the 2-core dev VM, more than a tiny expert's whole product.
const PAR_MIN_EXPERT_BYTES: usize = 1 << 20;

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
        self.forward_with(x, t, hidden, top_k, norm_topk, experts, true, times)
    }

    /// [`Self::forward`] with `parallel` choosing whether one layer's experts run in parallel.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with(
        &self,
        x: &[f32],
        t: usize,
        hidden: usize,
        top_k: usize,
        norm_topk: bool,
        experts: &dyn ExpertSource,
        parallel: bool,
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
                let w = sigmoid(g[ti]);
                kernels::axpy(
                    w,
                    &s[ti * hidden..][..hidden],
                    &mut out[ti * hidden..][..hidden],
                );
            }
        }
        times.shared += t1.elapsed();

        // Experts of a batch run in parallel, each as soon as its own read completes; the
        // next batch's reads are queued first so they land while this batch computes.
        // Results are added in ascending expert id, the order of the sequential loop.
        let batches: Vec<&[usize]> = used.chunks(FETCH_BATCH).collect();
        for (bi, batch) in batches.iter().enumerate() {
            if let Some(next) = batches.get(bi + 1) {
                experts.prefetch(self.layer, next);
            }
            let tb = Instant::now();
            let par = parallel && experts.expert_bytes() * t >= PAR_MIN_EXPERT_BYTES;
            // In parallel, each expert's products run on its own thread (the experts are the
            // parallelism); serially, each product is split over rows instead.
            let run = |&e: &usize| self.run_expert(e, x, hidden, &routes, experts, par);
            let done: Vec<Result<ExpertOut>> = if par {
                batch.par_iter().map(run).collect()
            } else {
                batch.iter().map(run).collect()
            };
            let wall = tb.elapsed();
            let tm = Instant::now();
            let (mut wait, mut compute) = (Duration::ZERO, Duration::ZERO);
            for r in done {
                let r = r?;
                wait += r.wait;
                compute += r.compute;
                for (j, &(ti, wt)) in r.toks.iter().enumerate() {
                    kernels::axpy(
                        wt,
                        &r.y[j * hidden..][..hidden],
                        &mut out[ti * hidden..][..hidden],
                    );
                }
            }
            times.combine += tm.elapsed();
            // Wall time of the parallel section, split between waiting and computing in the
            // proportion the tasks spent on each (summed task time exceeds wall time).
            let busy = (wait + compute).as_secs_f64().max(1e-12);
            times.expert_wait += wall.mul_f64(wait.as_secs_f64() / busy);
            times.expert_compute += wall.mul_f64(compute.as_secs_f64() / busy);
        }
        Ok(out)
    }

    /// The experts this layer's router picks for one token `x [H]` (a guess for prefetching
    /// when `x` is an earlier layer's input).
    pub fn predict(&self, x: &[f32], top_k: usize) -> Vec<usize> {
        let mut p = linear(&self.router, &x[..self.router.cols()], 1);
        kernels::softmax_inplace(&mut p);
        kernels::top_k(&p, top_k).into_iter().map(|s| s.0).collect()
    }

    /// Fetches expert `e` (waiting only for its own read) and applies it to the tokens routed
    /// to it.
    fn run_expert(
        &self,
        e: usize,
        x: &[f32],
        hidden: usize,
        routes: &[Vec<(usize, f32)>],
        experts: &dyn ExpertSource,
        one_thread: bool,
    ) -> Result<ExpertOut> {
        let tw = Instant::now();
        let w =
            experts
                .fetch(self.layer, &[e])?
                .pop()
                .ok_or_else(|| crate::error::Error::Expert {
                    layer: self.layer,
                    expert: e,
                    msg: "expert source returned nothing".into(),
                })?;
        let wait = tw.elapsed();
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
        let y = if one_thread {
            swiglu_mlp_with(&w.gate, &w.up, &w.down, &xe, toks.len(), linear_one_thread)
        } else {
            swiglu_mlp(&w.gate, &w.up, &w.down, &xe, toks.len())
        };
        Ok(ExpertOut {
            toks,
            y,
            wait,
            compute: tc.elapsed(),
        })
    }
}

/// One routed expert's output: the tokens it served (index, routing weight), `y [n, H]`.
struct ExpertOut {
    toks: Vec<(usize, f32)>,
    y: Vec<f32>,
    wait: Duration,
    compute: Duration,
}
