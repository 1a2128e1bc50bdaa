//! [`Layout`]: core's slot layout of a routed expert ([`SlotLayout`]: [gate w ‖ up w],
//! [gate s ‖ up s], [gate b ‖ up b], so gate and up are one [2I, H] matrix, then down w, s,
//! b) with the kernels' format, so a slot's two matrices are [`DevMat`]s over its bytes.
use flashmoe_core::residency::SlotLayout;

use crate::ops::{DevMat, Fmt};
use crate::Result;

/// A residency tier's [`SlotLayout`] with the kernels' format.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    fmt: Fmt,
    tier: SlotLayout,
}

impl Layout {
    /// The layout of a residency tier's slots.
    pub fn from_slot(tier: SlotLayout) -> Result<Layout> {
        Ok(Layout {
            fmt: Fmt::of_slot(tier.format)?,
            tier,
        })
    }

    /// (gate‖up [2I, H], down [H, I]) of the expert in the slot at `base`.
    pub fn mats(&self, base: u64) -> (DevMat, DevMat) {
        let o = |x: usize| base + self.tier.offsets[x] as u64;
        let m = |rows, cols, j: usize| DevMat {
            fmt: self.fmt,
            rows,
            cols,
            w: o(j),
            s: o(j + 1),
            b: o(j + 2),
        };
        let (i, h) = (self.tier.inter, self.tier.hidden);
        (m(2 * i, h, 0), m(h, i, 3))
    }
}
