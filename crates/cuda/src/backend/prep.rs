//! Prepared x carried between ops: the decode loop's producers (norms, the gated norm of a
//! GatedDeltaNet's output, attention) write their output also in the int8 layout the `mp`
//! matvec kernels read (`ops::Prepared`), so the matvec that consumes it needs no `quant_x3`
//! launch. Through core's `Backend` a producer does not know its consumer, so a one-row output
//! is prepared for the code widths the backend's `mp` matrices use (at most two, most used
//! first: 4-bit projections and 8-bit routers), kept beside the buffer
//! ([`super::CudaBuf`]'s `prep`); a matvec whose width and columns match reads it. Every op
//! that writes a buffer drops what was prepared of it ([`super::CudaBuf::written`]), so a
//! prepared copy is always of the current contents. Off with `ops::set_epilogues(false)` (the
//! A/B switch of the token path's fusions).
use std::sync::atomic::{AtomicUsize, Ordering};

use super::pool::Mem;
use super::{Cuda, CudaBuf};
use crate::ops::{self, DevMat, Prepared};
use flashmoe_core::Result;

/// One prepared copy of a buffer's row.
pub(super) struct PrepX {
    mem: Mem,
    bits: u32,
}

impl PrepX {
    fn at(&self) -> Prepared {
        Prepared {
            at: self.mem.ptr(),
            bits: self.bits,
            qb: 0,
        }
    }
}

/// Matrices uploaded per `mp` code width (index: bits). Counters, not a lock: read before every
/// one-row norm of a token, written only by uploads.
#[derive(Default)]
pub(super) struct Widths([AtomicUsize; 9]);

impl Widths {
    /// Notes an uploaded matrix.
    pub(super) fn note(&self, m: &DevMat) {
        if let Some(b) = m.prepared_bits() {
            self.0[b as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The (at most two) widths in use, most used first.
    pub(super) fn top(&self) -> [Option<u32>; 2] {
        // Asked before every one-row norm: sorted in place, no allocation (unused widths,
        // count 0, sort last; the sort is stable, so ties keep 2, 4, 8 order).
        let c: [usize; 9] = std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed));
        let mut w = [2u32, 4, 8];
        w.sort_by_key(|&b| std::cmp::Reverse(c[b as usize]));
        let used = |i: usize| Some(w[i]).filter(|&b| c[b as usize] > 0);
        [used(0), used(1)]
    }
}

impl Cuda {
    /// Room for `out` (one row of `n`) prepared for the first `want` (at most two) of the
    /// widths in use, for a producer that prepares that many: the `Prepared` arguments of its
    /// launch. Attached to `out` by [`CudaBuf::attach`] after it.
    pub(super) fn prep_room(&self, n: usize, want: usize) -> Result<[Option<PrepX>; 2]> {
        let mut r: [Option<PrepX>; 2] = [None, None];
        for (slot, bits) in r.iter_mut().zip(self.widths.top()).take(want) {
            if let Some(bits) = bits.filter(|&b| ops::preparable(b, n)) {
                let mem = self.mem(ops::qx_size(bits, n).div_ceil(4))?;
                *slot = Some(PrepX { mem, bits });
            }
        }
        Ok(r)
    }

    /// The producer's launch arguments for `room`.
    pub(super) fn prep_args(room: &[Option<PrepX>; 2]) -> [Option<Prepared>; 2] {
        [
            room[0].as_ref().map(PrepX::at),
            room[1].as_ref().map(PrepX::at),
        ]
    }
}

impl CudaBuf {
    /// What is prepared of this buffer for `m` (one row of `m.cols`, `m`'s width).
    pub(super) fn prepared_for(&self, m: &DevMat) -> Option<Prepared> {
        let bits = m.prepared_bits()?;
        if self.len != m.cols {
            return None;
        }
        self.prep
            .iter()
            .flatten()
            .find(|p| p.bits == bits)
            .map(PrepX::at)
    }

    /// Keeps `room` as what is prepared of this buffer (written by the launch just queued).
    pub(super) fn attach(&mut self, room: [Option<PrepX>; 2]) {
        self.prep = room;
    }

    /// The buffer is about to be written: what was prepared of it is stale.
    pub(super) fn written(&mut self) {
        self.prep = [None, None];
    }
}

#[cfg(test)]
mod tests {
    use super::Widths;

    fn widths(counts: [(usize, usize); 3]) -> Widths {
        let w = Widths::default();
        for (bits, n) in counts {
            w.0[bits].store(n, std::sync::atomic::Ordering::Relaxed);
        }
        w
    }

    #[test]
    fn top_widths_are_the_used_ones_most_used_first() {
        assert_eq!(widths([(2, 0), (4, 0), (8, 0)]).top(), [None, None]);
        assert_eq!(widths([(2, 0), (4, 5), (8, 0)]).top(), [Some(4), None]);
        assert_eq!(widths([(2, 1), (4, 5), (8, 9)]).top(), [Some(8), Some(4)]);
        // Ties keep the order 2, 4, 8.
        assert_eq!(widths([(2, 3), (4, 3), (8, 3)]).top(), [Some(2), Some(4)]);
        assert_eq!(widths([(2, 0), (4, 3), (8, 3)]).top(), [Some(4), Some(8)]);
    }
}
