//! Byte storage that weights point into: a slice of a shared mmap (dense weights, checkpoints)
//! or a page-aligned heap buffer (expert reads, converted tensors). Cloning is an Arc bump, so
//! weight views can be handed around without lifetimes and without copying.
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::sync::Arc;

use memmap2::Mmap;

/// Alignment of every owned buffer: a page, so that O_DIRECT reads can land in it and any
/// element type can be viewed in place.
pub const ALIGN: usize = 4096;

/// A heap buffer aligned to [`ALIGN`].
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8]; mutation needs &mut self.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        let cap = len.max(1).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(cap, ALIGN).expect("aligned layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len, cap }
    }
    pub fn from_bytes(b: &[u8]) -> Self {
        let mut a = Self::zeroed(b.len());
        a.as_mut_slice().copy_from_slice(b);
        a
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Capacity rounded up to the page size (O_DIRECT reads may fill it whole).
    pub fn capacity(&self) -> usize {
        self.cap
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes, initialised by alloc_zeroed.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    /// The whole page-rounded capacity, for O_DIRECT reads whose length must be a multiple of
    /// the block size.
    pub fn as_mut_full(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.cap) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("aligned layout");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { dealloc(self.ptr, layout) }
    }
}

#[derive(Clone)]
enum Backing {
    Map(Arc<Mmap>),
    Heap(Arc<AlignedBuf>),
    Lease(Arc<MapLease>),
}

/// A page-aligned range of a read-only file mapping lent out for a while (an expert served from
/// the page cache). Made, it maps the range's pages into this process's page tables at once
/// (`MADV_POPULATE_READ`, on the thread that makes it: the I/O thread), so the kernels that read
/// it take no page faults (a fresh 7 MB expert is ~1700 pages; faulting them in one by one on
/// the compute thread cost more than the copy it replaces). When the last view of it drops, the
/// page-table entries are dropped again (`MADV_DONTNEED`; the page cache keeps the pages), so
/// the process's resident set holds only the experts in use, not every expert it ever mapped.
pub struct MapLease {
    map: Arc<Mmap>,
    off: usize,
    len: usize,
}

impl MapLease {
    /// `off` must be page-aligned; the range is `[off, off + len)` of `map`. `None` when its
    /// pages could not be faulted in (see [`populate`]); `all_resident` says whether the page
    /// cache held every one of them.
    pub fn new(map: Arc<Mmap>, off: usize, len: usize, all_resident: bool) -> Option<Self> {
        assert!(
            off.is_multiple_of(ALIGN),
            "MapLease offset not page-aligned"
        );
        assert!(off + len <= map.len(), "MapLease range outside the map");
        let lease = MapLease { map, off, len };
        populate(&lease.map, lease.off, lease.len, all_resident).then_some(lease)
    }

    /// The range rounded up to whole pages, staying inside the map.
    fn page_range(&self) -> (*mut libc::c_void, usize) {
        let len = (self.len.div_ceil(ALIGN) * ALIGN).min(self.map.len() - self.off);
        // SAFETY: `off` is inside the map (checked in `new`).
        (
            unsafe { self.map.as_ptr().add(self.off) } as *mut libc::c_void,
            len,
        )
    }
}

/// Maps the pages of `[off, off + len)` of `map` (`off` page-aligned) into this process's page
/// tables now, so later reads take no page faults; pages the page cache lacks are read in.
/// False when that failed (an I/O error, or a kernel without `MADV_POPULATE_READ` while not
/// `all_resident`): the caller then reads the bytes with `pread`, which reports the error,
/// instead of letting a kernel fault on the mapping (SIGBUS).
pub fn populate(map: &Mmap, off: usize, len: usize, all_resident: bool) -> bool {
    assert!(
        off.is_multiple_of(ALIGN),
        "populate offset not page-aligned"
    );
    assert!(off + len <= map.len(), "populate range outside the map");
    #[cfg(target_os = "linux")]
    {
        let plen = (len.div_ceil(ALIGN) * ALIGN).min(map.len() - off);
        // SAFETY: advice on a range of a live read-only mapping; it only pre-faults pages.
        let p = unsafe { map.as_ptr().add(off) } as *mut libc::c_void;
        if unsafe { libc::madvise(p, plen, libc::MADV_POPULATE_READ) } == 0 {
            return true;
        }
        // EINVAL: a kernel before 5.14, without the advice. Anything else (EIO, ENOMEM,
        // EFAULT): a page could not be read in, which the caller reports by reading instead.
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return false;
        }
    }
    // Touching a page that must be read from disk would turn an I/O error into SIGBUS.
    if !all_resident {
        return false;
    }
    let sum = map[off..off + len]
        .iter()
        .step_by(ALIGN)
        .fold(0u8, |s, b| s.wrapping_add(*b));
    std::hint::black_box(sum);
    true
}

impl Drop for MapLease {
    fn drop(&mut self) {
        // macOS has the same advice with the same meaning for a file mapping.
        #[cfg(any(target_os = "linux", target_os = "macos"))]
        {
            let (p, len) = self.page_range();
            // SAFETY: advice on a range of a live read-only file mapping that no view references
            // any more (this lease was the last); it only drops page-table entries, the file's
            // pages stay in the page cache and a later access maps them again.
            unsafe { libc::madvise(p, len, libc::MADV_DONTNEED) };
        }
    }
}

/// A cheap-to-clone view of `len` bytes at `off` in shared storage.
#[derive(Clone)]
pub struct Buf {
    backing: Backing,
    off: usize,
    len: usize,
}

impl Buf {
    pub fn from_map(map: Arc<Mmap>, off: usize, len: usize) -> Self {
        assert!(off + len <= map.len(), "Buf range outside the map");
        Buf {
            backing: Backing::Map(map),
            off,
            len,
        }
    }
    pub fn from_heap(buf: Arc<AlignedBuf>, off: usize, len: usize) -> Self {
        assert!(off + len <= buf.len(), "Buf range outside the buffer");
        Buf {
            backing: Backing::Heap(buf),
            off,
            len,
        }
    }
    pub fn from_lease(lease: Arc<MapLease>) -> Self {
        let len = lease.len;
        Buf {
            backing: Backing::Lease(lease),
            off: 0,
            len,
        }
    }
    pub fn from_vec<T: bytemuck::Pod>(v: &[T]) -> Self {
        let bytes: &[u8] = bytemuck::cast_slice(v);
        let len = bytes.len();
        Buf::from_heap(Arc::new(AlignedBuf::from_bytes(bytes)), 0, len)
    }
    pub fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Map(m) => &m[self.off..self.off + self.len],
            Backing::Heap(h) => &h.as_slice()[self.off..self.off + self.len],
            Backing::Lease(l) => &l.map[l.off + self.off..l.off + self.off + self.len],
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether the bytes are a file mapping's (served in place) rather than a heap copy.
    pub fn is_mapped(&self) -> bool {
        matches!(self.backing, Backing::Map(_) | Backing::Lease(_))
    }
    pub fn slice(&self, off: usize, len: usize) -> Buf {
        assert!(off + len <= self.len, "Buf::slice out of range");
        Buf {
            backing: self.backing.clone(),
            off: self.off + off,
            len,
        }
    }
    /// The bytes viewed as `T`. Falls back to an aligned copy when the storage offset is not
    /// aligned for `T` (safetensors only promises 8-byte header alignment in newer writers).
    pub fn aligned<T: bytemuck::Pod>(&self) -> Buf {
        if (self.bytes().as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            self.clone()
        } else {
            Buf::from_heap(Arc::new(AlignedBuf::from_bytes(self.bytes())), 0, self.len)
        }
    }
    /// View as a typed slice. Callers obtain `self` through [`Buf::aligned`]; this panics only
    /// on a programming error (misaligned or odd-length view), never on file contents.
    pub fn typed<T: bytemuck::Pod>(&self) -> &[T] {
        bytemuck::cast_slice(self.bytes())
    }
}
