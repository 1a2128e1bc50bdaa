//! The chat driven end to end in tmux (send-keys, capture-pane) against a tiny model: a prompt
//! goes in and text comes out; a tool call is confirmed, runs, and its output is shown and
//! saved; the session resumes by id.
mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux")
        .args(args)
        .output()
        .expect("tmux must be installed (CI installs it)");
    String::from_utf8_lossy(&out.stdout).to_string()
}

struct Pane(String);

impl Pane {
    fn start(name: &str, cmd: &str) -> Pane {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", name])
            .output();
        let st = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "200",
                "-y",
                "60",
                cmd,
            ])
            .status()
            .expect("tmux must be installed (CI installs it)");
        assert!(st.success(), "tmux new-session failed");
        Pane(name.to_string())
    }
    fn send(&self, keys: &str) {
        tmux(&["send-keys", "-t", &self.0, "-l", keys]);
        tmux(&["send-keys", "-t", &self.0, "Enter"]);
    }
    fn screen(&self) -> String {
        tmux(&["capture-pane", "-p", "-t", &self.0, "-S", "-200"])
    }
    /// Waits until the screen contains `text` `times` times.
    fn wait_for(&self, text: &str, times: usize, secs: u64) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.screen();
            if s.matches(text).count() >= times {
                return s;
            }
            if t0.elapsed() > Duration::from_secs(secs) {
                panic!("timed out waiting for {text:?} x{times}; screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

fn chat_cmd(model: &Path, data: &Path, extra: &str) -> String {
    format!(
        "FLASHMOE_DATA_DIR={} {} chat --model {} {} ; sleep 30",
        data.display(),
        env!("CARGO_BIN_EXE_flashmoe"),
        model.display(),
        extra
    )
}

#[test]
fn chat_prompt_tool_call_and_resume() {
    let Some(shared) = shared_dir() else { return };
    let tmp = temp_dir("chat_tmux");
    let model = tmp.join("model");
    flashmoe_runtime::testutil::make_test_model_dir(&shared, &model).expect("test model");
    let data = tmp.join("data");

    // A real generation from the tiny model: text comes out and the prompt returns.
    let pane = Pane::start(
        "fm_chat_model",
        &chat_cmd(&model, &data, "--max-tokens 12 --no-think"),
    );
    pane.wait_for(">>>", 1, 60);
    pane.send("hello model");
    let s = pane.wait_for(">>>", 2, 120);
    let after = s.split("hello model").nth(1).expect("prompt echoed");
    let answer = after.split(">>>").next().unwrap_or("");
    assert!(!answer.trim().is_empty(), "no text came out:\n{s}");
    assert!(!s.contains("error:"), "{s}");
    pane.send("/exit");
    pane.wait_for("session saved", 1, 20);
    drop(pane);

    // Scripted replies: a tool call that must be confirmed, run, shown and fed back.
    let script = tmp.join("replies.json");
    write(
        &script,
        serde_json::to_string(&[
            "Let me check.\n\n<tool_call>\n<function=bash>\n<parameter=command>\necho tool-ran-$((6*7))\n</parameter>\n</function>\n</tool_call>",
            "The command printed its answer.",
        ])
        .unwrap(),
    );
    let pane = Pane::start(
        "fm_chat_tool",
        &chat_cmd(
            &model,
            &data,
            &format!("--scripted-replies {}", script.display()),
        ),
    );
    pane.wait_for(">>>", 1, 60);
    pane.send("please run something");
    pane.wait_for("Run it? [y/N]", 1, 30);
    pane.send("y");
    let s = pane.wait_for("The command printed its answer.", 1, 30);
    assert!(s.contains("tool-ran-42"), "tool output not shown:\n{s}");
    let id_line = pane.wait_for("session", 1, 5);
    let id = id_line
        .split_whitespace()
        .skip_while(|w| *w != "session")
        .nth(1)
        .expect("session id in banner")
        .to_string();
    pane.send("/exit");
    pane.wait_for("session saved", 1, 20);
    drop(pane);

    // The session file holds the tool call and its output.
    let sessions = data.join("sessions");
    let file = std::fs::read_dir(&sessions)
        .expect("sessions dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains(&id))
        .expect("session file");
    let text = std::fs::read_to_string(file).unwrap();
    assert!(
        text.contains("tool-ran-42") && text.contains("\"role\":\"tool\""),
        "{text}"
    );

    // Resume shows the history.
    let pane = Pane::start(
        "fm_chat_resume",
        &chat_cmd(
            &model,
            &data,
            &format!("--resume {id} --scripted-replies {}", script.display()),
        ),
    );
    let s = pane.wait_for(">>>", 1, 60);
    assert!(
        s.contains("please run something"),
        "history not shown:\n{s}"
    );
}
