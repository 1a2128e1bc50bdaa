//! Helpers for the `flashmoe serve` tests: a test model dir, the real binary on a free
//! loopback port, and a minimal HTTP/1.1 client over a TcpStream (chunked bodies decoded).
#![allow(dead_code)]
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flashmoe_runtime::testutil::{make_test_model_dir, shared_dir, temp_dir};
use serde_json::Value;

/// A test model dir, or None (skipped) when shared/ is missing outside CI.
pub fn model_dir(tag: &str) -> Option<PathBuf> {
    let shared = shared_dir(Path::new(env!("CARGO_MANIFEST_DIR")))?;
    let dir = temp_dir(tag).join("tiny-a");
    make_test_model_dir(&shared, &dir).expect("building the test model dir");
    Some(dir)
}

/// The test model packed (`flashmoe pack`), so that its dense weights are mmap'd from
/// `dense.bin` and its experts read from per-layer files; None (skipped) as `model_dir`.
pub fn packed_model_dir(tag: &str) -> Option<PathBuf> {
    packed_model_dir_with(tag, &[])
}

/// [`packed_model_dir`] with extra `flashmoe pack` arguments (`--bits 2`, ...).
pub fn packed_model_dir_with(tag: &str, pack_args: &[&str]) -> Option<PathBuf> {
    let src = model_dir(tag)?;
    let out = src.with_file_name("tiny-a-packed");
    let st = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
        .arg("pack")
        .args(pack_args)
        .arg("--from")
        .arg(&src)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("running flashmoe pack");
    assert!(st.success(), "flashmoe pack failed");
    Some(out)
}

pub struct Server {
    child: Child,
    pub addr: String,
    pub dir: PathBuf,
    /// Every line the server printed on stdout so far.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `flashmoe serve --model DIR --port 0 EXTRA...` and waits for its address.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flashmoe"))
            .args(["serve", "--model"])
            .arg(dir)
            .args(["--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting flashmoe serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                }
                if let Ok(mut l) = seen.lock() {
                    l.push(line);
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("flashmoe serve did not report its address");
            }
        };
        Server {
            child,
            addr,
            dir: dir.to_path_buf(),
            lines,
        }
    }

    /// What the server printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.lines.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Sends a signal (`TERM`, `INT`, ...) to the server.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!("kill -s {sig} {}", self.pid()))
            .status()
            .expect("running kill");
        assert!(st.success(), "kill -s {sig} failed");
    }

    /// The exit status, once the server has exited within `secs`.
    pub fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(secs, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// Whether the server process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn get(&self, path: &str) -> Resp {
        request(&self.addr, "GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, body: &Value) -> Resp {
        request(&self.addr, "POST", path, &[], body.to_string().as_bytes())
    }

    /// Resident memory of the server process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// One sample of /metrics (the line starting with `name`).
    pub fn metric(&self, name: &str) -> f64 {
        let body = self.get("/metrics").body;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(f64::NAN)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
}

pub fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connecting to the server");
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    s
}

pub fn write_request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("writing request");
    s.write_all(body).expect("writing body");
}

pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = connect(addr);
    write_request(&mut s, method, path, headers, body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reading response");
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size_str = String::from_utf8_lossy(&b[..eol]).to_string();
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        b = &b[eol + 2..];
        if size == 0 || b.len() < size {
            break;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[(size + 2).min(b.len())..];
    }
    out
}

/// POSTs a streamed chat request and returns the connection once the response has started
/// (status 200 read: the generation is running).
pub fn open_stream(addr: &str, body: &Value) -> TcpStream {
    let mut s = connect(addr);
    write_request(
        &mut s,
        "POST",
        "/v1/chat/completions",
        &[],
        body.to_string().as_bytes(),
    );
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).expect("first bytes of the stream");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// POSTs `body` to `path` from another thread (one of many concurrent clients).
pub fn spawn_post(addr: &str, path: &'static str, body: &Value) -> std::thread::JoinHandle<Resp> {
    let (addr, body) = (addr.to_string(), body.to_string());
    std::thread::spawn(move || request(&addr, "POST", path, &[], body.as_bytes()))
}

/// Polls `f` until it is true or `secs` pass.
pub fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Runs `tests/python/SCRIPT` (a client test printing `N passed, M failed`) against `srv` with
/// `env`, after making sure python3 can import `package` (pip-installed if missing). Outside CI
/// a package that cannot be installed is reported as skipped; with `CI=true` (where `.ci/run`
/// installs it) that fails.
pub fn python_client_test(package: &str, script: &str, env: &[(&str, String)]) {
    let ci = std::env::var_os("CI").is_some();
    let has = || {
        Command::new("python3")
            .args(["-c", &format!("import {package}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has() {
        let installed = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", package])
            .status()
            .is_ok_and(|s| s.success());
        if !installed || !has() {
            assert!(!ci, "the {package} Python package could not be installed");
            flashmoe_testdata::say_skipped(&format!(
                "python3 with the {package} package is not available"
            ));
            return;
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/python")
        .join(script);
    let out = Command::new("python3")
        .arg(&script)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
