//! Device memory for [`super::CudaBuf`]s, recycled: the model asks for a dozen scratch buffers
//! per layer per token, and a driver allocation and free each time would cost more than the
//! kernels (and a free waits for the device). Buffers come in power-of-two size classes;
//! a dropped buffer goes back to its class. Every use of a buffer is queued on the compute
//! stream, so a buffer handed out again is written only after the work queued over its
//! previous life (stream order): the pool needs no events.
//!
//! The free lists are indexed by the class's log2 (no hashing): a token takes and returns a few
//! dozen buffers, each under one uncontended lock.
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaContext;

use crate::device::{DBuf, Device};
use crate::Result;

/// Size classes: one per power of two a `usize` holds.
const CLASSES: usize = usize::BITS as usize;

/// Free buffers by size class (index: log2 of the class's bytes).
pub(super) struct Pool {
    free: Mutex<[Vec<DBuf>; CLASSES]>,
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

/// The free list of a class.
fn slot(class: usize) -> usize {
    class.trailing_zeros() as usize
}

impl Pool {
    pub(super) fn new(ctx: Arc<CudaContext>) -> Pool {
        Pool {
            free: Mutex::new(std::array::from_fn(|_| Vec::new())),
            ctx,
        }
    }

    /// A buffer of at least `bytes` (None for 0: no allocation).
    pub(super) fn take(&self, dev: &Device, bytes: usize) -> Result<Option<DBuf>> {
        if bytes == 0 {
            return Ok(None);
        }
        let c = class(bytes);
        let hit = self.free.lock().unwrap_or_else(|p| p.into_inner())[slot(c)].pop();
        match hit {
            Some(b) => Ok(Some(b)),
            None => {
                // Callers bind only for launches; the allocation needs the context too.
                dev.bind()?;
                dev.alloc(c).map(Some)
            }
        }
    }

    /// Takes back `b` (of a class's size: it came from `take`).
    pub(super) fn put(&self, b: DBuf) {
        let c = slot(b.len());
        self.free.lock().unwrap_or_else(|p| p.into_inner())[c].push(b);
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

#[cfg(test)]
mod tests {
    use super::{class, slot, CLASSES};

    #[test]
    fn classes_are_powers_of_two_with_one_free_list_each() {
        assert_eq!(class(0), 256);
        assert_eq!(class(1), 256);
        assert_eq!(class(257), 512);
        assert_eq!(class(4096), 4096);
        assert_eq!(slot(class(1)), 8);
        assert_eq!(slot(class(4097)), 13);
        assert!(slot(class(usize::MAX / 2 + 1)) < CLASSES);
        for b in [256usize, 1000, 1 << 20, 3 << 30] {
            assert_eq!(1usize << slot(class(b)), class(b), "{b}");
        }
    }
}
