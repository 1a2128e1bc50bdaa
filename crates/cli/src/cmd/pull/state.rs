//! The progress of a pull, kept in `DIR/.flashmoe-pull/state.json` so that an interrupted pull
//! resumes where it stopped: the pinned commit and options, each shard's downloaded chunks and
//! whether it is complete (checksum verified) and released, and the packing units written.
//! Written atomically (temp file + rename) after every change that matters.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use flashmoe_core::packed::{Unit, UnitDone, PULL_STATE_DIR, PULL_STATE_FILE};
use serde::{Deserialize, Serialize};

use super::hub::Checksum;

/// The pack options a pull was started with: a resume must use the same ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    pub bits: Option<u32>,
    pub group_size: Option<usize>,
    pub dense_bits: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Shard {
    pub size: u64,
    pub checksum: Checksum,
    /// Bytes per chunk (the last may be shorter).
    pub chunk: u64,
    /// One character per chunk: `1` downloaded, `0` not.
    pub chunks: String,
    /// Downloaded and its checksum verified (or taken from the Hugging Face cache).
    pub complete: bool,
    /// Every unit reading it is packed and its data was freed (only its header is kept).
    pub released: bool,
    /// Read in place from the Hugging Face cache (never written or freed by the pull).
    #[serde(default)]
    pub cached: bool,
}

impl Shard {
    pub fn new(size: u64, checksum: Checksum, chunk: u64) -> Shard {
        let n = size.div_ceil(chunk).max(1) as usize;
        Shard {
            size,
            checksum,
            chunk,
            chunks: "0".repeat(n),
            complete: false,
            released: false,
            cached: false,
        }
    }

    pub fn n_chunks(&self) -> usize {
        self.chunks.len()
    }

    pub fn chunk_done(&self, i: usize) -> bool {
        self.chunks.as_bytes().get(i) == Some(&b'1')
    }

    pub fn set_chunk(&mut self, i: usize, done: bool) {
        let mut b = std::mem::take(&mut self.chunks).into_bytes();
        b[i] = if done { b'1' } else { b'0' };
        self.chunks = String::from_utf8(b).unwrap_or_default();
    }

    pub fn all_chunks(&self) -> bool {
        self.chunks.bytes().all(|c| c == b'1')
    }

    /// `[start, end)` of chunk `i`.
    pub fn range(&self, i: usize) -> (u64, u64) {
        let s = i as u64 * self.chunk;
        (s, (s + self.chunk).min(self.size))
    }

    /// Bytes still to download.
    pub fn missing_bytes(&self) -> u64 {
        if self.complete {
            return 0;
        }
        (0..self.n_chunks())
            .filter(|&i| !self.chunk_done(i))
            .map(|i| {
                let (s, e) = self.range(i);
                e - s
            })
            .sum()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub repo: String,
    /// As given (`main`, a tag, a commit).
    pub revision: String,
    /// The commit it named when the pull started: every file comes from it.
    pub commit: String,
    pub options: Options,
    pub shards: BTreeMap<String, Shard>,
    /// Units written, with what the manifest needs of them.
    pub units: Vec<(Unit, UnitDone)>,
}

pub fn state_dir(out: &Path) -> PathBuf {
    out.join(PULL_STATE_DIR)
}

impl State {
    pub fn load(out: &Path) -> Result<Option<State>> {
        let p = state_dir(out).join(PULL_STATE_FILE);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!(
                    "reading the pull's progress {} (remove {} to start over)",
                    p.display(),
                    state_dir(out).display()
                )
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn save(&self, out: &Path) -> Result<()> {
        let dir = state_dir(out);
        let p = dir.join(PULL_STATE_FILE);
        let tmp = dir.join(format!("{PULL_STATE_FILE}.tmp"));
        let text = serde_json::to_vec(self).context("serialising the pull's progress")?;
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &p))
            .with_context(|| format!("writing the pull's progress {}", p.display()))
    }
}
