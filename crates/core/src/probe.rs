//! Machine-limit probes for benchmarks: memory read bandwidth, disk read bandwidth (buffered or
//! O_DIRECT, at a chosen request size and depth), and page-cache residency of a file range.
//! A benchmark prints its figure beside these limits, measured in the same run.
//!
//! Owns measurement only: it never keeps state, never touches model files beyond reading them,
//! and is not used on the inference path. Unix only (positional reads, mmap, mincore).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

/// Alignment of offsets, lengths and buffers for O_DIRECT (the logical block size of every
/// device we target is at most 4096).
const ALIGN: usize = 4096;

/// Best-of-several GB/s (1e9 bytes/s) of `threads` threads each streaming a disjoint part of a
/// `bytes`-byte buffer and summing it. The buffer is written once first so its pages exist.
pub fn memory_read_bandwidth(bytes: usize, threads: usize) -> f64 {
    let threads = threads.max(1);
    let words = (bytes / 8).max(threads * 8);
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|part| s.spawn(move || sum_words(part)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best / 1e9
}

/// Sum with 8 independent lanes so the loop is load-bound, not add-latency-bound.
fn sum_words(part: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut it = part.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] = acc[l].wrapping_add(c[l]);
        }
    }
    let rest = it
        .remainder()
        .iter()
        .fold(0, |a: u64, &v| a.wrapping_add(v));
    acc.iter().fold(rest, |a, &v| a.wrapping_add(v))
}

/// A heap buffer aligned to `ALIGN`, as O_DIRECT requires.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "aligned buffer"));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live, zero-initialised allocation of `layout.size()` bytes owned
        // by `self`, and `&mut self` makes this the only reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this exact layout and not freed before.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// splitmix64: a tiny deterministic generator for read offsets.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// GB/s of reading `total_bytes` from `path` in `request_bytes` positional reads at random
/// 4096-aligned offsets, with `in_flight` threads each keeping one read outstanding.
/// With `direct` the file is opened O_DIRECT (page cache bypassed) and `request_bytes` must be
/// a multiple of 4096; some filesystems (tmpfs) refuse O_DIRECT with `InvalidInput`.
pub fn disk_read_bandwidth(
    path: &Path,
    request_bytes: usize,
    in_flight: usize,
    direct: bool,
    total_bytes: usize,
) -> io::Result<f64> {
    let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
    if request_bytes == 0 || (direct && !request_bytes.is_multiple_of(ALIGN)) {
        return Err(invalid(
            "request_bytes must be non-zero (and 4096-aligned for O_DIRECT)",
        ));
    }
    let file = crate::os::open_for_read(path, direct)?;
    let len = file.metadata()?.len() as usize;
    if len < request_bytes {
        return Err(invalid("file shorter than one request"));
    }
    // Highest aligned offset at which a whole request still fits.
    let slots = (len - request_bytes) / ALIGN + 1;
    let in_flight = in_flight.max(1);
    let requests = total_bytes.div_ceil(request_bytes).max(in_flight);
    let per_thread = requests.div_ceil(in_flight);
    let t = Instant::now();
    let read: usize = std::thread::scope(|s| -> io::Result<usize> {
        let handles: Vec<_> = (0..in_flight)
            .map(|tid| {
                let file = &file;
                s.spawn(move || -> io::Result<usize> {
                    let mut buf = AlignedBuf::new(request_bytes)?;
                    let buf = &mut buf.as_mut_slice()[..request_bytes];
                    let mut rng = 0x5EED ^ ((tid as u64) << 32);
                    let mut done = 0;
                    for _ in 0..per_thread {
                        let off = (splitmix(&mut rng) as usize % slots) * ALIGN;
                        let mut got = 0;
                        while got < request_bytes {
                            let n = file.read_at(&mut buf[got..], (off + got) as u64)?;
                            if n == 0 {
                                break;
                            }
                            got += n;
                        }
                        done += got;
                    }
                    Ok(done)
                })
            })
            .collect();
        let mut sum = 0;
        for h in handles {
            sum += h
                .join()
                .map_err(|_| io::Error::other("reader thread panicked"))??;
        }
        Ok(sum)
    })?;
    Ok(read as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// Fraction (0..=1) of the pages of `file` covering bytes `[offset, offset + len)` that are in
/// the page cache now, via `mmap` + `mincore`. An empty range counts as fully resident.
pub fn page_cache_resident(file: &File, offset: u64, len: usize) -> io::Result<f64> {
    if len == 0 {
        return Ok(1.0);
    }
    // SAFETY: the file is opened for reading; the mapping is only passed to mincore, never
    // read, so a concurrent truncation cannot fault us.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map(file)
    }?;
    resident_fraction(&map)
}

/// Fraction of the pages of `mapped` (a slice of a file mapping) held in the page cache.
/// Callers that check often map the file once and pass slices, so each check is one syscall.
pub fn resident_fraction(mapped: &[u8]) -> io::Result<f64> {
    if mapped.is_empty() {
        return Ok(1.0);
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let addr = mapped.as_ptr() as usize;
    let start = addr / page * page;
    let len = addr + mapped.len() - start;
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: a mapping starts on a page boundary, so rounding `addr` down to one stays inside
    // the mapping that holds `mapped`; `vec` has one byte per page, as mincore requires. mincore
    // only inspects page-table state and never touches the memory.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr() as *mut _) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let resident = vec.iter().filter(|&&v| v & 1 != 0).count();
    Ok(resident as f64 / pages as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(len: usize) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("flashmoe-probe-{}", std::process::id()));
        let mut f = File::create(&path).expect("create temp file");
        let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        f.write_all(&data).expect("write temp file");
        f.sync_all().expect("sync temp file");
        path
    }

    #[test]
    fn probes_return_sane_numbers() {
        let mem = memory_read_bandwidth(32 << 20, 2);
        assert!(mem.is_finite() && mem > 0.1, "memory {mem} GB/s");

        let path = temp_file(8 << 20);
        let buffered = disk_read_bandwidth(&path, 1 << 16, 2, false, 16 << 20).expect("read");
        assert!(
            buffered.is_finite() && buffered > 0.0,
            "buffered {buffered} GB/s"
        );
        match disk_read_bandwidth(&path, 1 << 16, 2, true, 4 << 20) {
            Ok(d) => assert!(d.is_finite() && d > 0.0, "direct {d} GB/s"),
            // tmpfs and some overlay filesystems refuse O_DIRECT.
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}"),
        }
        assert!(disk_read_bandwidth(&path, 1000, 1, true, 4096).is_err());

        let f = File::open(&path).expect("open");
        let r = page_cache_resident(&f, 100, 3 << 20).expect("mincore");
        assert!((0.0..=1.0).contains(&r), "resident {r}");
        // Just written and read back: most of it is cached.
        assert!(r > 0.5, "resident {r}");
        assert_eq!(page_cache_resident(&f, 0, 0).expect("empty"), 1.0);
        std::fs::remove_file(&path).ok();
    }
}
