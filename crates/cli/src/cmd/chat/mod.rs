//! `flashmoe chat`: a terminal chat with line editing and history, streamed answers, thinking
//! hidden or dimmed, a bash tool that runs only after the user says yes, and sessions saved as
//! JSONL (resumable by id). Ctrl-C stops the current answer, not the program.
//!
//! This file: the flags, `--sessions`, and starting or resuming a session (checked before the
//! model loads, so a bad id costs no load). `repl.rs`: the prompt loop, the `/commands` and
//! saving; `reply.rs`: one assistant reply streamed to the screen.
mod repl;
mod reply;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use flashmoe_runtime::Engine;
use flashmoe_text::{SessionHeader, SessionStore};
use serde_json::{json, Value};

use super::common::{ModelArgs, ModelOpts};
use super::out::outln;
use super::sampling::SamplingArgs;
use super::tools::bash_tool_schema;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model directory: Hugging Face or MLX checkpoint, or a flashmoe packed model (not
    /// needed with --sessions)
    #[arg(long, required_unless_present = "sessions")]
    pub model: Option<PathBuf>,
    #[command(flatten)]
    pub opts: ModelOpts,
    /// Resume a saved session by id (see --sessions); the session is read before the model
    /// loads
    #[arg(long)]
    pub resume: Option<String>,
    /// List saved sessions (id, creation time, model, local date, messages) and exit; files
    /// that cannot be read are named on stderr
    #[arg(long)]
    pub sessions: bool,
    /// Show the model's thinking (dimmed) instead of hiding it
    #[arg(long)]
    pub show_think: bool,
    /// Turn thinking off (the template's `enable_thinking=false`)
    #[arg(long)]
    pub no_think: bool,
    /// Do not offer the bash tool to the model
    #[arg(long)]
    pub no_tools: bool,
    /// Optional system prompt for a new session
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Testing aid: assistant replies are read from this JSON array of strings, in order,
    /// instead of being generated (exercises the UI, tool-call parsing and confirmation)
    #[arg(long, hide = true)]
    pub scripted_replies: Option<PathBuf>,
}

/// Terminal styling: escape codes only when stdout is a terminal (a log or a pipe gets text).
#[derive(Clone, Copy)]
pub struct Style {
    pub dim: &'static str,
    pub bold: &'static str,
    pub reset: &'static str,
}

impl Style {
    fn for_stdout() -> Style {
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            Style {
                dim: "\x1b[2m",
                bold: "\x1b[1m",
                reset: "\x1b[0m",
            }
        } else {
            Style {
                dim: "",
                bold: "",
                reset: "",
            }
        }
    }
}

/// Where assistant turns come from: the model, or a script (tests).
pub enum Replier {
    Model(Box<Engine>),
    Script(std::vec::IntoIter<String>),
}

pub fn run(a: Args) -> Result<()> {
    let store = SessionStore::open_default()?;
    if a.sessions {
        return list_sessions(&store);
    }
    let Some(model_dir) = a.model.clone() else {
        anyhow::bail!("--model DIR is required (except with --sessions)");
    };
    // The session first: a wrong id or a damaged file is reported before a long model load.
    let resumed = match &a.resume {
        Some(id) => {
            let s = store
                .load(id)
                .with_context(|| format!("resuming session {id}"))?;
            for w in &s.warnings {
                eprintln!("warning: {w}");
            }
            Some(s)
        }
        None => None,
    };
    let replier = match &a.scripted_replies {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let v: Vec<String> = serde_json::from_str(&text)
                .with_context(|| format!("{}: expected a JSON array of strings", p.display()))?;
            Replier::Script(v.into_iter())
        }
        None => {
            eprintln!("loading {} ...", model_dir.display());
            let args = ModelArgs {
                model: model_dir.clone(),
                opts: a.opts.clone(),
            };
            Replier::Model(Box::new(args.engine()?))
        }
    };
    let style = Style::for_stdout();
    let (header, messages, saved) = match resumed {
        Some(s) => (s.header, s.messages, true),
        None => {
            let mut m = Vec::new();
            if let Some(sys) = &a.system {
                m.push(json!({"role": "system", "content": sys}));
            }
            let (h, saved) = repl::start_session(&store, &model_dir, &m);
            (h, m, saved)
        }
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let mut chat = repl::Chat {
        replier,
        store,
        model_dir,
        header,
        messages,
        saved,
        tools: if a.no_tools {
            vec![]
        } else {
            vec![bash_tool_schema()]
        },
        show_think: a.show_think,
        enable_thinking: if a.no_think { Some(false) } else { None },
        max_tokens: a.max_tokens,
        sampling: a.sampling.clone(),
        interrupted,
        style,
    };
    chat.show_prefill_progress();
    chat.repl()
}

/// `--sessions`: the readable sessions on stdout, oldest first, and a note on stderr for each
/// file that could not be read (it does not hide the others).
fn list_sessions(store: &SessionStore) -> Result<()> {
    let list = store.list()?;
    if list.sessions.is_empty() {
        outln!("no saved sessions in {}", store.dir().display())?;
    }
    for s in &list.sessions {
        let h: &SessionHeader = &s.header;
        outln!(
            "{}  created {}  model {}  ({}, {} messages)",
            h.id,
            h.created,
            h.model,
            local_time(h.created),
            s.messages
        )?;
    }
    for (path, why) in &list.bad {
        eprintln!("note: skipped {}: {why}", path.display());
    }
    Ok(())
}

/// `secs` since the epoch as local `YYYY-MM-DD HH:MM`.
pub fn local_time(secs: u64) -> String {
    let t = libc::time_t::try_from(secs).unwrap_or(libc::time_t::MAX);
    // SAFETY: localtime_r only writes the tm we own; a zeroed tm is a valid initial value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return format!("{secs} s after 1970");
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min
    )
}

/// A tool call the model made: (call id, function name, arguments).
pub type PendingCall = (String, String, Value);

#[cfg(test)]
mod tests {
    #[test]
    fn local_time_formats_a_date() {
        let s = super::local_time(1_700_000_000);
        // 2023-11-14 22:13 UTC: the local date is within a day of it.
        assert!(s.starts_with("2023-11-1"), "{s}");
        assert_eq!(s.len(), "2023-11-14 22:13".len(), "{s}");
    }
}
