//! [`CudaBuf`] and [`CudaRoutes`]: activations and routing in device memory, and the room
//! checks every op makes before it launches.
use std::sync::Arc;

use flashmoe_core::{Error, Result};

use super::pool::Mem;
use super::prep;

/// f32 elements in device memory (from the backend's pool): `len` of them live at byte `off`
/// of `mem`. Several buffers may share one allocation (the outputs of one stacked product,
/// `Backend::matmul_many`); the allocation goes back to the pool with the last of them.
pub struct CudaBuf {
    pub(super) mem: Arc<Mem>,
    pub(super) off: usize,
    pub(super) len: usize,
    /// The row prepared for `mp` matvecs by the op that wrote it (prep.rs).
    pub(super) prep: [Option<prep::PrepX>; 2],
}

impl CudaBuf {
    pub(super) fn ptr(&self) -> u64 {
        self.mem.ptr() + self.off as u64
    }
    /// Device address of element `i`.
    pub(super) fn at(&self, i: usize) -> u64 {
        self.ptr() + (i * 4) as u64
    }
    /// Elements of room from `off` on.
    pub(super) fn cap(&self) -> usize {
        (self.mem.cap() - self.off) / 4
    }
    /// `len` elements of `self` from element `i` on, sharing its allocation.
    pub(super) fn view(&self, i: usize, len: usize) -> CudaBuf {
        CudaBuf {
            mem: self.mem.clone(),
            off: self.off + i * 4,
            len,
            prep: [None, None],
        }
    }
}

/// The routing of `t` tokens on the device: `ids [t, k]` (i32 bits) and `wts [t, k]`.
pub struct CudaRoutes {
    pub(super) ids: CudaBuf,
    pub(super) wts: CudaBuf,
    pub(super) t: usize,
    pub(super) k: usize,
    /// Its readback staged by `router_topk` (moe.rs `Staging`), 0 for none.
    pub(super) staged: u64,
}

fn short(op: &str, what: &str, need: usize, have: usize) -> Error {
    Error::Invalid(format!(
        "cuda {op}: {what} holds {have} elements, needs {need}"
    ))
}

/// Checks that `b` holds at least `need` elements.
pub(super) fn room(op: &str, what: &str, b: &CudaBuf, need: usize) -> Result<()> {
    if b.len < need {
        return Err(short(op, what, need, b.len));
    }
    Ok(())
}

/// Checks that the delta rule's inputs and outputs hold `t` tokens of `s` (the recurrent and
/// the one-launch prompt forms take the same buffers).
pub(super) fn gdn_room(
    op: &str,
    [u, b, a, dt_bias, neg_a]: [&CudaBuf; 5],
    state: &CudaBuf,
    o: &CudaBuf,
    s: &flashmoe_core::backend::GdnShape,
    t: usize,
) -> Result<()> {
    let nv = s.nv;
    room(op, "u", u, t * s.conv_dim())?;
    room(op, "b", b, t * nv)?;
    room(op, "a", a, t * nv)?;
    room(op, "dt_bias", dt_bias, nv)?;
    room(op, "neg_a", neg_a, nv)?;
    room(op, "state", state, s.state_len())?;
    room(op, "o", o, t * s.value_dim())
}

/// Checks that the KV caches hold `pos0` rows of `kvw`.
pub(super) fn cache_at(
    op: &str,
    kc: &CudaBuf,
    vc: &CudaBuf,
    kvw: usize,
    pos0: usize,
) -> Result<()> {
    if kc.len != pos0 * kvw || vc.len != pos0 * kvw {
        return Err(Error::Invalid(format!(
            "cuda {op}: KV cache of {} and {} elements at position {pos0}, rows of {kvw}",
            kc.len, vc.len
        )));
    }
    Ok(())
}
