//! The progress bar of long conversions (pack, synth, pull): bytes, rate and ETA on stderr, and what
//! Ctrl-C does to them.
use std::path::Path;

use flashmoe_core::packed::{abandon_partial, Progress};
use indicatif::{ProgressBar, ProgressStyle};

/// Decimal units (MB, GB), as every summary and size flag of flashmoe uses (`--vram-cache-gb`,
/// pack's "dense 1234.5 MB"): indicatif's `{bytes}` would say MiB.
pub struct Bar {
    bar: ProgressBar,
    /// Drawn by a MultiProgress (pull's download and packing bars), which owns the target.
    in_multi: bool,
}

/// The style of every byte bar.
pub fn byte_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] [{wide_bar}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

impl Bar {
    pub fn new() -> Self {
        let bar = ProgressBar::hidden();
        bar.set_style(byte_style());
        Bar {
            bar,
            in_multi: false,
        }
    }

    /// A bar drawn as one line of `multi`.
    pub fn in_multi(multi: &indicatif::MultiProgress) -> Self {
        let bar = multi.add(ProgressBar::new(0));
        bar.set_style(byte_style());
        Bar {
            bar,
            in_multi: true,
        }
    }
}

impl Progress for Bar {
    fn begin(&self, total: u64, what: &str) {
        if !self.in_multi {
            self.bar
                .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_message(what.to_string());
    }
    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }
    fn finish(&self) {
        self.bar.finish();
    }
}

/// Makes Ctrl-C during a conversion into `out` remove `OUT.partial` before exiting. Without it
/// the default SIGINT ended the process with the partial directory left behind: it never loads
/// as a model and the next conversion clears it, but until then it holds as much disk as was
/// written (hundreds of GB for a large model). An existing `OUT` is never touched.
pub fn clean_up_on_ctrl_c(out: &Path) {
    let out = out.to_path_buf();
    // A handler that cannot be installed (one already is) leaves the default behaviour.
    let _ = ctrlc::set_handler(move || {
        let (_no_commit_after_this, found) = abandon_partial(&out);
        if found {
            eprintln!(
                "\ninterrupted: removed the unfinished {}.partial",
                out.display()
            );
        } else {
            eprintln!("\ninterrupted after {} was complete", out.display());
        }
        std::process::exit(130);
    });
}
