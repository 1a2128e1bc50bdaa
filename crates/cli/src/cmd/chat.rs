//! `flashmoe chat`: a terminal chat with line editing and history, streamed answers, thinking
//! hidden or dimmed, a bash tool that runs only after the user says yes, and sessions saved as
//! JSONL (resumable by id). Ctrl-C stops the current answer, not the program.
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use flashmoe_runtime::{Engine, Event, FinishReason, GenerationRequest, PromptInput};
use flashmoe_text::{SessionStore, ToolCallParser, ToolEvent};
use rustyline::error::ReadlineError;
use serde_json::{json, Value};

use super::common::ModelArgs;
use super::sampling::SamplingArgs;
use super::tools::{bash_tool_schema, run_bash};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Resume a saved session by id (see --sessions)
    #[arg(long)]
    pub resume: Option<String>,
    /// List saved sessions and exit
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

const DIM: &str = "\x1b[2m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// Where assistant turns come from: the model, or a script (tests).
enum Replier {
    Model(Box<Engine>),
    Script(std::vec::IntoIter<String>),
}

struct Chat {
    replier: Replier,
    store: SessionStore,
    id: String,
    messages: Vec<Value>,
    tools: Vec<Value>,
    show_think: bool,
    enable_thinking: Option<bool>,
    max_tokens: usize,
    sampling: SamplingArgs,
    interrupted: Arc<AtomicBool>,
}

pub fn run(a: Args) -> Result<()> {
    let store = SessionStore::open_default()?;
    if a.sessions {
        let list = store.list()?;
        if list.is_empty() {
            println!("no saved sessions in {}", store.dir().display());
        }
        for h in list {
            println!("{}  created {}  model {}", h.id, h.created, h.model);
        }
        return Ok(());
    }
    let replier = match &a.scripted_replies {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let v: Vec<String> = serde_json::from_str(&text)
                .with_context(|| format!("{}: expected a JSON array of strings", p.display()))?;
            Replier::Script(v.into_iter())
        }
        None => {
            eprintln!("loading {} ...", a.model.model.display());
            Replier::Model(Box::new(a.model.engine()?))
        }
    };
    let (id, messages) = match &a.resume {
        Some(id) => {
            let s = store.load(id)?;
            (s.header.id.clone(), s.messages)
        }
        None => {
            let h = store.create(&a.model.model)?;
            let mut m = Vec::new();
            if let Some(sys) = &a.system {
                let msg = json!({"role": "system", "content": sys});
                store.append(&h.id, &msg)?;
                m.push(msg);
            }
            (h.id, m)
        }
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let mut chat = Chat {
        replier,
        store,
        id,
        messages,
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
    };
    chat.repl()
}

impl Chat {
    fn repl(&mut self) -> Result<()> {
        println!(
            "{BOLD}flashmoe chat{RESET}  session {}  (Ctrl-C stops an answer, Ctrl-D or /exit quits, /help for commands)",
            self.id
        );
        for m in &self.messages {
            let role = m["role"].as_str().unwrap_or("?");
            let content = m["content"].as_str().unwrap_or("");
            println!("{DIM}[{role}]{RESET} {content}");
        }
        let mut rl = rustyline::DefaultEditor::new().context("starting the line editor")?;
        let hist = self.store.dir().join("history.txt");
        let _ = rl.load_history(&hist);
        loop {
            let line = match rl.readline(">>> ") {
                Ok(l) => l,
                Err(ReadlineError::Interrupted) => continue,
                Err(ReadlineError::Eof) => break,
                Err(e) => return Err(e).context("reading input"),
            };
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            let _ = rl.add_history_entry(text);
            let _ = rl.save_history(&hist);
            match text {
                "/exit" | "/quit" => break,
                "/help" => {
                    println!(
                        "/exit  quit   /think  toggle showing thinking   /id  this session's id"
                    );
                    continue;
                }
                "/think" => {
                    self.show_think = !self.show_think;
                    println!(
                        "thinking {}",
                        if self.show_think { "shown" } else { "hidden" }
                    );
                    continue;
                }
                "/id" => {
                    println!("{}", self.id);
                    continue;
                }
                _ => {}
            }
            let user = json!({"role": "user", "content": text});
            self.messages.push(user.clone());
            self.store.append(&self.id, &user)?;
            if let Err(e) = self.assistant_turns(&mut rl) {
                println!("\n{BOLD}error:{RESET} {e:#}");
            }
        }
        println!(
            "session saved: {} (resume with --resume {})",
            self.id, self.id
        );
        Ok(())
    }

    /// Generates until the assistant stops calling tools.
    fn assistant_turns(&mut self, rl: &mut rustyline::DefaultEditor) -> Result<()> {
        loop {
            self.interrupted.store(false, Ordering::SeqCst);
            let (msg, calls, cancelled) = self.one_reply()?;
            self.messages.push(msg.clone());
            self.store.append(&self.id, &msg)?;
            if cancelled {
                println!("\n{DIM}[stopped]{RESET}");
                return Ok(());
            }
            if calls.is_empty() {
                return Ok(());
            }
            for (call_id, name, args) in calls {
                let output = self.run_tool(rl, &name, &args)?;
                let tool_msg = json!({"role": "tool", "tool_call_id": call_id, "name": name, "content": output});
                self.messages.push(tool_msg.clone());
                self.store.append(&self.id, &tool_msg)?;
            }
        }
    }

    fn run_tool(
        &self,
        rl: &mut rustyline::DefaultEditor,
        name: &str,
        args: &Value,
    ) -> Result<String> {
        if name != "bash" {
            println!("{DIM}[the model called an unknown tool `{name}`]{RESET}");
            return Ok(format!(
                "error: unknown tool `{name}`; the only tool is `bash`"
            ));
        }
        let Some(cmd) = args.get("command").and_then(Value::as_str) else {
            println!("{DIM}[bash call without a `command` string: {args}]{RESET}");
            return Ok("error: the bash tool needs a `command` string parameter".into());
        };
        println!("\n{BOLD}The model wants to run:{RESET}\n  {cmd}");
        let answer = rl.readline("Run it? [y/N] ").unwrap_or_default();
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("{DIM}[not run]{RESET}");
            return Ok("The user declined to run this command.".into());
        }
        let out = run_bash(cmd);
        println!("{DIM}{out}{RESET}");
        Ok(out)
    }

    /// One assistant message: (message JSON, tool calls, cancelled).
    fn one_reply(&mut self) -> Result<(Value, Vec<PendingCall>, bool)> {
        let mut content = String::new();
        let mut reasoning = String::new();
        let mut calls: Vec<PendingCall> = Vec::new();
        let show = self.show_think;
        let mut out = std::io::stdout();
        let mut in_think = false;
        let mut emit = |ev: &ToolEventLike, content: &mut String, reasoning: &mut String| {
            match ev {
                ToolEventLike::Content(t) => {
                    if in_think {
                        in_think = false;
                        if show {
                            let _ = writeln!(out, "{RESET}");
                        }
                    }
                    content.push_str(t);
                    let _ = write!(out, "{t}");
                }
                ToolEventLike::Reasoning(t) => {
                    reasoning.push_str(t);
                    if show {
                        if !in_think {
                            let _ = write!(out, "{DIM}");
                        }
                        let _ = write!(out, "{t}");
                    } else if !in_think {
                        let _ = write!(out, "{DIM}(thinking…){RESET} ");
                    }
                    in_think = true;
                }
            }
            let _ = out.flush();
        };
        let mut cancelled = false;
        match &mut self.replier {
            Replier::Script(it) => {
                let text = it.next().unwrap_or_default();
                let tools = Value::Array(self.tools.clone());
                let mut p = ToolCallParser::new(Some(&tools), false);
                let mut evs = p.push(&text);
                evs.extend(p.finish());
                for e in evs {
                    match e {
                        ToolEvent::Content(t) => {
                            emit(&ToolEventLike::Content(t), &mut content, &mut reasoning)
                        }
                        ToolEvent::Reasoning(t) => {
                            emit(&ToolEventLike::Reasoning(t), &mut content, &mut reasoning)
                        }
                        ToolEvent::ToolCall { name, arguments } => {
                            calls.push((format!("call_{}", calls.len()), name, arguments))
                        }
                        ToolEvent::MalformedToolCall { raw, error } => {
                            content.push_str(&raw);
                            println!("\n{DIM}[malformed tool call: {error}]{RESET}");
                        }
                    }
                }
            }
            Replier::Model(engine) => {
                let mut req = GenerationRequest::new(PromptInput::Messages {
                    messages: self.messages.clone(),
                    tools: self.tools.clone(),
                    enable_thinking: self.enable_thinking,
                    add_generation_prompt: true,
                });
                req.max_tokens = Some(self.max_tokens);
                req.sampling = self.sampling.overrides();
                // Checked between forward passes, so Ctrl-C also stops a long prefill.
                req.cancel = Some(self.interrupted.clone());
                let flag = self.interrupted.clone();
                let done = engine.generate(&req, |ev| {
                    match ev {
                        Event::Content(t) => {
                            emit(&ToolEventLike::Content(t), &mut content, &mut reasoning)
                        }
                        Event::Reasoning(t) => {
                            emit(&ToolEventLike::Reasoning(t), &mut content, &mut reasoning)
                        }
                        Event::ToolCall(c) => {
                            let args = serde_json::from_str(&c.arguments).unwrap_or(Value::Null);
                            calls.push((c.id, c.name, args));
                        }
                        Event::Done(_) => {}
                    }
                    if flag.load(Ordering::SeqCst) {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                })?;
                cancelled = done.finish_reason == FinishReason::Cancelled;
                if done.finish_reason == FinishReason::Length {
                    print!("\n{DIM}[reached --max-tokens]{RESET}");
                }
            }
        }
        println!();
        let mut msg = json!({"role": "assistant", "content": content});
        if !reasoning.is_empty() {
            msg["reasoning_content"] = Value::String(reasoning);
        }
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(
                calls
                    .iter()
                    .map(|(id, name, args)| {
                        json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
                    })
                    .collect(),
            );
        }
        Ok((msg, calls, cancelled))
    }
}

/// A tool call the model made: (call id, function name, arguments).
type PendingCall = (String, String, Value);

/// The two kinds of streamed text the chat shows.
enum ToolEventLike {
    Content(String),
    Reasoning(String),
}
