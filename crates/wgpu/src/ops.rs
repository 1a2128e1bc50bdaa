//! [`Backend`] for [`Wgpu`]: each op checks its shapes, then records its kernel (see
//! `shaders/`); nothing waits for the device except the read-backs the contract names
//! (`download`, `routes_host`, `argmax`).
use std::borrow::Cow;
use std::sync::Arc;

use flashmoe_core::backend::{AttnShape, Backend, ExpertCall, ExpertTimes, GdnShape, Routes};
use flashmoe_core::error::{Error, Result};
use flashmoe_core::weights::Linear;

use crate::device::{grid, Products, Wgpu};
use crate::mat::GMat;
use crate::op_err;
use crate::pool::Pool;
use crate::shaders::{Fast, FastKind};

/// f32 elements on the device; `len` of them are in use (a KV cache grows within the
/// buffer's capacity).
pub struct GBuf {
    pub(crate) buf: wgpu::Buffer,
    pub(crate) len: usize,
    /// Where the buffer goes when this is dropped.
    pool: Option<Arc<Pool>>,
}

impl Drop for GBuf {
    fn drop(&mut self) {
        if let Some(p) = &self.pool {
            p.put(self.buf.clone());
        }
    }
}

impl GBuf {
    fn cap(&self) -> usize {
        self.buf.size() as usize / 4
    }
}

/// Routing on the device: `ids, weights [t, k]`.
pub struct GRoutes {
    pub(crate) t: usize,
    pub(crate) k: usize,
    pub(crate) ids: wgpu::Buffer,
    pub(crate) weights: wgpu::Buffer,
}

fn need(op: &'static str, what: &str, have: usize, want: usize) -> Result<()> {
    if have < want {
        return Err(op_err(
            op,
            format!("{what} holds {have} elements, {want} needed"),
        ));
    }
    Ok(())
}

fn f(x: f32) -> u32 {
    x.to_bits()
}

/// The fast products' configuration for a one-token product of `rows` rows: where `f` would
/// give it fewer than 32 workgroups (a router, a gate of a few rows), 64 lanes per row
/// summing through workgroup memory, so that each lane's loop is short (the H100 took 44 us
/// per launch of the 64-row routers and 1-row gates at 8 bits with 32 lanes on four rows,
/// and 20-27 us with 32 lanes on eight, 2026-12-07). `max_wgs`: the adapter's most
/// invocations per workgroup.
fn small_rows(f: Fast, rows: usize, t: usize, max_wgs: u32) -> Fast {
    let small = Fast {
        lg: 64,
        wgs: 256,
        r: 1,
        subgroup: false,
        form: f.form,
        lean: f.lean,
    };
    let few = rows.div_ceil(f.rows_per_group()) < 32;
    if t == 1 && few && small.wgs <= max_wgs && small.valid() {
        small
    } else {
        f
    }
}

/// Workgroups of 64 threads covering `n` elements.
fn elems(n: usize) -> ([u32; 3], u32) {
    grid(n.div_ceil(64))
}

impl Wgpu {
    #[allow(clippy::too_many_arguments)]
    fn ew(
        &self,
        op: u32,
        n: usize,
        a: &GBuf,
        b: &wgpu::Buffer,
        c: &wgpu::Buffer,
        g: &wgpu::Buffer,
        extra: [u32; 4],
    ) -> Result<()> {
        let (gr, _) = elems(n);
        self.dispatch(
            "ew",
            &[op, n as u32, extra[0], extra[1], extra[2], extra[3]],
            &[(1, &a.buf), (2, b), (3, c), (4, g)],
            gr,
        )
    }

    fn norm(&self, x: &GBuf, w: &GBuf, z: Option<&GBuf>, eps: f32, out: &mut GBuf) -> Result<()> {
        let n = w.len;
        let op = if z.is_some() {
            "gated_rmsnorm"
        } else {
            "rmsnorm"
        };
        if n == 0 || !x.len.is_multiple_of(n) {
            return Err(op_err(op, format!("{} elements in rows of {n}", x.len)));
        }
        need(op, "out", out.len, x.len)?;
        if let Some(z) = z {
            need(op, "z", z.len, x.len)?;
        }
        let rows = x.len / n;
        let (mut g, gx) = grid(rows);
        // Slices of 1024 outputs (norm.wgsl's SW).
        g[2] = n.div_ceil(1024) as u32;
        self.dispatch(
            "norm",
            &[n as u32, rows as u32, f(eps), z.is_some() as u32, gx],
            &[
                (1, &x.buf),
                (2, &w.buf),
                (3, &z.unwrap_or(x).buf),
                (4, &out.buf),
            ],
            g,
        )
    }

    /// `y [t, rows] = x [t, cols] W^T` from row `xrow0` of `x` (in rows of `cols`).
    pub(crate) fn matmul_at(
        &self,
        w: &GMat,
        x: &wgpu::Buffer,
        t: usize,
        y: &wgpu::Buffer,
    ) -> Result<()> {
        let tb = if t == 1 { 1 } else { 8 };
        let fast = self
            .fast_for(w.m, w.cols)
            .map(|f| {
                small_rows(
                    f,
                    w.rows,
                    t,
                    self.limits.max_compute_invocations_per_workgroup,
                )
            })
            .map(|f| f.for_product(w.m, tb));
        let (name, per) = match fast {
            Some(f) => (f.key(FastKind::Matmul, w.m, tb), f.rows_per_group()),
            None => {
                let (n, per) = self.product_kernel("matmul");
                (n.to_string(), per)
            }
        };
        let tb = if fast.is_some() { tb as usize } else { 8 };
        for p in &w.parts {
            let (mut g, gx) = grid(p.rows.div_ceil(per));
            g[2] = t.div_ceil(tb) as u32;
            let mut params = w.m.to_vec();
            params.extend([p.rows, w.cols, t, p.row0, w.rows].map(|v| v as u32));
            params.push(gx);
            let sb = |b: &Option<wgpu::Buffer>| b.as_ref().map_or(0, |b| b.size());
            self.note_bytes(p.w.size() + sb(&p.s) + sb(&p.b));
            self.dispatch(
                &name,
                &params,
                &[
                    (1, &p.w),
                    (2, p.s.as_ref().unwrap_or(&self.dummy)),
                    (3, p.b.as_ref().unwrap_or(&self.dummy)),
                    (4, x),
                    (5, y),
                ],
                g,
            )?;
        }
        Ok(())
    }

    /// The product kernel `base` or its one-thread-per-row twin, and rows per workgroup.
    pub(crate) fn product_kernel(&self, base: &'static str) -> (&'static str, usize) {
        match (base, self.products) {
            ("matmul", Products::PerThread) => ("matmul_rows", 64),
            ("expert", Products::PerThread) => ("expert_rows", 64),
            (b, _) => (b, 1),
        }
    }

    /// The fast products' configuration for a matrix of format words `m` and `cols` columns:
    /// where this backend runs them and the matrix is affine with rows of whole 16-byte
    /// chunks (four words of codes).
    pub(crate) fn fast_for(&self, m: [u32; 4], cols: usize) -> Option<Fast> {
        match self.products {
            Products::Fast(f) if m[0] == 3 && cols.is_multiple_of(128 / m[1] as usize) => Some(f),
            _ => None,
        }
    }

    /// The routing read back to the host: ids and weights through one wait.
    pub(crate) fn read_routes(&self, r: &GRoutes) -> Result<Routes> {
        let n = (r.t * r.k) as u64 * 4;
        let both = self.buffer(2 * n);
        self.copy(&r.ids, 0, &both, 0, n)?;
        self.copy(&r.weights, 0, &both, n, n)?;
        let bytes = self.read(&both, 2 * n)?;
        let (ids, weights) = bytes.split_at(n as usize);
        Ok(Routes {
            k: r.k,
            ids: bytemuck::pod_collect_to_vec(ids),
            weights: bytemuck::pod_collect_to_vec(weights),
        })
    }

    /// The buffer of `b` with room for `n` elements, keeping its first `b.len`.
    fn grow(&self, b: &mut GBuf, n: usize) -> Result<()> {
        if n <= b.cap() {
            return Ok(());
        }
        let cap = n.max(b.cap() * 2);
        let nb = self.buffer(cap as u64 * 4);
        self.copy(&b.buf, 0, &nb, 0, b.len as u64 * 4)?;
        b.buf = nb;
        Ok(())
    }
}

impl Backend for Wgpu {
    type Buf = GBuf;
    type Mat = GMat;
    type Routes = GRoutes;

    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn alloc(&self, n: usize) -> Result<GBuf> {
        let size = (n as u64 * 4).max(16).next_multiple_of(4);
        let buf = match self.pool.take(size) {
            Some(b) => {
                self.clear(&b, size)?;
                b
            }
            None => self.buffer(size),
        };
        Ok(GBuf {
            buf,
            len: n,
            pool: Some(self.pool.clone()),
        })
    }
    /// A pooled buffer without the clear `alloc` records on reuse: the op writes it whole.
    fn scratch(&self, n: usize) -> Result<GBuf> {
        let size = (n as u64 * 4).max(16).next_multiple_of(4);
        let buf = match self.pool.take(size) {
            Some(b) => b,
            None => self.buffer(size),
        };
        Ok(GBuf {
            buf,
            len: n,
            pool: Some(self.pool.clone()),
        })
    }
    fn upload(&self, v: &[f32]) -> Result<GBuf> {
        Ok(GBuf {
            buf: self.buffer_with(bytemuck::cast_slice(v)),
            len: v.len(),
            pool: Some(self.pool.clone()),
        })
    }
    fn download(&self, b: &GBuf) -> Result<Vec<f32>> {
        let bytes = self.read(&b.buf, b.len as u64 * 4)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
    fn buf_len(&self, b: &GBuf) -> usize {
        b.len
    }
    fn copy_buf(&self, b: &GBuf) -> Result<GBuf> {
        let out = self.alloc(b.len)?;
        self.copy(&b.buf, 0, &out.buf, 0, b.len as u64 * 4)?;
        Ok(out)
    }
    fn upload_mat(&self, w: &Linear) -> Result<GMat> {
        self.mat(w)
    }
    fn mat_shape(&self, w: &GMat) -> (usize, usize) {
        (w.rows, w.cols)
    }
    fn alloc_routes(&self, t: usize, k: usize) -> Result<GRoutes> {
        Ok(GRoutes {
            t,
            k,
            ids: self.buffer((t * k) as u64 * 4),
            weights: self.buffer((t * k) as u64 * 4),
        })
    }

    fn matmul(&self, w: &GMat, x: &GBuf, t: usize, y: &mut GBuf) -> Result<()> {
        need("matmul", "x", x.len, t * w.cols)?;
        need("matmul", "y", y.len, t * w.rows)?;
        self.matmul_at(w, &x.buf, t, &y.buf)
    }

    fn embed(&self, table: &GMat, ids: &[u32], out: &mut GBuf) -> Result<()> {
        need("embed", "out", out.len, ids.len() * table.cols)?;
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= table.rows) {
            return Err(op_err(
                "embed",
                format!("id {id} of a {}-row table", table.rows),
            ));
        }
        for p in &table.parts {
            let pairs: Vec<u32> = ids
                .iter()
                .enumerate()
                .filter(|(_, &id)| (p.row0..p.row0 + p.rows).contains(&(id as usize)))
                .flat_map(|(ti, &id)| [ti as u32, id - p.row0 as u32])
                .collect();
            if pairs.is_empty() {
                continue;
            }
            let n = pairs.len() / 2;
            let ib = self.buffer_with(bytemuck::cast_slice(&pairs));
            let (g, _) = elems(n * table.cols);
            let mut params = table.m.to_vec();
            params.extend([table.cols as u32, n as u32]);
            self.dispatch(
                "embed",
                &params,
                &[
                    (1, &p.w),
                    (2, p.s.as_ref().unwrap_or(&self.dummy)),
                    (3, p.b.as_ref().unwrap_or(&self.dummy)),
                    (4, &ib),
                    (5, &out.buf),
                ],
                g,
            )?;
        }
        Ok(())
    }

    fn rmsnorm(&self, x: &GBuf, w: &GBuf, eps: f32, out: &mut GBuf) -> Result<()> {
        self.norm(x, w, None, eps, out)
    }

    /// One dispatch instead of the add's and the norm's. Every workgroup of a row reads all of
    /// x, so the sum cannot be written back into x: it goes to a fresh buffer that becomes x.
    fn add_rmsnorm(
        &self,
        x: &mut GBuf,
        d: &GBuf,
        w: &GBuf,
        eps: f32,
        out: &mut GBuf,
    ) -> Result<()> {
        let n = w.len;
        if n == 0 || !x.len.is_multiple_of(n) {
            return Err(op_err(
                "add_rmsnorm",
                format!("{} elements in rows of {n}", x.len),
            ));
        }
        need("add_rmsnorm", "d", d.len, x.len)?;
        need("add_rmsnorm", "out", out.len, x.len)?;
        let rows = x.len / n;
        let mut sum = self.scratch(x.len)?;
        let (mut g, gx) = grid(rows);
        // Slices of 1024 outputs (norm.wgsl's SW).
        g[2] = n.div_ceil(1024) as u32;
        self.dispatch(
            "add_norm",
            &[n as u32, rows as u32, f(eps), 0, gx],
            &[
                (1, &x.buf),
                (2, &w.buf),
                (3, &d.buf),
                (4, &out.buf),
                (5, &sum.buf),
            ],
            g,
        )?;
        // The old x goes back to the pool; the queue orders its reuse after this dispatch.
        std::mem::swap(x, &mut sum);
        Ok(())
    }

    fn add(&self, x: &mut GBuf, d: &GBuf) -> Result<()> {
        need("add", "d", d.len, x.len)?;
        self.ew(0, x.len, x, &d.buf, &d.buf, &d.buf, [0; 4])
    }

    fn copy_rows(
        &self,
        src: &GBuf,
        width: usize,
        row0: usize,
        n: usize,
        dst: &mut GBuf,
    ) -> Result<()> {
        need("copy_rows", "src", src.len, (row0 + n) * width)?;
        need("copy_rows", "dst", dst.len, n * width)?;
        self.copy(
            &src.buf,
            (row0 * width * 4) as u64,
            &dst.buf,
            0,
            (n * width * 4) as u64,
        )
    }

    fn qk_norm_rope(
        &self,
        qg: &GBuf,
        k: &mut GBuf,
        q_norm: &GBuf,
        k_norm: &GBuf,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        q: &mut GBuf,
        gate: &mut GBuf,
    ) -> Result<()> {
        let op = "qk_norm_rope";
        need(op, "qg", qg.len, t * s.q_rows())?;
        need(op, "k", k.len, t * s.kv_width())?;
        need(op, "q", q.len, t * s.o_width())?;
        if s.gated {
            need(op, "gate", gate.len, t * s.o_width())?;
        }
        if s.head_dim > 512 || s.rotary_dim > s.head_dim || !s.rotary_dim.is_multiple_of(2) {
            return Err(op_err(
                op,
                format!("head_dim {} rotary {}", s.head_dim, s.rotary_dim),
            ));
        }
        // cos/sin of the angles in f64 from HF's f32 inv_freq (as the reference).
        let half = s.rotary_dim / 2;
        let mut cs = Vec::with_capacity(t * half * 2);
        for ti in 0..t {
            for d in 0..half {
                let inv = (1.0 / s.rope_theta.powf(2.0 * d as f64 / s.rotary_dim as f64)) as f32;
                let (sn, c) = ((pos0 + ti) as f64 * inv as f64).sin_cos();
                cs.extend([c as f32, sn as f32]);
            }
        }
        let csb = self.buffer_with(bytemuck::cast_slice(&cs));
        let groups = (t * (s.heads + s.kv_heads)) as u32;
        self.dispatch(
            "rope",
            &[
                s.heads as u32,
                s.kv_heads as u32,
                s.head_dim as u32,
                s.rotary_dim as u32,
                t as u32,
                s.gated as u32,
                f(s.eps),
            ],
            &[
                (1, &qg.buf),
                (2, &k.buf),
                (3, &q_norm.buf),
                (4, &k_norm.buf),
                (5, &csb),
                (6, &q.buf),
                (7, if s.gated { &gate.buf } else { &self.dummy }),
            ],
            [groups, 1, 1],
        )
    }

    fn attention(
        &self,
        q: &GBuf,
        k: &GBuf,
        v: &GBuf,
        kc: &mut GBuf,
        vc: &mut GBuf,
        s: &AttnShape,
        pos0: usize,
        t: usize,
        o: &mut GBuf,
    ) -> Result<()> {
        let op = "attention";
        let kvw = s.kv_width();
        if kc.len != pos0 * kvw || vc.len != pos0 * kvw {
            return Err(op_err(
                op,
                format!("KV cache of {} elements at position {pos0}", kc.len),
            ));
        }
        need(op, "q", q.len, t * s.o_width())?;
        need(op, "k", k.len, t * kvw)?;
        need(op, "v", v.len, t * kvw)?;
        need(op, "o", o.len, t * s.o_width())?;
        let n = (pos0 + t) * kvw;
        for (c, src) in [(&mut *kc, k), (&mut *vc, v)] {
            self.grow(c, n)?;
            self.copy(
                &src.buf,
                0,
                &c.buf,
                (pos0 * kvw * 4) as u64,
                (t * kvw * 4) as u64,
            )?;
            c.len = n;
        }
        // Scores of a chunk of tokens in scratch: at most 16M floats at a time.
        let maxn = pos0 + t;
        let chunk = (16 << 20) / (s.heads * maxn).max(1);
        let chunk = chunk.clamp(1, t.max(1));
        let scratch = self.buffer((chunk * s.heads * maxn * 4) as u64);
        let scale = f(1.0 / (s.head_dim as f64).sqrt() as f32);
        let mut t0 = 0;
        while t0 < t {
            let tn = chunk.min(t - t0);
            // Not kept: `scratch` (up to 64 MiB) is made for this call.
            self.dispatch_once(
                "attention",
                &[
                    s.heads as u32,
                    s.kv_heads as u32,
                    s.head_dim as u32,
                    pos0 as u32,
                    t0 as u32,
                    maxn as u32,
                    scale,
                ],
                &[
                    (1, &q.buf),
                    (2, &kc.buf),
                    (3, &vc.buf),
                    (4, &o.buf),
                    (5, &scratch),
                ],
                [(tn * s.heads) as u32, 1, 1],
            )?;
            t0 += tn;
        }
        Ok(())
    }

    fn gated_output(&self, o: &mut GBuf, gate: &GBuf) -> Result<()> {
        need("gated_output", "gate", gate.len, o.len)?;
        self.ew(1, o.len, o, &gate.buf, &gate.buf, &gate.buf, [0; 4])
    }

    fn gdn_conv(
        &self,
        mixed: &GBuf,
        state: &mut GBuf,
        conv_w: &GBuf,
        s: &GdnShape,
        t: usize,
        u: &mut GBuf,
    ) -> Result<()> {
        let op = "gdn_conv";
        let cd = s.conv_dim();
        if s.kconv < 1 || s.kconv > 16 {
            return Err(op_err(op, format!("conv kernel of {}", s.kconv)));
        }
        need(op, "mixed", mixed.len, t * cd)?;
        need(op, "state", state.len, s.conv_state_len())?;
        need(op, "conv_w", conv_w.len, cd * s.kconv)?;
        need(op, "u", u.len, t * cd)?;
        let (g, _) = elems(cd);
        self.dispatch(
            "conv",
            &[cd as u32, s.kconv as u32, t as u32],
            &[
                (1, &mixed.buf),
                (2, &state.buf),
                (3, &conv_w.buf),
                (4, &u.buf),
            ],
            g,
        )
    }

    fn gdn_recurrent(
        &self,
        u: &GBuf,
        b: &GBuf,
        a: &GBuf,
        dt_bias: &GBuf,
        neg_a: &GBuf,
        state: &mut GBuf,
        s: &GdnShape,
        t: usize,
        o: &mut GBuf,
    ) -> Result<()> {
        let op = "gdn_recurrent";
        if s.dk > 256 || s.nk == 0 || !s.nv.is_multiple_of(s.nk) {
            return Err(op_err(op, format!("nk {} nv {} dk {}", s.nk, s.nv, s.dk)));
        }
        need(op, "u", u.len, t * s.conv_dim())?;
        need(op, "b", b.len, t * s.nv)?;
        need(op, "a", a.len, t * s.nv)?;
        need(op, "state", state.len, s.state_len())?;
        need(op, "o", o.len, t * s.value_dim())?;
        self.dispatch(
            "delta",
            &[s.nk as u32, s.nv as u32, s.dk as u32, s.dv as u32, t as u32],
            &[
                (1, &u.buf),
                (2, &b.buf),
                (3, &a.buf),
                (4, &dt_bias.buf),
                (5, &neg_a.buf),
                (6, &state.buf),
                (7, &o.buf),
            ],
            // Blocks of 32 columns (delta.wgsl's COLS).
            [s.nv as u32, s.dv.div_ceil(32) as u32, 1],
        )
    }

    fn gated_rmsnorm(&self, o: &GBuf, z: &GBuf, w: &GBuf, eps: f32, y: &mut GBuf) -> Result<()> {
        self.norm(o, w, Some(z), eps, y)
    }

    fn swiglu(&self, g: &GBuf, u: &GBuf, out: &mut GBuf) -> Result<()> {
        need("swiglu", "g", g.len, out.len)?;
        need("swiglu", "u", u.len, out.len)?;
        self.ew(2, out.len, out, &g.buf, &u.buf, &g.buf, [0; 4])
    }

    fn router_topk(
        &self,
        logits: &GBuf,
        ne: usize,
        k: usize,
        renorm: bool,
        out: &mut GRoutes,
    ) -> Result<()> {
        let op = "router_topk";
        if ne == 0 || ne > 2048 || k == 0 || k > ne || !logits.len.is_multiple_of(ne) {
            return Err(op_err(
                op,
                format!("{k} of {ne} experts over {} logits", logits.len),
            ));
        }
        let t = logits.len / ne;
        if out.t * out.k < t * k {
            *out = self.alloc_routes(t, k)?;
        }
        out.t = t;
        out.k = k;
        // A workgroup per token.
        let (g, gx) = grid(t);
        self.dispatch(
            "topk",
            &[ne as u32, k as u32, t as u32, renorm as u32, gx],
            &[(1, &logits.buf), (2, &out.ids), (3, &out.weights)],
            g,
        )
    }

    fn routes_host<'a>(&self, r: &'a GRoutes, layer: usize) -> Result<Option<Cow<'a, Routes>>> {
        // A resident layer's batch looks the ids up on the device (`slots.rs`).
        if self.layer_resident(layer) {
            return Ok(None);
        }
        self.read_routes(r).map(|r| Some(Cow::Owned(r)))
    }

    fn moe_experts(
        &self,
        call: ExpertCall<'_>,
        x: &GBuf,
        routes: &GRoutes,
        host: Option<&Routes>,
        out: &mut GBuf,
    ) -> Result<ExpertTimes> {
        // The routing on the host, unless the tier runs the layer from the device's.
        let owned;
        let host = match host {
            Some(h) => Some(h),
            None if self.layer_resident(call.layer) => None,
            None => {
                owned = self.read_routes(routes)?;
                Some(&owned)
            }
        };
        // Reads follow (unless the layer is resident): start or finish the shared expert.
        if host.is_some() {
            self.before_reads()?;
        }
        let mut tier = self.tier.lock();
        match tier.as_mut() {
            Some(t) => t.run(self, call, x, routes, host, out),
            None => {
                drop(tier);
                let host = host.ok_or_else(|| op_err("moe_experts", "no routing"))?;
                self.experts(call, x, host, out)
            }
        }
    }

    fn moe_combine(
        &self,
        x: &mut GBuf,
        routed: &GBuf,
        shared: Option<&GBuf>,
        shared_gate: Option<&GBuf>,
    ) -> Result<()> {
        let op = "moe_combine";
        need(op, "routed", routed.len, x.len)?;
        let t = shared_gate.map_or(1, |g| g.len).max(1);
        if !x.len.is_multiple_of(t) {
            return Err(op_err(op, format!("{} elements over {t} tokens", x.len)));
        }
        if let Some(s) = shared {
            need(op, "shared", s.len, x.len)?;
        }
        let flags = shared.is_some() as u32 | (shared_gate.is_some() as u32) << 1;
        let d = &self.dummy;
        self.ew(
            3,
            x.len,
            x,
            &routed.buf,
            shared.map_or(d, |s| &s.buf),
            shared_gate.map_or(d, |g| &g.buf),
            [0, 0, (x.len / t) as u32, flags],
        )
    }

    fn argmax(&self, x: &GBuf) -> Result<u32> {
        let r = self.buffer(16);
        // Each workgroup of `argmax_part` takes 4096 values (argmax.wgsl's CHUNK).
        let parts = x.len.div_ceil(4096).max(1);
        let part = self.scratch(2 * parts)?;
        let params = [x.len as u32, parts as u32];
        // Each entry point's layout holds the bindings it uses.
        let bufs = [(1, &x.buf), (3, &part.buf)];
        self.dispatch("argmax_part", &params, &bufs, [parts as u32, 1, 1])?;
        self.dispatch("argmax", &params, &[(2, &r), (3, &part.buf)], [1, 1, 1])?;
        let v: Vec<u32> = bytemuck::pod_collect_to_vec(&self.read(&r, 8)?);
        // NONE (every value NaN) or an infinite largest value: no token to pick.
        if v[0] as usize >= x.len || !f32::from_bits(v[1]).is_finite() {
            return Err(Error::NonFiniteArgmax { pos: 0 });
        }
        Ok(v[0])
    }
}

#[cfg(test)]
mod small_rows_tests {
    use super::*;
    use crate::shaders::Form;

    /// Routers and gates (few rows) take 64 lanes a row at one token, where the adapter runs
    /// 256 invocations a workgroup; matrices of many rows, prompts and small adapters keep `f`.
    #[test]
    fn few_rows_take_wide_lane_groups() {
        let f = Fast {
            lg: 32,
            wgs: 128,
            r: 8,
            subgroup: true,
            form: Form::Decode { span: 1 },
            lean: true,
        };
        for rows in [1, 64, 512] {
            let s = small_rows(f, rows, 1, 1024);
            assert_eq!(
                (s.lg, s.wgs, s.r, s.subgroup),
                (64, 256, 1, false),
                "{rows}"
            );
            assert!(s.valid() && s.lean && s.form == f.form);
        }
        assert_eq!(small_rows(f, 4096, 1, 1024), f);
        assert_eq!(small_rows(f, 64, 8, 1024), f);
        assert_eq!(small_rows(f, 64, 1, 128), f);
    }
}
