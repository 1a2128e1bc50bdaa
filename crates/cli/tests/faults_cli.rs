//! Faults a user can cause at the CLI, each of which once crashed, lost a session or
//! misreported: a closed stdout (`flashmoe ... | head`) for every command that writes to it,
//! damaged and unwritable chat session files (a half-written last line, an empty file, a full
//! disk during a save and at the start, simulated with RLIMIT_FSIZE), chat commands, and the
//! flags added with them (`--threads`, `--ctx-size`, `--prompt-file`, bench's ranges).
mod common;

use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

/// The tiny test model (golden weights, test tokenizer, Qwen3.5 template) in `dir/model`.
fn test_model(tag: &str) -> Option<(PathBuf, PathBuf)> {
    let shared = shared_dir()?;
    let tmp = temp_dir(tag);
    let model = tmp.join("model");
    flashmoe_runtime::testutil::make_test_model_dir(&shared, &model).expect("test model");
    Some((tmp, model))
}

/// Runs `cmd` with stdout (and, with `stderr_too`, stderr) on a pipe whose reading end is
/// already closed, so that every write to it fails with EPIPE.
fn run_into_closed_pipe(cmd: &mut Command, stderr_too: bool) -> Output {
    let mut fds = [0; 2];
    // SAFETY: pipe() fills the two descriptors; each is owned once below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe()");
    unsafe { libc::close(fds[0]) };
    let write_end: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fds[1]) };
    let dup = write_end.try_clone().expect("dup");
    cmd.stdin(Stdio::null()).stdout(Stdio::from(write_end));
    if stderr_too {
        cmd.stderr(Stdio::from(dup));
    } else {
        cmd.stderr(Stdio::piped());
    }
    cmd.output().expect("spawn flashmoe")
}

/// Quiet exit on a closed stdout: status 141 (as a shell reports SIGPIPE), no panic, no error.
fn assert_quiet_close(what: &str, out: &Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(141) || out.status.code() == Some(0),
        "{what}: status {:?} (signal {:?})\nstderr: {err}",
        out.status.code(),
        out.status.signal()
    );
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(!err.contains("error:"), "{what}: {err}");
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

#[test]
fn closed_stdout_ends_every_command_quietly() {
    let Some((tmp, model)) = test_model("faults_pipe") else {
        return;
    };
    let shared = shared_dir().expect("shared");
    let text = tmp.join("text.txt");
    write(&text, "hello world ".repeat(2000));
    let req = tmp.join("req.json");
    write(&req, r#"{"messages": [{"role": "user", "content": "hi"}]}"#);
    let data = tmp.join("data");
    let m = model.to_str().unwrap();
    let tok = shared.join("tokenizer/qwen3.5");
    let t = tok.to_str().unwrap();
    let synth_out = tmp.join("synth");
    let pack_out = tmp.join("packed");
    let golden = shared.join("golden/tiny-a/hf-bf16");
    let script = tmp.join("replies.json");
    write(&script, r#"["a scripted answer"]"#);
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "tokenize",
            strings(&[
                "tokenize",
                "--tokenizer",
                t,
                "--text-file",
                text.to_str().unwrap(),
            ]),
        ),
        (
            "render",
            strings(&[
                "render",
                "--tokenizer",
                t,
                "--request",
                req.to_str().unwrap(),
            ]),
        ),
        (
            "run --prompt",
            strings(&[
                "run",
                "--model",
                m,
                "--prompt",
                "hi",
                "--tokens",
                "200",
                "--no-think",
            ]),
        ),
        (
            "run --ids",
            strings(&["run", "--model", m, "--ids", "1,2,3", "--tokens", "50"]),
        ),
        (
            "generate",
            strings(&["generate", "--model", m, "--ids", "1,2,3", "--tokens", "50"]),
        ),
        ("demo", strings(&["demo", "--tokens", "50"])),
        (
            "synth",
            strings(&[
                "synth",
                "--preset",
                "tiny",
                "--out",
                synth_out.to_str().unwrap(),
            ]),
        ),
        (
            "pack",
            strings(&[
                "pack",
                "--from",
                golden.to_str().unwrap(),
                "--out",
                pack_out.to_str().unwrap(),
            ]),
        ),
        (
            "chat",
            strings(&[
                "chat",
                "--model",
                m,
                "--scripted-replies",
                script.to_str().unwrap(),
            ]),
        ),
        ("chat --sessions", strings(&["chat", "--sessions"])),
        ("serve", strings(&["serve", "--model", m, "--port", "0"])),
        (
            "bench",
            strings(&[
                "bench",
                "kernels",
                "--model",
                golden.to_str().unwrap(),
                "--kernel-mb",
                "1",
            ]),
        ),
    ];
    for (what, args) in cases {
        let out = run_into_closed_pipe(bin().args(&args).env("FLASHMOE_DATA_DIR", &data), false);
        assert_quiet_close(what, &out);
    }
    // stderr into the same closed pipe (`2>&1 | head`): still quiet.
    let out = run_into_closed_pipe(
        bin().args([
            "run", "--model", m, "--prompt", "hi", "--tokens", "20", "--timing",
        ]),
        true,
    );
    assert!(out.status.code() == Some(141), "status {:?}", out.status);
}

#[test]
fn run_on_a_closed_pipe_stops_generating() {
    let Some((_tmp, model)) = test_model("faults_pipe_stop") else {
        return;
    };
    // head -c 5: the answer stops at the first token after the pipe closes. With the whole
    // context to fill (4,000 tokens of the tiny model) a run that kept generating would print
    // its full answer first; reading a few bytes and closing must end it with 141.
    let mut child = bin()
        .args(["run", "--model"])
        .arg(&model)
        .args(["--ids", "1,2,3", "--tokens", "4000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 5];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("first bytes");
    drop(stdout);
    let out = child.wait_with_output().expect("wait");
    assert_quiet_close("run --ids | head -c 5", &out);
    assert_eq!(out.status.code(), Some(141), "it must notice, not finish");
}

/// `chat` with piped input (no terminal), a scripted or real model, and its own data dir.
fn chat(data: &Path, args: &[&str], input: &str, fsize_limit: Option<u64>) -> Output {
    let mut cmd = bin();
    cmd.arg("chat")
        .args(args)
        .env("FLASHMOE_DATA_DIR", data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(limit) = fsize_limit {
        // A full disk, as far as this process can tell: writes past `limit` bytes fail with
        // EFBIG (SIGXFSZ ignored so the write returns an error instead of killing us).
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn chat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write input");
    child.wait_with_output().expect("wait chat")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn session_files(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data.join("sessions"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "jsonl"));
    v.sort();
    v
}

/// Every line of a session file is whole JSON.
fn assert_whole_lines(path: &Path) -> Vec<serde_json::Value> {
    let t = std::fs::read_to_string(path).expect("session file");
    assert!(
        t.ends_with('\n'),
        "{}: ends mid-line: {t:?}",
        path.display()
    );
    t.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}")))
        .collect()
}

#[test]
fn damaged_session_files_do_not_lose_sessions() {
    let tmp = temp_dir("faults_sessions");
    let data = tmp.join("data");
    let dir = data.join("sessions");
    std::fs::create_dir_all(&dir).unwrap();
    let header = r#"{"id":"1700000000-00000001","created":1700000000,"model":"m"}"#;
    let msg = r#"{"role":"user","content":"the kept question"}"#;
    write(
        &dir.join("1700000000-00000001.jsonl"),
        format!("{header}\n{msg}\n{{\"role\":\"assistant\",\"con"),
    );
    write(&dir.join("1700000001-00000002.jsonl"), "");

    // --sessions needs no model, lists the good one with a local date, names the bad file.
    let out = run_ok(
        bin()
            .args(["chat", "--sessions"])
            .env("FLASHMOE_DATA_DIR", &data),
    );
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(
        so.contains("1700000000-00000001  created 1700000000  model m  (2023-11-1"),
        "{so}"
    );
    assert!(so.contains("1 messages"), "{so}");
    assert!(
        se.contains("1700000001-00000002.jsonl") && se.contains("empty"),
        "{se}"
    );

    // --resume keeps the whole messages, warns about the half line, and the chat goes on.
    let script = tmp.join("replies.json");
    write(&script, r#"["a scripted answer"]"#);
    let s = script.to_str().unwrap();
    let out = chat(
        &data,
        &[
            "--model",
            "unused",
            "--resume",
            "1700000000-00000001",
            "--scripted-replies",
            s,
        ],
        "next question\n/exit\n",
        None,
    );
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(se.contains("line 3 was only partly written"), "{se}");
    assert!(so.contains("the kept question"), "{so}");
    let lines = assert_whole_lines(&dir.join("1700000000-00000001.jsonl"));
    assert_eq!(
        lines.len(),
        4,
        "header, kept question, new question, answer: {lines:?}"
    );
    assert_eq!(lines[3]["content"], "a scripted answer");

    // The session is read before the model: a bad id is reported, not a model load.
    let out = chat(
        &data,
        &["--model", "/no/such/model", "--resume", "nope"],
        "",
        None,
    );
    let se = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        se.contains("no session file") && !se.contains("loading model"),
        "{se}"
    );
    let out = chat(
        &data,
        &[
            "--model",
            "/no/such/model",
            "--resume",
            "1700000001-00000002",
        ],
        "",
        None,
    );
    assert!(text(&out.stderr).contains("empty"), "{}", text(&out.stderr));
}

#[test]
fn full_disk_during_a_chat_save_keeps_the_chat_and_the_file() {
    let tmp = temp_dir("faults_full_disk");
    let data = tmp.join("data");
    let script = tmp.join("replies.json");
    let long = "x".repeat(3000);
    write(
        &script,
        serde_json::to_string(&[long.as_str(), "short"]).unwrap(),
    );
    let s = script.to_str().unwrap();
    // 1000 bytes: the header and the question fit, the 3000-byte answer does not.
    let out = chat(
        &data,
        &["--model", "m", "--scripted-replies", s],
        "first question\nsecond question\n/exit\n",
        Some(1000),
    );
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(se.contains("could not be saved"), "{se}");
    assert!(
        so.contains("short"),
        "the chat went on after the failed save: {so}"
    );
    assert!(so.contains("session NOT saved"), "{so}");
    let files = session_files(&data);
    assert_eq!(files.len(), 1, "{files:?}");
    let lines = assert_whole_lines(&files[0]);
    assert_eq!(lines[1]["content"], "first question", "{lines:?}");

    // A start that cannot write even the header leaves no empty session behind.
    let data2 = tmp.join("data2");
    let out = chat(
        &data2,
        &["--model", "m", "--scripted-replies", s],
        "hi\n/exit\n",
        Some(20),
    );
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(se.contains("could not be saved"), "{se}");
    for f in session_files(&data2) {
        let len = std::fs::metadata(&f).unwrap().len();
        assert!(len > 0, "0-byte session left: {}", f.display());
        assert_whole_lines(&f);
    }
}

#[test]
fn chat_commands_and_plain_output() {
    let tmp = temp_dir("faults_chat_cmds");
    let data = tmp.join("data");
    let script = tmp.join("replies.json");
    write(&script, r#"["first answer", "second answer"]"#);
    let s = script.to_str().unwrap();
    let out = chat(
        &data,
        &["--model", "m", "--scripted-replies", s],
        "/frobnicate\n/help\nhello\n/tokens\n/save\n//not a command\n/clear\n/exit\n",
        None,
    );
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(so.contains("unknown command /frobnicate"), "{so}");
    assert!(
        so.contains("/clear") && so.contains("/tokens") && so.contains("/save"),
        "{so}"
    );
    assert!(so.contains("context: 2 messages"), "{so}");
    assert!(so.contains("saved 2 messages to"), "{so}");
    assert!(so.contains("new session"), "{so}");
    assert!(
        !so.contains('\x1b'),
        "no escape codes when stdout is not a terminal: {so:?}"
    );
    let files = session_files(&data);
    assert_eq!(
        files.len(),
        2,
        "the cleared session and the new one: {files:?}"
    );
    let all: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert!(
        !all.contains("frobnicate"),
        "an unknown command reached the model: {all}"
    );
    assert!(all.contains("\"/not a command\""), "{all}");
    assert!(all.contains("second answer"), "{all}");
}

#[test]
fn resumed_history_prefill_shows_progress() {
    let Some((tmp, model)) = test_model("faults_resume_prefill") else {
        return;
    };
    let data = tmp.join("data");
    let dir = data.join("sessions");
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = String::from(r#"{"id":"1-a","created":1,"model":"m"}"#);
    file.push('\n');
    for i in 0..4 {
        file.push_str(&format!(
            "{{\"role\":\"user\",\"content\":\"question number {i} about the weather\"}}\n\
             {{\"role\":\"assistant\",\"content\":\"answer number {i} is sunny\"}}\n"
        ));
    }
    write(&dir.join("1-a.jsonl"), file);
    let m = model.to_str().unwrap();
    let out = chat(
        &data,
        &[
            "--model",
            m,
            "--resume",
            "1-a",
            "--prefill-chunk",
            "16",
            "--max-tokens",
            "2",
            "--no-think",
        ],
        "and today?\n/tokens\n/exit\n",
        None,
    );
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{so}\n{se}");
    assert!(se.contains("prefill 16/"), "{se}");
    assert!(
        so.contains("context: ") && so.contains("tokens used"),
        "{so}"
    );
}

#[test]
fn run_flags_threads_ctx_size_prompt_file() {
    let Some((tmp, model)) = test_model("faults_flags") else {
        return;
    };
    let m = model.to_str().unwrap();
    // --threads: used, and shown by --timing.
    let out = run_ok(bin().args([
        "run",
        "--model",
        m,
        "--ids",
        "1,2",
        "--tokens",
        "2",
        "--timing",
        "--threads",
        "1",
    ]));
    let se = text(&out.stderr);
    assert!(se.contains("compute threads: 1"), "{se}");
    assert!(
        se.contains("context 4096 tokens") && se.contains("KV cache"),
        "{se}"
    );
    run_err(bin().args(["run", "--model", m, "--ids", "1", "--threads", "0"]));

    // --ctx-size lowers the context and is refused beyond the model's.
    let err = run_err(bin().args([
        "run",
        "--model",
        m,
        "--ids",
        "1,2,3",
        "--tokens",
        "10",
        "--ctx-size",
        "8",
    ]));
    assert!(err.contains("context of 8 tokens"), "{err}");
    let err = run_err(bin().args(["generate", "--model", m, "--ids", "1", "--ctx-size", "5000"]));
    assert!(
        err.contains("beyond the model's maximum context of 4096"),
        "{err}"
    );
    let out = run_ok(bin().args([
        "run",
        "--model",
        m,
        "--ids",
        "1",
        "--tokens",
        "2",
        "--ctx-size",
        "64",
    ]));
    assert!(
        text(&out.stderr).contains("context 64 tokens (--ctx-size"),
        "{}",
        text(&out.stderr)
    );

    // --prompt-file and stdin give what --prompt gives.
    let args = [
        "run",
        "--model",
        m,
        "--tokens",
        "6",
        "--no-think",
        "--temperature",
        "0",
    ];
    let direct = run_ok(bin().args(args).args(["--prompt", "hello there"]));
    let f = tmp.join("prompt.txt");
    write(&f, "hello there");
    let from_file = run_ok(bin().args(args).arg("--prompt-file").arg(&f));
    assert_eq!(text(&from_file.stdout), text(&direct.stdout));
    let mut child = bin()
        .args(args)
        .args(["--prompt-file", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello there")
        .unwrap();
    let from_stdin = child.wait_with_output().unwrap();
    assert!(from_stdin.status.success(), "{}", text(&from_stdin.stderr));
    assert_eq!(text(&from_stdin.stdout), text(&direct.stdout));
    let empty = tmp.join("empty.txt");
    write(&empty, "  \n");
    let err = run_err(bin().args(args).arg("--prompt-file").arg(&empty));
    assert!(err.contains("empty"), "{err}");

    // Thinking cut off by --tokens: a note on stderr, not a lone newline on stdout.
    let out = run_ok(bin().args([
        "run",
        "--model",
        m,
        "--prompt",
        "hi",
        "--tokens",
        "3",
        "--temperature",
        "0",
    ]));
    assert_eq!(text(&out.stdout), "", "stdout");
    assert!(
        text(&out.stderr).contains("reached --tokens 3 while thinking"),
        "{}",
        text(&out.stderr)
    );

    // A huge number in a range error is quoted as typed, not spelled out in 309 digits.
    let err = run_err(bin().args([
        "run",
        "--model",
        m,
        "--ids",
        "1",
        "--pinned-cache-gb",
        "-1e308",
    ]));
    assert!(err.contains("`-1e308`"), "{err}");
    assert!(!err.contains("0000000000"), "{err}");
    let err = run_err(bin().args([
        "run",
        "--model",
        m,
        "--ids",
        "1",
        "--vram-cache-gb",
        "1e308",
    ]));
    assert!(err.contains("`1e308`"), "{err}");
}

#[test]
fn bench_refuses_or_reports_what_it_would_clamp() {
    let Some(shared) = shared_dir() else { return };
    let golden = shared.join("golden/tiny-a/hf-bf16");
    for (flag, v) in [
        ("--tokens", "0"),
        ("--prompt-tokens", "1"),
        ("--kernel-mb", "0"),
        ("--threads", "0"),
    ] {
        let err = run_err(
            bin()
                .args(["bench", "kernels", "--model"])
                .arg(&golden)
                .args([flag, v]),
        );
        assert!(err.contains(flag), "{flag} {v}: {err}");
    }
    // --threads reaches the benchmark's pool.
    let out = run_ok(
        bin()
            .args([
                "bench",
                "kernels",
                "--json",
                "--kernel-mb",
                "1",
                "--threads",
                "1",
                "--model",
            ])
            .arg(&golden),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["machine"]["threads"], 1, "{v}");
}
