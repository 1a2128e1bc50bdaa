//! The chat's prompt loop: lines in, `/commands` handled here (an unknown one is refused, not
//! sent to the model), everything else a user turn; and saving, which may fail (disk full, a
//! read-only directory) without ending the chat: the conversation stays in memory, a warning
//! says so, and the next save (or `/save`) rewrites the whole file.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use flashmoe_runtime::{GenerationRequest, PromptInput};
use flashmoe_text::{SessionHeader, SessionStore};
use rustyline::error::ReadlineError;
use serde_json::{json, Value};

use super::{Replier, Style};
use crate::cmd::out::{outln, StdoutClosed};
use crate::cmd::sampling::SamplingArgs;
use crate::cmd::tools::run_bash;

/// The commands, as `/help` and a refused unknown command list them.
const COMMANDS: &str = "/help  this list    /exit or /quit  leave (the session stays saved)\n\
/clear  start a new session (the current one stays saved)    /save  write the session file \
again (after a failed save)\n/tokens  context used    /think  show or hide thinking    \
/id  this session's id\n(a message that starts with / : begin it with //)";

pub struct Chat {
    pub replier: Replier,
    pub store: SessionStore,
    pub model_dir: PathBuf,
    pub header: SessionHeader,
    pub messages: Vec<Value>,
    /// Whether the session file holds every message in `messages`.
    pub saved: bool,
    pub tools: Vec<Value>,
    pub show_think: bool,
    pub enable_thinking: Option<bool>,
    pub max_tokens: usize,
    pub sampling: SamplingArgs,
    pub interrupted: Arc<AtomicBool>,
    pub style: Style,
}

/// Starts a session file holding `messages`; a failure (unwritable directory, full disk) is a
/// warning and an unsaved session, not a chat that cannot start. Returns (header, saved).
pub fn start_session(
    store: &SessionStore,
    model: &Path,
    messages: &[Value],
) -> (SessionHeader, bool) {
    let header = SessionStore::new_header(model);
    let saved = store.start(&header).and_then(|_| {
        messages
            .iter()
            .try_for_each(|m| store.append(&header.id, m))
    });
    if let Err(e) = &saved {
        warn_unsaved(e);
    }
    (header, saved.is_ok())
}

fn warn_unsaved(e: &dyn std::fmt::Display) {
    eprintln!(
        "warning: the session could not be saved ({e}); the chat goes on, kept in memory, \
         and the next message (or /save) tries again"
    );
}

/// What a typed line is.
#[derive(Debug, PartialEq)]
enum Input<'a> {
    /// `/word ...`: a command (known or not).
    Command(&'a str),
    /// Anything else, sent to the model (`//x` is the text `/x`).
    Text(&'a str),
}

fn classify(line: &str) -> Input<'_> {
    if line.starts_with("//") {
        return Input::Text(&line[1..]);
    }
    if let Some(body) = line.strip_prefix('/') {
        let word = body.split_whitespace().next().unwrap_or("");
        // `/usr/bin/ls: what is it?` is text; `/exit`, `/hepl` are commands.
        if word.is_empty() || word.chars().all(|c| c.is_ascii_alphabetic()) {
            return Input::Command(word);
        }
    }
    Input::Text(line)
}

impl Chat {
    /// A long prefill (a resumed session's history) shows how far it is, on stderr.
    pub fn show_prefill_progress(&mut self) {
        let Replier::Model(engine) = &mut self.replier else {
            return;
        };
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut shown = false;
        engine.set_prefill_progress(Some(Box::new(move |done, total| {
            // One step that covers the whole prompt needs no progress line.
            if done < total {
                shown = true;
                if tty {
                    eprint!("\rprefill {done}/{total} tokens");
                } else {
                    eprintln!("prefill {done}/{total} tokens");
                }
            } else if shown {
                shown = false;
                if tty {
                    eprint!("\r{:40}\r", "");
                } else {
                    eprintln!("prefill {done}/{total} tokens");
                }
            }
        })));
    }

    pub fn repl(&mut self) -> Result<()> {
        let Style { dim, bold, reset } = self.style;
        outln!(
            "{bold}flashmoe chat{reset}  session {}  (Ctrl-C stops an answer, Ctrl-D or /exit quits, /help for commands)",
            self.header.id
        )?;
        for m in &self.messages {
            let role = m["role"].as_str().unwrap_or("?");
            let content = m["content"].as_str().unwrap_or("");
            outln!("{dim}[{role}]{reset} {content}")?;
        }
        let mut rl = rustyline::DefaultEditor::new().context("starting the line editor")?;
        let hist = self.store.dir().join("history.txt");
        let _ = rl.load_history(&hist);
        loop {
            let line = match rl.readline(">>> ") {
                Ok(l) => l,
                Err(ReadlineError::Interrupted) => continue,
                Err(ReadlineError::Eof) => break,
                Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    return Err(StdoutClosed.into())
                }
                Err(e) => return Err(e).context("reading input"),
            };
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            let _ = rl.add_history_entry(text);
            let _ = rl.save_history(&hist);
            let text = match classify(text) {
                Input::Command(cmd) => {
                    if !self.command(cmd)? {
                        break;
                    }
                    continue;
                }
                Input::Text(t) => t,
            };
            self.save(json!({"role": "user", "content": text}));
            if let Err(e) = self.assistant_turns(&mut rl) {
                if crate::cmd::out::is_stdout_closed(&e) {
                    return Err(e);
                }
                outln!("\n{bold}error:{reset} {e:#}")?;
            }
        }
        if !self.saved {
            self.rewrite();
        }
        if self.saved {
            outln!(
                "session saved: {} (resume with --resume {})",
                self.header.id,
                self.header.id
            )?;
        } else {
            outln!(
                "{bold}session NOT saved{reset}: {} could not be written (see the warnings above)",
                self.header.id
            )?;
        }
        Ok(())
    }

    /// Runs a `/command`; false ends the chat.
    fn command(&mut self, cmd: &str) -> Result<bool> {
        let Style { dim, reset, .. } = self.style;
        match cmd {
            "exit" | "quit" => return Ok(false),
            "help" => outln!("{COMMANDS}")?,
            "think" => {
                self.show_think = !self.show_think;
                let how = if self.show_think { "shown" } else { "hidden" };
                outln!("thinking {how}")?;
            }
            "id" => outln!("{}", self.header.id)?,
            "save" => {
                self.rewrite();
                if self.saved {
                    let path = self.store.path_of(&self.header.id)?;
                    outln!(
                        "saved {} messages to {}",
                        self.messages.len(),
                        path.display()
                    )?;
                }
            }
            "clear" => {
                let old = self.header.id.clone();
                let keep: Vec<Value> = self
                    .messages
                    .iter()
                    .filter(|m| m["role"] == "system")
                    .take(1)
                    .cloned()
                    .collect();
                let (header, saved) = start_session(&self.store, &self.model_dir, &keep);
                self.header = header;
                self.saved = saved;
                self.messages = keep;
                outln!(
                    "new session {} (the previous one, {old}, stays saved)",
                    self.header.id
                )?;
            }
            "tokens" => self.show_tokens()?,
            other => outln!(
                "unknown command /{other}: nothing was sent to the model. Commands:\n{dim}{COMMANDS}{reset}"
            )?,
        }
        Ok(true)
    }

    /// `/tokens`: how much of the context the conversation fills.
    fn show_tokens(&self) -> Result<()> {
        let Replier::Model(engine) = &self.replier else {
            return outln!(
                "context: {} messages (scripted replies: no model to count tokens)",
                self.messages.len()
            );
        };
        let req = GenerationRequest::new(PromptInput::Messages {
            messages: self.messages.clone(),
            tools: self.tools.clone(),
            enable_thinking: self.enable_thinking,
            add_generation_prompt: true,
        });
        let context = engine.context_len();
        match engine.prepare(&req) {
            Ok((p, _)) => outln!(
                "context: {} of {context} tokens used ({:.1}%), {} messages",
                p.ids.len(),
                100.0 * p.ids.len() as f64 / context.max(1) as f64,
                self.messages.len()
            ),
            Err(e) => outln!("context: {e}"),
        }
    }

    /// Adds a message to the conversation and to its file. A failed save warns and leaves the
    /// session unsaved; while it is, every save rewrites the whole file (so no message is
    /// missing from it once one succeeds).
    pub fn save(&mut self, msg: Value) {
        self.messages.push(msg);
        if !self.saved {
            self.rewrite();
            return;
        }
        let last = self.messages.last().unwrap_or(&Value::Null);
        if let Err(e) = self.store.append(&self.header.id, last) {
            self.saved = false;
            warn_unsaved(&e);
        }
    }

    /// Writes the whole session file again (temp file + rename).
    fn rewrite(&mut self) {
        match self.store.rewrite(&self.header, &self.messages) {
            Ok(_) => {
                if !self.saved {
                    eprintln!("note: session {} is saved again", self.header.id);
                }
                self.saved = true;
            }
            Err(e) => {
                if self.saved {
                    warn_unsaved(&e);
                } else {
                    eprintln!("warning: still not saved: {e}");
                }
                self.saved = false;
            }
        }
    }

    /// Generates until the assistant stops calling tools.
    fn assistant_turns(&mut self, rl: &mut rustyline::DefaultEditor) -> Result<()> {
        let Style { dim, reset, .. } = self.style;
        loop {
            self.interrupted.store(false, Ordering::SeqCst);
            let (msg, calls, cancelled) = self.one_reply()?;
            self.save(msg);
            if cancelled {
                outln!("\n{dim}[stopped]{reset}")?;
                return Ok(());
            }
            if calls.is_empty() {
                return Ok(());
            }
            for (call_id, name, args) in calls {
                let output = self.run_tool(rl, &name, &args)?;
                self.save(json!({"role": "tool", "tool_call_id": call_id, "name": name, "content": output}));
            }
        }
    }

    fn run_tool(
        &self,
        rl: &mut rustyline::DefaultEditor,
        name: &str,
        args: &Value,
    ) -> Result<String> {
        let Style { dim, bold, reset } = self.style;
        if name != "bash" {
            outln!("{dim}[the model called an unknown tool `{name}`]{reset}")?;
            return Ok(format!(
                "error: unknown tool `{name}`; the only tool is `bash`"
            ));
        }
        let Some(cmd) = args.get("command").and_then(Value::as_str) else {
            outln!("{dim}[bash call without a `command` string: {args}]{reset}")?;
            return Ok("error: the bash tool needs a `command` string parameter".into());
        };
        outln!("\n{bold}The model wants to run:{reset}\n  {cmd}")?;
        let answer = rl.readline("Run it? [y/N] ").unwrap_or_default();
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            outln!("{dim}[not run]{reset}")?;
            return Ok("The user declined to run this command.".into());
        }
        let out = run_bash(cmd);
        outln!("{dim}{out}{reset}")?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, Input};

    #[test]
    fn slash_words_are_commands_and_paths_are_text() {
        assert_eq!(classify("/exit"), Input::Command("exit"));
        assert_eq!(classify("/hepl me"), Input::Command("hepl"));
        assert_eq!(classify("/"), Input::Command(""));
        assert_eq!(
            classify("/usr/bin/ls: what is it?"),
            Input::Text("/usr/bin/ls: what is it?")
        );
        assert_eq!(
            classify("//exit is a command"),
            Input::Text("/exit is a command")
        );
        assert_eq!(classify("hello /exit"), Input::Text("hello /exit"));
    }
}
