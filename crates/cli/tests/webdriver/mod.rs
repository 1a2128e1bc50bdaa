//! A minimal W3C WebDriver client for the browser tests: starts `chromedriver` on a free
//! loopback port, opens one headless Chromium session and speaks the protocol's JSON over a
//! plain TcpStream. Only what the tests use: navigate, find,
//! click, type, run a script, take a screenshot.
#![allow(dead_code)]
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use crate::serve_util::{connect, wait_until, write_request};

/// The key W3C WebDriver names an element reference by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|n| {
        std::env::split_paths(&path)
            .map(|d| d.join(n))
            .find(|p| p.is_file())
    })
}

pub struct Browser {
    driver: Child,
    addr: String,
    session: String,
}

impl Browser {
    /// Chromium and chromedriver from PATH, or None with "skipped: no chromium" (a failure
    /// under CI=true, where `.ci/run` installs them).
    pub fn start() -> Option<Browser> {
        let chrome = on_path(&["chromium", "chromium-browser", "google-chrome"]);
        let (Some(chrome), Some(driver)) = (chrome, on_path(&["chromedriver"])) else {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "chromium and chromedriver are missing (.ci/run installs them)"
            );
            println!("skipped: no chromium");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("finding a free port")
            .port();
        let driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let addr = format!("127.0.0.1:{port}");
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
        };
        let ready = wait_until(30, || {
            std::net::TcpStream::connect(&b.addr).is_ok()
                && b.raw("GET", "/status", None)["value"]["ready"] == json!(true)
        });
        assert!(ready, "chromedriver did not become ready");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chrome.to_string_lossy(),
                // --no-sandbox: CI runs as root, where Chromium's sandbox cannot start.
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,900"],
            },
        }}});
        let v = b.raw("POST", "/session", Some(&caps));
        b.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        Some(b)
    }

    /// One request; the answer's body by its Content-Length (chromedriver keeps the
    /// connection open whatever the request asks, so reading to the end would hang).
    fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut s = connect(&self.addr);
        write_request(&mut s, method, path, &[], body.as_bytes());
        let mut r = BufReader::new(s);
        let mut len = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line)
                .expect("reading chromedriver's answer");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().expect("Content-Length");
                }
            }
        }
        let mut buf = vec![0; len];
        r.read_exact(&mut buf)
            .expect("reading chromedriver's answer");
        serde_json::from_slice(&buf).unwrap_or(Value::Null)
    }

    /// A command on the session; panics with WebDriver's error.
    fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let body = (method == "POST").then_some(&body);
        let v = self.raw(method, &format!("/session/{}{path}", self.session), body);
        if let Some(err) = v["value"].get("error") {
            panic!(
                "WebDriver {method} {path}: {err}: {}",
                v["value"]["message"]
            );
        }
        v["value"].clone()
    }

    pub fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({"url": url}));
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT].as_str().expect("element id").to_string()
    }

    pub fn click(&self, css: &str) {
        let id = self.find(css);
        self.cmd("POST", &format!("/element/{id}/click"), json!({}));
    }

    /// Types `text` into the element, as keystrokes.
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.cmd(
            "POST",
            &format!("/element/{id}/value"),
            json!({"text": text}),
        );
    }

    /// Runs a function body in the page and returns its result.
    pub fn js(&self, body: &str) -> Value {
        self.cmd("POST", "/execute/sync", json!({"script": body, "args": []}))
    }

    /// Runs `body` until it returns something other than null (or false), within `secs`.
    pub fn wait_js(&self, body: &str, secs: u64) -> Value {
        let mut out = Value::Null;
        let ok = wait_until(secs, || {
            out = self.js(body);
            !out.is_null() && out != json!(false)
        });
        if !ok {
            let page = self.js("return document.body.innerText;");
            panic!("timed out waiting for `{body}`; the page shows:\n{page}");
        }
        out
    }

    /// The browser console's messages so far (chromedriver's log) that contain `needle`.
    pub fn console_lines(&self, needle: &str) -> Vec<String> {
        let v = self.cmd("POST", "/se/log", json!({"type": "browser"}));
        let all: Vec<String> = v
            .as_array()
            .expect("a log array")
            .iter()
            .filter_map(|e| e["message"].as_str().map(str::to_string))
            .collect();
        println!("browser console: {all:?}");
        all.into_iter().filter(|m| m.contains(needle)).collect()
    }

    /// Saves a PNG of the window.
    pub fn screenshot(&self, path: &Path) {
        let v = self.cmd("GET", "/screenshot", json!(null));
        let png = base64::decode(v.as_str().expect("base64 screenshot")).expect("decoding it");
        std::fs::write(path, png).expect("writing the screenshot");
        println!("screenshot: {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            self.raw("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
