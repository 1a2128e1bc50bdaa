//! What differs between the operating systems flashmoe runs on (Linux and macOS): reads that
//! bypass the page cache, and the memory figures the benchmark reports. Everything else the
//! engine asks of the OS (`pread`, `mmap`, `mincore`, `madvise`) is common POSIX.
//!
//! Linux bypasses the page cache with `O_DIRECT` (buffer, offset and length aligned to 4096,
//! which [`crate::buf::AlignedBuf`] guarantees); macOS has no `O_DIRECT` and turns caching off
//! per descriptor with `fcntl(F_NOCACHE)` instead, which takes the same aligned reads.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

/// Opens `path` for reading; with `uncached`, reads bypass the page cache (`--io direct`).
pub fn open_for_read(path: &Path, uncached: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true);
    #[cfg(target_os = "linux")]
    if uncached {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(libc::O_DIRECT);
    }
    let file = o.open(path)?;
    #[cfg(target_os = "macos")]
    if uncached {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor this function owns; F_NOCACHE takes an int flag.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_NOCACHE, 1) } == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    if uncached {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "uncached reads are implemented on Linux (O_DIRECT) and macOS (F_NOCACHE) only",
        ));
    }
    Ok(file)
}

/// A field of /proc/self/status or /proc/meminfo in bytes (their values are in kB).
#[cfg(target_os = "linux")]
fn proc_kb(path: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Resident set size of this process now, bytes (None where the OS does not say).
pub fn rss_bytes() -> Option<u64> {
    #[cfg(target_os = "linux")]
    return proc_kb("/proc/self/status", "VmRSS:");
    #[cfg(target_os = "macos")]
    {
        let mut info = std::mem::MaybeUninit::<libc::proc_taskinfo>::zeroed();
        let size = std::mem::size_of::<libc::proc_taskinfo>() as libc::c_int;
        // SAFETY: proc_pidinfo writes at most `size` bytes into `info`, a buffer of that size.
        let n = unsafe {
            libc::proc_pidinfo(
                libc::getpid(),
                libc::PROC_PIDTASKINFO,
                0,
                info.as_mut_ptr().cast(),
                size,
            )
        };
        if n != size {
            return None;
        }
        // SAFETY: proc_pidinfo filled the whole struct (n == size).
        return Some(unsafe { info.assume_init() }.pti_resident_size);
    }
    #[allow(unreachable_code)]
    None
}

/// Memory the OS could give this process without swapping, bytes (None where unknown).
/// Linux: MemAvailable. macOS exports no such figure; its physical memory (`hw.memsize`) is
/// used, which is what an otherwise idle Mac can give to the page cache.
pub fn mem_available() -> Option<u64> {
    #[cfg(target_os = "linux")]
    return proc_kb("/proc/meminfo", "MemAvailable:");
    #[cfg(target_os = "macos")]
    {
        let mut v: u64 = 0;
        let mut len = std::mem::size_of::<u64>();
        // SAFETY: a NUL-terminated name, and an out-buffer of `len` bytes for a u64 value.
        let rc = unsafe {
            libc::sysctlbyname(
                c"hw.memsize".as_ptr(),
                (&mut v as *mut u64).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        return (rc == 0 && len == std::mem::size_of::<u64>()).then_some(v);
    }
    #[allow(unreachable_code)]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_figures_are_known_here() {
        let rss = rss_bytes().expect("rss on this OS");
        assert!(rss > 0);
        assert!(mem_available().expect("available memory on this OS") > 0);
    }

    #[test]
    fn uncached_open_reads_aligned_blocks() {
        use std::os::unix::fs::FileExt;
        let dir = std::env::temp_dir().join(format!("flashmoe-os-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let f = match open_for_read(&p, true) {
            Ok(f) => f,
            // tmpfs refuses O_DIRECT: the engine reports that as a clear error; nothing to test.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                eprintln!("uncached open refused by this filesystem ({e}); checked the error only");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let mut buf = crate::buf::AlignedBuf::zeroed(4096);
        f.read_exact_at(buf.as_mut_slice(), 4096).unwrap();
        assert!(buf.as_slice().iter().all(|&b| b == 7));
        std::fs::remove_dir_all(&dir).ok();
    }
}
