//! The Hugging Face Hub as `pull` uses it, through its documented HTTP endpoints:
//! `{endpoint}/api/models/{repo}/revision/{rev}` (the commit and the file list) and
//! `{endpoint}/{repo}/resolve/{commit}/{file}` (a file: for LFS files a redirect to a CDN whose
//! `X-Linked-Etag` is the sha256 and `X-Linked-Size` the size; for small files the `ETag` is the
//! git blob sha1). Honours `HF_ENDPOINT`, `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`, or the token
//! `huggingface-cli login` saved), `HF_HOME`/`HF_HUB_CACHE` (files already in the cache are used
//! in place) and the `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` variables (reqwest reads them).
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::blocking::{Client, Response};
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_LENGTH, ETAG, LOCATION, RANGE};
use reqwest::StatusCode;
use serde::Deserialize;

/// What a file's bytes must hash to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Checksum {
    /// LFS files: sha256 of the content (hex).
    Sha256(String),
    /// Small files stored in git: sha1 of `blob {len}\0` + content (hex).
    GitSha1(String),
    /// The server gave nothing recognisable.
    None,
}

impl Checksum {
    fn from_etag(tag: &str) -> Checksum {
        let t = tag.trim().trim_start_matches("W/").trim_matches('"');
        let hex = t.chars().all(|c| c.is_ascii_hexdigit());
        match t.len() {
            64 if hex => Checksum::Sha256(t.to_ascii_lowercase()),
            40 if hex => Checksum::GitSha1(t.to_ascii_lowercase()),
            _ => Checksum::None,
        }
    }
}

/// One file of the repository at the pinned commit.
#[derive(Clone, Debug)]
pub struct FileMeta {
    pub name: String,
    pub size: u64,
    pub checksum: Checksum,
}

#[derive(Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

/// The Hub (or CDN) refused a request: retrying will not help (bad id, no access, no file).
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

pub struct Hub {
    endpoint: String,
    pub repo: String,
    token: Option<String>,
    /// Follows no redirect: a file's metadata is on the Hub's own redirect response.
    meta: Client,
    /// Follows redirects to the CDN (reqwest drops the Authorization header on another host).
    data: Client,
}

/// The token from the environment or `huggingface-cli login`'s file.
fn find_token() -> Option<String> {
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Ok(t) = std::env::var(var) {
            if !t.trim().is_empty() {
                return Some(t.trim().to_string());
            }
        }
    }
    let file = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .or_else(|| hf_home().map(|h| h.join("token")))?;
    let t = std::fs::read_to_string(file).ok()?;
    (!t.trim().is_empty()).then(|| t.trim().to_string())
}

fn hf_home() -> Option<PathBuf> {
    std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("huggingface"))
    })
}

/// The hub cache directory (`HF_HUB_CACHE`, else `HF_HOME/hub`).
fn hub_cache() -> Option<PathBuf> {
    std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| hf_home().map(|h| h.join("hub")))
}

impl Hub {
    pub fn new(repo: &str) -> Result<Hub> {
        if repo.split('/').count() != 2 || repo.split('/').any(str::is_empty) {
            bail!("repository id `{repo}`: expected ORG/NAME (as on huggingface.co)");
        }
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let agent = concat!("flashmoe/", env!("CARGO_PKG_VERSION"));
        let build = |redirects| {
            Client::builder()
                .user_agent(agent)
                .connect_timeout(Duration::from_secs(30))
                .timeout(None)
                .redirect(redirects)
                .build()
        };
        Ok(Hub {
            endpoint,
            repo: repo.to_string(),
            token: find_token(),
            meta: build(reqwest::redirect::Policy::none()).context("starting the HTTP client")?,
            data: build(reqwest::redirect::Policy::limited(10))
                .context("starting the HTTP client")?,
        })
    }

    fn auth(&self, rb: reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder {
        match &self.token {
            Some(t) => rb.header(AUTHORIZATION, format!("Bearer {t}")),
            None => rb,
        }
    }

    /// Turns a refusal into an error that says what to do; `what` names the repo or file.
    fn check(&self, r: Response, what: &str) -> Result<Response> {
        let s = r.status();
        if s.is_success() || s.is_redirection() {
            return Ok(r);
        }
        let code = header(r.headers(), "x-error-code").unwrap_or_default();
        let msg = header(r.headers(), "x-error-message").unwrap_or_default();
        let detail = if msg.is_empty() {
            String::new()
        } else {
            format!(" ({msg})")
        };
        let url = r.url().to_string();
        match s {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let hint = if self.token.is_some() {
                    "the token (HF_TOKEN, or the one `huggingface-cli login` saved) has no access to it: accept the model's terms on its \
                     Hub page with that account, or use a token with read access"
                } else {
                    "it is gated or private: accept its terms on the Hub, then set HF_TOKEN to an \
                     access token (huggingface.co/settings/tokens)"
                };
                Err(Refused(format!("{s} for {what} ({url}){detail}: {hint}")).into())
            }
            StatusCode::NOT_FOUND => {
                let hint = match code.as_str() {
                    "RepoNotFound" => format!(
                        "repository {} not found (a private or gated one needs HF_TOKEN)",
                        self.repo
                    ),
                    "RevisionNotFound" => {
                        format!("{what}: no such revision (branch, tag or commit)")
                    }
                    _ => format!("{what} not found"),
                };
                Err(Refused(format!("404 for {url}: {hint}{detail}")).into())
            }
            s if s.is_client_error()
                && s != StatusCode::REQUEST_TIMEOUT
                && s != StatusCode::TOO_MANY_REQUESTS =>
            {
                Err(Refused(format!("{s} for {what} ({url}){detail}")).into())
            }
            _ => bail!("{s} for {what} ({url}){detail}"),
        }
    }

    /// The commit `revision` names and every file of the repository at it.
    pub fn repo_files(&self, revision: &str) -> Result<(String, Vec<String>)> {
        let url = format!(
            "{}/api/models/{}/revision/{}",
            self.endpoint,
            self.repo,
            enc(revision)
        );
        let what = format!("repository {} at revision {revision}", self.repo);
        let r = self
            .auth(self.meta.get(&url))
            .send()
            .with_context(|| format!("asking {url} for {what}"))?;
        let r = self.check(r, &what)?;
        let body = r
            .bytes()
            .with_context(|| format!("reading the answer of {url}"))?;
        let info: RepoInfo = serde_json::from_slice(&body)
            .with_context(|| format!("parsing the answer of {url}"))?;
        Ok((
            info.sha,
            info.siblings.into_iter().map(|s| s.rfilename).collect(),
        ))
    }

    pub fn file_url(&self, commit: &str, file: &str) -> String {
        let path: Vec<String> = file.split('/').map(enc).collect();
        format!(
            "{}/{}/resolve/{}/{}",
            self.endpoint,
            self.repo,
            commit,
            path.join("/")
        )
    }

    /// Size and checksum of `file` at `commit`, from the Hub's answer to HEAD (not the CDN's).
    pub fn meta(&self, commit: &str, file: &str) -> Result<FileMeta> {
        let mut url = self.file_url(commit, file);
        let what = format!("file {file} of {}", self.repo);
        // A renamed repository answers with a relative redirect to its new name first.
        for _ in 0..5 {
            let r = self
                .auth(self.meta.head(&url))
                .send()
                .with_context(|| format!("asking {url} about {what}"))?;
            let r = self.check(r, &what)?;
            let h = r.headers();
            let linked = header(h, "x-linked-etag");
            if r.status().is_redirection() && linked.is_none() {
                if let Some(loc) = header(h, LOCATION.as_str()).filter(|l| l.starts_with('/')) {
                    url = format!("{}{loc}", self.endpoint);
                    continue;
                }
            }
            let etag = linked
                .or_else(|| header(h, ETAG.as_str()))
                .unwrap_or_default();
            let size = header(h, "x-linked-size")
                .or_else(|| header(h, CONTENT_LENGTH.as_str()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| anyhow!("{url}: the Hub gave no size for {file}"))?;
            return Ok(FileMeta {
                name: file.to_string(),
                size,
                checksum: Checksum::from_etag(&etag),
            });
        }
        bail!("{url}: too many redirects for {what}")
    }

    /// Bytes `[start, end)` of `file`: a response to read the body from. A server that answers
    /// a range with the whole file (200) is accepted only for a range from 0.
    pub fn get_range(&self, commit: &str, file: &str, start: u64, end: u64) -> Result<Response> {
        let url = self.file_url(commit, file);
        let what = format!("file {file} of {}", self.repo);
        // No total timeout (a chunk takes what the link takes); a stalled read fails the try.
        let r = self
            .auth(self.data.get(&url))
            .header(RANGE, format!("bytes={start}-{}", end - 1))
            .timeout(Duration::from_secs(60 + (end - start) / 1_000_000))
            .send()
            .with_context(|| format!("downloading {what}"))?;
        let r = self.check(r, &what)?;
        match r.status() {
            StatusCode::PARTIAL_CONTENT => Ok(r),
            StatusCode::OK if start == 0 => Ok(r),
            s => bail!("{url}: answered {s} to a range request for {file}"),
        }
    }

    /// A whole small file.
    pub fn get_all(&self, commit: &str, file: &str) -> Result<Vec<u8>> {
        let url = self.file_url(commit, file);
        let what = format!("file {file} of {}", self.repo);
        let r = self
            .auth(self.data.get(&url))
            .timeout(Duration::from_secs(300))
            .send()
            .with_context(|| format!("downloading {what}"))?;
        let mut r = self.check(r, &what)?;
        let mut b = Vec::new();
        r.read_to_end(&mut b)
            .with_context(|| format!("downloading {what}"))?;
        Ok(b)
    }

    /// `file` at `commit` in the Hugging Face cache, if a download by another tool left it there
    /// (the snapshot's link to its blob). Its size must match, and its content the checksum: a
    /// blob named by the expected sha256 is taken as it is (huggingface_hub verified it), any
    /// other file is hashed.
    pub fn cached(&self, commit: &str, meta: &FileMeta) -> Option<PathBuf> {
        let dir = hub_cache()?.join(format!("models--{}", self.repo.replace('/', "--")));
        let p = dir.join("snapshots").join(commit).join(&meta.name);
        let real = p.canonicalize().ok()?;
        if std::fs::metadata(&real).ok()?.len() != meta.size {
            return None;
        }
        let named = match &meta.checksum {
            Checksum::Sha256(h) | Checksum::GitSha1(h) => {
                real.file_name().and_then(|n| n.to_str()) == Some(h.as_str())
            }
            Checksum::None => false,
        };
        (named || verify(&real, &meta.checksum).ok()?).then_some(real)
    }
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string())
}

/// Percent-encodes a path segment (revisions like `refs/pr/1` travel as one segment).
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether `path`'s bytes hash to `sum` (a `None` checksum passes).
pub fn verify(path: &Path, sum: &Checksum) -> Result<bool> {
    use sha1::Digest as _;
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut feed = |update: &mut dyn FnMut(&[u8])| -> Result<()> {
        loop {
            let n = f
                .read(&mut buf)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                return Ok(());
            }
            update(&buf[..n]);
        }
    };
    Ok(match sum {
        Checksum::Sha256(want) => {
            let mut h = sha2::Sha256::new();
            feed(&mut |b| h.update(b))?;
            hex(&h.finalize()) == *want
        }
        Checksum::GitSha1(want) => {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {len}\0").as_bytes());
            feed(&mut |b| h.update(b))?;
            hex(&h.finalize()) == *want
        }
        Checksum::None => true,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_name_their_hash() {
        let sha = "a".repeat(64);
        assert_eq!(
            Checksum::from_etag(&format!("\"{sha}\"")),
            Checksum::Sha256(sha)
        );
        let sha1 = "B".repeat(40);
        assert_eq!(
            Checksum::from_etag(&format!("W/\"{sha1}\"")),
            Checksum::GitSha1("b".repeat(40))
        );
        assert_eq!(Checksum::from_etag("\"abc-12\""), Checksum::None);
    }

    #[test]
    fn git_blob_sha1_matches_git() {
        // `printf hello | git hash-object --stdin`
        let p = std::env::temp_dir().join(format!("flashmoe-gitsha-{}", std::process::id()));
        std::fs::write(&p, b"hello").unwrap();
        let ok = verify(
            &p,
            &Checksum::GitSha1("b6fc4c620b67d95f953a5c1c1230aaab5db5a1b0".into()),
        )
        .unwrap();
        std::fs::remove_file(&p).unwrap();
        assert!(ok);
    }
}
