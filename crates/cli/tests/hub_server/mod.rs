//! A local stand-in for the Hugging Face Hub, for `pull` tests with no internet: the Hub's URL
//! scheme (`/api/models/{repo}/revision/{rev}`, `/{repo}/resolve/{rev}/{file}`), its metadata
//! headers (LFS files redirect to a "CDN" path with `X-Linked-Etag` = sha256 and
//! `X-Linked-Size`; small files carry their git blob sha1 as `ETag`), range requests, and
//! injected faults. One thread per connection; every answer closes its connection.
#![allow(dead_code)]
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha2::Digest;

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Faults, each for one file name.
#[derive(Default)]
pub struct Faults {
    /// Every request but CDN ones needs `Authorization: Bearer TOKEN` (401 GatedRepo else).
    pub token: Option<String>,
    /// The first body covering this offset stops there (headers promised more) and the
    /// connection is dropped.
    pub drop_at: HashMap<String, u64>,
    /// The first range response is cut to half its length, with a Content-Length that says so.
    pub short_once: HashSet<String>,
    /// The byte at the middle of the file is flipped in this many downloads of it.
    pub corrupt: HashMap<String, usize>,
    /// Ranges starting at or past this offset answer 503.
    pub fail_from: HashMap<String, u64>,
    /// `resolve` answers 404 (EntryNotFound), as for a file of a gated repo.
    pub missing: HashSet<String>,
    /// Ranges starting at or past this offset wait while the entry is here (at most a minute,
    /// then 503).
    pub stall: HashMap<String, u64>,
}

/// One request: method, path, and the start of its range.
#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub range_start: Option<u64>,
    /// Last byte asked for (inclusive), when the range says.
    pub range_end: Option<u64>,
}

pub struct Hub {
    pub endpoint: String,
    pub log: Arc<Mutex<Vec<Req>>>,
    pub faults: Arc<Mutex<Faults>>,
}

struct Repo {
    id: String,
    files: HashMap<String, Vec<u8>>,
}

impl Hub {
    /// Serves `files` as repository `repo` until the process ends.
    pub fn start(repo: &str, files: Vec<(String, Vec<u8>)>, faults: Faults) -> Hub {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let endpoint = format!("http://{}", l.local_addr().expect("local address"));
        let repo = Arc::new(Repo {
            id: repo.to_string(),
            files: files.into_iter().collect(),
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let faults = Arc::new(Mutex::new(faults));
        let (lg, ft) = (log.clone(), faults.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (repo, lg, ft) = (repo.clone(), lg.clone(), ft.clone());
                std::thread::spawn(move || {
                    let _ = serve(s, &repo, &lg, &ft);
                });
            }
        });
        Hub {
            endpoint,
            log,
            faults,
        }
    }

    pub fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn is_lfs(name: &str) -> bool {
    name.ends_with(".safetensors")
}

fn etag(name: &str, data: &[u8]) -> String {
    if is_lfs(name) {
        hex(&sha2::Sha256::digest(data))
    } else {
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {}\0", data.len()).as_bytes());
        h.update(data);
        hex(&h.finalize())
    }
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k == "Content-Length") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn hdr(k: &str, v: impl ToString) -> (String, String) {
    (k.to_string(), v.to_string())
}

fn error(s: &mut TcpStream, status: &str, code: &str) {
    respond(
        s,
        status,
        &[hdr("X-Error-Code", code), hdr("X-Error-Message", code)],
        b"",
    );
}

fn serve(
    mut s: TcpStream,
    repo: &Repo,
    log: &Mutex<Vec<Req>>,
    faults: &Mutex<Faults>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range: Option<(u64, Option<u64>)> = headers.get("range").and_then(|v| {
        let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()))
    });
    log.lock().unwrap().push(Req {
        method: method.clone(),
        path: path.clone(),
        range_start: range.map(|r| r.0),
        range_end: range.and_then(|r| r.1),
    });
    let mut f = faults.lock().unwrap();
    if !path.starts_with("/cdn/") {
        if let Some(t) = &f.token {
            if headers.get("authorization") != Some(&format!("Bearer {t}")) {
                drop(f);
                error(&mut s, "401 Unauthorized", "GatedRepo");
                return Ok(());
            }
        }
    }
    let api = format!("/api/models/{}/revision/", repo.id);
    let resolve = format!("/{}/resolve/", repo.id);
    if let Some(rev) = path.strip_prefix(&api) {
        drop(f);
        if rev != "main" && rev != COMMIT {
            error(&mut s, "404 Not Found", "RevisionNotFound");
            return Ok(());
        }
        let mut names: Vec<&String> = repo.files.keys().collect();
        names.sort();
        let sib: Vec<serde_json::Value> = names
            .iter()
            .map(|n| serde_json::json!({ "rfilename": n }))
            .collect();
        let body = serde_json::json!({"id": repo.id, "sha": COMMIT, "siblings": sib}).to_string();
        respond(
            &mut s,
            "200 OK",
            &[hdr("Content-Type", "application/json")],
            body.as_bytes(),
        );
        return Ok(());
    }
    if let Some(rest) = path.strip_prefix(&resolve) {
        let (rev, file) = rest.split_once('/').unwrap_or((rest, ""));
        if rev != "main" && rev != COMMIT {
            drop(f);
            error(&mut s, "404 Not Found", "RevisionNotFound");
            return Ok(());
        }
        let Some(data) = repo.files.get(file) else {
            drop(f);
            error(&mut s, "404 Not Found", "EntryNotFound");
            return Ok(());
        };
        if f.missing.contains(file) {
            drop(f);
            error(&mut s, "404 Not Found", "EntryNotFound");
            return Ok(());
        }
        drop(f);
        let tag = etag(file, data);
        let common = vec![
            hdr("X-Repo-Commit", COMMIT),
            hdr("ETag", format!("\"{tag}\"")),
        ];
        if is_lfs(file) {
            let mut h = common;
            h.push(hdr("X-Linked-Etag", format!("\"{tag}\"")));
            h.push(hdr("X-Linked-Size", data.len()));
            h.push(hdr("Location", format!("/cdn/{file}")));
            respond(&mut s, "302 Found", &h, b"");
        } else if method == "HEAD" {
            let mut h = common;
            h.push(hdr("Content-Length", data.len()));
            respond(&mut s, "200 OK", &h, b"");
        } else {
            respond(&mut s, "200 OK", &common, data);
        }
        return Ok(());
    }
    let Some(file) = path.strip_prefix("/cdn/") else {
        drop(f);
        error(&mut s, "404 Not Found", "RepoNotFound");
        return Ok(());
    };
    let Some(data) = repo.files.get(file) else {
        drop(f);
        error(&mut s, "404 Not Found", "EntryNotFound");
        return Ok(());
    };
    let size = data.len() as u64;
    let (a, b) = match range {
        Some((a, b)) => (a, b.map(|b| b + 1).unwrap_or(size).min(size)),
        None => (0, size),
    };
    let mut waited = 0;
    while f.stall.get(file).is_some_and(|&x| a >= x) {
        drop(f);
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
        f = faults.lock().unwrap();
        if waited > 6000 {
            drop(f);
            respond(&mut s, "503 Service Unavailable", &[], b"");
            return Ok(());
        }
    }
    if f.fail_from.get(file).is_some_and(|&x| a >= x) {
        drop(f);
        respond(&mut s, "503 Service Unavailable", &[], b"");
        return Ok(());
    }
    let mut body = data[a as usize..b as usize].to_vec();
    let mid = size / 2;
    if (a..b).contains(&mid) {
        if let Some(n) = f.corrupt.get_mut(file).filter(|n| **n > 0) {
            *n -= 1;
            body[(mid - a) as usize] ^= 0xff;
        }
    }
    let status = if range.is_some() {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let cr = |a: u64, b: u64| hdr("Content-Range", format!("bytes {a}-{}/{size}", b - 1));
    if f.short_once.remove(file) {
        drop(f);
        let half = (b - a) / 2;
        respond(&mut s, status, &[cr(a, a + half)], &body[..half as usize]);
        return Ok(());
    }
    if let Some(&x) = f.drop_at.get(file) {
        if (a..b).contains(&x) && x > a {
            f.drop_at.remove(file);
            drop(f);
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{}/{size}\r\n\r\n",
                b - a,
                b - 1
            );
            s.write_all(head.as_bytes())?;
            s.write_all(&body[..(x - a) as usize])?;
            s.flush()?;
            // Dropped mid-body: the client sees the connection close early.
            return s.shutdown(std::net::Shutdown::Write);
        }
    }
    drop(f);
    respond(&mut s, status, &[cr(a, b)], &body);
    Ok(())
}
