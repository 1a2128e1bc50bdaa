//! The MoE ops of [`Cuda`]: router top-k on the device, the routing read back to drive expert
//! reads, the routed experts (each expert's tokens gathered, its gate, up and down products
//! over them, the weighted outputs scattered back in ascending expert id), and the combine.
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use flashmoe_core::backend::{Backend, ExpertCall, ExpertTimes, Routes};
use flashmoe_core::{Error, Result};

use super::{ce, room, Cuda, CudaBuf, CudaRoutes};
use crate::device::{Device, Event, Pinned};
use crate::ops;

/// Bytes of page-locked memory a routing's readback is staged in (a token's: 80 bytes at
/// k = 10; a prompt's larger routing is read the plain way).
const STAGE_BYTES: usize = 64 << 10;

/// The latest routing's readback, queued right after `router_topk` (an async copy into
/// page-locked memory and an event on the compute stream): `routes_host` waits for that event
/// only, not for the work queued after the router (the shared expert, which the MoE block
/// queues first: `Backend::shared_before_routing`).
pub(super) struct Staging(Mutex<Option<Stage>>);

struct Stage {
    pinned: Pinned,
    ev: Event,
    /// Which routing the copy in flight is of (`CudaRoutes::staged`).
    gen: u64,
}

impl Staging {
    pub(super) fn new(dev: &Device) -> crate::Result<Staging> {
        Ok(Staging(Mutex::new(Some(Stage {
            pinned: dev.pinned(STAGE_BYTES)?,
            ev: dev.event()?,
            gen: 0,
        }))))
    }
}

pub(super) fn router_topk(
    be: &Cuda,
    logits: &CudaBuf,
    ne: usize,
    k: usize,
    renorm: bool,
    out: &mut CudaRoutes,
) -> Result<()> {
    let dev = be.bind()?;
    if k == 0 || k > ne {
        return Err(Error::Invalid(format!(
            "cuda router_topk: top {k} of {ne} experts"
        )));
    }
    let t = logits.len / ne;
    if out.ids.len < t * k {
        *out = be.alloc_routes(t, k)?;
    }
    (out.t, out.k) = (t, k);
    if t == 0 {
        return Ok(());
    }
    let (ids, wts) = (out.ids.ptr(), out.wts.ptr());
    ops::router_topk_rows(dev, logits.ptr(), ne, ne, k, renorm, ids, wts, t).map_err(ce)?;
    // Stage the readback (ids and weights back to back, as `alloc_routes` lays them out).
    out.staged = 0;
    let bytes = (out.ids.len + out.wts.len) * 4;
    // A token of resident layers is routed on the device (`routes_host` gives None): nothing
    // to stage (a copy would also end the dependent-launch overlap).
    let on_device = t == 1 && be.routes_resident.load(Ordering::Relaxed);
    if !on_device && wts == ids + (out.ids.len * 4) as u64 && bytes <= STAGE_BYTES {
        let mut st = be.staging.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = st.as_mut() {
            s.gen += 1;
            dev.dtoh_async(&s.pinned, ids, bytes, &dev.compute)
                .map_err(ce)?;
            dev.record(&s.ev, &dev.compute).map_err(ce)?;
            out.staged = s.gen;
        }
    }
    Ok(())
}

pub(super) fn routes_host(be: &Cuda, r: &CudaRoutes) -> Result<Routes> {
    let n = r.t * r.k;
    let m = r.ids.len;
    let staged = {
        let st = be.staging.0.lock().unwrap_or_else(|p| p.into_inner());
        match st.as_ref() {
            // No routing was staged since this one: its copy is the one in flight.
            Some(s) if r.staged != 0 && r.staged == s.gen => {
                be.dev.event_sync(&s.ev).map_err(ce)?;
                let b: &[f32] = bytemuck::cast_slice(&s.pinned.as_slice()[..(m + n) * 4]);
                Some((b[..m].to_vec(), b[m..m + n].to_vec()))
            }
            _ => None,
        }
    };
    let (mut ids, mut weights) = if let Some(v) = staged {
        v
    } else if r.wts.ptr() == r.ids.ptr() + (m * 4) as u64 {
        // Back to back (`alloc_routes`): one read, one wait.
        let mut both = be.download(&r.ids.view(0, m + r.wts.len))?;
        let w = both.split_off(m);
        (both, w)
    } else {
        (be.download(&r.ids)?, be.download(&r.wts)?)
    };
    ids.truncate(n);
    weights.truncate(n);
    Ok(Routes {
        k: r.k,
        // router_topk writes the ids as i32 into the f32 buffer.
        ids: ids.iter().map(|v| v.to_bits()).collect(),
        weights,
    })
}

pub(super) fn experts(
    be: &Cuda,
    call: ExpertCall<'_>,
    x: &CudaBuf,
    routes: &CudaRoutes,
    host: Option<&Routes>,
    out: &mut CudaBuf,
) -> Result<ExpertTimes> {
    let owned;
    let host = match host {
        Some(h) => h,
        None => {
            owned = routes_host(be, routes)?;
            &owned
        }
    };
    let t = host.tokens();
    let h = x.len.checked_div(t).unwrap_or(0);
    room("moe_experts", "out", out, t * h)?;
    let dev = be.bind()?;
    if out.len > 0 {
        dev.memset_async(out.ptr(), out.len * 4).map_err(ce)?;
    }
    let used = host.used();
    let t0 = Instant::now();
    let ws = call.source.fetch(call.layer, &used)?;
    let wait = t0.elapsed();
    let t1 = Instant::now();
    // Kept until the work queued over them is done.
    let mut keep: Vec<CudaBuf> = Vec::new();
    let mut mats = Vec::new();
    for (&e, w) in used.iter().zip(&ws) {
        let toks = host.tokens_of(e);
        let nr = toks.len();
        let rows: Vec<f32> = toks
            .iter()
            .map(|&(ti, _)| f32::from_bits(ti as u32))
            .collect();
        let wts: Vec<f32> = toks.iter().map(|&(_, w)| w).collect();
        let (rb, wb) = (be.upload(&rows)?, be.upload(&wts)?);
        let (g, u, d) = (
            be.upload_mat(&w.gate)?,
            be.upload_mat(&w.up)?,
            be.upload_mat(&w.down)?,
        );
        let inter = g.m.rows;
        let mut xg = be.buf(nr * h)?;
        ops::gather_rows(dev, x.ptr(), h, rb.ptr(), nr, h, xg.ptr()).map_err(ce)?;
        xg.len = nr * h;
        let (mut gb, mut ub, mut hb, mut yb) = (
            be.buf(nr * inter)?,
            be.buf(nr * inter)?,
            be.buf(nr * inter)?,
            be.buf(nr * h)?,
        );
        be.matmul(&g, &xg, nr, &mut gb)?;
        be.matmul(&u, &xg, nr, &mut ub)?;
        be.swiglu(&gb, &ub, &mut hb)?;
        be.matmul(&d, &hb, nr, &mut yb)?;
        let (op, rp, wp, yp) = (out.ptr(), rb.ptr(), wb.ptr(), yb.ptr());
        ops::scatter_add_rows(dev, op, h, rp, wp, nr, h, yp).map_err(ce)?;
        keep.extend([rb, wb, xg, gb, ub, hb, yb]);
        mats.extend([g, u, d]);
    }
    dev.sync().map_err(ce)?;
    drop((keep, mats));
    Ok(ExpertTimes {
        wait,
        compute: t1.elapsed(),
    })
}

pub(super) fn combine(
    be: &Cuda,
    x: &mut CudaBuf,
    routed: &CudaBuf,
    shared: Option<&CudaBuf>,
    shared_gate: Option<&CudaBuf>,
) -> Result<()> {
    let dev = be.bind()?;
    let t = shared_gate.map_or(1, |g| g.len).max(1);
    let h = x.len / t;
    room("moe_combine", "routed", routed, x.len)?;
    if x.len == 0 {
        return Ok(());
    }
    if t == 1 || shared_gate.is_none() {
        // One kernel: x += routed + sigmoid(gate) * shared (one gate: one token, or none).
        let ys = match shared {
            Some(s) => {
                room("moe_combine", "shared", s, x.len)?;
                s.ptr()
            }
            None => 0,
        };
        let sg = shared_gate.map_or(0, |g| g.ptr());
        let (xp, rp) = (x.ptr(), routed.ptr());
        return ops::moe_combine(dev, xp, 0, 0, 0, ys, sg, rp, x.len).map_err(ce);
    }
    ops::add_rows_gated(dev, x.ptr(), routed.ptr(), 0, 0, 1, x.len).map_err(ce)?;
    if let Some(s) = shared {
        room("moe_combine", "shared", s, x.len)?;
        let sg = shared_gate.map_or(0, |g| g.ptr());
        ops::add_rows_gated(dev, x.ptr(), s.ptr(), sg, 1, t, h).map_err(ce)?;
    }
    Ok(())
}
