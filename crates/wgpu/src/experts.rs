//! The routed experts of one MoE layer (arch-spec §7) in five dispatches whatever k: the
//! used experts' gate, up and down matrices are fetched from the [`ExpertSource`], laid side
//! by side in one upload, and each product runs as one batch of (expert, token) jobs
//! (`expert.wgsl`); SwiGLU between, and the weighted sum in ascending expert id (`esum.wgsl`).
//!
//! This is the path of experts uploaded on use; experts kept on the device are slots.rs's.
//! Whether the device computes the shared expert while the host reads is [`Wgpu::overlap`]
//! (serial by default; the field says why).
use std::time::Instant;

use flashmoe_core::backend::{Backend, ExpertCall, ExpertTimes, Routes};
use flashmoe_core::error::Result;
use flashmoe_core::experts::ExpertWeights;
use flashmoe_core::weights::Linear;

use crate::device::{grid, Wgpu};
use crate::mat::{format_words, parts_of, row_bytes};
use crate::op_err;
use crate::ops::GBuf;
use crate::shaders::FastKind;

/// Where one matrix landed in the packed upload: data base (format units), scales base
/// (elements).
#[derive(Clone, Copy, Default)]
struct At {
    w: u32,
    s: u32,
}

/// Where the data, scales and biases of each matrix go in the packed upload (the bytes are
/// copied once, into the upload's mapped memory, by [`Pack::upload`]).
#[derive(Default)]
struct Pack<'a> {
    /// (bytes, offset) per array: data, scales, biases.
    parts: [Vec<(&'a [u8], usize)>; 3],
    /// Bytes of each array so far.
    len: [usize; 3],
}

impl<'a> Pack<'a> {
    /// Appends `m` (its data on 16 bytes: the fast products read 16-byte chunks; scales and
    /// biases on a word) and says where it landed.
    fn push(&mut self, m: &'a Linear) -> At {
        let (wu, su) = units(m);
        let (d, s, b) = parts_of(m);
        let (rb, sb) = row_bytes(m);
        let at = At {
            w: (self.len[0] / wu) as u32,
            s: (self.len[1] / su) as u32,
        };
        let bytes = [
            &d[..m.rows() * rb],
            &s[..m.rows() * sb],
            &b[..m.rows() * sb],
        ];
        for (i, x) in bytes.into_iter().enumerate() {
            self.parts[i].push((x, self.len[i]));
            self.len[i] = (self.len[i] + x.len()).next_multiple_of(if i == 0 { 16 } else { 4 });
        }
        at
    }

    /// The three arrays on the device.
    fn upload(&self, be: &Wgpu) -> Result<[wgpu::Buffer; 3]> {
        let one = |i: usize| -> Result<wgpu::Buffer> {
            let size = self.len[i].max(16).next_multiple_of(4) as u64;
            be.count_buffer();
            let buf = be.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: crate::device::USAGE,
                mapped_at_creation: true,
            });
            {
                let mut view = buf
                    .get_mapped_range_mut(..)
                    .map_err(|e| op_err("moe_experts", format!("upload: {e:?}")))?;
                let mut w = view.slice(..);
                for &(x, at) in &self.parts[i] {
                    w.slice(at..at + x.len()).copy_from_slice(x);
                }
            }
            buf.unmap();
            Ok(buf)
        };
        Ok([one(0)?, one(1)?, one(2)?])
    }
}

/// Bytes per unit of the data (a word for affine, an element for dense) and of the scales.
fn units(m: &Linear) -> (usize, usize) {
    match m {
        Linear::Dense { dtype, .. } => (dtype.size(), 4),
        Linear::Affine { sdtype, .. } => (4, sdtype.size()),
    }
}

fn same_shape(
    kind: &str,
    ws: &[ExpertWeights],
    f: impl Fn(&ExpertWeights) -> &Linear,
) -> Result<[u32; 4]> {
    let m0 = f(&ws[0]);
    let fw = format_words(m0)?;
    for w in ws {
        let m = f(w);
        if format_words(m)? != fw || m.rows() != m0.rows() || m.cols() != m0.cols() {
            return Err(op_err(
                "moe_experts",
                format!("{kind} matrices of one layer differ in shape or format"),
            ));
        }
    }
    Ok(fw)
}

impl Wgpu {
    pub(crate) fn experts(
        &self,
        call: ExpertCall<'_>,
        x: &GBuf,
        host: &Routes,
        out: &mut GBuf,
    ) -> Result<ExpertTimes> {
        let op = "moe_experts";
        let (t, k) = (host.tokens(), host.k);
        if t == 0 {
            return Ok(ExpertTimes::default());
        }
        let h = x.len / t;
        if out.len < t * h {
            return Err(op_err(
                op,
                format!("out holds {}, {} needed", out.len, t * h),
            ));
        }
        let used = host.used();
        let start = Instant::now();
        let ws = call.source.fetch(call.layer, &used)?;
        let wait = start.elapsed();
        if ws.len() != used.len() {
            return Err(op_err(
                op,
                format!(
                    "layer {}: {} experts asked, {} came",
                    call.layer,
                    used.len(),
                    ws.len()
                ),
            ));
        }
        let fg = same_shape("gate", &ws, |w| &w.gate)?;
        let fu = same_shape("up", &ws, |w| &w.up)?;
        let fd = same_shape("down", &ws, |w| &w.down)?;
        let inter = ws[0].gate.rows();
        if ws[0].gate.cols() != h || ws[0].down.rows() != h || ws[0].down.cols() != inter {
            return Err(op_err(
                op,
                format!("expert shapes do not fit a hidden size of {h}"),
            ));
        }
        let mut pack = Pack::default();
        let at: Vec<[At; 3]> = ws
            .iter()
            .map(|w| [pack.push(&w.gate), pack.push(&w.up), pack.push(&w.down)])
            .collect();
        let [wb, sb, bb] = pack.upload(self)?;
        // Pairs (token, expert) in token order, each token's experts ascending.
        let mut pairs: Vec<(usize, usize, f32)> = Vec::with_capacity(t * k);
        for ti in 0..t {
            let mut r: Vec<(u32, f32)> = (0..k)
                .map(|j| (host.ids[ti * k + j], host.weights[ti * k + j]))
                .collect();
            r.sort_by_key(|e| e.0);
            for (e, wt) in r {
                let slot = used
                    .binary_search(&(e as usize))
                    .map_err(|_| op_err(op, "routed expert not fetched"))?;
                pairs.push((ti, slot, wt));
            }
        }
        let np = pairs.len();
        let jobs = |m: usize, xrow: &dyn Fn(usize) -> usize, yoff: usize| -> Vec<u32> {
            pairs
                .iter()
                .enumerate()
                .flat_map(|(p, &(_, e, _))| {
                    [at[e][m].w, at[e][m].s, xrow(p) as u32, (yoff + p) as u32]
                })
                .collect()
        };
        let tok = |p: usize| pairs[p].0;
        let gu = self.buffer((2 * np * inter * 4) as u64);
        for (m, fw, yoff) in [(0, fg, 0), (1, fu, np)] {
            let jb = self.buffer_with(bytemuck::cast_slice(&jobs(m, &tok, yoff)));
            self.batch(
                fw,
                inter,
                h,
                np,
                [&wb, &sb, &bb],
                0,
                &x.buf,
                &gu,
                &jb,
                false,
            )?;
        }
        let hid = self.swiglu_pairs(np, inter, &gu)?;
        let d = self.buffer((np * h * 4) as u64);
        let jb = self.buffer_with(bytemuck::cast_slice(&jobs(2, &|p| p, 0)));
        self.batch(
            fd,
            h,
            inter,
            np,
            [&wb, &sb, &bb],
            0,
            &hid.buf,
            &d,
            &jb,
            false,
        )?;
        let table: Vec<u32> = pairs
            .iter()
            .enumerate()
            .flat_map(|(p, &(_, _, wt))| [p as u32, wt.to_bits()])
            .collect();
        let tb = self.buffer_with(bytemuck::cast_slice(&table));
        self.esum(&d, &tb, h, k, t, out, false)?;
        Ok(ExpertTimes {
            wait,
            compute: start.elapsed().saturating_sub(wait),
        })
    }

    /// `hid [np, inter] = silu(gu[..np]) * gu[np..]` of the gate and up products `gu [2np,
    /// inter]`.
    pub(crate) fn swiglu_pairs(&self, np: usize, inter: usize, gu: &wgpu::Buffer) -> Result<GBuf> {
        // Pooled, not cleared (written whole): no buffer made per layer.
        let hid = self.scratch(np * inter)?;
        let (g, _) = grid((np * inter).div_ceil(64));
        self.dispatch(
            "ew",
            &[2, (np * inter) as u32, 0, (np * inter) as u32],
            &[(1, &hid.buf), (2, gu), (3, gu), (4, gu)],
            g,
        )?;
        Ok(hid)
    }

    /// `out [t, h] (+)= Σ w · d[pair]` over `table [t, k]` of (pair, weight bits) per token,
    /// in the table's order (ascending expert id); added to `out` with `add`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn esum(
        &self,
        d: &wgpu::Buffer,
        table: &wgpu::Buffer,
        h: usize,
        k: usize,
        t: usize,
        out: &GBuf,
        add: bool,
    ) -> Result<()> {
        let (g, _) = grid((t * h).div_ceil(64));
        self.dispatch(
            "esum",
            &[h as u32, k as u32, (t * h) as u32, add as u32],
            &[(1, d), (2, table), (3, &out.buf)],
            g,
        )
    }

    /// One dispatch of `jobs` products of a `[rows, cols]` matrix (`expert.wgsl`, or
    /// `fast_expert.wgsl` where [`Wgpu::fast_for`] says): weights, scales and biases in `wsb`
    /// (one buffer thrice for slots, the biases `bdelta` elements after the scales). `keep`:
    /// the bind group is kept (slots), not for weights uploaded for this call alone.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn batch(
        &self,
        m: [u32; 4],
        rows: usize,
        cols: usize,
        jobs: usize,
        [w, s, b]: [&wgpu::Buffer; 3],
        bdelta: u32,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        j: &wgpu::Buffer,
        keep: bool,
    ) -> Result<()> {
        let (name, per) = match self.fast_for(m, cols).map(|f| f.for_product(m, 1)) {
            Some(f) => (f.key(FastKind::Expert, m, 1), f.rows_per_group()),
            None => {
                let (n, per) = self.product_kernel("expert");
                (n.to_string(), per)
            }
        };
        let (mut g, gx) = grid(rows.div_ceil(per));
        let most = self.limits.max_compute_workgroups_per_dimension as usize;
        let mut j0 = 0;
        while j0 < jobs {
            let n = most.min(jobs - j0);
            g[2] = n as u32;
            let mut params = m.to_vec();
            params.extend([rows, cols, jobs, gx as usize, bdelta as usize, j0].map(|v| v as u32));
            let bufs = [(1, w), (2, s), (3, b), (4, x), (5, y), (6, j)];
            if keep {
                self.dispatch(&name, &params, &bufs, g)?;
            } else {
                self.dispatch_once(&name, &params, &bufs, g)?;
            }
            j0 += n;
        }
        Ok(())
    }
}
