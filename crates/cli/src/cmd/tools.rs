//! The bash tool offered to the model in `chat`: its schema and a bounded runner.
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Most output bytes fed back to the model (the rest is cut, and the cut is said).
const MAX_OUTPUT: usize = 16 * 1024;
const TIMEOUT: Duration = Duration::from_secs(60);

pub fn bash_tool_schema() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a shell command on the user's machine (after the user confirms) and return its output.",
            "parameters": {
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The bash command line to run"}
                },
                "required": ["command"]
            }
        }
    })
}

/// Runs `bash -c cmd`, returning stdout and stderr together with the exit status; killed after
/// a minute so a hung command cannot hang the chat.
pub fn run_bash(cmd: &str) -> String {
    let child = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return format!("error: could not start bash: {e}"),
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.read_to_end(&mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = stderr.as_mut() {
            let _ = o.read_to_end(&mut s);
        }
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    let mut out = out_t.join().unwrap_or_default();
    out.extend(err_t.join().unwrap_or_default());
    let mut text = String::from_utf8_lossy(&out).to_string();
    if text.len() > MAX_OUTPUT {
        let mut cut = MAX_OUTPUT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("\n[output truncated]");
    }
    match status {
        Some(s) if s.success() => text,
        Some(s) => format!("{text}\n[exit status {}]", s.code().unwrap_or(-1)),
        None => format!("{text}\n[killed after {} s]", TIMEOUT.as_secs()),
    }
}
