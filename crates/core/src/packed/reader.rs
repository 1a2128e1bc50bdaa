//! [`PackedExperts`]: the ExpertSource of a packed model. One positional read per expert
//! (`FileExt::read_at`), issued to a persistent pool of I/O threads, landing in reusable
//! 4096-aligned buffers that the returned weights view without copying.
//!
//! - `prefetch(layer, ids)` queues the reads and returns at once; `fetch` waits for them (and
//!   queues any that were not prefetched).
//! - `IoMode::Cached` reads through the page cache; before each read `mincore` measures how
//!   much of the expert is resident, which is what `bytes_cached` counts. An expert that is
//!   resident (all but a few pages, `MAP_MIN_RESIDENT`) is not read at all: the weights view
//!   the file's mapping in place, so a warm token costs no copy (a pread would read the bytes
//!   once from the page cache, write them to a buffer and have the kernels read them again:
//!   three passes over memory instead of one). The view is a `MapLease`, made on the I/O
//!   thread: it maps the pages in so the kernels take no page faults. The most recently used
//!   leases are kept (`kept.rs`, bounded, LRU), so a warm expert costs no page-table work per
//!   token; an evicted one unmaps its pages when the model drops it, so the resident set does
//!   not grow with the page cache. A kept expert that `mincore` finds wholly resident is
//!   served on the thread that asks for it, without a hop to an I/O thread (nothing there can
//!   wait for the disk). `IoMode::Direct`
//!   opens the layer files `O_DIRECT`: offsets are multiples of the stride (4096-aligned) and
//!   lengths are rounded up to 4096, inside the stride padding.
//! - `verify` checks each read's crc32 against the manifest.
//!
//! Buffers: a pool of `Arc<AlignedBuf>`; one whose strong count is 1 is held by nobody else
//! (no weights view it, no read fills it) and is reused. The pool grows to what is in use at
//! once (K experts in flight plus those the model still holds) and keeps at most
//! [`MAX_POOL`] idle buffers.
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::buf::{populate, AlignedBuf, Buf, MapLease};
use crate::error::{Error, Result};
use crate::experts::{ExpertCounters, ExpertSource, ExpertWeights};
use crate::loader::IoMode;
use crate::probe::resident_fraction;

use super::kept::{self, Kept};
use super::{align_up, packed_err, ExpertLayout, Manifest, EXPERT_ALIGN};

/// Idle buffers kept for reuse.
const MAX_POOL: usize = 64;
/// The resident fraction (by `mincore`) from which an expert is served from the mapping, its
/// missing pages faulted in on the I/O thread by `populate`, instead of copied whole by a
/// pread. Not 1.0: on the dev VM the kernel's proactive reclaim (DAMON) keeps taking a few
/// pages out of warm experts, and 12% of a warm run's experts (98.9-99.8% resident) then cost
/// a 7 MB copy on the two cores the kernels use, for a few pages' worth of reading.
const MAP_MIN_RESIDENT: f64 = 0.9;
/// Prefetched reads not yet fetched; older ones are dropped beyond this.
const MAX_PENDING: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-update of plain data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct LayerHandle {
    file: File,
    path: PathBuf,
    crc32: Vec<u32>,
    /// The file mapped once (cached mode): mincore on it measures residency with one syscall
    /// per read, and wholly resident experts are served from it without a copy.
    map: Option<Arc<memmap2::Mmap>>,
    /// `IoMode::Mapped`: experts whose pages this process has mapped (they stay mapped).
    mapped: Vec<std::sync::atomic::AtomicBool>,
}

/// The result of one read, filled by a worker.
struct Slot {
    done: Mutex<Option<Result<Buf>>>,
    cv: Condvar,
}

impl Slot {
    fn wait(&self) -> Result<Buf> {
        let mut g = lock(&self.done);
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

struct Job {
    layer: usize,
    expert: usize,
    slot: Arc<Slot>,
}

struct Queue {
    jobs: VecDeque<Job>,
    shutdown: bool,
}

struct Shared {
    files: Vec<Option<LayerHandle>>,
    stride: u64,
    expert_bytes: usize,
    /// Bytes per read: `expert_bytes`, rounded up to 4096 for O_DIRECT.
    read_len: usize,
    io: IoMode,
    verify: bool,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    pool: Mutex<Vec<Arc<AlignedBuf>>>,
    counters: ExpertCounters,
    /// `--io cached`: resident experts kept mapped between uses (bounded, LRU).
    kept: Mutex<Kept>,
    /// Reads handed to the I/O threads so far.
    queued: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// A buffer nobody else references (strong count 1), or a new one.
    fn take_buf(&self) -> Arc<AlignedBuf> {
        let mut pool = lock(&self.pool);
        match pool.iter().position(|b| Arc::strong_count(b) == 1) {
            Some(i) => pool.swap_remove(i),
            None => Arc::new(AlignedBuf::zeroed(self.expert_bytes)),
        }
    }

    fn give_back(&self, b: &Arc<AlignedBuf>) {
        let mut pool = lock(&self.pool);
        if pool.len() < MAX_POOL {
            pool.push(b.clone());
        }
    }

    /// Expert `expert` of `layer`: a view of the mapping when the page cache holds all of it,
    /// else read into a pool buffer (which the returned view then holds).
    fn read(&self, layer: usize, expert: usize) -> Result<Buf> {
        let h = self.files[layer].as_ref().ok_or_else(|| Error::Expert {
            layer,
            expert,
            msg: "layer has no expert file".into(),
        })?;
        let off = expert as u64 * self.stride;
        let t = Instant::now();
        let range = off as usize..off as usize + self.expert_bytes;
        if let Some((map, slice)) = h.map.as_ref().and_then(|m| Some((m, m.get(range)?))) {
            if let Ok(frac) = resident_fraction(slice) {
                self.counters
                    .bytes_cached
                    .fetch_add((frac * self.expert_bytes as f64) as u64, Ordering::Relaxed);
                let view = match self.io {
                    IoMode::Cached if frac >= MAP_MIN_RESIDENT => {
                        self.kept_lease(map, layer, expert, off as usize, frac)
                    }
                    IoMode::Cached => {
                        // Evicted (in part) since: read, and map it again when it is back.
                        lock(&self.kept).remove((layer, expert));
                        None
                    }
                    IoMode::Mapped if frac >= MAP_MIN_RESIDENT => {
                        // Map its pages once, on this I/O thread; they stay mapped. Pages
                        // missing from the page cache are read in by the same call.
                        let mapped = h.mapped.get(expert);
                        let known = mapped.is_some_and(|m| m.swap(true, Ordering::Relaxed));
                        let (o, n) = (off as usize, self.expert_bytes);
                        if (frac < 1.0 || !known) && !populate(map, o, n, frac >= 1.0) {
                            // Not faulted in: read instead, which reports an I/O error.
                            if let Some(m) = mapped {
                                m.store(false, Ordering::Relaxed);
                            }
                            None
                        } else {
                            Some(Buf::from_map(map.clone(), o, n))
                        }
                    }
                    IoMode::Mapped => {
                        // Evicted (in part) since: map it again when it is back.
                        if let Some(m) = h.mapped.get(expert) {
                            m.store(false, Ordering::Relaxed);
                        }
                        None
                    }
                    _ => None,
                };
                if let Some(view) = view {
                    self.counters.mapped.fetch_add(1, Ordering::Relaxed);
                    self.served(h, layer, expert, view.bytes(), t)?;
                    return Ok(view);
                }
            }
        }
        let mut buf = self.take_buf();
        let b = Arc::get_mut(&mut buf).expect("a taken buffer is referenced only here");
        let dst = &mut b.as_mut_full()[..self.read_len];
        let mut got = 0;
        while got < dst.len() {
            match h.file.read_at(&mut dst[got..], off + got as u64) {
                Ok(0) => {
                    return Err(Error::Expert {
                        layer,
                        expert,
                        msg: format!(
                            "{}: file ends at byte {} inside the expert (truncated?)",
                            h.path.display(),
                            off + got as u64
                        ),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Expert {
                        layer,
                        expert,
                        msg: format!("{}: read at offset {off}: {e}", h.path.display()),
                    })
                }
            }
        }
        self.served(h, layer, expert, &b.as_slice()[..self.expert_bytes], t)?;
        self.give_back(&buf);
        Ok(Buf::from_heap(buf, 0, self.expert_bytes))
    }

    /// `--io cached`, on the calling thread: a kept expert whose pages are all resident, served
    /// through its lease. Nothing there can wait for the disk, so the queue's hop to an I/O
    /// thread and back bought nothing: on a warm token it was a futex wake per expert (32 a
    /// token on Qwen3-30B-A3B shapes, all of the compute thread's context switches) and the
    /// I/O threads' CPU time on the cores the kernels use (CPU time a token -4% at 1 thread,
    /// -9% at 2). `None` (queued as before): not cached mode, verifying, not kept, or not
    /// wholly resident (the I/O thread reads or faults it in, off this thread).
    fn kept_resident(&self, layer: usize, expert: usize) -> Option<Result<Buf>> {
        if self.io != IoMode::Cached || self.verify || !lock(&self.kept).contains((layer, expert)) {
            return None;
        }
        let h = self.files.get(layer)?.as_ref()?;
        let map = h.map.as_ref()?;
        let off = expert * self.stride as usize;
        let t = Instant::now();
        let slice = map.get(off..off + self.expert_bytes)?;
        if resident_fraction(slice).ok()? < 1.0 {
            return None;
        }
        let view = self.kept_lease(map, layer, expert, off, 1.0)?;
        self.counters
            .bytes_cached
            .fetch_add(self.expert_bytes as u64, Ordering::Relaxed);
        self.counters.mapped.fetch_add(1, Ordering::Relaxed);
        Some(self.served(h, layer, expert, view.bytes(), t).map(|_| view))
    }

    /// `--io cached`: a view of a resident expert through its kept lease, made (its pages
    /// mapped in) on first use or after eviction; `None` when its pages could not be faulted in
    /// (the caller reads it instead, which reports the error).
    fn kept_lease(
        &self,
        map: &Arc<memmap2::Mmap>,
        layer: usize,
        expert: usize,
        off: usize,
        frac: f64,
    ) -> Option<Buf> {
        let key = (layer, expert);
        let all = frac >= 1.0;
        let kept = lock(&self.kept).get(key);
        let lease = match kept {
            // Pages reclaimed since it was mapped are read back in, as `--io mapped` does.
            Some(l) if all || populate(map, off, self.expert_bytes, false) => l,
            Some(_) => {
                lock(&self.kept).remove(key);
                return None;
            }
            None => {
                let l = Arc::new(MapLease::new(map.clone(), off, self.expert_bytes, all)?);
                lock(&self.kept).insert(key, l.clone());
                l
            }
        };
        Some(Buf::from_lease(lease))
    }

    /// Counts one expert served (its bytes now in `bytes`, since `t`), verifying its crc32 when
    /// asked.
    fn served(
        &self,
        h: &LayerHandle,
        layer: usize,
        expert: usize,
        bytes: &[u8],
        t: Instant,
    ) -> Result<()> {
        self.counters
            .read_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.counters
            .bytes_read
            .fetch_add(self.expert_bytes as u64, Ordering::Relaxed);
        if self.verify {
            let off = expert as u64 * self.stride;
            let crc = crc32fast::hash(bytes);
            let want = h.crc32[expert];
            if crc != want {
                return Err(Error::Expert {
                    layer,
                    expert,
                    msg: format!(
                        "checksum mismatch in {} at offset {off}: crc32 {crc:08x}, manifest says {want:08x} (corrupted file?)",
                        h.path.display()
                    ),
                });
            }
        }
        Ok(())
    }

    fn worker(&self) {
        loop {
            let job = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(j) = q.jobs.pop_front() {
                        break j;
                    }
                    if q.shutdown {
                        return;
                    }
                    q = self.queue_cv.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            let Job {
                layer,
                expert,
                slot,
            } = job;
            let r = self.read(layer, expert);
            *lock(&slot.done) = Some(r);
            slot.cv.notify_all();
        }
    }
}

/// Prefetched reads by (layer, expert), with their order (oldest first) for trimming.
type Pending = (HashMap<(usize, usize), Arc<Slot>>, VecDeque<(usize, usize)>);

pub struct PackedExperts {
    shared: Arc<Shared>,
    layout: ExpertLayout,
    workers: Vec<JoinHandle<()>>,
    /// Reads queued by `prefetch` and not yet fetched.
    pending: Mutex<Pending>,
}

impl PackedExperts {
    /// Opens every layer file of a validated manifest; `threads` I/O workers (0: a default
    /// that keeps one top-k's reads in flight).
    pub fn open(
        dir: &Path,
        man: &Manifest,
        num_layers: usize,
        top_k: usize,
        io: IoMode,
        verify: bool,
        threads: usize,
    ) -> Result<PackedExperts> {
        let layout = man.experts.clone();
        let mut files: Vec<Option<LayerHandle>> = (0..num_layers).map(|_| None).collect();
        for lf in &layout.layers {
            let path = dir.join(&lf.file);
            if lf.layer >= num_layers {
                return Err(packed_err(
                    &dir.join(super::MANIFEST),
                    format!("expert file for layer {} of {num_layers}", lf.layer),
                ));
            }
            let file = crate::os::open_for_read(&path, io == IoMode::Direct)
                .map_err(|e| direct_err(&path, io, e))?;
            let map = match io {
                // SAFETY: a read-only mapping of a file flashmoe never writes; like the dense
                // weights' mapping, it assumes nobody truncates the model while it runs.
                IoMode::Cached | IoMode::Pread | IoMode::Mapped => {
                    unsafe { memmap2::Mmap::map(&file) }.ok().map(Arc::new)
                }
                IoMode::Direct => None,
            };
            if let Some(m) = &map {
                crate::mapguard::register(&path, &file, m);
            }
            files[lf.layer] = Some(LayerHandle {
                file,
                path,
                crc32: lf.crc32.clone(),
                map,
                mapped: (0..lf.crc32.len()).map(|_| Default::default()).collect(),
            });
        }
        let expert_bytes = layout.expert_bytes as usize;
        let read_len = match io {
            IoMode::Direct => align_up(layout.expert_bytes, EXPERT_ALIGN) as usize,
            IoMode::Cached | IoMode::Pread | IoMode::Mapped => expert_bytes,
        };
        // Some filesystems accept O_DIRECT at open and refuse the reads: try one now.
        if io == IoMode::Direct {
            if let Some(h) = files.iter().flatten().next() {
                let mut b = AlignedBuf::zeroed(read_len);
                if let Err(e) = h.file.read_at(&mut b.as_mut_full()[..read_len], 0) {
                    return Err(direct_err(&h.path, io, e));
                }
            }
        }
        let shared = Arc::new(Shared {
            files,
            stride: layout.stride,
            expert_bytes,
            read_len,
            io,
            verify,
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                shutdown: false,
            }),
            queue_cv: Condvar::new(),
            pool: Mutex::new(Vec::new()),
            counters: ExpertCounters::default(),
            queued: std::sync::atomic::AtomicU64::new(0),
            kept: Mutex::new(Kept::new(kept::default_limit(
                expert_bytes,
                top_k,
                layout.layers.len(),
            ))),
        });
        let n = if threads == 0 {
            top_k.clamp(4, 16)
        } else {
            threads
        };
        let workers = (0..n)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("flashmoe-io-{i}"))
                    .spawn(move || s.worker())
                    .map_err(|e| Error::Invalid(format!("starting I/O thread: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PackedExperts {
            shared,
            layout,
            workers,
            pending: Mutex::new((HashMap::new(), VecDeque::new())),
        })
    }

    fn check(&self, layer: usize, expert: usize) -> Result<()> {
        if expert >= self.layout.count || self.shared.files.get(layer).is_none_or(|f| f.is_none()) {
            return Err(Error::Expert {
                layer,
                expert,
                msg: format!(
                    "no such expert in the packed model ({} experts per MoE layer)",
                    self.layout.count
                ),
            });
        }
        Ok(())
    }

    fn submit(&self, layer: usize, expert: usize) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            done: Mutex::new(None),
            cv: Condvar::new(),
        });
        if let Some(r) = self.shared.kept_resident(layer, expert) {
            *lock(&slot.done) = Some(r);
            return slot;
        }
        self.shared.queued.fetch_add(1, Ordering::Relaxed);
        lock(&self.shared.queue).jobs.push_back(Job {
            layer,
            expert,
            slot: slot.clone(),
        });
        self.shared.queue_cv.notify_one();
        slot
    }

    /// Reads handed to the I/O threads so far (a kept, resident expert is served without one).
    pub fn io_jobs(&self) -> u64 {
        self.shared.queued.load(Ordering::Relaxed)
    }

    pub fn io_threads(&self) -> usize {
        self.workers.len()
    }

    /// `--io cached`: how many resident experts are kept mapped between uses now, and the most
    /// that may be.
    pub fn kept_mapped(&self) -> (usize, usize) {
        let k = lock(&self.shared.kept);
        (k.len(), k.limit())
    }

    /// Whether expert `expert` of `layer` is kept mapped now.
    pub fn is_kept_mapped(&self, layer: usize, expert: usize) -> bool {
        lock(&self.shared.kept).contains((layer, expert))
    }

    /// Sets how many resident experts `--io cached` keeps mapped (0: none, each expert's pages
    /// mapped in per use and dropped after, the behaviour before kept leases), evicting the
    /// least recently used down to it now.
    pub fn set_kept_mapped_limit(&self, limit: usize) {
        lock(&self.shared.kept).set_limit(limit);
    }
}

fn direct_err(path: &Path, io: IoMode, e: std::io::Error) -> Error {
    if io == IoMode::Direct && e.raw_os_error() == Some(libc::EINVAL) {
        packed_err(
            path,
            format!("O_DIRECT is not supported by this file's filesystem ({e}); use --io cached"),
        )
    } else {
        Error::io(path, e)
    }
}

impl ExpertSource for PackedExperts {
    fn prefetch(&self, layer: usize, experts: &[usize]) {
        let mut p = lock(&self.pending);
        for &e in experts {
            if self.check(layer, e).is_err() || p.0.contains_key(&(layer, e)) {
                continue;
            }
            let slot = self.submit(layer, e);
            p.0.insert((layer, e), slot);
            p.1.push_back((layer, e));
        }
        while p.0.len() > MAX_PENDING {
            match p.1.pop_front() {
                Some(k) => {
                    p.0.remove(&k);
                }
                None => break,
            }
        }
    }

    fn fetch(&self, layer: usize, experts: &[usize]) -> Result<Vec<ExpertWeights>> {
        for &e in experts {
            self.check(layer, e)?;
        }
        let slots: Vec<Arc<Slot>> = {
            let mut p = lock(&self.pending);
            let slots = experts
                .iter()
                .map(|&e| match p.0.remove(&(layer, e)) {
                    Some(s) => s,
                    None => self.submit(layer, e),
                })
                .collect();
            let (map, order) = &mut *p;
            order.retain(|k| map.contains_key(k));
            slots
        };
        let mut out = Vec::with_capacity(experts.len());
        for s in slots {
            out.push(self.layout.view(&s.wait()?));
        }
        self.shared
            .counters
            .fetched
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(out)
    }

    fn counters(&self) -> &ExpertCounters {
        &self.shared.counters
    }

    fn expert_bytes(&self) -> usize {
        self.shared.expert_bytes
    }

    fn describe(&self) -> String {
        let io = match self.shared.io {
            IoMode::Cached => {
                "through the page cache: experts mincore finds resident are used in place from the mapping (the most recently used kept mapped, up to a bound), the others pread"
            }
            IoMode::Pread => "pread through the page cache for every expert (cache hits measured with mincore)",
            IoMode::Direct => "pread O_DIRECT (page cache bypassed; no cache hits)",
            IoMode::Mapped => {
                "through the page cache: experts mincore finds resident are used in place from the mapping and stay mapped, the others pread"
            }
        };
        format!(
            "packed experts ({}-bit, {} bytes each, stride {}), {} I/O threads, {io}{}",
            self.layout.bits,
            self.layout.expert_bytes,
            self.layout.stride,
            self.workers.len(),
            if self.shared.verify {
                ", crc32 verified"
            } else {
                ""
            }
        )
    }
}

impl Drop for PackedExperts {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.queue_cv.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
