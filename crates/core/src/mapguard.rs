//! Guarding the mmap'd model files against being changed underneath a running process.
//!
//! Dense weights (and a checkpoint's experts) are read in place from read-only file mappings.
//! If the file is truncated while mapped, the kernel answers the next read of a vanished page
//! with SIGBUS, which kills the process (a server dies with every request it holds); if the
//! file is rewritten or replaced, the weights silently change or stop matching what is on disk.
//! The policy: a model's files must not change while it is loaded; if one does, every
//! generation is refused with an error naming the file until the model is loaded again.
//!
//! - Every weight mapping is [`register`]ed with the file's identity (device, inode, size,
//!   modification time) at the time it was mapped. [`check_unchanged`] compares them with the
//!   files on disk (one `stat` per file): a front end calls it before each generation, so a
//!   file changed between requests is reported before any weight is touched.
//! - A truncation during a generation is caught by a SIGBUS handler ([`recover_faults`], opt-in:
//!   only callers that then check [`check_faults`] after each forward pass may install it).
//!   A fault inside a registered mapping replaces that mapping's range with zero pages (so the
//!   faulting read, and every later one, completes) and marks the file; the forward pass in
//!   flight computes garbage from the zeros, and the caller's [`check_faults`] turns it into an
//!   error before any of it is used. A fault anywhere else goes to the previous handler (the
//!   process dies as before).
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use memmap2::Mmap;

use crate::error::{Error, Result};

/// What identifies a file's contents cheaply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }
}

struct Entry {
    path: PathBuf,
    id: FileId,
    /// Dead once the model that mapped the file is dropped; the entry is then forgotten.
    map: Weak<Mmap>,
    /// Index in [`SLOTS`], when one was free.
    slot: Option<usize>,
}

/// A mapping's address range, readable from the signal handler (atomics only, no locks).
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

const NSLOTS: usize = 256;
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};
static SLOTS: [Slot; NSLOTS] = [EMPTY; NSLOTS];
/// Set by the handler: some slot has `faulted` (lets [`check_faults`] cost one load).
static ANY_FAULT: AtomicBool = AtomicBool::new(false);
static ENTRIES: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

fn entries() -> MutexGuard<'static, Vec<Entry>> {
    match ENTRIES.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Drops the entries of mappings that no longer exist, freeing their slots.
fn prune(list: &mut Vec<Entry>) {
    list.retain(|e| {
        let live = e.map.strong_count() > 0;
        if !live {
            if let Some(s) = e.slot {
                SLOTS[s].start.store(0, Ordering::Release);
                SLOTS[s].len.store(0, Ordering::Release);
                SLOTS[s].faulted.store(false, Ordering::Release);
            }
        }
        live
    });
}

/// Records `map` (a mapping of all of `file`, opened from `path`) and the file's identity now.
/// Best effort: a file that cannot be `stat`ed is not guarded.
pub fn register(path: &Path, file: &File, map: &Arc<Mmap>) {
    let Ok(meta) = file.metadata() else {
        return;
    };
    let mut list = entries();
    prune(&mut list);
    let page = crate::buf::ALIGN;
    let (start, len) = (map.as_ptr() as usize, map.len().div_ceil(page) * page);
    let used: Vec<usize> = list.iter().filter_map(|e| e.slot).collect();
    let slot = (!map.is_empty() && start.is_multiple_of(page))
        .then(|| (0..NSLOTS).find(|i| !used.contains(i)))
        .flatten();
    if let Some(s) = slot {
        SLOTS[s].faulted.store(false, Ordering::Release);
        SLOTS[s].len.store(len, Ordering::Release);
        SLOTS[s].start.store(start, Ordering::Release);
    }
    list.push(Entry {
        path: path.to_path_buf(),
        id: FileId::of(&meta),
        map: Arc::downgrade(map),
        slot,
    });
}

fn changed(path: &Path, what: String) -> Error {
    Error::io(
        path,
        std::io::Error::other(format!(
            "model file changed on disk while loaded ({what}); refusing to run on it: \
             load the model again (restart the server) to use the new file"
        )),
    )
}

fn faulted(e: &Entry) -> bool {
    e.slot
        .is_some_and(|s| SLOTS[s].faulted.load(Ordering::Acquire))
}

const VANISHED: &str = "truncated while in use: its pages vanished under a running generation";

/// Errors, naming the file, when a registered mapping faulted (see [`recover_faults`]). One
/// atomic load when none did: cheap enough to call after every forward pass.
pub fn check_faults() -> Result<()> {
    faults_under(None)
}

/// [`check_faults`] for the files under `dir` only (one model's, in a process that may hold
/// several).
pub fn check_faults_in(dir: &Path) -> Result<()> {
    faults_under(Some(dir))
}

fn under(e: &Entry, dir: Option<&Path>) -> bool {
    dir.is_none_or(|d| e.path.starts_with(d))
}

fn faults_under(dir: Option<&Path>) -> Result<()> {
    if !ANY_FAULT.load(Ordering::Acquire) {
        return Ok(());
    }
    let list = entries();
    match list.iter().find(|e| under(e, dir) && faulted(e)) {
        Some(e) => Err(changed(&e.path, VANISHED.into())),
        // The faulted mapping was dropped (its model unloaded): nothing in use is affected.
        None => Ok(()),
    }
}

/// Errors, naming the file, when a file of a live mapping was truncated, grown, rewritten,
/// replaced or removed since it was mapped, or faulted. One `stat` per mapped file.
pub fn check_unchanged() -> Result<()> {
    unchanged_under(None)
}

/// [`check_unchanged`] for the files under `dir` only: one model's files, so that another
/// model's (a test's removed temporary copy, say) do not fail this one's generations.
pub fn check_unchanged_in(dir: &Path) -> Result<()> {
    unchanged_under(Some(dir))
}

fn unchanged_under(dir: Option<&Path>) -> Result<()> {
    let mut list = entries();
    prune(&mut list);
    for e in list.iter().filter(|e| under(e, dir)) {
        if faulted(e) {
            return Err(changed(&e.path, VANISHED.into()));
        }
        let now = match std::fs::metadata(&e.path) {
            Ok(m) => FileId::of(&m),
            Err(err) => return Err(changed(&e.path, format!("cannot be read: {err}"))),
        };
        let what = if (now.dev, now.ino) != (e.id.dev, e.id.ino) {
            "replaced by another file".to_string()
        } else if now.len != e.id.len {
            format!("size {} -> {} bytes", e.id.len, now.len)
        } else if now.mtime != e.id.mtime {
            "rewritten (modification time changed)".to_string()
        } else {
            continue;
        };
        return Err(changed(&e.path, what));
    }
    Ok(())
}

/// Installs the SIGBUS handler described in the module header (once per process). Only for
/// callers that call [`check_faults`] after every use of the weights: after a fault, reads of
/// the file's mapping return zeros instead of killing the process.
pub fn recover_faults() {
    #[cfg(target_os = "linux")]
    sigbus::install();
}

#[cfg(target_os = "linux")]
mod sigbus {
    use std::cell::UnsafeCell;
    use std::sync::atomic::Ordering;
    use std::sync::Once;

    use super::{ANY_FAULT, SLOTS};

    /// The handler that was installed before ours, written once before ours is installed.
    struct Previous(UnsafeCell<Option<libc::sigaction>>);
    // SAFETY: written once under `INSTALL` before the handler that reads it can run.
    unsafe impl Sync for Previous {}
    static PREVIOUS: Previous = Previous(UnsafeCell::new(None));
    static INSTALL: Once = Once::new();

    pub fn install() {
        INSTALL.call_once(|| {
            // SAFETY: plain sigaction calls with zero-initialised structs filled in here.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                    return;
                }
                *PREVIOUS.0.get() = Some(old);
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_sigbus as *const () as usize;
                act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut());
            }
        });
    }

    /// Async-signal-safe: atomics, `mmap` and `sigaction` only.
    extern "C" fn on_sigbus(
        _sig: libc::c_int,
        info: *mut libc::siginfo_t,
        _ctx: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
        let addr = unsafe { (*info).si_addr() } as usize;
        for slot in SLOTS.iter() {
            let start = slot.start.load(Ordering::Acquire);
            let len = slot.len.load(Ordering::Acquire);
            if start == 0 || addr < start || addr >= start + len {
                continue;
            }
            // SAFETY: replaces, in place, the pages of a read-only file mapping that this
            // process owns (registered, still live) with private zero pages of the same
            // protection; the owner's munmap later unmaps them as it would the file's.
            let p = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                ANY_FAULT.store(true, Ordering::Release);
                return; // the faulting read is retried, on zeros
            }
            break;
        }
        // Not ours (or the range could not be replaced): restore the previous disposition;
        // returning re-runs the faulting access, which that handler (or the default) then sees.
        // SAFETY: PREVIOUS was written before this handler was installed.
        unsafe {
            match &*PREVIOUS.0.get() {
                Some(old) => libc::sigaction(libc::SIGBUS, old, std::ptr::null_mut()),
                None => libc::signal(libc::SIGBUS, libc::SIG_DFL) as libc::c_int,
            };
        }
    }
}
