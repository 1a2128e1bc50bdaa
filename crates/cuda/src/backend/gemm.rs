//! [`Cuda`]'s prompt products on the tensor cores ([`crate::gemm`]): `matmul` and
//! `matmul_many` of T > 1 rows (one staged x, one launch for every matrix of one format and
//! width), and a prompt's routed experts over VRAM slots as one launch per product for all the
//! experts together: x staged once with each expert's rows gathered, one gate‖up launch over
//! every expert (a device table of products), one SwiGLU over all rows, one down launch, and
//! one per-token combine adding each token's weighted rows in expert order (no scatter
//! conflicts, so the sum's order is fixed). Where the GEMM does not apply (dense matrices,
//! pre-sm_80 GPUs, shapes it does not take) the callers keep the `mm` kernel.
use flashmoe_core::backend::{Backend, Routes};
use flashmoe_core::residency::SlotLayout;
use flashmoe_core::Result;

use super::slots::CudaSlots;
use super::{ce, Cuda, CudaBuf};
use crate::gemm::{self, GemmProb};
use crate::ops::{self, DevMat, Fmt};

/// Gathered expert rows per pass of [`Cuda::gemm_experts`] (bounds its scratch: staged x,
/// gate‖up, hidden and output rows, about 50 MB each at 4096 columns).
const ROWS_PER_PASS: usize = 4096;

fn group_log(m: &DevMat) -> u32 {
    match m.fmt {
        Fmt::Affine { lg, .. } => lg,
        Fmt::Dense(_) => 0,
    }
}

/// A product table as f32 bit patterns (what `Backend::upload` takes).
fn words(ps: &[GemmProb]) -> Vec<f32> {
    ps.iter()
        .flat_map(|p| p.words())
        .map(f32::from_bits)
        .collect()
}

impl Cuda {
    /// `ys[i][n] = W_i x[n]` for `t > 1` rows of x at `x` (rows of `ws[0].cols`) through the
    /// GEMM, when every matrix fits it and they share format and width: one staged x, one
    /// launch. False (nothing queued) when it does not apply.
    pub(super) fn gemm_products(
        &self,
        ws: &[&DevMat],
        x: u64,
        t: usize,
        ys: &[u64],
    ) -> Result<bool> {
        let Some(m0) = ws.first() else {
            return Ok(false);
        };
        let dev = self.bind()?;
        let same = |m: &&DevMat| m.fmt == m0.fmt && m.cols == m0.cols && gemm::fits(dev, m);
        if t < 2 || ws.len() != ys.len() || !ws.iter().all(same) {
            return Ok(false);
        }
        let xq = self.buf(gemm::staged_len(t, m0.cols, group_log(m0)))?;
        gemm::stage_x(dev, m0, x, m0.cols, 0, t, xq.ptr()).map_err(ce)?;
        let probs: Vec<GemmProb> = ws
            .iter()
            .zip(ys)
            .map(|(m, &y)| GemmProb {
                w: m.w,
                s: m.s,
                b: m.b,
                y,
                rows: m.rows as i32,
                ldy: m.rows as i32,
                ntok: t as i32,
                x0: 0,
            })
            .collect();
        gemm::products(dev, m0, &probs, xq.ptr(), t).map_err(ce)?;
        Ok(true)
    }

    /// A prompt's experts `experts[j]` (in slots `ids[j]`) over their tokens of `hr`, added to
    /// `out` (see the module doc), in passes of at most [`ROWS_PER_PASS`] gathered rows. False
    /// (nothing queued) when the slots' matrices do not fit the GEMM.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_experts(
        &self,
        layout: &SlotLayout,
        slots: &CudaSlots,
        hr: &Routes,
        experts: &[usize],
        ids: &[usize],
        x: &CudaBuf,
        out: &mut CudaBuf,
    ) -> Result<bool> {
        let dev = self.bind()?;
        let Some(&s0) = ids.first() else {
            return Ok(true);
        };
        let (gu0, dn0) = slots.mats(s0, layout)?;
        if !gemm::fits(dev, &gu0) || !gemm::fits(dev, &dn0) {
            return Ok(false);
        }
        let (h, i) = (layout.hidden, layout.inter);
        let t = hr.tokens();
        let per: Vec<Vec<(usize, f32)>> = experts.iter().map(|&e| hr.tokens_of(e)).collect();
        // Token passes whose gathered rows stay within the bound (each token has <= k rows).
        let step = (ROWS_PER_PASS / hr.k.max(1)).max(1);
        for t0 in (0..t).step_by(step) {
            let t1 = (t0 + step).min(t);
            // Rows in expert order: (slot, the expert's tokens in this pass with weights).
            let mut rows_of: Vec<(usize, Vec<(usize, f32)>)> = Vec::new();
            for (toks, &s) in per.iter().zip(ids) {
                let v: Vec<(usize, f32)> = toks
                    .iter()
                    .copied()
                    .filter(|&(ti, _)| ti >= t0 && ti < t1)
                    .collect();
                if !v.is_empty() {
                    rows_of.push((s, v));
                }
            }
            self.gemm_experts_pass(layout, slots, &rows_of, (t0, t1), x, out, (h, i))?;
        }
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_experts_pass(
        &self,
        layout: &SlotLayout,
        slots: &CudaSlots,
        rows_of: &[(usize, Vec<(usize, f32)>)],
        (t0, t1): (usize, usize),
        x: &CudaBuf,
        out: &mut CudaBuf,
        (h, i): (usize, usize),
    ) -> Result<()> {
        let dev = self.bind()?;
        let total: usize = rows_of.iter().map(|(_, v)| v.len()).sum();
        if total == 0 {
            return Ok(());
        }
        let nt = t1 - t0;
        // Per token of the pass, its gathered rows and weights in expert order.
        let mut back: Vec<Vec<(usize, f32)>> = vec![Vec::new(); nt];
        let mut src = Vec::with_capacity(total);
        let (gue, he, ye) = (
            self.buf(total * 2 * i)?,
            self.buf(total * i)?,
            self.buf(total * h)?,
        );
        let (mut tgu, mut tdn) = (Vec::new(), Vec::new());
        let mut most = 0;
        for (s, toks) in rows_of {
            let (gu, dn) = slots.mats(*s, layout)?;
            let x0 = src.len();
            for &(ti, w) in toks {
                back[ti - t0].push((src.len(), w));
                src.push(ti);
            }
            most = most.max(toks.len());
            let prob = |m: &DevMat, y: u64| GemmProb {
                w: m.w,
                s: m.s,
                b: m.b,
                y,
                rows: m.rows as i32,
                ldy: m.rows as i32,
                ntok: toks.len() as i32,
                x0: x0 as i32,
            };
            tgu.push(prob(&gu, gue.at(x0 * 2 * i)));
            tdn.push(prob(&dn, ye.at(x0 * h)));
        }
        let kk = back.iter().map(Vec::len).max().unwrap_or(0);
        // One upload: the product tables (8-byte aligned at the front), the gathered rows'
        // token ids, and per token its rows and weights (-1 / 0 past its count).
        let mut meta = words(&tgu);
        meta.extend(words(&tdn));
        let tbl_floats = meta.len();
        meta.extend(src.iter().map(|&ti| f32::from_bits(ti as u32)));
        let idx_at = meta.len();
        for b in &back {
            meta.extend(
                (0..kk).map(|j| f32::from_bits(b.get(j).map_or(-1i32, |r| r.0 as i32) as u32)),
            );
        }
        let w_at = meta.len();
        for b in &back {
            meta.extend((0..kk).map(|j| b.get(j).map_or(0.0, |r| r.1)));
        }
        let meta = self.upload(&meta)?;
        let (gu0, dn0) = slots.mats(rows_of[0].0, layout)?;
        let n = rows_of.len();
        let xq = self.buf(gemm::staged_len(total, h, group_log(&gu0)))?;
        gemm::stage_x(dev, &gu0, x.ptr(), h, meta.at(tbl_floats), total, xq.ptr()).map_err(ce)?;
        gemm::products_table(dev, &gu0, meta.ptr(), n, 2 * i, most, xq.ptr(), total).map_err(ce)?;
        ops::swiglu(dev, gue.ptr(), he.ptr(), i, total, None).map_err(ce)?;
        let hq = self.buf(gemm::staged_len(total, i, group_log(&dn0)))?;
        gemm::stage_x(dev, &dn0, he.ptr(), i, 0, total, hq.ptr()).map_err(ce)?;
        let tdn_at = meta.at(tbl_floats / 2);
        gemm::products_table(dev, &dn0, tdn_at, n, h, most, hq.ptr(), total).map_err(ce)?;
        let (op, yp) = (out.at(t0 * h), ye.ptr());
        gemm::rows_combine(dev, op, yp, meta.at(idx_at), meta.at(w_at), kk, nt, h).map_err(ce)?;
        Ok(())
    }
}
