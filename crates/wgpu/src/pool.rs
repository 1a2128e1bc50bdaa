//! Device buffers of dropped [`GBuf`](crate::GBuf)s kept for the next allocation of the same
//! size: a decode step allocates the same outputs every token, and creating a buffer (memory,
//! a handle, wgpu's zero-initialisation tracking) costs the host more than the dispatch that
//! fills it. A reused buffer is zeroed on the device (`alloc`'s contract; not `scratch`'s,
//! whose op writes it whole) by a recorded clear, after every command recorded before it, so
//! earlier users are done with it.
use std::collections::HashMap;
use std::sync::Mutex;

/// Most bytes the pool keeps.
const KEEP: u64 = 1 << 30;

#[derive(Default)]
pub(crate) struct Pool {
    free: Mutex<(HashMap<u64, Vec<wgpu::Buffer>>, u64)>,
}

impl Pool {
    /// A kept buffer of exactly `size` bytes.
    pub fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        let mut g = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let b = g.0.get_mut(&size)?.pop()?;
        g.1 -= size;
        Some(b)
    }

    /// Keeps `b` for a later allocation of its size, unless the pool is full.
    pub fn put(&self, b: wgpu::Buffer) {
        let size = b.size();
        let mut g = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 + size <= KEEP {
            g.1 += size;
            g.0.entry(size).or_default().push(b);
        }
    }
}
