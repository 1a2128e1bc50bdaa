//! Where each part of an expert sits inside a slot: [gate w ‖ up w], [gate s ‖ up s],
//! [gate b ‖ up b] (so gate and up are one `[2I, H]` matrix and one product), then down w, s,
//! b, each part 256-byte aligned. A middle-tier slot has the same layout, so it is copied to a
//! device slot in one transfer. CUDA's batched expert kernels read this layout
//! (`ExpertBatchArgs::off`); the host slots compute on views of it.
use crate::buf::Buf;
use crate::error::{Error, Result};
use crate::experts::ExpertWeights;
use crate::store::DType;
use crate::weights::Linear;

const ALIGN: usize = 256;

fn up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

/// The stored format of an expert's three matrices (all the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotFormat {
    Dense(DType),
    Affine {
        bits: u32,
        group: usize,
        sdtype: DType,
    },
}

impl SlotFormat {
    /// The format of `l`.
    pub fn of(l: &Linear) -> SlotFormat {
        match l {
            Linear::Dense { dtype, .. } => SlotFormat::Dense(*dtype),
            Linear::Affine {
                bits,
                group,
                sdtype,
                ..
            } => SlotFormat::Affine {
                bits: *bits,
                group: *group,
                sdtype: *sdtype,
            },
        }
    }

    /// Bytes of (weights, scales, biases) of `rows` rows of `cols`.
    pub fn sizes(&self, rows: usize, cols: usize) -> (usize, usize, usize) {
        match *self {
            SlotFormat::Dense(d) => (rows * cols * d.size(), 0, 0),
            SlotFormat::Affine {
                bits,
                group,
                sdtype,
            } => {
                let s = rows * cols.div_ceil(group.max(1)) * sdtype.size();
                (rows * cols * bits as usize / 8, s, s)
            }
        }
    }

    fn linear(&self, rows: usize, cols: usize, [w, s, b]: [Buf; 3]) -> Linear {
        match *self {
            SlotFormat::Dense(dtype) => Linear::Dense {
                dtype,
                rows,
                cols,
                data: w,
            },
            SlotFormat::Affine {
                bits,
                group,
                sdtype,
            } => Linear::Affine {
                bits,
                group,
                rows,
                cols,
                w,
                scales: s,
                biases: b,
                sdtype,
            },
        }
    }
}

/// Host bytes of a matrix: (weights, scales, biases); the last two empty when dense.
pub fn linear_bytes(l: &Linear) -> (&[u8], &[u8], &[u8]) {
    match l {
        Linear::Dense { data, .. } => (data.bytes(), &[], &[]),
        Linear::Affine {
            w, scales, biases, ..
        } => (w.bytes(), scales.bytes(), biases.bytes()),
    }
}

/// One slot's layout for experts of one shape and format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotLayout {
    pub format: SlotFormat,
    /// MoE intermediate size I and hidden size H.
    pub inter: usize,
    pub hidden: usize,
    /// Offsets inside a slot of gate‖up w, s, b and down w, s, b.
    pub offsets: [usize; 6],
    /// Bytes of a slot (with padding).
    pub slot: usize,
    /// Bytes copied per expert (without padding).
    pub bytes: usize,
}

fn bad(what: String) -> Error {
    Error::Invalid(format!("expert slot layout: {what}"))
}

impl SlotLayout {
    /// The layout of experts shaped and stored like `e` (gate, up `[I, H]`, down `[H, I]`, one
    /// format).
    pub fn of(e: &ExpertWeights) -> Result<SlotLayout> {
        let format = SlotFormat::of(&e.gate);
        let (i, h) = (e.gate.rows(), e.gate.cols());
        for (name, l, rows, cols) in [("up", &e.up, i, h), ("down", &e.down, h, i)] {
            if SlotFormat::of(l) != format || l.rows() != rows || l.cols() != cols {
                return Err(bad(format!(
                    "{name} is {}x{} {:?}, gate is {i}x{h} {format:?}",
                    l.rows(),
                    l.cols(),
                    SlotFormat::of(l)
                )));
            }
        }
        let (gw, gs, _) = format.sizes(i, h);
        let (dw, ds, _) = format.sizes(h, i);
        let mut o = 0;
        let mut take = |n: usize| {
            let at = o;
            o += up(n);
            at
        };
        let offsets = [
            take(2 * gw),
            take(2 * gs),
            take(2 * gs),
            take(dw),
            take(ds),
            take(ds),
        ];
        Ok(SlotLayout {
            format,
            inter: i,
            hidden: h,
            offsets,
            slot: o,
            bytes: 2 * gw + 4 * gs + dw + 2 * ds,
        })
    }

    /// The expert's nine byte ranges and their offsets inside a slot. Fails when the expert
    /// is not shaped like the layout's.
    pub fn parts<'a>(&self, e: &'a ExpertWeights) -> Result<[(usize, &'a [u8]); 9]> {
        let (gw, gs, gb) = linear_bytes(&e.gate);
        let (uw, us, ub) = linear_bytes(&e.up);
        let (dw, ds, db) = linear_bytes(&e.down);
        let (ew, es, _) = self.format.sizes(self.inter, self.hidden);
        let (edw, eds, _) = self.format.sizes(self.hidden, self.inter);
        let want = [ew, ew, es, es, es, es, edw, eds, eds];
        let got = [gw, uw, gs, us, gb, ub, dw, ds, db];
        if want.iter().zip(&got).any(|(&w, g)| w != g.len())
            || SlotFormat::of(&e.gate) != self.format
        {
            return Err(bad(format!(
                "expert part sizes {:?} differ from the layout's {want:?}",
                got.map(|g| g.len())
            )));
        }
        let o = self.offsets;
        Ok([
            (o[0], gw),
            (o[0] + gw.len(), uw),
            (o[1], gs),
            (o[1] + gs.len(), us),
            (o[2], gb),
            (o[2] + gb.len(), ub),
            (o[3], dw),
            (o[4], ds),
            (o[5], db),
        ])
    }

    /// Writes the expert's bytes into `dst` (one slot) in slot layout.
    pub fn stage(&self, e: &ExpertWeights, dst: &mut [u8]) -> Result<()> {
        if dst.len() < self.slot {
            return Err(bad(format!(
                "slot of {} bytes, the layout needs {}",
                dst.len(),
                self.slot
            )));
        }
        for (at, b) in self.parts(e)? {
            dst[at..at + b.len()].copy_from_slice(b);
        }
        Ok(())
    }

    /// (gate‖up `[2I, H]`, down `[H, I]`) of the expert whose slot is `slot`, as views of it.
    pub fn linears(&self, slot: &Buf) -> (Linear, Linear) {
        let (i, h) = (self.inter, self.hidden);
        let (gw, gs, _) = self.format.sizes(i, h);
        let (dw, ds, _) = self.format.sizes(h, i);
        let o = self.offsets;
        let gu = [
            slot.slice(o[0], 2 * gw),
            slot.slice(o[1], 2 * gs),
            slot.slice(o[2], 2 * gs),
        ];
        let d = [
            slot.slice(o[3], dw),
            slot.slice(o[4], ds),
            slot.slice(o[5], ds),
        ];
        (
            self.format.linear(2 * i, h, gu),
            self.format.linear(h, i, d),
        )
    }
}
