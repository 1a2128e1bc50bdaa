//! `flashmoe pull`: a Hugging Face model id to a packed model, packing while it downloads.
//!
//! 1. The repo's commit and file list; `config.json`, the shard index and the text files are
//!    fetched whole. Each shard gets a sparse file holding only its safetensors header (two
//!    small range requests), so the whole checkpoint can be planned ([`PackPlan`]: every check
//!    `pack` makes, every output offset) before any tensor data arrives.
//! 2. Workers download shards in chunks ([`fetch`]); as each shard is verified, every packing
//!    unit whose tensors are all present is written, and a shard no unit still needs is freed
//!    (cut back to its header; `--keep-source` keeps it), so the disk holds the packed model
//!    plus the shards in flight.
//! 3. When every unit is written the manifest goes in last; until then `DIR/.flashmoe-pull/`
//!    holds the downloads and the progress, and `run DIR` says the pull is incomplete.
//!
//! Interrupted at any point, the same command resumes: finished chunks, shards and units are in
//! the state file; the commit is pinned so a resumed pull never mixes two revisions.
mod fetch;
mod hub;
mod state;

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use flashmoe_core::packed::{
    free_bytes, human_bytes, is_packed_dir, write_manifest, PackOptions, PackPlan, Progress,
    UnitInfo, TEXT_FILES,
};
use indicatif::{MultiProgress, ProgressBar};

use super::out::outln;
use super::progress::{byte_style, Bar};
use fetch::{retry, write_error, Event, Fetcher, WriteFailed};
use hub::{verify, FileMeta, Hub};
use state::{state_dir, Options, Shard, State};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Hugging Face model id (ORG/NAME): a bf16 (transformers) or MLX quantized checkpoint
    pub repo: String,
    /// Output directory: the packed model. Holds `.flashmoe-pull/` (downloads, progress) until
    /// the pull is complete; the manifest is written last. Run the same command again to
    /// resume an interrupted pull
    #[arg(long)]
    pub out: PathBuf,
    /// Branch, tag or commit
    #[arg(long, default_value = "main")]
    pub revision: String,
    #[command(flatten)]
    pub format: super::pack::Format,
    /// Also download the repo files matching this glob (`*`, `?`; repeatable) into OUT, e.g.
    /// `--include 'LICENSE*' --include README.md`. The weights, config and tokenizer files
    /// always come
    #[arg(long)]
    pub include: Vec<String>,
    /// Keep the downloaded checkpoint in OUT/source (a directory `pack --from` takes) instead
    /// of freeing each shard once it is packed; needs the checkpoint's size on disk too
    #[arg(long)]
    pub keep_source: bool,
    /// Parallel range requests
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Retries of a request that fails with no bytes received (dropped connection, 5xx),
    /// before the pull stops (run it again to resume)
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Bytes per range request (tests use small ones)
    #[arg(long, default_value_t = 64 << 20, hide = true)]
    pub chunk_bytes: u64,
    #[command(flatten)]
    pub threads: super::common::Threads,
}

/// Glob match with `*` (any run, `/` included) and `?` (one character).
fn glob(pat: &str, s: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A small file, checked against the Hub's checksum (one more try on a mismatch), or taken
/// from the Hugging Face cache.
fn fetch_small(hub: &Hub, commit: &str, name: &str, to: &Path, retries: u32) -> Result<()> {
    let meta = retry(retries, &format!("asking about {name}"), || {
        hub.meta(commit, name)
    })?;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Some(c) = hub.cached(commit, &meta) {
        std::fs::copy(&c, to).with_context(|| format!("copying {}", c.display()))?;
        return Ok(());
    }
    for attempt in 0..2 {
        let b = retry(retries, &format!("downloading {name}"), || {
            hub.get_all(commit, name)
        })?;
        std::fs::write(to, &b)
            .map_err(|e| WriteFailed::wrap(write_error(to, e, b.len() as u64)))?;
        if b.len() as u64 == meta.size && verify(to, &meta.checksum)? {
            return Ok(());
        }
        if attempt == 0 {
            eprintln!("warning: checksum mismatch for {name}; downloading it again");
        }
    }
    bail!(
        "checksum mismatch for {name}: downloaded twice and neither copy matches the Hub's {:?}",
        meta.checksum
    )
}

/// The shard files of the checkpoint: the index's, else the root `*.safetensors`.
fn shard_names(src: &Path, files: &[String], have_index: bool) -> Result<Vec<String>> {
    if have_index {
        let p = src.join("model.safetensors.index.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map` object", p.display()))?;
        let set: BTreeSet<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        for f in &set {
            if !files.contains(f) || f.contains("..") || f.starts_with('/') {
                bail!("the index names shard {f}, which the repository does not have");
            }
        }
        return Ok(set.into_iter().collect());
    }
    Ok(files
        .iter()
        .filter(|f| f.ends_with(".safetensors") && !f.contains('/'))
        .cloned()
        .collect())
}

/// The shard's safetensors header (length prefix included).
fn header_bytes(hub: &Hub, commit: &str, name: &str, size: u64) -> Result<Vec<u8>> {
    let mut len = [0u8; 8];
    hub.get_range(commit, name, 0, 8)?
        .read_exact(&mut len)
        .with_context(|| format!("reading the header length of {name}"))?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 || 8 + n > size {
        bail!("{name}: not a safetensors file (header length {n}, file size {size})");
    }
    let mut h = vec![0u8; 8 + n as usize];
    h[..8].copy_from_slice(&len);
    hub.get_range(commit, name, 8, 8 + n)?
        .read_exact(&mut h[8..])
        .with_context(|| format!("reading the header of {name}"))?;
    Ok(h)
}

/// Makes `path` a sparse file of `size` bytes holding only `header`.
fn write_stub(path: &Path, header: &[u8], size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all_at(header, 0)
        .and_then(|_| f.set_len(header.len() as u64))
        .and_then(|_| f.set_len(size))
        .map_err(|e| write_error(path, e, header.len() as u64))
}

/// Frees a packed shard's data, keeping its header (a resumed pull plans from it again):
/// cutting the file back and extending it leaves a hole where the data was.
fn release(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact_at(&mut len, 0)
        .with_context(|| format!("reading {}", path.display()))?;
    let keep = 8 + u64::from_le_bytes(len);
    f.set_len(keep)
        .and_then(|_| f.set_len(size))
        .with_context(|| format!("freeing {}", path.display()))
}

fn options(a: &Args) -> Result<Options> {
    let o = a.format.options()?;
    Ok(Options {
        bits: o.bits,
        group_size: o.group_size,
        dense_bits: o.dense_bits,
    })
}

pub fn run(a: Args) -> Result<()> {
    a.threads.apply()?;
    let t0 = Instant::now();
    let out = a.out.clone();
    let opts = options(&a)?;
    if is_packed_dir(&out) {
        bail!(
            "{} already holds a packed model; remove it or choose another --out",
            out.display()
        );
    }
    let prior = State::load(&out)?;
    if prior.is_none()
        && out.exists()
        && std::fs::read_dir(&out).is_ok_and(|mut d| d.next().is_some())
    {
        bail!(
            "{} exists, is not empty and holds no pull in progress: choose another --out",
            out.display()
        );
    }
    if let Some(p) = &prior {
        if p.repo != a.repo {
            bail!(
                "{} holds an unfinished pull of {}, not {}: resume it with `flashmoe pull {} --out {}`, \
                 or choose another --out",
                out.display(),
                p.repo,
                a.repo,
                p.repo,
                out.display()
            );
        }
        if a.revision != p.revision && a.revision != p.commit {
            bail!(
                "{} holds an unfinished pull of {} at revision {} (commit {}), not {}: resume it \
                 with `--revision {}`, or choose another --out",
                out.display(),
                p.repo,
                p.revision,
                p.commit,
                a.revision,
                p.revision
            );
        }
        if a.keep_source && p.shards.values().any(|s| s.released) {
            bail!(
                "{} holds an unfinished pull started without --keep-source, which has freed \
                 packed shards already: resume it without --keep-source",
                out.display()
            );
        }
        if p.options != opts {
            bail!(
                "{} holds an unfinished pull made with other options ({:?}); resume it with those \
                 options or choose another --out",
                out.display(),
                p.options
            );
        }
    }
    let src = state_dir(&out).join("src");
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let hub = Arc::new(Hub::new(&a.repo)?);
    // A resumed pull stays on the commit it started from.
    let rev = prior
        .as_ref()
        .map(|p| p.commit.clone())
        .unwrap_or_else(|| a.revision.clone());
    let (commit, files) = retry(a.retries, &format!("asking about {}", a.repo), || {
        hub.repo_files(&rev)
    })?;
    if !files.iter().any(|f| f == "config.json") {
        bail!(
            "{} at {} has no config.json: not a transformers or MLX checkpoint",
            a.repo,
            a.revision
        );
    }
    let have_index = files.iter().any(|f| f == "model.safetensors.index.json");
    let mut small: Vec<String> = vec!["config.json".into()];
    if have_index {
        small.push("model.safetensors.index.json".into());
    }
    small.extend(
        TEXT_FILES
            .iter()
            .filter(|t| files.iter().any(|f| f == *t))
            .map(|t| t.to_string()),
    );
    for name in &small {
        fetch_small(&hub, &commit, name, &src.join(name), a.retries)?;
    }
    let shards = shard_names(&src, &files, have_index)?;
    if shards.is_empty() {
        bail!(
            "{} at {} has no safetensors weights (GGUF and PyTorch .bin checkpoints are not supported)",
            a.repo,
            a.revision
        );
    }
    let extras: Vec<String> = files
        .iter()
        .filter(|f| a.include.iter().any(|p| glob(p, f)))
        .filter(|f| !small.contains(f) && !shards.contains(f))
        .cloned()
        .collect();
    for name in &extras {
        let to = state_dir(&out).join("extra").join(name);
        fetch_small(&hub, &commit, name, &to, a.retries)?;
    }

    let mut st = prior.unwrap_or_else(|| State {
        repo: a.repo.clone(),
        revision: a.revision.clone(),
        commit: commit.clone(),
        options: opts.clone(),
        shards: Default::default(),
        units: Vec::new(),
    });
    for name in &shards {
        let meta: FileMeta = retry(a.retries, &format!("asking about {name}"), || {
            hub.meta(&commit, name)
        })?;
        let path = src.join(name);
        if let Some(s) = st.shards.get(name).cloned() {
            if s.size != meta.size || s.checksum != meta.checksum {
                bail!(
                    "{name} changed on the Hub since this pull started at commit {commit}; remove {} \
                     to start over",
                    state_dir(&out).display()
                );
            }
            if s.cached && path.symlink_metadata().is_ok() {
                continue;
            }
            if let Ok(m) = std::fs::metadata(&path) {
                if m.len() != s.size {
                    // Killed while freeing it (cut back, not yet extended): its data is gone,
                    // so it counts as not downloaded; the header is still there.
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|f| f.set_len(s.size))
                        .with_context(|| format!("repairing {}", path.display()))?;
                    if !s.released {
                        let fresh = Shard::new(s.size, s.checksum.clone(), s.chunk);
                        st.shards.insert(name.clone(), fresh);
                    }
                }
                continue;
            }
        }
        let mut s = Shard::new(meta.size, meta.checksum.clone(), a.chunk_bytes.max(1));
        if let Some(c) = hub.cached(&commit, &meta) {
            let _ = std::fs::remove_file(&path);
            std::os::unix::fs::symlink(&c, &path)
                .with_context(|| format!("linking {} to {}", path.display(), c.display()))?;
            s.complete = true;
            s.cached = true;
        } else {
            let h = retry(a.retries, &format!("reading the header of {name}"), || {
                header_bytes(&hub, &commit, name, meta.size)
            })?;
            write_stub(&path, &h, meta.size)?;
        }
        st.shards.insert(name.clone(), s);
        st.save(&out)?;
    }
    st.save(&out)?;

    let pack_opts = PackOptions {
        bits: opts.bits,
        group_size: opts.group_size,
        dense_bits: opts.dense_bits,
        force: false,
    };
    let plan = PackPlan::new(&src, &pack_opts)
        .with_context(|| format!("checking the checkpoint {} at {commit}", a.repo))?;
    check_space(&out, &plan, &st, a.keep_source)?;
    let mut packer = plan.start(&out, true)?;
    for (u, d) in &st.units {
        packer.mark_done(*u, d.clone());
    }
    let units: Vec<(UnitInfo, Vec<String>)> = packer
        .units()
        .into_iter()
        .map(|u| {
            let names = u
                .files
                .iter()
                .map(|f| {
                    Path::new(f)
                        .strip_prefix(&src)
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|_| f.clone())
                })
                .collect();
            (u, names)
        })
        .collect();

    let multi = MultiProgress::new();
    let dl = multi.add(ProgressBar::new(
        st.shards
            .iter()
            .filter(|(n, _)| a.keep_source || units.iter().any(|(_, names)| names.contains(n)))
            .map(|(_, s)| s.missing_bytes())
            .sum(),
    ));
    dl.set_style(byte_style());
    dl.set_message("downloading");
    let pack_bar = Bar::in_multi(&multi);
    pack_bar.begin(
        units
            .iter()
            .filter(|(u, _)| !packer.is_done(u.unit))
            .map(|(u, _)| u.bytes)
            .sum(),
        "packing    ",
    );
    let mut complete: HashSet<String> = st
        .shards
        .iter()
        .filter(|(_, s)| s.complete)
        .map(|(n, _)| n.clone())
        .collect();
    // Shards holding only tensors flashmoe does not use (vision tower, MTP head) are skipped,
    // unless the checkpoint is kept.
    let read: HashSet<&String> = units.iter().flat_map(|(_, names)| names).collect();
    let wanted = |n: &String| a.keep_source || read.contains(n);
    let order: Vec<String> = shards
        .iter()
        .filter(|n| !complete.contains(*n) && wanted(n))
        .cloned()
        .collect();
    let pending = order.len();
    let fetcher = Arc::new(Fetcher::new(
        st,
        order,
        hub.clone(),
        &out,
        &src,
        a.retries,
        dl.clone(),
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    let workers = fetcher.spawn(a.jobs, tx);
    let mut got = 0;
    let ctx = Packing {
        fetcher: &fetcher,
        units: &units,
        src: &src,
        keep_source: a.keep_source,
        bar: &pack_bar,
    };
    let r = (|| -> Result<()> {
        ctx.run_ready(&mut packer, &complete)?;
        while got < pending {
            match rx.recv() {
                Ok(Event::Complete(name)) => {
                    got += 1;
                    complete.insert(name);
                    ctx.run_ready(&mut packer, &complete)?;
                }
                Ok(Event::Failed(e)) => return Err(e),
                Err(_) => bail!("the download workers stopped before every shard was complete"),
            }
        }
        Ok(())
    })();
    fetcher.stop();
    for w in workers {
        let _ = w.join();
    }
    dl.finish();
    pack_bar.finish();
    r.with_context(|| {
        format!(
            "pulling {} into {} (run the same command again to resume)",
            a.repo,
            out.display()
        )
    })?;

    let (manifest, report) = packer.finish(&src, &format!("hf://{}@{commit}", a.repo))?;
    for name in &extras {
        let to = out.join(name);
        if let Some(d) = to.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let from = state_dir(&out).join("extra").join(name);
        std::fs::rename(&from, &to).with_context(|| format!("moving {}", to.display()))?;
    }
    if a.keep_source {
        let kept = out.join("source");
        std::fs::rename(&src, &kept)
            .with_context(|| format!("moving the checkpoint to {}", kept.display()))?;
    }
    write_manifest(&out, &manifest)?;
    let sd = state_dir(&out);
    std::fs::remove_dir_all(&sd).with_context(|| format!("removing {}", sd.display()))?;
    outln!(
        "pulled {}@{} into {} in {:.1}s: {} checkpoint, experts {}-bit ({} copied byte for byte, {} \
converted), dense {:.1} MB, experts {:.1} MB{}",
        a.repo,
        &commit[..commit.len().min(12)],
        out.display(),
        t0.elapsed().as_secs_f64(),
        report.source_kind,
        report.expert_bits,
        report.experts_copied,
        report.experts_converted,
        report.dense_bytes as f64 / 1e6,
        report.expert_file_bytes as f64 / 1e6,
        if a.keep_source {
            format!("; checkpoint kept in {}", out.join("source").display())
        } else {
            String::new()
        }
    )?;
    Ok(())
}

/// Refuses a pull the disk cannot hold: the packed model plus the shards in flight (every
/// shard with `--keep-source`), less what an interrupted run already wrote.
fn check_space(out: &Path, plan: &PackPlan, st: &State, keep_source: bool) -> Result<()> {
    let Some(free) = free_bytes(out) else {
        return Ok(());
    };
    let shard_need: u64 = if keep_source {
        st.shards
            .values()
            .filter(|s| !s.cached)
            .map(|s| s.size)
            .sum()
    } else {
        let mut sizes: Vec<u64> = st.shards.values().map(|s| s.size).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        sizes.iter().take(3).sum()
    };
    let written: u64 = std::fs::metadata(out.join("dense.bin"))
        .map(|m| m.len())
        .unwrap_or(0)
        + std::fs::read_dir(out.join("experts"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>()
            })
            .unwrap_or(0)
        + st.shards
            .values()
            .filter(|s| !s.cached && !s.released)
            .map(|s| s.size - s.missing_bytes())
            .sum::<u64>();
    let need = (plan.need_bytes() + shard_need).saturating_sub(written);
    if need > free {
        bail!(
            "{} needs about {} more free space for this pull (the packed model plus the shards in \
             flight{}) but its filesystem has {} free",
            out.display(),
            human_bytes(need),
            if keep_source {
                ", and every shard with --keep-source"
            } else {
                ""
            },
            human_bytes(free)
        );
    }
    Ok(())
}

/// Packing what the shards downloaded so far allow, and freeing what it no longer needs.
struct Packing<'a> {
    fetcher: &'a Fetcher,
    units: &'a [(UnitInfo, Vec<String>)],
    src: &'a Path,
    keep_source: bool,
    bar: &'a Bar,
}

impl Packing<'_> {
    fn run_ready(
        &self,
        packer: &mut flashmoe_core::packed::Packer,
        complete: &HashSet<String>,
    ) -> Result<()> {
        let mut done = Vec::new();
        for (u, names) in self.units {
            if packer.is_done(u.unit) || !names.iter().all(|n| complete.contains(n)) {
                continue;
            }
            done.push((u.unit, packer.run(u.unit, self.bar)?));
        }
        if !done.is_empty() {
            // On disk before it is recorded as done.
            packer.sync()?;
            self.fetcher.with_state(|s| s.units.extend(done))?;
        }
        if self.keep_source {
            return Ok(());
        }
        let free: Vec<(String, u64)> = self.fetcher.with_state(|s| {
            complete
                .iter()
                .filter(|name| {
                    s.shards
                        .get(*name)
                        .is_some_and(|sh| !sh.cached && !sh.released)
                        && !self
                            .units
                            .iter()
                            .any(|(u, names)| !packer.is_done(u.unit) && names.contains(name))
                })
                .map(|name| (name.clone(), s.shards[name].size))
                .collect()
        })?;
        for (name, size) in free {
            release(&self.src.join(&name), size)?;
            self.fetcher
                .with_state(|s| s.shards.get_mut(&name).map(|x| x.released = true))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs_match_as_shells_do() {
        assert!(glob("LICENSE*", "LICENSE"));
        assert!(glob("LICENSE*", "LICENSE.txt"));
        assert!(glob("*.md", "README.md"));
        assert!(glob("*.md", "docs/usage.md"));
        assert!(glob("model-0000?.bin", "model-00001.bin"));
        assert!(!glob("*.md", "README.mdx"));
        assert!(!glob("README.md", "README"));
        assert!(!glob("a*b*c", "a-b-"));
    }
}
