//! Stdout that may close under us (`flashmoe run ... | head -c 80`).
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe is an `EPIPE` error, and `println!`
//! turns that into a panic with a backtrace hint. Every command writes its output through
//! [`out!`]/[`outln!`] instead: each write is flushed at once (so a closed pipe is seen at the
//! next token, not after the whole answer has been generated) and a broken pipe becomes
//! [`StdoutClosed`], which `main` turns into a quiet exit with status 141, what a shell
//! reports for a process killed by SIGPIPE (`yes | head` style). [`quiet_broken_pipe_hook`] is
//! the net under it for a stray `eprintln!` into a closed pipe.
use std::fmt;
use std::io::Write;

/// Exit status for a closed stdout: 128 + SIGPIPE, as a shell reports `yes | head`.
pub const CLOSED_STATUS: i32 = 141;

/// The reader of stdout went away; nothing is wrong with the command.
#[derive(Debug)]
pub struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes and flushes `args` to stdout; a closed pipe is [`StdoutClosed`].
pub fn write_fmt(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|_| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => anyhow::Error::new(StdoutClosed),
            _ => anyhow::Error::new(e).context("writing to stdout"),
        })
}

/// Whether `e` (anywhere in its chain) is a closed stdout.
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// `print!` that returns `anyhow::Result<()>` (a closed pipe is [`StdoutClosed`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cmd::out::write_fmt(format_args!($($arg)*))
    };
}

/// `println!` that returns `anyhow::Result<()>` (a closed pipe is [`StdoutClosed`]).
macro_rules! outln {
    () => {
        $crate::cmd::out::write_fmt(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cmd::out::write_fmt(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {out, outln};

/// Makes a panic of the main thread from printing into a closed pipe (a `println!` or
/// `eprintln!` that missed [`out!`], or stderr piped into `head` too) exit quietly with
/// [`CLOSED_STATUS`]; every other panic is reported as before. Worker threads are left alone:
/// a server catches their panics and carries on.
pub fn quiet_broken_pipe_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info.payload_as_str().unwrap_or("");
        let main = std::thread::current().name() == Some("main");
        if main && msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(CLOSED_STATUS);
        }
        default(info)
    }));
}
