//! The bash tool offered to the model in `chat`: its schema and a bounded runner.
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Most output bytes fed back to the model (the rest is cut, and the cut is said).
const MAX_OUTPUT: usize = 16 * 1024;
const TIMEOUT: Duration = Duration::from_secs(60);

/// The engine constrains every call the model opens to this schema (strict tools, the
/// default: `command`, a string, and nothing else), so a call always parses.
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

#[cfg(test)]
mod tests {
    use flashmoe_text::call_grammar::{tool_call_lark, CallFormat, CallStart};
    use flashmoe_text::{GrammarCompiler, GrammarSpec, Tokenizer};

    /// The grammar `chat` gets for a call the model opens: the bash call goes through, a
    /// parameter the schema does not name is refused at its first wrong byte.
    #[test]
    fn bash_calls_are_held_to_the_schema() {
        let dir = flashmoe_runtime::testutil::temp_dir("bash-tool-grammar");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("tokenizer.json");
        let json = flashmoe_runtime::testutil::test_tokenizer_json();
        std::fs::write(&path, json).expect("write");
        let tok = Tokenizer::from_file(&path).expect("tokenizer");
        let _ = std::fs::remove_dir_all(&dir);
        let g = GrammarCompiler::new(&tok, 1000, &[258]).expect("trie");
        let close = "</tool_call>";
        let start = CallStart::AfterOpen {
            newline_written: false,
        };
        let tools = [super::bash_tool_schema()];
        let lark = tool_call_lark(&tools, CallFormat::Xml, start, close).expect("grammar");
        let spec = GrammarSpec::Lark(lark);
        let feed = |text: &str| {
            let mut c = g.compile(&spec).expect("compile");
            let ids = tok.encode(text).expect("encode");
            let n = ids
                .iter()
                .take_while(|&&id| c.try_accept(id, true).unwrap_or(false))
                .count();
            (n == ids.len(), c)
        };
        let call = "\n<function=bash>\n<parameter=command>\nls -l </x>\n</parameter>\n</function>\n</tool_call>";
        let (all, c) = feed(call);
        assert!(all && c.is_stopped(), "the bash call was refused");
        let (all, _) = feed("\n<function=bash>\n<parameter=cmd>\nls\n</parameter>\n");
        assert!(!all, "an undeclared parameter was allowed");
        let (all, _) = feed("\n<function=sh>\n");
        assert!(!all, "an undeclared tool was allowed");
    }
}
