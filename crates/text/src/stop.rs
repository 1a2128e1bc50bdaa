//! User stop strings over streamed text: emits text as soon as it cannot be part of a stop
//! string, never emits a stop string itself, and reports when one was hit.
//!
//! Owns only string matching; stopping on token ids (EOS) is the caller's business.

/// Streaming matcher for stop strings (OpenAI `stop`).
#[derive(Debug, Clone)]
pub struct StopChecker {
    stops: Vec<String>,
    held: String,
    stopped: bool,
    /// The stop string that was reached (APIs that name it, e.g. Anthropic's `stop_sequence`).
    matched: Option<String>,
}

impl StopChecker {
    /// A checker for these stop strings; empty strings are ignored.
    pub fn new<S: AsRef<str>>(stops: &[S]) -> Self {
        StopChecker {
            stops: stops
                .iter()
                .map(|s| s.as_ref().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            held: String::new(),
            stopped: false,
            matched: None,
        }
    }

    /// Adds generated text. Returns the text safe to show now and whether a stop string was
    /// reached (text from the stop string on is discarded; later pushes return nothing).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(text);
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|pos| (pos, s)))
            .min_by_key(|&(pos, _)| pos);
        if let Some((pos, s)) = first {
            self.matched = Some(s.clone());
            self.held.truncate(pos);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }
        // Hold back the longest tail that is the start of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            let max = (s.len() - 1).min(self.held.len());
            for len in (keep + 1..=max).rev() {
                let start = self.held.len() - len;
                if self.held.is_char_boundary(start) && s.starts_with(&self.held[start..]) {
                    keep = len;
                    break;
                }
            }
        }
        let tail = self.held.split_off(self.held.len() - keep);
        (std::mem::replace(&mut self.held, tail), false)
    }

    /// End of generation without a stop: returns the held-back text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Whether a stop string has been reached.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The stop string that was reached (the earliest in the text when several were).
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut c = StopChecker::new(stops);
        let mut out = String::new();
        for p in pieces {
            let (s, stop) = c.push(p);
            out.push_str(&s);
            if stop {
                return (out, true);
            }
        }
        out.push_str(&c.finish());
        (out, false)
    }

    #[test]
    fn stops_across_pieces_without_emitting_stop() {
        assert_eq!(
            feed(&["END"], &["abc E", "N", "D more"]),
            ("abc ".into(), true)
        );
        assert_eq!(feed(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
    }

    #[test]
    fn holds_back_only_possible_prefixes() {
        let mut c = StopChecker::new(&["STOP"]);
        assert_eq!(c.push("hello ST"), ("hello ".into(), false));
        assert_eq!(c.push("AR"), ("STAR".into(), false));
        assert_eq!(c.push("S"), ("".into(), false));
        assert_eq!(c.finish(), "S");
    }

    #[test]
    fn earliest_of_several_and_unicode() {
        assert_eq!(feed(&["zz", "b"], &["aé", "bzz"]), ("aé".into(), true));
        assert_eq!(feed(&["éa"], &["xé", "é", "b"]), ("xééb".into(), false));
        assert_eq!(feed(&[], &["x"]), ("x".into(), false));
        let mut c = StopChecker::new(&["a"]);
        assert_eq!(c.push("ba"), ("b".into(), true));
        assert_eq!(c.push("c"), ("".into(), true));
    }

    #[test]
    fn names_the_stop_string_reached() {
        let mut c = StopChecker::new(&["zz", "b"]);
        assert_eq!(c.matched(), None);
        assert_eq!(c.push("abzz"), ("a".into(), true));
        assert_eq!(c.matched(), Some("b"));
        let mut c = StopChecker::new(&["b", "END"]);
        c.push("xE");
        c.push("ND b");
        assert_eq!(c.matched(), Some("END"));
    }
}
