//! Downloading shards: parallel range requests of fixed-size chunks written in place into each
//! shard's preallocated (sparse) file, at most [`WINDOW`] shards at a time so that the disk in
//! use stays near the packed size plus a couple of shards. A dropped or short response is
//! retried from the byte it stopped at; a finished shard is checked against the Hub's checksum
//! (downloaded again once on a mismatch) before the packer is told it is complete. Every
//! finished chunk is recorded in the state file, so an interrupted pull downloads only what is
//! missing.
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::ProgressBar;

use super::hub::{verify, Hub, Refused};
use super::state::State;

/// Shards downloading at once (their chunks shared among the workers).
const WINDOW: usize = 2;

/// What the workers tell the packer.
pub enum Event {
    /// The shard is downloaded and verified.
    Complete(String),
    Failed(anyhow::Error),
}

struct Shared {
    state: State,
    queue: VecDeque<String>,
    /// Shards downloading: chunk handed out to a worker (or done).
    active: Vec<(String, Vec<bool>)>,
    /// Shards downloaded a second time after a checksum mismatch.
    redone: HashSet<String>,
    /// Chunks in flight per shard.
    inflight: HashMap<String, usize>,
    abort: bool,
    left: usize,
}

pub struct Fetcher {
    shared: Arc<Mutex<Shared>>,
    hub: Arc<Hub>,
    out: PathBuf,
    src: PathBuf,
    retries: u32,
    bar: ProgressBar,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `f` until it succeeds, fails for good (a refusal, a local write error) or has failed
/// `retries + 1` times, waiting longer after each failure.
pub fn retry<T>(retries: u32, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let mut tries = 0;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if is_final(&e) => return Err(e),
            Err(e) if tries >= retries => {
                return Err(e.context(format!("{what} failed {} times", tries + 1)))
            }
            Err(_) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100 << tries.min(6)));
            }
        }
    }
}

fn is_final(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Refused>().is_some() || e.downcast_ref::<WriteFailed>().is_some()
}

/// Maps a write error to one that names the file, the directory and (disk full) the bytes
/// still needed.
pub fn write_error(path: &Path, e: std::io::Error, need: u64) -> anyhow::Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        anyhow!(
            "disk full writing {}: {} needs at least {} more free space to finish this download",
            path.display(),
            path.parent().unwrap_or(path).display(),
            flashmoe_core::packed::human_bytes(need)
        )
    } else {
        anyhow!("writing {}: {e}", path.display())
    }
}

impl Fetcher {
    /// `order`: the shards to download, in the order to download them.
    pub fn new(
        state: State,
        order: Vec<String>,
        hub: Arc<Hub>,
        out: &Path,
        src: &Path,
        retries: u32,
        bar: ProgressBar,
    ) -> Fetcher {
        let left = order.len();
        Fetcher {
            shared: Arc::new(Mutex::new(Shared {
                state,
                queue: order.into(),
                active: Vec::new(),
                redone: HashSet::new(),
                inflight: HashMap::new(),
                abort: false,
                left,
            })),
            hub,
            out: out.to_path_buf(),
            src: src.to_path_buf(),
            retries,
            bar,
        }
    }

    /// Runs `jobs` workers until every shard is complete or one fails (told through `tx`).
    pub fn spawn(
        self: &Arc<Self>,
        jobs: usize,
        tx: Sender<Event>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        (0..jobs.max(1))
            .map(|_| {
                let me = Arc::clone(self);
                let tx = tx.clone();
                std::thread::spawn(move || {
                    if let Err(e) = me.work(&tx) {
                        // Only the first failure is the cause: the others are workers stopped
                        // because of it.
                        let first = !std::mem::replace(&mut lock(&me.shared).abort, true);
                        if first {
                            let _ = tx.send(Event::Failed(e));
                        }
                    }
                })
            })
            .collect()
    }

    /// Stops the workers (after their current read).
    pub fn stop(&self) {
        lock(&self.shared).abort = true;
    }

    /// Applies `f` to the state and saves it (the packer records its units through this).
    pub fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T> {
        let mut sh = lock(&self.shared);
        let r = f(&mut sh.state);
        sh.state.save(&self.out)?;
        Ok(r)
    }

    fn next_task(sh: &mut Shared) -> Option<(String, usize)> {
        loop {
            for (name, handed) in sh.active.iter_mut() {
                if let Some(i) = handed.iter().position(|h| !h) {
                    handed[i] = true;
                    *sh.inflight.entry(name.clone()).or_default() += 1;
                    return Some((name.clone(), i));
                }
            }
            if sh.active.len() >= WINDOW {
                return None;
            }
            let name = sh.queue.pop_front()?;
            let s = &sh.state.shards[&name];
            let handed = (0..s.n_chunks()).map(|i| s.chunk_done(i)).collect();
            sh.active.push((name, handed));
        }
    }

    fn work(&self, tx: &Sender<Event>) -> Result<()> {
        loop {
            let task = {
                let mut sh = lock(&self.shared);
                if sh.abort || sh.left == 0 {
                    return Ok(());
                }
                Self::next_task(&mut sh)
            };
            let Some((name, i)) = task else {
                // Everything is handed out; a checksum mismatch may hand a shard out again.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let (start, end, size) = {
                let sh = lock(&self.shared);
                let s = &sh.state.shards[&name];
                let (a, b) = s.range(i);
                (a, b, s.size)
            };
            let path = self.src.join(&name);
            self.fetch_chunk(&name, &path, start, end, size)?;
            let last = {
                let mut sh = lock(&self.shared);
                let s = sh.state.shards.get_mut(&name).expect("known shard");
                s.set_chunk(i, true);
                let all = s.all_chunks();
                let n = sh.inflight.entry(name.clone()).or_default();
                *n -= 1;
                let last = all && *n == 0;
                if last {
                    sh.active.retain(|(a, _)| *a != name);
                }
                sh.state.save(&self.out)?;
                last
            };
            if last {
                self.finish_shard(&name, &path, size, tx)?;
            }
        }
    }

    /// Checks a downloaded shard; on a mismatch downloads it once more, then gives up.
    fn finish_shard(&self, name: &str, path: &Path, size: u64, tx: &Sender<Event>) -> Result<()> {
        let sum = lock(&self.shared).state.shards[name].checksum.clone();
        if verify(path, &sum)? {
            let mut sh = lock(&self.shared);
            sh.state.shards.get_mut(name).expect("known shard").complete = true;
            sh.left -= 1;
            sh.state.save(&self.out)?;
            let _ = tx.send(Event::Complete(name.to_string()));
            return Ok(());
        }
        let mut sh = lock(&self.shared);
        if !sh.redone.insert(name.to_string()) {
            bail!(
                "checksum mismatch for {name}: downloaded twice and neither copy matches the \
                 Hub's {sum:?} (a proxy altering files, or a broken mirror in HF_ENDPOINT?)"
            );
        }
        eprintln!("warning: checksum mismatch for {name}; downloading it again");
        let s = sh.state.shards.get_mut(name).expect("known shard");
        for c in 0..s.n_chunks() {
            s.set_chunk(c, false);
        }
        sh.state.save(&self.out)?;
        sh.queue.push_front(name.to_string());
        self.bar
            .set_position(self.bar.position().saturating_sub(size));
        Ok(())
    }

    /// Downloads `[start, end)` of `name` into `path`, retrying from where a try stopped.
    fn fetch_chunk(&self, name: &str, path: &Path, start: u64, end: u64, size: u64) -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let commit = lock(&self.shared).state.commit.clone();
        let mut pos = start;
        let mut tries = 0u32;
        loop {
            if lock(&self.shared).abort {
                bail!("stopped");
            }
            let before = pos;
            let r = self.try_range(&commit, name, &f, path, &mut pos, end, size);
            let err = match r {
                Ok(()) if pos == end => return Ok(()),
                Ok(()) => anyhow!(
                    "the response for {name} ended at byte {pos}, before byte {end} (truncated)"
                ),
                Err(e) if is_final(&e) => return Err(e),
                Err(e) => e,
            };
            // A try that made progress does not count against the retries.
            if pos == before {
                tries += 1;
            }
            if tries > self.retries {
                return Err(err.context(format!(
                    "downloading {name} (bytes {start}..{end}) failed {tries} times in a row"
                )));
            }
            std::thread::sleep(Duration::from_millis(100 << tries.min(6)));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn try_range(
        &self,
        commit: &str,
        name: &str,
        f: &std::fs::File,
        path: &Path,
        pos: &mut u64,
        end: u64,
        size: u64,
    ) -> Result<()> {
        let mut r = self.hub.get_range(commit, name, *pos, end)?;
        let mut buf = vec![0u8; 256 << 10];
        while *pos < end {
            let n = r
                .read(&mut buf)
                .with_context(|| format!("reading the response for {name}"))?;
            if n == 0 {
                return Ok(());
            }
            let n = n.min((end - *pos) as usize);
            f.write_all_at(&buf[..n], *pos)
                .map_err(|e| WriteFailed(write_error(path, e, size - *pos)))?;
            *pos += n as u64;
            self.bar.inc(n as u64);
        }
        Ok(())
    }
}

/// A write to the local disk failed: retrying the download will not help.
#[derive(Debug)]
pub struct WriteFailed(anyhow::Error);

impl std::fmt::Display for WriteFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for WriteFailed {}

impl WriteFailed {
    pub fn wrap(e: anyhow::Error) -> anyhow::Error {
        WriteFailed(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_names_the_directory_and_the_bytes() {
        let e = write_error(
            Path::new("/models/q/.flashmoe-pull/src/model-00001.safetensors"),
            std::io::Error::from_raw_os_error(libc::ENOSPC),
            5_000_000_000,
        );
        let m = format!("{e:#}");
        assert!(m.contains("disk full"), "{m}");
        assert!(
            m.contains("/models/q/.flashmoe-pull/src needs at least 5.00 GB"),
            "{m}"
        );
    }
}
