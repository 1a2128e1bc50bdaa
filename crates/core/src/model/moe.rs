//! Sparse MoE block (arch-spec §7): softmax router over all experts, top-k, renormalise,
//! SwiGLU experts fetched from the ExpertSource, shared expert scaled by sigmoid(gate).
//! Routing stays here; where expert bytes come from is the ExpertSource's business, how they
//! are multiplied the backend's.
use crate::backend::{Backend, Cpu, ExpertCall, MoeCall};
use crate::error::Result;
use crate::experts::ExpertSource;

use super::tap::{Routing, Tap, Timing};
use super::{ForwardStats, LayerTimes};

/// Most experts whose reads are queued as soon as the routing is known (the backend queues
/// the rest batch by batch).
const FIRST_READS: usize = 16;

/// A SwiGLU MLP: down(silu(gate x) * up x). Used for the shared expert and dense-MLP layers.
pub struct Mlp<B: Backend = Cpu> {
    /// [I, H] each.
    pub gate: B::Mat,
    pub up: B::Mat,
    /// [H, I]
    pub down: B::Mat,
}

impl<B: Backend> Mlp<B> {
    /// `y [t, H] = down(silu(gate x) * up x)`.
    pub fn run(&self, be: &B, x: &B::Buf, t: usize, y: &mut B::Buf) -> Result<()> {
        be.fused_swiglu_mlp(&self.gate, &self.up, &self.down, x, t, y)
    }
}

pub struct Moe<B: Backend = Cpu> {
    /// [E, H]
    pub router: B::Mat,
    pub shared: Option<Mlp<B>>,
    /// [1, H]
    pub shared_gate: Option<B::Mat>,
    pub layer: usize,
}

impl<B: Backend> Moe<B> {
    /// `x += moe(xn)` for `t` tokens `xn [t, H]`, `top_k` experts per token renormalised
    /// over the chosen when `renorm`; `l` names the layer for taps.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        be: &B,
        xn: &B::Buf,
        t: usize,
        (top_k, renorm): (usize, bool),
        experts: &dyn ExpertSource,
        parallel: bool,
        x: &mut B::Buf,
        l: usize,
        tap: &mut impl Tap<B>,
    ) -> Result<()> {
        let (ne, h) = be.mat_shape(&self.router);
        // logits = x Wgate^T [t, E]; p = softmax(logits); (w, idx) = topk(p, k); renormalise
        let mut logits = be.scratch(t * ne)?;
        let mut sg = match &self.shared_gate {
            Some(_) => Some(be.scratch(t)?),
            None => None,
        };
        match (&self.shared_gate, sg.as_mut()) {
            (Some(w), Some(g)) => {
                be.matmul_many(&[&self.router, w], xn, t, &mut [&mut logits, g])?
            }
            _ => be.matmul(&self.router, xn, t, &mut logits)?,
        }
        let mut routes = be.alloc_routes(t, top_k)?;
        let call = ExpertCall {
            source: experts,
            layer: self.layer,
            parallel,
        };
        // One token the backend fuses (CUDA, every expert in VRAM): the rest of the block is
        // one op, unless a tap wants what only the op-by-op path has (the routing, the shared
        // and routed outputs apart).
        let split = ["routing", "shared_out", "experts_out"];
        if t == 1 && be.fuses_moe(self.layer, top_k) && !split.iter().any(|w| tap.wants(w)) {
            let m = MoeCall {
                call,
                xn,
                t,
                logits: &logits,
                ne,
                k: top_k,
                renorm,
                shared: self.shared.as_ref().map(|s| [&s.gate, &s.up, &s.down]),
                shared_gate: sg.as_ref(),
            };
            tap.tap(be, "routes", Some(l), None)?;
            let et = be.fused_moe(&m, &mut routes, x)?;
            tap.expert_times(l, et);
            return tap.tap(be, "experts_out", Some(l), None);
        }
        be.router_topk(&logits, ne, top_k, renorm, &mut routes)?;
        // shared = down(silu(x Gs^T) * (x Us^T)): queued before the routing is read back where
        // that overlaps the round trip, else after the expert reads are issued.
        let early = be.shared_before_routing();
        let mut shared = match (&self.shared, early) {
            (Some(sh), true) => Some(self.shared_mlp(be, sh, xn, t, h)?),
            _ => None,
        };
        // Issue the expert reads now; the shared expert computes while they are in flight.
        let host = be.routes_host(&routes, self.layer)?;
        if let Some(h) = &host {
            let used = h.used();
            experts.prefetch(self.layer, &used[..used.len().min(FIRST_READS)]);
        }
        if tap.wants("routing") {
            let r = Routing {
                input: xn,
                tokens: t,
                routes: host.as_deref(),
                shared_gate: sg.as_ref(),
            };
            tap.routing(be, l, &r)?;
        }
        tap.tap(be, "routes", Some(l), None)?;
        if let (Some(sh), false) = (&self.shared, early) {
            shared = Some(self.shared_mlp(be, sh, xn, t, h)?);
        }
        if let Some(ys) = &shared {
            tap.tap(be, "shared_out", Some(l), Some(ys))?;
        }
        // routed = sum_j w_j Expert_{idx_j}(x), written whole by `moe_experts` (no zeroing
        // pass: on a GPU a clear or memset that also ends the overlap of the work around it)
        let mut routed = be.scratch(t * h)?;
        let et = be.moe_experts(call, xn, &routes, host.as_deref(), &mut routed)?;
        tap.expert_times(l, et);
        tap.tap(be, "experts_out", Some(l), Some(&routed))?;
        // out = routed + sigmoid(x Wsg^T) * shared, added to the residual
        be.moe_combine(x, &routed, shared.as_ref(), sg.as_ref())
    }

    /// The shared expert's output `[t, H]` for `xn`.
    fn shared_mlp(&self, be: &B, sh: &Mlp<B>, xn: &B::Buf, t: usize, h: usize) -> Result<B::Buf> {
        let mut ys = be.scratch(t * h)?;
        sh.run(be, xn, t, &mut ys)?;
        Ok(ys)
    }

    /// The experts this layer's router picks for one token `x [H]` (a guess for prefetching
    /// when `x` is an earlier layer's input). Reads the routing back to the host.
    pub fn predict(&self, be: &B, x: &B::Buf, top_k: usize) -> Result<Vec<usize>> {
        let ne = be.mat_shape(&self.router).0;
        let mut logits = be.scratch(ne)?;
        be.matmul(&self.router, x, 1, &mut logits)?;
        let mut routes = be.alloc_routes(1, top_k)?;
        be.router_topk(&logits, ne, top_k, false, &mut routes)?;
        Ok(be
            .routes_host(&routes, self.layer)?
            .map_or_else(Vec::new, |r| r.used()))
    }
}

impl Moe<Cpu> {
    /// [`Moe::run`] on the CPU over host slices, returning the block's output `[t, H]`.
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
        let mut out = vec![0f32; t * hidden];
        let mut stats = ForwardStats::default();
        let mut tap = Timing::new(&mut stats, 1);
        let xs = x.to_vec();
        let route = (top_k, norm_topk);
        self.run(
            &Cpu, &xs, t, route, experts, parallel, &mut out, 0, &mut tap,
        )?;
        times.add(&stats.layers[0]);
        Ok(out)
    }
}
