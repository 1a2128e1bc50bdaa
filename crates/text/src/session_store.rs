//! Chat sessions on disk: one JSONL file per session under the data directory.
//!
//! Line 1 is a [`SessionHeader`] (id, creation time, model path); every later line is one
//! message as given (OpenAI-style JSON). Owns locating the directory, appending durably and
//! reading back with errors that name the file and line.
//!
//! Faults a user meets (disk full mid-save, a kill at the wrong moment) must not cost the
//! session: an append that fails is cut back to the last whole line, a half-written last line
//! (from a crash) is skipped with a warning and dropped by the next append, a new session that
//! cannot get its header written leaves no file, a listing shows the good sessions beside the
//! files it could not read, and [`SessionStore::rewrite`] replaces a file whole (temp file and
//! rename) for a front end whose appends failed.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, TextError};

/// First line of a session file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionHeader {
    /// File stem; letters, digits, `-` and `_` only.
    pub id: String,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Model directory the session was started with.
    pub model: String,
}

/// A loaded session: header plus messages in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub header: SessionHeader,
    pub messages: Vec<Value>,
    /// What was skipped while reading (a half-written last line), to show the user.
    pub warnings: Vec<String>,
}

/// One listed session: its header and how many messages it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    pub header: SessionHeader,
    pub messages: usize,
}

/// All sessions of a store: the readable ones, oldest first, and the files that are not.
#[derive(Debug, Default)]
pub struct SessionList {
    pub sessions: Vec<SessionInfo>,
    /// Files that could not be read as sessions, each with the reason.
    pub bad: Vec<(PathBuf, String)>,
}

/// Directory of session files.
#[derive(Debug, Clone)]
pub struct SessionStore {
    dir: PathBuf,
}

impl SessionStore {
    /// A store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SessionStore { dir: dir.into() }
    }

    /// A store in [`default_dir`](Self::default_dir).
    pub fn open_default() -> Result<Self> {
        Ok(Self::new(Self::default_dir()?))
    }

    /// `$FLASHMOE_DATA_DIR/sessions`, else `$XDG_DATA_HOME/flashmoe/sessions`, else
    /// `$HOME/.local/share/flashmoe/sessions`. Empty variables count as unset (XDG rule).
    pub fn default_dir() -> Result<PathBuf> {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(d) = var("FLASHMOE_DATA_DIR") {
            return Ok(d.join("sessions"));
        }
        if let Some(d) = var("XDG_DATA_HOME") {
            return Ok(d.join("flashmoe").join("sessions"));
        }
        var("HOME")
            .map(|h| h.join(".local/share/flashmoe/sessions"))
            .ok_or(TextError::NoDataDir)
    }

    /// The directory this store uses.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a session's file; rejects ids that could escape the directory.
    pub fn path_of(&self, id: &str) -> Result<PathBuf> {
        let valid = !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(TextError::Session {
                id: id.to_string(),
                msg: "ids may contain only ASCII letters, digits, '-' and '_'".into(),
            });
        }
        Ok(self.dir.join(format!("{id}.jsonl")))
    }

    /// Starts a new session file with its header; the id is `<unix seconds>-<random hex>`.
    pub fn create(&self, model: &Path) -> Result<SessionHeader> {
        let header = Self::new_header(model);
        self.start(&header)?;
        Ok(header)
    }

    /// A header for a new session, not yet written (see [`start`](Self::start)).
    pub fn new_header(model: &Path) -> SessionHeader {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        SessionHeader {
            id: format!("{created}-{:08x}", rand::random::<u32>()),
            created,
            model: model.display().to_string(),
        }
    }

    /// Writes a new session file holding `header`; never replaces an existing one, and leaves
    /// no file when the header cannot be written.
    pub fn start(&self, header: &SessionHeader) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| TextError::io("creating directory", &self.dir, e))?;
        let path = self.path_of(&header.id)?;
        let line = to_line(header, &path)?;
        // create_new: never clobber an existing session even if ids collide.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| TextError::io("creating", &path, e))?;
        if let Err(e) = write_synced(&mut file, &path, line.as_bytes()) {
            // A session without its header is not a session: leave no empty file behind.
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(())
    }

    /// Appends one message to an existing session, flushed and synced before returning. All
    /// or nothing: a write that fails (disk full) is cut back off, and a half-written last
    /// line left by a crash (which [`load`](Self::load) skipped) is dropped first, so the file
    /// always ends with whole lines.
    pub fn append(&self, id: &str, message: &Value) -> Result<()> {
        let path = self.path_of(id)?;
        let line = to_line(message, &path)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => TextError::Session {
                    id: id.to_string(),
                    msg: format!("no session file {}", path.display()),
                },
                _ => TextError::io("opening", &path, e),
            })?;
        let (keep, newline) =
            whole_lines_end(&mut file).map_err(|e| TextError::io("reading", &path, e))?;
        let mut buf = Vec::with_capacity(line.len() + 2);
        if newline {
            buf.push(b'\n');
        }
        buf.extend_from_slice(line.as_bytes());
        let result = file
            .set_len(keep)
            .and_then(|_| file.seek(SeekFrom::Start(keep)))
            .map_err(|e| TextError::io("writing", &path, e))
            .and_then(|_| write_synced(&mut file, &path, &buf));
        if result.is_err() {
            // Whatever part of the line reached the file goes: the next load must not meet it.
            let _ = file.set_len(keep).and_then(|_| file.sync_data());
        }
        result
    }

    /// Replaces a session's file with `header` and `messages`, through a temporary file that
    /// is renamed over it once complete and synced: the old file stays whole until then.
    pub fn rewrite(&self, header: &SessionHeader, messages: &[Value]) -> Result<PathBuf> {
        let path = self.path_of(&header.id)?;
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| TextError::io("creating directory", &self.dir, e))?;
        let tmp = self.dir.join(format!(".{}.jsonl.tmp", header.id));
        let mut text = to_line(header, &path)?;
        for m in messages {
            text.push_str(&to_line(m, &path)?);
        }
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(TextError::io("writing", &path, e));
        }
        // The rename itself is durable once the directory is synced.
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(path)
    }

    /// Reads a session back.
    pub fn load(&self, id: &str) -> Result<Session> {
        let path = self.path_of(id)?;
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TextError::Session {
                id: id.to_string(),
                msg: format!("no session file {}", path.display()),
            },
            _ => TextError::io("reading", &path, e),
        })?;
        parse_session(&text, &path)
    }

    /// All sessions, oldest first, beside the files that cannot be read as sessions (empty,
    /// bad header, unreadable): one bad file does not hide the others.
    pub fn list(&self) -> Result<SessionList> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SessionList::default()),
            Err(e) => return Err(TextError::io("listing", &self.dir, e)),
        };
        let mut list = SessionList::default();
        for entry in entries {
            let entry = entry.map_err(|e| TextError::io("listing", &self.dir, e))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "jsonl") {
                continue;
            }
            let read = std::fs::read_to_string(&path)
                .map_err(|e| TextError::io("reading", &path, e))
                .and_then(|text| parse_session(&text, &path));
            match read {
                Ok(s) => list.sessions.push(SessionInfo {
                    header: s.header,
                    messages: s.messages.len(),
                }),
                Err(e) => list.bad.push((path, e.to_string())),
            }
        }
        list.sessions.sort_by(|a, b| {
            (a.header.created, &a.header.id).cmp(&(b.header.created, &b.header.id))
        });
        list.bad.sort();
        Ok(list)
    }
}

/// Where a file's whole lines end, and whether a newline must come before the next line:
/// (length to keep, newline needed). A last line without its newline is kept if it is a
/// whole JSON value (only the newline was lost) and cut off if not (half a record).
fn whole_lines_end(file: &mut std::fs::File) -> std::io::Result<(u64, bool)> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok((0, false));
    }
    // A record is one line; reading the file back is cheap next to generating it.
    let mut text = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut text)?;
    if text.last() == Some(&b'\n') {
        return Ok((len, false));
    }
    let start = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if serde_json::from_slice::<Value>(&text[start..]).is_ok() {
        Ok((len, true))
    } else {
        Ok((start as u64, false))
    }
}

/// One `write_all` per record so a concurrent reader never sees half a record from us, then
/// flush + fsync so an acknowledged message survives a crash.
fn write_synced(file: &mut std::fs::File, path: &Path, bytes: &[u8]) -> Result<()> {
    file.write_all(bytes)
        .and_then(|_| file.flush())
        .and_then(|_| file.sync_data())
        .map_err(|e| TextError::io("writing", path, e))
}

/// `v` as one JSON line, newline included.
fn to_line(v: &impl Serialize, path: &Path) -> Result<String> {
    let mut line = serde_json::to_string(v).map_err(|source| TextError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    line.push('\n');
    Ok(line)
}

fn parse_header(line: &str, path: &Path) -> Result<SessionHeader> {
    serde_json::from_str(line).map_err(|e| TextError::SessionCorrupt {
        path: path.to_path_buf(),
        line: 1,
        msg: format!("bad header: {e}"),
    })
}

fn parse_session(text: &str, path: &Path) -> Result<Session> {
    if text.trim().is_empty() {
        return Err(TextError::SessionCorrupt {
            path: path.to_path_buf(),
            line: 1,
            msg: "the file is empty (no header): a session start that failed".into(),
        });
    }
    let mut lines = text.lines();
    let header = parse_header(lines.next().unwrap_or(""), path)?;
    let rest: Vec<&str> = lines.collect();
    let mut messages = Vec::new();
    let mut warnings = Vec::new();
    for (i, line) in rest.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(msg) => messages.push(msg),
            // A last line without its newline is a write that never finished (disk full, a
            // kill): the messages before it are whole, so they are kept.
            Err(e) if i + 1 == rest.len() && !text.ends_with('\n') => warnings.push(format!(
                "{}: line {} was only partly written ({} bytes, {e}); skipped, and dropped at \
                 the next save",
                path.display(),
                i + 2,
                line.len()
            )),
            Err(e) => {
                return Err(TextError::SessionCorrupt {
                    path: path.to_path_buf(),
                    line: i + 2,
                    msg: e.to_string(),
                })
            }
        }
    }
    Ok(Session {
        header,
        messages,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn temp_store(tag: &str) -> SessionStore {
        let dir =
            std::env::temp_dir().join(format!("flashmoe-sessions-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        SessionStore::new(dir)
    }

    #[test]
    fn round_trip() {
        let store = temp_store("rt");
        assert!(store.list().unwrap().sessions.is_empty());
        let h = store.create(Path::new("/models/qwen")).unwrap();
        let msgs = [
            json!({"role": "user", "content": "hi\nthere ✓"}),
            json!({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}),
        ];
        for m in &msgs {
            store.append(&h.id, m).unwrap();
        }
        let s = store.load(&h.id).unwrap();
        assert_eq!(s.header, h);
        assert_eq!(s.header.model, "/models/qwen");
        assert_eq!(s.messages, msgs);
        let h2 = store.create(Path::new("m2")).unwrap();
        let list = store.list().unwrap();
        assert!(list.bad.is_empty());
        let ids: Vec<_> = list.sessions.into_iter().map(|s| s.header.id).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&h.id) && ids.contains(&h2.id));
        std::fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn corrupt_line_names_file_and_line() {
        let store = temp_store("bad");
        let h = store.create(Path::new("m")).unwrap();
        store
            .append(&h.id, &json!({"role": "user", "content": "x"}))
            .unwrap();
        let path = store.path_of(&h.id).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{not json\n").unwrap();
        let err = store.load(&h.id).unwrap_err();
        assert!(
            matches!(err, TextError::SessionCorrupt { line: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        std::fs::remove_dir_all(store.dir()).unwrap();
    }

    fn append_raw(store: &SessionStore, id: &str, bytes: &[u8]) {
        let path = store.path_of(id).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(bytes).unwrap();
    }

    #[test]
    fn half_written_last_line_is_skipped_then_dropped() {
        let store = temp_store("half");
        let h = store.create(Path::new("m")).unwrap();
        let first = json!({"role": "user", "content": "kept"});
        store.append(&h.id, &first).unwrap();
        append_raw(&store, &h.id, br#"{"role": "assistant", "cont"#);
        let s = store.load(&h.id).unwrap();
        assert_eq!(s.messages, std::slice::from_ref(&first));
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].contains("line 3 was only partly written"));
        // The next save drops the half line instead of gluing a record onto it.
        let next = json!({"role": "user", "content": "next"});
        store.append(&h.id, &next).unwrap();
        let s = store.load(&h.id).unwrap();
        assert_eq!(s.messages, [first, next]);
        assert!(s.warnings.is_empty());
        std::fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn whole_record_without_its_newline_is_kept() {
        let store = temp_store("nonl");
        let h = store.create(Path::new("m")).unwrap();
        append_raw(&store, &h.id, br#"{"role":"user","content":"a"}"#);
        let a = json!({"role": "user", "content": "a"});
        assert_eq!(
            store.load(&h.id).unwrap().messages,
            std::slice::from_ref(&a)
        );
        let b = json!({"role": "user", "content": "b"});
        store.append(&h.id, &b).unwrap();
        assert_eq!(store.load(&h.id).unwrap().messages, [a, b]);
        std::fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn bad_files_are_listed_beside_good_sessions() {
        let store = temp_store("list");
        let good = store.create(Path::new("m")).unwrap();
        store
            .append(&good.id, &json!({"role": "user", "content": "x"}))
            .unwrap();
        std::fs::write(store.dir().join("empty.jsonl"), "").unwrap();
        std::fs::write(store.dir().join("junk.jsonl"), "not json\n").unwrap();
        let list = store.list().unwrap();
        assert_eq!(list.sessions.len(), 1);
        assert_eq!(list.sessions[0].header, good);
        assert_eq!(list.sessions[0].messages, 1);
        let bad: Vec<_> = list
            .bad
            .iter()
            .map(|(p, _)| p.file_name().unwrap())
            .collect();
        assert_eq!(bad, ["empty.jsonl", "junk.jsonl"]);
        assert!(list.bad[0].1.contains("empty"), "{:?}", list.bad);
        let err = store.load("empty").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        std::fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn rewrite_replaces_the_file_whole() {
        let store = temp_store("rewrite");
        let h = store.create(Path::new("m")).unwrap();
        append_raw(&store, &h.id, b"garbage");
        let msgs = [
            json!({"role": "user", "content": "a"}),
            json!({"role": "assistant", "content": "b"}),
        ];
        store.rewrite(&h, &msgs).unwrap();
        let s = store.load(&h.id).unwrap();
        assert_eq!(
            (s.header, s.messages, s.warnings.len()),
            (h, msgs.to_vec(), 0)
        );
        let names: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left: {names:?}");
        std::fs::remove_dir_all(store.dir()).unwrap();
    }

    #[test]
    fn bad_and_missing_ids_are_errors() {
        let store = temp_store("ids");
        assert!(store.path_of("../etc/passwd").is_err());
        assert!(store.load("nope").is_err());
        assert!(store.append("nope", &json!({})).is_err());
    }
}
