//! Device memory for [`super::CudaBuf`]s, recycled: the model asks for a dozen scratch buffers
//! per layer per token, and a driver allocation and free each time would cost more than the
//! kernels (and a free waits for the device). Buffers come in power-of-two size classes;
//! a dropped buffer goes back to its class. Every use of a buffer is queued on the compute
//! stream, so a buffer handed out again is written only after the work queued over its
//! previous life (stream order): the pool needs no events.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaContext;

use crate::device::{DBuf, Device};
use crate::Result;

/// Free buffers by size class (bytes).
pub(super) struct Pool {
    free: Mutex<HashMap<usize, Vec<DBuf>>>,
    /// Made current when the pool is dropped, which frees its buffers (the last owner may be
    /// another thread than the one that made it).
    ctx: Arc<CudaContext>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
    }
}

/// The size class of `bytes`: a power of two of at least 256 bytes.
fn class(bytes: usize) -> usize {
    bytes.max(256).next_power_of_two()
}

impl Pool {
    pub(super) fn new(ctx: Arc<CudaContext>) -> Pool {
        Pool {
            free: Mutex::default(),
            ctx,
        }
    }

    /// A buffer of at least `bytes` (None for 0: no allocation).
    pub(super) fn take(&self, dev: &Device, bytes: usize) -> Result<Option<DBuf>> {
        if bytes == 0 {
            return Ok(None);
        }
        let c = class(bytes);
        let hit = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&c)
            .and_then(|v| v.pop());
        match hit {
            Some(b) => Ok(Some(b)),
            None => dev.alloc(c).map(Some),
        }
    }

    pub(super) fn put(&self, b: DBuf) {
        let c = b.len();
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(c)
            .or_default()
            .push(b);
    }
}

/// A pooled allocation: back to its pool on drop.
pub(super) struct Mem {
    pub(super) buf: Option<DBuf>,
    pub(super) pool: Arc<Pool>,
}

impl Mem {
    pub(super) fn ptr(&self) -> u64 {
        self.buf.as_ref().map_or(0, |b| b.ptr())
    }
    /// Bytes of room.
    pub(super) fn cap(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            self.pool.put(b);
        }
    }
}
